"""Teacher-forced logits through an HF forward: the yardstick verify=True and the tests use.

Random-weight models repeat one token under greedy decoding, so equal greedy tokens prove little.
Instead we feed the same token sequence to each model (prefill of a prompt, then one token per
decode step through the KV cache) and compare the logits of every step.
"""
from __future__ import annotations

import torch

from .compat import cache_kwarg_name, output_cache


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in fp64; NaN anywhere gives inf."""
    a64, r64 = a.double(), ref.double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return ((a64 - r64).norm() / r64.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def teacher_forced_logits(model, prompt: torch.Tensor, cont: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *, forward=None,
                          cache=None) -> torch.Tensor:
    """Logits (steps, B, V) in fp32: the prefill's last position, then one per fed continuation token.

    Runs the model the way generate() drives it: a forward with a cache for the prompt, then
    single-token forwards reusing the returned cache. `forward` replaces model.__call__ (verify runs
    the stock and the patched forward of one model); `cache` is the prefill's cache (default: none
    passed, so the stock model makes a DynamicCache and a patched one its braid cache)."""
    fwd = forward if forward is not None else model
    B = prompt.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(prompt)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    key = cache_kwarg_name(model)
    extra = {key: cache} if cache is not None else {}
    out = fwd(input_ids=prompt, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    logits = [out.logits[:, -1].float()]
    cache = output_cache(out)
    for i in range(cont.shape[1]):
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = fwd(input_ids=cont[:, i:i + 1], attention_mask=mask, position_ids=pos, use_cache=True,
                  **{key: cache})
        logits.append(out.logits[:, -1].float())
        cache = output_cache(out)
    return torch.stack(logits)
