"""tokenizer.json and friends built from a SentencePiece tokenizer.model encode exactly as SentencePiece does.

A tiny SentencePiece BPE model with byte fallback is trained in memory with Mistral's settings (identity
normalization, dummy prefix, no whitespace collapsing, whitespace-only pieces, split digits, unk/bos/eos = 0/1/2, no
pad). The files are loaded by the real client, transformers' AutoTokenizer, with sentencepiece and protobuf made
unimportable, and compared with sentencepiece itself on random text and on chat conversations.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
from helpers import REPO, assert_one_line_error, run_cli
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from llama_client import mixtral_tokenizer
from synthetic import TinyConfig, make_weights, write_torrent
from tokenizers import Tokenizer

from convert.common.errors import ConvertError
from convert.tokenizer import hf_files, sentencepiece
from convert.tokenizer.hf_files import hf_tokenizer_files, tokenizer_json
from convert.tokenizer.sentencepiece import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    checked_model,
    parse_model,
)

pytestmark = pytest.mark.clients

SOURCE = "/models/Mixtral-8x7B-Instruct-v0.1/tokenizer.model"
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")
# Mistral's trainer settings that decide encoding; only model_type, byte_fallback and the normalizer are read back.
MISTRAL_LIKE = dict(
    model_type="bpe",
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    character_coverage=0.9995,
)

WORDS_TEXT = """the of and to in is you that it he was for on are as with his they at be this have from or one had by
word
but not what all were we when your can said there use an each which she do how their if will up other about out many
then them these so some her would make like him into time has look two more write go see number no way could people
my than first water been call who oil its now find long down day did get come made may part over new sound take only
little work know place year live me back give most very after thing our just name good sentence man think say great
where help through much before line right too mean old any same tell boy follow came want show also around form three
small set put end does another well large must big even such because turn here why ask went men read need land
different home us move try kind hand picture again change off play spell air away animal house point page letter
mother answer found study still learn should world capital France Paris"""
WORDS = WORDS_TEXT.split()
FOREIGN = ["café", "naïve", "Zürich", "São", "Ελληνικά", "русский", "日本語", "émigré", "façade", "Øresund"]
PUNCT = [".", ",", "!", "?", ";", ":", "...", " -", " (", ")", "'s", '"', "%", "$"]


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Varied English with digits, punctuation, indentation, double spaces, a few non-ASCII words and [INST] tags,
    so the model has whitespace-only pieces, and characters outside its vocabulary still occur (byte fallback)."""
    rng = random.Random(seed)
    result = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(3, 14)):
            draw = rng.random()
            if draw < 0.08:
                words.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif draw < 0.11:
                words.append(rng.choice(FOREIGN))
            else:
                word = rng.choice(WORDS)
                words.append(word.capitalize() if rng.random() < 0.15 else word)
            if rng.random() < 0.15:
                words[-1] += rng.choice(PUNCT)
        line = " ".join(words)
        draw = rng.random()
        if draw < 0.1:
            line = "    " + line
        elif draw < 0.15:
            line = f"[INST] {line} [/INST]"
        elif draw < 0.2:
            line = line.replace(" ", "  ", 1)
        result.append(line)
    return result


def train(**options: object) -> bytes:
    """The bytes of a tokenizer.model trained in memory (a few hundredths of a second)."""
    writer = io.BytesIO()
    settings_ = {**MISTRAL_LIKE, "vocab_size": 500, "minloglevel": 2, **options}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=writer, **settings_)
    return writer.getvalue()


@contextlib.contextmanager
def unimportable(*names: str) -> Iterator[None]:
    """`import name` raises ImportError inside the block (sys.modules[name] = None), as if not installed."""
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name in names:
            sys.modules[name] = None  # type: ignore[assignment]
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return train()


@pytest.fixture(scope="module")
def sp(model_bytes: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=model_bytes)


@pytest.fixture(scope="module")
def folder(model_bytes: bytes, sp: spm.SentencePieceProcessor, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Instruct checkpoint with this tokenizer, converted to hf by the command line with --instruct."""
    root = tmp_path_factory.mktemp("tokenizer")
    cfg = replace(TinyConfig(), vocab=sp.get_piece_size())
    write_torrent(root / "torrent", cfg, make_weights(cfg, seed=3))
    (root / "torrent" / "tokenizer.model").write_bytes(model_bytes)
    run_cli("convert", root / "torrent", root / "hf", "--to", "hf", "--instruct")
    return root / "hf"


def test_conversion_writes_what_hf_tokenizer_files_builds(folder: Path, model_bytes: bytes) -> None:
    files = hf_tokenizer_files(
        model_bytes, vocab_size=len(parse_model(model_bytes).pieces), instruct=True, source=SOURCE
    )
    for name, text in files.items():
        assert (folder / name).read_text(encoding="utf-8") == text, name
    assert (folder / "tokenizer.model").read_bytes() == model_bytes
    run_cli("verify", folder)


def test_back_to_a_mistral_layout_keeps_tokenizer_model(folder: Path, model_bytes: bytes, tmp_path: Path) -> None:
    for target in ("torrent", "mistral", "megablocks"):
        run_cli("convert", folder, tmp_path / target, "--to", target)
        assert (tmp_path / target / "tokenizer.model").read_bytes() == model_bytes
        assert not (tmp_path / target / "tokenizer.json").exists()


def test_vocabulary_mismatch_through_the_command_line(model_bytes: bytes, tmp_path: Path) -> None:
    """Without --instruct the weights still convert and the warning names the rule; with it, it is an error."""
    cfg = replace(TinyConfig(), vocab=len(parse_model(model_bytes).pieces) + 1)
    write_torrent(tmp_path / "src", cfg, make_weights(cfg, seed=4))
    (tmp_path / "src" / "tokenizer.model").write_bytes(model_bytes)
    result = run_cli("convert", tmp_path / "src", tmp_path / "hf", "--to", "hf")
    assert (
        f"but the model's vocabulary is {cfg.vocab}" in result.stderr and "tokenizer.json not written" in result.stderr
    )
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    refused = run_cli("convert", tmp_path / "src", tmp_path / "hf2", "--to", "hf", "--instruct", check=False)
    assert_one_line_error(refused, str(tmp_path / "src" / "tokenizer.model"), "the model's vocabulary is")


@pytest.fixture(scope="module")
def hf(folder: Path):
    """Loaded by AutoTokenizer while sentencepiece and protobuf cannot be imported."""
    from transformers import AutoTokenizer

    with unimportable("sentencepiece", "google.protobuf"):
        return AutoTokenizer.from_pretrained(folder)


def sp_chat(sp: spm.SentencePieceProcessor, messages: list[dict[str, str]]) -> list[int]:
    """formats.md: BOS + tok("[INST]") + tok(user) + tok("[/INST]") + tok(answer) + EOS + ..., tok adding no
    BOS/EOS but SentencePiece's prefix space, once per call."""
    ids = [sp.bos_id()]
    for message in messages:
        if message["role"] == "user":
            ids += sp.encode("[INST]") + sp.encode(message["content"]) + sp.encode("[/INST]")
        else:
            ids += [*sp.encode(message["content"]), sp.eos_id()]
    return ids


def chat_ids(hf, messages: list[dict[str, str]], **options: object) -> list[int]:
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **options)


# ----------------------------------------------------------------------------------------------------------------
# Reading tokenizer.model without protobuf


def test_parser_reads_what_sentencepiece_reads(model_bytes: bytes, sp: spm.SentencePieceProcessor) -> None:
    model = parse_model(model_bytes)
    assert len(model.pieces) == sp.get_piece_size() == 500
    for index, piece in enumerate(model.pieces):
        assert piece.text == sp.id_to_piece(index)
        assert piece.score == sp.get_score(index)
        checks = ((sp.is_unknown, UNKNOWN), (sp.is_control, CONTROL), (sp.is_byte, BYTE), (sp.is_unused, UNUSED))
        kind = next((kind for check, kind in checks if check(index)), NORMAL)
        assert piece.kind == kind, (index, piece)
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(), -1)
    assert model.model_type == 2 and model.byte_fallback
    assert model.normalizer_name == "identity" and model.add_dummy_prefix and not model.remove_extra_whitespaces


def test_needs_no_sentencepiece_protobuf_or_hf_libraries(model_bytes: bytes, tmp_path: Path) -> None:
    """The converter's side: convert.tokenizer imports and builds the same files with none of them importable."""
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    code = f"""
import json, sys
for name in ("sentencepiece", "google", "google.protobuf", "tokenizers", "transformers"):
    sys.modules[name] = None
from convert.tokenizer.hf_files import hf_tokenizer_files
data = open({str(tmp_path / "tokenizer.model")!r}, "rb").read()
print(json.dumps(hf_tokenizer_files(data, vocab_size=500, instruct=True, source="t")))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == hf_tokenizer_files(model_bytes, vocab_size=500, instruct=True, source="t")


def test_files_are_deterministic_json(model_bytes: bytes) -> None:
    first = hf_tokenizer_files(model_bytes, vocab_size=None, instruct=True, source=SOURCE)
    assert first == hf_tokenizer_files(model_bytes, vocab_size=None, instruct=True, source=SOURCE)
    assert sorted(first) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for text in first.values():
        assert text.endswith("}\n")
        json.loads(text)
    config = json.loads(first["tokenizer_config.json"])
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert "pad_token" not in config and config["model_max_length"] == 32768
    assert first["tokenizer_config.json"] == json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    base = hf_tokenizer_files(model_bytes, vocab_size=None, instruct=False, source=SOURCE)
    assert "chat_template" not in json.loads(base["tokenizer_config.json"])
    assert base["tokenizer.json"] == first["tokenizer.json"]
    assert json.loads(first["special_tokens_map.json"])["eos_token"]["content"] == "</s>"


# ----------------------------------------------------------------------------------------------------------------
# Loading with transformers, without sentencepiece


def test_loads_as_fast_tokenizer_backed_by_tokenizer_json(hf, folder: Path) -> None:
    assert hf.is_fast
    assert type(hf).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    written = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    loaded = json.loads(hf.backend_tokenizer.to_str())
    # The pipeline is the file's, not one rebuilt by a model-specific class (transformers 5's LlamaTokenizer
    # would put a Metaspace pre-tokenizer in place of the normalizer).
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert loaded[part] == written[part], part
    assert loaded["model"]["vocab"] == written["model"]["vocab"]
    assert loaded["model"]["merges"] == written["model"]["merges"]
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, None)
    # transformers 5 drops add_bos_token/add_eos_token when there is a tokenizer.json (hf.add_bos_token reads
    # False): BOS comes from the file's post-processor, and only BOS.
    assert hf("x")["input_ids"][0] == 1 and 2 not in hf("x")["input_ids"]


def test_subprocess_without_sentencepiece_or_protobuf(folder: Path, sp: spm.SentencePieceProcessor) -> None:
    """A fresh interpreter where sentencepiece and protobuf cannot be imported at all loads the folder and encodes."""
    texts = ["Hello world", " leading space", "trailing  ", "digits 12345 and café 日本語 🙂", "a\nb\tc", ""]
    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And 2+2?"},
    ]
    code = f"""
import json, sys
sys.modules["sentencepiece"] = None
sys.modules["google.protobuf"] = None
from transformers import AutoTokenizer
try:
    import sentencepiece
    raise SystemExit("sentencepiece is importable")
except ImportError:
    pass
tok = AutoTokenizer.from_pretrained({str(folder)!r})
print(json.dumps({{
    "fast": tok.is_fast,
    "ids": [tok(text)["input_ids"] for text in {texts!r}],
    "decoded": [tok.decode(tok(text)["input_ids"], skip_special_tokens=True) for text in {texts!r}],
    "chat": tok.apply_chat_template({chat!r}, tokenize=True, return_dict=False),
}}))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fast"] is True
    assert out["ids"] == [[1, *sp.encode(text)] for text in texts]
    assert out["decoded"] == [sp.decode(sp.encode(text)) for text in texts] == texts
    assert out["chat"] == sp_chat(sp, chat)


# ----------------------------------------------------------------------------------------------------------------
# Plain text: the same ids as SentencePiece


EXAMPLES = [
    "",
    " ",
    "   ",
    "Hello world",
    " leading",
    "  two leading",
    "trailing ",
    "trailing three   ",
    "inner    spaces",
    "line one\nline two\n",
    "\ttab\t",
    "3.14159 + 2,718 = 5.859",
    "(1969-07-20) 384,400 km; 100%!",
    "[INST] tags [/INST] as text",
    "café naïve Zürich São Ελληνικά русский 日本語",
    "unseen: ß Ω 🙂 𝄞 \u00a0 \u200b \x00",
    "literal ▁ escape ▁▁ characters",
    "the the the the thethethe",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_encode_as_sentencepiece(hf, sp: spm.SentencePieceProcessor, text: str) -> None:
    ids = hf(text)["input_ids"]
    assert ids == [sp.bos_id(), *sp.encode(text)]
    # A literal "▁" in the text decodes as a space, in SentencePiece as here.
    assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]) == text.replace("▁", " ")


def test_byte_fallback_is_used(hf, sp: spm.SentencePieceProcessor) -> None:
    """A character outside the vocabulary becomes its UTF-8 bytes, not <unk>."""
    tokens = hf.convert_ids_to_tokens(hf("🙂")["input_ids"])
    assert tokens == ["<s>", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert sp.encode("🙂", out_type=str) == tokens[1:]


ALPHABET = [*"abcdefgtheINSTPar ", "  ", "\n", "\t", *"[]/.,!?'07", *"éü日🙂ß▁<>s"]
fragment = st.one_of(st.sampled_from(ALPHABET), st.characters(exclude_categories=("Cs",)))
texts = st.lists(fragment, max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_random_text_encodes_as_sentencepiece(hf, sp: spm.SentencePieceProcessor, text: str) -> None:
    assume(not any(special in text for special in SPECIAL_TEXTS))  # matched as special tokens: see test below
    ids = hf(text)["input_ids"]
    assert ids == [sp.bos_id(), *sp.encode(text)]
    assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:])


@st.composite
def piece_strings(draw: st.DrawFn, pieces: list[str]) -> str:
    """Concatenated vocabulary pieces: text the merges act on, far more than random characters."""
    return "".join(draw(st.lists(st.sampled_from(pieces), max_size=16))).replace("▁", " ")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_piece_sequences_encode_as_sentencepiece(hf, sp: spm.SentencePieceProcessor, data: st.DataObject) -> None:
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_byte(i))]
    pieces = [p for p in pieces if not sp.is_unknown(sp.piece_to_id(p))]
    text = data.draw(piece_strings(pieces))
    assert hf(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]


def test_special_token_text_is_a_known_difference(hf, sp: spm.SentencePieceProcessor) -> None:
    """Like every Hugging Face Llama/Mistral tokenizer, the text "</s>" is the EOS token; SentencePiece reads it
    as characters. Each side of it then starts a new segment with its own prefix space."""
    ids = hf("a</s>b")["input_ids"]
    assert ids == [1, *sp.encode("a"), 2, *sp.encode("b")]
    assert ids != [1, *sp.encode("a</s>b")]


# ----------------------------------------------------------------------------------------------------------------
# The chat template


def conversation(*contents: str) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": content} for i, content in enumerate(contents)]


CHATS = {
    "one user turn": conversation("What is the capital of France?"),
    "ends on user": conversation("What is 2+2?", "4.", "And 3 * 7 = ?"),
    "ends on assistant": conversation("Hi!", "Hello, how can I help?", "Name 3 colours.", "Red, green, blue."),
    "leading spaces": conversation("  indented question", " answer with a leading space", "   x"),
    "trailing spaces in answers": conversation("q", "answer ", "q2", "answer2   "),
    "empty contents": conversation("", "", "next", ""),
    "newlines and tabs": conversation("line 1\nline 2\n", "\tcode\n    more", "ok\n"),
    "non-ASCII and bytes": conversation("café 日本語?", "Ελληνικά 🙂", "ß"),
    "tags as content": conversation("[INST] nested [/INST]", "[/INST]"),
    "punctuation": conversation('"Quote," (paren) [bracket] $5 100%;', "...!?", "-"),
}


@pytest.mark.parametrize("messages", CHATS.values(), ids=CHATS.keys())
def test_chat_template_equals_piecewise_sequence(hf, sp: spm.SentencePieceProcessor, messages: list) -> None:
    ids = chat_ids(hf, messages)
    assert ids == sp_chat(sp, messages)
    assert ids.count(sp.bos_id()) == 1 and ids[0] == sp.bos_id()  # apply_chat_template adds no second BOS


def test_chat_template_text(hf) -> None:
    rendered = hf.apply_chat_template(
        conversation("Instruction", "Model answer", "Follow-up instruction"), tokenize=False
    )
    assert rendered == "<s>[INST] Instruction [/INST] Model answer</s>[INST] Follow-up instruction [/INST]"
    # The generation prompt is the trailing [/INST]; add_generation_prompt has nothing to add.
    messages = conversation("x")
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<s>[INST] x [/INST]"


user_text = st.text(st.sampled_from(list("ab xy.,!?0197é日\n[]/INST")), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=st.lists(user_text, min_size=1, max_size=5))
def test_random_chats_equal_piecewise_unless_user_text_ends_in_space(
    hf, sp: spm.SentencePieceProcessor, contents: list[str]
) -> None:
    """The only difference found: a user message ending in a space (see the next test)."""
    messages = conversation(*contents)
    ids = chat_ids(hf, messages)
    if not any(m["role"] == "user" and m["content"].endswith(" ") for m in messages):
        assert ids == sp_chat(sp, messages)
    assert hf.decode(ids) == hf.decode(sp_chat(sp, messages))  # the same text in any case


def test_user_text_ending_in_space_is_a_known_difference(hf, sp: spm.SentencePieceProcessor) -> None:
    """tok("hi ") ends in a lone "▁" and tok("[/INST]") starts with "▁[", but the rendered string "hi  [/INST]" is
    tokenized as a whole: the two spaces merge into the whitespace-only piece "▁▁", leaving "[" alone. No string
    gives "▁" then "▁[" with a vocabulary that merges "▁▁" before "▁[", as this one does."""
    messages = conversation("hi ")
    assert hf.apply_chat_template(messages, tokenize=False) == "<s>[INST] hi  [/INST]"
    ids = chat_ids(hf, messages)
    piecewise = sp_chat(sp, messages)
    assert hf.convert_ids_to_tokens(ids) == ["<s>", "▁[", "INST", "]", "▁h", "i", "▁▁", "[", "/", "INST", "]"]
    assert [sp.id_to_piece(i) for i in piecewise] == ["<s>", "▁[", "INST", "]", "▁h", "i", "▁", "▁[", "/", "INST", "]"]
    assert ids == [1, *sp.encode("[INST] hi  [/INST]")]  # SentencePiece on the whole text agrees with transformers
    assert hf.decode(ids) == hf.decode(piecewise)


def test_special_token_text_in_messages(hf, sp: spm.SentencePieceProcessor) -> None:
    """Content containing "</s>" becomes a real EOS (and splits the text) unless apply_chat_template is asked to
    sanitize control tokens, which then encodes it as text, as SentencePiece does."""
    messages = conversation("a</s>b")
    piecewise = sp_chat(sp, messages)
    plain = chat_ids(hf, messages)
    assert plain == [1, *sp.encode("[INST] a"), 2, *sp.encode("b [/INST]")] != piecewise
    assert chat_ids(hf, messages, sanitize_control_tokens=True) == piecewise


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Unsupported role system"),
        ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}], "Unsupported role tool"),
        ([{"role": "assistant", "content": "Hello"}], "must alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
        ([*conversation("a", "b"), {"role": "assistant", "content": "c"}], "must alternate"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "content must be a string"),
    ],
    ids=["system", "tool", "assistant first", "two users", "two assistants", "content parts"],
)
def test_chat_template_refuses(hf, messages: list, message: str) -> None:
    with pytest.raises(jinja2.TemplateError, match=message):
        hf.apply_chat_template(messages, tokenize=True)


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one-line ConvertErrors naming the file


def refused(data: bytes, vocab_size: int | None = None, *, instruct: bool = False) -> ConvertError:
    with pytest.raises(ConvertError) as caught:
        hf_tokenizer_files(data, vocab_size=vocab_size, instruct=instruct, source=SOURCE)
    error = caught.value
    assert error.file == SOURCE and str(error).startswith(SOURCE + ": ") and "\n" not in str(error)
    return error


def test_vocabulary_size_mismatch(model_bytes: bytes) -> None:
    error = refused(model_bytes, vocab_size=501)
    assert error.rule == "tokenizer has 500 pieces but the model's vocabulary is 501"
    hf_tokenizer_files(model_bytes, vocab_size=500, instruct=False, source=SOURCE)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a tokenizer",
        b'{"version": "1.0", "model": {"type": "BPE"}}',
        b"PK\x03\x04" + bytes(60),
        b"\x0a\xff",  # a piece claiming 127 more bytes than there are
        b"\x0a\x80",  # a truncated varint
    ],
    ids=["empty", "text", "json", "zip", "overlong", "varint"],
)
def test_corrupt_model(data: bytes) -> None:
    assert "not a SentencePiece model" in refused(data).rule


def test_truncated_model(model_bytes: bytes) -> None:
    assert "not a SentencePiece model" in refused(model_bytes[: len(model_bytes) // 2]).rule


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"model_type": "unigram"}, "UNIGRAM, not BPE"),
        ({"byte_fallback": False}, "without byte fallback"),
        ({"user_defined_symbols": ["<tool>"]}, "USER_DEFINED"),
        ({"normalization_rule_name": "nmt_nfkc"}, "normalizer"),
        ({"remove_extra_whitespaces": True}, "normalizer"),
    ],
    ids=["unigram", "no byte fallback", "user defined", "nfkc", "whitespace removal"],
)
def test_unsupported_models(options: dict, fragment: str) -> None:
    assert fragment in refused(train(**options)).rule


def test_tokenizers_library_reads_the_file(model_bytes: bytes, sp: spm.SentencePieceProcessor) -> None:
    """tokenizer.json alone, through the tokenizers library (what vLLM and TGI use), agrees too."""
    files = hf_tokenizer_files(model_bytes, vocab_size=None, instruct=False, source=SOURCE)
    tokenizer = Tokenizer.from_str(files["tokenizer.json"])
    for text in EXAMPLES:
        assert tokenizer.encode(text).ids == [1, *sp.encode(text)]


def test_pad_token_when_the_model_has_one(tmp_path: Path) -> None:
    data = train(pad_id=3)
    files = hf_tokenizer_files(data, vocab_size=500, instruct=False, source=SOURCE)
    assert json.loads(files["tokenizer_config.json"])["pad_token"] == "<pad>"
    assert json.loads(files["special_tokens_map.json"])["pad_token"]["content"] == "<pad>"
    assert [t["content"] for t in json.loads(files["tokenizer.json"])["added_tokens"]] == [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    ]


def test_without_dummy_prefix() -> None:
    """add_dummy_prefix off: plain text still matches SentencePiece; the chat template, which needs it, is refused."""
    data = train(add_dummy_prefix=False)
    sp = spm.SentencePieceProcessor(model_proto=data)
    tokenizer = Tokenizer.from_str(
        hf_tokenizer_files(data, vocab_size=None, instruct=False, source=SOURCE)["tokenizer.json"]
    )
    for text in EXAMPLES:
        ids = tokenizer.encode(text).ids
        assert ids == [1, *sp.encode(text)]
        assert tokenizer.decode(ids) == sp.decode(ids[1:])
    assert "dummy prefix" in refused(data, instruct=True).rule


# ----------------------------------------------------------------------------------------------------------------
# The fast paths (read before a conversion's first byte moves) give what the general ones give


def _pieces_raw(data: bytes) -> list[bytes]:
    return [value for field, _, value in sentencepiece._fields(data, 0, len(data)) if field == 1]


def test_mixtrals_tokenizer_reads_as_sentencepiece_reads_it_all_on_the_fast_path() -> None:
    """Mixtral's own tokenizer.model (32,000 pieces): every piece as sentencepiece reads it, and every one read by
    the usual-encoding path, giving what the general parser gives (else that path saves nothing)."""
    data = mixtral_tokenizer().read_bytes()
    reference = spm.SentencePieceProcessor(model_proto=data)
    model = parse_model(data)
    assert len(model.pieces) == reference.get_piece_size() == 32000
    for index, piece in enumerate(model.pieces):
        assert (piece.text, piece.score) == (reference.id_to_piece(index), reference.get_score(index)), index
    raw = _pieces_raw(data)
    usual = [sentencepiece._usual_piece(r) for r in raw]
    assert all(u is not None for u in usual)
    assert usual == [sentencepiece._any_piece(r) for r in raw]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


piece_fields = st.one_of(
    st.binary(max_size=200).map(lambda text: b"\x0a" + _varint(len(text)) + text),
    st.text(max_size=150).map(lambda text: b"\x0a" + _varint(len(text.encode())) + text.encode()),
    st.binary(min_size=4, max_size=4).map(lambda bits: b"\x15" + bits),
    st.floats(width=32, allow_nan=True).map(lambda score: b"\x15" + struct.pack("<f", score)),
    st.integers(0, 300).map(lambda kind: b"\x18" + _varint(kind)),
)


@settings(max_examples=2000, deadline=None)
@given(fields=st.lists(piece_fields, max_size=4), tail=st.binary(max_size=3))
def test_the_usual_piece_path_agrees_with_the_general_parser(fields: list[bytes], tail: bytes) -> None:
    """Any message, usual or not (long or non-UTF-8 text, NaN scores, unknown types, fields out of order or
    repeated, stray bytes): the fast path either declines or returns what the general parser returns."""
    raw = b"".join(fields) + tail
    usual = sentencepiece._usual_piece(raw)
    if usual is not None:
        assert usual == sentencepiece._any_piece(raw)


def _dumped_by_json(data: dict) -> str:
    """tokenizer.json as json.dumps(indent=2) writes it, each merge on one line: what _tokenizer_json_text wrote
    before it assembled the vocabulary and merges itself."""
    model = data["model"]
    text = json.dumps({**data, "model": {**model, "merges": []}}, indent=2, ensure_ascii=False)
    lines = ",\n".join("      " + json.dumps(pair, ensure_ascii=False) for pair in model["merges"])
    head, _, tail = text.rpartition('"merges": []')
    return head + (f'"merges": [\n{lines}\n    ]' if lines else '"merges": []') + tail + "\n"


def test_tokenizer_json_is_what_json_dumps_writes(model_bytes: bytes) -> None:
    for data in (model_bytes, mixtral_tokenizer().read_bytes()):
        model = checked_model(data, vocab_size=None, instruct=False, source=SOURCE)
        assert hf_tokenizer_files(data, vocab_size=None, instruct=False, source=SOURCE)["tokenizer.json"] == (
            _dumped_by_json(tokenizer_json(model))
        )


@settings(max_examples=300, deadline=None)
@given(
    vocab=st.dictionaries(st.text(), st.integers(0, 10**6), min_size=1),
    merges=st.lists(st.tuples(st.text(), st.text())),
)
def test_tokenizer_json_escapes_as_json_dumps(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Quotes, backslashes, control characters, non-ASCII and lone surrogates in pieces and merges."""
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}, "decoder": None}
    assert hf_files._tokenizer_json_text(data) == _dumped_by_json(data)
