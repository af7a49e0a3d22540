"""Benchmark: mixtral-convert against the disk itself, cp + sync and the load-everything peer, on real-dimension
checkpoints; verify against an O_DIRECT read of the folder, verify --against against a conversion.

    python bench/run.py [--layers 1 2 4] [--repeats 3] [--cache bench/cache] [--out bench/BENCHMARKS.md]
    python bench/run.py --quick   # smoke: one small layer, one round, report under the cache (CI does not run it)

Why it is built this way:
- Checkpoints have the published tensor shapes and only fewer layers, so the per-tensor work is the real one and
  time and memory can be fitted linearly against depth and extrapolated to 32 layers (a 93 GB source does not fit
  next to its output and two copies on this disk, nor the peer's RAM needs on this machine).
- Contenders alternate run by run, so drift of the machine (thermal, other tenants, disk state) spreads over all
  of them instead of biasing one.
- Each run's peak RSS and CPU come from os.wait4 on that child: the kernel's accounting of that process, not a
  sampled guess. One catch: exec charges the memory it replaces (a copy of this driver) to the child's
  ru_maxrss, so the driver stays small (it never imports torch) and the report marks values at that floor.
- The page cache is dropped before every run when the kernel lets us, so reads come from the disk every time;
  the CPU the rest of the machine used during each run is recorded, because the machine may be shared.
- Every contender is followed by sync (counted in its time): written data is only done when it is on disk, and
  without that a writer that leaves dirty pages behind would look faster than one that fsyncs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import checkpoint  # bench/checkpoint.py, next to this script

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MIB = 2**20
GIB = 2**30
FULL_DEPTH = 32
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MIXTRAL_TOKENIZER = Path(sys.prefix) / "share" / "mistral-common" / "tokenizer.model.v1"


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    command: Callable[[Path, Path, Depth], list[str]]  # (the folder it reads, OUT, the depth's sources)
    needs_out_folder: bool = False  # cp copies into an existing folder
    in_converter_root: bool = False  # `python -m convert` must start where the measured convert/ sits
    direction: str = "torrent-hf"  # the group it belongs to (--directions)
    limit: str = "disk"  # the contender its time is compared with ('vs limit')
    cp: str | None = None  # the cp + sync of the same bytes, for a second ratio
    reads: str = "torrent"  # which source it reads: the torrent checkpoint, or its hf conversion
    warm: bool = False  # the source is read into the page cache (untimed) before the run instead of dropped


@dataclass(frozen=True)
class Converter:
    """Which mixtral-convert is measured: the work tree as it is, or one commit exported with git archive (the
    work tree can change under a long run; an exported commit cannot)."""

    root: Path  # holds convert/ and mappings/; `python -m convert` runs from here
    commit: str
    description: str

    def fingerprint(self) -> str:
        """A digest of every file under convert/ and mappings/, to notice edits made while the bench runs."""
        digest = hashlib.sha256()
        for folder in ("convert", "mappings"):
            for path in sorted((self.root / folder).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    digest.update(str(path.relative_to(self.root)).encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def pick_converter(rev: str | None, cache: Path) -> Converter:
    """The work tree (default), or REV's convert/ and mappings/ exported to the cache (read-only git use), its
    modules compiled to bytecode first."""
    converter = _pick_converter(rev, cache)
    # As pip does when it installs the package. Without it, where PYTHONDONTWRITEBYTECODE is set (this machine,
    # CI), every timed run compiled the converter's modules again: 0.15 s warm and 0.3-0.5 s cold of a 7-10 s run.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(converter.root / "convert")], check=True)
    # Likewise numba's machine code for the quantizers, which a user's first quantizing run compiles once (seconds,
    # in a child process) and every later run loads from numba's cache: the timed runs are those later runs.
    subprocess.run([sys.executable, "-c", WARM_KERNELS], cwd=converter.root, check=True)
    return converter


WARM_KERNELS = """
from convert.containers.gguf import kquants
from convert.containers.mlx import quantize
for qtype in (kquants.jit_kernels() or {}):
    kquants.prepare(qtype)
for dtype in ("BF16", "F16", "F32"):
    quantize.prepare(dtype)
"""


def _pick_converter(rev: str | None, cache: Path) -> Converter:
    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    if rev is None:
        try:
            dirty = git("status", "--porcelain", "--", "convert", "mappings")
        except (OSError, subprocess.CalledProcessError):
            dirty = ""
        state = f"with uncommitted changes ({len(dirty.splitlines())} paths)" if dirty else "clean"
        return Converter(REPO, head, f"the work tree at commit {head[:12]}, convert/ and mappings/ {state}")
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    root = (cache / f"converter-{commit[:12]}").resolve()
    if not (root / "convert" / "__main__.py").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "convert", "mappings"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    subject = git("log", "-1", "--format=%s", commit)
    return Converter(root, commit, f"commit {commit[:12]} ({subject}), exported with git archive")


def weight_files(folder: Path) -> list[str]:
    """The bytes a conversion of this folder moves: the torrent checkpoint, or the hf shards."""
    return [str(p) for p in sorted(folder.glob("*.safetensors")) or [folder / checkpoint.WEIGHTS]]


def all_files(folder: Path) -> list[str]:
    """Every file verify reads in a folder (shards, index, manifest, SHA256SUMS, ...)."""
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file()]


def _disk(src: Path, out: Path, depth: Depth) -> list[str]:
    return [sys.executable, str(BENCH / "disk_limit.py"), str(out), *weight_files(src)]


def _cp(src: Path, out: Path, depth: Depth) -> list[str]:
    return ["cp", *weight_files(src), f"{out}/"]


def _convert(target: str) -> Callable[[Path, Path, Depth], list[str]]:
    return lambda src, out, depth: [sys.executable, "-m", "convert", "convert", str(src), str(out), "--to", target,
                                    "--no-progress", "--force"]  # fmt: skip


CONTENDERS = (
    Contender("disk", "disk limit: O_DIRECT read ‖ O_DIRECT write", _disk, True),
    Contender("cp", "cp + sync", _cp, True),
    Contender("convert", "mixtral-convert", _convert("hf"), in_converter_root=True, cp="cp"),
    Contender("peer", "peer: torch.load + save_file",
              lambda src, out, depth: [sys.executable, str(BENCH / "peer_baseline.py"), str(src), str(out)],
              cp="cp"),
    Contender("cp-warm", "cp + sync, warm (source in page cache)", _cp, True, warm=True, limit="cp-warm"),
    Contender("convert-warm", "mixtral-convert, warm", _convert("hf"), in_converter_root=True, warm=True,
              limit="cp-warm"),
    Contender("disk-hf", "disk limit of the hf shards", _disk, True, direction="hf-torrent", limit="disk-hf",
              reads="hf"),
    Contender("cp-hf", "cp + sync of the hf shards", _cp, True, direction="hf-torrent", limit="disk-hf",
              reads="hf"),
    Contender("to-torrent", "mixtral-convert hf -> torrent", _convert("torrent"), in_converter_root=True,
              direction="hf-torrent", limit="disk-hf", cp="cp-hf", reads="hf"),
    Contender("cp-hf-warm", "cp + sync of the hf shards, warm", _cp, True, direction="hf-torrent",
              limit="cp-hf-warm", reads="hf", warm=True),
    Contender("to-torrent-warm", "mixtral-convert hf -> torrent, warm", _convert("torrent"),
              in_converter_root=True, direction="hf-torrent", limit="cp-hf-warm", reads="hf", warm=True),
    Contender("read-hf", "O_DIRECT read of the hf folder",
              lambda src, out, depth: [sys.executable, str(BENCH / "disk_limit.py"), str(out), *all_files(src),
                                       "--read-only"],
              direction="verify", limit="read-hf", reads="hf"),
    # Not a limit to beat but a floor under verify: what checking SHA256SUMS alone costs on this machine's cores.
    Contender("sha-floor", "SHA-256 floor: O_DIRECT read + hashlib SHA-256, a file per core",
              lambda src, out, depth: [sys.executable, str(BENCH / "sha256_floor.py"), *all_files(src)],
              direction="verify", limit="read-hf", reads="hf"),
    Contender("verify", "mixtral-convert verify (checksums)",
              lambda src, out, depth: [sys.executable, "-m", "convert", "verify", str(src)],
              in_converter_root=True, direction="verify", limit="read-hf", reads="hf"),
    Contender("verify-against", "mixtral-convert verify --against the torrent source",
              lambda src, out, depth: [sys.executable, "-m", "convert", "verify", str(src), "--against",
                                       str(depth.source)],
              in_converter_root=True, direction="verify", limit="convert", reads="hf"),
    # torrent -> GGUF bf16 (llama.cpp), its own references so that `--directions torrent-gguf` stands alone.
    Contender("disk-gguf", "disk limit (torrent -> gguf)", _disk, True, direction="torrent-gguf", limit="disk-gguf"),
    Contender("cp-gguf", "cp + sync (torrent -> gguf)", _cp, True, direction="torrent-gguf", limit="disk-gguf"),
    Contender("to-gguf", "mixtral-convert torrent -> gguf (bf16)", _convert("gguf"), in_converter_root=True,
              direction="torrent-gguf", limit="disk-gguf", cp="cp-gguf"),
    # torrent -> GGUF Q4_K_M against llama.cpp's own two steps (bench/llama_two_steps.py): its converter from the
    # hf folder to bf16, then llama-quantize with 2 threads; and llama-quantize's step alone, from the bf16 GGUF.
    # 'vs limit' is over the two steps; 'vs cp' over llama-quantize's step alone.
    Contender("llama-two-steps", "llama.cpp: convert_hf_to_gguf.py bf16 + llama-quantize Q4_K_M",
              lambda src, out, depth: [sys.executable, str(BENCH / "llama_two_steps.py"), str(src), str(out)],
              direction="torrent-q4km", limit="llama-two-steps", reads="hf"),
    Contender("llama-quantize", "llama-quantize Q4_K_M alone (2 threads, from bf16 GGUF)",
              lambda src, out, depth: [sys.executable, str(BENCH / "llama_two_steps.py"), "--quantize-only",
                                       str(src / "model.gguf"), str(out)],
              direction="torrent-q4km", limit="llama-two-steps", reads="gguf"),
    Contender("to-q4km", "mixtral-convert torrent -> gguf q4_k_m",
              lambda src, out, depth: [sys.executable, "-m", "convert", "convert", str(src), str(out), "--to", "gguf",
                                       "--outtype", "q4_k_m", "--no-progress", "--force"],
              in_converter_root=True, direction="torrent-q4km", limit="llama-two-steps", cp="llama-quantize"),
    # torrent -> MLX (mlx-lm's layout): bf16 against its disk limit; q4 against mlx_lm.convert -q from the hf folder
    # (4 bits, groups of 64, as ours).
    Contender("disk-mlx", "disk limit (torrent -> mlx)", _disk, True, direction="torrent-mlx", limit="disk-mlx"),
    # Not a contender to beat: what a streaming copy in bounded memory does with no work at all (each block written
    # after its read), to show how much of the limit a converter can reach here.
    Contender("coupled-mlx", "no-work streaming copy (disk_limit.py --coupled)",
              lambda src, out, depth: [sys.executable, str(BENCH / "disk_limit.py"), str(out), *weight_files(src),
                                       "--coupled"],
              True, direction="torrent-mlx", limit="disk-mlx"),
    # The same copy hashing what SHA256SUMS and manifest.json need (SHA-256 and BLAKE3 of every byte, a thread
    # each): the least a converter that writes them does on this machine's two cores.
    Contender("hashed-mlx", "the same copy, hashing every block (--coupled --hash sha256 --hash blake3)",
              lambda src, out, depth: [sys.executable, str(BENCH / "disk_limit.py"), str(out), *weight_files(src),
                                       "--coupled", "--hash", "sha256", "--hash", "blake3"],
              True, direction="torrent-mlx", limit="disk-mlx"),
    Contender("to-mlx", "mixtral-convert torrent -> mlx (bf16)", _convert("mlx"), in_converter_root=True,
              direction="torrent-mlx", limit="disk-mlx"),
    Contender("mlx-lm-q4", "mlx_lm.convert -q (from the hf folder)",
              lambda src, out, depth: [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                                       "--mlx-path", str(out / "mlx"), "-q"],
              direction="torrent-mlx", limit="mlx-lm-q4", reads="hf", needs_out_folder=True),
    Contender("to-mlx-q4", "mixtral-convert torrent -> mlx q4",
              lambda src, out, depth: [sys.executable, "-m", "convert", "convert", str(src), str(out), "--to", "mlx",
                                       "--outtype", "q4", "--no-progress", "--force"],
              in_converter_root=True, direction="torrent-mlx", limit="mlx-lm-q4"),
)  # fmt: skip
DIRECTIONS = ("torrent-hf", "hf-torrent", "verify", "torrent-gguf", "torrent-q4km", "torrent-mlx")
BY_KEY = {c.key: c for c in CONTENDERS}


@dataclass
class Run:
    """One timed run of one contender; times in seconds, sizes in bytes."""

    layers: int
    repeat: int
    contender: str
    ok: bool
    wall: float  # process + sync
    process_wall: float
    sync_wall: float
    max_rss: int
    user: float
    system: float
    disk_read: int  # ru_inblock: what the process made the kernel read from the device
    disk_written: int  # ru_oublock: what it wrote (writeback by the kernel on its behalf)
    floor: int  # this driver's own peak RSS when it started the child: ru_maxrss can never read lower
    other_cpu: float  # CPU the rest of the machine used meanwhile (other tenants, kernel writeback): noise gauge

    @property
    def cpu(self) -> float:
        return self.user + self.system


@dataclass
class Depth:
    layers: int
    source: Path
    input_bytes: int
    hf_source: Path | None = None  # the torrent checkpoint converted to hf, for the hf -> torrent direction
    hf_bytes: int = 0  # its .safetensors shards
    gguf_source: Path | None = None  # the torrent checkpoint converted to a bf16 GGUF, for llama-quantize alone
    gguf_bytes: int = 0
    runs: list[Run] = field(default_factory=list)
    output_bytes: dict[str, int] = field(default_factory=dict)
    digests: dict[str, list[tuple[int, str]]] = field(default_factory=dict)


@dataclass
class Machine:
    cpu_model: str
    logical_cpus: int
    usable_cpus: int
    ram_bytes: int
    available_bytes: int  # MemAvailable at the start: what the page cache can grow into
    kernel: str
    device: str
    fstype: str
    mount_point: str
    free_bytes: int
    software: dict[str, str]
    load_start: str


class Bench:
    """Runs the contenders and cleans up after them, also on Ctrl-C: at most one output exists at a time."""

    def __init__(self, work: Path, drop_caches: bool, converter: Converter, small: bool = False) -> None:
        self.work = work
        self.drop_caches = drop_caches
        self.converter = converter
        self.small = small  # --quick: checkpoints of a quarter of the width (bench/checkpoint.py --small)
        self.prefix = "small-" if small else ""
        self.child: subprocess.Popen[bytes] | None = None
        self.partial: Path | None = None

    def out_folder(self) -> Path:
        return self.work / "out"

    def cleanup(self) -> None:
        """Stop our running child and delete what it wrote; a second Ctrl-C (or the terminal's signal to the
        whole process group) must not interrupt this half way, so both signals are ignored meanwhile."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            child, self.child = self.child, None
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
                child.returncode = -signal.SIGKILL
            shutil.rmtree(self.out_folder(), ignore_errors=True)
            if self.partial is not None:
                shutil.rmtree(self.partial, ignore_errors=True)
                self.partial = None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def settle(self) -> None:
        """Flush what earlier steps left dirty (untimed), then empty the page cache if allowed."""
        os.sync()
        if self.drop_caches:
            DROP_CACHES.write_text("3\n")

    def warm_up(self, folder: Path) -> None:
        """Read folder's files through the page cache (untimed): a source the user has just downloaded."""
        for name in all_files(folder):
            with open(name, "rb") as handle:
                while handle.read(8 * MIB):
                    pass

    def ensure_checkpoint(self, layers: int) -> Path:
        folder = self.work / f"torrent-{self.prefix}{layers}L"
        if checkpoint.is_complete(folder, layers, self.small):
            return folder
        gb = checkpoint.payload_bytes(layers, self.small) / 1e9
        say(f"generating {folder} ({plural(layers, 'layer')}, {gb:.2f} GB of bf16; needs as much RAM for torch.save)")
        shutil.rmtree(folder, ignore_errors=True)
        self.partial = folder
        start = time.perf_counter()
        self.child = subprocess.Popen(
            [sys.executable, str(BENCH / "checkpoint.py"), str(folder), "--layers", str(layers)]
            + (["--small"] if self.small else [])
        )
        code = self.child.wait()
        self.child = None
        if code != 0 or not checkpoint.is_complete(folder, layers, self.small):
            raise SystemExit(f"generating {folder} failed (exit {code})")
        self.partial = None
        say(f"generated {folder} in {time.perf_counter() - start:.0f} s")
        return folder

    def _converted(self, depth: Depth, target: str, name: str, last: str, why: str) -> Path:
        """This depth's torrent checkpoint converted to target by the measured converter, untimed and kept in the
        cache under name; last is the file the conversion writes last, so its presence means complete."""
        folder = self.work / f"{name}-{self.prefix}{depth.layers}L"
        if not (folder / last).is_file():
            say(f"converting {depth.source} to {folder} ({why})")
            shutil.rmtree(folder, ignore_errors=True)
            self.partial = folder
            command = [sys.executable, "-m", "convert", "convert", str(depth.source), str(folder), "--to", target]
            code = subprocess.run([*command, "--no-progress"], cwd=self.converter.root, check=False).returncode
            if code != 0:
                raise SystemExit(f"converting {depth.source} to {folder} failed (exit {code})")
            self.partial = None
        return folder

    def ensure_hf(self, depth: Depth) -> None:
        """The hf -> torrent source (and verify's folder, and the peers' input where they need the hf layout)."""
        index = "model.safetensors.index.json"
        folder = self._converted(depth, "hf", "hf", index, "the source of the hf -> torrent runs")
        depth.hf_source = folder
        depth.hf_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    def ensure_tokenizer(self, depth: Depth) -> None:
        """Mixtral's tokenizer.model beside the checkpoint (llama.cpp's converter refuses a folder without a
        tokenizer, and a GGUF llama.cpp runs holds the vocabulary): the copy `make setup` extracts from
        mistral-common's wheel (tests/llama_client.py). Conversions cached without it are made again."""
        if (depth.source / "tokenizer.model").is_file():
            return
        if not MIXTRAL_TOKENIZER.is_file():
            raise SystemExit(f"Mixtral's tokenizer.model is not at {MIXTRAL_TOKENIZER}: run `make setup`")
        shutil.copyfile(MIXTRAL_TOKENIZER, depth.source / "tokenizer.model")
        for stale in (f"hf-{self.prefix}{depth.layers}L", f"gguf-bf16-{self.prefix}{depth.layers}L"):
            shutil.rmtree(self.work / stale, ignore_errors=True)

    def ensure_gguf(self, depth: Depth) -> None:
        """llama-quantize's source: a bf16 GGUF of this depth's checkpoint (the file llama.cpp's converter writes,
        naming keys aside; SHA256SUMS is written last)."""
        folder = self._converted(depth, "gguf", "gguf-bf16", "SHA256SUMS", "llama-quantize's source")
        depth.gguf_source = folder
        depth.gguf_bytes = (folder / "model.gguf").stat().st_size

    def run(self, depth: Depth, contender: Contender, repeat: int, verify: bool) -> Run:
        source = {"hf": depth.hf_source, "gguf": depth.gguf_source}.get(contender.reads, depth.source)
        assert source is not None, "ensure_hf / ensure_gguf first"
        out = self.out_folder()
        shutil.rmtree(out, ignore_errors=True)
        if contender.needs_out_folder:
            out.mkdir(parents=True)
        self.settle()
        if contender.warm:
            self.warm_up(source)
        log_path = self.work / f"last-{contender.key}.log"
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        busy = busy_seconds()
        with open(log_path, "wb") as log:
            start = time.perf_counter()
            cwd = self.converter.root if contender.in_converter_root else REPO
            self.child = subprocess.Popen(
                contender.command(source, out, depth),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            _, status, usage = os.wait4(self.child.pid, 0)
            self.child.returncode = os.waitstatus_to_exitcode(status)
            ended = time.perf_counter()
            os.sync()  # the same syscall as sync(1), without a fork in the timed span
            synced = time.perf_counter()
        other = max(0.0, busy_seconds() - busy - usage.ru_utime - usage.ru_stime)
        code, self.child = self.child.returncode, None
        run = Run(
            depth.layers,
            repeat,
            contender.key,
            code == 0,
            synced - start,
            ended - start,
            synced - ended,
            usage.ru_maxrss * 1024,
            usage.ru_utime,
            usage.ru_stime,
            usage.ru_inblock * 512,
            usage.ru_oublock * 512,
            floor,
            other,
        )
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            killed = " (SIGKILL: look for the OOM killer in dmesg)" if code == -signal.SIGKILL else ""
            shown = " ".join(contender.command(source, out, depth))
            say(f"  {contender.label} FAILED with exit {code}{killed}: {shown}")
            for line in tail:
                say(f"    | {line}")
        elif repeat == 0 and out.is_dir() and contender.key in ("convert", "peer", "to-torrent"):
            files = sorted(p for p in out.iterdir() if p.is_file())
            depth.output_bytes[contender.key] = sum(p.stat().st_size for p in files)
            if verify and contender.key != "to-torrent":
                depth.digests[contender.key] = [
                    (p.stat().st_size, sha256(p)) for p in files if p.name.endswith(".safetensors")
                ]
        shutil.rmtree(out, ignore_errors=True)
        return run


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine so far (all CPUs, steal excluded), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def can_drop_caches() -> bool:
    """Whether this sandbox lets root empty the page cache (containers often refuse it)."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def describe_machine(folder: Path) -> Machine:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    meminfo: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            meminfo[key] = int(value.split()[0]) * 1024
    resolved = folder.resolve()
    device, fstype, mount_point = "unknown", "unknown", "/"
    with contextlib.suppress(OSError):
        best = -1
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, point, kind, *_ = line.split()
            if resolved.is_relative_to(point) and len(point) > best:
                best, device, fstype, mount_point = len(point), dev, kind, point
    software = {"python": platform.python_version()}
    for package in ("torch", "safetensors", "huggingface_hub"):  # metadata only: importing torch here would
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # raise every child's ru_maxrss
            software[package] = importlib.metadata.version(package)
    return Machine(
        cpu_model,
        os.cpu_count() or 0,
        len(os.sched_getaffinity(0)),
        meminfo.get("MemTotal", 0),
        meminfo.get("MemAvailable", 0),
        platform.release(),
        device,
        fstype,
        mount_point,
        shutil.disk_usage(folder).free,
        software,
        load_average(),
    )


# ---------------------------------------------------------------------------------------------- summarizing


@dataclass(frozen=True)
class Summary:
    contender: str
    runs: int
    failed: int
    wall: float
    wall_min: float
    wall_max: float
    ratio: float | None
    throughput: float
    rss: float
    cpu: float
    process_wall: float
    disk_read: float
    disk_written: float
    floor: float
    other_cpu: float
    cp_ratio: float | None = None  # median wall over cp + sync's of the same bytes
    cpu_per_gb: float = float("nan")  # CPU user+sys (median) per GB of source


def summarize(depth: Depth) -> list[Summary]:
    medians: dict[str, float] = {}
    rows = []
    for contender in CONTENDERS:
        runs = [r for r in depth.runs if r.contender == contender.key]
        if not runs:  # a direction not asked for
            continue
        good = [r for r in runs if r.ok]
        if not good:
            rows.append(
                Summary(contender.key, len(runs), len(runs), *([float("nan")] * 3), None, *([float("nan")] * 8))
            )
            continue
        walls = [r.wall for r in good]
        medians[contender.key] = statistics.median(walls)
        rows.append(Summary(
            contender.key, len(runs), len(runs) - len(good), statistics.median(walls), min(walls), max(walls), None,
            source_bytes(depth, contender) / 1e9 / statistics.median(walls),
            statistics.median(r.max_rss for r in good),
            statistics.median(r.cpu for r in good), statistics.median(r.process_wall for r in good),
            statistics.median(r.disk_read for r in good), statistics.median(r.disk_written for r in good),
            max(r.floor for r in good), statistics.median(r.other_cpu for r in good),
        ))  # fmt: skip

    def ratio(summary: Summary, against: str | None) -> float | None:
        limit = medians.get(against) if against else None
        return summary.wall / limit if limit and summary.contender in medians else None

    return [
        Summary(**{
            **vars(s),
            "ratio": ratio(s, BY_KEY[s.contender].limit),
            "cp_ratio": ratio(s, BY_KEY[s.contender].cp),
            "cpu_per_gb": s.cpu / (source_bytes(depth, BY_KEY[s.contender]) / 1e9),
        })
        for s in rows
    ]  # fmt: skip


def source_bytes(depth: Depth, contender: Contender) -> int:
    return {"hf": depth.hf_bytes, "gguf": depth.gguf_bytes}.get(contender.reads, depth.input_bytes)


def rss_text(rss: float, floor: float) -> str:
    """MiB; a value at the floor only says 'no more than this' (the driver's pre-exec memory is charged)."""
    return f"≤ {floor / MIB:,.0f}" if rss <= floor else f"{rss / MIB:,.0f}"


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares line (intercept, slope) through (depth, value); None below two distinct depths."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def depth_table(depth: Depth, available_bytes: int) -> list[str]:
    gb = depth.input_bytes / 1e9
    hf_line = (
        f" The hf -> torrent runs read its conversion to hf ({depth.hf_bytes:,} bytes of shards)."
        if depth.hf_source is not None
        else ""
    )
    lines = [
        f"### {plural(depth.layers, 'layer')}: {gb:.2f} GB source (`consolidated.00.pth`, {depth.input_bytes:,} bytes)",
        "",
        "'vs limit' is each contender's median over its limit's median: the disk limit of the same bytes for "
        "the cold runs, warm cp + sync for the warm ones, the O_DIRECT read of the folder for verify, the "
        "conversion of the same source for verify --against. 'vs cp' is over cp + sync of the same bytes (cold). "
        f"CPU s/GB is user+sys per GB of source.{hf_line}",
        "",
        f"Source + output = {2 * depth.input_bytes / GIB:.1f} GiB, {2 * depth.input_bytes / available_bytes:.0%} of "
        "the memory available at the start"
        + (
            ": the page cache must evict during the run, the 32-layer regime."
            if cache_overflows(depth, available_bytes)
            else "."
        ),
        "",
        "| contender | runs | wall median (s) | spread min..max (s) | vs limit | vs cp | GB/s | peak RSS (MiB) "
        "| CPU user+sys (s) | CPU s/GB | CPU / process wall | disk read / written (GB) "
        "| other CPU on the machine (s) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summarize(depth):
        label = BY_KEY[s.contender].label
        runs = f"{s.runs}" + (f" ({s.failed} FAILED)" if s.failed else "")
        if s.failed == s.runs:
            lines.append(f"| {label} | {runs} | failed | | | | | | | | | | |")
            continue
        ratio = f"{s.ratio:.2f}" if s.ratio is not None else "n/a"
        cp_ratio = f"{s.cp_ratio:.2f}" if s.cp_ratio is not None else ""
        lines.append(
            f"| {label} | {runs} | {s.wall:.1f} | {s.wall_min:.1f}..{s.wall_max:.1f} | {ratio} | {cp_ratio} "
            f"| {s.throughput:.3f} | {rss_text(s.rss, s.floor)} | {s.cpu:.1f} | {s.cpu_per_gb:.2f} "
            f"| {s.cpu / s.process_wall:.0%} "
            f"| {s.disk_read / 1e9:.2f} / {s.disk_written / 1e9:.2f} | {s.other_cpu:.1f} |"
        )
    return lines


# Issue 14's targets: (contender, what its 'vs limit' ratio must not exceed, what the line says).
TARGETS = (
    ("convert", 1.05, "torrent -> hf, cold, ≤ 1.05x the disk limit"),
    ("to-torrent", 1.05, "hf -> torrent (CRC-32 included), cold, ≤ 1.05x the disk limit"),
    ("convert-warm", 1.0, "torrent -> hf, warm, ≤ 1.0x warm cp + sync"),
    ("to-torrent-warm", 1.0, "hf -> torrent, warm, ≤ 1.0x warm cp + sync"),
    ("verify", 1.05, "verify, ≤ 1.05x an O_DIRECT read of the folder"),
    ("verify-against", 1.25, "verify --against, ≤ 1.25x the conversion of the same source"),
    ("to-q4km", 1.0, "torrent -> gguf q4_k_m, cold, ≤ 1.0x llama.cpp's two steps (issue 24)"),
    ("to-mlx", 1.05, "torrent -> mlx (bf16), cold, ≤ 1.05x the disk limit (issue 25)"),
    ("to-mlx-q4", 1.0, "torrent -> mlx q4, cold, faster than mlx_lm.convert -q (issue 25)"),
)
RSS_BUDGET = 512 * MIB


def target_lines(depths: list[Depth]) -> list[str]:
    """Each target of issue 14 checked against this run's medians, per depth: met or missed, never edited."""
    if not depths:
        return []
    summaries = {d.layers: {s.contender: s for s in summarize(d)} for d in depths}
    layers = sorted(summaries)
    lines = [
        "## Targets (issues 14, 23, 24), checked on this run's medians",
        "",
        "| target | " + " | ".join(plural(n, "layer") for n in layers) + " |",
        "|---|" + "--:|" * len(layers),
    ]

    def cell(value: float | None, limit: float, text: str) -> str:
        if value is None or value != value:  # not measured (a direction not asked for), or every run failed
            return "n/a"
        return f"{text} {'met' if value <= limit else '**missed**'}"

    for key, limit, label in TARGETS:
        ratios = [summaries[n][key].ratio if key in summaries[n] else None for n in layers]
        lines.append(f"| {label} | " + " | ".join(cell(r, limit, f"{r:.2f}x" if r else "") for r in ratios) + " |")
    converters = {c.key for c in CONTENDERS if c.in_converter_root}
    peaks = [max((s.rss for k, s in summaries[n].items() if k in converters and s.failed < s.runs), default=None)
             for n in layers]  # fmt: skip
    floors = [floor_ratio(summaries[n]) for n in layers]
    if any(f is not None for f in floors):  # issue 23: the read, or SHA-256 where a core hashes slower than it
        over = [min(f[0], f[0] * f[1]) if f else None for f in floors]  # verify / max(read, floor)
        row = " | ".join(cell(r, 1.05, f"{r:.2f}x" if r else "") for r in over)
        lines.append(f"| verify, ≤ 1.05x max(O_DIRECT read of the folder, SHA-256 floor) (issue 23) | {row} |")
    row = " | ".join(cell(p, RSS_BUDGET, f"{p / MIB:,.0f} MiB" if p else "") for p in peaks)
    lines += [f"| mixtral-convert's peak RSS (largest median of its rows) ≤ 512 MiB | {row} |", ""]
    if any(f is not None for f in floors):
        lines += [
            "Not a target: verify over the SHA-256 floor (bench/sha256_floor.py: an O_DIRECT read and hashlib's "
            "SHA-256 of every file, a file per core, nothing else), and that floor over the read of the folder. A "
            "file's SHA-256 is sequential: where the floor is above 1.05x the read, so is any verify that checks "
            "SHA256SUMS.",
            "",
            "| ratio | " + " | ".join(plural(n, "layer") for n in layers) + " |",
            "|---|" + "--:|" * len(layers),
            "| verify / SHA-256 floor | " + " | ".join(f"{f[0]:.2f}x" if f else "n/a" for f in floors) + " |",
            "| SHA-256 floor / O_DIRECT read | " + " | ".join(f"{f[1]:.2f}x" if f else "n/a" for f in floors) + " |",
            "",
        ]
    return lines


def floor_ratio(summaries: dict[str, Summary]) -> tuple[float, float] | None:
    """(verify's median over the SHA-256 floor's, the floor's over the read's), where all three ran."""
    verify, floor, read = (summaries.get(k) for k in ("verify", "sha-floor", "read-hf"))
    if verify is None or floor is None or read is None or any(s.failed == s.runs for s in (verify, floor, read)):
        return None
    return verify.wall / floor.wall, floor.wall / read.wall


def cache_overflows(depth: Depth, available_bytes: int) -> bool:
    """Source plus output exceed the free memory: the page cache must evict mid-run, as it always does at 32
    layers (and dirty data is throttled to the disk's pace)."""
    return 2 * depth.input_bytes > available_bytes


def extrapolation(depths: list[Depth], ram_bytes: int, available_bytes: int) -> list[str]:
    full_gb = checkpoint.payload_bytes(FULL_DEPTH) / 1e9
    lines = [f"## Extrapolation to {FULL_DEPTH} layers ({full_gb:.1f} GB, the published model)", ""]
    per_layer_gb = (checkpoint.payload_bytes(2) - checkpoint.payload_bytes(1)) / 1e9
    fixed_gb = checkpoint.payload_bytes(1) / 1e9 - per_layer_gb
    deepest = sorted({d.layers for d in depths})[-2:]
    rows = []
    for contender in CONTENDERS:
        measured = [
            (d.layers, s) for d in depths for s in summarize(d) if s.contender == contender.key and s.failed < s.runs
        ]
        wall_fit = fit([(layers, s.wall) for layers, s in measured])
        rss_fit = fit([(layers, s.rss) for layers, s in measured])
        deep_fit = fit([(layers, s.wall) for layers, s in measured if layers in deepest])
        if wall_fit is None or rss_fit is None or deep_fit is None:
            continue
        time_32 = wall_fit[0] + wall_fit[1] * FULL_DEPTH
        deep_32 = deep_fit[0] + deep_fit[1] * FULL_DEPTH
        rss_32 = rss_fit[0] + rss_fit[1] * FULL_DEPTH
        note = ""
        if rss_32 > ram_bytes:
            note = f"does not fit: needs {rss_32 / GIB:.0f} GiB of RAM, the machine has {ram_bytes / GIB:.0f} GiB"
        rows.append(
            f"| {contender.label} | {wall_fit[1]:.1f} | {wall_fit[0]:.1f} | {time_32 / 60:.1f} "
            f"| {deep_fit[1]:.1f} | {deep_32 / 60:.1f} | {rss_fit[1] / MIB:,.0f} | {rss_32 / MIB:,.0f} | {note} |"
        )
    if not rows:
        return [*lines, "Needs at least two depths (e.g. `--layers 1 2`); skipped.", ""]
    overflowing = [d.layers for d in depths if cache_overflows(d, available_bytes)]
    deepest_share = 2 * max(d.input_bytes for d in depths) / available_bytes
    regime = (
        f"From {plural(overflowing[0], 'layer')} on, source and output together exceed the memory available at "
        f"the start ({available_bytes / GIB:.1f} GiB), so the page cache "
        "evicts during the run, as it always will at 32 layers; shallower depths partly run from the cache and "
        "flatter the I/O, which is why the fit through the two deepest depths is shown as well."
        if overflowing
        else f"At the deepest depth source and output take {deepest_share:.0%} of the memory available at the start "
        f"({available_bytes / GIB:.1f} GiB); a 32-layer run needs {2 * checkpoint.payload_bytes(FULL_DEPTH) / GIB:.0f} "
        "GiB, so there the page cache always evicts and shallow depths flatter the I/O; the fit through the two "
        "deepest depths is shown as well for that reason."
    )
    spread = max((s.wall_max - s.wall_min) / s.wall for d in depths for s in summarize(d) if s.failed < s.runs)
    noise = (
        f" The widest spread measured is {spread:.0%} of its median: treat these predictions as rough."
        if spread > 0.3
        else ""
    )
    return [
        *lines,
        "Least-squares line through the per-depth medians (time = a + b·layers, peak RSS likewise). The source "
        f"grows by {per_layer_gb:.2f} GB per layer on top of a fixed {fixed_gb:.2f} GB (embedding + output), so a "
        f"line is the right shape as long as nothing changes regime. {regime}{noise}",
        "",
        f"| contender | s per layer (all) | fixed s (all) | wall at 32 layers, all depths (min) "
        f"| s per layer ({deepest[0]}..{deepest[1]} layers) | wall at 32 layers, {deepest[0]}..{deepest[1]} layers "
        "(min) | MiB per layer | peak RSS at 32 layers (MiB) | note |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
        *rows,
        "",
    ]


def verification_lines(depths: list[Depth]) -> list[str]:
    lines = ["## Output check", ""]
    for depth in depths:
        ours, peer = depth.digests.get("convert"), depth.digests.get("peer")
        if ours is None or peer is None:
            lines.append(f"- {plural(depth.layers, 'layer')}: not checked")
        elif ours == peer:
            lines.append(
                f"- {plural(depth.layers, 'layer')}: the {plural(len(ours), 'safetensors shard')} of "
                "mixtral-convert and of the peer are byte-identical (sha256), so both did the same work"
            )
        else:
            lines.append(
                f"- {plural(depth.layers, 'layer')}: **shards differ** (mixtral-convert {ours} vs peer {peer})"
            )
        sizes = ", ".join(f"{BY_KEY[k].label} {v:,} bytes" for k, v in depth.output_bytes.items())
        if sizes:
            lines.append(f"  - output sizes: {sizes}")
    return [*lines, ""]


def profile_lines() -> list[str]:
    """Where the time goes: written by hand in bench/profiles.md (profiles need a profiler and judgement, not
    a rerun), carried into every report so it sits next to the numbers."""
    path = BENCH / "profiles.md"
    if not path.is_file():
        return []
    return [path.read_text().strip(), ""]


def all_runs_table(depths: list[Depth]) -> list[str]:
    lines = [
        "## Every run, in the order run",
        "",
        "| layers | repeat | contender | ok | wall (s) | of which sync (s) | peak RSS (MiB) | user (s) | sys (s) "
        "| disk read (GB) | disk written (GB) | other CPU (s) |",
        "|--:|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for depth in depths:
        for r in depth.runs:
            lines.append(
                f"| {r.layers} | {r.repeat + 1} | {BY_KEY[r.contender].label} | {'yes' if r.ok else 'FAILED'} "
                f"| {r.wall:.2f} | {r.sync_wall:.2f} | {rss_text(r.max_rss, r.floor)} | {r.user:.1f} | {r.system:.1f} "
                f"| {r.disk_read / 1e9:.2f} | {r.disk_written / 1e9:.2f} | {r.other_cpu:.1f} |"
            )
    return [*lines, ""]


def plot(depths: list[Depth], path: Path) -> str | None:
    """results.png: median wall time (bars = min..max) and median peak RSS against depth; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (time_axis, rss_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for contender in CONTENDERS:
        points = [
            (d.layers, s) for d in depths for s in summarize(d) if s.contender == contender.key and s.failed < s.runs
        ]
        if not points:
            continue
        xs = [x for x, _ in points]
        medians = [s.wall for _, s in points]
        errors = [[s.wall - s.wall_min for _, s in points], [s.wall_max - s.wall for _, s in points]]
        time_axis.errorbar(xs, medians, yerr=errors, marker="o", capsize=4, label=contender.label)
        at_floor = all(s.rss <= s.floor for _, s in points)
        rss_label = contender.label + (" (at most: the driver's own peak)" if at_floor else "")
        rss_axis.plot(xs, [s.rss / MIB for _, s in points], marker="o", label=rss_label)
    layers = sorted({d.layers for d in depths})
    time_axis.set(
        xlabel="layers",
        ylabel="wall time incl. sync (s)",
        title="Time (median, bars = min..max)",
        xticks=layers,
        ylim=(0, None),
    )
    rss_axis.set(
        xlabel="layers",
        ylabel="peak RSS (MiB, log scale)",
        title="Peak resident memory (median)",
        xticks=layers,
        yscale="log",
    )
    for axis in (time_axis, rss_axis):
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def report(
    depths: list[Depth],
    machine: Machine,
    dropped: bool,
    command: str,
    repeats: int,
    plot_name: str | None,
    plot_note: str,
    started: datetime,
    elapsed: float,
    converter: Converter,
    changed: bool,
) -> tuple[str, str]:
    """The whole BENCHMARKS.md, and the part printed to stdout."""
    sw = ", ".join(f"{k} {v}" for k, v in machine.software.items())
    cache_line = (
        "dropped before every run (`sync; echo 3 > /proc/sys/vm/drop_caches`): cold-cache numbers, "
        "every source byte comes from the disk"
        if dropped
        else "NOT dropped (not permitted here, or --warm): warm-cache numbers; the source may be partly in "
        "the page cache"
    )
    busy = [r.other_cpu / r.wall for d in depths for r in d.runs if r.wall > 0]
    neighbours = (
        f"during the runs, other work kept a median {statistics.median(busy):.2f} of the "
        f"{machine.usable_cpus} CPUs busy (max {max(busy):.2f})"
        if busy
        else "no runs"
    )
    tables: list[str] = []
    for depth in depths:
        tables += [*depth_table(depth, machine.available_bytes), ""]
    text = [
        "# Benchmarks: Mixtral torrent checkpoint → Hugging Face layout, and back",
        "",
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC ({elapsed / 60:.0f} min in all). "
        "Do not edit by hand: rerun the command.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.cpu_model}, {machine.usable_cpus} usable of {machine.logical_cpus} logical CPUs",
        f"- RAM: {machine.ram_bytes / GIB:.1f} GiB, {machine.available_bytes / GIB:.1f} GiB available at the start",
        f"- Disk: the cache folder is on {machine.device} ({machine.fstype}, mounted at {machine.mount_point}); "
        f"{machine.free_bytes / 1e9:.0f} GB free at the start; sources, outputs and copies share it",
        f"- Page cache: {cache_line}",
        f"- Kernel {machine.kernel}; {sw}",
        f"- Load average (1/5/15 min) at the start {machine.load_start}, at the end {load_average()}: the machine "
        "is shared, so each run also records the CPU the rest of the machine used meanwhile ('other CPU': other "
        "processes plus kernel writeback threads); a high value marks a run disturbed by a neighbour. "
        f"Here {neighbours}",
        "",
        "## What is measured",
        "",
        "Sources are generated real-dimension Mixtral-8x7B checkpoints in the torrent layout (every tensor name "
        "and shape of the published `consolidated.00.pth`, bf16, only fewer layers). For each depth the "
        f"contenders run in turn, {plural(repeats, 'round')}, in the same session, in an order shuffled each round "
        "(seeded by the round; the table of every run shows it): a run changes the machine for the next one (on a "
        "VM whose host reclaims free guest memory, cp right after a process freed gigabytes was 3-5x faster), so "
        "a fixed order would favour whoever follows the peer:",
        "",
        "- **disk limit**: `bench/disk_limit.py OUT SRC/consolidated.00.pth`: an O_DIRECT read of the source "
        "into one reused buffer (to nowhere) and, at the same time, an O_DIRECT write of as many bytes to OUT, "
        "fsynced (`dd iflag=direct bs=64M` ‖ `dd oflag=direct bs=64M` in one process): what any converter must "
        "at least do, with no copy and no work, in the request size this disk serves fastest (64 MiB was the "
        "fastest of 8 to 128 MiB with 1 to 4 requests in flight, bench/profiles.md). 'vs limit' of the cold runs "
        "is against it.",
        "- **cp + sync**: `cp SRC/consolidated.00.pth OUT/` then sync: the same bytes through the page cache.",
        "- **mixtral-convert**: `python -m convert convert SRC OUT --to hf --no-progress --force` "
        f"(streamed; checksums on; fsyncs its own files), then sync. Measured: {converter.description}."
        + (" **Its files changed while the bench ran, so these numbers mix versions.**" if changed else ""),
        "- **peer**: `bench/peer_baseline.py`: `torch.load(weights_only=True)` of everything, renames and the q/k "
        "rotary permutation in RAM, `safetensors.torch.save_file` per 5e9-byte shard "
        "(`huggingface_hub.split_torch_state_dict_into_shards`, as `save_pretrained`), then sync.",
        "- **warm** rows: the page cache is dropped, then the source is read through it (untimed) before the run, "
        "as for a user who has just downloaded it on a machine with enough RAM; mixtral-convert warm is "
        "compared with cp + sync warm.",
        "",
        "The other direction (`--directions hf-torrent`) reads the hf conversion of the same checkpoint, made once "
        "by the measured converter and cached: its disk limit, cp + sync of the shards, and "
        "`mixtral-convert convert SRC OUT --to torrent --no-progress --force` (the planned torch zip that "
        "replaces torch.save, CRC-32 included), cold and warm.",
        "",
        "`--directions verify` reads that hf folder too: **O_DIRECT read of the hf folder** (`disk_limit.py "
        "--read-only` of every file in it: verify only reads), the **SHA-256 floor** (`sha256_floor.py`: the same "
        "read and hashlib's SHA-256 of each file, a file per core: what checking SHA256SUMS alone costs; not a "
        "limit to beat, a floor under verify), **verify** (`python -m convert verify SRC`: "
        "SHA256SUMS and the manifest's per-tensor digests) against that read, and **verify --against** "
        "(`verify SRC --against` the torrent checkpoint: every tensor compared with the source's converted "
        "bytes) against the torrent -> hf conversion of the same source.",
        "",
        "`--directions torrent-gguf`: `mixtral-convert convert SRC OUT --to gguf --no-progress --force` (one "
        "model.gguf in bf16, the release's own type: llama.cpp's F32 norms and router, every other byte straight "
        "through) beside its own disk limit and cp + sync of the torrent.",
        "",
        "`--directions torrent-q4km`: `mixtral-convert convert SRC OUT --to gguf --outtype q4_k_m` (llama-quantize's "
        "Q4_K_M file in one pass) beside **llama.cpp's two steps** (`bench/llama_two_steps.py`: llama.cpp's "
        "`convert_hf_to_gguf.py` from the hf conversion to a bf16 GGUF, then `llama_model_quantize` Q4_K_M with 2 "
        "threads, no importance matrix) and **llama-quantize alone** (step 2 from the bf16 GGUF this converter "
        "made of the same checkpoint, cached). 'vs limit' is over the two steps, 'vs cp' over llama-quantize alone; "
        "CPU s/GB is per GB of each one's own input.",
        "",
        "`--directions torrent-mlx`: `--to mlx` (bf16, the checkpoint's own dtype) beside its disk limit, and "
        "`--to mlx --outtype q4` beside `mlx_lm.convert -q` (4 bits, groups of 64) run on the hf conversion of the "
        "same checkpoint (mlx-lm's own input). 'vs limit' is over the disk limit and over mlx_lm.convert. The "
        "**no-work streaming copy** (`disk_limit.py OUT SRC/consolidated.00.pth --coupled`: O_DIRECT both ways, "
        "four 64 MiB blocks, each written only after it has been read) is not a contender but a reference: what "
        "any converter that streams in bounded memory could at best do on this disk. Nor is the **hashed copy** "
        "(the same with `--hash sha256 --hash blake3`: every block also hashed on a thread per algorithm), the "
        "least a converter that writes SHA256SUMS and manifest.json's per-tensor digests does on this machine.",
        "",
        "All six directions run by default (`make bench`); `--quick` runs one small-width layer once "
        "(bench/checkpoint.py --small, about 0.3 GB) to check the script end to end, writing its report under "
        "the cache folder, never here.",
        "",
        "Wall time runs from process start to the end of the following `sync()` (so data is on disk for all "
        "three). Peak RSS, CPU and disk blocks come from `os.wait4` on the child itself (`ru_maxrss`, "
        "`ru_utime + ru_stime`, `ru_inblock`/`ru_oublock`); the kernel's own writeback threads are not charged to "
        "anyone. Linux charges the memory an exec replaces to the new program's `ru_maxrss`, so no child can read "
        "below this driver's own peak (kept small: the driver never imports torch); such values are shown as "
        "'≤ driver peak'. GB/s is source bytes / median wall; CPU s/GB is the median user+sys over the source's "
        "GB. Medians and spreads (min..max) are over the rounds. OUT is deleted after every run (untimed) and "
        "the disk flushed before the next one.",
        "",
        "## Results",
        "",
        *target_lines(depths),
        *tables,
        *extrapolation(depths, machine.ram_bytes, machine.available_bytes),
        *verification_lines(depths),
        *profile_lines(),
        "## Plot",
        "",
        f"![wall time and peak RSS against depth]({plot_name})" if plot_name else plot_note,
        "",
        *all_runs_table(depths),
    ]
    return "\n".join(text), "\n".join(
        target_lines(depths) + tables + extrapolation(depths, machine.ram_bytes, machine.available_bytes)
    )


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time mixtral-convert against cp+sync and a load-everything peer.")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="depths to generate and convert")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per depth (contenders alternate)")
    parser.add_argument(
        "--directions",
        nargs="+",
        choices=DIRECTIONS,
        default=list(DIRECTIONS),
        help="torrent-hf: the disk limit, cp, mixtral-convert and the peer on the torrent checkpoint; hf-torrent: "
        "the disk limit, cp and mixtral-convert on its hf conversion (made once and cached); verify: verify and "
        "verify --against on that hf conversion, beside an O_DIRECT read of it; torrent-gguf: the disk limit, cp and "
        "mixtral-convert --to gguf (bf16, as released) on the torrent checkpoint; torrent-q4km: --outtype q4_k_m "
        "against llama.cpp's converter + llama-quantize, and llama-quantize alone; torrent-mlx: --to mlx against "
        "its disk limit, and q4 against mlx_lm.convert -q",
    )
    parser.add_argument("--no-warm-runs", action="store_true", help="skip the runs with the source in the page cache")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one small-width layer (about 0.3 GB), one round, report under --cache (not for numbers)",
    )
    parser.add_argument("--cache", type=Path, default=BENCH / "cache", help="where sources are kept between runs")
    parser.add_argument("--out", type=Path, default=BENCH / "BENCHMARKS.md", help="the report (markdown)")
    parser.add_argument(
        "--plot", type=Path, help="PNG plot (default: results.png beside BENCHMARKS.md, else OUT's name with .png)"
    )
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache even where allowed")
    parser.add_argument("--no-verify", action="store_true", help="skip hashing the first outputs of each depth")
    parser.add_argument(
        "--rev",
        help="measure this commit's converter (exported with git archive) instead of the "
        "work tree, which may change during a long run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.repeats = [1], 1
        if args.out == BENCH / "BENCHMARKS.md":  # a smoke run never replaces the report
            args.out = args.cache / "quick" / "BENCHMARKS.md"
    if any(n < 1 for n in args.layers) or args.repeats < 1:
        parser.error("--layers and --repeats need positive numbers")
    args.layers = sorted(set(args.layers))
    return args


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    assert checkpoint.payload_bytes(FULL_DEPTH) == 93_405_585_408, "shape table disagrees with the published model"
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    dropped = not args.warm and can_drop_caches()
    say(f"page cache: {'dropped before every run' if dropped else 'not dropped (warm-cache numbers)'}")
    machine = describe_machine(args.cache)
    converter = pick_converter(args.rev, args.cache)
    fingerprint = converter.fingerprint()
    say(f"mixtral-convert: {converter.description}")
    bench = Bench(args.cache, dropped, converter, small=args.quick)
    signal.signal(signal.SIGTERM, _interrupt)
    started, clock = datetime.now(UTC), time.perf_counter()
    depths: list[Depth] = []
    try:
        for layers in args.layers:
            source = bench.ensure_checkpoint(layers)
            depths.append(Depth(layers, source, (source / checkpoint.WEIGHTS).stat().st_size))
            if {"torrent-q4km", "torrent-mlx"} & set(args.directions):  # their peers need a tokenizer
                bench.ensure_tokenizer(depths[-1])
            if {"hf-torrent", "verify", "torrent-q4km", "torrent-mlx"} & set(args.directions):
                bench.ensure_hf(depths[-1])
            if "torrent-q4km" in args.directions:
                bench.ensure_gguf(depths[-1])
        contenders = [c for c in CONTENDERS if c.direction in args.directions and not (c.warm and args.no_warm_runs)]
        for depth in depths:
            for repeat in range(args.repeats):
                # Shuffled each round (seeded: a rerun uses the same orders). A run changes the machine for the
                # next one: here cp right after a process that freed gigabytes ran 3-5x faster than otherwise
                # (a VM whose host reclaims free guest memory), so a fixed order favours whoever follows the peer.
                for contender in random.Random(repeat).sample(contenders, len(contenders)):
                    run = bench.run(depth, contender, repeat, verify=not args.no_verify)
                    depth.runs.append(run)
                    say(
                        f"[{depth.layers} L, round {repeat + 1}/{args.repeats}] {contender.label:<44} "
                        f"{run.wall:7.1f} s (sync {run.sync_wall:.1f})  RSS {run.max_rss / MIB:8,.0f} MiB  "
                        f"CPU {run.cpu:6.1f} s{'' if run.ok else '  FAILED'}"
                    )
    except KeyboardInterrupt:
        bench.cleanup()
        say("interrupted: the running contender was stopped and its output removed; no report written")
        return 130
    finally:
        bench.cleanup()
    default_plot = "results.png" if args.out.name == "BENCHMARKS.md" else args.out.with_suffix(".png").name
    plot_path = args.plot or args.out.parent / default_plot
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_name = plot(depths, plot_path)
    plot_note = "matplotlib is not importable here, so no plot was drawn (`pip install matplotlib` to get one)."
    if plot_name is None:
        say(f"note: {plot_note}")
    elif plot_path.parent.resolve() != args.out.parent.resolve():
        plot_name = str(plot_path.resolve())
    changed = converter.fingerprint() != fingerprint
    if changed:
        say("WARNING: convert/ or mappings/ changed while the bench ran: the numbers mix versions (see --rev)")
    document, table = report(
        depths,
        machine,
        dropped,
        command,
        args.repeats,
        plot_name,
        plot_note,
        started,
        time.perf_counter() - clock,
        converter,
        changed,
    )
    args.out.write_text(document + "\n")
    print(table)
    say(f"wrote {args.out}" + (f" and {plot_path}" if plot_name else ""))
    return 1 if any(not r.ok for d in depths for r in d.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
