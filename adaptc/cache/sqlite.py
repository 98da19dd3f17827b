"""The local tuning cache: one SQLite file, safe for several processes writing at once.

WAL mode lets readers proceed while one process writes, and the busy timeout makes concurrent
writers queue instead of failing with "database is locked". The schema version is in the table
name, so an older or newer adaptc using the same file never reads rows it cannot parse.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from adaptc.cache.record import SCHEMA_VERSION, SQLBackend, BackendUnavailable, BackendWriteError

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
    kind = "sqlite"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        super().__init__(f"sqlite://{self.path}" if os.path.isabs(self.path) else f"sqlite:{self.path}")
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """`sqlite:///abs/path.db`, `sqlite://:memory:` or `sqlite:relative/path.db`."""
        rest = url[len("sqlite:"):]
        path = rest[2:] if rest.startswith("//") else rest
        return cls(MEMORY if path in ("", MEMORY) else path)

    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross fork(): the child opens its own and abandons the parent's.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            _setup(conn, wal=self.path != MEMORY)
        except (OSError, sqlite3.Error) as e:
            raise BackendUnavailable(f"cannot open the SQLite cache {self.path}: {e}") from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _run(self, sql: str, args: tuple = (), write: bool = False) -> Any:
        """Rows for a read; the number of rows changed for a write."""
        with self._lock:
            conn = self._connect()
            try:
                cur = conn.execute(sql, args)
                return cur.rowcount if write else cur.fetchall()
            except sqlite3.Error as e:
                if write:  # full disk, read-only file, lock held past the timeout
                    raise BackendWriteError(f"cannot write the SQLite cache {self.path}: {e}") from None
                raise BackendUnavailable(f"cannot read the SQLite cache {self.path}: {e}") from None

    def put_text(self, digest: str, kernel: str, text: str, overwrite: bool = True) -> bool:
        if overwrite:
            sql = (f"INSERT INTO {TABLE} (key, kernel, value) VALUES (?, ?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET kernel = excluded.kernel, value = excluded.value")
        else:
            sql = f"INSERT OR IGNORE INTO {TABLE} (key, kernel, value) VALUES (?, ?, ?)"
        return self._run(sql, (digest, kernel, text), write=True) > 0

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["path"] = self.path
        if self.path != MEMORY:
            out["bytes"] = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        return out
