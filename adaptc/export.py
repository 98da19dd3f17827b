"""A module compiled by `adaptc.compile` (or read by `adaptc.load`) written to ONNX, verified in onnxruntime.

    report = adaptc.export_onnx(fast, (ids, mask), "model.onnx")

Whole-graph captures only: the exported program goes through `torch.onnx.export(dynamo=True)` with
ONNX forms of the adaptc ops (each kernel folder's `onnx_export.py`), then the ONNX `reroll` rule folds
the unrolled calls of a weight-shared block (ALBERT's layers) back into one Loop:
- `adaptc::attention` → ONNX `Attention` (opset 23) with a boolean mask built from causal/window/padding;
- `adaptc::fused_moe` → standard ops (all experts as two batched MatMuls, combined by the top-k weights).
Ops without an ONNX form (adaptc::sparse_attention, the early-exit gates) and block-granularity modules
(Hugging Face causal LMs compiled with generate() support: Python drives the layers, there is no one
graph) are refused with a CaptureError that says so. Nothing is written unless onnxruntime's outputs
match the compiled module's on the example inputs.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .errors import AdaptcError, CaptureError, VerificationError

OPSET = 23  # ONNX Attention


def onnx_translations() -> dict[Any, Any]:
    """adaptc op overload → the onnxscript function that writes its ONNX form."""
    from . import kernels  # noqa: F401  (registers the adaptc:: ops)
    from .kernels.attention.onnx_export import onnx_attention
    from .kernels.linear.onnx_export import onnx_linear
    from .kernels.moe.onnx_export import onnx_fused_moe

    return {torch.ops.adaptc.attention.default: onnx_attention, torch.ops.adaptc.fused_moe.default: onnx_fused_moe,
            torch.ops.adaptc.linear.default: onnx_linear}


def export_onnx(module: torch.nn.Module, example_inputs: Any = None, path: str | os.PathLike = "model.onnx",
                verify: bool = True, tolerance: float = 1e-4, overwrite: bool = True) -> dict[str, Any]:
    """Write `module` (from adaptc.compile/load, captured as one graph) to ONNX at `path`; returns a report.

    example_inputs: a tuple of positional arguments or a dict of keyword arguments; None uses the ones the
    exported program was captured with. Sizes the program kept symbolic stay dynamic in the ONNX file.
    Raises CaptureError when the module is not one graph or calls an op without an ONNX form, and
    VerificationError when onnxruntime's outputs differ by more than `tolerance` (relative to the
    largest output magnitude); nothing is written then. `overwrite=False` refuses
    an existing file at `path` (as `adaptc export` does without --force); a missing folder is created.
    """
    from .convert import check_output, staged
    from .runtime.module import state_of

    try:
        state = state_of(module)
    except TypeError as e:
        raise AdaptcError(f"export_onnx takes a module from adaptc.compile or adaptc.load: {e}") from None
    program = getattr(module, "_program", None)
    if program is None:
        capture = state.report.get("capture", {})
        raise CaptureError(
            f"{type(module).__name__} was compiled at {capture.get('granularity', 'block')} granularity "
            f"({capture.get('reason', 'no whole graph was captured')}): it is not one graph, so there is nothing to "
            "export. Export the original model with torch.onnx.export, or compile a pure function (capture='graph').")
    table = onnx_translations()
    used = Counter(n.target for n in program.graph.nodes if n.op == "call_function" and _is_adaptc(n.target))
    missing = sorted(_op_name(t) for t in used if t not in table)
    if missing:
        raise CaptureError(f"{', '.join(missing)} has no ONNX form (ONNX forms exist for "
                           f"{', '.join(sorted(_op_name(t) for t in table))}); export the module compiled without "
                           "the pass that introduced it")
    args, kwargs = _split_inputs(example_inputs, program)
    dst = Path(path)
    check_output(dst, overwrite, {})

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                             custom_translation_table=table, verbose=False, optimize=True)
        except Exception as e:  # the exporter's own errors are long; the first line names the op or shape
            line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise CaptureError(f"torch.onnx.export failed on the compiled graph: {line[:300]}") from None
    _drop_unused_outputs(onnx_program.model)
    rerolled = _reroll(onnx_program.model)
    report: dict[str, Any] = {"path": str(dst), "opset": OPSET, "reroll": rerolled,
                              "adaptc_ops": {_op_name(t): n for t, n in used.items()},
                              "onnx_ops": dict(Counter(n.op_type for n in onnx_program.model.graph.all_nodes()).most_common())}
    with staged(dst, overwrite) as tmp:  # a large model's external data is named after `tmp`, so after `dst`
        try:
            onnx_program.save(str(tmp), external_data=_weights_bytes(program) > 1_800_000_000)
        except OSError as e:
            raise AdaptcError(f"cannot write {dst}: {e.strerror or e}") from None
        if verify:
            report["verification"] = _verify(module, tmp, args, kwargs, tolerance)
            if not report["verification"]["ok"]:
                worst = report["verification"]["worst"]
                raise VerificationError(f"the ONNX file differs from the compiled module: output {worst['output']} by "
                                        f"rel {worst['max_rel']:.3g} > {tolerance:.0e}; nothing written")
    return report


def _is_adaptc(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "adaptc"


def _op_name(target: Any) -> str:
    return f"adaptc::{target._opname}" if isinstance(target, torch._ops.OpOverload) else str(target)


def _split_inputs(example_inputs: Any, program) -> tuple[tuple, dict]:
    if example_inputs is None:
        stored = getattr(program, "example_inputs", None)
        if stored is None:
            raise AdaptcError("export_onnx needs example_inputs: this program carries none")
        return tuple(stored[0]), dict(stored[1])
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}


def _drop_unused_outputs(model) -> None:
    """The ONNX forms are traced with every declared output (Attention's present K/V and scores); a node
    that asks for fewer outputs lets onnxruntime skip computing them."""
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Attention" or len(node.outputs) == 1:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            continue
        slim = ir.Node(node.domain, node.op_type, list(node.inputs), list(node.attributes.values()),
                       num_outputs=1, name=node.name)
        graph.insert_before(node, slim)
        ir.convenience.replace_all_uses_with(node.outputs[0], slim.outputs[0], replace_graph_outputs=True)
        if node.outputs[0].is_graph_output():
            slim.outputs[0].name = node.outputs[0].name
        graph.remove(node, safe=True)


def _reroll(model) -> dict[str, Any]:
    """Tracing unrolled every call of a weight-shared block: fold them back into ONNX Loops (exact; the
    verification below covers it)."""
    from .passes.onnx import Reroll, apply_rules

    nodes = sum(1 for _ in model.graph.all_nodes())
    [result] = apply_rules(model, [Reroll()])
    return {**result.to_dict(), "nodes": {"before": nodes, "after": sum(1 for _ in model.graph.all_nodes())}}


def _weights_bytes(program) -> int:
    return sum(t.numel() * t.element_size() for t in program.state_dict.values())


def _verify(module, path: Path, args: tuple, kwargs: dict, tolerance: float) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise VerificationError(f"onnxruntime cannot load the exported model: {line[:300]}; nothing written") from None
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise VerificationError(f"the ONNX model takes {len(names)} inputs, the example has {len(tensors)} tensors")
    actual = session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)})
    with torch.no_grad():
        expected = [x for x in pytree.tree_leaves(module(*args, **kwargs)) if isinstance(x, torch.Tensor)]
    if len(expected) != len(actual):
        raise VerificationError(f"the ONNX model gives {len(actual)} outputs, the module {len(expected)}")
    outputs = {}
    for info, e, a in zip(session.get_outputs(), expected, actual):
        e = e.detach().cpu().float().numpy().astype(np.float64)
        a = a.astype(np.float64)
        abs_err = float(np.abs(e - a).max()) if e.shape == a.shape else float("inf")
        outputs[info.name] = {"max_abs": abs_err, "max_rel": abs_err / max(float(np.abs(e).max()), 1e-6),
                              "shape": list(e.shape)}
    worst = max(outputs, key=lambda n: outputs[n]["max_rel"])
    return {"ok": all(r["max_rel"] <= tolerance for r in outputs.values()), "outputs": outputs,
            "worst": {"output": worst, **outputs[worst]}, "tolerance": tolerance}
