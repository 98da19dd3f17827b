"""A tuning cache shared through Redis: JSON values under a versioned key prefix, plus an index set.

The index set exists so listing never needs KEYS or a SCAN over a database that other programs may
share; the prefix carries the schema version so different adaptc versions coexist on one server.
"""
from __future__ import annotations

from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

from adaptc.cache.record import (SCHEMA_VERSION, Backend, BackendUnavailable, BackendWriteError, RecordError,
                                  redact_url)

PREFIX = f"adaptc:tuning:v{SCHEMA_VERSION}:"
INDEX = PREFIX + "index"
_PREFIX_B = PREFIX.encode()
# A shared cache must never stall a compile: fail fast, then the tiered cache falls back to local.
DEFAULT_TIMEOUT_S = 2.0
_BATCH = 500


class RedisBackend(Backend):
    kind = "redis"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            try:
                import redis
            except ImportError:
                raise BackendUnavailable("a redis:// cache needs the redis package: pip install 'adaptc[services]'") from None
            query = parse_qs(urlsplit(self.url).query)
            options = {}
            if "socket_timeout" not in query:
                options["socket_timeout"] = DEFAULT_TIMEOUT_S
            if "socket_connect_timeout" not in query:
                options["socket_connect_timeout"] = DEFAULT_TIMEOUT_S
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # No retries: redis-py's default (3, with backoff) would stall a compile for many timeouts
            # before the tiered cache can fall back. redis-py's pool notices fork() and reconnects.
            # Values stay bytes: one that is not UTF-8 is a bad record for from_json to refuse, not a crash.
            try:
                self._client = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **options)
            except ValueError as e:  # a query option redis-py cannot parse (socket_timeout=soon)
                raise BackendUnavailable(f"invalid redis URL {redact_url(self.url)}: {e}") from None
        return self._client

    def _call(self, fn, write: bool = False) -> Any:
        client = self._redis()  # raises BackendUnavailable when the redis package is missing
        import redis

        try:
            return fn(client)
        except redis.exceptions.ResponseError as e:
            # The server answered but refused: OOM under maxmemory, READONLY replica, a wrong-type key.
            # On a read it means one value is not ours (WRONGTYPE): a bad record, not a dead server.
            if write:
                raise BackendWriteError(f"redis at {redact_url(self.url)} refused the write: {e}") from None
            raise RecordError(f"redis at {redact_url(self.url)} refused the read: {e}") from None
        except redis.exceptions.RedisError as e:  # connection refused, timeout, auth, protocol
            raise BackendUnavailable(f"redis at {redact_url(self.url)} is unreachable: {e}") from None

    def get_text(self, digest: str) -> bytes | None:
        return self._call(lambda r: r.get(PREFIX + digest))

    def put_text(self, digest: str, kernel: str, text: str, overwrite: bool = True) -> bool:
        def put(r: Any) -> bool:
            # One MULTI/EXEC so a listing never sees a value without its index entry or the reverse.
            pipe = r.pipeline(transaction=True)
            pipe.set(PREFIX + digest, text, nx=not overwrite)
            pipe.sadd(INDEX, digest)
            return bool(pipe.execute()[0])
        return self._call(put, write=True)

    def iter_text(self) -> Iterator[tuple[str, bytes]]:
        digests = sorted(self._call(lambda r: r.smembers(INDEX)))
        for i in range(0, len(digests), _BATCH):
            chunk = digests[i:i + _BATCH]
            values = self._call(lambda r: r.mget([_PREFIX_B + d for d in chunk]))
            for digest, text in zip(chunk, values):
                if text is not None:  # indexed but deleted behind our back
                    yield digest.decode("ascii", "replace"), text  # a non-hex digest fails the key check

    def count(self) -> int:
        return self._call(lambda r: r.scard(INDEX))

    def delete_all(self) -> int:
        def delete(r: Any) -> int:
            digests, removed = list(r.smembers(INDEX)), 0
            for i in range(0, len(digests), _BATCH):
                chunk = digests[i:i + _BATCH]
                # Only what was listed leaves the index: a record written meanwhile stays findable.
                pipe = r.pipeline(transaction=True)
                pipe.delete(*[_PREFIX_B + d for d in chunk])
                pipe.srem(INDEX, *chunk)
                removed += pipe.execute()[0]
            return removed
        return self._call(delete, write=True)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["prefix"] = PREFIX
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
