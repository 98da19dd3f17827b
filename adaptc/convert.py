"""ONNX in, ONNX out: load → cleanup → rewrite → verify in onnxruntime → write.

    from adaptc.convert import convert
    report = convert("model.onnx", "model.fast.onnx", target="standard")   # JSON-serializable

Nothing is written unless the result matches the original: the original runs in onnxruntime with graph
optimizations disabled, the result as users will run it (onnxruntime defaults), both on the same random
(and calibration) inputs. The output file appears atomically; the input is never written.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .capture.onnx_capture import default_opset, load_onnx
from .errors import CaptureError, VerificationError
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
            delta: float = 0.1) -> dict[str, Any]:
    """Convert one ONNX file; returns the report. CaptureError: bad input. ConvertFailed: outputs differ.
    `early_exit` in `passes` needs `calibration` and keeps agreement >= `quality` (default 0.99)."""
    t0 = time.perf_counter()
    src, dst = Path(input_path), Path(output_path)
    passes = list(PASSES if passes is None else passes)
    _check_arguments(src, dst, passes, target, calibration)
    model = load_onnx(src)
    original = _session(src, optimize=False, what="the input")
    rows = load_calibration(calibration, original)
    report: dict[str, Any] = {"input": str(src), "output": str(dst), "target": target, "passes": passes,
                              "opset": {"before": default_opset(model)}, "ops_before": _op_counts(model)}

    report["cleanup"] = cleanup(model)
    model, results = _rewrite(model, [p for p in passes if p in PASSES], target, report)
    report["fusions"] = [r.to_dict() for r in results]
    prune(model)
    sort(model)
    report["opset"]["after"] = default_opset(model)
    report["nodes"] = {"before": report["cleanup"]["nodes_before"], "after_cleanup": report["cleanup"]["nodes_after"],
                       "after": model.graph.num_nodes()}
    report["ops_after"] = _op_counts(model)

    tmp = dst.with_name(f".{dst.name}.adaptc-partial")
    try:
        _save(model, tmp, dst)
        try:
            converted = _session(tmp, optimize=True, what="the converted model")
        except CaptureError as e:  # our rewrite broke the graph: a failed conversion, not a bad input
            raise ConvertFailed(f"{e}; nothing written", report) from None
        feeds = random_inputs(original, model, seed) + ([_first(rows, VERIFY_BATCH * 4)] if rows else [])
        if verify:
            report["verification"] = compare_sessions(original, converted, feeds)
            if not report["verification"]["ok"]:
                worst = report["verification"]["worst"]
                raise ConvertFailed(f"verification failed: output {worst['output']!r} differs by {worst['max_abs']:.3g} "
                                    f"(rel {worst['max_rel']:.3g} > {worst['tolerance']:.0e}); nothing written", report)
        else:
            report["verification"] = {"ok": None, "skipped": "--no-verify"}
        if "early_exit" in passes:
            report["early_exit"] = _early_exit(model, original, rows, quality, delta, seed, tmp, dst)
        if measure_latency:
            report["latency_ms"] = _latency(src, tmp, [feeds[0]])
            if report.get("early_exit", {}).get("status") == "applied":  # exits pay off on real rows, one at a time
                report["early_exit"]["latency_ms"] = _latency(src, tmp, _single_rows(rows, 64))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _check_arguments(src: Path, dst: Path, passes: list[str], target: str, calibration) -> None:
    if target not in TARGETS:
        raise CaptureError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    for name in passes:
        if name not in PASSES + APPROXIMATE_PASSES:
            raise CaptureError(f"unknown pass {name!r}; choose from {', '.join(PASSES + APPROXIMATE_PASSES)}")
        if name in APPROXIMATE_PASSES and calibration is None:
            raise CaptureError(f"pass {name!r} is approximate: it needs --calibration FILE (an .npz of input rows "
                               "named after the model's inputs) to fit and certify its exits")
    if src.resolve() == dst.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise CaptureError(f"-o {dst} is the input file; adaptc never overwrites its input")
    if not dst.parent.exists():
        raise CaptureError(f"{dst.parent}: output directory does not exist")


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
                seed: int, tmp: Path, dst: Path) -> dict[str, Any]:
    """Insert calibrated exits; keep them only if the written model, run by onnxruntime one row at a
    time, still agrees with the original on the calibration rows at least `quality` of the time (else
    they are rolled back: `tmp` keeps the model without them)."""
    from .passes.onnx.early_exit import insert_exits, runtime_agreement

    ee = insert_exits(model, original, rows, quality=quality, delta=delta, seed=seed, progress=sys.stderr.isatty())
    if ee["status"] != "applied":
        return ee
    attempt = tmp.with_name(f"{tmp.name}.exits")
    try:
        _save(model, attempt, dst)
        session = _session(attempt, optimize=True, what="the model with exits")
        ee["runtime_agreement"] = runtime_agreement(original, session, rows, ee)
        if ee["runtime_agreement"]["batch1"] < ee["quality"]:
            ee.update(status="rolled_back", reason=f"onnxruntime agreement {ee['runtime_agreement']['batch1']:.4f} "
                                                    f"< quality {ee['quality']} on the calibration rows at batch 1")
        else:  # `tmp` keeps the exact model otherwise
            os.replace(attempt, tmp)
    finally:
        attempt.unlink(missing_ok=True)
    return ee


def _first(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in rows.items()}


def _single_rows(rows: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    count = min(n, len(next(iter(rows.values()))))
    return [{k: v[i:i + 1] for k, v in rows.items()} for i in range(count)]


def load_calibration(path: str | Path | None, session) -> dict[str, np.ndarray]:
    """An .npz whose arrays are named after the model's inputs, one row per sample ({} without a file)."""
    if path is None:
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise CaptureError(f"{path}: not a readable .npz of input batches ({str(e).splitlines()[0][:200]})") from None
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CaptureError(f"{path}: calibration data lacks inputs {missing}; it has {sorted(arrays)}")
    rows = {n: arrays[n] for n in names}
    if len({len(a) for a in rows.values()}) != 1:
        raise CaptureError(f"{path}: calibration arrays have different row counts "
                           f"{ {n: len(a) for n, a in rows.items()} }")
    return rows


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


def _save(model: ir.Model, tmp: Path, dst: Path) -> None:
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > EXTERNAL_DATA_ABOVE:  # beside the output, under the output's final name
        ir.save(model, tmp, external_data=f"{dst.name}.data")
    else:
        ir.save(model, tmp)


def _op_counts(model: ir.Model) -> dict[str, int]:
    return dict(Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                        for n in model.graph.all_nodes()).most_common())
