"""--to mlx against the disk limit and against mlx_lm.convert, on real-dimension checkpoints (bench/checkpoint.py).

    python bench/mlx_speed.py WORK [--layers 1 2] [--keep]

For each depth: the checkpoint (torrent layout, bf16, real tensor sizes, L layers) in WORK; the disk limit of
reading it and writing as many bytes (bench/disk_limit.py); `--to mlx` (bf16, the bytes copied and re-laid);
`--to mlx --outtype q4`; and, from this tool's hf output of the same checkpoint (made untimed), `mlx_lm.convert
-q` (4 bits, groups of 64), whose tensors must equal ours. Each command runs in a process of its own; its wall
time and peak RSS (wait4's ru_maxrss) are printed as Markdown rows for bench/MLX.md. Page caches are not dropped
(the machine is shared): large files are read and written with O_DIRECT by the disk limit and by the converter's
copies, while mlx_lm.convert and the converter's quantizing reads go through the page cache. WORK is removed at
the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def measured(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of command, run to completion in a process of its own."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def same_tensors(ours: Path, theirs: Path) -> bool:
    """Every tensor of both folders has the same name, dtype, shape and bytes (read with mx.load, a tensor at a
    time per file)."""
    code = (
        "import sys, glob, mlx.core as mx, numpy as np\n"
        "def files(d): return sorted(glob.glob(d + '/model*.safetensors'))\n"
        "a = {}\n"
        "for f in files(sys.argv[1]): a.update(mx.load(f))\n"
        "b = {}\n"
        "for f in files(sys.argv[2]): b.update(mx.load(f))\n"
        "def raw(x): return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x).tobytes()\n"
        "ok = sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape\n"
        "    and raw(a[k]) == raw(b[k]) for k in a)\n"
        "sys.exit(0 if ok else 1)\n"
    )
    return subprocess.run([PYTHON, "-c", code, str(ours), str(theirs)], cwd=REPO).returncode == 0


def row(name: str, layers: int, seconds: float, rss: int, nbytes: int, limit: float | None) -> str:
    ratio = f"{seconds / limit:.2f}x" if limit else ""
    rate = f"{nbytes / seconds / 1e6:.0f}"
    return f"| {layers} | {name} | {seconds:.1f} | {ratio} | {rate} | {rss / 2**20:.0f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print("| layers | run | seconds | / disk limit | MB/s read | peak RSS MiB |")
    print("|--:|---|--:|--:|--:|--:|")
    try:
        for layers in args.layers:
            source = args.work / f"torrent-{layers}"
            subprocess.run([PYTHON, "bench/checkpoint.py", str(source), "--layers", str(layers)], cwd=REPO, check=True)
            # mlx_lm.convert loads a tokenizer: Mixtral's own, where make setup put it (tests/llama_client.py).
            shutil.copy(REPO / ".venv/share/mistral-common/tokenizer.model.v1", source / "tokenizer.model")
            weights = source / "consolidated.00.pth"
            nbytes = weights.stat().st_size
            out = args.work / "out"
            out.mkdir(exist_ok=True)
            limit, rss = measured([PYTHON, "bench/disk_limit.py", str(out), str(weights)])
            print(row("disk limit (read + write)", layers, limit, rss, nbytes, None), flush=True)
            shutil.rmtree(out, ignore_errors=True)
            for name, extra in (("--to mlx (bf16)", []), ("--to mlx --outtype q4", ["--outtype", "q4"])):
                convert = [PYTHON, "-m", "convert", "convert", str(source), str(out), "--to", "mlx", "--no-progress"]
                seconds, rss = measured([*convert, *extra])
                print(row(name, layers, seconds, rss, nbytes, limit), flush=True)
                if extra:
                    ours = args.work / "ours-q4"
                    shutil.rmtree(ours, ignore_errors=True)
                    out.rename(ours)
                shutil.rmtree(out, ignore_errors=True)
            hf = args.work / "hf"
            subprocess.run([PYTHON, "-m", "convert", "convert", str(source), str(hf), "--to", "hf", "--no-progress",
                            "--no-checksums"], cwd=REPO, check=True)  # fmt: skip
            theirs = args.work / "theirs-q4"
            seconds, rss = measured([PYTHON, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path",
                                     str(theirs), "-q"])  # fmt: skip
            print(row("mlx_lm.convert -q (from hf)", layers, seconds, rss, nbytes, limit), flush=True)
            equal = same_tensors(args.work / "ours-q4", theirs)
            print(f"<!-- {layers} layers: q4 tensors equal mlx_lm.convert's: {equal} -->", flush=True)
            for folder in (hf, theirs, args.work / "ours-q4", source):
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
