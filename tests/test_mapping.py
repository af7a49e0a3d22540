"""The mapping tables: complete, unambiguous, in the module order that reproduces the published shards."""

from __future__ import annotations

import pytest

from convert.model.tables import canonical, layout, layout_names

pytestmark = pytest.mark.unit

REAL = {"n_layers": 32, "n_experts": 8}


def test_all_layouts_load() -> None:
    assert set(layout_names()) == {"gguf", "gguf_legacy", "hf", "megablocks", "mistral", "mlx", "torrent"}
    assert [name for name in layout_names() if layout(name).read_only] == ["gguf_legacy"]


@pytest.mark.parametrize(
    ("name", "count"),
    [("torrent", 995), ("mistral", 995), ("hf", 995), ("megablocks", 323), ("gguf", 323), ("gguf_legacy", 995)],
)
def test_real_model_tensor_counts(name: str, count: int) -> None:
    tensors = layout(name).tensors(**REAL)
    names = [t.name for t in tensors]
    assert len(names) == count
    assert len(set(names)) == count


def test_every_layout_covers_every_canonical_key_once() -> None:
    keys = None
    for name in layout_names():
        mine = [k for t in layout(name).tensors(2, 3) for k in t.canonical_keys()]
        assert len(mine) == len(set(mine))
        keys = keys or set(mine)
        assert set(mine) == keys, name


def test_hf_module_order() -> None:
    names = [t.name for t in layout("hf").tensors(2, 2)]
    layer0 = [n.removeprefix("model.layers.0.") for n in names[1:14]]
    assert names[0] == "model.embed_tokens.weight"
    assert layer0 == [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "block_sparse_moe.gate.weight",
        "block_sparse_moe.experts.0.w1.weight",
        "block_sparse_moe.experts.0.w2.weight",
        "block_sparse_moe.experts.0.w3.weight",
        "block_sparse_moe.experts.1.w1.weight",
        "block_sparse_moe.experts.1.w2.weight",
        "block_sparse_moe.experts.1.w3.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    assert names[14] == "model.layers.1.self_attn.q_proj.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]


def test_megablocks_stacks_and_transposes_w2() -> None:
    env = {"dim": 16, "hidden_dim": 24, "n_experts": 8}
    stored = {t.name: t for t in layout("megablocks").tensors(1, 8)}
    assert stored["layers.0.block_sparse_moe.w1"].shape(env) == (8 * 24, 16)
    assert stored["layers.0.block_sparse_moe.w2"].shape(env) == (8 * 24, 16)
    assert stored["layers.0.block_sparse_moe.w2"].canonical_keys()[3] == ("expert_w2", 0, 3)


def test_canonical_shapes_name_known_parameters() -> None:
    known = {"dim", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "n_experts", "vocab_size"}
    for kind in canonical().kinds.values():
        assert {f for dim in kind.shape for f in dim} <= known
