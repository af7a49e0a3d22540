"""NaN/Inf detection on raw element words, for the writer's warning (an error with --strict)."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from convert.faults import fault_point
from convert.workers import CHUNK

# A float is NaN or Inf when all its exponent bits are set, i.e. when its magnitude bits (all but the sign) are
# at least those of infinity: one mask and one max over the raw words, no float conversion.
_INFINITY_BITS = MappingProxyType(
    {
        "BF16": (np.uint16, 0x7F80),
        "F16": (np.uint16, 0x7C00),
        "F32": (np.uint32, 0x7F80_0000),
        "F64": (np.uint64, 0x7FF0_0000_0000_0000),
    }
)


class FiniteCheck:
    """Notes tensors holding NaN or Inf. Used by one thread (the tensor hasher): its scratch buffer is reused,
    so no chunk allocates."""

    def __init__(self) -> None:
        self._scratch = np.empty(CHUNK, dtype=np.uint8)

    def __call__(self, data: memoryview, dtype: str, tensor: str, non_finite: set[str]) -> None:
        fault_point("finite")
        spec = _INFINITY_BITS.get(dtype)
        if spec is None or tensor in non_finite or not len(data):
            return
        word, infinity = spec
        words = np.frombuffer(data, dtype=word)
        scratch = self._scratch[: words.nbytes].view(word)
        sign = word(1) << word(8 * words.itemsize - 1)
        np.bitwise_and(words, ~sign, out=scratch)
        if scratch.max() >= infinity:
            non_finite.add(tensor)
