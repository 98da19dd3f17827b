"""SDPA fusion (exact): `F.scaled_dot_product_attention` calls in any model run on `adaptc::attention`.

For models that call SDPA themselves (not through Hugging Face's attention interface, which
`attention_fusion` handles). The pass finds the innermost modules that call SDPA on the example
inputs and wraps each in `SdpaIntercept`, which runs it under a TorchFunctionMode that sends SDPA
to the adaptc op with the mask's structure (is_causal, or a boolean mask recognised as causal /
sliding window / key padding). Calls it cannot take (dropout, float masks) go to SDPA unchanged.
Under torch.export the mode is traced through, so the captured graph holds the adaptc op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import kernels  # noqa: F401  (registers adaptc::attention)
from ..analysis.calls import innermost_callers
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig
from .attention_fusion import mask_structure

SDPA = F.scaled_dot_product_attention


def why_not(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> str | None:
    """None when adaptc::attention computes exactly this SDPA call, else why not."""
    if dropout_p:
        return "dropout"
    if query.dim() != 4 or key.dim() != 4:
        return "q/k/v are not [B, H, L, D]"
    if query.shape[1] != key.shape[1] and not (enable_gqa and query.shape[1] % key.shape[1] == 0):
        return "query and key heads differ without enable_gqa"
    if attn_mask is not None and (attn_mask.dtype != torch.bool or is_causal):
        return "an additive (float) mask" if attn_mask.dtype != torch.bool else "a mask together with is_causal"
    return None


def adaptc_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    B, Lq, Lk = query.shape[0], query.shape[2], key.shape[2]
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    if attn_mask is None:  # SDPA's is_causal is aligned at the top left: query i sees keys j <= i
        return torch.ops.adaptc.attention(query, key, value, None, None, scale, is_causal, 0, 0)
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[1] == 1:
        s = mask_structure(mask.expand(B, 1, Lq, Lk), Lq, Lk, causal=True, window=0)
        q_offset = Lk - Lq  # the structures mask_structure recognises are aligned at the bottom right
        return torch.ops.adaptc.attention(query, key, value, s.key_padding, s.mask, scale, s.causal, s.window, q_offset)
    return torch.ops.adaptc.attention(query, key, value, None, mask, scale, False, 0, 0)


class SdpaToAdaptc(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA and why_not(*args, **kwargs) is None:
            return adaptc_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


class SdpaIntercept(nn.Module):
    """Runs the wrapped module with its SDPA calls on adaptc::attention; otherwise the same module."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with SdpaToAdaptc():
            return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def sdpa_callers(model: nn.Module, run) -> dict[str, list[str | None]]:
    """Innermost module path -> why_not() of each SDPA call it made while `run()` ran."""
    return innermost_callers(model, run, lambda func: func is SDPA, lambda func, *a, **k: why_not(*a, **k))


@dataclass(frozen=True)
class SdpaFusionConfig(PassConfig):
    """sdpa_fusion has no options: calls the op cannot take exactly go to SDPA unchanged."""


@dataclass
class SdpaFusionPlan(Plan):
    """Nothing per site: the wrapper decides per call."""


class SdpaFusion(Pass):
    name = "sdpa_fusion"
    exact = True
    config_class = SdpaFusionConfig
    plan_class = SdpaFusionPlan

    def match(self, ctx: CompileContext) -> list[Site]:
        calls = sdpa_callers(ctx.working, lambda: ctx.working(*ctx.inputs.args, **ctx.inputs.kwargs))
        return [Site(path, ctx.working.get_submodule(path), {"calls": reasons}) for path, reasons in calls.items()
                if not isinstance(ctx.working.get_submodule(path), SdpaIntercept)]

    def no_sites_reason(self) -> str:
        return "no F.scaled_dot_product_attention calls outside Hugging Face's attention interface"

    def check(self, ctx: CompileContext, site: Site) -> SdpaFusionPlan | Decline | str:
        reasons = [r for r in site.info["calls"] if r is not None]
        return f"its SDPA calls use {reasons[0]}" if len(reasons) == len(site.info["calls"]) else SdpaFusionPlan()

    def apply(self, ctx: CompileContext, site: Site, plan: SdpaFusionPlan, edit: ModuleEdit) -> None:
        edit.replace(site.path, SdpaIntercept(site.module))

    def rebuild(self, module: nn.Module, plan: SdpaFusionPlan, model: nn.Module) -> nn.Module:
        return SdpaIntercept(module)
