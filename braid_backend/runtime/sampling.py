"""Token selection on the device, with no host syncs, so it can live inside a captured graph.

Mirrors the HF logits processors generate() would build for the same GenerationConfig, in HF's
order: repetition penalty, min_length / min_new_tokens (EOS masked), then, when sampling,
temperature, top-k, top-p, min-p. Sampling draws with the exponential-race trick
(argmax(p / E), E ~ Exp(1)), which samples exactly from p like torch.multinomial but needs no host
round-trip; it uses torch's CUDA generator, which graph replays advance, so seeded calls repeat.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.greedy_select import MAX_EOS

NEG_INF = float("-inf")

# hf/select.py builds a SelectConfig from the processors HF prepared for a generate() call (or says
# why it cannot); this file knows no HF class.


@dataclass(frozen=True)
class SelectConfig:
    do_sample: bool
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0      # min_length folded in (min_length - prompt length)
    eos: tuple[int, ...] = ()
    pad: int = 0


def fused_greedy_ok(cfg: SelectConfig) -> bool:
    """Settings kernels/greedy_select.py implements (the rest runs select_next's torch ops)."""
    return not cfg.do_sample and cfg.repetition_penalty == 1.0 and len(cfg.eos) <= MAX_EOS


class SelectState:
    """Per-row device state of one generate() call: finished flags, tokens seen, step counter."""

    def __init__(self, M: int, vocab: int, cfg: SelectConfig, device):
        self.done = torch.zeros(M, dtype=torch.bool, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)   # tokens generated so far
        self.seen = torch.zeros(M, vocab, dtype=torch.bool, device=device) if cfg.repetition_penalty != 1.0 else None
        self.eos = torch.tensor(cfg.eos or (-1,), dtype=torch.long, device=device)
        self.cfg = cfg

    def reset(self, input_ids: torch.Tensor, active: int) -> None:
        """New call: rows >= active are padding rows of the graph bucket and count as finished."""
        self.done.zero_()
        self.done[active:] = True
        self.count.zero_()
        if self.seen is not None:
            self.seen.zero_()
            self.seen[:active].scatter_(1, input_ids, True)


def process_scores(scores: torch.Tensor, st: SelectState) -> torch.Tensor:
    """HF's processors and warpers on fp32 scores (M, V), in HF's order."""
    c = st.cfg
    if st.seen is not None:
        pen = torch.where(scores < 0, scores * c.repetition_penalty, scores / c.repetition_penalty)
        scores = torch.where(st.seen, pen, scores)
    if c.min_new_tokens > 0 and c.eos:
        block = st.count < c.min_new_tokens
        eos_scores = scores[:, st.eos]
        scores = scores.index_copy(1, st.eos, torch.where(block, torch.full_like(eos_scores, NEG_INF), eos_scores))
    if not c.do_sample:
        return scores
    if c.temperature != 1.0:
        scores = scores / c.temperature
    if c.top_k:
        k = min(c.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if c.top_p < 1.0:
        sorted_scores, idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - c.top_p)
        remove[:, -1:] = False
        scores = scores.masked_fill(remove.scatter(1, idx, remove), NEG_INF)
    if c.min_p is not None:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < c.min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(remove, NEG_INF)
    return scores


def select_next(logits: torch.Tensor, st: SelectState, agree=None) -> torch.Tensor:
    """Next token per row (M,), with finished rows emitting pad; updates st in place. `agree(tok)`
    makes a sampled draw equal on every tensor-parallel rank (greedy needs nothing: the logits are
    bit-identical on every rank)."""
    scores = process_scores(logits.float(), st)
    if st.cfg.do_sample:
        probs = torch.softmax(scores, dim=-1)
        race = torch.empty_like(probs).exponential_()
        tok = (probs / race).argmax(dim=-1)
        if agree is not None:
            agree(tok)
    else:
        tok = scores.argmax(dim=-1)
    tok = torch.where(st.done, torch.full_like(tok, st.cfg.pad), tok)
    if st.cfg.eos:
        st.done |= (tok[:, None] == st.eos[None, :]).any(dim=-1)  # not isin: keep it a plain kernel
    if st.seen is not None:
        st.seen.scatter_(1, tok[:, None], True)
    st.count += 1
    return tok
