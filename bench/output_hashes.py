"""The SHA-256 of every output file of a fixed set of conversions, to show that a change of structure changed no
byte of any output.

    python bench/output_hashes.py CLI WORK [--real FOLDER]

CLI is the mixtral-convert command to run (an installed entry point, or a worktree's `python -m convert` given
as one quoted string); WORK an empty scratch folder. It writes the built-in sample, converts it to every layout and
every GGUF outtype, converts the hf and GGUF outputs onward (so each container is read as a source too), and prints
one line `sha256  conversion/file` per output file, sorted. With --real FOLDER (a torrent folder made by
bench/checkpoint.py) it also converts that to hf, torrent and GGUF q8_0. Run it before and after a change and
diff the two outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

# (name, source: "sample" or an earlier name, arguments after SRC DST)
SAMPLE_RUNS: list[tuple[str, str, list[str]]] = [
    ("torrent", "sample", ["--to", "torrent"]),
    ("mistral", "sample", ["--to", "mistral"]),
    ("megablocks", "sample", ["--to", "megablocks"]),
    ("hf", "sample", ["--to", "hf"]),
    ("hf-instruct", "sample", ["--to", "hf", "--instruct"]),
    ("hf-shards", "sample", ["--to", "hf", "--max-shard-size", "300000"]),
    ("gguf", "sample", ["--to", "gguf"]),
    ("gguf-instruct", "sample", ["--to", "gguf", "--instruct"]),
    ("gguf-f32", "sample", ["--to", "gguf", "--outtype", "f32"]),
    ("gguf-f16", "sample", ["--to", "gguf", "--outtype", "f16"]),
    ("gguf-bf16", "sample", ["--to", "gguf", "--outtype", "bf16"]),
    ("gguf-q8_0", "sample", ["--to", "gguf", "--outtype", "q8_0"]),
    ("gguf-split", "sample", ["--to", "gguf", "--max-shard-size", "300000"]),
    ("hf-to-torrent", "hf", ["--to", "torrent"]),
    ("hf-to-mistral", "hf", ["--to", "mistral"]),
    ("hf-to-megablocks", "hf", ["--to", "megablocks"]),
    ("hf-to-gguf", "hf", ["--to", "gguf"]),
    ("megablocks-to-hf", "megablocks", ["--to", "hf"]),
    ("mistral-to-torrent", "mistral", ["--to", "torrent"]),
    ("gguf-to-torrent", "gguf", ["--to", "torrent"]),
    ("gguf-to-hf", "gguf", ["--to", "hf"]),
    ("gguf-f32-to-hf", "gguf-f32", ["--to", "hf"]),
    ("gguf-split-to-mistral", "gguf-split", ["--to", "mistral"]),
]
REAL_RUNS: list[tuple[str, list[str]]] = [
    ("real-hf", ["--to", "hf"]),
    ("real-torrent", ["--to", "torrent"]),
    ("real-gguf-q8_0", ["--to", "gguf", "--outtype", "q8_0"]),
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def run(cli: list[str], *args: str) -> None:
    done = subprocess.run([*cli, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{shlex.join([*cli, *args])}: exit {done.returncode}: {done.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cli", help="the mixtral-convert command, as one shell-quoted string")
    parser.add_argument("work", type=Path, help="an empty scratch folder")
    parser.add_argument("--real", type=Path, help="a bench/checkpoint.py torrent folder to convert too")
    args = parser.parse_args()
    cli = shlex.split(args.cli)
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {"sample": args.work / "sample"}
    run(cli, "sample", str(folders["sample"]))
    outputs = []
    for name, source, extra in SAMPLE_RUNS:
        folders[name] = args.work / name
        run(cli, "convert", str(folders[source]), str(folders[name]), "--no-progress", *extra)
        outputs.append(name)
    if args.real is not None:
        for name, extra in REAL_RUNS:
            folders[name] = args.work / name
            run(cli, "convert", str(args.real), str(folders[name]), "--no-progress", *extra)
            outputs.append(name)
    lines = []
    for name in ["sample", *outputs]:
        for path in sorted(p for p in folders[name].rglob("*") if p.is_file()):
            lines.append(f"{sha256(path)}  {path.relative_to(args.work)}")
    print("\n".join(sorted(lines, key=lambda line: line.split("  ", 1)[1])))


if __name__ == "__main__":
    main()
