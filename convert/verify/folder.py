"""verify: is a checkpoint folder intact, well-formed, and (with --against) a faithful conversion of its source?

Every check adds a result naming its file, tensor and rule; the folder passes only when all pass. Memory stays
bounded as in conversion: files are hashed (convert/verify/hashing.py) and compared (convert/verify/compare.py) in
chunks through pooled reads.

manifest.json, when present, records each tensor's file, byte range, dtype, shape and digest (BLAKE3, or SHA-256
in manifests older than its tensor_digest field), and each of those files' SHA-256 (file_sha256, in manifests
written since). A shard whose bytes were changed is caught even when its SHA256SUMS line was rewritten to match
(the manifest is itself listed there), naming the tensor, and the manifest's ranges are checked against the
headers, so a renamed or moved tensor is caught too.

Where the manifest is the one SHA256SUMS lists and a file's SHA-256 is the one both record, the file's bytes are
those the writer took its tensors' digests from: recomputing them adds nothing, so such files are only hashed
with SHA-256, two at a time (convert/verify/hashing.py's sha256_files: as fast as checking SHA256SUMS can be
here). Only a file that then fails is read again for its tensors' digests, to name the tensor. Every other file
(an older manifest, a SHA256SUMS line that differs from the manifest's record) has each tensor's bytes hashed in
the same read that hashes the file for SHA256SUMS, as before.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from convert.common.errors import ConvertError, shown
from convert.fileio.owned import PARTIAL_SUFFIX
from convert.fileio.regular import MAX_MANIFEST_JSON, MAX_SUMS, is_present, read_small
from convert.fileio.workers import run_scope, run_stop
from convert.integrity.manifest import (
    MANIFEST,
    SUMS,
    ManifestEntry,
    metadata_differences,
    parse_sums,
    read_manifest,
    read_manifest_file_sha256,
    read_manifest_metadata,
)
from convert.verify.hashing import FileHashes, FolderHasher
from convert.verify.report import Report, Result

# Opening a folder, planning and comparing load the containers, the tables and (for --against) numpy; pins load
# package data (importlib.resources). On a cold cache every module is a read from disk, and whatever loads before
# the SHA-256 pass starts (_verify) delays the whole verify: they are imported where they are used, after it.
if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from convert.planning.plan import Plan
    from convert.planning.source import Source
    from convert.verify.onepass import FolderFeed

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
# The GIL's switch interval while the SHA-256 lanes run beside this thread's checks. A thread that wants the GIL
# waits up to the interval for the one holding it, and each lane (and its read worker) takes it a few times per
# read: at Python's default (5 ms) a main thread busy opening and checking the folder held the lanes back by a
# tenth of their time. Half a millisecond keeps every handoff short, at the cost of a few more switches.
HANDOFF_INTERVAL = 0.0005
READ_CHUNK = 8 * 2**20


def _hash_pass(
    hasher: FolderHasher, path: Path, ranges: list[ManifestEntry], hashed: dict[Path, FileHashes]
) -> FileHashes:
    """One sequential read of path: its SHA-256 and the digest of each range, in bounded memory (the pool's
    buffers and a hash state per tensor); no read at all when it was hashed already (by verify --against, or by
    the SHA-256 pass: then without its ranges, which only a file whose SHA-256 the manifest records has)."""
    if path in hashed:
        return hashed[path]
    return hasher.hash_file(path, ranges, [e.algorithm for e in ranges])


def _vouched(folder: Path, manifest: list[ManifestEntry] | None) -> dict[str, str]:
    """The files whose tensors' digests need not be recomputed if their bytes have the SHA-256 given here:
    manifest.json records it for them (file_sha256, written from the same bytes as the tensors' digests), the
    manifest is the one SHA256SUMS lists, and SHA256SUMS lists the same SHA-256 for them. Empty for a manifest
    without file_sha256 (older versions), or one SHA256SUMS does not vouch for: then every tensor is hashed."""
    if not manifest:
        return {}
    try:
        recorded = read_manifest_file_sha256(folder)
        if recorded is None or not is_present(folder / SUMS) or not is_present(folder / MANIFEST):
            return {}
        pairs = parse_sums(read_small(folder / SUMS, MAX_SUMS, SUMS).decode("utf-8"))
        listed = {name: digest for digest, name in pairs}
        written = read_small(folder / MANIFEST, MAX_MANIFEST_JSON, MANIFEST)
        if listed.get(MANIFEST) != hashlib.sha256(written).hexdigest():
            return {}
    except (ConvertError, ValueError, UnicodeDecodeError):
        return {}  # the checks that follow say what is wrong
    files = {e.file for e in manifest}
    return {name: digest for name, digest in recorded.items() if name in files and listed.get(name) == digest}


def _entries_by_file(manifest: list[ManifestEntry] | None) -> dict[str, list[ManifestEntry]]:
    """manifest.json's entries grouped by the file they place their tensor in."""
    by_file: dict[str, list[ManifestEntry]] = {}
    for entry in manifest or ():
        by_file.setdefault(entry.file, []).append(entry)
    return by_file


def _hash_targets(folder: Path, manifest: list[ManifestEntry] | None) -> dict[Path, list[tuple[ManifestEntry, str]]]:
    """The files _check_sums_with will hash, each with the ranges it will ask for: those SHA256SUMS lists and
    those manifest.json places tensors in (a SHA256SUMS that cannot be read lists none here; the pass says why);
    no ranges for a file whose SHA-256 vouches for its tensors' digests (_vouched)."""
    vouched = _vouched(folder, manifest)
    by_file = {n: [] if n in vouched else e for n, e in _entries_by_file(manifest).items()}
    names = set(by_file)
    try:
        if is_present(folder / SUMS):
            names.update(name for _, name in parse_sums(read_small(folder / SUMS, MAX_SUMS, SUMS).decode("utf-8")))
    except (ConvertError, ValueError, UnicodeDecodeError):
        pass
    # Plain names only: "./x" and "x" would be one file asked for with two lists of ranges.
    return {folder / n: [(e, e.algorithm) for e in by_file.get(n, [])] for n in names if Path(n).name == n}


def _check_tensor_hashes(
    path: Path, entries: list[ManifestEntry], digests: dict[str, str] | None, report: Report
) -> None:
    """Each tensor's range lies in the file and has the digest manifest.json says. digests None: the file's
    SHA-256 is the one the manifest records, so every range holds the bytes the manifest's digests were taken of."""
    size = path.stat().st_size
    failed = False
    for entry in entries:
        problem = None
        if entry.end > size:
            problem = f"{MANIFEST} places it at bytes [{entry.begin}, {entry.end}) but the file has {size}"
        elif digests is not None and digests[entry.name] != entry.digest:
            problem = (
                f"{entry.algorithm} of bytes [{entry.begin}, {entry.end}) is {digests[entry.name]}, {MANIFEST} says "
                f"{entry.digest}"
            )
        if problem:
            failed = True
            report.results.append(Result("manifest", str(path), False, problem, entry.name))
    if not failed:
        report.results.append(Result("manifest", str(path), True))


def _check_sums_with(
    hasher: FolderHasher,
    folder: Path,
    report: Report,
    manifest: list[ManifestEntry] | None,
    hashed: dict[Path, FileHashes],
) -> None:
    """Each file's SHA-256 against SHA256SUMS and, in the same read, each of its tensors' against manifest.json
    (only for a file whose SHA-256 is not the one the manifest records: _vouched); hashed: the files verify
    --against hashed already as it compared them."""
    by_file = _entries_by_file(manifest)
    vouched = _vouched(folder, manifest)
    hashed = {**hashed, **_sha256_pass(hasher, _hash_targets(folder, manifest), hashed)}
    sums = folder / SUMS
    pairs: list[tuple[str, str]] = []
    if not is_present(sums):
        report.notes.append(f"no {SUMS}: no checksums were available; only the structure was checked")
    else:
        try:
            pairs = parse_sums(read_small(sums, MAX_SUMS, SUMS).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            report.results.append(Result("sha256", str(sums), False, f"not in sha256sum format: {exc}"))
    if pairs and manifest is None and not (folder / MANIFEST).exists():
        report.notes.append(f"no {MANIFEST}: the tensors' own checksums were not available")
    listed = set()
    for expected, name in pairs:
        listed.add(name)
        path = folder / name
        if not is_present(path):
            report.results.append(Result("sha256", str(path), False, f"listed in {SUMS} but missing"))
            continue
        entries = by_file.get(name, [])
        actual, tensor_digests = _hash_pass(hasher, path, [] if name in vouched else entries, hashed)
        problem = None if actual == expected else f"sha256 is {actual}, {SUMS} says {expected}"
        report.results.append(Result("sha256", str(path), actual == expected, problem))
        if name in by_file:
            if name in vouched and actual == vouched[name]:
                _check_tensor_hashes(path, entries, None, report)
                continue
            tensor_digests = _all_digests(hasher, path, entries, tensor_digests)
            _check_tensor_hashes(path, entries, tensor_digests, report)
    for name, entries in sorted(by_file.items()):
        if name in listed:
            continue
        path = folder / name
        if Path(name).name != name or not is_present(path):
            problem = f"{MANIFEST} lists tensors in {shown(name)}, which is missing"
            report.results.append(Result("manifest", str(folder / MANIFEST), False, problem))
            continue
        _, tensor_digests = _hash_pass(hasher, path, entries, hashed)  # not in SHA256SUMS (or none): one read
        _check_tensor_hashes(path, entries, _all_digests(hasher, path, entries, tensor_digests), report)
    if not pairs:
        return
    for path in sorted(folder.iterdir()):
        if path.name == SUMS or path.name in listed or not path.is_file():
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(PARTIAL_SUFFIX) or path.suffix == ".json":
            report.results.append(Result("sha256", str(path), False, f"not covered by {SUMS}"))
        else:
            report.notes.append(f"{shown(path.name)} is not covered by {SUMS}")


def _all_digests(
    hasher: FolderHasher, path: Path, entries: list[ManifestEntry], digests: dict[str, str]
) -> dict[str, str]:
    """digests, or where path was hashed for its SHA-256 alone (its SHA-256 then was not the manifest's record:
    changed since it was written), its tensors' digests from a second read, to name the tensors that changed."""
    if all(e.name in digests for e in entries):
        return digests
    return hasher.hash_file(path, entries, [e.algorithm for e in entries])[1]


def _sha256_pass(
    hasher: FolderHasher, targets: dict[Path, list[tuple[ManifestEntry, str]]], hashed: dict[Path, FileHashes]
) -> dict[Path, FileHashes]:
    """The SHA-256 of every target file with no ranges to hash and not hashed already, two files at once; the
    others are left to _hash_pass (a file that is not there, or not a regular file, too: it says so in turn)."""
    return _start_sha256_pass(hasher, targets, hashed)()


def _start_sha256_pass(
    hasher: FolderHasher, targets: dict[Path, list[tuple[ManifestEntry, str]]], hashed: dict[Path, FileHashes]
) -> Callable[[], dict[Path, FileHashes]]:
    """_sha256_pass on the hasher's threads, while the caller goes on (verify without --against starts it before
    opening the folder: the structure checks then cost no time); the call returned waits for it."""
    wanted = []
    for path, ranges in sorted(targets.items()):
        if ranges or path in hashed:
            continue
        try:
            if is_present(path):
                wanted.append(path)
        except ConvertError:
            continue
    finish = hasher.start_sha256_files(wanted)
    return lambda: {path: (digest, {}) for path, digest in finish().items()}


def _check_folder(folder: Path) -> None:
    """A folder that is not there is an error (exit 2), not a failed check."""
    if not folder.is_dir():
        raise ConvertError("not a folder" if folder.exists() else "no such folder", file=folder)


def _check_manifest_places(source: Source, manifest: list[ManifestEntry], report: Report) -> None:
    """Every tensor the folder holds is where, and as what, manifest.json says: the hashes above cover byte
    ranges, and a header edited to rename or retype a tensor would otherwise keep every range intact."""
    listed = {e.name for e in manifest}
    for entry in manifest:
        record = source.records.get(entry.name)
        if record is None:
            problem = f"in {MANIFEST} but not in the folder"
            report.results.append(Result("manifest", str(source.folder), False, problem, entry.name))
            continue
        held = (
            Path(record.stream.paths[0]).name if len(record.stream.paths) == 1 else record.stream.label,
            record.dtype,
            record.shape,
            record.offset,
            record.offset + record.nbytes,
        )
        said = (entry.file, entry.dtype, entry.shape, entry.begin, entry.end)
        if held != said:
            problem = (
                f"the folder holds it in {shown(held[0])} as {held[1]} {list(held[2])} at [{held[3]}, {held[4]}), "
                f"{MANIFEST} says {shown(said[0])} as {said[1]} {list(said[2])} at [{said[3]}, {said[4]})"
            )
            report.results.append(Result("manifest", record.stream.label, False, problem, entry.name))
    for name in sorted(set(source.records) - listed):
        report.results.append(Result("manifest", source.records[name].stream.label, False, f"not in {MANIFEST}", name))


def _check_metadata(source: Source, report: Report) -> None:
    """Each weights file's keys (GGUF's key/value entries: rope base, head counts, the vocabulary, the chat
    template) are what manifest.json recorded when the file was written. SHA256SUMS covers them too, but its line
    for an edited file can be rewritten; the manifest names the key that changed."""
    try:
        recorded = read_manifest_metadata(source.folder)
    except ConvertError as exc:
        report.add_error("metadata", exc)
        return
    if recorded is None:
        return
    from convert.containers import format_of

    container = format_of(source.layout)
    for name, expected in recorded.items():
        path = source.folder / name
        actual = container.metadata(path) if path.name == name and path.is_file() else None
        if actual is None:
            report.results.append(Result("metadata", str(path), False, f"in {MANIFEST} but not a file of the model"))
            continue
        differences = metadata_differences(expected, actual, f"{MANIFEST} records")
        for key, what in differences:
            report.results.append(Result("metadata", str(path), False, f"key {key} {what}"))
        if not differences:
            report.results.append(Result("metadata", str(path), True))


def _check_zip_crcs(source: Source, report: Report) -> None:
    """Without checksums, a torch zip still carries a CRC-32 per record: a corrupt download shows there. Read
    through the source's own streams, so split parts are checked as the one file they make."""
    from convert.containers import format_of

    for stream in source.streams:
        records = [r for r in source.records.values() if r.stream is stream and r.checked is not None]
        if not records:
            continue
        problems = format_of(source.layout).check_records(records)
        for problem in problems:
            report.add_error("crc32", problem)
        if not problems:
            report.results.append(Result("crc32", stream.label, True))


def _compare_against(folder: Source, original: Source, report: Report, feed: FolderFeed | None = None) -> None:
    """Every tensor of the folder equals the source's tensor mapped through the tables: first its name, dtype,
    shape and length (a prefix of equal bytes proves nothing about a longer tensor), then byte for byte. feed:
    hashes the folder's bytes as they are read (its follow() is told the ranges to come, in order)."""
    from convert.containers import format_of
    from convert.planning.plan import PlanOptions, build_plan
    from convert.verify.compare import Comparer

    instruct = format_of(folder.layout).has_chat_template(folder.folder, folder.weight_files)
    plan = build_plan(original, folder.layout.name, PlanOptions(outtype=folder.outtype, instruct=instruct))
    _compare_small_files(folder, plan, report)
    expected = {t.name: t for t in plan.tensors}
    comparable = set()
    for name, tensor in expected.items():
        record = folder.records.get(name)
        if record is None:
            report.results.append(Result("against", str(folder.folder), False, "missing", name))
            continue
        held = (record.dtype, record.shape, record.nbytes)
        if held != (tensor.dtype, tensor.shape, tensor.nbytes):
            problem = (
                f"is {record.dtype} {list(record.shape)} ({record.nbytes:,} bytes), the converted source is "
                f"{tensor.dtype} {list(tensor.shape)} ({tensor.nbytes:,} bytes)"
            )
            report.results.append(Result("against", record.stream.label, False, problem, name))
            continue
        comparable.add(name)
    compared = []
    for output in plan.files:
        starts = output.tensor_starts()
        compared.append(
            [
                (p, folder.records[p.tensor], starts[p.tensor])
                for p in sorted(output.pieces, key=lambda p: p.dst_offset)
                if p.tensor in comparable
            ]
        )
    if feed is not None:
        feed.follow(
            (r.stream, r.offset + p.dst_offset - start, r.offset + p.dst_offset - start + p.out_nbytes)
            for pieces in compared
            for p, r, start in pieces
        )
    comparer = Comparer(feed)
    try:
        for output, pieces in zip(plan.files, compared, strict=True):
            failed: set[str] = set()
            for piece, mismatch in comparer.mismatches(pieces):
                failed.add(piece.tensor)
                problem = f"differs from the converted source at byte {mismatch} of the tensor"
                report.results.append(Result("against", folder.records[piece.tensor].stream.label, False, problem,
                                             piece.tensor))  # fmt: skip
            for name in sorted({p.tensor for p in output.pieces} & comparable - failed):
                report.results.append(Result("against", folder.records[name].stream.label, True, None, name))
    finally:
        comparer.close()
    for name in sorted(set(folder.records) - set(expected)):
        report.results.append(Result("against", str(folder.folder), False, "not in the source", name))


def _compare_small_files(folder: Source, plan: Plan, report: Report) -> None:
    """Everything but the tensors, against what converting the source writes: each weights file's keys (GGUF's
    rope base, head counts, vocabulary, chat template ...), and each file whose bytes the plan holds whole
    (config.json, params.json, the tokenizer files) or copies (tokenizer.model), naming the key that differs.
    SHA256SUMS and manifest.json are the folder's own record, checked above, and what depends on the split into
    files (Format.split_files, split_keys) is the structure check's."""
    from convert.containers import format_of

    container = format_of(folder.layout)

    def model_keys(records: dict) -> dict:
        return {k: v for k, v in records.items() if not k.startswith(container.split_keys)}

    planned: dict = {}
    for output in plan.files:
        planned.update(model_keys(dict(output.metadata or {})))
    if planned:
        held: dict = {}
        for path in folder.weight_files:
            held.update(model_keys(container.metadata(path) or {}))
        where = str(folder.weight_files[0])
        differences = metadata_differences(planned, held, "the source gives")
        for key, what in differences:
            report.results.append(Result("against", where, False, f"key {key} {what}"))
        if not differences:
            report.results.append(Result("against", where, True, None))
    for output in plan.files:
        path = folder.folder / output.name
        if output.name in (SUMS, MANIFEST, *container.split_files) or output.metadata is not None:
            continue
        if not output.is_text and output.copy_of is None:
            continue
        expected = output.text.encode("utf-8") if output.is_text else output.copy_of.read_bytes()  # type: ignore[union-attr]
        if not is_present(path):
            report.results.append(Result("against", str(path), False, "missing; converting the source writes it"))
            continue
        try:
            actual_bytes = read_small(path, max(len(expected), 1) * 2 + 2**16, output.name)
        except ConvertError as exc:
            report.add_error("against", exc)
            continue
        if actual_bytes == expected:
            report.results.append(Result("against", str(path), True, None))
            continue
        report.results.append(Result("against", str(path), False, _first_difference(actual_bytes, expected)))


def _first_difference(actual: bytes, expected: bytes) -> str:
    """Where a small file differs from what the source gives: the first JSON key whose value differs, for JSON."""
    try:
        have, want = json.loads(actual), json.loads(expected)
    except (ValueError, UnicodeDecodeError, RecursionError):
        at = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
        at = min(len(actual), len(expected)) if at is None else at
        return f"differs from what the source gives at byte {at:,}"
    where = _json_difference(have, want, "")
    if where is None:
        return "differs from what the source gives in its formatting (the same JSON values)"
    key, got, wanted = where
    return f"key {key or '(the whole file)'} is {got!r:.80}; the source gives {wanted!r:.80}"


def _json_difference(have: object, want: object, path: str) -> tuple[str, object, object] | None:
    if isinstance(have, dict) and isinstance(want, dict):
        for key in [*want, *(k for k in have if k not in want)]:
            if key not in have or key not in want:
                return (f"{path}.{key}" if path else key, have.get(key, "(absent)"), want.get(key, "(absent)"))
            found = _json_difference(have[key], want[key], f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    if isinstance(have, list) and isinstance(want, list):
        for index, (a, b) in enumerate(zip(have, want, strict=False)):
            found = _json_difference(a, b, f"{path}[{index}]")
            if found is not None:
                return found
        if len(have) != len(want):
            return (f"{path} length", len(have), len(want))
        return None
    if have != want or type(have) is not type(want):
        return (path, have, want)
    return None


def verify_folder(folder: Path, *, against: Path | None = None, pins: Traversable | None = None) -> Report:
    with run_scope():
        return _verify(folder, against, pins)


def _compare_and_hash(
    hasher: FolderHasher, opened: Source, against: Path, wanted: dict[Path, list[tuple[ManifestEntry, str]]]
) -> tuple[list[Result], dict[Path, FileHashes]]:
    """verify --against's results, and the files it hashed for the checksum pass from the same reads. After a
    failed read nothing is taken from it: the checksum pass then reads every file itself, as it always did, so
    a read error there is still the error it was."""
    from convert.planning.source import open_source
    from convert.verify.onepass import FolderFeed

    compared = Report(str(opened.folder))
    feed = FolderFeed(hasher, wanted)
    try:
        with open_source(against) as original:
            _compare_against(opened, original, compared, feed)
    except ConvertError as exc:
        compared.add_error("against", exc)
        return compared.results, {}
    return compared.results, feed.finish()


def _verify(folder: Path, against: Path | None, pins: Traversable | None) -> Report:
    report = Report(str(folder))
    _check_folder(folder)
    try:
        manifest = read_manifest(folder)
    except ConvertError as exc:  # a manifest that cannot be read is a failed check; the rest still runs
        report.add_error("manifest", exc)
        manifest = None
    with ExitStack() as stack:
        hasher = FolderHasher()
        stack.callback(hasher.close)
        # Without --against, every file whose SHA-256 alone is wanted is hashed while the folder is opened and
        # checked below. A failure meanwhile stops the run first, so that close() need not wait for the hashing.
        stack.push(lambda _type, error, _trace: run_stop().fail(error) if error is not None else None)
        started = None
        if against is None:
            stack.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(min(HANDOFF_INTERVAL, sys.getswitchinterval()))
            started = _start_sha256_pass(hasher, _hash_targets(folder, manifest), {})
        from convert.planning.plan import check_source
        from convert.planning.source import open_source

        # The folder is opened before its files are hashed, so that with --against the comparison can hash
        # them as it reads them; the results keep their order: checksums, pins, structure, against.
        try:
            opened: Source | None = stack.enter_context(open_source(folder))
        except ConvertError as exc:
            opened, unopened = None, exc
        problems = check_source(opened) if opened is not None else []
        compared: list[Result] = []
        hashed: dict[Path, FileHashes] = {}
        if against is not None and opened is not None and not problems:
            compared, hashed = _compare_and_hash(hasher, opened, against, _hash_targets(folder, manifest))
        if started is not None:
            hashed = started()
        _check_sums_with(hasher, folder, report, manifest, hashed)
        if pins is not None:
            from convert.verify.pins import check_pins

            check_pins(folder, pins, report)
        if opened is None:
            report.add_error("structure", unopened)
            return report
        report.layout = opened.layout.name
        for problem in problems:
            report.add_error("structure", problem)
        if not problems:
            report.results.append(Result("structure", str(folder), True))
        if manifest is not None and not problems:
            _check_manifest_places(opened, manifest, report)
            _check_metadata(opened, report)
        if not (folder / SUMS).is_file():
            _check_zip_crcs(opened, report)
        report.results.extend(compared)
    return report
