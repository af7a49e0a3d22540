"""Where a cold run's time goes: before the first weights byte is read, and after.

    python bench/start_split.py [--layers 1L 2L 4L] [--rounds 5] [--cache bench/cache]

Runs, alternated and cold (page cache dropped before each), the disk limit, the hashed streaming copy
(`disk_limit.py --coupled --hash sha256 --hash blake3`) and `mixtral-convert convert SRC OUT --to mlx` of this
checkout, each under `strace -f --seccomp-bpf -e trace=openat` (only openat stops the process: the rest of its
system calls run untraced), and splits each run's wall time at the moment the source's weights file is opened
with O_DIRECT: the start (interpreter, imports, plan) and the stream (the rest, to the end of the last fsync).
Medians per contender, and each part's ratio to the disk limit's. Needs root (drop_caches) and strace; uses the
checkpoints bench/run.py caches (bench/checkpoint.py makes them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _commands(source: Path, out: Path) -> dict[str, list[str]]:
    weights = str(source / "consolidated.00.pth")
    limit = [sys.executable, str(BENCH / "disk_limit.py"), str(out), weights]
    return {
        "disk limit": limit,
        "hashed streaming copy": [*limit, "--coupled", "--hash", "sha256", "--hash", "blake3"],
        "mixtral-convert --to mlx": [
            sys.executable, "-m", "convert", "convert", str(source), str(out / "mlx"), "--to", "mlx", "--no-progress",
        ],
    }  # fmt: skip


def _clock(line: str) -> float:
    hours, minutes, seconds = line.split()[1].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def run_once(command: list[str], weights: Path, out: Path, trace: Path) -> tuple[float, float]:
    """(wall, start) of one cold run; start: from exec to the O_DIRECT open of the weights file."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    began = time.monotonic()
    traced = ["strace", "-f", "--seccomp-bpf", "-tt", "-e", "trace=openat,execve", "-o", str(trace), *command]
    result = subprocess.run(traced, cwd=REPO, capture_output=True, text=True)
    os.sync()
    wall = time.monotonic() - began
    if result.returncode != 0:
        raise SystemExit(f"{command[1:4]} failed: {result.stderr[-600:]}")
    lines = trace.read_text().splitlines()
    first = _clock(lines[0])
    opened = [_clock(x) for x in lines if "O_DIRECT" in x and f'"{weights}"' in x]
    if not opened:
        raise SystemExit(f"{command[1:4]}: no O_DIRECT open of {weights} in its trace")
    return wall, opened[0] - first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["1L", "2L", "4L"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=BENCH / "cache")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        parser.error("needs strace")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.cache) as scratch:
        out, trace = Path(scratch) / "out", Path(scratch) / "trace"
        for depth in args.layers:
            source = (args.cache / f"torrent-{depth}").resolve()
            commands = _commands(source, out)
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
            for round_ in range(args.rounds):
                order = list(commands) if round_ % 2 == 0 else list(commands)[::-1]
                for name in order:
                    wall, start = run_once(commands[name], source / "consolidated.00.pth", out, trace)
                    runs[name].append((wall, start))
                    print(f"{depth} round {round_} {name}: wall {wall:.2f} s, start {start:.2f} s", flush=True)
            medians = {
                name: (
                    statistics.median(w for w, _ in got),
                    statistics.median(s for _, s in got),
                    statistics.median(w - s for w, s in got),
                )
                for name, got in runs.items()
            }
            limit_wall, _, limit_stream = medians["disk limit"]
            for name, (wall, start, stream) in medians.items():
                rows.append(
                    f"| {depth} | {name} | {wall:.2f} ({wall / limit_wall:.2f}x) | {start:.2f} | "
                    f"{stream:.2f} ({stream / limit_stream:.2f}x) |"
                )
    print(f"\nmedians of {args.rounds} cold rounds, seconds\n")
    print("| layers | contender | wall (vs limit) | start: exec to first weights read | stream (vs limit's) |")
    print("|---|---|--:|--:|--:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
