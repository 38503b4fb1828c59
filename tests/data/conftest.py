"""Fixtures of the data tests (helpers live in zoo_files.py)."""

import pytest
from zoo_files import make_small_cnn_zoo


@pytest.fixture
def small_cnn_zoo(tmp_path):
    root = tmp_path / "zoo"
    rows, metrics, layout, perm = make_small_cnn_zoo(root / "raw")
    return root, rows, metrics, layout, perm
