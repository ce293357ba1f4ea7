"""Mixture-of-experts families (issue #23) end to end: tiny configs patched vs stock on the CPU, real-sized
layers on the GPU. Expert selection is data dependent, so every check runs a batch whose rows pick
different (and some shared) experts, with a left-padded row."""
import json
import os

import pytest
import torch

import braid_backend
from braid_backend.testing.numerics import fp32_reference_logits, random_tokens, rel_err, teacher_forced_logits
from braid_backend.testing.presets import build_model

# family -> tiny preset (test_families.py's coverage rule counts these)
MOE_FAMILIES = {"qwen3_moe": "tiny-qwen3-moe", "qwen2_moe": "tiny-qwen2-moe", "mixtral": "tiny-mixtral",
                "olmoe": "tiny-olmoe", "gpt_oss": "tiny-gpt-oss", "granitemoe": "tiny-granitemoe"}


def _inputs(model, device, B=2, T=6, C=3, seed=0):
    V = model.config.vocab_size
    prompt, cont = random_tokens(V, B, T, seed, device), random_tokens(V, B, C, seed + 1, device)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0   # a left-padded row
    return prompt, cont, mask


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_fp32_logits_every_step_and_greedy_tokens_match_stock(family, device):
    model = build_model(MOE_FAMILIES[family], dtype=torch.float32, device=device, seed=5)
    prompt, cont, mask = _inputs(model, device)
    gen_ref = model.generate(prompt, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    ref = teacher_forced_logits(model, prompt, cont, mask)
    report = braid_backend.patch(model)
    assert report.ok and report.family == family, str(report)
    assert any("selected experts only" in what for _, what in report.patched), report.patched
    out = teacher_forced_logits(model, prompt, cont, mask)
    assert braid_backend.status(model).stats["decode_fused"] >= cont.shape[1], "decode steps ran stock"
    for i in range(out.shape[0]):
        err = rel_err(out[i], ref[i])
        assert err < 2e-5, f"step {i}: fp32 patched vs stock rel err {err}"
    gen = model.generate(prompt, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref)
    braid_backend.unpatch(model)
    assert not braid_backend.is_patched(model)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_bf16_error_within_2x_of_stock(family, device):
    model = build_model(MOE_FAMILIES[family], dtype=torch.bfloat16, device=device, seed=7)
    prompt, cont, mask = _inputs(model, device, B=3, C=2, seed=40)
    ref = fp32_reference_logits(model, prompt, cont, mask)
    stock = rel_err(teacher_forced_logits(model, prompt, cont, mask), ref)
    assert braid_backend.patch(model).ok
    err = rel_err(teacher_forced_logits(model, prompt, cont, mask), ref)
    assert err <= 2 * stock + 1e-3, (err, stock)


def test_packed_mxfp4_experts_are_refused_with_the_reason():
    from transformers.integrations import mxfp4

    model = build_model("tiny-gpt-oss", dtype=torch.bfloat16)
    mlp = model.model.layers[0].mlp
    mlp.experts = mxfp4.Mxfp4GptOssExperts(model.config)   # what a load with the MXFP4 kernels leaves
    report = braid_backend.patch(model)
    assert not report.ok and "MXFP4" in report.reason, report.reason


# ------------------------------------------------------------------------------------------------ GPU
GPU_PRESETS = {"qwen3_moe": ("qwen3-30b-a3b", 4), "gpt_oss": ("gpt-oss-20b", 4), "mixtral": ("mixtral-8x7b", 2),
               "olmoe": ("olmoe-1b-7b", 4), "qwen2_moe": ("qwen1.5-moe-a2.7b", 4),
               "granitemoe": ("granite-3.1-3b-a800m", 4)}
GPU_RESULTS = []


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(GPU_PRESETS))
def test_gpu_bf16_error_within_2x_of_stock(family):
    """Real-sized MoE layers (a few of them), random weights, bf16, batch 4 with a left-padded row:
    braid's error against an fp32 reference at most 2x stock's, at contexts 1 and 300 (and 4000 for the two
    models issue #23 names: past gpt-oss's 128-token window)."""
    name, layers = GPU_PRESETS[family]
    model = build_model(name, dtype=torch.bfloat16, device="cuda", seed=0, num_hidden_layers=layers)
    V = model.config.vocab_size
    cases = []
    for ctx in (1, 300, 4000) if family in ("qwen3_moe", "gpt_oss") else (1, 300):
        prompt, cont = random_tokens(V, 4, ctx, 100 + ctx, "cuda"), random_tokens(V, 4, 6, 200 + ctx, "cuda")
        mask = torch.ones_like(prompt)
        mask[1, :ctx // 3] = 0
        ref = fp32_reference_logits(model, prompt, cont, mask)
        cases.append((ctx, prompt, cont, mask, ref, rel_err(teacher_forced_logits(model, prompt, cont, mask), ref)))
    assert braid_backend.patch(model).ok
    failures = []
    for ctx, prompt, cont, mask, ref, stock in cases:
        err = rel_err(teacher_forced_logits(model, prompt, cont, mask), ref)
        GPU_RESULTS.append(dict(preset=name, layers=layers, ctx=ctx, stock_err=stock, braid_err=err,
                                ratio=err / stock))
        if not err <= 2 * stock:
            failures.append((ctx, err, stock))
    out = os.environ.get("BRAID_GPU_JSON")
    if out:
        with open(out.replace(".json", "") + "-moe.json", "w") as f:
            json.dump(GPU_RESULTS, f, indent=1)
    assert not failures, failures
