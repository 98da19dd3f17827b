"""A compiler must never hand back a slower model: after verification, compile times what it emits
against the original, interleaved, at the example inputs, a one-row call and (models that generate)
a decode step.

A graph (CompiledModule) slower at a size class routes that class to the fastest of graph, eager
rewrite and original (all compute the same function, the original shares the rewrite's parameters).
Block granularity cannot route per size: the most recent applied pass is rolled back and the sizes
re-measured, until none is slower or no pass is left. The report's `speed_check` section gives, per
size, the ms of the original and of what now serves it, their ratio, and what was routed or rolled back.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .capture.inputs import Inputs
from .passes._base import CompileContext, PassManager, PassResult
from .runtime.module import CompiledModule

SLOWER = 0.97            # compiled / original speed below this at a size (measured twice) is slower
SECONDS_PER_SIZE = 0.15  # per measurement of one size: rounds shrink to fit it (one round at least)
ROUNDS = 5
SECONDS = 3.0            # the whole check; sizes past it are reported unmeasured


def check(ctx: CompileContext, emitted: nn.Module, manager: PassManager, results: list[PassResult],
          compiled: Any = None) -> dict[str, Any]:
    """compiled: what Inductor compiled (inductor.Compiled), undone last when blocks are still slower."""
    sizes = _sizes(ctx)
    applied = any(r.status == "applied" for r in results) or compiled is not None
    _warm(compiled, sizes, emitted)
    deadline = time.perf_counter() + SECONDS
    with torch.no_grad():
        if isinstance(emitted, CompiledModule):
            return {"enabled": True, "granularity": "graph",
                    "sizes": [_route(ctx, emitted, s, applied, deadline) for s in sizes]}
        if not applied:  # the blocks are the original's
            return {"enabled": True, "granularity": "blocks", "sizes": [], "rolled_back": [],
                    "note": "no pass applied: the compiled model runs the original's code"}
        return {"enabled": True, "granularity": "blocks", **_roll_back(ctx, manager, results, sizes, deadline, compiled)}


def _sizes(ctx: CompileContext) -> list[tuple[str, Callable[[nn.Module], Callable[[], Any]], Inputs | None]]:
    """(label, a call of a module at that size, its inputs where it is one forward)."""
    batch, seq = ctx.inputs.batch_seq()
    vocab = getattr(getattr(ctx.original, "config", None), "vocab_size", None)
    out = [("example", ctx.inputs)]
    if batch != 1:
        out.append(("one_row", ctx.inputs.resized(1, seq, torch.Generator().manual_seed(ctx.config.seed), vocab)))
    sizes = [(label, (lambda m, i=i: lambda: m(*i.args, **i.kwargs)), i) for label, i in out]
    can_generate = getattr(ctx.original, "can_generate", None)
    ids = ctx.inputs.kwargs.get("input_ids", ctx.inputs.args[0] if ctx.inputs.args else None)
    if callable(can_generate) and can_generate() and isinstance(ids, torch.Tensor) and ids.ndim == 2:
        prompt = ids[:1, -8:]  # one row, a short prompt: generating 2 tokens is mostly the decode step

        def decode(m: nn.Module) -> Callable[[], Any]:
            def call() -> Any:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2,
                                      min_new_tokens=2, do_sample=False)
            return call
        sizes.append(("decode", decode, None))
    return sizes


def _route(ctx: CompileContext, emitted: CompiledModule, size: tuple, applied: bool, deadline: float) -> dict[str, Any]:
    label, call, inputs = size
    cls = CompiledModule.size_class(inputs.args, inputs.kwargs)
    if time.perf_counter() > deadline:
        return {"size": label, "size_class": cls, "skipped": "the speed check's time budget was spent"}
    default = "graph" if emitted.accepts(inputs.args, inputs.kwargs) else "eager"
    modules = {"original": ctx.original, default: emitted.graph if default == "graph" else emitted.eager}
    if default == "graph" and applied:  # with no pass applied the eager rewrite is the original
        modules["eager"] = emitted.eager
    ms, slower = _confirmed({k: call(m) for k, m in modules.items()},
                            lambda t: t[default] * SLOWER > min(t.values()), deadline)
    route = min(ms, key=ms.get) if slower else default
    if route != default:
        if route == "original":
            emitted.original = ctx.original
        emitted.routes[cls] = route
    row = {"size": label, "size_class": cls, "original_ms": _r(ms["original"]), "compiled_ms": _r(ms[route]),
           "ratio": round(ms["original"] / ms[route], 3), "route": route,
           **{f"{k}_ms": _r(v) for k, v in ms.items() if k != "original"}}
    if route != default:
        row["routed"] = f"{cls} calls run the {route} module: {default} was {ms['original'] / ms[default]:.2f}x"
    return row


def _roll_back(ctx: CompileContext, manager: PassManager, results: list[PassResult], sizes: list,
               deadline: float, compiled: Any = None) -> dict[str, Any]:
    rolled: list[dict[str, Any]] = []
    while True:
        rows, slower = [], []
        for label, call, _ in sizes:
            if time.perf_counter() > deadline:
                rows.append({"size": label, "skipped": "the speed check's time budget was spent"})
                continue
            ms, lost = _confirmed({"original": call(ctx.original), "compiled": call(ctx.working)},
                                  lambda t: t["compiled"] * SLOWER > t["original"], deadline)
            rows.append({"size": label, "original_ms": _r(ms["original"]), "compiled_ms": _r(ms["compiled"]),
                         "ratio": round(ms["original"] / ms["compiled"], 3)})
            if lost:
                slower.append(rows[-1])
        if not slower:
            return {"sizes": rows, "rolled_back": rolled}
        ratios = ", ".join(f"{r['size']} {r['ratio']:.2f}x" for r in slower)
        last = manager.last_applied(results)
        if last is not None and last.for_memory:  # asked for fewer parameters at a cost in time: kept
            return {"sizes": rows, "rolled_back": rolled,
                    "kept": f"{last.name} saves parameters, not time: kept although slower ({ratios})"}
        undone = manager.roll_back_last(ctx, results, f"speed check: the compiled model was slower ({ratios})")
        if undone is None and compiled is not None and compiled.saved:  # no pass left: Inductor goes last
            compiled.undo()
            rolled.append({"pass": "inductor", "sizes": {r["size"]: r["ratio"] for r in rows if "ratio" in r}})
            continue
        if undone is None:
            return {"sizes": rows, "rolled_back": rolled}
        rolled.append({"pass": undone.name, "sizes": {r["size"]: r["ratio"] for r in rows if "ratio" in r}})
        deadline += _warm(compiled, sizes, ctx.working)  # the compiled forward retraces the rolled-back model


def _warm(compiled: Any, sizes: list, module: nn.Module) -> float:
    """torch.compile is lazy: each size's first call may compile; it is made here, untimed (seconds taken)."""
    if compiled is None or not compiled.saved:
        return 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for _, call, _ in sizes:
            call(module)()
    return time.perf_counter() - start


def _confirmed(fns: dict[str, Callable[[], Any]], slower: Callable[[dict[str, float]], bool],
               deadline: float) -> tuple[dict[str, float], bool]:
    """ms per variant, and whether `slower` held on two measurements (the second only where the first
    says so, and within the budget): routing around or rolling back must not follow one noisy figure."""
    ms = _measure(fns)
    if not slower(ms) or time.perf_counter() > deadline:
        return ms, False
    again = _measure(fns)
    best = {k: min(ms[k], again[k]) for k in ms}
    return best, slower(again) and slower(best)


def _measure(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """The fastest ms per variant over interleaved rounds in alternating order: load from other
    processes only adds time, and falls on every variant alike. Bounded by SECONDS_PER_SIZE (one
    warm-up and one timed call at least)."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: _timed(fn) for name, fn in fns.items()}
    round_s = max(sum(best.values()), 1e-9)
    rounds = min(ROUNDS - 1, int(SECONDS_PER_SIZE / round_s) - 1)
    reps = max(1, int(SECONDS_PER_SIZE / max(rounds, 1) / round_s))
    names = list(fns)
    for r in range(max(rounds, 0)):
        for name in (names if r % 2 else names[::-1]):
            best[name] = min(best[name], *(_timed(fns[name]) for _ in range(reps)))
    return {name: t * 1e3 for name, t in best.items()}


def _timed(fn: Callable[[], Any]) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _r(ms: float) -> float:
    return round(ms, 4)
