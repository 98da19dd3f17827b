"""The stack controller: policies installed by two passes compose on one stack (both apply, against a
hand-written reference loop; cached and uncached generation agree), a rollback removes only its own
policy, and concurrent calls of one compiled early-exit LM do not share per-call state."""
import copy
import threading

import pytest
import torch

from adaptc.analysis.kv_projection import kv_projection_for
from adaptc.analysis.layer_stack import find_layer_stack
from adaptc.errors import AdaptcError
from adaptc.passes._base import ModuleEdit
from adaptc.runtime.early_exit import ExitPlan, LMExitHeads, LMExitPolicy, exit_stats, install_lm_exits, lm_exits_of
from adaptc.runtime.stack_controller import StackPolicy, controller_of, install_policy
from tests.passes.test_early_exit import compile_ee, small_lm

EXIT_AT, SKIP_BLOCKS = 3, (1, 4)


class EvenIdsSkip(StackPolicy):
    """Test-local router: tokens whose id is even skip SKIP_BLOCKS (ids read off the embedding call)."""

    name = "skip_even_ids"

    def __init__(self, ids_of_call):
        self.ids_of_call, self.skipped = ids_of_call, 0

    def begin(self, tokens, device):
        ids = self.ids_of_call()
        assert ids.shape == tokens
        return ids

    def acts_before(self, i):
        return i in SKIP_BLOCKS

    def skip(self, ids, i, h, where):
        even = ids[where] % 2 == 0
        self.skipped += int(even.sum())
        return even


def exit_heads(seed: int) -> LMExitHeads:
    heads = LMExitHeads(32, 1, predictors=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return heads


@pytest.fixture(scope="module")
def composed():
    """A Llama with an exit after block 3 (a random learned predictor: some tokens leave) and the
    even-id skip policy, installed one after the other as two passes would."""
    model = small_lm("llama")
    fast = copy.deepcopy(model)
    s = find_layer_stack(fast)
    seen = {}
    fast.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.update(ids=a[0]))
    policy = install_lm_exits(fast, s.layers, ExitPlan("causal_lm", [EXIT_AT], [0.5], "learned"), s.norm, s.lm_head,
                              exit_heads(4))
    router = EvenIdsSkip(lambda: seen["ids"])
    install_policy(s.layers, router, kv_projection_for(s.layers))
    return fast, policy, router


@torch.no_grad()
def reference(fast, policy: LMExitPolicy, ids: torch.Tensor) -> torch.Tensor:
    """The composition by hand, without the controller: every block runs on every token (its own
    forward, not the gate), inactive tokens (exited, or even ids at a skip block) keep their state."""
    m = fast.model
    h = m.embed_tokens(ids)
    pos = m.rotary_emb(h, torch.arange(ids.shape[1]).unsqueeze(0))
    exited = torch.zeros(ids.shape, dtype=torch.bool)
    for i, layer in enumerate(m.layers):
        inactive = exited | ((ids % 2 == 0) if i in SKIP_BLOCKS else torch.zeros_like(exited))
        out = type(layer).forward(layer, h, attention_mask=None, position_embeddings=pos)
        out = torch.where(inactive.unsqueeze(-1), h, out[0] if isinstance(out, tuple) else out)
        if i == EXIT_AT:
            live = ~exited
            leave = policy.signal(0, h[live], out[live]) >= policy.plan.thresholds[0]
            exited[live.nonzero(as_tuple=True)[0][leave], live.nonzero(as_tuple=True)[1][leave]] = True
        h = out
    h = h.clone()
    h[exited] = policy.heads.adapters[0](h[exited])
    return fast.lm_head(m.norm(h))


def test_two_policies_on_one_stack_both_apply_like_the_reference(composed):
    fast, policy, router = composed
    controller = controller_of(fast)
    assert controller.policies == (policy, router)  # the second install added to the first, no overwrite
    assert all(layer.forward.controller is controller for layer in fast.model.layers)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(2))
    policy.stats.reset(1)
    router.skipped = 0
    with torch.no_grad():
        got = fast(ids).logits
    hist = exit_stats(fast).histogram
    assert 0 < hist[0] < ids.numel() and sum(hist) == ids.numel(), f"want a mix of exits, got {hist}"
    assert router.skipped > 0
    torch.testing.assert_close(got, reference(fast, policy, ids), rtol=1e-5, atol=1e-5)


def test_composed_cached_generation_equals_uncached(composed):
    fast, policy, router = composed
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    policy.stats.reset(1)
    cached = fast.generate(ids, **kw)
    assert policy.stats.kv_fill_tokens > 0 and policy.stats.histogram[0] > 0  # decode went through both
    assert torch.equal(cached, fast.generate(ids, use_cache=False, **kw))


def test_rolling_back_a_policy_keeps_the_other():
    fast = small_lm("llama")
    s = find_layer_stack(fast)
    policy = install_lm_exits(fast, s.layers, ExitPlan("causal_lm", [EXIT_AT], [0.5], "learned"), s.norm, s.lm_head,
                              exit_heads(4))
    edit = ModuleEdit(fast)
    install_policy(s.layers, EvenIdsSkip(lambda: None), kv_projection_for(s.layers), set_attr=edit.set_attr)
    edit.rollback()
    assert controller_of(fast).policies == (policy,) and lm_exits_of(fast) is policy


def test_a_repeat_decision_is_refused_with_a_reason():
    class RepeatAll(StackPolicy):
        name = "repeat_all"

        def acts_after(self, i):
            return i == 2

        def repeat(self, state, i, h_in, h_out, where):
            return torch.ones(h_in.shape[0], dtype=torch.bool)

    fast = small_lm("llama")
    s = find_layer_stack(fast)
    install_policy(s.layers, RepeatAll(), kv_projection_for(s.layers))
    with pytest.raises(AdaptcError, match="'repeat_all' asked to repeat block 2"):
        fast(torch.zeros(1, 4, dtype=torch.long))


def test_concurrent_calls_of_a_compiled_early_exit_lm_equal_sequential_calls():
    """Per-call state (which tokens exited, where) must not live on the shared controller: a call of
    another shape starting block 0 mid-stack would clobber it. Two threads, different batch shapes."""
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(10)]
    fast = compile_ee(small_lm("llama"), cal, quality=0.6)
    assert lm_exits_of(fast) is not None
    inputs = [cal[8][:2, :11], cal[9][:3, :7]]
    with torch.no_grad():
        want = [fast(x).logits for x in inputs]
    stats = exit_stats(fast)
    stats.reset(len(stats.histogram) - 1)
    with torch.no_grad():
        for x in inputs:
            fast(x)
    one_round = list(stats.histogram)
    assert sum(one_round[:-1]) > 0, "no token exited: nothing was tested"
    stats.reset(len(one_round) - 1)
    rounds, errors, barrier = 25, [], threading.Barrier(2)

    def work(x, expected):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(rounds):
                    torch.testing.assert_close(fast(x).logits, expected, rtol=0, atol=0)
        except Exception as exc:  # reported below: an assert in a thread does not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(x, w)) for x, w in zip(inputs, want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert stats.histogram == [n * rounds for n in one_round]  # every call's exits counted once
