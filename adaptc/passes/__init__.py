"""Passes by name. One pass per file; exact passes need no data, approximate ones need calibration.

    passes=["early_exit"]                      # by name, default config
    passes=[EarlyExit(delta=0.05)]             # the pass with its config's fields
    passes=[EarlyExitConfig(delta=0.05)]       # or the config itself

Each pass's options are the fields of its config class (`EarlyExitConfig`, ...): validated on
construction, a misspelled one an AdaptcError naming the nearest field.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import AdaptcError
from ._base import Decline, Pass, PassManager, PassResult, Plan  # noqa: F401
from ._config import PassConfig, config_from_dict

# Public classes, imported on first use (passes pull in transformers-facing code).
_LAZY = {
    "MoEFusion": "moe_fusion", "MoEFusionConfig": "moe_fusion",
    "AttentionFusion": "attention_fusion", "AttentionFusionConfig": "attention_fusion",
    "SparseAttention": "sparse_attention", "SparseAttentionConfig": "sparse_attention",
    "SdpaFusion": "sdpa_fusion", "SdpaFusionConfig": "sdpa_fusion",
    "EagerAttentionFusion": "eager_attention_fusion", "EagerAttentionFusionConfig": "eager_attention_fusion",
    "Reroll": "reroll", "RerollConfig": "reroll",
    "EarlyExit": "early_exit", "EarlyExitConfig": "early_exit",
    "TunedLinear": "tuned_linear", "TunedLinearConfig": "tuned_linear",
    "Recursion": "recursion", "RecursionConfig": "recursion",
    "TokenRouter": "token_router", "TokenRouterConfig": "token_router",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def registry() -> dict[str, type[Pass]]:
    from .attention_fusion import AttentionFusion
    from .eager_attention_fusion import EagerAttentionFusion
    from .early_exit import EarlyExit
    from .moe_fusion import MoEFusion
    from .recursion import Recursion
    from .reroll import Reroll
    from .sdpa_fusion import SdpaFusion
    from .sparse_attention import SparseAttention
    from .token_router import TokenRouter
    from .tuned_linear import TunedLinear

    # tuned_linear after moe_fusion (which reads the experts' own layers) and before the attention
    # fusions: at block granularity the speed check rolls back the most recent pass first, and the
    # attention op is the one that can lose (decode steps on a CPU). attention_fusion before
    # sdpa_fusion: what it takes over no longer calls SDPA for sdpa_fusion to find; sparse_attention
    # falls back to its exact op where a pattern does not apply; reroll last of the exact passes: its
    # loop body is the block as the others left it. token_router after early_exit: its loop runs the
    # exits too, and it certifies the two together. recursion last: it replaces the blocks' linear
    # layers, which the passes before it read as they are.
    return {p.name: p for p in (MoEFusion, TunedLinear, AttentionFusion, SparseAttention, SdpaFusion,
                                EagerAttentionFusion, Reroll, EarlyExit, TokenRouter, Recursion)}


def config_classes() -> dict[str, type[PassConfig]]:
    """The allowlist a saved file's pass configs are read back through: type name -> class."""
    return {cls.config_class.__name__: cls.config_class for cls in registry().values()}


def load_config(data: Any) -> PassConfig:
    """A pass config from JSON (a saved file), only as one of the known classes; ValueError otherwise."""
    return config_from_dict(data, config_classes())


def option_readers(name: str) -> list[str]:
    """The passes whose config has a field `name`."""
    return [n for n, cls in registry().items() if name in cls.config_class.field_names()]


def select(passes: Any = None, options: dict[str, Any] | None = None) -> list[Pass]:
    """The passes to run, in pipeline order, each with its config. `passes`: None or "exact" (every
    exact pass), a name, or a list of names, Pass instances and PassConfig instances. `options`
    (compile's keyword options for passes) set that field on every selected pass that has it; one
    that no selected pass has is an AdaptcError naming the pass that would read it."""
    known = registry()
    by_config = {cls.config_class: name for name, cls in known.items()}
    chosen: dict[str, Any] = {}
    if passes is None or passes in ("exact", "all_exact"):
        chosen = {name: None for name, cls in known.items() if cls.exact}
    else:
        for item in [passes] if isinstance(passes, (str, Pass, PassConfig)) else list(passes):
            if isinstance(item, str):
                name, config = item, None
            elif isinstance(item, Pass):
                name, config = item.name, item.config
            elif isinstance(item, PassConfig) and type(item) in by_config:
                name, config = by_config[type(item)], item
            else:
                raise AdaptcError(f"passes= takes pass names, passes (EarlyExit(delta=0.05)) or their configs, "
                                  f"not {type(item).__name__}")
            if name not in known:
                raise ValueError(f"unknown pass(es) [{name!r}]; known passes: {sorted(known)}")
            if name in chosen:
                raise AdaptcError(f"pass {name!r} is given twice in passes=")
            chosen[name] = config
    configs = {name: config if config is not None else known[name].config_class() for name, config in chosen.items()}
    for key, value in (options or {}).items():
        takers = [name for name in chosen if key in known[name].config_class.field_names()]
        if not takers:
            readers = option_readers(key)
            if not readers:
                raise AdaptcError(f"unknown compile option {key!r}")
            raise AdaptcError(f"option {key!r} is read by {', '.join(readers)}, which {'is' if len(readers) == 1 else 'are'}"
                              f" not among passes={list(chosen)}")
        for name in takers:
            given, default = getattr(configs[name], key), known[name].config_class.__dataclass_fields__[key].default
            if chosen[name] is not None and given != default and given != value:
                raise AdaptcError(f"{name} option {key!r} is set twice: {given!r} in passes= and {value!r} as a "
                                  "keyword; set it in one place")
            configs[name] = configs[name].replace(**{key: value})
    return [known[name](configs[name]) for name in known if name in chosen]
