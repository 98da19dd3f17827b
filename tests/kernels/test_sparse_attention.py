"""adaptc::sparse_attention: the CPU implementation against the reference, and the patterns' meaning."""
import pytest
import torch

from adaptc.kernels import KERNELS
from adaptc.kernels.attention.reference import torch_attention
from adaptc.kernels.sparse_attention import space
from adaptc.kernels.sparse_attention.cpu import cpu_sparse_attention
from adaptc.kernels.sparse_attention.reference import dense_mask, select_blocks, torch_sparse_attention

SHAPES = [(2, 4, 2, 70, 70), (1, 4, 4, 1, 83), (2, 2, 1, 19, 50), (1, 2, 2, 33, 33)]  # B, Hq, Hkv, Lq, Lk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", [dict(sinks=1, window=1, topk=0), dict(sinks=1, window=2, topk=2),
                                     dict(sinks=0, window=1, topk=3), dict(sinks=2, window=3, topk=1, block=8)],
                         ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_cpu_matches_reference(dtype, pattern):
    for i, shape in enumerate(SHAPES):
        args = space.make_inputs(*shape, 16, dtype=dtype, seed=i, **pattern)
        want = torch_sparse_attention(*args)
        for chunk in (1, 3, 32):
            torch.testing.assert_close(cpu_sparse_attention(*args, config={"CHUNK": chunk}), want,
                                       **space.tolerance(dtype))


def test_pattern_that_covers_every_block_is_exact_causal_attention():
    q, k, v, scale, off, block, *_ = space.make_inputs(2, 4, 2, 45, 45, 16, block=8)
    wide = [99] * 4
    got = cpu_sparse_attention(q, k, v, scale, off, block, [0] * 4, wide, [0] * 4, config={"CHUNK": 2})
    torch.testing.assert_close(got, torch_attention(q, k, v, None, None, scale, True, 0, off))
    # decode: one query at the end of a cache
    q1 = q[:, :, -1:]
    got = cpu_sparse_attention(q1, k, v, scale, 44, block, [0] * 4, wide, [0] * 4, config={"CHUNK": 4})
    torch.testing.assert_close(got, torch_attention(q1, k, v, None, None, scale, True, 0, 44))


def test_selection_reads_sinks_window_and_topk_blocks_only():
    q, k, v, scale, off, block, sinks, window, topk = space.make_inputs(1, 2, 1, 64, 64, 8, block=8, sinks=1,
                                                                        window=2, topk=2)
    sel = select_blocks(q, k, scale, off, block, sinks, window, topk)  # [1, 2, 8, 8]
    assert sel.shape == (1, 2, 8, 8)
    assert not sel.triu(1).any(), "never a block after the query block"
    assert sel[..., 0].all() and sel.diagonal(dim1=-2, dim2=-1).all(), "sink and diagonal always read"
    for h in range(2):
        expected = torch.tensor([min(i + 1, sinks[h] + window[h] + topk[h]) for i in range(8)])
        assert torch.equal(sel[0, h].sum(-1), expected)
    mask = dense_mask(sel, 64, 64, 0, 8)
    assert torch.equal(mask, mask.tril()) and mask.float().mean() < 0.5


def test_topk_follows_the_mass():
    # keys of block 3 align with every query: the top-1 choice of the last query block must be block 3
    torch.manual_seed(0)
    q = torch.randn(1, 1, 64, 16) * 0.1 + 1.0
    k = torch.randn(1, 1, 64, 16) * 0.1
    k[:, :, 24:32] += 2.0
    sel = select_blocks(q, k, 0.25, 0, 8, [0], [1], [1])
    assert sel[0, 0, 7].nonzero().flatten().tolist() == [3, 7]


def test_op_contract_and_errors():
    args = space.make_inputs(2, 4, 2, 21, 21, 16, block=8)
    torch.library.opcheck(torch.ops.adaptc.sparse_attention.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(torch.ops.adaptc.sparse_attention(*args), torch_sparse_attention(*args))
    assert KERNELS["sparse_attention"].select("cpu", *args)[0] == "cpu"
    q, k, v, scale, off, block, s, w, t = args
    with pytest.raises(ValueError, match="window must be >= 1"):
        torch.ops.adaptc.sparse_attention(q, k, v, scale, off, block, s, [0] * 4, t)
    with pytest.raises(ValueError, match="one value per query head"):
        torch.ops.adaptc.sparse_attention(q, k, v, scale, off, block, s[:2], w, t)
    with pytest.raises(ValueError, match="need keys up to there"):
        torch.ops.adaptc.sparse_attention(q, k[:, :, :10], v[:, :, :10], scale, 0, block, s, w, t)


def test_dense_and_sparse_heads_mix():
    q, k, v, scale, off, block, s, w, t = space.make_inputs(2, 4, 2, 50, 50, 16, block=8)
    w = [99, 2, 3, 99]  # heads 0 and 3 read everything: exact attention for them
    args = (q, k, v, scale, off, block, s, w, t)
    got = cpu_sparse_attention(*args, config={"CHUNK": 2})
    torch.testing.assert_close(got, torch_sparse_attention(*args))
    exact = torch_attention(q, k, v, None, None, scale, True, 0, off)
    torch.testing.assert_close(got[:, [0, 3]], exact[:, [0, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_reference(dtype):
    triton_mod = pytest.importorskip("adaptc.kernels.sparse_attention.triton")
    if not triton_mod.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() and not triton_mod.INTERPRETED else "cpu"
    for i, shape in enumerate([(1, 4, 2, 50, 50), (1, 2, 2, 1, 70), (2, 2, 1, 21, 40)]):
        args = space.make_inputs(*shape, 16, block=16, dtype=dtype, device=device, seed=i)
        want = torch_sparse_attention(*args)
        for cfg in ({"BLOCK_N": 16, "num_warps": 2, "num_stages": 1}, None):
            torch.testing.assert_close(triton_mod.triton_sparse_attention(*args, config=cfg), want,
                                       **space.tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 4096])
def test_triton_on_gpu(L):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from adaptc.kernels.sparse_attention.triton import triton_sparse_attention

    args = space.make_inputs(1, 8, 2, L, 4096, 64, block=64, sinks=1, window=4, topk=4, dtype=torch.bfloat16,
                             device="cuda")
    torch.testing.assert_close(triton_sparse_attention(*args), torch_sparse_attention(*args),
                               **space.tolerance(torch.bfloat16))
