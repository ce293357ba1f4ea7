"""HF's logits processors and stopping criteria -> runtime.sampling.SelectConfig, or why not.

Processors are matched by exact class (a subclass may change what it does) and read through the
arguments their constructors store; anything else, or the standard ones in a non-standard order or
with non-default options the device-side selection does not implement, sends the call to HF's loop.
"""
from __future__ import annotations

import torch
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc

from ..runtime.sampling import NEG_INF, SelectConfig

# HF's order when generate() builds them from a GenerationConfig
_ORDER = (lp.RepetitionPenaltyLogitsProcessor, lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor,
          lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper)


def _ids(t) -> tuple[int, ...]:
    if t is None:
        return ()
    if isinstance(t, torch.Tensor):
        return tuple(int(x) for x in t.flatten().tolist())
    if isinstance(t, (list, tuple)):
        return tuple(int(x) for x in t)
    return (int(t),)


def _plain_filter(p) -> bool:
    return getattr(p, "filter_value", None) == NEG_INF and getattr(p, "min_tokens_to_keep", 1) == 1


def select_config(logits_processor, stopping_criteria, generation_config, prompt_len: int):
    """(SelectConfig, None) for the lists HF prepared for this call, or (None, reason)."""
    kw: dict = {"do_sample": bool(generation_config.do_sample)}
    order = []
    for p in logits_processor:
        t = type(p)
        if t is lp.RepetitionPenaltyLogitsProcessor and getattr(p, "prompt_ignore_length", None) is None:
            kw["repetition_penalty"] = float(p.penalty)
        elif t is lp.MinLengthLogitsProcessor:
            kw["min_new_tokens"] = max(kw.get("min_new_tokens", 0), int(p.min_length) - prompt_len)
            kw["eos"] = _ids(p.eos_token_id)
        elif t is lp.MinNewTokensLengthLogitsProcessor and int(p.prompt_length_to_skip) == prompt_len:
            kw["min_new_tokens"] = max(kw.get("min_new_tokens", 0), int(p.min_new_tokens))
            kw["eos"] = _ids(p.eos_token_id)
        elif t is lp.TemperatureLogitsWarper:
            kw["temperature"] = float(p.temperature)
        elif t is lp.TopKLogitsWarper and getattr(p, "filter_value", None) == NEG_INF:
            kw["top_k"] = int(p.top_k)   # min_tokens_to_keep is already folded into top_k by HF
        elif t is lp.TopPLogitsWarper and _plain_filter(p):
            kw["top_p"] = float(p.top_p)
        elif t is lp.MinPLogitsWarper and _plain_filter(p):
            kw["min_p"] = float(p.min_p)
        else:
            return None, f"logits processor {t.__name__} is not on the fast path"
        order.append(_ORDER.index(t))
    if order != sorted(order):
        return None, "logits processors in a non-standard order"
    eos = ()
    for c in stopping_criteria:
        if type(c) is sc.EosTokenCriteria:
            eos = _ids(c.eos_token_id)
        elif type(c) is not sc.MaxLengthCriteria:
            return None, f"stopping criterion {type(c).__name__} is not on the fast path"
    if "eos" in kw and eos and set(kw["eos"]) != set(eos):
        return None, "min-length EOS ids differ from the stopping EOS ids"
    kw["eos"] = eos or kw.get("eos", ())
    pad = generation_config.pad_token_id
    kw["pad"] = int(pad) if pad is not None else (kw["eos"][0] if kw["eos"] else 0)
    if kw["eos"] and not eos:
        return None, "EOS masked by min-length but no EOS stopping criterion"
    return SelectConfig(**kw), None


def max_length_of(stopping_criteria, default: int) -> int:
    for c in stopping_criteria:
        if type(c) is sc.MaxLengthCriteria:
            return int(c.max_length)
    return default
