"""Tensor-parallel all-reduce of row-parallel partial sums with the residual add, as one Triton kernel.

Every rank's row-parallel GEMV writes its partial sums into a slot of a buffer that all ranks can
address (symmetric memory: `ptrs[r]` is rank r's buffer, mapped into this process). This kernel then,
per program (a block of the (M, N) output):
  1. waits for the previous kernel (PDL) and tells every peer "my slot is written" by storing an epoch
     into the peer's flag word for (this rank, this program), with release semantics at system scope;
  2. waits until every peer's flag word here holds that epoch (acquire), then reads all ranks' slots,
     sums them in rank order in fp32 (the same order on every rank: bit-identical results), rounds
     like the reduce of bf16 partials does, adds the bias and the residual with HF's cast points.

Why not torch's one-shot symmetric-memory all-reduce: that op has a barrier of its own and is not a
PDL kernel, so the next GEMV can only launch after it ends and cannot prefetch its weights while the
reduce waits on NVLink (benchmarks/NOTES.md, TP section). Here the flags are the only barrier and the
kernel is part of the PDL chain.

Epochs, not resets: each program keeps a counter in this rank's (ordinary) memory and bumps it on
every call, so flags never need clearing. Every rank makes the same sequence of calls, so the epochs
agree. Two slots that alternate (attention output, MLP output) make reuse safe: a peer can be at most
one call ahead of this rank's reads (its next call waits for this rank's next signal), so it never
overwrites the slot this rank is still reading.
"""
from __future__ import annotations


import torch

from ._common import BF16_RNE_FIX, Tuning, launch, pdl_launch_kwargs, require, tl, triton

if triton is not None:
    from ._common import pdl_wait, round_to

    @triton.jit
    def _tp_reduce_kernel(data_ptrs, flag_ptrs, counters, bias, res, out, n_elem, N, slot_off,
                          RANK: tl.constexpr, WORLD: tl.constexpr, NPROG: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, DTYPE: tl.constexpr,
                          BLOCK: tl.constexpr, BF16_FIX: tl.constexpr, USE_PDL: tl.constexpr,
                          LOAD_CG: tl.constexpr):
        pid = tl.program_id(0)
        pdl_wait(USE_PDL)
        epoch = tl.load(counters + pid) + 1
        tl.store(counters + pid, epoch)
        # signal: the GEMV before us has finished writing this rank's slot
        for q in tl.static_range(WORLD):
            if q != RANK:
                peer_flags = tl.load(flag_ptrs + q).to(tl.pointer_type(tl.int64))
                tl.atomic_xchg(peer_flags + RANK * NPROG + pid, epoch, sem="release", scope="sys")
        own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int64))
        for q in tl.static_range(WORLD):
            if q != RANK:
                seen = tl.atomic_add(own_flags + q * NPROG + pid, 0, sem="acquire", scope="sys")
                while seen < epoch:
                    seen = tl.atomic_add(own_flags + q * NPROG + pid, 0, sem="acquire", scope="sys")
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for q in tl.static_range(WORLD):
            base = tl.load(data_ptrs + q).to(tl.pointer_type(DTYPE))
            # an earlier call read this slot's addresses and a non-coherent L1 may still hold them: bypass
            # it (.cg, vector loads) or read volatile (scalar loads: slow over NVLink at batch 16)
            if LOAD_CG:
                v = tl.load(base + slot_off + offs, mask=mask, other=0.0, cache_modifier=".cg")
            else:
                v = tl.load(base + slot_off + offs, mask=mask, other=0.0, volatile=True)
            acc += v.to(tl.float32)
        y = round_to(acc, DTYPE, BF16_FIX)                       # the reduced partial sums, as stock TP holds them
        if HAS_BIAS:
            y = round_to(y + tl.load(bias + offs % N, mask=mask, other=0.0).to(tl.float32), DTYPE, BF16_FIX)
        if HAS_RES:
            y = round_to(tl.load(res + offs, mask=mask, other=0.0).to(tl.float32) + y, DTYPE, BF16_FIX)
        tl.store(out + offs, y.to(DTYPE), mask=mask)


BLOCK = 1024   # elements per program: Llama-8B's hidden 4096 at batch 1 is 4 programs, 4 flag pairs


def programs_for(n_elem: int) -> int:
    return triton.cdiv(n_elem, BLOCK)


def tp_reduce(data_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, counters: torch.Tensor, slot_off: int,
              rank: int, world: int, out: torch.Tensor, *, residual: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, nprog: int | None = None,
              tuning: Tuning | None = None) -> torch.Tensor:
    """out (M, N) <- [residual +] [bias +] sum over ranks r of slot(r), see the module docstring.

    data_ptrs / flag_ptrs: int64 (world,) device tensors, rank r's slot buffer / flag words (int64,
    world x nprog) base addresses; slot_off: element offset of the slot in the data buffers (same on
    every rank); counters: int64 (>= programs,) this rank's epochs, zero at first use. nprog: the row
    length of the flag words (defaults to what this call uses)."""
    M, N = out.shape
    n = M * N
    grid = programs_for(n)
    nprog = grid if nprog is None else nprog
    require(out.is_contiguous(), "out must be contiguous")
    require(grid <= nprog and counters.numel() >= grid, "flag/counter space smaller than the call")
    require(data_ptrs.dtype == torch.int64 and flag_ptrs.dtype == torch.int64 and counters.dtype == torch.int64,
            "pointer tables and counters are int64")
    require(data_ptrs.numel() == world and flag_ptrs.numel() == world, "one pointer per rank")
    require(0 <= rank < world, "rank out of range")
    if residual is not None:
        require(residual.shape == out.shape and residual.is_contiguous() and residual.dtype == out.dtype,
                "residual must match out")
    if bias is not None:
        require(bias.shape == (N,), "bias must be (N,)")
    dummy = out
    dt = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[out.dtype]
    # launch(): a precompile dry run must never launch this one (it signals peers)
    launch(_tp_reduce_kernel, (grid,))(
        data_ptrs, flag_ptrs, counters, bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, n, N, int(slot_off),
        RANK=rank, WORLD=world, NPROG=nprog, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        DTYPE=dt, BLOCK=BLOCK, BF16_FIX=BF16_RNE_FIX, LOAD_CG=(tuning is None or tuning.tp_reduce_load == "cg"), num_warps=4,
        **pdl_launch_kwargs(out.device, tuning))
    return out


def tp_reduce_reference(slots: list[torch.Tensor], *, residual: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `tp_reduce` computes from the ranks' slots (rank order), in torch: the partials summed in
    fp32 and rounded once (the reduce), then + bias and + residual, each rounded (HF's cast points)."""
    dt = slots[0].dtype
    acc = torch.zeros(slots[0].shape, dtype=torch.float32, device=slots[0].device)
    for s in slots:
        acc += s.float()
    y = acc.to(dt)
    if bias is not None:
        y = (y.float() + bias.float()).to(dt)
    if residual is not None:
        y = (residual.float() + y.float()).to(dt)
    return y
