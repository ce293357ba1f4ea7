"""Static KV cache that speaks HF's Cache API.

Storage is static: per layer a (B_max, n_kv, S_max, head_dim) key and value buffer, plus a
(B_max, S_max) int8 `valid` mask (0 for left padding). The fused decode kernels read and write these
buffers directly; HF's stock prefill reaches them through `Cache.update`, which writes the prompt's
keys/values in place and returns the filled prefix, so from HF's side it behaves like a dynamic cache
(no 4D static masks, no compile requirements) while its memory never moves between decode steps.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


LEN_ROUND = 256          # cache lengths are rounded so that buffers and graphs are reused across prompts
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def batch_bucket(b: int) -> int:
    """The batch size a cache and its graphs are made for: the next bucket at or above b."""
    for size in BATCH_BUCKETS:
        if b <= size:
            return size
    return round_up(b, BATCH_BUCKETS[-1])


class CacheTooSmall(RuntimeError):
    pass


class BraidLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: "BraidCache", idx: int):
        super().__init__()
        # a weak link: cache <-> layer would be a reference cycle, and a cache in a cycle frees its
        # buffers (and lets the patch drop graphs captured on them) only when the cyclic GC runs
        self._owner, self.idx = weakref.ref(owner), idx
        self.keys, self.values = owner.k[idx], owner.v[idx]
        self.device = self.keys.device
        self.is_initialized = True

    @property
    def owner(self) -> "BraidCache":
        o = self._owner()
        if o is None:
            raise RuntimeError("braid cache layer used after its BraidCache was freed")
        return o

    def lazy_initialization(self, key_states, value_states) -> None:  # storage exists from the start
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        B, _, q, _ = key_states.shape
        start, r0 = o.seen, o.row0
        if r0 + B > o.batch_capacity:
            raise CacheTooSmall(f"rows {r0}..{r0 + B - 1} exceed the braid cache's capacity {o.batch_capacity}")
        if start + q > o.max_len:
            raise CacheTooSmall(f"{start + q} positions exceed the braid cache's length {o.max_len}")
        self.keys[r0:r0 + B, :, start:start + q].copy_(key_states)
        self.values[r0:r0 + B, :, start:start + q].copy_(value_states)
        if self.idx == o.num_layers - 1:
            o.seen = start + q
        if start == 0 and key_states.dtype == self.keys.dtype and value_states.dtype == self.values.dtype:
            # a whole prompt in one forward: attend the states themselves, as stock's dynamic cache does
            # (same values as the cache prefix, the projection's layout). H100, Qwen2.5-0.5B, 8192-token
            # eager prefill with this: SDPA 7.2 ms, as stock (results/2026-11-26-h100-s6 runE); on the
            # cache view the eager TTFT had been 53 vs 35 ms (runA, not profiled). The 3x slower SDPA seen
            # at first was the captured prefill's explicit mask (runtime/prefill.py), not this layout.
            return key_states, value_states
        return self.keys[r0:r0 + B, :, :start + q], self.values[r0:r0 + B, :, :start + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_max_length(self) -> int:
        return -1  # grows on demand (outside captured graphs), like a dynamic cache

    def reset(self) -> None:
        self.owner.seen = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("the braid cache does not support beam search; generate() routes it to stock")


_SERIALS = itertools.count(1)


class BraidCache(Cache):
    """One static buffer per layer; `seen` (a host int) is the number of filled positions.

    `row0` (a host int, 0 but inside `rows()`) is the first cache row that a forward of B sequences
    writes: the eager prefill of a large batch runs a group of rows at a time (hf/runner.py)."""

    def __init__(self, num_layers: int, batch_capacity: int, n_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device, owner_id: int = 0):
        # owner_id: the serial of the PatchSession that made it (0: none), so a session recognises its own
        self.num_layers, self.batch_capacity = num_layers, batch_capacity
        self.n_kv_heads, self.head_dim, self.max_len = n_kv_heads, head_dim, max_len
        self.dtype, self.device_ = dtype, torch.device(device)
        self.owner_id = owner_id
        # unique for the life of the process (id() is reused after a cache is freed): graph keys use it
        self.serial = next(_SERIALS)
        shape = (batch_capacity, n_kv_heads, max_len, head_dim)
        # torch.empty, not zeros: positions are only read after being written, and `valid` masks the rest.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch_capacity, max_len, dtype=torch.int8, device=device)
        self.seen = 0
        self.row0 = 0
        self.version = 0   # bumped when buffers are re-allocated: captured graphs must be re-captured
        super().__init__(layers=[BraidLayer(self, i) for i in range(num_layers)])

    # -- helpers for the patched forward -------------------------------------------------------
    def fits(self, batch: int, length: int) -> bool:
        return batch <= self.batch_capacity and length <= self.max_len

    @contextlib.contextmanager
    def rows(self, r0: int):
        """Inside: forwards write cache rows r0.. (update, mark_prefill). Only for a prefill from position
        0 (each group is a whole prompt of its rows); decode steps always run on rows 0.. of the batch."""
        if not 0 <= r0 < self.batch_capacity:
            raise CacheTooSmall(f"row {r0} outside the braid cache's capacity {self.batch_capacity}")
        prev = self.row0
        self.row0 = r0
        try:
            yield self
        finally:
            self.row0 = prev

    def mark_prefill(self, attention_mask: torch.Tensor | None, batch: int, q_len: int) -> None:
        """Record which of the positions about to be written are real tokens (not left padding)."""
        start, r0 = self.seen, self.row0
        if start + q_len > self.max_len:
            raise CacheTooSmall(f"{start + q_len} positions exceed the braid cache's length {self.max_len}")
        if r0 + batch > self.batch_capacity:
            raise CacheTooSmall(f"rows {r0}..{r0 + batch - 1} exceed the braid cache's capacity {self.batch_capacity}")
        dst = self.valid[r0:r0 + batch, start:start + q_len]
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != batch
                                           or attention_mask.shape[1] < q_len):
            # RuntimeError like stock's shape mismatch, but saying which argument is wrong
            raise RuntimeError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the "
                               f"{q_len} new positions of {batch} sequences")
        if attention_mask is None:
            dst.fill_(1)
        else:
            dst.copy_(attention_mask[:, -q_len:])

    @torch.no_grad()
    def grow(self, new_len: int) -> None:
        """Re-allocate every buffer with `new_len` positions, keeping the filled prefix."""
        n = self.seen
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = torch.empty(old.shape[:2] + (new_len,) + old.shape[3:], dtype=old.dtype, device=old.device)
                new[:, :, :n].copy_(old[:, :, :n])
                bufs[i] = new
        valid = torch.zeros(self.batch_capacity, new_len, dtype=torch.int8, device=self.valid.device)
        valid[:, :n].copy_(self.valid[:, :n])
        self.valid, self.max_len = valid, new_len
        for i, layer in enumerate(self.layers):
            layer.keys, layer.values = self.k[i], self.v[i]
        self.version += 1

    def release(self) -> None:
        self.k.clear()
        self.v.clear()
        for layer in self.layers:
            layer.keys = layer.values = None
        self.valid = None
        self.seen = self.row0 = 0
