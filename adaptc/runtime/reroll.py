"""A re-rolled module at run time: its forward replaced by its exported graph, in which n chained
applications of one weight-shared block are one `while_loop` over the block's body (passes/reroll.py).

The graph is torch.export's lifted form (weights are inputs), so the module's own parameters are read at
each call: its state_dict, parameter names and sharing with the original are untouched, and a whole-model
torch.export traces through it, the loop staying one `while_loop` in that graph. A call the graph was not
traced for (another argument structure, dtype, size range, or a failed shape guard) runs the module's own
forward, which computes the same function.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .module import signature_accepts


class LoopedForward:
    """The graph, the state it reads and the checks that send a call to it; `as_forward()` is what is
    installed as `module.forward` (an instance attribute, so rollback is a delattr; a function, not an
    nn.Module, so nothing is added to the module tree)."""

    def __init__(self, owner: nn.Module, graph: torch.fx.GraphModule, state: list[str], constants: list[torch.Tensor],
                 signature: Any, guards: Callable[[tuple, dict], bool] | None, out_spec: Any):
        self.owner, self.graph, self.constants = owner, graph, constants
        # the owner's parameters / buffers the graph reads first: (module, attribute), read at each call
        self.state = [_holder(owner, name) for name in state]
        self.signature, self.guards, self.out_spec = signature, guards, out_spec
        self.fallback = owner.forward  # the module's own forward (bound), for calls the graph does not serve

    def as_forward(self) -> Callable[..., Any]:
        """A function with the module's forward signature (torch.export reads forward's code and
        signature; generate() its parameters)."""
        @functools.wraps(self.fallback)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        forward.looped = self
        return forward

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        if not signature_accepts(self.signature, args, kwargs):
            return False
        return self.guards is None or self.guards(tuple(_tensors(args, kwargs)), {})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.accepts(args, kwargs):
            return self.fallback(*args, **kwargs)
        state = [getattr(module, attr) for module, attr in self.state]
        out = self.graph(*state, *self.constants, *_tensors(args, kwargs))
        return pytree.tree_unflatten(list(out), self.out_spec)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


def _holder(owner: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (owner.get_submodule(module_path) if module_path else owner), attr


def looped_forward_of(module: nn.Module) -> LoopedForward | None:
    """The re-rolled graph installed on `module` (None without one)."""
    return getattr(module.__dict__.get("forward"), "looped", None)
