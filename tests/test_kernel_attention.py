
import pytest
import torch

from helpers import KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY
from braid_backend.kernels.decode_attention import (
    MIN_SPLIT_LEN,
    attention_workspace,
    decode_attention,
    decode_attention_reference,
    default_num_splits,
)

DEV = KERNEL_DEV
pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")


def _make(M, H, KV, D, S_max, lens, dtype, seed, pad=None, window=0, B_extra=1, valid_bool=True, holes=()):
    """Random inputs; every cache position a token must NOT attend holds NaN, so reading one fails.

    Built on the CPU from a seeded generator, then moved to DEV."""
    g = torch.Generator().manual_seed(seed)
    B = M + B_extra
    q = torch.randn(M, H, D, generator=g).to(dtype)
    k_cache = (torch.randn(B, KV, S_max, D, generator=g) * 1.5).to(dtype)
    v_cache = torch.randn(B, KV, S_max, D, generator=g).to(dtype)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    valid = torch.ones(B, S_max, dtype=torch.bool)
    if pad is not None:
        for b, p in enumerate(pad):
            valid[b, :p] = False
    for b, lo, hi in holes:
        valid[b, lo:hi] = False
    pos = torch.arange(S_max)[None, :]
    attended = (pos < kv_lens.long()[:, None]) & valid[:M]
    if window:
        attended &= pos >= kv_lens.long()[:, None] - window
    k_cache[:M][~attended[:, None, :, None].expand(M, KV, S_max, D)] = float("nan")
    v_cache[:M][~attended[:, None, :, None].expand(M, KV, S_max, D)] = float("nan")
    if not valid_bool:
        valid = valid.to(torch.int8)
    return tuple(t.to(DEV) for t in (q, k_cache, v_cache, kv_lens, valid))


def _check(q, kc, vc, lens, valid, num_splits, softcap=0.0, window=0):
    M, H, D = q.shape
    scale = D ** -0.5
    kw = dict(scale=scale, softcap=softcap, window=window)
    out = torch.full((M, H * D), float("nan"), dtype=q.dtype, device=q.device)
    ws = None
    if num_splits and num_splits > 1:
        ws = tuple(t.fill_(float("nan")) for t in attention_workspace(M + 2, H, D, num_splits, q.device))
    res = decode_attention(q, kc, vc, lens, valid, out=out, num_splits=num_splits, workspace=ws, **kw)
    assert res.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "NaN/inf in the output (masked position read or row not written)"
    ref = decode_attention_reference(q, kc, vc, lens, valid, **kw)
    assert torch.isfinite(ref).all()
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return out
    # bf16: judge both against fp32 math on the upcast inputs.
    ref32 = decode_attention_reference(q.float(), kc.float(), vc.float(), lens, valid, **kw)
    err_k = (out.float() - ref32).abs().max().item()
    err_r = (ref.float() - ref32).abs().max().item()
    assert err_k <= 2 * err_r + 1e-5, f"kernel err {err_k} vs bf16 reference err {err_r}"
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    return out


CASES = [
    # M, H, KV, D, S_max, lens, pad, window, softcap, splits
    (3, 4, 4, 16, 97, [1, 97, 50], None, 0, 0.0, 1),              # group 1
    (3, 6, 2, 24, 97, [97, 1, 64], [0, 0, 30], 0, 0.0, 3),        # group 3, D=24 padded, left padding
    (3, 14, 2, 64, 300, [1, 300, 157], [0, 100, 20], 0, 0.0, 1),  # Qwen2.5 heads, 1 split
    (3, 14, 2, 64, 300, [1, 300, 157], [0, 100, 20], 0, 0.0, 4),  # same, 4 splits
    (2, 7, 1, 64, 300, [300, 200], [5, 0], 37, 30.0, 5),           # group 7, window + softcap
    (1, 7, 1, 64, 300, [250], [0], 37, 30.0, 1),                   # window + softcap, 1 split
    (2, 16, 8, 128, 97, [97, 40], [3, 0], 0, 0.0, 2),              # Qwen3 heads
    (3, 6, 2, 16, 97, [5, 2, 90], None, 0, 0.0, 7),                # more splits than positions
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}H{c[1]}KV{c[2]}D{c[3]}S{c[4]}w{c[7]}c{c[8]}s{c[9]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(case, dtype):
    M, H, KV, D, S, lens, pad, window, softcap, splits = case
    args = _make(M, H, KV, D, S, lens, dtype, seed=S + 7 * H + splits, pad=pad, window=window,
                 valid_bool=(splits % 2 == 1))
    _check(*args, splits, softcap=softcap, window=window)


@pytest.mark.parametrize("splits", [1, 3])
def test_row_without_valid_position_is_zero(splits):
    # Row 1 is all left padding; row 2 (kv_len 80, window 4 -> [76, 80)) has valid positions, but
    # only before its window (mask hole at [72, 80)).
    M, H, KV, D, S = 3, 6, 2, 16, 97
    q, kc, vc, lens, valid = _make(M, H, KV, D, S, [50, 20, 80], torch.float32, seed=3, pad=[0, 20, 0],
                                   window=4, holes=[(2, 72, 80)])
    out = _check(q, kc, vc, lens, valid, splits, window=4)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[0].abs().max() > 0


def test_splits_agree_and_default_path():
    # The split count must not change the result beyond fp32 reassociation; None picks a default.
    M, H, KV, D, S = 2, 6, 2, 32, 600
    q, kc, vc, lens, valid = _make(M, H, KV, D, S, [600, 333], torch.float32, seed=9, pad=[0, 10])
    outs = [decode_attention(q, kc, vc, lens, valid, scale=0.2, num_splits=n) for n in (None, 1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], decode_attention_reference(q, kc, vc, lens, valid, scale=0.2),
                               rtol=1e-5, atol=1e-5)


def test_attention_depends_on_inputs():
    # Guards against vacuous passes: output moves when one attended value moves, not when an
    # unattended one does.
    M, H, KV, D, S = 1, 6, 2, 16, 97
    q, kc, vc, lens, valid = _make(M, H, KV, D, S, [60], torch.float32, seed=4, B_extra=0)
    base = decode_attention(q, kc, vc, lens, valid, scale=0.25, num_splits=2)
    vc2 = vc.clone()
    vc2[0, 1, 59] += 1.0
    moved = decode_attention(q, kc, vc2, lens, valid, scale=0.25, num_splits=2)
    assert torch.equal(moved[0, :3 * D], base[0, :3 * D])       # kv head 0's query heads unchanged
    assert (moved[0, 3 * D:] - base[0, 3 * D:]).abs().min() > 0   # every dim of kv head 1's heads moved


def test_default_num_splits():
    assert default_num_splits(1, 2, 100, 132) == 1                   # short cache: no combine pass
    assert default_num_splits(1, 2, 300, 132) == 4
    assert default_num_splits(64, 8, 33000, 132) == 1                # 512 programs already fill the GPU
    for M, KV, S in [(1, 2, 4096), (1, 2, 33000), (16, 2, 4096), (1, 8, 33000), (4, 8, 1024)]:
        n = default_num_splits(M, KV, S, 132)
        assert n >= 2, (M, KV, S, n)
        assert S // n >= MIN_SPLIT_LEN
        assert M * KV * n >= 132 or n == S // MIN_SPLIT_LEN
    assert default_num_splits(1, 2, 4096, 132) == 64
    # batch 2-8: ~8 programs per SM (the 32k sweep's best at batch 8), capped by the cache length
    assert default_num_splits(8, 8, 33000, 132) == 17
    assert default_num_splits(8, 2, 33000, 132) == 66
    assert default_num_splits(8, 2, 1024, 132) == 16
