"""One controller per decoder layer stack: ordered per-token policies decide between the blocks.

    controller = install_policy(layers, policy, kv_projection_for(layers))   # a second pass adds to it
    controller.policies                                                      # in the order installed

Every decoder layer's `forward` is gated in place (an instance attribute), so parameter names, the
model's own loop, its KV cache and generate() stay untouched; the gate of block i hands the call to
the controller. Before block i each policy may say which live tokens *skip* it (a token router);
after it, which *exit* the stack (early exit; the first policy to claim a token owns it, the next
sees the rest) or would *repeat* it (recursion). After the last block each policy may move the
states it is responsible for (an exit's adapter) before the model's final norm and head read them.

A token that exited or skips block i is *inactive* there: its state passes through unchanged, and the
keys/values later tokens need from block i are projected from that state (CALM's propagation, by
the stack's `KVProjection`). With a KV cache and one new token a row (decoding), inactive rows pay
only that projection and the active rows run the block alone; otherwise (prefill, no cache) the block
runs on every token and inactive ones get their state back, which computes the same K/V. So cached
and uncached generation compute the same function, whatever the policies decide.

What one forward call decided (which tokens exited, where) lives in a `StackCall` created at block 0
and held per thread, never on the shared controller: two threads may call one compiled model.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..analysis.kv_projection import KVProjection
from ..errors import AdaptcError


class StackPolicy:
    """One family of per-token decisions between the blocks of a stack. A policy holds what it was
    fitted with (a plan, heads, its stats); everything about one call lives in the state `begin`
    returns, which every hook of that call receives. `h` are the live tokens' states [N, D] and
    `where` their (row, position) indices in the [B, S] call; a decision is an [N] bool mask."""

    name = "policy"

    def begin(self, tokens: torch.Size, device: torch.device) -> Any:
        return None

    def acts_before(self, i: int) -> bool:
        return False

    def skip(self, state: Any, i: int, h: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """Before block i: the tokens that skip it (they stay in the stack)."""
        return None

    def acts_after(self, i: int) -> bool:
        return False

    def exit(self, state: Any, i: int, h_in: torch.Tensor, h_out: torch.Tensor,
             where: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """After block i (h_in entering it, h_out leaving it): the tokens that leave the stack."""
        return None

    def repeat(self, state: Any, i: int, h_in: torch.Tensor, h_out: torch.Tensor,
               where: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """After block i: the tokens that would run it again (recursion, issue 18; refused until its
        K/V rule is defined: a second pass through a block has no cache slot of its own)."""
        return None

    def finish(self, state: Any, h: torch.Tensor, exited: torch.Tensor) -> torch.Tensor:
        """After the last block: the [B, S, D] states the final norm reads (exited: [B, S])."""
        return h

    def end(self, state: Any, call: "StackCall") -> None:
        """The call is over: merge what it did into the policy's statistics (under the controller's lock)."""


@dataclass
class StackCall:
    """One forward call through the stack."""

    exited: torch.Tensor                        # [B, S] bool: left the stack (by any policy)
    states: list[Any]                           # one per policy, from its begin()
    kv_fill_tokens: int = 0                     # K/V projected for inactive tokens, summed over blocks
    kv_fill_seconds: float = 0.0
    policies: tuple[StackPolicy, ...] = field(default_factory=tuple)  # the ones this call began with


class StackController:
    """The policies of one stack and the one loop body every gated block runs."""

    def __init__(self, num_layers: int, kv: KVProjection | None):
        self.num_layers, self.kv = num_layers, kv
        self.policies: tuple[StackPolicy, ...] = ()
        self._local, self._lock = threading.local(), threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: per-thread calls and locks do not travel
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local, self._lock = threading.local(), threading.Lock()

    def policy(self, kind: type) -> Any:
        return next((p for p in self.policies if isinstance(p, kind)), None)

    def run_block(self, i: int, layer: nn.Module, forward: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if i == 0:
            policies = self.policies
            self._local.call = StackCall(torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device),
                                         [p.begin(hidden.shape[:2], hidden.device) for p in policies], policies=policies)
        call: StackCall | None = getattr(self._local, "call", None)
        if call is None:  # a block called on its own, outside the model's loop: nothing to decide
            return forward(hidden, *args, **kwargs)
        live = ~call.exited
        inactive = self._skips(call, i, hidden, live)
        out = self._run(call, layer, forward, hidden, args, kwargs, inactive)
        h_out = first(out)
        self._exits(call, i, hidden, h_out, live)
        if i == self.num_layers - 1:
            for p, st in zip(call.policies, call.states):
                h_out = p.finish(st, h_out, call.exited)
            out = with_first(out, h_out)
            with self._lock:
                for p, st in zip(call.policies, call.states):
                    p.end(st, call)
            self._local.call = None
        return out

    def _skips(self, call: StackCall, i: int, hidden: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """[B, S] tokens inactive at block i: those that exited and those a policy skips past it."""
        acting = [(p, st) for p, st in zip(call.policies, call.states) if p.acts_before(i)]
        if not acting or not bool(live.any()):
            return call.exited
        where = live.nonzero(as_tuple=True)
        h = hidden[where]
        skip = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        for p, st in acting:
            m = p.skip(st, i, h, where)
            if m is not None:
                skip |= m
        if not bool(skip.any()):
            return call.exited
        inactive = call.exited.clone()
        inactive[where[0][skip], where[1][skip]] = True
        return inactive

    def _exits(self, call: StackCall, i: int, hidden: torch.Tensor, h_out: torch.Tensor, live: torch.Tensor) -> None:
        acting = [(p, st) for p, st in zip(call.policies, call.states) if p.acts_after(i)]
        if not acting or not bool(live.any()):
            return
        where = live.nonzero(as_tuple=True)
        h_in, h_o = hidden[where], h_out[where]
        for p, st in acting:
            leave = p.exit(st, i, h_in, h_o, where)
            if leave is not None and bool(leave.any()):
                call.exited[where[0][leave], where[1][leave]] = True
                stay = ~leave
                where, h_in, h_o = (where[0][stay], where[1][stay]), h_in[stay], h_o[stay]
            again = p.repeat(st, i, h_in, h_o, where)
            if again is not None and bool(again.any()):
                raise AdaptcError(f"policy {p.name!r} asked to repeat block {i}: repeats are not supported yet")
            if not h_in.shape[0]:
                return

    def _run(self, call: StackCall, layer: nn.Module, forward: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict,
             inactive: torch.Tensor) -> Any:
        if not bool(inactive.any()):
            return forward(hidden, *args, **kwargs)
        cache = find_cache(args, kwargs)
        if hidden.shape[1] == 1 and cache is not None:
            return self._decode_step(call, layer, forward, hidden, args, kwargs, cache, ~inactive[:, 0])
        # prefill / no cache: the block computes inactive tokens' K/V from their states
        out = forward(hidden, *args, **kwargs)
        return with_first(out, torch.where(inactive.unsqueeze(-1), hidden, first(out)))

    def _decode_step(self, call: StackCall, layer: nn.Module, forward: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict,
                     cache: Any, active: torch.Tensor) -> Any:
        if self.kv is None:
            raise AdaptcError("tokens skipped a cached block, but no K/V projection is known for its layers")
        batch = hidden.shape[0]
        start = time.perf_counter()
        k, v, layer_idx = self.kv.kv(layer, hidden[~active], *take_rows((args, kwargs), ~active, batch))
        call.kv_fill_tokens += int((~active).sum())
        call.kv_fill_seconds += time.perf_counter() - start
        if not bool(active.any()):
            cache.update(k, v, layer_idx)
            return hidden
        proxy = _RowsOfCache(cache, active, (k, v), batch)
        sub_args, sub_kwargs = take_rows((args, kwargs), active, batch)
        sub_args = tuple(proxy if a is cache else a for a in sub_args)
        sub_kwargs = {n: (proxy if a is cache else a) for n, a in sub_kwargs.items()}
        sub_out = forward(hidden[active], *sub_args, **sub_kwargs)
        out = hidden.clone()
        out[active] = first(sub_out)
        return with_first(sub_out, out)


class GatedBlock:
    """Replaces one block's `forward` (instance attribute) and hands every call to the controller."""

    def __init__(self, layer: nn.Module, index: int, controller: StackController):
        self.forward = layer.forward  # the bound original
        self.layer, self.index, self.controller = layer, index, controller

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.controller.run_block(self.index, self.layer, self.forward, hidden_states, args, kwargs)


def install_policy(layers: nn.ModuleList, policy: StackPolicy, kv: KVProjection | None,
                   set_attr: Callable[[Any, str, Any], None] = setattr) -> StackController:
    """Add `policy` to the stack's controller, gating the blocks first if no pass has. set_attr:
    ModuleEdit.set_attr, so a rollback removes the policy (and the gates, if it added them)."""
    controller = controller_of(layers)
    if controller is None:
        controller = StackController(len(layers), kv)
        for i, layer in enumerate(layers):
            set_attr(layer, "forward", GatedBlock(layer, i, controller))
    set_attr(controller, "policies", (*controller.policies, policy))
    return controller


def controller_of(module: nn.Module) -> StackController | None:
    for m in module.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, GatedBlock):
            return fwd.controller
    return None


# -- compaction, gather / scatter: shared with the encoder runtime ----------------------------------

def first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def with_first(out: Any, h: torch.Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


def take_rows(x: Any, keep: torch.Tensor, batch: int) -> Any:
    """Rows `keep` of every tensor whose first dim is the batch (broadcast tensors stay as they are)."""
    if isinstance(x, torch.Tensor):
        return x[keep] if x.dim() > 0 and x.shape[0] == batch else x
    if isinstance(x, tuple):
        return tuple(take_rows(v, keep, batch) for v in x)
    if isinstance(x, list):
        return [take_rows(v, keep, batch) for v in x]
    if isinstance(x, dict):
        return {k: take_rows(v, keep, batch) for k, v in x.items()}
    return x


def find_cache(args: tuple, kwargs: dict) -> Any:
    from transformers.cache_utils import Cache

    return next((x for x in (*args, *kwargs.values()) if isinstance(x, Cache)), None)


class _RowsOfCache:
    """What the active rows' attention sees: its update() writes the active rows' K/V together with
    the inactive rows' propagated K/V into the real cache, and returns the active rows' part."""

    def __init__(self, cache: Any, active: torch.Tensor, inactive_kv: tuple[torch.Tensor, torch.Tensor], batch: int):
        self._cache, self._active, self._inactive_kv, self._batch = cache, active, inactive_kv, batch

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        full_k = key.new_empty((self._batch, *key.shape[1:]))
        full_v = value.new_empty((self._batch, *value.shape[1:]))
        full_k[self._active], full_v[self._active] = key, value
        full_k[~self._active], full_v[~self._active] = self._inactive_kv
        keys, values = self._cache.update(full_k, full_v, layer_idx, *args, **kwargs)
        return keys[self._active], values[self._active]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)
