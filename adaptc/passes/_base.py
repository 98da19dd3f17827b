"""Passes and the manager that runs them: match (pure) -> check (a verdict with a reason) -> apply ->
verify against the original; a pass that fails verification is rolled back and the report says why."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..capture.inputs import Inputs
from ..verify import Comparison, compare


@dataclass
class Site:
    """One place a pass may rewrite: a module path (blocks) and what the pass learned about it."""

    path: str
    module: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    name: str
    status: str  # applied | skipped | rolled_back
    sites: list[str] = field(default_factory=list)
    reason: str = ""
    declined: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "sites": list(self.sites), "reason": self.reason,
            "declined": list(self.declined), "details": self.details, "seconds": round(self.seconds, 4),
        }


class ModuleEdit:
    """Edits that can be undone, the rollback half of a pass: submodule replacements (path "" is the
    root) and attribute changes (a config flag, say)."""

    def __init__(self, root: nn.Module):
        self.root = root
        self._undo: list[Callable[[], None]] = []

    def replace(self, path: str, new: nn.Module) -> None:
        if not path:
            old_root = self.root
            self._undo.append(lambda: setattr(self, "root", old_root))
            self.root = new
            return
        parent_path, _, name = path.rpartition(".")
        parent = self.root.get_submodule(parent_path) if parent_path else self.root
        old = parent.get_submodule(name)
        self._undo.append(lambda: _set_child(parent, name, old))
        _set_child(parent, name, new)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set (or add) an attribute; rollback restores the old value or removes the new attribute."""
        if hasattr(obj, name):
            old = getattr(obj, name)
            self._undo.append(lambda: setattr(obj, name, old))
        else:
            self._undo.append(lambda: delattr(obj, name))
        setattr(obj, name, value)

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _set_child(parent: nn.Module, name: str, child: nn.Module) -> None:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(name)] = child
    else:
        setattr(parent, name, child)


@dataclass
class CompileContext:
    original: nn.Module
    working: nn.Module   # a structural copy of `original` sharing its parameters; passes rewrite this
    inputs: Inputs
    check_inputs: list[Inputs]  # the examples first, then fresh random inputs of other sizes
    config: Any
    block_inputs: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # recorded by hooks
    calibration: list["Inputs"] | None = None  # batches for approximate passes (compile's `calibration=`)
    _expected: list[Any] | None = None

    def expected_outputs(self) -> list[Any]:
        if self._expected is None:
            with torch.no_grad():
                self._expected = [self.original(*i.args, **i.kwargs) for i in self.check_inputs]
        return self._expected

    def record_calls(self, paths: list[str]) -> None:
        """Run the original once on the example inputs, keeping the first call of each block at `paths`."""
        todo = [p for p in paths if p not in self.block_inputs]
        if not todo:
            return
        handles = []
        for path in todo:
            def hook(module, args, kwargs, path=path):
                self.block_inputs.setdefault(path, (args, kwargs))
            handles.append(self.original.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                self.original(*self.inputs.args, **self.inputs.kwargs)
        finally:
            for h in handles:
                h.remove()

    def recorded_call(self, path: str) -> tuple[tuple, dict] | None:
        return self.block_inputs.get(path)

    def verify(self, fn: Callable[..., Any] | None = None) -> Comparison:
        """Run `fn` (default: the working model) on every check input against the original."""
        fn = fn or self.working
        total = Comparison()
        with torch.no_grad():
            for inputs, expected in zip(self.check_inputs, self.expected_outputs()):
                try:
                    got = fn(*inputs.args, **inputs.kwargs)
                except Exception as exc:  # a rewrite that crashes fails verification; it is not fatal
                    return total.add(Comparison(float("inf"), float("inf"), 1, False, f"{type(exc).__name__}: {exc}"))
                total = total.add(compare(expected, got))
        return total


class Pass:
    name: ClassVar[str]
    exact: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    # Runtime control flow (exits, routers) that a whole-graph export would freeze: emit keeps blocks.
    keeps_blocks: ClassVar[bool] = False
    # The compile options (`adaptc.compile(..., name=value)`) this pass reads, with their defaults;
    # compile refuses a name no pass declares, so a typo is an error, not a silently ignored setting.
    options: ClassVar[dict[str, Any]] = {}

    def option(self, ctx: CompileContext, name: str) -> Any:
        """The user's value of a declared option, else its default (KeyError for an undeclared name)."""
        return ctx.config.options.get(name, self.options[name])

    def match(self, ctx: CompileContext) -> list[Site]:
        """Every candidate site, without changing anything."""
        raise NotImplementedError

    def check(self, ctx: CompileContext, site: Site) -> str | None:
        """None when `site` can be rewritten; otherwise the reason it is declined."""
        return None

    def apply(self, ctx: CompileContext, site: Site, edit: ModuleEdit) -> None:
        raise NotImplementedError

    def no_sites_reason(self) -> str:
        return "no sites found"

    @staticmethod
    def site_plan(module: nn.Module) -> dict[str, Any]:
        """What adaptc.save records for an applied site (`module`: what is at the site path after the
        pass), as JSON data; the pass's static `rebuild(module, site_plan, model)` re-applies it on load.
        Default: the `plan` dict the replacement module carries."""
        plan = getattr(module, "plan", None)
        return dict(plan) if isinstance(plan, dict) else {}

    def verify(self, ctx: CompileContext) -> Any:
        """After apply: something with `.ok`, `.why` and `.to_dict()`. Exact passes must equal the original;
        approximate passes override this with their quality check against the user's target."""
        return ctx.verify()


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = passes
        self.edits: dict[str, ModuleEdit] = {}  # each applied pass's edit, in order: roll_back_last undoes one

    def roll_back_last(self, ctx: CompileContext, results: list[PassResult], reason: str) -> PassResult | None:
        """Undo the most recently applied pass (later passes built on it, so only that one); None if none is."""
        applied = [r for r in results if r.status == "applied" and r.name in self.edits]
        if not applied:
            return None
        result = applied[-1]
        edit = self.edits.pop(result.name)
        edit.rollback()
        ctx.working = edit.root
        result.status, result.reason = "rolled_back", reason
        return result

    def run(self, ctx: CompileContext) -> tuple[list[PassResult], dict[str, dict[str, Any]]]:
        results, verification = [], {}
        for p in self.passes:
            start = time.perf_counter()
            result = self._run_one(ctx, p, verification)
            result.details = {**(getattr(p, "details", None) or {}), **result.details}  # what the pass measured
            result.seconds = time.perf_counter() - start
            results.append(result)
        return results, verification

    def _run_one(self, ctx: CompileContext, p: Pass, verification: dict) -> PassResult:
        result = PassResult(p.name, "skipped")
        sites = p.match(ctx)
        if not sites:
            result.reason = p.no_sites_reason()
            return result
        edit = ModuleEdit(ctx.working)
        try:
            ctx.record_calls([s.path for s in sites])
            for site in sites:
                why = p.check(ctx, site)
                if why:
                    result.declined.append({"site": site.path, "reason": why})
                    continue
                p.apply(ctx, site, edit)
                result.sites.append(site.path)
                ctx.working = edit.root
        except Exception as exc:  # a pass bug must not take the user's compile down: undo and say so
            edit.rollback()
            ctx.working = edit.root
            return PassResult(p.name, "rolled_back", reason=f"pass failed: {type(exc).__name__}: {exc}",
                              declined=result.declined)
        if not result.sites:
            reasons = {d["reason"] for d in result.declined}
            result.reason = f"every site declined: {reasons.pop()}" if len(reasons) == 1 else "every site declined"
            return result
        if ctx.config.verify:
            cmp = p.verify(ctx)
            verification[p.name] = cmp.to_dict()
            if not cmp.ok:
                edit.rollback()
                ctx.working = edit.root
                return PassResult(p.name, "rolled_back", reason=f"verification failed: {cmp.why}",
                                  declined=result.declined)
        result.status = "applied"
        self.edits[p.name] = edit
        return result
