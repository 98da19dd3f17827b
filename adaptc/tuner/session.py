"""A compile's tuning: every kernel a compiled module calls gets a config measured on this device, or
one some machine measured before, from the tuning cache. `tune_calls` is what `adaptc.compile` runs;
`install_cache_source` (called by compile and load, never by importing this module) makes the cache
where kernels look up configs at run time."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ..kernels._registry import KERNELS, config_source, set_config_source, trace_calls
from .tune import Budget, Outcome, cached, key_for, record_key, tune


def tune_calls(run: Callable[[], Any], budget: Budget = Budget(), *, cache: Any = None, strategy: str = "model+tpe",
               seed: int = 0, storage: Any = None, progress: bool | None = None) -> dict[str, Any]:
    """Run `run()` once to see which kernel problems it calls, then tune each (cache first); `storage`
    shares each problem's study with other workers (`tune.optuna_storage`); `progress`: see adaptc.progress.

    Returns the report's `tuning` entry: {measured, cache_hits, kernels: [...]}.
    """
    from ..cache import default_cache
    from ..progress import Steps
    from .cost_model import NO_LIGHTGBM, CostModel, have_lightgbm
    from .device import device_fingerprint

    with trace_calls() as calls, torch.no_grad():
        run()
    cache = cache if cache is not None else default_cache()
    models: dict[tuple[str, str], Any] = {}
    outcomes: list[Outcome] = []
    tunable = [(k, i, a) for k, i, a in calls.values() if KERNELS[k].implementations[i].space is not None]
    learn = strategy == "model+tpe"
    with Steps("tuning kernels", len(tunable) * budget.trials, progress if tunable else False) as steps:
        for kernel, impl, args in tunable:
            steps.describe(f"tuning {kernel}/{impl}")
            # The model trains on the whole cache: only worth it when something must be measured.
            wanted = learn and (kernel, impl) not in models and cached(cache, record_key(kernel, impl, args)) is None
            if wanted and not have_lightgbm():  # said once, not once per kernel
                warnings.warn(f"adaptc: {NO_LIGHTGBM}", stacklevel=2)
                learn = False
            elif wanted:
                fp = device_fingerprint(args[0].device)
                try:
                    models[(kernel, impl)] = CostModel.train(kernel, impl, cache.scan().records, device=fp.id,
                                                             units=fp.units)
                except Exception as exc:  # the model only orders the search: never let it fail a compile
                    warnings.warn(f"adaptc: no cost model for {kernel}/{impl} ({type(exc).__name__}: {exc}); "
                                  "searching without it", stacklevel=2)
                    models[(kernel, impl)] = None
            outcome = tune(kernel, impl, args, cache=cache, budget=budget, strategy=strategy, seed=seed,
                           cost_model=models.get((kernel, impl)), storage=storage,
                           on_trial=lambda _: steps.advance())
            steps.advance(budget.trials - outcome.measured)
            outcomes.append(outcome)
        hits = sum(o.source == "cache" for o in outcomes)
        steps.done = (f"tuned {len(outcomes)} kernel problem(s): {sum(o.measured for o in outcomes)} measurements, "
                      f"{hits} from the cache")
    return {
        "measured": sum(o.measured for o in outcomes),
        "cache_hits": sum(o.source == "cache" for o in outcomes),
        "kernels": [{"kernel": o.kernel, "implementation": o.implementation, "problem": o.problem,
                     "config": o.config, "source": o.source, "measured": o.measured, "time_s": o.time_s}
                    for o in outcomes],
    }


def _from_cache(kernel: str, impl: str, problem: dict[str, Any], device_type: str) -> dict[str, Any] | None:
    """Config source for kernels at run time: a problem first seen after compile (another token
    count, or a module loaded in a new process) takes what the cache holds for it."""
    from ..cache import default_cache

    record = default_cache().get(key_for(kernel, impl, problem, device_type))
    if record is None or record.status != "ok":
        return None
    space = KERNELS[kernel].implementations[impl].space
    return dict(record.config) if space is not None and space.contains(dict(record.config)) else None


def install_cache_source() -> None:
    """Make the tuning cache the kernels' config source (idempotent: a second call keeps what the
    kernels memoised). adaptc.compile (when it tunes) and adaptc.load call it."""
    if config_source() is not _from_cache:
        set_config_source(_from_cache)
