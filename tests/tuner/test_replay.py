"""Replay tables: recorded on the CPU kernel, saved and loaded, searched offline; the committed table
still matches the kernel's config space."""
import json
import math
from pathlib import Path

import pytest
import torch

from adaptc.kernels._registry import KERNELS
from adaptc.kernels.moe import space
from adaptc.tuner.cost_model import CostModel
from adaptc.tuner.device import DeviceFingerprint
from adaptc.tuner.replay import (as_records, best_time, load_table, measurements_to_near_best, record_table,
                                 replay_measure)
from adaptc.tuner.tune import PRUNE_MIN_PROBLEMS, Budget, canonical, measure_order, model_plan, search, tune

COMMITTED = Path(__file__).parents[2] / "benchmarks" / "results" / "replay-fused_moe-cpu-amd-epyc.json"
MOE = KERNELS["fused_moe"]
CPU_SPACE = MOE.implementations["cpu"].space
PROBLEMS = [space.make_inputs(*dims, seed=i) for i, dims in enumerate([(1, 32, 32, 4, 2), (6, 32, 48, 1, 1)])]


@pytest.fixture(scope="module")
def table():
    return record_table("fused_moe", "cpu", PROBLEMS, Budget(seconds_per_trial=0.01), rounds=2)


def test_a_recorded_table_holds_every_config_of_each_problem(table, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    loaded = load_table(path)
    assert loaded == table and loaded["device"]["kind"] == "cpu"
    for entry, args in zip(loaded["problems"], PROBLEMS):
        assert entry["problem"] == MOE.problem(*args)
        assert [t["config"] for t in entry["trials"]] == CPU_SPACE.configs(*args)
        assert all(t["status"] == "ok" and t["time_s"] > 0 for t in entry["trials"])


def test_a_replayed_search_answers_from_the_table(table):
    entry = table["problems"][1]
    measure = replay_measure(entry)
    configs = [t["config"] for t in entry["trials"]]
    trials = search(CPU_SPACE, configs, measure, Budget(trials=len(configs)), strategy="exhaustive")
    assert [t.time_s for t in trials] == [t["time_s"] for t in entry["trials"]]
    assert min(t.time_s for t in trials) == best_time(entry) == as_records(table)[1].time_s
    tpe = search(CPU_SPACE, configs, measure, Budget(trials=6), strategy="tpe", seed=1)
    assert len(tpe) == 6 and len({canonical(dict(t.config)) for t in tpe}) == 6  # no config measured twice


def test_wrong_and_crashing_configs_are_recorded_untimed(faulty_kernel):
    recorded = record_table("test_scale", "cpu", [(torch.randn(16),)], Budget(seconds_per_trial=0.01), rounds=2)
    trials = recorded["problems"][0]["trials"]
    assert [t["config"] for t in trials] == faulty_kernel.configs(torch.randn(16))  # pruned configs never run
    for t in trials:
        timed = t["config"]["mode"] == "ok"
        assert t["status"] == {"ok": "ok", "wrong": "wrong", "crash": "crashed"}[t["config"]["mode"]]
        assert (t["time_s"] is not None and t["time_s"] > 0) if timed else t["time_s"] is None


def test_a_file_that_is_not_a_table_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "adaptc-replay", "version": 0}))
    with pytest.raises(ValueError, match="not an adaptc-replay table of version 1"):
        load_table(path)


def test_the_committed_cpu_table_matches_the_config_space():
    """Re-record the table (benchmarks/tuner.py --record) when this fails: the space changed."""
    table = load_table(COMMITTED)
    threads = torch.get_num_threads()
    torch.set_num_threads(table["device"]["cores"])  # the space's `workers` follow the thread count
    try:
        for entry in table["problems"]:
            args = MOE.example(entry["problem"], "cpu")
            assert [t["config"] for t in entry["trials"]] == CPU_SPACE.configs(*args), entry["problem"]
    finally:
        torch.set_num_threads(threads)


def test_the_cost_model_trained_on_the_committed_table_leads_the_search():
    """Held out in turn, three problems; the model's order finds a config within 5% of the best in
    fewer measurements than the space holds, on average (benchmarks/tuner.py measures how many)."""
    table = load_table(COMMITTED)
    records = as_records(table)
    units = DeviceFingerprint.from_dict(table["device"]).units
    fractions = []
    for i in (0, 7, 21):
        entry = table["problems"][i]
        args = MOE.example(entry["problem"], "cpu")
        configs = [t["config"] for t in entry["trials"]]
        model = CostModel.train("fused_moe", "cpu", records[:i] + records[i + 1:], units=units)
        order = measure_order(CPU_SPACE.default(*args), model.rank("fused_moe", "cpu", entry["problem"], configs), True)
        trials = search(CPU_SPACE, configs, replay_measure(entry), Budget(trials=len(configs)), ranked=order)
        fractions.append(measurements_to_near_best(trials, best_time(entry)) / len(configs))
    assert sum(fractions) / len(fractions) < 0.5


def test_a_cost_model_trained_on_enough_problems_prunes_what_compile_measures(tmp_path):
    """The slower half by the model's ranking is never measured; the default always may be."""
    from adaptc.cache import open_cache

    table = load_table(COMMITTED)
    records = as_records(table)
    units = DeviceFingerprint.from_dict(table["device"]).units
    entry = table["problems"][0]  # T=1: quick to run for real
    args = MOE.example(entry["problem"], "cpu")
    configs, default = CPU_SPACE.configs(*args), CPU_SPACE.default(*args)
    budget = Budget(trials=6, seconds_per_trial=0.002)
    model = CostModel.train("fused_moe", "cpu", records[1:], units=units)
    ranked, visit = model_plan(model, "fused_moe", "cpu", entry["problem"], default, configs, budget)
    assert model.problems == len(records) - 1 and len(visit) == math.ceil(len(configs) / 2)
    assert visit == ranked[:len(visit)] and default in visit[:2]
    outcome = tune("fused_moe", "cpu", args, cache=open_cache(None, tmp_path), budget=budget, cost_model=model)
    kept = {canonical(c) for c in visit}
    assert outcome.measured == budget.trials and all(canonical(dict(t.config)) in kept for t in outcome.trials)
    # A budget that covers the space prunes nothing; nor does a model trained on too few problems.
    assert model_plan(model, "fused_moe", "cpu", entry["problem"], default, configs, Budget(trials=len(configs)))[1] \
        == ranked
    few = CostModel.train("fused_moe", "cpu", records[1:PRUNE_MIN_PROBLEMS], units=units)
    assert model_plan(few, "fused_moe", "cpu", entry["problem"], default, configs, budget)[1] == configs
