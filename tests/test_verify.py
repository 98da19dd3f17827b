"""Verification of exact rewrites: a fixed tolerance per dtype, and where a float sum reordered over a deep
model misses it, the original run in float64 as the judge."""
import torch
from torch import nn

from adaptc.verify import ROUNDING_FACTOR, compare, within_rounding


def test_reordered_sums_pass_and_real_errors_fail_against_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g, dtype=torch.float64)
    w = torch.randn(512, 512, generator=g, dtype=torch.float64) / 512 ** 0.5
    exact = x @ w
    for _ in range(6):  # a deep stack: rounding grows with depth
        exact = torch.tanh(exact) @ w
    def run(order):  # the same math in float32, summed in one of two orders
        h = x.float() @ w.float() if order == 0 else (x.float()[:, :256] @ w.float()[:256] + x.float()[:, 256:] @ w.float()[256:])
        for _ in range(6):
            t = torch.tanh(h)
            h = t @ w.float() if order == 0 else (t[:, :256] @ w.float()[:256] + t[:, 256:] @ w.float()[256:])
        return h
    original, reordered = run(0), run(1)
    assert within_rounding(original, reordered, exact).ok
    wrong = reordered.clone()
    wrong[3, 7] += 1e-3 * exact.abs().max().item()  # far below the fixed tolerance's reach of one element
    cmp = within_rounding(original, wrong, exact)
    assert not cmp.ok and f"{ROUNDING_FACTOR:g}x the original's own" in cmp.why
    assert not compare(original, wrong).ok


def test_structure_and_integer_mismatches_are_not_excused():
    e = (torch.ones(3), torch.arange(3))
    assert not within_rounding(e, (torch.ones(3), torch.arange(3) + 1), (torch.ones(3, dtype=torch.float64), torch.arange(3))).ok
    assert not within_rounding(e, (torch.ones(4), torch.arange(3)), (torch.ones(3, dtype=torch.float64), torch.arange(3))).ok


def test_compile_judges_a_deep_models_tuned_gemms_by_the_float64_oracle():
    import adaptc

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(24) for m in (nn.Linear(256, 256), nn.Tanh())]).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(8, 256),), tune=False, passes=["tuned_linear"])
    (entry,) = adaptc.report(fast)["passes"]
    assert entry["status"] == "applied", entry
