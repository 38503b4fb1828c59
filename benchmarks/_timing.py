"""Shared timing helper of the benchmark scripts (run them as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: bool = True) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` (one untimed warm-up call
    first unless ``warmup=False``)."""
    if warmup:
        fn()
    ts = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
