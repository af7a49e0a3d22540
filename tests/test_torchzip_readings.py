"""Torch zip checkpoints that two readers would read differently, damaged records, and pickles that cost memory
(issue 12), end to end through the command line.

Each case builds its file from the pristine sample, converts it and asserts the contract of test_faults (one error
line naming the file, the record and the rule; no completion marker; the source untouched) plus a peak RSS within
512 MiB, measured on the converter's own process. What torch.load does with each file was found with torch 2.13
(see the comments): duplicates it does not refuse, picking by a binary search over the case-folded names; it checks
no CRC-32; a storage typed two ways takes the first type.
"""

from __future__ import annotations

import io
import shutil
import struct
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from synthetic import DEFAULT, make_weights, write_megablocks
from test_faults import (
    CHECKPOINT,
    INDEX,
    PKL,
    _central_entry,
    _write_parts,
    archive_entries,
    assert_contract,
    base,  # noqa: F401  (the module fixture, shared)
    captured_state,
    copy_source,
    run_cli_measured,
    snapshot,
    state_pickle,
)
from test_tokenizer import train as train_tokenizer

pytestmark = pytest.mark.containers

PEAK_MIB = 512


def refused_measured(src: Path, dst: Path, *fragments: str, target: str = "hf", args: tuple[str, ...] = ()) -> str:
    """test_faults.refused, plus the converter's peak RSS within PEAK_MIB."""
    before = snapshot(src)
    result, peak_mib = run_cli_measured("convert", src, dst, "--to", target, *args)
    memory = f"peak RSS {peak_mib} MiB, over {PEAK_MIB}" if peak_mib > PEAK_MIB else ""
    try:
        line = assert_contract(result, src, before, dst, target, *fragments)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{memory}") from None
    assert not memory, f"{memory} for: {line}"
    print(f"peak RSS {peak_mib} MiB")
    return line


def stopped_before_the_index(src: Path, dst: Path, *fragments: str, args: tuple[str, ...] = ()) -> str:
    """A CRC-32 failure found after some output files are finished (they stay, as after any failure mid-run): exit
    2, the one line, no index, the source untouched, peak RSS within PEAK_MIB."""
    before = snapshot(src)
    result, peak_mib = run_cli_measured("convert", src, dst, "--to", "hf", *args)
    line = assert_one_line_error(result, *fragments)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], result.stderr
    assert not (dst / INDEX).exists(), sorted(p.name for p in dst.iterdir())
    assert snapshot(src) == before and peak_mib <= PEAK_MIB, peak_mib
    print(line)
    return line


def build_archive(path: Path, pairs: list[tuple[str, bytes]], gap_after: dict[str, bytes] | None = None) -> None:
    """A stored zip of these (name, bytes) records in this order, duplicates allowed; gap_after puts raw bytes
    between a record and the next (zipfile writes the next record at its start_dir)."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name"
        for name, data in pairs:
            archive.writestr(name, data)
            if gap_after and name in gap_after:
                archive.fp.write(gap_after[name])  # type: ignore[union-attr]
                archive.start_dir = archive.fp.tell()  # type: ignore[union-attr]  (where the next record goes)


def _storage_key(entries: dict[str, bytes], tensor: str) -> str:
    return captured_state(entries[PKL])[tensor][0][2]


def _local_header_at(data: bytes, name: str) -> int:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.getinfo(name).header_offset


def _data_offset(data: bytes, name: str) -> int:
    at = _local_header_at(data, name)
    name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
    return at + 30 + name_len + extra_len


# ---------------------------------------------------------------------------------------------------------------
# Two readings of the zip layer


def _duplicate_record(path: Path) -> list[str]:
    """A second consolidated.00/data/<key> right after the real one: zipfile (and so b7d151c) read the second,
    torch.load the second too for this key but the first for others (its binary search decides)."""
    entries = archive_entries(path)
    record = f"consolidated.00/data/{_storage_key(entries, 'tok_embeddings.weight')}"
    pairs = []
    for name, data in entries.items():
        pairs.append((name, data))
        if name == record:
            pairs.append((name, bytes(len(data))))
    build_archive(path, pairs)
    return [f"record '{record}' appears twice", "torch.load"]


def _swapped_pickle(entries: dict[str, bytes]) -> bytes:
    state = captured_state(entries[PKL])
    first, second = state["tok_embeddings.weight"][0], state["output.weight"][0]
    first[2], second[2] = second[2], first[2]
    return state_pickle(state)


def _second_pickle_appended(path: Path) -> list[str]:
    """A second data.pkl at the end with two storages swapped: torch.load reads the first, zipfile the last."""
    entries = archive_entries(path)
    build_archive(path, [*entries.items(), (PKL, _swapped_pickle(entries))])
    return [f"record '{PKL}' appears twice"]


def _pickle_in_other_case(path: Path) -> list[str]:
    """consolidated.00/DATA.PKL right after data.pkl: miniz looks names up ignoring case and torch.load reads THIS
    one (swapped storages), while zipfile and b7d151c read data.pkl."""
    entries = archive_entries(path)
    pairs = list(entries.items())
    pairs.insert(1, ("consolidated.00/DATA.PKL", _swapped_pickle(entries)))
    build_archive(path, pairs)
    return ["'consolidated.00/DATA.PKL' appears twice", f"as '{PKL}'"]


def _patch_local_header(field: int, fmt: str, value: int) -> Callable[[Path], list[str]]:
    """A local header field of the norm.weight record changed, the central directory left as it is."""

    def damage(path: Path) -> list[str]:
        entries = archive_entries(path)
        record = f"consolidated.00/data/{_storage_key(entries, 'norm.weight')}"
        build_archive(path, list(entries.items()))
        data = bytearray(path.read_bytes())
        struct.pack_into(fmt, data, _local_header_at(bytes(data), record) + field, value)
        path.write_bytes(data)
        return [f"local header of {record} disagrees with the central directory"]

    return damage


def _hidden_record_in_a_gap(path: Path) -> list[str]:
    """A whole local record (a second data.pkl) between two records, listed nowhere in the central directory: a
    reader that walks local headers from the front finds it."""
    entries = archive_entries(path)
    hidden = io.BytesIO()
    with zipfile.ZipFile(hidden, "w") as other:
        other.writestr(PKL, _swapped_pickle(entries))
    raw = hidden.getvalue()
    local = raw[: raw.index(b"PK\x01\x02")]
    build_archive(path, list(entries.items()), gap_after={PKL: local})
    return [f"bytes after record {PKL}"]


def _overlapping_records(path: Path) -> list[str]:
    """The central entry of a last record points INSIDE the data of tok_embeddings' record, where a complete local
    header and data were planted: two names for one byte range."""
    entries = archive_entries(path)
    record = f"consolidated.00/data/{_storage_key(entries, 'tok_embeddings.weight')}"
    inner_name, inner_data = "consolidated.00/extra", b"3\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as one:
        one.writestr(inner_name, inner_data)
    raw = buffer.getvalue()
    planted = raw[: raw.index(b"PK\x01\x02")]
    damaged = dict(entries)
    damaged[record] = planted + entries[record][len(planted) :]
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)
        for name, data in damaged.items():
            archive.writestr(name, data)
        with zipfile.ZipFile(io.BytesIO(raw)) as one:
            info = one.getinfo(inner_name)
        info.header_offset = archive.getinfo(record).header_offset + 30 + len(record)
        archive.filelist.append(info)
        archive.NameToInfo[inner_name] = info
    return [f"record {record} (bytes", "overlaps record consolidated.00/extra at byte"]


def _bytes_before(path: Path) -> list[str]:
    """64 bytes before the archive: zipfile shifts every offset to match; torch.load refuses the file."""
    path.write_bytes(bytes(64) + path.read_bytes())
    return ["bytes before the archive or inside it"]


def _bytes_after(path: Path) -> list[str]:
    path.write_bytes(path.read_bytes() + b"PK\x03\x04" + bytes(60))
    return ["does not end with the end of its central directory"]


def _end_record_undercounts(path: Path) -> list[str]:
    """The end record counts one record fewer than the directory holds: torch's miniz reads the count, zipfile the
    whole directory (the written archive has no zip64 end record)."""
    entries = archive_entries(path)
    build_archive(path, list(entries.items()))
    data = bytearray(path.read_bytes())
    at = len(data) - 22
    struct.pack_into("<HH", data, at + 8, len(entries) - 1, len(entries) - 1)
    path.write_bytes(data)
    return [f"the end record counts {len(entries) - 1} records but the central directory holds {len(entries)}"]


def _outside_the_folder(path: Path) -> list[str]:
    entries = archive_entries(path)
    build_archive(path, [*entries.items(), ("elsewhere/notes", b"not part of the checkpoint")])
    return ["record 'elsewhere/notes' is not in the folder 'consolidated.00/'", "torch.load refuses it too"]


def _storage_marked_as_folder(path: Path) -> list[str]:
    """The DOS folder attribute on norm.weight's storage record: torch's miniz then extracts none of its bytes
    (torch.load hands back uninitialized memory), zipfile reads them all."""
    entries = archive_entries(path)
    record = f"consolidated.00/data/{_storage_key(entries, 'norm.weight')}"
    data = bytearray(path.read_bytes())
    data[_central_entry(bytes(data), record) + 38] |= 0x10
    path.write_bytes(data)
    return [f"record '{record}' is marked as a folder"]


def _last_name_past_the_directory(path: Path) -> list[str]:
    """The last central entry's name length 32 bytes too long: zipfile cuts the name at the directory's end and
    reads on, torch's miniz refuses the archive."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        last = archive.infolist()[-1].filename
    at = _central_entry(bytes(data), last) + 28
    struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] + 32)
    path.write_bytes(data)
    return ["the central directory's entries do not fill it exactly"]


# ---------------------------------------------------------------------------------------------------------------
# What torch.load reads besides the bytes of a storage


def _typed_twice(path: Path) -> list[str]:
    """layers.0.attention_norm.weight's reference to its storage replaced by a HalfStorage one to norm.weight's
    storage (BFloat16Storage): torch.load gives both tensors the first type its unpickler meets (float16)."""
    entries = archive_entries(path)
    state = captured_state(entries[PKL])
    norm = state["norm.weight"][0]
    state["layers.0.attention_norm.weight"][0] = ["storage", "HalfStorage", norm[2], "cpu", norm[4]]
    entries[PKL] = state_pickle(state)
    build_archive(path, list(entries.items()))
    return [
        f"storage {norm[2]} is referenced as HalfStorage of {norm[4]} by tensor layers.0.attention_norm.weight",
        f"BFloat16Storage of {norm[4]}",
        "torch.load takes the first",
    ]


def _record_longer_than_its_storage(path: Path) -> list[str]:
    entries = archive_entries(path)
    key = _storage_key(entries, "norm.weight")
    entries[f"consolidated.00/data/{key}"] += bytes(64)
    build_archive(path, list(entries.items()))
    return [f"storage {key} claims 128 bytes but its record has 192", "torch.load refuses it too"]


def _byteorder_big(path: Path) -> list[str]:
    entries = archive_entries(path)
    entries["consolidated.00/byteorder"] = b"big"
    build_archive(path, list(entries.items()))
    return ["byteorder is b'big'", "byte-swaps"]


def _no_version(path: Path) -> list[str]:
    entries = archive_entries(path)
    build_archive(path, [(n, d) for n, d in entries.items() if n != "consolidated.00/version"])
    return ["version record missing", "refuses the file"]


def _empty_sets(path: Path) -> list[str]:
    """8 MiB of EMPTY_SET opcodes as data.pkl: each 1-byte opcode is a 216-byte set on the unpickler's stack
    (1.9 GiB at b7d151c before the error)."""
    entries = archive_entries(path)
    entries[PKL] = b"\x80\x02" + b"\x8f" * (8 * 2**20) + b"."
    build_archive(path, list(entries.items()))
    return ["data.pkl refused", "opcodes"]


ZIP_CASES: dict[str, Callable[[Path], list[str]]] = {
    "duplicate storage record right after the real one": _duplicate_record,
    "second data.pkl appended with storages swapped": _second_pickle_appended,
    "data.pkl twice, differing in case": _pickle_in_other_case,
    "local header says deflated": _patch_local_header(8, "<H", 8),
    "local header CRC-32 differs": _patch_local_header(14, "<I", 0x12345678),
    "local header size differs": _patch_local_header(22, "<I", 64),
    "hidden local record between two records": _hidden_record_in_a_gap,
    "overlapping records": _overlapping_records,
    "bytes before the archive": _bytes_before,
    "bytes after the archive": _bytes_after,
    "end record undercounts the directory": _end_record_undercounts,
    "storage record marked as a folder": _storage_marked_as_folder,
    "last central name runs past the directory": _last_name_past_the_directory,
    "record outside the first record's folder": _outside_the_folder,
    "storage typed two ways": _typed_twice,
    "record longer than its storage": _record_longer_than_its_storage,
    "byteorder big": _byteorder_big,
    "no version record": _no_version,
    "8 MiB of EMPTY_SET as data.pkl": _empty_sets,
}


@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_torch_zip_with_two_readings_is_refused(base: Path, tmp_path: Path, case: str) -> None:  # noqa: F811
    src = copy_source(base, "torrent", tmp_path)
    fragments = ZIP_CASES[case](src / CHECKPOINT)
    started = time.monotonic()
    refused_measured(src, tmp_path / "out", str(src / CHECKPOINT), "torch checkpoint", *fragments)
    assert time.monotonic() - started < 30


def test_torch_load_reads_the_pickle_in_other_case(base: Path, tmp_path: Path) -> None:  # noqa: F811
    """The premise of the case-insensitive rule, on the real client: torch.load reads DATA.PKL's swapped storages."""
    src = copy_source(base, "torrent", tmp_path)
    _pickle_in_other_case(src / CHECKPOINT)
    original = torch.load(base / "torrent" / CHECKPOINT, weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.load(src / CHECKPOINT, weights_only=True)
    assert torch.equal(loaded["tok_embeddings.weight"], original["output.weight"])


# ---------------------------------------------------------------------------------------------------------------
# CRC-32: one flipped bit in a record


def flip_bit(path: Path, record: str, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[_data_offset(bytes(data), record) + at] ^= 0x10
    path.write_bytes(data)


def test_flipped_bit_in_a_torrent_record(base: Path, tmp_path: Path) -> None:  # noqa: F811
    """torch.load loads the damaged file silently (it checks no CRC-32); the conversion must stop before the index,
    naming the record and its tensor; verify and inspect of the source report it too."""
    src = copy_source(base, "torrent", tmp_path)
    flip_bit(src / CHECKPOINT, "consolidated.00/data/0", 1000)
    torch.load(src / CHECKPOINT, weights_only=True)  # no error: the premise
    refused_measured(
        src, tmp_path / "out", str(src / CHECKPOINT), "tensor tok_embeddings.weight", "consolidated.00/data/0 fails"
    )
    verified = run_cli("verify", src, check=False)
    assert verified.returncode == 1 and "FAILED crc32" in verified.stdout and "data/0 fails" in verified.stdout


def test_flipped_bit_in_split_parts(base: Path, tmp_path: Path) -> None:  # noqa: F811
    """The same across -split parts (the damaged record spans two of them): convert, verify and inspect."""
    src = copy_source(base, "torrent", tmp_path)
    flip_bit(src / CHECKPOINT, "consolidated.00/data/0", 100_000)
    _write_parts(src, list(range(12)))
    line = refused_measured(src, tmp_path / "out", "consolidated.00/data/0 fails its CRC-32", "tok_embeddings.weight")
    assert f"{CHECKPOINT}-split0" in line
    verified = run_cli("verify", src, check=False)
    failed = [row for row in verified.stdout.splitlines() if row.startswith("FAILED crc32")]
    assert verified.returncode == 1 and len(failed) == 1 and "data/0 fails" in failed[0], verified.stdout
    inspected = run_cli("inspect", src, check=False)
    assert inspected.returncode == 1 and "data/0 fails its CRC-32" in inspected.stdout, inspected.stdout


def test_flipped_bit_in_a_megablocks_stacked_record(tmp_path: Path) -> None:
    """A stacked w1 record of a torch.save'd megablocks file, read one expert block at a time into several hf shards
    (so out of the record's order across output files): the damaged record stops the run before the index."""
    src = tmp_path / "src"
    write_megablocks(src, DEFAULT, make_weights(DEFAULT, seed=5))
    (src / "tokenizer.model").write_bytes(train_tokenizer(vocab_size=DEFAULT.vocab))
    name = "layers.1.block_sparse_moe.w1"
    for path in sorted(src.glob("*.pt")):
        entries = archive_entries(path)
        pkl = next(n for n in entries if n.endswith("/data.pkl"))
        state = captured_state(entries[pkl])
        if name in state:
            record = f"{pkl.split('/')[0]}/data/{state[name][0][2]}"
            flip_bit(path, record, len(entries[record]) - 5)  # in the last expert's block
            break
    else:
        raise AssertionError(f"{name} is in no file")
    # The shards before the one that completes the record are finished, as after any failure mid-run.
    line = stopped_before_the_index(
        src, tmp_path / "out", str(path), f"tensor {name}", f"record {record} fails", args=("--max-shard-size", "60KB")
    )
    assert "model-00008-of-00009.safetensors.partial" in {p.name for p in (tmp_path / "out").iterdir()}, line


def test_undamaged_sources_still_convert(base: Path, tmp_path: Path) -> None:  # noqa: F811
    """Control: the checks pass the real files (a torch.save'd megablocks folder, split parts)."""
    src = copy_source(base, "torrent", tmp_path)
    _write_parts(src, list(range(12)))
    run_cli("convert", src, tmp_path / "out", "--to", "hf")
    assert run_cli("verify", src).returncode == 0
    mega = tmp_path / "mega"
    write_megablocks(mega, DEFAULT, make_weights(DEFAULT, seed=5))
    shutil.copy(base / "torrent" / "tokenizer.model", mega / "tokenizer.model")
    run_cli("convert", mega, tmp_path / "out2", "--to", "hf", "--max-shard-size", "60KB")


def test_flipped_bit_where_no_tensor_reads(base: Path, tmp_path: Path) -> None:  # noqa: F811
    """norm.weight saved as a view of the first half of a storage twice its size: the flipped bit is in the half no
    piece reads, so only the check before the completion marker (which reads what the pieces did not) sees it."""
    src = copy_source(base, "torrent", tmp_path)
    weights = torch.load(src / CHECKPOINT, weights_only=True)
    norm = weights["norm.weight"]
    weights["norm.weight"] = torch.cat([norm, torch.ones_like(norm)])[: norm.numel()]
    torch.save(weights, src / CHECKPOINT)
    entries = archive_entries(src / CHECKPOINT)
    record = f"consolidated.00/data/{_storage_key(entries, 'norm.weight')}"
    assert len(entries[record]) == 2 * norm.numel() * 2
    flip_bit(src / CHECKPOINT, record, len(entries[record]) - 3)
    stopped_before_the_index(
        src, tmp_path / "out", str(src / CHECKPOINT), "tensor norm.weight", f"record {record} fails"
    )
