"""The command line as a user meets it: dry runs that predict the real output exactly, refusals with one line."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import helpers
import pytest
from helpers import REPO, assert_one_line_error, run_cli, run_process

from convert.common.sizes import parse_size

pytestmark = pytest.mark.e2e


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    folder = tmp_path / "sample"
    run_cli("sample", folder)
    (folder / "tokenizer.model").write_bytes(b"tokenizer bytes \x00\x01")
    return folder


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("123", 123),
        ("500 MB", 5 * 10**8),
        ("1.5kib", 1536),
        ("2tb", 2 * 10**12),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 XB", "-1", "0", "5 G B"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|at least"):
        parse_size(text)


def test_dry_run_json_predicts_every_file_exactly(sample: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dry = run_cli("convert", sample, dst, "--to", "hf", "--dry-run", "--json", "--max-shard-size", "250KB")
    assert not dst.exists()
    plan = json.loads(dry.stdout)
    run_cli("convert", sample, dst, "--to", "hf", "--max-shard-size", "250KB")
    written = sorted(p.name for p in dst.iterdir())
    assert sorted(f["name"] for f in plan["files"]) == written
    small_text = {"config.json", "generation_config.json", "model.safetensors.index.json"}
    for entry in plan["files"]:
        path = dst / entry["name"]
        assert path.stat().st_size == entry["size"], entry["name"]
        if entry["name"] in small_text:
            assert path.read_text() == entry["content"], entry["name"]
        else:
            assert "content" not in entry, entry["name"]
    assert {"SHA256SUMS", "manifest.json"} <= set(written)
    assert (dst / "tokenizer.model").read_bytes() == (sample / "tokenizer.model").read_bytes()
    assert len([n for n in written if n.startswith("model-")]) == 3


def test_text_dry_run_writes_nothing(sample: Path, tmp_path: Path) -> None:
    result = run_cli("convert", sample, tmp_path / "out", "--to", "hf", "--dry-run")
    assert "torrent -> hf, BF16, 41 tensors, nothing written" in result.stdout
    assert "model.safetensors.index.json" in result.stdout
    assert not (tmp_path / "out").exists()


def test_dry_run_checks_the_pins_it_is_given(sample: Path, tmp_path: Path) -> None:
    """--dry-run --expect FILE checks the pins (what the user asked for), and a missing FILE is an error."""
    dst = tmp_path / "out"
    missing = run_cli(
        "convert", sample, dst, "--to", "hf", "--dry-run", "--expect", tmp_path / "nope.sha256", check=False
    )
    assert missing.returncode == 2
    assert_one_line_error(missing, "nope.sha256", "no such pins file")
    digest = hashlib.sha256((sample / "consolidated.00.pth").read_bytes()).hexdigest()
    good = tmp_path / "good.sha256"
    good.write_text(f"{digest}  consolidated.00.pth\n")
    bad = tmp_path / "bad.sha256"
    bad.write_text(f"{'0' * 64}  consolidated.00.pth\n")
    wrong = run_cli("convert", sample, dst, "--to", "hf", "--dry-run", "--expect", bad, check=False)
    assert wrong.returncode == 2
    assert_one_line_error(wrong, "consolidated.00.pth", f"the pin says {'0' * 64}")
    right = run_cli("convert", sample, dst, "--to", "hf", "--dry-run", "--json", "--expect", good)
    assert json.loads(right.stdout)["target"] == "hf"
    assert not dst.exists()


def test_non_empty_destination_needs_force(sample: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("convert", sample, dst, "--to", "hf", check=False), str(dst), "--force")
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    run_cli("convert", sample, dst, "--to", "hf", "--max-shard-size", "100KB", "--force")
    run_cli("convert", sample, dst, "--to", "hf", "--force")  # fewer shards: the stale ones must go
    names = sorted(p.name for p in dst.iterdir())
    assert [n for n in names if n.startswith("model-")] == ["model-00001-of-00001.safetensors"]
    assert (dst / "notes.txt").read_text() == "mine"


def test_force_refuses_a_folder_vllm_would_misread(sample: Path, tmp_path: Path) -> None:
    """A consolidated*.safetensors no layout defines is not removed by --force, and vLLM would load it: refused,
    before anything is removed. (consolidated.safetensors itself is a mistral output's, which --force removes:
    tests/test_force.py.)"""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "consolidated.old.safetensors").write_bytes(b"x")
    (dst / "SHA256SUMS").write_bytes(b"an earlier output's")
    assert_one_line_error(
        run_cli("convert", sample, dst, "--to", "hf", "--force", check=False),
        "must not contain consolidated.old.safetensors",
    )
    assert sorted(p.name for p in dst.iterdir()) == ["SHA256SUMS", "consolidated.old.safetensors"]


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_destination_may_not_touch_the_source(sample: Path, where: str) -> None:
    dst = {"same": sample, "inside": sample / "hf", "around": sample.parent}[where]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in sample.iterdir())
    result = run_cli("convert", sample, dst, "--to", "hf", "--force", check=False)
    assert_one_line_error(result, str(dst), "source")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in sample.iterdir()) == before


def test_missing_folder_and_unknown_layout(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("inspect", tmp_path / "nope", check=False), "no such folder")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    line = assert_one_line_error(run_cli("inspect", tmp_path / "junk", check=False), "no known checkpoint layout")
    assert "weights.bin" in line and "torrent needs consolidated.00.pth" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    """A process: the traceback and the exit status are the interpreter's, for the exception --debug lets out."""
    result = run_process("--debug", "inspect", tmp_path / "nope", check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_in_process_runs_say_what_the_command_says(sample: Path, tmp_path: Path) -> None:
    """run_cli (main() in the test process) gives the exit status, stdout and stderr of the command run as a
    process, on every path out of main(): success, a warning, problems found (1), an error (2), argparse's usage
    error (SystemExit 2) and --version (SystemExit 0). The other tests rely on this."""
    (sample / "tokenizer.model").write_bytes(b"not a tokenizer")  # a warning line on stderr
    broken = tmp_path / "broken"
    shutil.copytree(sample, broken)
    (broken / "params.json").write_text(json.dumps(json.loads((sample / "params.json").read_text()) | {"dim": 96}))
    out = tmp_path / "out"
    commands = [
        ("convert", sample, out, "--to", "hf", "--max-shard-size", "250KB"),  # with the warning
        ("convert", sample, out, "--to", "hf", "--dry-run"),
        ("convert", sample, out, "--to", "gguf", "--dry-run", "--json"),
        ("inspect", broken),
        ("inspect", tmp_path / "nope"),
        ("verify", tmp_path / "nope", "--json"),
        ("convert", sample, out, "--to", "nowhere"),
        ("--version",),
    ]
    statuses = set()
    for command in commands:
        said = []
        for run in (run_cli, run_process):
            result = run(*command, check=False)
            written = sorted(p.name for p in out.iterdir()) if out.exists() else []
            shutil.rmtree(out, ignore_errors=True)
            timing = r"in [\d.]+ s \([^)]*\)"  # the summary line's time and rate
            said.append((result.returncode, re.sub(timing, "in T", result.stdout), result.stderr, written))
        assert said[0] == said[1], command
        statuses.add(said[1][0])
    assert statuses == {0, 1, 2}


def test_in_process_runs_must_leave_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cli fails a run that leaves a thread running, a handler on the tool's logger or a signal handler
    changed: a process of its own would take them with it, here they would reach the next test."""
    import logging

    import convert.cli

    release = threading.Event()

    def leaves_a_thread(argv: list[str]) -> int:
        threading.Thread(target=release.wait, name="left-behind", daemon=True).start()
        return 0

    def leaves_a_handler(argv: list[str]) -> int:
        logging.getLogger("mixtral-convert").addHandler(handler)
        return 0

    def leaves_a_signal_handler(argv: list[str]) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 0

    handler = logging.NullHandler()
    sigterm = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(helpers, "_THREAD_GRACE", 0.1)
    try:
        for main, said in [
            (leaves_a_thread, "left threads running: ['left-behind']"),
            (leaves_a_handler, "changed the tool's logger"),
            (leaves_a_signal_handler, "changed the signal handlers"),
        ]:
            with monkeypatch.context() as patched:
                patched.setattr(convert.cli, "main", main)
                with pytest.raises(AssertionError, match=re.escape(said)):
                    run_cli("inspect", ".")
    finally:
        release.set()
        logging.getLogger("mixtral-convert").removeHandler(handler)
        signal.signal(signal.SIGTERM, sigterm)


def test_missing_and_extra_tensors_are_named(sample: Path, tmp_path: Path) -> None:
    import torch

    weights = torch.load(sample / "consolidated.00.pth", weights_only=True)
    del weights["layers.1.attention.wk.weight"]
    weights["layers.1.attention.wx.weight"] = weights["norm.weight"].clone()
    torch.save(weights, sample / "consolidated.00.pth")
    line = assert_one_line_error(run_cli("convert", sample, tmp_path / "out", "--to", "hf", check=False))
    assert "layers.1.attention.wx.weight" in line and "unexpected tensor" in line and "1 more problems" in line
    report = run_cli("inspect", sample, check=False)
    assert report.returncode == 1
    assert "tensor layers.1.attention.wk.weight: tensor is missing" in report.stdout


def test_params_disagreeing_with_tensors(sample: Path, tmp_path: Path) -> None:
    params = json.loads((sample / "params.json").read_text())
    params["n_kv_heads"] = 4
    (sample / "params.json").write_text(json.dumps(params))
    assert_one_line_error(
        run_cli("convert", sample, tmp_path / "out", "--to", "hf", check=False),
        "tensor layers.0.attention.wk.weight",
        "shape [32, 64] does not match [64, 64]",
    )


def test_split_parts_in_numeric_order_and_gaps(sample: Path, tmp_path: Path) -> None:
    data = (sample / "consolidated.00.pth").read_bytes()
    parts = tmp_path / "parts"
    shutil.copytree(sample, parts)
    (parts / "consolidated.00.pth").unlink()
    bounds = [len(data) * i // 12 for i in range(13)]
    for i in range(12):
        (parts / f"consolidated.00.pth-split{i}").write_bytes(data[bounds[i] : bounds[i + 1]])
    run_cli("convert", parts, tmp_path / "a", "--to", "hf")
    run_cli("convert", sample, tmp_path / "b", "--to", "hf")
    for shard in (tmp_path / "b").glob("model-*.safetensors"):
        assert (tmp_path / "a" / shard.name).read_bytes() == shard.read_bytes()
    (parts / "consolidated.00.pth-split7").unlink()
    assert_one_line_error(run_cli("inspect", parts, check=False), "-split7 is missing")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (shutil.copyfile, (__file__, str(self.marker)))


def test_pickle_outside_the_allow_list_is_refused_and_never_runs(sample: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    checkpoint = sample / "consolidated.00.pth"
    with zipfile.ZipFile(checkpoint) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    pkl = next(name for name in entries if name.endswith("/data.pkl"))
    entries[pkl] = pickle.dumps({"tok_embeddings.weight": _Payload(marker)}, protocol=2)
    with zipfile.ZipFile(checkpoint, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    result = run_cli("convert", sample, tmp_path / "out", "--to", "hf", check=False)
    assert_one_line_error(result, str(checkpoint), "global shutil.copyfile is not on the allow-list")
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_inspect_recognises_every_layout(sample: Path, tmp_path: Path) -> None:
    for target in ("hf", "mistral", "megablocks", "torrent"):
        run_cli("convert", sample, tmp_path / target, "--to", target)
        report = json.loads(run_cli("inspect", tmp_path / target, "--json").stdout)
        assert report["layout"] == target
        assert report["problems"] == []
        assert report["params"]["vocab_size"] == 1003 and report["dtypes"] == {"BF16": report["tensors"]}


def test_convert_and_verify_do_not_import_torch() -> None:
    """Importing torch costs about a second a run, a quarter of copying a 1-layer model here; the tool needs it
    nowhere (tests/test_sample.py: not even `sample`), so it must not creep back into the conversion path."""
    code = "import sys, convert.cli, convert.run.writer, convert.verify.folder; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


# What a conversion loads before its first byte moves: the containers of its source and target only, no progress
# bar it does not show (tqdm brings importlib.metadata and email), and no subprocess (ctypes.util.find_library
# ran `ldconfig -p` to find the C library the interpreter already runs on).
NOT_FOR_HF_OR_MLX = (
    "gguf", "yaml", "convert.containers.gguf.container", "convert.verify.folder", "tqdm", "importlib.metadata",
    "subprocess", "ctypes.util",
)  # fmt: skip


@pytest.mark.parametrize("target", ["hf", "mlx"])
def test_a_conversion_loads_only_its_own_containers(sample: Path, tmp_path: Path, target: str) -> None:
    """--outtype's values belong to each container, and asking every one for them imported gguf-py (with yaml)
    into every conversion, a tenth of a second on a cold cache; verify's lanes are verify's. In a fresh
    interpreter, as the console script runs (without a terminal: no progress bar)."""
    probe = (
        "import sys\n"
        "from convert.cli import main\n"
        "code = main(['convert', *sys.argv[1:], '--no-progress'])\n"
        f"print('loaded', sorted(m for m in {NOT_FOR_HF_OR_MLX!r} if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(sample), str(tmp_path / "out"), "--to", target],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loaded []" in done.stdout, done.stdout


def test_help_lists_what_each_target_takes_and_planning_refuses_the_rest(sample: Path, tmp_path: Path) -> None:
    shown = "".join(run_cli("convert", "--help").stdout.split())  # argparse wraps anywhere in a long word
    assert "--togguf(f32|f16|bf16|q8_0|" in shown and "|q4_k_m|" in shown and "--tomlx(bf16|f16|f32|q4|q8)" in shown
    assert "[--group-size{32,64,128}]" in shown and "--outtype{bf16,f16,f32,q3_k_l," in shown
    for words, fragment in [
        (["--to", "mlx", "--outtype", "q5"], "--outtype q5: --to mlx takes bf16, f16, f32, q4, q8 (with --group-size:"),
        (["--to", "mlx", "--outtype", "q4", "--group-size", "48"], "--outtype q4-g48: --to mlx takes"),
        (["--to", "gguf", "--outtype", "q4"], "--outtype q4: --to gguf takes f32, f16, bf16, q8_0"),
        (["--to", "hf", "--outtype", "q4"], "--outtype q4: --to hf keeps the source's element types"),
    ]:
        result = run_cli("convert", sample, tmp_path / "out", *words, "--dry-run", check=False)
        assert result.returncode == 2
        assert_one_line_error(result, fragment)
