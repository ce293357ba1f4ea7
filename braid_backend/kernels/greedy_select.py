"""Greedy token selection for the K-step decode loop in two kernels instead of ~15 small torch ops.

What it computes (`greedy_select_reference` is the specification), per row m of the logits (M, V):
    scores = logits.float(); while count < min_new: scores[eos ids] = -inf      (HF's min-length processors)
    tok    = first index of max(scores)                                           (torch.argmax)
    tok    = pad where done[m]; done[m] |= tok in eos                             (HF's EOS handling)
then the loop's bookkeeping for the next step: out_tok[m] = ids[m] = tok, pos/slots/kv_lens += 1,
all_done = done.all(), count += 1.

Kernel 1 (one program per (row, vocab block)) finds each block's max and its first index; kernel 2 (one
program) reduces the blocks, applies done/EOS and writes everything. Every launch parameter depends on
shapes only and every buffer is preallocated (`GreedyWorkspace`), so it lives in a CUDA graph.
"""
from __future__ import annotations

import torch

from ._common import Tuning, launch, next_pow2, pdl_launch_kwargs, require, tl, triton

if triton is not None:
    from ._common import pdl_wait

BLOCK_V = 4096        # vocabulary positions per program of kernel 1
MAX_EOS = 8           # EOS ids handled in the kernels (more: the caller uses the torch path)

if triton is not None:

    @triton.jit
    def _block_argmax_kernel(
        logits_ptr, stride_lm, V, part_val_ptr, part_idx_ptr, NB,
        count_ptr, eos_ptr, min_new,
        N_EOS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        m = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < V
        x = tl.load(logits_ptr + m * stride_lm + offs, mask=inside, other=float("-inf")).to(tl.float32)
        if N_EOS > 0:
            blocked = tl.load(count_ptr) < min_new
            for e in tl.static_range(N_EOS):
                x = tl.where(blocked & (offs == tl.load(eos_ptr + e)), float("-inf"), x)
        best = tl.max(x, axis=0)
        # first index of the maximum, like torch.argmax (inside the vocabulary only)
        idx = tl.min(tl.where(inside & (x == best), offs, V), axis=0)
        tl.store(part_val_ptr + m * NB + blk, best)
        tl.store(part_idx_ptr + m * NB + blk, idx)

    @triton.jit
    def _finish_kernel(
        part_val_ptr, part_idx_ptr, NB, M, V,
        done_ptr, count_ptr, eos_ptr, pad,
        out_tok_ptr, all_done_ptr, ids_ptr, pos_ptr, slots_ptr, kv_lens_ptr,
        N_EOS: tl.constexpr, M_PAD: tl.constexpr, NB_PAD: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        rows = tl.arange(0, M_PAD)
        blks = tl.arange(0, NB_PAD)
        rmask = rows < M
        tile = rmask[:, None] & (blks[None, :] < NB)
        vals = tl.load(part_val_ptr + rows[:, None] * NB + blks[None, :], mask=tile, other=float("-inf"))
        idxs = tl.load(part_idx_ptr + rows[:, None] * NB + blks[None, :], mask=tile, other=V)
        best = tl.max(vals, axis=1)
        # blocks are in vocabulary order and each holds its first maximum: the smallest index among
        # the blocks that reach the row's maximum is torch.argmax's answer
        tok = tl.min(tl.where(tile & (vals == best[:, None]), idxs, V), axis=1).to(tl.int64)
        done = tl.load(done_ptr + rows, mask=rmask, other=1) != 0
        tok = tl.where(done, pad, tok)
        if N_EOS > 0:
            for e in tl.static_range(N_EOS):
                done = done | (tok == tl.load(eos_ptr + e))
        tl.store(done_ptr + rows, done.to(tl.int8), mask=rmask)
        tl.store(out_tok_ptr + rows, tok, mask=rmask)
        tl.store(ids_ptr + rows, tok, mask=rmask)
        tl.store(pos_ptr + rows, tl.load(pos_ptr + rows, mask=rmask) + 1, mask=rmask)
        tl.store(slots_ptr + rows, tl.load(slots_ptr + rows, mask=rmask) + 1, mask=rmask)
        tl.store(kv_lens_ptr + rows, tl.load(kv_lens_ptr + rows, mask=rmask) + 1, mask=rmask)
        all_done = tl.min(tl.where(rmask, done.to(tl.int32), 1), axis=0)
        tl.store(all_done_ptr, all_done.to(tl.int8))
        tl.store(count_ptr, tl.load(count_ptr) + 1)


class GreedyWorkspace:
    """Per-block partial maxima for M rows of a V-wide vocabulary (allocate outside graph capture)."""

    def __init__(self, M: int, V: int, device):
        self.M, self.V = M, V
        self.nb = triton.cdiv(V, BLOCK_V) if triton is not None else -(-V // BLOCK_V)
        self.val = torch.empty(M, self.nb, dtype=torch.float32, device=device)
        self.idx = torch.empty(M, self.nb, dtype=torch.int32, device=device)


def greedy_select(logits, ws: GreedyWorkspace, *, done, count, eos, min_new: int, pad: int, out_tok, all_done,
                  ids, pos, slots, kv_lens, tuning: Tuning | None = None) -> None:
    """In place, see the module docstring. logits (M, V) any float dtype; done (M,) bool; count () long;
    eos (n,) long, n <= MAX_EOS (its values are only read when min_new > 0 or for the stop test: pass
    a length-0 tensor for none); out_tok, ids, pos, slots (M,) long; kv_lens (M,) int32; all_done a
    one-element bool tensor."""
    M, V = logits.shape
    require(logits.stride(1) == 1, "logits need a unit last stride")
    require((ws.M, ws.V) == (M, V), f"workspace is for {(ws.M, ws.V)}, logits are {(M, V)}")
    require(eos.numel() <= MAX_EOS, f"at most {MAX_EOS} EOS ids")
    require(done.dtype == torch.bool and all_done.dtype == torch.bool and all_done.numel() == 1,
            "done and all_done must be bool tensors, all_done of one element")
    for name, t in (("out_tok", out_tok), ("ids", ids), ("pos", pos), ("slots", slots)):
        require(t.dtype == torch.long and t.shape == (M,), f"{name} must be ({M},) long")
    require(kv_lens.shape == (M,) and kv_lens.dtype == torch.int32, f"kv_lens must be ({M},) int32")
    require(count.dtype == torch.long and count.numel() == 1, "count must be a one-element long tensor")
    n_eos = int(eos.numel())
    eos_arg = eos if n_eos else count   # never read with N_EOS == 0
    pdl = pdl_launch_kwargs(logits.device, tuning)
    launch(_block_argmax_kernel, (M, ws.nb))(
        logits, logits.stride(0), V, ws.val, ws.idx, ws.nb, count, eos_arg, int(min_new),
        N_EOS=n_eos if min_new > 0 else 0, BLOCK=BLOCK_V, num_warps=8, **pdl)
    launch(_finish_kernel, (1,))(
        ws.val, ws.idx, ws.nb, M, V, done.view(torch.int8), count, eos_arg, int(pad),
        out_tok, all_done.view(torch.int8), ids, pos, slots, kv_lens,
        N_EOS=n_eos, M_PAD=max(2, next_pow2(M)), NB_PAD=max(2, next_pow2(ws.nb)), num_warps=4, **pdl)


def greedy_select_reference(logits, *, done, count, eos, min_new: int, pad: int, out_tok, all_done,
                            ids, pos, slots, kv_lens) -> None:
    """The torch specification of `greedy_select` (same in-place effects)."""
    scores = logits.float()
    if eos.numel() and int(count) < min_new:
        scores = scores.index_fill(1, eos, float("-inf"))
    tok = scores.argmax(dim=-1)
    tok = torch.where(done, torch.full_like(tok, pad), tok)
    if eos.numel():
        done |= (tok[:, None] == eos[None, :]).any(dim=-1)
    out_tok.copy_(tok)
    ids.copy_(tok)
    pos.add_(1)
    slots.add_(1)
    kv_lens.add_(1)
    all_done.copy_(done.all().reshape(all_done.shape))
    count.add_(1)
