"""`adaptc cache` against SQLite, a real Redis and a real PostgreSQL; bundles move tuning between machines."""
import json

import pytest
import torch
from click.testing import CliRunner

import adaptc
from adaptc.cache import open_cache, reset_default_cache
from adaptc.cli import main
from tests.cache.cache_helpers import make_record


def run(*args, env=None):
    result = CliRunner().invoke(main, ["cache", *args], env=env, catch_exceptions=False)
    return result


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue(f"{request.param}_url")


def test_stats_list_export_import_clear(url, tmp_path):
    cache = open_cache(url)
    for i in range(3):
        cache.put(make_record(i))
    stats = json.loads(run("--url", url, "stats", "--json").output)
    assert stats["records"] == 3 and stats["invalid"] == 0
    listed = json.loads(run("list", "--url", url, "--json").output)
    assert len(listed["records"]) == 3 and {r["key"]["kernel"] for r in listed["records"]} == {"fused_moe"}
    assert "fused_moe" in run("list", "--url", url).output

    bundle = tmp_path / "bundle.json"
    out = json.loads(run("export", str(bundle), "--url", url, "--json").output)
    assert out["exported"] == 3
    again = run("export", str(bundle), "--url", url)
    assert again.exit_code != 0 and "--force" in again.output  # never overwrites what the user has
    assert json.loads(bundle.read_text())["records"]

    other = f"sqlite:///{tmp_path / 'other.db'}"
    imported = json.loads(run("import", str(bundle), "--url", other, "--json").output)
    assert imported["imported"] == 3
    assert json.loads(run("import", str(bundle), "--url", other, "--json").output)["already_present"] == 3

    cleared = json.loads(run("clear", "--yes", "--url", url, "--json").output)
    assert sum(cleared["removed"].values()) >= 3
    assert json.loads(run("stats", "--url", url, "--json").output)["records"] == 0


def test_bad_bundle_and_dead_server_are_clear_errors(tmp_path, dead_url):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run("import", str(bad))
    assert result.exit_code != 0 and "not a JSON tuning bundle" in result.output
    missing = run("import", str(tmp_path / "nope.json"))
    assert missing.exit_code != 0 and "cannot read" in missing.output
    dead = run("stats", "--url", dead_url("redis"), "--json")
    assert "Traceback" not in dead.output


def test_an_imported_bundle_makes_compile_measure_nothing(tmp_path, monkeypatch):
    from tests.moe_models import hf_causal_lm

    model = hf_causal_lm("olmoe")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    first = adaptc.report(adaptc.compile(model, example_inputs=(ids,), tune_trials=3))["tuning"]
    assert first["measured"] > 0
    bundle = tmp_path / "tuned.json"
    assert run("export", str(bundle)).exit_code == 0

    monkeypatch.setenv("ADAPTC_CACHE_DIR", str(tmp_path / "another-machine"))  # an empty cache
    reset_default_cache()
    from adaptc.kernels._registry import _CONFIGS
    _CONFIGS.clear()
    assert run("import", str(bundle)).exit_code == 0
    second = adaptc.report(adaptc.compile(model, example_inputs=(ids,), tune_trials=3))["tuning"]
    assert second["measured"] == 0 and second["cache_hits"] == len(first["kernels"])
