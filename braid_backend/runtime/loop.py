"""The K-step device loop: K decode steps per CUDA-graph replay, token selection and EOS tracking on
the device, the host looking only once per K steps.

It drives any DecodeStep (runtime/interface.py). hf/runner.py plugs it into HF's generate() (prefill,
the selection config from HF's processors, the returned object); this file knows no HF class.
"""
from __future__ import annotations

import torch

from ..kernels.greedy_select import GreedyWorkspace, greedy_select
from .graphs import GraphKey, GraphRunner
from .interface import DecodeStep, fill_inputs
from .sampling import SelectConfig, SelectState, fused_greedy_ok, select_next


class FastLoop:
    """The K-step body for one (bucket, cache, K, selection config), captured as one graph when a
    runner is given (else run eagerly: the CPU interpreter, graphs=False), plus its device state."""

    def __init__(self, step: DecodeStep, runner: GraphRunner | None, cache, bucket: int, K: int,
                 sel_cfg: SelectConfig):
        self.K, self.bucket, self.step = K, bucket, step
        dev = step.device
        self.sel = SelectState(bucket, step.vocab, sel_cfg, dev)
        # Every step's row of ring / all_done starts 16-byte aligned (rows padded to an even count of
        # longs, all_done one byte of each 16): Triton specialises pointer arguments on 16-byte
        # alignment, so unaligned rows made steps 1..K-1 launch 1-2 other variants of greedy_select's
        # finish kernel than step 0 (more to compile, and missed by the one-step precompile dry run).
        self.ring = torch.zeros(K, bucket + bucket % 2, dtype=torch.long, device=dev)[:, :bucket]
        self.all_done = torch.zeros(K, 16, dtype=torch.bool, device=dev)[:, 0]
        self.ones = torch.ones(bucket, 1, dtype=torch.int8, device=dev)
        # greedy: selection, EOS tracking and the next step's inputs in two kernels instead of ~15 ops
        self.greedy = GreedyWorkspace(bucket, step.vocab, dev) if fused_greedy_ok(sel_cfg) else None
        self.graph = None
        if runner is not None:
            rng = torch.cuda.get_rng_state(dev)
            # the precompile's dry run needs one step, not K: every step launches step 0's variants
            # (same buffers and shapes, aligned ring rows), and each dry step costs ~170 hook calls
            cs = runner.capture(GraphKey.of(bucket, cache, ("fast", K, sel_cfg)), cache,
                                lambda b: self._body(cache, b), warm_slots=K,
                                dry_body=lambda b: self._body(cache, b, steps=1))
            # capture's warm-up drew random numbers: restore, so seeded calls repeat from the first call on
            torch.cuda.set_rng_state(rng, dev)
            self.bufs, self.graph = cs.bufs, cs.graph
        else:
            self.bufs = step.new_buffers(bucket, cache.max_len)

    def _body(self, cache, b, steps: int | None = None):
        for k in range(self.K if steps is None else steps):
            # the token being fed attends to itself: HF appends 1 to attention_mask each step
            cache.valid[:self.bucket].scatter_(1, b.slots[:, None], self.ones)
            logits = self.step.run(cache, b)
            if self.greedy is not None:
                sel = self.sel
                greedy_select(logits, self.greedy, done=sel.done, count=sel.count, eos=sel.eos,
                              min_new=sel.cfg.min_new_tokens, pad=sel.cfg.pad, out_tok=self.ring[k],
                              all_done=self.all_done[k:k + 1], ids=b.ids, pos=b.pos, slots=b.slots,
                              kv_lens=b.kv_lens, tuning=self.step.tuning)
                continue
            tok = select_next(logits, self.sel, self.step.agree)
            self.ring[k].copy_(tok)
            self.all_done[k] = self.sel.done.all()
            b.ids.copy_(tok)
            b.pos.add_(1)
            b.slots.add_(1)
            b.kv_lens.add_(1)
        return self.ring

    def run(self, cache) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body(cache, self.bufs)


def decode_tokens(loop: FastLoop, cache, prompt_ids: torch.Tensor, last_logits: torch.Tensor,
                  next_pos: torch.Tensor, new: int, streamer=None) -> torch.Tensor:
    """Pick the first token from the prefill's last logits, then run the loop until `new` tokens or
    every row has hit EOS. Returns the (B, n) new tokens (n <= new); the cache holds all but the last
    (it is returned, not fed, as in HF's loop). `streamer` gets each step's (B,) tokens via put()."""
    B, T = prompt_ids.shape
    sel = loop.sel
    sel.reset(prompt_ids, B)
    first = select_next(_pad_rows(last_logits, loop.bucket), sel, loop.step.agree)
    tokens = [first[:B, None]]
    n_new = 1
    if streamer is not None:
        streamer.put(first[:B].cpu())
    done_host = bool(sel.done[:B].all()) if sel.cfg.eos else False
    # the first token goes in at slot T, at RoPE position last prompt position + 1
    fill_inputs(loop.bufs, cache, first[:B], next_pos, T)
    while n_new < new and not done_host:
        loop.run(cache)
        # the one host sync per K steps; copy=True because on CPU .cpu() would alias the ring
        ring, all_done = loop.ring.to("cpu", copy=True), loop.all_done.to("cpu", copy=True)
        stop = min(loop.K, new - n_new)
        if sel.cfg.eos:
            hit = torch.nonzero(all_done[:stop])
            if hit.numel():
                stop = int(hit[0]) + 1
                done_host = True
        chunk = ring[:stop, :B]
        tokens.append(chunk.t().to(prompt_ids.device, non_blocking=True))
        if streamer is not None:
            for row in chunk:
                streamer.put(row)
        n_new += stop
    cache.seen = T + n_new - 1
    return torch.cat(tokens, dim=1)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])
