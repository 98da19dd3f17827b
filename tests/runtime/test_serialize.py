"""save/load: round trips are in the pass tests; here, files that are not what they claim."""
import json
import zipfile

import pytest
import torch
from torch import nn

import adaptc


def test_missing_file(tmp_path):
    with pytest.raises(adaptc.SaveLoadError, match="no such file"):
        adaptc.load(tmp_path / "nope.adaptc")


def test_not_a_zip(tmp_path):
    p = tmp_path / "x.adaptc"
    p.write_text("hello")
    with pytest.raises(adaptc.SaveLoadError, match="not a readable adaptc file"):
        adaptc.load(p)


def test_foreign_format_version(tmp_path):
    p = tmp_path / "x.adaptc"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": "adaptc", "format_version": 999}))
    with pytest.raises(adaptc.SaveLoadError, match="format version 999"):
        adaptc.load(p)


def test_truncated_file_and_no_overwrite_on_failure(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3)).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 3),))
    p = tmp_path / "m.adaptc"
    adaptc.save(fast, p)
    assert p.stat().st_mode & 0o777 == 0o644  # readable by others, like any file a tool writes
    data = p.read_bytes()
    (tmp_path / "t.adaptc").write_bytes(data[: len(data) // 2])
    with pytest.raises(adaptc.SaveLoadError):
        adaptc.load(tmp_path / "t.adaptc")
    loaded = adaptc.load(p)
    x = torch.randn(5, 3)
    torch.testing.assert_close(loaded(x), model(x))


def test_unsaveable_module_is_refused_and_leaves_target_alone(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.warns(UserWarning):
        fast = adaptc.compile(Branchy(), example_inputs=(torch.randn(2, 3),))
    target = tmp_path / "keep.adaptc"
    target.write_text("user data")
    with pytest.raises(adaptc.SaveLoadError, match="without pickling code"):
        adaptc.save(fast, target)
    assert target.read_text() == "user data"
