"""Bad input and faults, end to end through the command line.

Every case must: exit non-zero with ONE line on stderr (`mixtral-convert: error: ...`) naming the file, the tensor
(where there is one) and the rule, with no traceback; run nothing from the input (pickle payloads would create a
marker file); leave the source folder exactly as it was (names, sizes, mtimes, sha256); and leave no output that
looks complete (no index for --to hf, no params.json for the Mistral targets; ideally no output folder at all, or
only .partial files). `refused` below asserts all four.

Cases already covered elsewhere are not repeated: DST equal to, inside or around SRC (test_cli), SIGINT/SIGTERM
(test_interrupt), the reader's rules in-process (test_safetensors_format), a gap in the middle of split parts
(test_cli, via inspect), missing+extra torrent tensors together and n_kv_heads against wk for params.json
(test_cli), resume refusals (test_resume).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_one_line_error, run_cli, run_measured, tmpfs
from pickle_ops import call, glob, num, tup, uni
from safetensors.torch import load_file, save_file
from test_tokenizer import train as train_tokenizer

from convert.containers.torchzip.reader import read_torch_index
from convert.fileio.streams import ByteStream
from convert.run.resume import JOURNAL

pytestmark = pytest.mark.e2e

SHARD_SIZE = "150KB"  # the sample then has 5 HF shards
INDEX = "model.safetensors.index.json"
COMPLETION = {"hf": INDEX, "mistral": "params.json", "torrent": "params.json", "megablocks": "params.json"}
CHECKPOINT = "consolidated.00.pth"
PKL = "consolidated.00/data.pkl"  # the sample's torch zip holds consolidated.00/data.pkl, consolidated.00/data/<key>
SHARD2 = "model-00002-of-00005.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# The four properties


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under folder: relative name -> (size, mtime_ns, sha256); directories by name."""
    state: dict[str, tuple[int, int, str]] = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        state[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, digest)
    return state


def assert_contract(
    result: subprocess.CompletedProcess[str],
    src: Path,
    source_before: dict,
    dst: Path,
    target: str,
    *fragments: str,
    marker: Path | None = None,
    dst_before: dict | None = None,
) -> str:
    """(1) non-zero exit, stderr is exactly one error line with every fragment and no traceback; (2) the payload's
    marker file does not exist; (3) the source is byte-for-byte and mtime-for-mtime unchanged; (4) no completion
    marker in dst, and dst is absent or holds only .partial files (or, given dst_before, is exactly as it was).
    Every property is checked and all violations are reported together."""
    problems = []
    line = ""
    if result.returncode == 0:
        problems.append(f"(1) exit 0: the input was accepted; stderr: {result.stderr.strip()[-2000:]!r}")
    else:
        try:
            line = assert_one_line_error(result, *fragments)
            if result.stderr.strip().splitlines() != [line]:
                problems.append(f"(1) more than the one error line on stderr:\n{result.stderr}")
        except AssertionError as exc:
            problems.append(f"(1) exit {result.returncode}, {str(exc)[-3000:]}")
    if marker is not None and marker.exists():
        problems.append(f"(2) the pickle payload ran: {marker} exists")
    if snapshot(src) != source_before:
        problems.append("(3) the source folder was modified")
    if (dst / COMPLETION[target]).exists():
        problems.append(f"(4) {dst} looks complete: {COMPLETION[target]} was written")
    if dst_before is not None:
        if snapshot(dst) != dst_before:
            problems.append("(4) the files already in the output folder were touched")
    elif dst.exists():
        leftovers = sorted(p.name for p in dst.iterdir())
        # what a run that stopped mid-write leaves: files named .partial and the journal --resume reads
        if not all(name.endswith(".partial") or name == ".mixtral-convert-journal" for name in leftovers):
            problems.append(f"(4) {dst} holds {leftovers}")
    assert not problems, "\n".join(problems)
    print(line)  # -rP shows each case's message
    return line


def refused(
    src: Path,
    dst: Path,
    *fragments: str,
    target: str = "hf",
    args: tuple[str, ...] = (),
    marker: Path | None = None,
) -> str:
    """Convert src into dst and assert the four properties; returns the error line."""
    before = snapshot(src)
    result = run_cli("convert", src, dst, "--to", target, *args, check=False)
    return assert_contract(result, src, before, dst, target, *fragments, marker=marker)


# ---------------------------------------------------------------------------------------------------------------
# Sources


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pristine sources: the built-in torrent sample (with a tokenizer that converts without warnings), its hf
    conversion in 5 shards and its mistral conversion. Tests damage copies."""
    root = tmp_path_factory.mktemp("faults")
    run_cli("sample", root / "torrent")
    # A real SentencePiece model with the sample's vocabulary: any other tokenizer.model is a warning of its own.
    (root / "torrent" / "tokenizer.model").write_bytes(train_tokenizer(vocab_size=1003))
    run_cli("convert", root / "torrent", root / "hf", "--to", "hf", "--max-shard-size", SHARD_SIZE)
    run_cli("convert", root / "torrent", root / "mistral", "--to", "mistral")
    return root


def copy_source(base: Path, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base / layout, tmp_path / "src"))


# ---------------------------------------------------------------------------------------------------------------
# Pickles in a torch zip


def _one_entry_state(value: bytes) -> bytes:
    """A protocol-2 pickle of {"tok_embeddings.weight": <value>}."""
    return b"\x80\x02}(" + uni("tok_embeddings.weight") + value + b"u."


class _Capture(pickle.Unpickler):
    """Reads OUR OWN sample's data.pkl into plain tuples (nothing is imported from the file)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_rest: (storage, offset, size, stride)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the sample")

    def persistent_load(self, pid: object) -> object:
        return pid


def captured_state(pkl: bytes) -> dict[str, list]:
    """name -> [pid tuple ('storage', class name, key, location, numel), offset, size, stride]."""
    state = _Capture(io.BytesIO(pkl)).load()
    return {name: [list(pid), offset, size, stride] for name, (pid, offset, size, stride) in state.items()}


def state_pickle(state: dict[str, list]) -> bytes:
    """The pickle torch.save would write for these tensors (protocol 2, _rebuild_tensor_v2, persistent ids)."""
    out = [b"\x80\x02}("]
    for name, (pid, offset, size, stride) in state.items():
        _, cls, key, location, numel = pid
        persistent = b"(" + uni("storage") + glob("torch", cls) + uni(key) + uni(location) + num(numel) + b"tQ"
        args = persistent + num(offset) + tup(size) + tup(stride) + b"\x89" + call("collections", "OrderedDict")
        out.append(uni(name) + glob("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR")
    out.append(b"u.")
    return b"".join(out)


def archive_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_archive(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_rewritten_archive_is_still_accepted(base: Path, tmp_path: Path) -> None:
    """Control for the pickle cases: the sample rewritten by zipfile with a re-emitted data.pkl indexes fine, so
    each refusal below is caused by its one damage."""
    path = tmp_path / CHECKPOINT
    entries = archive_entries(base / "torrent" / CHECKPOINT)
    entries[PKL] = state_pickle(captured_state(entries[PKL]))
    write_archive(path, entries)
    stream = ByteStream([path])
    try:
        assert len(read_torch_index(stream)) == 41
    finally:
        stream.close()


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """case -> (data.pkl bytes that would create marker if executed, the global the refusal must name)."""
    create = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (_one_entry_state(call("os", "system", uni(f"touch {marker}"))), "os.system"),
        "builtins.eval": (_one_entry_state(call("builtins", "eval", uni(create))), "builtins.eval"),
        "subprocess.Popen": (
            _one_entry_state(call("subprocess", "Popen", b"](" + uni("touch") + uni(str(marker)) + b"e")),
            "subprocess.Popen",
        ),
        "nested reduce of builtins.exec in a tuple": (
            _one_entry_state(b"(" + num(1) + b"(" + call("builtins", "exec", uni(create)) + b"tt"),
            "builtins.exec",
        ),
        # torch.load executes no STACK_GLOBAL (torch.save writes protocol 2): refused as an opcode, before any name
        "os.system via STACK_GLOBAL (protocol 4)": (
            b"\x80\x04}(" + uni("w") + uni("os") + uni("system") + b"\x93(" + uni(f"touch {marker}") + b"tRu.",
            "opcode STACK_GLOBAL is not one torch.load executes",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "nested reduce of builtins.exec in a tuple",
        "os.system via STACK_GLOBAL (protocol 4)",
    ],
)
def test_pickle_global_outside_the_allow_list(base: Path, tmp_path: Path, case: str) -> None:
    src = copy_source(base, "torrent", tmp_path)
    marker = tmp_path / "payload-ran"
    payload, name = _payloads(marker)[case]
    entries = archive_entries(src / CHECKPOINT)
    entries[PKL] = payload
    write_archive(src / CHECKPOINT, entries)
    rule = name if name.startswith("opcode") else f"global {name} is not on the allow-list"
    refused(src, tmp_path / "out", str(src / CHECKPOINT), rule, marker=marker)


@pytest.mark.parametrize("dtype", ["evil", "F16"], ids=["to-an-unknown-dtype", "bf16-storage-read-as-f16"])
def test_pickle_build_on_an_allow_listed_global(base: Path, tmp_path: Path, dtype: str) -> None:
    """BUILD on the allow-listed torch.BFloat16Storage stand-in rewrites its attributes: the allow-list's shared
    object is mutated by the file (for the rest of the process: later megablocks files too). It must be refused,
    not crash (unknown dtype) and not silently reinterpret the bytes (F16)."""
    src = copy_source(base, "torrent", tmp_path)
    entries = archive_entries(src / CHECKPOINT)
    # BUILD, leaving the stand-in on the stack under the real pickle (no POP: torch.load refuses that opcode)
    build = glob("torch", "BFloat16Storage") + b"}" + uni("dtype") + uni(dtype) + b"sb"
    entries[PKL] = b"\x80\x02" + build + entries[PKL][2:]
    write_archive(src / CHECKPOINT, entries)
    refused(src, tmp_path / "out", str(src / CHECKPOINT), "data.pkl refused: BUILD on StorageType is not allowed")


def test_pickle_memo_index_far_beyond_the_pickle(base: Path, tmp_path: Path) -> None:
    """LONG_BINPUT with index 2**26 in an otherwise real data.pkl: the C unpickler grows its memo array to fit the
    index, so 5 bytes cost ~1 GiB (2**30 costs ~16 GiB: a few bytes can exhaust the machine). torch never writes such
    an index; the pickle must be refused, and without that allocation."""
    src = copy_source(base, "torrent", tmp_path)
    entries = archive_entries(src / CHECKPOINT)
    assert entries[PKL][:3] == b"\x80\x02}"
    entries[PKL] = entries[PKL][:3] + b"r" + struct.pack("<I", 2**26) + entries[PKL][3:]  # memo[2**26] = the dict
    write_archive(src / CHECKPOINT, entries)
    dst = tmp_path / "out"
    before = snapshot(src)
    result, peak_mib = run_cli_measured("convert", src, dst, "--to", "hf")
    problems = []
    try:
        assert_contract(result, src, before, dst, "hf", str(src / CHECKPOINT), "data.pkl")
    except AssertionError as exc:
        problems.append(str(exc))
    if peak_mib > 700:
        problems.append(f"peak RSS {peak_mib} MiB: the memo index was allocated")
    assert not problems, "\n".join(problems)


def run_cli_measured(*args: object) -> tuple[subprocess.CompletedProcess[str], int]:
    """run_cli(..., check=False), plus the converter's own peak RSS in MiB (helpers.run_measured)."""
    measured = run_measured(*args)
    return measured.result, measured.peak_mib


def _damage_zip(src: Path, case: str) -> str:
    """Damage src/consolidated.00.pth; returns the rule fragment the refusal must carry."""
    path = src / CHECKPOINT
    entries = archive_entries(path)
    state = captured_state(entries[PKL])
    first_key = state["tok_embeddings.weight"][0][2]
    record = f"consolidated.00/data/{first_key}"
    if case == "storage claimed far larger than its record":
        state["tok_embeddings.weight"][0][4] = 2**40
        entries[PKL] = state_pickle(state)
        write_archive(path, entries)
        return f"storage {first_key} claims {2**41} bytes but its record has {len(entries[record])}"
    if case == "record shorter than its storage":
        entries[record] = entries[record][: len(entries[record]) // 2]
        write_archive(path, entries)
        return f"storage {first_key} claims"
    if case == "deflated records":
        write_archive(path, entries, zipfile.ZIP_DEFLATED)
        return "is compressed"
    if case == "data.pkl random bytes":
        entries[PKL] = random.Random(7).randbytes(len(entries[PKL]))
        write_archive(path, entries)
        return "data.pkl"
    if case == "data.pkl empty":
        entries[PKL] = b""
        write_archive(path, entries)
        return "data.pkl"
    if case == "not a zip at all":
        path.write_bytes(random.Random(8).randbytes(4096))
        return "not a readable zip archive"
    # Byte patches of the archive as torch.save wrote it.
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        names = [info.filename for info in archive.infolist()]
    victim = f"consolidated.00/data/{state['norm.weight'][0][2]}"
    local_name_at = infos[victim].header_offset + 30
    if case == "local header name renamed (storage record)":
        assert data[local_name_at : local_name_at + len(victim)] == victim.encode()
        data[local_name_at + len(victim) - 1] = ord("X") if victim[-1] != "X" else ord("Y")
        path.write_bytes(data)
        return f"local header of {victim} disagrees with the central directory"
    if case == "local header name renamed (data.pkl)":
        at = infos[PKL].header_offset + 30
        assert data[at : at + len(PKL)] == PKL.encode()
        data[at + len(PKL) - 1] = ord("X")  # consolidated.00/data.pkX
        path.write_bytes(data)
        return "data.pkl"
    entry_at = _central_entry(bytes(data), victim)
    previous = infos[names[names.index(victim) - 1]].header_offset
    if case == "central directory offset points at another record":
        data[entry_at + 42 : entry_at + 46] = struct.pack("<I", previous)
        path.write_bytes(data)
        return f"local header of {victim} disagrees with the central directory"
    if case == "central directory claims zip version 12.3":
        data[entry_at + 6] = 123  # version needed to extract: zipfile raises NotImplementedError
        path.write_bytes(data)
        return "zip"
    if case == "central directory offset off by one":
        data[entry_at + 42 : entry_at + 46] = struct.pack("<I", infos[victim].header_offset + 1)
        path.write_bytes(data)
        return f"local header of {victim} disagrees with the central directory"
    raise AssertionError(case)


def _central_entry(data: bytes, name: str) -> int:
    """Offset of the central directory entry (signature PK\\1\\2) whose file name is name."""
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == name.encode():
            return at
        at = data.find(b"PK\x01\x02", at + 1)
    raise AssertionError(f"no central directory entry for {name}")


@pytest.mark.parametrize(
    "case",
    [
        "storage claimed far larger than its record",
        "record shorter than its storage",
        "deflated records",
        "data.pkl random bytes",
        "data.pkl empty",
        "not a zip at all",
        "local header name renamed (storage record)",
        "local header name renamed (data.pkl)",
        "central directory offset points at another record",
        "central directory offset off by one",
        "central directory claims zip version 12.3",
    ],
)
def test_broken_torch_zip(base: Path, tmp_path: Path, case: str) -> None:
    src = copy_source(base, "torrent", tmp_path)
    rule = _damage_zip(src, case)
    refused(src, tmp_path / "out", str(src / CHECKPOINT), rule)


# ---------------------------------------------------------------------------------------------------------------
# safetensors: as consolidated.safetensors of a mistral folder and as an hf shard


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _compact(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _shift(header: dict, name: str, delta: int) -> None:
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + delta, end + delta]


def _damage_safetensors(case: str, header: dict, data: bytes, x: str, y: str) -> tuple[bytes, list[str]]:
    """The damaged file and the fragments the refusal must carry; x and y are the last two tensors by offset."""
    y_begin, y_end = header[y]["data_offsets"]
    if case == "header length over 100,000,000":
        return safetensors_bytes(header, data, length=100_000_001), ["exceeds 16777216 bytes"]
    if case == "header not UTF-8":
        raw = _compact(header).replace(f'"{y}"'.encode(), b'"\xff' + y.encode()[1:] + b'"', 1)
        return safetensors_bytes(raw, data), ["not UTF-8"]
    if case == "header not JSON":
        return safetensors_bytes(_compact(header)[:-1] + b",", data), ["not valid JSON"]
    if case == "header not an object":
        raw = _compact(header)
        return safetensors_bytes(b"[" + b" " * (len(raw) - 2) + b"]", data), ["not a JSON object"]
    if case == "duplicate names":
        raw = _compact(header).replace(f'"{y}":'.encode(), f'"{x}":'.encode(), 1)
        return safetensors_bytes(raw, data), [x, "duplicate"]
    if case == "overlapping ranges":
        _shift(header, y, -2)
        return safetensors_bytes(header, data), [f"tensor {y}", "overlaps"]
    if case == "gap between ranges":
        _shift(header, y, 2)
        return safetensors_bytes(header, data + b"\0\0"), [f"tensor {y}", "gap"]
    if case == "range past the end of the file":
        header[y]["shape"][0] *= 2
        header[y]["data_offsets"] = [y_begin, y_end + (y_end - y_begin)]
        return safetensors_bytes(header, data), [f"tensor {y}"]
    if case == "truncated file":
        return safetensors_bytes(header, data[:-100]), ["truncated"]
    if case == "unknown dtype":
        header[y]["dtype"] = "Q7"
        return safetensors_bytes(header, data), [f"tensor {y}", "unknown dtype 'Q7'"]
    if case == "dtype not a string":
        header[y]["dtype"] = ["BF16"]
        return safetensors_bytes(header, data), [f"tensor {y}", "dtype"]
    if case == "shape product over 64 bits":
        header[y]["shape"] = [2**32, 2**32, 2]
        return safetensors_bytes(header, data), [f"tensor {y}", "needs"]
    if case == "shape product wrapping to the range mod 2**64":
        header[y]["shape"] = [2**63 + (y_end - y_begin) // 2]  # BF16: 2 * that = 2**64 + the true span
        return safetensors_bytes(header, data), [f"tensor {y}", "needs"]
    if case == "shape disagrees with range":
        header[y]["shape"][0] += 1
        return safetensors_bytes(header, data), [f"tensor {y}", "needs"]
    if case == "zero-size tensors reusing an offset":
        at = header[x]["data_offsets"][1]
        header["zero.a"] = {"dtype": "BF16", "shape": [0], "data_offsets": [at, at]}
        header["zero.b"] = {"dtype": "BF16", "shape": [0, 4], "data_offsets": [at, at]}
        return safetensors_bytes(header, data), ["tensor zero."]
    if case == "__metadata__ not a string-to-string map":
        header["__metadata__"] = {"format": 1}
        return safetensors_bytes(header, data), ["__metadata__ must map strings to strings"]
    if case == "deeply nested header JSON":
        raw = b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        return safetensors_bytes(raw, data), ["header"]
    raise AssertionError(case)


SAFETENSORS_CASES = [
    "header length over 100,000,000",
    "header not UTF-8",
    "header not JSON",
    "header not an object",
    "duplicate names",
    "overlapping ranges",
    "gap between ranges",
    "range past the end of the file",
    "truncated file",
    "unknown dtype",
    "dtype not a string",
    "shape product over 64 bits",
    "shape product wrapping to the range mod 2**64",
    "shape disagrees with range",
    "zero-size tensors reusing an offset",
    "__metadata__ not a string-to-string map",
    "deeply nested header JSON",
]


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
@pytest.mark.parametrize(
    ("layout", "file", "target"), [("mistral", "consolidated.safetensors", "hf"), ("hf", SHARD2, "mistral")]
)
def test_broken_safetensors(base: Path, tmp_path: Path, layout: str, file: str, target: str, case: str) -> None:
    src = copy_source(base, layout, tmp_path)
    path = src / file
    header, data = read_safetensors(path)
    x, y = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])[-2:]
    damaged, fragments = _damage_safetensors(case, header, data, x, y)
    path.write_bytes(damaged)
    # In an hf folder, tensors the index does not list are refused by the index check, which names the index and
    # the shard by name.
    named = path.name if layout == "hf" and case == "zero-size tensors reusing an offset" else str(path)
    line = refused(src, tmp_path / "out", named, *fragments, target=target)
    assert "None" not in line, f"the rule is not stated clearly: {line}"


# ---------------------------------------------------------------------------------------------------------------
# HF index and folder; torrent split parts


def _index(src: Path) -> dict:
    return json.loads((src / INDEX).read_text())


def _damage_hf_folder(src: Path, case: str) -> list[str]:
    index = _index(src)
    in_shard2 = sorted(name for name, shard in index["weight_map"].items() if shard == SHARD2)
    if case == "index names a missing shard":
        (src / "model-00003-of-00005.safetensors").unlink()
        return [str(src / INDEX), "model-00003-of-00005.safetensors", "missing"]
    if case == "tensor absent from its shard":
        tensors = load_file(src / SHARD2)
        del tensors[in_shard2[-1]]
        save_file(tensors, src / SHARD2, metadata={"format": "pt"})
        return [str(src / INDEX), f"tensor {in_shard2[-1]}", SHARD2]
    if case == "tensor in two shards":
        shard3 = src / "model-00003-of-00005.safetensors"
        tensors = load_file(shard3)
        tensors[in_shard2[0]] = load_file(src / SHARD2)[in_shard2[0]]
        save_file(tensors, shard3, metadata={"format": "pt"})
        return [f"tensor {in_shard2[0]}", SHARD2, shard3.name]
    if case == "a shard nobody lists":
        shutil.copy(src / "model-00001-of-00005.safetensors", src / "model-00006-of-00005.safetensors")
        return ["model-00006-of-00005.safetensors", "not listed"]
    if case == "index names a shard outside the folder":
        index["weight_map"][in_shard2[0]] = "../outside.safetensors"
        shutil.copy(src / SHARD2, src.parent / "outside.safetensors")
        (src / INDEX).write_text(json.dumps(index))
        return [str(src / INDEX), "../outside.safetensors"]
    if case == "index not JSON":
        (src / INDEX).write_text('{"weight_map": ')
        return [str(src / INDEX), "not valid JSON"]
    if case == "weight_map not a map of names":
        index["weight_map"] = [SHARD2]
        (src / INDEX).write_text(json.dumps(index))
        return [str(src / INDEX), "weight_map"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "index names a missing shard",
        "tensor absent from its shard",
        "tensor in two shards",
        "a shard nobody lists",
        "index names a shard outside the folder",
        "index not JSON",
        "weight_map not a map of names",
    ],
)
def test_broken_hf_folder(base: Path, tmp_path: Path, case: str) -> None:
    src = copy_source(base, "hf", tmp_path)
    fragments = _damage_hf_folder(src, case)
    refused(src, tmp_path / "out", *fragments, target="mistral")


def _write_parts(src: Path, numbers: list[int], parts: int = 12) -> None:
    """Cut consolidated.00.pth into `parts` pieces and write piece i as -split{numbers[i]} (None: not written)."""
    data = (src / CHECKPOINT).read_bytes()
    (src / CHECKPOINT).unlink()
    bounds = [len(data) * i // parts for i in range(parts + 1)]
    for i, number in enumerate(numbers):
        if number is not None:
            (src / f"{CHECKPOINT}-split{number}").write_bytes(data[bounds[i] : bounds[i + 1]])


@pytest.mark.parametrize(
    ("numbers", "fragments"),
    [
        ([None, *range(1, 12)], ["-split0 is missing"]),
        ([*range(6), *range(7, 13)], ["-split6 is missing"]),
        ([*range(11), None], [f"{CHECKPOINT}-split0", "zip"]),
    ],
    ids=["first-part-missing", "numbering-skips-6", "last-part-missing"],
)
def test_split_parts_missing(base: Path, tmp_path: Path, numbers: list, fragments: list[str]) -> None:
    """The last-part case has no gap in the numbering: the stream is simply short, and the refusal must still
    name the parts and the rule (the archive cannot be read)."""
    src = copy_source(base, "torrent", tmp_path)
    _write_parts(src, numbers)
    refused(src, tmp_path / "out", str(src), *fragments)


def test_split_parts_two_files_for_one_part_number(base: Path, tmp_path: Path) -> None:
    """-split1 and -split01 both claim part 1: which one is read must not be left to directory order."""
    src = copy_source(base, "torrent", tmp_path)
    _write_parts(src, list(range(12)))
    (src / f"{CHECKPOINT}-split01").write_bytes(b"not part one")
    refused(src, tmp_path / "out", f"{CHECKPOINT}-split01", f"{CHECKPOINT}-split1")


# ---------------------------------------------------------------------------------------------------------------
# The model: params.json / config.json, missing and extra tensors


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda data: data.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda data: data.pop(key)


PARAMS_CASES = {
    # case: (layout, file, edit, fragments)
    "params.json missing dim": ("torrent", "params.json", _drop("dim"), ["missing required key 'dim'"]),
    "params.json missing moe": ("torrent", "params.json", _drop("moe"), ["missing required key 'moe'"]),
    "params.json n_layers a string": ("torrent", "params.json", _set("n_layers", "2"), ["'n_layers'", "'2'"]),
    "params.json num_experts a bool": (
        "torrent",
        "params.json",
        lambda d: d["moe"].__setitem__("num_experts", True),
        ["'num_experts'", "True"],
    ),
    "params.json moe a list": ("torrent", "params.json", _set("moe", [4, 2]), ["'moe'"]),
    "params.json norm_eps NaN": ("torrent", "params.json", _set("norm_eps", float("nan")), ["'norm_eps'"]),
    "params.json rope_theta Infinity": ("torrent", "params.json", _set("rope_theta", float("inf")), ["'rope_theta'"]),
    "params.json rope_theta an integer too large for a float": (
        "torrent",
        "params.json",
        _set("rope_theta", 10**400),
        ["'rope_theta'"],
    ),
    "params.json sliding_window a non-ASCII digit": (
        "torrent",
        "params.json",
        _set("sliding_window", "\u00b2"),
        ["'sliding_window'"],
    ),
    "params.json vocab_size against the embedding": (
        "torrent",
        "params.json",
        _set("vocab_size", 1004),
        ["tensor tok_embeddings.weight", "shape [1003, 64] does not match [1004, 64]"],
    ),
    "params.json n_layers more than the tensors": (
        "torrent",
        "params.json",
        _set("n_layers", 3),
        ["tensor layers.2.", "missing"],
    ),
    "params.json n_layers fewer than the tensors": (
        "torrent",
        "params.json",
        _set("n_layers", 1),
        ["tensor layers.1.", "unexpected tensor"],
    ),
    "config.json missing hidden_size": ("hf", "config.json", _drop("hidden_size"), ["'hidden_size'"]),
    "config.json num_local_experts a float": (
        "hf",
        "config.json",
        _set("num_local_experts", 4.0),
        ["'num_local_experts'", "4.0"],
    ),
    "config.json rms_norm_eps a string": ("hf", "config.json", _set("rms_norm_eps", "1e-5"), ["'rms_norm_eps'"]),
    "config.json num_key_value_heads against k_proj": (
        "hf",
        "config.json",
        _set("num_key_value_heads", 4),
        ["tensor model.layers.0.self_attn.k_proj.weight", "shape [32, 64] does not match [64, 64]"],
    ),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params(base: Path, tmp_path: Path, case: str) -> None:
    layout, file, edit, fragments = PARAMS_CASES[case]
    src = copy_source(base, layout, tmp_path)
    _edit_json(src / file, edit)
    target = "mistral" if layout == "hf" else "hf"
    named = str(src) if any(f.startswith("tensor ") for f in fragments) else str(src / file)
    refused(src, tmp_path / "out", named, *fragments, target=target)


@pytest.mark.parametrize("file", ["params.json", "config.json"])
def test_deeply_nested_params_json(base: Path, tmp_path: Path, file: str) -> None:
    src = copy_source(base, "torrent" if file == "params.json" else "hf", tmp_path)
    (src / file).write_text("[" * 200_000 + "]" * 200_000)
    refused(src, tmp_path / "out", str(src / file), target="hf" if file == "params.json" else "mistral")


def _rewrite_safetensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tensor_missing_from_a_mistral_folder(base: Path, tmp_path: Path) -> None:
    src = copy_source(base, "mistral", tmp_path)
    _rewrite_safetensors(src / "consolidated.safetensors", lambda t: t.pop("layers.1.ffn_norm.weight"))
    refused(src, tmp_path / "out", "tensor layers.1.ffn_norm.weight", "missing")


def test_unexpected_tensor_in_a_mistral_folder(base: Path, tmp_path: Path) -> None:
    src = copy_source(base, "mistral", tmp_path)
    extra = "layers.0.attention.wx.weight"
    _rewrite_safetensors(src / "consolidated.safetensors", lambda t: t.__setitem__(extra, t["norm.weight"].clone()))
    refused(src, tmp_path / "out", str(src / "consolidated.safetensors"), f"tensor {extra}", "unexpected tensor")


def test_unexpected_tensor_in_an_hf_folder(base: Path, tmp_path: Path) -> None:
    """A rotary inv_freq buffer, as older transformers versions saved them, listed in the index."""
    src = copy_source(base, "hf", tmp_path)
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite_safetensors(src / SHARD2, lambda t: t.__setitem__(extra, torch.ones(8, dtype=torch.bfloat16)))
    index = _index(src)
    index["weight_map"][extra] = SHARD2
    index["metadata"]["total_size"] += 16
    (src / INDEX).write_text(json.dumps(index))
    refused(src, tmp_path / "out", str(src / SHARD2), f"tensor {extra}", "unexpected tensor", target="mistral")


# Warnings, errors with --strict: a dtype unlike the rest, NaN, Inf.
ODD_TENSORS = {
    # case: (torrent name, hf name, edit of the tensor, rule fragment)
    "dtype unlike the rest": ("norm.weight", "model.norm.weight", lambda t: t.float(), "dtype"),
    "NaN": ("layers.0.attention.wv.weight", "model.layers.0.self_attn.v_proj.weight", "nan", "NaN"),
    "Inf": (
        "layers.1.feed_forward.experts.2.w3.weight",
        "model.layers.1.block_sparse_moe.experts.2.w3.weight",
        "inf",
        "Inf",
    ),
}


def _odd_source(base: Path, tmp_path: Path, case: str) -> tuple[Path, str, str, str]:
    name, hf_name, edit, rule = ODD_TENSORS[case]
    src = copy_source(base, "torrent", tmp_path)
    weights = torch.load(src / CHECKPOINT, weights_only=True)
    if callable(edit):
        weights[name] = edit(weights[name])
    else:
        weights[name][3, 5] = float(edit)
    torch.save(weights, src / CHECKPOINT)
    return src, name, hf_name, rule


@pytest.mark.parametrize("case", list(ODD_TENSORS))
def test_odd_tensor_is_a_warning(base: Path, tmp_path: Path, case: str) -> None:
    src, name, hf_name, rule = _odd_source(base, tmp_path, case)
    result = run_cli("convert", src, tmp_path / "out", "--to", "hf", check=False)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    warned = [line for line in lines if line.startswith("mixtral-convert: warning:") and rule in line]
    assert len(lines) == 1 and len(warned) == 1, f"expected one warning line with {rule!r}, got {result.stderr!r}"
    assert name in warned[0] or hf_name in warned[0], f"the warning does not name the tensor: {warned[0]}"
    print(warned[0])


@pytest.mark.parametrize("case", list(ODD_TENSORS))
def test_odd_tensor_is_an_error_with_strict(base: Path, tmp_path: Path, case: str) -> None:
    src, name, _hf_name, rule = _odd_source(base, tmp_path, case)
    refused(src, tmp_path / "out", f"tensor {name}", rule, args=("--strict",))


# ---------------------------------------------------------------------------------------------------------------
# Faults of the destination


def test_non_empty_destination_is_left_untouched(base: Path, tmp_path: Path) -> None:
    src = copy_source(base, "torrent", tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_bytes(b"mine \x00")
    (dst / "config.json").write_text('{"mine": true}')
    (dst / "model-00001-of-00005.safetensors").write_bytes(b"someone else's shard")
    (dst / "sub").mkdir()
    (dst / "sub" / "x.partial").write_bytes(b"not ours either")
    dst_before = snapshot(dst)
    before = snapshot(src)
    result = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, check=False)
    assert_contract(result, src, before, dst, "hf", str(dst), "not empty", "--force", dst_before=dst_before)


def test_destination_on_a_read_only_mount(base: Path, tmp_path: Path) -> None:
    src = copy_source(base, "torrent", tmp_path)
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        refused(src, mount / "out", str(mount), "not writable")


def test_destination_in_a_read_only_folder(base: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits are not enforced (the read-only mount test covers this)")
    src = copy_source(base, "torrent", tmp_path)
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        refused(src, parent / "out", str(parent), "not writable")
    finally:
        parent.chmod(0o755)


def _planned_sizes(base: Path) -> dict[str, int]:
    """The base hf folder is this very conversion's output (same source, same shard size)."""
    return {p.name: p.stat().st_size for p in (base / "hf").iterdir()}


def _fill(folder: Path) -> None:
    """Write zeros into folder until its filesystem is full."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(bytes(4096))
        except OSError:
            pass


@pytest.mark.parametrize(
    ("size", "full_at_start"),
    [("300k", False), ("440k", False), ("700k", False), ("100k", True)],
    ids=[
        "full-mid-shards",
        "full-when-the-journal-needs-a-page",  # the journal's record after shard 3 crosses a 4 KiB page here
        "full-at-the-index",
        "full-before-the-start",
    ],
)
def test_disk_full_then_resume(base: Path, tmp_path: Path, size: str, full_at_start: bool) -> None:
    """ENOSPC: one line naming the file and 'No space left', no completion marker, unfinished files named
    .partial; after freeing room, --resume finishes and verify passes. The sizes were found by converting the base
    sample into tmpfs mounts of each size (tmpfs counts 4 KiB pages): 300k fails in shard 3, 440k leaves no page for
    the journal record after shard 3, 700k fails writing the index. If the output's files change size, the failure
    points move; each case still checks the whole contract wherever the disk fills."""
    src = copy_source(base, "torrent", tmp_path)
    planned = _planned_sizes(base)
    problems = []
    with tmpfs(tmp_path / "small", f"size={size}") as mount:
        if full_at_start:
            _fill(mount)
        dst = mount / "hf"
        before = snapshot(src)
        result = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, check=False)
        try:
            line = assert_one_line_error(result, "No space left")
            print(line)
            if result.stderr.strip().splitlines() != [line]:
                problems.append(f"more than the one error line on stderr:\n{result.stderr}")
            named = line.removeprefix("mixtral-convert: error: ").split(": ")[0]
            if not named.startswith(f"{dst}/"):
                problems.append(f"the error does not name the file that could not be written: {line}")
        except AssertionError as exc:
            problems.append(f"exit {result.returncode}: {exc}")
        if snapshot(src) != before:
            problems.append("the source was modified")
        if (dst / INDEX).exists():
            problems.append("the output looks complete")
        for path in dst.iterdir() if dst.exists() else ():
            if path.name.endswith(".partial") or path.name == JOURNAL:
                continue
            if path.name not in planned or path.stat().st_size != planned[path.name]:  # finished files are whole
                problems.append(f"{path.name} is not a whole output file but not named .partial")
        (mount / "filler").unlink(missing_ok=True)
        remount = subprocess.run(["mount", "-o", "remount,size=10m", str(mount)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
        resumed = run_cli("convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE, "--resume", check=False)
        if resumed.returncode != 0:
            problems.append(f"--resume after freeing room failed: {resumed.stderr.strip()}")
        else:
            verified = run_cli("verify", dst, check=False).stdout.strip().splitlines()
            if not verified[-1].startswith("verified"):
                problems.append(f"verify after --resume: {verified}")
            if list(dst.glob("*.partial")) or (dst / JOURNAL).exists():
                problems.append(f"left behind after --resume: {sorted(p.name for p in dst.iterdir())}")
        if snapshot(src) != before:
            problems.append("the source was modified by --resume")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The source changing during the run

# The writer's MIXTRAL_CONVERT_STALL_AT hook (convert/faults.py) stalls after the first chunk of the named file, so
# a test cannot change the source and then let the run go on. This bootstrap replaces the stall with the change
# (same point in the run: after the first chunk of the named file) and lets the writer continue; the real CLI runs.
_CHANGE_SOURCE = """
import os, sys
from pathlib import Path
import convert.fileio.faults

def change(name):
    if name != os.environ["MIXTRAL_CONVERT_STALL_AT"]:
        return
    path = Path(os.environ["FAULT_CHANGE"])
    if os.environ["FAULT_HOW"] == "size":
        with open(path, "ab") as handle:
            handle.write(b"appended")
    else:
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))

convert.fileio.faults.stall_point = change
from convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("changed", "how", "stall_at"),
    [
        (CHECKPOINT, "mtime", "model-00002-of-00005.safetensors"),
        ("tokenizer.model", "size", "model-00003-of-00005.safetensors"),
        ("params.json", "mtime", INDEX),
    ],
    ids=["checkpoint-mtime-mid-shards", "tokenizer-size-mid-shards", "params-mtime-while-writing-the-index"],
)
def test_source_changing_during_the_run(base: Path, tmp_path: Path, changed: str, how: str, stall_at: str) -> None:
    src = copy_source(base, "torrent", tmp_path)
    dst = tmp_path / "out"
    before = snapshot(src)
    expected = (src / changed).read_bytes() + (b"appended" if how == "size" else b"")
    env = dict(os.environ, MIXTRAL_CONVERT_STALL_AT=stall_at, FAULT_CHANGE=str(src / changed), FAULT_HOW=how)
    command = [sys.executable, "-c", _CHANGE_SOURCE, "convert", src, dst, "--to", "hf", "--max-shard-size", SHARD_SIZE]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    problems = []
    try:
        line = assert_one_line_error(result, str(src / changed), "changed")
        print(line)
        if result.stderr.strip().splitlines() != [line]:
            problems.append(f"more than the one error line on stderr:\n{result.stderr}")
    except AssertionError as exc:
        problems.append(f"exit {result.returncode}: {exc}")
    after = snapshot(src)
    if {k: v for k, v in after.items() if k != changed} != {k: v for k, v in before.items() if k != changed}:
        problems.append("the converter modified the source")
    if (src / changed).read_bytes() != expected:
        problems.append(f"the converter modified {changed}")
    if (dst / INDEX).exists():
        problems.append("the output looks complete (index written) although the source changed during the run")
    assert not problems, "\n".join(problems)
