"""Numerics helpers for tests and the bench: an fp32 reference, random prompts, and (re-exported)
the teacher-forced logits and relative error that every correctness check uses.

Rule of thumb (DESIGN.md): a fused path is judged by its error against the fp32 reference, which may be
at most ~2x the stock model's own error in the same dtype.
"""
from __future__ import annotations

import copy

import torch

from ..api import is_patched
from ..hf.logits import rel_err, teacher_forced_logits

__all__ = ["rel_err", "teacher_forced_logits", "fp32_reference_logits", "random_tokens"]


@torch.no_grad()
def fp32_reference_logits(model, prompt, cont, attention_mask=None) -> torch.Tensor:
    """Teacher-forced logits of an fp32 copy of the stock model (the reference for every error)."""
    if is_patched(model):
        raise ValueError("fp32_reference_logits needs the stock model: call it before patch() or after unpatch()")
    ref = copy.deepcopy(model).float()
    try:
        return teacher_forced_logits(ref, prompt, cont, attention_mask)
    finally:
        del ref


def random_tokens(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)
