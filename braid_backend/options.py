"""PatchOptions: what patch() was asked for, checked once, frozen (runtime state lives in the session)."""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from .tuning import Tuning

MAX_GRAPH_STEPS = 128   # a K-step graph holds K copies of the step's kernels; beyond this it only costs memory
# decode-layer backends: "triton" (the reference), "cupy" (one persistent CUDA-C kernel per layer where the
# model and CuPy allow it), "auto" (CuPy where eligible, then per batch bucket the faster one, timed once)
BACKENDS = ("auto", "triton", "cupy")


@dataclass(frozen=True)
class PatchOptions:
    graphs: bool = True          # CUDA-graph decode steps
    fast_generate: bool = True   # generate() runs the device-side K-step loop where it reproduces HF exactly
    graph_steps: int = 8         # decode steps per host round-trip on that loop (K)
    verify: bool = False         # compare a few decode steps with stock on first use
    strict: bool = False         # raise BraidUnsupportedError instead of leaving the model stock
    prefill_graphs: bool = True  # generate()'s prompt prefill from CUDA graphs per length bucket (needs graphs)
    # decode-layer backend, one of BACKENDS. "triton" by default: on an H100 the CuPy layer kernel was
    # slower at every point measured (Qwen2.5-0.5B batch 1 1.02 vs 0.68 ms/step, Llama-3.2-1B 1.26 vs
    # 1.07), and "auto"'s first-use compile + timing adds to every process's first call
    backend: str = "triton"
    # performance knobs (braid_backend.Tuning); None: Tuning.from_env(), the BRAID_* variables read now
    tuning: Tuning | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise TypeError(f"patch() option {f.name} must be True or False, got {v!r}")
        k = self.graph_steps
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"patch() option graph_steps must be an int, got {k!r}")
        object.__setattr__(self, "graph_steps", int(k))
        if not 1 <= k <= MAX_GRAPH_STEPS:
            raise ValueError(f"patch() option graph_steps must be in [1, {MAX_GRAPH_STEPS}], got {k}")
        t = self.tuning
        if t is None:
            t = Tuning.from_env()
        elif isinstance(t, dict):
            t = Tuning(**t)
        elif not isinstance(t, Tuning):
            raise TypeError(f"patch() option tuning must be a braid_backend.Tuning (or a dict of its fields), got {t!r}")
        object.__setattr__(self, "tuning", t)
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"patch() option backend must be one of {', '.join(map(repr, BACKENDS))}, "
                             f"got {self.backend!r}")

    @classmethod
    def from_kwargs(cls, **options) -> "PatchOptions":
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"patch() got unknown options: {sorted(unknown)} "
                            f"(known: {', '.join(f.name for f in fields(cls))})")
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)
