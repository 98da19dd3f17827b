"""ONNX in, ONNX out: load → cleanup → rewrite → verify in onnxruntime → write.

    from adaptc.convert import convert
    report = convert("model.onnx", "model.fast.onnx", target="standard")   # JSON-serializable

Nothing is written unless the result matches the original: the original runs in onnxruntime with graph
optimizations disabled, the result as users will run it (onnxruntime defaults), both on the same random
(and calibration) inputs; random inputs the original itself cannot run need calibration rows instead.
The output file (and its external data, if it needs any) appears atomically; the input, its external
data and the calibration file are never written.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx_ir as ir

from .capture.onnx_capture import default_opset, load_onnx
from .errors import AdaptcError, CaptureError, VerificationError
from .passes.onnx import RULES, apply_rules
from .passes.onnx.cleanup import cleanup, infer_shapes, prune, sort, upgrade_opset

TARGETS = ("standard", "onnxruntime")
PASSES = tuple(RULES)
APPROXIMATE_PASSES = ("early_exit",)
# Relative to the reference output's largest magnitude, as in adaptc.verify: reassociation, not looseness.
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9, np.dtype(np.float16): 1e-2}
EXTERNAL_DATA_ABOVE = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph itself
VERIFY_BATCH, VERIFY_SEQ = 2, 16


class ConvertFailed(VerificationError):
    """Verification failed; `report` says by how much, per output."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def convert(input_path: str | Path, output_path: str | Path, passes: list[str] | None = None,
            target: str = "standard", calibration: str | Path | None = None, verify: bool = True,
            measure_latency: bool = True, seed: int = 0, quality: float | None = None,
            delta: float = 0.1, overwrite: bool = True) -> dict[str, Any]:
    """Convert one ONNX file; returns the report. AdaptcError (CaptureError mostly): bad input or an
    unwritable output. ConvertFailed: outputs differ. `early_exit` in `passes` needs `calibration` and
    keeps agreement >= `quality` (default 0.99). `overwrite=False` refuses an existing output (as the
    command does without --force); the input, its external data and `calibration` are never replaced."""
    t0 = time.perf_counter()
    src, dst = Path(input_path), Path(output_path)
    passes = list(PASSES if passes is None else passes)
    _check_arguments(src, dst, passes, target, calibration, overwrite)
    model = load_onnx(src)
    _refuse_inputs(dst, {path: "the input's external data" for path in _external_files(model)})
    _load_weights(model, src)
    original = _session(src, optimize=False, what="the input")
    rows = load_calibration(calibration, original)
    report: dict[str, Any] = {"input": str(src), "output": str(dst), "target": target, "passes": passes,
                              "opset": {"before": default_opset(model)}, "ops_before": _op_counts(model)}

    report["cleanup"] = cleanup(model)
    rewrites = [p for p in passes if p in PASSES]
    if "early_exit" in passes and "reroll" in rewrites:  # the exits go between the unrolled layers
        rewrites.remove("reroll")
        report["reroll"] = "skipped: early_exit places its exits between the unrolled layers"
    model, results = _rewrite(model, rewrites, target, report)
    report["fusions"] = [r.to_dict() for r in results]
    prune(model)
    sort(model)
    report["opset"]["after"] = default_opset(model)
    report["nodes"] = {"before": report["cleanup"]["nodes_before"], "after_cleanup": report["cleanup"]["nodes_after"],
                       "after": model.graph.num_nodes(), "after_with_subgraphs": sum(1 for _ in model.graph.all_nodes())}
    report["ops_after"] = _op_counts(model)
    feeds = _feeds(original, model, rows, seed, report)

    with staged(dst, overwrite) as tmp:
        _save(model, tmp)
        try:
            converted = _session(tmp, optimize=True, what="the converted model")
        except CaptureError as e:  # our rewrite broke the graph: a failed conversion, not a bad input
            raise ConvertFailed(f"{e}; nothing written", report) from None
        if verify:
            report["verification"] = compare_sessions(original, converted, feeds)
            if not report["verification"]["ok"]:
                worst = report["verification"]["worst"]
                raise ConvertFailed(f"verification failed: output {worst['output']!r} differs by {worst['max_abs']:.3g} "
                                    f"(rel {worst['max_rel']:.3g} > {worst['tolerance']:.0e}); nothing written", report)
        else:
            report["verification"] = {"ok": None, "skipped": "--no-verify"}
        if "early_exit" in passes:
            report["early_exit"] = _early_exit(model, original, rows, quality, delta, seed, tmp)
        if measure_latency:
            report["latency_ms"] = _latency(src, tmp, [feeds[0]])
            if report.get("early_exit", {}).get("status") == "applied":  # exits pay off on real rows, one at a time
                report["early_exit"]["latency_ms"] = _latency(src, tmp, _single_rows(rows, 64))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _check_arguments(src: Path, dst: Path, passes: list[str], target: str, calibration, overwrite: bool) -> None:
    if target not in TARGETS:
        raise CaptureError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    for name in passes:
        if name not in PASSES + APPROXIMATE_PASSES:
            raise CaptureError(f"unknown pass {name!r}; choose from {', '.join(PASSES + APPROXIMATE_PASSES)}")
        if name in APPROXIMATE_PASSES and calibration is None:
            raise CaptureError(f"pass {name!r} is approximate: it needs --calibration FILE (an .npz of input rows "
                               "named after the model's inputs) to fit and certify its exits")
    inputs = {src: "the input file", **({Path(calibration): "the calibration file"} if calibration else {})}
    check_output(dst, overwrite, inputs)


def check_output(dst: Path, overwrite: bool, inputs: dict[Path, str]) -> None:
    """Fail fast, before any work, on an output path that cannot or must not be written."""
    if dst.name in ("", ".", ".."):
        raise AdaptcError("-o needs a file name" + (f", not {str(dst)!r}" if dst.name else ""))
    if dst.is_dir():
        raise AdaptcError(f"{dst} is a directory; give a file name")
    folder = next((p for p in dst.parents if p.exists()), None)  # the missing ones are created
    if folder is not None and not folder.is_dir():
        raise AdaptcError(f"cannot write {dst}: {folder} is not a directory")
    _refuse_inputs(dst, inputs)
    if dst.exists() and not overwrite:
        raise AdaptcError(f"{dst} exists; pass --force to replace it")


def _refuse_inputs(dst: Path, inputs: dict[Path, str]) -> None:
    """Neither the output nor the external data written beside it may be one of `inputs`, even with --force."""
    for target in (dst, _data_file(dst)):
        for path, what in inputs.items():
            if _same_file(target, path):
                where = f"-o {dst}" if target == dst else f"{target} (where -o {dst} keeps its weights)"
                raise CaptureError(f"{where} is {what}; adaptc never overwrites its input")


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _external_files(model: ir.Model) -> set[Path]:
    graphs = [model.graph, *model.graph.subgraphs()]
    return {Path(v.const_value.path) for g in graphs for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _load_weights(model: ir.Model, src: Path) -> None:
    """Read the input's external data into memory (unless the model is too large for one protobuf anyway):
    the serialize/deserialize round trips (onnx's opset converter, early_exit's copies) forget the folder
    a relative location like torch's `x.onnx.data` is relative to, and would look for it in the cwd."""
    if _weight_bytes(model) > EXTERNAL_DATA_ABOVE:
        return
    try:
        ir.external_data.load_to_model(model)
    except (OSError, ValueError) as e:
        raise CaptureError(f"{src}: cannot read its external data ({e})") from None


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _rewrite(model: ir.Model, passes: list[str], target: str, report: dict[str, Any]):
    rules = [RULES[name](target) for name in passes]
    needs_23 = target == "standard" and any(getattr(r, "needs_opset", 0) > default_opset(model) for r in rules)
    if needs_23 and any(n.op_type == "Softmax" for n in model.graph.all_nodes()):
        before = default_opset(model)
        try:
            model = upgrade_opset(model, 23)
        except Exception as e:  # the rules then see the old opset and decline, saying so
            report["opset"]["upgrade_failed"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        else:
            report["opset"]["upgraded"] = f"{before} -> {default_opset(model)} (ONNX Attention is opset 23)"
            infer_shapes(model)
    return model, apply_rules(model, rules)


# -- onnxruntime -------------------------------------------------------------------------------------

def _session(path: Path, optimize: bool, what: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CaptureError(f"onnxruntime cannot load {what} ({path.name}): {line[:300]}") from None


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def random_inputs(session, model: ir.Model, seed: int = 0, batch: int = VERIFY_BATCH,
                  seq: int = VERIFY_SEQ) -> list[dict[str, np.ndarray]]:
    """One batch of plausible inputs: token ids inside the embedding table, right-padded attention masks."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        if info.type not in _NUMPY:
            raise CaptureError(f"input {info.name!r} has type {info.type}; adaptc can only feed tensors")
        dtype = _NUMPY[info.type]
        shape = [d if isinstance(d, int) else (batch if "batch" in str(d).lower() or i == 0 else seq)
                 for i, d in enumerate(info.shape)]
        name = info.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[info.name] = rng.random(shape) < 0.5
        elif "mask" in name and len(shape) == 2:
            lengths = [max(1, shape[1] - (b * shape[1]) // (2 * shape[0])) for b in range(shape[0])]
            feeds[info.name] = (np.arange(shape[1])[None, :] < np.array(lengths)[:, None]).astype(dtype)
        elif "position" in name:
            feeds[info.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        else:
            feeds[info.name] = rng.integers(0, _index_bound(model, info.name), shape).astype(dtype)
    return [feeds]


def _feeds(original, model: ir.Model, rows: dict[str, np.ndarray], seed: int,
           report: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """What verification and latency run: invented inputs, then the first calibration rows. Invented inputs
    the original itself cannot run (silero-vad frames its audio in 512 samples and gets 16) are dropped
    when there are calibration rows, and without them are the user's to replace."""
    invented = random_inputs(original, model, seed)
    error = run_error(original, invented[0])
    if error:
        shapes = {k: list(v.shape) for k, v in invented[0].items()}
        if not rows:
            raise CaptureError(f"the original model rejects adaptc's invented inputs {shapes} (onnxruntime: {error}); "
                               "pass --calibration FILE, an .npz of real inputs named after the model's inputs")
        report["invented_inputs"] = {"inputs": shapes, "rejected": error, "verified_on": "calibration rows only"}
        invented = []
    return invented + ([_first(rows, VERIFY_BATCH * 4)] if rows else [])


def run_error(session, feed: dict[str, np.ndarray]) -> str | None:
    """None if `session` runs `feed`, else onnxruntime's complaint in one short line: the failing node
    and its message, without the C++ check behind it (and without onnxruntime logging it to stderr)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only: the error is reported here, once
    try:
        session.run(None, feed, options)
    except Exception as e:
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(e).split()))
        node = re.match(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: (.*)",
                        text)
        if node:
            op, name, message = node.groups()
            message = re.sub(r"^\S+:\d+ .*? was false\. ", "", message)
            text = f"{op} node{f' {name!r}' if name else ''}: {message}"
        return text[:300] or type(e).__name__
    return None


def _index_bound(model: ir.Model, name: str) -> int:
    """How many rows the tables this input indexes have (token ids, token types); 2 if it indexes none."""
    value = next((v for v in model.graph.inputs if v.name == name), None)
    bounds = []
    for use in value.uses() if value is not None else ():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1 and node.inputs[0].shape is not None:
            axis = node.attributes.get_int("axis", 0)
            d = node.inputs[0].shape[axis]
            if isinstance(d, int):
                bounds.append(d)
    return min(bounds) if bounds else 2


def _early_exit(model: ir.Model, original, rows: dict[str, np.ndarray], quality: float | None, delta: float,
                seed: int, tmp: Path) -> dict[str, Any]:
    """Insert calibrated exits; keep them only if the written model, run by onnxruntime one row at a
    time, still agrees with the original on the calibration rows at least `quality` of the time (else
    they are rolled back: `tmp` keeps the model without them)."""
    from .passes.onnx.early_exit import insert_exits, runtime_agreement

    ee = insert_exits(model, original, rows, quality=quality, delta=delta, seed=seed)  # bars by adaptc.progress
    if ee["status"] != "applied":
        return ee
    attempt = tmp.parent / "exits" / tmp.name  # its own folder: its external data must not replace tmp's yet
    try:
        attempt.parent.mkdir()
        _save(model, attempt)
        session = _session(attempt, optimize=True, what="the model with exits")
        ee["runtime_agreement"] = runtime_agreement(original, session, rows, ee)
        if ee["runtime_agreement"]["batch1"] < ee["quality"]:
            ee.update(status="rolled_back", reason=f"onnxruntime agreement {ee['runtime_agreement']['batch1']:.4f} "
                                                    f"< quality {ee['quality']} on the calibration rows at batch 1")
        else:  # `tmp` keeps the exact model otherwise
            _move_files(attempt, tmp)
    finally:
        shutil.rmtree(attempt.parent, ignore_errors=True)
    return ee


def _num_rows(rows: dict[str, np.ndarray]) -> int:
    """How many samples calibration `rows` hold: scalar (rank-0) inputs have no rows axis, they go with each."""
    return next((len(v) for v in rows.values() if v.ndim), 1)


def _first(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] if v.ndim else v for k, v in rows.items()}


def _single_rows(rows: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[i:i + 1] if v.ndim else v for k, v in rows.items()} for i in range(min(n, _num_rows(rows)))]


def load_calibration(path: str | Path | None, session) -> dict[str, np.ndarray]:
    """An .npz whose arrays are named after the model's inputs, one row per sample ({} without a file);
    each array must have its input's dtype, rank and fixed sizes, so that onnxruntime can run it. A
    scalar (rank-0) input, like silero-vad's sample rate `sr`, takes one value, fed with every row."""
    if path is None:
        return {}
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CaptureError(f"{path}: no such file") from None
    except Exception:  # numpy's own message suggests allow_pickle=True, which would run code from the file
        data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CaptureError(f"{path}: not an .npz of arrays (write one with numpy.savez(path, input_name=rows, ...))")
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except Exception:  # a pickled object array or a damaged member
        raise CaptureError(f"{path}: not an .npz of plain arrays (a member is damaged or holds objects)") from None
    inputs = session.get_inputs()
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise CaptureError(f"{path}: calibration data lacks inputs {missing}; it has {sorted(arrays)}")
    rows = {i.name: arrays[i.name] for i in inputs}
    for info in inputs:
        a, dtype = rows[info.name], _NUMPY.get(info.type)
        if a.dtype != dtype or a.ndim != len(info.shape):
            want = np.dtype(dtype).name if dtype else info.type
            takes = (f"the input is a scalar (rank 0, {want}): one value for every row" if not info.shape else
                     f"the input takes {want} of rank {len(info.shape)} {_dims(info.shape)}, "
                     "one row per sample along the first axis")
            raise CaptureError(f"{path}: calibration array {info.name!r} is {a.dtype} {list(a.shape)}; {takes}")
    counts = {n: len(a) for n, a in rows.items() if a.ndim}
    if len(set(counts.values())) > 1:
        raise CaptureError(f"{path}: calibration arrays have different row counts {counts}")
    if _num_rows(rows) == 0:
        raise CaptureError(f"{path}: calibration arrays have 0 rows")
    sizes: dict[str, tuple[int, str]] = {}  # a named size (past the rows axis), as the first input with it sets it
    for info in inputs:
        shape = rows[info.name].shape
        for axis, (want, got) in enumerate(zip(info.shape, shape)):
            if isinstance(want, str) and axis:
                size, first = sizes.setdefault(want, (got, info.name))
                expected = f"{size} ({want}, as in {first!r})"
            elif isinstance(want, int) and want > 0:
                size, expected = want, str(want)
            else:
                continue
            if got != size:
                raise CaptureError(f"{path}: calibration array {info.name!r} has shape {list(shape)}; the input is "
                                   f"{_dims(info.shape)}, so axis {axis} must be {expected}")
    error = run_error(session, _first(rows, VERIFY_BATCH * 4))  # token ids past the vocabulary, say: said now
    if error:
        raise CaptureError(f"{path}: onnxruntime cannot run the input on the calibration rows: {error}")
    return rows


def _dims(shape: list) -> str:
    return f"[{', '.join('?' if d is None else str(d) for d in shape)}]"


def compare_sessions(original, converted, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    names = [o.name for o in original.get_outputs()]
    outputs: dict[str, dict[str, float]] = {}
    for feed in feeds:
        expected, actual = original.run(None, feed), converted.run(names, feed)
        for name, e, a in zip(names, expected, actual):
            row = outputs.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "tolerance": TOLERANCE.get(e.dtype, 0.0)})
            abs_err, rel_err = _errors(e, a)
            row["max_abs"], row["max_rel"] = max(row["max_abs"], abs_err), max(row["max_rel"], rel_err)
    worst_name = max(outputs, key=lambda n: (outputs[n]["max_rel"] > outputs[n]["tolerance"], outputs[n]["max_rel"]))
    ok = all(r["max_rel"] <= r["tolerance"] for r in outputs.values())
    return {"ok": ok, "batches": len(feeds), "outputs": outputs, "worst": {"output": worst_name, **outputs[worst_name]},
            "inputs": {k: list(v.shape) for k, v in feeds[0].items()}}


def _errors(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return float("inf"), float("inf")
    if not np.issubdtype(expected.dtype, np.floating):
        return (0.0, 0.0) if np.array_equal(expected, actual) else (float("inf"), float("inf"))
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    if not np.array_equal(np.isnan(e), np.isnan(a)):
        return float("inf"), float("inf")
    finite = ~np.isnan(e)
    if not finite.any():
        return 0.0, 0.0
    abs_err = float(np.abs(e[finite] - a[finite]).max())
    return abs_err, abs_err / max(float(np.abs(e[finite]).max()), 1e-6)


def _latency(src: Path, converted: Path, feeds: list[dict[str, np.ndarray]], runs: int = 5) -> dict[str, Any]:
    """Both with onnxruntime's default optimizations, as users run them: median time to run `feeds`."""
    def median_ms(path: Path) -> float:
        session = _session(path, optimize=True, what=path.name)
        session.run(None, feeds[0])
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            for feed in feeds:
                session.run(None, feed)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e3)

    before, after = median_ms(src), median_ms(converted)
    return {"before": round(before, 3), "after": round(after, 3), "speedup": round(before / after, 3),
            "inputs": {k: list(v.shape) for k, v in feeds[0].items()}, "runs_of": len(feeds)}


def _data_file(path: Path) -> Path:
    """Where a model too large for one protobuf keeps its weights: beside it, named after it."""
    return path.with_name(f"{path.name}.data")


def _save(model: ir.Model, path: Path) -> None:
    """Write `model` so that it owns its weights: an input's external data is copied, never referred to."""
    try:
        if _weight_bytes(model) > EXTERNAL_DATA_ABOVE:
            ir.save(model, path, external_data=_data_file(path).name)
        else:
            ir.save(ir.external_data.load_to_model(model), path)
    except OSError as e:
        raise AdaptcError(f"cannot write {path.name}: {e.strerror or e}") from None


@contextlib.contextmanager
def staged(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A path named like `dst` in a fresh hidden folder beside it. If the block succeeds, the file written
    there (and its external data) replace `dst` (and its external data), data first; either way the
    folder goes, so a failure leaves nothing behind and never touches what was at `dst`."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".adaptc-partial", dir=dst.parent))
    except OSError as e:
        raise AdaptcError(f"cannot write {dst}: {e.strerror or e}") from None
    try:
        yield stage / dst.name
        _move_files(stage / dst.name, dst, overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_files(src: Path, dst: Path, overwrite: bool = True) -> None:
    """Move the model at `src` and its external data, if any, to `dst` (the same file system)."""
    moves = [(f, _data_file(dst)) for f in [_data_file(src)] if f.exists()] + [(src, dst)]
    if not overwrite:  # checked up front too; this catches a file that appeared since
        for _, target in moves:
            if target.exists():
                raise AdaptcError(f"{target} exists; pass --force to replace it")
    try:
        for f, target in moves:
            os.replace(f, target)
    except OSError as e:
        raise AdaptcError(f"cannot write {dst}: {e.strerror or e}") from None


def _op_counts(model: ir.Model) -> dict[str, int]:
    return dict(Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                        for n in model.graph.all_nodes()).most_common())
