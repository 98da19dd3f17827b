"""LayerStack: one discovery of the block stack, the same for every adaptive pass."""
import pytest
from torch import nn

from adaptc.analysis.layer_stack import find_layer_stack
from tests.analysis.test_kv_projection import tiny
from tests.passes.test_early_exit import small_bert


@pytest.mark.parametrize("cls, kind", [("BertForSequenceClassification", "classifier"), ("BertModel", "embedding")])
def test_encoder_stacks(cls, kind):
    import transformers

    model = small_bert(getattr(transformers, cls), **({"num_labels": 3} if kind == "classifier" else {}))
    s = find_layer_stack(model)
    assert s.kind == kind and not s.decoder and s.hidden == 32 and len(s.layers) == 4
    assert s.layers is model.get_submodule(s.layers_path) and s.stack_path.endswith("encoder")
    assert s.embeddings is model.base_model.embeddings and (s.tail is not None) == (kind == "classifier")


@pytest.mark.parametrize("arch, norm", [("llama", "norm"), ("gpt2", "ln_f"), ("gpt_neox", "final_layer_norm"),
                                        ("phi", "final_layernorm")])
def test_decoder_stacks(arch, norm):
    model = tiny(arch)
    s = find_layer_stack(model)
    assert s.kind == "causal_lm" and s.decoder and s.hidden == 32 and len(s.layers) == 2
    assert s.stack_path == s.layers_path and s.layers is model.get_submodule(s.layers_path)
    assert s.norm is getattr(model.base_model, norm) and s.lm_head is model.get_output_embeddings()
    assert s.embeddings is model.get_input_embeddings()


def test_no_stack():
    assert find_layer_stack(nn.Sequential(nn.Linear(4, 4))) is None


@pytest.mark.parametrize("groups", [1, 2])
def test_albert_is_a_looped_stack_of_its_steps(groups):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=6, num_hidden_groups=groups,
                             num_attention_heads=4, intermediate_size=64, num_labels=3)
    model = tf.AlbertForSequenceClassification(config).eval()
    s = find_layer_stack(model)
    encoder = model.albert.encoder
    assert s.kind == "classifier" and s.looped and s.hidden == 32 and len(s.layers) == 6
    assert s.stack_path == "albert.encoder" and s.layers_path == "albert.encoder.albert_layer_groups"
    # the steps in the order AlbertTransformer runs them: each group once per step it owns
    assert [list(encoder.albert_layer_groups).index(m) for m in s.layers] == [i * groups // 6 for i in range(6)]
    assert s.prelude is encoder.embedding_hidden_mapping_in
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        out = model(ids)
        cls = model.albert(ids).last_hidden_state[:, 0]
    torch.testing.assert_close(s.tail(cls), out.logits)  # pooler, its tanh, the classifier
    assert find_layer_stack(model.albert).kind == "embedding"
