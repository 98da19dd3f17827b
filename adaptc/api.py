"""compile(): capture -> passes -> lower -> emit. The steps live in their own modules; this one wires them."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import time
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from . import passes as pass_registry
from . import inductor, speed_check
from ._version import VERSION
from .capture.guards import size_one_floors
from .capture.inputs import Inputs, check_inputs
from .capture.torch_capture import capture, is_driven_from_python
from .config import CompileConfig
from .errors import AdaptcError, CaptureError, caller_stacklevel
from .passes._base import CompileContext, PassManager
from .runtime.module import STATE_ATTR, CompiledModule, CompiledState, attach, state_of


def compile(
    model: nn.Module,
    example_inputs: Any = None,
    passes: Any = None,
    calibration: Iterable[Any] | None = None,
    quality: float | None = None,
    device: str | torch.device | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Compile `model` into a faster drop-in that computes the same function (exact passes).

    >>> fast = adaptc.compile(model, example_inputs=(input_ids,))
    >>> fast(input_ids)                      # same arguments, same output structure
    >>> adaptc.report(fast)["passes"]        # what was rewritten, verified, tuned

    example_inputs: a tuple of positional arguments (or a dict of keyword arguments) the model is
        called with; every rewrite is verified on them and on fresh random inputs of other sizes.
    passes: None or "exact" for every exact pass that applies, or a list of pass names and passes with
        their configs: `passes=[adaptc.passes.EarlyExit(delta=0.05)]`.
    capture: "auto" (default), "graph", "export", "fx" or "blocks" (see CompileConfig).
    Other keyword options are CompileConfig's fields, or fields of the selected passes' configs
        (`delta=0.05` with `passes=["early_exit"]`); any other name is an error naming the nearest.
    The user's model is never modified: the result shares its parameters.
    """
    if not isinstance(model, nn.Module):
        raise AdaptcError(f"compile takes an nn.Module, not a {type(model).__name__}: wrap it in a module whose "
                          "forward calls it")
    if hasattr(model, STATE_ATTR):
        raise AdaptcError(f"this {type(model).__name__} is already compiled by adaptc: compile the original model "
                          "instead (its report says what was done: adaptc.report)")
    if example_inputs is None and not example_kwargs:
        raise AdaptcError("compile needs example_inputs: every rewrite is verified on them")
    start = time.perf_counter()
    fields = _config_options(options)
    selected = pass_registry.select(passes, fields.pop("pass_options"))
    names = None if passes is None or passes in ("exact", "all_exact") else [p.name for p in selected]
    config = CompileConfig(passes=names, quality=quality, device=str(device) if device else None,
                           pass_configs={p.name: p.config for p in selected}, **fields)
    if device is not None:
        model.to(device)
    example = Inputs.of(example_inputs, example_kwargs)
    was_training = model.training
    model.eval()  # compiled modules are for inference; dropout would make verification meaningless
    try:
        working = _structural_copy(model)
        checks = check_inputs(model, example, config.verify_random_inputs, config.seed)  # sizes the model takes
        ctx = CompileContext(
            original=model, working=working, inputs=checks[0], check_inputs=checks,
            config=config,
            calibration=[b if isinstance(b, str) else Inputs.of(b) for b in calibration] if calibration is not None else None,
        )
        needy = [p.name for p in selected if p.needs_calibration]
        if needy and ctx.calibration is None:
            raise AdaptcError(f"pass(es) {needy} are approximate: they need calibration= batches (the same form as "
                              "example_inputs) to fit and check themselves against the quality target")
        manager = PassManager(selected)
        results, verification = manager.run(ctx)
        tuning = _tune(ctx) if config.tune else {"measured": 0, "cache_hits": 0, "kernels": []}
        keeps = [r.name for r, p in zip(results, selected) if r.status == "applied" and p.keeps_blocks]
        emitted, capture_info = _emit(ctx, verification, keeps)
        dense, compiled = inductor.apply(ctx, emitted)
        speed = speed_check.check(ctx, emitted, manager, results, compiled) if config.speed_check else {"enabled": False}
        if any(r["pass"] == "inductor" for r in speed.get("rolled_back", [])):
            dense.update(compiled=[], reason="the speed check undid it: the compiled model was slower")
        if capture_info["granularity"] == "blocks":
            emitted = ctx.working  # what the speed check left (it may have rolled passes back)
            undone = [r["pass"] for r in speed.get("rolled_back", []) if r["pass"] in keeps]
            if undone:
                capture_info["reason"] += f" (until the speed check rolled {', '.join(undone)} back)"
    finally:
        model.train(was_training)
    report = {
        "adaptc_version": VERSION,
        "torch_version": torch.__version__,
        "model": type(model).__name__,
        "device": str(next(iter(model.parameters()), torch.empty(0)).device),
        "config": config.to_dict(),
        "capture": capture_info,
        "passes": [r.to_dict() for r in results],
        "verification": verification,
        "tuning": tuning,
        "speed_check": speed,
        "inductor": dense,
        "compile_seconds": round(time.perf_counter() - start, 3),
    }
    if manager.budget is not None:  # one quality budget over the approximate passes (adaptc/budget.py)
        report["budget"], report["frontier"] = manager.budget["record"], manager.budget["frontier"]
        undone = [r["pass"] for r in speed.get("rolled_back", []) if r["pass"] in report["budget"]["passes"]]
        if undone:  # the certificate was for all of them: the frontier no longer describes this module
            report["budget"]["rolled_back_after"] = undone
    plan = {r.name: {path: site_plan.to_dict() for path, site_plan in r.plans.items()}
            for r in results if r.status == "applied"}
    return attach(emitted, CompiledState(report, plan, config.to_dict()))


def report(module: nn.Module) -> dict[str, Any]:
    """What compile did to `module`: passes, verification errors, capture, tuning (JSON-serializable)."""
    return copy.deepcopy(state_of(module).report)


def _config_options(options: dict[str, Any]) -> dict[str, Any]:
    """compile's keyword options: CompileConfig's fields by name, the rest under "pass_options" for
    the passes' configs (adaptc.passes.select routes them). A name neither has is a typo: an error
    naming the nearest valid name, never a setting silently ignored."""
    fields = [f.name for f in dataclasses.fields(CompileConfig) if f.name not in ("passes", "quality", "device", "pass_configs")]
    declared = {name for cls in pass_registry.registry().values() for name in cls.config_class.field_names()}
    unknown = [k for k in options if k not in fields and k not in declared]
    if unknown:
        valid = sorted({*fields, *declared, "passes", "calibration", "quality", "device", "example_kwargs"})
        near = difflib.get_close_matches(unknown[0], valid, n=1)
        readers = pass_registry.option_readers(near[0]) if near and near[0] not in fields else []
        owner = f" ({', '.join(readers)} option)" if readers else ""
        hint = f": did you mean {near[0]!r}{owner}?" if near else f"; the options are: {', '.join(valid)}"
        raise AdaptcError(f"unknown compile option {unknown[0]!r}{hint}")
    known = {k: options.pop(k) for k in fields if k in options}
    return {**known, "pass_options": options}


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model`."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _tune(ctx: CompileContext) -> dict[str, Any]:
    """Tune every kernel problem the rewritten model calls on the example inputs (cache first)."""
    from .tuner.session import Budget, install_cache_source, tune_calls

    install_cache_source()  # the compiled module's kernels read their tuned configs from the cache
    c = ctx.config
    budget = Budget(trials=c.tune_trials, seconds=c.tune_seconds)
    return tune_calls(lambda: ctx.working(*ctx.inputs.args, **ctx.inputs.kwargs), budget, seed=c.seed, progress=c.progress)


def _emit(ctx: CompileContext, verification: dict, keeps: list[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """Whole-graph capture for pure functions; block granularity where the Python API must survive."""
    mode = ctx.config.capture
    if keeps:
        return ctx.working, {"granularity": "blocks", "method": "module",
                             "reason": f"{', '.join(keeps)} decide(s) at run time which blocks run"}
    if mode == "blocks" or (mode == "auto" and is_driven_from_python(ctx.original)):
        why = "requested" if mode == "blocks" else "generate() and the KV cache drive this model from Python"
        return ctx.working, {"granularity": "blocks", "method": "module", "reason": why}
    methods = ("export", "fx") if mode in ("auto", "graph") else (mode,)
    try:
        captured = capture(ctx.working, ctx.inputs, methods)
    except CaptureError as exc:
        if mode != "auto":
            raise
        warnings.warn(f"adaptc: {exc}; keeping block granularity", stacklevel=caller_stacklevel())
        return ctx.working, {"granularity": "blocks", "method": "module", "reason": str(exc)}
    signature = CompiledModule.signature_of(ctx.inputs.args, ctx.inputs.kwargs, captured.shapes)
    emitted = CompiledModule(captured.module, signature, eager=ctx.working, guards=captured.guards)
    emitted._program = captured.program
    cmp = ctx.verify(emitted) if ctx.config.verify else None  # the graph wherever its guards let it run
    if cmp is not None:
        verification["capture"] = cmp.to_dict()
        if not cmp.ok:
            if mode != "auto":
                raise CaptureError(f"the {captured.method} graph does not match the model: {cmp.why}")
            return ctx.working, {"granularity": "blocks", "method": "module",
                                 "reason": f"{captured.method} graph failed verification: {cmp.why}"}
    info = {"granularity": "graph", "method": captured.method, "reason": ""}
    if captured.method == "export":  # export assumed sizes 0 and 1 behave like the >= 2 it traced
        vocab = getattr(getattr(ctx.original, "config", None), "vocab_size", None)
        shapes, info["size_one"] = size_one_floors(captured.module, ctx.original, ctx.inputs, captured.shapes or [],
                                                   verify=ctx.config.verify, seed=ctx.config.seed, vocab=vocab)
        emitted._signature = CompiledModule.signature_of(ctx.inputs.args, ctx.inputs.kwargs, shapes)
        info["guards"] = captured.guards.code if captured.guards is not None else "checked by the graph"
    return emitted, info
