"""The contract between a decode backend and the runtime that drives it.

runtime/ (graphs, the K-step loop) knows a backend only through these two protocols, so a second
backend (a persistent CUDA kernel, say) drops in without touching it. model/step.py's DecodeStep is
the Triton implementation; it satisfies them structurally and imports nothing from here.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StepBuffers(Protocol):
    """Static tensors of one decode step for M rows. The runtime writes the four inputs (see
    fill_inputs) and reads the logits; everything else in it is the backend's business."""

    M: int
    max_len: int
    ids: torch.Tensor       # (M,) long: the token each row feeds
    pos: torch.Tensor       # (M,) long: its RoPE position
    slots: torch.Tensor     # (M,) long: the cache slot its key/value go to
    kv_lens: torch.Tensor   # (M,) int32: cache positions it attends (slot + 1)
    logits: torch.Tensor    # (M, vocab): the step's output


@runtime_checkable
class DecodeStep(Protocol):
    """One decode step of a patched model over a KV cache (see runtime/cache.py for its layout)."""

    backend: str
    device: torch.device
    dtype: torch.dtype
    vocab: int
    num_layers: int
    n_kv_heads: int
    head_dim: int
    tuning: object          # braid_backend.Tuning: the launch knobs its kernels and the runtime's take

    def new_buffers(self, M: int, max_len: int) -> StepBuffers:
        """Buffers for M rows over caches of max_len positions (allocates: never inside a capture)."""

    def prepare(self, max_len: int) -> None:
        """Make whatever positions < max_len need (tables); called outside any captured graph."""

    def run(self, cache, bufs: StepBuffers) -> torch.Tensor:
        """One step for all bufs.M rows: no host sync, no allocation; returns bufs.logits."""

    def agree(self, tokens: torch.Tensor) -> None:
        """Make `tokens` equal on every process that runs this step together (tensor parallelism: rank
        0's, by broadcast); a no-op on one device. Device tensors: no host sync, capturable. Host
        tensors (random states) also work, outside captures."""

    def weights_moved(self) -> bool:
        """True once the model's parameters are no longer the ones this step was built from."""

    def release(self) -> None:
        """Give back what the backend holds (fused weights, tables)."""


def fill_inputs(bufs: StepBuffers, cache, ids: torch.Tensor, pos: torch.Tensor | None, slot: int) -> None:
    """Point a step at the next position: rows [:B] feed `ids` (B,) at RoPE positions `pos` (None:
    `slot`), every row writes cache slot `slot` and attends slot + 1 positions. Rows [B:M] are padding
    of a batch bucket: token 0 at position 0, with no valid cache position (they attend nothing)."""
    B = ids.shape[0]
    if B < bufs.M:
        bufs.ids[B:].zero_()
        bufs.pos[B:].zero_()
        cache.valid[B:bufs.M].zero_()
    bufs.ids[:B].copy_(ids)
    if pos is None:
        bufs.pos[:B].fill_(slot)
    else:
        bufs.pos[:B].copy_(pos)
    bufs.slots.fill_(slot)
    bufs.kv_lens.fill_(slot + 1)
