"""BraidModelForCausalLM: load a Hugging Face causal LM and return it patched by braid_backend.

    from optimum.braid import BraidModelForCausalLM
    model = BraidModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B", dtype=torch.bfloat16, device="cuda")
    model.generate(**inputs)                                    # or transformers.pipeline(model=model, ...)

Why a factory and not a subclass of optimum's `OptimizedModel` (optimum.modeling_base): the backends
built on `OptimizedModel` (optimum-onnx's ORTModel*, optimum-intel's OVModel*) wrap a model that runs
in another runtime and return the wrapper, with their own forward/generate and save format. braid runs
the HF model itself: `braid_backend.patch` swaps the decode work of the loaded PreTrainedModel in place,
and `generate()`, `transformers.pipeline`, `save_pretrained` and `unpatch` keep working on that same
object. A wrapper would hide the PreTrainedModel behind another class for no gain, so
`from_pretrained` returns the patched HF model itself, the way transformers' `AutoModelFor*` classes
return a concrete model class (and, like them, this class cannot be instantiated). Nothing here needs
the optimum distribution: this module imports only braid_backend and transformers.

Saving: `save_pretrained` of the returned model needs no help (checked with transformers 5.24,
tests/test_optimum.py: the tiny Qwen2 preset in fp32, every tiny preset in bf16). Patching turns q/k/v
(and gate/up) into views of one packed tensor, so they share one storage; transformers'
`remove_tied_weights_from_state_dict` finds that those views do not overlap and clones each one before
writing, so the checkpoint holds the usual separate `q_proj.weight`/`k_proj.weight`/... tensors, loads
into stock transformers with identical weights, and the patched model is left as it was (still
patched, still on the fast path).
"""
from __future__ import annotations

import errno
import logging
import os

from transformers import AutoModelForCausalLM

import braid_backend
from braid_backend import PatchOptions

log = logging.getLogger(__name__)


class BraidModelForCausalLM:
    """Factory: `BraidModelForCausalLM.from_pretrained(...)` returns a patched transformers model."""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not meant to be instantiated: use "
                        f"{type(self).__name__}.from_pretrained(path_or_id, ...), which returns the patched "
                        "transformers model itself")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, dtype="auto", device=None,
                        patch_options: dict | None = None, **hf_kwargs):
        """Load with `AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **hf_kwargs)`, move
        to `device` when given, switch to eval mode and `braid_backend.patch(model, **patch_options)`.

        Returns the transformers model itself (patched, or stock with a logged warning saying why when
        braid leaves it stock). `patch_options` are `braid_backend.patch`'s options (graphs,
        fast_generate, graph_steps, verify, strict); bad ones raise TypeError/ValueError before anything
        is loaded, and `strict=True` raises `braid_backend.BraidUnsupportedError` instead of returning a
        stock model."""
        options = dict(patch_options or {})
        PatchOptions.from_kwargs(**options)      # validate before a possibly long load
        _check_local_path(pretrained_model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, dtype=dtype, **hf_kwargs)
        if device is not None:
            model = model.to(device)
        model.eval()
        report = braid_backend.patch(model, **options)
        if report.ok:
            log.info("optimum.braid: loaded %s\n%s", pretrained_model_name_or_path, report)
        else:
            log.warning("optimum.braid: %s (%s) is returned STOCK, generate() runs plain transformers: %s",
                        pretrained_model_name_or_path, type(model).__name__, report.reason)
        return model


def _check_local_path(path_or_id) -> None:
    """A missing local folder: say so, instead of transformers' "Repo id must be in the form ..." (it
    takes any string that is not an existing folder for a Hub id)."""
    path = os.fspath(path_or_id)
    local = (isinstance(path_or_id, os.PathLike) or os.path.isabs(path)
             or path.startswith(("./", "../", ".\\", "..\\")))
    if local and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint folder (a local path, not a Hub id)", path)
