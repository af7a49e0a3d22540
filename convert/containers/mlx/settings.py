"""What mlx_lm.convert offers and what a quantized matrix is made of: plain data, so that the container's module
loads without numpy (quantize.py, which computes them, is loaded when a conversion casts or quantizes)."""

GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts (its affine_quantize refuses any other)
DEFAULT_GROUP_SIZE = 64  # mlx_lm.convert -q without --q-group-size
BITS = (4, 8)  # --outtype q4 and q8: the two whose words hold whole elements, as mlx-lm's -q offers them
FLOATS = ("BF16", "F16", "F32")

# What each part of a quantized matrix is: the packed words, or the scales, or the biases.
WEIGHT, SCALES, BIASES = 0, 1, 2
