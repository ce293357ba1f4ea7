"""Quantized linear modules as transformers loads them -> kernels.quant_gemv.QuantWeight (views, no copy), or
Unsupported(reason) for anything the fused kernels cannot compute exactly.

What transformers 5.17-5.24 builds (read from their integrations, not guessed):
  FineGrainedFP8 (quant_method "fp8"): `FP8Linear` (transformers.integrations.finegrained_fp8), `weight` e4m3 (N, K),
    `weight_scale_inv` fp32 (ceil(N/bn), ceil(K/bk)) for block_size (bn, bk), a 0-d scale for block_size None.
    activation_scheme "dynamic" quantizes activations per 128-block on the fly in stock; the fused kernels keep them
    in bf16 (weight-only numerics: judge them against the bf16-dequantised model, not stock).
  compressed-tensors (quant_method "compressed-tensors"): plain nn.Linear modules carrying `quantization_scheme` and
    `quantization_status` ("compressed" while quantized); float-quantized keeps `weight` e4m3 + `weight_scale`,
    pack-quantized holds `weight_packed` / `weight_scale` / `weight_shape` [/ `weight_zero_point`]. A model-level
    forward pre-hook (`model.ct_decompress_hook`) decompresses every module on the first forward: read the
    weights before any stock forward runs (afterwards they are dense bf16 and this returns None).
  bitsandbytes 4-bit (quant_method "bitsandbytes", load_in_4bit): `Linear4bit` whose `weight` is a Params4bit of
    uint8 (N*K/2, 1), two elements a byte (the first in the high nibble), with `weight.quant_state` (absmax per
    `blocksize` elements, the 16-value `code` table of nf4 / fp4; with double quantisation absmax is uint8 codes of
    a second blockwise state plus `offset`). Read as int4 + table, absmax decoded to fp32 (a small new tensor).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.quant_gemv import QuantWeight, pack_int4
from .unsupported import Unsupported

# Loaders we cannot use here, with why (checked with pip on this machine, 2026: torch 2.13 / transformers 5.24).
REFUSED_METHODS = {
    "gptq": "GPTQ checkpoints need the gptqmodel loader; gptqmodel 7.7 requires torch 2.14 and transformers >= 5.20.2 "
            "(it would replace the installed torch/triton), so it is not installed and its packed layout is not read",
    "awq": "AWQ int4 (autoawq's packed order and zero points) is not implemented in the fused kernels",
}
BNB_8BIT = ("bitsandbytes 8-bit (LLM.int8: int8 rows with fp16 outlier columns) is not implemented in the fused "
            "kernels (its 4-bit NF4 / FP4 is)")
SUPPORTED_METHODS = ("fp8", "compressed-tensors", "bitsandbytes")
# Linear subclasses of transformers' quantization integrations that quant_weight reads (compressed-tensors
# keeps plain nn.Linear modules)
QUANT_LINEAR_CLASSES = ("FP8Linear", "Linear4bit")


def model_quant_method(model: nn.Module) -> str | None:
    """The model's quant_method when it is one the kernels read, None for a dense model; Unsupported otherwise."""
    q = getattr(model, "hf_quantizer", None)
    cfg = getattr(q, "quantization_config", None) or getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None and cfg is None:
        return None
    method = cfg.get("quant_method") if isinstance(cfg, dict) else getattr(cfg, "quant_method", None)
    method = str(getattr(method, "value", method)).lower()
    for key, why in REFUSED_METHODS.items():
        if key in method:
            raise Unsupported(why)
    if method not in SUPPORTED_METHODS:
        raise Unsupported(f"quantization method {method!r} is not supported (fused kernels read: "
                          f"{', '.join(SUPPORTED_METHODS)})")
    if method == "fp8" and getattr(cfg, "dequantize", False):
        return None   # dequantised at load (e.g. no FP8-capable GPU): the model is dense bf16
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    if method == "bitsandbytes" and not get("load_in_4bit"):
        raise Unsupported(BNB_8BIT)
    return method


def _fp8_linear(m: nn.Module) -> QuantWeight:
    w, s = m.weight, m.weight_scale_inv
    N, K = w.shape
    if w.dtype != torch.float8_e4m3fn:
        raise Unsupported(f"FP8Linear weight of dtype {w.dtype} (FP4 / e5m2 layouts are not implemented)")
    if s.dtype != torch.float32:
        raise Unsupported(f"FP8Linear scales of dtype {s.dtype} (ue8m0 / MX scales are not implemented)")
    if getattr(m, "activation_scheme", "dynamic") != "dynamic" or getattr(m, "activation_scale", None) is not None:
        raise Unsupported("FP8Linear with static activation scales (calibrated FP8 activations): the fused kernels "
                          "keep activations in bf16, which changes the numerics the checkpoint was calibrated for")
    block = getattr(m, "block_size", None)
    if block is None:
        return QuantWeight("fp8_tensor", w.data, s.data, (N, K))
    bn, bk = (int(v) for v in block)
    if any(b < 16 or b & (b - 1) for b in (bn, bk)):
        raise Unsupported(f"FP8 block size {block}: the kernels need power-of-two blocks of at least 16")
    return QuantWeight("fp8_block", w.data, s.data, (N, K), block=(bn, bk))


@torch.no_grad()
def _bnb_linear(m: nn.Module) -> QuantWeight:
    w = m.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        raise Unsupported("bitsandbytes Linear4bit without a quant_state (not quantized yet: it quantizes when moved "
                          "to its device)")
    N, K = (int(v) for v in qs.shape)
    g = int(qs.blocksize)
    if qs.quant_type not in ("nf4", "fp4") or K % g or g % 8 or w.dtype != torch.uint8 or not w.is_contiguous() \
            or w.numel() != N * K // 2 or w.data_ptr() % 4:
        raise Unsupported(f"bitsandbytes {qs.quant_type} weight {tuple(w.shape)} {w.dtype} for ({N}, {K}), block {g}: "
                          "the kernels read contiguous uint8 nf4 / fp4 storage with blocks that do not cross a row")
    absmax = qs.absmax
    if qs.nested:   # double quantisation: absmax = code2[q] * absmax2[block of state2] + offset (bitsandbytes' order)
        s2 = qs.state2
        a2 = s2.absmax.float().repeat_interleave(int(s2.blocksize))[:absmax.numel()]
        absmax = s2.code.float()[absmax.long()] * a2 + float(qs.offset)
    return QuantWeight("int4", w.data.view(-1).view(torch.int32).view(N, K // 8), absmax.float().view(N, K // g),
                       (N, K), group_size=g, lut=qs.code.float().contiguous())


def _ct_linear(m: nn.Module) -> QuantWeight | None:
    scheme = m.quantization_scheme
    status = str(getattr(getattr(m, "quantization_status", None), "value", getattr(m, "quantization_status", None)))
    if status == "decompressed":
        return None   # compressed-tensors has dequantised it in place (first forward): a dense bf16 weight now
    if status != "compressed":
        raise Unsupported(f"compressed-tensors module in status {status!r} (fake-quantized weights, not a checkpoint)")
    if scheme.input_activations is not None or scheme.output_activations is not None:
        raise Unsupported("compressed-tensors activation-quantized scheme (input/output activations quantized): the "
                          "fused kernels keep activations in bf16, which changes the numerics")
    a = scheme.weights
    if a is None:
        return None
    kind, bits, strategy = str(getattr(a.type, "value", a.type)), a.num_bits, str(getattr(a.strategy, "value", a.strategy))
    if a.dynamic:
        raise Unsupported("compressed-tensors dynamic weight quantization is not a stored format")
    if kind == "float" and bits == 8:
        w, s = getattr(m, "weight", None), getattr(m, "weight_scale", None)
        if w is None or w.dtype != torch.float8_e4m3fn or s is None:
            raise Unsupported("compressed-tensors FP8 module without an e4m3 `weight` and `weight_scale`")
        if not a.symmetric:
            raise Unsupported("compressed-tensors asymmetric FP8 is not implemented")
        N, K = w.shape
        if strategy == "channel":
            return QuantWeight("fp8_channel", w.data, s.data.reshape(N, 1), (N, K))
        if strategy == "tensor":
            return QuantWeight("fp8_tensor", w.data, s.data.reshape(1, 1), (N, K))
        if strategy == "block" and a.block_structure is not None:
            bn, bk = (int(v) for v in a.block_structure)
            if any(b < 16 or b & (b - 1) for b in (bn, bk)):
                raise Unsupported(f"FP8 block structure {a.block_structure}: power-of-two blocks >= 16 only")
            return QuantWeight("fp8_block", w.data, s.data, (N, K), block=(bn, bk))
        raise Unsupported(f"compressed-tensors FP8 strategy {strategy!r} is not implemented")
    if kind == "int" and bits == 4:
        if strategy != "group":
            raise Unsupported(f"compressed-tensors int4 strategy {strategy!r} (only group-wise is implemented)")
        if getattr(a, "actorder", None) not in (None, False) or getattr(m, "weight_g_idx", None) is not None:
            raise Unsupported("int4 with activation ordering (g_idx) is not implemented")
        packed, s, shape = (getattr(m, n, None) for n in ("weight_packed", "weight_scale", "weight_shape"))
        if packed is None or packed.dtype != torch.int32 or s is None:
            raise Unsupported("compressed-tensors int4 module without pack-quantized `weight_packed` / `weight_scale`")
        N, K = (int(v) for v in shape.tolist()) if shape is not None else (packed.shape[0], packed.shape[1] * 8)
        g = int(a.group_size)
        if g % 16 or K % g:
            raise Unsupported(f"int4 group size {g} with K={K}: groups must be multiples of 16 dividing K")
        zp = None
        if not a.symmetric:
            z = getattr(m, "weight_zero_point", None)
            if z is None:
                raise Unsupported("asymmetric int4 module without `weight_zero_point`")
            if z.dtype == torch.int32 and tuple(z.shape) == (-(-N // 8), K // g):
                zp = z.data                                    # the on-disk layout: packed along N
            elif tuple(z.shape) == (N, K // g) and not z.dtype.is_floating_point:
                zp = pack_int4(z.data.to(torch.int32) + 8, dim=0)   # unpacked signed zero points (tiny copy)
            else:
                raise Unsupported(f"int4 zero points of shape {tuple(z.shape)} / {z.dtype} are not a known layout")
        return QuantWeight("int4", packed.data, s.data, (N, K), group_size=g, zero_point=zp)
    raise Unsupported(f"compressed-tensors weights {kind}{bits} ({strategy}) are not implemented "
                      "(fp8 e4m3 and int4 group-wise are)")


def quant_weight(module: nn.Module) -> QuantWeight | None:
    """The QuantWeight viewing this Linear's quantized tensors in place; None for a dense Linear;
    Unsupported(reason) for a quantized module the kernels cannot compute exactly."""
    name = type(module).__name__
    if name == "FP8Linear":
        return _fp8_linear(module)
    if name == "Linear4bit":
        return _bnb_linear(module)
    if name == "Linear8bitLt":
        raise Unsupported(BNB_8BIT)
    if getattr(module, "quantization_scheme", None) is not None:
        if not isinstance(module, nn.Linear):
            raise Unsupported(f"compressed-tensors scheme on a {name} (only Linear layers are read)")
        return _ct_linear(module)
    if type(module) is nn.Linear:
        if module.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8):
            raise Unsupported(f"nn.Linear with a {module.weight.dtype} weight and no known quantization scheme")
        return None
    if isinstance(module, nn.Linear) or "Linear" in name or hasattr(module, "qweight"):
        raise Unsupported(f"{type(module).__module__}.{name}: quantized / custom linear layout not implemented")
    return None


def describe(qw: QuantWeight, module: nn.Module | None = None) -> str:
    """One line for the patch report."""
    if qw.lut is not None:
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        kind = f"bitsandbytes {qs.quant_type}{', double-quantised absmax' if qs.nested else ''}" if qs is not None \
            else "int4 with a value table"
        return f"{kind}, block {qw.group_size}"
    if qw.format == "fp8_block":
        return f"fp8 e4m3, {qw.block[0]}x{qw.block[1]} block scales"
    if qw.format == "fp8_channel":
        return "fp8 e4m3, per-channel scales"
    if qw.format == "fp8_tensor":
        return "fp8 e4m3, per-tensor scale"
    kind = "symmetric" if qw.zero_point is None else "asymmetric (zero points)"
    return f"int4, group {qw.group_size}, {kind}, {str(qw.scale.dtype).replace('torch.', '')} scales"


def is_quant_module(m: nn.Module) -> bool:
    """A module transformers' FineGrainedFP8 / compressed-tensors integrations built (quantized or not yet read)."""
    return type(m).__name__ in ("Linear4bit", "Linear8bitLt") or type(m).__name__.startswith("FP8") or getattr(
        m, "quantization_scheme", None) is not None


def has_quantized(block: nn.Module) -> bool:
    """Whether any submodule or parameter of `block` is quantized (FP8 / int storage, quantized modules)."""
    return any(is_quant_module(m) for m in block.modules()) or any(
        not p.dtype.is_floating_point or p.element_size() == 1 for p in block.parameters())


def main_tensor(m: nn.Module) -> torch.Tensor:
    """The tensor holding a Linear's weight bytes: the int4 `weight_packed`, else `weight`."""
    t = getattr(m, "weight_packed", None)
    return t if t is not None else m.weight


@dataclass
class QuantPlan:
    """A quantized model's facts for the step and the report (no QuantWeight kept: the step reads its own)."""
    method: str                       # model_quant_method: "fp8" (FineGrainedFP8) or "compressed-tensors"
    formats: dict[str, str]           # module name -> describe() of every quantized Linear
    modules: dict[str, nn.Module]     # the same modules (prefill routes every one of them)
    model: weakref.ref                # the model (compressed-tensors' decompress hook sits on it); weak: no cycle
    dtype: torch.dtype                # the activations' dtype (the dense parameters')

    def format_of(self, m: nn.Module) -> str | None:
        return self._by_id.get(id(m))

    def __post_init__(self):
        self._by_id = {id(m): self.formats[n] for n, m in self.modules.items()}


def quant_modules(model: nn.Module) -> dict[str, tuple[nn.Module, QuantWeight]]:
    """name -> (module, QuantWeight) of every quantized linear in the model; Unsupported names the first one
    the kernels cannot read (its stock forward could not run once the model is patched either)."""
    out = {}
    for name, m in model.named_modules():
        if not is_quant_module(m) and not isinstance(m, nn.Linear):
            continue
        try:
            qw = quant_weight(m)
        except Unsupported as e:
            raise Unsupported(f"{name}: {e}") from None
        if qw is not None:
            out[name] = (m, qw)
        elif is_quant_module(m) and not isinstance(m, nn.Linear):
            raise Unsupported(f"{name}: {type(m).__name__} (quantized MoE experts / embeddings) is not fused yet: "
                              "the MoE kernels read dense experts only")
    return out


def check_packable(linears, what: str, act: bool = False) -> None:
    """Unsupported(reason) where q|k|v or gate|up cannot share one packed QuantWeight (concat_quant's rules, and
    quant_gemv's fp8 gate|up rule), checked at planning so that patch() reports it."""
    qws = [quant_weight(m) for m in linears]
    if all(q is None for q in qws):
        return
    if any(q is None for q in qws):
        raise Unsupported(f"{what}: mixes dense and quantized modules (one packed weight needs one format)")
    if len({q.format for q in qws}) > 1:
        raise Unsupported(f"{what}: formats differ ({', '.join(q.format for q in qws)}): one packed weight needs one")
    q0 = qws[0]
    if q0.format == "fp8_block":
        bn, bk = q0.block
        if len({q.block for q in qws}) > 1:
            raise Unsupported(f"{what}: fp8 block shapes differ")
        rows = [q.shape[0] for q in qws[:-1]] + ([q0.shape[0] // 2] if act and len(qws) == 1 else [])
        if any(r % bn for r in rows):
            raise Unsupported(f"{what}: fp8 {bn}x{bk} block scales and {[q.shape[0] for q in qws]} rows: a part that "
                              f"is not a multiple of {bn} rows would straddle a scale block in the packed weight")
    tables = {None if q.lut is None else tuple(q.lut.tolist()) for q in qws}
    if q0.format == "int4" and (len({q.group_size for q in qws}) > 1 or len({q.zero_point is None for q in qws}) > 1
                                or len(tables) > 1):
        raise Unsupported(f"{what}: int4 group sizes, symmetry or value tables (nf4 / fp4) differ")


def plan_quant(model: nn.Module, method: str) -> QuantPlan:
    """Every quantized Linear read (or Unsupported), the model-level checks of `method`, and the dense dtype."""
    cfg = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None) or getattr(
        model.config, "quantization_config", None)
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    if method == "compressed-tensors" and get("kv_cache_scheme") is not None:
        raise Unsupported("compressed-tensors kv_cache_scheme (a quantized KV cache) is not implemented: the braid "
                          "cache holds the model dtype")
    mods = quant_modules(model)
    quant_ids = {id(p) for m, _ in mods.values() for n, p in m._parameters.items() if p is not None and n != "bias"}
    # a module an earlier stock forward decompressed keeps its packed bookkeeping (weight_shape int64, the
    # zero points) beside the dense weight it now computes with: not read, not a dense dtype
    quant_ids |= {id(p) for m in model.modules() if hasattr(m, "quantization_scheme") and quant_weight(m) is None
                  for n, p in m._parameters.items() if p is not None and n != "weight" and not p.is_floating_point()}
    dense = {p.dtype for p in model.parameters() if id(p) not in quant_ids}
    if len(dense) != 1 or next(iter(dense)) not in (torch.float32, torch.bfloat16, torch.float16):
        raise Unsupported(f"parameters outside the quantized Linears have dtypes {sorted(map(str, dense))}: need one "
                          "of fp32/bf16/fp16 (quantized embeddings or norms are not read)")
    return QuantPlan(method, {n: describe(qw, m) for n, (m, qw) in mods.items()}, {n: m for n, (m, _) in mods.items()},
                     weakref.ref(model), next(iter(dense)))
