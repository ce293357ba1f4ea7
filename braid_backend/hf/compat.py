"""The few places where transformers 5.x versions differ, in one file.

5.17 (GPU machine) names the cache argument `past_key_values`; 5.2x renamed it `cache` (the old
name is still accepted with a deprecation warning, the output field moved to `.cache`)."""
from __future__ import annotations

import functools
import inspect


def cache_kwarg_name(model) -> str:
    return _cache_kwarg_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def stock_forward(model):
    """The class's own forward bound to the model (made per call: stored, it would hold the model)."""
    return type(model).forward.__get__(model)


def stock_generate(model):
    return type(model).generate.__get__(model)


def pop_cache_kwarg(kwargs: dict):
    """Remove and return the cache passed under either name (None when absent)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def output_cache(out):
    for name in ("cache", "past_key_values"):
        val = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if val is not None:
            return val
    return None
