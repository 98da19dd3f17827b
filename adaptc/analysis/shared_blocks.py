"""Which blocks run repeatedly in sequence with shared weights: ALBERT's layer group, `for _ in range(n): x = block(x)`.

Read from the module tree while the model runs on example inputs (forward hooks record each module call,
its caller, its first tensor in and out): a run is consecutive calls made by one caller to the same
module — or to modules holding the very same parameters — with no other module called in between and each
fed a new tensor (`x = x + block(x)` counts: the residual is plain torch code, not a module). This is what
tracing unrolls into n copies, and what the ONNX `reroll` rule folds back into one Loop (which checks the
data flow exactly on the graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class SharedRun:
    caller: str          # the module whose forward makes the calls ("" is the root)
    block: str           # the (first) module called
    calls: int
    parameters: int      # shared by every call

    def to_dict(self) -> dict[str, Any]:
        return {"caller": self.caller, "block": self.block, "calls": self.calls, "parameters": self.parameters}


def shared_runs(model: nn.Module, run: Callable[[], Any]) -> list[SharedRun]:
    """Runs of >= 2 chained calls of one weight-shared block while `run()` runs, outermost callers first."""
    paths = {m: p for p, m in model.named_modules(remove_duplicate=False)}
    # per call: the enclosing call's index (-1: none), the module, its first tensor in and out (the tensors
    # themselves, kept alive while `run` runs: the ids of freed ones get reused)
    calls: list[list[Any]] = []
    stack: list[int] = []

    def pre(module, args, kwargs):
        calls.append([stack[-1] if stack else -1, module, _first_tensor((args, kwargs)), None])
        stack.append(len(calls) - 1)

    def post(module, args, kwargs, out):
        calls[stack.pop()][3] = _first_tensor(out)

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in paths]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in paths]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return _runs(calls, paths)


def _runs(calls: list[list[Any]], paths) -> list[SharedRun]:
    by_caller: dict[int, list[list[Any]]] = {}  # one caller's call: its own calls, in order
    for call in calls:
        by_caller.setdefault(call[0], []).append(call)
    found = []
    for chain in by_caller.values():
        i = 0
        while i < len(chain):
            j = i + 1
            while j < len(chain) and _same_block(chain[i][1], chain[j][1]) and chain[j][2] is not None \
                    and chain[j][2] is not chain[j - 1][2]:  # the same x twice is a fan-out, not a sequence
                j += 1
            params = sum(p.numel() for p in chain[i][1].parameters())
            if j - i >= 2 and params:
                caller = paths[calls[chain[i][0]][1]] if chain[i][0] >= 0 else ""
                found.append(SharedRun(caller, paths[chain[i][1]], j - i, params))
            i = j
    return sorted(set(found), key=lambda r: (r.caller.count(".") if r.caller else -1, r.caller, r.block))


def _same_block(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    pa, pb = [id(p) for p in a.parameters()], [id(p) for p in b.parameters()]
    return bool(pa) and pa == pb and type(a) is type(b)


def _first_tensor(obj) -> torch.Tensor | None:
    """The first tensor in a (nested) structure: what a block hands on to the next call."""
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        obj.values() if hasattr(obj, "values") and callable(obj.values) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None
