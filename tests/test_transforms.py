"""The named transforms and their inverses, against the rotary convention stated independently here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from convert.model.tables import layout, layout_names
from convert.model.transforms import TRANSFORMS, Step, run_steps
from convert.planning.plan import steps_between

pytestmark = pytest.mark.unit


def _matrix(rows: int, cols: int) -> np.ndarray:
    return np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols)


def _words(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random 16-bit words, as the converter sees bf16 elements."""
    return np.random.default_rng(seed).integers(0, 2**16, size=shape, dtype=np.uint16)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize(("heads", "head_dim"), [(32, 128), (8, 128), (4, 16), (1, 2), (3, 6)])
def test_inverse_undoes_forward(name: str, heads: int, head_dim: int) -> None:
    transform = TRANSFORMS[name]
    x = _words((heads * head_dim, 5))
    y = transform.function(x, heads)
    assert np.array_equal(transform.inverse.function(y, heads), x)
    assert transform.inverse.inverse is transform


def test_half_split_moves_each_complex_pair_apart() -> None:
    """Interleaved: head h's rotary pair j is rows (2j, 2j+1). Half-split: rows (j, j + head_dim/2)."""
    heads, head_dim, cols = 3, 8, 2
    x = _matrix(heads * head_dim, cols)
    y = TRANSFORMS["rotary_half_split"].function(x, heads)
    for h, j in itertools.product(range(heads), range(head_dim // 2)):
        base = h * head_dim
        assert np.array_equal(y[base + j], x[base + 2 * j])
        assert np.array_equal(y[base + head_dim // 2 + j], x[base + 2 * j + 1])


def test_permutation_is_not_its_own_inverse() -> None:
    x = _matrix(32 * 128, 3)
    forward = TRANSFORMS["rotary_half_split"].function
    assert not np.array_equal(forward(forward(x, 32), 32), x)


def test_k_permuted_with_all_heads_differs() -> None:
    """The classic grouped-query bug: permuting k with the query head count gives other rows."""
    k = _matrix(8 * 128, 3)
    forward = TRANSFORMS["rotary_half_split"].function
    assert not np.array_equal(forward(k, 8), forward(k, 32))


def test_bad_head_count_names_the_transform_and_tensor() -> None:
    with pytest.raises(Exception, match=r"tensor wq: transform rotary_half_split failed"):
        run_steps(_matrix(10, 2), (Step(TRANSFORMS["rotary_half_split"], 3),), "wq")


ENV = {
    "dim": 8,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 4,
    "hidden_dim": 6,
    "n_experts": 2,
    "vocab_size": 11,
    "n_layers": 1,
}


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(layout_names(), 2)))
def test_every_pair_of_tables_round_trips_every_kind(a: str, b: str) -> None:
    """Source -> target -> source through the tables' steps returns the stored bytes exactly."""
    for entry_a in layout(a).kinds:
        entry_b = layout(b).kind_layout(entry_a.kind.name)
        x = _words(entry_a.piece_shape(ENV))
        there = run_steps(x, steps_between(entry_a, entry_b, ENV), "t")
        assert tuple(there.shape) == entry_b.piece_shape(ENV)
        back = run_steps(there, steps_between(entry_b, entry_a, ENV), "t")
        assert np.array_equal(back, x), (a, b, entry_a.kind.name)


def test_pure_renames_have_no_steps() -> None:
    torrent, hf = layout("torrent"), layout("hf")
    for kind in ("embed", "attn_v", "attn_o", "expert_w1", "expert_w2", "router", "norm", "output"):
        assert steps_between(torrent.kind_layout(kind), hf.kind_layout(kind), ENV) == ()
    q = steps_between(torrent.kind_layout("attn_q"), hf.kind_layout("attn_q"), ENV)
    k = steps_between(torrent.kind_layout("attn_k"), hf.kind_layout("attn_k"), ENV)
    assert [(str(s), s.heads) for s in q] == [("rotary_half_split", 4)]
    assert [(str(s), s.heads) for s in k] == [("rotary_half_split", 2)]
