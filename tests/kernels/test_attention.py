"""adaptc::attention: the CPU implementation against SDPA with the dense mask, and the op's contract."""
import pytest
import torch

from adaptc.kernels import KERNELS
from adaptc.kernels.attention import space
from adaptc.kernels.attention.cpu import cpu_attention
from adaptc.kernels.attention.reference import key_range, torch_attention

CASES = [dict(causal=True), dict(causal=False), dict(causal=True, window=7), dict(causal=True, window=40, padding="left"),
         dict(causal=False, padding="right"), dict(causal=True, window=3, padding="right")]
SHAPES = [(2, 4, 2, 37, 37), (1, 4, 1, 1, 50), (2, 2, 2, 13, 45)]  # B, Hq, Hkv, Lq, Lk: GQA, decode, chunked prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cpu_matches_reference(dtype, case):
    for i, shape in enumerate(SHAPES):
        args = space.make_inputs(*shape, 16, dtype=dtype, seed=i, **case)
        want = torch_attention(*args)
        for block in (8, 16, 64):
            torch.testing.assert_close(cpu_attention(*args, config={"BLOCK_M": block}), want, **space.tolerance(dtype))


def test_cpu_explicit_document_mask_skips_other_documents():
    q, k, v, _, _, scale, _, _, _ = space.make_inputs(2, 2, 2, 20, 20, 16, seed=3)
    doc = torch.tensor([0] * 7 + [1] * 6 + [2] * 7)
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril())[None, None]
    want = torch_attention(q, k, v, None, mask, scale, False, 0, 0)
    for block in (4, 8, 32):
        torch.testing.assert_close(cpu_attention(q, k, v, None, mask, scale, False, 0, 0, config={"BLOCK_M": block}), want)


def test_rows_that_see_nothing_are_zero():
    q, k, v, _, _, scale, _, _, _ = space.make_inputs(1, 2, 2, 6, 6, 16, seed=4)
    key_padding = torch.tensor([[False, False, True, True, True, True]])
    out = cpu_attention(q, k, v, key_padding, None, scale, True, 0, 0, config={"BLOCK_M": 2})
    assert out[:, :, :2].abs().sum() == 0 and out[:, :, 2:].abs().sum() > 0
    torch.testing.assert_close(out, torch_attention(q, k, v, key_padding, None, scale, True, 0, 0))


def test_key_range_reads_only_the_band():
    assert key_range(512, 640, 8192, causal=True, window=256, q_offset=0) == (257, 640)
    assert key_range(0, 128, 8192, causal=True, window=0, q_offset=0) == (0, 128)
    assert key_range(0, 1, 100, causal=True, window=10, q_offset=99) == (90, 100)  # decode


def test_op_contract_export_and_errors():
    args = space.make_inputs(2, 4, 2, 9, 9, 16, window=4, padding="left")
    torch.library.opcheck(torch.ops.adaptc.attention.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(torch.ops.adaptc.attention(*args), torch_attention(*args))
    assert KERNELS["attention"].select("cpu", *args)[0] == "cpu"
    q, k, v, kp, m, s, c, w, off = args
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        torch.ops.adaptc.attention(q[:, :3], k, v, kp, m, s, c, w, off)
    with pytest.raises(ValueError, match="key_padding"):
        torch.ops.adaptc.attention(q, k, v, kp.long(), m, s, c, w, off)
