"""Exit-threshold calibration: the Learn-then-Test guarantee holds on simulated draws, and the API's
edges (infeasible targets, exit semantics, monotonicity, determinism) behave as documented."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from adaptc.calibrate.thresholds import (METHOD, ExitCalibration, _binom_cdf, calibrate_thresholds, exit_index,
                                         hoeffding_bentkus_pvalue, min_samples, threshold_family)

# A known distribution: E = 3 exits, confidence ~ U(0, 1) independently per exit, and exit e disagrees
# with the full model with probability A[e] * (1 - c)^2, so low confidence means likely disagreement.
A = (0.6, 0.3, 0.1)
COST = [0.3, 0.6, 0.85, 1.0]


def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    conf = torch.rand(n, len(A), generator=gen, dtype=torch.float64)
    p_disagree = torch.stack([a * (1 - conf[:, e]) ** 2 for e, a in enumerate(A)], 1)
    agree = (torch.rand(n, len(A), generator=gen, dtype=torch.float64) >= p_disagree).to(torch.float64)
    return conf, agree


def true_risk(thresholds: list[float]) -> float:
    """Exact risk under the known distribution: sum_e P(reach e) * integral_{t_e}^1 A[e] (1 - c)^2 dc."""
    risk, reach = 0.0, 1.0
    for a, t in zip(A, thresholds):
        t = 1.0 if math.isinf(t) else min(max(t, 0.0), 1.0)
        risk += reach * a * (1 - t) ** 3 / 3
        reach *= t
    return risk


def test_guarantee_holds_over_many_calibration_draws():
    quality, delta, trials = 0.95, 0.1, 150
    gen = torch.Generator().manual_seed(0)
    violations, costs, naive_violations = 0, [], 0
    for _ in range(trials):
        conf, agree = draw(1000, gen)
        cal = calibrate_thresholds(conf, agree, COST, quality, delta)
        assert cal.feasible, cal.reason
        violations += true_risk(cal.thresholds) > 1 - quality
        costs.append(cal.expected_cost)
        # The same family with a naive rule (cheapest setting whose empirical risk is <= alpha, no bound)
        # shows that the simulation can see violations when there is no guarantee.
        loss = 1 - agree
        naive = min((s for s in threshold_family(conf, agree, 64)
                     if _risk(conf, loss, s) <= 1 - quality), key=lambda s: _cost(conf, s))
        naive_violations += true_risk(naive) > 1 - quality
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert violations / trials <= delta + slack
    assert naive_violations / trials > delta + slack  # the test has teeth
    assert sum(costs) / trials < 0.75  # and the guarantee is not bought by never exiting


def _risk(conf, loss, thresholds):
    ex = exit_index(conf, thresholds)
    padded = torch.cat([loss, torch.zeros(len(loss), 1, dtype=loss.dtype)], 1)
    return float(padded.gather(1, ex[:, None]).mean())


def _cost(conf, thresholds):
    return float(torch.tensor(COST, dtype=torch.float64)[exit_index(conf, thresholds)].mean())


def test_result_fields_and_reported_figures_match_the_thresholds():
    conf, agree = draw(3000, torch.Generator().manual_seed(1))
    cal = calibrate_thresholds(conf, agree, COST, quality=0.95, delta=0.1)
    assert cal.feasible and cal.method == METHOD and "Learn-then-Test" in cal.method
    assert cal.guarantee == "with probability >= 0.9 over calibration data, mean agreement >= 0.95"
    ex = exit_index(conf, cal.thresholds)
    assert cal.exit_histogram == torch.bincount(ex, minlength=4).tolist() and sum(cal.exit_histogram) == 3000
    assert cal.agreement == pytest.approx(1 - _risk(conf, 1 - agree, cal.thresholds))
    assert cal.expected_cost == pytest.approx(_cost(conf, cal.thresholds))
    assert cal.expected_cost < 0.8 and cal.exit_histogram[0] > 0
    assert cal.details["n_shape"] + cal.details["n_test"] == 3000 and cal.details["p_value"] <= 0.1
    d = json.loads(json.dumps(cal.to_dict(), allow_nan=False))
    assert ExitCalibration.from_dict(d) == cal


def test_too_few_rows_is_infeasible_with_a_reason():
    conf, agree = draw(120, torch.Generator().manual_seed(2))
    cal = calibrate_thresholds(conf, agree, COST, quality=0.99, delta=0.1)
    assert not cal.feasible
    assert cal.thresholds == [math.inf] * 3 and cal.exit_histogram == [0, 0, 0, 120]
    assert cal.expected_cost == 1.0 and cal.agreement == 1.0
    assert f"at least {min_samples(0.99, 0.1)} testing rows" in cal.reason
    assert json.loads(json.dumps(cal.to_dict(), allow_nan=False))["thresholds"] == [None, None, None]


def test_exits_that_never_agree_are_infeasible():
    gen = torch.Generator().manual_seed(3)
    conf = torch.rand(2000, 3, generator=gen)
    cal = calibrate_thresholds(conf, torch.zeros(2000, 3), COST, quality=0.9)
    assert not cal.feasible and "no exit agrees" in cal.reason
    # Exits that agree at chance level, whatever their confidence: at most a sliver of rows may leave
    # (half of them wrong must stay within the 1% budget).
    agree = (torch.rand(2000, 3, generator=gen) < 0.5).float()
    cal = calibrate_thresholds(conf, agree, COST, quality=0.99)
    assert cal.exit_histogram[-1] >= 0.97 * 2000 and cal.expected_cost > 0.97


def test_quality_one_is_infeasible():
    conf, agree = draw(500, torch.Generator().manual_seed(4))
    cal = calibrate_thresholds(conf, torch.ones_like(agree), COST, quality=1.0)
    assert not cal.feasible and "quality 1.0" in cal.reason


def test_exit_index_semantics():
    conf = torch.tensor([[0.9, 0.1, 0.1],     # first exit reached
                         [0.5, 0.7, 0.99],    # equality counts as leaving: exit 1
                         [0.1, 0.2, 0.3],     # none: the full model (E = 3)
                         [float("nan"), 0.1, 0.95],  # NaN never exits: exit 2
                         [1.0, 1.0, 1.0]])
    ex = exit_index(conf, [0.8, 0.7, math.inf])
    assert ex.dtype == torch.int64 and ex.tolist() == [0, 1, 3, 3, 0]
    assert exit_index(conf, [math.inf, math.inf, 0.95]).tolist() == [3, 2, 3, 2, 2]
    with pytest.raises(ValueError, match="thresholds"):
        exit_index(conf, [0.5, 0.5])


def test_higher_quality_never_costs_less():
    conf, agree = draw(4000, torch.Generator().manual_seed(5))
    results = [calibrate_thresholds(conf, agree, COST, quality=q) for q in (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.999)]
    costs = [r.expected_cost for r in results]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    assert results[0].feasible and not results[-1].feasible  # 0.999 needs more rows than 4000 * 0.7


def test_deterministic_and_seeded():
    conf, agree = draw(1500, torch.Generator().manual_seed(6))
    a = calibrate_thresholds(conf, agree, COST, quality=0.95)
    b = calibrate_thresholds(conf.clone(), agree.clone(), COST, quality=0.95)
    assert a == b
    assert calibrate_thresholds(conf.float(), agree.float(), COST, quality=0.95).feasible


def test_continuous_agreement_for_embeddings():
    """Cosine to the full model's embedding, clipped to [0, 1]: a bounded loss, not a 0/1 one."""
    gen = torch.Generator().manual_seed(7)
    conf = torch.rand(3000, 4, generator=gen, dtype=torch.float64)
    depth = torch.tensor([0.6, 0.75, 0.9, 0.97], dtype=torch.float64)
    agree = (depth + (1 - depth) * conf - 0.05 * torch.rand(3000, 4, generator=gen, dtype=torch.float64)).clamp(0, 1)
    cal = calibrate_thresholds(conf, agree, [0.2, 0.4, 0.6, 0.8, 1.0], quality=0.95, delta=0.05)
    assert cal.feasible and cal.agreement >= 0.95 and cal.expected_cost < 1.0


def test_hoeffding_bentkus_pvalue_is_valid_at_the_boundary():
    """Under H0 at its boundary (risk exactly alpha), P(p <= delta) <= delta."""
    gen = torch.Generator().manual_seed(8)
    n, alpha, delta = 400, 0.05, 0.1
    hits = torch.distributions.Binomial(n, torch.full((3000,), alpha)).sample()
    rejected = sum(hoeffding_bentkus_pvalue(float(k) / n, n, alpha) <= delta for k in hits)
    assert rejected / 3000 <= delta
    assert hoeffding_bentkus_pvalue(0.0, n, alpha) < 1e-6 and hoeffding_bentkus_pvalue(0.2, n, alpha) == 1.0
    del gen


def test_binomial_tail_without_scipy_matches_scipy(monkeypatch):
    pytest.importorskip("scipy")
    cases = [(0, 50, 0.1), (3, 400, 0.01), (120, 1000, 0.1), (999, 1000, 0.5)]
    with_scipy = [_binom_cdf(*c) for c in cases]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import ...` now fails
    without = [_binom_cdf(*c) for c in cases]
    assert without == pytest.approx(with_scipy, rel=1e-9, abs=1e-15)


def test_bad_inputs_are_rejected():
    conf, agree = draw(100, torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match="E \\+ 1"):
        calibrate_thresholds(conf, agree, [0.5, 1.0], quality=0.9)
    with pytest.raises(ValueError, match="agreement must lie"):
        calibrate_thresholds(conf, agree * 2, COST, quality=0.9)
    with pytest.raises(ValueError, match="quality"):
        calibrate_thresholds(conf, agree, COST, quality=1.5)


def test_agreement_predictor_ranks_agreeing_rows_first():
    from torch import nn

    from adaptc.calibrate.distill import fit_agreement_predictor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 24, generator=g) * torch.rand(24, generator=g) * 5 + 3  # scales and offsets to fold back
    v = torch.randn(24, generator=g)
    agree = (((x - 3) @ v + 0.5 * torch.randn(600, generator=g)) > 0).float()
    linear = nn.Linear(24, 1)
    fit_agreement_predictor(linear, x[:400], agree[:400])
    with torch.no_grad():
        score = linear(x[400:]).squeeze(-1)
    pos, neg = score[agree[400:] == 1], score[agree[400:] == 0]
    auc = (pos[:, None] > neg[None, :]).float().mean()
    assert auc > 0.9
