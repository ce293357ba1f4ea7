"""What every kernel file shares, imported openly: Triton availability, the interpreter switches, the
bf16 rounding of HF's cast points, the RMSNorm arithmetic (kernel side and torch reference), the SM
count, programmatic dependent launch, and `launch` (every kernel launch goes through it, so a dry run can
collect what would compile: runtime/precompile.py). No transformers import here (ops layer)."""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from ..tuning import DEFAULT as DEFAULT_TUNING
from ..tuning import Tuning, interpret_mode  # noqa: F401  (re-exported: kernels and tests use them from here)

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
    """A CUDA device of compute capability 9.0 or newer (PDL)."""
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def pdl_enabled(device: torch.device, tuning: Tuning | None = None) -> bool:
    """Launch kernels with programmatic dependent launch (PDL) on this device?

    With PDL the next kernel of the stream (and of a captured graph) starts while this one runs: its
    programs may load what no earlier kernel writes (weights) and must `gdc_wait()` before touching
    anything else. Every kernel here that takes USE_PDL does exactly that, so a chain of them hides the
    launch gap and the first memory round trip of each kernel. Hopper (sm_90) and newer only; never
    under the interpreter; Tuning(pdl=False) turns it off (A/B runs)."""
    if device.type != "cuda" or not HAS_GDC or interpret_mode() or not (tuning or DEFAULT_TUNING).pdl:
        return False
    return _sm90(device)


def pdl_launch_kwargs(device: torch.device, tuning: Tuning | None = None) -> dict:
    """The constexpr flag and the launch option that go together (launch_pdl only where it is on: the
    interpreter does not take it)."""
    return dict(USE_PDL=True, launch_pdl=True) if pdl_enabled(device, tuning) else dict(USE_PDL=False)


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
