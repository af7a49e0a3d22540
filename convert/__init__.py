"""mixtral-convert: streamed, verified conversion of Mixtral-8x7B checkpoints between on-disk layouts."""

__version__ = "0.1.0"
