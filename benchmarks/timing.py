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


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[object, float]:
    """Run ``fn`` once and return (its result, wall seconds): for steps too long to repeat."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
