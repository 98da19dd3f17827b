"""Per-architecture K/V projection: the keys/values a decoder layer would cache for a hidden state.

    proj = kv_projection_for(layers)          # None: an architecture adaptc does not know
    k, v, layer_idx = proj.kv(layer, h, args, kwargs)

A token that leaves the stack early, or skips a block, still has to leave keys/values in that block's
cache for later tokens to attend to; as in CALM (Schuster et al., 2022) they are projected from the
token's state. Each entry reproduces one attention family's own K/V path (pre-norm, projection,
per-head norm, rotary) and is tested against what the real layer writes into a DynamicCache.
`args, kwargs` are what the layer was called with (the rotary cos/sin arrive as position_embeddings).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor, int]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotary(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of k [b, heads, S, d] on its first cos.shape[-1] dims (partial rotary: NeoX,
    Phi), the rest passing through; the rotate-half convention every entry here uses."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    n = cos.shape[-1]
    rot, rest = k[..., :n], k[..., n:]
    return torch.cat(((rot * cos) + (rotate_half(rot) * sin), rest), dim=-1)


def _heads(x: torch.Tensor, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*h.shape[:2], -1, head_dim)


class KVProjection:
    name = ""

    def matches(self, layer: nn.Module) -> bool:
        raise NotImplementedError

    def kv(self, layer: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> KV:
        """[b, S, D] states -> keys, values [b, kv_heads, S, head_dim] and the cache's layer index."""
        raise NotImplementedError

    def kv_weights(self, layer: nn.Module) -> int:
        """Multiply-adds per token of `kv` (its K and V projections)."""
        raise NotImplementedError


class SeparateKV(KVProjection):
    """Llama / Qwen / Mistral / Gemma / Phi: self_attn.k_proj and v_proj after input_layernorm, an
    optional per-head k_norm (Qwen3, Gemma3) or k_layernorm (Phi), then rotary."""

    name = "k_proj/v_proj"

    def matches(self, layer):
        attn = getattr(layer, "self_attn", None)
        return all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim", "layer_idx")) and \
            hasattr(layer, "input_layernorm")

    def kv(self, layer, h, args, kwargs):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        k = _heads(attn.k_proj(x), h, attn.head_dim).transpose(1, 2)
        v = _heads(attn.v_proj(x), h, attn.head_dim).transpose(1, 2)
        # per-head key norms act on head_dim, so before or after the transpose alike
        if getattr(attn, "k_norm", None) is not None:  # Qwen3, Gemma3
            k = attn.k_norm(k)
        if getattr(attn, "qk_layernorm", False):  # Phi
            k = attn.k_layernorm(k)
        cos, sin = kwargs["position_embeddings"]
        return rotary(k, cos, sin), v, attn.layer_idx

    def kv_weights(self, layer):
        return layer.self_attn.k_proj.weight.numel() + layer.self_attn.v_proj.weight.numel()


class GPT2KV(KVProjection):
    """GPT-2: attn.c_attn (a Conv1D giving q | k | v) after ln_1, no rotary."""

    name = "c_attn"

    def matches(self, layer):
        attn = getattr(layer, "attn", None)
        return hasattr(attn, "c_attn") and hasattr(attn, "split_size") and hasattr(layer, "ln_1") and \
            not getattr(attn, "is_cross_attention", False)

    def kv(self, layer, h, args, kwargs):
        attn = layer.attn
        _, k, v = attn.c_attn(layer.ln_1(h)).split(attn.split_size, dim=2)
        return _heads(k, h, attn.head_dim).transpose(1, 2), _heads(v, h, attn.head_dim).transpose(1, 2), attn.layer_idx

    def kv_weights(self, layer):
        return layer.attn.c_attn.weight.numel() * 2 // 3


class NeoXKV(KVProjection):
    """GPT-NeoX (Pythia): attention.query_key_value after input_layernorm, interleaved per head as
    [q | k | v] of head_size each; partial rotary (rotary_ndims, from the cos/sin width)."""

    name = "query_key_value"

    def matches(self, layer):
        attn = getattr(layer, "attention", None)
        return hasattr(attn, "query_key_value") and hasattr(attn, "head_size") and hasattr(layer, "input_layernorm")

    def kv(self, layer, h, args, kwargs):
        attn = layer.attention
        qkv = _heads(attn.query_key_value(layer.input_layernorm(h)), h, 3 * attn.head_size).transpose(1, 2)
        _, k, v = qkv.chunk(3, dim=-1)
        cos, sin = kwargs["position_embeddings"]
        return rotary(k, cos, sin), v, attn.layer_idx

    def kv_weights(self, layer):
        return layer.attention.query_key_value.weight.numel() * 2 // 3


class FusedQKV(KVProjection):
    """Phi-3: self_attn.qkv_proj after input_layernorm, laid out [q (heads) | k (kv heads) | v (kv heads)];
    rotary on the first cos.shape[-1] dims of each head."""

    name = "qkv_proj"

    def matches(self, layer):
        attn = getattr(layer, "self_attn", None)
        return all(hasattr(attn, a) for a in ("qkv_proj", "head_dim", "num_key_value_heads", "layer_idx")) and \
            hasattr(layer, "input_layernorm")

    def kv(self, layer, h, args, kwargs):
        attn = layer.self_attn
        size = attn.num_key_value_heads * attn.head_dim
        qkv = attn.qkv_proj(layer.input_layernorm(h))
        k, v = qkv[..., -2 * size:-size], qkv[..., -size:]
        k, v = _heads(k, h, attn.head_dim).transpose(1, 2), _heads(v, h, attn.head_dim).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        return rotary(k, cos, sin), v, attn.layer_idx

    def kv_weights(self, layer):
        attn = layer.self_attn
        return 2 * attn.num_key_value_heads * attn.head_dim * attn.qkv_proj.in_features


REGISTRY: list[KVProjection] = [SeparateKV(), GPT2KV(), NeoXKV(), FusedQKV()]


def kv_projection_for(layers: nn.Module | Sequence[nn.Module]) -> KVProjection | None:
    """The one entry that matches every layer of a stack (or one layer); None if there is none."""
    layers = [layers] if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList) else list(layers)
    return next((p for p in REGISTRY if layers and all(p.matches(l) for l in layers)), None)


def no_kv_projection_reason(layers: Sequence[nn.Module]) -> str:
    unknown = next((l for l in layers if kv_projection_for(l) is None), layers[0])
    return f"no K/V projection known for {type(unknown).__name__}"
