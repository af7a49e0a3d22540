"""GGUF, llama.cpp's container: what its own converter writes for Mixtral, and a strict reader of F32/F16/BF16 files.

Pure functions for the pipeline to call (no threads, no file writes): the GGML type of each tensor at each outtype,
element conversion of a slice of a tensor (so tensors stream in chunks), the metadata key/value list, the byte
layout of a file (header, tensor offsets, zero padding), gguf-split's sharding, and reading a GGUF back as a source.

Every fact is taken from llama.cpp's own code, read at ggml-org/llama.cpp (docs/formats.md, "GGUF", lists them):
- convert_hf_to_gguf.py / conversion/base.py ModelBase.prepare_tensors: which tensors stay F32, the F16 fallback of
  Q8_0, every tensor converted through float32 first; TextModel.set_gguf_parameters, LlamaModel.set_gguf_parameters
  (conversion/llama.py): the hyperparameter keys and their order; TextModel._set_vocab_sentencepiece /
  _create_vocab_sentencepiece and gguf-py's vocab.py SpecialVocab: the tokenizer keys.
- gguf-py gguf_writer.py GGUFWriter: header layout, value types of each add_* call, alignment 32, the padding of the
  header and after every tensor; quants.py: BF16 rounding and the Q8_0 reference quantizer.
- ggml/src/gguf.cpp gguf_init_from_reader: what a valid file is (the reader below refuses what it refuses);
  tools/gguf-split/gguf-split.cpp split_strategy: how files are split and which metadata each holds.

The `gguf` package (ggml-org's gguf-py) supplies the constants (key names, type ids, block sizes); it is imported
here only. The data path (conversion, quantization, layout, reading) is ours.
"""

from typing import Any

MARKERS = ("*.gguf",)  # GGUF file names are the user's: any .gguf file (gguf and gguf_legacy tell theirs apart)

__all__ = ["FORMAT", "MARKERS"]


def __getattr__(name: str) -> Any:
    """FORMAT on first use (numpy, gguf-py): the registry reads MARKERS of every container to detect a folder's
    layout, and loads a container's code only for a folder that holds one of them (convert/containers/__init__.py)."""
    if name == "FORMAT":
        from convert.containers.gguf.container import FORMAT

        return FORMAT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
