"""Compare a rewrite's outputs with the original's, with tolerances fitted to the dtype."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

# Relative to the reference's largest magnitude: floating-point reassociation, not a looser contract.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass
class Comparison:
    max_abs: float = 0.0
    max_rel: float = 0.0
    inputs_checked: int = 0
    ok: bool = True
    why: str = ""

    def add(self, other: "Comparison") -> "Comparison":
        return Comparison(
            max(self.max_abs, other.max_abs),
            max(self.max_rel, other.max_rel),
            self.inputs_checked + other.inputs_checked,
            self.ok and other.ok,
            self.why or other.why,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(expected: Any, actual: Any) -> Comparison:
    """Leaf-by-leaf: same structure, same shapes; floats within TOLERANCE, everything else equal."""
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    if len(exp_leaves) != len(act_leaves) or str(exp_spec) != str(act_spec):
        return Comparison(float("inf"), float("inf"), 1, False, f"output structure differs: {type(actual).__name__}")
    exp_leaves, act_leaves = _open_objects(exp_leaves), _open_objects(act_leaves)
    if len(exp_leaves) != len(act_leaves):
        return Comparison(float("inf"), float("inf"), 1, False, "output objects (e.g. a KV cache) differ in size")
    result = Comparison(inputs_checked=1)
    for i, (e, a) in enumerate(zip(exp_leaves, act_leaves)):
        if not isinstance(e, torch.Tensor):
            if type(e) is not type(a) or (isinstance(e, (int, float, str, bool)) and e != a):
                return Comparison(float("inf"), float("inf"), 1, False, f"output leaf {i} differs: {a!r} != {e!r}")
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            return Comparison(float("inf"), float("inf"), 1, False, f"output leaf {i}: shape/dtype differs")
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return Comparison(float("inf"), float("inf"), 1, False, f"output leaf {i}: integer values differ")
            continue
        diff = (a.float() - e.float()).abs()
        scale = max(e.float().abs().max().item(), 1e-6) if e.numel() else 1.0
        max_abs = diff.max().item() if e.numel() else 0.0
        rel = max_abs / scale
        result.max_abs, result.max_rel = max(result.max_abs, max_abs), max(result.max_rel, rel)
        if not rel <= TOLERANCE.get(e.dtype, 1e-4):  # also catches NaN
            result.ok = False
            result.why = result.why or f"output leaf {i}: relative error {rel:.2e} > {TOLERANCE.get(e.dtype, 1e-4):.0e} ({e.dtype})"
    return result


# A rewrite that reorders floating-point sums (another GEMM) is exact when it lands about as near the
# float64 result as the original does: this many times the original's own error at most, 2 of fp32's
# 24 bits. oneDNN's fp32 GEMM measured 1.7x MKL's error on one layer and 2.7x over SmolLM2's 30 layers.
ROUNDING_FACTOR = 4.0


def within_rounding(expected: Any, actual: Any, exact: Any) -> Comparison:
    """`actual` against `exact` (the original run in float64), measured by the original's own distance
    from it: for every float leaf, max |actual - exact| <= ROUNDING_FACTOR * max |expected - exact|
    (plus float32's epsilon of the leaf's scale, for leaves the original gets exactly right)."""
    first = compare(expected, actual)
    if first.ok or "relative error" not in first.why:  # only a float tolerance miss is judged again
        return first
    leaves = [_open_objects(pytree.tree_flatten(x)[0]) for x in (expected, actual, exact)]
    if len({len(x) for x in leaves}) != 1:
        return first
    result = Comparison(inputs_checked=1)
    for i, (e, a, x) in enumerate(zip(*leaves)):
        if not (isinstance(e, torch.Tensor) and e.is_floating_point() and e.numel()):
            continue
        if not isinstance(a, torch.Tensor) or not isinstance(x, torch.Tensor) or a.shape != e.shape or x.shape != e.shape:
            return first
        x = x.double()
        own, new = (e.double() - x).abs().max().item(), (a.double() - x).abs().max().item()
        scale = max(x.abs().max().item(), 1e-6)
        result.max_abs, result.max_rel = max(result.max_abs, (a.double() - e.double()).abs().max().item()), \
            max(result.max_rel, new / scale)
        if not new <= ROUNDING_FACTOR * own + torch.finfo(e.dtype).eps * scale:  # also catches NaN
            result.ok = False
            result.why = result.why or (f"output leaf {i}: {new / scale:.2e} from the float64 result, more than "
                                        f"{ROUNDING_FACTOR:g}x the original's own {own / scale:.2e}")
    return result


def _open_objects(leaves: list[Any], depth: int = 4) -> list[Any]:
    """Replace objects pytree cannot see into (a KV cache, say) by the tensors they hold, in order."""
    out: list[Any] = []
    for x in leaves:
        if isinstance(x, torch.Tensor) or x is None or isinstance(x, (int, float, str, bool)) or depth == 0:
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_open_objects(list(x), depth - 1))
        elif isinstance(x, dict):
            out.extend(_open_objects(list(x.values()), depth - 1))
        elif hasattr(x, "__dict__"):
            out.append(type(x).__name__)
            out.extend(_open_objects(list(vars(x).values()), depth - 1))
        else:
            out.append(x)
    return out
