"""The quantized weight formats of kernels/quant_gemv.py on the torch side: QuantWeight (one (N, K) weight's
tensors and layout), int4 nibble packing, the exact fp32 dequantisation (the kernels' specification) and the
q|k|v / gate|up row concatenation. Each format's layout: quant_gemv.py's module docstring."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import require

FORMATS = ("fp8_block", "fp8_channel", "fp8_tensor", "int4")


@dataclass
class QuantWeight:
    """One quantized (N, K) weight (see the module docstring for each format's layout)."""
    format: str
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple
    block: tuple = (128, 128)            # fp8_block scale block (rows, cols)
    group_size: int = 0                  # int4 group along K
    zero_point: torch.Tensor | None = None
    lut: torch.Tensor | None = None      # int4 with a value table (bitsandbytes): see the module docstring

    def __post_init__(self):
        require(self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}")
        N, K = self.shape = tuple(int(v) for v in self.shape)
        if self.format == "fp8_tensor" and self.scale.numel() == 1:
            self.scale = self.scale.reshape(1, 1)            # a view of the 0-d / (1,) checkpoint scale
        elif self.format == "fp8_channel" and self.scale.dim() == 1:
            self.scale = self.scale.reshape(-1, 1)
        if self.format == "int4":
            g = self.group_size
            require(g > 0 and g % 8 == 0 and K % g == 0, f"int4 needs K ({K}) a multiple of the group ({g}), "
                    "the group a multiple of 8")
            require(self.data.dtype == torch.int32 and tuple(self.data.shape) == (N, K // 8),
                    f"int4 data must be int32 (N, K/8) = {(N, K // 8)}, got {self.data.dtype} {tuple(self.data.shape)}")
            sshape = (N, K // g)
            if self.lut is not None:
                require(self.zero_point is None and self.lut.dtype == torch.float32 and tuple(self.lut.shape) == (16,)
                        and self.lut.is_contiguous(), "an int4 value table is 16 contiguous fp32 values, no zero point")
            if self.zero_point is not None:
                require(self.zero_point.dtype == torch.int32 and
                        tuple(self.zero_point.shape) == (-(-N // 8), K // g) and self.zero_point.is_contiguous(),
                        f"int4 zero_point must be contiguous int32 (ceil(N/8), K/g) = {(-(-N // 8), K // g)}")
        else:
            require(self.data.dtype in (torch.float8_e4m3fn, torch.uint8) and tuple(self.data.shape) == (N, K),
                    f"fp8 data must be float8_e4m3fn (N, K) = {(N, K)}, got {self.data.dtype} {tuple(self.data.shape)}")
            bn, bk = self.block
            sshape = {"fp8_block": (-(-N // bn), -(-K // bk)), "fp8_channel": (N, 1), "fp8_tensor": (1, 1)}[self.format]
        require(self.data.is_contiguous(), "quantized data must be contiguous (nn.Linear layout)")
        require(self.scale.dtype.is_floating_point and tuple(self.scale.shape) == sshape,
                f"{self.format} scale must be a float tensor of shape {sshape}, got {self.scale.dtype} "
                f"{tuple(self.scale.shape)}")
        require(self.scale.stride(-1) == 1 or self.scale.shape[-1] == 1, "scale rows must be contiguous")

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV over it reads: packed data + scales (+ zero points)."""
        extra = tuple(t for t in (self.zero_point, self.lut) if t is not None)
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale) + extra)

    @property
    def device(self):
        return self.data.device


# ------------------------------------------------------------------------------ torch side: layouts
def unpack_int4(packed: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """int32 words -> stored nibbles (0..15, int16), 8 per word along `dim`, low nibble first."""
    p = packed if dim == 1 else packed.t()
    nib = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(p.shape[0], -1).to(torch.int16)
    return nib if dim == 1 else nib.t()


def pack_int4(nibbles: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Stored nibbles (0..15) -> int32 words along `dim` (padded with 0 to a multiple of 8): unpack_int4's inverse."""
    v = (nibbles if dim == 1 else nibbles.t()).to(torch.int64)
    v = torch.nn.functional.pad(v, (0, -v.shape[1] % 8)).reshape(v.shape[0], -1, 8)
    words = (v << (4 * torch.arange(8, device=v.device))).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return (words if dim == 1 else words.t()).contiguous()


def dequantize(qw: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) weight: fp32 data * scale (exact per element), then cast to `dtype`."""
    N, K = qw.shape
    s = qw.scale.float()
    if qw.format == "int4" and qw.lut is not None:   # high nibble first within each byte
        q = unpack_int4(qw.data)[:, :K].reshape(N, K // 2, 2).flip(-1).reshape(N, K).long()
        w = qw.lut.float()[q].reshape(N, K // qw.group_size, qw.group_size) * s[:, :, None]
        return w.reshape(N, K).to(dtype)
    if qw.format == "int4":
        q = unpack_int4(qw.data)[:, :K].float()
        g = qw.group_size
        z = 8.0 if qw.zero_point is None else unpack_int4(qw.zero_point, dim=0)[:N].float()[:, :, None]
        w = (q.reshape(N, K // g, g) - z) * s[:, :, None]
        return w.reshape(N, K).to(dtype)
    w = qw.data.view(torch.float8_e4m3fn).float()
    if qw.format == "fp8_block":
        bn, bk = qw.block
        s = s.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return (w * s).to(dtype)


def concat_quant(parts: list[QuantWeight]) -> QuantWeight:
    """Row concatenation (q|k|v, gate|up) of same-format weights: one packed copy of data and scales.
    fp8_block boundaries must fall on scale-block rows; per-tensor scales that differ become per-channel."""
    f = parts[0].format
    K = parts[0].shape[1]
    require(all(p.format == f and p.shape[1] == K for p in parts), "concat_quant: formats and K must match")
    if f == "int4":
        data = torch.cat([p.data for p in parts], 0)
    else:   # through uint8: float8 cat kernels are not everywhere
        data = torch.cat([p.data.view(torch.uint8) for p in parts], 0).view(parts[0].data.dtype)
    N = data.shape[0]
    if f == "fp8_block":
        bn = parts[0].block[0]
        require(all(p.block == parts[0].block for p in parts), "concat_quant: fp8 block shapes differ")
        for p in parts[:-1]:
            require(p.shape[0] % bn == 0, f"concat_quant: fp8_block rows {p.shape[0]} are not a multiple of the "
                    f"{bn}-row scale block, the packed rows would straddle a block")
        return QuantWeight(f, data, torch.cat([p.scale for p in parts], 0), (N, K), block=parts[0].block)
    if f == "fp8_tensor":
        if all(torch.equal(p.scale, parts[0].scale) for p in parts):
            return QuantWeight(f, data, parts[0].scale.clone(), (N, K))
        scale = torch.cat([p.scale.float().expand(p.shape[0], 1) for p in parts], 0)
        return QuantWeight("fp8_channel", data, scale, (N, K))
    if f == "fp8_channel":
        return QuantWeight(f, data, torch.cat([p.scale for p in parts], 0), (N, K))
    g = parts[0].group_size
    sym = [p.zero_point is None for p in parts]
    require(all(p.group_size == g for p in parts) and (all(sym) or not any(sym)),
            "concat_quant: int4 groups or symmetry differ")
    lut = parts[0].lut
    require(all((p.lut is None) == (lut is None) and (lut is None or torch.equal(p.lut, lut)) for p in parts),
            "concat_quant: int4 value tables differ")
    zp = None
    if not sym[0]:   # zero points are packed along N: repack the nibbles (a tiny tensor)
        zp = pack_int4(torch.cat([unpack_int4(p.zero_point, 0)[:p.shape[0]] for p in parts], 0), dim=0)
    return QuantWeight(f, data, torch.cat([p.scale for p in parts], 0), (N, K), group_size=g, zero_point=zp, lut=lut)
