"""Dense code through Inductor: after the passes, compile hands what it emits to `torch.compile`.

    report["inductor"]   # {"enabled", "compiled": [what], "seconds", "reason"}; opt-in: inductor=True

What is compiled depends on what the passes left (always with dynamic shapes; adaptc's custom ops are
traced through their fake implementations):
- a graph (CompiledModule): the captured graph module's forward.
- blocks with no adaptive policy: the model's whole forward, which generate() calls for the prefill
  and every decode step (the KV cache is traced, the Python API untouched). Measured on SmolLM2 on
  CPU, one graph per forward is what makes torch.compile beat eager; per-layer graphs specialise on
  each layer's cache slot (a recompile per layer, past dynamo's limit).
- blocks a StackController gates (early exit, routers): the policies decide between blocks in
  Python, so each block's children that do not touch the KV cache (MLP, norms) and the final norm and
  LM head are compiled; one graph serves every layer (dynamo inlines modules: parameters are inputs).

torch.compile is lazy: the first verification call pays the compile, and models that generate also
run a short generate() so the decode graph is built before the speed check times anything. A compile
that raises, or outputs that differ, undo the compile and the report says why; the model stays eager.
"""
from __future__ import annotations

import functools
import shutil
import time
import types
import warnings
from typing import Any

import torch
from torch import nn

from .passes._base import CompileContext
from .runtime.module import CompiledModule
from .runtime.stack_controller import controller_of

_UNSET = object()


def _calling(fn: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
    return forward


class Compiled:
    """The forwards replaced by compiled ones (instance attributes), so they can be put back.

    Dynamo keeps its graphs, and its recompile limit (8), per code object: the compiled forwards call
    the original through a code object of this compile's own, so a torch.compile of the same model
    class elsewhere in the process shares neither; the blocks of one stack share theirs (one graph)."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, Any]] = []
        self.what: list[str] = []
        self._code = _calling(None).__code__.replace()

    def add(self, label: str, module: nn.Module) -> None:
        self.saved.append((module, module.__dict__.get("forward", _UNSET)))
        proto = _calling(module.forward)
        own = types.FunctionType(self._code, proto.__globals__, "forward", None, proto.__closure__)
        functools.update_wrapper(own, module.forward)  # generate() reads forward's signature
        module.forward = torch.compile(own, dynamic=True)
        self.what.append(label)

    def undo(self) -> None:
        for module, prev in reversed(self.saved):
            if prev is _UNSET:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev
        self.saved, self.what = [], []


def unavailable() -> str | None:
    """Why Inductor cannot run here (None: it can)."""
    if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
        return "no C++ compiler (g++) on this machine: Inductor's CPU code needs one"
    return None


def apply(ctx: CompileContext, emitted: nn.Module) -> tuple[dict[str, Any], Compiled | None]:
    """Compile `emitted` in place and verify it; (the report's section, what to undo or None)."""
    if not ctx.config.inductor:
        return {"enabled": False}, None
    why = unavailable()
    if why is not None:
        return {"enabled": True, "compiled": [], "reason": why}, None
    compiled = Compiled()
    if isinstance(emitted, CompiledModule):
        compiled.add("graph", emitted.graph)
        mode = "graph"
    elif controller_of(emitted) is None:
        compiled.add("forward", emitted)
        mode = "forward"
    else:
        mode = "blocks"
        for name, module in emitted.named_modules():
            if name and _dense_leaf(emitted, name, module):
                compiled.add(name, module)
    start = time.perf_counter()
    failure = _warm_and_verify(ctx, emitted)
    seconds = round(time.perf_counter() - start, 3)
    if failure is not None:
        compiled.undo()
        return {"enabled": True, "compiled": [], "mode": mode, "seconds": seconds,
                "reason": f"stays eager: {failure}"}, None
    return {"enabled": True, "compiled": _summary(compiled.what), "mode": mode, "seconds": seconds,
            "reason": ""}, compiled


def reapply(module: nn.Module, info: dict[str, Any]) -> Compiled | None:
    """adaptc.load: compile what the saved compile had compiled (verified then; lazy again now)."""
    if not isinstance(info, dict) or not info.get("compiled") or unavailable() is not None:  # data from a file
        return None
    compiled = Compiled()
    if info.get("mode") == "graph" and isinstance(module, CompiledModule):
        compiled.add("graph", module.graph)
    elif info.get("mode") == "forward":
        compiled.add("forward", module)
    elif info.get("mode") == "blocks":
        for name, sub in module.named_modules():
            if name and _dense_leaf(module, name, sub):
                compiled.add(name, sub)
    return compiled


def _warm_and_verify(ctx: CompileContext, emitted: nn.Module) -> str | None:
    """The check inputs (compiling on the way) against the original, then a short generate()."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp = ctx.verify(emitted)
            if not cmp.ok:
                return _first_line(cmp.why)
            prompt = _prompt(ctx)
            if prompt is not None:
                with torch.no_grad():
                    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3, do_sample=False)
                    want, got = ctx.original.generate(prompt, **kw), emitted.generate(prompt, **kw)
                if not torch.equal(want, got):
                    return "generate() with the compiled model chose other tokens than the original"
    except Exception as exc:  # dynamo / inductor failures are many types; any one keeps the model eager
        return _first_line(f"{type(exc).__name__}: {exc}")
    return None


def _prompt(ctx: CompileContext) -> torch.Tensor | None:
    can_generate = getattr(ctx.original, "can_generate", None)
    ids = ctx.inputs.kwargs.get("input_ids", ctx.inputs.args[0] if ctx.inputs.args else None)
    if callable(can_generate) and can_generate() and isinstance(ids, torch.Tensor) and ids.ndim == 2:
        return ids[:1, -8:]
    return None


def _dense_leaf(root: nn.Module, name: str, module: nn.Module) -> bool:
    """A gated stack's part to compile: a direct child of a decoder layer that is not its attention
    (which reads and writes the KV cache), or the final norm / LM head."""
    from .analysis.layer_stack import find_layer_stack

    stack = find_layer_stack(root)
    if stack is None:
        return False
    if module is stack.norm or module is stack.lm_head:
        return True
    parent, _, child = name.rpartition(".")
    layers = {id(layer) for layer in stack.layers}
    return (id(root.get_submodule(parent)) in layers if parent else False) and not _is_attention(child, module)


def _is_attention(name: str, module: nn.Module) -> bool:
    return name.lower().endswith(("attn", "attention")) or "attention" in type(module).__name__.lower()


def _summary(what: list[str]) -> list[str]:
    """Layer indices folded: model.layers.{0..29}.mlp instead of thirty names."""
    import re

    groups: dict[str, list[int]] = {}
    out: list[str] = []
    for w in what:
        m = re.match(r"(.*\.)(\d+)(\..*)$", w)
        if m is None:
            out.append(w)
            continue
        key = m.group(1) + "{}" + m.group(3)
        if key not in groups:
            groups[key] = []
            out.append(key)
        groups[key].append(int(m.group(2)))
    return [k.replace("{}", f"{{{min(groups[k])}..{max(groups[k])}}}") if k in groups else k for k in out]


def _first_line(text: str) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:300]
