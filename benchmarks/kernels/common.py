"""Shared timing helpers for the kernel microbenchmarks (GPU only)."""
from __future__ import annotations

import torch


def copy_bandwidth_gbs(nbytes: int = 2 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 2
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), warmup=5, rep=20)
    del a, b
    return 2 * n / (ms * 1e-3) / 1e9


def bench_ms(fn, warmup: int = 10, rep: int = 50, graph: bool = False) -> float:
    """Median milliseconds per call, timed with CUDA events.

    graph=True captures `fn` once in a CUDA graph and times its replays, which removes the Python
    launch cost so that small kernels are timed as they will run inside the decode graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn()
        call = g.replay
    else:
        call = fn
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        call()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def row(kernel: str, shape: str, batch: int, dtype: str, ms: float, nbytes: int, copy_gbs: float,
        baseline: str, baseline_ms: float, config: str = "") -> dict:
    gbs = nbytes / (ms * 1e-3) / 1e9
    return dict(kernel=kernel, shape=shape, batch=batch, dtype=dtype, us=round(ms * 1e3, 2),
                gbs=round(gbs, 1), pct_copy_bw=round(100 * gbs / copy_gbs, 1), bytes=nbytes,
                baseline=baseline, baseline_us=round(baseline_ms * 1e3, 2),
                speedup=round(baseline_ms / ms, 2), config=config)
