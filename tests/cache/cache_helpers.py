"""Records for tests, and the worker the concurrency tests run in separate processes.

Lives in a plain module (not a test file) so a spawned process can import the worker by name."""
from __future__ import annotations

from adaptc.cache import RecordKey, Trial, TuningRecord, open_cache

DEVICE = "cpu-test-device-0123456789ab"


def make_key(i: int, kernel: str = "fused_moe") -> RecordKey:
    return RecordKey(kernel=kernel, source_hash="src0", problem={"tokens": 64 * (i + 1), "experts": 8},
                     dtype="bfloat16", device=DEVICE, torch="2.13.0", triton="3.6.0")


def make_record(i: int, kernel: str = "fused_moe", time_s: float | None = None, trials=None) -> TuningRecord:
    t = 1e-4 * (i + 1) if time_s is None else time_s
    if trials is None:
        trials = (Trial({"BLOCK_M": 64, "num_warps": 4}, t), Trial({"BLOCK_M": 256, "num_warps": 8}, None, "crashed"))
    return TuningRecord(make_key(i, kernel), config={"BLOCK_M": 64, "num_warps": 4}, time_s=t, trials=trials)


def write_records(url: str | None, directory: str, worker: int, n: int, contested: int, barrier) -> None:
    """Put `n` records of its own and `contested` records every worker also writes, all at once."""
    cache = open_cache(url, directory)
    barrier.wait(30)
    for i in range(n):
        cache.put(make_record(1000 * (worker + 1) + i))
        if i < contested:
            cache.put(make_record(i, time_s=1e-3 * (worker + 1)))
    cache.close()


def messages(caught: list) -> list[str]:
    """The CacheWarning messages among recorded warnings."""
    from adaptc.cache import CacheWarning
    return [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
