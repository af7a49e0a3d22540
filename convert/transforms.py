"""Named transforms between a canonical tensor and the way a layout stores it, each with its inverse.

rotary_half_split: q/k rows from the original interleaved rotary order (pairs (0,1), (2,3)... of each head
are complex numbers) to the half-split order rotate_half expects; heads = all heads for q, KV heads for k.
It is not its own inverse. transpose: [out, in] to [in, out] (megablocks' w2 blocks); its own inverse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from convert.errors import ConvertError
from convert.mapping import ATTRIBUTES, KindLayout, canonical


def _rows_by_head(tensor: torch.Tensor, heads: int) -> tuple[int, int, int]:
    if tensor.dim() != 2:
        raise ValueError(f"expects a matrix, got shape {list(tensor.shape)}")
    rows, cols = tensor.shape
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    return rows, cols, rows // heads


def _to_half_split(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols, head_dim = _rows_by_head(tensor, heads)
    return tensor.view(heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_interleaved(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols, head_dim = _rows_by_head(tensor, heads)
    return tensor.view(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _transpose(tensor: torch.Tensor, _heads: int) -> torch.Tensor:
    if tensor.dim() != 2:
        raise ValueError(f"expects a matrix, got shape {list(tensor.shape)}")
    return tensor.t().contiguous()


@dataclass(frozen=True)
class Transform:
    name: str
    inverse_name: str
    function: Callable[[torch.Tensor, int], torch.Tensor]

    @property
    def inverse(self) -> Transform:
        return TRANSFORMS[self.inverse_name]


TRANSFORMS: Mapping[str, Transform] = MappingProxyType(
    {
        "rotary_half_split": Transform("rotary_half_split", "rotary_interleaved", _to_half_split),
        "rotary_interleaved": Transform("rotary_interleaved", "rotary_half_split", _to_interleaved),
        "transpose": Transform("transpose", "transpose", _transpose),
    }
)


@dataclass(frozen=True)
class Step:
    """A transform bound to the head count of the tensor it runs on."""

    transform: Transform
    heads: int

    def __str__(self) -> str:
        return self.transform.name


def steps_between(source: KindLayout, target: KindLayout, env: Mapping[str, int]) -> tuple[Step, ...]:
    """The transforms from how source stores a kind to how target does: undo the source's attributes back to
    canonical (last applied first), then apply the target's. Equal values cancel: a pure rename has no step."""
    rules = canonical().attributes
    heads_param = source.kind.rotary_heads
    heads = env[heads_param] if heads_param else 0
    undo: list[Step] = []
    apply: list[Step] = []
    for attr in ATTRIBUTES:
        have, want = source.attributes[attr], target.attributes[attr]
        if have == want:
            continue
        rule = rules[attr]
        if have in rule.transforms:
            undo.insert(0, Step(TRANSFORMS[rule.transforms[have]].inverse, heads))
        if want in rule.transforms:
            apply.append(Step(TRANSFORMS[rule.transforms[want]], heads))
    return (*undo, *apply)


def run_steps(tensor: torch.Tensor, steps: tuple[Step, ...], name: str) -> torch.Tensor:
    for step in steps:
        try:
            tensor = step.transform.function(tensor, step.heads)
        except (ValueError, RuntimeError) as exc:
            raise ConvertError(f"transform {step} failed: {exc}", tensor=name) from None
    return tensor
