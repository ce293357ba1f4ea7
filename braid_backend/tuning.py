"""Tuning: the performance knobs, read once (at patch()) and passed down to the step and the kernels.

Every knob has a `BRAID_*` environment variable; `Tuning.from_env()` is the only place that reads them,
so setting one after import still takes effect at the next patch(), and nothing reads the environment
at import or inside a launch. Tests and benchmarks pass `Tuning(...)` values instead of overwriting
module globals. None of these knobs changes results: they change launch configs and paths only.

This module sits at the bottom of the package (the kernels import it), so it imports nothing of ours.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

TP_ALLREDUCE = ("auto", "nccl", "symm", "flags")
TP_REDUCE_LOADS = ("cg", "volatile")


@dataclass(frozen=True)
class Tuning:
    # programmatic dependent launch between the step's kernels (Hopper+): hides the launch gap
    pdl: bool = True
    # precompile a bucket's Triton variants in parallel worker processes before the first capture
    precompile: bool = True
    # largest batch served by the GEMV path on a GPU; above it the tensor-core tiles (measured best at 2)
    gemv_max_m: int = 2
    # split-K on the small-matrix tensor-core tiles (batch 3-16 on small models)
    split_k: bool = True
    # tensor-parallel all-reduce: auto (flags where symmetric memory maps, else the group's backend)
    tp_allreduce: str = "auto"
    # tensor parallel: the residual add rides in the all-reduce (rank 0 adds x before the sum)
    tp_residual_in_reduce: bool = True
    # tensor parallel: how the flag reduce reads peers' partial sums ("cg": vector loads bypassing L1)
    tp_reduce_load: str = "cg"

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise TypeError(f"Tuning.{f.name} must be True or False, got {v!r}")
        if isinstance(self.gemv_max_m, bool) or not isinstance(self.gemv_max_m, int) or not 1 <= self.gemv_max_m <= 8:
            raise ValueError(f"Tuning.gemv_max_m must be an int in [1, 8], got {self.gemv_max_m!r}")
        if self.tp_allreduce not in TP_ALLREDUCE:
            raise ValueError(f"Tuning.tp_allreduce must be one of {TP_ALLREDUCE}, got {self.tp_allreduce!r}")
        if self.tp_reduce_load not in TP_REDUCE_LOADS:
            raise ValueError(f"Tuning.tp_reduce_load must be one of {TP_REDUCE_LOADS}, got {self.tp_reduce_load!r}")

    @classmethod
    def from_env(cls, env=None) -> "Tuning":
        """The defaults, overridden by the BRAID_* variables set in `env` (default: os.environ).
        A malformed value raises ValueError naming the variable."""
        env = os.environ if env is None else env
        kw = {}
        for f in fields(cls):
            var = ENV_VARS[f.name]
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip().lower()
            try:
                kw[f.name] = _parse(f, raw)
                cls(**{f.name: kw[f.name]})   # validated alone, so the error names this variable
            except (TypeError, ValueError) as e:
                raise ValueError(f"{var}={env.get(var)!r}: {e}") from None
        return cls(**kw)

    def replace(self, **changes) -> "Tuning":
        return replace(self, **changes)


# field -> environment variable (the README's options table lists the same pairs; a test keeps them in sync)
ENV_VARS = {
    "pdl": "BRAID_PDL",
    "precompile": "BRAID_PRECOMPILE",
    "gemv_max_m": "BRAID_GEMV_MAX_M",
    "split_k": "BRAID_SPLIT_K",
    "tp_allreduce": "BRAID_TP_ALLREDUCE",
    "tp_residual_in_reduce": "BRAID_TP_RESIDUAL_IN_REDUCE",
    "tp_reduce_load": "BRAID_TP_REDUCE_LOAD",
}

_TRUE, _FALSE = ("1", "true", "on", "yes", "auto"), ("0", "false", "off", "no")


def _parse(f, raw: str):
    if f.type == "bool":
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise ValueError("use 1 or 0")
    if f.type == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError("use an integer") from None
    return raw


def interpret_mode() -> bool:
    """Triton's own switch (TRITON_INTERPRET=1: kernels run in its CPU interpreter), read where asked."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


DEFAULT = Tuning()
