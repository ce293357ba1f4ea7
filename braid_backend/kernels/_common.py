"""What every kernel file shares, imported openly: Triton availability, the interpreter switches, the
bf16 rounding of HF's cast points, the RMSNorm arithmetic (kernel side and torch reference), the SM
count, programmatic dependent launch, and `launch` (every kernel launch goes through it, so a dry run can
collect what would compile: runtime/precompile.py). No transformers import here (ops layer)."""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

try:  # triton is optional at import time: on a machine without it nothing is patched.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

try:  # grid dependency control (programmatic dependent launch), Hopper+; absent in old tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

    HAS_GDC = True
except Exception:  # pragma: no cover
    gdc_wait = gdc_launch_dependents = None
    HAS_GDC = False


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The Triton interpreter (3.6 and 3.9 seen) returns garbage for tl.dot on bf16 operands, so kernels
# upcast dot operands to fp32 under the interpreter. bf16 values are exact in fp32 and the dot
# accumulates in fp32 on the GPU too, so this changes nothing but the instruction used.
DOT_UPCAST = interpret_mode()


if HAS_TRITON:

    @triton.jit
    def rne_bf16(x):
        """fp32 -> nearest-even bf16 value, kept in fp32.

        The Triton interpreter converts fp32 -> bf16 by truncation while the GPU (and torch) round to
        nearest even; kernels call this only under the interpreter so CPU tests see GPU numerics."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def round_to(v, DTYPE: tl.constexpr, BF16_FIX: tl.constexpr):
        """fp32 -> DTYPE -> fp32: the rounding the stock model applies when it materialises a tensor."""
        out = v
        if DTYPE != tl.float32:
            if BF16_FIX:
                if DTYPE == tl.bfloat16:
                    out = rne_bf16(v)
                else:
                    out = v.to(DTYPE).to(tl.float32)
            else:
                out = v.to(DTYPE).to(tl.float32)
        return out

    @triton.jit
    def apply_norm(xf, r, wf, NORM_MODE: tl.constexpr, DTYPE: tl.constexpr, BF16_FIX: tl.constexpr):
        """xf: fp32 activations, r: broadcastable rsqrt statistic, wf: fp32 (weight + offset).
        Returns the normalised activations as fp32 holding DTYPE-representable values
        (`norm_reference` below is the same arithmetic in torch)."""
        if NORM_MODE == 0:
            # HF casts the normalised fp32 hidden back to the input dtype *before* the weight multiply.
            h = round_to(xf * r, DTYPE, BF16_FIX) * wf
        else:
            h = xf * r * wf
        return round_to(h, DTYPE, BF16_FIX)

    @triton.jit
    def arrive_last(cnt_ptr, N: tl.constexpr):
        """Split-reduction semaphore: after this program stored its partial result, count it in at
        `cnt_ptr`; True for the last of the N programs, which then reads every partial (with
        cache_modifier=".cg": other SMs wrote them, never a stale L1 line) and resets the counter to 0
        for the next launch. The CTA barrier orders every thread's stores before one thread's gpu-scope
        acq_rel increment publishes them (the usual split-K semaphore pattern)."""
        tl.debug_barrier()
        return tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == N - 1

    @triton.jit
    def _bulk_prefetch(ptr, nbytes, HINT: tl.constexpr):
        # one thread per program issues it (every thread holds these scalars); size 0 issues nothing.
        # HINT: with an evict_last L2 policy, so that the streaming reads in between do not evict it
        if HINT:
            r = tl.inline_asm_elementwise(
                "{ .reg .pred q, r; .reg .u32 t; .reg .b64 pol; mov.u32 t, %tid.x; setp.eq.u32 q, t, 0;"
                " setp.ne.and.u32 r, $2, 0, q; createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
                " @r cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
                "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)
        else:
            r = tl.inline_asm_elementwise(
                "{ .reg .pred q, r; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 q, t, 0;"
                " setp.ne.and.u32 r, $2, 0, q; @r cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)
        return r

    @triton.jit
    def _prefetch_share(ptr, n, pid, nprog, CHUNK: tl.constexpr, HINT: tl.constexpr):
        share = tl.cdiv(n, nprog * 16) * 16          # bytes per program, 16-byte multiples
        lo = pid.to(tl.int64) * share
        hi = tl.minimum(lo + share, n)
        for off in range(lo, hi, CHUNK):
            _bulk_prefetch(ptr + off, tl.minimum(hi - off, CHUNK).to(tl.int32), HINT)

    @triton.jit
    def l2_prefetch(p0, n0, p1, n1, p2, n2, nprog, PREFETCH: tl.constexpr):
        """Ask L2 for up to three byte ranges (uint8 pointers, lengths in bytes, 16-byte multiples) that
        a later kernel reads (the next projections' weights: model/l2stream.py), fire and forget
        (sm_90 bulk prefetch). Programs 0..nprog-1 each take a 1/nprog share: the first wave, so that
        everything is asked for as soon as this kernel starts. PREFETCH: 0 off, else
        (chunk bytes << 2) | (evict_last hint << 1) | 1 (see PF_CHUNK / PF_HINT)."""
        if PREFETCH != 0:
            pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1)
                                                            * tl.program_id(2))
            if pid < nprog:
                _prefetch_share(p0, n0, pid, nprog, PREFETCH >> 2, (PREFETCH >> 1) & 1)
                _prefetch_share(p1, n1, pid, nprog, PREFETCH >> 2, (PREFETCH >> 1) & 1)
                _prefetch_share(p2, n2, pid, nprog, PREFETCH >> 2, (PREFETCH >> 1) & 1)

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        """First thing a kernel launched by PDL does before touching anything an earlier kernel wrote
        (see pdl_enabled): wait for the previous kernel, then let the next one launch."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()


# Intermediate bf16 roundings (HF's cast points) are done by hand, with integer ops, everywhere:
# - the Triton interpreter converts fp32 -> bf16 by truncation where torch rounds to nearest even;
# - on the H100 (triton 3.6) the rope kernel's x.to(bf16).to(fp32) round trips did not round like
#   torch (1-ulp differences in ~5% of elements, cast-point test failed): the compiler may fold the
#   round trip and contract the mul/add around it. Integer rounding cannot be folded away.
BF16_RNE_FIX = True


def check_norm_mode(norm_mode: int) -> None:
    if norm_mode not in (0, 1):
        raise ValueError(f"norm_mode must be 0 (Llama-style) or 1 (Gemma-style), got {norm_mode!r}")


def norm_reference(s: torch.Tensor, weight: torch.Tensor, eps: float, norm_mode: int,
                   norm_offset: float) -> torch.Tensor:
    """RMSNorm over the last dim with HF's cast points (s already in its dtype; returns s.dtype):
    r = rsqrt(mean(s_f32^2) + eps); mode 0 (Llama/Qwen): rnd(rnd(s_f32 * r) * (w_f32 + offset));
    mode 1 (Gemma, OLMo2): rnd(s_f32 * r * (w_f32 + offset))."""
    check_norm_mode(norm_mode)
    dt = s.dtype
    sf = s.float()
    r = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    wf = weight.float() + norm_offset
    if norm_mode == 0:
        h = (sf * r).to(dt).float() * wf
    else:
        h = sf * r * wf
    return h.to(dt)


def require(cond: bool, msg: str) -> None:
    """Argument check that survives `python -O` (unlike assert)."""
    if not cond:
        raise ValueError(msg)


# Under the interpreter every program is a Python loop: few programs keep the CPU tests fast.
CPU_NUM_SMS = 8


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; CPU_NUM_SMS elsewhere (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_NUM_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def kernels_usable(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of this device, and if not, why."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpret_mode():
        return True, ""
    if device.type == "cpu":
        return False, "model is on the CPU and TRITON_INTERPRET=1 is not set (Triton needs a GPU)"
    return False, f"device type {device.type!r} is not supported by the Triton kernels"


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _sm90(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or newer (PDL, bulk L2 prefetch)."""
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def pdl_enabled(device: torch.device) -> bool:
    """Launch kernels with programmatic dependent launch (PDL) on this device?

    With PDL the next kernel of the stream (and of a captured graph) starts while this one runs: its
    programs may load what no earlier kernel writes (weights) and must `gdc_wait()` before touching
    anything else. Every kernel here that takes USE_PDL does exactly that, so a chain of them hides the
    launch gap and the first memory round trip of each kernel. Hopper (sm_90) and newer only; never
    under the interpreter; BRAID_PDL=0 turns it off (A/B runs)."""
    if device.type != "cuda" or not HAS_GDC or interpret_mode() or os.environ.get("BRAID_PDL", "1") == "0":
        return False
    return _sm90(device)


def pdl_launch_kwargs(device: torch.device) -> dict:
    """The constexpr flag and the launch option that go together (launch_pdl only where it is on: the
    interpreter does not take it)."""
    return dict(USE_PDL=True, launch_pdl=True) if pdl_enabled(device) else dict(USE_PDL=False)


# How the prefetch is issued (benchmarks/l2_prefetch_sweep.py sets these): bytes per instruction, the
# evict_last hint, how many programs issue (None: one per SM), at the kernel's start (before the PDL
# wait) or its end (after the epilogue).
PF_CHUNK = 65536
PF_HINT = False
PF_PROGS: int | None = None
PF_AT_END = False


def l2_prefetch_supported(device: torch.device) -> bool:
    """sm_90+ GPUs (cp.async.bulk.prefetch.L2); never under the interpreter."""
    device = torch.device(device)
    return device.type == "cuda" and HAS_TRITON and not interpret_mode() and _sm90(device)


def l2_prefetch_args(ranges, device: torch.device, dummy: torch.Tensor, programs: int) -> tuple[tuple, dict]:
    """Kernel arguments and constexpr flag of `l2_prefetch` for up to three byte ranges (1-D uint8
    tensors on `device`, 16-byte aligned, lengths multiples of 16); `ranges` None or empty: off."""
    if not ranges:
        return (dummy, 0, dummy, 0, dummy, 0, 1), dict(PREFETCH=0, PF_AT_END=False)
    ranges = list(ranges)
    require(len(ranges) <= 3, f"at most 3 prefetch ranges, got {len(ranges)}")
    require(l2_prefetch_supported(device), f"L2 prefetch needs an sm_90+ GPU, not {device}")
    args = []
    for r in ranges:
        require(r.dtype == torch.uint8 and r.dim() == 1 and r.device == device,
                "prefetch ranges must be 1-D uint8 tensors on the kernel's device")
        require(r.data_ptr() % 16 == 0 and r.numel() % 16 == 0,
                "prefetch ranges must start 16-byte aligned and be a multiple of 16 bytes long")
        args += [r, r.numel()]
    args += [ranges[0], 0] * (3 - len(ranges))   # same pointer type: no extra kernel variant
    progs = max(1, min(programs, PF_PROGS or num_sms(device)))
    return (*args, progs), dict(PREFETCH=(PF_CHUNK << 2) | (int(PF_HINT) << 1) | 1, PF_AT_END=PF_AT_END)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ------------------------------------------------------------------------------- launches, dry runs
# Thread id of a dry run in progress (runtime/precompile.py), else None. One global compared with None
# is all a normal launch pays; the id (not a bool) keeps another thread's launches real meanwhile.
_DRY_THREAD: int | None = None


def launch(kernel, grid):
    """What a launch site calls instead of `kernel[grid]`: `launch(kernel, grid)(*args, **kwargs)`.

    Normally that is `kernel[grid]` itself. (Not `launch(kernel, grid, *args, **kwargs)`: forwarding
    a site's ~20 arguments and ~15 keywords through a second call measured ~1.2 us per launch in
    CPython 3.11, next to a Triton launch's few us of host time; returning the launcher costs ~0.) Inside `dry_launches()`, on
    the thread that entered it, the kernel is not launched: `kernel.warmup(*args, grid=grid, **kwargs)`
    runs the launcher's own specialisation (argument types, alignment, constexprs, options) and cache
    lookup, and compiles only what is missing, so with Triton's jit_cache_hook answering True nothing
    compiles either and the hook sees exactly the variants a real launch would compile. Under the
    interpreter warmup does nothing (a no-op path)."""
    if _DRY_THREAD is None or _DRY_THREAD != threading.get_ident():
        return kernel[grid]
    return functools.partial(kernel.warmup, grid=grid)


@contextlib.contextmanager
def dry_launches():
    """Launches of this thread only specialise (see `launch`) while inside; not re-entrant."""
    global _DRY_THREAD
    if _DRY_THREAD is not None:
        raise RuntimeError("a dry run is already in progress")
    _DRY_THREAD = threading.get_ident()
    try:
        yield
    finally:
        _DRY_THREAD = None
