"""A graph serves only the calls its trace holds for: torch's shape guards, and sizes 0 / 1 export assumed."""
import pytest
import torch
from torch import nn

import adaptc
from adaptc.capture.inputs import Inputs
from adaptc.capture.torch_capture import export
from adaptc.runtime.module import CompiledModule


class LengthBranch(nn.Module):
    """Another branch at length 5: export traced at 8 records the guard `x.size()[1] != 5`."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] == 5:
            return self.lin(x) + 100
        return self.lin(x)


class DecodeFastPath(nn.Module):
    """A one-token fast path: traced at length >= 2, export records no guard for it at all."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.emb(ids)
        if ids.shape[1] == 1:
            return self.lin(h) * 2
        return self.lin(h)


@pytest.mark.parametrize("tune", [False, True])
def test_a_call_failing_torchs_guard_runs_the_eager_rewrite(tune):
    torch.manual_seed(0)
    model = LengthBranch().eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 8, 4),), tune=tune)
    assert isinstance(fast, CompiledModule)
    assert adaptc.report(fast)["capture"]["guards"] == ["L['x'].size()[1] != 5"]
    with torch.no_grad():
        for shape in [(2, 5, 4), (3, 5, 4), (1, 5, 4), (3, 8, 4), (2, 6, 4)]:
            x = torch.randn(shape)
            torch.testing.assert_close(fast(x), model(x))
    assert not fast.accepts((torch.randn(2, 5, 4),), {}) and fast.accepts((torch.randn(2, 6, 4),), {})


@pytest.mark.parametrize("tune", [False, True])
def test_a_size_one_fast_path_is_never_served_by_the_graph(tune):
    torch.manual_seed(0)
    model = DecodeFastPath().eval()
    fast = adaptc.compile(model, example_inputs=(torch.randint(0, 50, (2, 8)),), tune=tune)
    size_one = adaptc.report(fast)["capture"]["size_one"]
    assert size_one["batch"] == "graph" and size_one["sequence"].startswith("eager")
    with torch.no_grad():
        for shape in [(3, 1), (1, 1), (1, 8), (4, 9)]:
            ids = torch.randint(0, 50, shape)
            torch.testing.assert_close(fast(ids), model(ids))
    assert fast.accepts((torch.randint(0, 50, (1, 8)),), {})  # one row: checked, the graph serves it
    assert not fast.accepts((torch.randint(0, 50, (3, 1)),), {})


def test_without_verification_sizes_one_run_eager():
    model = nn.Sequential(nn.Linear(6, 6)).eval()
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 5, 6),), verify=False, tune=False)
    assert set(adaptc.report(fast)["capture"]["size_one"].values()) == {"eager: not verified at size 1"}
    assert not fast.accepts((torch.randn(1, 5, 6),), {}) and fast.accepts((torch.randn(2, 2, 6),), {})


def test_a_graph_that_checks_its_own_guards_routes_their_failures_to_eager():
    # where adaptc cannot read the guards (an older torch), torch's check stays in the graph
    model = LengthBranch().eval()
    captured = export(model, Inputs.of((torch.randn(2, 8, 4),)))
    signature = CompiledModule.signature_of((torch.randn(2, 8, 4),), {}, captured.shapes)
    fast = CompiledModule(captured.program.module(), signature, eager=model, guards=None)
    x = torch.randn(2, 5, 4)
    with pytest.raises(AssertionError, match="Guard failed"):
        fast.graph(x)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


def test_a_one_row_example_with_a_mask_runs_the_graph_at_one_row():
    """export names the mask's dims apart from the ids'; the one-row probe covers both, so a one-row
    call (the example's own size) runs the graph, not the eager fallback."""
    from transformers import BertConfig, BertForSequenceClassification

    import adaptc

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    fast = adaptc.compile(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tune=False)
    assert adaptc.report(fast)["capture"]["granularity"] == "graph"
    assert fast.accepts((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
