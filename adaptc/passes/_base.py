"""Passes and the manager that runs them: match (pure) -> check (a plan, or a decline with its reason) ->
apply -> verify against the original; a pass that fails verification is rolled back and the report says why.

The interface, phase by phase (`Pass` below):
- A pass is constructed with its typed config (`EarlyExit(delta=0.05)`, see `_config.py`) and holds
  nothing else: what one phase learns reaches the next through the plan, never through `self`
  (setting an attribute on a pass raises). Work shared by the sites of one compile (sparse
  attention's calibration) goes through `ctx.once(key, make)`, which lives as long as the compile.
- `match(ctx) -> list[Site]`: every candidate site, changing nothing.
- `check(ctx, site) -> Plan | Decline | str`: a `Plan` (an instance of the pass's `plan_class`) when the
  site can be rewritten; a `Decline` (or just its reason, a str) when it cannot.
- `apply(ctx, site, plan, edit)`: the rewrite, through `edit` so that it can be rolled back.
- `verify(ctx, plans) -> Comparison-like`: after every site is applied, with {site path: plan}.
- `rebuild(module, plan, model) -> nn.Module`: for adaptc.load, the rewrite again on a rebuilt model
  from `plan_class.from_dict(plan.to_dict())`. Required unless the pass sets `saveable = False`.
Approximate passes that share one quality budget with others (adaptc/budget.py) also implement:
- `knob(ctx, sites) -> Knob | Decline | str`: fit what does not depend on the setting (exit heads,
  attention mass) on `ctx.calibration` (the budget hands it the fitting rows only) and offer a ladder
  of settings, most conservative first, `settings[0]` computing what the original does.
- `retune(model, setting, plans) -> plans`: put one of those settings on an applied model in place
  (the compile's working model, or a loaded one: adaptc.retarget) and return the site plans' saved
  data for it. The budget searches and certifies the settings end to end; a pass may read `quality` to
  pick what its ladder spans (early exit: its measure and exit blocks), never to certify.
Each plan's and decline's `details` (what the pass measured) become the report's PassResult.details.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..capture.inputs import Inputs
from ..errors import AdaptcError
from ..verify import Comparison, compare, within_rounding
from ._config import PassConfig


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
    plans: dict[str, "Plan"] = field(default_factory=dict, repr=False)  # applied sites' plans (for save)

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
    _shared: dict[Any, Any] = field(default_factory=dict)

    def once(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()` the first time `key` is asked for in this compile, the same value after: work the
        sites of one pass share (one calibration for every attention module), without pass state."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

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

    def float64_outputs(self) -> list[Any] | None:
        """The original run in float64 on the check inputs (None when it cannot be): the oracle that
        tells floating-point reassociation from an error."""
        def run() -> list[Any] | None:
            try:
                model = copy.deepcopy(self.original).double()
                with torch.no_grad():
                    return [model(*_as_float64(i.args), **_as_float64(i.kwargs)) for i in self.check_inputs]
            except Exception:  # a model that will not run in float64 keeps the fixed tolerance
                return None
        return self.once("float64_outputs", run)

    def runs_like_original(self) -> Comparison:
        """The working model runs on every check input and returns the original's output type: what an
        approximate pass checks before its quality (its outputs are meant to differ)."""
        total = Comparison()
        with torch.no_grad():
            for inputs, expected in zip(self.check_inputs, self.expected_outputs()):
                try:
                    got = self.working(*inputs.args, **inputs.kwargs)
                except Exception as exc:
                    return Comparison(float("inf"), float("inf"), 1, False, f"{type(exc).__name__}: {exc}")
                if type(got) is not type(expected):
                    return Comparison(float("inf"), float("inf"), 1, False, f"output type differs: {type(got).__name__}")
                total.inputs_checked += 1
        return total

    def verify(self, fn: Callable[..., Any] | None = None) -> Comparison:
        """Run `fn` (default: the working model) on every check input against the original. A float
        tolerance miss is judged again against the original run in float64: a rewrite that sums in
        another order (another GEMM) is exact when it is about as near float64 as the original is."""
        fn = fn or self.working
        total, outputs = Comparison(), []
        with torch.no_grad():
            for inputs, expected in zip(self.check_inputs, self.expected_outputs()):
                try:
                    outputs.append(fn(*inputs.args, **inputs.kwargs))
                except Exception as exc:  # a rewrite that crashes fails verification; it is not fatal
                    return total.add(Comparison(float("inf"), float("inf"), 1, False, f"{type(exc).__name__}: {exc}"))
                total = total.add(compare(expected, outputs[-1]))
        if total.ok or "relative error" not in total.why or (truth := self.float64_outputs()) is None:
            return total
        rounding = Comparison()
        for expected, got, exact in zip(self.expected_outputs(), outputs, truth):
            rounding = rounding.add(within_rounding(expected, got, exact))
        return rounding


def _as_float64(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_as_float64(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_float64(v) for k, v in x.items()}
    return x


@dataclass
class Plan:
    """What `check` decided for one site: what `apply` installs, `verify` checks and, through
    `to_dict` / `from_dict` (JSON in the saved file), `rebuild` re-applies on load. Passes subclass it
    with their own fields; `details` is what the pass measured, for the report."""

    details: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """What adaptc.save records for the site, as JSON data."""
        return {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The plan from a saved file's data (checked: it comes from a file); ValueError if it is bad."""
        return cls()


@dataclass
class Knob:
    """What one approximate pass offers the joint quality budget: its settings as JSON data (what the
    report shows and `retune` reads back), most conservative first; the site plans that `apply`
    installs (at settings[0]) and that are saved for setting i; and, after rows ran, the share of the
    model's work the installed setting left (the pass's cost model, from what the runtime did)."""

    settings: list[dict[str, Any]]
    plans: Callable[[int], dict[str, "Plan"]]
    cost: Callable[[nn.Module], float]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decline:
    """`check`'s answer for a site it will not rewrite: why, and what it measured to decide."""

    reason: str
    details: dict[str, Any] = field(default_factory=dict)


class Pass:
    """One rewrite. Subclasses set `name`, `config_class` (a PassConfig dataclass) and `plan_class`,
    and implement the phases described at the top of this module."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    # Runtime control flow (exits, routers) that a whole-graph export would freeze: emit keeps blocks.
    keeps_blocks: ClassVar[bool] = False
    config_class: ClassVar[type[PassConfig]] = PassConfig
    plan_class: ClassVar[type[Plan]] = Plan
    # True: the pass saves memory (parameters), not time; the speed check reports it slower but keeps it.
    for_memory: ClassVar[bool] = False
    # False: adaptc.save refuses a blocks-granularity module this pass rewrote (no rebuild from data).
    saveable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in vars(cls):
            cls.config_class.pass_name = cls.name
        if "name" in vars(cls) and cls.saveable and cls.rebuild is Pass.rebuild:
            raise TypeError(f"pass {cls.name!r} defines no rebuild(module, plan, model): adaptc.load could not "
                            "re-apply it; define one or set saveable = False")

    def __init__(self, config: PassConfig | None = None, **options: Any) -> None:
        """`Pass(field=value, ...)` or `Pass(config)`; an unknown field is an AdaptcError naming the nearest."""
        if config is None:
            config = self.config_class.of(**options)
        elif options or not isinstance(config, self.config_class):
            raise AdaptcError(f"{self.name} takes a {self.config_class.__name__} or its fields as keywords, "
                              f"not {type(config).__name__}" + (" and keywords" if options else ""))
        object.__setattr__(self, "config", config)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"pass {self.name!r} cannot set {name!r}: passes carry no state between phases "
                             "(return it in the plan, or share it through ctx.once)")

    def __repr__(self) -> str:  # the fields set away from their defaults: EarlyExit(delta=0.05)
        default = type(self.config)()
        changed = [f"{k}={getattr(self.config, k)!r}" for k in self.config.field_names()
                   if getattr(self.config, k) != getattr(default, k)]
        return f"{type(self).__name__}({', '.join(changed)})"

    def match(self, ctx: CompileContext) -> list[Site]:
        """Every candidate site, without changing anything."""
        raise NotImplementedError

    def check(self, ctx: CompileContext, site: Site) -> Plan | Decline | str:
        """A plan when `site` can be rewritten; otherwise a Decline, or the reason as a str."""
        return self.plan_class()

    def apply(self, ctx: CompileContext, site: Site, plan: Plan, edit: ModuleEdit) -> None:
        raise NotImplementedError

    def no_sites_reason(self) -> str:
        return "no sites found"

    def verify(self, ctx: CompileContext, plans: dict[str, Plan]) -> Any:
        """After apply: something with `.ok`, `.why` and `.to_dict()`. Exact passes must equal the original;
        approximate passes override this with their quality check against the user's target."""
        return ctx.verify()

    def rebuild(self, module: nn.Module, plan: Plan, model: nn.Module) -> nn.Module:
        """For adaptc.load: what goes at the site (`module`, of the rebuilt `model`) for a saved plan."""
        raise NotImplementedError

    def knob(self, ctx: CompileContext, sites: list[Site]) -> "Knob | Decline | str | None":
        """The pass's settings for a joint quality budget; None: it does not take part (it calibrates alone)."""
        return None

    def retune(self, model: nn.Module, setting: dict[str, Any], plans: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Put `setting` (one of knob()'s) on `model`, already rewritten by this pass; the new site plans' data."""
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: list[Pass]):
        self.passes = passes
        self.edits: dict[str, ModuleEdit] = {}  # each applied pass's edit, in order: roll_back_last undoes one
        self.budget: dict[str, Any] | None = None  # the joint quality budget's record and frontier, when one ran
        self.budget_verification: dict[str, Any] | None = None

    def last_applied(self, results: list[PassResult]) -> Pass | None:
        """The most recently applied pass that can still be rolled back (what roll_back_last would undo)."""
        applied = [r for r in results if r.status == "applied" and r.name in self.edits]
        return next((p for p in self.passes if applied and p.name == applied[-1].name), None)

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
        from ..budget import joint_passes, run_budget

        group = joint_passes(self.passes, ctx.config)  # approximate passes under one quality budget
        results, verification = [], {}
        for p in self.passes:
            if p in group:
                if p is group[-1]:  # where the last of them would run: the exact passes before it have run
                    results.extend(run_budget(ctx, group, self))
                    if self.budget_verification is not None:
                        verification["budget"] = self.budget_verification
                continue
            start = time.perf_counter()
            result = self._run_one(ctx, p, verification)
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
        plans: dict[str, Plan] = {}
        declined: dict[str, Any] = {}  # what the declines measured

        def measured() -> dict[str, Any]:  # read late: verify adds to the plans' details
            return {**declined, **{k: v for plan in plans.values() for k, v in plan.details.items()}}

        try:
            ctx.record_calls([s.path for s in sites])
            for site in sites:
                verdict = p.check(ctx, site)
                if isinstance(verdict, str):
                    verdict = Decline(verdict)
                if isinstance(verdict, Decline):
                    declined.update(verdict.details)
                    result.declined.append({"site": site.path, "reason": verdict.reason})
                    continue
                if not isinstance(verdict, p.plan_class):
                    raise TypeError(f"check returned {type(verdict).__name__}, not a {p.plan_class.__name__} "
                                    "or a Decline")
                p.apply(ctx, site, verdict, edit)
                plans[site.path] = verdict
                result.sites.append(site.path)
                ctx.working = edit.root
        except Exception as exc:  # a pass bug must not take the user's compile down: undo and say so
            edit.rollback()
            ctx.working = edit.root
            return PassResult(p.name, "rolled_back", reason=f"pass failed: {type(exc).__name__}: {exc}",
                              declined=result.declined, details=measured())
        if not result.sites:
            reasons = {d["reason"] for d in result.declined}
            result.reason = f"every site declined: {reasons.pop()}" if len(reasons) == 1 else "every site declined"
            result.details = measured()
            return result
        if ctx.config.verify:
            cmp = p.verify(ctx, plans)
            verification[p.name] = cmp.to_dict()
            if not cmp.ok:
                edit.rollback()
                ctx.working = edit.root
                return PassResult(p.name, "rolled_back", reason=f"verification failed: {cmp.why}",
                                  declined=result.declined, details=measured())
        result.status, result.plans, result.details = "applied", plans, measured()
        self.edits[p.name] = edit
        return result
