"""CUDA-graph capture and replay of the fused decode step.

One graph per (batch bucket, steps per graph, cache buffers); all graphs share one memory pool and
each has its own static DecodeBuffers, so replays never allocate. A bucket's graph is captured the
first time it is needed (warm-up on a side stream first, which also compiles the Triton kernels) and
re-captured only when the cache buffers are re-allocated (growth, new dtype/size).
"""
from __future__ import annotations

import logging
import time

import torch

from ..patches.decode import DecodeBuffers

log = logging.getLogger("braid_backend")


class CapturedStep:
    def __init__(self, graph, bufs: DecodeBuffers, body_out):
        self.graph, self.bufs, self.out = graph, bufs, body_out


class GraphRunner:
    def __init__(self, st):
        self.st = st
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, CapturedStep] = {}
        self.captures = 0
        self.capture_s = 0.0

    def release(self) -> None:
        self.graphs.clear()

    def _key(self, bucket: int, cache, tag) -> tuple:
        return (bucket, cache.serial, cache.version, cache.max_len, tag)

    def capture(self, bucket: int, cache, tag, body, warm_slots: int = 1) -> CapturedStep:
        """Capture `body(bufs)` for this bucket; `body` runs one or more decode steps on the buffers."""
        key = self._key(bucket, cache, tag)
        got = self.graphs.get(key)
        if got is not None:
            return got
        # drop graphs of buffers that no longer exist (cache re-allocated)
        for k in [k for k in self.graphs if k[1] == cache.serial and k[2] != cache.version]:
            del self.graphs[k]
        t0 = time.perf_counter()
        st = self.st
        st.decode.ensure_rope_table(cache.max_len)
        bufs = DecodeBuffers(st.decode, bucket, cache.max_len)
        # Warm-up and capture write k/v at bufs.slots (advancing by one per step for multi-step
        # bodies): point them at the last warm_slots slots, which callers keep beyond any position in
        # use and which are overwritten for real when reached; kv_lens=1 reads only slot 0.
        first = cache.max_len - warm_slots

        def prime():  # before every warm-up / capture call: multi-step bodies advance the slots
            bufs.slots.fill_(first)
            bufs.kv_lens.fill_(1)
            bufs.pos.zero_()

        saved_valid = cache.valid[:bucket, first:].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                prime()
                body(bufs, warmup=True)
        torch.cuda.current_stream().wait_stream(side)
        prime()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = body(bufs, warmup=True)
        cache.valid[:bucket, first:].copy_(saved_valid)
        step = CapturedStep(graph, bufs, out)
        self.graphs[key] = step
        self.captures += 1
        self.capture_s += time.perf_counter() - t0
        log.info("braid: captured decode graph %s in %.2fs", key[:1] + key[4:], time.perf_counter() - t0)
        return step

    def step(self, input_ids, position_ids, cache) -> torch.Tensor:
        """One decode step from HF's loop (inputs copied into static buffers, graph replayed)."""
        from ..patches.model import batch_bucket

        B, seen = input_ids.shape[0], cache.seen
        bucket = min(batch_bucket(B), cache.batch_capacity)
        dec = self.st.decode

        def body(b, warmup=False):
            return dec.forward(cache, b)

        cs = self.capture(bucket, cache, "hf-step", body)
        b = cs.bufs
        if B < bucket:
            b.ids[B:].zero_()
            b.pos[B:].zero_()
            cache.valid[B:bucket].zero_()
        b.ids[:B].copy_(input_ids[:, -1])
        if position_ids is not None:
            b.pos[:B].copy_(position_ids[:, -1])
        else:
            b.pos[:B].fill_(seen)
        b.slots.fill_(seen)
        b.kv_lens.fill_(seen + 1)
        cs.graph.replay()
        return cs.out
