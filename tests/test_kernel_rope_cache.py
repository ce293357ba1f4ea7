
import pytest
import torch

from helpers import KERNEL_DEV, KERNELS_USABLE, KERNELS_WHY
from braid_backend.kernels.rope_cache import (
    rope_qkv_cache_write,
    rope_qkv_cache_write_reference,
)

DEV = KERNEL_DEV
pytestmark = pytest.mark.skipif(not KERNELS_USABLE, reason=KERNELS_WHY or "no triton")

MAX_POS = 64


def _make(M, H, KV, D, S_max, dtype, seed, pos_dtype=torch.int64, rope_dim=None, norm=None, B_extra=1):
    g = torch.Generator().manual_seed(seed)
    rd = D if rope_dim is None else rope_dim
    width = (H + 2 * KV) * D
    # Row stride wider than the row: the launcher must honour qkv.stride(0). Sliced after the move
    # (moving a non-dense view would make it contiguous).
    qkv_buf = (torch.randn(M, width + 7, generator=g) * 2).to(dtype)
    ang = torch.rand(MAX_POS, rd // 2, generator=g) * 6.3
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    positions = torch.randint(0, MAX_POS, (M,), generator=g).to(pos_dtype)
    positions[0] = MAX_POS - 1
    slots = torch.randperm(S_max, generator=g)[:M].to(torch.int32)
    slots[0] = S_max - 1
    if M > 1:
        slots[1] = 0
    k_cache = torch.randn(M + B_extra, KV, S_max, D, generator=g).to(dtype)
    v_cache = torch.randn(M + B_extra, KV, S_max, D, generator=g).to(dtype)
    # Poison the slots that must be written: any slot left unwritten stays NaN and fails the test.
    bi = torch.arange(M)[:, None]
    hi = torch.arange(KV)[None, :]
    k_cache[bi, hi, slots.long()[:, None]] = float("nan")
    v_cache[bi, hi, slots.long()[:, None]] = float("nan")
    q_out = torch.full((M, H, D), float("nan"), dtype=dtype)
    kw = dict(n_heads=H, n_kv_heads=KV, head_dim=D, rope_dim=rope_dim)
    if norm is not None:
        mode, offset = norm
        # Large weights like Qwen3's k_norm (up to ~100) amplify any cast-point mismatch.
        kw.update(q_norm_weight=(torch.randn(D, generator=g) * 3).to(dtype).to(DEV),
                  k_norm_weight=(torch.randn(D, generator=g) * 30).to(dtype).to(DEV),
                  norm_mode=mode, norm_offset=offset, eps=1e-6)
    qkv = qkv_buf.to(DEV)[:, :width]
    t = dict(cos=cos, sin=sin, positions=positions, slots=slots, k_cache=k_cache, v_cache=v_cache, q_out=q_out)
    return dict(qkv=qkv, **{k: v.to(DEV) for k, v in t.items()}), kw


def _clone(t):
    # keep strides (clone() would make the sliced qkv contiguous and hide the row-stride case)
    return {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
            for k, v in t.items()}


def _upcast(t, kw):
    t32 = {k: (v.float() if v.is_floating_point() else v.clone()) for k, v in t.items()}
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return t32, kw32


def _written_mask(M, KV, S_max, slots, B):
    dev = slots.device
    m = torch.zeros(B, KV, S_max, dtype=torch.bool, device=dev)
    m[torch.arange(M, device=dev)[:, None], torch.arange(KV, device=dev)[None, :], slots.long()[:, None]] = True
    return m


def _run_both(t, kw):
    a, b = _clone(t), _clone(t)
    rope_qkv_cache_write(**a, **kw)
    rope_qkv_cache_write_reference(**b, **kw)
    return a, b


CASES = [
    # M, H, KV, D, S_max, rope_dim, norm (mode, offset)
    (1, 4, 4, 16, 5, None, None),        # group 1
    (3, 6, 2, 24, 97, None, (0, 0.0)),   # group 3, head_dim 24 (padded block), Qwen3-style norm
    (3, 7, 1, 64, 33, 32, (1, 1.0)),     # group 7, partial rotary, Gemma-style norm with offset
    (2, 14, 2, 64, 300, None, None),     # Qwen2.5-0.5B heads
    (3, 16, 8, 128, 7, None, (0, 0.0)),  # Qwen3-0.6B heads
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}H{c[1]}KV{c[2]}D{c[3]}S{c[4]}r{c[5]}n{c[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(case, dtype):
    M, H, KV, D, S_max, rope_dim, norm = case
    t, kw = _make(M, H, KV, D, S_max, dtype, seed=sum(case[:5]), rope_dim=rope_dim, norm=norm,
                  pos_dtype=torch.int32 if M % 2 else torch.int64)
    a, b = _run_both(t, kw)
    written = _written_mask(M, KV, S_max, t["slots"], t["k_cache"].shape[0])

    for name in ("k_cache", "v_cache"):
        # Slots not addressed are bit-for-bit untouched; addressed ones are finite now.
        assert torch.equal(a[name][~written], t[name][~written]), f"{name}: unaddressed slots changed"
        assert torch.isfinite(a[name][written]).all(), f"{name}: addressed slot not written"
    assert torch.isfinite(a["q_out"]).all()
    # v is a copy, exactly.
    assert torch.equal(a["v_cache"][written], b["v_cache"][written])

    if dtype == torch.float32:
        for name in ("q_out", "k_cache"):
            torch.testing.assert_close(a[name], b[name], rtol=2e-5, atol=2e-5, equal_nan=True)
        return

    # bf16: same cast points as the torch reference (exact up to rare 1-ulp flips from the fp32
    # norm statistic's summation order) ...
    for name in ("q_out", "k_cache"):
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1 / 128, atol=1e-6, equal_nan=True)
    if norm is None:
        assert torch.equal(a["q_out"], b["q_out"])
        assert torch.equal(a["k_cache"][written], b["k_cache"][written])
    # ... and judged against fp32 math on the same (upcast) inputs: at most ~2x the bf16 reference's error.
    t32, kw32 = _upcast(t, kw)
    rope_qkv_cache_write_reference(**t32, **kw32)
    for name in ("q_out", "k_cache"):
        sel = (lambda x: x) if name == "q_out" else (lambda x: x[written])
        ref32 = sel(t32[name])
        err_k = (sel(a[name]).float() - ref32).abs().max().item()
        err_r = (sel(b[name]).float() - ref32).abs().max().item()
        assert err_k <= 2 * err_r + 1e-6, f"{name}: kernel err {err_k} vs bf16 reference err {err_r}"


def test_rope_is_not_identity_and_positions_matter():
    # Guards against a test that passes because nothing happens: roped q differs from raw q, and
    # changing one token's position changes only that token's output.
    t, kw = _make(3, 6, 2, 16, 9, torch.float32, seed=5)
    a, _ = _run_both(t, kw)
    raw_q = t["qkv"][:, :6 * 16].reshape(3, 6, 16)
    assert (a["q_out"] - raw_q).abs().max() > 1e-2
    t2 = _clone(t)
    t2["positions"][1] = (t2["positions"][1] + 5) % MAX_POS
    c, _ = _run_both(t2, kw)
    assert torch.equal(c["q_out"][0], a["q_out"][0]) and torch.equal(c["q_out"][2], a["q_out"][2])
    assert not torch.allclose(c["q_out"][1], a["q_out"][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_hf_apply_rotary_pos_emb(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    H, KV, D, M, S_max = 8, 2, 64, 3, 40
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=KV, head_dim=D,
                      max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    rot = LlamaRotaryEmbedding(cfg)
    max_pos = 256
    x = torch.zeros(1, dtype=dtype)
    # Tables built by HF on the CPU, then moved: the kernel and the HF formula read the same values.
    cos, sin = rot(x, torch.arange(max_pos)[None])  # (1, max_pos, D) in dtype
    cos, sin = cos[0].contiguous().to(DEV), sin[0].contiguous().to(DEV)

    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(M, (H + 2 * KV) * D, generator=g).to(dtype).to(DEV)
    positions = torch.tensor([0, 17, 255], device=DEV)
    slots = torch.tensor([3, 0, 39], dtype=torch.int64, device=DEV)
    k_cache = torch.zeros(M, KV, S_max, D, dtype=dtype, device=DEV)
    v_cache = torch.zeros(M, KV, S_max, D, dtype=dtype, device=DEV)
    q_out = torch.full((M, H, D), float("nan"), dtype=dtype, device=DEV)
    rope_qkv_cache_write(qkv, cos, sin, positions, slots, k_cache, v_cache, q_out,
                         n_heads=H, n_kv_heads=KV, head_dim=D)

    q = qkv[:, :H * D].reshape(M, H, 1, D)
    k = qkv[:, H * D:(H + KV) * D].reshape(M, KV, 1, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[positions][:, None], sin[positions][:, None])
    k_written = k_cache[torch.arange(M, device=DEV)[:, None], torch.arange(KV, device=DEV)[None, :], slots[:, None]]
    if dtype == torch.bfloat16:
        assert torch.equal(q_out, q_hf[:, :, 0]), "bf16 cast points differ from HF"
        assert torch.equal(k_written, k_hf[:, :, 0])
    else:
        torch.testing.assert_close(q_out, q_hf[:, :, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_written, k_hf[:, :, 0], rtol=1e-5, atol=1e-5)
