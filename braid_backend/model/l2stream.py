"""L2 streaming of a decode step's weights (Hopper+; opt-in, BRAID_L2_PREFETCH_MB): each projection kernel asks L2 for the weights
the next few projections will read, so that HBM keeps streaming through the steps that read little
(norms, RoPE, attention, launch gaps) and the projections then read from L2.

At batch 1 a small model's step is latency-bound, not bandwidth-bound: Qwen2.5-0.5B on an H100 spends
~19 us per layer for ~10 us of weight bytes (benchmarks/NOTES.md), because each kernel starts its own
weight stream only after the previous one finished. Here the stream runs ahead of the kernels by a
byte budget (a fraction of L2, so what is prefetched is still there when it is read).

Weights stream in the order the step reads them: per layer qkv, o_proj, gate_up, down (the lm_head is
left out: it is larger than L2 and read once at the end). Kernel j prefetches from where the stream's
front stands to `budget` bytes past the start of weight j + 1, in at most three contiguous ranges;
no byte is asked for twice, and none that the asking kernel reads itself.
"""
from __future__ import annotations

import logging
import os

import torch

from ..kernels._common import l2_prefetch_supported

log = logging.getLogger("braid_backend")

MAX_RANGES = 3        # byte ranges one kernel launch takes (kernels/_common.l2_prefetch)
L2_FRACTION = 0.4     # default budget: this fraction of the GPU's L2 (H100: 50 MB -> 20 MB)
NEXT_SMALL = False    # plan_next_small instead of plan_windows (benchmarks/l2_prefetch_sweep.py sets it)


def plan_windows(sizes: list[int], budget: int, max_ranges: int = MAX_RANGES) -> list[list[tuple[int, int, int]]]:
    """For weights of `sizes` bytes read one after another, the ranges (weight index, byte offset,
    length) that the kernel reading weight j prefetches. Offsets and lengths are multiples of 16 (a
    weight's last size % 16 bytes are never asked for); budget <= 0: nothing."""
    units = [s // 16 for s in sizes]
    starts = [0]
    for u in units:
        starts.append(starts[-1] + u)
    total, step = starts[-1], max(0, int(budget)) // 16
    out: list[list[tuple[int, int, int]]] = [[] for _ in sizes]
    if step == 0 or len(sizes) < 2:
        return out
    front = starts[1]
    for j in range(len(sizes) - 1):
        front = max(front, starts[j + 1])   # a lagging front skips what kernel j reads itself
        target = min(total, starts[j + 1] + step)
        w = next(i for i in range(len(sizes)) if starts[i + 1] > front) if front < total else len(sizes)
        while front < target and w < len(sizes) and len(out[j]) < max_ranges:
            end = min(target, starts[w + 1])
            if end > front:
                out[j].append((w, (front - starts[w]) * 16, (end - front) * 16))
            front = end
            w += 1
    return out


def plan_next_small(sizes: list[int], cap: int) -> list[list[tuple[int, int, int]]]:
    """The "next small weight" policy: kernel j prefetches weight j + 1 whole when it is at most `cap`
    bytes (a latency-bound projection such as o_proj or the next layer's qkv), and nothing else."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in sizes]
    for j in range(len(sizes) - 1):
        n = sizes[j + 1] // 16 * 16
        if 0 < n <= cap:
            out[j].append((j + 1, 0, n))
    return out


def budget_bytes(device: torch.device) -> int:
    """How far ahead the stream runs, from BRAID_L2_PREFETCH_MB: unset or 0 (the default) off, a number
    of MB, or "auto" (L2_FRACTION of L2). 0 where bulk prefetch is not available (CPU, interpreter,
    pre-Hopper GPUs). Off by default: on the H100 every preset's step was slower with it (benchmarks/
    NOTES.md, session 8), except Qwen2.5-0.5B with 2-4 MB (-3%)."""
    env = os.environ.get("BRAID_L2_PREFETCH_MB", "0").strip().lower()
    try:
        mb = None if env == "auto" else float(env or 0)
    except ValueError:
        raise ValueError(f"BRAID_L2_PREFETCH_MB must be a number of MB, 0 (off) or 'auto', got {env!r}") from None
    if mb == 0 or not l2_prefetch_supported(device):
        return 0
    if mb is None:
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) * L2_FRACTION)
    return max(0, int(mb * (1 << 20)))


def _bytes_view(t: torch.Tensor, off: int, n: int) -> torch.Tensor:
    return t.view(-1).view(torch.uint8)[off:off + n]


def stream_plan(weights: list[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor, ...] | None]:
    """Per weight (in read order), the uint8 views its kernel passes as `prefetch=` to fused_gemv, or None.
    Weights that are not contiguous or not 16-byte aligned are left out of the stream."""
    budget = budget_bytes(device)
    if budget <= 0 or not weights:
        return [None] * len(weights)
    ok = [w.is_contiguous() and w.data_ptr() % 16 == 0 for w in weights]
    sizes = [w.numel() * w.element_size() if good else 0 for w, good in zip(weights, ok)]
    windows = plan_next_small(sizes, budget) if NEXT_SMALL else plan_windows(sizes, budget)
    log.info("braid_backend: L2 weight streaming, %.1f MB ahead of the projections (%d weights)",
             budget / (1 << 20), sum(ok))
    return [tuple(_bytes_view(weights[i], off, n) for i, off, n in win) or None for win in windows]
