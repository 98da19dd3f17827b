"""The tuning cache: tuned kernel configs as JSON records, local (SQLite) and shared (Redis, PostgreSQL).

    from adaptc.cache import RecordKey, TuningRecord, default_cache
    from adaptc.tuner.device import device_fingerprint

    key = RecordKey.for_device("fused_moe", source_hash, {"tokens": 256, "experts": 8}, "bfloat16",
                               device_fingerprint("cuda"))
    record = default_cache().get(key)            # None on a miss; never raises for cache trouble
    if record is None:
        record = TuningRecord(key, config=best, time_s=seconds, trials=trials)
        default_cache().put(record)

Backends are chosen by $ADAPTC_CACHE_URL (sqlite:///path, redis://…, postgresql://…); the local
file lives in $ADAPTC_CACHE_DIR, else the user cache directory. Redis and PostgreSQL drivers are
imported only when such a URL is used.
"""
from adaptc.cache.record import (SCHEMA_VERSION, Backend, BackendUnavailable, BackendWriteError, RecordError,
                                 RecordKey, Trial, TuningRecord, source_hash)
from adaptc.cache.tiered import CacheWarning, TuningCache, default_cache, open_backend, open_cache, reset_default_cache

__all__ = [
    "SCHEMA_VERSION", "Backend", "BackendUnavailable", "BackendWriteError", "CacheWarning", "RecordError",
    "RecordKey", "Trial", "TuningCache", "TuningRecord", "default_cache", "open_backend", "open_cache",
    "reset_default_cache", "source_hash",
]
