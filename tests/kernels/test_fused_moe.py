"""adaptc::fused_moe: every implementation against the plain-torch reference, and the op's contract.

The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (`make test` sets it) and on the GPU
when there is one (`-m gpu`).
"""
import pytest
import torch

from adaptc.kernels import KERNELS, kernel_preference
from adaptc.kernels.moe import space
from adaptc.kernels.moe.cpu import cpu_fused_moe
from adaptc.kernels.moe.reference import torch_fused_moe

KERNEL = KERNELS["fused_moe"]
# Asked of the implementation, not of the environment: triton.jit picks the interpreter when the
# kernels are defined, so what counts is TRITON_INTERPRET at that import (here, at collection).
TRITON_ON_CPU = KERNEL.why_not("triton", *space.make_inputs(1, 16, 16, 2, 1))
needs_triton_on_cpu = pytest.mark.skipif(TRITON_ON_CPU is not None, reason=str(TRITON_ON_CPU))


def check(got, args):
    want = torch_fused_moe(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **space.tolerance(args[0].dtype))


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_conforms_to_reference(impl, dtype):
    for args in space.sample_inputs("cpu", dtype, seed=1):
        why = KERNEL.why_not(impl, *args)
        if why:
            pytest.skip(why)
        assert args[0].numel() == 0 or args[0].abs().sum() > 0  # random inputs, never zeros
        check(KERNEL.implementations[impl].fn(*args), args)


@needs_triton_on_cpu
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=3),  # tiles past H and I
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
], ids=lambda c: f"M{c['BLOCK_M']}N{c['BLOCK_N']}K{c['BLOCK_K']}G{c['GROUP_M']}")
def test_triton_tile_configs(config):
    from adaptc.kernels.moe.triton import triton_fused_moe

    for dtype in (torch.float32, torch.float16):
        args = space.make_inputs(19, 48, 40, 6, 2, dtype=dtype, seed=4, skip_experts=1)
        check(triton_fused_moe(*args, config=config), args)


@pytest.mark.parametrize("tokens,dtype", [(37, torch.float32), (5, torch.float32), (5, torch.float16)],
                         ids=["9-rows-per-expert", "1-3-rows", "1-3-rows-fp16"])
def test_cpu_every_config(tokens, dtype):
    args = space.make_inputs(tokens, 64, 48, 8, 2, dtype=dtype, seed=5, skip_experts=2)
    for config in space.cpu_configs():
        check(cpu_fused_moe(*args, config=config), args)


def test_cpu_workers_with_parameters_that_require_grad():
    """Grad mode is per thread: worker threads must not build autograd graphs on Parameters."""
    x, w, ids, w13, w2, act, gated = space.make_inputs(6, 64, 48, 8, 2, seed=6)
    config = {**space.cpu_default_config(6, 64, 48, 8, 2, torch.float32, True), "workers": 2}
    got = cpu_fused_moe(x, w, ids, torch.nn.Parameter(w13), torch.nn.Parameter(w2), act, gated, config=config)
    check(got.detach(), (x, w, ids, w13, w2, act, gated))


@pytest.mark.parametrize("T,E,K,gemv_kept", [(1, 8, 2, False), (8, 1, 1, False), (3, 1, 1, True), (6, 8, 2, True)],
                         ids=["one-token", "lone-expert-8-rows", "lone-expert-3-rows", "6-tokens-8-experts"])
def test_cpu_space_prunes_gemv_configs_only_where_they_change_nothing(T, E, K, gemv_kept):
    args = space.make_inputs(T, 64, 48, E, K, seed=7)
    cpu = KERNEL.implementations["cpu"]
    configs = cpu.space.configs(*args)
    assert cpu.space.default(*args) in configs
    assert any(c["gemv_rows"] for c in configs) == gemv_kept
    if not gemv_kept:  # each pruned config computes bit for bit what its kept twin does
        for c in configs:
            if c["algorithm"] == "loop" and c["layout"] == "wx" and c["row_pad"] == 1:
                assert torch.equal(cpu_fused_moe(*args, config={**c, "gemv_rows": 4}), cpu_fused_moe(*args, config=c))


@needs_triton_on_cpu
def test_triton_reads_weights_through_their_strides():
    from adaptc.kernels.moe.triton import triton_fused_moe

    x, w, ids, w13, w2, act, gated = space.make_inputs(13, 48, 40, 4, 2, dtype=torch.float16, seed=8)
    # Same values, other layouts: hidden a column slice of a wider matrix, weights transposed views.
    x_wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :48]
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_wide.is_contiguous() or w13_t.is_contiguous() or w2_t.is_contiguous())
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)
    check(triton_fused_moe(x_wide, w, ids, w13_t, w2_t, act, gated, config=config), (x, w, ids, w13, w2, act, gated))


@pytest.mark.parametrize("T,K,E,block_m", [(3, 2, 4, 2), (5, 2, 64, 16), (40, 3, 5, 16)])
def test_align_blocks_groups_pairs_by_expert(T, K, E, block_m):
    pytest.importorskip("triton")
    from adaptc.kernels.moe.triton import align_blocks

    ids = torch.rand(T, E).argsort(dim=1)[:, :K]
    sorted_ids, block_expert = align_blocks(ids, E, block_m)
    S, flat = ids.numel(), ids.reshape(-1)
    # The fixed bound: only the min(E, S) experts hit can pad, each by fewer than block_m rows.
    assert sorted_ids.numel() % block_m == 0 and sorted_ids.numel() < S + min(E, S) * (block_m - 1) + block_m
    assert block_expert.numel() == sorted_ids.numel() // block_m
    assert sorted(sorted_ids[sorted_ids < S].tolist()) == list(range(S))  # every pair exactly once
    for rows, e in zip(sorted_ids.view(-1, block_m), block_expert.tolist()):
        real = rows[rows < S]
        if e == E:  # past the last expert's run: padding only
            assert real.numel() == 0
        else:
            assert real.numel() > 0 and (flat[real] == e).all()


def test_triton_declines_with_a_reason():
    pytest.importorskip("triton")
    from adaptc.kernels.moe.triton import supports

    x, w, ids, w13, w2, act, gated = space.make_inputs(2, 16, 16, 2, 1)
    assert "different devices" in supports(x, w, ids, w13.to("meta"), w2, act, gated)
    assert "meta" in supports(*(t.to("meta") for t in (x, w, ids, w13, w2)), act, gated)


def test_preference_selects_what_it_says():
    args = next(space.sample_inputs("cpu", torch.float32))
    with kernel_preference("reference"):
        assert KERNEL.select("cpu", *args)[0] == "reference"
    with kernel_preference("cpu"):
        assert KERNEL.select("cpu", *args)[0] == "cpu"
    with kernel_preference("triton"):
        assert KERNEL.select("cpu", *args)[0] == ("triton" if TRITON_ON_CPU is None else "reference")
    assert KERNEL.select("cpu", *args)[0] == "cpu"  # AUTO on CPU tensors


def test_op_checks_and_exports_with_dynamic_tokens():
    args = space.make_inputs(9, 32, 32, 4, 2, seed=6)
    torch.library.opcheck(torch.ops.adaptc.fused_moe.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    class Block(torch.nn.Module):
        def forward(self, x, w, ids, w13, w2):
            return torch.ops.adaptc.fused_moe(x, w, ids, w13, w2, "silu", True)

    tokens = torch.export.Dim("tokens", min=2)
    program = torch.export.export(Block(), args[:5], dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}, None, None))
    assert sum("adaptc.fused_moe" in str(n.target) for n in program.graph.nodes) == 1
    other = space.make_inputs(23, 32, 32, 4, 2, seed=7)
    other = (other[0], other[1], other[2], args[3], args[4], "silu", True)
    torch.testing.assert_close(program.module()(*other[:5]), torch_fused_moe(*other), rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_clear():
    x, w, ids, w13, w2, act, gated = space.make_inputs(4, 32, 32, 4, 2)
    with pytest.raises(ValueError, match="w13 must be"):
        torch.ops.adaptc.fused_moe(x, w, ids, w13[:, :16], w2, act, gated)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.adaptc.fused_moe(x, w, ids, w13, w2, "swish", gated)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_triton_on_gpu(dtype):
    from adaptc.kernels.moe.triton import triton_fused_moe

    for T in (1, 37, 256):
        args = space.make_inputs(T, 1024, 512, 8, 2, dtype=dtype, device="cuda", seed=T)
        check(triton_fused_moe(*args), args)
