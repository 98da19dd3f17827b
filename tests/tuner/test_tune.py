"""The tuner on real kernels (fused_moe's CPU implementation) and on a kernel with planted bad configs."""
import json
import time

import pytest
import torch

import adaptc
from adaptc.cache import open_cache
from adaptc.kernels._registry import KERNELS, ConfigSpace, Implementation, Kernel, config_for, register
from adaptc.kernels.moe import space
from adaptc.tuner.session import tune_calls
from adaptc.tuner.cost_model import CostModel, evaluate
from adaptc.tuner.tune import Budget, best_trial, search, tune
from adaptc.cache import Trial
from tests.moe_models import hf_causal_lm


@pytest.fixture
def cache():
    return open_cache()  # the per-test directory tests/conftest.py sets up


FAST = Budget(trials=16, seconds=20, seconds_per_trial=0.005)


def test_compile_measures_once_then_hits_the_cache(cache):
    model = hf_causal_lm("mixtral")
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    first = adaptc.report(adaptc.compile(model, example_inputs=(ids,), tune_trials=4))["tuning"]
    assert first["measured"] > 0 and first["cache_hits"] == 0
    assert {k["kernel"] for k in first["kernels"]} == {"fused_moe", "attention", "linear"}
    assert all(k["source"] == "measured" and k["config"] for k in first["kernels"])
    second = adaptc.report(adaptc.compile(model, example_inputs=(ids,), tune_trials=4))["tuning"]
    assert second["measured"] == 0 and second["cache_hits"] == len(first["kernels"])
    assert [k["config"] for k in second["kernels"]] == [k["config"] for k in first["kernels"]]
    off = adaptc.report(adaptc.compile(model, example_inputs=(ids,), tune=False))["tuning"]
    assert off["measured"] == 0 and off["cache_hits"] == 0


def test_tuned_config_is_what_the_kernel_runs(cache):
    args = space.make_inputs(24, 64, 32, 8, 2, seed=3)
    n = len(list(space.cpu_configs()))
    outcome = tune("fused_moe", "cpu", args, cache=cache, budget=Budget(trials=n, seconds=60, seconds_per_trial=0.005),
                   strategy="exhaustive")
    assert outcome.source == "measured" and outcome.measured == n
    assert config_for("fused_moe", "cpu", KERNELS["fused_moe"].problem(*args), "cpu", dict) == outcome.config
    # a new process would get it from the cache: same key, same config
    again = tune("fused_moe", "cpu", args, cache=open_cache(), budget=FAST)
    assert again.source == "cache" and again.config == outcome.config


@pytest.mark.parametrize("strategy", ["exhaustive", "random", "tpe", "model+tpe"])
def test_wrong_and_crashing_configs_are_recorded_never_chosen(cache, faulty_kernel, strategy):
    x = torch.randn(64)
    outcome = tune("test_scale", "cpu", (x,), cache=cache, budget=FAST, strategy=strategy)
    statuses = {t.config["mode"]: t.status for t in outcome.trials}
    assert outcome.config["mode"] == "ok" and outcome.config["unroll"] != 8  # pruned configs never run
    assert all(t.config["unroll"] != 8 for t in outcome.trials)
    assert statuses.get("wrong", "wrong") == "wrong" and statuses.get("crash", "crashed") == "crashed"
    record = cache.get(outcome_key(outcome, x))
    assert record is not None and json.loads(record.to_json())["trials"]


def outcome_key(outcome, x):
    from adaptc.tuner.tune import record_key

    return record_key(outcome.kernel, outcome.implementation, (x,))


def test_every_candidate_failing_is_recorded_and_the_default_used(cache, faulty_kernel, monkeypatch):
    monkeypatch.setitem(faulty_kernel.knobs, "mode", ("wrong", "crash"))
    outcome = tune("test_scale", "cpu", (torch.randn(8),), cache=cache, budget=FAST, strategy="exhaustive")
    assert outcome.source == "default" and outcome.config == {"mode": "ok", "unroll": 1}
    assert tune("test_scale", "cpu", (torch.randn(8),), cache=cache, budget=FAST).source == "cache"


def test_candidates_run_without_autograd(cache):
    # A trace hands the tuner the model's Parameters: a candidate that built autograd graphs on them
    # kept every intermediate alive (a Mixtral block at 2048 tokens grew 240 MB a call until OOM).
    grad_modes = []

    def scale(x, config=None):
        grad_modes.append(torch.is_grad_enabled())
        return x * 2

    register(Kernel("test_grad", lambda x: x * 2, {"cpu": Implementation(scale, space=ConfigSpace({"unroll": (1, 2)}, lambda *a: {"unroll": 1}))},
                    problem=lambda x: {"n": x.numel(), "dtype": "float32"}))
    try:
        tune("test_grad", "cpu", (torch.nn.Parameter(torch.randn(16)),), cache=cache, budget=FAST, strategy="exhaustive")
    finally:
        KERNELS.pop("test_grad")
    assert grad_modes and not any(grad_modes)


def test_ties_break_deterministically():
    a, b = Trial({"x": 2}, 1.0), Trial({"x": 1}, 1.0)
    assert best_trial([a, b]) is b and best_trial([b, a]) is b


def test_search_shares_a_study_and_never_reruns_a_config(tmp_path, faulty_kernel):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    seen = []

    def measure(config):
        seen.append(json.dumps(config, sort_keys=True))
        return Trial(config, 1.0 + config["unroll"] / 10 if config["mode"] == "ok" else None,
                     "ok" if config["mode"] == "ok" else "wrong")

    configs = faulty_kernel.configs(torch.randn(4))
    budget = Budget(trials=5, seconds=20)
    measured = []
    for worker in range(3):  # three workers in turn on one study (9 configs in all): none measured twice
        trials = search(faulty_kernel, configs, measure, budget, strategy="tpe", seed=worker, storage=storage,
                        study_name="s")
        measured.append(len(trials))
    # A later worker measures what is left, though the sampler favours configs measured already.
    assert len(seen) == len(set(seen)) == len(configs) and measured == [5, 4, 0]


@pytest.mark.parametrize("storage", [None, "sqlite"])
def test_a_sampler_in_a_tightly_constrained_space_still_measures_its_budget(storage, tmp_path):
    # 10 of 1000 knob combinations can run: TPE alone proposes almost only pruned ones.
    tight = ConfigSpace({k: tuple(range(10)) for k in "abc"}, lambda *a: {"a": 0, "b": 0, "c": 0},
                        lambda c, *a: c["a"] == c["b"] == c["c"])
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage else None
    for seed in range(3):
        trials = search(tight, tight.configs(), lambda c: Trial(c, 1.0 + c["a"]), Budget(trials=4), strategy="tpe",
                        seed=seed, storage=url, study_name=f"s{seed}")
        assert len(trials) == 4 and all(t.config["a"] == t.config["b"] == t.config["c"] for t in trials)


def _claim(storage, faulty_kernel, config, claimed_at):
    """A RUNNING trial of `config` in study "s" with a claim made at `claimed_at`: another worker's."""
    import optuna

    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    study.enqueue_trial(config)
    trial = study.ask()
    assert {k: trial.suggest_categorical(k, list(v)) for k, v in faulty_kernel.knobs.items()} == config
    trial.set_user_attr("claimed", claimed_at)


def test_a_dead_workers_claim_expires_a_live_ones_holds(tmp_path, faulty_kernel):
    from adaptc.tuner.tune import CLAIM_LEASE_S

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    dead, alive = {"mode": "ok", "unroll": 1}, {"mode": "ok", "unroll": 2}
    _claim(storage, faulty_kernel, dead, time.time() - 2 * CLAIM_LEASE_S)  # killed mid-measurement
    _claim(storage, faulty_kernel, alive, time.time())                      # measuring right now
    configs = faulty_kernel.configs(torch.randn(4))
    seen = [dict(t.config) for t in search(faulty_kernel, configs, lambda c: Trial(c, 1.0), Budget(trials=9),
                                           strategy="tpe", storage=storage, study_name="s")]
    assert dead in seen and alive not in seen and len(seen) == len(configs) - 1


def test_an_interrupted_worker_frees_its_claim_and_renews_it_while_measuring(tmp_path, faulty_kernel, monkeypatch):
    import optuna

    from adaptc.tuner import tune as tune_module

    monkeypatch.setattr(tune_module, "CLAIM_LEASE_S", 0.2)  # renewed every 0.05 s
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    configs = faulty_kernel.configs(torch.randn(4))
    renewed = []

    def interrupted(config):
        start = time.time()
        time.sleep(0.3)  # longer than the lease: only renewal keeps the claim alive
        (trial,) = optuna.load_study(study_name="s", storage=storage).get_trials(
            states=(optuna.trial.TrialState.RUNNING,))
        renewed.append(trial.user_attrs["claimed"] > start + 0.1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(faulty_kernel, configs, interrupted, Budget(trials=9), strategy="tpe", storage=storage, study_name="s")
    monkeypatch.setattr(tune_module, "CLAIM_LEASE_S", 3600.0)  # no claim expires now: only freed ones are
    seen = search(faulty_kernel, configs, lambda c: Trial(c, 1.0), Budget(trials=9), strategy="tpe",
                  storage=storage, study_name="s")
    assert renewed == [True] and len(seen) == len(configs)  # the interrupted config included


def test_shared_cache_ends_with_the_study_best_when_a_worker_finishes_mid_write(cache, faulty_kernel, tmp_path):
    # Another worker finishes a faster trial between this worker's read of the study and its write:
    # the write must not bury that result (CI once caught two `adaptc tune` processes doing this).
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    x = torch.randn(64)
    faster = {"mode": "ok", "unroll": 4}
    puts = []

    class RacingCache:
        def get(self, key):
            return cache.get(key)

        def put(self, record):
            if not puts:  # "the other worker" completes its trial as our first write lands
                study = optuna.load_study(study_name=record.key.digest, storage=storage)
                study.add_trial(optuna.trial.create_trial(params=faster, value=1e-9, distributions={
                    k: optuna.distributions.CategoricalDistribution(list(v)) for k, v in faulty_kernel.knobs.items()}))
            puts.append(record)
            cache.put(record)

    outcome = tune("test_scale", "cpu", (x,), cache=RacingCache(), budget=Budget(trials=3, seconds=20),
                   strategy="tpe", storage=storage)
    assert len(puts) == 2 and puts[0].time_s != 1e-9  # the first write missed it (ok or all failed)
    assert dict(cache.get(outcome_key(outcome, x)).config) == outcome.config == faster
    assert outcome.time_s == 1e-9


def test_cost_model_learns_a_ranking_from_records(cache):
    # Records from the CPU kernel on several problems, then held-out evaluation.
    problems = [(T, 64, 32, 8, 2) for T in (4, 16, 48, 96)] + [(T, 32, 64, 8, 2) for T in (8, 32)]
    for i, dims in enumerate(problems):
        tune("fused_moe", "cpu", space.make_inputs(*dims, seed=i), cache=cache, budget=FAST, strategy="exhaustive")
    records = cache.scan().records
    model = CostModel.train("fused_moe", "cpu", records[:-2])
    assert model is not None
    quality = evaluate(model, records[-2:])
    assert quality["problems"] == 2 and -1.0 <= quality["spearman"] <= 1.0
    configs = list(space.cpu_configs())
    ranked = model.rank("fused_moe", "cpu", dict(records[-1].key.problem), configs)
    assert sorted(map(str, ranked)) == sorted(map(str, configs))
    assert CostModel.train("fused_moe", "cpu", records[:1]) is None  # too few problems: no model
    # a cache shared by several kernels: the other kernel's records (last here) are not this model's
    from adaptc.kernels.attention.space import make_inputs as attention_inputs

    tune("attention", "cpu", attention_inputs(1, 2, 2, 16, 16, 16), cache=cache, budget=FAST, strategy="exhaustive")
    everything = cache.scan().records
    mixed = CostModel.train("fused_moe", "cpu", sorted(everything, key=lambda r: r.key.kernel != "fused_moe/cpu"), units=2)
    assert mixed is not None and any(n.startswith("config.") for n in mixed.feature_names)
    # An imported record whose problem lacks sizes is left out with a warning, never a crash.
    import dataclasses

    poisoned = dataclasses.replace(records[0], key=dataclasses.replace(records[0].key, problem=(("T", "abc"),)))
    with pytest.warns(UserWarning, match="left out 1 cached record"):
        assert CostModel.train("fused_moe", "cpu", [poisoned, *records]).problems == len(records)


def test_tune_calls_reports_problems(cache):
    args = space.make_inputs(10, 32, 32, 4, 2, seed=1)
    result = tune_calls(lambda: torch.ops.adaptc.fused_moe(*args), FAST)
    assert result["measured"] > 0 and result["kernels"][0]["problem"]["T"] == 16


def test_a_cached_config_outside_the_space_is_never_run(cache):
    from adaptc.cache import TuningRecord
    from adaptc.tuner.tune import record_key

    args = space.make_inputs(12, 32, 32, 4, 2, seed=2)
    key = record_key("fused_moe", "cpu", args)
    cache.put(TuningRecord(key, config={"algorithm": "loop", "layout": "diagonal", "combine": "pair_sum", "row_pad": 1},
                           time_s=1e-6))
    from adaptc.tuner.session import install_cache_source

    install_cache_source()  # what compile and load do: run-time configs come from the cache
    from adaptc.kernels._registry import clear_configs
    clear_configs()
    # at run time the kernel falls back to its default instead of running the foreign config
    torch.testing.assert_close(torch.ops.adaptc.fused_moe(*args), KERNELS["fused_moe"].reference(*args))
    with pytest.warns(UserWarning, match="not in this kernel's config space"):
        outcome = tune("fused_moe", "cpu", args, cache=cache, budget=FAST)
    assert outcome.source == "measured" and outcome.config["layout"] in ("wx", "xw")


def _crashed_elsewhere(key):
    from adaptc.cache import TuningRecord

    # What a machine whose every candidate failed (or a bad actor) leaves in a shared cache.
    return TuningRecord(key, config={}, time_s=None, status="crashed", host="another-machine")


def test_a_crashed_record_in_the_cache_is_measured_again_here(cache):
    from adaptc.tuner.tune import record_key

    args = space.make_inputs(10, 32, 32, 4, 2, seed=5)
    key = record_key("fused_moe", "cpu", args)
    cache.put(_crashed_elsewhere(key))
    result = tune_calls(lambda: torch.ops.adaptc.fused_moe(*args), FAST, cache=open_cache())
    [entry] = result["kernels"]
    assert entry["source"] == "measured" and entry["measured"] > 0 and entry["time_s"] is not None
    assert result["cache_hits"] == 0
    record = open_cache().get(key)  # the measurement replaced the crashed record
    assert record.status == "ok" and dict(record.config) == entry["config"]


def test_a_crashed_record_in_a_shared_redis_cache_is_measured_again_here(redis_url, tmp_path):
    from adaptc.tuner.tune import record_key

    args = space.make_inputs(10, 32, 32, 4, 2, seed=6)
    key = record_key("fused_moe", "cpu", args)
    shared = open_cache(redis_url, tmp_path / "a")
    shared.shared.put(_crashed_elsewhere(key))
    outcome = tune("fused_moe", "cpu", args, cache=open_cache(redis_url, tmp_path / "b"), budget=FAST)
    assert outcome.source == "measured" and outcome.measured > 0
    record = shared.shared.get(key)  # what every other machine now reads
    assert record.status == "ok" and dict(record.config) == outcome.config
