"""Offline calibration text: three real sources, deterministic and disjoint splits."""
import pytest

from adaptc.calibrate import text


@pytest.mark.parametrize("source", text.SOURCES)
def test_each_source_has_real_passages(source):
    found = text._READERS[source]()
    assert len(found) > 500
    assert all(text.MIN_CHARS <= len(t) <= text.MAX_CHARS for t in found[:200])


def test_splits_are_deterministic_disjoint_and_balanced():
    cal = text.passages("calibration", 20)
    assert [p.text for p in cal] == [p.text for p in text.passages("calibration", 20)]
    held = {p.text for p in text.passages("heldout", 20)}
    assert not held & {p.text for p in cal}
    assert all(p.split == "calibration" for p in cal)
    assert sorted({p.source for p in cal}) == sorted(text.SOURCES)
    assert sum(p.source == "kjv" for p in cal) == 20
    assert len(text.texts("heldout", 10)) == 10
