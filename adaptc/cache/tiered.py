"""The tuning cache the compiler uses: local SQLite first, then an optional shared store.

Reads go local → shared (a shared hit is copied to local), writes go to both, hits are memoised in
the process. Nothing here raises on the compile path: a shared store that is down is dropped for the
rest of the process with one warning, an unusable local file is replaced by an in-memory one with one
warning, and a record that cannot be trusted is skipped with a warning and never copied anywhere.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adaptc.cache.record import (Backend, BackendUnavailable, BackendWriteError, RecordError, RecordKey,
                                  TuningRecord, redact_url)
from adaptc.cache.sqlite import DB_NAME, MEMORY, SQLiteBackend
from adaptc.errors import CacheError

ENV_URL = "ADAPTC_CACHE_URL"
ENV_DIR = "ADAPTC_CACHE_DIR"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class CacheWarning(UserWarning):
    """Something in the tuning cache was skipped; compiling goes on without it."""


def open_backend(url: str) -> Backend:
    """The backend a URL names: sqlite:///path, redis://, rediss://, unix://, postgresql://.

    Anything else, a bare file path included, is a CacheError: a typo must not quietly become a new
    SQLite file in the current directory."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return SQLiteBackend.from_url(url)
    if scheme in ("redis", "rediss", "unix", "postgresql", "postgres"):
        try:  # checked now: the drivers would raise a bare ValueError at the first lookup
            urlsplit(url).port
        except ValueError as e:
            raise CacheError(f"invalid tuning cache URL {redact_url(url)!r}: {e}") from None
    if scheme in ("redis", "rediss", "unix"):
        from adaptc.cache.redis import RedisBackend
        return RedisBackend(url)
    if scheme in ("postgresql", "postgres"):
        from adaptc.cache.postgres import PostgresBackend
        return PostgresBackend(url)
    raise CacheError(f"unknown tuning cache URL {redact_url(url)!r}: expected sqlite:///path, redis://… or "
                     "postgresql://…")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where the local cache lives: `path`, else $ADAPTC_CACHE_DIR, else the user cache directory."""
    if path:
        return Path(path)
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    import platformdirs
    return Path(platformdirs.user_cache_dir("adaptc"))


@dataclass
class Scan:
    """Every record in the cache, once each (local wins), and what could not be read."""

    records: list[TuningRecord] = field(default_factory=list)
    invalid: list[dict[str, str]] = field(default_factory=list)  # {"tier", "digest", "reason"}


class TuningCache:
    def __init__(self, local: Backend, shared: Backend | None = None) -> None:
        self.local, self.shared = local, shared
        # Kept even when a tier is swapped out: export must never write a bundle over these files.
        self.files = [b.path for b in (local, shared) if isinstance(b, SQLiteBackend) and b.path != MEMORY]
        self.failures: dict[str, str] = {}  # tier -> the first error that dropped or refused it
        self._memo: dict[RecordKey, TuningRecord] = {}
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.counts = {"memo_hits": 0, "local_hits": 0, "shared_hits": 0, "misses": 0, "puts": 0}

    # -- the compile path --------------------------------------------------------------------------

    def get(self, key: RecordKey) -> TuningRecord | None:
        """The record for `key`, or None. Never raises for cache trouble; it warns instead."""
        record = self._memo.get(key)
        if record is not None:
            self.counts["memo_hits"] += 1
            return record
        record = self._read("local", key)
        if record is not None:
            self.counts["local_hits"] += 1
        elif self.shared is not None and (record := self._read("shared", key)) is not None:
            self.counts["shared_hits"] += 1
            self._write("local", record, overwrite=True)  # next time, no network
        if record is None:
            self.counts["misses"] += 1
            return None
        self._memo[key] = record
        return record

    def put(self, record: TuningRecord) -> None:
        """Store `record` locally and in the shared store (tuning's rule: the newer result wins)."""
        if not isinstance(record, TuningRecord):
            raise TypeError(f"put() takes a TuningRecord, not {type(record).__name__}")
        self._store(record, overwrite_shared=True)

    def add(self, record: TuningRecord) -> TuningRecord | None:
        """Import's rule: store `record` unless a valid record for its key is already there (local or
        shared). Returns the record already there, or None when `record` was stored."""
        existing = self.get(record.key)
        if existing is None:
            # Locally the key is absent or unreadable; in the shared store another machine may have
            # put one since we looked, and that one stays.
            self._store(record, overwrite_shared=False)
        return existing

    def _store(self, record: TuningRecord, overwrite_shared: bool) -> None:
        self.counts["puts"] += 1
        self._memo[record.key] = record
        self._write("local", record, overwrite=True)
        if self.shared is not None:
            self._write("shared", record, overwrite=overwrite_shared)

    # -- whole-cache operations (CLI, bundles, the cost model) --------------------------------------

    def scan(self) -> Scan:
        out, seen = Scan(), set()
        for tier in ("local", "shared"):
            backend = self._backend(tier)
            if backend is None:
                continue
            try:
                for digest, item in backend.items():
                    if digest in seen:
                        continue
                    if isinstance(item, RecordError):
                        out.invalid.append({"tier": tier, "digest": digest, "reason": str(item)})
                    else:
                        seen.add(digest)
                        out.records.append(item)
            except BackendUnavailable as e:
                self._unavailable(tier, e)
            except RecordError as e:  # the store refused the walk itself (say, a foreign index key)
                self._warn_once(("scan", tier), f"could not list the {tier} cache {redact_url(backend.url)}: {e}")
                out.invalid.append({"tier": tier, "digest": "*", "reason": str(e)})
        return out

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"session": dict(self.counts)}
        for tier in ("local", "shared"):
            backend = self._backend(tier)
            if backend is None:
                out[tier] = None
                continue
            try:
                out[tier] = backend.stats()
            except BackendUnavailable as e:
                self._unavailable(tier, e)
                out[tier] = {"kind": backend.kind, "url": redact_url(backend.url), "error": str(e)}
        return out

    def clear(self, shared: bool = True) -> dict[str, int]:
        """Delete every record (of this schema version); returns how many went from each tier."""
        self._memo.clear()
        out = {}
        for tier in ("local", "shared") if shared else ("local",):
            backend = self._backend(tier)
            if backend is not None:
                out[tier] = self._guard(tier, lambda b: b.delete_all(), default=0)
        return out

    def check(self, shared: bool = True) -> None:
        """Raise CacheError unless the local store (and, with `shared`, the shared one) answers: for
        commands that must not quietly act on part of the cache."""
        for tier in ("local", "shared") if shared else ("local",):
            backend = self._backend(tier)
            if backend is not None:
                try:
                    backend.count()
                except BackendUnavailable as e:
                    raise CacheError(f"the {tier} tuning cache is unavailable: {e}") from None

    def close(self) -> None:
        for backend in (self.local, self.shared):
            if backend is not None:
                backend.close()

    # -- degrading instead of failing ---------------------------------------------------------------

    def _backend(self, tier: str) -> Backend | None:
        return self.local if tier == "local" else self.shared

    def _read(self, tier: str, key: RecordKey) -> TuningRecord | None:
        def read(backend: Backend) -> TuningRecord | None:
            try:
                return backend.get(key)
            except RecordError as e:
                self._warn_once(("record", f"{tier}:{key.digest}"),
                                f"ignoring the tuning record {key.digest[:12]} for {key.kernel} in the {tier} "
                                f"cache {redact_url(backend.url)}: {e}")
                return None
        return self._guard(tier, read, default=None)

    def _write(self, tier: str, record: TuningRecord, overwrite: bool) -> None:
        self._guard(tier, lambda b: b.put(record, overwrite=overwrite), default=False)

    def _guard(self, tier: str, fn, default: Any) -> Any:
        """Run `fn(backend)` on a tier; turn store trouble into a warning and `default`. A local store
        that cannot be opened is swapped for an in-memory one and the call retried there once."""
        for _ in range(2):
            backend = self._backend(tier)
            if backend is None:
                return default
            try:
                return fn(backend)
            except BackendWriteError as e:
                self.failures.setdefault(tier, str(e))
                self._warn_once(("write", tier), f"not saving tuning results to the {tier} cache: {e}")
                return default
            except BackendUnavailable as e:
                self._unavailable(tier, e)
        return default

    def _unavailable(self, tier: str, e: Exception) -> None:
        with self._lock:
            self.failures.setdefault(tier, str(e))
            if tier == "shared":
                if self.shared is None:
                    return
                self.shared = None
                self._warn_once(("down", tier), f"the shared tuning cache is unavailable, using the local cache "
                                                f"only for this process: {e}")
            elif not (isinstance(self.local, SQLiteBackend) and self.local.path == MEMORY):
                self.local = SQLiteBackend(MEMORY)
                self._warn_once(("down", tier), f"the local tuning cache is unusable, keeping tuning results in "
                                                f"memory for this process: {e}")

    def _warn_once(self, tag: tuple[str, str], message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(message, CacheWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside this package: a warning should point at
    the user's line, not at whichever helper in here noticed the problem."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def open_cache(url: str | None = None, directory: str | os.PathLike | None = None) -> TuningCache:
    """The cache `url` names (default $ADAPTC_CACHE_URL). A sqlite URL is the local cache itself;
    a redis or postgresql URL is the shared tier behind a local SQLite file in `directory`."""
    url = (url if url is not None else os.environ.get(ENV_URL)) or None
    local_path = cache_dir(directory) / DB_NAME
    if url is None:
        return TuningCache(SQLiteBackend(local_path))
    backend = open_backend(url)
    if isinstance(backend, SQLiteBackend):
        return TuningCache(backend)
    return TuningCache(SQLiteBackend(local_path), backend)


_default: dict[tuple[str | None, str | None], TuningCache] = {}
_default_lock = threading.Lock()


def default_cache() -> TuningCache:
    """The process-wide cache for the current environment (what `adaptc.compile` uses).

    An unusable $ADAPTC_CACHE_URL (unknown scheme) warns and falls back to the local cache: a typo
    in the environment must not stop a compile."""
    env = (os.environ.get(ENV_URL) or None, os.environ.get(ENV_DIR) or None)
    cache = _default.get(env)
    if cache is None:
        with _default_lock:
            cache = _default.get(env)
            if cache is None:
                try:
                    cache = open_cache()
                except CacheError as e:
                    warnings.warn(f"{e}; using the local cache only", CacheWarning, stacklevel=_caller_level())
                    cache = open_cache(url="")
                _default[env] = cache
    return cache


def reset_default_cache() -> None:
    """Close and forget the process-wide caches (tests, or after changing the environment)."""
    with _default_lock:
        for cache in _default.values():
            cache.close()
        _default.clear()
