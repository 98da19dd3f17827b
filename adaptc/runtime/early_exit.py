"""Early-exit runtime: rows (encoders) or tokens (causal LMs) leave the layer stack at the first exit
whose confidence reaches its threshold.

Encoders (`EarlyExitEncoder` replaces the model's encoder): after an exit layer, the rows that exit
are written to the output (through their exit head) and compacted out of the batch; the rest go on.
A batch is never held to its slowest row, and a row's result never depends on its neighbours.

Causal LMs (`install_lm_exits` gates the decoder layers in place): a token that exits keeps its hidden
state frozen through the remaining layers; after the last one its exit's adapter (a residual affine map
onto the last block's state, a "tuned lens") moves it, and the model's own final norm and LM head read
it - that is the exit head. The "learned" measure asks a linear predictor per exit whether the exit
agrees with the full model, so no exit evaluates the LM head at all (nor does "saturation"). The
layers it skips still need its keys/values for later tokens: as in CALM
(Schuster et al., 2022), they are projected from the frozen state. With a KV cache and one new token
a row (decoding), exited rows only pay that K/V projection and the active rows run the layer alone;
otherwise (prefill, no cache) the layer runs on every token and exited tokens get their frozen state
back, which computes the same K/V. So cached and uncached generation compute the same function.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

MEASURES = ("softmax_max", "margin", "saturation", "learned")
KINDS = ("classifier", "embedding", "causal_lm")
FUSED_MAX_TOKENS = 64
LM_HEADS_ATTR = "adaptc_exit_heads"


@dataclass
class ExitPlan:
    kind: str                  # classifier | embedding | causal_lm
    exit_layers: list[int]     # a block index after which an exit is evaluated
    thresholds: list[float]    # one per exit; inf = never leave there
    measure: str               # one of MEASURES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ExitPlan":
        """The inverse of to_dict; a saved plan is data from a file, so every field is checked."""
        if not isinstance(d, dict):
            raise ValueError(f"exit plan is {type(d).__name__}, not a dict")
        missing = [k for k in ("kind", "exit_layers", "thresholds", "measure") if k not in d]
        if missing:
            raise ValueError(f"exit plan lacks {', '.join(missing)}")
        kind, layers, thresholds, measure = d["kind"], d["exit_layers"], d["thresholds"], d["measure"]
        if kind not in KINDS:
            raise ValueError(f"exit plan kind {kind!r} is not one of {KINDS}")
        if measure not in MEASURES:
            raise ValueError(f"exit plan measure {measure!r} is not one of {MEASURES}")
        if not isinstance(layers, list) or not all(isinstance(l, int) and l >= 0 for l in layers):
            raise ValueError(f"exit plan exit_layers {layers!r} are not block indices")
        if not isinstance(thresholds, list) or len(thresholds) != len(layers) or \
                not all(t is None or isinstance(t, (int, float)) for t in thresholds):
            raise ValueError(f"exit plan needs one threshold (a number, or null for never) per exit layer, got {thresholds!r}")
        return cls(kind, list(layers), [math.inf if t is None else float(t) for t in thresholds], measure)


@dataclass
class ExitStats:
    """What the runtime did since the last reset: rows/tokens leaving at each exit (last = full model)
    and, for LMs, the K/V propagation it paid for exited tokens."""

    histogram: list[int] = field(default_factory=list)
    kv_fill_tokens: int = 0
    kv_fill_seconds: float = 0.0

    def reset(self, exits: int) -> None:
        self.histogram, self.kv_fill_tokens, self.kv_fill_seconds = [0] * (exits + 1), 0, 0.0


def cosine01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(0.0, 1.0)


def masked_mean(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp(min=1.0)


def prob_signals(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    top = logits.float().softmax(-1).topk(min(2, logits.shape[-1]), dim=-1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return {"softmax_max": top[:, 0], "margin": top[:, 0] - second, "top1": logits.argmax(-1)}


# -- encoders ---------------------------------------------------------------------------------------

class ClassifierTail(nn.Module):
    """The model's own pooler + classifier applied to one [CLS] vector per row."""

    def __init__(self, pooler: nn.Module | None, classifier: nn.Module):
        super().__init__()
        self.pooler, self.classifier = pooler, classifier

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        pooled = self.pooler(cls.unsqueeze(1)) if self.pooler is not None else cls
        return self.classifier(pooled)


class ExitAdapter(nn.Module):
    """Maps a block's output to an estimate of the last block's output: h + W h + b (W, b start at 0,
    so an untrained head is the raw state). Affine, so mean pooling commutes with it and the head can
    be trained and evaluated on the pooled vector alone."""

    def __init__(self, hidden: int):
        super().__init__()
        self.adapter = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.adapter(h)


def encoder_readout(kind: str, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The vector the output is read from: [CLS] for classifiers, the masked mean for embeddings."""
    return h[:, 0] if kind == "classifier" else masked_mean(h, valid)


def encoder_signals(kind: str, head: ExitAdapter, tail: Callable | None, r_in: torch.Tensor,
                    r_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Confidence signals at one exit from the readout vectors entering and leaving its block; the
    pass calibrates on exactly these, so the runtime and the calibration cannot disagree."""
    signals = {"saturation": cosine01(r_out, r_in)}
    if kind == "classifier":
        signals.update(prob_signals(tail(head(r_out))))
    else:
        signals["embedding"] = head(r_out)
    return signals


def key_padding(attention_mask: Any, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[B, S] bool (True = a real token) from the mask the encoder receives (None, 2-D, or 4-D
    boolean / additive)."""
    if not isinstance(attention_mask, torch.Tensor):
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    m = attention_mask
    if m.dim() == 4:  # what HF builds: True / 0.0 where a query may attend
        m = m[:, 0, 0, :]
        valid = m if m.dtype == torch.bool else m == 0
    else:  # a user-style 0/1 mask
        valid = m != 0
    return valid.expand(batch, seq)


def take_rows(x: Any, keep: torch.Tensor, batch: int) -> Any:
    """Rows `keep` of every tensor whose first dim is the batch (broadcast tensors stay as they are)."""
    if isinstance(x, torch.Tensor):
        return x[keep] if x.dim() > 0 and x.shape[0] == batch else x
    if isinstance(x, tuple):
        return tuple(take_rows(v, keep, batch) for v in x)
    if isinstance(x, list):
        return [take_rows(v, keep, batch) for v in x]
    if isinstance(x, dict):
        return {k: take_rows(v, keep, batch) for k, v in x.items()}
    return x


class EarlyExitEncoder(nn.Module):
    """Drop-in for a BERT-like encoder (`.layer` is the same ModuleList, so parameter names are kept)."""

    def __init__(self, encoder: nn.Module, plan: ExitPlan, heads: nn.ModuleList, tail: nn.Module | None):
        super().__init__()
        self.layer = encoder.layer
        self.config = getattr(encoder, "config", None)
        self.exit_heads = heads
        self.plan = plan
        object.__setattr__(self, "_tail", tail)  # the model owns the pooler/classifier: no second copy
        self._output_type = None
        self.stats = ExitStats()
        self.stats.reset(len(plan.exit_layers))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        h, mask = hidden_states, attention_mask
        batch, seq = h.shape[:2]
        valid = key_padding(attention_mask, batch, seq, h.device)
        rows = torch.arange(batch, device=h.device)
        out = h.new_empty(h.shape)
        exit_at = {layer: e for e, layer in enumerate(self.plan.exit_layers)}
        kind = self.plan.kind
        for i, layer in enumerate(self.layer):
            h_in = h
            h = layer(h, mask, *args, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
            e = exit_at.get(i)
            if e is None or math.isinf(self.plan.thresholds[e]):
                continue
            head = self.exit_heads[e]
            r_in, r_out = encoder_readout(kind, h_in, valid), encoder_readout(kind, h, valid)
            done = encoder_signals(kind, head, self._tail, r_in, r_out)[self.plan.measure] >= self.plan.thresholds[e]
            if not bool(done.any()):
                continue
            out[rows[done]] = head(h[done])
            self.stats.histogram[e] += int(done.sum())
            keep = ~done
            current = h.shape[0]
            h, valid, rows = h[keep], valid[keep], rows[keep]
            mask, args, kwargs = take_rows(mask, keep, current), take_rows(args, keep, current), take_rows(kwargs, keep, current)
            if rows.numel() == 0:
                break
        if rows.numel():
            out[rows] = h
            self.stats.histogram[-1] += rows.numel()
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


# -- causal LMs -------------------------------------------------------------------------------------

def lm_token_signals(norm: nn.Module, lm_head: nn.Linear, h_in: torch.Tensor, h_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, D] states entering/leaving an exit block (h_out already through the exit's adapter) ->
    per-token signals. The LM-head confidence comes from the fused kernel (no [N, V] logits) for
    decode-sized N, where it wins; at prefill / calibration sizes one big matmul amortizes the logits
    and the kernel's plain-torch reference is faster on CPU (measured: N=32 0.05 s vs 0.08 s, N=128
    0.61 s vs 0.34 s at V=49152, D=576). Same quantities."""
    from ..kernels.exit_confidence import exit_confidence
    from ..kernels.exit_confidence.reference import torch_exit_confidence

    fn = exit_confidence if h_out.shape[0] <= FUSED_MAX_TOKENS or h_out.is_cuda else torch_exit_confidence
    max_prob, margin, top1 = fn(norm(h_out), lm_head.weight, lm_head.bias)
    return {"softmax_max": max_prob, "margin": margin, "top1": top1, "saturation": cosine01(h_out, h_in)}


def predictor_features(norm: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """What the learned predictor reads: the normed state leaving the block and its saturation."""
    normed = norm(h_out)
    return torch.cat([normed, cosine01(h_out, h_in).unsqueeze(-1).to(normed.dtype)], -1)


class LMExitHeads(nn.Module):
    """Per exit of a causal LM: an adapter onto the last block's state and, for the "learned" measure,
    a linear predictor of "this exit's next token is the full model's" (CALM's early-exit classifier)."""

    def __init__(self, hidden: int, exits: int, predictors: bool):
        super().__init__()
        self.adapters = nn.ModuleList(ExitAdapter(hidden) for _ in range(exits))
        self.predictors = nn.ModuleList(nn.Linear(hidden + 1, 1) for _ in range(exits)) if predictors else None

    def learned_signal(self, e: int, norm: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.predictors[e](predictor_features(norm, h_in, h_out)).squeeze(-1))


def kv_from_state(layer: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The keys/values `layer` would cache for hidden states `h` [b, S, D] (CALM's propagation)."""
    if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "k_proj"):  # Llama family
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (*h.shape[:2], -1, attn.head_dim)
        k, v = attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        _, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(k, k, cos, sin)
        return k, v, attn.layer_idx
    if hasattr(layer, "attn") and hasattr(layer.attn, "c_attn"):  # GPT-2 family
        attn = layer.attn
        _, k, v = attn.c_attn(layer.ln_1(h)).split(attn.split_size, dim=2)
        shape = (*h.shape[:2], -1, attn.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), attn.layer_idx
    raise TypeError(f"no K/V projection known for {type(layer).__name__}")


def kv_weights(layer: nn.Module) -> int:
    """Multiply-adds per token of `kv_from_state` on `layer` (its K and V projections)."""
    if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "k_proj"):
        return layer.self_attn.k_proj.weight.numel() + layer.self_attn.v_proj.weight.numel()
    c_attn = layer.attn.c_attn.weight
    return c_attn.numel() * 2 // 3


def supports_kv_fill(layer: nn.Module) -> bool:
    return (hasattr(layer, "self_attn") and hasattr(layer.self_attn, "k_proj") and hasattr(layer, "input_layernorm")) or \
        (hasattr(layer, "attn") and hasattr(layer.attn, "c_attn") and hasattr(layer, "ln_1"))


class _RowsOfCache:
    """What the active rows' attention sees: its update() writes the active rows' K/V together with
    the exited rows' propagated K/V into the real cache, and returns the active rows' part."""

    def __init__(self, cache: Any, active: torch.Tensor, exited_kv: tuple[torch.Tensor, torch.Tensor], batch: int):
        self._cache, self._active, self._exited_kv, self._batch = cache, active, exited_kv, batch

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        full_k = key.new_empty((self._batch, *key.shape[1:]))
        full_v = value.new_empty((self._batch, *value.shape[1:]))
        full_k[self._active], full_v[self._active] = key, value
        full_k[~self._active], full_v[~self._active] = self._exited_kv
        keys, values = self._cache.update(full_k, full_v, layer_idx, *args, **kwargs)
        return keys[self._active], values[self._active]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class LMExitController:
    """Shared by the gated layers of one model: the plan, the exit heads (adapters, predictors; the
    model's final norm + LM head), and per forward call the exit each token took."""

    def __init__(self, plan: ExitPlan, norm: nn.Module, lm_head: nn.Linear, heads: LMExitHeads, num_layers: int):
        self.plan, self.norm, self.lm_head, self.heads, self.num_layers = plan, norm, lm_head, heads, num_layers
        self.exit_at = {layer: e for e, layer in enumerate(plan.exit_layers)}
        self.exited: torch.Tensor | None = None   # [B, S] bool
        self.exit_index: torch.Tensor | None = None  # [B, S] the exit a token took (-1: none)
        self.stats = ExitStats()
        self.stats.reset(len(plan.exit_layers))

    def run_layer(self, index: int, layer: nn.Module, forward: Callable, hidden: torch.Tensor,
                  args: tuple, kwargs: dict) -> Any:
        if index == 0:
            self.exited = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            self.exit_index = torch.full(hidden.shape[:2], -1, dtype=torch.long, device=hidden.device)
        exited = self.exited
        cache = _find_cache(args, kwargs)
        if exited is None or not bool(exited.any()):
            out = forward(hidden, *args, **kwargs)
        elif hidden.shape[1] == 1 and cache is not None:
            out = self._decode_step(layer, forward, hidden, args, kwargs, cache)
        else:  # prefill / no cache: the layer computes exited tokens' K/V from their frozen states
            out = forward(hidden, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            first = torch.where(exited.unsqueeze(-1), hidden, first)
            out = (first, *out[1:]) if isinstance(out, tuple) else first
        h_out = out[0] if isinstance(out, tuple) else out
        if index == self.num_layers - 1:
            self.stats.histogram[-1] += int((~exited).sum())
            if bool(exited.any()):  # exited tokens' frozen states, each through its exit's adapter
                h_out = h_out.clone()
                for e, adapter in enumerate(self.heads.adapters):
                    took = self.exit_index == e
                    if bool(took.any()):
                        h_out[took] = adapter(h_out[took])
                out = (h_out, *out[1:]) if isinstance(out, tuple) else h_out
        e = self.exit_at.get(index)
        if e is not None and not math.isinf(self.plan.thresholds[e]):
            live = ~exited
            if bool(live.any()):
                leave = self.signal(e, hidden[live], h_out[live]) >= self.plan.thresholds[e]
                if bool(leave.any()):
                    where = live.nonzero(as_tuple=True)
                    exited[where[0][leave], where[1][leave]] = True
                    self.exit_index[where[0][leave], where[1][leave]] = e
                    self.stats.histogram[e] += int(leave.sum())
        return out

    def signal(self, e: int, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        """Exit e's confidence for live tokens ([N, D] states entering / leaving its block)."""
        if self.plan.measure == "learned":
            return self.heads.learned_signal(e, self.norm, h_in, h_out)
        if self.plan.measure == "saturation":  # the same quantity lm_token_signals gives, without the LM head
            return cosine01(self.heads.adapters[e](h_out), h_in)
        return lm_token_signals(self.norm, self.lm_head, h_in, self.heads.adapters[e](h_out))[self.plan.measure]

    def _decode_step(self, layer, forward, hidden, args, kwargs, cache):
        active = ~self.exited[:, 0]
        batch = hidden.shape[0]
        start = time.perf_counter()
        k, v, layer_idx = kv_from_state(layer, hidden[~active], *take_rows((args, kwargs), ~active, batch))
        self.stats.kv_fill_tokens += int((~active).sum())
        self.stats.kv_fill_seconds += time.perf_counter() - start
        if not bool(active.any()):
            cache.update(k, v, layer_idx)
            return hidden
        proxy = _RowsOfCache(cache, active, (k, v), batch)
        sub_args, sub_kwargs = take_rows((args, kwargs), active, batch)
        sub_args = tuple(proxy if a is cache else a for a in sub_args)
        sub_kwargs = {n: (proxy if a is cache else a) for n, a in sub_kwargs.items()}
        sub_out = forward(hidden[active], *sub_args, **sub_kwargs)
        sub_h = sub_out[0] if isinstance(sub_out, tuple) else sub_out
        out = hidden.clone()
        out[active] = sub_h
        return (out, *sub_out[1:]) if isinstance(sub_out, tuple) else out


def _find_cache(args: tuple, kwargs: dict) -> Any:
    from transformers.cache_utils import Cache

    for x in (*args, *kwargs.values()):
        if isinstance(x, Cache):
            return x
    return None


class GatedForward:
    """Replaces one decoder layer's `forward` (instance attribute): parameter names and the model's
    own loop, cache and generate() stay untouched."""

    def __init__(self, layer: nn.Module, index: int, controller: LMExitController):
        self.forward = layer.forward  # the bound original
        self.layer, self.index, self.controller = layer, index, controller

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.controller.run_layer(self.index, self.layer, self.forward, hidden_states, args, kwargs)


def install_lm_exits(model: nn.Module, layers: nn.ModuleList, plan: ExitPlan, norm: nn.Module, lm_head: nn.Linear,
                     heads: LMExitHeads, set_attr: Callable[[Any, str, Any], None] = setattr) -> LMExitController:
    """Gate every layer of `layers`, and register `heads` on `model` (as `adaptc_exit_heads`, so its
    weights are in the state_dict that adaptc.save writes). set_attr: ModuleEdit.set_attr, so a
    rollback undoes both."""
    set_attr(model, LM_HEADS_ATTR, heads)
    controller = LMExitController(plan, norm, lm_head, heads, len(layers))
    for i, layer in enumerate(layers):
        set_attr(layer, "forward", GatedForward(layer, i, controller))
    return controller


def lm_controller_of(model: nn.Module) -> LMExitController | None:
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, GatedForward):
            return fwd.controller
    return None


def encoder_runtime_of(model: nn.Module) -> EarlyExitEncoder | None:
    return next((m for m in model.modules() if isinstance(m, EarlyExitEncoder)), None)


def exit_stats(model: nn.Module) -> ExitStats | None:
    """The exit statistics of a compiled model's runtime (None without one)."""
    rt = encoder_runtime_of(model) or lm_controller_of(model)
    return rt.stats if rt is not None else None
