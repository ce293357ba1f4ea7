"""L2 streaming of a decode step's weights (Hopper+): each projection kernel asks L2 for the weights
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


def budget_bytes(device: torch.device) -> int:
    """How far ahead the stream runs: BRAID_L2_PREFETCH_MB (0: off), else L2_FRACTION of L2; 0 where
    bulk prefetch is not available (CPU, interpreter, pre-Hopper GPUs)."""
    if not l2_prefetch_supported(device):
        return 0
    env = os.environ.get("BRAID_L2_PREFETCH_MB")
    if env is not None:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"BRAID_L2_PREFETCH_MB must be a number of MB (0: off), got {env!r}") from None
        return max(0, int(mb * (1 << 20)))
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) * L2_FRACTION)


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
    windows = plan_windows(sizes, budget)
    log.info("braid_backend: L2 weight streaming, %.1f MB ahead of the projections (%d weights)",
             budget / (1 << 20), sum(ok))
    return [tuple(_bytes_view(weights[i], off, n) for i, off, n in win) or None for win in windows]
