"""Small MoE models for tests: Hugging Face architectures built from configs, and user-written blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HF_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def hf_config(arch: str, experts_implementation: str = "eager", layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, experts_implementation=experts_implementation,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen2_moe":  # shared expert with a sigmoid gate; no renormalisation of top-k
        return tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                 num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1,
                                 **common)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=True, head_dim=8, decoder_sparse_step=1, **common)
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, **common)
    raise ValueError(arch)


def hf_causal_lm(arch: str, experts_implementation: str = "eager", dtype=torch.float32, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(arch, experts_implementation)).to(dtype).eval()
    for name, p in model.named_parameters():  # HF initialises some routers to zero: give them real logits
        if "gate" in name and p.ndim == 2:
            torch.nn.init.normal_(p, std=0.5)
    return model


class MLPExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, gated: bool, act: str):
        super().__init__()
        self.gated, self.act = gated, act
        if gated:
            self.w1 = nn.Linear(hidden, inter, bias=False)
            self.w3 = nn.Linear(hidden, inter, bias=False)
        else:
            self.fc1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[self.act]
        return self.w2(act(self.w1(x)) * self.w3(x) if self.gated else act(self.fc1(x)))


class UserMoE(nn.Module):
    """A plain user-written MoE block: a router Linear, a ModuleList of experts, a Python loop."""

    def __init__(self, hidden=32, inter=48, experts=6, top_k=2, scoring="softmax_topk", renormalize=True,
                 gated=True, act="silu", shared=False, expose_top_k=True):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(MLPExpert(hidden, inter, gated, act) for _ in range(experts))
        self._k, self.scoring, self.renormalize = top_k, scoring, renormalize
        if expose_top_k:
            self.top_k = top_k
        if shared:
            self.shared_expert = MLPExpert(hidden, inter, True, "silu")
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.router.weight, std=0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        if self.scoring == "topk_softmax":
            vals, idx = logits.topk(self._k, dim=-1)
            weights = vals.softmax(dim=-1)
        else:
            probs = logits.softmax(dim=-1) if self.scoring == "softmax_topk" else logits.sigmoid()
            weights, idx = probs.topk(self._k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class UserMoEModel(nn.Module):
    """Embedding -> (norm, MoE) x N residual -> head: a pure function, captured as a whole graph."""

    def __init__(self, vocab=64, hidden=32, layers=2, **moe_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(UserMoE(hidden=hidden, **moe_kwargs) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.head(h)
