"""What every ONNX rewrite rule shares: find sites, check each (a reason when it declines), rewrite.

In the onnxscript-rewriter style — a pattern, a condition that explains why it declines, a replacement —
but the patterns are written as small backward walks from an anchor op, because the torch exporters
spell the same attention a dozen ways (pre-scaled Q and K, K^T through Reshape/Transpose/Reshape, NaN
guards) and a walk states each spelling once. `apply_rules` returns how often each rule fired and why it
declined elsewhere: the convert report is built from these counts, never from guesses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx_ir as ir


class Decline(Exception):
    """Raised inside `match` to say why a site is not rewritten."""


@dataclass
class RuleResult:
    rule: str
    fired: int = 0
    declined: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # what a graph-level rule did, for the report

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "fired": self.fired, "declined": self.declined,
                **({"details": self.details} if self.details else {})}


class OnnxRule:
    """Subclasses set `name` and `anchor` (an op type) and implement `match` and `rewrite`."""

    name = "rule"
    anchor = ""

    def __init__(self, target: str = "standard") -> None:
        self.target = target

    def prepare(self, model: ir.Model) -> None:
        """Called once per model before any site is matched."""

    def match(self, node: ir.Node) -> Any | None:
        """None: not a site at all. A match object: rewrite it. Raise Decline(reason): a site left alone."""
        raise NotImplementedError

    def rewrite(self, graph: ir.Graph, node: ir.Node, match: Any) -> None:
        raise NotImplementedError

    def finish(self, model: ir.Model, fired: int) -> None:
        """Called once after all sites (e.g. to add the opset import a replacement needs)."""


def apply_rules(model: ir.Model, rules: Iterable[OnnxRule]) -> list[RuleResult]:
    results = []
    for rule in rules:
        if hasattr(rule, "apply"):  # a graph-level rule (reroll) walks the graph itself
            results.append(rule.apply(model))
            continue
        result = RuleResult(rule.name)
        rule.prepare(model)
        for node in [n for n in model.graph if n.op_type == rule.anchor]:
            if node.graph is None:  # removed by an earlier rewrite
                continue
            try:
                match = rule.match(node)
            except Decline as why:
                result.declined.append({"site": node.name or node.op_type, "reason": str(why)})
                continue
            if match is None:
                continue
            rule.rewrite(model.graph, node, match)
            result.fired += 1
        rule.finish(model, result.fired)
        results.append(result)
    return results


# -- small helpers the rules share -----------------------------------------------------------------

def producer(value: ir.Value | None, op_type: str | tuple[str, ...]) -> ir.Node | None:
    """The node that makes `value`, if it is a default-domain `op_type` node."""
    if value is None:
        return None
    node = value.producer()
    types = (op_type,) if isinstance(op_type, str) else op_type
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in types:
        return None
    return node


def only_user(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def scalar(value: ir.Value | None) -> float | None:
    """The value as a Python float if it is a constant with one element."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    array = tensor.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def dim(value: ir.Value, axis: int) -> int | str | None:
    """A static int, a symbolic name, or None when unknown."""
    if value.shape is None:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)


def const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer with a fresh name."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def replace_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Point every use of `old` (graph outputs included, keeping the output's name) at `new`."""
    if old.is_graph_output():
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
