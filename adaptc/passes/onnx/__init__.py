"""ONNX forms of adaptc's passes: pattern rewrites on onnx-ir graphs, one rule per file.

`RULES` maps the names users pass to `adaptc convert --passes` to rule classes; `apply_rules` runs them
and counts how often each fired (and why it declined elsewhere).
"""
from ._rule import Decline, OnnxRule, RuleResult, apply_rules
from .attention import AttentionFusion
from .moe import MoEFusion
from .reroll import Reroll

RULES: dict[str, type[OnnxRule]] = {"attention": AttentionFusion, "moe": MoEFusion, "reroll": Reroll}

__all__ = ["RULES", "Decline", "OnnxRule", "RuleResult", "apply_rules", "AttentionFusion", "MoEFusion", "Reroll"]
