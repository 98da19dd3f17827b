"""Re-roll weight-shared layers: n consecutive copies of one block become one ONNX `Loop` over one copy.

Tracing unrolls ALBERT's `for i in range(num_hidden_layers): x = shared_group(x)` (and any user loop over
one block) into n copies of the block's nodes; the dynamo exporter even gives every copy its own
pre-transposed weight initializers, identical in content. A graph-level rule, with no metadata:

- for every value s, hash each node downstream of s relative to s (op, attributes, and inputs as: s
  itself, a node output downstream of s by its own hash, an initializer by its *content*, any other value
  by identity) — so the hash of a value t is the expression "t as a function of s" over shared weights;
- a chain s0 → s1 → … → sn where each s(k+1) has the same hash relative to s(k) is n copies of one block
  f with s(k+1) = f(s(k)), reading the same outer values (mask, shapes) and the same weights;
- it is re-rolled only if nothing outside the chain reads a block's inner values or the states s1…s(n-1).

The Loop carries the hidden state; the body reads the outer values by name (ONNX outer scope), so the
other copies' nodes and their duplicate weights are pruned. When copies match in structure but not in
weights (BERT: distinct layers), the rule declines and says so.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._rule import OnnxRule, RuleResult, const, replace_output
from .cleanup import prune, sort

MIN_BODY = 4  # nodes: a repeated Add/Mul pair is not a layer
MIN_WEIGHT = 256  # elements: below it a shared initializer is a shape or a scalar, not a layer's weight
COMMUTATIVE = {"Add", "Mul", "And", "Or", "Xor", "Max", "Min", "Sum", "Equal"}


@dataclass
class Chain:
    states: list[ir.Value]        # s0 … sn
    bodies: list[list[ir.Node]]   # bodies[k]: the nodes computing s(k+1) from s(k), topological order

    @property
    def saving(self) -> int:
        return (len(self.bodies) - 1) * len(self.bodies[0])


class Reroll(OnnxRule):
    name = "reroll"
    anchor = ""  # graph-level: `apply` replaces the per-node walk

    def apply(self, model: ir.Model) -> RuleResult:
        result = RuleResult(self.name)
        prune(model)  # earlier rules leave dead nodes that still read a block's values
        sort(model)  # the walk below reads the node order as a topological one; earlier rules append nodes
        graph = model.graph
        if not shares_weights(graph):  # the search below is quadratic in the nodes: a cheap test first
            result.declined.append({"site": "graph", "reason": "no weight matrix is read by two places or stored twice: "
                                    "no shared block to re-roll"})
            return result
        loops = []
        while (exact := find_chain(graph, by_content=True)) is not None:  # an encoder and a decoder stack: two
            loops.append({"blocks": len(exact.bodies), "body_nodes": len(exact.bodies[0]), "site": _site(exact)})
            reroll(graph, exact, suffix=f"_{len(loops) - 1}" if loops[:-1] else "")
        if loops:
            result.fired, result.details = len(loops), {**loops[0], **({"loops": loops} if len(loops) > 1 else {})}
            return result
        loose = find_chain(graph, by_content=False)
        if loose is not None:
            result.declined.append({"site": _site(loose), "reason": (
                f"{len(loose.bodies)} structurally identical blocks of {len(loose.bodies[0])} nodes read "
                "different weights (distinct layers, not shared ones): not re-rolled")})
        return result


def shares_weights(graph: ir.Graph, min_elements: int = MIN_WEIGHT) -> bool:
    """Whether some weight matrix (an initializer of rank 2 or more, `min_elements` or more) is read by
    two nodes or stored twice with the same content: n copies of one block need that, distinct layers
    (BERT) do not have it. Vectors are left out: freshly initialised biases and norms are all alike."""
    seen: set[tuple] = set()
    for v in graph.initializers.values():
        t = v.const_value
        if t is None or len(t.shape) < 2 or int(np.prod(t.shape)) < min_elements:
            continue
        if len({id(u.node) for u in v.uses()}) > 1:
            return True
        key = (str(t.dtype), tuple(t.shape), hashlib.blake2b(t.tobytes(), digest_size=16).digest())
        if key in seen:
            return True
        seen.add(key)
    return False


def _site(chain: Chain) -> str:
    return f"{chain.states[0].name} -> {chain.states[-1].name}"


def find_chain(graph: ir.Graph, by_content: bool = True) -> Chain | None:
    """The re-rollable chain removing the most nodes, or None."""
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    leaves: dict[int, int] = {}

    def leaf(v: ir.Value) -> int:
        key = leaves.get(id(v))
        if key is None:
            key = _const_key(v, by_content) if v.const_value is not None else hash(("value", id(v)))
            leaves[id(v)] = key
        return key

    relative = {}  # id(s) -> ({id(value): hash}, {hash: [values]})
    def hashes(s: ir.Value):
        if id(s) not in relative:
            own: dict[int, int] = {id(s): hash("state")}
            by_hash: dict[int, list[ir.Value]] = {}
            for node in nodes[_start(s, position):]:
                if not any(v is not None and id(v) in own for v in node.inputs):
                    continue
                args = tuple(own.get(id(v), leaf(v)) if v is not None else 0 for v in node.inputs)
                if node.op_type in COMMUTATIVE and node.domain in ("", "ai.onnx"):  # x + f(x) vs f(x) + x
                    args = tuple(sorted(args))
                key = hash((node.op_type, node.domain, node.overload, _attrs_key(node), args))
                for i, out in enumerate(node.outputs):
                    own[id(out)] = h = hash((key, i))
                    by_hash.setdefault(h, []).append(out)
            relative[id(s)] = (own, by_hash)
        return relative[id(s)]

    best: Chain | None = None
    for s in [*graph.inputs, *(out for node in nodes for out in node.outputs)]:  # a loop may start at an input
        if not s.uses():
            continue
        own, _ = hashes(s)
        for t in _node_outputs(nodes, position, own, s):
            chain = _grow(s, t, own[id(t)], hashes)
            chain = _checked(chain, position, hashes) if chain is not None else None
            if chain is not None and len(chain.bodies[0]) >= MIN_BODY and (best is None or chain.saving > best.saving):
                best = chain
        relative.pop(id(s), None)  # later starts never look back: keeps memory at one pass's worth
    return best


def _start(s: ir.Value, position) -> int:
    """Where the nodes after `s` begin in the topological order."""
    return 0 if s.producer() is None else position[id(s.producer())] + 1


def _node_outputs(nodes, position, own, s):
    return [out for n in nodes[_start(s, position):] for out in n.outputs if id(out) in own]


def _grow(s0: ir.Value, s1: ir.Value, h: int, hashes) -> Chain | None:
    states = [s0, s1]
    while True:
        _, by_hash = hashes(states[-1])
        nxt = by_hash.get(h)
        if not nxt or len(nxt) != 1:
            break
        states.append(nxt[0])
    return Chain(states, []) if len(states) > 2 else None


def _checked(chain: Chain, position, hashes) -> Chain | None:
    """Fill in the bodies; None unless each is closed: only its last value is read outside it."""
    bodies = []
    for a, b in zip(chain.states, chain.states[1:]):
        below_a, _ = hashes(a)
        body, stack = {}, [b.producer()]
        while stack:  # the ancestors of b downstream of a
            node = stack.pop()
            if id(node) in body:
                continue
            body[id(node)] = node
            for v in node.inputs:
                p = v.producer() if v is not None else None
                if p is not None and v is not a and id(v) in below_a:
                    stack.append(p)
        bodies.append(sorted(body.values(), key=lambda n: position[id(n)]))
    sizes = {len(b) for b in bodies}
    if len(sizes) != 1:
        return None
    for k, body in enumerate(bodies):
        inside = {id(n) for n in body}
        last = chain.states[k + 1]
        for node in body:
            for out in node.outputs:
                if out is last:
                    continue
                if out.is_graph_output() or any(id(u.node) not in inside for u in out.uses()):
                    return None
        if k + 1 < len(bodies):  # an intermediate state: read only by the next body
            following = {id(n) for n in bodies[k + 1]}
            if last.is_graph_output() or any(id(u.node) not in following for u in last.uses()):
                return None
    return Chain(chain.states, bodies)


def reroll(graph: ir.Graph, chain: Chain, suffix: str = "") -> ir.Node:
    """Replace the chain's bodies by Loop(trip_count=n) over the first body, carrying the state."""
    s0, sn, first = chain.states[0], chain.states[-1], chain.bodies[0]
    s1 = chain.states[1]
    iteration = ir.Value(name=f"reroll_iter{suffix}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
    cond_in = ir.Value(name=f"reroll_cond_in{suffix}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL))
    same_shape = s0.shape is not None and s1.shape is not None and list(s0.shape) == list(s1.shape)
    state_in = ir.Value(name=f"reroll_state_in{suffix}", shape=s0.shape if same_shape else None, type=s0.type)
    trips = const(graph, f"reroll_trip_count{suffix}", np.array(len(chain.bodies), dtype=np.int64))
    loop = ir.node("Loop", inputs=[trips, None, s0], num_outputs=1, name=f"reroll_loop{suffix}")
    out = loop.outputs[0]
    out.name, out.shape, out.type = f"reroll_out{suffix}", sn.shape, sn.type
    graph.insert_before(first[0], loop)
    replace_output(graph, sn, out)
    for body in reversed(chain.bodies[1:]):
        graph.remove(list(reversed(body)), safe=True)
    graph.remove(first, safe=False)
    for node in first:
        for i, v in enumerate(node.inputs):
            if v is s0:
                node.replace_input_with(i, state_in)
    cond_out = ir.node("Identity", inputs=[cond_in], name=f"reroll_cond{suffix}")
    cond_out.outputs[0].name = f"reroll_cond_out{suffix}"
    body = ir.Graph([iteration, cond_in, state_in], [cond_out.outputs[0], s1], nodes=[*first, cond_out],
                    name=f"reroll_body{suffix}", opset_imports=dict(graph.opset_imports))
    loop.attributes["body"] = ir.AttrGraph("body", body)
    return loop


def _const_key(v: ir.Value, by_content: bool) -> int:
    t = v.const_value
    if not by_content:
        return hash(("const", str(t.dtype), tuple(t.shape)))
    digest = hashlib.blake2b(t.tobytes(), digest_size=16).hexdigest()
    return hash(("const", str(t.dtype), tuple(t.shape), digest))


def _attrs_key(node: ir.Node) -> tuple:
    items = []
    for name, attr in sorted(node.attributes.items()):
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            items.append((name, id(node)))  # nodes with subgraphs never match another copy
        else:
            items.append((name, str(attr.value)))
    return tuple(items)
