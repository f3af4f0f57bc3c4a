"""Timing shared by the benchmark scripts: variants run interleaved, each keeps its minimum."""

from __future__ import annotations

import time
from typing import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Minimum wall time of each callable over `repeats` rounds A, B, C, ..., A, B, C, ... (after a warm-up round),
    so that a loaded machine slows every variant alike instead of flipping a ratio."""
    best = {k: float("inf") for k in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if round_:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best
