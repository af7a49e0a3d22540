"""Real-dimension Mixtral checkpoints in the torrent layout (Layout T), only shallower, for the benchmark.

Every tensor has the name, shape and dtype (bf16) of the published consolidated.00.pth; only n_layers differs,
so the converter sees the same tensor sizes it will meet at 32 layers and the cost per layer can be extrapolated.
Values are cheap but not zero: rotated copies of one seeded random pool, so no part of the pipeline can shortcut
on empty pages and generation stays far faster than the conversions it feeds.

Run as a script it writes one folder: `python bench/checkpoint.py FOLDER --layers L`. The stamp file is written
last, after the data is fsynced, so an interrupted generation is never mistaken for a finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GENERATOR_VERSION = 1  # bump when the content changes, so stale caches are regenerated
SEED = 20231211
POOL_ELEMENTS = 2**24  # 32 MiB of bf16 randomness, rotated per tensor
WEIGHTS = "consolidated.00.pth"
PARAMS = "params.json"
STAMP = "bench-stamp.json"

BASE_PARAMS: dict[str, object] = {
    "dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
    "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8},
}  # fmt: skip


# --small (bench/run.py --quick): a quarter of the width and of the heads, so one layer is about 0.3 GB; only to
# check that the bench runs end to end, never for the numbers.
SMALL_PARAMS: dict[str, object] = {**BASE_PARAMS, "dim": 1024, "hidden_dim": 3584, "n_heads": 8, "n_kv_heads": 2}
# (tensor_shapes spells the same widths out for both)


def params_for(layers: int, small: bool = False) -> dict[str, object]:
    """params.json of the published model (or its --small version) with n_layers replaced."""
    return {**(SMALL_PARAMS if small else BASE_PARAMS), "n_layers": layers}


def tensor_shapes(layers: int, small: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the torrent layout for this depth, in the order the original file lists them."""
    dim, hidden, head_dim, heads, kv_heads = (1024, 3584, 128, 8, 2) if small else (4096, 14336, 128, 32, 8)
    q_rows, kv_rows, experts = heads * head_dim, kv_heads * head_dim, 8
    shapes: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (32000, dim))]
    for layer in range(layers):
        p = f"layers.{layer}."
        shapes += [
            (p + "attention.wq.weight", (q_rows, dim)),
            (p + "attention.wk.weight", (kv_rows, dim)),
            (p + "attention.wv.weight", (kv_rows, dim)),
            (p + "attention.wo.weight", (dim, q_rows)),
            (p + "feed_forward.gate.weight", (experts, dim)),
        ]
        for e in range(experts):
            shapes += [
                (p + f"feed_forward.experts.{e}.w1.weight", (hidden, dim)),
                (p + f"feed_forward.experts.{e}.w2.weight", (dim, hidden)),
                (p + f"feed_forward.experts.{e}.w3.weight", (hidden, dim)),
            ]
        shapes += [(p + "attention_norm.weight", (dim,)), (p + "ffn_norm.weight", (dim,))]
    shapes += [("norm.weight", (dim,)), ("output.weight", (32000, dim))]
    return shapes


def payload_bytes(layers: int, small: bool = False) -> int:
    """Tensor bytes (bf16) of a checkpoint of this depth: what every contender has to move."""
    total = 0
    for _, shape in tensor_shapes(layers, small):
        count = 1
        for size in shape:
            count *= size
        total += 2 * count
    return total


def expected_stamp(layers: int, small: bool = False) -> dict[str, object]:
    return {"generator_version": GENERATOR_VERSION, "seed": SEED, "params": params_for(layers, small)}


def is_complete(folder: Path, layers: int, small: bool = False) -> bool:
    """True when the folder holds a finished checkpoint of this generator version and depth."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
        weights_size = (folder / WEIGHTS).stat().st_size
    except (OSError, ValueError):
        return False
    expected = expected_stamp(layers, small)
    return all(stamp.get(k) == v for k, v in expected.items()) and stamp.get("weights_size") == weights_size


def _fill(shape: tuple[int, ...], pool: torch.Tensor, generator: torch.Generator, norm: bool) -> torch.Tensor:
    """A tensor made of the pool rotated by a random offset, tiled; norms are 1 + small noise like real ones."""
    import torch

    count = 1
    for size in shape:
        count *= size
    shift = int(torch.randint(0, POOL_ELEMENTS, (1,), generator=generator))
    rotated = torch.roll(pool, shift)
    if norm:
        return (1.0 + rotated[:count].float()).to(torch.bfloat16).view(shape)
    out = torch.empty(count, dtype=torch.bfloat16)
    for start in range(0, count, POOL_ELEMENTS):
        size = min(POOL_ELEMENTS, count - start)
        out[start : start + size].copy_(rotated[:size])
    return out.view(shape)


def write_checkpoint(folder: Path, layers: int, small: bool = False) -> None:
    """Write consolidated.00.pth, params.json and finally the stamp; the whole dict is in RAM meanwhile.

    torch is imported here, not at the top: bench/run.py imports this module for its constants, and a driver
    that had loaded torch would lend its own peak RSS to every child it starts (exec charges the replaced
    memory to the new program's ru_maxrss)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    pool = (torch.randn(POOL_ELEMENTS, generator=generator) * 0.02).to(torch.bfloat16)
    shapes = tensor_shapes(layers, small)
    weights = {name: _fill(shape, pool, generator, norm=len(shape) == 1) for name, shape in shapes}
    temporary = folder / (WEIGHTS + ".partial")
    try:
        torch.save(weights, temporary)
        del weights
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, folder / WEIGHTS)
    finally:
        temporary.unlink(missing_ok=True)
    (folder / PARAMS).write_text(json.dumps(params_for(layers, small)) + "\n")
    stamp = {**expected_stamp(layers, small), "weights_size": (folder / WEIGHTS).stat().st_size}
    (folder / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    os.sync()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--small", action="store_true", help="a quarter of the width: for a quick smoke run only")
    args = parser.parse_args(argv)
    if is_complete(args.folder, args.layers, args.small):
        print(f"{args.folder}: already complete", file=sys.stderr)
        return 0
    write_checkpoint(args.folder, args.layers, args.small)
    return 0


if __name__ == "__main__":
    sys.exit(main())
