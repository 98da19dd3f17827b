"""What compile() hands back, and the adaptc state every compiled module carries."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

STATE_ATTR = "_adaptc_state"


@dataclass
class CompiledState:
    report: dict[str, Any]
    plan: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass -> site path -> site plan
    config: dict[str, Any] = field(default_factory=dict)


def attach(module: nn.Module, state: CompiledState) -> nn.Module:
    object.__setattr__(module, STATE_ATTR, state)
    return module


def state_of(module: nn.Module) -> CompiledState:
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        raise TypeError(f"{type(module).__name__} was not made by adaptc.compile or adaptc.load")
    return state


class CompiledModule(nn.Module):
    """A captured graph with the rewritten eager model beside it.

    Calls shaped like the captured example (same arguments, tensor ranks and dtypes; batch and sequence
    sizes free) run the graph; anything else runs the eager model, which computes the same function.
    Attributes the user's model had (config, device, ...) are forwarded to it.
    """

    def __init__(self, graph: nn.Module, signature: Any, eager: nn.Module | None = None):
        super().__init__()
        self.graph = graph
        self.eager = eager
        self._signature = signature

    @staticmethod
    def signature_of(args: tuple, kwargs: dict) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        return str(spec), [(x.ndim, x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager is None or self.signature_of(args, kwargs) == self._signature:
            return self.graph(*args, **kwargs)
        return self.eager(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("eager") or self._modules.get("graph")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)
