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


_FLUSH = {}


def _flush_buf(device):
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    return _FLUSH[device]


def bench_ms(fn, warmup: int = 10, rep: int = 30, graph: bool = False, inner: int = 20) -> float:
    """Median milliseconds per call of `fn`, timed with CUDA events.

    graph=True times `fn` as it runs inside the decode graph: `inner` calls captured in one CUDA
    graph, each preceded by a 128 MB memset that evicts L2 (the real decode step never finds a
    layer's weights in L2), minus a graph of the memsets alone. Timing single replays instead would
    measure the replay + event overhead (~10 us), not the kernel."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if not graph:
        return _median_ms(fn, warmup, rep)
    flush = _flush_buf(torch.cuda.current_device())

    def capture(with_fn):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(inner):
                flush.zero_()
                if with_fn:
                    fn()
        return g

    g_all, g_flush = capture(True), capture(False)
    t_all = _median_ms(g_all.replay, warmup, rep)
    t_flush = _median_ms(g_flush.replay, warmup, rep)
    return max(t_all - t_flush, 1e-6) / inner


def _median_ms(call, warmup: int, rep: int) -> float:
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
