"""Exit thresholds with a distribution-free guarantee: Learn-then-Test (Angelopoulos et al., 2021).

A sample leaves at the first exit whose confidence reaches that exit's threshold; its loss there is
1 - agreement with the full model (the full model's own loss is 0). We want the mean loss (the risk)
to be at most alpha = 1 - quality, with probability >= 1 - delta over the calibration draw.

Procedure, as the LTT paper recommends when the ordering is learned:
1. The calibration rows are split once (seeded permutation). The *shaping* part builds a family of
   threshold settings ordered from most conservative to least: for a level lam, each exit in turn takes
   the most samples (highest confidence first, among those that reached it) whose mean loss there is
   <= lam. Levels lie on a fixed geometric grid independent of `quality`, so a stricter target tests the
   same family (which makes the chosen cost monotone in `quality`).
2. On the *testing* part, each setting's null hypothesis "risk > alpha" gets a Hoeffding-Bentkus
   p-value; fixed-sequence testing rejects in order at level delta and stops at the first failure, so
   the family-wise error is <= delta and every rejected setting is certified simultaneously.
3. Among certified settings, the one with the lowest expected cost wins (ties: the more conservative).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

METHOD = "Learn-then-Test (fixed-sequence testing, Hoeffding-Bentkus p-values)"
_LEVEL_MIN, _LEVEL_MAX = 1e-4, 0.5  # the family's risk levels (plus 0), geometric in between


@dataclass
class ExitCalibration:
    thresholds: list[float]      # one per exit; math.inf = never leave there
    method: str
    quality: float
    delta: float
    guarantee: str
    agreement: float             # on all calibration rows, with these thresholds
    exit_histogram: list[int]    # length E+1: rows leaving at each exit, last = ran the full model
    expected_cost: float         # mean cost fraction vs the full model
    feasible: bool               # False: nothing but "never exit" is certified
    reason: str
    details: dict[str, Any] = field(default_factory=dict)  # sample sizes, p-value, how many certified

    def to_dict(self) -> dict:
        """JSON-ready: an infinite threshold (never exit there) is written as None."""
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExitCalibration":
        d = dict(d)
        d["thresholds"] = [math.inf if t is None else float(t) for t in d["thresholds"]]
        return cls(**d)


def exit_index(confidence: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """[n] int64: the first exit e with confidence[:, e] >= thresholds[e]; E (the full model) if none.
    NaN confidence never exits."""
    if confidence.dim() != 2 or confidence.shape[1] != len(thresholds):
        raise ValueError(f"confidence must be [n, {len(thresholds)}] for {len(thresholds)} thresholds, "
                         f"got {tuple(confidence.shape)}")
    # Compare in the confidence's own precision (at least fp32), so a threshold written as 0.7 lets out
    # a float32 confidence of 0.7.
    dtype = torch.promote_types(confidence.dtype, torch.float32) if confidence.is_floating_point() else torch.float64
    thr = torch.tensor([float(t) for t in thresholds], dtype=dtype, device=confidence.device)
    leaves = confidence.to(dtype) >= thr
    E = confidence.shape[1]
    # argmax finds the first True; rows with none go to E.
    first = torch.where(leaves.any(1), leaves.to(torch.uint8).argmax(1), torch.full_like(leaves[:, 0], E, dtype=torch.long))
    return first.to(torch.int64)


# -- p-values ----------------------------------------------------------------------------------------

def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    try:
        from scipy.stats import binom
        return float(binom.cdf(k, n, p))
    except ImportError:  # scipy is optional: sum the pmf in log space
        i = torch.arange(k + 1, dtype=torch.float64)
        logpmf = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
                  + i * math.log(p) + (n - i) * math.log1p(-p))
        return float(torch.logsumexp(logpmf, 0).exp().clamp(max=1.0))


def hoeffding_bentkus_pvalue(risk: float, n: int, alpha: float) -> float:
    """p-value of H0: true risk > alpha, from the empirical mean `risk` of n losses in [0, 1]
    (Bates et al. 2021, the LTT paper's Prop. "HB"): min(Hoeffding, Bentkus), capped at 1."""
    if n <= 0 or alpha <= 0.0:
        return 1.0
    if alpha >= 1.0:
        return 0.0  # risk can never exceed 1
    a = min(max(risk, 0.0), alpha)
    h1 = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h1)
    # ceil, with a guard so that an exact integer n*risk is not pushed up by rounding noise.
    bentkus = math.e * _binom_cdf(math.ceil(n * risk - 1e-9), n, alpha)
    return min(hoeffding, bentkus, 1.0)


def min_samples(quality: float, delta: float) -> int:
    """Testing rows needed to certify `quality` at `delta` even when every exit agrees (zero loss)."""
    alpha = 1.0 - quality
    if alpha <= 0:
        return math.inf  # type: ignore[return-value]
    n = 1
    while hoeffding_bentkus_pvalue(0.0, n, alpha) > delta:
        n = n * 2
    lo, hi = n // 2, n
    while lo + 1 < hi:  # p-value decreases in n at zero risk
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hoeffding_bentkus_pvalue(0.0, mid, alpha) <= delta else (mid, hi)
    return hi


# -- the family ----------------------------------------------------------------------------------------

def risk_levels(grid: int) -> list[float]:
    """0, then a geometric grid from 1e-4 to 0.5: the family's levels, most conservative first."""
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    ratio = (_LEVEL_MAX / _LEVEL_MIN) ** (1.0 / max(grid - 2, 1))
    return [0.0] + [_LEVEL_MIN * ratio ** j for j in range(grid - 1)]


def _setting_at_level(conf: torch.Tensor, loss: torch.Tensor, order: torch.Tensor, cut_ok: torch.Tensor,
                      level: float) -> list[float]:
    """Per-exit thresholds: at each exit, among rows that reached it, let out the most rows (highest
    confidence first) whose mean loss at that exit is <= level."""
    n, E = conf.shape
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for e in range(E):
        idx = order[:, e]
        here = remaining[idx].to(torch.float64)
        count = here.cumsum(0)
        mean = (loss[idx, e] * here).cumsum(0) / count.clamp(min=1)
        # A threshold at a sorted position lets out exactly the rows counted up to it only at a tie boundary.
        ok = cut_ok[:, e] & (count > 0) & (mean <= level + 1e-12)
        pos = torch.nonzero(ok).flatten()
        if pos.numel() == 0:
            thresholds.append(math.inf)
            continue
        t = float(conf[idx[pos[-1]], e])
        thresholds.append(t)
        remaining &= ~(conf[:, e].to(torch.float64) >= t)
    return thresholds


def threshold_family(confidence: torch.Tensor, agreement: torch.Tensor, grid: int) -> list[list[float]]:
    """Distinct threshold settings, most conservative first, built from these (shaping) rows. Settings
    that never exit anywhere are left out: "never exit" is the fallback, not a hypothesis."""
    conf = confidence.to(torch.float64)
    loss = 1.0 - agreement.to(torch.float64)
    order = torch.argsort(conf, dim=0, descending=True, stable=True)
    sorted_conf = torch.gather(conf, 0, order)
    # A cut after position i keeps ties together: it needs the next value to be strictly lower.
    cut_ok = torch.ones_like(sorted_conf, dtype=torch.bool)
    cut_ok[:-1] = sorted_conf[:-1] > sorted_conf[1:]
    family: list[list[float]] = []
    for level in risk_levels(grid):
        setting = _setting_at_level(conf, loss, order, cut_ok, level)
        if all(math.isinf(t) for t in setting) or (family and family[-1] == setting):
            continue
        family.append(setting)
    return family


# -- calibration ---------------------------------------------------------------------------------------

def _check(confidence: torch.Tensor, agreement: torch.Tensor, cost: Sequence[float], quality: float,
           delta: float) -> None:
    if confidence.dim() != 2 or agreement.shape != confidence.shape:
        raise ValueError(f"confidence and agreement must both be [n, E]; got {tuple(confidence.shape)} "
                         f"and {tuple(agreement.shape)}")
    E = confidence.shape[1]
    if len(cost) != E + 1:
        raise ValueError(f"cost must have E + 1 = {E + 1} entries (one per exit, then the full model), got {len(cost)}")
    if not (0.0 < quality <= 1.0):
        raise ValueError(f"quality must be in (0, 1], got {quality}")
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = agreement.to(torch.float64)
    if bool(torch.isnan(a).any()) or bool((a < 0).any()) or bool((a > 1).any()):
        raise ValueError("agreement must lie in [0, 1] (1 = the exit agrees with the full model)")


def _outcome(exits: torch.Tensor, loss: torch.Tensor, cost: torch.Tensor) -> tuple[float, float]:
    """(risk, expected cost) of rows leaving at `exits` (E = full model, loss 0)."""
    padded = torch.cat([loss, torch.zeros(loss.shape[0], 1, dtype=loss.dtype)], 1)
    per_row = padded.gather(1, exits[:, None]).squeeze(1)
    return float(per_row.mean()), float(cost[exits].mean())


def calibrate_thresholds(confidence: torch.Tensor, agreement: torch.Tensor, cost: Sequence[float],
                         quality: float, delta: float = 0.1, grid: int = 64, *,
                         shape_fraction: float = 0.3, seed: int = 0) -> ExitCalibration:
    """Per-exit thresholds whose mean agreement with the full model is >= `quality` with probability
    >= 1 - `delta` over the calibration data (rows drawn i.i.d. from the distribution served).

    confidence [n, E] (higher = more confident), agreement [n, E] in [0, 1], cost: E + 1 cost fractions
    (last = the full model, 1.0). `shape_fraction` of the rows build the family of settings, the rest
    test it; `seed` fixes the split, so the result is a deterministic function of the inputs.
    """
    _check(confidence, agreement, cost, quality, delta)
    if not (0.0 < shape_fraction < 1.0):
        raise ValueError(f"shape_fraction must be in (0, 1), got {shape_fraction}")
    conf = confidence.detach().cpu().to(torch.float64)
    agree = agreement.detach().cpu().to(torch.float64)
    n, E = conf.shape
    alpha = 1.0 - quality
    loss = 1.0 - agree
    cost_t = torch.tensor([float(c) for c in cost], dtype=torch.float64)

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_shape = min(max(int(round(shape_fraction * n)), 1), n - 1) if n >= 2 else 0
    shape_rows, test_rows = perm[:n_shape], perm[n_shape:]
    family = threshold_family(conf[shape_rows], agree[shape_rows], grid) if n_shape else []

    details: dict[str, Any] = {"n": n, "n_shape": int(n_shape), "n_test": int(test_rows.numel()),
                               "family_size": len(family), "certified": 0, "alpha": round(alpha, 12),
                               "min_test_rows": min_samples(quality, delta) if alpha > 0 else None}
    never = [math.inf] * E

    def result(thresholds: list[float], feasible: bool, reason: str) -> ExitCalibration:
        exits = exit_index(conf, thresholds)
        risk, exp_cost = _outcome(exits, loss, cost_t)
        guarantee = (f"with probability >= {1 - delta:g} over calibration data, mean agreement >= {quality:g}"
                     if feasible else "none certified: every sample runs the full model (agreement 1 by definition)")
        return ExitCalibration(thresholds=thresholds, method=METHOD, quality=quality, delta=delta,
                               guarantee=guarantee, agreement=1.0 - risk,
                               exit_histogram=torch.bincount(exits, minlength=E + 1).tolist(),
                               expected_cost=exp_cost, feasible=feasible, reason=reason, details=details)

    if alpha <= 0.0:
        return result(never, False, "quality 1.0 cannot be certified by any exit from finite data; "
                                    "running the full model")
    if not family:
        return result(never, False, "no exit agrees with the full model on enough of the shaping rows to "
                                    "form a candidate setting; running the full model")

    test_loss, test_conf = loss[test_rows], conf[test_rows]
    certified: list[tuple[int, float]] = []  # (index in family, p-value)
    first_failure = None
    for j, setting in enumerate(family):
        risk, _ = _outcome(exit_index(test_conf, setting), test_loss, cost_t)
        p = hoeffding_bentkus_pvalue(risk, int(test_rows.numel()), alpha)
        if p > delta:  # fixed-sequence testing stops at the first hypothesis it cannot reject
            first_failure = (j, risk, p)
            break
        certified.append((j, p))
    details["certified"] = len(certified)

    if not certified:
        j, risk, p = first_failure  # type: ignore[misc]
        need = details["min_test_rows"]
        short = (f"; at least {need} testing rows (about {math.ceil(need / (1 - shape_fraction))} calibration "
                 f"rows) are needed even if every exit agreed" if test_rows.numel() < need else "")
        return result(never, False, f"even the most conservative exit setting is not certified: empirical "
                                    f"disagreement {risk:.4g} on {test_rows.numel()} testing rows, Hoeffding-Bentkus "
                                    f"p-value {p:.3g} > delta {delta:g} for target {alpha:.4g}{short}; "
                                    f"running the full model")

    # The cheapest certified setting, costed on every calibration row; ties go to the more conservative.
    costs = [(_outcome(exit_index(conf, family[j]), loss, cost_t)[1], j, p) for j, p in certified]
    best_cost, best_j, best_p = min(costs, key=lambda c: (c[0], c[1]))
    details.update(chosen=best_j, p_value=best_p)
    reason = (f"{len(certified)} of {len(family)} settings certified by fixed-sequence testing on "
              f"{test_rows.numel()} held-out rows; chose the cheapest (setting {best_j}, p-value {best_p:.3g})")
    return result(list(family[best_j]), True, reason)


# -- ordered settings evaluated by running them ---------------------------------------------------------

@dataclass
class SequenceTest:
    """Fixed-sequence testing of an ordered list of settings (most conservative first) whose per-row
    losses are measured by running each one: `certified` are (index, risk, p-value) in order, `stopped`
    the first setting that failed (index, risk, p-value), None when every setting was certified."""

    certified: list[tuple[int, float, float]]
    stopped: tuple[int, float, float] | None
    n: int


def fixed_sequence_test(count: int, risk_of: Any, n: int, quality: float, delta: float) -> SequenceTest:
    """Learn-then-Test over `count` settings fixed before looking at the testing rows: setting j's
    null hypothesis "mean loss > 1 - quality" is tested with the Hoeffding-Bentkus p-value of
    `risk_of(j)` (its mean loss on the same n testing rows), in order, stopping at the first that is
    not rejected at `delta`; every rejected setting is certified simultaneously (family-wise error <=
    delta). Settings after the first failure are never run."""
    alpha = 1.0 - quality
    certified: list[tuple[int, float, float]] = []
    for j in range(count):
        risk = float(risk_of(j))
        p = hoeffding_bentkus_pvalue(risk, n, alpha)
        if p > delta:
            return SequenceTest(certified, (j, risk, p), n)
        certified.append((j, risk, p))
    return SequenceTest(certified, None, n)
