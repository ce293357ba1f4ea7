"""Packing q|k|v and gate|up weights into one tensor without doubling memory.

The packed tensor is built once; the HF parameters are then replaced by Parameters that are views
into it, so the stock modules (used for prefill) and the fused kernels read the same storage and the
footprint stays flat. `unfuse` gives each module its own contiguous copy back (unpatch)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    ws = [m.weight for m in linears]
    packed_w = torch.cat([w.detach() for w in ws], dim=0)
    has_bias = linears[0].bias is not None
    packed_b = torch.cat([m.bias.detach() for m in linears], dim=0) if has_bias else None
    row = 0
    for m in linears:
        n = m.out_features
        # Parameter(view) shares the packed storage; the old separate tensor is freed with its last reference.
        m.weight = nn.Parameter(packed_w[row:row + n], requires_grad=m.weight.requires_grad)
        if has_bias:
            m.bias = nn.Parameter(packed_b[row:row + n], requires_grad=m.bias.requires_grad)
        row += n
    return packed_w, packed_b


@torch.no_grad()
def unfuse_linears(linears: list[nn.Linear]) -> None:
    for m in linears:
        m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
