"""The contract every container passes: a new one is covered as soon as a layout table names it, nothing to list.

A container is a module of convert/containers/ defining FORMAT; a layout is a table in mappings/ naming its container.
Every layout whose container is registered is run here through the command line, with the tiny `sample` model, and
for a container with --outtype choices once per outtype as well as with the default. For each layout L:

1. detect: a folder `convert --to L` wrote is detected as L, by detect_layout and by `inspect` without --from;
2. plan: `convert --to L --dry-run --json` names exactly the files the real run writes, at their exact sizes;
3. write and read back: sample -> L -> torrent gives the sample's tensors as torch.load reads them, bit for bit
   where the outtype is lossless (LOSSY says why it is not); an outtype that cannot be restored (ONE_WAY) is
   refused on the way back with one line, and read back by that container's own real client (ONE_WAY_READERS);
4. verify: `verify OUT --against SRC` passes; one byte flipped in the middle of the largest weights file fails
   verify (exit 1) with a line naming that file;
5. force-replace: converting another layout into L's output folder with --force leaves exactly that layout,
   none of L's weight files;
6. resume: a run stopped by SIGINT while it is held writing its second file (the first in place), continued with
   --resume, ends with the very bytes of an uninterrupted run (sha256 of every file).

A registered container no table names fails test_every_container_has_a_layout, and so does a table naming no
registered container.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from helpers import REPO, assert_one_line_error, flip_byte
from mlx_client import read_mlx, sample_named
from test_gguf_convert import gguf_named

from convert.containers import container, container_names, format_of
from convert.fileio.faults import STALL_AT_ENV
from convert.model.tables import layout, layout_names, target_names
from convert.planning.source import detect_layout, open_source
from convert.run.writer import partial_name

if TYPE_CHECKING:
    from conftest import CliRunner

pytestmark = pytest.mark.containers

Case = tuple[str, str | None]  # a layout, and the --outtype asked of it (None: the container's default)

# Every layout a conversion can write (read-only tables, such as gguf_legacy, are sources only: their container
# is held to this contract through its writable table, and tests/test_gguf_legacy.py reads them).
LAYOUTS = [name for name in target_names() if layout(name).container in container_names()]
CASES: list[Case] = [(name, outtype) for name in LAYOUTS for outtype in (None, *format_of(layout(name)).outtypes)]
CASE_IDS = [name if outtype is None else f"{name}-{outtype}" for name, outtype in CASES]
REFERENCE = "torrent"  # what every output is read back through: the sample's own layout, read by torch.load
SAMPLE_DTYPE = torch.bfloat16  # the sample's element type; LOSSY below is relative to it

# Outtypes that do not hold every bf16 value, and why their read-back is compared within a bound instead of bit for
# bit. bf16 and f32 hold every bf16 value, so those read back bit for bit (f32 comes back as f32, equal in value).
LOSSY: dict[str, str] = {
    # float16 has 5 exponent bits to bfloat16's 8: the sample's smallest weights fall below f16's normal range
    # (2^-14) and round to its subnormal grid of 2^-24, so each comes back within half a step, 2^-25.
    "f16": "rounded to the f16 subnormal grid",
    # 8-bit blocks of 32 with one f16 scale (amax / 127): each value within about half a scale step of the original.
    "q8_0": "quantized to 8 bits per element",
    # MLX's affine groups (64 elements; a step is (max - min) / (2^bits - 1) <= 2 amax / (2^bits - 1)): the edge of
    # larger magnitude is made exact, which can push the other edge a step past the range (clipped), and the
    # scale and bias are stored rounded to bf16 while the elements were quantized with their float32 values.
    "q8": "quantized to 8 bits per element in groups",
    "q4": "quantized to 4 bits per element in groups",
}
# llama-quantize's mixes (q4_k_m ...): blocks of 2^(b-1) steps a side at b bits, the largest of a block exact, so
# a value is within one step of it (a clamped edge), amax / 2^(b-1). The sample's rows (64, 96) are not whole
# 256-value super-blocks, so its K types fall back to the 32-value ones (Q4_0, Q5_0, Q5_1, Q8_0).
MIX_BITS = {"q3_k_s": 3, "q3_k_m": 3, "q3_k_l": 3, "q4_0": 4, "q4_1": 4, "q4_k_s": 4, "q4_k_m": 4, "q5_0": 5,
            "q5_1": 5, "q5_k_s": 5, "q5_k_m": 5, "q6_k": 6}  # fmt: skip
LOSSY.update({mix: f"llama-quantize's {mix.upper()} mix" for mix in MIX_BITS})
# How far a quantized value may be from the original, as a fraction of the tensor's largest magnitude.
QUANT_BOUND = {"q8_0": 1 / 127, "q8": 4 / 255, "q4": 4 / 15}  # MLX: two steps
QUANT_BOUND.update({mix: 1 / 2 ** (bits - 1) for mix, bits in MIX_BITS.items()})
# quantized: the converter refuses to restore it ("one-way"), so no torch.load read-back exists
ONE_WAY = {"q8_0", "q8", "q4", *MIX_BITS}


def read_gguf(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF output as llama.cpp's gguf-py reads and dequantizes it, under GGUF names."""
    tensors = {}
    for path in sorted(folder.glob("*.gguf")):
        for t in GGUFReader(path).tensors:
            tensors[t.name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))  # a writable copy
    return tensors


Tensors = dict[str, torch.Tensor]
# container -> (its real client's reading of an output folder, the sample's tensors under that container's names)
ONE_WAY_READERS: dict[str, tuple[Callable[[Path], Tensors], Callable[[Tensors], Tensors]]] = {
    "gguf": (read_gguf, gguf_named),
    "mlx": (read_mlx, sample_named),
}


def outtype_args(outtype: str | None) -> list[str]:
    return [] if outtype is None else ["--outtype", outtype]


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def weight_files(folder: Path) -> list[Path]:
    """The files the folder's container reads tensors from (its own Format.open)."""
    with open_source(folder) as source:
        return list(source.weight_files)


def torrent_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "consolidated.00.pth", weights_only=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract")


@pytest.fixture(scope="module")
def sample(cli: CliRunner, root: Path) -> Path:
    cli("sample", root / "src")
    return root / "src"


@pytest.fixture(scope="module")
def sample_tensors(sample: Path) -> dict[str, torch.Tensor]:
    tensors = torrent_tensors(sample)
    assert {t.dtype for t in tensors.values()} == {SAMPLE_DTYPE}  # what LOSSY assumes
    return tensors


K = TypeVar("K", bound=Hashable)


def run_all(cli: CliRunner, commands: dict[K, list[object]]) -> dict[K, subprocess.CompletedProcess[str]]:
    """Run independent read-only commands one after another; the tests then check each result. (In the test process,
    as the cli fixture runs them: a run owns the process's streams and its run scope, so they cannot overlap.)"""
    return {key: cli(*args, check=False) for key, args in commands.items()}


@pytest.fixture(scope="module")
def outputs(cli: CliRunner, sample: Path, root: Path) -> dict[Case, Path]:
    """Each case converted once from the sample; tests copy an output before changing it."""
    folders = {case: root / f"out-{case_id}" for case, case_id in zip(CASES, CASE_IDS, strict=True)}
    done = run_all(cli, {(n, o): ["convert", sample, folders[(n, o)], "--to", n, *outtype_args(o)] for n, o in CASES})
    for case, result in done.items():
        assert result.returncode == 0, f"{case}: {result.stderr[-4000:]}"
    return folders


@pytest.fixture(scope="module")
def plans(cli: CliRunner, sample: Path, root: Path) -> dict[Case, subprocess.CompletedProcess[str]]:
    """`convert --dry-run --json` of each case, into a folder that does not exist (and must not afterwards)."""
    return run_all(
        cli,
        {
            (n, o): ["convert", sample, root / "dry", "--to", n, *outtype_args(o), "--dry-run", "--json"]
            for n, o in CASES
        },
    )


@pytest.fixture(scope="module")
def inspections(cli: CliRunner, outputs: dict[Case, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    return run_all(cli, {name: ["inspect", outputs[(name, None)], "--json"] for name in LAYOUTS})


@pytest.fixture(scope="module")
def read_backs(
    cli: CliRunner, outputs: dict[Case, Path], root: Path
) -> dict[Case, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Each output converted back to the reference layout."""
    backs = {case: root / f"back-{case_id}" for case, case_id in zip(CASES, CASE_IDS, strict=True)}
    done = run_all(cli, {case: ["convert", outputs[case], backs[case], "--to", REFERENCE] for case in CASES})
    return {case: (backs[case], done[case]) for case in CASES}


@pytest.fixture(scope="module")
def verifications(
    cli: CliRunner, sample: Path, outputs: dict[Case, Path]
) -> dict[str, subprocess.CompletedProcess[str]]:
    return run_all(cli, {name: ["verify", outputs[(name, None)], "--against", sample] for name in LAYOUTS})


def test_every_container_has_a_layout() -> None:
    """A container is only tested (and only usable) through a table naming it; a table must name a container."""
    named = {layout(name).container for name in target_names()}
    assert set(container_names()) <= named, f"containers no writable table names: {set(container_names()) - named}"
    unnamed = [f"{name}: {layout(name).container}" for name in layout_names() if name not in LAYOUTS]
    unnamed = [entry for entry in unnamed if not layout(entry.split(":")[0]).read_only]
    assert unnamed == [], "tables naming no registered container"


@pytest.mark.parametrize("name", container_names())
def test_a_containers_markers_are_its_formats(name: str) -> None:
    """The registry detects a folder's layout from each container's MARKERS, loading its FORMAT (numpy, gguf-py)
    only where one is present; FORMAT's claims() starts from its markers: they must be the same files."""
    module = importlib.import_module(f"convert.containers.{name}")
    assert module.MARKERS and container(name).markers == module.MARKERS


@pytest.mark.parametrize("name", LAYOUTS)
def test_detect(outputs: dict[Case, Path], inspections: dict[str, subprocess.CompletedProcess[str]], name: str) -> None:
    assert detect_layout(outputs[(name, None)]) == name
    assert inspections[name].returncode == 0, inspections[name].stderr
    report = json.loads(inspections[name].stdout)
    assert report["layout"] == name
    assert report["problems"] == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_plan_is_what_is_written(
    root: Path, outputs: dict[Case, Path], plans: dict[Case, subprocess.CompletedProcess[str]], case: Case
) -> None:
    assert plans[case].returncode == 0, plans[case].stderr
    assert not (root / "dry").exists()
    plan = json.loads(plans[case].stdout)
    planned = {f["name"]: f["size"] for f in plan["files"]}
    assert planned == {p.name: p.stat().st_size for p in outputs[case].iterdir()}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_write_and_read_back(
    outputs: dict[Case, Path],
    read_backs: dict[Case, tuple[Path, subprocess.CompletedProcess[str]]],
    sample_tensors: dict[str, torch.Tensor],
    case: Case,
) -> None:
    name, outtype = case
    back, result = read_backs[case]
    if outtype in ONE_WAY:
        assert_one_line_error(result, "one-way")
        assert not (back / "consolidated.00.pth").exists()
        container = layout(name).container
        assert container in ONE_WAY_READERS, f"{container}: a one-way outtype needs its real client here to read it"
        read, rename = ONE_WAY_READERS[container]
        got, want = read(outputs[case]), rename(sample_tensors)
    else:
        assert result.returncode == 0, result.stderr
        got, want = torrent_tensors(back), sample_tensors
    assert sorted(got) == sorted(want)
    for key, original in want.items():
        value = got[key]
        assert value.shape == original.shape, key
        if outtype is None:  # no silent cast: without --outtype every container keeps the checkpoint's dtype
            assert value.dtype == original.dtype, key
        if outtype not in LOSSY:  # lossless: the same bits, in the sample's dtype or (f32) a wider one holding them
            assert torch.equal(value.float(), original.float()), key
            narrowed = value.to(original.dtype)
            assert torch.equal(narrowed.view(torch.uint8), original.view(torch.uint8)), key
        elif outtype == "f16":  # LOSSY: values under 2^-14 round to the subnormal grid of 2^-24
            assert (value.float() - original.float()).abs().max().item() <= 2.0**-25, key
        else:  # LOSSY quantized: within QUANT_BOUND of the tensor's amax (a block's amax is at most the tensor's)
            bound = original.float().abs().max().item() * QUANT_BOUND[outtype]
            assert (value.float() - original.float()).abs().max().item() <= bound, key


@pytest.mark.parametrize("name", LAYOUTS)
def test_verify_passes_and_names_a_flipped_byte(
    cli: CliRunner,
    sample: Path,
    outputs: dict[Case, Path],
    verifications: dict[str, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    name: str,
) -> None:
    good = verifications[name]
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.strip().splitlines()[-1].startswith(f"verified: {outputs[(name, None)]} ({name})")

    folder = Path(shutil.copytree(outputs[(name, None)], tmp_path / "damaged"))
    weights = max(weight_files(folder), key=lambda p: p.stat().st_size)
    flip_byte(weights, weights.stat().st_size // 2)
    bad = cli("verify", folder, "--against", sample, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    failed = [line for line in bad.stdout.splitlines() if line.startswith("FAILED")]
    assert any(str(weights) in line for line in failed), bad.stdout


def other_layout(name: str) -> str:
    """The next layout (in name order, wrapping) with another container: each layout replaces and is replaced."""
    order = LAYOUTS[LAYOUTS.index(name) + 1 :] + LAYOUTS[: LAYOUTS.index(name)]
    return next(other for other in order if layout(other).container != layout(name).container)


@pytest.mark.parametrize("name", LAYOUTS)
def test_force_replaces_with_exactly_the_new_layout(
    cli: CliRunner, sample: Path, outputs: dict[Case, Path], tmp_path: Path, name: str
) -> None:
    new = other_layout(name)
    dst = Path(shutil.copytree(outputs[(name, None)], tmp_path / "out"))
    old_weights = [p.name for p in weight_files(dst)]
    cli("convert", sample, dst, "--to", new, "--force")
    assert detect_layout(dst) == new
    assert [n for n in old_weights if (dst / n).exists()] == []
    assert sha256s(dst) == sha256s(outputs[(new, None)])  # exactly what a fresh run writes, nothing of L's left


@pytest.mark.parametrize("name", LAYOUTS)
def test_interrupted_then_resumed_equals_uninterrupted(
    cli: CliRunner,
    sample: Path,
    outputs: dict[Case, Path],
    plans: dict[Case, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    name: str,
) -> None:
    dst = tmp_path / "out"
    assert plans[(name, None)].returncode == 0, plans[(name, None)].stderr
    plan = json.loads(plans[(name, None)].stdout)
    files = [(f["name"], f["size"]) for f in plan["files"]]  # in write order
    assert len(files) >= 2
    (first, first_size), (second, _) = files[0], files[1]
    # held after the first chunk of the second file, the first synced and renamed into place (fileio/faults.py)
    env = dict(os.environ, **{STALL_AT_ENV: second})
    command = [sys.executable, "-m", "convert", "convert", str(sample), str(dst), "--to", name]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = dst / partial_name(second)
        deadline = time.monotonic() + 60
        while not (held.is_file() and held.stat().st_size > 0):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"never held at {second}"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 130, stderr
    said = [line for line in stderr.splitlines() if not line.startswith("mixtral-convert: warning:")]
    assert len(said) == 1 and said[0].startswith("mixtral-convert: interrupted;"), stderr
    assert (dst / first).stat().st_size == first_size
    assert not (dst / files[-1][0]).exists()  # an interrupted output never looks complete
    kept = (dst / first).stat().st_mtime_ns

    cli("convert", sample, dst, "--to", name, "--resume")
    assert sha256s(dst) == sha256s(outputs[(name, None)])
    assert (dst / first).stat().st_mtime_ns == kept  # the finished file was kept, not written again
