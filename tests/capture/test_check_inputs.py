"""Random check inputs: only sizes the model itself accepts (its config limits, its own answer)."""
import pytest
import torch

import adaptc
from adaptc.capture.inputs import Inputs, check_inputs

tf = pytest.importorskip("transformers")


def tiny_bert(positions=16):
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=positions)
    torch.manual_seed(0)
    return tf.BertModel(cfg).eval()


def tiny_whisper_encoder():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = tf.WhisperConfig(num_mel_bins=16, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                           encoder_ffn_dim=32, max_source_positions=8, vocab_size=60, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    return WhisperEncoder(cfg).eval()


def test_a_model_at_its_maximum_length_is_checked_at_shorter_lengths_only():
    model = tiny_bert(positions=16)
    ids = torch.randint(0, 50, (2, 16))
    checks = check_inputs(model, Inputs.of((ids,)), 3, seed=0)
    seqs = [c.args[0].shape[1] for c in checks[1:]]
    assert checks[0].args[0] is ids and len(checks) == 4
    assert all(s <= 16 for s in seqs) and any(s < 16 for s in seqs), seqs
    assert {c.args[0].shape[0] for c in checks[1:]} != {2}  # the batch still varies


def test_a_limit_no_config_states_is_learnt_from_the_model():
    class Positions(torch.nn.Module):  # a learned table of 16 positions, no config
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = torch.nn.Embedding(50, 4), torch.nn.Embedding(16, 4)

        def forward(self, ids):
            return self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))

    checks = check_inputs(Positions(), Inputs.of((torch.randint(0, 50, (2, 16)),)), 3, seed=0)
    seqs = [c.args[0].shape[1] for c in checks[1:]]
    assert len(seqs) == 3 and max(seqs) <= 16 and min(seqs) < 16, seqs


def test_bert_compiled_at_its_maximum_length():
    model = tiny_bert(positions=16)
    ids = torch.randint(0, 50, (2, 16))
    fast = adaptc.compile(model, example_inputs=(ids,), tune=False)
    torch.testing.assert_close(fast(ids).last_hidden_state, model(ids).last_hidden_state)
    assert adaptc.report(fast)["verification"]["capture"]["ok"]


def test_whisper_encoder_keeps_its_mel_bins_and_frames():
    model = tiny_whisper_encoder()
    features = torch.randn(2, 16, 16)  # [batch, mel bins, frames = 2 * max_source_positions]
    example = Inputs.of((features,))
    checks = check_inputs(model, example, 3, seed=0)
    assert [tuple(c.args[0].shape[1:]) for c in checks] == [(16, 16)] * 4
    assert len({c.args[0].shape[0] for c in checks}) > 1  # only the batch varies
    assert checks[0].batch_seq() == (2, None)  # the example learnt it has no sequence dim
    fast = adaptc.compile(model, example_inputs=(features,), tune=False)
    torch.testing.assert_close(fast(features).last_hidden_state, model(features).last_hidden_state)
    assert fast.accepts((torch.randn(3, 16, 16),), {})
    assert not fast.accepts((torch.randn(3, 17, 16),), {})  # export fixed the mel bins: so does the graph's guard


def test_sequence_varies_only_in_tensors_that_share_the_examples_length():
    ids, other = torch.randint(0, 9, (2, 6)), torch.randint(0, 9, (2, 4))
    fresh = Inputs.of((ids, other)).resized(3, 8, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in fresh.args] == [(3, 8), (3, 4)]


def test_a_model_that_takes_no_other_size_is_checked_on_fresh_values_of_the_examples_size():
    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, 3, 4).sum(0)

    x = torch.randn(2, 3, 4)
    checks = check_inputs(FixedBatch(), Inputs.of((x,)), 3, seed=0)
    assert len(checks) == 4 and all(c.args[0].shape == x.shape for c in checks)
    assert not torch.equal(checks[1].args[0], x)
