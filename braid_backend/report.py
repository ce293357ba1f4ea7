"""PatchReport: what patch() did to a model and why anything was left stock."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Route:
    """Which path one generate() call, decode loop, prefill or forward call took, and why it is not the
    faster one (hf/routing.py decides; status() shows the last of each). Paths:
      generate(): "fast" (device-side K-step loop), "hf-loop" (HF's loop, each step the patched forward),
                  "stock" (the unpatched generate)
      forward():  "decode-graph" (fused step replayed from a CUDA graph), "decode-fused" (fused step,
                  no graph), "stock" (the stock HF forward: prefill, or a step the fused kernels cannot serve)
      prefill:    "prefill-graph" (replayed from a CUDA graph), "prefill-eager" (stock modules, one forward)"""
    path: str
    reason: str | None = None   # None: nothing kept this call off its stage's fastest path

    def __str__(self) -> str:
        return self.path if self.reason is None else f"{self.path} ({self.reason})"


@dataclass
class StepEvents:
    """What a decode step records while it runs (the CuPy step: per-bucket backend choices and
    fallbacks); the session moves them into the PatchReport after each call."""
    events: list[str] = field(default_factory=list)
    backends: dict = field(default_factory=dict)   # batch bucket -> "cupy" | "triton"


@dataclass
class PatchReport:
    model: str
    family: str | None = None
    patched: list[tuple[str, str]] = field(default_factory=list)   # (module, what replaces its decode work)
    stock: list[tuple[str, str]] = field(default_factory=list)     # (module or path, why it stays stock)
    reason: str | None = None                                        # set when the whole model is left stock
    options: dict = field(default_factory=dict)
    events: list[str] = field(default_factory=list)                  # later fallbacks (graph capture, verify)
    backend: str | None = None         # what runs the decode layers: "triton", "cupy" or "auto" (CuPy + timing)
    backends: dict = field(default_factory=dict)   # batch bucket -> "cupy" | "triton", as decided at first use

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __str__(self) -> str:
        head = f"braid_backend.patch({self.model})"
        if not self.ok:
            lines = [f"{head}: LEFT STOCK - {self.reason}"]
        else:
            layers = f", decode layers: {self.backend}" if self.backend else ""
            lines = [f"{head}: family={self.family}, {len(self.patched)} modules patched{layers}"]
            lines += [f"  patched  {m}: {w}" for m, w in _collapse(self.patched)]
        lines += [f"  stock    {m}: {w}" for m, w in self.stock]
        if self.backends:
            lines.append("  backend  " + ", ".join(f"bucket {m}: {b}" for m, b in sorted(self.backends.items())))
        lines += [f"  event    {e}" for e in self.events]
        if self.options:
            lines.append("  options  " + ", ".join(f"{k}={v}" for k, v in self.options.items()))
        return "\n".join(lines)

    __repr__ = __str__


def _collapse(rows):
    """Fold model.layers.{0..N} rows that say the same thing into one line for printing."""
    out, groups = [], {}
    for mod, what in rows:
        parts = mod.split(".")
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            key = (".".join(parts[:2] + ["*"] + parts[3:]), what)
            groups.setdefault(key, []).append(int(parts[2]))
            if len(groups[key]) == 1:
                out.append(key)
        else:
            out.append((mod, what))
    res = []
    for mod, what in out:
        idx = groups.get((mod, what))
        res.append((mod.replace("*", f"{{{min(idx)}..{max(idx)}}}") if idx else mod, what))
    return res
