"""adaptc.analysis.shared_blocks: the module-tree view of weight-shared layers (what ONNX `reroll` folds)."""
from __future__ import annotations

import pytest
import torch

from adaptc.analysis.shared_blocks import shared_runs

from tests.onnx.test_reroll import Looped


def hf(arch):
    pytest.importorskip("transformers")
    from tests.onnx.hf_exports import hf_model

    model = hf_model(arch)
    ids = torch.randint(3, 128, (2, 9))
    return model, lambda: model(ids, torch.ones_like(ids))


def test_albert_layer_group_is_one_shared_run():
    model, run = hf("albert")
    [found] = shared_runs(model, run)
    assert found.block == "model.encoder.albert_layer_groups.0" and found.calls == 4
    assert found.caller == "model.encoder"
    assert found.parameters == sum(p.numel() for p in model.model.encoder.albert_layer_groups[0].parameters())


def test_distinct_bert_layers_are_no_run():
    model, run = hf("bert")
    assert shared_runs(model, run) == []


def test_user_loop_and_tied_copies():
    model = Looped(n=3).eval()
    [found] = shared_runs(model, lambda: model(torch.randn(2, 4, 16)))
    assert (found.caller, found.block, found.calls) == ("", "block", 3)

    class Tied(torch.nn.Module):  # two module objects holding the same parameters count as one block
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.b.weight, self.b.bias = self.a.weight, self.a.bias
            self.c = torch.nn.Linear(8, 8)  # same shapes, its own weights: not part of the run

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    tied = Tied()
    [found] = shared_runs(tied, lambda: tied(torch.randn(3, 8)))
    assert (found.block, found.calls) == ("a", 2)
