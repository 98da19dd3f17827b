"""Whole-graph capture: torch.export (strict=False, dynamic batch / sequence dims), then fx as fallback."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from .guards import Guards, tracer_guards
from .inputs import Inputs, _dynamic_dims


@dataclass
class Captured:
    method: str                 # "export" | "fx"
    module: nn.Module           # callable graph module
    program: Any = None         # the ExportedProgram, when method == "export"
    # Per tensor input, each dim: its fixed size, or (symbol, min, max) where the graph kept it symbolic.
    shapes: list[tuple[Any, ...]] | None = None
    # torch's guards for CompiledModule.accepts to check; None: the graph module checks them itself.
    guards: Guards | None = None


def is_driven_from_python(model: nn.Module) -> bool:
    """Models whose Python API (generate(), KV caches) must survive keep block granularity."""
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def dynamic_shapes(model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """Batch and sequence dims of every tensor input, marked AUTO so export keeps them symbolic."""
    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)

    def spec(x: Any) -> Any:
        return {d: torch.export.Dim.AUTO for d in _dynamic_dims(x)} if isinstance(x, torch.Tensor) else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def export(model: nn.Module, inputs: Inputs) -> Captured:
    # export specialises a dim whose example size is 1; trace on size-2 inputs so it stays symbolic.
    batch, seq = inputs.batch_seq()
    if batch == 1 or seq == 1:
        inputs = inputs.resized(max(batch, 2), seq and max(seq, 2), torch.Generator().manual_seed(0))
    program = torch.export.export(
        model, inputs.args, inputs.kwargs, dynamic_shapes=dynamic_shapes(model, inputs), strict=False
    )
    # CompiledModule.accepts checks sizes and torch's guards itself: the graph's own check costs ~0.25 ms
    # a call. Where the guards cannot be read, the graph keeps that check.
    guards = tracer_guards(program, model)
    try:
        graph = program.module(check_guards=guards is None)
    except TypeError:  # torch without the flag
        graph = program.module()
    return Captured("export", graph, program, input_shapes(program), guards)


def input_shapes(program: Any) -> list[tuple[Any, ...]]:
    """Per tensor input, each dim: its size if export fixed it, else (symbol, min, max or None)."""
    from torch.export.graph_signature import InputKind

    user = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
    ranges = {str(sym): r for sym, r in program.range_constraints.items()}
    shapes = []
    for node in program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if isinstance(val, torch.Tensor):
            shapes.append(tuple(_dim(d, ranges) for d in val.shape))
    return shapes


def _dim(d: Any, ranges: dict[str, Any]) -> Any:
    # A dim marked Dim.AUTO that export specialised is a SymInt whose expression is a number: fixed.
    expr = d if isinstance(d, int) else str(d.node.expr)
    return int(expr) if isinstance(expr, int) or expr.isdigit() else _symbolic_dim(expr, ranges)


def _finite(bound: Any) -> int | None:
    text = str(bound)  # sympy integers, or torch's int_oo / -int_oo
    return int(text) if text.lstrip("-").isdigit() else None


def _symbolic_dim(expr: str, ranges: dict[str, Any]) -> tuple[str, int, int | None]:
    r = ranges.get(expr)
    lo = _finite(r.lower) if r is not None else None
    hi = _finite(r.upper) if r is not None else None
    lo = lo or 0
    # Export traces with sizes >= 2 so that 0/1 do not specialise, and its graphs serve 0 and 1 too
    # (its own guard check allows them): only a larger lower bound is real.
    return expr, (lo if lo > 2 else 0), hi


def fx_trace(model: nn.Module, inputs: Inputs) -> Captured:
    return Captured("fx", torch.fx.symbolic_trace(model))


METHODS: dict[str, Callable[[nn.Module, Inputs], Captured]] = {"export": export, "fx": fx_trace}


def capture(model: nn.Module, inputs: Inputs, methods: tuple[str, ...] = ("export", "fx")) -> Captured:
    """The first method that captures `model`; CaptureError names each failed construct otherwise."""
    failures = []
    for name in methods:
        try:
            with _torch_quiet():
                return METHODS[name](model, inputs)
        except Exception as exc:
            failures.append(f"{_method_label(name)} failed on {describe(exc)}")
    raise CaptureError(f"cannot capture {type(model).__name__}: " + "; then ".join(failures))


@contextlib.contextmanager
def _torch_quiet():
    """On failure torch.export prints its partial traced graph to stderr (once per nested export
    wrapper) and logs warnings; adaptc's one-line error names the construct instead. ADAPTC_DEBUG=1
    keeps torch's output."""
    if os.environ.get("ADAPTC_DEBUG", "") not in ("", "0"):
        yield
        return
    torch_log = logging.getLogger("torch")  # its children (export, symbolic_shapes) inherit the level
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        torch_log.setLevel(level)


def _method_label(name: str) -> str:
    return {"export": "torch.export (strict=False)", "fx": "torch.fx.symbolic_trace (fallback)"}[name]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)')


def describe(exc: BaseException) -> str:
    """The construct that stopped capture: the error's first line and the innermost user frame."""
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first if len(first) < 200 else first[:197] + "..."
    frames = [m for m in _FRAME.finditer(text) if "site-packages/torch" not in m.group(1)]
    if not frames and exc.__traceback__ is not None:
        import traceback

        tb = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages/torch" not in f.filename
              and "/adaptc/" not in f.filename]
        if tb:
            f = tb[-1]
            return f"{type(exc).__name__}: {first} (at {f.filename}:{f.lineno} in {f.name}: {f.line})"
    if frames:
        f = frames[-1]
        return f"{type(exc).__name__}: {first} (at {f.group(1)}:{f.group(2)} in {f.group(3)}: {f.group(4).strip()})"
    return f"{type(exc).__name__}: {first}"
