"""Every bad input gets one line naming the problem and exit code 2; a mismatch gets exit code 1 and no file."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from adaptc.cli import main

from .test_attention_rule import B, H, D, S, eager_attention_graph


def convert(*args):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


@pytest.fixture
def good_model(tmp_path):
    path = tmp_path / "attention.onnx"
    onnx.save(eager_attention_graph(), path)
    return path


def assert_one_line_error(result, code, *words):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_help_explains_the_command():
    result = CliRunner().invoke(main, ["convert", "--help"])
    assert result.exit_code == 0
    for word in ("--target", "standard", "onnxruntime", "--calibration", "--no-verify", "--json", "verif"):
        assert word in result.output
    assert "convert" in CliRunner().invoke(main, ["--help"]).output


def test_good_model_converts_with_a_table(good_model, tmp_path):
    result = convert(good_model, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "attention_fusion" in result.output and "max rel err" in result.output
    assert (tmp_path / "out.onnx").exists()


def test_missing_file(tmp_path):
    assert_one_line_error(convert(tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), 2, "no such file")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("just some text, not a protobuf\n" * 20)
    assert_one_line_error(convert(path, "-o", tmp_path / "o.onnx"), 2, "not a readable ONNX model")


def test_truncated_model(good_model, tmp_path):
    data = good_model.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert_one_line_error(convert(cut, "-o", tmp_path / "o.onnx"), 2, "cut.onnx")


def test_unsupported_opset(tmp_path):
    model = eager_attention_graph()
    model.opset_import[0].version = 9
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    assert_one_line_error(convert(path, "-o", tmp_path / "o.onnx"), 2, "opset 9")


def test_op_from_an_unknown_domain(tmp_path):
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="acme.ops")], "g",
                              [helper.make_tensor_value_info("x", f, [2])], [helper.make_tensor_value_info("y", f, [2])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme.ops", 1)]), path)
    assert_one_line_error(convert(path, "-o", tmp_path / "o.onnx"), 2, "acme.ops::Frobnicate")


def test_op_onnxruntime_cannot_run(tmp_path):
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", f, [2])], [helper.make_tensor_value_info("y", f, [2])])
    path = tmp_path / "unknown_op.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert_one_line_error(convert(path, "-o", tmp_path / "o.onnx"), 2, "onnxruntime cannot load the input")


def test_output_equal_to_input_is_refused(good_model):
    digest = hashlib.sha256(good_model.read_bytes()).hexdigest()
    assert_one_line_error(convert(good_model, "-o", good_model), 2, "is the input file")
    alias = good_model.parent / "." / good_model.name
    assert_one_line_error(convert(good_model, "-o", alias), 2, "is the input file")
    assert hashlib.sha256(good_model.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("passes,words", [("flash", "unknown pass"), ("early_exit", "needs --calibration")])
def test_bad_pass_names(good_model, tmp_path, passes, words):
    assert_one_line_error(convert(good_model, "-o", tmp_path / "o.onnx", "--passes", passes), 2, words)


def test_unreadable_calibration(good_model, tmp_path):
    bad = tmp_path / "cal.npz"
    bad.write_text("nope")
    assert_one_line_error(convert(good_model, "-o", tmp_path / "o.onnx", "--calibration", bad), 2, "cal.npz")


def test_mismatch_fails_with_exit_1_and_writes_nothing(good_model, tmp_path):
    """A real semantic gap, found by verification: a query whose every key is masked with -inf gives NaN
    in the original (Softmax of all -inf) but 0 from onnxruntime's Attention kernel."""
    rng = np.random.default_rng(0)
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[1] = -np.inf
    cal = tmp_path / "cal.npz"
    np.savez(cal, **{n: rng.standard_normal((B, S, H * D)).astype(np.float32) for n in "qkv"}, mask=mask)
    out = tmp_path / "o.onnx"
    result = convert(good_model, "-o", out, "--calibration", cal)
    assert result.exit_code == 1, result.output
    assert "verification failed" in result.stderr and "nothing written" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    # the same calibration without the fully masked row passes
    mask[1] = 0.0
    np.savez(cal, **{n: rng.standard_normal((B, S, H * D)).astype(np.float32) for n in "qkv"}, mask=mask)
    assert convert(good_model, "-o", out, "--calibration", cal).exit_code == 0 and out.exists()


def test_no_verify_still_writes(good_model, tmp_path):
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["convert", str(good_model), "-o", str(out), "--no-verify", "--json"])
    assert result.exit_code == 0 and out.exists()
    assert '"skipped": "--no-verify"' in result.output
