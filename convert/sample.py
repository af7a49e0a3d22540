"""A tiny random Mixtral in the torrent layout, built in, for the demo and for trying the tool.

Same architecture as Mixtral-8x7B (grouped-query attention, 2-of-N routed SwiGLU experts), tiny sizes, and a
tokenizer.model of the same kind as Mistral's (SentencePiece BPE with byte fallback) whose piece count is the
sample's vocabulary, so that an hf conversion gets tokenizer.json, tokenizer_config.json and a chat template.

Nothing here needs torch or sentencepiece: the weights are drawn with numpy and laid out by the project's own torch
zip writer (the layout torch.save writes, which torch.load reads), and the tokenizer's protobuf is written by hand.
The tests read both back with the real clients (tests/test_sample.py).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np

from convert.containers.torchzip.writer import layout_torch_zip
from convert.integrity.crc32 import crc32
from convert.integrity.digests import Digests
from convert.tokenizer.sentencepiece import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN

SAMPLE_PARAMS = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
    "norm_eps": 1e-05, "vocab_size": 1003, "moe": {"num_experts_per_tok": 2, "num_experts": 4},
}  # fmt: skip

# The text the sample's tokenizer learns its merges from (written for this project). The vocabulary is
# 3 special + 256 byte pieces + the text's characters + merges: the text has enough distinct words that the
# learned merges fill the sample's 1003 pieces.
TRAINING_TEXT = """
A checkpoint is a folder of numbers and a few small files that say how to read them. Mixtral keeps eight experts
in every layer, and a router picks two of them for each token, so most of the weights sit idle while the model
writes. The same numbers were published more than once: first as one large pickle for the reference code, then as
eight smaller files from an early upload, and at last as sharded safetensors for the Hugging Face library. Each
layout names its tensors differently, stores the rotary rows of queries and keys in its own order, and keeps the
experts either apart or stacked together. Converting between them sounds like copying, but a careless script
forgets the permutation, uses the wrong number of heads for the keys, or guesses a base frequency that quietly
ruins long answers. This tool plans every byte before it writes anything. It reads the headers, learns where each
tensor begins and ends, and then streams the data through a small window of memory, hashing what passes so that
anyone can check the result later. When something is wrong it stops with one clear line naming the file, the
tensor and the rule. When the power fails halfway, the unfinished files keep a partial name and a journal tells
the next run where to continue. Nothing is trusted because it looks complete: the index is written last.
The tokenizer turns text into pieces. Common words become single pieces, rare words break into smaller parts,
and any character the vocabulary lacks falls back to its raw bytes, so no input is ever lost. Spaces are marked
with a special underline that starts each word, which lets the decoder put the text back exactly as it came.
An instruction model wraps each question between two markers and closes each answer with an end token; the chat
template writes that format for you. Try it on this tiny model: convert the sample, inspect what came out, verify
the checksums, and compare every tensor against its source. The weights here are random, so the answers will be
nonsense, yet every shape, name and byte follows the real release. Small things are easier to test, faster to
share, and quick to throw away when you are done. Reading the numbers back proves the round trip exact, bit for
bit, in both directions, whatever the order of files or the size of shards chosen for the output.
Questions, answers, layers, heads, vocabulary, embeddings, normalization, attention, activation, gradient,
training, inference, precision, bfloat16, float32, integer, storage, archive, directory, manifest, journal.
[INST] [/INST]
"""
SPECIAL_PIECES = (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL))


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.model


def learn_merges(text: str, count: int) -> tuple[list[str], list[str]]:
    """(characters by frequency, the first `count` merged pieces) of byte-pair encoding over text, split at
    whitespace with SentencePiece's "▁" before each word, as SentencePiece's BPE trainer splits. Ties go to the
    lexicographically smallest pair, so the result depends on nothing but the text."""
    words = Counter(SPACE + word for word in text.split())
    chars = Counter(char for word, n in words.items() for char in word for _ in range(n))
    characters = sorted(chars, key=lambda char: (-chars[char], char))
    symbols = {word: list(word) for word in words}
    pairs: Counter[tuple[str, str]] = Counter()
    for word, n in words.items():
        for pair in pairwise(symbols[word]):
            pairs[pair] += n
    pieces: list[str] = []
    known = set(characters)
    while len(pieces) < count:
        if not pairs:
            raise ValueError(f"the text gives only {len(pieces)} merges, {count} are needed")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        for word, n in words.items():
            parts = symbols[word]
            if merged not in word or best not in pairwise(parts):
                continue
            for pair in pairwise(parts):  # the word's pairs are counted afresh after the merge
                pairs[pair] -= n
            joined: list[str] = []
            index = 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == best:
                    joined.append(merged)
                    index += 2
                else:
                    joined.append(parts[index])
                    index += 1
            symbols[word] = joined
            for pair in pairwise(joined):
                pairs[pair] += n
        pairs = +pairs  # drop the pairs no word has any more
        if merged not in known:
            known.add(merged)
            pieces.append(merged)
    return characters, pieces


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _number(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def tokenizer_model(vocab_size: int) -> bytes:
    """A serialized sentencepiece ModelProto: BPE with byte fallback, identity normalization with the dummy prefix,
    <unk> <s> </s> at ids 0-2, then <0x00> ... <0xFF>, then the learned merges (scores 0, -1, ...) and the
    characters (scored below every merge), as Mistral's tokenizer.model orders its pieces."""
    probe, _ = learn_merges(TRAINING_TEXT, 0)
    characters, merges = learn_merges(TRAINING_TEXT, vocab_size - len(SPECIAL_PIECES) - 256 - len(probe))
    pieces = [(text, 0.0, kind) for text, kind in SPECIAL_PIECES]
    pieces += [(f"<0x{value:02X}>", 0.0, BYTE) for value in range(256)]
    pieces += [(text, -float(rank), NORMAL) for rank, text in enumerate([*merges, *characters])]
    assert len(pieces) == vocab_size
    out = bytearray()
    for text, score, kind in pieces:
        out += _message(1, _message(1, text.encode("utf-8")) + _float(2, score) + _number(3, kind))
    # TrainerSpec: model_type BPE (3), vocab_size (4), byte_fallback (35), unk/bos/eos/pad ids (40-43).
    trainer = _number(3, 2) + _number(4, vocab_size) + _number(35, 1)
    trainer += _number(40, 0) + _number(41, 1) + _number(42, 2) + _number(43, -1)
    out += _message(2, trainer)
    # NormalizerSpec: name "identity" (1), add_dummy_prefix (3), remove_extra_whitespaces off (4: its default is
    # on), escape_whitespaces (5).
    out += _message(3, _message(1, b"identity") + _number(3, 1) + _number(4, 0) + _number(5, 1))
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------
# Weights


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest even; the values are finite."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _write_torch_zip(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A torch checkpoint of bfloat16 tensors (given as uint16 bits), laid out as torch.save lays it out."""
    layout = layout_torch_zip(path.stem, [(name, "BF16", array.shape) for name, array in tensors.items()])
    data = bytearray(layout.size)
    digests = Digests()
    for offset, blob in layout.blobs:
        data[offset : offset + len(blob)] = blob
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype="<u2").tobytes()
        start = layout.tensor_offsets[name]
        data[start : start + len(raw)] = raw
        digests.tensor_crc32[name] = crc32(raw)
    for offset, produce in layout.deferred:
        blob = produce(digests)
        data[offset : offset + len(blob)] = blob
    path.write_bytes(data)


def write_sample(folder: Path, seed: int = 0) -> Path:
    p = SAMPLE_PARAMS
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return _bfloat16_bits(rng.standard_normal((rows, cols), dtype=np.float32) * cols**-0.5)

    def norm() -> np.ndarray:
        return _bfloat16_bits(1 + 0.1 * rng.standard_normal(p["dim"], dtype=np.float32))

    dim, hidden, head_dim = p["dim"], p["hidden_dim"], p["head_dim"]
    weights = {"tok_embeddings.weight": matrix(p["vocab_size"], dim)}
    for layer in range(p["n_layers"]):
        prefix = f"layers.{layer}."
        weights[prefix + "attention.wq.weight"] = matrix(p["n_heads"] * head_dim, dim)
        weights[prefix + "attention.wk.weight"] = matrix(p["n_kv_heads"] * head_dim, dim)
        weights[prefix + "attention.wv.weight"] = matrix(p["n_kv_heads"] * head_dim, dim)
        weights[prefix + "attention.wo.weight"] = matrix(dim, p["n_heads"] * head_dim)
        weights[prefix + "feed_forward.gate.weight"] = matrix(p["moe"]["num_experts"], dim)
        for expert in range(p["moe"]["num_experts"]):
            weights[prefix + f"feed_forward.experts.{expert}.w1.weight"] = matrix(hidden, dim)
            weights[prefix + f"feed_forward.experts.{expert}.w2.weight"] = matrix(dim, hidden)
            weights[prefix + f"feed_forward.experts.{expert}.w3.weight"] = matrix(hidden, dim)
        weights[prefix + "attention_norm.weight"] = norm()
        weights[prefix + "ffn_norm.weight"] = norm()
    weights["norm.weight"] = norm()
    weights["output.weight"] = matrix(p["vocab_size"], dim)

    folder.mkdir(parents=True, exist_ok=True)
    _write_torch_zip(folder / "consolidated.00.pth", weights)
    (folder / "params.json").write_text(json.dumps(p) + "\n")
    (folder / "tokenizer.model").write_bytes(tokenizer_model(p["vocab_size"]))
    return folder
