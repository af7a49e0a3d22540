"""The numba kernels of convert/containers/mlx/quantize_jit.py: what byte-exactness needs of compiled code.

tests/test_mlx_quantize.py holds both backends to mx.quantize's bytes; here what is particular to the kernels:
- no fused multiply-add and no float64 arithmetic in the machine code numba generates for this CPU, read from a
  fresh compilation in a subprocess (tests/jit_asm.py);
- the kernels against the numpy code on a large random slice, every bit width and group size, from threads;
- the numpy fallback when numba would run them as plain Python, and the NaN/Inf refusal of both.
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

from convert.common.errors import ConvertError
from convert.containers.mlx import quantize as mlx_quantize
from convert.containers.mlx.quantize import AffineCast, from_float32, quantize, quantize_groups
from convert.containers.mlx.settings import WEIGHT

pytestmark = pytest.mark.containers

numba = pytest.importorskip("numba", reason="numba is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ASM_PROBE = r"""
from convert.containers.mlx.quantize import jit_kernels, quantize_groups
quantize_groups(bytes(128), "BF16", 4, 64, backend="jit")
quantize_groups(bytes(256), "F32", 4, 64, backend="jit")
report.update({name: inspect(kernel) for name, kernel in jit_kernels()._asdict().items()})
"""


@pytest.fixture(scope="module")
def fresh_compilation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return jit_asm.fresh_compilation(ASM_PROBE, tmp_path_factory.mktemp("numba-cache"))


def test_no_fused_multiply_add_and_float32_only(fresh_compilation: dict[str, dict]) -> None:
    assert set(fresh_compilation) == {"bf16", "f32"}
    for name, found in fresh_compilation.items():
        assert found["lines"] > 100, f"{name}: no assembly to read ({found['lines']} lines)"
        assert not found["fma"], f"{name}: fused multiply-adds {found['fma']}"
        assert not found["f64"], f"{name}: float64 instructions {found['f64']}"


def random_bytes(dtype: str, elements: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(elements) * rng.choice([1e-4, 0.02, 3.0], elements // 64).repeat(64)).astype(
        np.float32
    )
    return from_float32(values, dtype).tobytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_jit_equals_numpy(dtype: str, bits: int, group: int) -> None:
    raw = random_bytes(dtype, 2**17, bits * group)
    assert quantize(raw, dtype, bits, group, "jit") == quantize(raw, dtype, bits, group, "numpy")


def test_kernels_release_the_gil_and_agree_across_threads() -> None:
    raw = random_bytes("BF16", 2**20, 7)
    whole = quantize(raw, "BF16", 4, 64, "jit")
    slices = [raw[i : i + len(raw) // 8] for i in range(0, len(raw), len(raw) // 8)]
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda part: quantize(part, "BF16", 4, 64, "jit"), slices))
    assert tuple(b"".join(p[i] for p in parts) for i in range(3)) == whole


@pytest.mark.parametrize("backend", ["jit", "numpy"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_the_first_non_finite_element_is_named(dtype: str, backend: str) -> None:
    values = np.ones(256, np.float32)
    values[70], values[200] = np.inf, np.nan
    raw = from_float32(values, dtype).tobytes()
    assert quantize_groups(raw, dtype, 4, 64, backend)[3] == 70


def test_a_quantized_part_names_the_tensor_and_element() -> None:
    values = np.ones(128, np.float32)
    values[100] = np.nan
    with pytest.raises(ConvertError, match=r"value nan at element 1100 cannot be quantized") as caught:
        AffineCast("BF16", WEIGHT, 4, 64)(memoryview(from_float32(values, "BF16")), "blk.w", 1000)
    assert caught.value.tensor == "blk.w"


def test_numpy_fallback_when_the_jit_is_disabled() -> None:
    """NUMBA_DISABLE_JIT would run the kernels as plain Python: auto picks numpy instead."""
    probe = (
        "from convert.containers.mlx import quantize as q; assert q.jit_kernels() is None; "
        "print(len(q.quantize(bytes(256), 'BF16', 4, 64)[0]))"
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "64"


def test_prepare_loads_the_kernel_before_the_run() -> None:
    """A quantized part's cast, made as the plan is, leaves its kernel compiled in this process: no worker
    compiles during the run (convert/common/jit.py)."""
    AffineCast("F32", WEIGHT, 8, 32)
    assert "F32" in mlx_quantize._PREPARED
    assert mlx_quantize.jit_kernels().f32.signatures


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_prepare_compiles_what_a_run_calls(dtype: str, tmp_path: Path) -> None:
    """numba compiles a kernel apart for read-only and writable arrays, and a run's slices can be either: in a
    fresh process with an empty cache, quantizing either kind of slice after prepare() must compile nothing (in a
    worker, that would hold the GIL for a second)."""
    probe = (
        "import numpy as np; from convert.containers.mlx import quantize as q\n"
        f"q.prepare({dtype!r}); kernel = q.jit_kernels().{'bf16' if dtype == 'BF16' else 'f32'}\n"
        "before = len(kernel.signatures)\n"
        f"for data in (bytes(4096), bytearray(4096)): q.quantize_groups(memoryview(data), {dtype!r}, 8, 32)\n"
        "print(before, len(kernel.signatures))\n"
    )
    before, after = jit_asm.signatures_added(probe, tmp_path)
    assert before == after >= 1, (before, after)
