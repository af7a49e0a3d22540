"""The numba kernels of convert/containers/gguf/kquants_jit.py: what byte-exactness needs of compiled code.

tests/test_kquants.py holds both backends to ggml's bytes; here what is particular to the compiled kernels:
- no fused multiply-add and no float64 arithmetic in the machine code numba generates for this CPU (LLVM may not
  contract a*b + c without fast-math, and a float32 * Python float would widen to float64): read from a fresh
  compilation in a subprocess, since numba cannot show the assembly of code loaded from its cache;
- the scalar rules (fp32 -> fp16 bits, fp16 -> fp32, nearest_int) against numpy and ggml's own conversion;
- the kernels against the numpy code on many rows, chunk tails, non-contiguous input, and from threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jit_asm
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from test_kquants import ALL_TYPES, many_rows

from convert.containers.gguf import kquants, quant_rules

pytestmark = pytest.mark.containers

numba = pytest.importorskip("numba", reason="numba is not installed (pip install -e '.[fast]')")

from convert.containers.gguf.kquants_jit import _fp16, _fp16_value, _nearest_int  # noqa: E402  (needs numba)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles every kernel (tests/jit_asm.py), times the first call of each and reports the instructions of the
# generated x86 assembly that the kernels must not have.
ASM_PROBE = r"""
import numpy as np
from convert.containers.gguf import kquants
for qtype, kernel in kquants.jit_kernels().items():
    start = time.perf_counter()
    kquants.quantize(np.ones((3, 256), dtype=np.float32), qtype, backend="jit")
    report[qtype.name] = {**inspect(kernel), "seconds": time.perf_counter() - start}
"""


@pytest.fixture(scope="module")
def fresh_compilation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return jit_asm.fresh_compilation(ASM_PROBE, tmp_path_factory.mktemp("numba-cache"))


def test_no_fused_multiply_add(fresh_compilation: dict[str, dict]) -> None:
    """No vfmadd/vfmsub/vfnmadd/vfnmsub in any kernel (the CPU has FMA: the check has teeth on x86-64 with AVX2)."""
    assert set(fresh_compilation) == {t.name for t in ALL_TYPES}
    for name, found in fresh_compilation.items():
        assert found["lines"] > 200, f"{name}: no assembly to read ({found['lines']} lines)"
        assert not found["fma"], f"{name}: fused multiply-adds {found['fma']}"


def test_float32_only(fresh_compilation: dict[str, dict]) -> None:
    """No double-precision arithmetic or conversion: every constant and int -> float conversion is float32."""
    for name, found in fresh_compilation.items():
        assert not found["f64"], f"{name}: float64 instructions {found['f64']}"


def test_q4_k_and_q5_k_are_vectorized(fresh_compilation: dict[str, dict]) -> None:
    """The sub-block lanes of make_qkx2_quants compile to packed float instructions (what makes them fast)."""
    for name in ("Q4_K", "Q5_K"):
        assert fresh_compilation[name]["packed_float"] > 20, fresh_compilation[name]


# ---------------------------------------------------------------------------------------------------------------
# Scalar rules


@numba.njit(cache=False)
def _fp16_all(values: np.ndarray, out: np.ndarray) -> None:
    for i in range(values.shape[0]):
        out[i] = _fp16(values[i])


@numba.njit(cache=False)
def _fp16_values(bits: np.ndarray, out: np.ndarray) -> None:
    for i in range(bits.shape[0]):
        out[i] = _fp16_value(bits[i])


@numba.njit(cache=False)
def _nearest_all(values: np.ndarray, out: np.ndarray) -> None:
    for i in range(values.shape[0]):
        out[i] = _nearest_int(values[i])


def _fp16_cases() -> np.ndarray:
    """Every finite fp16 value, the ties between neighbours and their float32 neighbours, both signs, and beyond."""
    rng = np.random.default_rng(5)
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves[:-1] + (halves[1:] - halves[:-1]) / 2).astype(np.float32)
    values = np.concatenate(
        [
            halves,
            ties,
            np.nextafter(ties, np.float32(np.inf)),
            np.nextafter(ties, np.float32(-np.inf)),
            rng.standard_normal(200_000).astype(np.float32) * rng.choice(np.float32([1e-9, 1e-5, 1, 1e4]), 200_000),
            rng.integers(0, 0x7F800000, 200_000, dtype=np.uint32).view(np.float32),  # any finite float32
            np.float32([65504, 65519.99, 65520, 1e6, 3e38, 5.96e-8, 2.98e-8, 2.99e-8, 1e-10, 1e-45, 0.0, np.inf]),
        ]
    )
    return np.concatenate([values, -values])


def test_fp32_to_fp16_is_numpys_and_ggmls() -> None:
    values = _fp16_cases()
    ours = np.empty(values.size, dtype=np.int64)
    _fp16_all(values, ours)
    assert np.array_equal(ours, quant_rules.fp16_bits(values).astype(np.int64))
    pytest.importorskip("llama_cpp")
    from kquant_client import fp32_to_fp16

    assert np.array_equal(ours, fp32_to_fp16(values).astype(np.int64))


def test_fp16_to_fp32_is_exact() -> None:
    bits = np.arange(65536, dtype=np.int64)
    ours = np.empty(bits.size, dtype=np.float32)
    _fp16_values(bits, ours)
    theirs = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    finite_or_inf = ~np.isnan(theirs)
    assert np.array_equal(ours[finite_or_inf].view(np.uint32), theirs[finite_or_inf].view(np.uint32))
    assert np.isnan(ours[~finite_or_inf]).all()


def test_nearest_int_is_the_bit_trick() -> None:
    """Half to even within +-4194303, and the same wrapped bits as quant_rules.nearest_int beyond it."""
    rng = np.random.default_rng(2)
    values = np.concatenate(
        [
            np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.5000002, 4194303.0, -4194303.0, -0.0]),
            (rng.standard_normal(100_000) * 100).astype(np.float32),
            (rng.integers(-200, 200, 10_000) / 2).astype(np.float32),  # ties
            (rng.standard_normal(10_000) * 1e9).astype(np.float32),  # beyond the trick's range: wraps
        ]
    )
    ours = np.empty(values.size, dtype=np.int64)
    _nearest_all(values, ours)
    assert np.array_equal(ours, quant_rules.nearest_int(values))


# ---------------------------------------------------------------------------------------------------------------
# Kernels against the numpy code


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_jit_equals_numpy(qtype: GGMLQuantizationType) -> None:
    """Many rows (random, heavy tails, ties, signed zeros, extremes) and every tail length of the 8-block chunks."""
    for k in (256, 512):
        rows = many_rows(k, seed=100 + k)
        assert np.array_equal(
            kquants.quantize(rows, qtype, backend="jit"), kquants.quantize(rows, qtype, backend="numpy")
        )
    rows = many_rows(256, seed=9)[:17]
    for n in range(1, 18):
        assert np.array_equal(
            kquants.quantize(rows[:n], qtype, backend="jit"), kquants.quantize(rows[:n], qtype, backend="numpy")
        )
    wide = many_rows(1024, seed=11)[:50, 256:768]  # not contiguous: copied first, as the numpy path does
    assert np.array_equal(kquants.quantize(wide, qtype, backend="jit"), kquants.quantize(wide, qtype, backend="numpy"))


def test_kernels_release_the_gil_and_agree_across_threads() -> None:
    """Every kernel is compiled nogil; four threads on slices of the rows give the bytes of one call."""
    kernels = kquants.jit_kernels()
    assert kernels is not None
    assert all(kernel.targetoptions.get("nogil") for kernel in kernels.values())
    rows = many_rows(512, seed=4)
    for qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_0):
        whole = kquants.quantize(rows, qtype, backend="jit")
        parts = np.array_split(rows, 4)
        with ThreadPoolExecutor(4) as pool:
            pieces = list(pool.map(lambda part, q=qtype: kquants.quantize(part, q, backend="jit"), parts))
        assert np.array_equal(np.concatenate(pieces), whole)


def test_numpy_fallback_when_the_jit_is_disabled() -> None:
    """NUMBA_DISABLE_JIT would run the kernels as plain Python (hours per tensor): auto picks numpy instead."""
    probe = (
        "import numpy as np; from convert.containers.gguf import kquants; "
        "assert kquants.jit_kernels() is None; "
        "print(kquants.quantize(np.ones((1, 256), dtype=np.float32), kquants.GGMLQuantizationType.Q4_K).shape)"
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "(1, 144)"


def test_a_read_only_slice_compiles_nothing_after_prepare(tmp_path: Path) -> None:
    """numba compiles a kernel apart for read-only arrays; prepare() compiles the writable kind, so a read-only
    slice (a bytes buffer) must not reach the kernel as it is: in a worker, a compile holds the GIL for seconds."""
    probe = (
        "import numpy as np; from convert.containers.gguf import kquants\n"
        "from gguf import GGMLQuantizationType as T\n"
        "kquants.prepare(T.Q4_0); kernel = kquants.jit_kernels()[T.Q4_0]; before = len(kernel.signatures)\n"
        "kquants.quantize(np.frombuffer(bytes(4 * 64), np.float32).reshape(2, 32), T.Q4_0)\n"
        "print(before, len(kernel.signatures))\n"
    )
    before, after = jit_asm.signatures_added(probe, tmp_path)
    assert before == after >= 1, (before, after)
