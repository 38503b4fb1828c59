r"""Linear assignment: pluggable solvers and the head-aware block assignment.

Every matching method reduces to linear assignment problems

$$
\pi^\star = \arg\max_{\pi \in S_n} \sum_i C_{i, \pi(i)},
$$

solved by [`linear_assignment`][graphspace.merge.assignment.linear_assignment]. The default backend
is `scipy.optimize.linear_sum_assignment`; `"lap"` (the Jonker-Volgenant solver of the
`lap` package) is used by `backend="auto"` when that package is installed, and any solver can
be plugged in with [`register_lap_backend`][graphspace.merge.assignment.register_lap_backend].

Attention heads are matched with
[`head_block_assignment`][graphspace.merge.assignment.head_block_assignment]: the best within-head
matching of every (head of A, head of B) pair is found first; its value is the cost of pairing the
two heads, and one assignment over heads picks the head permutation (Ainsworth et al. 2023 permute
heads as blocks; within a head, coordinates may move).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

#: a solver maps a cost matrix (to maximise) to ``cols`` with ``cols[i]`` assigned to row ``i``
LapSolver = Callable[[np.ndarray], np.ndarray]

_BACKENDS: dict[str, LapSolver] = {}


def register_lap_backend(name: str, solver: LapSolver) -> None:
    """Register `solver(cost) -> cols` (maximising `sum(cost[i, cols[i]])`) as `name`."""
    _BACKENDS[name] = solver


_SCIPY_LSA: Callable | None = None


def _scipy(cost: np.ndarray) -> np.ndarray:
    global _SCIPY_LSA
    if _SCIPY_LSA is None:  # resolved once: scipy.optimize's lazy attribute lookup is slow
        from scipy.optimize import linear_sum_assignment

        _SCIPY_LSA = linear_sum_assignment
    rows, cols = _SCIPY_LSA(cost, maximize=True)
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _lap(cost: np.ndarray) -> np.ndarray:
    import lap  # type: ignore[import-not-found]

    _, x, _ = lap.lapjv(-np.ascontiguousarray(cost, dtype=np.float64), extend_cost=True)
    return np.asarray(x, dtype=np.int64)


register_lap_backend("scipy", _scipy)
register_lap_backend("lap", _lap)


@functools.cache
def _has_lap() -> bool:  # cached: a failed import is retried (and slow) on every call
    try:
        import lap  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Names of the registered backends that can run here."""
    return [n for n in _BACKENDS if n != "lap" or _has_lap()]


def linear_assignment(cost: np.ndarray, backend: str | LapSolver = "auto") -> np.ndarray:
    r"""Solve $\max_\pi \sum_i C_{i\pi(i)}$ for a square cost matrix.

    Args:
        cost: `[n, n]` array (converted to float64).
        backend: `"auto"` (`lap` when installed, else SciPy), a registered name
            (`"scipy"`, `"lap"`, ...) or a callable `cost -> cols`.

    Returns:
        `cols` (int64 `[n]`): row `i` is assigned column `cols[i]`.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"expected a square cost matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("the assignment cost has NaN or Inf entries")
    if callable(backend):
        solver = backend
    else:
        name = ("lap" if _has_lap() else "scipy") if backend == "auto" else backend
        if name not in _BACKENDS:
            raise ValueError(f"unknown assignment backend {backend!r}; known: {sorted(_BACKENDS)}")
        solver = _BACKENDS[name]
    cols = np.asarray(solver(cost), dtype=np.int64)
    n = cost.shape[0]
    if cols.shape != (n,) or cols.min(initial=0) < 0 or cols.max(initial=-1) >= n \
            or np.bincount(cols, minlength=n).max(initial=1) != 1:
        raise RuntimeError(f"assignment backend {backend!r} returned an invalid permutation")
    return cols


def head_block_assignment(
    costs: Sequence[np.ndarray], num_heads: int, backend: str | LapSolver = "auto"
) -> list[np.ndarray]:
    r"""Assign `num_heads` heads as blocks, shared by several cost matrices, then within heads.

    For heads $a$ (of A) and $b$ (of B) and every cost $C^{(g)}$ (one per
    permutation group sharing the head permutation, e.g. `Q/K` and `V`) the within-head
    value $v_g(a, b) = \max_\sigma \sum_t C^{(g)}_{ad + t,\, bd + \sigma(t)}$ is computed;
    the head permutation maximises $\sum_a \sum_g v_g(a, \pi(a))$.

    Returns:
        one permutation per cost, `p[a d + t] = \pi(a) d + \sigma^{(g)}_{a}(t)`.
    """
    n = costs[0].shape[0]
    if n % num_heads:
        raise ValueError(f"{n} neurons cannot form {num_heads} heads")
    d = n // num_heads
    h = num_heads
    value = np.zeros((h, h))
    within = [[[None] * h for _ in range(h)] for _ in costs]
    for g, c in enumerate(costs):
        c = np.asarray(c, dtype=np.float64)
        for a in range(h):
            for b in range(h):
                block = c[a * d:(a + 1) * d, b * d:(b + 1) * d]
                cols = linear_assignment(block, backend) if d > 1 else np.zeros(1, np.int64)
                within[g][a][b] = cols
                value[a, b] += block[np.arange(d), cols].sum()
    heads = linear_assignment(value, backend)
    out = []
    for g in range(len(costs)):
        p = np.concatenate([heads[a] * d + within[g][a][heads[a]] for a in range(h)])
        out.append(p.astype(np.int64))
    return out
