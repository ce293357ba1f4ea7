"""braid-bench --quant: the run's own model, quantized into a checkpoint format, stock and braid on it.

`--quant fp8,int4` adds the variants stock-fp8, braid-fp8, stock-int4, braid-int4. Each loads the same model
as the plain variants (same preset and seed, or the same checkpoint), writes it with its decoder projections
quantized into that format's exact on-disk layout in a temporary folder (testing/quant_ckpt.py) and loads that
through transformers into its own quantized modules. stock-<q> times HF's forward of those modules (stock
FineGrainedFP8 needs a kernel from the hub at run time, so offline its rows record that error); braid-<q>
patches them. The bandwidth limit counts the checkpoint's bytes: quantized weights + scales + what stays dense.

Logits check of a quantized variant: against the fp32 model with the dequantised weights; the yardstick is the
bf16 model with the same dequantised weights (stock FineGrainedFP8 quantizes activations too: its numerics
are its own, so it is no yardstick). Greedy agreement: with that bf16 model's tokens.
"""
from __future__ import annotations

import os
import tempfile

# name -> (quant_ckpt format, writer options, what it is)
QUANT = {
    "fp8": ("fp8_block", {}, "FineGrainedFP8: e4m3 weights, 128x128 block scales (weight_scale_inv)"),
    "fp8-channel": ("fp8_channel", {}, "compressed-tensors float-quantized: e4m3, per-channel scales"),
    "int4": ("int4", {"group": 128}, "compressed-tensors pack-quantized (w4a16): int4, group 128, symmetric"),
    "int4-g32": ("int4", {"group": 32}, "compressed-tensors pack-quantized (w4a16): int4, group 32, symmetric"),
    "nf4": ("bnb", {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
            "bitsandbytes NF4, block 64, double-quantised absmax (quantized by bitsandbytes at load)"),
}
BASES = ("stock", "braid")


def quant_variants(names: list[str]) -> list[str]:
    return [f"{base}-{q}" for q in names for base in BASES]


ALL_QUANT_VARIANTS = tuple(quant_variants(list(QUANT)))


def split_variant(variant: str) -> tuple[str, str | None]:
    """("braid", "int4") for "braid-int4"; (variant, None) for every other variant."""
    for base in BASES:
        q = variant[len(base) + 1:]
        if variant.startswith(base + "-") and q in QUANT:
            return base, q
    return variant, None


def parse_quant_list(s: str) -> list[str]:
    """--quant: comma-separated names of QUANT (ValueError names the choices)."""
    out = [p.strip() for p in s.split(",") if p.strip()]
    bad = [q for q in out if q not in QUANT]
    if bad or not out:
        raise ValueError(f"--quant takes a comma-separated list of {', '.join(QUANT)}; got {s!r}")
    return list(dict.fromkeys(out))


def load_quant_model(model, q: str, notes: list):
    """The quantized checkpoint of `model` (dense, loaded as the plain variants load it), loaded back from a
    temporary folder into transformers' quantized modules on the same device. Frees `model` on the way."""
    import torch

    from ..testing.quant_ckpt import load_quantized, save_quantized

    fmt, kw, what = QUANT[q]
    device, dtype = model.device, model.dtype
    with tempfile.TemporaryDirectory(prefix=f"braid-bench-{q}-") as tmp:
        if fmt == "bnb":   # bitsandbytes quantizes while it loads the dense checkpoint
            model.save_pretrained(tmp)
        else:
            save_quantized(model, tmp, fmt, **kw)
        mb = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 2**20
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if fmt == "bnb":
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, **kw)
            qmodel = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=cfg, dtype=dtype,
                                                          device_map=str(device)).eval()
        else:
            qmodel = load_quantized(tmp, dtype=dtype, device=device)
    notes.append(f"{q}: {what}; written offline from the same weights ({mb:.0f} MiB on disk), loaded into "
                 "transformers' own quantized modules; lm_head stays dense")
    return qmodel


def dense_twins(qmodel, dtype):
    """(fp32 twin, `dtype` twin) of a quantized model: the check's reference and yardstick."""
    from ..testing.quant_ckpt import dequantized_twin

    ref = dequantized_twin(qmodel)
    return ref, dequantized_twin(qmodel, dtype)
