"""End to end: tiny synthetic checkpoint -> `python -m convert ... --to hf` -> transformers -> logits == reference.

The reference (tests/reference.py) runs the ORIGINAL model on the source weights with interleaved complex rotary, so
agreement with transformers' MixtralForCausalLM on the converted folder checks the renaming, the q/k rotary
permutation (q with n_heads, k with n_kv_heads), expert unstacking, rope_theta and the rest of config.json at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import CliRunner
from reference import forward
from safetensors import safe_open
from synthetic import (
    DEFAULT,
    FAKE_TOKENIZER,
    HEAD_DIM_VARIANT,
    TinyConfig,
    make_weights,
    write_megablocks,
    write_mistral,
    write_torrent,
)
from transformers import AutoConfig, MixtralForCausalLM

pytestmark = pytest.mark.clients

# Two sequences of 12 ids, including the last vocab row (1002) so a truncated embedding or lm_head shows.
TOKENS = torch.tensor(
    [
        [1, 5, 1002, 17, 300, 999, 42, 8, 700, 3, 64, 1001],
        [1, 900, 2, 77, 77, 512, 13, 1000, 250, 6, 31, 400],
    ]
)
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# What the converted folder must contain, stated from formats.md (independently of the converter's mapping tables)


def to_half_split(w: torch.Tensor, n: int) -> torch.Tensor:
    """formats.md's T -> H rotary row permutation for n heads."""
    rows, cols = w.shape
    return w.view(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_interleaved(w: torch.Tensor, n: int) -> torch.Tensor:
    """formats.md's H -> T inverse permutation for n heads."""
    rows, cols = w.shape
    return w.view(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)


def expected_hf_tensors(cfg: TinyConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict (on-disk names) in module order: the order the published shard assignment walks."""
    out = {"model.embed_tokens.weight": w["tok_embeddings.weight"]}
    for layer in range(cfg.n_layers):
        t, h = f"layers.{layer}.", f"model.layers.{layer}."
        out[h + "self_attn.q_proj.weight"] = to_half_split(w[t + "attention.wq.weight"], cfg.n_heads)
        out[h + "self_attn.k_proj.weight"] = to_half_split(w[t + "attention.wk.weight"], cfg.n_kv_heads)
        out[h + "self_attn.v_proj.weight"] = w[t + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = w[t + "attention.wo.weight"]
        out[h + "block_sparse_moe.gate.weight"] = w[t + "feed_forward.gate.weight"]
        for e in range(cfg.n_experts):
            for k in ("w1", "w2", "w3"):
                out[f"{h}block_sparse_moe.experts.{e}.{k}.weight"] = w[f"{t}feed_forward.experts.{e}.{k}.weight"]
        out[h + "input_layernorm.weight"] = w[t + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = w[t + "ffn_norm.weight"]
    out["model.norm.weight"] = w["norm.weight"]
    out["lm_head.weight"] = w["output.weight"]
    return out


def logit_tolerance(ref: torch.Tensor) -> float:
    """Absolute tolerance: 1e-4 of the logit scale.

    Measured float32 disagreement between this reference and transformers on correctly converted weights is ~2e-6
    (logits ~ +-4); every conversion bug in test_tolerance_is_discriminating moves logits by > 1e-1.
    """
    return 1e-4 * max(1.0, ref.abs().max().item())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Cases: each builds one source folder, converts it once (module-scoped cache) and is checked by every test below


@dataclass(frozen=True)
class Case:
    """One source checkpoint to convert."""

    layout: str  # torrent | mistral | megablocks
    cfg: TinyConfig
    seed: int
    split_parts: int | None = None
    sliding_window: str = "null"
    pass_from: bool = True  # False: the converter must auto-detect the layout


CASES: dict[str, Case] = {
    "torrent": Case("torrent", DEFAULT, seed=1),
    "torrent-split13": Case("torrent", DEFAULT, seed=2, split_parts=13),
    "mistral": Case("mistral", DEFAULT, seed=3),
    "megablocks-null": Case("megablocks", DEFAULT, seed=4, sliding_window="null"),
    "megablocks-4096": Case("megablocks", DEFAULT, seed=5, sliding_window="4096"),
    "head_dim24": Case("torrent", HEAD_DIM_VARIANT, seed=6),
    # A params.json that does state rope_theta must be honoured, not overwritten with the Mixtral default.
    "mistral-theta2.5e5": Case("mistral", replace(DEFAULT, rope_theta=2.5e5), seed=7),
    "auto-torrent-split12": Case("torrent", DEFAULT, seed=8, split_parts=12, pass_from=False),
    "auto-mistral": Case("mistral", DEFAULT, seed=9, pass_from=False),
    "auto-megablocks": Case("megablocks", DEFAULT, seed=10, pass_from=False),
}


@dataclass
class Converted:
    case: Case
    weights: dict[str, torch.Tensor]
    src: Path
    dst: Path


def build_source(case: Case, folder: Path) -> dict[str, torch.Tensor]:
    weights = make_weights(case.cfg, case.seed)
    if case.layout == "torrent":
        write_torrent(folder, case.cfg, weights, split_parts=case.split_parts)
    elif case.layout == "mistral":
        write_mistral(folder, case.cfg, weights)
    else:
        write_megablocks(folder, case.cfg, weights, sliding_window=case.sliding_window)
    return weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, cli: CliRunner) -> Iterator[Callable[[str], Converted]]:
    """converted(name): build case `name`, run the CLI to hf once, and return the folders."""
    cache: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in cache:
            case = CASES[name]
            root = tmp_path_factory.mktemp(name)
            src, dst = root / "src", root / "dst"
            weights = build_source(case, src)
            args = ["convert", src, dst, "--to", "hf", "--no-progress"]
            if case.pass_from:
                args += ["--from", case.layout]
            cli(*args)
            cache[name] = Converted(case, weights, src, dst)
        return cache[name]

    yield get


def load_hf(dst: Path) -> MixtralForCausalLM:
    """Load with the real client, float32 + eager attention; any missing/unexpected/mismatched key is a failure."""
    model, info = MixtralForCausalLM.from_pretrained(
        dst, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers loading report: {problems}"
    return model.eval()


@torch.no_grad()
def hf_logits(dst: Path) -> torch.Tensor:
    return load_hf(dst)(TOKENS).logits.float()


def shard_files(dst: Path) -> list[Path]:
    return sorted(p for p in dst.iterdir() if SHARD_RE.fullmatch(p.name))


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name: str, converted: Callable[[str], Converted]) -> None:
    """transformers on the converted folder computes what the original model computes."""
    c = converted(name)
    ref = forward(c.weights, c.case.cfg, TOKENS)
    got = hf_logits(c.dst)
    assert got.shape == ref.shape
    diff, tol = max_diff(got, ref), logit_tolerance(ref)
    assert diff <= tol, f"logits differ from the reference by {diff:.3g} (tolerance {tol:.3g})"


@pytest.mark.parametrize("name", list(CASES))
def test_config_json(name: str, converted: Callable[[str], Converted]) -> None:
    """config.json is the published (4.x-style) Mixtral config for the source's hyperparameters."""
    c = converted(name)
    cfg = c.case.cfg
    conf = json.loads((c.dst / "config.json").read_text())
    assert conf["architectures"] == ["MixtralForCausalLM"]
    assert conf["model_type"] == "mixtral"
    assert conf["torch_dtype"] == "bfloat16"  # the source dtype, under the published key
    # rope_theta as a top-level key (published format); 1e6 when params.json has none (not 1e4 / 1e5).
    assert "rope_theta" in conf
    assert isinstance(conf["rope_theta"], (int, float))
    assert conf["rope_theta"] == cfg.theta
    expected = {
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_per_tok,
        "vocab_size": cfg.vocab,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    assert {k: conf.get(k) for k in expected} == expected
    if cfg.head_dim_is_default:
        assert "head_dim" not in conf
    else:
        assert conf.get("head_dim") == cfg.head_dim
    # Never a string (Layout M stores it as one): None, or the parsed number for the "4096" source.
    sliding = conf.get("sliding_window")
    if c.case.sliding_window == "4096":
        assert sliding in (None, 4096), f"sliding_window {sliding!r}"
    else:
        assert sliding is None, f"sliding_window {sliding!r}"
    # What transformers itself makes of it.
    loaded = AutoConfig.from_pretrained(c.dst)
    assert loaded.rope_parameters["rope_theta"] == cfg.theta


@pytest.mark.parametrize("name", list(CASES))
def test_output_files(name: str, converted: Callable[[str], Converted]) -> None:
    """DST is a clean HF folder: shards, index, configs, tokenizer copied byte for byte, no Mistral files."""
    c = converted(name)
    names = {p.name for p in c.dst.iterdir()}
    required = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model"}
    assert required <= names, f"missing {required - names}"
    # vLLM switches to its Mistral loader on consolidated*.safetensors; params.json likewise marks a Mistral folder.
    forbidden = {n for n in names if n.startswith("consolidated") or n == "params.json" or n.endswith((".pt", ".pth"))}
    assert not forbidden, f"Mistral-layout files in the HF output: {forbidden}"
    assert (c.dst / "tokenizer.model").read_bytes() == FAKE_TOKENIZER
    shards = shard_files(c.dst)
    assert shards, "no model-*-of-*.safetensors"
    numbers = [SHARD_RE.fullmatch(p.name).groups() for p in shards]
    total = len(shards)
    assert numbers == [(f"{i:05d}", f"{total:05d}") for i in range(1, total + 1)]
    gen = json.loads((c.dst / "generation_config.json").read_text())
    assert gen.get("bos_token_id") == 1 and gen.get("eos_token_id") == 2


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_exact(name: str, converted: Callable[[str], Converted]) -> None:
    """Every HF tensor is present once, bf16 (source dtype kept), and bit-identical to the formats.md mapping."""
    c = converted(name)
    expected = expected_hf_tensors(c.case.cfg, c.weights)
    index = json.loads((c.dst / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    assert set(weight_map) == set(expected)
    seen: dict[str, str] = {}
    for shard in shard_files(c.dst):
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, f"{shard.name} metadata {f.metadata()}"
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert key not in seen, f"{key} in both {seen[key]} and {shard.name}"
                seen[key] = shard.name
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16, f"{key} is {t.dtype}"
                assert t.shape == expected[key].shape, f"{key} shape {tuple(t.shape)}"
                assert torch.equal(t, expected[key]), f"{key} differs from the formats.md mapping of the source"
    assert seen == weight_map
    total = sum(t.numel() * t.element_size() for t in expected.values())
    assert index["metadata"]["total_size"] == total


def test_tolerance_is_discriminating() -> None:
    """The logit comparison used above fails for each classic conversion bug (so passing it means something).

    Each bug is expressed as the torrent weights / hyperparameters that a folder converted with that bug encodes.
    """
    cfg = DEFAULT
    w = make_weights(cfg, seed=11)
    ref = forward(w, cfg, TOKENS)
    tol = logit_tolerance(ref)

    def per_layer(suffixes: tuple[str, ...], fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
        """w with fn(suffix, tensor) applied to layers.L.<suffix> for every layer L."""
        out = dict(w)
        for layer in range(cfg.n_layers):
            for suffix in suffixes:
                key = f"layers.{layer}.{suffix}"
                out[key] = fn(suffix, w[key])
        return out

    def heads(suffix: str) -> int:
        return cfg.n_heads if ".wq." in suffix else cfg.n_kv_heads

    qk = ("attention.wq.weight", "attention.wk.weight")
    experts = [f"feed_forward.experts.{e}." for e in range(cfg.n_experts)]
    swapped = dict(w)
    for layer in range(cfg.n_layers):
        for e in experts:
            p = f"layers.{layer}.{e}"
            swapped[p + "w1.weight"], swapped[p + "w3.weight"] = w[p + "w3.weight"], w[p + "w1.weight"]

    bugs: dict[str, tuple[dict[str, torch.Tensor], TinyConfig]] = {
        "rope_theta 1e4": (w, replace(cfg, rope_theta=1e4)),
        "rope_theta 1e5": (w, replace(cfg, rope_theta=1e5)),
        # q/k copied without the rotary permutation: transformers' rotate_half then pairs the wrong rows.
        "no q/k permutation": (per_layer(qk, lambda s, t: to_interleaved(t, heads(s))), cfg),
        # The grouped-query bug: k permuted as if it had n_heads heads.
        "k permuted with n_heads": (
            per_layer(qk[1:], lambda s, t: to_interleaved(to_half_split(t, cfg.n_heads), cfg.n_kv_heads)),
            cfg,
        ),
        # The H -> T permutation used for T -> H (they differ: the map is not an involution).
        "inverse permutation": (
            per_layer(qk, lambda s, t: to_interleaved(to_interleaved(t, heads(s)), heads(s))),
            cfg,
        ),
        "v permuted too": (per_layer(("attention.wv.weight",), lambda s, t: to_half_split(t, cfg.n_kv_heads)), cfg),
        "w1/w3 swapped": (swapped, cfg),
        # Layout M's w2 row block reshaped to [dim, ffn] instead of transposed.
        "w2 block not transposed": (
            per_layer(tuple(e + "w2.weight" for e in experts), lambda s, t: t.t().contiguous().reshape(t.shape)),
            cfg,
        ),
    }
    for bug, (weights, bug_cfg) in bugs.items():
        diff = max_diff(forward(weights, bug_cfg, TOKENS), ref)
        assert diff > 10 * tol, f"{bug}: logits moved only {diff:.3g}, tolerance {tol:.3g} would not catch it"


def test_small_shards_load_and_index(tmp_path: Path, cli: CliRunner) -> None:
    """--max-shard-size in plain bytes gives several shards; the index maps every tensor to its one shard."""
    cfg = DEFAULT
    weights = make_weights(cfg, seed=12)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_torrent(src, cfg, weights)
    expected = expected_hf_tensors(cfg, weights)
    # Exactly the bytes of embed + layer 0's q, k, v (144,768 of a ~0.6 MB model): the first shard is filled to the
    # limit, which exercises the strict "past the limit" comparison of the published rule; given as plain bytes.
    max_bytes = sum(t.numel() * t.element_size() for t in list(expected.values())[:4])
    cli("convert", src, dst, "--to", "hf", "--from", "torrent", "--max-shard-size", str(max_bytes), "--no-progress")

    shards = shard_files(dst)
    assert len(shards) > 2
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    holders: dict[str, list[str]] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            keys = list(f.keys())
            data = sum(expected[k].numel() * expected[k].element_size() for k in keys)
            assert len(keys) == 1 or data <= max_bytes, f"{shard.name} holds {data} bytes of {len(keys)} tensors"
            for k in keys:
                holders.setdefault(k, []).append(shard.name)
    assert set(holders) == set(expected), "tensors missing from / foreign to the shards"
    duplicated = {k: v for k, v in holders.items() if len(v) != 1}
    assert not duplicated, f"tensors in several shards: {duplicated}"
    assert weight_map == {k: v[0] for k, v in holders.items()}
    assert set(weight_map.values()) == {p.name for p in shards}, "index names a shard that is not there (or misses one)"

    got = hf_logits(dst)
    ref = forward(weights, cfg, TOKENS)
    assert max_diff(got, ref) <= logit_tolerance(ref)

    # The published assignment rule (formats.md): greedy in module order, new shard when the next tensor would
    # push the current one past the limit and the current one is not empty.
    assignment: dict[str, int] = {}
    shard_no, used = 1, 0
    for key, t in expected.items():
        nbytes = t.numel() * t.element_size()
        if used and used + nbytes > max_bytes:
            shard_no, used = shard_no + 1, 0
        assignment[key] = shard_no
        used += nbytes
    n = shard_no
    assert weight_map == {k: f"model-{i:05d}-of-{n:05d}.safetensors" for k, i in assignment.items()}


def test_missing_source_is_one_line_error(tmp_path: Path, cli: CliRunner) -> None:
    """A bad source exits non-zero with one line on stderr (no traceback) and creates no DST."""
    dst = tmp_path / "dst"
    proc = cli("convert", tmp_path / "does-not-exist", dst, "--to", "hf", "--no-progress", check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr:\n{proc.stderr}"
    assert not dst.exists()
