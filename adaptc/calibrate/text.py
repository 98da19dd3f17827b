"""Real offline text for calibration and evaluation, with deterministic splits.

Three sources that are on the machine without a network:
  python_docs  docstrings of the Python standard library, read from its source files with `ast`
               (nothing is imported, so no module runs code);
  fortunes     Debian `fortunes` (/usr/share/games/fortunes), one fortune a passage;
  kjv          Debian `bible-kjv-text` (read through its `bible` reader), a few verses a passage.
`bash scripts/services.sh` installs the Debian packages.

A passage's split depends only on its text (a hash), so every run and every machine agrees on which
passages calibration saw and which are held out.
"""
from __future__ import annotations

import ast
import hashlib
import os
import pkgutil
import random
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import AdaptcError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SOURCES = ("python_docs", "fortunes", "kjv")
# hash bucket (0..9) -> split: train 40% (a benchmark's own fine-tuning), calibration 30%, held-out 30%.
SPLITS = {"train": range(0, 4), "calibration": range(4, 7), "heldout": range(7, 10)}
# The KJV books read: law, poetry, prophets, gospels, letters - varied enough to be a real corpus.
KJV_BOOKS = ("Gen1:1-50:26", "Ps1:1-150:6", "Prov1:1-31:31", "Isa1:1-66:24", "Matt1:1-28:20",
             "John1:1-21:25", "Rom1:1-16:27")
_SKIP_FORTUNE_FILES = {"art", "ascii-art", "translate-me"}  # pictures, and non-English text
MIN_CHARS, MAX_CHARS = 40, 600


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # one of SOURCES

    @property
    def split(self) -> str:
        bucket = int(hashlib.sha1(self.text.encode()).hexdigest(), 16) % 10
        return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def _clean(text: str) -> str | None:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) < MIN_CHARS:
        return None
    return text[:MAX_CHARS].rsplit(" ", 1)[0] if len(text) > MAX_CHARS else text


@lru_cache(maxsize=1)
def python_docs() -> tuple[str, ...]:
    """Module, class and function docstrings of the standard library (sorted by module name)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    found: list[str] = []
    for info in sorted(pkgutil.iter_modules([stdlib]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this"):
            continue
        path = Path(stdlib, info.name, "__init__.py") if info.ispkg else Path(stdlib, info.name + ".py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and (text := _clean(doc)):
                    found.append(text)
    return tuple(dict.fromkeys(found))  # docstrings repeat (overloads, mixins): keep the first


@lru_cache(maxsize=1)
def fortunes() -> tuple[str, ...]:
    if not FORTUNES_DIR.is_dir():
        raise AdaptcError(f"{FORTUNES_DIR} is missing: install the Debian package `fortunes` "
                          "(bash scripts/services.sh)")
    found: list[str] = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix or not path.is_file() or path.name in _SKIP_FORTUNE_FILES:
            continue
        for chunk in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            if text := _clean(chunk):
                found.append(text)
    return tuple(dict.fromkeys(found))


@lru_cache(maxsize=1)
def kjv(verses_per_passage: int = 3) -> tuple[str, ...]:
    exe = shutil.which("bible")
    if exe is None:
        raise AdaptcError("the `bible` reader is missing: install the Debian packages `bible-kjv` and "
                          "`bible-kjv-text` (bash scripts/services.sh)")
    found: list[str] = []
    for book in KJV_BOOKS:
        out = subprocess.run([exe, book], capture_output=True, text=True, check=True,
                             env={**os.environ, "COLUMNS": "100000"}).stdout
        verses = [m.group(1) for m in re.finditer(r"^\s*\d+ (.*)$", out, flags=re.M)]
        for i in range(0, len(verses), verses_per_passage):
            if text := _clean(" ".join(verses[i:i + verses_per_passage])):
                found.append(text)
    return tuple(found)


_READERS = {"python_docs": python_docs, "fortunes": fortunes, "kjv": kjv}


def passages(split: str, per_source: int, sources: tuple[str, ...] = SOURCES, seed: int = 0) -> list[Passage]:
    """`per_source` passages of each source from `split`, in a fixed shuffled order (seeded)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    out: list[Passage] = []
    for source in sources:
        pool = [p for p in (Passage(t, source) for t in _READERS[source]()) if p.split == split]
        random.Random(f"{seed}-{source}-{split}").shuffle(pool)
        if len(pool) < per_source:
            raise AdaptcError(f"only {len(pool)} {source} passages in split {split!r}, {per_source} asked")
        out.extend(pool[:per_source])
    random.Random(f"{seed}-{split}").shuffle(out)
    return out


def texts(split: str, count: int, seed: int = 0) -> list[str]:
    """`count` passages from `split`, mixed evenly over the sources."""
    per = -(-count // len(SOURCES))
    return [p.text for p in passages(split, per, seed=seed)][:count]
