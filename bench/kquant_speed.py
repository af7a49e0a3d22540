"""Seconds to quantize one Mixtral expert matrix (14336 x 4096 float32) per GGML type: numpy, numba (1 and 2
threads) and ggml's own reference (ggml_quantize_chunk from llama-cpp-python's libggml-base, tests/kquant_client.py).

    .venv/bin/python bench/kquant_speed.py [--types Q4_K,Q6_K] [--repeat 3] [--rows 14336] [--skip-numpy]

Each figure is the median of --repeat runs, scaled to 14336 rows when --rows is smaller. "2 threads" is two
threads each quantizing half of the rows at once (what the converter's thread pool does with two tensors): it
shows the kernels releasing the GIL. Every backend's bytes are checked against ggml's before timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf import GGMLQuantizationType  # noqa: E402

from convert.containers.gguf import kquants  # noqa: E402

FULL_ROWS = 14336
COLUMNS = 4096


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def two_threads(quantize: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> Callable[[], object]:
    halves = np.array_split(rows, 2)

    def run() -> object:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(quantize, halves))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q3_K,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--skip-numpy", action="store_true")
    args = parser.parse_args()
    try:
        from kquant_client import ggml_quantize
    except ImportError:
        ggml_quantize = None
    rows = (np.random.default_rng(0).standard_normal((args.rows, COLUMNS)) * 0.02).astype(np.float32)
    scale = FULL_ROWS / args.rows
    start = time.perf_counter()
    assert kquants.jit_kernels() is not None, "numba is not installed"
    print(f"# import numba + kernels: {time.perf_counter() - start:.2f} s")
    print("| type | numpy | numba, 1 thread | numba, 2 threads (CPU s) | ggml reference (C, 1 thread) | first call |")
    print("|---|---|---|---|---|---|")
    for name in args.types.split(","):
        qtype = GGMLQuantizationType[name]
        start = time.perf_counter()
        kquants.quantize(rows[:1], qtype, backend="jit")  # compiles, or loads numba's cache
        first = time.perf_counter() - start
        jit = kquants.quantize(rows, qtype, backend="jit")
        if ggml_quantize is not None:
            assert np.array_equal(jit, ggml_quantize(rows, qtype)), f"{name}: jit bytes differ from ggml's"

        def jit1(q: GGMLQuantizationType = qtype) -> object:
            return kquants.quantize(rows, q, backend="jit")

        cells = []
        if args.skip_numpy:
            cells.append("-")
        else:
            numpy_rows = rows[: max(1, args.rows // 8)]  # the numpy path is slow: time an eighth, scale up
            assert np.array_equal(kquants.quantize(numpy_rows, qtype, backend="numpy"), jit[: len(numpy_rows)])
            seconds = median_seconds(lambda q=qtype, r=numpy_rows: kquants.quantize(r, q, backend="numpy"), args.repeat)
            cells.append(f"{seconds * FULL_ROWS / len(numpy_rows):.2f}")
        cells.append(f"{median_seconds(jit1, args.repeat) * scale:.2f}")
        jit_half = two_threads(lambda part, q=qtype: kquants.quantize(part, q, backend="jit"), rows)
        cpu = time.process_time()
        wall = median_seconds(jit_half, args.repeat)
        cpu = (time.process_time() - cpu) / args.repeat  # > wall: both threads computed at once (GIL released)
        cells.append(f"{wall * scale:.2f} (CPU {cpu * scale:.2f})")
        if ggml_quantize is None:
            cells.append("-")
        else:
            cells.append(f"{median_seconds(lambda q=qtype: ggml_quantize(rows, q), args.repeat) * scale:.2f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {first:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
