"""Which module makes which torch calls: the innermost module on the stack when a function runs."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def innermost_callers(model: nn.Module, run: Callable[[], Any], wanted: Callable[[Any], bool],
                      note: Callable[..., Any] = lambda func, *args, **kwargs: None) -> dict[str, list[Any]]:
    """Module path -> note(func, *args, **kwargs) for each call of a `wanted` torch function that
    module made itself (not through a child module) while `run()` ran ("" is the root)."""
    paths = {m: p for p, m in model.named_modules()}
    stack: list[str] = []
    calls: dict[str, list[Any]] = {}

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if wanted(func):
                calls.setdefault(stack[-1] if stack else "", []).append(note(func, *args, **kwargs))
            return func(*args, **kwargs)

    def push(module, args):
        if module in paths:
            stack.append(paths[module])

    def pop(module, args, out):
        if module in paths and stack:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(push),
               nn.modules.module.register_module_forward_hook(pop)]
    try:
        with torch.no_grad(), Record():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls
