"""A learned cost model: gradient-boosted trees that rank configs for a problem (LightGBM lambdarank).

Trained on every trial in the tuning cache for one kernel implementation: each record is a query
group, its trials the documents, and relevance grows with speed relative to that record's best
(failed configs get 0). Features are the config's knobs (categorical knobs by their index in the
space) and the problem's analytic features (FLOPs, bytes, rows per expert, ...), and what each config does to the
problem on this device (tiles, waves over its SMs or cores, padding: `Kernel.config_features`). One
model per device: what is fast differs between GPUs. It seeds the search and, once trained on enough
problems, prunes it; it never replaces measurement.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..cache import TuningRecord
from ..kernels._registry import KERNELS, ConfigSpace
from .tune import canonical

MIN_GROUPS = 2  # fewer tuned problems than this: no model, the search falls back to its default order
NO_LIGHTGBM = "lightgbm is not installed (pip install 'adaptc[costmodel]'); searching without the cost model"


def have_lightgbm() -> bool:
    """Whether a cost model can be trained here (LightGBM is optional: without it the search runs unranked)."""
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def _knob_value(space: ConfigSpace, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        choices = list(space.knobs[name])
        return float(choices.index(value)) if value in choices else -1.0
    return float(value)


def _relevance(time_s: float | None, best: float) -> int:
    """0-30: 30 for the best config, falling with log2 of the slowdown; 0 for failures."""
    if time_s is None:
        return 0
    return max(1, 30 - round(6 * math.log2(time_s / best)))


@dataclass
class CostModel:
    kernel: str
    impl: str
    booster: Any
    feature_names: list[str]
    units: int = 1  # the device's parallel units (SMs or cores) the config features are computed for
    problems: int = 0  # tuned problems it was trained on: how far to trust it (`tune.model_plan`)

    @property
    def space(self) -> ConfigSpace:
        return KERNELS[self.kernel].implementations[self.impl].space

    def features(self, problem: dict[str, Any], configs: Iterable[dict[str, Any]]) -> np.ndarray:
        return _features(self.kernel, self.impl, self.space, problem, configs, self.units)

    def scores(self, problem: dict[str, Any], configs: list[dict[str, Any]]) -> np.ndarray:
        return self.booster.predict(self.features(problem, configs))

    def rank(self, kernel: str, impl: str, problem: dict[str, Any], configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`configs`, predicted fastest first (ties by config, so the order is reproducible)."""
        if (kernel, impl) != (self.kernel, self.impl) or not configs:
            return list(configs)
        scores = self.scores(problem, configs)
        order = sorted(range(len(configs)), key=lambda i: (-scores[i], canonical(configs[i])))
        return [configs[i] for i in order]

    @classmethod
    def train(cls, kernel: str, impl: str, records: Iterable[TuningRecord], device: str | None = None,
              seed: int = 0, units: int = 1) -> "CostModel | None":
        """A model from the records of `kernel`/`impl` (on `device`, a fingerprint id, if given) with
        at least two trials; None when there are too few. `units`: the device's SMs or cores."""
        import lightgbm as lgb

        space = KERNELS[kernel].implementations[impl].space
        X, y, groups, unreadable = [], [], [], 0
        for record in records:
            if record.key.kernel != f"{kernel}/{impl}" or (device is not None and record.key.device != device):
                continue
            ok = [t.time_s for t in record.trials if t.status == "ok"]
            if len(record.trials) < 2 or not ok:
                continue
            best = min(ok)
            problem = dict(record.key.problem)
            try:
                X.append(_features(kernel, impl, space, problem, [dict(t.config) for t in record.trials], units))
            except (KeyError, TypeError, ValueError):  # e.g. an imported record whose problem lacks a size
                unreadable += 1
                continue
            sample = problem, dict(record.trials[0].config)  # for the feature names
            y += [_relevance(t.time_s, best) for t in record.trials]
            groups.append(len(record.trials))
        if unreadable:
            warnings.warn(f"adaptc: the {kernel}/{impl} cost model left out {unreadable} cached record(s) whose "
                          "problem or configs it cannot read", stacklevel=2)
        if len(groups) < MIN_GROUPS:
            return None
        params = {"objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 3,
                  "label_gain": list(range(31)), "seed": seed, "deterministic": True, "force_row_wise": True,
                  "num_threads": 1, "verbose": -1}
        data = lgb.Dataset(np.concatenate(X), np.asarray(y), group=groups)
        booster = lgb.train(params, data, num_boost_round=200)
        problem, config = sample
        names = ([f"knob.{k}" for k in space.knobs] + [f"log2(1+{k})" for k in sorted(KERNELS[kernel].features(problem))]
                 + [f"config.{k}" for k in sorted(_config_features(kernel, impl, problem, config, units))])
        return cls(kernel, impl, booster, names, units, len(groups))


def _config_features(kernel: str, impl: str, problem: dict[str, Any], config: dict[str, Any], units: int) -> dict[str, float]:
    fn = KERNELS[kernel].config_features
    return fn(impl, problem, config, units) if fn is not None else {}


def _features(kernel: str, impl: str, space: ConfigSpace, problem: dict[str, Any], configs: Iterable[dict[str, Any]],
              units: int = 1) -> np.ndarray:
    feats = KERNELS[kernel].features(problem)
    problem_row = [math.log2(1 + float(feats[k])) for k in sorted(feats)]
    rows = []
    for c in configs:
        per_config = _config_features(kernel, impl, problem, c, units)
        rows.append([_knob_value(space, k, c.get(k)) for k in space.knobs] + problem_row
                    + [float(per_config[k]) for k in sorted(per_config)])
    return np.asarray(rows, dtype=np.float64)


def evaluate(model: CostModel, held_out: Iterable[TuningRecord], k: int = 5) -> dict[str, float]:
    """Rank quality on records the model did not train on: Spearman rho, top-1 and top-k hit rates."""
    from scipy.stats import spearmanr

    rhos, top1, topk, n = [], 0, 0, 0
    for record in held_out:
        ok = [t for t in record.trials if t.status == "ok"]
        if len(ok) < k:
            continue
        configs = [dict(t.config) for t in ok]
        scores = model.scores(dict(record.key.problem), configs)
        times = np.asarray([t.time_s for t in ok])
        rhos.append(spearmanr(scores, -times).statistic)
        predicted = np.argsort(-scores)
        best = int(np.argmin(times))
        top1 += int(predicted[0] == best)
        topk += int(best in predicted[:k])
        n += 1
    if n == 0:
        return {"problems": 0}
    return {"problems": n, "spearman": float(np.mean(rhos)), "top1": top1 / n, f"top{k}": topk / n}
