"""The built-in sample (`mixtral-convert sample`), read back by the real clients: torch.load for the weights,
sentencepiece for tokenizer.model; its hf conversion loads in AutoTokenizer, chat template included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from helpers import REPO, run_cli
from test_tokenizer import sp_chat

from convert.sample import SAMPLE_PARAMS
from convert.tokenizer.sentencepiece import BYTE, CONTROL, NORMAL, UNKNOWN, parse_model

pytestmark = pytest.mark.clients

TEXTS = [
    "Convert the sample, then verify the checksums.",
    "  leading spaces, trailing spaces  ",
    "unseen letters: Zürich, ĳ, 東京, emoji 🙂, tab\there",
    "[INST] a question [/INST] an answer",
    "",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sample") / "torrent"
    run_cli("sample", folder)
    return folder


@pytest.fixture(scope="module")
def hf(sample: Path) -> Path:
    """The demo's conversion: it must say nothing on stderr (no warning about the tokenizer or anything else)."""
    out = sample.parent / "hf"
    result = run_cli("convert", sample, out, "--to", "hf", "--instruct", "--no-progress")
    assert result.stderr == ""
    return out


def test_weights_load_in_torch(sample: Path) -> None:
    p = SAMPLE_PARAMS
    weights = torch.load(sample / "consolidated.00.pth", weights_only=True)
    assert len(weights) == 3 + p["n_layers"] * (7 + 3 * p["moe"]["num_experts"])
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights["tok_embeddings.weight"].shape == (p["vocab_size"], p["dim"])
    assert weights["layers.1.feed_forward.experts.3.w2.weight"].shape == (p["dim"], p["hidden_dim"])
    assert all(torch.isfinite(t.float()).all() for t in weights.values())
    assert 0.5 < weights["norm.weight"].float().mean() < 1.5  # norms near 1, matrices near 0
    assert weights["output.weight"].float().abs().mean() < 0.5
    other = run_cli("sample", sample.parent / "seed1", "--seed", "1")
    assert other.returncode == 0
    reseeded = torch.load(sample.parent / "seed1" / "consolidated.00.pth", weights_only=True)
    assert not torch.equal(reseeded["output.weight"], weights["output.weight"])


def test_tokenizer_model_is_what_sentencepiece_reads(sample: Path) -> None:
    """A BPE model with byte fallback, Mistral's ids for the special pieces, one piece per row of the embedding."""
    data = (sample / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(sample / "tokenizer.model"))
    assert sp.get_piece_size() == SAMPLE_PARAMS["vocab_size"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>" and sp.is_byte(258)
    parsed = parse_model(data)
    assert [p.text for p in parsed.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [p.kind for p in parsed.pieces[:259]] == [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    assert {p.kind for p in parsed.pieces[259:]} == {NORMAL}
    assert [p.score for p in parsed.pieces] == [sp.get_score(i) for i in range(sp.get_piece_size())]
    for text in TEXTS:  # every character survives: unknown ones become bytes
        assert sp.decode(sp.encode(text)) == text
    assert len(sp.encode("the tokenizer turns text into pieces")) < 10  # it learned whole words


def test_hf_output_tokenizes_as_sentencepiece_and_applies_the_chat_template(sample: Path, hf: Path) -> None:
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        assert (hf / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(hf)
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    for text in TEXTS:
        assert tokenizer.encode(text) == [1, *sp.encode(text)], text
    chat = [
        {"role": "user", "content": "What does the sample hold?"},
        {"role": "assistant", "content": "Random weights, 🙂."},
        {"role": "user", "content": "Why?"},
    ]
    assert tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False) == sp_chat(sp, chat)
    verified = run_cli("verify", hf, "--against", sample)
    assert "verified:" in verified.stdout


def test_sample_needs_neither_torch_nor_sentencepiece(tmp_path: Path) -> None:
    """torch is a test dependency only: `sample` writes the torch zip and the tokenizer protobuf itself."""
    code = (
        "import sys\n"
        "for name in ('torch', 'sentencepiece', 'google.protobuf', 'safetensors'): sys.modules[name] = None\n"
        "from convert.cli import main\n"
        "sys.exit(main(['sample', sys.argv[1]]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert written == ["consolidated.00.pth", "params.json", "tokenizer.model"]
