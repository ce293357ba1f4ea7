"""generate(): route each call to the fastest path that reproduces HF's behaviour exactly.

1. fast path (runtime.fastgen): prefill, then K decode steps per host round-trip from CUDA graphs with
   device-side token selection; only for settings it implements.
2. HF's own loop with the braid cache: every step goes through the patched forward (fused kernels,
   graph replay on CUDA). Everything HF supports that needs per-step host logic lands here.
3. stock: beam search, assisted decoding, a cache the caller passed, other cache implementations.
"""
from __future__ import annotations

import copy
import logging

log = logging.getLogger("braid_backend")


def resolve_generation_config(model, kwargs: dict):
    cfg = kwargs.get("generation_config")
    cfg = copy.deepcopy(cfg if cfg is not None else model.generation_config)
    cfg.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return cfg


def stock_reason(cfg, kwargs: dict) -> str | None:
    """Why this generate() call must run fully stock, or None."""
    if any(kwargs.get(k) is not None for k in ("cache", "past_key_values")):
        return "the caller passed its own cache"
    if (getattr(cfg, "num_beams", 1) or 1) > 1:
        return "beam search"
    if kwargs.get("assistant_model") is not None or getattr(cfg, "prompt_lookup_num_tokens", None):
        return "assisted decoding"
    if getattr(cfg, "cache_implementation", None) not in (None, "dynamic"):
        return f"cache_implementation={cfg.cache_implementation!r}"
    if getattr(cfg, "use_cache", True) is False:
        return "use_cache=False"
    return None


def input_shape(args, kwargs) -> tuple[int, int] | None:
    x = kwargs.get("input_ids", kwargs.get("inputs"))
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None or not hasattr(x, "shape") or x.dim() < 2:
        return None
    return int(x.shape[0]), int(x.shape[1])


def braid_generate(st, model, orig_generate, *args, **kwargs):
    if st.options.get("disabled"):
        return orig_generate(*args, **kwargs)
    cfg = resolve_generation_config(model, kwargs)
    why = stock_reason(cfg, kwargs)
    shape = input_shape(args, kwargs)
    if why is None and shape is None:
        why = "no input_ids/inputs_embeds tensor to size the cache from"
    if why is not None:
        log.info("braid: generate() runs stock: %s", why)
        st.stats["generate_stock"] += 1
        st.last_path = f"stock ({why})"
        return orig_generate(*args, **kwargs)
    B, T = shape
    B *= max(1, getattr(cfg, "num_return_sequences", 1) or 1)
    new = cfg.max_new_tokens if cfg.max_new_tokens is not None else max(cfg.max_length - T, 0)
    K = int(st.options.get("graph_steps", 8))
    with st.lock:
        # K spare positions: a K-step graph may run past the last needed token, and its capture warms
        # up on the cache's last K slots
        cache = st.shared_cache(B, T + new + K + 1)
        kwargs[st.cache_key] = cache
        if kwargs.get("custom_generate") is None:
            from ..runtime.fastgen import fast_generate

            # HF hands a callable custom_generate only the keyword arguments that _sample lacks, so
            # the streamer travels under its own name (HF still puts the prompt to it itself)
            def decoding_method(model_self, input_ids, braid_streamer=None, **kw):
                return fast_generate(st, model_self, input_ids, streamer=braid_streamer, **kw)

            kwargs["custom_generate"] = decoding_method
            if kwargs.get("streamer") is not None:
                kwargs["braid_streamer"] = kwargs["streamer"]
        else:
            st.last_path = "hf (custom_generate given)"
            st.stats["generate_hf_loop"] += 1
        return orig_generate(*args, **kwargs)
