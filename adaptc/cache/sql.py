"""What the SQLite and PostgreSQL stores share: one table (key, kernel, value), upserts, and a
connection per process (a connection never crosses fork(): the child opens its own)."""
from __future__ import annotations

import os
import threading
from abc import abstractmethod
from typing import Any, Iterator

from adaptc.cache.record import Backend


class SQLBackend(Backend):
    """Subclasses give `table`, `param` (the driver's placeholder), `_open()` and `_translate()`."""

    table: str
    param: str
    value_sql = "value"   # how to select the value column (SQLite reads it as bytes)
    touch_sql = ""        # extra assignments when an upsert replaces a row

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._conn: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    @abstractmethod
    def _open(self) -> Any:
        """A new connection with the table created; BackendUnavailable if that fails."""

    @abstractmethod
    def _translate(self, e: Exception, write: bool) -> Exception | None:
        """The cache error a driver error means, or None when `e` is not the driver's."""

    def _usable(self, conn: Any) -> bool:
        return True

    def _run(self, sql: str, args: tuple = (), write: bool = False) -> Any:
        """Rows for a read; the number of rows changed for a write."""
        with self._lock:
            if self._conn is None or self._pid != os.getpid() or not self._usable(self._conn):
                self._conn, self._pid = self._open(), os.getpid()
            try:
                cur = self._conn.execute(sql, args)
                return cur.rowcount if write else cur.fetchall()
            except Exception as e:
                error = self._translate(e, write)
                if error is None:
                    raise
                raise error from None

    def get_text(self, digest: str) -> str | bytes | None:
        rows = self._run(f"SELECT {self.value_sql} FROM {self.table} WHERE key = {self.param}", (digest,))
        return rows[0][0] if rows else None

    def put_text(self, digest: str, kernel: str, text: str, overwrite: bool = True) -> bool:
        p = self.param
        conflict = (f"DO UPDATE SET kernel = excluded.kernel, value = excluded.value{self.touch_sql}"
                    if overwrite else "DO NOTHING")
        sql = f"INSERT INTO {self.table} (key, kernel, value) VALUES ({p}, {p}, {p}) ON CONFLICT (key) {conflict}"
        return self._run(sql, (digest, kernel, text), write=True) > 0

    def iter_text(self) -> Iterator[tuple[str, str | bytes]]:
        # Fetched whole: a live cursor would hold a read snapshot open while the caller writes.
        yield from self._run(f"SELECT key, {self.value_sql} FROM {self.table} ORDER BY kernel, key")

    def count(self) -> int:
        return self._run(f"SELECT COUNT(*) FROM {self.table}")[0][0]

    def delete_all(self) -> int:
        return self._run(f"DELETE FROM {self.table}", write=True)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
