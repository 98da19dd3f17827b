"""`adaptc convert` on ONNX files adaptc did not write: HF exports (both torch exporters) and MiniLM-L3."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from adaptc.cli import main

FUSED_OP = {"standard": "Attention", "onnxruntime": "com.microsoft::MultiHeadAttention"}


def run_convert(src, dst, *args):
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(dst), "--json", *args])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def session(path, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fresh_inputs(batch, seq, vocab=128, seed=7):
    """Not the converter's own verification inputs: another batch size, length and padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_same_outputs(original, converted, feeds, rtol=1e-4):
    for e, a in zip(session(original, optimize=False).run(None, feeds), session(converted).run(None, feeds)):
        assert e.shape == a.shape and e.dtype == a.dtype
        if np.issubdtype(e.dtype, np.floating):
            assert np.abs(e).max() > 0
            assert np.abs(e - a).max() <= rtol * np.abs(e).max(), np.abs(e - a).max()
        else:
            np.testing.assert_array_equal(e, a)


CASES = [(arch, exporter, target) for arch in ("bert", "gpt2", "llama") for exporter in ("dynamo", "torchscript")
         for target in ("standard", "onnxruntime")]


@pytest.mark.parametrize("arch,exporter,target", CASES)
def test_hf_export_converts_fuses_and_matches(hf_onnx, tmp_path, arch, exporter, target):
    src = hf_onnx(arch, exporter)
    before = src.read_bytes()
    dst = tmp_path / "out.onnx"
    result, report = run_convert(src, dst, "--target", target)
    assert result.exit_code == 0, result.output
    assert src.read_bytes() == before  # the input is never touched
    fusion = report["fusions"][0]
    # TorchScript Llama: RoPE hides the Q head split and heads are written as -1; the count comes from
    # the split behind RoPE, and K/V's repeat_kv (GQA) is kept so MultiHeadAttention sees equal heads
    assert fusion["fired"] == 2, fusion  # one per layer
    assert report["ops_after"][FUSED_OP[target]] == 2
    assert "Softmax" not in report["ops_after"] and "Softmax" in report["ops_before"]
    assert report["verification"]["ok"] and report["verification"]["worst"]["max_rel"] < 1e-4
    if target == "standard":
        assert report["opset"]["after"] == 23
    assert_same_outputs(src, dst, fresh_inputs(3, 11))


def test_gqa_is_left_to_the_standard_attention_op(hf_onnx, tmp_path):
    """Llama's repeat_kv (Unsqueeze/Expand/Reshape) is removed: the op sees 2 KV heads for 4 query heads."""
    import onnx_ir as ir

    dst = tmp_path / "llama.onnx"
    result, _ = run_convert(hf_onnx("llama", "dynamo"), dst)
    assert result.exit_code == 0, result.output
    attention = [n for n in ir.load(dst).graph if n.op_type == "Attention"]
    assert [(n.inputs[0].shape[1], n.inputs[1].shape[1]) for n in attention] == [(4, 2), (4, 2)]


MOE_OP = {"standard": "ScatterND", "onnxruntime": "com.microsoft::MoE"}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_mixtral_batched_mm_export_converts(hf_onnx, tmp_path, exporter, target):
    src, dst = hf_onnx("mixtral", exporter), tmp_path / "mixtral.onnx"
    result, report = run_convert(src, dst, "--target", target)
    assert result.exit_code == 0, result.output
    fusions = {f["rule"]: f for f in report["fusions"]}
    assert fusions["attention_fusion"]["fired"] == 2
    assert fusions["moe_fusion"]["fired"] == 2 and not fusions["moe_fusion"]["declined"]  # one per layer
    assert report["ops_after"][MOE_OP[target]] == 2 and "TopK" in report["ops_before"]
    import onnx_ir as ir

    converted = ir.load(dst)
    gathered = [n.inputs[0] for n in converted.graph if n.op_type in ("Gather", "GatherND")]
    assert not [t for t in gathered if t.const_value is not None and len(t.shape) == 3]  # no per-pair weight copies
    assert report["verification"]["ok"]
    assert_same_outputs(src, dst, fresh_inputs(2, 9))
    one_token = {"input_ids": np.array([[17]], np.int64), "attention_mask": np.ones((1, 1), np.int64)}
    assert_same_outputs(src, dst, one_token)  # most experts idle


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
def test_real_minilm_l3_converts(minilm_l3, tmp_path, target):
    dst = tmp_path / "minilm.onnx"
    result, report = run_convert(minilm_l3, dst, "--target", target)
    assert result.exit_code == 0, result.output
    assert report["fusions"][0]["fired"] == 3  # three layers, bidirectional with a padding mask
    assert report["ops_after"][FUSED_OP[target]] == 3 and "Softmax" not in report["ops_after"]
    assert report["nodes"]["after"] < report["nodes"]["before"]
    vocab = session(minilm_l3).get_inputs()  # BERT vocabulary: ids below 30522
    assert [i.name for i in vocab] == ["input_ids", "attention_mask"]
    assert_same_outputs(minilm_l3, dst, fresh_inputs(2, 37, vocab=30522))
