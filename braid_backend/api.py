"""patch / unpatch / is_patched / status: the only code that changes the model instance."""
from __future__ import annotations

import logging

import torch

from .hf.runner import HFRunner, PatchedForward, PatchedGenerate
from .kernels._common import kernels_usable
from .model.spec import ModelPlan, Unsupported, plan_model
from .model.fuse import unfuse_param
from .model.cupy_step import CupyDecodeStep, cupy_reason
from .model.step import DecodeStep
from .model.tp import local
from .options import PatchOptions
from .report import PatchReport, StepEvents
from .session import PatchSession, Status

log = logging.getLogger("braid_backend")

_ATTRS = ("forward", "generate", "_braid_session", "_braid_report")


class BraidUnsupportedError(RuntimeError):
    """patch(strict=True) on a model or setting that braid leaves stock."""


def is_patched(model) -> bool:
    return getattr(model, "_braid_session", None) is not None


def status(model) -> Status | None:
    """What the patch did so far (last_route / last_prefill / last_forward: each stage's last path and why,
    counters, fallbacks: see Status); None when the model is not patched."""
    s = getattr(model, "_braid_session", None)
    return s.status if s is not None else None


def _refuse(model, report: PatchReport, reason: str, strict: bool) -> PatchReport:
    report.reason = reason
    log.warning("braid: %s left stock: %s", type(model).__name__, reason)
    if strict:
        raise BraidUnsupportedError(f"{type(model).__name__}: {reason}")
    model._braid_report = report
    return report


def patch(model, **options) -> PatchReport:
    """Swap the decode-time work of an already-loaded HF causal LM for fused kernels.

    Options (PatchOptions): graphs (CUDA-graph decode, default True), fast_generate (device-side token
    loop for the generate() settings it implements, default True), graph_steps (decode steps per host
    round-trip, 1-128, default 8), verify (compare a few decode steps with stock on first use), strict
    (raise instead of leaving the model stock). Bad options raise TypeError/ValueError. Patching a
    patched model with the same options returns its report; with other options it re-patches."""
    opts = PatchOptions.from_kwargs(**options)
    if is_patched(model):
        if model._braid_session.options == opts:
            return model._braid_session.report
        log.info("braid: re-patching %s with new options", type(model).__name__)
        unpatch(model)
    for attr in ("_braid_report",):   # a refusal's report from an earlier call
        if attr in vars(model):
            delattr(model, attr)
    report = PatchReport(model=type(model).__name__, options={k: v for k, v in opts.to_dict().items() if k != "strict"})
    try:
        plan = plan_model(model, opts.tuning)
    except Unsupported as e:
        return _refuse(model, report, str(e), opts.strict)
    device = local(plan.lm_head.weight).device
    usable, why = kernels_usable(device)
    if not usable:
        return _refuse(model, report, why, opts.strict)
    for attr in ("forward", "generate"):
        if attr in vars(model):
            return _refuse(model, report, f"model.{attr} is already replaced on the instance "
                                          "(another library's hook?)", opts.strict)
    report.family = plan.spec.family
    cupy_why = None if opts.backend == "triton" else cupy_reason(plan, device)
    if cupy_why and opts.backend == "cupy" and opts.strict:
        return _refuse(model, report, f"backend='cupy': {cupy_why}", True)
    views = _packed_views(model)
    events = StepEvents()   # what the CuPy step records at run time; the session moves it into the report
    step = None
    try:
        step = (DecodeStep(plan, opts.tuning) if opts.backend == "triton" or cupy_why
                else CupyDecodeStep(plan, opts.backend, events, opts.tuning))
        session = PatchSession(model, step, report, opts, events)
        report.patched.extend(step.describe())
        _report_stock(report, plan, opts, device)
        _report_backend(report, opts.backend, step, cupy_why)
    except Exception as e:  # a bug or an unforeseen module: never leave the weights half-packed
        log.debug("braid: patch failed", exc_info=True)
        if step is not None:   # prefill forwards / hooks a quantized model's step installed
            step.release()
        _rollback(model, views)
        report.patched.clear()
        report.stock.clear()
        report.family = None
        return _refuse(model, report, f"patching failed and was rolled back ({type(e).__name__}: {e})",
                       opts.strict)
    # Callables that hold the runner and its session, which holds the model only weakly: no reference
    # cycle, so `del model` frees the weights, the caches and the graph pool at once.
    runner = HFRunner(session)
    model.forward = PatchedForward(runner)
    model.generate = PatchedGenerate(runner)
    model._braid_session = session
    log.info("braid: patched %s (%s, %d layers)", report.model, plan.spec.family, len(plan.layers))
    return report


def _packed_views(model) -> set:
    """(module, name) of every parameter that is a view into a larger storage before patching."""
    return {(id(m), n) for m in model.modules() for n, p in m._parameters.items()
            if p is not None and _is_view(p)}


def _is_view(p: torch.Tensor) -> bool:
    p = local(p)
    return p.untyped_storage().nbytes() > p.numel() * p.element_size()


@torch.no_grad()
def _rollback(model, views_before: set) -> None:
    """Give back separate tensors to parameters that patching turned into views of a packed buffer."""
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and _is_view(p) and (id(m), n) not in views_before:
                unfuse_param(m, n)


def _report_stock(report: PatchReport, plan: ModelPlan, opts: PatchOptions, device) -> None:
    """What stays stock (the step's describe() gave what it replaces), and the plan's warnings."""
    report.stock.append(("prefill (more than one new token per sequence)",
                         "stock HF modules (SDPA) writing into the braid static cache"))
    report.stock.append(("model.embed_tokens", "plain index_select (nothing to fuse)"))
    if plan.tp is not None and plan.tp.note:
        log.warning("braid: %s", plan.tp.note)
        report.events.append(plan.tp.note)
    if not (opts.graphs and device.type == "cuda"):
        report.stock.append(("CUDA graphs", "off" if not opts.graphs else f"device is {device.type}"))
    for w in plan.warnings:   # differences from the family's full math that stock shares (e.g. softcap)
        log.warning("braid: %s", w)
        report.events.append(w)


def _report_backend(report: PatchReport, asked: str, step, cupy_why: str | None) -> None:
    """Which backend runs the decode layers: report.backend, an event (CuPy) or a stock entry (why not
    CuPy), and the log."""
    report.backend = step.backend
    if step.backend == "triton":
        if asked != "triton":
            report.stock.append(("CuPy layer kernel", cupy_why))
            (log.warning if asked == "cupy" else log.info)(
                "braid: backend %s: CuPy layer kernel not used (%s); layers run on Triton", asked, cupy_why)
        return
    how = ("timed against Triton per batch bucket at first use, the faster kept" if asked == "auto"
           else "checked against Triton at first use")
    msg = (f"backend {asked}: decode layers run one persistent CuPy kernel per layer for batch buckets <= 8 "
           f"({how}); Triton for larger buckets")
    report.events.append(msg)
    log.info("braid: %s", msg)


def unpatch(model) -> None:
    """Restore the stock model: original forward/generate, separate weight tensors, no braid buffers."""
    s = getattr(model, "_braid_session", None)
    for attr in _ATTRS:
        if attr in vars(model):
            delattr(model, attr)
    if s is None:
        return
    s.release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
