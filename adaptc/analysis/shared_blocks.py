"""Which blocks run repeatedly in sequence with shared weights: ALBERT's layer group, `for _ in range(n): x = block(x)`.

Read from the module tree while the model runs on example inputs (forward hooks record each module call,
its caller, its first tensor in and out): a run is consecutive calls made by one caller to the same
module — or to modules holding the very same parameters — with no other module called in between and each
fed a new tensor (`x = x + block(x)` counts: the residual is plain torch code, not a module). This is what
tracing unrolls into n copies, and what the ONNX `reroll` rule folds back into one Loop (which checks the
data flow exactly on the graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class SharedRun:
    caller: str          # the module whose forward makes the calls ("" is the root)
    block: str           # the (first) module called
    calls: int
    parameters: int      # shared by every call

    def to_dict(self) -> dict[str, Any]:
        return {"caller": self.caller, "block": self.block, "calls": self.calls, "parameters": self.parameters}


def shared_runs(model: nn.Module, run: Callable[[], Any]) -> list[SharedRun]:
    """Runs of >= 2 chained calls of one weight-shared block while `run()` runs, outermost callers first."""
    paths = {m: p for p, m in model.named_modules(remove_duplicate=False)}
    # per call: the enclosing call's index (-1: none), the module, its first tensor in and out (the tensors
    # themselves, kept alive while `run` runs: the ids of freed ones get reused)
    calls: list[list[Any]] = []
    stack: list[int] = []

    def pre(module, args, kwargs):
        calls.append([stack[-1] if stack else -1, module, _first_tensor((args, kwargs)), None])
        stack.append(len(calls) - 1)

    def post(module, args, kwargs, out):
        calls[stack.pop()][3] = _first_tensor(out)

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in paths]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in paths]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return _runs(calls, paths)


def _runs(calls: list[list[Any]], paths) -> list[SharedRun]:
    by_caller: dict[int, list[list[Any]]] = {}  # one caller's call: its own calls, in order
    for call in calls:
        by_caller.setdefault(call[0], []).append(call)
    found = []
    for chain in by_caller.values():
        i = 0
        while i < len(chain):
            j = i + 1
            while j < len(chain) and same_block(chain[i][1], chain[j][1]) and chain[j][2] is not None \
                    and chain[j][2] is not chain[j - 1][2]:  # the same x twice is a fan-out, not a sequence
                j += 1
            params = sum(p.numel() for p in chain[i][1].parameters())
            if j - i >= 2 and params:
                caller = paths[calls[chain[i][0]][1]] if chain[i][0] >= 0 else ""
                found.append(SharedRun(caller, paths[chain[i][1]], j - i, params))
            i = j
    return sorted(set(found), key=lambda r: (r.caller.count(".") if r.caller else -1, r.caller, r.block))


def same_block(a: nn.Module, b: nn.Module) -> bool:
    """One module, or two holding the very same parameters (tied copies)."""
    if a is b:
        return True
    pa, pb = [id(p) for p in a.parameters()], [id(p) for p in b.parameters()]
    return bool(pa) and pa == pb and type(a) is type(b)


def _first_tensor(obj) -> torch.Tensor | None:
    """The first tensor in a (nested) structure: what a block hands on to the next call."""
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        obj.values() if hasattr(obj, "values") and callable(obj.values) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


# -- the same runs in a captured graph ----------------------------------------------------------------

@dataclass
class GraphChain:
    """n applications of one block in an exported graph: segment k (the block's nodes, plus the caller's
    glue such as a residual add) maps state k to state k + 1 and reads only `shared` values besides it."""

    states: list[Any]           # fx nodes s0 ... sn
    segments: list[list[Any]]   # segments[k]: the nodes computing s(k+1) from s(k), in graph order
    shared: list[Any]           # what every segment reads besides its state: weights, the mask, sizes


def graph_chain(graph: Any, block_paths: set[str], calls: int) -> GraphChain | str:
    """The chain of `calls` applications of the block at `block_paths` (one module, or tied copies: paths
    relative to the exported module) in `graph` (an fx.Graph from torch.export); a str says why not.
    Copies are told apart by export's per-call `nn_module_stack` keys ("block", "block@1", ...); each must
    compute the same expression of its state over the same shared values, and nothing outside the chain
    may read a state between applications or a value inside one."""
    copies: dict[str, list[Any]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        key = next((k for k, (path, _) in stack.items() if path in block_paths), None)
        if key is not None and node.op == "call_function":
            copies.setdefault(key, []).append(node)
    order = list(copies.values())
    if len(order) < calls:
        return f"the graph holds {len(order)} applications of the block, the model made {calls} calls"
    pos = {n: i for i, n in enumerate(graph.nodes)}
    for chain in _linked(order):  # consecutive copies whose state links them; the run is one of these
        if len(chain) == calls:
            return _check_chain(chain, pos)
    return f"no {calls} applications in the graph feed one another"


def _externals(nodes: list[Any]) -> list[Any]:
    inside, out = set(nodes), {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                out.setdefault(a, None)
    return list(out)


def _linked(order: list[list[Any]]) -> list[list[list[Any]]]:
    """Maximal runs of consecutive copies where copy k + 1 reads exactly one value copy k does not, and
    that value depends on copy k."""
    runs, current = [], [order[0]]
    for a, b in zip(order, order[1:]):
        new = [e for e in _externals(b) if e not in set(_externals(a))]
        if len(new) == 1 and _depends_on(new[0], set(a)):
            current.append(b)
        else:
            runs.append(current)
            current = [b]
    return runs + [current]


def _depends_on(node: Any, sources: set) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in sources:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _glue(copy: list[Any], state: Any) -> list[Any]:
    """Caller nodes between a copy and the next state (the residual add of `x = x + block(x)`)."""
    inside, glue, todo = set(copy), {}, [state]
    while todo:
        n = todo.pop()
        if n in inside or n in glue or not _depends_on(n, inside):
            continue
        glue[n] = None
        todo.extend(n.all_input_nodes)
    return list(glue)


def _same(a: Any, b: Any, env: dict) -> bool:
    import torch.fx as fx

    if isinstance(a, fx.Node):
        return isinstance(b, fx.Node) and env.get(a, a) is b
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y, env) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], env) for k in a)
    return type(a) is type(b) and a == b


def _match(seg: list[Any], other: list[Any], env: dict) -> bool:
    """Whether `other` computes, node for node, what `seg` does, with `env` mapping seg's values onto it."""
    if len(seg) != len(other):
        return False
    for x, y in zip(seg, other):
        env[x] = y
        if x.target != y.target or not _same(x.args, y.args, env) or not _same(x.kwargs, y.kwargs, env):
            return False
    return True


def _last_glue(glue: list[Any], env: dict, copies: set) -> list[Any] | None:
    """The last copy's glue, found by following the previous segment's glue from the last copy."""
    found = []
    for g in glue:
        users = {u for a in g.all_input_nodes if a in env for u in env[a].users}
        twin = next((u for u in users if u not in copies and u.target == g.target and _same(g.args, u.args, env)
                     and _same(g.kwargs, u.kwargs, env)), None)
        if twin is None:
            return None
        env[g] = twin
        found.append(twin)
    return found


def _check_chain(copies: list[list[Any]], pos: dict) -> GraphChain | str:
    n = len(copies)
    firsts = [e for e in _externals(copies[0]) if e not in set(_externals(copies[1]))]
    if len(firsts) != 1:
        return f"the first application reads {len(firsts)} values the second does not: not one carried state"
    states, segments = [firsts[0]], []
    for k in range(n - 1):  # the state after copy k is what copy k + 1 reads that copy k does not
        states.append(next(e for e in _externals(copies[k + 1]) if e not in set(_externals(copies[k]))))
        segments.append(sorted(copies[k] + _glue(copies[k], states[k + 1]), key=pos.__getitem__))
    everything = {node for c in copies for node in c}
    env = {states[-2]: states[-1]}
    if not _match(copies[-2], copies[-1], env):
        return "the last application computes something else than the one before"
    last_glue = _last_glue([x for x in segments[-1] if x not in set(copies[-2])], env, everything)
    if last_glue is None:
        return "the last application is not followed by the code that follows the others"
    segments.append(sorted(copies[-1] + last_glue, key=pos.__getitem__))
    if states[-1] not in env:
        return "an application's result is computed outside it"
    states.append(env[states[-1]])
    for k in range(n - 1):
        if not _match(segments[k], segments[k + 1], {states[k]: states[k + 1]}):
            return f"application {k + 1} computes something else than application {k}"
    shared = [e for e in _externals(segments[0]) if e is not states[0]]
    for k, seg in enumerate(segments):
        if [e for e in _externals(seg) if e is not states[k]] != shared:
            return f"application {k} reads other values than the first (not one block over shared weights)"
        inside = set(seg)
        if states[k + 1] not in inside:
            return f"application {k}'s result is computed outside it"
        if any(u not in inside for node in seg if node is not states[k + 1] for u in node.users):
            return f"a value inside application {k} is read outside it (returned or stored?)"
        if k < n - 1 and any(u not in set(segments[k + 1]) for u in states[k + 1].users):
            return f"the state after application {k} is read outside the chain (hidden states returned?)"
    return GraphChain(states, segments, shared)
