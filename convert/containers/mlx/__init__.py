"""MLX, mlx-lm's container on Apple silicon: the folder mlx_lm.convert writes for a Mixtral, plain or
affine-quantized, and an unquantized one read back as a source.

container.py: the files (names, headers, index, config.json, tokenizer files), which tensors are quantized, reading
a folder back; quantize.py: mx.quantize's CPU kernel and mlx's float casts in numpy, a slice at a time. The facts,
with their sources, are in docs/formats.md ("MLX") and docs/mlx.md.
"""

from convert.containers.mlx.container import FORMAT

__all__ = ["FORMAT"]
