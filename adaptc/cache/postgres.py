"""A tuning cache shared through PostgreSQL: one table, upserts with ON CONFLICT.

The value column is TEXT, not JSONB: records are validated by `TuningRecord.from_json` on the way
out whatever the store, and TEXT keeps a record byte-for-byte as written (JSONB would reorder keys).
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from adaptc.cache.record import (SCHEMA_VERSION, BackendUnavailable, BackendWriteError, RecordError,
                                  redact_url)
from adaptc.cache.sql import SQLBackend

TABLE = f"adaptc_tuning_v{SCHEMA_VERSION}"
DEFAULT_CONNECT_TIMEOUT_S = 2  # libpq's minimum; a dead shared cache must not stall a compile
# Concurrent CREATE TABLE IF NOT EXISTS can still collide in pg_type; an advisory lock serialises it.
_CREATE_LOCK_ID = 0x61646170  # "adap"


class PostgresBackend(SQLBackend):
    table, param = TABLE, "%s"
    touch_sql = ", updated_at = now()"
    kind = "postgresql"

    def _open(self) -> Any:
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
        return conn

    def _usable(self, conn: Any) -> bool:
        return not conn.closed

    def _translate(self, e: Exception, write: bool) -> Exception | None:
        import psycopg

        if not isinstance(e, psycopg.Error):
            return None
        where, state = redact_url(self.url), getattr(e, "sqlstate", None) or ""
        # No SQLSTATE, class 08 (connection) or 57P (shutdown): the server is gone.
        if not state or state.startswith(("08", "57P")) or self._conn.closed:
            self._conn = None
            return BackendUnavailable(f"postgresql at {where} is unreachable: {_first_line(e)}")
        if write:  # disk full (53100), read-only transaction (25006), …
            return BackendWriteError(f"postgresql at {where} refused the write: {_first_line(e)}")
        return RecordError(f"postgresql at {where} refused the read: {_first_line(e)}")

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["table"] = TABLE
        return out


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
