"""Tuning records in one JSON file, to carry tuning from one machine (or fleet) to another.

A bundle is untrusted input like a shared cache: the header's format and schema version are checked
first, then every record is parsed strictly on its own, so one bad record costs only itself.
Importing never replaces a valid record that is already there. A path of "-" means stdout when
exporting and stdin when importing.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adaptc.cache.record import SCHEMA_VERSION, RecordError, TuningRecord, kernel_matches
from adaptc.cache.tiered import TuningCache
from adaptc.errors import CacheError

FORMAT = "adaptc-tuning-bundle"
STDIO = "-"
_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class ExportReport:
    path: str
    exported: int
    skipped_invalid: int


@dataclass
class ImportReport:
    path: str
    imported: int = 0
    skipped_invalid: int = 0
    already_present: int = 0
    problems: list[str] = field(default_factory=list)  # why each skipped record was refused
    kept: list[str] = field(default_factory=list)      # present records that differ from the bundle's

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_bundle(cache: TuningCache, path: str | os.PathLike, kernel: str | None = None,
                  device: str = "cpu", overwrite: bool = False) -> ExportReport:
    """Write every valid record (of `kernel`, if given) to `path`; an existing file is replaced only
    with `overwrite`. The header names the exporting host and `device` (fingerprinted; "cuda" asks
    torch about the GPU) and counts records per device id."""
    from adaptc.tuner.device import device_fingerprint

    to_stdout = str(path) == STDIO
    path = Path(path)
    if not to_stdout:
        _refuse_database(cache, path)
    if not to_stdout and path.exists() and not overwrite:  # fail fast; _write checks again atomically
        raise CacheError(f"{path} exists; pass --force to replace it")
    try:
        exporter = device_fingerprint(device).to_dict()
    except (ValueError, RuntimeError) as e:
        raise CacheError(f"cannot describe the device {device!r}: {e}") from None
    scan = cache.scan()
    records = [r for r in scan.records if kernel is None or kernel_matches(r.key.kernel, kernel)]
    devices: dict[str, int] = {}
    for r in records:
        devices[r.key.device] = devices.get(r.key.device, 0) + 1
    bundle = {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exported_by": {"host": socket.gethostname(), "device": exporter},
        "devices": devices,
        "records": [r.to_dict() for r in records],
    }
    text = json.dumps(bundle, indent=1, sort_keys=True, allow_nan=False) + "\n"
    if to_stdout:
        sys.stdout.write(text)  # looked up now: click's test runner swaps sys.stdout
        sys.stdout.flush()
    else:
        _write(path, text, overwrite)
    return ExportReport(path="<stdout>" if to_stdout else str(path), exported=len(records),
                        skipped_invalid=len(scan.invalid))


def read_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle's parsed JSON, its header checked. Raises CacheError on an unusable file."""
    from_stdin = str(path) == STDIO
    path = "<stdin>" if from_stdin else path
    try:
        text = sys.stdin.buffer.read().decode("utf-8") if from_stdin else Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as e:
        raise CacheError(f"cannot read the bundle {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CacheError(f"{path} is not a JSON tuning bundle: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheError(f"{path} is not an adaptc tuning bundle (no \"format\": \"{FORMAT}\" header)")
    if data.get("schema") != SCHEMA_VERSION:
        raise CacheError(f"{path} holds schema version {data.get('schema')!r} records; this adaptc reads "
                         f"version {SCHEMA_VERSION} (export it again with a matching adaptc)")
    if not isinstance(data.get("records"), list):
        raise CacheError(f"{path}: \"records\" must be a list")
    return data


def import_bundle(cache: TuningCache, path: str | os.PathLike) -> ImportReport:
    """Add the bundle's records to `cache` (local and shared), keeping records already there."""
    data = read_bundle(path)
    report = ImportReport(path="<stdin>" if str(path) == STDIO else str(path))
    for i, item in enumerate(data["records"]):
        try:
            record = TuningRecord.from_dict(item)
        except RecordError as e:
            report.skipped_invalid += 1
            report.problems.append(f"record {i}: {e}")
            continue
        existing = cache.add(record)
        if existing is None:
            report.imported += 1
            continue
        report.already_present += 1
        if (existing.config, existing.status, existing.time_s) != (record.config, record.status, record.time_s):
            report.kept.append(f"record {i}: kept the present {record.key.kernel} record for "
                               f"{dict(record.key.problem)} ({_describe(existing)}; the bundle's: {_describe(record)})")
    return report


def _describe(record: TuningRecord) -> str:
    time = f"{record.time_s:.3g} s" if record.time_s is not None else record.status
    return f"{dict(record.config)} at {time}, {record.created_at} on {record.host}"


def _refuse_database(cache: TuningCache, path: Path) -> None:
    # Even with --force: a bundle written over a database destroys every record in it.
    for db in cache.files:
        for f in (db, db + "-wal", db + "-shm", db + "-journal"):
            if _same_file(path, Path(f)):
                raise CacheError(f"refusing to export onto {path}: it is the tuning cache's database {db}")
    try:
        with open(path, "rb") as f:
            is_sqlite = f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:  # absent or unreadable: _write reports what matters
        return
    if is_sqlite:
        raise CacheError(f"refusing to export onto {path}: it is an SQLite database, not a tuning bundle")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks too
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _write(path: Path, text: str, overwrite: bool) -> None:
    # Through a temporary file: a reader (or an import on another machine) never sees half a bundle,
    # and without `overwrite` the final link fails rather than replace a file that appeared meanwhile.
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would keep a bundle from the people it is for
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links
                with open(path, "x", encoding="utf-8") as f:
                    f.write(text)
    except FileExistsError:
        raise CacheError(f"{path} exists; pass --force to replace it") from None
    except OSError as e:
        raise CacheError(f"cannot write the bundle {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
