"""braid_backend: fused Triton kernels + CUDA-graph decode for Hugging Face generate().

    report = braid_backend.patch(model)   # model: an already-loaded HF causal LM
    model.generate(...)                   # unchanged HF call
    braid_backend.unpatch(model)          # back to stock
"""
from .options import PatchOptions
from .report import PatchReport
from .tuning import Tuning

__all__ = ["patch", "unpatch", "is_patched", "status", "PatchOptions", "PatchReport", "Tuning",
           "BraidUnsupportedError"]
__version__ = "0.1.0"

_API = {"patch", "unpatch", "is_patched", "status", "BraidUnsupportedError"}


def __getattr__(name):
    # api pulls in torch, triton and transformers: loaded on first use, so that `braid-bench --help`
    # and the bench's worker processes start without them
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'braid_backend' has no attribute {name!r}")
