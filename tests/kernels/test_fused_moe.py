"""adaptc::fused_moe: every implementation against the plain-torch reference, and the op's contract.

The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (`make test` sets it) and on the GPU
when there is one (`-m gpu`).
"""
import os

import pytest
import torch

from adaptc.kernels import KERNELS, kernel_preference
from adaptc.kernels.moe import space
from adaptc.kernels.moe.cpu import cpu_fused_moe
from adaptc.kernels.moe.reference import torch_fused_moe

KERNEL = KERNELS["fused_moe"]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


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


@needs_interpreter
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


def test_cpu_every_config():
    args = space.make_inputs(37, 64, 48, 8, 2, seed=5, skip_experts=2)
    for config in space.cpu_configs():
        check(cpu_fused_moe(*args, config=config), args)


def test_align_blocks_groups_pairs_by_expert():
    from adaptc.kernels.moe.triton import align_blocks

    ids = torch.tensor([[0, 2], [2, 1], [0, 2]])
    sorted_ids, block_expert = align_blocks(ids, E=4, block_m=2)
    S = ids.numel()
    flat = ids.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[2 * b:2 * b + 2]
        real = rows[rows < S]
        assert e == 4 and real.numel() == 0 or (flat[real] == e).all()
    assert sorted(sorted_ids[sorted_ids < S].tolist()) == list(range(S))  # every pair exactly once


def test_preference_selects_what_it_says():
    args = next(space.sample_inputs("cpu", torch.float32))
    with kernel_preference("reference"):
        assert KERNEL.select("cpu", *args)[0] == "reference"
    with kernel_preference("cpu"):
        assert KERNEL.select("cpu", *args)[0] == "cpu"
    with kernel_preference("triton"):
        assert KERNEL.select("cpu", *args)[0] == ("triton" if INTERPRET else "reference")
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
