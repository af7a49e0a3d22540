"""Mapping tables: mappings/*.toml loaded once into immutable objects, expanded per model into name lookups.

canonical.toml names every kind of tensor with its shape; each layout table names how that layout spells and
stores each kind. A conversion maps source names to canonical keys and canonical keys to target names; an
unknown name fails loudly. Nothing here knows any particular pair of layouts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Formatter
from types import MappingProxyType

from convert.common.errors import ConvertError
from convert.model.params import ModelParams

SCOPES = ("model", "layer", "expert")
ATTRIBUTES = ("rotary", "orientation", "experts")  # applied to a canonical tensor in this order
STACKED = ("stacked", "batched")  # the experts values that put every expert of a layer in one tensor


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
        """All experts in one tensor, expert E the E-th block of rows (stacked) or the E-th matrix (batched)."""
        return self.attributes["experts"] in STACKED

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
    experts: tuple[int, ...] | range  # () for non-expert kinds; one expert, or all (a range) when stacked

    def shape(self, env: Mapping[str, int]) -> tuple[int, ...]:
        piece = self.layout.piece_shape(env)
        if self.layout.attributes["experts"] == "batched":
            return (len(self.experts), *piece)
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
    """A naming table: how one layout spells and stores each canonical kind, and the name of the container whose
    files hold them (the registry, convert.containers, resolves it: a table is data and knows no code)."""

    name: str
    description: str
    container: str
    kinds: tuple[KindLayout, ...]  # in table order, which is the layout's module order
    path: str = ""  # the file the table was read from, for messages about it
    read_only: bool = False  # a layout to read and never write (one its loaders no longer load)

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
                    result.append(StoredTensor(stacked.pattern.format(layer=layer), stacked, layer, range(n_experts)))
                singles = [g for g in group if not g.stacked]
                for expert in range(n_experts) if singles else ():  # stacked only: nothing per expert
                    for single in singles:
                        name = single.pattern.format(layer=layer, expert=expert)
                        result.append(StoredTensor(name, single, layer, (expert,)))
                index = group_end
        result += [StoredTensor(k.pattern, k, None, ()) for k in self.kinds[last + 1 :]]
        return result

    def tensor_count(self, n_layers: int, n_experts: int) -> int:
        """len(self.tensors(n_layers, n_experts)), by arithmetic: how many tensors params imply, known before a
        list of them (which grows with layers times experts) is built."""
        per_layer = 0
        for entry in self.kinds:
            if entry.kind.scope == "layer" or (entry.kind.scope == "expert" and entry.stacked):
                per_layer += 1
            elif entry.kind.scope == "expert":
                per_layer += n_experts
        model = sum(entry.kind.scope == "model" for entry in self.kinds)
        return model + n_layers * per_layer


def data_dir(name: str) -> Traversable:
    """The package data folder convert.<name> (mappings, pins), found only through the import system.

    mappings/ and pins/ sit at the top of the repository and are installed as convert/mappings and convert/pins
    (pyproject.toml's package-dir). Each is a regular package (it has an __init__.py), so resources.files gives
    the folder itself, a plain path in a wheel and in an editable install alike; as namespace packages they came
    back as a MultiplexedPath, whose str() is not a path. Nothing else is looked at: a folder that merely sits
    beside the package (an unrelated top-level mappings/ in site-packages) is never read."""
    return resources.files(f"convert.{name}")


# What a table may hold. A table is data a user may edit, so every rule is checked when it is loaded and broken
# rules are one line naming the table, the entry and the rule (not a hang or a failure halfway through a run).
KIND_KEYS = {"scope": True, "shape": True, "rotary_heads": False}  # key -> required
ATTRIBUTE_KEYS = {"canonical": True, "values": False, "placements": False}
LAYOUT_KEYS = {"name": True, "description": True, "container": True, "read_only": False}
PLACEHOLDERS = ("layer", "expert")


def _model_parameters() -> frozenset[str]:
    """The integer model parameters a canonical shape may name (ModelParams.shape_env's keys)."""
    return frozenset(f.name for f in fields(ModelParams) if f.type == "int")


def _fail(path: Path | Traversable, where: str, rule: str) -> ConvertError:
    return ConvertError(f"{where}: {rule}" if where else rule, file=path)


def _read_toml(path: Path | Traversable) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError("mapping table is missing", file=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"not valid TOML: {exc}", file=path) from None


def _check_keys(path: Path | Traversable, where: str, table: object, allowed: Mapping[str, bool]) -> dict:
    """table is a TOML table holding every required key of allowed and no other."""
    if not isinstance(table, dict):
        raise _fail(path, where, "must be a table")
    missing = [key for key, required in allowed.items() if required and key not in table]
    if missing:
        raise _fail(path, where, f"missing required key {missing[0]!r}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _fail(path, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    return table


def _string_list(path: Path | Traversable, where: str, value: object, *, empty: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (not empty and not value):
        raise _fail(path, where, "must be a list of non-empty strings" + ("" if empty else ", not empty"))
    return tuple(value)


def load_canonical(path: Path | Traversable) -> Canonical:
    """Read and check canonical.toml at path: kinds with a known scope and a shape of known parameters, and
    exactly the attributes the transforms know."""
    data = _check_keys(path, "", _read_toml(path), {"kinds": True, "attributes": True})
    known = _model_parameters()
    kinds = {}
    if not isinstance(data["kinds"], dict) or not data["kinds"]:
        raise _fail(path, "kinds", "must be a table of one or more kinds")
    for name, spec in data["kinds"].items():
        where = f"kinds.{name}"
        _check_keys(path, where, spec, KIND_KEYS)
        if spec["scope"] not in SCOPES:
            raise _fail(path, where, f"scope {spec['scope']!r} is not one of {', '.join(SCOPES)}")
        shape = spec["shape"]
        if not isinstance(shape, list) or not shape:
            raise _fail(path, where, "shape must be a list of dimensions, each a list of parameter names")
        dims = tuple(_string_list(path, f"{where}.shape", factors, empty=False) for factors in shape)
        unknown = sorted({f for dim in dims for f in dim} - known)
        if unknown:
            raise _fail(path, where, f"shape names {unknown[0]!r}, not a model parameter ({', '.join(sorted(known))})")
        heads = spec.get("rotary_heads")
        if heads is not None and (len(dims) != 2 or heads not in dims[0]):
            raise _fail(path, where, f"rotary_heads {heads!r} must be a factor of the first of two dimensions")
        kinds[name] = Kind(name, spec["scope"], dims, heads)
    attributes = {}
    if not isinstance(data["attributes"], dict) or set(data["attributes"]) != set(ATTRIBUTES):
        found = sorted(data["attributes"]) if isinstance(data["attributes"], dict) else []
        raise _fail(path, "attributes", f"must be exactly {', '.join(ATTRIBUTES)} (found {', '.join(found)})")
    for name, spec in data["attributes"].items():
        where = f"attributes.{name}"
        _check_keys(path, where, spec, ATTRIBUTE_KEYS)
        values = spec.get("values", {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise _fail(path, where, "values must map each value to the name of its transform")
        placements = _string_list(path, f"{where}.placements", spec.get("placements", []))
        attributes[name] = Attribute(spec["canonical"], MappingProxyType(dict(values)), placements)
    return Canonical(MappingProxyType(kinds), MappingProxyType(attributes))


@cache
def canonical() -> Canonical:
    return load_canonical(data_dir("mappings") / "canonical.toml")


def layout_names() -> tuple[str, ...]:
    tables = (entry.name for entry in data_dir("mappings").iterdir() if entry.name.endswith(".toml"))
    return tuple(sorted(name.removesuffix(".toml") for name in tables if name != "canonical.toml"))


def target_names() -> tuple[str, ...]:
    """The layouts a conversion may write: every table but the read-only ones."""
    return tuple(name for name in layout_names() if not layout(name).read_only)


def _check_pattern(path: Path, where: str, pattern: object, kind: Kind, stacked: bool) -> str:
    """The name pattern has exactly the placeholders its kind's scope needs: {layer} for layer and expert kinds,
    {expert} for an expert kind stored one tensor per expert; no other placeholders, no format specs."""
    if not isinstance(pattern, str) or not pattern:
        raise _fail(path, where, "name must be a non-empty string")
    try:
        found = [(f, spec, conv) for _, f, spec, conv in Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        raise _fail(path, where, f"name {pattern!r} is not a valid pattern: {exc}") from None
    for field_name, spec, conversion in found:
        if field_name not in PLACEHOLDERS or spec or conversion:
            raise _fail(path, where, f"name has placeholder {{{field_name}}}; only {{layer}} and {{expert}} exist")
    used = [f for f, _, _ in found]
    scope = (
        "a stacked expert" if stacked else {"model": "a model", "layer": "a layer", "expert": "an expert"}[kind.scope]
    )
    needed = {"model": [], "layer": ["layer"], "expert": ["layer"] if stacked else ["layer", "expert"]}[kind.scope]
    for placeholder in PLACEHOLDERS:
        count = used.count(placeholder)
        if placeholder in needed and count != 1:
            raise _fail(path, where, f"name must hold {{{placeholder}}} once: {kind.name} is {scope} kind")
        if placeholder not in needed and count:
            raise _fail(path, where, f"name may not hold {{{placeholder}}}: {kind.name} is {scope} kind")
    return pattern


def _check_scope_order(path: Path, kinds: list[KindLayout]) -> None:
    """Model kinds, then every layer and expert kind in one run, then model kinds: tensors() walks that order."""
    inner = [i for i, k in enumerate(kinds) if k.kind.scope != "model"]
    for entry in kinds[inner[0] : inner[-1] + 1] if inner else []:
        if entry.kind.scope == "model":
            raise _fail(
                path,
                f"tensors.{entry.kind.name}",
                "a model kind between layer kinds: list model kinds before or after all layer and expert kinds",
            )


def load_layout(path: Path | Traversable, base: Canonical) -> LayoutTable:
    """Read and check one layout table at path against the canonical kinds: every kind once, in scope order,
    with the placeholders its scope needs and only the attributes that apply to it."""
    data = _read_toml(path)
    unknown = sorted(set(data) - {"layout", "tensors"})
    if unknown:
        raise _fail(path, "", f"unknown section [{unknown[0]}] (allowed: layout, tensors)")
    for section in ("layout", "tensors"):
        if section not in data:
            raise _fail(path, "", f"missing section [{section}]")
    info = _check_keys(path, "layout", data["layout"], LAYOUT_KEYS)
    for key in ("name", "description"):
        if not isinstance(info[key], str) or not info[key]:
            raise _fail(path, f"layout.{key}", "must be a non-empty string")
    stem = path.name.removesuffix(".toml")
    if info["name"] != stem:
        raise _fail(path, "layout.name", f"is {info['name']!r}; it must be the file's name, {stem!r}")
    if not isinstance(info["container"], str) or not info["container"].isidentifier():
        raise _fail(path, "layout.container", "must name a container module (convert.containers resolves it)")
    if not isinstance(info.get("read_only", False), bool):
        raise _fail(path, "layout.read_only", "must be true or false")
    if not isinstance(data["tensors"], dict):
        raise _fail(path, "tensors", "must be a table")
    kinds = []
    patterns: dict[str, str] = {}
    for kind_name, spec in data["tensors"].items():
        where = f"tensors.{kind_name}"
        if kind_name not in base.kinds:
            raise _fail(path, where, f"unknown kind (canonical kinds: {', '.join(base.kinds)})")
        kind = base.kinds[kind_name]
        _check_keys(path, where, spec, {"name": True, **dict.fromkeys(ATTRIBUTES, False)})
        if "rotary" in spec and kind.rotary_heads is None:
            with_heads = ", ".join(k.name for k in base.kinds.values() if k.rotary_heads)
            raise _fail(
                path, where, f"rotary applies only to kinds with rotary heads ({with_heads}); {kind_name} has none"
            )
        if "experts" in spec and kind.scope != "expert":
            raise _fail(path, where, f"experts applies only to expert kinds; {kind_name} is a {kind.scope} kind")
        if "orientation" in spec and len(kind.shape) != 2:
            raise _fail(
                path, where, f"orientation applies only to matrices; {kind_name} has {len(kind.shape)} dimension(s)"
            )
        attributes = {}
        for attr, rule in base.attributes.items():
            value = spec.get(attr, rule.canonical)
            if value not in rule.allowed():
                raise _fail(path, f"{where}.{attr}", f"{value!r} is not one of {sorted(rule.allowed())}")
            attributes[attr] = value
        pattern = _check_pattern(path, where, spec["name"], kind, attributes["experts"] in STACKED)
        if pattern in patterns:
            raise _fail(path, where, f"name {pattern!r} is also the name of {patterns[pattern]}")
        patterns[pattern] = kind_name
        kinds.append(KindLayout(kind, pattern, MappingProxyType(attributes)))
    missing = [k for k in base.kinds if k not in data["tensors"]]
    if missing:
        raise _fail(path, "tensors", f"no entry for kind {missing[0]!r}: every canonical kind needs one")
    _check_scope_order(path, kinds)
    return LayoutTable(
        info["name"], info["description"], info["container"], tuple(kinds), str(path), info.get("read_only", False)
    )


@cache
def layout(name: str) -> LayoutTable:
    """Load and check one layout table of the shipped mappings."""
    if name not in layout_names():
        raise KeyError(name)
    return load_layout(data_dir("mappings") / f"{name}.toml", canonical())
