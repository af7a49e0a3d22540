"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) built from the bytes
of a SentencePiece tokenizer.model, with no network and without sentencepiece, protobuf or tokenizers: the output
must load in a transformers that has neither installed, and the converter depends on none of them.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _string  # json.dumps' own, with ensure_ascii=False

from convert.tokenizer.chat_template import CHAT_TEMPLATE
from convert.tokenizer.sentencepiece import (
    NORMAL,
    SPACE,
    SentencePieceModel,
    checked_model,
    special_ids,
)

# Mixtral's position limit (docs/formats.md: 32768 positions), so transformers warns about longer inputs.
MODEL_MAX_LENGTH = 32768


def bpe_merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece, leftmost first
    on a tie; tokenizers' BPE merges the pair of lowest rank. Ranking every split of a piece into two pieces by the
    merged piece's score (then its id) makes the two agree. Only normal pieces take part: control and byte pieces
    are never produced by merging."""
    pieces = model.pieces
    normal = {p.text for p in pieces if p.kind == NORMAL}
    # By score, then id; each piece's splits in order: the rank (-score, id, cut) without sorting the splits.
    ranked = sorted((i for i, p in enumerate(pieces) if p.kind == NORMAL), key=lambda i: (-pieces[i].score, i))
    merges = []
    for index in ranked:
        text = pieces[index].text
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def _added_token(index: int, text: str) -> dict:
    return {
        "id": index,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(model: SentencePieceModel) -> dict:
    """The tokenizers pipeline equal to SentencePiece's for this model: a "▁" before every non-empty segment of
    text (between special tokens) and spaces as "▁" (normalizer), no pre-tokenization (SentencePiece BPE merges
    across the whole string), BPE with byte fallback, BOS prepended, decoding back with the prefix space dropped.

    The prefix is a Prepend normalizer rather than a Metaspace pre-tokenizer because Metaspace adds no "▁" to text
    that already starts with a space, while SentencePiece does (" x" is "▁▁x")."""
    bos = model.pieces[model.bos_id].text
    unk = model.pieces[model.unk_id].text
    normalizers: list[dict] = []
    if model.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": SPACE})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    decoders: list[dict] = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if model.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})

    def template(*parts: tuple[str, int]) -> list[dict]:
        return [
            {"SpecialToken": {"id": name, "type_id": type_id}}
            if name == bos
            else {"Sequence": {"id": name, "type_id": type_id}}
            for name, type_id in parts
        ]

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, model.pieces[i].text) for i in special_ids(model)],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": template((bos, 0), ("A", 0)),
            "pair": template((bos, 0), ("A", 0), (bos, 1), ("B", 1)),
            "special_tokens": {bos: {"id": bos, "ids": [model.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {p.text: i for i, p in enumerate(model.pieces)},
            "merges": [list(pair) for pair in bpe_merges(model)],
        },
    }


def _token_entry(text: str) -> dict:
    return {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _named_tokens(model: SentencePieceModel) -> dict[str, str]:
    names = {
        "bos_token": model.pieces[model.bos_id].text,
        "eos_token": model.pieces[model.eos_id].text,
        "unk_token": model.pieces[model.unk_id].text,
    }
    if model.pad_id >= 0:
        names["pad_token"] = model.pieces[model.pad_id].text
    return names


def tokenizer_config(model: SentencePieceModel, *, instruct: bool) -> dict:
    """tokenizer_class is PreTrainedTokenizerFast, not LlamaTokenizer: transformers 5 builds LlamaTokenizer's
    pipeline itself (a Metaspace pre-tokenizer) and keeps only the vocabulary and merges of tokenizer.json, while
    PreTrainedTokenizerFast (an alias of TokenizersBackend in 5.x) runs tokenizer.json as written. transformers 5
    ignores add_bos_token/add_eos_token when a tokenizer.json exists (its post-processor adds BOS); they are
    written for other readers."""
    config: dict = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {**_token_entry(model.pieces[i].text), "special": True} for i in special_ids(model)
        },
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_named_tokens(model),
    }
    if instruct:
        config["chat_template"] = CHAT_TEMPLATE
    return config


def special_tokens_map(model: SentencePieceModel) -> dict:
    return {name: _token_entry(text) for name, text in _named_tokens(model).items()}


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _tokenizer_json_text(data: dict) -> str:
    """Not key-sorted: the vocabulary reads in id order and the merges in rank order, as tokenizers writes them.
    One merge a line (tokenizers' own indent puts each pair on four lines) halves the file.

    The vocabulary and merges (all but a few hundred bytes of the file) are written line by line with json's own
    string encoder rather than by json.dumps: with an indent, json encodes in pure Python, and a conversion spent
    a third of a second here before its first byte moved. The lines are what json.dumps(indent=2) writes for them
    (tests/test_tokenizer.py compares the two)."""
    model = data["model"]
    text = json.dumps({**data, "model": {**model, "vocab": {}, "merges": []}}, indent=2, ensure_ascii=False)
    vocab = ",\n".join(f"      {_string(piece)}: {index}" for piece, index in model["vocab"].items())
    merges = ",\n".join(f"      [{_string(left)}, {_string(right)}]" for left, right in model["merges"])
    head, placeholder, tail = text.rpartition('"merges": []')
    assert placeholder, "the merges placeholder is written last in the model"
    text = head + (f'"merges": [\n{merges}\n    ]' if merges else placeholder) + tail
    head, placeholder, tail = text.rpartition('"vocab": {}')
    assert placeholder, "the vocabulary placeholder is in the model"
    return head + (f'"vocab": {{\n{vocab}\n    }}' if vocab else placeholder) + tail + "\n"


def hf_tokenizer_files(model: bytes, *, vocab_size: int | None, instruct: bool, source: str) -> dict[str, str]:
    """{file name: exact text} of the Hugging Face tokenizer files for the SentencePiece model in `model` (see
    checked_model); instruct adds the Mixtral instruction chat template."""
    parsed = checked_model(model, vocab_size=vocab_size, instruct=instruct, source=source)
    return {
        "tokenizer.json": _tokenizer_json_text(tokenizer_json(parsed)),
        "tokenizer_config.json": _json(tokenizer_config(parsed, instruct=instruct)),
        "special_tokens_map.json": _json(special_tokens_map(parsed)),
    }
