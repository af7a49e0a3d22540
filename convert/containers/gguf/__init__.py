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

from convert.containers.gguf.container import FORMAT

__all__ = ["FORMAT"]
