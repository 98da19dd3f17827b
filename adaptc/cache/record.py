"""A tuning record, its key, and the small interface every storage backend implements.

Records are JSON, never pickle: a shared cache is input from other machines, so everything read is
parsed strictly and rejected with a `RecordError` that says which field is wrong. Callers turn that
into a warning and skip the record.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from adaptc.errors import CacheError

# Bump when the JSON layout or the meaning of a key field changes. Storage locations (table names,
# key prefixes) carry it too, so two adaptc versions sharing one server never read each other's rows.
SCHEMA_VERSION = 1
STATUSES = ("ok", "wrong", "crashed")

Scalar = int | float | str | bool | None


class RecordError(CacheError):
    """A stored record that cannot be trusted: corrupt, from another schema version, or ill-typed."""


class BackendUnavailable(CacheError):
    """The store cannot be reached at all (connection refused, timeout, unopenable file)."""


class BackendWriteError(CacheError):
    """The store is there but refused this write (disk full, read-only, out of memory)."""


@dataclass(frozen=True)
class RecordKey:
    """What makes a tuned config valid. Two keys are equal exactly when a record may be reused."""

    kernel: str
    source_hash: str
    problem: tuple[tuple[str, Scalar], ...]  # the shape bucket; a Mapping is accepted and sorted
    dtype: str
    device: str                             # DeviceFingerprint.id
    torch: str
    triton: str

    def __post_init__(self) -> None:
        problem = self.problem.items() if isinstance(self.problem, Mapping) else self.problem
        object.__setattr__(self, "problem", tuple(sorted((str(k), v) for k, v in problem)))
        for name in ("kernel", "source_hash", "dtype", "device", "torch", "triton"):
            _expect(isinstance(getattr(self, name), str) and getattr(self, name), f"key.{name}", "a non-empty string")
        for k, v in self.problem:
            _expect(_is_scalar(v) and v is not None, f"key.problem.{k}", "an int, float, str or bool")

    @classmethod
    def for_device(cls, kernel: str, source_hash: str, problem: Mapping[str, Scalar], dtype: str,
                   device: Any) -> RecordKey:
        """A key for `device` (a DeviceFingerprint), taking the versions from its fingerprint."""
        return cls(kernel=kernel, source_hash=source_hash, problem=tuple(problem.items()), dtype=str(dtype),
                   device=device.id, torch=device.torch_version, triton=device.triton_version)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "source_hash": self.source_hash, "problem": dict(self.problem),
                "dtype": self.dtype, "device": self.device, "torch": self.torch, "triton": self.triton}

    @functools.cached_property
    def digest(self) -> str:
        """The storage key: a hash of every key field and the schema version."""
        payload = json.dumps({"schema": SCHEMA_VERSION, **self.to_dict()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Trial:
    """One measured candidate, kept so the cost model can learn from losers as well as winners."""

    config: Mapping[str, Scalar]
    time_s: float | None
    status: str = "ok"

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", _freeze_config(self.config, "trial.config"))
        object.__setattr__(self, "time_s", _check_time(self.time_s, self.status, "trial"))

    def to_dict(self) -> dict[str, Any]:
        return {"config": dict(self.config), "time_s": self.time_s, "status": self.status}


@dataclass(frozen=True, eq=True)
class TuningRecord:
    """The chosen config for one key. `status` is not "ok" when every candidate failed; the
    compiler then uses the default config, and another process (on this machine or any other
    sharing the cache) measures again rather than take the failure as final."""

    key: RecordKey
    config: Mapping[str, Scalar]
    time_s: float | None
    status: str = "ok"
    trials: tuple[Trial, ...] = ()
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    host: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        _expect(isinstance(self.key, RecordKey), "key", "a RecordKey")
        # Read-only, because hits are memoised and shared: a caller must not edit the cached config.
        object.__setattr__(self, "config", _freeze_config(self.config, "config"))
        object.__setattr__(self, "time_s", _check_time(self.time_s, self.status, "record"))
        object.__setattr__(self, "trials", tuple(self.trials))
        _expect(all(isinstance(t, Trial) for t in self.trials), "trials", "a list of Trial")
        _expect(isinstance(self.host, str), "host", "a string")
        _expect(isinstance(self.created_at, str) and _parses_as_time(self.created_at), "created_at",
                "an ISO 8601 timestamp")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "key": self.key.to_dict(), "config": dict(self.config),
                "time_s": self.time_s, "status": self.status, "trials": [t.to_dict() for t in self.trials],
                "created_at": self.created_at, "host": self.host}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> TuningRecord:
        """Parse strictly. Raises RecordError naming the first field that is wrong."""
        try:
            return cls._from_dict(data)
        except (TypeError, ValueError, OverflowError) as e:  # a shape the checks did not foresee
            raise RecordError(f"malformed record: {e}") from None

    @classmethod
    def _from_dict(cls, data: Any) -> TuningRecord:
        _expect(isinstance(data, dict), "record", "a JSON object")
        schema = data.get("schema")
        if type(schema) is not int or schema != SCHEMA_VERSION:
            raise RecordError(f"record has schema version {schema!r}; this adaptc reads version {SCHEMA_VERSION}")
        _exact_fields(data, {"schema", "key", "config", "time_s", "status", "trials", "created_at", "host"}, "record")
        key = data["key"]
        _expect(isinstance(key, dict), "key", "a JSON object")
        _exact_fields(key, {"kernel", "source_hash", "problem", "dtype", "device", "torch", "triton"}, "key")
        _expect(isinstance(key["problem"], dict), "key.problem", "a JSON object")
        _expect(isinstance(data["trials"], list), "trials", "a list")
        trials = []
        for i, t in enumerate(data["trials"]):
            _expect(isinstance(t, dict), f"trials[{i}]", "a JSON object")
            _exact_fields(t, {"config", "time_s", "status"}, f"trials[{i}]")
            trials.append(Trial(config=t["config"], time_s=t["time_s"], status=t["status"]))
        return cls(key=RecordKey(problem=tuple(key["problem"].items()),
                                 **{k: v for k, v in key.items() if k != "problem"}),
                   config=data["config"], time_s=data["time_s"], status=data["status"], trials=tuple(trials),
                   created_at=data["created_at"], host=data["host"])

    @classmethod
    def from_json(cls, text: str | bytes, expect_digest: str | None = None) -> TuningRecord:
        """Parse a stored value. `expect_digest` is the storage key it was found under: a record whose
        own key hashes elsewhere was put there by mistake or on purpose, and is refused."""
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, TypeError, RecursionError, RecordError) as e:  # RecursionError: [[[[…
            raise RecordError(f"not valid JSON: {e}") from None
        record = cls.from_dict(data)
        if expect_digest is not None and record.key.digest != expect_digest:
            raise RecordError(f"stored under {expect_digest[:12]}… but its key hashes to {record.key.digest[:12]}…")
        return record


class Backend(ABC):
    """A store of record JSON by digest. Backends move text; `TuningRecord.from_json` judges it, so a
    poisoned value is found the same way whichever store it came from.

    Driver errors are translated to BackendUnavailable / BackendWriteError; nothing else escapes."""

    kind: str = "?"

    def __init__(self, url: str) -> None:
        self.url = url

    @abstractmethod
    def get_text(self, digest: str) -> str | bytes | None:
        """The stored value as it is (bytes where the store holds bytes); None if absent."""

    @abstractmethod
    def put_text(self, digest: str, kernel: str, text: str, overwrite: bool = True) -> bool:
        """Store `text` under `digest`; with overwrite=False keep an existing value. True if written."""

    @abstractmethod
    def iter_text(self) -> Iterator[tuple[str, str | bytes]]: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def delete_all(self) -> int: ...

    def close(self) -> None:
        pass

    def get(self, key: RecordKey) -> TuningRecord | None:
        """The record under `key`, None if absent; RecordError if what is stored cannot be trusted."""
        text = self.get_text(key.digest)
        return None if text is None else TuningRecord.from_json(text, expect_digest=key.digest)

    def put(self, record: TuningRecord, overwrite: bool = True) -> bool:
        return self.put_text(record.key.digest, record.key.kernel, record.to_json(), overwrite)

    def items(self) -> Iterator[tuple[str, TuningRecord | RecordError]]:
        """Every stored (digest, record); a bad one comes as its RecordError instead of stopping the walk."""
        for digest, text in self.iter_text():
            try:
                yield digest, TuningRecord.from_json(text, expect_digest=digest)
            except RecordError as e:
                yield digest, e

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": redact_url(self.url), "records": self.count()}


# user:password@ (up to the last @ before the query: a password may hold a raw @ or /), and the value
# of any query key that names a secret (password=, sslpassword=, token=, …). Regular expressions, not
# urlsplit: the URLs that need redacting most are the malformed ones an error message quotes.
_USERINFO_PASSWORD = re.compile(r"(://[^/?#:]*:)[^?#]*@")
_QUERY_SECRET = re.compile(r"([?&][^=&#]*(?:pass|secret|token)[^=&#]*=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any password or secret query value replaced, for warnings and `adaptc cache stats`."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", url, count=1))


def kernel_matches(kernel: str, wanted: str) -> bool:
    """Whether a stored kernel name is what a `--kernel` filter asks for: `fused_moe` names every
    implementation (`fused_moe/cpu`, `fused_moe/triton`), `fused_moe/cpu` just that one."""
    return kernel == wanted or ("/" not in wanted and kernel.split("/", 1)[0] == wanted)


def source_hash(*parts: str | bytes) -> str:
    """A short hash of a kernel's source text (and anything else that changes what it computes)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _expect(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise RecordError(f"{where} must be {what}")


def _exact_fields(data: dict, expected: set[str], where: str) -> None:
    missing, extra = expected - data.keys(), data.keys() - expected
    if missing or extra:
        detail = "; ".join(s for s in (missing and f"missing {sorted(missing)}", extra and f"unexpected {sorted(extra)}") if s)
        raise RecordError(f"{where}: {detail}")


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


def _freeze_config(config: Any, where: str) -> Mapping[str, Scalar]:
    _expect(isinstance(config, Mapping), where, "a JSON object of scalars")
    for k, v in config.items():
        _expect(isinstance(k, str), f"{where} keys", "strings")
        _expect(_is_scalar(v), f"{where}.{k}", "a JSON scalar (int, float, str, bool or null)")
    return MappingProxyType(dict(config))


def _check_time(time_s: Any, status: Any, where: str) -> float | None:
    _expect(status in STATUSES, f"{where} status", f"one of {', '.join(STATUSES)}")
    if time_s is None:
        _expect(status != "ok", f"{where} time_s", "a number when status is ok")
        return None
    try:
        ok = isinstance(time_s, (int, float)) and not isinstance(time_s, bool) and 0 <= float(time_s) < math.inf
    except OverflowError:  # an int too large for a float
        ok = False
    _expect(ok, f"{where} time_s", "a finite number of seconds ≥ 0, or null")
    return float(time_s)


def _parses_as_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _reject_constant(name: str) -> None:
    raise RecordError(f"{name} is not a JSON number")
