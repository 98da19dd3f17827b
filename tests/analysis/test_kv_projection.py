"""Every K/V projection entry against the real layer: the K/V it computes from the state entering a
layer equal what that layer's attention writes into a DynamicCache for the same input."""
import pytest
import torch

from adaptc.analysis.kv_projection import kv_projection_for, no_kv_projection_reason
from adaptc.analysis.layer_stack import find_layer_stack


def tiny(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **common))
    if arch == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(partial_rotary_factor=0.5, qk_layernorm=True, **common))
    if arch == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, **common))
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(rotary_pct=0.25, **common))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4))
    if arch == "gptj":
        return tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=96, n_embd=32, n_layer=2, n_head=4, rotary_dim=4))
    raise ValueError(arch)


@pytest.mark.parametrize("arch, entry", [("llama", "k_proj/v_proj"), ("qwen3", "k_proj/v_proj"), ("phi", "k_proj/v_proj"),
                                         ("phi3", "qkv_proj"), ("gpt_neox", "query_key_value"), ("gpt2", "c_attn")])
def test_projected_kv_is_what_the_layer_caches(arch, entry):
    from transformers import DynamicCache

    model = tiny(arch).eval()
    stack = find_layer_stack(model)
    assert stack is not None and stack.kind == "causal_lm" and stack.decoder and stack.hidden == 32
    proj = kv_projection_for(stack.layers)
    assert proj is not None and proj.name == entry
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: calls.append((m, a, dict(kw))), with_kwargs=True)
             for layer in stack.layers]
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        # two steps: the second's positions are not 0.., so rotary offsets are exercised too
        model(ids[:, :4], cache=cache, use_cache=True)
        calls.clear()
        model(ids[:, 4:], cache=cache, use_cache=True)
        for i, (layer, args, kwargs) in enumerate(calls):
            h = args[0] if args else kwargs.pop("hidden_states")
            k, v, layer_idx = proj.kv(layer, h, args[1:], kwargs)
            assert layer_idx == i
            torch.testing.assert_close(k, cache.layers[i].keys[:, :, 4:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v, cache.layers[i].values[:, :, 4:], rtol=1e-5, atol=1e-6)
    for h in hooks:
        h.remove()
    assert len(calls) == 2
    kv_heads = getattr(model.config, "num_key_value_heads", None) or 4
    assert proj.kv_weights(stack.layers[0]) == 2 * 32 * kv_heads * 8  # K and V: D x (kv heads x head_dim) each


def test_an_unknown_architecture_has_no_projection_and_a_reason():
    model = tiny("gptj")
    layers = model.transformer.h
    assert kv_projection_for(layers) is None
    assert no_kv_projection_reason(layers) == "no K/V projection known for GPTJBlock"
