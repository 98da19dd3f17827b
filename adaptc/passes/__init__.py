"""Passes by name. One pass per file; exact passes need no data, approximate ones need calibration."""
from __future__ import annotations

from ._base import Pass, PassManager, PassResult  # noqa: F401


def registry() -> dict[str, type[Pass]]:
    from .attention_fusion import AttentionFusion
    from .eager_attention_fusion import EagerAttentionFusion
    from .early_exit import EarlyExit
    from .moe_fusion import MoEFusion
    from .sdpa_fusion import SdpaFusion
    from .sparse_attention import SparseAttention

    # attention_fusion first: what it takes over no longer calls SDPA for sdpa_fusion to find;
    # sparse_attention falls back to its exact op where a pattern does not apply.
    return {p.name: p for p in (MoEFusion, AttentionFusion, SparseAttention, SdpaFusion, EagerAttentionFusion,
                                EarlyExit)}


def select(names: list[str] | None) -> list[Pass]:
    """The passes to run, in pipeline order. None means every exact pass."""
    known = registry()
    if names is None:
        return [cls() for cls in known.values() if cls.exact]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; known passes: {sorted(known)}")
    return [known[n]() for n in known if n in names]
