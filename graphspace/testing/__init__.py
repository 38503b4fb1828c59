"""Reusable test helpers: symmetry asserts, round trips and reference architectures."""

from graphspace.testing.asserts import (
    assert_equivariant,
    assert_permutation_invariant,
    assert_round_trip,
    swap_io_neurons,
    to_networkx,
    wl_hash,
)

__all__ = [
    "assert_equivariant",
    "assert_permutation_invariant",
    "assert_round_trip",
    "swap_io_neurons",
    "to_networkx",
    "wl_hash",
]
