"""Attention fusion (exact): Hugging Face attention runs on `adaptc::attention`, which skips masked tiles.

Transformers v5 models call attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
and build masks through `ALL_MASK_ATTENTION_FUNCTIONS`. The pass registers an "adaptc" entry in both
(masks exactly as for SDPA) and switches the compiled copy's config to it; the user's model keeps
its own config. Each call recovers the mask's structure — causal, sliding window, key padding — from
the mask Hugging Face built (once per mask tensor: every layer shares it) and passes the op that
structure instead of the dense mask, so kernels skip what it hides. A mask of any other shape is
passed as it is, and the op skips what it can from its contents.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import kernels  # noqa: F401  (registers adaptc::attention)
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig

IMPLEMENTATION = "adaptc"
SUPPORTED_FROM = ("sdpa", "eager")  # what the model ran with: the original we must equal


@dataclass(frozen=True)
class Structure:
    causal: bool
    window: int
    key_padding: torch.Tensor | None
    mask: torch.Tensor | None  # only when no structure explains the mask


@dataclass
class _Explained:
    where: tuple                   # the mask's storage and layout when explained
    version: int | None            # its version counter then, which every in-place edit bumps
    contents: torch.Tensor | None  # inference tensors have no version counter: a copy of the mask instead
    structures: dict[tuple[bool, int], Structure]


# id(mask tensor) -> what was explained from it; an entry dies with its tensor, before its id is reused.
# Every layer of a forward shares one mask, so it is explained once; an in-place edit makes it stale.
_structures: dict[int, _Explained] = {}


def _known(mask: torch.Tensor) -> dict[tuple[bool, int], Structure]:
    key, entry = id(mask), _structures.get(id(mask))
    where = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype, mask.device)
    version = None if mask.is_inference() else mask._version
    if entry is None:
        weakref.finalize(mask, _structures.pop, key, None)
    elif entry.where == where and (entry.version == version if version is not None
                                   else entry.contents is not None and torch.equal(entry.contents, mask)):
        return entry.structures
    _structures[key] = _Explained(where, version, mask.clone() if version is None else None, {})
    return _structures[key].structures


def _tracing(t: torch.Tensor) -> bool:
    return (torch.compiler.is_compiling() or isinstance(t, torch.fx.Proxy)
            or torch._guards.detect_fake_mode(t) is not None)


def mask_structure(mask: torch.Tensor | None, Lq: int, Lk: int, causal: bool, window: int) -> Structure:
    """The structure of a boolean SDPA mask [B, 1, Lq, Lk] (True = attend) that Hugging Face built."""
    if mask is None:  # HF drops the mask only when plain causal (or full, for one query) attention is exact
        return Structure(causal and Lq > 1, 0, None, None)
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or _tracing(mask):
        return Structure(False, 0, None, mask)
    known = _known(mask)
    if (causal, window) not in known:
        known[(causal, window)] = explain_mask(mask, Lq, Lk, causal, window)
    return known[(causal, window)]


def explain_mask(mask: torch.Tensor, Lq: int, Lk: int, causal: bool, window: int) -> Structure:
    # Keys some query sees; the others are padding (or never visible, which is the same to attention).
    used = mask.view(torch.uint8)[:, 0].amax(dim=1).bool()  # [B, Lk]; uint8: a fast reduction
    key_padding = None if bool(used.all()) else used
    for c, w in dict.fromkeys([(causal, window), (True, window), (True, 0), (False, 0)]):
        if _matches(mask, Lq, Lk, c, w, key_padding):
            return Structure(c, w, key_padding, None)
    return Structure(False, 0, None, mask)


def _any(x: torch.Tensor) -> bool:
    # amax over uint8 is several times faster than any() on a strided bool slice.
    return x.numel() > 0 and bool(x.view(torch.uint8).amax())


def _matches(mask: torch.Tensor, Lq: int, Lk: int, causal: bool, window: int, key_padding: torch.Tensor | None,
             rows: int = 256) -> bool:
    """Whether `mask` is exactly that structure. In row blocks: outside each block's key range the
    mask must be empty, inside it must equal the band (a cache-sized compare, never an [Lq, Lk] copy)."""
    from ..kernels.attention.reference import key_range, visible

    for i0 in range(0, Lq, rows):
        i1 = min(Lq, i0 + rows)
        lo, hi = key_range(i0, i1, Lk, causal, window, Lk - Lq)
        part = mask[:, 0, i0:i1]
        if _any(part[..., :lo]) or _any(part[..., max(lo, hi):]):
            return False
        if hi <= lo:
            continue
        want = visible(i1, Lk, causal, window, Lk - Lq, mask.device, q_start=i0, k_start=lo, k_stop=hi)
        if key_padding is not None:
            pad = key_padding[:, None, lo:hi]
            want = pad if want is None else want & pad
        band = part[..., lo:hi]
        if not (bool(band.all()) if want is None else torch.equal(band, want.expand_as(band))):
            return False
    return True


def adaptc_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, sliding_window: int | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "adaptc" entry of Hugging Face's attention interface; SDPA's for what it does not cover."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unusual = (dropout and module.training) or any(kwargs.get(k) is not None for k in ("softcap", "head_mask",
                                                                                       "position_bias", "cache", "s_aux"))
    if unusual or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    Lq, Lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    s = mask_structure(attention_mask, Lq, Lk, causal, sliding_window or 0)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.adaptc.attention(query, key, value, s.key_padding, s.mask, scale, s.causal, s.window, Lk - Lq)
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str, fn) -> None:
    """Make `fn` the Hugging Face attention implementation `name`, with SDPA's boolean masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def register() -> None:
    """Make "adaptc" a Hugging Face attention implementation (idempotent)."""
    register_attention(IMPLEMENTATION, adaptc_attention_forward)


def interface_sites(model: nn.Module) -> list[Site]:
    """The Hugging Face attention modules of `model` (they call the attention interface)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "_supports_sdpa"):  # not a Hugging Face PreTrainedModel
        return []
    return [Site(path, module, {"config": config}) for path, module in model.named_modules()
            if type(module).__name__.endswith("Attention") and hasattr(module, "config")]


def no_sdpa_reason(model: nn.Module) -> str | None:
    """Why a Hugging Face model's attention cannot run as SDPA's (what "adaptc" attention computes, from
    SDPA's masks), or None. Models declare it; Gemma 2 and 3 for their soft-capped attention logits."""
    if getattr(model, "_supports_sdpa", False):
        return None
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    if softcap:
        return (f"the model soft-caps its attention logits (attn_logit_softcapping={softcap}), "
                "which adaptc::attention does not compute")
    return (f"{type(model).__name__} declares no SDPA support (_supports_sdpa = False), "
            "which adaptc's attention replaces")


@dataclass(frozen=True)
class AttentionFusionConfig(PassConfig):
    """attention_fusion has no options: every mask structure it recognises is exact."""


@dataclass
class AttentionFusionPlan(Plan):
    """Nothing per site: one switch of the model's attention implementation serves every module."""


class AttentionFusion(Pass):
    name = "attention_fusion"
    exact = True
    config_class = AttentionFusionConfig
    plan_class = AttentionFusionPlan

    def match(self, ctx: CompileContext) -> list[Site]:
        return interface_sites(ctx.working)

    def no_sites_reason(self) -> str:
        return "no Hugging Face attention modules that dispatch through the attention interface"

    def check(self, ctx: CompileContext, site: Site) -> AttentionFusionPlan | Decline | str:
        if (why := no_sdpa_reason(ctx.working)) is not None:
            return why
        impl = site.info["config"]._attn_implementation
        if impl not in SUPPORTED_FROM and impl != IMPLEMENTATION:
            return f"the model runs {impl!r} attention; adaptc replaces only {' or '.join(SUPPORTED_FROM)}"
        return AttentionFusionPlan()

    def apply(self, ctx: CompileContext, site: Site, plan: AttentionFusionPlan, edit: ModuleEdit) -> None:
        config = site.info["config"]
        if config._attn_implementation != IMPLEMENTATION:  # one switch serves every site
            register()
            edit.set_attr(config, "_attn_implementation", IMPLEMENTATION)

    def rebuild(self, attention: nn.Module, plan: AttentionFusionPlan, model: nn.Module) -> nn.Module:
        """For adaptc.load: switch the rebuilt model (its config, which the module shares) to adaptc."""
        register()
        attention.config._attn_implementation = IMPLEMENTATION
        return attention
