"""Prompt prefill replayed from CUDA graphs (issue #13: time to first token).

A small model's prefill is host-bound: the stock HF forward launches ~850 small ops (Qwen2.5-0.5B,
25 of the 26.7 ms of a generate(max_new_tokens=1) on a tiny-width copy were that forward's host time).
Replaying it from a CUDA graph removes the host cost. A graph has static shapes, so the prompt is
right-padded to a length bucket (prefill_bucket). Causal attention keeps the padded tail invisible
to the real positions (sliding windows too: they only look back); its junk keys/values land in cache
slots T..Tb-1, which decode overwrites before it reads them (a step writes its slot, then attends up
to it). Only the last real position's logits are computed (logits_to_keep = a device index tensor).

The forward is the caller's: hf/ passes the stock HF forward writing the braid cache as a callable
forward(ids, pos, keep) -> (B, 1, V) logits. This file knows no HF class; padded_prefill is the body
a graph captures and runs eagerly as well (the CPU tests check it against the unpadded stock prefill).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .cache import round_up

log = logging.getLogger("braid_backend")

# B * Tb above the cap runs eager. Two reasons: the graph pool keeps the largest bucket's activations, and
# under stream capture transformers (5.17) does not skip the causal mask (is_tracing() includes
# capturing), so the captured forward gives SDPA an explicit (Tb, Tb) mask without GQA: ~3x the eager
# attention time. On an H100 (Qwen2.5-0.5B, TTFT, benchmarks/results/2026-11-26-h100-s6/runE) graph vs
# eager vs stock: 4096 tokens 23.1 / 33.2 / 18.8 ms, 6144 37.3 / 26.7 / 27.8, 8192 52.8 / 37.9 / 33.4.
# hf/causal_mask.py now gives the captured forward no mask where that is exact (full-attention SDPA
# models). Measured with it (H100, 2026-11-26, session 7, Qwen2.5-0.5B, TTFT = generate(max_new_tokens=1),
# benchmarks/prefill_diag.py --cap 8192), stock / braid eager / braid graph: 4096 tokens 20.34 / 38.25 /
# 18.96 ms, 8192 tokens 33.78 / 41.27 / 33.18 ms. So such models get MASKLESS_PREFILL_TOKEN_CAP (hf/
# picks the cap: this file knows no attention implementation); the others keep PREFILL_TOKEN_CAP, their
# captured forward still has the explicit mask. Above 8192 nothing is measured yet.
PREFILL_TOKEN_CAP = 4096
MASKLESS_PREFILL_TOKEN_CAP = 8192
MIN_STEP = 64


def prefill_bucket(T: int) -> int:
    """The padded prompt length Tb of a T-token prefill graph.

    Multiples of 64 up to 1024, then multiples of 1/8 of the largest power of two <= T (1024-2047 by
    128, 2048-4095 by 256, ...). So Tb >= T, Tb is monotone in T, the padding is below T/8 (12.5%)
    above 512 tokens (at most 63 tokens below that, which cost nothing at launch-bound lengths), and
    there are ~8 buckets per octave: few graphs for all the prompt lengths a server sees."""
    T = int(T)
    if T < 1:
        raise ValueError(f"prefill of {T} tokens")
    step = max(MIN_STEP, (1 << (T.bit_length() - 1)) // 8)
    return round_up(T, step)


@dataclass
class PrefillInputs:
    """Static inputs of one (B, Tb) prefill graph (allocated outside any capture)."""
    ids: torch.Tensor    # (B, Tb) long: the prompt in [:, :T], token 0 after it
    pos: torch.Tensor    # (B, Tb) long: RoPE positions 0..Tb-1 (a prompt without left padding)
    keep: torch.Tensor   # (1,) long: T - 1, the one position whose logits are computed

    @classmethod
    def new(cls, B: int, Tb: int, device) -> "PrefillInputs":
        pos = torch.arange(Tb, device=device).expand(B, Tb).contiguous()
        return cls(torch.zeros(B, Tb, dtype=torch.long, device=device), pos,
                   torch.zeros(1, dtype=torch.long, device=device))

    def fill(self, input_ids: torch.Tensor) -> None:
        """Copy a (B, T) prompt in; device-side only (no host sync), so it can precede a replay."""
        T = input_ids.shape[1]
        self.ids[:, :T].copy_(input_ids)
        self.ids[:, T:].zero_()
        self.keep.fill_(T - 1)


def padded_prefill(forward: Callable, cache, inp: PrefillInputs) -> torch.Tensor:
    """The body a prefill graph captures (also run as-is, eagerly, by the tests): one forward over the
    padded prompt into the empty cache; returns the kept position's (B, V) logits. Afterwards the
    cache's `seen` is Tb: finish_prefill makes it the real length."""
    cache.seen = 0
    logits = forward(inp.ids, inp.pos, inp.keep)
    return logits[:, -1]


def finish_prefill(cache, B: int, T: int) -> None:
    """After padded_prefill of a T-token prompt: positions 0..T-1 are real, T.. are free again."""
    cache.seen = 0
    cache.mark_prefill(None, B, T)
    cache.seen = T


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inp: PrefillInputs
    out: torch.Tensor    # the graph's static (B, V) logits: replays overwrite it


class PrefillGraphs:
    """Prefill graphs keyed by (B, Tb, cache serial, cache version), captured on a key's second use.

    The first use of a key runs the caller's eager prefill (run returns None): one-off prompt lengths
    pay no capture. on_failure(exc) is called when a capture raises; the caller then runs its eager
    prefill (and should stop asking).

    Memory pool and stream, learnt on an H100: when prefill graphs shared the decode graphs' pool, the
    first decode capture after a cache re-allocation (which drops every graph) hit torch's allocator
    assert `use_count > 0`: the pool had no graph left but still a live block, and graphs went off for
    the session. The likely block (not confirmed): cuBLAS's per-stream workspace, allocated inside the
    pool by the capture stream's first GEMM and kept for the stream's life. So prefill graphs now have
    their own pool, a new one whenever none of their graphs is left, and warm up and capture on one
    stream of their own (its workspace then comes from the warm-up, outside any pool); GraphRunner
    likewise takes a new pool when it has no graph."""

    def __init__(self, on_failure: Callable[[BaseException], None] | None = None,
                 token_cap: int = PREFILL_TOKEN_CAP):
        self.on_failure, self.token_cap = on_failure, token_cap
        self.graphs: dict[tuple, _Captured] = {}
        self.used: set[tuple] = set()     # keys whose first (eager) use has happened
        self.captures = 0
        self.pool = None                  # graph memory pool handle, renewed when no graph is left
        self.stream = None                # warm-up and capture stream (created on the first capture)

    def release(self) -> None:
        self.graphs.clear()
        self.used.clear()

    def forget(self, cache_serial: int) -> None:
        """Drop every graph of that cache (it is gone)."""
        self.graphs = {k: v for k, v in self.graphs.items() if k[2] != cache_serial}
        self.used = {k for k in self.used if k[2] != cache_serial}

    def reason(self, cache, B: int, T: int) -> str | None:
        """Why a (B, T) prompt cannot prefill from a graph into `cache`, or None."""
        if cache.seen != 0:
            return "the cache already holds positions"
        if B > cache.batch_capacity:
            return f"batch {B} above the cache's {cache.batch_capacity}"
        if T < 1:
            return "empty prompt"
        Tb = prefill_bucket(T)
        if B * Tb > self.token_cap:
            return f"{B} x {Tb} padded tokens above the prefill graph cap {self.token_cap}"
        if Tb > cache.max_len:
            return f"bucket {Tb} longer than the cache ({cache.max_len})"
        return None

    def run(self, cache, input_ids: torch.Tensor, forward: Callable) -> torch.Tensor | None:
        """The prompt's last-position (B, V) logits, a fresh tensor, with the cache filled as the
        eager prefill fills it; None when the caller must run its eager prefill instead (not eligible,
        first use of the bucket, or the capture failed)."""
        B, T = input_ids.shape
        if self.reason(cache, B, T) is not None:
            return None
        key = (B, prefill_bucket(T), cache.serial, cache.version)
        got = self.graphs.get(key)
        if got is None:
            if key not in self.used:
                self.used.add(key)
                return None
            got = self._try_capture(key, cache, input_ids, forward)
            if got is None:
                return None
        got.inp.fill(input_ids)
        got.graph.replay()
        # clone: the output is the graph's static buffer, overwritten by the next replay
        logits = got.out.clone()
        finish_prefill(cache, B, T)
        return logits

    def _try_capture(self, key, cache, input_ids, forward) -> _Captured | None:
        try:
            return self._capture(key, cache, input_ids, forward)
        except Exception as e:
            cache.seen = 0   # the caller's eager prefill starts from an empty cache
            if self.on_failure is not None:
                self.on_failure(e)
            return None

    def _capture(self, key, cache, input_ids, forward) -> _Captured:
        # graphs of this cache's older buffers can never replay again
        stale = {k for k in self.graphs if k[2] == key[2] and k[3] != key[3]}
        self.graphs = {k: v for k, v in self.graphs.items() if k not in stale}
        t0 = time.perf_counter()
        B, Tb = key[0], key[1]
        inp = PrefillInputs.new(B, Tb, input_ids.device)
        inp.fill(input_ids)
        if self.pool is None or not self.graphs:   # a pool no graph uses may still hold blocks: never reuse it
            self.pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=input_ids.device)
        # warm-up on the capture stream (lazy library init, cuBLAS's per-stream workspace, allocator
        # blocks) outside the pool; it only writes cache slots 0..Tb-1, which this prefill overwrites
        side = self.stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                padded_prefill(forward, cache, inp)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            out = padded_prefill(forward, cache, inp)
        cache.seen = 0
        got = self.graphs[key] = _Captured(graph, inp, out)
        self.captures += 1
        log.info("braid: captured prefill graph (batch %d, %d positions) in %.2fs", B, Tb, time.perf_counter() - t0)
        return got
