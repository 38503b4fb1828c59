"""Suite-wide test setup."""

import random

import pytest


@pytest.fixture(autouse=True)
def _fresh_python_random():
    """Reseed Python's `random` from system entropy before every test.

    PyG's `Sequential` names the module it generates for its `forward` with
    `random.randrange(16**6)` and caches modules by that name; after a test seeded `random`
    (Lightning's `seed_everything`), a later `Sequential` can draw the same name and get the
    cached `forward` of another signature. Tests that need a seeded `random` seed it themselves.
    """
    random.seed()
