"""CUDA-graph capture and replay of a DecodeStep.

One graph per GraphKey (batch bucket, cache buffers, what the body does); the live graphs share one
memory pool (a new one once none is left) and each has its own static StepBuffers, so replays never
allocate. A graph is captured the first
time it is needed (warm-up on a side stream first, which also compiles the Triton kernels) and again
only when the cache buffers are re-allocated (growth, new dtype/size). Before the first warm-up of a body
at a bucket, its kernels are compiled in parallel worker processes (runtime/precompile.py; Tuning.precompile
turns that off), so the warm-up only loads them from Triton's on-disk cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from . import precompile as _precompile
from .interface import DecodeStep, StepBuffers, fill_inputs

log = logging.getLogger("braid_backend")


class GraphCaptureFailed(RuntimeError):
    """A CUDA-graph capture raised; the runner's owner has been told (on_failure) before this."""


@dataclass(frozen=True)
class GraphKey:
    bucket: int           # rows of the graph's buffers
    cache_serial: int     # BraidCache.serial: unique per cache for the process's life
    cache_version: int    # bumped when the cache re-allocates its buffers
    max_len: int
    tag: Hashable         # what the body runs: "hf-step", or ("fast", K, SelectConfig)

    @classmethod
    def of(cls, bucket: int, cache, tag: Hashable) -> "GraphKey":
        return cls(bucket, cache.serial, cache.version, cache.max_len, tag)


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    bufs: StepBuffers
    out: object           # what the body returned during capture: static tensors that replays refill


class GraphRunner:
    """Captures and replays bodies that run a DecodeStep on static buffers.

    on_failure(exc) is called when a capture raises (out of memory, an op that cannot be captured);
    the runner then raises GraphCaptureFailed so the caller can run the same work without graphs."""

    def __init__(self, step: DecodeStep, on_failure: Callable[[BaseException], None] | None = None):
        self.step = step
        self.on_failure = on_failure
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[GraphKey, CapturedStep] = {}
        self.captures = 0
        self.precompiled: dict = {}   # (tag, bucket) -> precompile summary: one dry run each

    def release(self) -> None:
        self.graphs.clear()

    def forget(self, cache_serial: int) -> None:
        """Drop every graph captured on that cache (it is gone or re-allocated)."""
        for k in [k for k in self.graphs if k.cache_serial == cache_serial]:
            del self.graphs[k]

    def capture(self, key: GraphKey, cache, body, warm_slots: int = 1, dry_body=None) -> CapturedStep:
        """Capture `body(bufs)` (one or more decode steps on the buffers) under `key`, once.
        `dry_body(bufs)`, if given, stands in for body in the precompile's dry run (see _precompile):
        a shorter body that launches the same kernel variants (the K-step loop passes one step)."""
        got = self.graphs.get(key)
        if got is not None:
            return got
        try:
            return self._capture(key, cache, body, warm_slots, dry_body)
        except Exception as e:
            if self.on_failure is not None:
                self.on_failure(e)
            raise GraphCaptureFailed(f"CUDA graph capture failed: {type(e).__name__}: {e}") from e

    def _capture(self, key: GraphKey, cache, body, warm_slots: int, dry_body=None) -> CapturedStep:
        # graphs of this cache's older buffers can never replay again
        for k in [k for k in self.graphs if k.cache_serial == key.cache_serial and k.cache_version != key.cache_version]:
            del self.graphs[k]
        t0 = time.perf_counter()
        if not self.graphs:
            # a pool whose graphs are all gone may still hold blocks (anything a capture allocated that
            # outlived it); capturing into it again trips torch's allocator assert (use_count > 0)
            self.pool = torch.cuda.graph_pool_handle()
        self.step.prepare(cache.max_len)
        bufs = self.step.new_buffers(key.bucket, cache.max_len)
        # Warm-up and capture write k/v at bufs.slots (advancing by one per step for multi-step
        # bodies): point them at the last warm_slots slots, which callers keep beyond any position in
        # use and which are overwritten for real when reached; kv_lens=1 reads only slot 0.
        first = cache.max_len - warm_slots

        def prime():  # before every warm-up / capture call: multi-step bodies advance the slots
            bufs.slots.fill_(first)
            bufs.kv_lens.fill_(1)
            bufs.pos.zero_()

        saved_valid = cache.valid[:key.bucket, first:].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dry = body if dry_body is None else dry_body
            pre = self._precompile(key, lambda: (prime(), dry(bufs)))
            # two runs, as torch advises a few on a side stream before capture: the first loads each
            # kernel variant and lets cuBLAS and the allocator set up what capture must not; one run
            # would cost one body less (ms), and nothing here shows that one is always enough
            for _ in range(2):
                prime()
                body(bufs)
        torch.cuda.current_stream().wait_stream(side)
        prime()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = body(bufs)
        cache.valid[:key.bucket, first:].copy_(saved_valid)
        captured = self.graphs[key] = CapturedStep(graph, bufs, out)
        self.captures += 1
        log.info("braid: captured decode graph (bucket %d, %s) in %.2fs%s", key.bucket, key.tag,
                 time.perf_counter() - t0, f" ({_precompile.describe(pre)})" if pre else "")
        return captured

    def _precompile(self, key: GraphKey, dry_body) -> dict | None:
        """Compile the kernels of `dry_body` in parallel before the warm-up (see runtime/precompile.py),
        once per (body tag, bucket) of this runner: another bucket launches other variants (tile sizes,
        gemv vs tensor-core path), while a re-capture of the same pair (cache re-allocated) would only
        repeat the dry run. Tuning(precompile=False) turns it off; under the interpreter it does nothing.

        The dry body is capture()'s dry_body if given (the K-step loop's: one of its K steps), else the
        body. One step finds what K would: each step runs the same ops on the same buffers and shapes,
        and the per-step output rows it writes are all 16-byte aligned (runtime/loop.py), so steps
        2..K launch exactly step 1's variants; anything a shorter dry run missed would only compile
        at the warm-up, as without precompile.

        Why the dry body is safe to run: its torch ops run, its Triton kernels do not, so buffers that
        only kernels write keep their contents. The torch ops that index memory read bufs.ids
        (embedding), bufs.pos (longrope rows), bufs.slots (cache.valid scatter) and sampled tokens
        (repetition-penalty scatter): new_buffers() zero-fills ids/pos/slots and prime() sets slots and
        pos before the dry run; in the greedy body only the skipped select kernel advances them (they
        stay primed), in the sampled body torch advances them by one per step, K - 1 at most before
        the last step's reads, which warm_slots leaves room for, and tokens come from an argmax
        (always in range). cache.valid's warm slots are restored after capture, like the warm-up's
        writes."""
        if not self.step.tuning.precompile:
            return None
        once = (key.tag, key.bucket)
        if once in self.precompiled:
            return None
        self.precompiled[once] = summary = _precompile.precompile(dry_body)
        return summary

    def step_once(self, cache, bucket: int, ids: torch.Tensor, pos: torch.Tensor | None, slot: int):
        """One decode step for HF's own loop: inputs copied into the bucket's static buffers, graph
        replayed; returns the (bucket, vocab) logits buffer."""
        step = self.step
        cs = self.capture(GraphKey.of(bucket, cache, "hf-step"), cache, lambda b: step.run(cache, b))
        fill_inputs(cs.bufs, cache, ids, pos, slot)
        cs.graph.replay()
        return cs.out
