"""Offline quantized test checkpoints: a random-weight preset, its decoder Linear layers quantized here and
saved in the on-disk formats transformers loads into its own quantized modules (no hub access):

  "fp8_block"    FineGrainedFP8: `weight` e4m3 + `weight_scale_inv` fp32 (ceil(N/128), ceil(K/128)),
                 quantization_config {"quant_method": "fp8", "weight_block_size": [128, 128], ...}
  "fp8_channel"  compressed-tensors float-quantized, weight-only, strategy channel: `weight` e4m3 +
                 `weight_scale` (N, 1)
  "int4"         compressed-tensors pack-quantized (w4a16), strategy group: `weight_packed` int32 (N, K/8),
                 `weight_scale` (N, K/g), `weight_shape`, asymmetric also `weight_zero_point` (N/8, K/g) int32

lm_head stays dense (as in published checkpoints). `load_quantized` loads one; on a machine without a
CUDA GPU transformers would dequantise FineGrainedFP8 at load, so it skips that check there (CPU tests
only: the FP8Linear modules are what a GPU load gives)."""
from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
from torch import nn

from ..kernels.quant_gemv import dequantize, pack_int4
from ..model.quant import quant_weight
from .presets import build_model

FP8_MAX = 448.0
CT_FORMATS = {"fp8_channel": "float-quantized", "int4": "pack-quantized"}


def quantize_fp8_block(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale_inv per block): DeepSeek / FineGrainedFP8's amax / 448 per block."""
    N, K = w.shape
    bn, bk = block
    wp = torch.nn.functional.pad(w.float(), (0, -K % bk, 0, -N % bn))
    blocks = wp.reshape(wp.shape[0] // bn, bn, wp.shape[1] // bk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(wp.shape)[:N, :K]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def quantize_fp8_channel(w: torch.Tensor, scale_dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, (N, 1) scale in scale_dtype): compressed-tensors' symmetric per-channel fp8."""
    scale = (w.float().abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    return (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool, scale_dtype=torch.bfloat16):
    """compressed-tensors int4 group quantization: q in [-8, 7]; symmetric scale = amax / 7.5, z = 0;
    asymmetric scale = (max - min) / 15, z = -8 - round(min / scale). Returns (packed int32 (N, K/8),
    scale (N, K/g), packed zero point (ceil(N/8), K/g) or None, the integer values q)."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"K={K} is not a multiple of the group size {group}")
    wg = w.float().reshape(N, K // group, group)
    if symmetric:
        scale = (wg.abs().amax(-1) / 7.5).clamp(min=1e-8).to(scale_dtype)
        z = torch.zeros_like(scale, dtype=torch.int64)
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).to(scale_dtype)
        z = (-8 - torch.round(lo / scale.float())).clamp(-8, 7).to(torch.int64)
    q = (torch.round(wg / scale.float()[..., None]) + z[..., None]).clamp(-8, 7).to(torch.int64).reshape(N, K)
    zp = None if symmetric else pack_int4(z + 8, dim=0)
    return pack_int4(q + 8), scale, zp, q


def _is_quantized_linear(name: str) -> bool:
    return ".layers." in name and name.endswith("_proj.weight")


def _ct_config(fmt: str, group: int, symmetric: bool) -> dict:
    if fmt == "int4":
        weights = dict(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group,
                       dynamic=False, actorder=None, observer="minmax")
    else:
        weights = dict(num_bits=8, type="float", symmetric=True, strategy="channel", group_size=None,
                       dynamic=False, observer="minmax")
    return {"quant_method": "compressed-tensors", "format": CT_FORMATS[fmt], "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": CT_FORMATS[fmt]}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None}


@torch.no_grad()
def write_quant_checkpoint(path, fmt: str, preset: str = "tiny-llama", group: int = 128, symmetric: bool = True,
                           dtype: torch.dtype = torch.bfloat16, seed: int = 0, peaked: float | None = None,
                           device: str | torch.device = "cpu", **config_overrides) -> dict:
    """Write `preset` (random weights) with its decoder projections quantized in `fmt` to folder `path`.
    `peaked`: an untied lm_head made of the embedding rows in a random order times `peaked` (braid-bench's
    tiny-peaked idea: greedy tokens vary, top-1 margins are clear). `device`: where the model is built and
    quantized. Returns {module name: the quantized tensors written} (what a loader must give back)."""
    model = build_model(preset, dtype=dtype, device=device, seed=seed, **config_overrides)
    if peaked:
        if model.config.tie_word_embeddings:
            raise ValueError("peaked needs an untied lm_head (tie_word_embeddings=False)")
        perm = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(seed))
        model.lm_head.weight.copy_(model.get_input_embeddings().weight[perm.to(model.device)] * peaked)
    return save_quantized(model, path, fmt, group, symmetric)


@torch.no_grad()
def save_quantized(model, path, fmt: str, group: int = 128, symmetric: bool = True) -> dict:
    """Save a dense model to folder `path` with its decoder projections quantized in `fmt` (on the model's
    device; scales in the model's dtype where the format has a choice). Returns what write_quant_checkpoint does."""
    from safetensors.torch import load_file, save_file

    if fmt not in ("fp8_block", "fp8_channel", "int4"):
        raise ValueError(f"fmt must be fp8_block, fp8_channel or int4, got {fmt!r}")
    path, device, dtype = str(path), model.device, model.dtype
    model.save_pretrained(path, max_shard_size="1000GB")   # one file: the names below change in place
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file, found {files}")
    sd = load_file(os.path.join(path, files[0]))
    written = {}
    for name in [n for n in sd if _is_quantized_linear(n)]:
        w, mod = sd.pop(name).to(device), name[:-len(".weight")]
        if fmt == "fp8_block":
            q, s = quantize_fp8_block(w)
            t = {"weight": q, "weight_scale_inv": s}
        elif fmt == "fp8_channel":
            q, s = quantize_fp8_channel(w, scale_dtype=dtype)
            t = {"weight": q, "weight_scale": s}
        else:
            packed, s, zp, _ = quantize_int4(w, group, symmetric, scale_dtype=dtype)
            t = {"weight_packed": packed, "weight_scale": s, "weight_shape": torch.tensor(list(w.shape))}
            if zp is not None:
                t["weight_zero_point"] = zp
        t = {k: v.contiguous().cpu() for k, v in t.items()}
        sd.update({f"{mod}.{k}": v for k, v in t.items()})
        written[mod] = t
    save_file(sd, os.path.join(path, files[0]), metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if fmt == "fp8_block":
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    else:
        cfg["quantization_config"] = _ct_config(fmt, group, symmetric)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return written


@contextlib.contextmanager
def _fp8_on_cpu():
    """Without a CUDA GPU transformers dequantises FineGrainedFP8 at load; skip that check (tests only)."""
    if torch.cuda.is_available():
        yield
        return
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    orig = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *a, **k: None
    try:
        yield
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = orig


def load_quantized(path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """AutoModelForCausalLM.from_pretrained(path) into transformers' quantized modules, in eval mode."""
    from transformers import AutoModelForCausalLM

    with _fp8_on_cpu():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=str(device))
    return model.eval()


@torch.no_grad()
def dequantized_twin(qmodel, dtype: torch.dtype = torch.float32):
    """The dense model of the same config on the same device: each quantized Linear's dequantised weight (exact
    in fp32, rounded once to `dtype`), every other parameter copied. The fp32 twin is the reference of a
    quantized model's logits, the bf16 twin its yardstick (tests/test_quant_models.py, braid-bench --quant)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(qmodel.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    with torch.device(qmodel.device):
        twin = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    qmods = dict(qmodel.named_modules())
    for name, mod in twin.named_modules():
        qm = qmods[name]
        qw = quant_weight(qm) if isinstance(mod, nn.Linear) else None
        for pn, p in mod.named_parameters(recurse=False):
            src = dequantize(qw) if qw is not None and pn == "weight" else getattr(qm, pn)
            p.copy_(src.float())
    return twin.eval()
