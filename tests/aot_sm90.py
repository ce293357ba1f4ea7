"""Compile the decode step's Triton kernels for sm_90 ahead of time (the GEMVs: fused_gemv and quant_gemv in every
format, both paths, split-K; MoE route / gate_up / down; attention split + combine with sinks, windows, softcap; rope +
cache write; rmsnorm),
without a GPU: `python tests/aot_sm90.py` prints one line per kernel variant, "OK" or "FAIL <innermost error>",
and exits 1 on any failure. Run by tests/test_kernel_compile.py in a process without TRITON_INTERPRET (under the
interpreter @triton.jit gives interpreted functions, which do not compile)."""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import braid_backend.kernels.decode_attention as da  # noqa: E402
import braid_backend.kernels.fused_gemv as fg  # noqa: E402
import braid_backend.kernels.moe as moe  # noqa: E402
import braid_backend.kernels.moe_route as mr  # noqa: E402
import braid_backend.kernels.quant_gemv as qg  # noqa: E402
import braid_backend.kernels.rmsnorm as rn  # noqa: E402
import braid_backend.kernels.rope_cache as rc  # noqa: E402

FLOATS = {"eps", "norm_offset", "res_scale", "limit", "alpha", "scale", "softcap"}
DENSE = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "nw_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16",
         "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
EPI = dict(HAS_BIAS=True, HAS_NORM=True, NORM_MODE=0, ACT=1, HAS_RES=True, HAS_SCALE=True, BF16_FIX=False, USE_PDL=True)
TC = dict(DOT_UPCAST=False, IEEE=False)
# format -> (weight, scale, zero/table pointer types, format constexprs)
QFMTS = {
    "fp8_block": ("*u8", "*fp32", "*fp32", dict(SMODE=2, BSN=128, BSK=128, ASYM=False, LUT=False)),
    "fp8_channel": ("*u8", "*bf16", "*bf16", dict(SMODE=1, BSN=1, BSK=1, ASYM=False, LUT=False)),
    "int4_asym": ("*i32", "*bf16", "*i32", dict(SMODE=3, BSN=1, BSK=64, ASYM=True, LUT=False)),
    "int4_lut": ("*i32", "*fp32", "*fp32", dict(SMODE=3, BSN=1, BSK=64, ASYM=False, LUT=True)),
}


def compile_one(fn, ptrs, consts) -> str:
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in FLOATS else "i32") for a in fn.arg_names}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        return "OK" if k.asm.get("cubin") else "FAIL no cubin"
    except Exception as e:   # the innermost cause says what is wrong
        while e.__cause__ is not None:
            e = e.__cause__
        return f"FAIL {type(e).__name__}: {str(e).splitlines()[-1][:300] if str(e) else ''}"


def cases():
    for split in (1, 3):
        yield f"fused_gemv tc split {split}", fg._tc_kernel, DENSE, dict(EPI, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64,
                                                                        SPLIT_K=split, NACC=2, **TC)
    yield "fused_gemv gemv", fg._gemv_kernel, DENSE, dict(EPI, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512)
    for name, (w, s, z, f) in QFMTS.items():
        ptrs = dict(DENSE, w_ptr=w, s_ptr=s, z_ptr=z)
        q = dict(EPI, FP8_HW=True, **f)
        bk = 64 if f["SMODE"] == 3 else 128
        yield f"quant_gemv gemv {name}", qg._gemv_kernel, ptrs, dict(q, BLOCK_M=1, BLOCK_N=16 if f["SMODE"] == 3 else 2,
                                                                     BLOCK_K=bk if f["SMODE"] != 3 else 32)
        for split in (1, 2):
            yield f"quant_gemv tc {name} split {split}", qg._tc_kernel, ptrs, dict(q, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64,
                                                                                   SPLIT_K=split, NACC=2, **TC)
        yield f"quant dequant {name}", qg._dequant_kernel, ptrs, dict(f, BLOCK_N=32, BLOCK_K=128, FP8_HW=True,
                                                                      BF16_FIX=False)
    idx = dict(ids_ptr="*i32", elist_ptr="*i32", cnt_ptr="*i32", wts_ptr="*fp32", sg_ptr="*fp32", y_ptr="*fp32",
               part_ptr="*fp32", b_ptr="*bf16")
    for tc in (False, True):
        yield f"moe gate_up tc={tc}", moe._gate_up_kernel, dict(idx, h_ptr="*bf16", w_ptr="*bf16", act_ptr="*bf16"), dict(
            TOPK=8, KP=8, ACT=1, INTERLEAVED=tc, HAS_BIAS=tc, TC=tc, BLOCK_M=16 if tc else 1, BLOCK_N=64 if tc else 2,
            BLOCK_K=64 if tc else 512, DOT_UPCAST=False, IEEE=False, BF16_FIX=False, USE_PDL=True)
        yield f"moe down tc={tc}", moe._down_kernel, dict(idx, act_ptr="*bf16", w_ptr="*bf16", sh_ptr="*bf16",
                                                          x_ptr="*bf16", out_ptr="*bf16"), dict(
            TOPK=4, KP=4, HAS_BIAS=tc, HAS_SHARED=not tc, HAS_RES=True, HAS_SCALE=tc, TC=tc, BLOCK_M=16 if tc else 1,
            BLOCK_N=64 if tc else 8, BLOCK_K=64 if tc else 512, SPLIT=2, FBM=16 if tc else 1, DOT_UPCAST=False,
            IEEE=False, BF16_FIX=False, USE_PDL=True)
    for route in (0, 1):
        yield f"moe route {route}", mr._route_kernel, dict(idx, h_ptr="*bf16", w_ptr="*bf16", b_ptr="*fp32",
                                                           sgw_ptr="*bf16"), dict(
            ROUTE=route, RENORM=True, ROUND_W=True, HAS_BIAS=bool(route), HAS_SG=not route, TOPK=8, KP=8, E_PAD=128,
            BLOCK_M=1, BLOCK_E=4, BLOCK_K=512, SPLIT=4, FBM=1, BF16_FIX=False, USE_PDL=True)
    att = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", kv_lens_ptr="*i32", valid_ptr="*i8", out_ptr="*bf16",
               wm_ptr="*fp32", wl_ptr="*fp32", wacc_ptr="*fp32", sink_ptr="*bf16")
    for sinks in (False, True):
        yield f"attention split sinks={sinks}", da._attn_split_kernel, att, dict(
            G=7, G_PAD=16, HEAD_DIM=64, BLOCK_D=64, BLOCK_S=64, NUM_SPLITS=4, HAS_SOFTCAP=not sinks, HAS_WINDOW=sinks,
            IEEE_DOT=False, FIX_BF16=False, USE_PDL=True, HAS_SINKS=sinks)
        yield f"attention combine sinks={sinks}", da._attn_combine_kernel, att, dict(
            HEAD_DIM=64, BLOCK_D=64, NUM_SPLITS=4, SPLITS_PAD=4, FIX_BF16=False, USE_PDL=True, HAS_SINKS=sinks)
    rope = dict(qkv_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", pos_ptr="*i64", slot_ptr="*i64", kc_ptr="*bf16",
                vc_ptr="*bf16", qo_ptr="*bf16", qn_ptr="*bf16", kn_ptr="*bf16")
    yield "rope + cache write, q/k norm", rc._rope_qkv_cache_kernel, rope, dict(
        N_HEADS=14, N_KV=2, HEAD_DIM=64, ROPE_DIM=64, BLOCK_D=64, HAS_QNORM=True, HAS_KNORM=True, NORM_MODE=0,
        FIX_BF16=False, USE_PDL=True)
    yield "rmsnorm", rn._rmsnorm_kernel, dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16"), dict(
        HAS_RES=True, NORM_MODE=0, BLOCK_K=1024, BF16_FIX=False, USE_PDL=True, POST_ADD=False)


if __name__ == "__main__":
    bad = 0
    for name, fn, ptrs, consts in cases():
        res = compile_one(fn, ptrs, consts)
        bad += not res.startswith("OK")
        print(f"{res[:4]:4} {name}{res[4:]}", flush=True)
    sys.exit(1 if bad else 0)
