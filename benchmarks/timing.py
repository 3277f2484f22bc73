"""The one timing rule every benchmark uses (best wall time of a few repeats), and the rule for resuming one."""
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


def check_resumable(done: dict, now: dict, keys: tuple[str, ...]) -> None:
    """Exit unless an earlier results file (``done``) was measured as this run is (``now``) on ``keys``."""
    if {k: done.get(k) for k in keys} != {k: now.get(k) for k in keys}:
        # Learned rounding's result moves with the thread count too (float sums in another order).
        raise SystemExit(f"--missing: the earlier results differ in {', '.join(k for k in keys if done.get(k) != now.get(k))} "
                         f"(they used {done.get('threads')} threads, KWS_BENCH_THREADS); set the same "
                         "or run without --missing.")
