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


def _rewrite_manifest(path, change):
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    members["manifest.json"] = json.dumps(manifest)
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)


def test_pass_configs_are_saved_as_data_and_an_unknown_type_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3)).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 3),), tune=False)
    p = tmp_path / "m.adaptc"
    adaptc.save(fast, p)
    with zipfile.ZipFile(p) as zf:
        saved = json.loads(zf.read("manifest.json"))["config"]["pass_configs"]
    assert saved["moe_fusion"] == {"type": "MoEFusionConfig", "version": 1}
    assert adaptc.report(adaptc.load(p))["config"]["pass_configs"] == saved
    for change, words in (
            (lambda m: m["config"]["pass_configs"].update(moe_fusion={"type": "subprocess.Popen", "version": 1}),
             "unknown pass config type 'subprocess.Popen'"),
            (lambda m: m["config"]["pass_configs"].update(moe_fusion={"type": "MoEFusionConfig", "version": 7}),
             "MoEFusionConfig version 7"),
            (lambda m: m["config"].update(pass_configs=[1]), "not a JSON object with pass_configs")):
        bad = tmp_path / "bad.adaptc"
        bad.write_bytes(p.read_bytes())
        _rewrite_manifest(bad, change)
        with pytest.raises(adaptc.SaveLoadError, match=words):
            adaptc.load(bad)


def test_a_pass_that_cannot_be_rebuilt_is_refused_at_save(tmp_path):
    tf = pytest.importorskip("transformers")
    from adaptc.runtime.module import CompiledState, attach

    model = tf.BertModel(tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16)).eval()
    attach(model, CompiledState({}, {"eager_attention_fusion": {"encoder": {}}}, {}))
    with pytest.raises(adaptc.SaveLoadError, match="'eager_attention_fusion' .* cannot be re-applied from data"):
        adaptc.save(model, tmp_path / "m.adaptc")
    assert not (tmp_path / "m.adaptc").exists()
