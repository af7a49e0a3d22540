"""GGUF through the command line, end to end: from every layout, at every outtype, split, interrupted, verified,
and back; every tensor read with the `gguf` package's own GGUFReader (never our reader) and compared with what
gguf-py computes from the ORIGINAL tensors as torch.load reads them from the torrent.

The expected names, types and data are spelled here from llama.cpp's rules (docs/formats.md, "GGUF"), not taken
from convert/containers/gguf/: 1-D tensors, *_norm and ffn_gate_inp are F32; a Q8_0 row that is not whole 32-element
blocks falls back to F16; shapes are in ggml order (innermost first); q/k rows go through in the torrent's order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize
from helpers import REPO, assert_one_line_error, differing_files, run_cli
from synthetic import DEFAULT, TinyConfig, make_weights, write_megablocks, write_mistral, write_torrent

from convert.fileio.faults import FAULT_ENV, STALL_AT_ENV
from convert.fileio.workers import CHUNK
from convert.run.pipeline import convert_checkpoint
from convert.run.resume import JOURNAL
from convert.sample import tokenizer_model

pytestmark = pytest.mark.e2e

F32, F16, BF16, Q8_0 = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                        GGMLQuantizationType.Q8_0)  # fmt: skip
WIDE_TYPE = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0}
OUTTYPE_OF = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / ...
INTEGRITY = {"SHA256SUMS", "manifest.json"}  # they name their own source, so two routes differ there by design
# A model whose embedding and output matrices span several of the streaming chunks (convert/workers.py CHUNK) at
# f32 (40000 x 128 x 4 bytes = 20.5 MB), and whose expert rows of 80 are not whole Q8_0 blocks (F16 fallback).
WIDE = TinyConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=80, n_experts=2, vocab=40000)
SPLIT_SIZE = "200KB"  # the default model's bf16 GGUF (about 630 kB) then comes in several files


def origin(folder: Path, cfg: TinyConfig, dtype: torch.dtype, seed: int, split_parts: int | None = None) -> Path:
    """A torrent-layout checkpoint with a real SentencePiece tokenizer.model when its vocabulary fits the model."""
    weights = make_weights(cfg, seed, dtype)
    write_torrent(folder, cfg, weights, split_parts=split_parts)
    if split_parts is None:  # as torch.save writes a named file (records under "consolidated.00/", not "archive/")
        torch.save(weights, folder / "consolidated.00.pth")
    if cfg.vocab == DEFAULT.vocab:
        (folder / "tokenizer.model").write_bytes(tokenizer_model(cfg.vocab))
    else:  # no tokenizer: the GGUF then has no vocabulary, and the conversion warns about it
        (folder / "tokenizer.model").unlink()
    return folder


def original_tensors(torrent: Path) -> dict[str, torch.Tensor]:
    return torch.load(torrent / "consolidated.00.pth", weights_only=True)


def gguf_named(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original tensors under llama.cpp's names, experts stacked [n_experts, rows, cols], in torch order."""
    out = {"token_embd.weight": weights["tok_embeddings.weight"]}
    n_layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("layers."))
    for layer in range(n_layers):
        p, b = f"layers.{layer}.", f"blk.{layer}."
        for ours, theirs in [
            ("attention.wq", "attn_q"),
            ("attention.wk", "attn_k"),
            ("attention.wv", "attn_v"),
            ("attention.wo", "attn_output"),
            ("attention_norm", "attn_norm"),
            ("ffn_norm", "ffn_norm"),
            ("feed_forward.gate", "ffn_gate_inp"),
        ]:
            out[f"{b}{theirs}.weight"] = weights[f"{p}{ours}.weight"]
        n_experts = len([k for k in weights if k.startswith(p + "feed_forward.experts.") and k.endswith(".w1.weight")])
        for w, theirs in [("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")]:
            experts = [weights[f"{p}feed_forward.experts.{e}.{w}.weight"] for e in range(n_experts)]
            out[f"{b}{theirs}.weight"] = torch.stack(experts)
    out["output_norm.weight"] = weights["norm.weight"]
    out["output.weight"] = weights["output.weight"]
    return out


def expected_type(name: str, shape: tuple[int, ...], outtype: str) -> GGMLQuantizationType:
    """llama.cpp's convert_hf_to_gguf.py rule (ModelBase.prepare_tensors), written out independently."""
    if len(shape) == 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight"):
        return F32
    if outtype == "q8_0" and shape[-1] % 32:
        return F16  # gguf.quants raises QuantError on a partial block; the converter falls back to F16
    return WIDE_TYPE[outtype]


def expected_bytes(tensor: torch.Tensor, ggml_type: GGMLQuantizationType) -> bytes:
    """What gguf-py writes for the tensor: through float32, then its own quantizer (numpy's astype for F16)."""
    values = tensor.float().numpy()
    return (values if ggml_type == F32 else quantize(values, ggml_type)).tobytes()


def reader_tensors(files: list[Path]) -> list[tuple[str, GGMLQuantizationType, list[int], bytes]]:
    """(name, type, ggml shape, bytes) of every tensor of the files, in file order, as GGUFReader reads them."""
    found = []
    for path in files:
        for t in GGUFReader(path).tensors:
            found.append((t.name, GGMLQuantizationType(t.tensor_type), [int(n) for n in t.shape], t.data.tobytes()))
    return found


def field(path: Path, key: str) -> object:
    return GGUFReader(path).fields[key].contents()


def gguf(src: Path, dst: Path, *extra: object) -> Path:
    run_cli("convert", src, dst, "--to", "gguf", "--no-progress", *extra)
    return dst


def check_against_original(folder: Path, originals: dict[str, torch.Tensor], outtype: str) -> None:
    """Every tensor of folder/model.gguf: name, type, ggml shape and bytes as gguf-py makes them from the original."""
    expected = gguf_named(originals)
    got = reader_tensors([folder / "model.gguf"])
    assert sorted(name for name, *_ in got) == sorted(expected)
    for name, ggml_type, shape, data in got:
        want_type = expected_type(name, tuple(expected[name].shape), outtype)
        assert ggml_type == want_type, name
        assert shape == list(reversed(expected[name].shape)), name
        assert data == expected_bytes(expected[name], want_type), name
    assert field(folder / "model.gguf", "general.file_type") == FILE_TYPE[outtype]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in sample (a bf16 torrent as the release writes it, with a real SentencePiece tokenizer.model) and
    its GGUF at every outtype (the default one with no --outtype)."""
    root = tmp_path_factory.mktemp("bf16")
    src = root / "torrent"
    run_cli("sample", src)
    out = {"src": src, "bf16": gguf(src, root / "bf16")}
    for outtype in ("f16", "f32", "q8_0"):
        out[outtype] = gguf(src, root / outtype, "--outtype", outtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. Every layout -> gguf gives the same bytes; gguf -> every layout equals the direct conversion

# Every source layout at bf16; at f16 and f32 the layouts whose readers differ most (a pickle, safetensors with
# the torrent's names, safetensors with HF's names and q/k order), to keep the file quick.
SOURCES = {
    torch.bfloat16: ("torrent", "split", "mistral", "megablocks", "hf"),
    torch.float16: ("torrent", "mistral", "hf"),
    torch.float32: ("torrent", "megablocks", "hf"),
}
BACK = {
    torch.bfloat16: ("torrent", "mistral", "megablocks", "hf"),
    torch.float16: ("torrent", "hf"),
    torch.float32: ("torrent", "mistral"),
}


@pytest.mark.parametrize("dtype", list(SOURCES), ids=["bf16", "f16", "f32"])
def test_every_layout_gives_one_gguf_and_gguf_gives_every_layout(tmp_path: Path, dtype: torch.dtype) -> None:
    weights = make_weights(DEFAULT, seed=7, dtype=dtype)
    torrent = origin(tmp_path / "torrent", DEFAULT, dtype, seed=7)
    tokenizer = (torrent / "tokenizer.model").read_bytes()
    # the direct conversions of the original are references, made in-process by the same converter
    direct = {"torrent": torrent}
    for layout in ("mistral", "megablocks", "hf"):
        direct[layout] = tmp_path / f"direct-{layout}"
        convert_checkpoint(torrent, direct[layout], layout)
    synthetic = {"split": tmp_path / "split", "mistral": tmp_path / "mistral", "megablocks": tmp_path / "megablocks"}
    origin(synthetic["split"], DEFAULT, dtype, seed=7, split_parts=12)
    write_mistral(synthetic["mistral"], DEFAULT, weights)  # as safetensors itself writes it
    write_megablocks(synthetic["megablocks"], DEFAULT, weights)  # as torch.save writes 8 scattered files
    for folder in synthetic.values():
        (folder / "tokenizer.model").write_bytes(tokenizer)
    sources = {"torrent": torrent, "hf": direct["hf"], **synthetic}

    outputs = {name: gguf(sources[name], tmp_path / f"gguf-from-{name}") for name in SOURCES[dtype]}
    reference = outputs["torrent"]
    for name, folder in outputs.items():
        assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "manifest.json", "model.gguf",
                                                             "tokenizer.model"], name  # fmt: skip
        assert (folder / "model.gguf").read_bytes() == (reference / "model.gguf").read_bytes(), name
        assert (folder / "tokenizer.model").read_bytes() == tokenizer, name
    # no silent cast: the weights keep the checkpoint's type, and the vocabulary came from tokenizer.model
    check_against_original(reference, original_tensors(torrent), OUTTYPE_OF[dtype])
    assert len(field(reference / "model.gguf", "tokenizer.ggml.tokens")) == DEFAULT.vocab

    for layout in BACK[dtype]:
        back = tmp_path / f"back-{layout}"
        run_cli("convert", reference, back, "--to", layout, "--no-progress")
        if layout == "torrent":  # every tensor of the original, bit for bit, by torch.load
            got, want = original_tensors(back), original_tensors(torrent)
            assert sorted(got) == sorted(want)
            assert all(got[k].dtype == dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8))
                       for k in want)  # fmt: skip
            assert json.loads((back / "params.json").read_text()) == json.loads((torrent / "params.json").read_text())
            assert (back / "tokenizer.model").read_bytes() == tokenizer
            continue
        assert set(differing_files(back, direct[layout])) <= INTEGRITY, layout
        tensors = json.loads((direct[layout] / "manifest.json").read_text())["tensors"]
        assert json.loads((back / "manifest.json").read_text())["tensors"] == tensors, layout


def test_the_release_layout_goes_through_gguf_and_back_to_its_own_bytes(bf16: dict[str, Path], tmp_path: Path) -> None:
    """The sample is written as the release's consolidated.00.pth is: torrent (bf16) -> gguf bf16 -> torrent gives
    the original file, byte for byte."""
    run_cli("convert", bf16["bf16"], tmp_path / "back", "--to", "torrent", "--no-progress")
    for name in ("consolidated.00.pth", "tokenizer.model"):
        assert (tmp_path / "back" / name).read_bytes() == (bf16["src"] / name).read_bytes(), name
    params = json.loads((bf16["src"] / "params.json").read_text())
    assert json.loads((tmp_path / "back" / "params.json").read_text()) == params


# ---------------------------------------------------------------------------------------------------------------
# 2. Each outtype: the types follow llama.cpp's rule and the bytes are gguf-py's, from the original tensors


@pytest.mark.parametrize("outtype", ["bf16", "f16", "f32", "q8_0"])
def test_each_outtype_is_what_gguf_py_makes_of_the_original(bf16: dict[str, Path], outtype: str) -> None:
    check_against_original(bf16[outtype], original_tensors(bf16["src"]), outtype)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    src = origin(root / "torrent", WIDE, torch.float32, seed=9)
    assert WIDE.vocab * WIDE.dim * 4 > 2 * CHUNK  # the embedding streams in at least three chunks
    return src


@pytest.mark.parametrize("outtype", ["q8_0", "f16", "bf16"])
def test_tensors_that_span_several_chunks_convert_as_one(wide: Path, tmp_path: Path, outtype: str) -> None:
    """An f32 checkpoint whose largest tensors cross chunk boundaries, with Q8_0's F16 fallback (rows of 80)."""
    out = gguf(wide, tmp_path / "out", "--outtype", outtype)
    check_against_original(out, original_tensors(wide), outtype)
    if outtype == "q8_0":
        types = {name: t for name, t, _, _ in reader_tensors([out / "model.gguf"])}
        # ffn_down_exps rows are hidden_dim = 80 long: not whole blocks, F16; ffn_gate_exps rows are dim = 128 long
        assert types["blk.0.ffn_down_exps.weight"] == F16 and types["blk.0.ffn_gate_exps.weight"] == Q8_0


def test_a_value_past_the_first_chunk_is_named_by_its_place_in_the_tensor(tmp_path: Path) -> None:
    """The element a failing line names counts from the tensor's start, not from the slice being converted."""
    weights = make_weights(WIDE, seed=9, dtype=torch.float32)
    row, column = 39000, 7  # 39000 * 128 * 4 bytes: in the third 8 MiB chunk of the embedding
    weights["tok_embeddings.weight"][row, column] = 1e6
    assert row * WIDE.dim * 4 > 2 * CHUNK
    write_torrent(tmp_path / "src", WIDE, weights)
    failed = run_cli("convert", tmp_path / "src", tmp_path / "out", "--to", "gguf", "--outtype", "f16", check=False)
    assert_one_line_error(
        failed, f"tensor tok_embeddings.weight: value 1e+06 at element {row * WIDE.dim + column} overflows F16"
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. Values that do not fit


def test_f16_overflow_names_the_tensor_and_leaves_no_model(tmp_path: Path) -> None:
    weights = make_weights(DEFAULT, seed=4)
    weights["layers.1.attention.wk.weight"][3, 5] = 70000.0  # bf16 holds it as 70144; float16 stops at 65504
    write_torrent(tmp_path / "src", DEFAULT, weights)
    (tmp_path / "src" / "tokenizer.model").write_bytes(tokenizer_model(DEFAULT.vocab))
    dst = tmp_path / "out"
    failed = run_cli("convert", tmp_path / "src", dst, "--to", "gguf", "--outtype", "f16", check=False)
    assert failed.returncode == 2
    # the line names where the value is: the source file and its tensor, as every other line does
    source = tmp_path / "src" / "consolidated.00.pth"
    assert_one_line_error(
        failed, f"error: {source}: tensor layers.1.attention.wk.weight: value 70144 at element 197 overflows F16"
    )
    assert not (dst / "model.gguf").exists() and not (dst / "SHA256SUMS").exists()
    assert not (dst / "manifest.json").exists()


def test_an_f32_norm_that_bf16_cannot_hold_is_refused_on_the_way_back(bf16: dict[str, Path], tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(bf16["bf16"], edited)
    model = edited / "model.gguf"
    norm = next(t for t in GGUFReader(model).tensors if t.name == "blk.1.ffn_norm.weight")
    assert GGMLQuantizationType(norm.tensor_type) == F32
    with open(model, "r+b") as handle:  # element 5 becomes 1 + 2^-20: a float32 with more bits than bf16's 8
        handle.seek(int(norm.data_offset) + 5 * 4)
        handle.write(struct.pack("<f", 1.0 + 2.0**-20))
    refused = run_cli("convert", edited, tmp_path / "back", "--to", "torrent", check=False)
    assert refused.returncode == 2
    assert_one_line_error(
        refused,
        f"error: {model}: tensor blk.1.ffn_norm.weight: value 1.0000009536743164 at element 5 is not exactly "
        "representable in BF16",
    )
    assert not (tmp_path / "back" / "params.json").exists()
    # the conversion read the GGUF itself; its SHA256SUMS, left as it was, tells verify of the edit
    assert run_cli("verify", edited, check=False).returncode != 0


# ---------------------------------------------------------------------------------------------------------------
# 4. gguf-split splits


def split_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.gguf"))


@pytest.fixture(scope="module")
def split(bf16: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gguf(bf16["src"], tmp_path_factory.mktemp("split") / "out", "--max-shard-size", SPLIT_SIZE)


def test_split_files_are_gguf_split_files(bf16: dict[str, Path], split: Path) -> None:
    names = split_names(split)
    count = len(names)
    assert count >= 3
    assert names == [f"model-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    files = [split / name for name in names]
    tensors = reader_tensors(files)
    for i, path in enumerate(files):
        assert field(path, "split.no") == i
        assert field(path, "split.count") == count
        assert field(path, "split.tensors.count") == len(tensors)
        assert path.stat().st_size <= 200_000 or len(GGUFReader(path).tensors) == 1
    assert field(files[0], "llama.expert_count") == DEFAULT.n_experts
    assert tensors == reader_tensors([bf16["bf16"] / "model.gguf"])  # names, types, shapes, bytes, order
    sums = (split / "SHA256SUMS").read_text()
    assert all(name in sums for name in names)


def test_a_split_set_converts_back_bit_exact(bf16: dict[str, Path], split: Path, tmp_path: Path) -> None:
    run_cli("convert", split, tmp_path / "back", "--to", "torrent", "--no-progress")
    original = (bf16["src"] / "consolidated.00.pth").read_bytes()
    assert (tmp_path / "back" / "consolidated.00.pth").read_bytes() == original


def test_incomplete_or_mixed_split_sets_are_refused(bf16: dict[str, Path], split: Path, tmp_path: Path) -> None:
    names = split_names(split)
    count = len(names)
    missing = tmp_path / "missing"
    shutil.copytree(split, missing)
    (missing / names[1]).unlink()
    refused = run_cli("convert", missing, tmp_path / "a", "--to", "torrent", check=False)
    assert refused.returncode == 2
    assert_one_line_error(refused, names[1], "missing")

    stray = tmp_path / "stray"
    shutil.copytree(split, stray)
    shutil.copy(bf16["bf16"] / "model.gguf", stray / "model.gguf")
    refused = run_cli("convert", stray, tmp_path / "b", "--to", "torrent", check=False)
    assert refused.returncode == 2
    assert_one_line_error(refused, "GGUF models", "model.gguf", names[0])

    other = tmp_path / "other"  # a split of some other model beside a complete set
    shutil.copytree(split, other)
    shutil.copy(split / names[1], other / f"other-00002-of-{count:05d}.gguf")
    refused = run_cli("convert", other, tmp_path / "d", "--to", "torrent", check=False)
    assert refused.returncode == 2
    assert_one_line_error(refused, f"other-00002-of-{count:05d}.gguf is not part of the GGUF model {names[0]}")

    later = tmp_path / "later"
    later.mkdir()
    shutil.copy(split / names[1], later / names[1])
    refused = run_cli("convert", later, tmp_path / "c", "--to", "torrent", check=False)
    assert refused.returncode == 2
    assert_one_line_error(refused, str(later), f"no first file of GGUF models ({names[1]})")
    assert count == int(names[1][-10:-5])


# ---------------------------------------------------------------------------------------------------------------
# 5. Dry run and verify


@pytest.mark.parametrize("outtype", ["bf16", "f16", "f32", "q8_0", "split"])
def test_dry_run_sizes_and_verify(bf16: dict[str, Path], split: Path, tmp_path: Path, outtype: str) -> None:
    written = split if outtype == "split" else bf16[outtype]
    extra = ["--max-shard-size", SPLIT_SIZE] if outtype == "split" else ["--outtype", outtype]
    plan = run_cli("convert", bf16["src"], tmp_path / "dry", "--to", "gguf", "--dry-run", "--json", *extra)
    assert not (tmp_path / "dry").exists()
    sizes = {f["name"]: f["size"] for f in json.loads(plan.stdout)["files"]}
    assert sizes == {p.name: p.stat().st_size for p in written.iterdir()}
    if outtype in ("bf16", "q8_0", "split"):  # --against also runs verify's own checks (SHA256SUMS, manifest)
        run_cli("verify", written, "--against", bf16["src"])
    else:  # f16 and f32 compare with the source as bf16 does
        run_cli("verify", written)


def test_a_flipped_byte_in_a_tensor_is_found(bf16: dict[str, Path], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(bf16["q8_0"], damaged)
    model = damaged / "model.gguf"
    attn_v = next(t for t in GGUFReader(model).tensors if t.name == "blk.1.attn_v.weight")
    data = bytearray(model.read_bytes())
    data[int(attn_v.data_offset) + 100] ^= 0x10  # a quant byte inside the tensor's data
    model.write_bytes(data)
    plain = run_cli("verify", damaged, check=False)
    assert plain.returncode != 0 and "model.gguf" in plain.stdout + plain.stderr
    (damaged / "SHA256SUMS").unlink()  # against the source, the tensor itself is found wrong
    against = run_cli("verify", damaged, "--against", bf16["src"], check=False)
    assert against.returncode != 0 and "blk.1.attn_v.weight" in against.stdout + against.stderr


# ---------------------------------------------------------------------------------------------------------------
# 6. Interrupted and resumed


def terminated_at(src: Path, dst: Path, stall_at: str, *extra: str) -> None:
    """Start a GGUF conversion, wait until it is writing stall_at, SIGTERM it there: exit 130."""
    env = dict(os.environ, **{STALL_AT_ENV: stall_at})
    command = [sys.executable, "-m", "convert", "convert", src, dst, "--to", "gguf", "--no-progress", *extra]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    partial = dst / f"{stall_at}.partial"
    deadline = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size > 0):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr


def test_terminated_then_resumed_equals_uninterrupted(bf16: dict[str, Path], tmp_path: Path) -> None:
    src, dst = bf16["src"], tmp_path / "out"
    terminated_at(src, dst, "model.gguf")  # the default outtype: the checkpoint's bf16
    assert not (dst / "model.gguf").exists() and not (dst / "SHA256SUMS").exists()
    refused = run_cli("convert", src, dst, "--to", "gguf", check=False)
    assert_one_line_error(refused, "interrupted conversion", "--resume")
    # f16 files have the very sizes of bf16 ones: only the recorded outtype tells the two runs apart
    for outtype in ("f16", "q8_0"):
        other = run_cli("convert", src, dst, "--to", "gguf", "--outtype", outtype, "--resume", check=False)
        assert other.returncode == 2
        assert_one_line_error(other, "cannot resume", "other settings")
    run_cli("convert", src, dst, "--to", "gguf", "--resume", "--no-progress")
    assert differing_files(dst, bf16["bf16"]) == []


def test_a_split_conversion_resumes_after_its_finished_files(
    bf16: dict[str, Path], split: Path, tmp_path: Path
) -> None:
    """Without checksums, so that no manifest.json's size tells the outtypes apart: the journal must."""
    src, dst = bf16["src"], tmp_path / "out"
    names = split_names(split)
    options = ["--to", "gguf", "--max-shard-size", SPLIT_SIZE, "--no-checksums"]
    terminated_at(src, dst, names[1], *options[2:])
    finished = (dst / names[0]).stat().st_mtime_ns
    other = run_cli("convert", src, dst, *options, "--outtype", "f16", "--resume", check=False)
    assert_one_line_error(other, "cannot resume", "other settings")
    run_cli("convert", src, dst, *options, "--resume", "--no-progress")
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in split.iterdir() if p.name not in INTEGRITY)
    for name in names:
        assert (dst / name).read_bytes() == (split / name).read_bytes(), name
    assert (dst / names[0]).stat().st_mtime_ns == finished  # kept, not rewritten


# (fault, exit status, the line's start): an I/O error in the writer, and a bug in the tensor hasher
FAULTS = [
    ("write:2:OSError", 2, "mixtral-convert: error: /"),
    ("tensor-hash:5:RuntimeError", 3, "mixtral-convert: internal error: RuntimeError: injected"),
]


@pytest.mark.parametrize(("fault", "status", "prefix"), FAULTS, ids=[f for f, _, _ in FAULTS])
def test_a_failure_mid_conversion_then_resume_gives_the_same_bytes(
    bf16: dict[str, Path], tmp_path: Path, fault: str, status: int, prefix: str
) -> None:
    """tests/test_fault_injection.py's machinery on a q8_0 conversion (the quantizing cast in the stream)."""
    src, dst = bf16["src"], tmp_path / "out"
    command = [sys.executable, "-m", "convert", "convert", src, dst, "--to", "gguf", "--outtype", "q8_0"]
    env = dict(os.environ, **{FAULT_ENV: fault})
    failed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == status and len(lines) == 1 and lines[0].startswith(prefix), failed.stderr
    assert "injected" in lines[0]
    assert not (dst / "SHA256SUMS").exists() and not (dst / "model.gguf").exists()
    again = "--resume" if (dst / JOURNAL).exists() else "--force"
    run_cli("convert", src, dst, "--to", "gguf", "--outtype", "q8_0", again, "--no-progress")
    assert differing_files(dst, bf16["q8_0"]) == []


# ---------------------------------------------------------------------------------------------------------------
# 7. Misplaced --outtype, and a quantized GGUF as a source


def test_outtype_is_for_gguf_only(bf16: dict[str, Path], tmp_path: Path) -> None:
    for layout in ("hf",):
        refused = run_cli("convert", bf16["src"], tmp_path / layout, "--to", layout, "--outtype", "f16", check=False)
        assert refused.returncode == 2
        assert_one_line_error(refused, "--outtype f16", f"--to {layout}")
        assert not (tmp_path / layout).exists()


def test_a_q8_0_gguf_is_one_way_but_inspected_and_verified(bf16: dict[str, Path], tmp_path: Path) -> None:
    q8 = bf16["q8_0"]
    for layout in ("torrent",):
        refused = run_cli("convert", q8, tmp_path / layout, "--to", layout, check=False)
        assert refused.returncode == 2
        assert_one_line_error(
            refused,
            f"{q8 / 'model.gguf'}: tensor token_embd.weight: is Q8_0: quantized GGUF is one-way, its weights cannot "
            "be restored; convert from the original checkpoint instead",
        )
    info = json.loads(run_cli("inspect", q8, "--json").stdout)
    assert info["layout"] == "gguf", info
    run_cli("verify", q8)


# ---------------------------------------------------------------------------------------------------------------
# 8. --instruct


def test_instruct_writes_the_chat_template_hf_writes(bf16: dict[str, Path], tmp_path: Path) -> None:
    out = gguf(bf16["src"], tmp_path / "gguf", "--instruct")
    run_cli("convert", bf16["src"], tmp_path / "hf", "--to", "hf", "--instruct", "--no-progress")
    template = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"]
    assert template and field(out / "model.gguf", "tokenizer.chat_template") == template
    with pytest.raises(KeyError):
        field(bf16["bf16"] / "model.gguf", "tokenizer.chat_template")  # only on request
    tensors = reader_tensors([out / "model.gguf"])
    assert tensors == reader_tensors([bf16["bf16"] / "model.gguf"])


@pytest.mark.parametrize("outtype", ["q4_k_m", "q5_0"])
def test_a_nan_weight_is_refused_by_the_quantizing_outtypes(tmp_path: Path, outtype: str) -> None:
    """A NaN in one expert of a model quantized to a llama-quantize mix: exit 2, one line naming the source file,
    the tensor and the element, and no output that looks complete."""
    from dataclasses import replace

    cfg = replace(DEFAULT, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)  # whole Q4_K blocks
    weights = make_weights(cfg, 5)
    weights["layers.1.feed_forward.experts.2.w3.weight"][7, 100] = float("nan")
    write_torrent(tmp_path / "src", cfg, weights)
    result = run_cli("convert", tmp_path / "src", tmp_path / "out", "--to", "gguf", "--outtype", outtype, check=False)
    assert_one_line_error(result, "tensor layers.1.feed_forward.experts.2.w3.weight: value nan at element 1892")
    assert result.returncode == 2
    assert "consolidated.00.pth" in result.stderr and "NaN or infinite weights" in result.stderr
    assert not (tmp_path / "out" / "model.gguf").exists()


def test_a_q4_k_m_conversion_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    """A llama-quantize mix, split in two files, stopped while writing the second: resuming keeps the first and
    writes the bytes an uninterrupted run writes; another mix cannot resume it."""
    from dataclasses import replace

    cfg = replace(DEFAULT, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)  # whole Q4_K blocks
    src = tmp_path / "src"
    write_torrent(src, cfg, make_weights(cfg, 9))
    options = ["--outtype", "q4_k_m", "--max-shard-size", "1MB"]
    whole = tmp_path / "whole"
    run_cli("convert", src, whole, "--to", "gguf", *options, "--no-progress")
    names = sorted(p.name for p in whole.glob("model-*.gguf"))
    assert len(names) >= 2, names
    dst = tmp_path / "out"
    terminated_at(src, dst, names[1], *options)
    finished = (dst / names[0]).stat().st_mtime_ns
    other = run_cli("convert", src, dst, "--to", "gguf", "--outtype", "q5_k_m", "--max-shard-size", "1MB", "--resume",
                    check=False)  # fmt: skip
    assert_one_line_error(other, "cannot resume", "other settings")
    run_cli("convert", src, dst, "--to", "gguf", *options, "--resume", "--no-progress")
    assert (dst / names[0]).stat().st_mtime_ns == finished  # kept, not written again
    assert differing_files(dst, whole) == []


def test_every_layout_gives_the_same_q4_k_m_file(tmp_path: Path) -> None:
    """A llama-quantize mix from torrent, mistral, megablocks, hf and a bf16 GGUF (whose F32 norms and router are
    restored to bf16 before the mix leaves them F32 again): one and the same model.gguf."""
    from dataclasses import replace

    cfg = replace(DEFAULT, dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=64)  # whole Q4_K blocks
    write_torrent(tmp_path / "torrent", cfg, make_weights(cfg, 13))
    for layout in ("mistral", "megablocks", "hf", "gguf"):
        convert_checkpoint(tmp_path / "torrent", tmp_path / layout, layout)
    files = {}
    for layout in ("torrent", "mistral", "megablocks", "hf", "gguf"):
        run_cli("convert", tmp_path / layout, tmp_path / f"q-{layout}", "--to", "gguf", "--outtype", "q4_k_m",
                "--no-progress")  # fmt: skip
        files[layout] = (tmp_path / f"q-{layout}" / "model.gguf").read_bytes()
    assert [layout for layout, data in files.items() if data != files["torrent"]] == []
