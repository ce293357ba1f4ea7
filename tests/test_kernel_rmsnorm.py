
import pytest
import torch

from helpers import BF16_FLOOR, BF16_RATIO, CAST_MATCH, FP32_TOL, KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY, relerr
from braid_backend.kernels import rmsnorm as rms_mod
from braid_backend.kernels.rmsnorm import rmsnorm, rmsnorm_reference

DEV = KERNEL_DEV
pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")

def check(got, ref32, stock, dtype, what):
    if dtype == torch.float32:
        err = relerr(got, ref32)
        assert err <= FP32_TOL, f"{what}: fp32 relerr {err:.3e}"
    else:
        err, err_stock = relerr(got, ref32), relerr(stock, ref32)
        assert err <= BF16_RATIO * err_stock + BF16_FLOOR, f"{what}: relerr {err:.3e} vs stock {err_stock:.3e}"
        dev = relerr(got, stock)  # same cast points as stock: only rare 1-ulp flips allowed
        assert dev <= CAST_MATCH * err_stock, f"{what}: deviates from stock cast points: {dev:.3e}"


def run(M, K, dtype, mode, offset, with_res, seed, x_pad=0, out_mode="poison"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K + x_pad, generator=g) * 3).to(dtype).to(DEV)[:, :K]
    w = (torch.randn(K, generator=g) * 0.5 + (0.0 if offset else 1.0)).to(dtype).to(DEV)
    res = (torch.randn(M, K, generator=g) * 3).to(dtype).to(DEV) if with_res else None
    kw = dict(eps=1e-6, norm_mode=mode, norm_offset=offset)
    x0 = x.clone()
    res0 = res.clone() if with_res else None

    if out_mode == "poison":
        out_buf = torch.full((M, K + 3), float("nan"), dtype=dtype, device=DEV)
        out = out_buf[:, :K]
    elif out_mode == "inplace_x":
        out_buf, out = None, x
    else:
        out_buf, out = None, None
    got = rmsnorm(x, w, residual=res, out=out, **kw)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any(), "unwritten output elements"
    if out_buf is not None:
        assert torch.isnan(out_buf[:, K:]).all(), "wrote past the row end"

    r32 = res0.float().clone() if with_res else None
    ref32 = rmsnorm_reference(x0.float(), w.float(), residual=r32, **kw)
    rs = res0.clone() if with_res else None
    stock = rmsnorm_reference(x0, w, residual=rs, **kw)
    check(got, ref32, stock, dtype, "out")
    if with_res:
        # the residual stream after the call: s = x + residual, rounded once to the model dtype
        check(res, r32, rs, dtype, "residual")
        if dtype != torch.float32:
            assert torch.equal(res, rs), "residual sum must round exactly like torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,offset", [(0, 0.0), (1, 1.0), (0, 0.5)], ids=["llama", "gemma", "offset"])
@pytest.mark.parametrize("with_res", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("M,K", [(1, 96), (3, 123), (17, 257)])
def test_rmsnorm(M, K, dtype, mode, offset, with_res):
    run(M, K, dtype, mode, offset, with_res, seed=M * 1000 + K, x_pad=2)


@pytest.mark.parametrize("with_res", [False, True])
def test_rmsnorm_inplace_x(with_res):
    run(3, 123, torch.bfloat16, 0, 0.0, with_res, seed=9, out_mode="inplace_x")


def test_rmsnorm_alloc_and_fp16():
    run(2, 100, torch.float16, 1, 1.0, True, seed=4, out_mode="alloc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_chunked_k(dtype, monkeypatch):
    """Rows longer than the largest block: the chunked two-pass loop (and its tail)."""
    monkeypatch.setattr(rms_mod, "MAX_BLOCK_K", 64)
    run(3, 200, dtype, 0, 0.0, True, seed=21)
    run(2, 129, dtype, 1, 1.0, False, seed=22)


def test_rmsnorm_out_is_residual_rejected():
    x = torch.randn(2, 32, device=DEV)
    r = torch.randn(2, 32, device=DEV)
    with pytest.raises(ValueError):
        rmsnorm(x, torch.ones(32, device=DEV), residual=r, out=r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,K,mode,offset", [(1, 96, 1, 1.0), (3, 123, 0, 0.0), (5, 4200, 1, 1.0)])
@pytest.mark.parametrize("into", ["poison", "add_to"])
def test_rmsnorm_add_to(M, K, mode, offset, dtype, into, monkeypatch):
    """Post-norm + residual add in one kernel (Gemma-2/3): out = rnd(add_to + rnd(norm(x))), into a
    poisoned buffer or in place into add_to (the residual stream); K=4200 takes the chunked loop."""
    monkeypatch.setattr(rms_mod, "MAX_BLOCK_K", 1024)
    g = torch.Generator().manual_seed(M * 7 + K)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype).to(DEV)
    w = (torch.randn(K, generator=g) * 0.5).to(dtype).to(DEV)
    acc = (torch.randn(M, K, generator=g) * 3).to(dtype).to(DEV)
    kw = dict(eps=1e-6, norm_mode=mode, norm_offset=offset)
    x0, acc0 = x.clone(), acc.clone()
    out = acc if into == "add_to" else torch.full_like(x, float("nan"))
    got = rmsnorm(x, w, add_to=acc, out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    assert torch.equal(x, x0), "x must not be written"
    if into == "poison":
        assert torch.equal(acc, acc0), "add_to must not be written unless it is out"
    ref32 = rmsnorm_reference(x0.float(), w.float(), add_to=acc0.float(), **kw)
    stock = (acc0.float() + rmsnorm_reference(x0, w, **kw).float()).to(dtype)   # HF's two steps
    check(got, ref32, stock, dtype, "add_to")
    if dtype != torch.float32:
        assert torch.equal(got, stock), "must round exactly like HF's norm then add"


def test_rmsnorm_add_to_with_residual_rejected():
    x = torch.zeros(2, 8, device=DEV)
    with pytest.raises(ValueError, match="cannot be combined"):
        rmsnorm(x, torch.ones(8, device=DEV), residual=x.clone(), add_to=x.clone())
