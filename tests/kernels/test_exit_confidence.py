"""adaptc::exit_confidence: every implementation against the plain-torch reference, and the op's contract.

The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (`make test` sets it; small shapes) and
on the GPU when there is one (`-m gpu`).
"""
import pytest
import torch

from adaptc.cache import open_cache
from adaptc.kernels import KERNELS, kernel_preference
from adaptc.kernels._registry import trace_calls
from adaptc.kernels.exit_confidence import cpu_exit_confidence, exit_confidence, space, torch_exit_confidence
from adaptc.tuner.tune import Budget, tune

KERNEL = KERNELS["exit_confidence"]
# Asked of the implementation, not of the environment: triton.jit picks the interpreter when the kernels
# are defined, so what counts is TRITON_INTERPRET at that import (here, at collection).
TRITON_ON_CPU = KERNEL.why_not("triton", *space.make_inputs(1, 8, 16))
needs_triton_on_cpu = pytest.mark.skipif(TRITON_ON_CPU is not None, reason=str(TRITON_ON_CPU))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, V, D, bias): a one-word vocabulary, two words, V and D off every tile size, a decode row, a batch.
SHAPES = [(1, 1, 16, True), (1, 2, 8, False), (1, 257, 32, True), (7, 1000, 48, False), (33, 4099, 40, True)]


def check(got, args, min_clear: float = 0.75):
    """max_prob and margin within the dtype's tolerance; top-1 equal wherever the reference's top two
    are not a near-tie, and such rows are most rows (the comparison is not vacuous)."""
    want = torch_exit_confidence(*args)
    N = args[0].shape[0]
    for g, w, dtype in zip(got, want, (torch.float32, torch.float32, torch.int64)):
        assert g.dtype == dtype and g.shape == (N,) == w.shape
    tol = space.tolerance(args[1].dtype)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    clear = want[1] > 4 * (tol["atol"] + tol["rtol"] * want[0])
    assert clear.float().mean() >= min_clear
    assert torch.equal(got[2][clear], want[2][clear])
    assert KERNEL.matches(got, want, tol)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conforms_to_reference(impl, dtype):
    for i, (N, V, D, bias) in enumerate(SHAPES):
        args = space.make_inputs(N, V, D, dtype=dtype, bias=bias, seed=i, spread=4.0)
        why = KERNEL.why_not(impl, *args)
        if why:
            pytest.skip(why)
        assert args[0].abs().min() > 0 and args[1].abs().sum() > 0  # random inputs, never zeros
        check(KERNEL.implementations[impl].fn(*args), args)


def test_cpu_every_chunk():
    for bias in (True, False):
        args = space.make_inputs(9, 4097, 24, bias=bias, seed=11, spread=4.0)  # a one-row last chunk
        for config in KERNEL.implementations["cpu"].space.configs(*args):
            check(cpu_exit_confidence(*args, config=config), args)


@needs_triton_on_cpu
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=2, SPLITS=1),   # direct, no combine
    dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=2, SPLITS=8),   # slices of 4 tiles, last short
    dict(BLOCK_M=32, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=3, SPLITS=128),  # more splits than tiles
], ids=lambda c: f"M{c['BLOCK_M']}V{c['BLOCK_V']}D{c['BLOCK_D']}S{c['SPLITS']}")
def test_triton_tile_configs(config):
    from adaptc.kernels.exit_confidence.triton import triton_exit_confidence

    for dtype in (torch.float32, torch.bfloat16):
        args = space.make_inputs(19, 999, 40, dtype=dtype, seed=4, spread=4.0)
        check(triton_exit_confidence(*args, config=config), args)


def _implementations():
    out = [("cpu", lambda *a: cpu_exit_confidence(*a, config={"CHUNK": 512}))]
    if TRITON_ON_CPU is None:
        from adaptc.kernels.exit_confidence.triton import triton_exit_confidence
        cfg = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=2, SPLITS=8)
        out.append(("triton", lambda *a: triton_exit_confidence(*a, config=cfg)))
    return out


def test_exact_ties_go_to_the_lowest_index_across_tiles_and_slices():
    """Identical best rows of the head, in one tile and across chunks/tiles/slices: top-1 is the first and
    the margin is exactly 0, as torch.max and topk define them. Small integers keep every logit exact, so
    the two are equal whatever order a GEMM sums in."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randint(-3, 4, (3, 32), generator=g).float()
    weight = torch.randint(-2, 3, (900, 32), generator=g).float() / 4
    weight[40] = hidden[0]
    weight[45] = weight[40]    # the same chunk and tile
    weight[700] = weight[40]   # another chunk, tile and slice
    weight[800] = hidden[1]   # row 1: a unique, clear winner
    for name, fn in _implementations():
        prob, margin, top1 = fn(hidden, weight, None)
        assert top1[0] == 40 and margin[0] == 0, name
        assert top1[1] == 800 and margin[1] > 0.1, name
        check((prob, margin, top1), (hidden, weight, None), min_clear=0.6)


def test_extreme_logits_neither_overflow_nor_underflow():
    """Logits in the thousands: exp would overflow without the running maximum."""
    for name, fn in _implementations():
        for spread in (300.0, 1e-3):  # near one-hot, then near uniform
            args = space.make_inputs(5, 700, 32, seed=6, spread=spread)
            got = fn(*args)
            assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all(), name
            want = torch_exit_confidence(*args)
            torch.testing.assert_close(got[0], want[0], **space.tolerance(torch.float32))
            torch.testing.assert_close(got[1], want[1], **space.tolerance(torch.float32))
            if spread > 1:
                assert (got[0] > 0.99).all() and torch.equal(got[2], want[2])


def test_strided_inputs():
    hidden, weight, bias = space.make_inputs(6, 2 * 513, 48, seed=7, spread=4.0)
    h = hidden.t().contiguous().t()      # column-major rows
    w, b = weight[::2], bias[::2]        # every other row of a bigger head
    for name, fn in _implementations():
        check(fn(h, w, b), (h, w, b))


def test_preference_selects_what_it_says():
    args = space.make_inputs(2, 50, 16)
    with kernel_preference("reference"):
        assert KERNEL.select("cpu", *args)[0] == "reference"
    with kernel_preference("triton"):
        assert KERNEL.select("cpu", *args)[0] == ("triton" if TRITON_ON_CPU is None else "reference")
    assert KERNEL.select("cpu", *args)[0] == "cpu"  # AUTO on CPU tensors
    if TRITON_ON_CPU is None:
        assert "share one dtype" in KERNEL.why_not("triton", args[0].half(), args[1], None)


def test_op_contract_export_and_tracing():
    for bias in (True, False):
        args = space.make_inputs(9, 300, 32, bias=bias, seed=8, spread=4.0)
        torch.library.opcheck(torch.ops.adaptc.exit_confidence.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        check(exit_confidence(*args), args)

    class ExitHead(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

        def forward(self, h):
            return exit_confidence(h, self.weight)

    hidden, weight, _ = space.make_inputs(4, 300, 32, bias=False, seed=9, spread=4.0)
    program = torch.export.export(ExitHead(weight), (hidden,), dynamic_shapes=({0: torch.export.Dim("rows", min=2)},))
    assert sum("adaptc.exit_confidence" in str(n.target) for n in program.graph.nodes) == 1
    other = space.make_inputs(11, 300, 32, bias=False, seed=10, spread=4.0)[0]
    check(program.module()(other), (other, weight, None))
    with trace_calls() as calls:
        exit_confidence(other, weight)
    assert [(k, i) for k, i, _ in calls.values()] == [("exit_confidence", "cpu")]


def test_tuner_measures_and_checks_every_config():
    args = space.make_inputs(8, 6000, 32, seed=12, spread=4.0)
    outcome = tune("exit_confidence", "cpu", args, cache=open_cache(),
                   budget=Budget(trials=16, seconds=20, seconds_per_trial=0.005), strategy="exhaustive")
    assert outcome.source == "measured" and outcome.problem["N"] == 8
    assert all(t.status == "ok" for t in outcome.trials) and len(outcome.trials) == len(space.CPU_SPACE["CHUNK"])
    assert outcome.config in [{"CHUNK": c} for c in space.CPU_SPACE["CHUNK"]]


def test_agreement_check_rejects_a_wrong_answer():
    args = space.make_inputs(6, 400, 32, seed=13, spread=4.0)
    want = torch_exit_confidence(*args)
    tol = space.tolerance(torch.float32)
    assert KERNEL.matches(want, want, tol)
    assert not KERNEL.matches((want[0], want[1], (want[2] + 1) % 400), want, tol)
    assert not KERNEL.matches((want[0] * 1.01, want[1], want[2]), want, tol)


def test_bad_arguments_are_clear():
    hidden, weight, bias = space.make_inputs(3, 40, 16)
    with pytest.raises(ValueError, match="both need D=16"):
        exit_confidence(hidden, weight[:, :8])
    with pytest.raises(ValueError, match="bias must be"):
        exit_confidence(hidden, weight, bias[:5])
    with pytest.raises(ValueError, match="hidden must be"):
        exit_confidence(hidden[0], weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_on_gpu_at_lm_head_sizes(dtype):
    from adaptc.kernels.exit_confidence.triton import triton_exit_confidence

    for N in (1, 8, 64, 300):
        args = space.make_inputs(N, 49152, 576, dtype=dtype, device="cuda", seed=N, spread=4.0)
        got = triton_exit_confidence(*args)
        check(got, args, min_clear=0.8)
        assert exit_confidence(*args)[0].device.type == "cuda"
