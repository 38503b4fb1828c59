import itertools

import numpy as np
import pytest

from graphspace.merge import assignment
from graphspace.merge.assignment import (
    available_backends,
    head_block_assignment,
    linear_assignment,
    register_lap_backend,
)


def _brute(cost):
    n = cost.shape[0]
    best = max(itertools.permutations(range(n)), key=lambda p: cost[np.arange(n), p].sum())
    return cost[np.arange(n), list(best)].sum()


@pytest.mark.parametrize("seed", range(5))
def test_linear_assignment_is_optimal(seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(6, 6))
    cols = linear_assignment(c, "scipy")
    assert sorted(cols.tolist()) == list(range(6))
    assert np.isclose(c[np.arange(6), cols].sum(), _brute(c))
    # maximisation, not minimisation: the negated problem gives a different optimum value
    assert c[np.arange(6), cols].sum() > c[np.arange(6), linear_assignment(-c, "scipy")].sum()


def test_custom_backend_and_validation():
    calls = []

    def greedy_identity(cost):
        calls.append(cost.shape)
        return np.arange(cost.shape[0])

    register_lap_backend("identity-test", greedy_identity)
    register_lap_backend("broken-test", lambda c: np.zeros(c.shape[0], dtype=int))
    try:
        assert "identity-test" in available_backends()
        out = linear_assignment(np.eye(3), "identity-test")
        assert out.tolist() == [0, 1, 2] and calls == [(3, 3)]
        with pytest.raises(RuntimeError, match="invalid permutation"):
            linear_assignment(np.eye(3), "broken-test")
    finally:
        assignment._BACKENDS.pop("identity-test")
        assignment._BACKENDS.pop("broken-test")
    with pytest.raises(ValueError, match="unknown assignment backend"):
        linear_assignment(np.eye(3), "nope")
    with pytest.raises(ValueError, match="square"):
        linear_assignment(np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        linear_assignment(np.full((2, 2), np.nan))


def _valid_head_perms(h, d):
    for heads in itertools.permutations(range(h)):
        for within in itertools.product(itertools.permutations(range(d)), repeat=h):
            yield heads, within


@pytest.mark.parametrize("seed", range(3))
def test_head_block_assignment_matches_brute_force(seed):
    h, d = 2, 3
    rng = np.random.default_rng(seed)
    costs = [rng.normal(size=(h * d, h * d)) for _ in range(2)]  # e.g. Q/K and V
    perms = head_block_assignment(costs, h, "scipy")
    got = sum(c[np.arange(h * d), p].sum() for c, p in zip(costs, perms))
    # brute force: one shared head permutation, independent within-head permutations per cost
    best = -np.inf
    for heads in itertools.permutations(range(h)):
        total = 0.0
        for c in costs:
            for a in range(h):
                b = heads[a]
                block = c[a * d:(a + 1) * d, b * d:(b + 1) * d]
                total += max(block[np.arange(d), list(s)].sum()
                             for s in itertools.permutations(range(d)))
        best = max(best, total)
    assert np.isclose(got, best)
    # both permutations are head-structured with the same head permutation
    head_maps = []
    for p in perms:
        blocks = p.reshape(h, d) // d
        assert (blocks == blocks[:, :1]).all()
        head_maps.append(blocks[:, 0].tolist())
    assert head_maps[0] == head_maps[1]


def test_head_block_assignment_differs_from_unconstrained():
    # negative control: the unconstrained optimum mixes heads, the block assignment may not
    h, d = 2, 2
    c = np.zeros((4, 4))
    c[0, 2] = c[1, 1] = c[2, 0] = c[3, 3] = 1.0  # best free assignment: 0->2, 1->1 (mixes)
    free = linear_assignment(c, "scipy")
    assert free.tolist() == [2, 1, 0, 3]
    (p,) = head_block_assignment([c], h, "scipy")
    assert (p.reshape(h, d) // d == (p.reshape(h, d) // d)[:, :1]).all()
    assert c[np.arange(4), p].sum() < c[np.arange(4), free].sum()


def test_lap_backend_when_installed():
    pytest.importorskip("lap")
    rng = np.random.default_rng(0)
    c = rng.normal(size=(30, 30))
    a, b = linear_assignment(c, "lap"), linear_assignment(c, "scipy")
    assert np.isclose(c[np.arange(30), a].sum(), c[np.arange(30), b].sum())
    assert "lap" in available_backends()


def test_auto_backend_is_optimal():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(5, 5))
    cols = linear_assignment(c)
    assert np.isclose(c[np.arange(5), cols].sum(), _brute(c))
    cols = linear_assignment(c, backend=lambda m: linear_assignment(m, "scipy"))
    assert np.isclose(c[np.arange(5), cols].sum(), _brute(c))
