"""Tune one kernel implementation for one problem: the cache first, then a measured search.

The search is one Optuna study per (kernel, implementation, problem, device). Configs the cost model
ranks best are enqueued first; a sampler (TPE by default) explores after. Every candidate's output is
checked against the kernel's reference before it is timed: a wrong or crashing config is recorded as
such and never chosen. Ties break on the config's JSON, so the same trials always give the same pick.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from ..cache import RecordKey, Trial, TuningCache, TuningRecord
from ..cache.record import redact_url
from ..errors import StorageError
from ..kernels._registry import KERNELS, ConfigSpace, kernel_sources, set_config
from .device import device_fingerprint
from .timing import median_seconds

STRATEGIES = ("model+tpe", "tpe", "random", "exhaustive")
PRUNE_MIN_PROBLEMS = 8  # a cost model trained on fewer problems orders the search but prunes nothing
STORAGE_SCHEMES = ("postgresql", "postgres", "redis", "rediss", "unix", "sqlite")
CLAIM_LEASE_S = 60.0  # a claim on a config not renewed for this long belongs to a worker that died
STUCK_AFTER = 3  # sampler proposals in a row that measure nothing before the search picks a config itself


@dataclass(frozen=True)
class Budget:
    trials: int = 12             # measurements, at most
    seconds: float = 20.0        # wall time of the search, at most
    seconds_per_trial: float = 0.05  # CPU timer budget per candidate (GPU: do_bench's own)


@dataclass
class Outcome:
    kernel: str
    implementation: str
    problem: dict[str, Any]
    config: dict[str, Any]
    source: str                  # "cache" | "measured" | "default" (every candidate failed)
    measured: int = 0
    time_s: float | None = None
    trials: list[Trial] = field(default_factory=list)


class Measure(Protocol):
    def __call__(self, config: dict[str, Any]) -> Trial: ...


def canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _source(path: Path) -> bytes:  # the one place kernel source is read (a test edits what it returns)
    return path.read_bytes()


@functools.cache
def implementation_hash(kernel: str) -> str:
    """A hash of every source file the kernel's code comes from (`kernel_sources`), each under its
    module name: editing any of them invalidates what was tuned for it, on every machine."""
    from .. import kernels  # noqa: F401  (registers them)

    digest = hashlib.sha256()
    for module, path in kernel_sources(KERNELS[kernel]):
        digest.update(module.encode() + b"\0" + _source(path) + b"\0")
    return digest.hexdigest()[:16]


def key_for(kernel: str, impl: str, problem: dict[str, Any], device: Any) -> RecordKey:
    """The cache key of a tuned config: kernel source, problem bucket, device and versions."""
    return RecordKey.for_device(f"{kernel}/{impl}", implementation_hash(kernel), problem, problem.get("dtype", "-"),
                                device_fingerprint(device))


def record_key(kernel: str, impl: str, args: tuple) -> RecordKey:
    return key_for(kernel, impl, KERNELS[kernel].problem(*args), args[0].device)


def live_measure(kernel: str, impl: str, args: tuple, budget: Budget) -> Measure:
    """Run a config, check it against the reference, and time it on the arguments' device."""
    check, run = checked_runner(kernel, impl, args)
    device = args[0].device.type

    @torch.no_grad()
    def measure(config: dict[str, Any]) -> Trial:
        failed = check(config)
        if failed is not None:
            return failed
        return Trial(config, median_seconds(lambda: run(config), device, seconds=budget.seconds_per_trial,
                                            min_runs=3, warmup=1))

    return measure


def checked_runner(kernel: str, impl: str, args: tuple) -> tuple[Callable[[dict[str, Any]], Trial | None],
                                                                 Callable[[dict[str, Any]], Any]]:
    """(check, run) for `kernel`/`impl` on `args`: check(config) runs it once against the reference and
    returns a failed Trial (crashed, wrong) or None; run(config) runs it, for timing under no_grad
    (entered once around the timer, not on each timed call).

    Without autograd: the arguments a trace caught are often the model's Parameters, and a kernel's
    in-place ops on views of them build graphs that hold every intermediate (240 MB a call at 2048
    tokens of a Mixtral block, until the OOM killer came)."""
    k = KERNELS[kernel]
    fn = k.implementations[impl].fn
    with torch.no_grad():
        want = k.reference(*args)
    tol = k.tolerance(args[0].dtype)
    cuda = args[0].device.type == "cuda"

    @torch.no_grad()
    def check(config: dict[str, Any]) -> Trial | None:
        try:
            got = fn(*args, config=config)
            if cuda:
                torch.cuda.synchronize()
        except Exception:  # a config that cannot run (too much shared memory, a compile error, ...)
            return Trial(config, None, "crashed")
        return None if k.matches(got, want, tol) else Trial(config, None, "wrong")

    return check, lambda config: fn(*args, config=config)


def search(space: ConfigSpace, candidates: list[dict[str, Any]], measure: Measure, budget: Budget, *,
           strategy: str = "model+tpe", ranked: list[dict[str, Any]] | None = None, seed: int = 0,
           storage: Any = None, study_name: str | None = None,
           on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Measure up to `budget.trials` of `candidates`; return every trial, in the order run.

    `ranked` (the cost model's order, best first) seeds model+tpe; `storage`/`study_name` share one
    Optuna study between workers (processes or machines): a config any worker measured is not
    measured again.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    valid = {canonical(c): c for c in candidates}
    if storage is None and strategy == "random":
        pool = list(valid.values())
        random.Random(seed).shuffle(pool)
        return _run_list(pool[:budget.trials], measure, budget, on_trial)
    # A space the budget covers needs no sampler: measure it in the model's order.
    if storage is None and (strategy == "exhaustive" or (strategy == "model+tpe" and len(valid) <= budget.trials)):
        order = ranked or candidates
        return _run_list([c for c in order if canonical(c) in valid][:budget.trials], measure, budget, on_trial)
    return _optuna_search(space, valid, measure, budget, ranked if strategy == "model+tpe" else None,
                          seed, storage, study_name, on_trial)


def _run_list(configs: list[dict[str, Any]], measure: Measure, budget: Budget,
              on_trial: Callable[[Trial], None] | None) -> list[Trial]:
    trials, deadline = [], time.monotonic() + budget.seconds
    for config in configs:
        if trials and time.monotonic() > deadline:
            break
        trials.append(measure(config))
        if on_trial:
            on_trial(trials[-1])
    return trials


def _optuna_search(space: ConfigSpace, valid: dict[str, dict[str, Any]], measure: Measure, budget: Budget,
                   ranked: list[dict[str, Any]] | None, seed: int, storage: Any, study_name: str | None,
                   on_trial: Callable[[Trial], None] | None) -> list[Trial]:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Workers sharing a study must not all sample the same sequence: only a private study is seeded.
    sampler = optuna.samplers.TPESampler(seed=seed if storage is None else None)
    study = optuna.create_study(direction="minimize", sampler=sampler,
                                storage=storage, study_name=study_name, load_if_exists=storage is not None)
    # Value per config measured so far (None: it failed), by any worker sharing this study.
    done = {canonical(t.params): (t.value if t.state == TrialState.COMPLETE else None)
            for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)}
    seeds = [c for c in (ranked or []) if canonical(c) in valid and canonical(c) not in done]
    for config in seeds[:max(1, budget.trials // 2)]:
        study.enqueue_trial(config, skip_if_exists=True)
    trials: list[Trial] = []
    deadline = time.monotonic() + budget.seconds
    # A sampler can get stuck proposing what measures nothing: configs the space's constraints prune
    # (most of the knob product, in a constrained space) or configs with a result already (all it
    # favours, once an earlier worker on a shared study measured them). After STUCK_AFTER such
    # proposals in a row the search takes the next config without a result itself: the model's order
    # first, then a seeded shuffle.
    fallback = [*(ranked or []), *random.Random(seed).sample(list(valid.values()), len(valid))]
    asks = repeats = 0
    while len(trials) < budget.trials and asks < 20 * budget.trials and not (trials and time.monotonic() > deadline):
        if all(key in done for key in valid):  # nothing left to learn
            break
        if repeats >= STUCK_AFTER:
            fallback = [c for c in fallback if canonical(c) in valid and canonical(c) not in done]
            if fallback:  # else the rest is being measured by other workers right now
                study.enqueue_trial(fallback.pop(0))
            repeats = 0
        asks, repeats = asks + 1, repeats + 1
        trial = study.ask()
        config = {name: trial.suggest_categorical(name, list(values)) for name, values in space.knobs.items()}
        key = canonical(config)
        if key not in valid:  # pruned by the space's constraint: costs no measurement
            study.tell(trial, state=TrialState.PRUNED)
            continue
        if key not in done and storage is not None:
            state = _shared_state(study, trial, config)
            if state == "running":  # another worker is measuring it right now
                study.tell(trial, state=TrialState.PRUNED)
                continue
            if state is not None:
                done[key] = state[0]
        if key not in done:
            repeats = 0
            try:
                with _holding(trial) if storage is not None else contextlib.nullcontext():
                    result = measure(config)
            except BaseException:  # Ctrl-C, say: free the claim, or no worker would measure this config
                if storage is not None:
                    study.tell(trial, state=TrialState.PRUNED)
                raise
            trial.set_user_attr("measured", True)
            trials.append(result)
            if on_trial:
                on_trial(result)
            done[key] = result.time_s if result.status == "ok" else None
        # A config measured before (here or by another worker) is told again, never re-run.
        if done[key] is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, done[key])
    return trials


def _shared_state(study: Any, trial: Any, config: dict[str, Any]) -> tuple[float | None] | str | None:
    """Claim `config` for this worker: (value,) when some worker finished it (None if it failed),
    "running" when another worker holds a claim on it, None when this worker should measure it.

    Claims are marks on the trial: set ours first, then read every other trial of this config in one
    snapshot. Two workers racing for one config cannot both miss each other's mark, and a worker that
    finished in between shows up as finished, not as gone, so at most one measures it (at worst
    neither does, and it is sampled again later). A claim is a time, renewed while its worker measures
    (`_holding`): one older than CLAIM_LEASE_S is a dead worker's, and the config is free again."""
    from optuna.trial import TrialState

    trial.set_user_attr("claimed", time.time())
    others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING))
              if t.number != trial.number and t.params == config]
    for other in others:
        if other.state != TrialState.RUNNING:
            return (other.value if other.state == TrialState.COMPLETE else None,)
    now = time.time()
    if any(now - float(t.user_attrs.get("claimed", 0)) < CLAIM_LEASE_S for t in others):
        return "running"
    return None


@contextlib.contextmanager
def _holding(trial: Any) -> Iterator[None]:
    """Renew this worker's claim on `trial` while the block runs (a measurement can outlast the lease)."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(CLAIM_LEASE_S / 4):
            trial.set_user_attr("claimed", time.time())

    renewer = threading.Thread(target=renew, name="adaptc-claim", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def optuna_storage(url: str | None) -> Any:
    """An Optuna storage that workers share: postgresql://… (RDB), redis://… (journal) or sqlite:///…
    (processes of one machine); StorageError, naming the URL without its password, when it cannot be
    opened or reached."""
    if url is None:
        return None
    given, scheme = url, url.partition("://")[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise StorageError(f"unknown study storage URL {redact_url(url)!r}: expected postgresql://…, redis://… "
                           "or sqlite:///…")
    try:
        if scheme in ("redis", "rediss", "unix"):
            import redis
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalRedisBackend

            redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5).ping()  # fail here, not mid-study
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" since Optuna 3.1; the API we use is stable
                return JournalStorage(JournalRedisBackend(url))
        if scheme in ("postgresql", "postgres"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, which the cache uses too
        return _rdb_storage(url)
    except Exception as e:  # a dead server, a wrong password, a missing database
        first = str(e).splitlines()[0] if str(e) else ""
        raise StorageError(f"cannot open the study storage {redact_url(given)}: {type(e).__name__}: {first}") \
            from None


def _rdb_storage(url: str, attempts: int = 5) -> Any:
    # Workers starting together race to create Optuna's tables; the losers see them on a retry.
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    for attempt in range(attempts):
        try:
            return RDBStorage(url)
        except sqlalchemy.exc.IntegrityError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def study_trials(storage: Any, study_name: str) -> list[Trial]:
    """Every finished trial of a shared study, whichever worker ran it."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=storage)
    return [Trial(t.params, t.value if t.state == TrialState.COMPLETE else None,
                  "ok" if t.state == TrialState.COMPLETE else "crashed")
            for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]


def measure_order(default: dict[str, Any], ranked: list[dict[str, Any]], trusted: bool) -> list[dict[str, Any]]:
    """What to measure first: the cost model's pick, then the hand-written default (a safety net
    should the model be wrong), then the model's order. Without a model, the default leads."""
    rest = [c for c in ranked if c != default]
    return [rest[0], default, *rest[1:]] if trusted and rest else [default, *rest]


def model_plan(model: Any, kernel: str, impl: str, problem: dict[str, Any], default: dict[str, Any],
               candidates: list[dict[str, Any]], budget: Budget) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cost model's part in a search: the order to measure in (`measure_order`) and the configs
    the search may visit. A model trained on PRUNE_MIN_PROBLEMS problems or more prunes the half it
    ranks slowest, never below what the budget measures; the default, first or second, always stays."""
    if model is not None and (model.kernel, model.impl) != (kernel, impl):
        model = None  # another kernel's model knows nothing of this space
    ranked = measure_order(default, model.rank(kernel, impl, problem, candidates) if model else candidates,
                           trusted=model is not None)
    if model is None or model.problems < PRUNE_MIN_PROBLEMS:
        return ranked, candidates
    return ranked, ranked[:max(budget.trials, math.ceil(len(ranked) / 2))]


def best_trial(trials: list[Trial]) -> Trial | None:
    """The fastest correct trial; equal times break on the config, so the pick is reproducible."""
    ok = [t for t in trials if t.status == "ok"]
    return min(ok, key=lambda t: (t.time_s, canonical(dict(t.config)))) if ok else None


# Keys whose every candidate failed when this process measured them: tried here, not tried again.
_FAILED_HERE: set[str] = set()


def cached(cache: TuningCache, key: RecordKey) -> TuningRecord | None:
    """The cache's record for `key` if it settles the key: a tuned config, or a failure this process
    measured. A failure read from the cache (another machine's or another run's, a shared cache's
    crashed record with no time) is a reason to measure on this machine, not to stop tuning."""
    record = cache.get(key)
    return record if record is not None and (record.status == "ok" or key.digest in _FAILED_HERE) else None


def tune(kernel: str, impl: str, args: tuple, *, cache: TuningCache, budget: Budget = Budget(),
         strategy: str = "model+tpe", cost_model: Any = None, seed: int = 0, storage: Any = None,
         on_trial: Callable[[Trial], None] | None = None) -> Outcome:
    """The config to run `kernel`/`impl` with on these arguments, tuned or from the cache; installed."""
    k = KERNELS[kernel]
    space = k.implementations[impl].space
    key = record_key(kernel, impl, args)
    problem, device = dict(key.problem), args[0].device.type
    record = cached(cache, key)
    if record is not None and record.status == "ok" and not (space.contains(dict(record.config))
                                                             and space.fits(dict(record.config), *args)):
        warnings.warn(f"adaptc: ignoring the cached {kernel}/{impl} config {dict(record.config)}: it is not "
                      "in this kernel's config space; tuning again", stacklevel=2)
        record = None
    if record is not None:
        config = dict(record.config) if record.status == "ok" else space.default(*args)
        set_config(kernel, impl, problem, device, config)
        return Outcome(kernel, impl, problem, config, "cache", time_s=record.time_s)
    candidates, ranked = space.configs(*args), None
    if strategy == "model+tpe":
        ranked, candidates = model_plan(cost_model, kernel, impl, problem, space.default(*args), candidates, budget)
    trials = search(space, candidates, live_measure(kernel, impl, args, budget), budget, strategy=strategy,
                    ranked=ranked, seed=seed, storage=storage, study_name=key.digest, on_trial=on_trial)

    def study_best() -> Trial | None:  # with a shared study, the best of every worker's trials
        return best_trial(study_trials(storage, key.digest) if storage is not None else trials)

    best = study_best()
    while True:
        record = (TuningRecord(key, config={}, time_s=None, status="crashed", trials=trials) if best is None
                  else TuningRecord(key, config=dict(best.config), time_s=best.time_s, trials=trials))
        cache.put(record)
        # Another worker may have finished a better trial between our read and our write, and our write
        # buried its record: read again until the study stands still, so the last write is its best.
        latest = study_best()
        if latest == best:
            break
        best = latest
    if best is None:
        _FAILED_HERE.add(key.digest)
    config, source = (space.default(*args), "default") if best is None else (dict(best.config), "measured")
    set_config(kernel, impl, problem, device, config)
    return Outcome(kernel, impl, problem, config, source, len(trials), record.time_s, trials)
