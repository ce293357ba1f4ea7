"""optimum.braid: braid_backend as an optimum backend.

    from optimum.braid import BraidModelForCausalLM
    model = BraidModelForCausalLM.from_pretrained(path_or_id, dtype=torch.bfloat16, device="cuda")

Shipped by the braid-backend distribution into the `optimum` namespace package, like optimum-intel's
`optimum.intel` and optimum-onnx's `optimum.onnxruntime` (there is no `optimum/__init__.py`: the
`optimum` distribution and every backend add their own subpackage to the same namespace). As in those
packages, the public names are listed per submodule in `_import_structure` and the submodule is
imported on first use; here through a module `__getattr__` (PEP 562, as `braid_backend` does) rather
than transformers' private `_LazyModule`. `import optimum.braid` needs neither the optimum distribution
nor torch; `pip install -e ".[optimum]"` in a checkout installs optimum next to it.

Side effect while the optimum distribution is absent: this directory makes `find_spec("optimum")`
succeed, so transformers' `is_optimum_available()` says True; only GPTQ checkpoints care (their load
then fails on `import optimum.gptq` rather than with transformers' "requires optimum" message).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from braid_backend import __version__  # light: braid_backend loads torch on first use

_import_structure = {
    "modeling": ["BraidModelForCausalLM"],
}
_NAME_TO_MODULE = {name: mod for mod, names in _import_structure.items() for name in names}

__all__ = ["BraidModelForCausalLM", "__version__"]

if TYPE_CHECKING:
    from .modeling import BraidModelForCausalLM
else:
    def __getattr__(name):
        mod = _NAME_TO_MODULE.get(name)
        if mod is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
        globals()[name] = value
        return value

    def __dir__():
        return sorted(set(globals()) | set(__all__))
