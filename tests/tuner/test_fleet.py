"""Several workers tune one set of studies through a real shared Optuna storage (PostgreSQL, Redis).

Each worker is a separate `adaptc tune` process with its own local cache and the same shared tuning
cache; together they must measure no config twice, and the result must land in the shared cache.
"""
import json
import os
import subprocess
import sys

import pytest

from adaptc.cache import open_cache


def run_workers(storage: str, cache_url: str, tmp_path, workers: int = 2) -> list[dict]:
    cmd = [sys.executable, "-m", "adaptc.cli", "tune", "fused_moe", "--problem", "H=64,I=32,E=8,K=2",
           "--tokens", "24", "--trials", "5", "--strategy", "tpe", "--storage", storage, "--json"]
    procs = []
    for i in range(workers):
        env = {**os.environ, "ADAPTC_CACHE_DIR": str(tmp_path / f"worker{i}"), "ADAPTC_CACHE_URL": cache_url}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out))
    return outs


def study_params(storage):
    import optuna
    from optuna.trial import TrialState

    from adaptc.tuner.tune import optuna_storage

    (summary,) = optuna.get_all_study_summaries(optuna_storage(storage))
    study = optuna.load_study(study_name=summary.study_name, storage=optuna_storage(storage))
    return [json.dumps(t.params, sort_keys=True) for t in study.get_trials()
            if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.user_attrs.get("measured")]


def check(outs, storage, cache_url):
    measured = sum(o["results"][0]["measured"] for o in outs)
    params = study_params(storage)
    assert measured == len(params) and len(set(params)) == len(params), "a config was measured twice"
    # A worker that starts after the study is done finds the result in the shared cache instead.
    assert measured >= 5 and {o["results"][0]["source"] for o in outs} <= {"measured", "cache"}
    record = next(r for r in open_cache(cache_url).scan().records if r.key.kernel == "fused_moe/cpu")
    assert record.status == "ok" and json.dumps(dict(record.config), sort_keys=True) in params
    best = min(o["results"][0]["time_ms"] for o in outs)
    assert record.time_s * 1e3 == pytest.approx(best)  # the study's best, whichever worker found it


def test_two_workers_share_a_postgres_study(postgres_url, tmp_path):
    outs = run_workers(postgres_url, postgres_url, tmp_path)
    check(outs, postgres_url, postgres_url)


def test_two_workers_share_a_redis_journal(redis_url, tmp_path):
    outs = run_workers(redis_url, redis_url, tmp_path)
    check(outs, redis_url, redis_url)
