"""Every kernel and every compiled family under torch.inference_mode, no_grad and grad mode, from one
thread and from two at once, against outputs computed beforehand.

Grad and inference mode are per thread: work an adaptc kernel hands to its own threads must run in
the caller's mode (under inference_mode its buffers are inference tensors, which a thread outside it
may not write), and a compiled module must give the same answer from any thread in any mode.
"""
import threading
import warnings

import pytest
import torch

import adaptc
from adaptc.kernels import KERNELS, kernel_preference

from .moe_models import hf_causal_lm

tf = pytest.importorskip("transformers")

CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
contexts = pytest.mark.parametrize("context", list(CONTEXTS))
threads = pytest.mark.parametrize("threads", [1, 2])


def run_in(context: str, threads: int, fn):
    """fn(i) under `context`, in the calling thread (threads=1) or in `threads` threads started together."""
    if threads == 1:
        with CONTEXTS[context]():
            return [fn(0)]
    results, errors, start = [None] * threads, [], threading.Barrier(threads)

    def work(i):
        try:
            with CONTEXTS[context]():
                start.wait()
                results[i] = fn(i)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return results


def detached(out):
    return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()


# -- Kernels: every implementation, on inputs from the kernel's own example() -----------------------

PROBLEMS = {
    "fused_moe": {"T": 6, "H": 32, "I": 16, "E": 4, "K": 2, "gated": True},
    "attention": {"B": 2, "Hq": 4, "Hkv": 2, "Lq": 16, "Lk": 16, "D": 16, "causal": True, "window": 0,
                  "padded": True},
    "sparse_attention": {"B": 1, "Hq": 2, "Hkv": 1, "Lq": 40, "Lk": 40, "D": 16, "block": 8, "blocks": 3},
    "exit_confidence": {"N": 8, "V": 48, "D": 32, "bias": True},
    "linear": {"M": 6, "K": 48, "N": 40, "bias": True},
}


def test_every_kernel_has_a_problem_here():
    assert set(PROBLEMS) == set(KERNELS)


def kernel_cases():
    for name in PROBLEMS:
        for dtype in (torch.float32, torch.bfloat16):
            for impl in ("reference", "cpu", "triton"):
                yield pytest.param(name, dtype, impl, id=f"{name}-{str(dtype)[6:]}-{impl}")


@pytest.mark.parametrize("name,dtype,impl", list(kernel_cases()))
@contexts
@threads
def test_kernel(name, dtype, impl, context, threads):
    kernel = KERNELS[name]
    args = kernel.example({**PROBLEMS[name], "dtype": str(dtype)[6:]}, "cpu", 3)
    tol = kernel.tolerance(dtype)
    with torch.no_grad():
        want = kernel.reference(*args)
    if impl == "reference":
        calls = [lambda: kernel.reference(*args)]
    elif (why := kernel.why_not(impl, *args)) is not None:  # declined: the op falls back to the reference
        assert why
        op = getattr(torch.ops.adaptc, name)

        def fallback():
            with kernel_preference(impl):
                return op(*args)
        calls = [fallback]
    else:
        if impl == "triton" and threads > 1 and args[0].device.type == "cpu":
            pytest.skip("Triton's interpreter patches triton.language globally while a kernel runs, so two "
                        "interpreted launches at once break each other (a GPU launch does not)")
        fn, space = kernel.implementations[impl].fn, kernel.implementations[impl].space
        # every CPU config (threaded ones included); the interpreted Triton kernel at its default only
        configs = (space.configs(*args) if impl == "cpu" else [space.default(*args)]) if space else [None]
        calls = [lambda c=c: fn(*args, config=c) for c in configs]

    def run(i):
        return [detached(call()) for call in calls]

    for got in run_in(context, threads, run):
        for g in got:
            assert kernel.matches(g, want, tol)


def test_threaded_moe_configs_are_in_the_cpu_space():
    """The kernel test above reaches the worker threads: the space offers them for its problem."""
    kernel = KERNELS["fused_moe"]
    args = kernel.example({**PROBLEMS["fused_moe"], "dtype": "float32"}, "cpu", 3)
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: the CPU space offers no worker threads")
    assert any(c["workers"] > 1 for c in kernel.implementations["cpu"].space.configs(*args))


# -- Compiled families -------------------------------------------------------------------------------

LLAMA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, intermediate_size=96)


def tiny_llama():
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**LLAMA)).eval()


def padded_batch(vocab, seq, seed, rows=2, pad=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, :pad] = 0
    return ids, mask


def applied(fast, name):
    (entry,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == name]
    assert entry["status"] == "applied", entry
    return fast


class Family:
    """A compiled module, its inputs (one set per thread) and the outputs to expect for them."""

    def __init__(self, fast, inputs, expected, rows=None):
        self.fast, self.inputs, self.expected, self.rows = fast, inputs, expected, rows

    def check(self, context, threads, **tol):
        def run(i):
            return detached(self.call(*self.inputs[i]))

        for i, got in enumerate(run_in(context, threads, run)):
            want = self.expected[i]
            if self.rows is not None:
                got, want = got[self.rows[i]], want[self.rows[i]]
            torch.testing.assert_close(got, want, **(tol or {"rtol": 1e-4, "atol": 1e-4}))

    def call(self, *inputs):
        ids, mask = inputs
        out = self.fast(ids, attention_mask=mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def expected_of(model, inputs):
    with torch.no_grad():
        return [Family(model, None, None).call(*x) for x in inputs]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request):
    model = hf_causal_lm(request.param)
    inputs = [padded_batch(96, 10, seed) for seed in (1, 2)]
    fast = applied(adaptc.compile(model, example_inputs=inputs[0], passes=["moe_fusion"], tune=False), "moe_fusion")
    return Family(fast, inputs, expected_of(model, inputs), rows=[mask.bool() for _, mask in inputs])


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    inputs = [padded_batch(128, 40, seed) for seed in (1, 2)]
    fast = applied(adaptc.compile(model, example_inputs=inputs[0], passes=["attention_fusion"], tune=False),
                   "attention_fusion")
    return model, Family(fast, inputs, expected_of(model, inputs), rows=[mask.bool() for _, mask in inputs])


@pytest.fixture(scope="module")
def sparse():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    calibration = [(torch.randint(3, 128, (1, 256), generator=g),) for _ in range(2)]
    fast = applied(adaptc.compile(model, example_inputs=calibration[0], passes=["sparse_attention"],
                                  calibration=calibration, quality=0.05), "sparse_attention")
    inputs = [(torch.randint(3, 128, (1, 300), generator=g), None) for _ in range(2)]
    return Family(fast, inputs, expected_of(fast, inputs))  # approximate: its own no_grad outputs


@pytest.fixture(scope="module")
def early_exit():
    from .passes.test_early_exit import bert_batches, compile_ee, small_bert

    model = small_bert(tf.BertForSequenceClassification, num_labels=3)
    fast = applied(compile_ee(model, bert_batches(30), quality=0.8), "early_exit")
    inputs = [tuple(bert_batches(1, seed=s)[0].values()) for s in (7, 8)]
    return Family(fast, inputs, expected_of(fast, inputs))  # approximate: its own no_grad outputs


@pytest.fixture(scope="module")
def bert_graph():
    """A BERT captured whole (torch.export), the program export_onnx writes."""
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = tf.BertModel(config).eval()
    inputs = [padded_batch(128, 12, seed) for seed in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = adaptc.compile(model, example_inputs=inputs[0], tune=False)
    assert adaptc.report(fast)["capture"]["granularity"] == "graph"
    return model, Family(fast, inputs, expected_of(model, inputs), rows=[mask.bool() for _, mask in inputs])


@contexts
@threads
def test_moe(moe, context, threads):
    moe.check(context, threads)


@contexts
@threads
def test_attention_fusion(llama, context, threads):
    llama[1].check(context, threads)


@contexts
@threads
def test_sparse_attention(sparse, context, threads):
    sparse.check(context, threads)


@contexts
@threads
def test_early_exit(early_exit, context, threads):
    early_exit.check(context, threads)


@contexts
@threads
def test_whole_graph_capture(bert_graph, context, threads):
    bert_graph[1].check(context, threads)


@pytest.fixture(scope="module")
def loaded(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "llama.adaptc"
    adaptc.save(llama[1].fast, path)
    family = llama[1]
    return Family(adaptc.load(path), family.inputs, family.expected, family.rows)


@contexts
@threads
def test_saved_and_loaded(loaded, context, threads):
    loaded.check(context, threads)


@contexts
def test_export_onnx(bert_graph, context, tmp_path):
    pytest.importorskip("onnxruntime")
    _, family = bert_graph
    with CONTEXTS[context]():
        report = adaptc.export_onnx(family.fast, family.inputs[0], tmp_path / "bert.onnx")
    assert report["verification"]["ok"], report["verification"]
