"""Typed pass configs: one frozen dataclass per pass, validated on construction, written to JSON with
its type and version, and read back only as one of the known config classes (never a class named by
the file). A value that is not JSON (a tokenizer) may sit in a field marked `data=False`: it is written
as its type name and comes back as the field's default."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import AdaptcError


def option(default: Any = None, *, data: bool = True, doc: str = "") -> Any:
    """A config field; `data=False`: a live object (a tokenizer) that a saved file records by type only."""
    return dataclasses.field(default=default, metadata={"data": data, "doc": doc})


@dataclass(frozen=True)
class PassConfig:
    """What one pass may be told. Subclasses are frozen dataclasses whose `validate` raises
    AdaptcError for a bad value; `pass_name` is set by the pass that owns the class."""

    version: ClassVar[int] = 1
    pass_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise AdaptcError naming the pass and the field for a value the pass cannot use."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, **options: Any) -> "PassConfig":
        """The config with these fields; a name it lacks is an error naming the nearest field."""
        for name in options:
            if name not in cls.field_names():
                raise AdaptcError(unknown_option(cls, name))
        return cls(**options)

    def replace(self, **options: Any) -> "PassConfig":
        for name in options:
            if name not in self.field_names():
                raise AdaptcError(unknown_option(type(self), name))
        return dataclasses.replace(self, **options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the class name and version: what the report and a saved file hold."""
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value if value is None or (f.metadata.get("data", True) and _is_json(value)) \
                else f"<{type(value).__name__}>"
        return out

    def fail(self, name: str, why: str) -> None:
        raise AdaptcError(f"{self.pass_name or type(self).__name__} option {name}={getattr(self, name)!r}: {why}")


def unknown_option(cls: type[PassConfig], name: str) -> str:
    fields = cls.field_names()
    near = difflib.get_close_matches(name, fields, n=1)
    owner = cls.pass_name or cls.__name__
    if near:
        return f"{owner} has no option {name!r}: did you mean {near[0]!r}?"
    return f"{owner} has no option {name!r}; its options are: {', '.join(fields) or 'none'}"


def config_from_dict(data: Any, allowed: dict[str, type[PassConfig]]) -> PassConfig:
    """A config written by `to_dict`, rebuilt only as one of `allowed` (type name -> class), at its
    version; fields it does not know are refused, not dropped. ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"a pass config is a JSON object, not {type(data).__name__}")
    data = dict(data)
    name, version = data.pop("type", None), data.pop("version", None)
    cls = allowed.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown pass config type {name!r} (known: {', '.join(sorted(allowed))})")
    if version != cls.version:
        raise ValueError(f"{name} version {version!r} (this adaptc reads version {cls.version})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(data) - set(fields))
    if extra:
        raise ValueError(f"{name} has no field(s) {', '.join(extra)}")
    kept = {k: v for k, v in data.items() if fields[k].metadata.get("data", True)}  # live objects: defaults
    try:
        return cls(**kept)
    except AdaptcError as exc:
        raise ValueError(str(exc)) from None


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
