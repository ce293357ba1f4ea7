"""Packing q|k|v and gate|up weights into one tensor without doubling memory.

The packed tensor is built once; the HF parameters are then replaced by Parameters that are views
into it, so the stock modules (used for prefill) and the fused kernels read the same storage and the
footprint stays flat. `unfuse` gives each module its own contiguous copy back (unpatch).

Tensor-parallel (DTensor) parameters are packed shard by shard: this rank's local rows of q|k|v are
concatenated and each module gets back a DTensor with its old global shape and placement whose local
tensor is a view into the packed shard."""
from __future__ import annotations

import torch
from torch import nn

from .tp import DTensor, is_dtensor, local


def _like(old: torch.Tensor, new_local: torch.Tensor) -> nn.Parameter:
    """A Parameter over `new_local` shaped and placed like `old` (a DTensor keeps mesh, placement, shape)."""
    t = new_local
    if is_dtensor(old):
        t = DTensor.from_local(new_local, old.device_mesh, old.placements, run_check=False,
                               shape=old.shape, stride=old.stride())
    return nn.Parameter(t, requires_grad=old.requires_grad)


@torch.no_grad()
def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the packed (local) weight and bias."""
    packed_w = torch.cat([local(m.weight).detach() for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    packed_b = torch.cat([local(m.bias).detach() for m in linears], dim=0) if has_bias else None
    row = 0
    for m in linears:
        n = local(m.weight).shape[0]
        # the view shares the packed storage; the old separate tensor is freed with its last reference
        m.weight = _like(m.weight, packed_w[row:row + n])
        if has_bias:
            m.bias = _like(m.bias, packed_b[row:row + n])
        row += n
    return packed_w, packed_b


@torch.no_grad()
def unfuse_param(module: nn.Module, name: str) -> None:
    """Give one parameter its own contiguous storage back (same shape, placement, requires_grad)."""
    old = module._parameters[name]
    module._parameters[name] = _like(old, local(old).detach().clone())


def unfuse_linears(linears: list[nn.Linear]) -> None:
    for m in linears:
        unfuse_param(m, "weight")
        if m.bias is not None:
            unfuse_param(m, "bias")
