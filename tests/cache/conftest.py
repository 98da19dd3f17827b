"""Keep every cache test away from the user's real cache: a fresh directory and no shared URL."""
from __future__ import annotations

import warnings
from typing import Iterator

import pytest

from adaptc.cache import reset_default_cache


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Iterator[None]:
    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADAPTC_CACHE_URL", raising=False)
    reset_default_cache()
    yield
    reset_default_cache()


@pytest.fixture
def cache_warnings() -> Iterator[list]:
    """Every CacheWarning raised in the test (each one, not Python's once-per-location)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
