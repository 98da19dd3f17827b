"""`adaptc.export_onnx` / `adaptc export`: compiled modules written to ONNX and checked in onnxruntime."""
from __future__ import annotations

import json
import warnings
import zipfile

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import adaptc
from adaptc.cli import main
from adaptc.errors import AdaptcError, CaptureError
from adaptc.runtime.module import CompiledModule, CompiledState, attach

from ..moe_models import UserMoEModel, hf_causal_lm
from .test_convert_errors import assert_one_line_error


def onnx_run(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def assert_close(actual: np.ndarray, expected: torch.Tensor, rtol: float = 1e-4):
    expected = expected.detach().numpy()
    assert actual.shape == expected.shape and np.abs(expected).max() > 0
    assert np.abs(actual - expected).max() <= rtol * np.abs(expected).max(), np.abs(actual - expected).max()


def ops_of(path) -> set[str]:
    return {(f"{n.domain}::" if n.domain else "") + n.op_type for n in ir.load(path).graph.all_nodes()}


def compiled_program(fn: torch.nn.Module, args: tuple, dynamic_shapes=None) -> CompiledModule:
    """A module calling adaptc ops directly, exported as compile's whole-graph capture holds it."""
    program = torch.export.export(fn, args, dynamic_shapes=dynamic_shapes, strict=False)
    module = CompiledModule(program.module(), signature=None)
    module._program = program
    return attach(module, CompiledState(report={"capture": {"granularity": "graph"}}))


@pytest.fixture(scope="module")
def bert():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = tf.BertModel(config).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = adaptc.compile(model, example_inputs=(ids, mask), tune=False)
    return model, fast, (ids, mask)


def test_bert_exports_to_onnx_attention_and_matches(bert, tmp_path):
    model, fast, example = bert
    path = tmp_path / "bert.onnx"
    report = adaptc.export_onnx(fast, example, path)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # tuned_linear's ops become MatMuls
    assert report["adaptc_ops"] == {"adaptc::attention": 2, "adaptc::linear": linears} and report["verification"]["ok"]
    ops = ops_of(path)
    assert "Attention" in ops and "Softmax" not in ops and not any(op.startswith("adaptc") for op in ops)
    # another batch size, length and padding: the file kept the program's symbolic sizes
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(onnx_run(path, ids, mask)[0], expected)


def test_saved_module_exports_from_the_command_line(bert, tmp_path):
    _, fast, example = bert
    adaptc.save(fast, tmp_path / "bert.adaptc")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "bert.adaptc"), "-o", str(tmp_path / "bert.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["ok"] and report["opset"] == 23
    with torch.no_grad():
        expected = fast(*example).last_hidden_state
    assert_close(onnx_run(tmp_path / "bert.onnx", *example)[0], expected)


@pytest.mark.parametrize("gated,act", [(True, "silu"), pytest.param(False, "gelu", marks=pytest.mark.slow)])
def test_user_moe_model_exports_to_standard_ops_and_matches(tmp_path, gated, act):
    torch.manual_seed(0)
    model = UserMoEModel(layers=1, gated=gated, act=act).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = adaptc.compile(model, example_inputs=(ids,), tune=False)
    path = tmp_path / "moe.onnx"
    report = adaptc.export_onnx(fast, (ids,), path)
    assert report["adaptc_ops"].pop("adaptc::fused_moe") == 1 and report["verification"]["ok"]
    assert set(report["adaptc_ops"]) <= {"adaptc::linear"}  # the layers outside the MoE block
    assert "ScatterElements" in ops_of(path)
    for shape in ((1, 1), (3, 17)):  # decode-sized (most experts unrouted) and a larger batch
        other = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert_close(onnx_run(path, other)[0], model(other))


class StructuredAttention(torch.nn.Module):
    """adaptc::attention with every structure argument: causal, a sliding window, key padding, an offset."""

    def __init__(self, causal: bool, window: int, q_offset: int):
        super().__init__()
        self.causal, self.window, self.q_offset = causal, window, q_offset

    def forward(self, q, k, v, key_padding):
        return torch.ops.adaptc.attention(q, k, v, key_padding, None, 0.3, self.causal, self.window, self.q_offset)


@pytest.mark.parametrize("causal,window,q_offset", [(True, 0, 0), (True, 3, 2), (False, 4, 0)])
def test_attention_structure_becomes_an_onnx_mask(tmp_path, causal, window, q_offset):
    from adaptc.kernels.attention.reference import torch_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, :3] = False  # left padding: with a window, some queries see no key at all (zeros by contract)
    module = compiled_program(StructuredAttention(causal, window, q_offset), (q, k, v, pad))
    path = tmp_path / "attention.onnx"
    assert adaptc.export_onnx(module, (q, k, v, pad), path)["verification"]["ok"]
    assert "Attention" in ops_of(path)
    expected = torch_attention(q, k, v, pad, None, 0.3, causal, window, q_offset)
    np.testing.assert_allclose(onnx_run(path, q, k, v, pad)[0], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_block_granularity_causal_lm_is_refused(tmp_path):
    model = hf_causal_lm("mixtral")
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = adaptc.compile(model, example_inputs=(ids,), tune=False)
    with pytest.raises(CaptureError, match="blocks granularity.*not one graph"):
        adaptc.export_onnx(fast, (ids,), tmp_path / "lm.onnx")
    assert not (tmp_path / "lm.onnx").exists()


class SparseAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.adaptc.sparse_attention(q, k, v, 0.35, 0, 4, [1] * 4, [1] * 4, [1] * 4)


def test_op_without_an_onnx_form_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    module = compiled_program(SparseAttention(), (q, k, v))
    with pytest.raises(CaptureError, match="adaptc::sparse_attention has no ONNX form"):
        adaptc.export_onnx(module, (q, k, v), tmp_path / "sparse.onnx")
    assert not (tmp_path / "sparse.onnx").exists()


def test_a_plain_module_is_refused(tmp_path):
    with pytest.raises(AdaptcError, match="adaptc.compile or adaptc.load"):
        adaptc.export_onnx(torch.nn.Linear(3, 3), (torch.randn(2, 3),), tmp_path / "linear.onnx")


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.linear(x))


@pytest.fixture
def saved(tmp_path):
    """A small module as adaptc.save writes it (whole graph, no adaptc ops)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.adaptc"
    adaptc.save(compiled_program(TinyNet().eval(), (torch.randn(2, 4),)), path)
    return path


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def test_export_needs_force_to_replace_a_file(saved, tmp_path):
    out = tmp_path / "tiny.onnx"
    out.write_text("keep me")
    assert_one_line_error(export(saved, "-o", out), 2, "tiny.onnx exists; pass --force to replace it")
    assert out.read_text() == "keep me"
    assert export(saved, "-o", out, "--force").exit_code == 0
    assert onnx_run(out, torch.randn(2, 4))[0].shape == (2, 3)


def test_export_output_paths(saved, tmp_path):
    assert_one_line_error(export(saved, "-o", ""), 2, "-o needs a file name")
    assert_one_line_error(export(saved, "-o", saved, "--force"), 2, "is the input file")
    (tmp_path / "notes").write_text("a file, not a directory")
    assert_one_line_error(export(saved, "-o", tmp_path / "notes" / "x.onnx"), 2, "cannot write", "is not a directory")
    out = tmp_path / "new" / "dir" / "tiny.onnx"  # a missing directory is created, as convert does
    assert export(saved, "-o", out).exit_code == 0 and out.exists()
    assert not list(tmp_path.rglob(".*partial"))


def rewrite_member(path, name, data, **manifest_changes):
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["manifest.json"] = json.dumps({**json.loads(members["manifest.json"]), **manifest_changes})
    members[name] = data
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)


@pytest.mark.parametrize("name,data,changes,words", [
    ("manifest.json", "[1, 2]", {}, "manifest.json is not a JSON object"),
    ("manifest.json", json.dumps({"format": "adaptc", "format_version": 1}), {}, "KeyError: 'report'"),
    ("program.pt2", b"garbage" * 20, {}, "program.pt2 inside it is damaged"),
    ("weights.pt", b"garbage" * 20, {"kind": "hf_blocks"}, "weights.pt inside it is damaged"),
    ("weights.pt", b"", {"kind": "hf_blocks"}, "weights.pt inside it is damaged"),
])
def test_malformed_adaptc_file_is_one_line(saved, tmp_path, name, data, changes, words):
    import logging

    rewrite_member(saved, name, data, **changes)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("torch.export").addHandler(handler)  # torch.export logs a traceback before raising
    try:
        result = export(saved, "-o", tmp_path / "x.onnx")
    finally:
        logging.getLogger("torch.export").removeHandler(handler)
    assert_one_line_error(result, 2, "tiny.adaptc", words)
    assert "weights_only" not in result.output  # torch's advice would run code from the file
    assert not [r for r in logged if r.exc_info], logged
    assert not (tmp_path / "x.onnx").exists()
