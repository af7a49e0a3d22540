"""Mixtral GGUF files in the legacy per-expert layout, as llama.cpp wrote them from December 2023 to about April
2024, built here with ggml-org's own gguf-py from a modern file (llama.cpp's converter or quantizer output).

What that era's writer did (llama.cpp's git history; docs/formats.md, "Legacy per-expert GGUF"):
- every expert its own 2-D tensor, named by gguf-py's MODEL_TENSOR.FFN_GATE_EXP / FFN_DOWN_EXP / FFN_UP_EXP:
  blk.N.ffn_gate.E.weight (w1), blk.N.ffn_down.E.weight (w2), blk.N.ffn_up.E.weight (w3), each the E-th block of
  the stacked tensor's rows, in the same GGML type (llama-quantize kept the type per tensor, so a quantized legacy
  file holds the same blocks: quantized blocks run along a row);
- tensors in the order of the checkpoint convert.py read (Mistral's torrent: per layer wq, wk, wv, wo, the router,
  then w1, w2, w3 of each expert, then the two norms);
- none of the keys added later: general.type, general.size_label, llama.vocab_size (llama.cpp counts the tokens),
  tokenizer.ggml.pre (pre-tokenizer names came in April 2024), tokenizer.ggml.add_sep_token.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

LATER_KEYS = ("general.type", "general.size_label", "llama.vocab_size", "tokenizer.ggml.pre",
              "tokenizer.ggml.add_sep_token")  # fmt: skip
STACKED = re.compile(r"^blk\.(\d+)\.ffn_(gate|down|up)_exps\.weight$")
LAYER_ORDER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "EXPERTS", "attn_norm", "ffn_norm")


def _order(names: list[str], n_layers: int, n_experts: int) -> list[str]:
    ordered = ["token_embd.weight"]
    for layer in range(n_layers):
        for part in LAYER_ORDER:
            if part == "EXPERTS":
                for expert in range(n_experts):
                    ordered += [f"blk.{layer}.ffn_{kind}.{expert}.weight" for kind in ("gate", "down", "up")]
            else:
                ordered.append(f"blk.{layer}.{part}.weight")
    ordered += ["output_norm.weight", "output.weight"]
    assert sorted(ordered) == sorted(names), set(ordered) ^ set(names)
    return ordered


def legacy_from(modern: Path, out: Path, *, mixed_layer: int | None = None) -> Path:
    """The legacy per-expert file of modern (one .gguf). mixed_layer: give that layer's expert 1 of ffn_down the
    tensor of another layer whose type differs (as llama-quantize before PR #4927 could type experts of one layer
    differently), so that stacking them needs a requantization, which the upgrade must refuse."""
    reader = GGUFReader(modern)
    arch = reader.fields["general.architecture"].contents()
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    n_experts = int(reader.fields[f"{arch}.expert_count"].contents())
    tensors: dict[str, tuple[np.ndarray, object]] = {}
    for tensor in reader.tensors:
        match = STACKED.match(tensor.name)
        if match is None:
            tensors[tensor.name] = (tensor.data, tensor.tensor_type)
            continue
        layer, kind = match.groups()
        for expert in range(n_experts):  # the data of a stacked tensor: experts outermost
            tensors[f"blk.{layer}.ffn_{kind}.{expert}.weight"] = (tensor.data[expert], tensor.tensor_type)
    if mixed_layer is not None:
        target = f"blk.{mixed_layer}.ffn_down.1.weight"
        donor = next(n for n, (_, kind) in tensors.items() if ".ffn_down.1." in n and kind != tensors[target][1])
        tensors[target] = tensors[donor]
    writer = GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in LATER_KEYS:
            continue
        vtype = field.types[0]
        item_type = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=item_type)
    for name in _order(list(tensors), n_layers, n_experts):
        data, ggml_type = tensors[name]
        # raw_shape in numpy's order; for data gguf-py gives as bytes (uint8) the byte shape, as the writer expects
        writer.add_tensor(name, np.ascontiguousarray(data), raw_shape=list(data.shape), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
