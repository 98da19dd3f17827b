"""Where an exported graph computes the model's function: torch's guards, and sizes 0 and 1.

torch.export records the shape conditions its trace relied on (`if x.shape[1] == 5:` traced at 8
records `x.size()[1] != 5`); outside them the graph computes another branch. torch's own check
(`program.module(check_guards=True)`) is a call into the graph costing ~0.25 ms; `Guards` evaluates
the same expressions on the bound arguments, so CompiledModule.accepts sends a failing call to the
eager rewrite. Export also assumes sizes 0 and 1 behave like the sizes >= 2 it traced: a `shape[1] == 1`
fast path is invisible to its guards. `size_one_floors` lets the graph serve size 1 only where it was
checked there against the model.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..verify import compare
from .inputs import Inputs


class Guards:
    """torch's guard expressions (`L['x'].size()[1] != 5`) as one predicate over a call's bound arguments."""

    def __init__(self, code: list[str], signature: inspect.Signature):
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

        self.code = list(code)
        self.signature = signature
        namespace = {**SYMPY_INTERP, "math": math, "inf": float("inf"), "torch": torch}
        self._fn = eval("lambda L: " + " and ".join(f"({c})" for c in code), namespace) if code else None

    def __call__(self, args: tuple, kwargs: dict) -> bool:
        if self._fn is None:
            return True
        try:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return bool(self._fn(bound.arguments))
        except Exception:  # a call it cannot judge runs the eager rewrite, which is never wrong
            return False


def tracer_guards(program: Any, model: nn.Module) -> Guards | None:
    """The program's guards as a `Guards`; None where they cannot be read (an older torch, a form this
    does not know): the graph then keeps torch's own check."""
    code = getattr(program, "_guards_code", None)
    if code is None or program.example_inputs is None:
        return None
    args, kwargs = program.example_inputs
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        # non-strict export may name inputs by their flat position; torch maps them the same way
        paths = [path for path, _ in pytree.tree_leaves_with_path(bound.arguments)]
        for i in reversed(range(len(paths))):  # [1] before [10] would clobber it
            code = [c.replace(f"L['flat_args'][{i}]", "L" + pytree.keystr(paths[i])) for c in code]
        guards = Guards(code, signature)
    except Exception:
        return None
    return guards if guards(args, kwargs) else None  # the trace's own inputs pass, or the reading is wrong


def size_one_floors(graph: nn.Module, original: nn.Module, inputs: Inputs, shapes: list[tuple[Any, ...]],
                    *, verify: bool, seed: int = 0, vocab: int | None = None) -> tuple[list[tuple[Any, ...]], dict]:
    """`shapes` with each symbolic dim's lower bound raised to 1 where the graph matched `original` on a
    one-row / one-token call, else to 2 (sizes below it run eager); and what was found, for the report."""
    first = shapes[0] if shapes else ()
    batch, seq = inputs.batch_seq()
    names = {"batch": first[0][0] if first and isinstance(first[0], tuple) else None,
             "sequence": first[1][0] if seq is not None and len(first) > 1 and isinstance(first[1], tuple) else None}
    # export may name another input's batch / sequence dims apart (an attention mask): the probe
    # resizes them all, so what holds for the first tensor's symbol holds for theirs
    tensors = [x for x in pytree.tree_leaves((inputs.args, inputs.kwargs)) if isinstance(x, torch.Tensor)]
    roles = {role: {s[d][0] for s, x in zip(shapes, tensors) if len(s) > d and isinstance(s[d], tuple) and x.shape[d] == n}
             for role, d, n in (("batch", 0, batch), ("sequence", 1, seq)) if n is not None}
    gen = torch.Generator().manual_seed(seed)
    found: dict[str, str] = {}
    ones: set[str] = set()
    for role, symbol in names.items():
        if symbol is None:
            continue
        probe = inputs.resized(1, seq, gen, vocab) if role == "batch" else inputs.resized(batch, 1, gen, vocab)
        ok = verify and _matches(graph, original, probe)
        found[role] = "graph" if ok else ("eager: the graph differs from the model at size 1" if verify
                                          else "eager: not verified at size 1")
        if ok:
            ones.update(roles.get(role, set()) | {symbol})

    def floor(dim: Any) -> Any:
        if not isinstance(dim, tuple):
            return dim
        name, lo, hi = dim
        return name, max(lo, 1 if name in ones else 2), hi

    return [tuple(floor(d) for d in shape) for shape in shapes], found


def _matches(graph: nn.Module, original: nn.Module, inputs: Inputs) -> bool:
    with torch.no_grad():
        try:
            got = graph(*inputs.args, **inputs.kwargs)
        except Exception:
            return False
        return compare(original(*inputs.args, **inputs.kwargs), got).ok
