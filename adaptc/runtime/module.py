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


def signature_accepts(signature: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call fits `signature` (CompiledModule.signature_of): the same argument structure and
    non-tensor values, dtypes, fixed sizes, and symbolic sizes within their ranges (one size per symbol)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    want_spec, want = signature
    if str(spec) != want_spec or len(leaves) != len(want):
        return False
    symbols: dict[str, int] = {}  # a symbol shared by several dims needs one size for all
    for x, w in zip(leaves, want):
        if not isinstance(x, torch.Tensor):
            if x != w:
                return False
            continue
        if not (isinstance(w, tuple) and len(w) == 2) or x.dtype != w[0] or x.ndim != len(w[1]):  # None traced
            return False
        for dim, n in zip(w[1], x.shape):
            if isinstance(dim, int):
                if dim != n:
                    return False
            elif dim is not None:
                name, lo, hi = dim
                if n < lo or (hi is not None and n > hi) or symbols.setdefault(name, n) != n:
                    return False
    return True


class CompiledModule(nn.Module):
    """A captured graph with the rewritten eager model beside it.

    Calls the graph accepts (the example's argument structure and dtypes, tensor sizes free where the
    graph kept them symbolic, torch's shape guards) run the graph; anything else runs the eager model,
    which computes the same function. Attributes the user's model had (config, device, ...) are
    forwarded to it.
    """

    def __init__(self, graph: nn.Module, signature: Any, eager: nn.Module | None = None, guards: Any = None):
        super().__init__()
        self.graph = graph
        self.eager = eager
        self._signature = signature
        # torch's shape guards as a predicate on a call; None: the graph checks them itself and raises.
        self.guards = guards
        # Size class ("one_row": the first tensor has one row, else "batched") -> "eager" or "original":
        # compile's speed check sends a size the graph is slower at to the faster module; the original
        # (set as `original`) shares its parameters with the rewrite.
        self.routes: dict[str, str] = {}

    @staticmethod
    def size_class(args: tuple, kwargs: dict) -> str:
        first = next((x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.ndim), None)
        return "one_row" if first is not None and first.shape[0] == 1 else "batched"

    @staticmethod
    def signature_of(args: tuple, kwargs: dict, shapes: list[tuple[Any, ...]] | None = None) -> Any:
        """What a call must look like to run the graph: `shapes` gives each tensor dim's fixed size or
        its (symbol, min, max) range (None: any size, for fx graphs)."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = iter(shapes or [])
        return str(spec), [(x.dtype, next(tensors, (None,) * x.ndim)) if isinstance(x, torch.Tensor) else x
                           for x in leaves]

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        return signature_accepts(self._signature, args, kwargs) and (self.guards is None or self.guards(args, kwargs))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager is None:
            return self.graph(*args, **kwargs)
        route = self.routes.get(self.size_class(args, kwargs), "graph") if self.routes else "graph"
        if route == "graph" and self.accepts(args, kwargs):
            try:
                return self.graph(*args, **kwargs)
            except AssertionError as exc:  # torch's own guard check (guards None), before the graph computes
                if self.guards is not None or "Guard failed" not in str(exc):
                    raise
        return (self.original if route == "original" else self.eager)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self._modules.get("eager") or self._modules.get("graph")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)
