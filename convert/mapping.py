"""Mapping tables: mappings/*.toml loaded once into immutable objects, expanded per model into name lookups.

canonical.toml names every kind of tensor with its shape; each layout table names how that layout spells and
stores each kind. A conversion maps source names to canonical keys and canonical keys to target names; an
unknown name fails loudly. Nothing here knows any particular pair of layouts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType

SCOPES = ("model", "layer", "expert")
ATTRIBUTES = ("rotary", "orientation", "experts")  # applied to a canonical tensor in this order


@dataclass(frozen=True)
class Kind:
    name: str
    scope: str
    shape: tuple[tuple[str, ...], ...]  # each dimension: the product of these parameters
    rotary_heads: str | None

    def dims(self, env: Mapping[str, int]) -> tuple[int, ...]:
        result = []
        for factors in self.shape:
            size = 1
            for factor in factors:
                size *= env[factor]
            result.append(size)
        return tuple(result)


@dataclass(frozen=True)
class Attribute:
    canonical: str
    transforms: Mapping[str, str]  # value -> transform taking the canonical form to that value
    placements: tuple[str, ...]  # values realised by byte placement, not by a transform

    def allowed(self) -> set[str]:
        return {self.canonical, *self.transforms, *self.placements}


@dataclass(frozen=True)
class Canonical:
    kinds: Mapping[str, Kind]
    attributes: Mapping[str, Attribute]


@dataclass(frozen=True)
class KindLayout:
    """How one layout stores one kind: its name pattern and its value of each attribute."""

    kind: Kind
    pattern: str
    attributes: Mapping[str, str]

    @property
    def stacked(self) -> bool:
        return self.attributes["experts"] == "stacked"

    def piece_shape(self, env: Mapping[str, int]) -> tuple[int, ...]:
        """Shape of one canonical tensor as this layout stores it (one expert's block when stacked)."""
        dims = self.kind.dims(env)
        return tuple(reversed(dims)) if self.attributes["orientation"] == "in_out" else dims


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a layout stores it: a name and the canonical keys it holds (several when stacked)."""

    name: str
    layout: KindLayout
    layer: int | None
    experts: tuple[int, ...]  # () for non-expert kinds; one expert, or all when stacked

    def shape(self, env: Mapping[str, int]) -> tuple[int, ...]:
        piece = self.layout.piece_shape(env)
        if self.layout.stacked:
            return (piece[0] * len(self.experts), *piece[1:])
        return piece

    def canonical_keys(self) -> tuple[tuple[str, int | None, int | None], ...]:
        kind = self.layout.kind.name
        if not self.experts:
            return ((kind, self.layer, None),)
        return tuple((kind, self.layer, expert) for expert in self.experts)


@dataclass(frozen=True)
class LayoutTable:
    name: str
    description: str
    container: str
    params_style: str
    markers: tuple[str, ...]
    must_not_contain: tuple[str, ...]  # globs an output folder of this layout must not hold
    replaces: tuple[str, ...]  # globs of an earlier output that --force removes
    kinds: tuple[KindLayout, ...]  # in table order, which is the layout's module order
    extra: Mapping[str, object]  # other sections (config defaults, ...)

    def kind_layout(self, kind: str) -> KindLayout:
        for entry in self.kinds:
            if entry.kind.name == kind:
                return entry
        raise KeyError(f"layout {self.name} has no entry for kind {kind}")

    def tensors(self, n_layers: int, n_experts: int) -> list[StoredTensor]:
        """Every tensor of a model in module order: model tensors listed before the layer kinds, each layer
        (its expert kinds grouped per expert), then the model tensors listed after."""
        first = next(i for i, k in enumerate(self.kinds) if k.kind.scope != "model")
        last = max(i for i, k in enumerate(self.kinds) if k.kind.scope != "model")
        result = [StoredTensor(k.pattern, k, None, ()) for k in self.kinds[:first]]
        for layer in range(n_layers):
            index = first
            while index <= last:
                entry = self.kinds[index]
                if entry.kind.scope == "layer":
                    result.append(StoredTensor(entry.pattern.format(layer=layer), entry, layer, ()))
                    index += 1
                    continue
                group_end = index
                while group_end <= last and self.kinds[group_end].kind.scope == "expert":
                    group_end += 1
                group = self.kinds[index:group_end]
                for stacked in [g for g in group if g.stacked]:
                    result.append(
                        StoredTensor(stacked.pattern.format(layer=layer), stacked, layer, tuple(range(n_experts)))
                    )
                for expert in range(n_experts):
                    for single in [g for g in group if not g.stacked]:
                        name = single.pattern.format(layer=layer, expert=expert)
                        result.append(StoredTensor(name, single, layer, (expert,)))
                index = group_end
        result += [StoredTensor(k.pattern, k, None, ()) for k in self.kinds[last + 1 :]]
        return result


def data_dir(name: str) -> Traversable:
    """The package data folder convert.<name> (mappings, pins), found only through the import system.

    mappings/ and pins/ sit at the top of the repository and are installed as convert/mappings and convert/pins
    (pyproject.toml's package-dir). Each is a regular package (it has an __init__.py), so resources.files gives
    the folder itself, a plain path in a wheel and in an editable install alike; as namespace packages they came
    back as a MultiplexedPath, whose str() is not a path. Nothing else is looked at: a folder that merely sits
    beside the package (an unrelated top-level mappings/ in site-packages) is never read."""
    return resources.files(f"convert.{name}")


def _read_toml(name: str) -> dict:
    return tomllib.loads(data_dir("mappings").joinpath(f"{name}.toml").read_text(encoding="utf-8"))


@cache
def canonical() -> Canonical:
    data = _read_toml("canonical")
    kinds = {}
    for name, spec in data["kinds"].items():
        if spec["scope"] not in SCOPES:
            raise ValueError(f"canonical.toml: kind {name} has unknown scope {spec['scope']!r}")
        shape = tuple(tuple(factors) for factors in spec["shape"])
        kinds[name] = Kind(name, spec["scope"], shape, spec.get("rotary_heads"))
    attributes = {
        name: Attribute(
            spec["canonical"], MappingProxyType(dict(spec.get("values", {}))), tuple(spec.get("placements", ()))
        )
        for name, spec in data["attributes"].items()
    }
    if set(attributes) != set(ATTRIBUTES):
        raise ValueError(f"canonical.toml: attributes must be exactly {ATTRIBUTES}")
    return Canonical(MappingProxyType(kinds), MappingProxyType(attributes))


def layout_names() -> tuple[str, ...]:
    tables = (entry.name for entry in data_dir("mappings").iterdir() if entry.name.endswith(".toml"))
    return tuple(sorted(name.removesuffix(".toml") for name in tables if name != "canonical.toml"))


@cache
def layout(name: str) -> LayoutTable:
    """Load and check one layout table: every canonical kind once, known attribute values only."""
    if name not in layout_names():
        raise KeyError(name)
    data = _read_toml(name)
    base = canonical()
    kinds = []
    for kind_name, spec in data["tensors"].items():
        if kind_name not in base.kinds:
            raise ValueError(f"{name}.toml: unknown kind {kind_name!r}")
        attributes = {}
        for attr, rule in base.attributes.items():
            value = spec.get(attr, rule.canonical)
            if value not in rule.allowed():
                raise ValueError(f"{name}.toml: {kind_name}.{attr} = {value!r} is not one of {sorted(rule.allowed())}")
            attributes[attr] = value
        unknown = set(spec) - {"name", *ATTRIBUTES}
        if unknown:
            raise ValueError(f"{name}.toml: {kind_name} has unknown keys {sorted(unknown)}")
        kinds.append(KindLayout(base.kinds[kind_name], spec["name"], MappingProxyType(attributes)))
    missing = set(base.kinds) - {k.kind.name for k in kinds}
    if missing:
        raise ValueError(f"{name}.toml: no entry for kinds {sorted(missing)}")
    info = data["layout"]
    extra = MappingProxyType({k: v for k, v in data.items() if k not in ("layout", "tensors")})
    return LayoutTable(
        info["name"],
        info["description"],
        info["container"],
        info["params"],
        tuple(info["markers"]),
        tuple(info.get("must_not_contain", ())),
        tuple(info.get("replaces", ())),
        tuple(kinds),
        extra,
    )
