"""`triton_attention` against SDPA with a dense mask: causal, sliding window, key padding, GQA,
chunked prefill (q_offset), the split-KV decode path, rows that see no key (zeros).

On CPU tensors the kernels run under TRITON_INTERPRET=1 (small shapes: the interpreter is slow);
`-m gpu` runs realistic shapes on a CUDA device.
"""
import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not INTERPRET and not HAS_CUDA,
                                reason="Triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2)}


def dense_mask(B, Lq, Lk, causal, window, q_offset, key_padding, device="cpu"):
    """[B, 1, Lq, Lk] bool, True = key j visible to query i (at absolute position q_offset + i)."""
    p = torch.arange(Lq, device=device)[:, None] + q_offset
    j = torch.arange(Lk, device=device)[None, :]
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= p
    if window:
        mask &= p - j < window
    mask = mask[None, None].expand(B, 1, Lq, Lk)
    if key_padding is not None:
        mask = mask & key_padding[:, None, None, :]
    return mask


def reference(q, k, v, scale, causal, window, q_offset, key_padding):
    """SDPA in float64 with the dense mask; rows with no visible key are zeros."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask = dense_mask(B, Lq, Lk, causal, window, q_offset, key_padding, q.device)
    seen = mask.any(-1, keepdim=True)
    k2 = k.double().repeat_interleave(Hq // Hkv, dim=1)
    v2 = v.double().repeat_interleave(Hq // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q.double(), k2, v2, attn_mask=mask | ~seen, scale=scale)
    return torch.where(seen, out, 0.0).to(q.dtype)


def make(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(device=device, dtype=dtype)
               for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    return q, k, v


def padding(B, Lk, left=(), right=(), device="cpu"):
    """Key padding: batch b has left[b] pad tokens at the start and right[b] at the end."""
    kp = torch.ones(B, Lk, dtype=torch.bool, device=device)
    for b, n in enumerate(left):
        kp[b, :n] = False
    for b, n in enumerate(right):
        if n:
            kp[b, Lk - n:] = False
    return kp


def check(q, k, v, causal=True, window=0, q_offset=0, key_padding=None, config=None, scale=None):
    from adaptc.kernels.attention.triton import supports, triton_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, scale, causal, window, q_offset, key_padding)
    assert supports(*args) is None, supports(*args)
    assert q.abs().sum() > 0 and k.abs().sum() > 0 and v.abs().sum() > 0  # random inputs, never zeros
    got = triton_attention(*args, config=config)
    want = reference(*args)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **TOL[q.dtype])
    return got


DTYPES = [torch.float32, torch.float16]
SMALL = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, window=5),      # window smaller than a block
    dict(causal=True, window=40),     # window spanning blocks
    dict(causal=False, window=24),    # a window alone bounds only the past
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_prefill_masks(dtype, case):
    q, k, v = make(2, 2, 2, 70, 70, 16, dtype, seed=1)
    check(q, k, v, **case, config=SMALL)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_left_and_right(dtype):
    q, k, v = make(2, 2, 1, 48, 48, 32, dtype, seed=2)
    # Left padding: the first 7 queries of batch 0 see no key under the causal mask (zeros).
    kp = padding(2, 48, left=(7, 0), right=(0, 11))
    got = check(q, k, v, causal=True, key_padding=kp, config=SMALL)
    assert (got[0, :, :7] == 0).all()
    check(q, k, v, causal=False, window=9, key_padding=kp, config=SMALL)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hkv", [1, 2])
def test_gqa(dtype, hkv):
    q, k, v = make(1, 4, hkv, 40, 40, 16, dtype, seed=3)
    check(q, k, v, causal=True, config=SMALL)
    check(q[:, :, :3], k, v, causal=True, q_offset=37, config=dict(SMALL, SPLITS=2))  # decode, packed heads


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_prefill(dtype):
    # The second chunk of a prompt: 40 queries at positions 50..89 against 90 keys.
    q, k, v = make(2, 2, 1, 40, 90, 16, dtype, seed=4)
    check(q, k, v, causal=True, q_offset=50, config=SMALL)
    check(q, k, v, causal=True, window=20, q_offset=50, config=SMALL)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_split_kv(dtype, splits):
    q, k, v = make(2, 4, 2, 1, 80, 32, dtype, seed=5)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, SPLITS=splits)
    check(q, k, v, causal=True, q_offset=79, config=cfg)
    check(q, k, v, causal=True, window=30, q_offset=79, config=cfg)
    kp = padding(2, 80, left=(13, 0), right=(0, 5))
    check(q, k, v, causal=False, key_padding=kp, config=cfg)
    check(q, k, v, causal=True, q_offset=79, key_padding=kp)  # default config (auto SPLITS)


@needs_interpreter
def test_rows_without_visible_keys_are_zero():
    q, k, v = make(2, 2, 2, 20, 20, 16, torch.float32, seed=6)
    kp = padding(2, 20, left=(20, 3))  # batch 0: every key padded
    for lq in (20, 1):  # prefill and decode
        got = check(q[:, :, :lq], k, v, causal=True, q_offset=20 - lq, key_padding=kp, config=SMALL)
        assert (got[0] == 0).all() and (got[1] != 0).any()
    # Keys only in the future of every query: nothing visible at all (no launch).
    got = check(q, k, v, causal=True, q_offset=-25, config=SMALL)
    assert (got == 0).all()


@needs_interpreter
def test_reads_only_key_blocks_that_can_be_visible():
    from adaptc.kernels.attention.triton import triton_attention

    # NaN in K and V outside the blocks a tile may need: any read of them poisons the output
    # (0 * NaN = NaN), so a finite, correct result proves those blocks were skipped.
    def poisoned(k, v, lo, hi):
        k, v = k.clone(), v.clone()
        for t in (k, v):
            t[:, :, :lo] = float("nan")
            t[:, :, hi:] = float("nan")
        return k, v

    q, k, v = make(1, 2, 1, 96, 96, 16, torch.float32, seed=10)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    # Chunked prefill, queries 64..95, window 16: keys 49..95 visible, blocks from 48 on.
    want = reference(q[:, :, 64:], k, v, 0.25, True, 16, 64, None)
    got = triton_attention(q[:, :, 64:], *poisoned(k, v, 48, 96), 0.25, True, 16, 64, None, config=cfg)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Causal prefill, queries 0..31 (one tile) against 96 keys: nothing past key 31 is read.
    want = reference(q[:, :, :32], k, v, 0.25, True, 0, 0, None)
    got = triton_attention(q[:, :, :32], *poisoned(k, v, 0, 32), 0.25, True, 0, 0, None, config=cfg)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Decode at position 79 with window 30: keys 50..79, blocks 48..79, in 1 or 2 splits.
    for splits in (1, 2):
        want = reference(q[:, :, 79:80], k, v, 0.25, True, 30, 79, None)
        got = triton_attention(q[:, :, 79:80], *poisoned(k, v, 48, 80), 0.25, True, 30, 79, None,
                               config=dict(cfg, SPLITS=splits))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=16, num_warps=2, num_stages=1),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),   # BLOCK_N past Lk
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    None,                                                        # default_config
], ids=lambda c: f"M{c['BLOCK_M']}N{c['BLOCK_N']}" if c else "default")
def test_tile_configs_not_dividing_L(config):
    for dtype in DTYPES:
        q, k, v = make(1, 2, 1, 37, 53, 16, dtype, seed=7)
        check(q, k, v, causal=True, window=19, q_offset=16, config=config)


@needs_interpreter
def test_strided_inputs_and_bf16():
    # [B, L, H, D] storage seen as [B, H, L, D] (what a fused QKV projection hands over).
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 33, 3, 2, 16, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check(q, k, v, causal=True, window=10, config=SMALL)
    check(*(t.to(torch.bfloat16) for t in (q, k, v)), causal=True, config=SMALL)


def test_supports_declines_with_reasons():
    from adaptc.kernels.attention.triton import supports

    q, k, v = make(1, 4, 2, 8, 8, 16, torch.float32)
    assert supports(*make(1, 2, 2, 8, 8, 24, torch.float32), 1.0, True, 0, 0, None)  # head dim 24
    assert supports(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16), 1.0, True, 0, 0, None)
    assert supports(q, k, v[:, :, :4], 1.0, True, 0, 0, None)
    assert supports(q, k, v.half(), 1.0, True, 0, 0, None)
    assert supports(q, k, v, 1.0, True, 0, 0, torch.ones(1, 7, dtype=torch.bool))
    assert supports(q, k, v, 1.0, True, -1, 0, None)
    assert (supports(q, k, v, 1.0, True, 0, 0, None) is None) == INTERPRET


def test_config_space():
    from adaptc.kernels.attention import triton as attn

    big = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=4, SPLITS=1)
    assert not attn.config_fits(big, 128, torch.float16)
    assert attn.config_fits(dict(big, num_stages=2, num_warps=8), 64, torch.float16)
    assert not attn.config_fits(dict(big, num_stages=1, SPLITS=4, num_warps=8), 64, torch.float16, Lq=512)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D in (64, 128, 256):
            for Lq, Lk in ((1, 8192), (4, 300), (1024, 1024), (8192, 8192)):
                q, k, v = make(1, 1, 1, 1, 1, D, dtype)
                q, k = q.expand(2, 32, Lq, D), k.expand(2, 8, Lk, D)
                cfg = attn.default_config(q, k, k, 1.0, True, 0, Lk - Lq, None)
                assert set(cfg) == set(attn.SPACE)
                assert all(cfg[n] in vals for n, vals in attn.SPACE.items() if n != "SPLITS"), cfg
                assert 1 <= cfg["SPLITS"] <= max(attn.SPACE["SPLITS"])
                assert attn.config_fits(cfg, D, dtype, Lq=Lq), (cfg, D, dtype)
                assert (cfg["SPLITS"] > 1) == (Lq <= attn.DECODE_MAX_LQ)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [0, 256])
def test_gpu(dtype, D, window):
    q, k, v = make(2, 8, 2, 1024, 1024, D, dtype, seed=9, device="cuda")
    kp = padding(2, 1024, left=(0, 100), device="cuda")
    check(q, k, v, causal=True, window=window)
    check(q, k, v, causal=True, window=window, key_padding=kp)
    check(q[:, :, -1:], k, v, causal=True, window=window, q_offset=1023)  # decode, split-KV
    check(q[:, :, -300:], k, v, causal=True, window=window, q_offset=724)  # chunked prefill
