"""MLX, mlx-lm's container on Apple silicon: the folder mlx_lm.convert writes for a Mixtral, plain or
affine-quantized, and an unquantized one read back as a source.

container.py: the files (names, headers, index, config.json, tokenizer files), which tensors are quantized, reading
a folder back; quantize.py: mx.quantize's CPU kernel and mlx's float casts in numpy, a slice at a time, and
quantize_jit.py: the same kernel compiled with numba (used where numba imports); settings.py: bits, group sizes
and parts as plain data. The facts, with their sources, are in docs/formats.md ("MLX") and docs/mlx.md.
"""

from typing import Any

from convert.containers.hf_safetensors import MARKERS

__all__ = ["FORMAT", "MARKERS"]


def __getattr__(name: str) -> Any:
    """FORMAT on first use: the registry reads MARKERS of every container to detect a folder's layout, and loads
    a container's code only for a folder that holds one of them (convert/containers/__init__.py)."""
    if name == "FORMAT":
        from convert.containers.mlx.container import FORMAT

        return FORMAT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
