
import pytest
import torch

from helpers import BF16_FLOOR, BF16_RATIO, CAST_MATCH, FP32_TOL, KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY, relerr
from braid_backend.kernels.fused_gemv import default_config, fused_gemv, fused_gemv_reference

DEV = KERNEL_DEV
pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")

# name -> options. Each mirrors a real call site (comment) or a combination that could break.
CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "norm0": dict(norm=0),
    "norm1_gemma": dict(norm=1, norm_offset=1.0),
    "qkv_norm0_bias": dict(norm=0, bias=True),
    "residual": dict(residual="separate"),
    "o_proj_inplace": dict(residual="inplace"),
    "gate_up_silu": dict(norm=0, act="silu_mul"),
    "gemma_gelu": dict(norm=1, norm_offset=1.0, act="gelu_tanh_mul"),
    "bias_silu_inplace": dict(bias=True, act="silu_mul", residual="inplace"),
    "norm0_offset_bias_res": dict(norm=0, norm_offset=0.5, bias=True, residual="separate"),
    "gelu_bias_res": dict(act="gelu_tanh_mul", bias=True, residual="separate", norm=0),
    "granite_scale_inplace": dict(residual="inplace", res_scale=0.22),     # Granite o_proj / down
    "granite_bias_scale_res": dict(bias=True, residual="separate", res_scale=1.7, norm=0),
}
SHAPES = [(1, 97, 96), (3, 123, 123), (17, 64, 257)]  # (M, N_out, K)
# Interpreter time is per program: the forced-path matrix uses a wide BLOCK_N on the gemv path;
# the launcher's own choices are covered by test_heuristic_config below.
PATH_CFG = {"gemv": {"path": "gemv", "BLOCK_N": 16}, "tc": {"path": "tc"}}


def make_inputs(M, n_out, K, dtype, opts, seed, x_pad=0):
    g = torch.Generator().manual_seed(seed)
    act = opts.get("act")
    N = 2 * n_out if act else n_out

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)

    x_buf = rnd(M, K + x_pad)
    x = x_buf[:, :K]  # row stride K + x_pad when padded
    kw = dict(act=act)
    w = rnd(N, K, scale=K ** -0.5)
    if opts.get("bias"):
        kw["bias"] = rnd(N)
    if "norm" in opts:
        kw.update(norm_weight=rnd(K, scale=0.5) + (0.0 if opts.get("norm_offset") else 1.0),
                  norm_mode=opts["norm"], norm_offset=opts.get("norm_offset", 0.0), eps=1e-6)
    if opts.get("residual"):
        kw["residual"] = rnd(M, n_out)
    if opts.get("res_scale") is not None:
        kw["res_scale"] = opts["res_scale"]
    return x, w, kw


def to_f32(kw):
    return {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def run_case(M, n_out, K, dtype, opts, path, seed, x_pad=0, out_pad=0, extra_cfg=None, workspace=None):
    x, w, kw = make_inputs(M, n_out, K, dtype, opts, seed, x_pad)
    ref_kw = dict(kw)
    if kw.get("residual") is not None:
        ref_kw["residual"] = kw["residual"].clone()  # kernel may update it in place
    inplace = opts.get("residual") == "inplace"
    if inplace:
        out_buf = None
        out = kw["residual"]
    else:
        # Poisoned, wider buffer: every element of `out` must be written and nothing beyond it.
        out_buf = torch.full((M, n_out + out_pad), float("nan"), dtype=dtype, device=DEV)
        out = out_buf[:, :n_out]
    cfg = dict(extra_cfg or {})
    if path:
        cfg["path"] = path
    got = fused_gemv(x, w, out=out, config=cfg or None, workspace=workspace, **kw)
    assert got.data_ptr() == out.data_ptr(), "must write into the given out"
    assert not torch.isnan(got).any(), "some output elements were not written"
    if out_buf is not None and out_pad:
        assert torch.isnan(out_buf[:, n_out:]).all(), "wrote past the end of the out rows"
    if inplace:
        assert got.data_ptr() == kw["residual"].data_ptr()

    if dtype == torch.float32:
        ref = fused_gemv_reference(x, w, **ref_kw)
        err = relerr(got, ref)
        assert err <= FP32_TOL, f"fp32 relerr {err:.3e}"
    else:
        ref32 = fused_gemv_reference(x.float(), w.float(), **to_f32(ref_kw))
        stock = fused_gemv_reference(x, w, **ref_kw)  # the stock bf16 path's cast points
        err, err_stock = relerr(got, ref32), relerr(stock, ref32)
        assert err <= BF16_RATIO * err_stock + BF16_FLOOR, f"{dtype} relerr {err:.3e} vs stock {err_stock:.3e}"
        # Stronger: same cast points as the stock path, so only rare 1-ulp flips (fp32 summation
        # order) may separate them. An extra or missing rounding anywhere shows up here.
        dev = relerr(got, stock)
        assert dev <= CAST_MATCH * err_stock, f"deviates from stock cast points: {dev:.3e} vs {err_stock:.3e}"
    return got


@pytest.mark.parametrize("path", list(PATH_CFG))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_gemv(case, dtype, path):
    opts = CASES[case]
    i = list(CASES).index(case)
    M, n_out, K = SHAPES[i % len(SHAPES)]
    run_case(M, n_out, K, dtype, opts, None, seed=1000 * i + 7, out_pad=3, extra_cfg=PATH_CFG[path])


@pytest.mark.parametrize("M,case", [(1, "qkv_norm0_bias"), (2, "gate_up_silu"), (3, "o_proj_inplace"),
                                    (17, "gemma_gelu")])
def test_heuristic_config(M, case):
    """No config: the launcher's own path / block choice (gemv for M <= 8, tc above)."""
    run_case(M, 123, 96, torch.bfloat16, CASES[case], None, seed=M + 100, out_pad=2)


@pytest.mark.parametrize("path", ["gemv", "tc"])
@pytest.mark.parametrize("M,n_out,K", [(1, 123, 257), (3, 97, 96), (17, 123, 123), (33, 40, 64), (70, 33, 48)])
def test_shapes_strided(M, n_out, K, path):
    """Odd sizes with row-strided x and out; several M / N / K blocks and their tails."""
    cfg = {"BLOCK_K": 32} if path == "tc" else {"BLOCK_K": 64, "BLOCK_N": 8}
    run_case(M, n_out, K, torch.bfloat16, dict(norm=0, bias=True, act="silu_mul"), path,
             seed=M * 31 + K, x_pad=5, out_pad=7, extra_cfg=cfg)


@pytest.mark.parametrize("path", ["gemv", "tc"])
def test_fp16(path):
    run_case(3, 97, 123, torch.float16, dict(norm=0, bias=True, residual="inplace"), path, seed=5)


def test_qwen_qkv_shape_heuristic():
    """A real decode K (Qwen2.5-0.5B hidden 896; N cut to keep the interpreter fast), batch 1,
    through the launcher's own choice: one 1024-wide K block with a masked tail."""
    run_case(1, 256, 896, torch.bfloat16, dict(norm=0, bias=True), None, seed=11)


def test_wide_tc_tiles():
    """tc path with BLOCK_M=64 (M padded) and a multi-iteration K loop."""
    run_case(5, 70, 200, torch.float32, dict(norm=1, norm_offset=1.0, act="gelu_tanh_mul"), "tc",
             seed=3, extra_cfg={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64})


@pytest.mark.parametrize("cfg,opts", [
    ({"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}, dict(norm=0, act="silu_mul")),
    ({"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}, dict(norm=0, bias=True)),
    ({"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}, dict(residual="inplace")),
], ids=["gate_up", "qkv", "down"])
def test_big_model_tc_tiles(cfg, opts):
    """The 7-9B batch 3-16 tiles (default_config's big-projection branch) on odd sizes: N and K tails,
    several K iterations, M padded to 16."""
    run_case(5, 150, 600, torch.bfloat16, opts, "tc", seed=21, out_pad=3, extra_cfg=dict(cfg, BLOCK_M=16))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_gelu_tanh_large_inputs():
    """GELU-tanh is computed through exp: check saturation regions (|g| large) stay finite/exact."""
    M, n_out, K = 2, 64, 32
    x = torch.linspace(-1, 1, M * K).reshape(M, K).to(DEV)
    w = torch.randn(2 * n_out, K, generator=torch.Generator().manual_seed(0)).to(DEV) * 4
    for act in ("gelu_tanh_mul", "silu_mul"):
        got = fused_gemv(x, w, act=act)
        ref = fused_gemv_reference(x, w, act=act)
        assert torch.isfinite(got).all()
        assert relerr(got, ref) <= FP32_TOL


def test_heuristic_choices(monkeypatch):
    # the GPU heuristic, checked anywhere: pretend an H100's 132 SMs
    import braid_backend.kernels.fused_gemv as fg

    monkeypatch.setattr(fg, "num_sms", lambda device: 132)
    default_config.cache_clear()
    dev = torch.device("cuda", 0)
    bf = torch.bfloat16
    for n_out, K, act in [(1152, 896, False), (896, 896, False), (4864, 896, True), (896, 4864, False),
                          (151936, 896, False)]:
        c1 = default_config(1, n_out, K, bf, act, dev)
        assert c1["path"] == "gemv" and c1["BLOCK_M"] == 1
        assert 2 <= c1["BLOCK_N"] <= 32 and c1["BLOCK_K"] <= 1024
        c64 = default_config(64, n_out, K, bf, act, dev)
        assert c64["path"] == "tc" and min(c64["BLOCK_M"], c64["BLOCK_N"], c64["BLOCK_K"]) >= 16
    assert default_config(1, 896, 896, bf, False, dev)["BLOCK_N"] == 2  # measured best on the H100
    assert default_config(1, 151936, 896, bf, False, dev)["BLOCK_N"] == 4
    assert default_config(1, 4864, 896, bf, True, dev)["num_stages"] == 3
    qkv16 = default_config(16, 1152, 896, bf, False, dev, None, True)
    assert (qkv16["BLOCK_N"], qkv16["BLOCK_K"], qkv16["num_warps"]) == (32, 256, 8)
    assert default_config(16, 896, 896, bf, False, dev)["BLOCK_N"] == 16   # o_proj: no norm prologue
    # batch 3-8 on the H100: tensor-core tiles beat the GEMV path (1.17 vs 1.90 ms/step at batch 8)
    assert [default_config(m, 4864, 896, bf, True, dev)["path"] for m in (1, 2, 3, 8)] == ["gemv", "gemv", "tc", "tc"]
    # 7-9B projections at batch 3-16 get deeper K tiles (H100 sweep, Llama-3.1-8B shapes); lm_heads and
    # the small models' projections keep the tiles measured for them
    assert default_config(4, 14336, 4096, bf, True, dev)["BLOCK_N"] == 128
    assert default_config(16, 6144, 4096, bf, False, dev, None, True)["BLOCK_K"] == 256
    assert default_config(8, 4096, 14336, bf, False, dev)[("BLOCK_N")] == 32
    assert default_config(4, 128256, 4096, bf, False, dev, None, True)["BLOCK_K"] == 128
    assert default_config(32, 14336, 4096, bf, True, dev)["BLOCK_M"] == 32
    assert default_config(2, 14336, 4096, bf, True, dev)["path"] == "tc"       # 8B batch 2: tiles too
    assert default_config(2, 8192, 2048, bf, True, dev)["path"] == "gemv"     # 1B batch 2: unchanged
    assert default_config(1, 14336, 4096, bf, True, dev)["path"] == "gemv"
    # 7-9B batch 1 (H100 sweep, Llama-3.1-8B): down on 2048-deep K tiles with 8 warps, o_proj on 512
    down1 = default_config(1, 4096, 14336, bf, False, dev)
    assert (down1["BLOCK_K"], down1["num_warps"], down1["num_stages"]) == (2048, 8, 2)
    o1 = default_config(1, 4096, 4096, bf, False, dev)
    assert (o1["BLOCK_K"], o1["num_stages"]) == (512, 1)
    assert default_config(1, 6144, 4096, bf, False, dev, None, True)["BLOCK_K"] == 1024    # qkv: unchanged
    assert default_config(1, 896, 4864, bf, False, dev)["BLOCK_K"] == 1024                 # small models too
    assert default_config(1, 2048, 8192, bf, False, dev)["num_warps"] == 4
    default_config.cache_clear()
    # the interpreter gets few big programs (CPU test speed), still a valid tiling
    cpu = default_config(1, 307, 96, torch.float32, False, torch.device("cpu"))
    assert cpu["BLOCK_N"] == 128 and cpu["BLOCK_K"] == 128
    assert default_config(8, 307, 96, torch.float32, False, torch.device("cpu"))["path"] == "gemv"


def test_bad_args():
    x = torch.randn(2, 16, device=DEV)
    w = torch.randn(10, 16, device=DEV)
    with pytest.raises(ValueError):
        fused_gemv(x, w, act="relu")
    with pytest.raises(ValueError):
        fused_gemv(x, torch.randn(9, 16, device=DEV), act="silu_mul")
    with pytest.raises(ValueError):
        fused_gemv(x, w, out=torch.empty(2, 10, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError):
        fused_gemv(x, w, config={"path": "tc", "BLOCK_N": 8})
    with pytest.raises(ValueError, match="res_scale"):
        fused_gemv(x, w, res_scale=0.5)


# Split-K (tc path): partial sums in a workspace, the last program of a tile adds them in split order.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,n_out,K,split,opts", [
    (5, 45, 300, 3, dict(residual="inplace")),                   # down / o_proj: K tail in the last split
    (3, 37, 257, 4, dict(norm=0, bias=True)),                    # qkv: norm prologue over the whole row
    (17, 40, 200, 2, dict(norm=1, norm_offset=1.0, act="gelu_tanh_mul")),   # two M blocks, act partials
    (4, 33, 96, 8, dict(act="silu_mul", bias=True, residual="separate", res_scale=0.5)),  # empty splits
])
def test_split_k(M, n_out, K, split, opts, dtype):
    from braid_backend.kernels.fused_gemv import GemvWorkspace

    ws = GemvWorkspace(4096 * 16, 64, DEV)
    ws.partials.fill_(float("nan"))   # poisoned: every partial read must have been written first
    cfg = {"path": "tc", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split}
    for seed in (1, 2):   # the second launch reuses the counters the first one left at zero
        run_case(M, n_out, K, dtype, opts, "tc", seed=seed * 97 + split, out_pad=3, extra_cfg=cfg, workspace=ws)
        assert int(ws.counters.abs().sum()) == 0, "arrival counters not reset"


def test_split_k_deterministic_and_equal_to_one_program_per_tile_within_fp32_order():
    from braid_backend.kernels.fused_gemv import GemvWorkspace

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 250, generator=g).to(DEV)
    w = (torch.randn(40, 250, generator=g) * 0.1).to(DEV)
    ws = GemvWorkspace(1 << 16, 64, DEV)
    cfg = {"path": "tc", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}
    a = fused_gemv(x, w, config=dict(cfg, SPLIT_K=3), workspace=ws)
    b = fused_gemv(x, w, config=dict(cfg, SPLIT_K=3), workspace=ws)
    c = fused_gemv(x, w, config=dict(cfg, SPLIT_K=1))
    assert torch.equal(a, b)
    assert relerr(a, c) <= FP32_TOL


def test_split_k_errors():
    from braid_backend.kernels.fused_gemv import GemvWorkspace

    x = torch.randn(3, 64, device=DEV)
    w = torch.randn(40, 64, device=DEV)
    cfg = {"path": "tc", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}
    with pytest.raises(ValueError, match="workspace"):
        fused_gemv(x, w, config=cfg)
    with pytest.raises(ValueError, match="too small"):
        fused_gemv(x, w, config=cfg, workspace=GemvWorkspace(16, 1, DEV))
    with pytest.raises(ValueError, match="tc path only"):
        fused_gemv(x, w, config={"path": "gemv", "SPLIT_K": 2}, workspace=GemvWorkspace(1 << 12, 8, DEV))


def test_split_k_heuristic(monkeypatch):
    """H100 (132 SMs): the small models' batch 3-16 tiles split K to reach ~2 programs per SM; the
    7-9B tiles, lm_heads, the GEMV path and Tuning(split_k=False) do not; the workspace covers every call."""
    import braid_backend.kernels.fused_gemv as fg

    monkeypatch.setattr(fg, "num_sms", lambda device: 132)
    default_config.cache_clear()
    dev, bf = torch.device("cuda", 0), torch.bfloat16
    try:
        down8 = default_config(8, 896, 4864, bf, False, dev)
        assert down8["path"] == "tc" and down8["SPLIT_K"] == 8          # 56 tiles -> 448 programs
        assert default_config(8, 896, 896, bf, False, dev)["SPLIT_K"] == 1   # o_proj: K 896 too short (swept)
        assert default_config(16, 1152, 896, bf, False, dev, None, True)["SPLIT_K"] == 2   # qkv (32 x 256 tiles)
        assert default_config(8, 151936, 896, bf, False, dev, None, True)["SPLIT_K"] == 1   # lm_head
        assert "SPLIT_K" not in default_config(8, 4096, 14336, bf, False, dev)               # 8B tiles as measured
        assert "SPLIT_K" not in default_config(1, 896, 4864, bf, False, dev)                 # GEMV path
        made = []
        monkeypatch.setattr(fg, "GemvWorkspace", lambda elems, tiles, device: made.append((elems, tiles)) or made)
        assert fg.gemv_workspace([(8, 896, 4864, False, False), (8, 4864, 896, True, True)], bf, dev) is made
        assert made == [(56 * 8 * 16 * 16, 56)]   # down's split; gate_up (152 tiles) does not split
        assert fg.gemv_workspace([(1, 896, 4864, False, False)], bf, dev) is None
        # an empty projection (an all-MoE model's dense MLP, 0 outputs) has no tiles to split
        assert default_config(4, 0, 2048, bf, True, dev, None, True)["SPLIT_K"] == 1
        assert default_config(8, 896, 4864, bf, False, dev, split_k=False)["SPLIT_K"] == 1   # Tuning(split_k=False)
    finally:
        default_config.cache_clear()


@pytest.mark.parametrize("cfg", [dict(BLOCK_N=4, BLOCK_K=2048, num_warps=8, num_stages=2),
                                 dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, num_stages=1)], ids=["down", "o_proj"])
def test_big_model_batch1_gemv_tiles(cfg):
    """The 7-9B batch-1 GEMV tiles (default_config) on odd sizes: an N tail and a short last K tile."""
    run_case(1, 37, 4500, torch.bfloat16, dict(residual="inplace"), "gemv", seed=33, extra_cfg=cfg)
