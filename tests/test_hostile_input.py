"""Issue 12's regression corpus, end to end through the command line: every case builds its bad input, and checks
the exit status, the ONE line on stderr (with no control character in it), and the child's peak RSS and run time.

- names from files that hold line breaks or other control characters (finding 4);
- parameters implying millions of tensors, FIFOs, devices and oversized JSON files (findings 5, 6);
- folders two loaders would read differently (finding 7);
- verify against manifest.json and --against with other shapes, and --json that is always JSON (findings 8, 9).

The torch zip cases of the issue (duplicate entries, CRC-32, storages typed twice, pickle memory) are elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import helpers
import pytest
from helpers import run_cli
from pickle_ops import glob, uni
from safetensors.torch import load_file, save_file
from test_faults import CHECKPOINT, PKL, archive_entries, read_safetensors, safetensors_bytes, write_archive

pytestmark = pytest.mark.e2e

PEAK_RSS_MIB = 512  # the bound of the issue, for every bad input
TIME_LIMIT = 30  # seconds; each case takes one or two (a hang or a runaway loop shows as a failure, not a stall)
GUARD_AS = 4 * 2**30  # address space for the child: a runaway allocation fails there, not on the shared machine
FORGED = "mixtral-convert: ok, converted"  # what a raw newline would let a file print as a line of its own
INDEX = "model.safetensors.index.json"
SHARD2 = "model-00002-of-00005.safetensors"


def run_measured(*args: object, timeout: float = TIME_LIMIT) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """`python -m convert ARGS` under the address-space guard: the result (returncode None when killed at the
    time limit), the converter's own peak RSS in MiB and its wall time."""
    measured = helpers.run_measured(*args, timeout=timeout, address_space=GUARD_AS)
    return measured.result, measured.peak_mib, measured.seconds


def bounded_error(*args: object, fragments: tuple[str, ...] = (), code: int = 2) -> str:
    """Run; assert the exit code, exactly one stderr line (an error line holding every fragment, with only
    printable characters: no raw newline, no escape or bidi control), peak RSS and time within bounds."""
    result, peak, seconds = run_measured(*args)
    problems = []
    if result.returncode is None:
        problems.append(f"no answer within {TIME_LIMIT} s (killed)")
    elif result.returncode != code:
        problems.append(f"exit {result.returncode}, expected {code}")
    lines = result.stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith("mixtral-convert: error: "):
        problems.append(f"stderr is not one error line: {result.stderr[-3000:]!r}")
    elif not lines[0].isprintable():
        problems.append(f"the error line holds control characters: {lines[0]!r}")
    for fragment in fragments:
        if fragment not in result.stderr:
            problems.append(f"{fragment!r} is not in the line")
    if peak > PEAK_RSS_MIB:
        problems.append(f"peak RSS {peak} MiB is over {PEAK_RSS_MIB} MiB")
    assert not problems, "\n".join(problems) + f"\nstdout: {result.stdout[-1000:]}"
    print(f"{peak} MiB, {seconds:.1f} s: {lines[0]}")  # -rP shows each case's line and cost
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in torrent sample and its hf (5 shards) and mistral conversions; tests damage copies."""
    root = tmp_path_factory.mktemp("hostile")
    run_cli("sample", root / "torrent")
    run_cli("convert", root / "torrent", root / "hf", "--to", "hf", "--max-shard-size", "150KB")
    run_cli("convert", root / "torrent", root / "mistral", "--to", "mistral")
    return root


def copy(base: Path, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base / layout, tmp_path / layout))


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "num_experts":
            data["moe"]["num_experts"] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _rename_in_header(path: Path, old: str, new: str) -> None:
    header, data = read_safetensors(path)
    header = {new if name == old else name: entry for name, entry in header.items()}
    path.write_bytes(safetensors_bytes(header, data))


# ---------------------------------------------------------------------------------------------------------------
# Finding 4: names from files are escaped, so every error is one line


def test_newline_in_a_safetensors_tensor_name(base: Path, tmp_path: Path) -> None:
    src = copy(base, "mistral", tmp_path)
    name = f"layers.0.attention.wk.weight\n{FORGED}"
    _rename_in_header(src / "consolidated.safetensors", "layers.0.attention.wk.weight", name)
    line = bounded_error("convert", src, tmp_path / "out", "--to", "hf", fragments=(repr(name),))
    assert FORGED in line  # inside the one line, escaped, not a line of its own
    # --json output parses and holds the exact name where it is a field, the escaped one inside lines
    verify = run_cli("verify", src, "--json", check=False)
    report = json.loads(verify.stdout)
    assert name in {r["tensor"] for r in report["results"]}, report
    inspect = run_cli("inspect", src, "--json", check=False)
    assert any(repr(name) in problem for problem in json.loads(inspect.stdout)["problems"])
    text = run_cli("verify", src, check=False)
    assert text.returncode == 1 and all(line.isprintable() for line in text.stdout.splitlines())


def test_control_characters_in_a_pickle_globals_module_name(base: Path, tmp_path: Path) -> None:
    """GLOBAL takes module and name from a line each, which may hold any character but a newline: a carriage
    return and an erase-line escape would print the forged text over the real error. (STACK_GLOBAL, which takes
    them from strings that may hold newlines too, is refused as an opcode: torch.load does not execute it.)"""
    src = copy(base, "torrent", tmp_path)
    entries = archive_entries(src / CHECKPOINT)
    module = f"os\r{FORGED}\x1b[K"
    entries[PKL] = b"\x80\x02}(" + uni("w") + glob(module, "system") + b"(" + uni("true") + b"tRu."
    write_archive(src / CHECKPOINT, entries)
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", fragments=(str(src / CHECKPOINT), "\\r" + FORGED))


def test_newline_in_a_shard_name_from_the_index(base: Path, tmp_path: Path) -> None:
    """The index names a shard whose name holds a newline, and it places one of that shard's tensors elsewhere."""
    src = copy(base, "hf", tmp_path)
    odd = f"model-00002\n{FORGED}.safetensors"
    (src / SHARD2).rename(src / odd)
    index = json.loads((src / INDEX).read_text())
    moved = sorted(n for n, shard in index["weight_map"].items() if shard == SHARD2)
    for name in moved:
        index["weight_map"][name] = odd
    index["weight_map"][moved[0]] = "model-00003-of-00005.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    bounded_error("convert", src, tmp_path / "out", "--to", "mistral", fragments=(f"tensor {moved[0]}", repr(odd)))
    verify = run_cli("verify", src, "--json", check=False)
    assert any(repr(odd) in (r["problem"] or "") for r in json.loads(verify.stdout)["results"])


def test_control_characters_in_a_file_name_in_the_folder(base: Path, tmp_path: Path) -> None:
    """An unlisted shard whose name holds a carriage return and a right-to-left override."""
    src = copy(base, "hf", tmp_path)
    odd = "model-00006-of-00005\r\u202e.safetensors"
    shutil.copy(src / SHARD2, src / odd)
    bounded_error("convert", src, tmp_path / "out", "--to", "mistral", fragments=("not listed", repr(odd)))


def test_log_warnings_are_one_line(base: Path, tmp_path: Path) -> None:
    """A warning naming a file: a tensor of another dtype is kept as it is, with a warning naming its file,
    here in a folder whose name holds a newline; the warning stays on one line."""
    src = Path(shutil.copytree(base / "mistral", tmp_path / f"odd\n{FORGED}"))
    tensors = load_file(src / "consolidated.safetensors")
    tensors["norm.weight"] = tensors["norm.weight"].float()
    save_file(tensors, src / "consolidated.safetensors")
    result = run_cli("convert", src, tmp_path / "out", "--to", "torrent", "--dry-run")
    warnings = result.stderr.splitlines()  # the dtype warning, on its own line (the sample has a tokenizer)
    assert len(warnings) == 1 and "unlike the rest" in warnings[0], result.stderr
    assert all(w.startswith("mixtral-convert: warning: ") and w.isprintable() for w in warnings), result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Findings 5 and 6: bounded memory and time; regular files only; JSON size limits


PARAMS_CASES = {
    "n_layers 1,000,000": ("torrent", "params.json", {"n_layers": 10**6}, ("1,000,000 layers", "holds 41")),
    "num_experts 10,000,000": ("torrent", "params.json", {"num_experts": 10**7}, ("10,000,000 experts",)),
    "n_layers 100,000": ("torrent", "params.json", {"n_layers": 100_000}, ("100,000 layers",)),
    "n_layers 1,000,000 megablocks (stacked experts)": ("megablocks", "params.json", {"num_hidden_layers": 10**6}, ()),
    "num_local_experts 10**9 megablocks (stacked experts)": (
        "megablocks",
        "params.json",
        {"num_local_experts": 10**9},
        ("does not match",),
    ),
    "dim 10**12": ("torrent", "params.json", {"dim": 10**12, "head_dim": 16}, ("does not match",)),
    "hidden_dim 10**15": ("torrent", "params.json", {"hidden_dim": 10**15}, ("does not match",)),
    "num_hidden_layers 1,000,000 in config.json": ("hf", "config.json", {"num_hidden_layers": 10**6}, ()),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_parameters_implying_too_much_are_refused_cheaply(base: Path, tmp_path: Path, case: str) -> None:
    layout, file, changes, fragments = PARAMS_CASES[case]
    if layout == "megablocks" and not (base / "megablocks").exists():
        run_cli("convert", base / "torrent", base / "megablocks", "--to", "megablocks")
    src = copy(base, layout, tmp_path)
    _edit_json(src / file, **changes)
    target = "mistral" if layout == "hf" else "hf"
    bounded_error("convert", src, tmp_path / "out", "--to", target, "--dry-run", fragments=(file, *fragments))


def test_verify_json_on_a_config_with_a_million_layers(base: Path, tmp_path: Path) -> None:
    src = copy(base, "hf", tmp_path)
    _edit_json(src / "config.json", num_hidden_layers=10**6)
    result, peak, _ = run_measured("verify", src, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    failed = [r for r in report["results"] if not r["ok"]]
    assert any(r["check"] == "structure" and "1,000,000 layers" in r["problem"] for r in failed), failed
    assert peak <= PEAK_RSS_MIB


def test_params_json_that_is_a_fifo(base: Path, tmp_path: Path) -> None:
    src = copy(base, "torrent", tmp_path)
    (src / "params.json").unlink()
    os.mkfifo(src / "params.json")
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", "--dry-run", fragments=("params.json", "a FIFO"))


def test_tokenizer_model_that_is_a_fifo(base: Path, tmp_path: Path) -> None:
    """Not "no tokenizer.model" (a warning, and the output would silently lack it): refused by name."""
    src = copy(base, "torrent", tmp_path)
    (src / "tokenizer.model").unlink(missing_ok=True)
    os.mkfifo(src / "tokenizer.model")
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", fragments=("tokenizer.model", "a FIFO"))


@pytest.mark.parametrize("file", ["params.json", "consolidated.safetensors"])
def test_symlink_to_dev_zero(base: Path, tmp_path: Path, file: str) -> None:
    src = copy(base, "torrent" if file == "params.json" else "mistral", tmp_path)
    (src / file).unlink()
    (src / file).symlink_to("/dev/zero")
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", "--dry-run", fragments=(file, "character device"))


def test_symlinks_to_regular_files_are_followed(base: Path, tmp_path: Path) -> None:
    """As in the Hugging Face cache, where every file of a snapshot links to ../../blobs/<hash>."""
    blobs = Path(shutil.copytree(base / "hf", tmp_path / "blobs"))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in blobs.iterdir():
        (snapshot / path.name).symlink_to(path)
    run_cli("convert", snapshot, tmp_path / "out", "--to", "mistral", "--dry-run")


@pytest.mark.parametrize(
    ("layout", "file", "limit"),
    [("torrent", "params.json", "1,048,576"), ("hf", "config.json", "1,048,576"), ("hf", INDEX, "4,194,304")],
)
def test_oversized_json_is_refused_before_parse(base: Path, tmp_path: Path, layout: str, file: str, limit: str) -> None:
    """Valid JSON padded with whitespace past the limit: refused by size, whatever it holds."""
    src = copy(base, layout, tmp_path)
    text = (src / file).read_text()
    (src / file).write_text(text + " " * (int(limit.replace(",", "")) + 1 - len(text)))
    target = "mistral" if layout == "hf" else "hf"
    bounded_error("convert", src, tmp_path / "out", "--to", target, "--dry-run", fragments=(file, f"over the {limit}"))


def test_safetensors_header_of_90_mb_is_refused_before_parse(base: Path, tmp_path: Path) -> None:
    """A header within safetensors' own 100 MB limit, of 1.3 million one-byte tensors: parsed, it would cost over
    a GiB; refused by its length before parsing."""
    src = copy(base, "mistral", tmp_path)
    count = 1_300_000
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(count))
    header = ("{" + entries + "}").encode()
    header += b" " * (-len(header) % 8)
    assert 80 * 10**6 < len(header) < 100 * 10**6
    (src / "consolidated.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(count))
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", "--dry-run", fragments=("exceeds 16777216 bytes",))


# ---------------------------------------------------------------------------------------------------------------
# Finding 7: a folder two loaders would read differently


def test_hf_index_beside_a_model_safetensors(base: Path, tmp_path: Path) -> None:
    """transformers' from_pretrained takes model.safetensors before the index (modeling_utils,
    _get_resolved_checkpoint_files); this tool reads the index's shards. Refused, naming both."""
    src = copy(base, "hf", tmp_path)
    shutil.copy(src / SHARD2, src / "model.safetensors")
    fragments = ("model.safetensors.index.json and model.safetensors", "from_pretrained loads model.safetensors")
    bounded_error("convert", src, tmp_path / "out", "--to", "mistral", fragments=fragments)
    inspect = run_cli("inspect", src, "--json", check=False)
    assert inspect.returncode == 1
    assert any("from_pretrained loads model.safetensors" in p for p in json.loads(inspect.stdout)["problems"])


def test_config_json_pointing_transformers_elsewhere(base: Path, tmp_path: Path) -> None:
    src = copy(base, "hf", tmp_path)
    _edit_json(src / "config.json", transformers_weights=SHARD2)
    bounded_error("convert", src, tmp_path / "out", "--to", "mistral", fragments=("transformers_weights", SHARD2))


def test_whole_torrent_file_beside_its_split_parts(base: Path, tmp_path: Path) -> None:
    src = copy(base, "torrent", tmp_path)
    data = (src / CHECKPOINT).read_bytes()
    (src / f"{CHECKPOINT}-split0").write_bytes(data[: len(data) // 2])
    (src / f"{CHECKPOINT}-split1").write_bytes(bytes(len(data) - len(data) // 2))
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", fragments=("-split parts", "torch.load"))
    assert run_cli("inspect", src, check=False).returncode == 1


def test_mistral_safetensors_beside_a_torrent_file_with_from(base: Path, tmp_path: Path) -> None:
    """mistral-inference's Transformer.from_folder refuses a folder holding both; --from does not make it one."""
    src = copy(base, "mistral", tmp_path)
    shutil.copy(base / "torrent" / CHECKPOINT, src / CHECKPOINT)
    fragments = ("consolidated.safetensors and consolidated.00.pth", "mistral-inference refuses")
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", "--from", "mistral", fragments=fragments)
    bounded_error("convert", src, tmp_path / "out", "--to", "hf", fragments=("several layouts", "mistral-inference"))


# ---------------------------------------------------------------------------------------------------------------
# Findings 8 and 9: verify checks manifest.json, --against compares shapes; --json is always JSON


def _rewrite_sums_line(folder: Path, name: str) -> None:
    import hashlib

    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    rewritten = [f"{digest}  {name}" if line.endswith(f"  {name}") else line for line in lines]
    (folder / "SHA256SUMS").write_text("".join(line + "\n" for line in rewritten))


def test_tampered_shard_with_a_rewritten_sums_line(base: Path, tmp_path: Path) -> None:
    folder = copy(base, "hf", tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["tensors"] if e["file"] == SHARD2 and e["offsets"][1] - e["offsets"][0] > 64)
    with open(folder / SHARD2, "r+b") as handle:
        handle.seek(entry["offsets"][0] + 17)
        byte = handle.read(1)
        handle.seek(entry["offsets"][0] + 17)
        handle.write(bytes([byte[0] ^ 0x40]))
    _rewrite_sums_line(folder, SHARD2)
    result, peak, _ = run_measured("verify", folder)
    assert result.returncode == 1, result.stdout
    expected = f"FAILED manifest: {folder / SHARD2}: tensor {entry['name']}: blake3 of bytes"
    assert expected in result.stdout, result.stdout
    assert peak <= PEAK_RSS_MIB


def test_renamed_tensors_with_a_rewritten_sums_line(base: Path, tmp_path: Path) -> None:
    """Two tensors of one shape swap names in the header: every byte range hashes as the manifest says, the
    structure is complete, and only the manifest's names and ranges tell."""
    folder = copy(base, "hf", tmp_path)
    header, data = read_safetensors(folder / SHARD2)
    names = sorted(n for n in header if n.endswith("w1.weight"))[:2]
    assert len(names) == 2, names
    header[names[0]], header[names[1]] = header[names[1]], header[names[0]]
    (folder / SHARD2).write_bytes(safetensors_bytes(header, data))
    _rewrite_sums_line(folder, SHARD2)
    result = run_cli("verify", folder, check=False)
    assert result.returncode == 1 and f"FAILED manifest: {folder / SHARD2}: tensor {names[0]}: " in result.stdout


def test_against_a_source_with_a_smaller_vocabulary(base: Path, tmp_path: Path) -> None:
    """The output (vocab 1003) begins with the bytes of a vocab-1000 source's embedding and output: equal prefixes
    are no proof; the shapes differ."""
    src = copy(base, "mistral", tmp_path)
    tensors = load_file(src / "consolidated.safetensors")
    for name in ("tok_embeddings.weight", "output.weight"):
        tensors[name] = tensors[name][:1000].clone()
    save_file(tensors, src / "consolidated.safetensors")
    _edit_json(src / "params.json", vocab_size=1000)
    (src / "tokenizer.model").unlink(missing_ok=True)
    for name in ("SHA256SUMS", "manifest.json"):
        (src / name).unlink()
    result = run_cli("verify", base / "hf", "--against", src, check=False)
    assert result.returncode == 1, result.stdout
    assert "tensor model.embed_tokens.weight: is BF16 [1003, 64]" in result.stdout, result.stdout
    assert "the converted source is BF16 [1000, 64]" in result.stdout


def test_verify_json_for_a_missing_folder(tmp_path: Path) -> None:
    result, _, _ = run_measured("verify", tmp_path / "nope", "--json")
    assert result.returncode == 2, result
    report = json.loads(result.stdout)
    assert report["ok"] is False and "no such folder" in report["error"]["line"] and report["error"]["exit"] == 2
