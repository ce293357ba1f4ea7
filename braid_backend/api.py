"""patch / unpatch / is_patched."""
from __future__ import annotations

import logging
import types

import torch

from .kernels._common import kernels_usable
from .report import PatchReport

log = logging.getLogger("braid_backend")

DEFAULTS = dict(graphs=True, fast_generate=True, graph_steps=8, verify=False, strict=False)


class BraidUnsupportedError(RuntimeError):
    """patch(strict=True) on a model or setting that braid leaves stock."""


def is_patched(model) -> bool:
    return getattr(model, "_braid_state", None) is not None


def _refuse(model, report: PatchReport, reason: str, strict: bool) -> PatchReport:
    report.reason = reason
    log.warning("braid: %s left stock: %s", type(model).__name__, reason)
    if strict:
        raise BraidUnsupportedError(f"{type(model).__name__}: {reason}")
    model._braid_report = report
    return report


def patch(model, **options) -> PatchReport:
    """Swap the decode-time work of an already-loaded HF causal LM for fused kernels.

    Options: graphs (CUDA-graph decode, default True), fast_generate (device-side token loop for the
    generate() settings it implements, default True), graph_steps (decode steps per host round-trip),
    verify (compare a few decode steps with stock on first use), strict (raise instead of
    leaving the model stock). Returns a PatchReport; idempotent."""
    from .patches.model import PatchState
    from .patches.spec import Unsupported, plan_model

    if is_patched(model):
        return model._braid_state.report
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"patch() got unknown options: {sorted(unknown)}")
    opts = {**DEFAULTS, **options}
    report = PatchReport(model=type(model).__name__, options={k: v for k, v in opts.items() if k != "strict"})
    try:
        plan = plan_model(model)
    except Unsupported as e:
        return _refuse(model, report, str(e), opts["strict"])
    device = plan.lm_head.weight.device
    usable, why = kernels_usable(device)
    if not usable:
        return _refuse(model, report, why, opts["strict"])
    for attr in ("forward", "generate"):
        if attr in vars(model):
            return _refuse(model, report, f"model.{attr} is already replaced on the instance "
                                          "(another library's hook?)", opts["strict"])
    report.family = plan.spec.family
    views = _packed_views(model)
    try:
        st = PatchState(model, plan, report, opts)
        _fill_report(report, plan, opts, device)
    except Exception as e:  # a bug or an unforeseen module: never leave the weights half-packed
        log.debug("braid: patch failed", exc_info=True)
        _rollback(model, views)
        report.patched.clear()
        report.stock.clear()
        report.family = None
        return _refuse(model, report, f"patching failed and was rolled back ({type(e).__name__}: {e})",
                       opts["strict"])
    orig_forward = type(model).forward.__get__(model)
    orig_generate = type(model).generate.__get__(model)
    st.orig_forward = orig_forward

    def forward(self, *args, **kwargs):
        if args:  # HF forwards take input_ids first positionally
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("braid-patched forward takes input_ids positionally and the rest by keyword")
        return st.forward(self, orig_forward, **kwargs)

    def generate(self, *args, **kwargs):
        from .patches.generate import braid_generate

        return braid_generate(st, self, orig_generate, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model.generate = types.MethodType(generate, model)
    model._braid_state = st
    model._braid_new_cache = lambda batch=1, length=256: st.new_cache(batch, length)
    log.info("braid: patched %s (%s, %d layers)", report.model, plan.spec.family, len(plan.layers))
    return report


def _packed_views(model) -> set:
    """(module, name) of every parameter that is a view into a larger storage before patching."""
    return {(id(m), n) for m in model.modules() for n, p in m._parameters.items()
            if p is not None and _is_view(p)}


def _is_view(p: torch.Tensor) -> bool:
    return p.untyped_storage().nbytes() > p.numel() * p.element_size()


@torch.no_grad()
def _rollback(model, views_before: set) -> None:
    """Give back separate tensors to parameters that patching turned into views of a packed buffer."""
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and _is_view(p) and (id(m), n) not in views_before:
                m._parameters[n] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)


def _fill_report(report: PatchReport, plan, opts, device) -> None:
    p, spec = plan, plan.spec

    def names(*parts):  # module names as this family calls them (None: the family has no such norm)
        return "+".join(n for n in parts if n)

    for lp in p.layers:
        i = lp.index
        pre = "rmsnorm + " if spec.attn_norm else ""
        extra = {"head": " + q/k norm", "full": " + q/k norm (whole projection)"}.get(spec.qk_norm or "", "")
        bias = " + bias" if lp.q.bias is not None else ""
        win = f", sliding window {lp.window}" if lp.window else ""
        post = " + post-norm" if spec.attn_out_norm else ""
        report.patched.append((f"model.layers.{i}." + names(spec.attn_norm, spec.attn, spec.attn_out_norm),
                               f"{pre}qkv GEMV{bias}{extra} + rope + cache write; decode attention{win}; "
                               f"o_proj GEMV{post} + residual"))
        pre = "rmsnorm + " if spec.mlp_norm else ""
        post = " + post-norm" if spec.mlp_out_norm else ""
        report.patched.append((f"model.layers.{i}." + names(spec.mlp_norm, spec.mlp, spec.mlp_out_norm),
                               f"{pre}gate_up GEMV + {p.act}; down GEMV{post} + residual"))
    report.patched.append(("model.norm+lm_head", "rmsnorm + lm_head GEMV"))
    report.stock.append(("prefill (more than one new token per sequence)",
                         "stock HF modules (SDPA) writing into the braid static cache"))
    report.stock.append(("model.embed_tokens", "plain index_select (nothing to fuse)"))
    if not (opts["graphs"] and device.type == "cuda"):
        report.stock.append(("CUDA graphs", "off" if not opts["graphs"] else f"device is {device.type}"))


def unpatch(model) -> None:
    """Restore the stock model: original forward/generate, separate weight tensors, no braid buffers."""
    st = getattr(model, "_braid_state", None)
    for attr in ("forward", "generate", "_braid_new_cache", "_braid_report"):
        if attr in vars(model):
            delattr(model, attr)
    if st is None:
        return
    with st.lock:
        st.release()
    model._braid_state = None
    del model._braid_state
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
