"""Prefill of quantized models where the stock modules cannot run: installed by DecodeStep, removed by release().

Prefill (more than one new token per sequence) runs the stock HF modules writing into braid's static cache,
so every quantized Linear's own forward must work:
  FineGrainedFP8 `FP8Linear.forward` -> fp8_linear -> DeepGEMM or the `kernels-community/finegrained-fp8` Triton
    kernel, both loaded from the Hugging Face hub at run time by the `kernels` package (transformers 5.17 and 5.24:
    `is_kernels_available()` first, then `lazy_load_kernel("finegrained-fp8")`; without them it raises
    `ImportError: finegrained-fp8 kernel unavailable`). Where that kernel is (or can be) loaded, stock stays;
    otherwise each FP8Linear gets an instance-level forward calling quant_linear_prefill.
  compressed-tensors: a model-level forward pre-hook (`model.ct_decompress_hook`) decompresses every module to
    dense bf16 on the first forward (2-4x the memory, and the step's views of the quantized tensors go stale).
    The hook is taken off the model while patched (and put back, at its place, by release()); each compressed
    Linear's forward (compressed-tensors' own instance forward, saved) becomes quant_linear_prefill.
quant_linear_prefill runs the tensor-core tiles of kernels/quant_gemv.py over all rows: weights stay quantized,
dequantised in the load path (exact fp32 values), fp32 accumulation; no dense copy of any weight.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..kernels.quant_gemv import quant_linear_prefill
from .quant import main_tensor, quant_weight


def stock_fp8_runs() -> tuple[bool, str]:
    """(True, how) where transformers' FP8Linear.forward can run (its hub kernel loaded or loadable), else
    (False, why not): the same checks transformers makes (integrations/finegrained_fp8.py, 5.17 and 5.24)."""
    try:
        from transformers.integrations import finegrained_fp8 as f
        from transformers.utils.import_utils import is_kernels_available
    except Exception as e:   # another transformers layout: our forward always works
        return False, f"transformers' finegrained_fp8 integration not importable ({type(e).__name__}: {e})"
    if getattr(f, "_FINEGRAINED_FP8", None) is not None:
        return True, "the finegrained-fp8 hub kernel is loaded"
    if not is_kernels_available():
        return False, ("the `kernels` package is not installed, so stock FP8Linear.forward raises ImportError (its "
                       "finegrained-fp8 kernel is fetched from the Hugging Face hub at run time)")
    load = getattr(f, "load_finegrained_fp8_kernel", None)
    if load is None:
        return False, "this transformers has no load_finegrained_fp8_kernel"
    try:
        load()   # what the first stock forward would do (a hub download where the cache lacks it)
    except Exception as e:
        return False, f"the finegrained-fp8 hub kernel does not load ({type(e).__name__}: {e})"
    return True, "the finegrained-fp8 hub kernel loads"


class QuantLinearForward:
    """A quantized Linear's forward while patched: y = x @ dequantize(W)^T + bias (quant_linear_prefill).
    Holds the module weakly (no cycle) and re-reads its QuantWeight when its tensors are replaced."""

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)
        self._key = None
        self._qw = None

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        m = self._module()
        key = tuple(p.data_ptr() for p in m._parameters.values() if p is not None)
        if key != self._key:
            self._qw, self._key = quant_weight(m), key
        if self._qw is None:   # dequantised in place by someone: a dense Linear now
            return torch.nn.functional.linear(input, main_tensor(m), m.bias)
        return quant_linear_prefill(input, self._qw, m.bias)


class QuantPrefill:
    """What the patched model's prefill needs from its quantized modules (the module docstring)."""

    def __init__(self, qplan):
        self.qplan = qplan
        self.forwards: list[tuple[nn.Module, bool, object]] = []   # (module, had an instance forward, it)
        self.hook = None             # (model ref, handle, hook fn, pre-hook order) taken off the model
        self.how = ""                # the report's line

    def install(self) -> None:
        q = self.qplan
        model = q.model()
        if q.method == "bitsandbytes":
            self.how = "stock Linear4bit.forward (bitsandbytes dequantises and multiplies)"
            return
        if q.method == "compressed-tensors":
            self._take_hook(model)
            why = ("compressed-tensors modules have no quantized forward of their own (stock decompresses the whole "
                   "model to dense on its first forward; that hook is off while patched, back after unpatch())")
        else:
            ok, why = stock_fp8_runs()
            if ok:
                self.how = f"stock FP8Linear.forward ({why}; stock quantizes the activations to fp8 per 128-block)"
                return
        for m in q.modules.values():
            had = "forward" in vars(m)
            self.forwards.append((m, had, vars(m).get("forward")))
            m.forward = QuantLinearForward(m)
        self.how = ("quant_linear_prefill on every quantized Linear (Triton tensor-core tiles dequantising in the "
                    f"load path, bf16 activations, no dense copy): {why}")

    def _take_hook(self, model) -> None:
        h = getattr(model, "ct_decompress_hook", None)
        hooks = model._forward_pre_hooks
        if h is None or getattr(h, "id", None) not in hooks:
            return
        order = list(hooks)
        self.hook = (weakref.ref(model), h, hooks.pop(h.id), order)

    def remove(self) -> None:
        """Undo install() exactly: the saved instance forwards (or none), the hook at its place."""
        while self.forwards:
            m, had, old = self.forwards.pop()
            if had:
                m.forward = old
            elif "forward" in vars(m):
                del m.forward
        if self.hook is not None:
            ref, h, fn, order = self.hook
            self.hook = None
            model = ref()
            if model is not None and getattr(model, "ct_decompress_hook", None) is h:
                hooks = model._forward_pre_hooks
                hooks[h.id] = fn
                for k in order:          # back in the registration order (hooks added since go first)
                    if k in hooks:
                        hooks.move_to_end(k)
