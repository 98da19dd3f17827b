"""`adaptc cache` against SQLite, a real Redis and a real PostgreSQL; bundles move tuning between machines."""
import json

import pytest
import torch
from click.testing import CliRunner

import adaptc
from adaptc.cache import SCHEMA_VERSION, TuningRecord, open_cache, reset_default_cache
from adaptc.cli import main
from tests.cache.cache_helpers import make_record


def run(*args, env=None, input=None):
    result = CliRunner().invoke(main, ["cache", *args], env=env, input=input, catch_exceptions=False)
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
    assert result.exit_code == 1 and "not a JSON tuning bundle" in result.output
    missing = run("import", str(tmp_path / "nope.json"))
    assert missing.exit_code == 1 and "cannot read" in missing.output
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    assert "not a JSON tuning bundle" in run("import", str(nested)).output
    other = tmp_path / "other.json"
    other.write_text('{"records": []}')
    assert "not an adaptc tuning bundle" in run("import", str(other)).output
    for scheme in ("redis", "postgresql"):
        # The store the user named cannot be read: nothing on stdout (no half table, no empty document
        # a script would take for "no records"), the error on stderr, exit 1.
        for command in (["stats"], ["stats", "--json"], ["list"], ["list", "--json"]):
            dead = run(*command, "--url", dead_url(scheme))
            assert dead.exit_code == 1 and dead.stdout == "" and "Traceback" not in dead.output, (command, dead.output)
            assert dead.stderr.count("warning:") == 1 and "Error: the shared tuning cache failed" in dead.stderr
            assert "unreachable" in dead.stderr and "secret" not in dead.output


def test_list_in_a_pipe_is_one_record_a_line_however_long(tmp_path):
    cache = open_cache()
    long = TuningRecord(make_record(0).key, config={f"PARAMETER_NUMBER_{i}": 1000 + i for i in range(12)}, time_s=2e-3)
    cache.put(long)
    cache.put(make_record(1))
    result = run("list")  # CliRunner's stdout is not a terminal, as in `adaptc cache list | cat`
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["kernel", "problem", "dtype", "device", "config", "time", "status"]
    assert len(lines) == 3 and max(len(l) for l in lines) > 200  # not wrapped at 80 columns
    row = dict(zip(lines[0].split("\t"), next(l for l in lines if "PARAMETER" in l).split("\t")))
    assert row["config"] == ", ".join(f"{k}={v}" for k, v in sorted(long.config.items()))
    assert row["time"] == "2 ms" and row["status"] == "ok" and row["kernel"] == "fused_moe"
    assert "2 records" in result.stderr  # the count is not a record
    stats = run("stats")
    assert stats.exit_code == 0 and all("…" not in l for l in stats.stdout.splitlines())  # paths whole


def _bundle(tmp_path, records, schema=None):
    path = tmp_path / "bundle.json"
    assert run("export", str(path), "--force").exit_code == 0
    data = json.loads(path.read_text())
    data["records"] = records
    if schema is not None:
        data["schema"] = schema
    path.write_text(json.dumps(data))
    return path


def test_a_foreign_version_bundle_is_refused_and_a_bad_record_costs_only_itself(tmp_path):
    good = make_record(0).to_dict()
    foreign = _bundle(tmp_path, [good], schema=SCHEMA_VERSION + 1)
    result = run("import", str(foreign))
    assert result.exit_code == 1 and f"schema version {SCHEMA_VERSION + 1}" in result.output
    assert open_cache().scan().records == []

    mixed = _bundle(tmp_path, [good, make_record(1).to_dict() | {"schema": 99}, {"pickle": "gASV"}, "x"])
    report = json.loads(run("import", str(mixed), "--json").stdout)
    assert (report["imported"], report["skipped_invalid"]) == (1, 3)
    assert any("schema version 99" in p for p in report["problems"])
    assert [r.key for r in open_cache().scan().records] == [make_record(0).key]


def test_import_never_replaces_a_present_record(tmp_path):
    mine = make_record(0, time_s=5e-3)
    open_cache().put(mine)
    theirs = TuningRecord(mine.key, config={"BLOCK_M": 128, "num_warps": 8}, time_s=1e-3)
    bundle = _bundle(tmp_path, [theirs.to_dict(), make_record(1).to_dict()])
    result = run("import", str(bundle))
    assert result.exit_code == 0 and "imported 1, already present 1" in result.stdout
    assert "kept the present fused_moe record" in result.stderr  # said, not silent
    reset_default_cache()
    assert open_cache().get(mine.key) == mine


def test_export_keeps_an_existing_file_unless_forced(tmp_path):
    from adaptc.cache.bundle import export_bundle
    from adaptc.errors import CacheError

    open_cache().put(make_record(0))
    target = tmp_path / "mine.json"
    target.write_text("the user's file")
    result = run("export", str(target))
    assert result.exit_code == 1 and "--force" in result.output and target.read_text() == "the user's file"
    with pytest.raises(CacheError, match="exists"):
        export_bundle(open_cache(), target)
    assert target.read_text() == "the user's file" and not list(tmp_path.glob(".mine.json.*"))
    assert run("export", str(target), "--force").exit_code == 0
    assert len(json.loads(target.read_text())["records"]) == 1
    assert run("export", str(tmp_path / "x.json"), "--device", "tpu").exit_code == 1  # an error, not a traceback


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
    from adaptc.kernels._registry import clear_configs
    clear_configs()
    assert run("import", str(bundle)).exit_code == 0
    second = adaptc.report(adaptc.compile(model, example_inputs=(ids,), tune_trials=3))["tuning"]
    assert second["measured"] == 0 and second["cache_hits"] == len(first["kernels"])


def test_export_never_writes_over_a_database_even_with_force(tmp_path, monkeypatch):
    open_cache().put(make_record(0))
    db = tmp_path / "adaptc-cache" / "tuning.db"  # the per-test local cache (tests/conftest.py)
    before = db.read_bytes()
    for target in (db, tmp_path / "adaptc-cache" / "tuning.db-wal"):
        result = run("export", str(target), "--force")
        assert result.exit_code == 1 and "refusing to export onto" in result.output and "Traceback" not in result.output
    monkeypatch.chdir(db.parent)  # a relative path or a symlink names the same file
    (tmp_path / "link.db").symlink_to(db)
    for target in ("tuning.db", str(tmp_path / "link.db")):
        assert "the tuning cache's database" in run("export", target, "--force").output
    shared = tmp_path / "shared.db"
    open_cache(f"sqlite:///{shared}").put(make_record(1))
    assert "the tuning cache's database" in run("export", str(shared), "--force", "--url", f"sqlite:///{shared}").output
    other = run("export", str(shared), "--force")  # any SQLite database, not only the cache's own
    assert other.exit_code == 1 and "is an SQLite database" in other.output
    assert db.read_bytes()[:16] == before[:16] == b"SQLite format 3\x00"
    reset_default_cache()
    assert [r.key for r in open_cache().scan().records] == [make_record(0).key]
    assert [r.key for r in open_cache(f"sqlite:///{shared}").scan().records] == [make_record(1).key]


@pytest.mark.parametrize("where", ["--url", "env"])
@pytest.mark.parametrize("bad", ["garbage", "tuning.db", "redis://u:secret@h:notaport/0", "redis://u:secret@[::1/0",
                                 "postgresql://u:secret@h:99999/db"])
def test_a_bad_url_is_a_one_line_error(bad, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    args, env = (["--url", bad], None) if where == "--url" else ([], {"ADAPTC_CACHE_URL": bad})
    for command in (["stats"], ["list"], ["clear", "--yes"]):
        result = run(*command, *args, env=env)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert "tuning cache URL" in result.output and "secret" not in result.output
    assert sorted(tmp_path.iterdir()) == before  # no SQLite file named after the typo


def test_a_password_in_the_query_string_is_never_printed(dead_url):
    url = dead_url("postgresql").replace("adaptc:secret@", "adaptc@") + "?password=secret&sslmode=disable"
    result = run("stats", "--url", url)
    assert result.exit_code == 1 and "password=***" in result.output and "secret" not in result.output


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
def test_clear_and_import_fail_before_changing_anything_when_the_shared_cache_is_down(scheme, dead_url, tmp_path):
    mine = make_record(0)
    open_cache().put(mine)
    bundle = _bundle(tmp_path, [make_record(1).to_dict()])
    env = {"ADAPTC_CACHE_URL": dead_url(scheme)}
    for command in (["clear", "--yes"], ["import", str(bundle)], ["export", str(tmp_path / "out.json")]):
        result = run(*command, env=env)
        assert result.exit_code == 1 and "nothing was changed" in result.stderr, (command, result.output)
        assert "secret" not in result.output
    assert not (tmp_path / "out.json").exists()
    reset_default_cache()
    assert [r.key for r in open_cache(url="").scan().records] == [mine.key]  # nothing removed, nothing added
    local_only = run("clear", "--yes", "--local-only", env=env)  # the shared cache is not needed for this
    assert local_only.exit_code == 0 and "removed 1 from local" in local_only.stdout


def test_import_of_only_invalid_records_fails(tmp_path):
    bundle = _bundle(tmp_path, [{"pickle": "gASV"}, make_record(1).to_dict() | {"schema": 99}])
    text, as_json = run("import", str(bundle)), run("import", str(bundle), "--json")
    for result in (text, as_json):
        assert result.exit_code == 1 and "no valid records" in result.stderr and "all 2 were skipped" in result.stderr
    assert "skipped invalid 2" in text.stdout and json.loads(as_json.stdout)["skipped_invalid"] == 2
    assert run("import", str(_bundle(tmp_path, []))).exit_code == 0  # an empty bundle is not an error
    valid = _bundle(tmp_path, [make_record(0).to_dict()])
    assert run("import", str(valid)).exit_code == 0
    assert run("import", str(valid)).exit_code == 0  # already present is not a failure either


def test_a_kernel_filter_without_a_slash_matches_every_implementation(tmp_path):
    cache = open_cache()
    for i, kernel in enumerate(["fused_moe/cpu", "fused_moe/triton", "fused_moe_x/cpu", "attention/cpu"]):
        cache.put(make_record(i, kernel=kernel))

    def kernels(*args):
        return sorted(r["key"]["kernel"] for r in json.loads(run("list", "--json", *args).stdout)["records"])
    assert kernels("--kernel", "fused_moe") == ["fused_moe/cpu", "fused_moe/triton"]
    assert kernels("--kernel", "fused_moe/cpu") == ["fused_moe/cpu"]
    assert kernels("--kernel", "fused") == []
    bundle = tmp_path / "moe.json"
    assert run("export", str(bundle), "--kernel", "fused_moe").exit_code == 0
    assert len(json.loads(bundle.read_text())["records"]) == 2


def test_dash_means_stdout_and_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_cache().put(make_record(0))
    exported = run("export", "-")
    assert exported.exit_code == 0 and not (tmp_path / "-").exists()
    assert len(json.loads(exported.stdout)["records"]) == 1  # stdout is the bundle alone
    assert "exported 1 records to <stdout>" in exported.stderr
    assert json.loads(run("export", "-", "--json").stdout)["records"]

    other = f"sqlite:///{tmp_path / 'other.db'}"
    imported = run("import", "-", "--url", other, input=exported.stdout)
    assert imported.exit_code == 0 and "imported 1" in imported.stdout and "<stdin>" in imported.stdout
    assert [r.key for r in open_cache(other).scan().records] == [make_record(0).key]
    bad = run("import", "-", input="{not json")
    assert bad.exit_code == 1 and "<stdin> is not a JSON tuning bundle" in bad.output
