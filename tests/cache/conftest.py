"""Cache test helpers (the cache itself is isolated per test by tests/conftest.py)."""
from __future__ import annotations

import warnings
from typing import Iterator

import pytest


@pytest.fixture
def cache_warnings() -> Iterator[list]:
    """Every CacheWarning raised in the test (each one, not Python's once-per-location)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
