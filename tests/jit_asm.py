"""Reading the machine code numba generates for a quantizer's kernels (tests/test_kquants_jit.py,
tests/test_mlx_quantize_jit.py): byte-exact float32 code must have no fused multiply-add (LLVM may not contract
a*b + c without fast-math) and no float64 arithmetic (a float32 * Python float would widen).

numba cannot show the assembly of code loaded from its cache, so a probe compiles the kernels in a subprocess with
numba's cache pointed at an empty folder. A probe is ASM_CHECKS followed by code that calls each kernel once and
fills `report` with `inspect(kernel)` (plus what else it measures) by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parent.parent)

ASM_CHECKS = r"""
import json, re, sys, time
fma = re.compile(r"\bv?f(?:n)?m(?:add|sub)\w*")
f64 = re.compile(r"\bv?(?:add|sub|mul|div|sqrt|min|max)sd\b|\bv?cvt\w*sd\b|\bv?cvtsd2\w*")
report = {}
def inspect(kernel):
    asm = kernel.inspect_asm(kernel.signatures[0])
    return {"fma": sorted(set(fma.findall(asm))), "f64": sorted(set(f64.findall(asm))), "lines": len(asm.splitlines()),
            "packed_float": len(re.findall(r"\bv(?:mul|add|sub)ps\b", asm))}
"""


def run_fresh(code: str, cache: Path) -> str:
    """Run code in a subprocess with numba's cache in cache (empty: nothing is loaded from it); its stdout."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": REPO}
    env.pop("NUMBA_DISABLE_JIT", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def fresh_compilation(probe: str, cache: Path) -> dict[str, dict]:
    """Run ASM_CHECKS + probe with an empty numba cache; its report."""
    return json.loads(run_fresh(ASM_CHECKS + probe + "\njson.dump(report, sys.stdout)\n", cache))


def signatures_added(probe: str, cache: Path) -> tuple[int, int]:
    """probe prints how many signatures a kernel has after prepare() and after quantizing what a run passes it."""
    before, after = map(int, run_fresh(probe, cache).split())
    return before, after
