"""Kernels per decode step for every preset (Triton backend), counted on the CPU.

    python benchmarks/kernels_per_step.py [--presets a,b,...] [--out FILE.json]

Each preset keeps its family, layer count and switches (norms, biases, q/k norm, softcaps, rope kind)
but gets tiny widths, so the Triton interpreter runs a step in seconds. The count does not depend on the
widths: the decode step launches the same kernels for any size. Counted once per preset, at batch 1:
- the fused step (`DecodeStep.run`): Triton launches by kernel name, plus the torch ops that launch a
  CUDA kernel (views excluded; ops inside an interpreted Triton launch excluded);
- the fast loop's per-token extras (the valid-mask scatter and the greedy selection kernels).
On the GPU the same launches are replayed from a CUDA graph; with TP, each row-parallel GEMV adds one
all-reduce (not counted here: one process).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import braid_backend  # noqa: E402
from braid_backend.runtime.cache import LEN_ROUND  # noqa: E402
from braid_backend.runtime.interface import fill_inputs  # noqa: E402
from braid_backend.runtime.sampling import SelectConfig  # noqa: E402
from braid_backend.testing.presets import PRESETS, make_config  # noqa: E402


class Counting(TorchDispatchMode):
    """Counts torch ops that launch a kernel and, through run_hook, Triton launches."""

    def __init__(self):
        super().__init__()
        self.torch_ops, self.triton, self.inside = Counter(), Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and not func.is_view and func.overloadpacket.__name__ not in ("detach", "alias"):
            self.torch_ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


_ORIG_RUN = InterpretedFunction.run
_MODE: list[Counting] = []


def _run(self, *args, **kwargs):
    mode = _MODE[-1] if _MODE else None
    if mode is None:
        return _ORIG_RUN(self, *args, **kwargs)
    mode.triton[self.fn.__name__] += 1
    mode.inside += 1
    try:
        return _ORIG_RUN(self, *args, **kwargs)
    finally:
        mode.inside -= 1


InterpretedFunction.run = _run


def small_config(name: str):
    cfg = make_config(name)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    small = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=max(1, 4 * kv // heads), head_dim=16, vocab_size=256, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
    if getattr(cfg, "query_pre_attn_scalar", None):
        small["query_pre_attn_scalar"] = 16
    return make_config(name, **small)


def count(mode_fn) -> dict:
    m = Counting()
    _MODE.append(m)
    try:
        with m:
            mode_fn()
    finally:
        _MODE.pop()
    return {"triton": dict(m.triton), "torch": dict(m.torch_ops),
            "total": sum(m.triton.values()) + sum(m.torch_ops.values())}


@torch.no_grad()
def per_preset(name: str) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = small_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    report = braid_backend.patch(model, graphs=False)
    if not report.ok:
        return {"preset": name, "left_stock": report.reason}
    s = model._braid_session
    cache = s.new_cache(1, 2 * LEN_ROUND)
    bufs = s.step.new_buffers(1, cache.max_len)
    fill_inputs(bufs, cache, torch.tensor([5]), None, 3)
    cache.valid[:1, :4] = 1
    s.step.prepare(cache.max_len)
    step = count(lambda: s.step.run(cache, bufs))
    layers, s.step.layers = s.step.layers, []     # what the step does outside the layer loop
    outside = count(lambda: s.step.run(cache, bufs))
    s.step.layers = layers
    loop = s.fast_loop(cache, 1, 1, SelectConfig(do_sample=False, eos=(2,), pad=0))
    fill_inputs(loop.bufs, cache, torch.tensor([5]), None, 3)
    token = count(lambda: loop.run(cache))
    return {"preset": name, "layers": cfg.num_hidden_layers, "model_type": cfg.model_type,
            "step": step, "outside_layers": outside, "fast_loop_token": token,
            "per_layer": (step["total"] - outside["total"]) / cfg.num_hidden_layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for name in args.presets.split(","):
        try:
            row = per_preset(name)
        except Exception as e:   # one preset's tiny config may not build; report it, go on
            row = {"preset": name, "error": f"{type(e).__name__}: {e}"}
            print(f"{name:16s} error: {row['error']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        if "left_stock" in row:
            print(f"{name:16s} left stock: {row['left_stock']}", flush=True)
            continue
        print(f"{name:16s} {row['layers']:3d} layers: step {row['step']['total']:4d} kernels "
              f"(triton {sum(row['step']['triton'].values())}, torch {sum(row['step']['torch'].values())}; "
              f"{row['per_layer']:.2f} per layer + {row['outside_layers']['total']} outside), "
              f"fast-loop token {row['fast_loop_token']['total']:4d}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
