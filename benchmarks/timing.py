"""The one timing rule every benchmark uses: best wall time of a few repeats."""
from __future__ import annotations

import time
from typing import Callable

REPEATS = 3  # best of 3: the figure least disturbed by other work on the machine


def best_seconds(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Shortest wall time, in seconds, of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
