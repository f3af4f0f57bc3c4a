"""What the benchmark scripts share: their options, and timing with the variants interleaved, each keeping its minimum."""

from __future__ import annotations

import argparse
import time
from typing import Callable


def benchmark_args(doc: str, steps: int = 25, repeats: int = 5) -> argparse.Namespace:
    """--device, --batch, --steps, --repeats, with the script's docstring as its help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()


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
