"""adaptc::linear: every backend against F.linear on fresh random inputs, the packed weight's lifetime,
gradients, and the op in an exported graph."""
import gc

import pytest
import torch
import torch.nn.functional as F

from adaptc.kernels import KERNELS, kernel_preference
from adaptc.kernels.linear import cpu, linear
from adaptc.kernels.linear.space import CPU_SPACE

KERNEL = KERNELS["linear"]


def args(M, K, N, dtype=torch.float32, bias=True, seed=0):
    return KERNEL.example({"M": M, "K": K, "N": N, "dtype": str(dtype)[6:], "bias": bias}, "cpu", seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,bias", [(1, 48, 40, True), (2, 64, 192, False), (37, 96, 24, True), (128, 32, 256, True)])
def test_every_backend_matches_f_linear(M, K, N, bias, dtype):
    x, w, b = args(M, K, N, dtype, bias, seed=M)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    tol = KERNEL.tolerance(dtype)
    for backend in CPU_SPACE["backend"]:
        got = cpu.cpu_linear(x, w, b, config={"backend": backend})
        assert got.dtype == dtype and got.shape == (M, N)
        torch.testing.assert_close(got.float(), want, **tol)


def test_batched_and_strided_inputs_keep_their_leading_dims():
    x, w, b = args(24, 32, 16)
    x3 = x.reshape(4, 6, 32).transpose(0, 1)  # not contiguous
    got = cpu.cpu_linear(x3, w, b, config={"backend": "onednn"})
    torch.testing.assert_close(got, F.linear(x3, w, b), atol=1e-5, rtol=1e-5)
    assert got.shape == (6, 4, 16)


def test_a_weight_edited_in_place_is_packed_again():
    x, w, b = args(8, 32, 48, seed=1)
    first = cpu.cpu_linear(x, w, b, config={"backend": "onednn"})
    w.mul_(-2.0)  # the version counter moves: the old packed copy must not be used
    again = cpu.cpu_linear(x, w, b, config={"backend": "onednn"})
    torch.testing.assert_close(again, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, again)


def test_packed_copies_of_freed_weights_are_dropped():
    for seed in range(20):
        x, w, b = args(4, 64, 64, seed=seed)
        cpu.cpu_linear(x, w, b, config={"backend": "onednn"})
        del x, w, b
        gc.collect()
    live = [k for k, (ref, _) in cpu._packed.items() if not ref.expired()]
    assert len(cpu._packed) <= len(live) + 1  # each new pack sweeps the expired ones


def test_the_default_keeps_mkl_for_one_or_two_fp32_rows_through_a_layer():
    default = KERNEL.implementations["cpu"].space.default
    assert default(*args(1, 64, 64)) == default(*args(2, 64, 64)) == {"backend": "aten"}
    assert default(*args(8, 64, 64)) == {"backend": "onednn"}
    assert default(torch.randn(1, 576), torch.randn(49152, 576)) == {"backend": "onednn"}  # an LM head
    assert default(*args(1, 64, 64, torch.bfloat16)) == {"backend": "onednn"}


def test_gradients_match_nn_linear():
    x, w, b = (t.detach().requires_grad_() for t in args(6, 16, 12, seed=2))
    linear(x.reshape(2, 3, 16), w, b).square().sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x.reshape(2, 3, 16), w, b).square().sum().backward()
    for g, t in zip(got, (x, w, b)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_unsupported_inputs_fall_back_to_the_reference():
    x, w, b = args(4, 16, 8, torch.float16)
    assert "float16" in KERNEL.why_not("cpu", x, w, b)
    with kernel_preference("cpu"):
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))


def test_the_op_is_one_node_in_an_exported_graph():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return torch.ops.adaptc.linear(x, self.w, None)

    x = torch.randn(3, 5, 16)
    ep = torch.export.export(Net(), (x,), dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},))
    assert [str(n.target) for n in ep.graph.nodes if n.op == "call_function"] == ["adaptc.linear.default"]
    y = torch.randn(2, 7, 16)
    torch.testing.assert_close(ep.module()(y), F.linear(y, ep.module().w), atol=1e-5, rtol=1e-5)


def test_a_config_tuned_after_the_first_call_is_the_one_that_runs():
    from adaptc.kernels._registry import set_config
    from adaptc.kernels.linear import op

    x, w, b = args(8, 32, 24, seed=3)
    op.run_linear(x, w, b)  # memoises the default's choice
    for backend in ("aten", "onednn", "aten"):
        set_config("linear", "cpu", KERNEL.problem(x, w, b), "cpu", {"backend": backend})
        torch.testing.assert_close(op.run_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        assert list(op._chosen.values())[-1] is cpu.backend({"backend": backend})


def test_mismatched_shapes_are_a_clear_error():
    x, w, b = args(4, 16, 8)
    with pytest.raises(ValueError, match=r"linear takes x \[\.\.\., K\] and weight \[N, K\]"):
        linear(torch.randn(4, 15), w, b)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        linear(x, w, torch.randn(7))
