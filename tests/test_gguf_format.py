"""convert/containers/gguf/ against the real client: the `gguf` package (ggml-org's gguf-py), whose GGUFReader reads
what we lay out, whose GGUFWriter writes what we read, whose quantizers are the reference for our conversions, and
whose SpecialVocab is the code llama.cpp's converter runs on our hf output's tokenizer files."""

from __future__ import annotations

import itertools
import json
import math
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from gguf import MODEL_TENSOR as M
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from test_tokenizer import train

from convert.common.errors import ConvertError
from convert.containers.gguf import casts, writer
from convert.containers.gguf import keys as gkeys
from convert.containers.gguf import reader as greader
from convert.containers.gguf import types as gtypes
from convert.fileio.streams import ByteStream
from convert.model.params import ModelParams
from convert.tokenizer.chat_template import CHAT_TEMPLATE
from convert.tokenizer.hf_files import hf_tokenizer_files

pytestmark = pytest.mark.containers

RNG = np.random.default_rng(20240611)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return train()


def tiny_params(vocab: int = 500, **changes: object) -> ModelParams:
    fields: dict = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, n_experts=4, experts_per_tok=2,
        vocab_size=vocab, norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_position_embeddings=None,
    )  # fmt: skip
    fields.update(changes)
    return ModelParams(**fields)


def mixtral_tensors(p: ModelParams) -> list[tuple[str, tuple[int, ...]]]:
    """Names and torch-order shapes of a Mixtral GGUF (docs/formats.md, GGUF)."""
    out = [(gtypes.tensor_name(M.TOKEN_EMBD), (p.vocab_size, p.dim))]
    for i in range(p.n_layers):
        out += [
            (gtypes.tensor_name(M.ATTN_NORM, i), (p.dim,)),
            (gtypes.tensor_name(M.ATTN_Q, i), (p.n_heads * p.head_dim, p.dim)),
            (gtypes.tensor_name(M.ATTN_K, i), (p.n_kv_heads * p.head_dim, p.dim)),
            (gtypes.tensor_name(M.ATTN_V, i), (p.n_kv_heads * p.head_dim, p.dim)),
            (gtypes.tensor_name(M.ATTN_OUT, i), (p.dim, p.n_heads * p.head_dim)),
            (gtypes.tensor_name(M.FFN_NORM, i), (p.dim,)),
            (gtypes.tensor_name(M.FFN_GATE_INP, i), (p.n_experts, p.dim)),
            (gtypes.tensor_name(M.FFN_GATE_EXP, i), (p.n_experts, p.hidden_dim, p.dim)),
            (gtypes.tensor_name(M.FFN_DOWN_EXP, i), (p.n_experts, p.dim, p.hidden_dim)),
            (gtypes.tensor_name(M.FFN_UP_EXP, i), (p.n_experts, p.hidden_dim, p.dim)),
        ]
    return [*out, (gtypes.tensor_name(M.OUTPUT_NORM), (p.dim,)), (gtypes.tensor_name(M.OUTPUT), (p.vocab_size, p.dim))]


def bf16_bytes(values: np.ndarray) -> bytes:
    """float32 values truncated to bfloat16 bits (values chosen to be exact in bf16 where that matters)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def build_file(
    tmp_path: Path, metadata: list[gkeys.KV], tensors: list[tuple[str, tuple[int, ...]]], outtype: str, *,
    name: str = "m.gguf", chunk: int = 64,
) -> tuple[Path, writer.GGUFLayout, dict[str, bytes], dict[str, np.ndarray]]:  # fmt: skip
    """A GGUF file written only from the layout's pieces, tensor data converted chunk by chunk from bf16."""
    infos = [writer.TensorInfo(n, gtypes.tensor_type(n, s, outtype), s) for n, s in tensors]
    layout = writer.layout_gguf(metadata, infos)
    sources = {n: RNG.standard_normal(math.prod(s)).astype(np.float32) for n, s in tensors}
    data: dict[str, bytes] = {}
    for info in infos:
        raw = bf16_bytes(sources[info.name])
        step = chunk * 2 * 32  # whole Q8_0 blocks of bf16 elements
        data[info.name] = b"".join(
            casts.convert_elements(raw[i : i + step], "BF16", info.ggml_type, tensor=info.name).tobytes()
            for i in range(0, len(raw), step)
        )
    path = tmp_path / name
    with open(path, "wb") as out:
        for piece in layout.runs:
            assert out.tell() == piece.offset
            if piece.kind == "header":
                out.write(layout.header)
            elif piece.kind == "tensor":
                assert piece.tensor is not None and len(data[piece.tensor]) == piece.size
                out.write(data[piece.tensor])
            else:
                out.write(bytes(piece.size))
    assert path.stat().st_size == layout.size
    return path, layout, data, sources


def reader_value(field: gguf.ReaderField) -> object:
    return field.contents()


# ---------------------------------------------------------------------------------------------------------------
# Writing: what GGUFReader reads, and GGUFWriter's own bytes


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_layout_reads_back_with_gguf_reader(tmp_path: Path, model_bytes: bytes, outtype: str) -> None:
    params = tiny_params(hidden_dim=80)  # rows of 80 are not whole Q8_0 blocks: w2 falls back to F16
    metadata = gkeys.model_metadata(params, outtype, name="Tiny") + gkeys.tokenizer_metadata(
        model_bytes, vocab_size=params.vocab_size, instruct=True, source="tokenizer.model"
    )
    tensors = mixtral_tensors(params)
    path, layout, data, _ = build_file(tmp_path, metadata, tensors, outtype)
    reader = gguf.GGUFReader(path)
    assert reader.alignment == 32 and reader.data_offset == len(layout.header)
    assert [t.name for t in reader.tensors] == [n for n, _ in tensors]
    for tensor, (name, shape) in zip(reader.tensors, tensors, strict=True):
        assert tuple(int(d) for d in tensor.shape) == tuple(reversed(shape))
        assert tensor.tensor_type == gtypes.tensor_type(name, shape, outtype)
        assert tensor.data_offset == layout.offsets[name]
        assert bytes(tensor.data.tobytes()) == data[name]
    for entry in metadata:
        field = reader.fields[entry.key]
        assert field.types[0] == entry.type
        if entry.type == V.ARRAY:
            assert field.types[1] == entry.item_type
            expected = entry.value
            got = reader_value(field)
            assert (got == expected) if entry.item_type != V.FLOAT32 else np.array_equal(got, expected)
        elif entry.type == V.FLOAT32:
            assert reader_value(field) == np.float32(entry.value)
        else:
            assert reader_value(field) == entry.value
    assert [k for k in reader.fields if not k.startswith("GGUF.")] == [e.key for e in metadata]
    by_name = {n: gtypes.tensor_type(n, s, outtype) for n, s in tensors}
    wide = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    assert by_name["blk.0.attn_norm.weight"] == by_name["output_norm.weight"] == T.F32
    assert by_name["blk.1.ffn_gate_inp.weight"] == T.F32
    assert by_name["token_embd.weight"] == by_name["output.weight"] == by_name["blk.0.ffn_gate_exps.weight"] == wide
    assert by_name["blk.0.ffn_down_exps.weight"] == (T.F16 if outtype == "q8_0" else wide)


def test_bytes_equal_gguf_writer(tmp_path: Path, model_bytes: bytes) -> None:
    """GGUFWriter, given the same keys and tensors, writes our file byte for byte (header, padding, data)."""
    params = tiny_params(head_dim=8)  # key/value_length written
    metadata = gkeys.model_metadata(params, "q8_0", name="Tiny") + gkeys.tokenizer_metadata(
        model_bytes, vocab_size=params.vocab_size, instruct=False, source="tokenizer.model"
    )
    assert "llama.attention.key_length" in [e.key for e in metadata]
    tensors = mixtral_tensors(params)
    ours, _, data, _ = build_file(tmp_path, metadata, tensors, "q8_0")
    writer = gguf.GGUFWriter(tmp_path / "theirs.gguf", arch="llama")
    for entry in metadata:
        if entry.key != gguf.Keys.General.ARCHITECTURE:
            writer.add_key_value(entry.key, entry.value, entry.type, sub_type=entry.item_type)
    for name, shape in tensors:
        ggml_type = gtypes.tensor_type(name, shape, "q8_0")
        raw = np.frombuffer(data[name], dtype=np.uint8).reshape(*shape[:-1], -1)
        writer.add_tensor(name, raw, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert (tmp_path / "theirs.gguf").read_bytes() == ours.read_bytes()


def test_every_byte_is_a_piece() -> None:
    infos = [writer.TensorInfo("a.weight", T.F32, (3,)), writer.TensorInfo("b.weight", T.BF16, (5, 7)),
             writer.TensorInfo("c.weight", T.Q8_0, (2, 64))]  # fmt: skip
    layout = writer.layout_gguf(gkeys.model_metadata(tiny_params(), "bf16", name="x"), infos)
    position = 0
    for piece in layout.runs:
        assert piece.offset == position and piece.size > 0
        position += piece.size
        if piece.kind != "tensor":
            assert piece.offset % 32 == 0 or piece.kind == "zeros"
    assert position == layout.size and layout.size % 32 == 0
    assert layout.nbytes == {"a.weight": 12, "b.weight": 70, "c.weight": 2 * 68}
    assert layout.zero_blobs == [(layout.offsets["a.weight"] + 12, 20), (layout.offsets["b.weight"] + 70, 26),
                                 (layout.offsets["c.weight"] + 136, 24)]  # fmt: skip


def test_metadata_keys_types_and_order() -> None:
    md = gkeys.model_metadata(tiny_params(rope_theta=1e6, max_position_embeddings=None), "bf16", name="Mixtral")
    assert [(e.key, e.type) for e in md] == [
        ("general.architecture", V.STRING), ("general.type", V.STRING), ("general.name", V.STRING),
        ("llama.block_count", V.UINT32), ("llama.context_length", V.UINT32), ("llama.embedding_length", V.UINT32),
        ("llama.feed_forward_length", V.UINT32), ("llama.attention.head_count", V.UINT32),
        ("llama.attention.head_count_kv", V.UINT32), ("llama.rope.freq_base", V.FLOAT32),
        ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32), ("llama.expert_count", V.UINT32),
        ("llama.expert_used_count", V.UINT32), ("general.file_type", V.UINT32), ("llama.vocab_size", V.UINT32),
        ("llama.rope.dimension_count", V.UINT32), ("general.quantization_version", V.UINT32),
    ]  # fmt: skip
    values = {e.key: e.value for e in md}
    assert values["general.architecture"] == "llama" and values["general.type"] == "model"
    assert values["llama.context_length"] == 32768 and values["llama.rope.freq_base"] == 1e6
    assert values["general.file_type"] == 32 and values["general.quantization_version"] == 2
    assert [gtypes.file_type(o) for o in ("f32", "f16", "bf16", "q8_0")] == [0, 1, 32, 7]
    assert [gtypes.file_type(o) for o in ("q4_0", "q4_k_m", "q5_k_m", "q6_k")] == [2, 15, 17, 18]
    with pytest.raises(ConvertError, match="unknown GGUF outtype 'q2_k'"):
        gtypes.file_type("q2_k")


def test_params_round_trip() -> None:
    for params in (tiny_params(), tiny_params(head_dim=8, max_position_embeddings=4096, rope_theta=1e4,
                                              norm_eps=1e-6)):  # fmt: skip
        layout_md = gkeys.model_metadata(params, "f16", name="x")
        metadata = {e.key: e for e in layout_md}
        assert gkeys.params_from_metadata(metadata, file="m.gguf") == params
    metadata = {e.key: e for e in gkeys.model_metadata(tiny_params(), "f16", name="x")}
    del metadata["llama.expert_count"]
    with pytest.raises(ConvertError, match="not a mixture-of-experts model"):
        gkeys.params_from_metadata(metadata, file="m.gguf")
    metadata["llama.expert_count"] = gkeys.KV("llama.expert_count", V.INT32, 4)
    with pytest.raises(ConvertError, match=r"llama\.expert_count is INT32, llama\.cpp requires UINT32"):
        gkeys.params_from_metadata(metadata, file="m.gguf")


# ---------------------------------------------------------------------------------------------------------------
# Element conversion against gguf.quants


def hard_values(n: int) -> np.ndarray:
    """Random normals plus zeros, whole zero blocks, denormals, large values, exact Q8_0 ties and bf16 ties."""
    values = RNG.standard_normal(n).astype(np.float32) * 0.02
    values[:32] = 0.0  # a zero block: d = 0
    values[32:64] = np.float32(1e-40) * RNG.integers(-5, 5, 32)  # float32 denormals
    values[64:96] = RNG.standard_normal(32).astype(np.float32) * 3e4  # large, still finite in f16
    block = np.arange(-16, 16, dtype=np.float32) + 0.5  # max 15.5 -> x * (1/d) lands on .5 often
    values[96:128] = block * np.float32(127 / 15.5) / np.float32(127 / 15.5)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000], dtype=np.uint32).view(np.float32)
    values[128:132] = ties  # exactly half-way between two bf16 values
    return values


def test_q8_0_f16_bf16_f32_bit_identical_to_gguf_quants_chunk_by_chunk() -> None:
    values = hard_values(32 * 40).reshape(10, 128)
    raw32 = values.tobytes()
    for dst in (T.F32, T.F16, T.BF16, T.Q8_0):
        with np.errstate(all="ignore"):  # the denormal block: 1/d overflows in gguf-py as in ours
            reference = gguf.quants.quantize(values, dst).tobytes()
        whole = casts.convert_elements(raw32, "F32", dst, tensor="t").tobytes()
        assert whole == reference, dst.name
        chunks = b"".join(
            casts.convert_elements(raw32[i : i + 4 * 96], "F32", dst, tensor="t").tobytes()
            for i in range(0, len(raw32), 4 * 96)
        )
        assert chunks == reference, dst.name
        assert len(whole) == gtypes.converted_nbytes(values.size, dst)
    # From bf16 and f16 sources, as llama.cpp converts them (bf16 through float32; f16 kept, widened to quantize).
    bf16_src = bf16_bytes(values)
    widened = (np.frombuffer(bf16_src, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(values.shape)
    f16_src = values.astype(np.float16)
    for dst in (T.F32, T.F16, T.BF16, T.Q8_0):
        from_bf16 = casts.convert_elements(bf16_src, "BF16", dst, tensor="t").tobytes()
        with np.errstate(all="ignore"):
            assert from_bf16 == gguf.quants.quantize(widened, dst).tobytes()
        from_f16 = casts.convert_elements(f16_src.tobytes(), "F16", dst, tensor="t").tobytes()
        with np.errstate(all="ignore"):
            assert from_f16 == gguf.quants.quantize(f16_src, dst).tobytes()


def test_bf16_nan_is_quieted_as_gguf_does() -> None:
    nans = np.array([0x7F800001, 0xFF812345, 0x7FC00000, 0x7F80FFFF], dtype=np.uint32).view(np.float32)
    ours = casts.convert_elements(nans.tobytes(), "F32", T.BF16, tensor="t").tobytes()
    assert ours == gguf.quants.quantize(nans, T.BF16).tobytes()
    assert np.frombuffer(ours, np.uint16).tolist() == [0x7FC0, 0xFFC1, 0x7FC0, 0x7FC0]
    # a signalling bf16 NaN in the source is quieted too: bit-identical to llama.cpp, not a passthrough
    snan = np.array([0x7F81], dtype=np.uint16).tobytes()
    assert casts.convert_elements(snan, "BF16", T.BF16, tensor="t").tobytes() == np.array([0x7FC1], np.uint16).tobytes()


def test_f16_overflow_names_the_tensor() -> None:
    values = np.array([1.0, 65280.0, 65536.0, 2.0], dtype=np.float32)  # all exact in bf16
    with pytest.raises(ConvertError) as error:
        casts.convert_elements(bf16_bytes(values), "BF16", T.F16, tensor="blk.0.attn_q.weight", file="out.gguf")
    line = str(error.value)
    assert line.startswith("out.gguf: tensor blk.0.attn_q.weight: value 65536 at element 2 overflows F16")
    assert "\n" not in line
    # 65504 is the largest finite f16; infinities in the source are not an overflow
    fine = np.array([65504.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    converted = casts.convert_elements(fine.tobytes(), "F32", T.F16, tensor="t")
    assert np.isinf(np.frombuffer(converted, np.float16)[1:3]).all()
    with pytest.raises(ConvertError, match="overflows BF16"):
        casts.convert_elements(np.array([3.4e38], np.float32).tobytes(), "F32", T.BF16, tensor="t")
    with pytest.raises(ConvertError, match="cannot be quantized to Q8_0"):
        casts.convert_elements(np.full(32, np.nan, np.float32).tobytes(), "F32", T.Q8_0, tensor="t")


def test_restore_is_exact_or_refused() -> None:
    values = hard_values(256)
    exact_bf16 = (np.frombuffer(bf16_bytes(values), np.uint16).astype(np.uint32) << 16).view(np.float32)
    back = casts.restore_elements(exact_bf16.tobytes(), T.F32, "BF16", tensor="blk.0.attn_norm.weight")
    assert back.tobytes() == bf16_bytes(values)
    inexact = exact_bf16.copy()
    inexact[7] = np.float32(1.0) + np.float32(2**-20)
    with pytest.raises(ConvertError) as error:
        casts.restore_elements(inexact.tobytes(), T.F32, "BF16", tensor="blk.0.attn_norm.weight", first_element=100)
    assert str(error.value) == (
        "tensor blk.0.attn_norm.weight: value 1.0000009536743164 at element 107 is not exactly representable in BF16;"
        " convert to a layout with F32 tensors instead"
    )
    halves = np.array([1.0, -2.5, 65504.0, 2**-24], dtype=np.float32)
    restored = casts.restore_elements(halves.tobytes(), T.F32, "F16", tensor="t").tobytes()
    assert restored == halves.astype(np.float16).tobytes()
    with pytest.raises(ConvertError, match=r"70000\.0 at element 0"):
        casts.restore_elements(np.array([70000.0], np.float32).tobytes(), T.F32, "F16", tensor="t")
    f16 = np.array([1.0, 1.0009765625], dtype=np.float16)  # the second needs 10 mantissa bits: not a bf16
    with pytest.raises(ConvertError, match="element 1 is not exactly representable in BF16"):
        casts.restore_elements(f16.tobytes(), T.F16, "BF16", tensor="t")
    assert casts.restore_elements(f16.tobytes(), T.F16, "F32", tensor="t").tobytes() == f16.astype(np.float32).tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer metadata: llama.cpp's converter on our hf output, and SentencePiece


def llama_cpp_vocab(folder: Path, vocab_size: int) -> list[tuple[str, int, object, int | None]]:
    """What convert_hf_to_gguf.py's _set_vocab_sentencepiece writes for a folder, with its rules restated from
    llama.cpp (TextModel._create_vocab_sentencepiece): SentencePiece's pieces, scores and types, then ids in
    tokenizer_config.json's added_tokens_decoder typed CONTROL (special) with score -1000; then gguf-py's own
    SpecialVocab (the real code) for ids, add_* flags and the chat template."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = 1
        if sp.IsUnknown(i):
            kind = 2
        elif sp.IsControl(i):
            kind = 3
        elif sp.IsUnused(i):
            kind = 5
        elif sp.IsByte(i):
            kind = 6
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(kind)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for token_id, data in config["added_tokens_decoder"].items():
        assert data.get("special")
        tokens[int(token_id)] = data["content"]
        scores[int(token_id)] = -1000.0
        types[int(token_id)] = 3
    out_path = folder / "vocab.gguf"
    writer = gguf.GGUFWriter(out_path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=vocab_size).add_to_gguf(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(out_path)
    return [
        (key, field.types[0], field.contents(), field.types[1] if len(field.types) > 1 else None)
        for key, field in reader.fields.items()
        if not key.startswith(("general.", "GGUF."))
    ]


@pytest.mark.parametrize("instruct", [False, True])
def test_tokenizer_metadata_equals_llama_cpp_on_our_hf_output(tmp_path: Path, model_bytes: bytes, instruct: bool) -> None:  # noqa: E501
    files = hf_tokenizer_files(model_bytes, vocab_size=500, instruct=instruct, source="tokenizer.model")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    expected = llama_cpp_vocab(tmp_path, 500)
    ours = gkeys.tokenizer_metadata(model_bytes, vocab_size=500, instruct=instruct, source="tokenizer.model")
    got = [(e.key, e.type, e.value, e.item_type) for e in ours]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    for (key, _, value, item), (_, _, reference, ref_item) in zip(got, expected, strict=True):
        assert item == ref_item, key
        assert (np.float32(value) == np.float32(reference)).all() if item == V.FLOAT32 else value == reference, key
    values = {e.key: e.value for e in ours}
    assert values["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and values["tokenizer.ggml.scores"][:3] == [-1000.0] * 3
    assert values.get("tokenizer.chat_template") == (CHAT_TEMPLATE if instruct else None)
    # the rest are SentencePiece's own pieces, scores and types (NORMAL 1, BYTE 6)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    assert values["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(500)]
    assert values["tokenizer.ggml.scores"][3:] == [sp.GetScore(i) for i in range(3, 500)]
    assert values["tokenizer.ggml.token_type"][3:] == [6 if sp.IsByte(i) else 1 for i in range(3, 500)]


def test_tokenizer_metadata_refuses_a_wrong_vocabulary(model_bytes: bytes) -> None:
    with pytest.raises(ConvertError, match="tokenizer has 500 pieces but the model's vocabulary is 512"):
        gkeys.tokenizer_metadata(model_bytes, vocab_size=512, instruct=False, source="tokenizer.model")


# ---------------------------------------------------------------------------------------------------------------
# Splitting


def test_split_as_gguf_split(tmp_path: Path) -> None:
    params = tiny_params(vocab=256)
    metadata = gkeys.model_metadata(params, "bf16", name="Tiny")
    infos = [writer.TensorInfo(n, gtypes.tensor_type(n, s, "bf16"), s) for n, s in mixtral_tensors(params)]
    assert len(writer.split_tensors(infos, None)) == 1
    max_size = 100_000
    groups = writer.split_tensors(infos, max_size)
    assert [i for g in groups for i in g] == infos and len(groups) > 2
    for group in groups:  # each file holds at most max_size of padded data, unless one tensor alone is larger
        size = sum(i.nbytes + (-i.nbytes % 32) for i in group)
        assert size <= max_size or len(group) == 1
    for first, second in itertools.pairwise(groups):  # and the next tensor would not have fit
        assert sum(i.nbytes + (-i.nbytes % 32) for i in first) + second[0].nbytes + (-second[0].nbytes % 32) > max_size
    files = writer.layout_split(metadata, infos, stem="Tiny-BF16", max_size=max_size)
    count = len(files)
    assert [name for name, _ in files] == [f"Tiny-BF16-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert writer.layout_split(metadata, infos, stem="Tiny-BF16")[0][0] == "Tiny-BF16.gguf"
    for index, (name, layout) in enumerate(files):
        path = tmp_path / name
        with open(path, "wb") as out:
            out.write(layout.header)
            out.truncate(layout.size)
        reader = gguf.GGUFReader(path)
        keys = list(reader.fields)
        assert keys[-3:] == ["split.no", "split.tensors.count", "split.count"]
        assert (len(keys) > 3 + 3) == (index == 0)  # GGUF.* pseudo-fields aside, model keys in the first only
        assert reader.fields["split.no"].types == [V.UINT16] and reader.fields["split.no"].contents() == index
        assert reader.fields["split.count"].types == [V.UINT16] and reader.fields["split.count"].contents() == count
        assert reader.fields["split.tensors.count"].types == [V.INT32]
        assert reader.fields["split.tensors.count"].contents() == len(infos)
    paths = greader.split_paths(tmp_path / files[0][0])
    assert [p.name for p in paths] == [name for name, _ in files]
    opened = [ByteStream([p]) for p in paths]
    try:
        read = [greader.read_gguf(s) for s in opened]
        greader.check_splits(paths, [m for m, _ in read], sum(len(r) for _, r in read))
        with pytest.raises(ConvertError, match=r"split.no \d+ of split.count \d+, but the file name makes it 0 of"):
            greader.check_splits(paths, [m for m, _ in read][::-1], sum(len(r) for _, r in read))
    finally:
        for s in opened:
            s.close()
    (tmp_path / files[-1][0]).unlink()
    with pytest.raises(ConvertError, match=f"split {files[-1][0]} is missing"):
        greader.split_paths(tmp_path / files[0][0])
    with pytest.raises(ConvertError, match="give the first split"):
        greader.split_paths(tmp_path / files[1][0])


# ---------------------------------------------------------------------------------------------------------------
# Reading GGUF as a source


def write_with_gguf_writer(path: Path, tensors: dict[str, np.ndarray], raw_types: dict[str, T] | None = None,
                           **keys: tuple[object, V]) -> None:  # fmt: skip
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, (value, vtype) in keys.items():
        writer.add_key_value(key.replace("__", "."), value, vtype)
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=(raw_types or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> tuple[dict[str, gkeys.KV], list]:
    stream = ByteStream([path])
    try:
        return greader.read_gguf(stream)
    finally:
        stream.close()


def test_reader_round_trip_with_gguf_writer(tmp_path: Path, model_bytes: bytes) -> None:
    params = tiny_params()
    metadata = gkeys.model_metadata(params, "bf16", name="Tiny") + gkeys.tokenizer_metadata(
        model_bytes, vocab_size=500, instruct=True, source="tokenizer.model"
    )
    path, layout, data, _ = build_file(tmp_path, metadata, mixtral_tensors(params), "bf16")
    got, records = read(path)
    assert [(e.key, e.type) for e in got.values()] == [(e.key, e.type) for e in metadata]
    tokens = next(e.value for e in metadata if e.key == "tokenizer.ggml.tokens")
    assert greader.metadata_values(got)["tokenizer.ggml.tokens"] == tokens
    assert gkeys.params_from_metadata(got, file=str(path)) == params
    for record, (name, shape) in zip(records, mixtral_tensors(params), strict=True):
        assert (record.name, record.shape, record.offset) == (name, shape, layout.offsets[name])
        assert record.dtype == ("F32" if gtypes.tensor_type(name, shape, "bf16") == T.F32 else "BF16")
        assert path.read_bytes()[record.offset : record.offset + record.nbytes] == data[name]
    # a file written by gguf's own writer, with every value type and an F16 tensor
    other = tmp_path / "writer.gguf"
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.weight": np.ones((5, 3, 2), np.float16),
              "c.weight": np.zeros(7, np.uint16)}  # fmt: skip
    write_with_gguf_writer(
        other, arrays, {"c.weight": T.BF16}, x__u8=(7, V.UINT8), x__i64=(-3, V.INT64), x__f64=(0.1, V.FLOAT64),
        x__b=(True, V.BOOL), x__s=("héllo", V.STRING),
    )  # fmt: skip
    got, records = read(other)
    values = greader.metadata_values(got)
    assert [values[k] for k in ("x.u8", "x.i64", "x.f64", "x.b", "x.s")] == [7, -3, 0.1, True, "héllo"]
    assert [(r.name, r.dtype, r.shape) for r in records] == [
        ("a.weight", "F32", (2, 3)), ("b.weight", "F16", (5, 3, 2)), ("c.weight", "BF16", (7,))]  # fmt: skip
    reference = gguf.GGUFReader(other)
    assert [r.offset for r in records] == [t.data_offset for t in reference.tensors]


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return struct.pack("<IIqq", gguf.GGUF_MAGIC, version, n_tensors, n_kv)


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", V.UINT32, value)


def tinfo(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<IQ", ggml_type, offset)  # noqa: E501


def padded(body: bytes) -> bytes:
    return body + bytes(-len(body) % 32)


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad magic": (lambda: b"GGML" + bytes(40), "not a GGUF file"),
    "version 1": (lambda: header(0, 0, version=1), "version 1 is not supported"),
    "big-endian": (lambda: header(0, 0, version=3 << 24), "byte-swapped"),
    "truncated": (lambda: header(1, 1)[:20], "needs 8 bytes but the file ends at 20"),
    "huge kv count": (lambda: header(0, 2**40), "key count 1099511627776 is impossible"),
    "negative tensors": (lambda: header(-1, 0), "tensor count -1 is impossible"),
    "huge string": (lambda: header(0, 1) + struct.pack("<Q", 2**62) + bytes(64), "needs 4611686018427387904 bytes"),
    "huge array": (
        lambda: header(0, 1) + gstr("a") + struct.pack("<IIQ", V.ARRAY, V.STRING, 2**40),
        "array a of 1099511627776 items at byte 49 needs 8796093022208 bytes but the file ends at 49",
    ),
    "array of arrays": (lambda: header(0, 1) + gstr("a") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 0), "array of arrays"),
    "unknown value type": (
        lambda: header(0, 1) + gstr("a") + struct.pack("<I", 99) + bytes(8),
        "unknown value type 99",
    ),
    "duplicate key": (lambda: header(0, 2) + kv_u32("k", 1) + kv_u32("k", 2), "duplicate key k"),
    "empty key": (lambda: header(0, 1) + kv_u32("", 1), "empty metadata key"),
    "bad bool": (lambda: header(0, 1) + gstr("b") + struct.pack("<IB", V.BOOL, 2), "bool byte 2 is neither 0 nor 1"),
    "bad alignment": (lambda: header(0, 1) + kv_u32("general.alignment", 24), "must be a UINT32 power of two"),
    "duplicate tensor": (
        lambda: padded(header(2, 0) + tinfo("w", [32], 0, 0) + tinfo("w", [32], 0, 128)) + bytes(256),
        "tensor w: GGUF: duplicate tensor name",
    ),
    "misaligned offset": (
        lambda: padded(header(2, 0) + tinfo("a", [3], 0, 0) + tinfo("b", [3], 0, 12)) + bytes(64),
        "tensor b: GGUF: data offset 12 is not aligned (expected 32)",
    ),
    "overlapping offset": (
        lambda: padded(header(2, 0) + tinfo("a", [64], 0, 0) + tinfo("b", [3], 0, 128)) + bytes(512),
        "tensor b: GGUF: data offset 128 is not where the previous tensor's padded data ends (expected 256)",
    ),
    "past the end": (lambda: padded(header(1, 0) + tinfo("a", [64], 0, 0)) + bytes(100), "runs past the end"),
    "trailing bytes": (lambda: padded(header(1, 0) + tinfo("a", [8], 0, 0)) + bytes(64), "32 bytes after the last"),
    "overflowing shape": (lambda: padded(header(1, 0) + tinfo("a", [2**40, 2**40], 0, 0)), "more elements than int64"),
    "five dims": (lambda: padded(header(1, 0) + tinfo("a", [1] * 5, 0, 0)), "5 dimensions"),
    "long name": (lambda: padded(header(1, 0) + tinfo("n" * 64, [1], 0, 0)), "tensor name is 64 bytes"),
    "unknown ggml type": (lambda: padded(header(1, 0) + tinfo("a", [1], 1000, 0)), "unknown GGML type 1000"),
    "quantized": (
        lambda: padded(header(1, 0) + tinfo("blk.0.attn_q.weight", [32, 2], T.Q8_0, 0)) + bytes(96),
        "tensor blk.0.attn_q.weight: GGUF: is Q8_0: quantized GGUF is one-way, its weights cannot be restored; "
        "convert from the original checkpoint instead",
    ),
    "integer tensor": (lambda: padded(header(1, 0) + tinfo("a", [8], T.I32, 0)) + bytes(32), "is I32, not a weight"),
    "name with a newline": (lambda: padded(header(1, 0) + tinfo("a\nb", [1], 99, 0)), "tensor 'a\\nb': GGUF:"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_inputs_give_one_line_and_bounded_memory(tmp_path: Path, case: str) -> None:
    build, fragment = HOSTILE[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(build())
    tracemalloc.start()
    try:
        with pytest.raises(ConvertError) as error:
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    line = str(error.value)
    assert "\n" not in line and line.startswith(str(path)), line
    assert fragment in line, line
    assert peak < 8 * 2**20, peak


def test_many_short_strings_stay_within_the_memory_bound(tmp_path: Path) -> None:
    """A header of 1.5 million 1-byte strings (13 MiB, under MAX_HEADER) is refused by the string count before
    Python builds an object for each; a full-size header is read with a bounded peak."""
    count = 1_500_000
    body = header(0, 1) + gstr("t") + struct.pack("<IIQ", V.ARRAY, V.STRING, count) + gstr("x") * count
    path = tmp_path / "strings.gguf"
    path.write_bytes(padded(body))
    tracemalloc.start()
    try:
        with pytest.raises(ConvertError, match=f"more than {greader.MAX_STRINGS} strings"):
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, peak
    big = tmp_path / "big.gguf"
    array = struct.pack("<IIQ", V.ARRAY, V.UINT8, greader.MAX_HEADER)
    big.write_bytes(header(0, 1) + gstr("t") + array + bytes(greader.MAX_HEADER))
    with pytest.raises(ConvertError, match="runs past the first 16777216 bytes"):
        read(big)
