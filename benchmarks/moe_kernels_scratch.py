"""Scratch timer: `cpu_fused_moe` against Hugging Face's own experts modules on this CPU (fp32).

    .venv/bin/python benchmarks/moe_kernels_scratch.py [--tokens 1 16 128] [--model mixtral qwen]

Not the project benchmark (benchmarks/moe.py is); a quick median-of-runs check while tuning the
CPU path. Each variant gets a warm-up, then runs until ~`--seconds` have passed (min 3 runs) and
reports the median. batched_mm is skipped where its per-pair weight copies would not fit in memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaptc.kernels.moe.cpu import cpu_fused_moe
from adaptc.kernels.moe.reference import torch_fused_moe
from adaptc.kernels.moe.space import CPU_SPACE, cpu_configs

MODELS = {  # name: (config class path, kwargs)
    "mixtral": dict(hidden=1024, inter=3584, experts=8, top_k=2),
    "qwen": dict(hidden=1024, inter=512, experts=60, top_k=4),
}


def hf_experts(model: str, impl: str):
    spec = MODELS[model]
    if model == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
        cfg = MixtralConfig(hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                            num_local_experts=spec["experts"], num_experts_per_tok=spec["top_k"])
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts as cls
        cfg = Qwen2MoeConfig(hidden_size=spec["hidden"], moe_intermediate_size=spec["inter"],
                             num_experts=spec["experts"], num_experts_per_tok=spec["top_k"])
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    mod = cls(cfg).eval()
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, 0.02)
        mod.down_proj.normal_(0, 0.02)
    return mod


def median_ms(fn, seconds: float) -> float:
    fn()
    fn()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    ap.add_argument("--model", nargs="+", default=list(MODELS))
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--all-configs", action="store_true", help="time every CPU_SPACE config")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    for model in args.model:
        spec = MODELS[model]
        mods = {impl: hf_experts(model, impl) for impl in ("eager", "batched_mm", "grouped_mm")}
        ref = mods["eager"]
        for impl in mods.values():  # share one set of weights
            impl.gate_up_proj = ref.gate_up_proj
            impl.down_proj = ref.down_proj
        w13, w2 = ref.gate_up_proj.detach(), ref.down_proj.detach()
        E, K, H = spec["experts"], spec["top_k"], spec["hidden"]
        print(f"\n{model}: H={H} I={spec['inter']} E={E} K={K} fp32, {torch.get_num_threads()} threads")
        configs = list(cpu_configs()) if args.all_configs else [None]
        for T in args.tokens:
            g = torch.Generator().manual_seed(T)
            x = torch.randn(T, H, generator=g)
            logits = torch.randn(T, E, generator=g)
            w, ids = logits.softmax(-1).topk(K, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            row = {}
            for name, mod in mods.items():
                pair_gb = T * K * (w13[0].numel() + w2[0].numel()) * 4 / 1e9
                if name == "batched_mm" and pair_gb > 6:
                    row[name] = float("nan")
                    continue
                row[name] = median_ms(lambda: mod(x, ids, w), args.seconds)
            for cfg in configs:
                label = "adaptc" if cfg is None else "adaptc[" + ",".join(f"{v}" for v in cfg.values()) + "]"
                row[label] = median_ms(lambda: cpu_fused_moe(x, w, ids, w13, w2, "silu", True, config=cfg), args.seconds)
            got = cpu_fused_moe(x, w, ids, w13, w2, "silu", True)
            err = (got - ref(x, ids, w)).abs().max().item()
            best_hf = min(v for k, v in row.items() if not k.startswith("adaptc") and v == v)
            ours = min(v for k, v in row.items() if k.startswith("adaptc"))
            cells = "  ".join(f"{k} {v:8.2f}" for k, v in row.items())
            print(f"T={T:5d}  {cells}  | best_hf/ours {best_hf / ours:4.2f}  eager/ours {row['eager'] / ours:4.2f}  maxerr {err:.1e}")


if __name__ == "__main__":
    main()
