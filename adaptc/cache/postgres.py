"""A tuning cache shared through PostgreSQL: one table, upserts with ON CONFLICT.

The value column is TEXT, not JSONB: records are validated by `TuningRecord.from_json` on the way
out whatever the store, and TEXT keeps a record byte-for-byte as written (JSONB would reorder keys).
"""
from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from adaptc.cache.record import (SCHEMA_VERSION, SQLBackend, BackendUnavailable, BackendWriteError, RecordError,
                                  redact_url)

TABLE = f"adaptc_tuning_v{SCHEMA_VERSION}"
DEFAULT_CONNECT_TIMEOUT_S = 2  # libpq's minimum; a dead shared cache must not stall a compile
# Concurrent CREATE TABLE IF NOT EXISTS can still collide in pg_type; an advisory lock serialises it.
_CREATE_LOCK_ID = 0x61646170  # "adap"


class PostgresBackend(SQLBackend):
    table, param = TABLE, "%s"
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._conn: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        if self._conn is not None and self._pid == os.getpid() and not self._conn.closed:
            return self._conn
        try:
            import psycopg
        except ImportError:
            raise BackendUnavailable("a postgresql:// cache needs psycopg: pip install 'adaptc[services]'") from None
        options = {}
        if "connect_timeout" not in parse_qs(urlsplit(self.url).query):
            options["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
        try:
            conn = psycopg.connect(self.url, autocommit=True, **options)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK_ID,))
                conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, kernel TEXT NOT NULL, "
                             "value TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        except psycopg.Error as e:
            raise BackendUnavailable(f"postgresql at {redact_url(self.url)} is unreachable: {_first_line(e)}") from None
        # A connection must not cross fork(): the child opens its own and abandons the parent's.
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _run(self, sql: str, args: tuple = (), write: bool = False) -> Any:
        """Rows for a read; the number of rows changed for a write."""
        with self._lock:
            conn = self._connect()
            import psycopg

            try:
                cur = conn.execute(sql, args)
                return cur.rowcount if write else cur.fetchall()
            except psycopg.Error as e:
                state = getattr(e, "sqlstate", None) or ""
                # No SQLSTATE, class 08 (connection) or 57P (shutdown): the server is gone.
                if not state or state.startswith(("08", "57P")) or conn.closed:
                    self._conn = None
                    raise BackendUnavailable(
                        f"postgresql at {redact_url(self.url)} is unreachable: {_first_line(e)}") from None
                if write:  # disk full (53100), read-only transaction (25006), …
                    raise BackendWriteError(
                        f"postgresql at {redact_url(self.url)} refused the write: {_first_line(e)}") from None
                raise RecordError(f"postgresql at {redact_url(self.url)} refused the read: {_first_line(e)}") from None

    def put_text(self, digest: str, kernel: str, text: str, overwrite: bool = True) -> bool:
        conflict = ("DO UPDATE SET kernel = EXCLUDED.kernel, value = EXCLUDED.value, updated_at = now()"
                    if overwrite else "DO NOTHING")
        sql = f"INSERT INTO {TABLE} (key, kernel, value) VALUES (%s, %s, %s) ON CONFLICT (key) {conflict}"
        return self._run(sql, (digest, kernel, text), write=True) > 0

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["table"] = TABLE
        return out


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
