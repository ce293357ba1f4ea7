"""A prefill forward that hands SDPA no mask (is_causal=True), also while a CUDA graph captures it.

Why: transformers' `_ignore_causal_mask_sdpa` skips the causal mask only when it is not "tracing", and
its `is_tracing()` counts CUDA stream capture as tracing. So the captured prefill of an unpadded prompt
got an explicit (T, T) boolean mask, is_causal=False and no GQA, where the eager (and stock) prefill of
the same prompt gets mask=None, is_causal=True and GQA: on an H100, Qwen2.5-0.5B at 8192 tokens,
22.5 ms of attention instead of 7.2 (benchmarks/results/2026-11-26-h100-s6, runE).

How: an attention implementation registered under our own name, whose attention function is HF's own
SDPA one and whose mask function returns no mask. The model's configs point at it only for the duration
of such a forward. Used only where no mask is the exact answer: SDPA models whose layers are all full
causal attention (no sliding windows), for prompts without padding into an empty cache (the prefill
graph's own eligibility; hf/routing.py's maskless_reason says which models).
"""
from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("braid_backend")

NAME = "braid_causal_sdpa"
_registered: bool | None = None


def _no_mask(*args, **kwargs):
    return None


def _register() -> bool:
    global _registered
    if _registered is None:
        try:
            from transformers import AttentionInterface
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
            from transformers.masking_utils import AttentionMaskInterface

            AttentionInterface.register(NAME, sdpa_attention_forward)
            AttentionMaskInterface.register(NAME, _no_mask)
            _registered = True
        except Exception as e:   # another transformers layout: the prefill keeps HF's own mask
            log.info("braid: prefill without a mask unavailable (%s: %s)", type(e).__name__, e)
            _registered = False
    return _registered


def _configs(model) -> list:
    seen, out = set(), []
    for m in [model, *model.modules()]:
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation_internal"):
            seen.add(id(cfg))
            out.append(cfg)
    return out


def maskless_available() -> bool:
    """Whether the no-mask attention implementation is registered (hf/routing.py's maskless_reason
    decides per model)."""
    return _register()


@contextlib.contextmanager
def causal_without_mask(model):
    """Inside: the model's SDPA layers get no mask and is_causal=True for a multi-token forward.
    Only for an unpadded prompt into an empty cache on a model with routing.maskless_reason(model) None."""
    cfgs = [c for c in _configs(model) if c._attn_implementation_internal == "sdpa"]
    for c in cfgs:
        c._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for c in cfgs:
            c._attn_implementation_internal = "sdpa"
