"""Element types: safetensors' dtype names, their sizes and write order, and torch's legacy storage classes."""

from __future__ import annotations

from types import MappingProxyType

ITEM_SIZE = MappingProxyType(
    {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
        "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4,
        "I64": 8, "U64": 8, "F64": 8,
    }
)  # fmt: skip

# safetensors' writer orders tensors by its Dtype enum, descending, then by name; this is that order,
# read off safetensors.torch.save_file (tests/test_safetensors_format.py keeps it honest).
WRITE_RANK = MappingProxyType(
    {
        name: rank
        for rank, name in enumerate(
            [
                "U64",
                "I64",
                "F64",
                "F32",
                "U32",
                "I32",
                "BF16",
                "F16",
                "U16",
                "I16",
                "F8_E4M3",
                "F8_E5M2",
                "I8",
                "U8",
                "BOOL",
            ]
        )
    }
)

# config.json's torch_dtype spelling.
CONFIG_NAME = MappingProxyType({"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"})

# torch.save pickles a storage by its legacy typed class, e.g. torch.BFloat16Storage.
STORAGE_CLASS = MappingProxyType(
    {
        "BoolStorage": "BOOL", "ByteStorage": "U8", "CharStorage": "I8", "ShortStorage": "I16",
        "HalfStorage": "F16", "BFloat16Storage": "BF16", "IntStorage": "I32", "FloatStorage": "F32",
        "LongStorage": "I64", "DoubleStorage": "F64",
    }
)  # fmt: skip


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Byte length of a tensor; Python ints do not overflow, and callers bound the result by the file size."""
    count = 1
    for dim in shape:
        count *= dim
    return count * ITEM_SIZE[dtype]
