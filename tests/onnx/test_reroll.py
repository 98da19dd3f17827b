"""The reroll rule: ALBERT's weight-shared layers (unrolled by both torch exporters) become one ONNX Loop,
outputs unchanged at other shapes; distinct layers (BERT) are declined with the reason."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tempfile
from pathlib import Path

import torch

import adaptc
from adaptc.passes.onnx import Reroll, apply_rules
from adaptc.passes.onnx.cleanup import cleanup

from .test_convert_models import assert_same_outputs, fresh_inputs, run_convert
from .test_export import compiled_program


def loops(path):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "Loop"]


EXPORTERS = ["dynamo", "torchscript"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_albert_layers_become_one_loop(hf_onnx, tmp_path, exporter):
    src = hf_onnx("albert", exporter)
    dst = tmp_path / "albert.onnx"
    result, report = run_convert(src, dst)  # reroll is on by default
    assert result.exit_code == 0, result.output
    reroll = next(f for f in report["fusions"] if f["rule"] == "reroll")
    # TorchScript: the attention rule computes the shared mask from the first layer's shapes, which ties
    # that copy to the others; the Loop then covers the last 3 (re-rolled alone it covers all 4: below)
    assert reroll["fired"] == 1 and reroll["details"]["blocks"] == (4 if exporter == "dynamo" else 3), reroll
    [loop] = loops(dst)
    body = loop.attribute[0].g
    assert len(body.node) == reroll["details"]["body_nodes"] + 1  # the block once, plus the condition's Identity
    assert report["nodes"]["after_with_subgraphs"] < report["nodes"]["after_cleanup"]
    assert report["verification"]["ok"] and report["verification"]["worst"]["max_rel"] < 1e-5
    if exporter == "dynamo":  # it gave every copy its own transposed weights: they are gone now
        assert dst.stat().st_size < 0.5 * src.stat().st_size
    for batch, seq in ((1, 5), (3, 23)):
        assert_same_outputs(src, dst, fresh_inputs(batch, seq), rtol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_albert_rerolls_after_attention_fusion_and_alone(hf_onnx, tmp_path, exporter):
    src = hf_onnx("albert", exporter)
    for passes in ("reroll", "attention,reroll"):
        dst = tmp_path / f"{passes.replace(',', '-')}.onnx"
        result, report = run_convert(src, dst, "--passes", passes)
        assert result.exit_code == 0, result.output
        reroll = report["fusions"][-1]
        assert reroll["fired"] == 1 and len(loops(dst)) == 1
        if passes == "reroll" or exporter == "dynamo":
            assert reroll["details"]["blocks"] == 4
        assert ("Attention" in report["ops_after"]) == ("attention" in passes)
        assert_same_outputs(src, dst, fresh_inputs(2, 9), rtol=1e-5)


def test_distinct_layers_are_declined_with_the_reason(hf_onnx, tmp_path):
    dst = tmp_path / "bert.onnx"
    result, report = run_convert(hf_onnx("bert", "dynamo"), dst)
    assert result.exit_code == 0, result.output
    reroll = next(f for f in report["fusions"] if f["rule"] == "reroll")
    assert reroll["fired"] == 0 and not loops(dst)
    [declined] = reroll["declined"]
    assert "no weight matrix is read by two places" in declined["reason"]  # the cheap test, before the quadratic search


def test_copies_with_their_own_weights_are_declined_with_the_reason():
    """Past the shared-weight test (one weight read twice), structurally equal layers with weights of
    their own are still not one block."""
    import onnx_ir as ir

    from adaptc.passes.onnx.reroll import Reroll

    class Distinct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(32, 32)
            self.layers = torch.nn.Sequential(*[torch.nn.Sequential(
                torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.Tanh()) for _ in range(3)])

        def forward(self, x):
            return self.head(self.layers(self.head(x)))  # `head` read twice: passes the shared-weight test

    torch.manual_seed(0)

    path = Path(tempfile.mkdtemp()) / "distinct.onnx"
    torch.onnx.export(Distinct().eval(), (torch.randn(2, 32),), str(path), dynamo=False, dynamic_axes={"x": {0: "b"}},
                      input_names=["x"])
    result = Reroll().apply(ir.load(path))
    assert result.fired == 0
    [declined] = result.declined
    assert "read different weights" in declined["reason"], declined


class Looped(torch.nn.Module):
    """A user loop over one block: `for _ in range(n): x = block(x)`, plus a head after it."""

    def __init__(self, n: int = 5, width: int = 16) -> None:
        super().__init__()
        self.n = n
        self.block = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                         torch.nn.Linear(2 * width, width), torch.nn.LayerNorm(width))
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        for _ in range(self.n):
            x = x + self.block(x)
        return self.head(x)


def test_user_loop_over_one_block_rerolls_and_a_read_state_splits_it(tmp_path):
    torch.manual_seed(0)
    model = Looped().eval()
    path = tmp_path / "looped.onnx"
    x = torch.randn(2, 7, 16)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    ir_model = ir.load(str(path))
    cleanup(ir_model)
    [result] = apply_rules(ir_model, [Reroll()])
    assert result.fired == 1 and result.details["blocks"] == 5
    ir.save(ir_model, str(tmp_path / "rolled.onnx"))
    feed = {"x": np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)}
    expected = model(torch.from_numpy(feed["x"])).detach().numpy()
    got = ort.InferenceSession(str(tmp_path / "rolled.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # a state read between the copies (here a graph output) cannot hide inside a Loop: two Loops, split there
    class Tapped(Looped):
        def forward(self, x):
            for i in range(self.n):
                x = x + self.block(x)
                if i == 1:
                    tap = x
            return self.head(x), tap

    tapped = Tapped().eval()
    tapped.load_state_dict(model.state_dict())
    path = tmp_path / "tapped.onnx"
    torch.onnx.export(tapped, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y", "tap"],
                      dynamic_axes={"x": {0: "b", 1: "t"}})
    ir_model = ir.load(str(path))
    cleanup(ir_model)
    [result] = apply_rules(ir_model, [Reroll()])
    assert result.fired == 2 and [loop["blocks"] for loop in result.details["loops"]] == [3, 2]
    ir.save(ir_model, str(tmp_path / "tapped-rolled.onnx"))
    expected = [t.detach().numpy() for t in tapped(torch.from_numpy(feed["x"]))]
    got = ort.InferenceSession(str(tmp_path / "tapped-rolled.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_export_onnx_writes_one_loop_for_a_user_loop(tmp_path):
    torch.manual_seed(0)
    model = Looped(n=4).eval()
    x = torch.randn(2, 7, 16)
    module = compiled_program(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    report = adaptc.export_onnx(module, (x,), tmp_path / "looped.onnx")
    assert report["reroll"]["fired"] == 1 and report["reroll"]["details"]["blocks"] == 4
    assert report["reroll"]["nodes"]["after"] < report["reroll"]["nodes"]["before"]
    assert report["verification"]["ok"] and len(loops(tmp_path / "looped.onnx")) == 1
    feed = {"x": np.random.default_rng(1).standard_normal((5, 7, 16)).astype(np.float32)}
    [got] = ort.InferenceSession(str(tmp_path / "looped.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got, model(torch.from_numpy(feed["x"])).detach().numpy(), rtol=1e-5, atol=1e-5)
