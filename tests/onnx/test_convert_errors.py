"""Every bad input gets one line naming the problem and exit code 2; a mismatch gets exit code 1 and no file."""
from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import adaptc.convert
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
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # CliRunner keeps a traceback's exception


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


@pytest.mark.parametrize("content", [b"nope", bytes(range(256)) * 8, "npy"])
def test_unreadable_calibration(good_model, tmp_path, content):
    bad = tmp_path / "cal.npz"
    if content == "npy":  # one unnamed array
        with open(bad, "wb") as f:
            np.save(f, np.zeros((B, S, H * D), np.float32))
    else:
        bad.write_bytes(content)
    result = convert(good_model, "-o", tmp_path / "o.onnx", "--calibration", bad)
    assert_one_line_error(result, 2, "cal.npz", "not an .npz of arrays")
    assert "allow_pickle" not in result.output  # numpy's advice would run code from the file


def calibration_rows(rows=B, seq=S, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {**{n: rng.standard_normal((rows, seq, H * D)).astype(dtype) for n in "qkv"},
            "mask": np.zeros((rows, 1, 1, seq), np.float32)}


@pytest.mark.parametrize("change,words", [
    ({"q": np.zeros((B, S, H * D), np.float64)}, ["'q' is float64", "float32 of rank 3"]),
    ({"k": np.zeros((B, H * D), np.float32)}, ["'k' is float32 [2, 32]", "rank 3 [b, s, 32]"]),
    ({"v": np.zeros((B, S, 5), np.float32)}, ["'v' has shape [2, 7, 5]", "axis 2 must be 32"]),
    ({"mask": np.zeros((B, 1, 1, S + 1), np.float32)},
     ["'mask' has shape [2, 1, 1, 8]", "axis 3 must be 7 (s, as in 'q')"]),
    (calibration_rows(rows=0), ["0 rows"]),
])
def test_calibration_is_checked_against_the_inputs(good_model, tmp_path, change, words):
    cal = tmp_path / "cal.npz"
    np.savez(cal, **{**calibration_rows(), **change})
    out = tmp_path / "o.onnx"
    assert_one_line_error(convert(good_model, "-o", out, "--calibration", cal), 2, "cal.npz", *words)
    assert not out.exists()


def test_calibration_onnxruntime_rejects_is_one_line(tmp_path):
    """Token ids past the embedding table: right dtype and shape, but onnxruntime's Gather refuses them."""
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, 4])], [table])
    path = tmp_path / "embed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cal = tmp_path / "ids.npz"
    np.savez(cal, ids=np.full((2, 3), 99, np.int64))
    assert_one_line_error(convert(path, "-o", tmp_path / "o.onnx", "--calibration", cal), 2,
                          "ids.npz", "onnxruntime cannot run the input on the calibration rows")


def mlp_graph(location="mlp.data"):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w", (16, 16)), ("bias", (16,)))]
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", f, ["b", 16])],
                              [helper.make_tensor_value_info("y", f, ["b", 16])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def ext_model(tmp_path):
    """A model whose weights live in an external-data file beside it, as large exports do."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "mlp_ext.onnx"
    onnx.save(mlp_graph(), path, save_as_external_data=True, location="mlp_ext.data", size_threshold=0)
    return path, tmp_path / "in" / "mlp_ext.data"


def digests(*paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_inputs_are_never_replaced_even_with_force(ext_model, tmp_path):
    src, data = ext_model
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.ones((3, 16), np.float32))
    before = digests(src, data, cal)
    for out, words in ((data, "is the input's external data"), (src.parent / "mlp_ext", "where -o"),
                       (cal, "is the calibration file")):
        result = convert(src, "-o", out, "--calibration", cal, "--force")
        assert_one_line_error(result, 2, "adaptc never overwrites its input", words)
    assert digests(src, data, cal) == before


@pytest.mark.parametrize("where", ["in", "elsewhere"])
def test_output_owns_its_weights(ext_model, tmp_path, where):
    src, data = ext_model
    out = tmp_path / where / "mlp.fast.onnx"
    result = convert(src, "-o", out)
    assert result.exit_code == 0, result.output
    written = onnx.load(out, load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in written.graph.initializer)
    data.rename(tmp_path / "moved.data")  # the output still runs without the input's weight file
    x = np.ones((2, 16), np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w, bias = (numpy_helper.to_array(t) for t in mlp_graph().graph.initializer)
    np.testing.assert_allclose(y, x @ w + bias, rtol=1e-5)


def test_large_output_keeps_its_weights_beside_it(ext_model, tmp_path, monkeypatch):
    monkeypatch.setattr(adaptc.convert, "EXTERNAL_DATA_ABOVE", 0)  # as if over protobuf's 2 GB
    src, data = ext_model
    before = digests(data)
    out = tmp_path / "out" / "mlp.fast.onnx"
    result = convert(src, "-o", out)
    assert result.exit_code == 0, result.output
    assert digests(data) == before
    assert sorted(os.listdir(out.parent)) == ["mlp.fast.onnx", "mlp.fast.onnx.data"]
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"mlp.fast.onnx.data"}
    data.unlink()
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 16), np.float32)})


def test_existing_output_needs_force(good_model, tmp_path):
    out = tmp_path / "o.onnx"
    out.write_text("keep me")
    assert_one_line_error(convert(good_model, "-o", out), 2, "o.onnx exists; pass --force to replace it")
    assert out.read_text() == "keep me"
    assert convert(good_model, "-o", out, "--force").exit_code == 0
    onnx.checker.check_model(onnx.load(out))


def test_output_paths_that_cannot_be_written(good_model, tmp_path):
    assert_one_line_error(convert(good_model, "-o", ""), 2, "-o needs a file name")
    (tmp_path / "notes").write_text("a file, not a directory")
    assert_one_line_error(convert(good_model, "-o", tmp_path / "notes" / "o.onnx"), 2, "cannot write",
                          "is not a directory")
    assert not list(tmp_path.glob(".*partial"))


def test_read_only_output_directory(good_model, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes into read-only directories: fail as a user would
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(locked))
        monkeypatch.setattr(adaptc.convert.tempfile, "mkdtemp", refuse)
    assert_one_line_error(convert(good_model, "-o", locked / "o.onnx"), 2, "cannot write", "Permission denied")


def test_missing_output_directory_is_created(good_model, tmp_path):
    out = tmp_path / "new" / "dir" / "o.onnx"
    assert convert(good_model, "-o", out).exit_code == 0 and out.exists()


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


class SelfAttention(torch.nn.Module):
    """One softmax attention block: enough for the default target's opset-23 upgrade and fusion to run."""

    def __init__(self, width=32, heads=4) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x):
        b, n, width = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, width))


@pytest.fixture(scope="module")
def dynamo_external(tmp_path_factory):
    """A dynamo export whose weights torch wrote to x.onnx.data beside it (a relative location)."""
    path = tmp_path_factory.mktemp("export") / "x.onnx"
    torch.manual_seed(0)
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=1024)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(SelfAttention().eval(), (torch.randn(2, 16, 32),), dynamo=True, input_names=["x"],
                                    output_names=["y"], dynamic_shapes=(dims,), verbose=False)
        program.save(str(path), external_data=True)
    assert (path.parent / "x.onnx.data").exists()
    return path


@pytest.mark.parametrize("output", ["cwd", "third folder"])
def test_dynamo_export_with_external_data_converts_from_another_directory(dynamo_external, tmp_path, monkeypatch,
                                                                           output):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the input's folder nor the output's
    out = "x.fast.onnx" if output == "cwd" else tmp_path / "out" / "x.fast.onnx"
    result = CliRunner().invoke(main, ["convert", str(dynamo_external), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert '"fired": 1' in result.output  # the opset-23 upgrade and the attention fusion both ran
    x = np.random.default_rng(3).standard_normal((3, 5, 32)).astype(np.float32)
    want = ort.InferenceSession(str(dynamo_external), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def vad_graph():
    """silero-vad's signature: audio [batch, samples] in 512-sample frames, a state, and a scalar int64 `sr`
    (the sample rate, rescaling the energy). adaptc's invented 16-sample audio cannot be framed."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    consts = [numpy_helper.from_array(np.array([0, -1, 512], np.int64), "frame_shape"),
              numpy_helper.from_array(np.array(16000.0, np.float32), "rate")]
    nodes = [helper.make_node("Reshape", ["input", "frame_shape"], ["frames"]),
             helper.make_node("Mul", ["frames", "frames"], ["power"]),
             helper.make_node("ReduceMean", ["power"], ["energy"], axes=[2], keepdims=0),  # [batch, frames]
             helper.make_node("Cast", ["sr"], ["sr_f"], to=f),
             helper.make_node("Div", ["sr_f", "rate"], ["scale"]),
             helper.make_node("Mul", ["energy", "scale"], ["scaled"]),
             helper.make_node("Sigmoid", ["scaled"], ["output"]),
             helper.make_node("Mul", ["state", "scale"], ["stateN"])]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("input", f, [None, None]),
                                             helper.make_tensor_value_info("state", f, [None, 128]),
                                             helper.make_tensor_value_info("sr", i64, [])],
                              [helper.make_tensor_value_info("output", f, [None, None]),
                               helper.make_tensor_value_info("stateN", f, [None, 128])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def vad_model(tmp_path):
    path = tmp_path / "vad.onnx"
    onnx.save(vad_graph(), path)
    return path


def vad_rows(rows=3, sr=np.array(16000, np.int64)):
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((rows, 1024)).astype(np.float32), "state": np.zeros((rows, 128), np.float32),
            "sr": sr}


def test_invented_inputs_the_original_rejects_ask_for_calibration(vad_model, tmp_path, capfd):
    out = tmp_path / "o.onnx"
    assert_one_line_error(convert(vad_model, "-o", out), 2, "the original model rejects adaptc's invented inputs",
                          "'input': [2, 16]", "Reshape node: The input tensor cannot be reshaped", "--calibration")
    assert "reshape_helper" not in capfd.readouterr().err  # nor onnxruntime's own log of it, nor its C++ source line
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_scalar_input_from_calibration(vad_model, tmp_path):
    cal = tmp_path / "cal.npz"
    np.savez(cal, **vad_rows())
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["convert", str(vad_model), "-o", str(out), "--calibration", str(cal), "--json"])
    assert result.exit_code == 0, result.output
    feeds = {**vad_rows(rows=2), "sr": np.array(8000, np.int64)}
    want = ort.InferenceSession(str(vad_model), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5)


@pytest.mark.parametrize("change,words", [
    ({"sr": np.array([16000], np.int64)}, ["'sr' is int64 [1]", "a scalar (rank 0, int64): one value for every row"]),
    ({"sr": np.array(16000.0)}, ["'sr' is float64 []", "a scalar (rank 0, int64)"]),
    ({"input": np.array(0.5, np.float32)}, ["'input' is float32 []", "float32 of rank 2", "one row per sample"]),
])
def test_scalar_calibration_messages(vad_model, tmp_path, change, words):
    cal = tmp_path / "cal.npz"
    np.savez(cal, **{**vad_rows(), **change})
    result = convert(vad_model, "-o", tmp_path / "o.onnx", "--calibration", cal)
    assert_one_line_error(result, 2, "cal.npz", *words)
    assert "rank 0 [], one row per sample" not in result.output
