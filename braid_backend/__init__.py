"""braid_backend: fused Triton kernels + CUDA-graph decode for Hugging Face generate().

    report = braid_backend.patch(model)   # model: an already-loaded HF causal LM
    model.generate(...)                   # unchanged HF call
    braid_backend.unpatch(model)          # back to stock
"""
from .api import BraidUnsupportedError, is_patched, patch, status, unpatch
from .options import PatchOptions
from .report import PatchReport

__all__ = ["patch", "unpatch", "is_patched", "status", "PatchOptions", "PatchReport", "BraidUnsupportedError"]
__version__ = "0.1.0"
