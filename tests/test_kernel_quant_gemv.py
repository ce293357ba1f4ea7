"""quant_gemv (kernels/quant_gemv.py) against its specification: fused_gemv_reference on the fp32-dequantised
weight. Every format and int4 group size, both paths, odd sizes, poisoned outputs, extreme scales, zero blocks,
the fused prologue/epilogues, split-K, the q|k|v / gate|up concatenation and the prefill helpers."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import BF16_FLOOR, BF16_RATIO, CAST_MATCH, FP32_TOL, KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY, relerr  # noqa: E402
from braid_backend.kernels.quant_gemv import (QuantWeight, concat_quant, dequantize, dequantize_into, pack_int4,  # noqa: E402
                                              quant_config, quant_gemv, quant_gemv_reference, quant_linear_prefill,
                                              unpack_int4)

DEV = KERNEL_DEV
pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")
FMTS = ["fp8_block", "fp8_channel", "fp8_tensor", "int4_g32", "int4_g64_asym", "int4_g128", "lut4_g64"]


def bnb_bytes(nib):
    """bitsandbytes' 4-bit layout of (N, K) nibbles as int32 words (N, K/8): element 2j in byte j's high nibble."""
    b = ((nib[:, 0::2] << 4) | nib[:, 1::2]).to(torch.uint8)
    return b.contiguous().view(torch.int32)


def make_qw(fmt, N, K, seed, scale_range=(1e-3, 1e-2), zero_rows=0, scale_dtype=torch.float32, lut_seed=0):
    """A random QuantWeight; fmt 'int4_g<g>[_asym]' or an fp8 format. zero_rows: rows of all-zero values."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (torch.tensor(v).log() for v in scale_range)

    def scales(*shape):
        return (torch.rand(*shape, generator=g) * (hi - lo) + lo).exp().to(scale_dtype)

    if fmt.startswith("lut4"):   # a random value table (NF4 / FP4 are particular ones), bnb byte order
        group = int(fmt.split("_")[1][1:])
        lut = torch.sort(torch.rand(16, generator=torch.Generator().manual_seed(lut_seed)) * 2 - 1).values
        nib = torch.randint(0, 16, (N, K), generator=g)
        if zero_rows:
            lut[7] = 0.0
            nib[:zero_rows] = 7
        return QuantWeight("int4", bnb_bytes(nib).to(DEV), scales(N, K // group).to(DEV), (N, K), group_size=group,
                           lut=lut.to(DEV))
    if fmt.startswith("int4"):
        group = int(fmt.split("_")[1][1:])
        nib = torch.randint(0, 16, (N, K), generator=g)
        zp = torch.randint(0, 16, (N, K // group), generator=g) if fmt.endswith("asym") else None
        if zero_rows:
            nib[:zero_rows] = 8 if zp is None else 0
            if zp is not None:
                zp[:zero_rows] = 0
        return QuantWeight("int4", pack_int4(nib).to(DEV), scales(N, K // group).to(DEV), (N, K), group_size=group,
                           zero_point=None if zp is None else pack_int4(zp, dim=0).to(DEV))
    data = (torch.randn(N, K, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    data[:zero_rows] = 0
    shape = {"fp8_block": (-(-N // 128), -(-K // 128)), "fp8_channel": (N, 1), "fp8_tensor": (1, 1)}[fmt]
    return QuantWeight(fmt, data.to(DEV), scales(*shape).to(DEV), (N, K))


CASES = {
    "plain": dict(),
    "qkv_norm0_bias": dict(norm=0, bias=True),
    "o_proj_inplace": dict(residual="inplace"),
    "gate_up_silu": dict(norm=0, act="silu_mul"),
    "gemma_gelu": dict(norm=1, norm_offset=1.0, act="gelu_tanh_mul"),
    "granite_scale_res": dict(bias=True, residual="separate", res_scale=0.22),
}


def run_case(M, n_out, K, dtype, fmt, opts, cfg, seed, qw=None, workspace=None, out_pad=3):
    g = torch.Generator().manual_seed(seed + 1)
    act = opts.get("act")
    N = 2 * n_out if act else n_out
    qw = qw or make_qw(fmt, N, K, seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)

    x = rnd(M, K + 5)[:, :K]   # row-strided x
    kw = dict(act=act)
    if opts.get("bias"):
        kw["bias"] = rnd(N)
    if "norm" in opts:
        kw.update(norm_weight=rnd(K, scale=0.5) + (0.0 if opts.get("norm_offset") else 1.0),
                  norm_mode=opts["norm"], norm_offset=opts.get("norm_offset", 0.0), eps=1e-6)
    if opts.get("residual"):
        kw["residual"] = rnd(M, n_out)
    if opts.get("res_scale") is not None:
        kw["res_scale"] = opts["res_scale"]
    ref_kw = dict(kw, residual=kw["residual"].clone()) if "residual" in kw else dict(kw)
    if opts.get("residual") == "inplace":
        out = kw["residual"]
        buf = None
    else:
        buf = torch.full((M, n_out + out_pad), float("nan"), dtype=dtype, device=DEV)   # poisoned
        out = buf[:, :n_out]
    got = quant_gemv(x, qw, out=out, config=cfg, workspace=workspace, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any(), "some output elements were not written"
    if buf is not None:
        assert torch.isnan(buf[:, n_out:]).all(), "wrote past the end of the out rows"
    if dtype == torch.float32:
        err = relerr(got, quant_gemv_reference(x, qw, **ref_kw))
        assert err <= FP32_TOL, f"fp32 relerr {err:.3e}"
    else:
        f32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ref_kw.items()}
        ref32 = quant_gemv_reference(x.float(), qw, **f32)
        stock = quant_gemv_reference(x, qw, **ref_kw)
        err, err_stock = relerr(got, ref32), relerr(stock, ref32)
        assert err <= BF16_RATIO * err_stock + BF16_FLOOR, f"relerr {err:.3e} vs stock {err_stock:.3e}"
        assert relerr(got, stock) <= CAST_MATCH * err_stock + 1e-7, "deviates from the reference cast points"
    return got


@pytest.mark.parametrize("path", ["gemv", "tc"])
@pytest.mark.parametrize("fmt", FMTS)
def test_formats(fmt, path):
    """Every format on both paths: odd M / N, K with a tail block (fp8) or several groups (int4), bf16."""
    K = 257 if fmt.startswith("fp8") else 256
    run_case(3, 37, K, torch.bfloat16, fmt, dict(norm=0, bias=True), {"path": path}, seed=len(fmt))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", ["fp8_block", "int4_g32", "lut4_g64"])
def test_fused_options(fmt, case):
    """Prologue / epilogue combinations on the gemv path (M 1) and the tc path (M 17, two row tiles)."""
    i = list(CASES).index(case)
    n_out = 128 if CASES[case].get("act") else 45    # fp8_block gate|up: gate rows on a scale-block row
    run_case(1, n_out, 128, torch.bfloat16, fmt, CASES[case], {"path": "gemv"}, seed=10 + i)
    run_case(17, n_out, 128, torch.bfloat16, fmt, CASES[case], {"path": "tc"}, seed=20 + i)


@pytest.mark.parametrize("fmt", ["fp8_channel", "int4_g64_asym", "lut4_g64"])
def test_fp32_and_fp16(fmt):
    run_case(2, 33, 192, torch.float32, fmt, dict(norm=0, act="silu_mul"), {"path": "gemv"}, seed=3)
    run_case(5, 33, 192, torch.float32, fmt, dict(residual="separate"), {"path": "tc", "BLOCK_K": 64}, seed=4)
    run_case(3, 20, 192, torch.float16, fmt, dict(bias=True, residual="inplace"), None, seed=5)


@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_tensor", "int4_g128", "lut4_g64"])
def test_extreme_scales_and_zero_blocks(fmt):
    """Scales from 1e-12 to 1e12 (fp32) and bf16 scales at their ends, plus all-zero rows / blocks."""
    for i, (rng, sdt) in enumerate([((1e-12, 1e12), torch.float32), ((1e-30, 1e-25), torch.float32),
                                    ((1e-6, 1e6), torch.bfloat16)]):
        qw = make_qw(fmt, 130, 256, seed=7 + i, scale_range=rng, zero_rows=128, scale_dtype=sdt)
        for path in ("gemv", "tc"):
            got = run_case(2, 130, 256, torch.float32, fmt, dict(), {"path": path}, seed=7, qw=qw)
            assert (got[:, :128] == 0).all(), "zero weights must give exact zeros"


def test_fp8_integer_decode_matches_hardware_cast():
    """FP8_HW off (integer bit decode, the interpreter default) and on give identical results, and the decode is
    exact for every finite e4m3 code (subnormals included)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = ~codes.view(torch.float8_e4m3fn).float().isnan()
    data = codes[finite].repeat(2).reshape(2, -1).view(torch.float8_e4m3fn).contiguous()   # (2, 254)
    qw = QuantWeight("fp8_tensor", data.to(DEV), torch.ones(1, 1, device=DEV), tuple(data.shape))
    eye = torch.eye(data.shape[1], device=DEV)[:16]
    for hw in (False, True):
        got = quant_gemv(eye, qw, config={"path": "gemv", "FP8_HW": hw})
        assert torch.equal(got.t(), data.float()[:, :16].to(DEV)), f"FP8_HW={hw}"
        dense = dequantize_into(qw, torch.empty(data.shape, device=DEV), fp8_hw=hw)
        assert torch.equal(dense, data.float().to(DEV))


def test_split_k_and_workspace():
    from braid_backend.kernels.fused_gemv import GemvWorkspace

    ws = GemvWorkspace(1 << 15, 64, DEV)
    ws.partials.fill_(float("nan"))
    for fmt, split in (("fp8_block", 3), ("int4_g32", 4)):
        cfg = {"path": "tc", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split}
        for seed in (1, 2):
            run_case(5, 40, 384, torch.bfloat16, fmt, dict(act="silu_mul", residual="inplace"), cfg, seed, workspace=ws)
            assert int(ws.counters.abs().sum()) == 0
    with pytest.raises(ValueError, match="workspace"):
        run_case(5, 40, 384, torch.bfloat16, "int4_g32", {}, dict(cfg, SPLIT_K=2), 1)


def test_concat_quant():
    """q|k|v and gate|up packing: the concatenation dequantises to the concatenated weights and runs fused."""
    for fmt, rows in (("fp8_block", (128, 256, 45)), ("fp8_channel", (33, 7)), ("int4_g64_asym", (13, 30, 21)),
                      ("int4_g32", (40, 40)), ("lut4_g64", (24, 40))):
        parts = [make_qw(fmt, n, 128, seed=i) for i, n in enumerate(rows)]
        cat = concat_quant(parts)
        assert torch.equal(dequantize(cat), torch.cat([dequantize(p) for p in parts]))
    t = [make_qw("fp8_tensor", n, 64, seed=i) for i, n in enumerate((24, 8))]
    cat = concat_quant(t)
    assert cat.format == "fp8_channel" and torch.equal(dequantize(cat), torch.cat([dequantize(p) for p in t]))
    with pytest.raises(ValueError, match="straddle"):
        concat_quant([make_qw("fp8_block", 100, 128, 0), make_qw("fp8_block", 28, 128, 1)])
    gu = concat_quant([make_qw("int4_g32", 40, 96, 5), make_qw("int4_g32", 40, 96, 6)])
    run_case(3, 40, 96, torch.bfloat16, None, dict(norm=0, act="silu_mul"), {"path": "gemv"}, 1, qw=gu)


def test_int4_packing_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                             reason="compressed-tensors not installed (pip install compressed-tensors)")
    q = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    assert torch.equal(pack_int4(q.to(torch.int32) + 8), ct.pack_to_int32(q, 4))
    assert torch.equal(pack_int4(q.to(torch.int32) + 8, dim=0), ct.pack_to_int32(q, 4, packed_dim=0))
    assert torch.equal(unpack_int4(ct.pack_to_int32(q, 4)).to(torch.int8) - 8, q)


def test_prefill_helpers():
    for fmt in ("fp8_block", "int4_g64_asym", "lut4_g64"):
        qw = make_qw(fmt, 70, 128, seed=9)
        x = torch.randn(2, 20, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEV)
        bias = torch.randn(70).to(torch.bfloat16).to(DEV)
        ref = quant_gemv_reference(x.reshape(40, 128), qw, bias=bias).reshape(2, 20, 70)
        got = quant_linear_prefill(x, qw, bias)
        assert got.shape == (2, 20, 70) and relerr(got, ref) <= 5e-3
        scratch = torch.full((70, 128), float("nan"), dtype=torch.bfloat16, device=DEV)
        assert torch.equal(dequantize_into(qw, scratch), dequantize(qw, torch.bfloat16))
        assert relerr(quant_linear_prefill(x, qw, bias, scratch=scratch), ref) <= 1e-2


def test_heuristics_and_errors(monkeypatch):
    import braid_backend.kernels.quant_gemv as qg

    monkeypatch.setattr(qg, "num_sms", lambda device: 132)
    qg.quant_config.cache_clear()
    dev, bf = torch.device("cuda", 0), torch.bfloat16
    try:
        i4 = quant_config(1, 6144, 4096, bf, False, dev, "int4", 128, None, True)
        assert i4["path"] == "gemv" and i4["BLOCK_N"] == 16
        assert quant_config(2, 6144, 4096, bf, False, dev, "int4", 128)["path"] == "tc"
        f8 = quant_config(1, 28672 // 2, 4096, bf, True, dev, "fp8_block", 128)
        assert f8["path"] == "gemv" and 128 % f8["BLOCK_N"] == 0
        tc = quant_config(16, 4096, 14336, bf, False, dev, "int4", 32)
        assert tc["BLOCK_K"] == 32 and tc["path"] == "tc"
    finally:
        qg.quant_config.cache_clear()
    qw = make_qw("fp8_block", 100, 64, 0)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="scale block"):
        quant_gemv(x, make_qw("fp8_block", 200, 64, 0), act="silu_mul", config={"path": "gemv"})
    with pytest.raises(ValueError, match="K=64"):
        quant_gemv(torch.randn(2, 64, device=DEV), make_qw("int4_g32", 10, 96, 0))
    with pytest.raises(ValueError, match="divide"):
        quant_gemv(x, qw, config={"path": "tc", "BLOCK_K": 256})
    with pytest.raises(ValueError, match="value table"):
        QuantWeight("int4", torch.zeros(4, 12, dtype=torch.int32), torch.ones(4, 2), (4, 96), group_size=48,
                    lut=torch.zeros(8))
    with pytest.raises(ValueError, match="value tables differ"):
        concat_quant([make_qw("lut4_g64", 8, 64, 0), make_qw("lut4_g64", 8, 64, 1, lut_seed=1)])
    with pytest.raises(ValueError, match="multiple of the group"):
        QuantWeight("int4", torch.zeros(4, 12, dtype=torch.int32), torch.ones(4, 2), (4, 96), group_size=64)


def test_lut4_dequantize_matches_bitsandbytes():
    """The int4 + value-table layout is bitsandbytes' own: Params4bit bytes + absmax give dequantize_4bit's weight."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    for qt in ("nf4", "fp4"):
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type=qt)
        qw = QuantWeight("int4", packed.view(-1).view(torch.int32).view(48, 16), st.absmax.view(48, 2), (48, 128),
                         group_size=64, lut=st.code.float())
        assert torch.allclose(dequantize(qw), F.dequantize_4bit(packed, st).float(), rtol=0, atol=1e-6), qt
