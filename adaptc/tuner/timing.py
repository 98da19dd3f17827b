"""How adaptc times a callable: the tuner and the benchmarks share this, so their numbers agree.

GPU: `triton.testing.do_bench` (warm-up, L2 flush between runs, median of CUDA-event times).
CPU: warm-up runs, then repeated runs until both a minimum count and a time budget are reached;
the median resists the scheduler noise a shared 2-core machine has.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_seconds(fn: Callable[[], Any], device_type: str = "cpu", *, seconds: float = 1.0,
                   min_runs: int = 5, warmup: int = 2) -> float:
    """The median wall time of `fn()` in seconds on `device_type` ("cpu" or "cuda")."""
    if device_type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(int(seconds * 1000), 50), return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], Any]], device_type: str = "cpu", *, seconds: float = 1.0,
                   rounds: int = 5) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median ms per variant over `rounds` interleaved rounds, and each round's figure.

    Comparing variants: load that other processes put on a shared machine then falls on every
    variant alike instead of on whichever ran during it.
    """
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(median_seconds(fn, device_type, seconds=seconds / rounds, min_runs=3) * 1e3)
    return {name: statistics.median(t) for name, t in per_round.items()}, per_round
