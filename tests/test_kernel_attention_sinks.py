"""decode_attention with attention sinks (gpt-oss): one extra logit per head in every softmax denominator."""
import pytest
import torch

from braid_backend.kernels.decode_attention import attention_workspace, decode_attention, decode_attention_reference
from helpers import KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY

pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")


def _hf_sink_attention(q, k, v, lens, valid, scale, window, sinks):
    """gpt-oss's eager attention in fp32: logits | sink, softmax, drop the sink column, @ V."""
    M, H, D = q.shape
    G = H // k.shape[1]
    kk = k[:M].float().repeat_interleave(G, 1)
    vv = v[:M].float().repeat_interleave(G, 1)
    s = torch.einsum("mhd,mhsd->mhs", q.float(), kk) * scale
    pos = torch.arange(k.shape[2])[None]
    ok = (pos < lens[:, None]) & (valid[:M] != 0)
    if window:
        ok &= pos >= lens[:, None] - window
    s = s.masked_fill(~ok[:, None], float("-inf"))
    full = torch.cat([s, sinks.float()[None, :, None].expand(M, H, 1)], -1)
    p = torch.softmax(full, -1)[..., :-1]
    return torch.einsum("mhs,mhsd->mhd", p, vv.nan_to_num(0.0) * ok[:, None, :, None]).reshape(M, H * D)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sinks_match_gpt_oss_softmax(splits, dtype):
    g = torch.Generator().manual_seed(11 + splits)
    M, H, KV, D, S, window = 3, 6, 2, 24, 150, 37
    q = torch.randn(M, H, D, generator=g).to(dtype)
    k = (torch.randn(M + 1, KV, S, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(M + 1, KV, S, D, generator=g).to(dtype)
    lens = torch.tensor([1, 150, 90], dtype=torch.int32)
    valid = torch.ones(M + 1, S, dtype=torch.int8)
    valid[2, :10] = 0
    sinks = (torch.randn(H, generator=g) * 3).to(dtype)   # some heads' sink dominates, some vanish
    dev = KERNEL_DEV
    q, k, v, lens, valid, sinks = (t.to(dev) for t in (q, k, v, lens, valid, sinks))
    out = torch.full((M, H * D), float("nan"), dtype=dtype, device=dev)
    ws = tuple(t.fill_(float("nan")) for t in attention_workspace(M, H, D, splits, dev)) if splits > 1 else None
    for w in (0, window):
        decode_attention(q, k, v, lens, valid, scale=D ** -0.5, out=out, window=w, sinks=sinks,
                         num_splits=splits, workspace=ws)
        ref32 = _hf_sink_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), valid.cpu(), D ** -0.5, w, sinks.cpu())
        ref = decode_attention_reference(q.float(), k.float(), v.float(), lens, valid, scale=D ** -0.5, window=w,
                                         sinks=sinks.float())
        torch.testing.assert_close(ref.cpu(), ref32, rtol=1e-5, atol=1e-5)   # the reference is gpt-oss's math
        if dtype == torch.float32:
            torch.testing.assert_close(out.cpu(), ref32, rtol=1e-5, atol=1e-5)
        else:
            stock = decode_attention_reference(q, k, v, lens, valid, scale=D ** -0.5, window=w, sinks=sinks)
            err, err_ref = ((t.float().cpu() - ref32).norm() / ref32.norm() for t in (out, stock))
            assert err <= 2 * err_ref + 1e-4, (err, err_ref)
        plain = decode_attention(q, k, v, lens, valid, scale=D ** -0.5, window=w, num_splits=splits)
        assert not torch.allclose(plain.float(), out.float(), atol=1e-3), "sinks changed nothing"


def test_sinks_shape_is_checked():
    q = torch.randn(1, 4, 16, device=KERNEL_DEV)
    k = torch.randn(1, 2, 8, 16, device=KERNEL_DEV)
    lens = torch.ones(1, dtype=torch.int32, device=KERNEL_DEV)
    valid = torch.ones(1, 8, dtype=torch.int8, device=KERNEL_DEV)
    with pytest.raises(ValueError, match="sinks"):
        decode_attention(q, k, k, lens, valid, scale=0.25, sinks=torch.zeros(3, device=KERNEL_DEV))
