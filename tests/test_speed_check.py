"""compile never hands back a slower model: a rewrite that loses at one row is routed around (graphs)
or rolled back (blocks). The rewrite here sleeps on one-row calls, so the verdict is not a close call."""
import time

import pytest
import torch
from torch import nn

import adaptc
from adaptc import passes
from adaptc.passes._base import Pass, Site
from adaptc.runtime.module import CompiledModule

SLEEP_S = 0.004


@torch.library.custom_op("adaptc_test::slow_at_one_row", mutates_args=())
def slow_at_one_row(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1:
        time.sleep(SLEEP_S)
    return x.clone()


@slow_at_one_row.register_fake
def _(x):
    return torch.empty_like(x)


class SlowLinear(nn.Module):
    """The same function as `linear`, deliberately slow on one-row calls (in the graph too: an op)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return slow_at_one_row(self.linear(x))


class SlowAtOneRow(Pass):
    name = "slow_at_one_row"
    saveable = False

    def match(self, ctx):
        return [Site(n, m) for n, m in ctx.working.named_modules() if isinstance(m, nn.Linear)][:1]

    def apply(self, ctx, site, plan, edit):
        edit.replace(site.path, SlowLinear(site.module))


@pytest.fixture
def slow_pass(monkeypatch):
    known = passes.registry()
    monkeypatch.setattr(passes, "registry", lambda: {**known, SlowAtOneRow.name: SlowAtOneRow})


def model_and_example():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), (torch.randn(4, 8),)


def test_a_graph_slower_at_one_row_routes_one_row_calls_to_the_original(slow_pass):
    model, example = model_and_example()
    fast = adaptc.compile(model, example_inputs=example, passes=["slow_at_one_row"], tune=False, speed_check=True)
    assert isinstance(fast, CompiledModule)
    check = adaptc.report(fast)["speed_check"]
    assert check["enabled"] and check["granularity"] == "graph"
    one = next(s for s in check["sizes"] if s["size"] == "one_row")
    assert one["route"] == "original" and one["graph_ms"] > SLEEP_S * 1e3 > one["original_ms"]
    assert one["ratio"] >= 0.97 and "one_row calls run the original module" in one["routed"]
    assert fast.routes["one_row"] == "original"
    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(fast(x), model(x))


def test_blocks_slower_at_one_row_roll_the_pass_back(slow_pass):
    model, example = model_and_example()
    fast = adaptc.compile(model, example_inputs=example, passes=["slow_at_one_row"], capture="blocks", tune=False,
                          speed_check=True)
    report = adaptc.report(fast)
    (result,) = report["passes"]
    assert result["status"] == "rolled_back" and result["reason"].startswith("speed check: the compiled model was slower")
    check = report["speed_check"]
    (rolled,) = check["rolled_back"]
    assert rolled["pass"] == "slow_at_one_row" and rolled["sizes"]["one_row"] < 0.97
    assert not any(isinstance(m, SlowLinear) for m in fast.modules())  # the blocks are the original's again
    assert {s["size"] for s in check["sizes"]} == {"example", "one_row"}
    x = torch.randn(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_speed_check_false_leaves_the_rewrite_and_says_so(slow_pass):
    model, example = model_and_example()
    fast = adaptc.compile(model, example_inputs=example, passes=["slow_at_one_row"], capture="blocks", tune=False,
                          speed_check=False)
    report = adaptc.report(fast)
    assert report["speed_check"] == {"enabled": False} and report["config"]["speed_check"] is False
    assert report["passes"][0]["status"] == "applied"
    assert any(isinstance(m, SlowLinear) for m in fast.modules())


class SlowForMemory(SlowAtOneRow):
    name = "slow_for_memory"
    for_memory = True  # like recursion: asked for fewer parameters, at a cost in time


def test_a_pass_for_memory_is_kept_although_slower(monkeypatch):
    known = passes.registry()
    monkeypatch.setattr(passes, "registry", lambda: {**known, SlowForMemory.name: SlowForMemory})
    model, example = model_and_example()
    fast = adaptc.compile(model, example_inputs=example, passes=["slow_for_memory"], capture="blocks", tune=False,
                          speed_check=True)
    report = adaptc.report(fast)
    (result,) = report["passes"]
    assert result["status"] == "applied" and report["speed_check"]["rolled_back"] == []
    kept = report["speed_check"]["kept"]
    assert kept.startswith("slow_for_memory saves parameters, not time: kept although slower (") and "one_row" in kept
    assert any(isinstance(m, SlowLinear) for m in fast.modules())
