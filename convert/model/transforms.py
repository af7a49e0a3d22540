"""Named transforms between a canonical tensor and the way a layout stores it, each with its inverse.

rotary_half_split: q/k rows from the original interleaved rotary order (pairs (0,1), (2,3)... of each head
are complex numbers) to the half-split order rotate_half expects; heads = all heads for q, KV heads for k.
It is not its own inverse. transpose: [out, in] to [in, out] (megablocks' w2 blocks); its own inverse.

They only move elements, never compute with them, so they run on arrays of unsigned words as wide as the element
(bf16 as uint16): numpy does it without knowing the float format, and the conversion never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from convert.common.errors import ConvertError

# Planning names transforms without running them: numpy is loaded where one runs (verify of a folder never does).
if TYPE_CHECKING:
    import numpy as np


def _rows_by_head(tensor: np.ndarray, heads: int) -> tuple[int, int, int]:
    if tensor.ndim != 2:
        raise ValueError(f"expects a matrix, got shape {list(tensor.shape)}")
    rows, cols = tensor.shape
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    return rows, cols, rows // heads


# Each transform is a view of its input whose elements, in C order, are the result's: the one copy that makes the
# result can then land in a buffer of the caller's (run_steps' out) instead of fresh memory.


def _to_half_split(tensor: np.ndarray, heads: int) -> np.ndarray:
    _rows, cols, head_dim = _rows_by_head(tensor, heads)
    return tensor.reshape(heads, head_dim // 2, 2, cols).swapaxes(1, 2)


def _to_interleaved(tensor: np.ndarray, heads: int) -> np.ndarray:
    _rows, cols, head_dim = _rows_by_head(tensor, heads)
    return tensor.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2)


def _transpose(tensor: np.ndarray, _heads: int) -> np.ndarray:
    if tensor.ndim != 2:
        raise ValueError(f"expects a matrix, got shape {list(tensor.shape)}")
    return tensor.T


@dataclass(frozen=True)
class Transform:
    name: str
    inverse_name: str
    view: Callable[[np.ndarray, int], np.ndarray]  # the result as a view of the input, in C order

    @property
    def inverse(self) -> Transform:
        return TRANSFORMS[self.inverse_name]

    def function(self, tensor: np.ndarray, heads: int) -> np.ndarray:
        """The result as a contiguous matrix of its own."""
        import numpy as np

        view = self.view(tensor, heads)
        return np.ascontiguousarray(view).reshape(_matrix_shape(view))


def _matrix_shape(view: np.ndarray) -> tuple[int, int]:
    """Every transform makes a matrix: the view's last axis is its columns, the others its rows."""
    return math.prod(view.shape[:-1]), view.shape[-1]


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


def run_steps(tensor: np.ndarray, steps: tuple[Step, ...], name: str, out: np.ndarray | None = None) -> np.ndarray:
    """tensor moved by steps. out: a flat array of tensor's words, at least tensor.size long, that receives the
    result (the last step copies straight into it); without it, the result is fresh memory (or tensor itself
    when there are no steps)."""
    for number, step in enumerate(steps):
        try:
            if out is None or number < len(steps) - 1:
                tensor = step.transform.function(tensor, step.heads)
                continue
            import numpy as np

            view = step.transform.view(tensor, step.heads)
            result = out[: view.size].reshape(view.shape)
            np.copyto(result, view)
            return result.reshape(_matrix_shape(view))
        except ValueError as exc:
            raise ConvertError(f"transform {step} failed: {exc}", tensor=name) from None
    return tensor
