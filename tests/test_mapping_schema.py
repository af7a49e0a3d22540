"""The schema check of the mapping tables: each rule, broken once in a copy of a shipped table, gives one line
naming the table, the entry and the rule, when the table is loaded (never a hang or a failure mid-run)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from convert.common.errors import ConvertError
from convert.containers import format_of
from convert.model.tables import data_dir, layout, layout_names, load_canonical, load_layout

pytestmark = pytest.mark.unit

SHIPPED = data_dir("mappings")


@pytest.fixture
def tables(tmp_path: Path) -> Path:
    """A copy of the shipped tables to break; the shipped ones are never touched."""
    folder = tmp_path / "mappings"
    shutil.copytree(SHIPPED, folder)
    return folder


def edit(path: Path, old: str, new: str, *, count: int = 1) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, count))


def load(folder: Path, name: str) -> None:
    base = load_canonical(folder / "canonical.toml")
    if name != "canonical":
        format_of(load_layout(folder / f"{name}.toml", base))  # the registry resolves the table's container


def test_the_shipped_tables_pass() -> None:
    for name in layout_names():
        load(SHIPPED, name)
        assert layout(name).name == name


HF_Q = '"model.layers.{layer}.self_attn.q_proj.weight", rotary = "half_split" }'
HF_V = 'attn_v = { name = "model.layers.{layer}.self_attn.v_proj.weight" }'
HF_W1 = 'expert_w1 = { name = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight" }'
MB_W1 = 'expert_w1 = { name = "layers.{layer}.block_sparse_moe.w1", experts = "stacked" }'

Edit = Callable[[Path], None]
CASES: dict[str, tuple[str, Edit, str]] = {
    # scope order: a model kind between two layer kinds made LayoutTable.tensors loop forever
    "model-kind-between-layer-kinds": (
        "hf",
        lambda f: (
            edit(f / "hf.toml", 'norm = { name = "model.norm.weight" }\n', ""),
            edit(f / "hf.toml", HF_V, HF_V + '\nnorm = { name = "model.norm.weight" }'),
        ),
        "hf.toml: tensors.norm: a model kind between layer kinds: list model kinds before or after all layer",
    ),
    # placeholders against scope
    "layer-kind-without-layer": (
        "hf",
        lambda f: edit(f / "hf.toml", "model.layers.{layer}.self_attn.v_proj", "model.layers.self_attn.v_proj"),
        "hf.toml: tensors.attn_v: name must hold {layer} once: attn_v is a layer kind",
    ),
    "layer-kind-with-expert": (
        "hf",
        lambda f: edit(f / "hf.toml", "{layer}.self_attn.v_proj", "{layer}.{expert}.self_attn.v_proj"),
        "hf.toml: tensors.attn_v: name may not hold {expert}: attn_v is a layer kind",
    ),
    "expert-kind-without-expert": (
        "hf",
        lambda f: edit(f / "hf.toml", "experts.{expert}.w1", "experts.w1"),
        "hf.toml: tensors.expert_w1: name must hold {expert} once: expert_w1 is an expert kind",
    ),
    "stacked-kind-with-expert": (
        "megablocks",
        lambda f: edit(f / "megablocks.toml", "block_sparse_moe.w1", "block_sparse_moe.{expert}.w1"),
        "megablocks.toml: tensors.expert_w1: name may not hold {expert}: expert_w1 is a stacked expert kind",
    ),
    "model-kind-with-layer": (
        "hf",
        lambda f: edit(f / "hf.toml", '"model.norm.weight"', '"model.{layer}.norm.weight"'),
        "hf.toml: tensors.norm: name may not hold {layer}: norm is a model kind",
    ),
    "unknown-placeholder": (
        "hf",
        lambda f: edit(f / "hf.toml", "layers.{layer}.self_attn.v_proj", "layers.{layers}.self_attn.v_proj"),
        "hf.toml: tensors.attn_v: name has placeholder {layers}; only {layer} and {expert} exist",
    ),
    "format-spec": (
        "hf",
        lambda f: edit(f / "hf.toml", "layers.{layer}.self_attn.v_proj", "layers.{layer:03d}.self_attn.v_proj"),
        "hf.toml: tensors.attn_v: name has placeholder {layer}; only {layer} and {expert} exist",
    ),
    "unbalanced-brace": (
        "hf",
        lambda f: edit(f / "hf.toml", "layers.{layer}.self_attn.v_proj", "layers.{layer.self_attn.v_proj"),
        "hf.toml: tensors.attn_v: name 'model.layers.{layer.self_attn.v_proj.weight' is not a valid pattern",
    ),
    # attributes allowed per kind
    "rotary-without-rotary-heads": (
        "hf",
        lambda f: edit(f / "hf.toml", HF_V, HF_V.replace(" }", ', rotary = "half_split" }')),
        "hf.toml: tensors.attn_v: rotary applies only to kinds with rotary heads (attn_q, attn_k); attn_v has none",
    ),
    "stacked-on-a-layer-kind": (
        "megablocks",
        lambda f: edit(f / "megablocks.toml", 'gate.weight" }', 'gate.weight", experts = "stacked" }'),
        "megablocks.toml: tensors.router: experts applies only to expert kinds; router is a layer kind",
    ),
    "orientation-on-a-vector": (
        "hf",
        lambda f: edit(f / "hf.toml", '"model.norm.weight" }', '"model.norm.weight", orientation = "in_out" }'),
        "hf.toml: tensors.norm: orientation applies only to matrices; norm has 1 dimension(s)",
    ),
    "unknown-attribute-value": (
        "hf",
        lambda f: edit(f / "hf.toml", HF_Q, HF_Q.replace("half_split", "halfsplit")),
        "hf.toml: tensors.attn_q.rotary: 'halfsplit' is not one of ['half_split', 'interleaved']",
    ),
    "unknown-tensor-key": (
        "hf",
        lambda f: edit(f / "hf.toml", HF_W1, HF_W1.replace(" }", ", stacked = true }")),
        "hf.toml: tensors.expert_w1: unknown key 'stacked' (allowed: name, rotary, orientation, experts)",
    ),
    "tensor-without-name": (
        "megablocks",
        lambda f: edit(f / "megablocks.toml", MB_W1, 'expert_w1 = { experts = "stacked" }'),
        "megablocks.toml: tensors.expert_w1: missing required key 'name'",
    ),
    "same-name-twice": (
        "hf",
        lambda f: edit(f / "hf.toml", "self_attn.v_proj", "self_attn.k_proj"),
        "hf.toml: tensors.attn_v: name 'model.layers.{layer}.self_attn.k_proj.weight' is also the name of attn_k",
    ),
    # kinds: every canonical kind once, no other
    "unknown-kind": (
        "hf",
        lambda f: edit(f / "hf.toml", "attn_v = {", "attn_value = {"),
        "hf.toml: tensors.attn_value: unknown kind (canonical kinds: embed, attn_q,",
    ),
    "missing-kind": (
        "hf",
        lambda f: edit(f / "hf.toml", HF_V + "\n", ""),
        "hf.toml: tensors: no entry for kind 'attn_v': every canonical kind needs one",
    ),
    # sections and [layout] keys
    "missing-tensors-section": (
        "mistral",
        lambda f: edit(f / "mistral.toml", "[tensors]", "[tensor]"),
        "mistral.toml: unknown section [tensor] (allowed: layout, tensors)",
    ),
    "missing-layout-section": (
        "mistral",
        lambda f: (f / "mistral.toml").write_text((f / "mistral.toml").read_text().split("[layout]")[0] + "[tensors]"),
        "mistral.toml: missing section [layout]",
    ),
    "release-metadata-in-a-naming-table": (
        "hf",
        lambda f: (f / "hf.toml").write_text((f / "hf.toml").read_text() + "\n[config_defaults]\nmodel_type = 'x'\n"),
        "hf.toml: unknown section [config_defaults] (allowed: layout, tensors)",
    ),
    "missing-layout-key": (
        "torrent",
        lambda f: edit(f / "torrent.toml", 'container = "mistral_pth"', ""),
        "torrent.toml: layout: missing required key 'container'",
    ),
    "unknown-layout-key": (
        "torrent",
        lambda f: edit(f / "torrent.toml", 'container = "mistral_pth"', 'container = "mistral_pth"\nmarker = "x"'),
        "torrent.toml: layout: unknown key 'marker' (allowed: name, description, container, read_only)",
    ),
    "read-only-not-a-bool": (
        "torrent",
        lambda f: edit(f / "torrent.toml", 'container = "mistral_pth"', 'container = "mistral_pth"\nread_only = "yes"'),
        "torrent.toml: layout.read_only: must be true or false",
    ),
    "unknown-container": (
        "torrent",
        lambda f: edit(f / "torrent.toml", 'container = "mistral_pth"', 'container = "zip"'),
        "torrent.toml: layout.container: 'zip' is not one of gguf, hf_safetensors, megablocks_pt, mistral_pth,",
    ),
    "name-is-not-the-file": (
        "torrent",
        lambda f: edit(f / "torrent.toml", 'name = "torrent"', 'name = "hf"'),
        "torrent.toml: layout.name: is 'hf'; it must be the file's name, 'torrent'",
    ),
    "not-toml": (
        "torrent",
        lambda f: edit(f / "torrent.toml", "[tensors]", "[tensors"),
        "torrent.toml: not valid TOML:",
    ),
    # canonical.toml
    "canonical-unknown-scope": (
        "canonical",
        lambda f: edit(f / "canonical.toml", 'scope = "layer"', 'scope = "block"'),
        "canonical.toml: kinds.attn_q: scope 'block' is not one of model, layer, expert",
    ),
    "canonical-unknown-parameter": (
        "canonical",
        lambda f: edit(f / "canonical.toml", '[["n_heads", "head_dim"], ["dim"]]', '[["heads", "head_dim"], ["dim"]]'),
        "canonical.toml: kinds.attn_q: shape names 'heads', not a model parameter",
    ),
    "canonical-rotary-heads-not-in-shape": (
        "canonical",
        lambda f: edit(f / "canonical.toml", 'rotary_heads = "n_kv_heads"', 'rotary_heads = "n_heads"'),
        "canonical.toml: kinds.attn_k: rotary_heads 'n_heads' must be a factor of the first of two dimensions",
    ),
    "canonical-unknown-kind-key": (
        "canonical",
        lambda f: edit(f / "canonical.toml", 'scope = "model"', 'scope = "model"\nrotary = "x"'),
        "canonical.toml: kinds.embed: unknown key 'rotary' (allowed: scope, shape, rotary_heads)",
    ),
    "canonical-missing-shape": (
        "canonical",
        lambda f: edit(f / "canonical.toml", 'shape = [["dim"]]\n', "", count=1),
        "canonical.toml: kinds.attn_norm: missing required key 'shape'",
    ),
    "canonical-missing-attribute": (
        "canonical",
        lambda f: edit(f / "canonical.toml", "[attributes.orientation]", "[attributes.orient]"),
        "canonical.toml: attributes: must be exactly rotary, orientation, experts (found experts, orient, rotary)",
    ),
    "canonical-missing-kinds": (
        "canonical",
        lambda f: (f / "canonical.toml").write_text(
            "[attributes" + (f / "canonical.toml").read_text().split("[attributes", 1)[1]
        ),
        "canonical.toml: missing required key 'kinds'",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_each_rule_gives_its_line(tables: Path, case: str) -> None:
    name, breaking, message = CASES[case]
    breaking(tables)
    with pytest.raises(ConvertError) as caught:
        load(tables, name)
    line = caught.value.line()
    assert message in line, line
    assert line.startswith(str(tables / ("canonical" if name == "canonical" else name))), line
    assert "\n" not in line
    assert re.fullmatch(r"\S+\.toml: .+", line), line
