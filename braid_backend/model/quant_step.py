"""Quantized weights in the decode step (step.py stays format-blind): every projection weight is a dense tensor
or a kernels.quant_gemv.QuantWeight, and `gemv` sends it to fused_gemv or quant_gemv with the same keywords.

Packing q|k|v and gate|up of quantized modules: concat_quant builds one packed copy of the data and scales, then
each module's quantized parameters become views into it (as fuse.py does for dense weights), so memory stays
flat and the stock modules (prefill, model/quant_prefill.py) read the same bytes. release() gives them their
own copies back (fuse.unfuse_param). Zero points and per-tensor scales are tiny and stay the modules' own.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.fused_gemv import GemvWorkspace, fused_gemv, gemv_workspace
from ..kernels.quant_gemv import QuantWeight, concat_quant, quant_gemv, quant_gemv_workspace
from .fuse import fuse_linears, unfuse_param
from .quant import check_packable, quant_weight
from .tp import local
from .unsupported import Unsupported


def gemv(x: torch.Tensor, w, **kw) -> torch.Tensor:
    """fused_gemv on a dense weight, quant_gemv on a QuantWeight: one contract, the same keywords."""
    if isinstance(w, QuantWeight):
        return quant_gemv(x, w, **kw)
    return fused_gemv(x, w, **kw)


def weight_of(m: nn.Module | None):
    """A Linear's weight as the step reads it: its QuantWeight (views) or its dense (local) tensor."""
    if m is None:
        return None
    qw = quant_weight(m)
    return qw if qw is not None else local(m.weight)


def _view_params(m: nn.Module, old: torch.Tensor, new: torch.Tensor, views: list) -> None:
    """Replace the parameter of m holding `old` by a Parameter over `new` (same shape and requires_grad)."""
    for name, p in m._parameters.items():
        if p is not None and p.data_ptr() == old.data_ptr() and p.numel() == new.numel():
            m._parameters[name] = nn.Parameter(new.reshape(p.shape), requires_grad=p.requires_grad)
            views.append((m, name))
            return
    raise RuntimeError(f"{type(m).__name__}: no parameter holds the quantized tensor")


@torch.no_grad()
def pack(linears, views: list, act: bool = False):
    """(weight, bias) of q|k|v or gate|up: a dense tensor (fuse.py) or a QuantWeight, already one module (Phi-3)
    or packed here. `views` collects (module, parameter name) turned into views of a packed QuantWeight."""
    linears = list(linears)
    qws = [quant_weight(m) for m in linears]
    if all(q is None for q in qws):
        if len(linears) == 1:
            return linears[0].weight, linears[0].bias   # (tensor parallelism refuses packed modules)
        return fuse_linears(linears)
    check_packable(linears, "packed projections", act)   # planning checked it already
    if len(linears) == 1:
        return qws[0], linears[0].bias
    try:
        packed = concat_quant(qws)
    except ValueError as e:
        raise Unsupported(f"packing {'|'.join(f'{q.format} {q.shape}' for q in qws)}: {e}") from None
    row = srow = 0
    for m, q in zip(linears, qws):
        n = q.shape[0]
        if q.lut is not None:   # bitsandbytes: the Params4bit (and its quant_state) stays, over the packed bytes
            m.weight.data = packed.data[row:row + n].view(torch.uint8).reshape(m.weight.shape)
            views.append((m, "weight", "data"))   # its absmax is decoded (no module tensor holds the packed one)
            row += n
            continue
        _view_params(m, q.data, packed.data[row:row + n], views)
        if q.format in ("fp8_channel", "int4"):
            _view_params(m, q.scale, packed.scale[row:row + n], views)
        elif q.format == "fp8_block":
            sn = -(-n // q.block[0])
            _view_params(m, q.scale, packed.scale[srow:srow + sn], views)
            srow += sn
        row += n
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
    if has_bias:
        row = 0
        for m, q in zip(linears, qws):
            _view_params(m, m.bias, bias[row:row + q.shape[0]], views)
            row += q.shape[0]
    return packed, bias


def unpack(views: list) -> None:
    """Give every parameter pack() turned into a view its own contiguous copy back."""
    while views:
        v = views.pop()
        if len(v) == 3:   # a parameter object kept, its data a view (bitsandbytes)
            p = v[0]._parameters[v[1]]
            p.data = p.data.clone()
        else:
            unfuse_param(*v)


def quant_calls(M: int, sites) -> list[tuple]:
    """quant_gemv_workspace's call tuples for the QuantWeights among `sites` ((weight, act) pairs), both norm flags."""
    calls = set()
    for w, act in sites:
        if isinstance(w, QuantWeight):
            gran = w.group_size if w.format == "int4" else (w.block[1] if w.format == "fp8_block" else 0)
            n = w.shape[0] // 2 if act else w.shape[0]
            calls.update((M, n, w.shape[1], act, norm, w.format, gran) for norm in (False, True))
    return sorted(calls)


def step_workspace(dense_calls, qcalls, dtype, device, tuning) -> GemvWorkspace | None:
    """One split-K workspace big enough for every fused_gemv and quant_gemv call of the step."""
    a = gemv_workspace(dense_calls, dtype, device, tuning)
    b = quant_gemv_workspace(qcalls, dtype, device) if qcalls else None
    if a is None or b is None:
        return a if b is None else b
    return GemvWorkspace(max(a.partials.numel(), b.partials.numel()), max(a.counters.numel(), b.counters.numel()),
                         torch.device(device))


def formats(qplan, modules: dict[str, nn.Module]) -> str:
    """' [weights: q_proj/k_proj: <format>; o_proj: dense]' for the report ('' for a dense model)."""
    if qplan is None:
        return ""
    groups: dict[str, list[str]] = {}
    for name, m in modules.items():
        if m is not None:
            dense = "dense " + str(qplan.dtype).replace("torch.", "")
            groups.setdefault(qplan.format_of(m) or dense, []).append(name)
    return " [weights: " + "; ".join(f"{'/'.join(ns)}: {d}" for d, ns in groups.items()) + "]"
