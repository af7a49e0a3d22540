"""llama.cpp as the real client of GGUF, proven on the files llama.cpp's own converter writes.

A tiny checkpoint goes torrent -> `python -m convert ... --to hf` -> llama.cpp's convert_hf_to_gguf.py (the copy
vendored in the installed llama-cpp-python's sdist, see tests/llama_client.py) at f32, f16, bf16 and q8_0; llama.cpp
loads each file and its logits are compared with tests/reference.py's forward pass of the ORIGINAL weights, and its
tokenizer with SentencePiece. The same harness then proves our own GGUF writer: see the notes at the end.

Relative error here is, at a position, the largest |llama.cpp - reference| over the vocabulary divided by the largest
|reference| anywhere (the logit scale, ~5); a bound holds for the largest such error over the positions compared.
"""

from __future__ import annotations

import hashlib
import mmap
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import CliRunner
from reference import forward, router_margins
from synthetic import DEFAULT, TinyConfig, make_weights, write_torrent

pytestmark = pytest.mark.clients

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make setup` installs it)")

import gguf  # noqa: E402  (after the skip: only these tests need it)
from llama_client import (  # noqa: E402
    MIXTRAL_TOKENIZER_MD5,
    OUTTYPES,
    compare_gguf,
    llama_converter,
    llama_converter_many,
    load,
    logits,
    mixtral_tokenizer,
    tokenize,
)
from test_tokenizer import train  # noqa: E402  (a Mistral-like SentencePiece model trained in memory)

# dim 64, 2 layers, 4 heads of 16 (2 KV heads), ffn 96, 4 experts with 2 per token, vocab 1003: every row length
# (64, 96) is a multiple of Q8_0's block of 32, so q8_0 quantizes every 2-D tensor (no F16 fallback).
CFG = DEFAULT
SEED = 21
# Three sequences of 12 ids, including the last vocab row (1002) so a truncated embedding or output shows.
TOKENS = [
    [1, 5, 1002, 17, 300, 999, 42, 8, 700, 3, 64, 1001],
    [1, 900, 2, 77, 77, 512, 13, 1000, 250, 6, 31, 400],
    [1, 263, 264, 265, 1002, 0, 99, 98, 97, 96, 95, 94],
]
F32_BOUND = 1e-4
# Measured on this model (n_threads 1, F32 KV cache), relative error at the positions with clear routing: f32 4e-7,
# f16 7e-4, bf16 3.4e-3 (llama.cpp rounds the activations to bf16 for BF16 weights), q8_0 2.5e-2 (2.35e-2 with
# llama.cpp built at -O3). Each bound is 2-3x the measurement and far below what a wrong conversion does (the q/k
# row-order bug below moves the logits by 0.56).
LOSSY_BOUNDS = {"bf16": 1e-2, "f16": 2e-3, "q8_0": 5e-2}
# Positions where some layer's k-th and (k+1)-th router logits are closer than this (router logits are O(1) here)
# may route to other experts under a lossy type: q8_0 moved two such positions (margins 0.04 and 0.02) by 0.2 and
# 0.16 relative. Those positions are left out of the error bound and the top-token check; most positions are not.
ROUTER_MARGIN = 0.1
# A top token is "clear" where the reference's top-2 logits are at least this fraction of the logit scale apart.
# Chosen independently of the bounds, so that the top-token check is not implied by the error bound (2x q8_0's bound
# would be 0.1): it can fail on an error that stays under the bound but concentrates on the leading logits.
TOP_MARGIN = 0.05
# Strings for the tokenizer comparison: spaces (leading, double, trailing), digits, punctuation, non-ASCII (byte
# fallback where a character is not in the vocabulary), special-token text read as text, tabs and newlines.
TEXTS = [
    "Hello world",
    "the capital of France is Paris.",
    "  two leading spaces and  a double one ",
    "12345 + 678 = 13023",
    "café naïve Zürich Ελληνικά 日本語",
    "[INST] What is the answer? [/INST]",
    "<s> and </s> and <unk> as text",
    "tab\tand\nnewline",
    "a",
]


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny checkpoint, its hf folder and llama.cpp's GGUF of it at each outtype, built once per module


@pytest.fixture(scope="module")
def tokenizer_model() -> bytes:
    """A real SentencePiece model with exactly CFG.vocab pieces (the torrent's tokenizer.model)."""
    return train(vocab_size=CFG.vocab)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return make_weights(CFG, SEED)


@pytest.fixture(scope="module")
def hf_folder(
    tmp_path_factory: pytest.TempPathFactory, cli: CliRunner, weights: dict[str, torch.Tensor], tokenizer_model: bytes
) -> Path:
    root = tmp_path_factory.mktemp("llama_cpp")
    src, dst = root / "torrent", root / "hf"
    write_torrent(src, CFG, weights)
    (src / "tokenizer.model").write_bytes(tokenizer_model)
    cli("convert", src, dst, "--to", "hf", "--from", "torrent", "--no-progress")
    return dst


@pytest.fixture(scope="module")
def theirs(hf_folder: Path) -> Iterator[Callable[[str], Path]]:
    """theirs(outtype): llama.cpp's converter's GGUF of hf_folder. The first call converts to every outtype, and
    to bf16 a second time ("bf16 again", for compare_gguf's test), in one interpreter: most of a run is importing
    torch and the converter."""
    files = {name: hf_folder.parent / f"theirs-{name.replace(' ', '-')}.gguf" for name in [*OUTTYPES, "bf16 again"]}

    def get(name: str) -> Path:
        if not files[name].is_file():
            llama_converter_many(hf_folder, [(path, n.split()[0]) for n, path in files.items() if not path.is_file()])
        return files[name]

    yield get


@pytest.fixture(scope="module")
def reference(weights: dict[str, torch.Tensor]) -> np.ndarray:
    """The original model's float32 logits [sequences, positions, vocab]."""
    return forward(weights, CFG, torch.tensor(TOKENS)).numpy()


def llama_logits(path: Path) -> np.ndarray:
    model = load(path)
    try:
        return np.stack([logits(model, seq) for seq in TOKENS])
    finally:
        model.close()


# ---------------------------------------------------------------------------------------------------------------
# Logits


def test_f32_logits_equal_the_reference(theirs: Callable[[str], Path], reference: np.ndarray) -> None:
    """At f32 llama.cpp computes what the original model computes (the weights are the bf16 values, exactly)."""
    got = llama_logits(theirs("f32"))
    assert got.shape == reference.shape == (len(TOKENS), len(TOKENS[0]), CFG.vocab)
    error = relative_error(got, reference)
    print(f"f32 relative error {error:.3g}")
    assert error < F32_BOUND, f"f32 logits differ from the reference by {error:.3g} relative (bound {F32_BOUND})"


@pytest.fixture(scope="module")
def clear_routing(weights: dict[str, torch.Tensor]) -> np.ndarray:
    """[sequences, positions]: True where the reference's expert choice is far from a tie in every layer."""
    return (router_margins(weights, CFG, torch.tensor(TOKENS)) >= ROUTER_MARGIN).numpy()


@pytest.mark.parametrize("outtype", list(LOSSY_BOUNDS))
def test_lossy_logits_keep_the_top_token(
    outtype: str, theirs: Callable[[str], Path], reference: np.ndarray, clear_routing: np.ndarray
) -> None:
    """bf16, f16, q8_0, at every position whose expert choice is not a near tie: the error stays under the bound,
    and the top token is the reference's wherever the reference's top-2 margin is clear (TOP_MARGIN)."""
    assert clear_routing.mean() > 0.75, "too many near-tie routings for the comparison to mean anything"
    got = llama_logits(theirs(outtype))
    scale = np.abs(reference).max()
    per_position = np.abs(got - reference).max(-1) / scale
    error = per_position[clear_routing].max()
    print(f"{outtype} relative error {error:.3g} (near-tie routing positions: up to {per_position.max():.3g})")
    bound = LOSSY_BOUNDS[outtype]
    assert error < bound, f"{outtype} logits differ from the reference by {error:.3g} relative (bound {bound})"
    top2 = np.sort(reference, axis=-1)[..., -2:]
    clear = clear_routing & ((top2[..., 1] - top2[..., 0]) > TOP_MARGIN * scale)
    # 58% of the positions here; a third is enough for the check to mean something.
    assert clear.mean() > 1 / 3, "too few positions with a clear top token for the comparison to mean anything"
    flipped = np.argwhere(clear & (got.argmax(-1) != reference.argmax(-1)))
    assert not len(flipped), f"{outtype}: top token differs at (sequence, position) {flipped.tolist()}"


def test_logit_bounds_catch_a_wrong_model(weights: dict[str, torch.Tensor], reference: np.ndarray) -> None:
    """The lossy bounds are tight enough to fail on a conversion bug: q/k copied without llama.cpp's row order
    (here: each head's rotary pairs (0,1),(2,3),... swapped) moves the logits past every bound."""
    wrong = dict(weights)
    for layer in range(CFG.n_layers):
        for name, heads in (("wq", CFG.n_heads), ("wk", CFG.n_kv_heads)):
            key = f"layers.{layer}.attention.{name}.weight"
            w = weights[key]
            wrong[key] = w.view(heads, CFG.head_dim // 2, 2, CFG.dim).transpose(1, 2).reshape(w.shape)
    moved = relative_error(forward(wrong, CFG, torch.tensor(TOKENS)).numpy(), reference)
    assert moved > 3 * max(LOSSY_BOUNDS.values()), f"a q/k row-order bug moves logits only {moved:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


def sentencepiece_ids(model_bytes: bytes, text: str) -> list[int]:
    return [1, *spm.SentencePieceProcessor(model_proto=model_bytes).encode(text)]


def assert_tokenizes_like_sentencepiece(gguf_path: Path, model_bytes: bytes) -> None:
    """llama.cpp's ids for each text are BOS + SentencePiece's (no EOS: add_bos_token true, add_eos_token false)."""
    model = load(gguf_path, vocab_only=True)
    try:
        differing = {}
        for text in TEXTS:
            ours, spms = tokenize(model, text), sentencepiece_ids(model_bytes, text)
            if ours != spms:
                differing[text] = (ours, spms)
    finally:
        model.close()
    assert not differing, f"llama.cpp vs SentencePiece: {differing}"


def test_tokenization_equals_sentencepiece_small_vocab(theirs: Callable[[str], Path], tokenizer_model: bytes) -> None:
    assert_tokenizes_like_sentencepiece(theirs("f32"), tokenizer_model)


@pytest.fixture(scope="module")
def mixtral_vocabulary(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> dict[str, Path]:
    """A 1-layer checkpoint with Mixtral's own tokenizer.model (32000 pieces, from mistral-common) ("torrent"),
    our hf output of it ("hf"), and what llama.cpp's converter writes from that: the whole model at f32
    ("theirs") and the vocabulary alone, --vocab-only ("vocab"), both in one run of the converter (most of a run
    is importing torch and the converter). The tests only read them."""
    cfg: TinyConfig = replace(CFG, n_layers=1, vocab=32000)
    root = tmp_path_factory.mktemp("mixtral_vocabulary")
    made = {name: root / name for name in ("torrent", "hf")}
    made |= {name: root / f"{name}.gguf" for name in ("theirs", "vocab")}
    write_torrent(made["torrent"], cfg, make_weights(cfg, SEED))
    (made["torrent"] / "tokenizer.model").write_bytes(mixtral_tokenizer().read_bytes())
    cli("convert", made["torrent"], made["hf"], "--to", "hf", "--from", "torrent", "--no-progress")
    llama_converter_many(made["hf"], [(made["theirs"], "f32"), (made["vocab"], "f32", True)])
    return made


def test_tokenization_equals_sentencepiece_mixtral(mixtral_vocabulary: dict[str, Path]) -> None:
    """Mixtral's own tokenizer.model (32000 pieces, from mistral-common), through our hf output and llama.cpp's
    converter with --vocab-only."""
    model_bytes = mixtral_tokenizer().read_bytes()
    assert hashlib.md5(model_bytes).hexdigest() == MIXTRAL_TOKENIZER_MD5
    assert (mixtral_vocabulary["torrent"] / "tokenizer.model").read_bytes() == model_bytes
    assert_tokenizes_like_sentencepiece(mixtral_vocabulary["vocab"], model_bytes)


# ---------------------------------------------------------------------------------------------------------------
# What llama.cpp's converter writes (the facts our writer must match; docs/formats.md states them)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_tensor_types(outtype: str, theirs: Callable[[str], Path]) -> None:
    """Norms and the router stay F32; every other tensor takes the outtype (Q8_0 here: all rows are 32-multiples)."""
    types = tensor_types(theirs(outtype))
    assert len(types) == 3 + 10 * CFG.n_layers
    main = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    for name, kind in types.items():
        kept = name.endswith(("_norm.weight", "ffn_gate_inp.weight"))
        assert kind == ("F32" if kept else main), f"{outtype}: {name} is {kind}"


def ggml_tensors(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GGUF tensors (row-major shapes, the reverse of GGML's) from the ORIGINAL torrent-named weights: q/k rows
    as Mistral stores them (interleaved rotary pairs), each layer's experts stacked along a new first axis."""
    out = {"token_embd.weight": w["tok_embeddings.weight"], "output_norm.weight": w["norm.weight"]}
    out["output.weight"] = w["output.weight"]
    for layer in range(CFG.n_layers):
        t, g = f"layers.{layer}.", f"blk.{layer}."
        for ours, mistral in (("attn_q", "attention.wq"), ("attn_k", "attention.wk"), ("attn_v", "attention.wv")):
            out[f"{g}{ours}.weight"] = w[f"{t}{mistral}.weight"]
        out[g + "attn_output.weight"] = w[t + "attention.wo.weight"]
        out[g + "attn_norm.weight"] = w[t + "attention_norm.weight"]
        out[g + "ffn_norm.weight"] = w[t + "ffn_norm.weight"]
        out[g + "ffn_gate_inp.weight"] = w[t + "feed_forward.gate.weight"]
        for ours, mistral in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
            experts = [w[f"{t}feed_forward.experts.{e}.{mistral}.weight"] for e in range(CFG.n_experts)]
            out[f"{g}{ours}.weight"] = torch.stack(experts)
    return out


def encoded(t: torch.Tensor, kind: str) -> bytes:
    """t's bytes as GGML type `kind`, every type from the float32 values (f16/bf16 rounded to nearest even; Q8_0 by
    the gguf package's numpy mirror of llama.cpp's reference quantizer)."""
    f32 = t.float()
    if kind == "F32":
        return f32.numpy().tobytes()
    if kind == "F16":
        return f32.half().numpy().tobytes()
    if kind == "BF16":
        return f32.bfloat16().view(torch.int16).numpy().tobytes()
    assert kind == "Q8_0", kind
    return gguf.quants.quantize(f32.numpy(), gguf.GGMLQuantizationType.Q8_0).tobytes()


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_tensor_bytes(outtype: str, theirs: Callable[[str], Path], weights: dict[str, torch.Tensor]) -> None:
    """Every tensor's shape and bytes are the original weight's, renamed, stacked and encoded in its type: q/k go
    through in the torrent's own row order (llama.cpp undoes the hf permutation), and Q8_0 is gguf.quants'."""
    expected = ggml_tensors(weights)
    reader = gguf.GGUFReader(theirs(outtype))
    assert {t.name for t in reader.tensors} == set(expected)
    for tensor in reader.tensors:
        want = expected[tensor.name]
        assert [int(n) for n in tensor.shape] == list(reversed(want.shape)), tensor.name
        got = np.ascontiguousarray(tensor.data).view(np.uint8).tobytes()
        assert got == encoded(want, tensor.tensor_type.name), f"{outtype}: {tensor.name} bytes"


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_llama_cpp_metadata(outtype: str, theirs: Callable[[str], Path]) -> None:
    """The hyperparameter and tokenizer keys hold the checkpoint's values."""
    reader = gguf.GGUFReader(theirs(outtype))

    def value(key: str) -> object:
        return reader.fields[key].contents()

    expected = {
        "general.architecture": "llama",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[outtype],
        "llama.block_count": CFG.n_layers,
        "llama.embedding_length": CFG.dim,
        "llama.feed_forward_length": CFG.hidden_dim,
        "llama.attention.head_count": CFG.n_heads,
        "llama.attention.head_count_kv": CFG.n_kv_heads,
        "llama.expert_count": CFG.n_experts,
        "llama.expert_used_count": CFG.experts_per_tok,
        "llama.rope.dimension_count": CFG.head_dim,
        "llama.vocab_size": CFG.vocab,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: value(k) for k in expected} == expected
    assert value("llama.rope.freq_base") == pytest.approx(CFG.theta)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(CFG.norm_eps)
    assert len(value("tokenizer.ggml.tokens")) == CFG.vocab


# ---------------------------------------------------------------------------------------------------------------
# compare_gguf, the check the GGUF writer's tests use against llama.cpp's files


def field_value_offset(path: Path, key: str) -> tuple[int, int]:
    """(file offset, length) of a metadata value's bytes (a string's characters, a scalar's bytes)."""
    reader = gguf.GGUFReader(path)
    part = reader.fields[key].parts[reader.fields[key].data[0]]
    base = reader.data.__array_interface__["data"][0]
    return part.__array_interface__["data"][0] - base, part.nbytes


def patched(path: Path, to: Path, offset: int, data: bytes) -> Path:
    shutil.copyfile(path, to)
    with open(to, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as view:
        view[offset : offset + len(data)] = data
    return to


def test_compare_gguf_same_and_different(theirs: Callable[[str], Path]) -> None:
    """Two runs at one outtype compare equal; different outtypes differ in file_type and in each tensor's type."""
    assert compare_gguf(theirs("bf16 again"), theirs("bf16"), tensor_order=True) == []
    diffs = compare_gguf(theirs("f16"), theirs("bf16"))
    assert "metadata general.file_type: ours 1, theirs 32" in diffs
    retyped = {n for n, kind in tensor_types(theirs("bf16")).items() if kind == "BF16"}
    assert {f"tensor {n}: type ours F16, theirs BF16" for n in retyped} <= set(diffs)
    assert len(diffs) == 1 + len(retyped)


def test_compare_gguf_finds_one_changed_byte(theirs: Callable[[str], Path], tmp_path: Path) -> None:
    """One byte of one tensor, or of one metadata value, is found and named; a changed general.name is not a
    difference (a naming key)."""
    original = theirs("q8_0")
    reader = gguf.GGUFReader(original)
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
    offset = int(tensor.data_offset) + 100
    flipped = bytes([reader.data[offset] ^ 0x01])
    assert compare_gguf(patched(original, tmp_path / "t.gguf", offset, flipped), original) == [
        "tensor blk.1.ffn_down_exps.weight: data bytes differ"
    ]
    offset, _ = field_value_offset(original, "llama.expert_used_count")
    one = (1).to_bytes(4, "little")
    assert compare_gguf(patched(original, tmp_path / "k.gguf", offset, one), original) == [
        f"metadata llama.expert_used_count: ours 1, theirs {CFG.experts_per_tok}"
    ]
    offset, length = field_value_offset(original, "general.name")
    assert compare_gguf(patched(original, tmp_path / "n.gguf", offset, b"X" * length), original) == []


# ---------------------------------------------------------------------------------------------------------------
# Our writer (convert/containers/gguf/), through the same harness: from every source layout, at every outtype, the
# file equals llama.cpp's converter's (tensors, types, shapes, bytes, metadata; naming keys aside), and llama.cpp
# loads it and computes the reference's logits.

SOURCE_LAYOUTS = ("torrent", "mistral", "megablocks", "hf")


@pytest.fixture(scope="module")
def sources(hf_folder: Path, cli: CliRunner) -> dict[str, Path]:
    """The checkpoint in every layout: the torrent written by torch.save (tests/synthetic.py), hf by our
    conversion (whose equivalence the other tests prove), mistral and megablocks converted from the torrent."""
    root = hf_folder.parent
    folders = {"torrent": root / "torrent", "hf": hf_folder}
    for name in ("mistral", "megablocks"):
        folders[name] = root / name
        cli("convert", folders["torrent"], folders[name], "--to", name, "--no-progress")
    return folders


@pytest.fixture(scope="module")
def ours(sources: dict[str, Path], cli: CliRunner) -> Callable[[str, str], Path]:
    """ours(layout, outtype): our GGUF of the checkpoint as stored in layout."""
    made: dict[tuple[str, str], Path] = {}

    def get(layout: str, outtype: str) -> Path:
        if (layout, outtype) not in made:
            out = sources[layout].parent / f"ours-{layout}-{outtype}"
            cli("convert", sources[layout], out, "--to", "gguf", "--outtype", outtype, "--no-progress")
            made[layout, outtype] = out / "model.gguf"
        return made[layout, outtype]

    return get


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("layout", SOURCE_LAYOUTS)
def test_our_gguf_is_llama_cpps(
    layout: str, outtype: str, ours: Callable[[str, str], Path], theirs: Callable[[str], Path]
) -> None:
    """Same tensors (names, GGML types, shapes, bytes, Q8_0 blocks included) and metadata values as the file
    llama.cpp's converter writes from our hf output, whichever layout the checkpoint came from."""
    assert compare_gguf(ours(layout, outtype), theirs(outtype)) == []


@pytest.mark.parametrize("layout", SOURCE_LAYOUTS)
def test_llama_cpp_runs_our_f32_gguf(layout: str, ours: Callable[[str, str], Path], reference: np.ndarray) -> None:
    error = relative_error(llama_logits(ours(layout, "f32")), reference)
    assert error < F32_BOUND, f"{layout}: f32 logits differ from the reference by {error:.3g} relative"


@pytest.mark.parametrize("outtype", list(LOSSY_BOUNDS))
def test_llama_cpp_runs_our_lossy_gguf(
    outtype: str, ours: Callable[[str, str], Path], reference: np.ndarray, clear_routing: np.ndarray
) -> None:
    """As test_lossy_logits_keep_the_top_token, on our file from the torrent."""
    got = llama_logits(ours("torrent", outtype))
    scale = np.abs(reference).max()
    error = (np.abs(got - reference).max(-1) / scale)[clear_routing].max()
    assert error < LOSSY_BOUNDS[outtype], f"{outtype}: {error:.3g} relative (bound {LOSSY_BOUNDS[outtype]})"
    top2 = np.sort(reference, axis=-1)[..., -2:]
    clear = clear_routing & ((top2[..., 1] - top2[..., 0]) > TOP_MARGIN * scale)
    flipped = np.argwhere(clear & (got.argmax(-1) != reference.argmax(-1)))
    assert not len(flipped), f"{outtype}: top token differs at (sequence, position) {flipped.tolist()}"


def test_llama_cpp_tokenizes_our_gguf_like_sentencepiece(
    ours: Callable[[str, str], Path], tokenizer_model: bytes
) -> None:
    assert_tokenizes_like_sentencepiece(ours("torrent", "bf16"), tokenizer_model)


def test_our_mixtral_vocabulary_is_llama_cpps(
    tmp_path: Path, cli: CliRunner, mixtral_vocabulary: dict[str, Path]
) -> None:
    """Mixtral's own tokenizer.model (32000 pieces): our GGUF's vocabulary keys equal those llama.cpp's converter
    writes from our hf output, and llama.cpp tokenizes with them as SentencePiece does."""
    model_bytes = mixtral_tokenizer().read_bytes()
    ggml = tmp_path / "gguf"
    cli("convert", mixtral_vocabulary["torrent"], ggml, "--to", "gguf", "--outtype", "f32", "--no-progress")
    assert compare_gguf(ggml / "model.gguf", mixtral_vocabulary["theirs"]) == []
    assert_tokenizes_like_sentencepiece(ggml / "model.gguf", model_bytes)


def test_our_instruct_gguf_has_llama_cpps_chat_template(
    hf_folder: Path, sources: dict[str, Path], cli: CliRunner
) -> None:
    """With --instruct, tokenizer.chat_template is the one llama.cpp's converter copies from our hf output's
    tokenizer_config.json (compare_gguf compares every key but the naming ones)."""
    root = hf_folder.parent
    cli("convert", sources["torrent"], root / "hf-instruct", "--to", "hf", "--instruct", "--no-progress")
    cli("convert", sources["torrent"], root / "ours-instruct", "--to", "gguf", "--instruct", "--no-progress")
    theirs = llama_converter(root / "hf-instruct", root / "theirs-instruct.gguf", "bf16")
    assert compare_gguf(root / "ours-instruct" / "model.gguf", theirs) == []
    reader = gguf.GGUFReader(root / "ours-instruct" / "model.gguf")
    assert "tokenizer.chat_template" in reader.fields


def test_llama_cpp_runs_our_split_gguf(sources: dict[str, Path], cli: CliRunner, reference: np.ndarray) -> None:
    """A gguf-split set written with --max-shard-size: llama.cpp opens it from its first file, finds the other files
    by their names and split keys, and computes the reference's logits."""
    out = sources["torrent"].parent / "ours-split"
    cli("convert", sources["torrent"], out, "--to", "gguf", "--outtype", "f32", "--max-shard-size", "200000")
    files = sorted(out.glob("model-*-of-*.gguf"))
    assert len(files) >= 3, files
    error = relative_error(llama_logits(files[0]), reference)
    assert error < F32_BOUND, f"split f32 logits differ from the reference by {error:.3g} relative"
