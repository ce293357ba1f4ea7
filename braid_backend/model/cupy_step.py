"""The CuPy decode step: DecodeStep with each transformer layer run as ONE persistent CUDA-C kernel
launch (kernels/cupy_layer.py); embedding, final norm + lm_head, buffers, RoPE tables and everything
runtime/ sees are DecodeStep's own.

backend "cupy": every batch bucket the kernel can take (M <= 8, shared memory) runs it; "auto": at the
first non-capturing run() of each bucket both backends are timed (one-step CUDA graphs, a few replays)
and the faster is kept. Either way that first run also checks the CuPy step against the Triton step
(logits, loose tolerance: it catches a broken kernel, not rounding) and any compile / launch / barrier /
mismatch failure turns the CuPy kernel off for good (Triton from then on; a report event and a log line,
never a crash). Under runtime/precompile.py's dry run the Triton layers run (their launches only
specialise), so the variants a fallback or auto choice needs get compiled; nothing CuPy runs there.
"""
from __future__ import annotations

import logging

import torch

from ..kernels.cupy_layer import LayerKernel, LayerSpec, LayerWorkspace, cupy_available, in_dry_run, layer_reference
from .spec import ModelPlan
from .step import DecodeStep, StepBuffers, _w

log = logging.getLogger("braid_backend")

CHECK_TOL = 0.1      # first-use check: ||logits_cupy - logits_triton|| / ||logits_triton|| must stay below
TIMING_REPS = 10


def layer_spec(plan: ModelPlan) -> LayerSpec:
    lp = plan.layers[0]
    return LayerSpec(plan.lm_head.weight.dtype, plan.hidden, plan.intermediate, plan.n_heads, plan.n_kv_heads,
                     plan.head_dim, lp.q.bias is not None, lp.o.bias is not None,
                     lp.gate_up[0].bias is not None, lp.down.bias is not None)


def model_reason(plan: ModelPlan) -> str | None:
    """Why this model's layers cannot run the CuPy kernel (None: they can, CuPy permitting)."""
    s = plan.spec
    if plan.quant is not None:
        return "quantized weights (the CuPy layer kernel reads dense ones)"
    if plan.tp is not None:
        return "tensor parallelism (the CuPy kernel runs on one device)"
    if s.norm_mode != 0 or s.norm_offset != 0.0:
        return f"{s.family}: (offset + w) RMSNorm (the kernel does Llama's w * x.to(dtype))"
    if s.attn_norm is None or s.mlp_norm is None:
        return f"{s.family}: no pre-norms"
    if s.attn_out_norm or s.mlp_out_norm:
        return f"{s.family}: post-norms on the sublayer outputs"
    if s.qk_norm:
        return f"{s.family}: q/k norm"
    if plan.act != "silu_mul":
        return f"activation {plan.act} (the kernel does silu_mul)"
    if plan.residual_mult is not None or plan.logits_div is not None:
        return f"{s.family}: residual / logits multipliers"
    if plan.embed_scale is not None:
        return f"{s.family}: scaled embeddings"
    if plan.final_softcap is not None or any(lp.softcap for lp in plan.layers):
        return f"{s.family}: soft-capping"
    if any(lp.window for lp in plan.layers):
        return "sliding-window attention"
    if plan.longrope is not None:
        return "longrope"
    if any(lp.rope_key is not None for lp in plan.layers):
        return f"{s.family}: per-layer rope tables or NoPE layers"
    inv = getattr(plan.rotary, "inv_freq", None)
    if inv is None or inv.numel() * 2 != plan.head_dim:
        return "partial rotary embedding (the kernel rotates the whole head)"
    if any(len(lp.qkv) != 3 or len(lp.gate_up) != 2 for lp in plan.layers):
        return "packed qkv / gate_up checkpoint modules"
    return layer_spec(plan).check()


def cupy_reason(plan: ModelPlan, device: torch.device) -> str | None:
    """Why backend="cupy" cannot be used for this model here (None: it can)."""
    why = model_reason(plan)
    if why:
        return why
    ok, why = cupy_available(device)
    return None if ok else why


class CupyDecodeStep(DecodeStep):
    """DecodeStep whose layers run the persistent CuPy kernel where it can (see the module docstring)."""

    def __init__(self, plan: ModelPlan, backend: str = "cupy", report=None, tuning=None):
        super().__init__(plan, tuning)
        if backend not in ("cupy", "auto"):
            raise ValueError(f"CupyDecodeStep backend must be 'cupy' or 'auto', got {backend!r}")
        self.backend = backend
        self.report = report            # PatchReport (duck-typed: .events, .backends)
        self.spec = layer_spec(plan)
        self.layer_impl = "cupy"        # "reference": layer_reference in torch (CPU tests of the wiring)
        self.choice: dict[int, str] = {}          # bucket -> "cupy" | "triton"
        self.kernels: dict[int, LayerKernel] = {}
        self.failed: str | None = None            # the CuPy kernel is off for good, and why
        self._said: set[str] = set()

    # -- reporting -----------------------------------------------------------------------------------
    def _event(self, msg: str, warn: bool = False) -> None:
        if msg in self._said:
            return
        self._said.add(msg)
        (log.warning if warn else log.info)("braid: %s", msg)
        if self.report is not None:
            self.report.events.append(msg)

    def _choose(self, M: int, backend: str, msg: str | None = None, warn: bool = False) -> None:
        self.choice[M] = backend
        if self.report is not None and hasattr(self.report, "backends"):
            self.report.backends[M] = backend
        if msg:
            self._event(msg, warn)

    def _fail(self, what: str, e: BaseException) -> None:
        self.failed = f"{what}: {type(e).__name__}: {e}"
        log.debug("braid: CuPy layer kernel failure", exc_info=True)
        for M in list(self.choice):
            self._choose(M, "triton")
        self._event(f"backend {self.backend}: CuPy layer kernel off, Triton from now on ({self.failed})", warn=True)

    def describe(self) -> list[tuple[str, str]]:
        """DecodeStep's rows plus what this backend changes: which buckets may run the layer kernel."""
        return super().describe() + [(
            "decode layers (CuPy)", f"backend {self.backend}: one persistent CuPy kernel per layer for batch "
                                    "buckets the kernel takes (chosen at first use), the Triton layers otherwise")]

    # -- buffers -------------------------------------------------------------------------------------
    def bucket_reason(self, M: int) -> str | None:
        return self.spec.bucket_reason(M)

    def new_buffers(self, M: int, max_len: int) -> StepBuffers:
        b = super().new_buffers(M, max_len)
        b.cupy_ws = None
        if (self.layer_impl == "cupy" and self.failed is None and self.device.type == "cuda"
                and self.bucket_reason(M) is None):
            b.cupy_ws = LayerWorkspace(self.spec, M, max_len, self.num_sms, self.device)
        return b

    # -- the step ------------------------------------------------------------------------------------
    def _mode(self, M: int) -> str:
        if self.layer_impl == "reference":
            return "cupy"
        if self.failed is not None:
            return "triton"
        got = self.choice.get(M)
        if got is not None:
            return got
        why = self.bucket_reason(M)
        if why is not None:
            self._choose(M, "triton", f"backend {self.backend}: {why}: Triton layers for that bucket")
            return "triton"
        return "undecided"

    @torch.no_grad()
    def run(self, cache, b: StepBuffers) -> torch.Tensor:
        M = b.M
        mode = self._mode(M)
        if in_dry_run() or mode == "triton":   # dry run: Triton launches only specialise (precompile)
            return super().run(cache, b)
        if mode == "undecided":
            if torch.cuda.is_current_stream_capturing() or getattr(b, "cupy_ws", None) is None:
                return super().run(cache, b)   # never compile, sync or time inside a capture
            self._first_use(cache, b)
            return b.logits
        return self._run_cupy(cache, b)

    def _run_cupy(self, cache, b: StepBuffers) -> torch.Tensor:
        p = self.plan
        self._embed(b)
        cos, sin = self.tables[None]
        n = len(self.layers)
        for i, fl in enumerate(self.layers):
            lp = fl.plan
            w = dict(w_qkv=fl.w_qkv, b_qkv=fl.b_qkv, nw_attn=_w(lp.attn_norm), eps_attn=fl.eps_attn, w_o=fl.w_o,
                     b_o=fl.b_o, w_gu=fl.w_gu, b_gu=fl.b_gu, nw_mlp=_w(lp.mlp_norm), eps_mlp=fl.eps_mlp,
                     w_down=fl.w_down, b_down=fl.b_down, scale=lp.scale, cos=cos, sin=sin, pos=b.pos,
                     slots=b.slots, kv_lens=b.kv_lens, valid=cache.valid, k_cache=cache.k[i], v_cache=cache.v[i])
            if self.layer_impl == "reference":
                layer_reference(b.x, **w, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=p.head_dim)
            else:
                nxt = self.layers[i + 1].w_qkv if i + 1 < n else None
                self.kernels[b.M].launch(b.cupy_ws, b.x, next_w_qkv=nxt, q_buf=b.q, attn=b.attn, act=b.act, **w)
        return self._head(b)

    # -- first use of a bucket: compile, check against Triton, (auto) time both ---------------------
    def _first_use(self, cache, b: StepBuffers) -> None:
        M = b.M
        super().run(cache, b)
        ref = b.logits.float().clone()
        try:
            if M not in self.kernels:
                self.kernels[M] = LayerKernel(self.spec, M, self.device)
            self._run_cupy(cache, b)
            self.kernels[M].check(b.cupy_ws)
            got = b.logits.float()
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            if not err <= CHECK_TOL:   # NaN too
                raise RuntimeError(f"logits differ from the Triton step's by {err:.3g} (relative norm, "
                                   f"tolerance {CHECK_TOL})")
        except Exception as e:
            self._fail(f"bucket {M} first use", e)
            super().run(cache, b)
            return
        try:   # both as one-step CUDA graphs (what decode replays); a kernel that cannot be captured fails here
            t_cupy = _time(lambda: self._run_cupy(cache, b), self.device)
            t_triton = _time(lambda: DecodeStep.run(self, cache, b), self.device)
            self.kernels[M].check(b.cupy_ws)
        except Exception as e:
            self._fail(f"bucket {M} graph capture / timing", e)
            super().run(cache, b)
            return
        pick = "cupy" if self.backend == "cupy" or t_cupy < t_triton else "triton"
        self._choose(M, pick, f"backend {self.backend}: bucket {M} -> {pick} (cupy {t_cupy:.3f} ms vs triton "
                              f"{t_triton:.3f} ms per step; logits vs Triton {err:.2g})")
        # leave b's outputs (cache slot, logits) as the chosen backend computes them
        if pick == "cupy":
            self._run_cupy(cache, b)
        else:
            DecodeStep.run(self, cache, b)


def _time(fn, device) -> float:
    """ms per replay of a one-step CUDA graph of fn (fn has run before: nothing compiles in the capture)."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    t = _events(g.replay, device)
    del g
    return t


def _events(fn, device=None, reps: int = TIMING_REPS) -> float:
    """ms per call of fn: one untimed call, then `reps` calls between two CUDA events."""
    s = torch.cuda.current_stream(device)
    a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    a.record(s)
    for _ in range(reps):
        fn()
    z.record(s)
    z.synchronize()
    return a.elapsed_time(z) / reps
