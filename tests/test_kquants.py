"""convert/containers/gguf/kquants.py against ggml itself: the same bytes as llama.cpp's reference quantizers.

Three references:
- llama.cpp's llama_model_quantize (what llama-quantize runs), pure and without an importance matrix, on a tiny
  Mixtral GGUF written by our converter at f32 (dim 256, ffn 512, so every row is a whole number of K-quant blocks)
  with adversarial rows written into every quantizable tensor: each tensor it quantizes must be our bytes exactly.
- ggml_quantize_chunk called directly (tests/kquant_client.py), on many more rows than a model holds: random at
  several scales, heavy tails, ties, signed zeros, sparse, flat and extreme rows.
- gguf-py's dequantizers: our bytes decode (sizes from gguf.GGML_QUANT_SIZES) to values within each type's error.

Both backends are held to the same bytes: the numpy code and the numba kernels (kquants_jit.py; skipped when numba
is not installed). tests/test_kquants_jit.py checks what is particular to the kernels (no FMA, fp16, threads).

NaN and infinities are outside the contract (the converter refuses non-finite tensors before quantizing). So are
the magnitudes at which ggml's own Q4_K/Q5_K stop on the assertion in nearest_int (this build keeps asserts):
sub-blocks of values around 1e-36 and below, or 1e7 and above; extreme rows here stay inside what ggml completes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from synthetic import TinyConfig, make_weights, write_torrent

from convert.containers.gguf import kquants, quant_rules

pytestmark = pytest.mark.containers

Q = GGMLQuantizationType
K_TYPES = (Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
LEGACY_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
ALL_TYPES = K_TYPES + LEGACY_TYPES
# Every row 256 or 512 long: 256 is QK_K, and both are whole numbers of the legacy 32-value blocks.
CFG = TinyConfig(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)
SEED = 24
# Measured on 512 x 512 standard normal values (rel. RMS error; largest |error| / largest |x| of a 32-value block),
# bounds ~1.3-1.5x: Q3_K 0.151/0.252, Q4_K 0.072/0.111, Q5_K 0.036/0.062, Q6_K 0.018/0.017, Q4_0 0.086/0.125,
# Q4_1 0.078/0.067, Q5_0 0.043/0.063, Q5_1 0.038/0.033, Q8_0 0.0054/0.0044.
ERROR_BOUNDS = {
    Q.Q3_K: (0.2, 0.35),
    Q.Q4_K: (0.1, 0.16),
    Q.Q5_K: (0.05, 0.09),
    Q.Q6_K: (0.025, 0.025),
    Q.Q4_0: (0.12, 0.14),
    Q.Q4_1: (0.11, 0.1),
    Q.Q5_0: (0.06, 0.07),
    Q.Q5_1: (0.055, 0.05),
    Q.Q8_0: (0.008, 0.007),
}


@pytest.fixture(params=["numpy", "jit"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each of kquants' backends; the jit one needs numba (the `fast` extra)."""
    if request.param == "jit" and kquants.jit_kernels() is None:
        pytest.skip("numba is not installed (pip install -e '.[fast]')")
    return request.param


@pytest.fixture(scope="module")
def ggml() -> Iterator[None]:
    """Skip unless llama-cpp-python (and the libggml-base inside it) is installed."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup` installs it)")
    yield


def adversarial(rows: np.ndarray, rng: np.random.Generator) -> None:
    """Overwrite the first 10 rows (in place) with the cases most likely to expose a difference in rounding."""
    k = rows.shape[1]
    rows[0] = 0.0  # all zero: zero scales
    rows[1] = -0.0  # signed zeros: the sign of d and m
    rows[2] = 0.25  # constant
    rows[3] = rng.standard_normal(k) * 0.01
    rows[3, 37] = 40.0  # one huge outlier
    rows[4] = rng.standard_normal(k) * 1e-20  # tiny: fp16 scales underflow to subnormal and to 0
    rows[5] = np.where(np.arange(k) % 2, 1.0, -1.0) * rng.random(k)  # alternating signs
    rows[6] = rng.standard_normal(k)
    rows[6, 32:64] = 0.0  # a zero sub-block amid normal ones
    rows[6, 64:80] = -0.0
    rows[7] = rng.integers(-8, 8, k) / 4  # exact ties for every level search
    rows[8] = np.abs(rng.standard_normal(k))  # one sign only: min clamps to 0
    rows[9] = -np.abs(rng.standard_normal(k))


def many_rows(k: int, seed: int) -> np.ndarray:
    """Rows of length k for the direct comparison: ~2100 x 512 values (more than one of kquants' chunks)."""
    rng = np.random.default_rng(seed)

    def normal(n: int) -> np.ndarray:
        return rng.standard_normal((n, k))

    parts = [
        normal(400) * rng.choice([1e-3, 0.02, 1.0, 50.0], (400, 1)),
        rng.standard_t(2, (300, k)) * 0.01,  # heavy tails
        rng.laplace(size=(300, k)) + rng.choice([0.0, 0.5, -2.0], (300, 1)),  # offsets: min/max not around 0
        rng.uniform(-1, 1, (300, k)) * (rng.random((300, k)) < 0.3),  # sparse, zeros of both signs
        torch.randn(300, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).float().numpy() * 0.03,
        rng.integers(-40, 40, (300, k)) / 8.0,  # ties
        normal(100).astype(np.float16).astype(np.float64),
        # extremes ggml completes: subnormal-sized and large values (fp16 scales underflow or overflow)
        normal(20) * rng.choice([1e-30, 1e-25, 1e5, 1e6], (20, 1)),
    ]
    x = np.concatenate(parts).astype(np.float32)
    adversarial(x, rng)
    return x


def extreme_rows(qtype: GGMLQuantizationType) -> np.ndarray:
    """Far outside weights' range, where ggml still completes for qtype (see the module docstring)."""
    rng = np.random.default_rng(7)
    if qtype in (Q.Q4_K, Q.Q5_K):
        scales = [1e-32, 1e-30, 1e6]
    else:
        scales = [1e-45, 1e-40, 1e-38, 1e-36, 1e-30, 1e7, 1e8, 1e20, 1e30, 1e37]
    return np.concatenate([rng.standard_normal((4, 256)) * s for s in scales]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# 1. llama-quantize's own output


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> Path:
    """Our converter's f32 GGUF of a tiny Mixtral (rows of 256 and 512), with adversarial rows in every tensor."""
    tmp = tmp_path_factory.mktemp("kquants")
    write_torrent(tmp / "src", CFG, make_weights(CFG, seed=SEED))
    cli("convert", tmp / "src", tmp / "f32", "--to", "gguf", "--outtype", "f32", "--no-progress")
    model = tmp / "adversarial.gguf"
    shutil.copyfile(tmp / "f32" / "model.gguf", model)
    reader = GGUFReader(model, "r+")
    rng = np.random.default_rng(SEED)
    edited = 0
    for tensor in reader.tensors:
        assert tensor.tensor_type == Q.F32
        if tensor.data.ndim >= 2 and tensor.data.shape[-2] >= 10:  # the router (4 rows) is never quantized
            adversarial(tensor.data.reshape(-1, tensor.data.shape[-1]), rng)
            edited += 1
    reader.data.flush()
    del reader
    assert edited == 2 * 7 + 2  # per layer q, k, v, o and the three expert stacks; token_embd and output
    return model


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_llama_model_quantize_bytes(
    ggml: None, f32_model: Path, tmp_path: Path, qtype: GGMLQuantizationType, backend: str
) -> None:
    """Every tensor llama_model_quantize (pure, no imatrix, 4 threads) writes as qtype is our bytes for its rows."""
    from kquant_client import llama_quantize

    out = llama_quantize(f32_model, tmp_path / f"{qtype.name}.gguf", qtype, nthread=4)
    source = {t.name: np.asarray(t.data) for t in GGUFReader(f32_model).tensors}
    compared = []
    for tensor in GGUFReader(out).tensors:
        if tensor.tensor_type != qtype:
            assert tensor.tensor_type == Q.F32, tensor.name  # norms and routers stay as they were
            assert tensor.data.ndim == 1 or tensor.name.endswith("ffn_gate_inp.weight"), tensor.name
            continue
        values = source[tensor.name]
        rows = values.reshape(-1, values.shape[-1])
        theirs = np.asarray(tensor.data).reshape(rows.shape[0], -1)
        ours = kquants.quantize(rows, qtype, backend=backend)
        assert ours.shape == theirs.shape, tensor.name
        differing = np.nonzero((ours != theirs).any(axis=1))[0]
        assert differing.size == 0, f"{tensor.name}: rows {differing[:10].tolist()} differ from llama.cpp's"
        compared.append(tensor.name)
    assert len(compared) == 16, compared  # every matrix but the routers: all of them at the one type


# ---------------------------------------------------------------------------------------------------------------
# 2. ggml_quantize_chunk directly


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [256, 512])
def test_ggml_quantize_chunk_bytes(ggml: None, qtype: GGMLQuantizationType, k: int, backend: str) -> None:
    from kquant_client import ggml_quantize

    rows = many_rows(k, seed=k)
    ours = kquants.quantize(rows, qtype, backend=backend)
    theirs = ggml_quantize(rows, qtype)
    differing = np.nonzero((ours != theirs).any(axis=1))[0]
    assert differing.size == 0, f"rows {differing[:10].tolist()} of {rows.shape[0]} differ from ggml's"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_extreme_magnitudes(ggml: None, qtype: GGMLQuantizationType, backend: str) -> None:
    from kquant_client import ggml_quantize

    rows = extreme_rows(qtype)
    assert np.array_equal(kquants.quantize(rows, qtype, backend=backend), ggml_quantize(rows, qtype))


def test_rows_are_independent(ggml: None, backend: str) -> None:
    """One call on all rows, one per row and ggml on all rows agree: no state crosses rows or chunks."""
    from kquant_client import ggml_quantize

    rows = many_rows(256, seed=3)[:300]
    whole = kquants.quantize(rows, Q.Q4_K, backend=backend)
    one_by_one = [kquants.quantize(rows[i : i + 1], Q.Q4_K, backend=backend) for i in range(300)]
    assert np.array_equal(whole, np.concatenate(one_by_one))
    assert np.array_equal(whole, ggml_quantize(rows, Q.Q4_K))


def test_fp16_rounding_is_ggml(ggml: None) -> None:
    """numpy's float32 -> float16 cast is GGML_FP32_TO_FP16 (ties to even, subnormals, overflow to inf)."""
    from kquant_client import fp32_to_fp16

    rng = np.random.default_rng(1)
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves[:-1] + (halves[1:] - halves[:-1]) / 2).astype(np.float32)  # exactly between two fp16 values
    values = np.concatenate(
        [
            halves,
            ties,
            np.nextafter(ties, np.float32(np.inf)),
            np.nextafter(ties, np.float32(-np.inf)),
            rng.standard_normal(100_000).astype(np.float32) * np.float32(1e-3),
            np.float32([65504, 65519.99, 65520, 1e6, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, 0.0, -0.0]),
        ]
    )
    values = np.concatenate([values, -values])
    assert np.array_equal(quant_rules.fp16_bits(values), fp32_to_fp16(values))


# ---------------------------------------------------------------------------------------------------------------
# 3. gguf-py's dequantizers, sizes, edge cases and the API


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_dequantize(qtype: GGMLQuantizationType, backend: str) -> None:
    rows = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    packed = kquants.quantize(rows, qtype, backend=backend)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8
    assert packed.shape == (512, 512 // block * block_bytes)
    assert packed.shape == gguf_quants.quant_shape_to_byte_shape(rows.shape, qtype)
    back = gguf_quants.dequantize(packed, qtype)
    assert back.shape == rows.shape
    rms_bound, block_bound = ERROR_BOUNDS[qtype]
    error = back - rows
    assert np.sqrt(np.mean(error**2)) / np.sqrt(np.mean(rows**2)) < rms_bound
    worst = np.abs(error).reshape(-1, 32).max(axis=1) / np.abs(rows).reshape(-1, 32).max(axis=1)
    assert worst.max() < block_bound


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_zero_rows_give_zero_scales(qtype: GGMLQuantizationType, backend: str) -> None:
    rows = np.zeros((3, 512), dtype=np.float32)
    rows[1] = -0.0
    packed = kquants.quantize(rows, qtype, backend=backend)
    assert not gguf_quants.dequantize(packed, qtype).any()
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    blocks = packed.reshape(-1, block_bytes)
    if qtype in K_TYPES:
        # d (and dmin) are fp16 zero and the 6-bit scales are zero; Q6_K's block is all zero bytes.
        d_at = {Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qtype]
        for at in d_at:
            assert not (blocks[:, at : at + 2].view(np.uint16) & 0x7FFF).any()
        scales_at = {Q.Q3_K: 96, Q.Q4_K: 4, Q.Q5_K: 4, Q.Q6_K: 192}[qtype]
        scale_bytes = 16 if qtype == Q.Q6_K else 12
        # Q3_K stores its scales with an offset of 32: a zero scale is 32 once unpacked, and 0 only in a zero block
        assert not blocks[:, scales_at : scales_at + scale_bytes].any()
        if qtype == Q.Q6_K:
            assert not blocks.any()
    else:
        # d is fp16 +-0 (C's max/-8 of a zero max is -0.0: 0x8000), and so is Q4_1/Q5_1's m
        assert not (blocks[:, 0:2].view(np.uint16) & 0x7FFF).any()


def test_nearest_int_rounds_half_to_even() -> None:
    values = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.5000002, 4194303.0, -4194303.0])
    assert quant_rules.nearest_int(values).tolist() == [0, 2, 2, 0, -2, -2, 0, 4, 4194303, -4194303]


def test_rejects_what_it_cannot_quantize(backend: str) -> None:
    with pytest.raises(TypeError, match="float32"):
        kquants.quantize(np.zeros((2, 256), dtype=np.float64), Q.Q4_K, backend=backend)
    with pytest.raises(ValueError, match="multiple"):  # a multiple of 32, not of 256
        kquants.quantize(np.zeros((2, 320), dtype=np.float32), Q.Q6_K, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        kquants.quantize(np.zeros(256, dtype=np.float32), Q.Q5_K, backend=backend)
    with pytest.raises(ValueError, match="no byte-exact quantizer"):
        kquants.quantize(np.zeros((1, 256), dtype=np.float32), Q.IQ4_XS, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        kquants.quantize(np.zeros((1, 256), dtype=np.float32), Q.Q4_K, backend="c")
    assert kquants.quantize(np.zeros((2, 320), dtype=np.float32), Q.Q4_0, backend=backend).shape == (2, 10 * 18)
    assert kquants.quantize(np.zeros((0, 256), dtype=np.float32), Q.Q4_K, backend=backend).shape == (0, 144)
    assert set(kquants.QUANTIZERS) == set(ALL_TYPES)
