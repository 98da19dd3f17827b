"""The local tuning cache: one SQLite file, safe for several processes writing at once.

WAL mode lets readers proceed while one process writes, and the busy timeout makes concurrent
writers queue instead of failing with "database is locked". The schema version is in the table
name, so an older or newer adaptc using the same file never reads rows it cannot parse.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from adaptc.cache.record import SCHEMA_VERSION, BackendUnavailable, BackendWriteError
from adaptc.cache.sql import SQLBackend

TABLE = f"tuning_v{SCHEMA_VERSION}"
DB_NAME = "tuning.db"
BUSY_TIMEOUT_S = 30.0
MEMORY = ":memory:"


def _setup(conn: sqlite3.Connection, wal: bool) -> None:
    # Switching to WAL takes an exclusive lock that the busy timeout does not wait for: when several
    # processes open a new file at once, the losers retry for a while instead of failing.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if wal:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL makes this crash-safe; a lost last record is re-tuned
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} "
                         "(key TEXT PRIMARY KEY, kernel TEXT NOT NULL, value TEXT NOT NULL)")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class SQLiteBackend(SQLBackend):
    table, param = TABLE, "?"
    # As bytes: a TEXT value that is not UTF-8 must fail as one bad record, not as an unreadable file.
    value_sql = "CAST(value AS BLOB)"
    kind = "sqlite"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        super().__init__(f"sqlite://{self.path}" if os.path.isabs(self.path) else f"sqlite:{self.path}")

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """`sqlite:///abs/path.db`, `sqlite://:memory:` or `sqlite:relative/path.db`."""
        rest = url[len("sqlite:"):]
        path = rest[2:] if rest.startswith("//") else rest
        return cls(MEMORY if path in ("", MEMORY) else path)

    def _open(self) -> sqlite3.Connection:
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            _setup(conn, wal=self.path != MEMORY)
        except (OSError, sqlite3.Error) as e:  # the file is left as it is, whatever it holds
            raise BackendUnavailable(f"cannot open the SQLite cache {self.path}: {e}") from None
        return conn

    def _translate(self, e: Exception, write: bool) -> Exception | None:
        if not isinstance(e, sqlite3.Error):
            return None
        if write:  # full disk, read-only file, lock held past the timeout
            return BackendWriteError(f"cannot write the SQLite cache {self.path}: {e}")
        return BackendUnavailable(f"cannot read the SQLite cache {self.path}: {e}")

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["path"] = self.path
        if self.path != MEMORY:
            out["bytes"] = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        return out
