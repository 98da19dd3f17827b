"""reroll (exact): n chained applications of one weight-shared block become one loop in the captured graph.

torch.export unrolls ALBERT's `for i in range(num_hidden_layers): h = shared_group(h)` (and a user's
`for _ in range(n): x = block(x)`) into n copies of the block's nodes. The module-tree view
(analysis/shared_blocks.shared_runs) names the caller and the block; the caller is exported on its own
(dynamic sizes), the n copies are found in its graph by export's per-call module stack and checked to be
one expression of the carried state over the same weights (analysis/shared_blocks.graph_chain), and they
are replaced by one `torch.ops.higher_order.while_loop` whose body is one copy. The caller's forward then
runs that graph (runtime/reroll.py): the whole-model export traces through it and keeps the loop, and
adaptc.save / load carry it as a torch.export program (trust.py admits while_loop).

The loop runs the same ops in the same order, so outputs are equal; it only adds a counter and a call per
step. Compile's speed check is on by default: then the looped graph is timed against the unrolled one on
the caller's own inputs and the site declines, with both figures, when the loop is slower. Models that
keep block granularity (generate() drives them) already run the block in a Python loop: declined, as is
a run an adaptive pass (early exit) decides between.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..analysis.shared_blocks import GraphChain, graph_chain, same_block, shared_runs
from ..capture.inputs import Inputs
from ..capture.torch_capture import _torch_quiet, describe, input_shapes, is_driven_from_python
from ..errors import SaveLoadError
from ..runtime.module import CompiledModule
from ..runtime.reroll import LoopedForward
from ..verify import Comparison, compare
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig, option


@dataclass(frozen=True)
class RerollConfig(PassConfig):
    """reroll's options."""

    min_calls: int = option(2, doc="fewest chained applications of one block worth a loop")

    def validate(self) -> None:
        if not isinstance(self.min_calls, int) or isinstance(self.min_calls, bool) or self.min_calls < 2:
            self.fail("min_calls", "must be an integer >= 2")


@dataclass
class RerollPlan(Plan):
    """The loops at one caller: each (block path relative to the caller, applications). The looped graph
    exists only during compile; a whole-graph save holds it, a block-granularity load runs the caller's
    own Python loop (the same function)."""

    loops: list[dict[str, Any]]
    forward: LoopedForward | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"loops": [dict(loop) for loop in self.loops]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RerollPlan":
        loops = data.get("loops") if isinstance(data, dict) else None
        if not isinstance(loops, list) or not loops or not all(
                isinstance(l, dict) and isinstance(l.get("block"), str) and isinstance(l.get("calls"), int)
                and l["calls"] >= 2 for l in loops):
            raise SaveLoadError(f"a reroll plan is a list of {{block, calls >= 2}} loops, got {loops!r}")
        return cls([{"block": l["block"], "calls": l["calls"]} for l in loops])


class _FlatCall(nn.Module):
    """The caller called with its recorded argument structure, tensors as the only (positional) inputs: what
    is exported, so that every tensor dim can be marked dynamic whatever the caller's signature."""

    def __init__(self, module: nn.Module, leaves: list[Any], spec: Any):
        super().__init__()
        self.module = module
        self.leaves, self.spec = leaves, spec
        self.slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def forward(self, *tensors: torch.Tensor) -> Any:
        leaves = list(self.leaves)
        for i, t in zip(self.slots, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.module(*args, **kwargs)


def _export_call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    flat = _FlatCall(module, leaves, spec)
    tensors = tuple(leaves[i] for i in flat.slots)
    dims = tuple({d: torch.export.Dim.AUTO for d in range(t.ndim)} for t in tensors)
    with _torch_quiet():
        return flat, torch.export.export(flat, tensors, dynamic_shapes=(dims,), strict=False)


def _loop(gm: fx.GraphModule, chain: GraphChain, index: int) -> int:
    """Replace the chain's n segments in `gm` by one while_loop over segment 0; returns the body's nodes."""
    from torch._guards import detect_fake_mode

    graph, n = gm.graph, len(chain.segments)
    s0, out, seg = chain.states[0], chain.states[-1], chain.segments[0]
    fake = detect_fake_mode([x.meta["val"] for x in graph.nodes if isinstance(x.meta.get("val"), torch.Tensor)])
    with fake:  # the counter lives on the CPU: the condition never waits on an accelerator
        step, next_step = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64) + 1
        go = step < n

    def subgraph(body: bool) -> fx.GraphModule:
        g = fx.Graph()
        i, x = g.placeholder("step"), g.placeholder("state")
        i.meta["val"], x.meta["val"] = step, s0.meta["val"]
        env = {s0: x}
        for value in chain.shared:
            env[value] = g.placeholder(value.name)
            env[value].meta["val"] = value.meta["val"]
        if body:
            for node in seg:
                env[node] = g.node_copy(node, env.__getitem__)
            bump = g.call_function(torch.ops.aten.add.Tensor, (i, 1))
            bump.meta["val"] = next_step
            g.output((bump, env[chain.states[1]]))
        else:
            test = g.call_function(torch.ops.aten.lt.Scalar, (i, n))
            test.meta["val"] = go
            g.output(test)
        return fx.GraphModule(nn.Module(), g)

    body, cond = subgraph(True), subgraph(False)
    gm.register_module(f"reroll_body_{index}", body)
    gm.register_module(f"reroll_cond_{index}", cond)
    with graph.inserting_after(out):
        cond_ref = graph.get_attr(f"reroll_cond_{index}")
    with graph.inserting_after(cond_ref):
        body_ref = graph.get_attr(f"reroll_body_{index}")
    with graph.inserting_after(body_ref):
        start = graph.call_function(torch.ops.aten.zeros.default, ([],), {"dtype": torch.int64, "device": torch.device("cpu")})
        start.meta["val"] = step
    with graph.inserting_after(start):
        loop = graph.call_function(torch.ops.higher_order.while_loop, (cond_ref, body_ref, (start, s0), tuple(chain.shared)))
        loop.meta["val"] = (step, out.meta["val"])
    with graph.inserting_after(loop):
        result = graph.call_function(operator.getitem, (loop, 1))
        result.meta["val"] = out.meta["val"]
    out.replace_all_uses_with(result)
    result.args = (loop, 1)  # replace_all_uses_with rewrote its own argument too
    for segment in reversed(chain.segments):
        for node in reversed(segment):
            graph.erase_node(node)
    return len(body.graph.nodes)


def _mutates(gm: fx.GraphModule) -> str | None:
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return str(node.target)
    return None


def _padded(inputs: Inputs) -> Inputs:
    """`inputs` with the last position of row 0 masked out when its attention_mask is all ones: Hugging Face
    then builds the mask tensor it always builds under export (where it cannot see a mask is all ones), so
    the caller is traced, and checked, with the arguments the whole-model graph will give it."""
    mask = inputs.kwargs.get("attention_mask")
    if not (isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] >= 2 and bool((mask == 1).all())):
        return inputs
    mask = mask.clone()
    mask[0, -1] = 0
    return Inputs(inputs.args, {**inputs.kwargs, "attention_mask": mask}, inputs.static_seq)


def _traced_call(ctx: CompileContext, path: str) -> tuple[tuple, dict] | None:
    """The caller's first call on a check input with at least 2 rows and 2 positions (the example itself
    first; padded as `_padded` says), so that export keeps those sizes symbolic."""
    for inputs in ctx.check_inputs:
        batch, seq = inputs.batch_seq()
        if batch >= 2 and (seq is None or seq >= 2):
            inputs = _padded(inputs)
            seen: list[tuple[tuple, dict]] = []
            hook = ctx.original.get_submodule(path).register_forward_pre_hook(
                lambda m, a, kw: seen.append((a, kw)) if not seen else None, with_kwargs=True)
            try:
                with torch.no_grad():
                    ctx.original(*inputs.args, **inputs.kwargs)
            finally:
                hook.remove()
            return seen[0] if seen else None
    return None


class Reroll(Pass):
    name = "reroll"
    exact = True
    config_class = RerollConfig
    plan_class = RerollPlan

    def no_sites_reason(self) -> str:
        return "no block is applied twice in a row with the same weights"

    def match(self, ctx: CompileContext) -> list[Site]:
        try:  # an exact pass on by default: a model the hooks cannot follow is no site, not a failed compile
            runs = shared_runs(ctx.working, lambda: ctx.working(*ctx.inputs.args, **ctx.inputs.kwargs))
        except Exception:
            return []
        by_caller: dict[str, list] = {}
        for run in runs:
            if run.calls >= self.config.min_calls:
                by_caller.setdefault(run.caller, []).append(run)

        def inside(path: str, other: str) -> bool:
            return other != path and (not other or path.startswith(other + "."))

        outermost = [c for c in by_caller if not any(inside(c, o) for o in by_caller)]  # its export holds the rest
        return [Site(c, ctx.working.get_submodule(c), {"runs": by_caller[c]}) for c in outermost
                if not isinstance(ctx.working.get_submodule(c), CompiledModule)]

    def check(self, ctx: CompileContext, site: Site) -> RerollPlan | Decline | str:
        from . import registry

        runs = site.info["runs"]
        details: dict[str, Any] = {"caller": site.path or "(root)", "runs": [r.to_dict() for r in runs]}
        adaptive = [n for n in (ctx.config.pass_configs or {}) if n in registry() and registry()[n].keeps_blocks]
        if adaptive:
            return Decline(f"{', '.join(adaptive)} decide(s) between the applications at run time: they stay unrolled",
                           details)
        mode = ctx.config.capture
        if mode == "blocks" or (mode == "auto" and is_driven_from_python(ctx.original)):
            return Decline("the model keeps block granularity: its Python loop already runs the block once per step",
                           details)
        call = _traced_call(ctx, site.path)
        if call is None:
            return Decline("not called on a check input of 2 rows or more", details)
        try:
            flat, program = _export_call(site.module, *call)
        except Exception as exc:
            return Decline(f"does not export: {describe(exc)}", details)
        sig = program.graph_signature
        mutated = "a buffer or input" if sig.buffers_to_mutate or sig.user_inputs_to_mutate else _mutates(program.graph_module)
        if mutated:
            return Decline(f"its graph mutates state ({mutated}): not a pure function to loop", details)
        gm = program.graph_module
        unrolled = copy.deepcopy(gm)
        before = len(gm.graph.nodes)
        loops, body_nodes = [], 0
        for i, run in enumerate(runs):
            rel = run.block[len(site.path) + 1:] if site.path else run.block
            block = ctx.working.get_submodule(run.block)
            # export names modules from the flat wrapper: "module.<path in the caller>"; tied copies count too
            paths = {f"module.{p}" for p, m in site.module.named_modules(remove_duplicate=False)
                     if p and same_block(m, block)}
            chain = graph_chain(gm.graph, paths, run.calls)
            if isinstance(chain, str):
                return Decline(f"{run.block}: {chain}", details)
            body_nodes += _loop(gm, chain, i)
            loops.append({"block": rel, "calls": run.calls, "body_nodes": len(chain.segments[0])})
        gm.graph.lint()
        gm.recompile()
        details.update({"loops": loops, "graph_nodes_before": before, "graph_nodes_after": len(gm.graph.nodes),
                        "graph_nodes_after_with_loop_body": len(gm.graph.nodes) + body_nodes})
        forward = self._forward(site.module, flat, program, gm)
        if isinstance(forward, str):
            return Decline(forward, details)
        if ctx.config.speed_check:
            slower = _slower(unrolled, forward, call, details)
            if slower:
                return Decline(slower, details)
        return RerollPlan(loops, forward, details=details)

    @staticmethod
    def _forward(module: nn.Module, flat: _FlatCall, program: Any, gm: fx.GraphModule) -> LoopedForward | str:
        from torch.export.graph_signature import InputKind

        from ..capture.guards import tracer_guards

        state, constants = [], []
        for spec in program.graph_signature.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                state.append(spec.target.removeprefix("module."))
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                constants.append(program.constants[spec.target])
            elif spec.kind != InputKind.USER_INPUT:
                return f"its graph takes a {spec.kind.name.lower()} input, which a loop does not carry"
        guards = None
        if getattr(program, "_guards_code", None):
            guards = tracer_guards(program, flat)
            if guards is None:
                return "its shape guards cannot be read, so calls outside them could not be sent to eager"
        args, kwargs = pytree.tree_unflatten(flat.leaves, flat.spec)
        signature = CompiledModule.signature_of(args, kwargs, input_shapes(program))
        return LoopedForward(module, gm, state, constants, signature, guards, program.call_spec.out_spec)

    def apply(self, ctx: CompileContext, site: Site, plan: RerollPlan, edit: ModuleEdit) -> None:
        edit.set_attr(site.module, "forward", plan.forward.as_forward())

    def verify(self, ctx: CompileContext, plans: dict[str, RerollPlan]) -> Comparison:
        """The check inputs, their padded forms (what the looped graph serves), and a one-row and (with a
        sequence) a one-position call: export traced sizes of 2 or more and assumes 1 behaves alike."""
        total = ctx.verify()
        batch, seq = ctx.inputs.batch_seq()
        vocab = getattr(getattr(ctx.original, "config", None), "vocab_size", None)
        gen = torch.Generator().manual_seed(ctx.config.seed + 1)
        ones = [ctx.inputs.resized(1, seq, gen, vocab)] + ([ctx.inputs.resized(batch, 1, gen, vocab)] if seq else [])
        padded = [p for i in [*ctx.check_inputs, *ones] if (p := _padded(i)) is not i]
        with torch.no_grad():
            for inputs in padded + ones:
                try:
                    want = ctx.original(*inputs.args, **inputs.kwargs)
                except Exception:  # the model itself refuses that size: nothing to compare
                    continue
                try:
                    got = ctx.working(*inputs.args, **inputs.kwargs)
                except Exception as exc:
                    return total.add(Comparison(float("inf"), float("inf"), 1, False, f"{type(exc).__name__}: {exc}"))
                total = total.add(compare(want, got))
        return total

    def rebuild(self, module: nn.Module, plan: RerollPlan, model: nn.Module) -> nn.Module:
        """A block-granularity load: the module's own Python loop is the loop (a whole-graph save holds the
        while_loop itself)."""
        return module


def _slower(unrolled: fx.GraphModule, forward: LoopedForward, call: tuple[tuple, dict],
            details: dict[str, Any]) -> str | None:
    """Time the looped graph against the unrolled one on the caller's traced call; why it declines, or None."""
    import time

    from ..speed_check import SLOWER, _confirmed

    args, kwargs = call
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    state = [getattr(m, a) for m, a in forward.state]
    fns = {"unrolled": lambda: unrolled(*state, *forward.constants, *tensors),
           "loop": lambda: forward.graph(*state, *forward.constants, *tensors)}
    with torch.no_grad():
        ms, slower = _confirmed(fns, lambda t: t["loop"] * SLOWER > t["unrolled"], time.perf_counter() + 2.0)
    details["speed"] = {"unrolled_ms": round(ms["unrolled"], 4), "loop_ms": round(ms["loop"], 4),
                        "ratio": round(ms["unrolled"] / ms["loop"], 3)}
    if slower:
        return (f"the loop measured slower than the unrolled graph ({ms['loop']:.3f} ms vs {ms['unrolled']:.3f} ms "
                "on the caller's inputs): left unrolled")
    return None
