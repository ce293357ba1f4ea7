"""One decode-step transformer layer (llama-like) as ONE persistent CUDA-C kernel, compiled with CuPy
(NVRTC) and launched on torch's current stream, so torch's CUDA-graph capture records it like a
Triton launch. The CUDA source is cupy_layer.cu (phases, barriers and their reset are described
there); `layer_reference` below is what one launch computes, built from the Triton kernels' own
torch references (same cast points).

Launch protocol:
  spec = LayerSpec(...)                      model constants (-> #defines: one compiled module each)
  kern = LayerKernel(spec, M, device)        compiles (first use; CuPy caches the binary on disk)
  ws   = kern.workspace(S_max)               barrier counters + attention partials, allocated once,
                                             outside any capture; the kernel resets its counters
  kern.launch(ws, x, weights..., cache...)   on torch.cuda.current_stream()
  kern.check(ws)                             host sync: did a barrier time out? (first use only)

Diagnostics: LayerKernel(spec, M, device, phase_times=True) compiles the BRAID_PHASE_TIMES variant
(one extra kernel argument, a (grid, PT_SLOTS) int64 buffer of %globaltimer stamps allocated once);
after a launch, kern.phase_stats() gives per-phase work / barrier-wait times in microseconds.

No transformers import here (kernels layer). CuPy is optional: `cupy_available` says why not.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _common
from .decode_attention import decode_attention_reference
from .fused_gemv import fused_gemv_reference
from .rope_cache import rope_qkv_cache_write_reference

WARPS = 16               # 512 threads per CTA, one CTA per SM
MAX_ROWS = 8             # batch buckets above this run the Triton layers
HEAD_DIMS = (64, 128)
MAX_GROUP = 16           # query heads per kv head the attention phase keeps in registers
SMEM_LIMIT = 227 * 1024 - 1024  # H100 per-block shared memory opt-in maximum, less the kernel's static part
BAR_WORDS = 8            # grid-barrier words before the per-(m, kv head) split counters
BAR_ERR = 6              # word set by a barrier that timed out (see cupy_layer.cu)
NVRTC_OPTIONS = ("-std=c++17",)
NUM_BARRIERS = 4
PT_SLOTS = 2 * NUM_BARRIERS + 2   # entry, (arrival, release) per barrier, exit (see cupy_layer.cu)
PHASES = ("P1 norm+qkv+rope+cache", "P2 attention", "P3 o_proj+res", "P4 norm+gate_up+act", "P5 down+res")
SOURCE_PATH = Path(__file__).with_name("cupy_layer.cu")


@functools.lru_cache(maxsize=1)
def _cupy():
    import cupy  # noqa: F401  (optional dependency)

    return cupy


def cupy_available(device: torch.device) -> tuple[bool, str]:
    """Whether the CuPy backend can run on this device, and if not, why (never raises)."""
    try:
        cupy = _cupy()
    except Exception as e:  # ImportError, or a broken install raising anything else
        return False, f"cupy is not importable ({type(e).__name__}: {e}); pip install -e '.[cupy-cuda13]' " \
                      "(or '.[cupy-cuda12]') from a checkout, to match torch's CUDA"
    if device.type != "cuda":
        return False, f"device is {device.type}, the CuPy kernel needs a CUDA device"
    if _common.interpret_mode():
        return False, "TRITON_INTERPRET=1 (CPU interpreter run)"
    try:
        cu_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception as e:
        return False, f"cupy cannot query its CUDA runtime ({type(e).__name__}: {e})"
    torch_cuda = torch.version.cuda
    if torch_cuda is None or int(torch_cuda.split(".")[0]) != cu_major:
        return False, f"cupy is built for CUDA {cu_major}, torch for CUDA {torch_cuda}: install the matching " \
                      "cupy-cuda1Nx wheel"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False, "the CuPy kernel needs compute capability 8.0+ (bf16 conversions)"
    return True, ""


def in_dry_run() -> bool:
    """True inside runtime/precompile.py's dry run on this thread (kernels/_common.launch's switch)."""
    return _common._DRY_THREAD is not None and _common._DRY_THREAD == threading.get_ident()


@dataclass(frozen=True)
class LayerSpec:
    """The model constants one compiled module is specialised for."""
    dtype: torch.dtype
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    bias_qkv: bool
    bias_o: bool
    bias_gu: bool
    bias_down: bool

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def check(self) -> str | None:
        """Why this layer shape cannot run the kernel (None: it can)."""
        if self.dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {self.dtype} (the CuPy kernel does bf16/fp16)"
        if self.head_dim not in HEAD_DIMS:
            return f"head_dim {self.head_dim} (the CuPy kernel does {HEAD_DIMS})"
        if self.n_heads % self.n_kv_heads or self.group > MAX_GROUP:
            return f"{self.n_heads} query heads over {self.n_kv_heads} kv heads (group <= {MAX_GROUP})"
        for name, v in (("hidden", self.hidden), ("intermediate", self.intermediate)):
            if v % 8:
                return f"{name} size {v} is not a multiple of 8 (16-byte loads)"
        return None

    def smem_bytes(self, M: int) -> int:
        """Dynamic shared memory of a launch with M rows: the larger of the GEMV input vectors (M rows of
        the widest input, in the dtype) and the attention phase's buffers."""
        hd, g = self.head_dim, self.group
        act = M * max(self.hidden, self.n_heads * hd, self.intermediate) * 2
        attn = g * hd * 4 + WARPS * g * 32 * 4 + max(WARPS * 32 * (hd + 8) * 2, WARPS * g * (hd + 2) * 4)
        return max(act, attn)

    def bucket_reason(self, M: int) -> str | None:
        """Why batch bucket M runs the Triton layers (None: the CuPy kernel takes it)."""
        if M > MAX_ROWS:
            return f"batch bucket {M} > {MAX_ROWS}"
        if self.smem_bytes(M) > SMEM_LIMIT:
            return f"batch bucket {M} needs {self.smem_bytes(M)} B of shared memory (> {SMEM_LIMIT})"
        return None

    def defines(self, M: int) -> dict:
        return dict(DT_BF16=int(self.dtype == torch.bfloat16), MROWS=M, H=self.hidden, I=self.intermediate,
                    NH=self.n_heads, NKV=self.n_kv_heads, HD=self.head_dim, WARPS=WARPS,
                    HAS_BIAS_QKV=int(self.bias_qkv), HAS_BIAS_O=int(self.bias_o), HAS_BIAS_GU=int(self.bias_gu),
                    HAS_BIAS_D=int(self.bias_down))


def kernel_source(defines: dict) -> str:
    """The exact text handed to NVRTC (and to nvcc by the compile test): #defines + cupy_layer.cu."""
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return head + SOURCE_PATH.read_text()


def num_splits(M: int, n_kv: int, s_max: int, grid: int) -> int:
    """KV splits per (row, kv head): enough attention items for every CTA, none shorter than 128
    positions (a warp takes 32 per round), at most 32 (each combine reads every split). Shape-only."""
    want = -(-grid // max(1, M * n_kv))
    return max(1, min(want, -(-s_max // 128), 32))


class LayerWorkspace:
    """Per StepBuffers: barrier/split counters (zeroed once here, then reset by the kernel itself) and
    the attention partials. Allocate outside any capture."""

    def __init__(self, spec: LayerSpec, M: int, s_max: int, grid: int, device):
        self.num_splits = num_splits(M, spec.n_kv_heads, s_max, grid)
        self.s_max = s_max
        self.bar = torch.zeros(BAR_WORDS + M * spec.n_kv_heads, dtype=torch.int32, device=device)
        self.ml = torch.zeros(M, spec.n_heads, self.num_splits, 2, dtype=torch.float32, device=device)
        self.acc = torch.zeros(M, spec.n_heads, self.num_splits, spec.head_dim, dtype=torch.float32, device=device)


class LayerKernel:
    """The compiled kernel for one LayerSpec and bucket M on one device."""

    def __init__(self, spec: LayerSpec, M: int, device: torch.device, phase_times: bool = False):
        why = spec.check() or spec.bucket_reason(M)
        if why:
            raise ValueError(f"CuPy layer kernel: {why}")
        cupy = _cupy()
        self.spec, self.M, self.device = spec, M, device
        self.dev_index = device.index if device.index is not None else torch.cuda.current_device()
        self.smem = spec.smem_bytes(M)
        self.phase_times = phase_times
        defines = dict(spec.defines(M), BRAID_PHASE_TIMES=1) if phase_times else spec.defines(M)
        with cupy.cuda.Device(self.dev_index):
            mod = cupy.RawModule(code=kernel_source(defines), options=NVRTC_OPTIONS)
            self.fn = mod.get_function("braid_layer")
            self.fn.max_dynamic_shared_size_bytes = self.smem
            sms = torch.cuda.get_device_properties(self.dev_index).multi_processor_count
            per_sm = _blocks_per_sm(cupy, self.fn, WARPS * 32, self.smem)
        if per_sm < 1:
            raise RuntimeError(f"CuPy layer kernel cannot be resident ({self.smem} B shared memory, "
                               f"{WARPS * 32} threads)")
        self.grid = sms          # one CTA per SM: co-resident by construction (checked above)
        self._streams: dict = {}
        # globaltimer stamps (ns, < 2^63: int64 holds them), written by the BRAID_PHASE_TIMES variant only
        self.times = torch.zeros(self.grid, PT_SLOTS, dtype=torch.int64, device=device) if phase_times else None

    def workspace(self, s_max: int) -> LayerWorkspace:
        return LayerWorkspace(self.spec, self.M, s_max, self.grid, self.device)

    def _stream(self):
        ptr = torch.cuda.current_stream(self.device).cuda_stream
        st = self._streams.get(ptr)
        if st is None:
            st = self._streams[ptr] = _cupy().cuda.ExternalStream(ptr, self.dev_index)
        return st

    def launch(self, ws: LayerWorkspace, x, w_qkv, b_qkv, nw_attn, eps_attn, w_o, b_o, w_gu, b_gu, nw_mlp,
               eps_mlp, w_down, b_down, next_w_qkv, scale, cos, sin, pos, slots, kv_lens, valid, k_cache,
               v_cache, q_buf, attn, act) -> None:
        """One layer for rows [0, M) of x, in place (and k/v at slots[m] of the cache layer)."""
        import numpy as np

        cupy = _cupy()
        _check(self, ws, x, w_qkv, w_o, w_gu, w_down, cos, sin, k_cache, v_cache, valid, q_buf, attn, act)

        def ptr(t):
            return np.uint64(0 if t is None else t.data_ptr())

        args = (ptr(x), ptr(w_qkv), ptr(b_qkv), ptr(nw_attn), ptr(w_o), ptr(b_o), ptr(w_gu), ptr(b_gu),
                ptr(nw_mlp), ptr(w_down), ptr(b_down), ptr(next_w_qkv),
                np.float32(eps_attn), np.float32(eps_mlp), np.float32(scale),
                ptr(cos), ptr(sin), np.int64(cos.stride(0)), ptr(pos), ptr(slots), ptr(kv_lens),
                ptr(valid), np.int64(valid.stride(0)), ptr(k_cache), ptr(v_cache), np.int64(k_cache.shape[2]),
                ptr(q_buf), ptr(attn), ptr(act), ptr(ws.ml), ptr(ws.acc), np.int32(ws.num_splits), ptr(ws.bar))
        if self.phase_times:
            args += (ptr(self.times),)
        with cupy.cuda.Device(self.dev_index), self._stream():
            self.fn((self.grid,), (WARPS * 32,), args, shared_mem=self.smem)

    def check(self, ws: LayerWorkspace) -> None:
        """Host sync: raise if a grid barrier timed out (CTAs not co-resident); clears the flags."""
        torch.cuda.current_stream(self.device).synchronize()
        bar = ws.bar.cpu()
        if int(bar[BAR_ERR]) != 0 or int(bar[:5].abs().sum()) != 0:
            ws.bar.zero_()
            raise RuntimeError(f"CuPy layer kernel: grid barrier failed (counters {bar[:8].tolist()})")


    def phase_stats(self) -> dict:
        """Host sync; per-phase timing of the last launch (phase_times=True only): see phase_stats()."""
        if not self.phase_times:
            raise RuntimeError("LayerKernel was built without phase_times=True")
        torch.cuda.current_stream(self.device).synchronize()
        return phase_stats(self.times.cpu())


def phase_stats(times: torch.Tensor) -> dict:
    """Per-phase microseconds from a (num_ctas, PT_SLOTS) globaltimer stamp table (cupy_layer.cu):
      work_*  = arrival at the phase's closing barrier (or exit, P5) - release of the previous one (or
                entry, P1), over CTAs: work_max is the slowest CTA, the one the others wait for
      wait_*  = release - arrival at the phase's closing barrier (min/median/max over CTAs; None for P5)
      span    = median release of the closing barrier (max exit for P5) - median release of the previous
                one (min entry for P1): the phase's share of the kernel's wall time (spans sum to total)
    plus total_us = max exit - min entry, entry_spread_us = max entry - min entry (CTA start skew).
    %globaltimer's update granularity is GPU-dependent (tens of ns to ~1 us): read sub-us values loosely."""
    t = times.to(torch.float64)
    if t.dim() != 2 or t.shape[1] != PT_SLOTS or bool((t <= 0).any()):
        raise ValueError(f"phase time table must be (ctas, {PT_SLOTS}) of nonzero stamps (did the kernel run?)")
    t0 = float(t[:, 0].min())
    t = (t - t0) / 1000.0                                   # us since the first CTA entered
    entry, exit_ = t[:, 0], t[:, PT_SLOTS - 1]
    arr = [t[:, 1 + 2 * k] for k in range(NUM_BARRIERS)] + [exit_]
    rel = [entry] + [t[:, 2 + 2 * k] for k in range(NUM_BARRIERS)]
    out = []
    prev_mark = float(entry.min())
    for i, name in enumerate(PHASES):
        work = arr[i] - rel[i]
        row = dict(phase=name, work_max_us=float(work.max()), work_median_us=float(work.median()),
                   work_min_us=float(work.min()), wait_min_us=None, wait_median_us=None, wait_max_us=None)
        if i < NUM_BARRIERS:
            wait = rel[i + 1] - arr[i]
            row.update(wait_min_us=float(wait.min()), wait_median_us=float(wait.median()),
                       wait_max_us=float(wait.max()))
            mark = float(rel[i + 1].median())
        else:
            mark = float(exit_.max())
        row["span_us"] = mark - prev_mark
        prev_mark = mark
        out.append(row)
    return dict(total_us=float(exit_.max()), entry_spread_us=float(entry.max()), ctas=int(t.shape[0]), phases=out)


def _blocks_per_sm(cupy, fn, threads: int, smem: int) -> int:
    try:
        return int(cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, smem))
    except Exception:   # older CuPy without the binding: registers and smem were checked at compile time
        return 1


def _check(k: LayerKernel, ws, x, w_qkv, w_o, w_gu, w_down, cos, sin, k_cache, v_cache, valid, q_buf, attn,
           act) -> None:
    sp, M = k.spec, k.M
    nq = (sp.n_heads + 2 * sp.n_kv_heads) * sp.head_dim
    _common.require(x.shape == (M, sp.hidden) and x.is_contiguous() and x.dtype == sp.dtype, f"x {tuple(x.shape)}")
    for name, w, shape in (("w_qkv", w_qkv, (nq, sp.hidden)), ("w_o", w_o, (sp.hidden, sp.n_heads * sp.head_dim)),
                           ("w_gu", w_gu, (2 * sp.intermediate, sp.hidden)),
                           ("w_down", w_down, (sp.hidden, sp.intermediate))):
        _common.require(tuple(w.shape) == shape and w.is_contiguous() and w.data_ptr() % 16 == 0
                        and w.dtype == sp.dtype, f"{name} must be a contiguous 16-byte aligned {shape}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _common.require(c.dim() == 4 and c.shape[0] >= M and c.shape[1] == sp.n_kv_heads and c.shape[2] == ws.s_max
                        and c.shape[3] == sp.head_dim and c.is_contiguous() and c.dtype == sp.dtype,
                        f"{name} {tuple(c.shape)} must be a contiguous (>= {M}, {sp.n_kv_heads}, {ws.s_max}, "
                        f"{sp.head_dim}) layer of the cache")
    _common.require(cos.stride(1) == 1 and sin.stride(0) == cos.stride(0) and cos.shape[1] == sp.head_dim,
                    "cos/sin tables must be (len, head_dim) with equal strides")
    _common.require(valid.dtype in (torch.int8, torch.bool) and valid.stride(1) == 1, "valid must be int8 rows")
    for name, t in (("q_buf", q_buf), ("attn", attn), ("act", act)):
        _common.require(t.is_contiguous() and t.shape[0] == M, f"{name} must be contiguous with {M} rows")


# ----------------------------------------------------------------------------- torch reference
@torch.no_grad()
def layer_reference(x, *, w_qkv, b_qkv, nw_attn, eps_attn, w_o, b_o, w_gu, b_gu, nw_mlp, eps_mlp, w_down,
                    b_down, scale, cos, sin, pos, slots, kv_lens, valid, k_cache, v_cache, n_heads, n_kv_heads,
                    head_dim) -> torch.Tensor:
    """What one launch computes, in place on x (M, H) and the cache layer (HF's cast points, dt = x.dtype):

    h    = rnd(rnd(x * rsqrt(mean(x^2) + eps)) * w_attn)                    RMSNorm (Llama)
    qkv  = rnd(h @ Wqkv^T + b)                                              one rounding
    q, k = rnd(rnd(t * cos) + rnd(rotate_half(t) * sin))                    RoPE over the whole head
    k_cache[m, :, slots[m]], v_cache[...] = k, v;  q -> attention over positions < kv_lens[m] with
           valid[m, p] != 0 (fp32 online softmax, p rounded for PV; rows with nothing valid give 0)
    x    = rnd(x + rnd(attn @ Wo^T + b))
    act  = rnd(rnd(silu(g)) * u), [g | u] = rnd(rnd(norm(x)) @ Wgu^T + b)
    x    = rnd(x + rnd(act @ Wd^T + b))
    Each line is the matching Triton kernel's reference, so the kernel and the Triton path share one
    specification."""
    M = x.shape[0]
    qkv = fused_gemv_reference(x, w_qkv, bias=b_qkv, norm_weight=nw_attn, eps=eps_attn)
    q = torch.empty(M, n_heads, head_dim, dtype=x.dtype, device=x.device)
    rope_qkv_cache_write_reference(qkv, cos, sin, pos, slots, k_cache, v_cache, q, n_heads=n_heads,
                                   n_kv_heads=n_kv_heads, head_dim=head_dim)
    attn = decode_attention_reference(q, k_cache, v_cache, kv_lens, valid, scale=scale)
    fused_gemv_reference(attn, w_o, bias=b_o, residual=x, out=x)
    act = fused_gemv_reference(x, w_gu, bias=b_gu, norm_weight=nw_mlp, eps=eps_mlp, act="silu_mul")
    fused_gemv_reference(act, w_down, bias=b_down, residual=x, out=x)
    return x
