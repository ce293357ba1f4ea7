"""Tiny config of each family: patched vs stock, end to end through HF's forward and generate()."""

import pytest
import torch

import braid_backend
from braid_backend.testing.numerics import fp32_reference_logits, random_tokens, rel_err, teacher_forced_logits
from braid_backend.testing.presets import build_model
from helpers import BASE_FAMILIES

FAMILIES = BASE_FAMILIES


def param_bytes(model):
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def tokens(model, B, T, seed, device):
    return random_tokens(model.config.vocab_size, B, T, seed, device)


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_logits_and_greedy_match_stock(name, device):
    model = build_model(name, dtype=torch.float32, device=device, seed=1)
    prompt, cont = tokens(model, 2, 9, 11, device), tokens(model, 2, 5, 12, device)
    ref = teacher_forced_logits(model, prompt, cont)
    gen_ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = param_bytes(model)
    report = braid_backend.patch(model)
    assert report.ok, str(report)
    assert param_bytes(model) == before, "patching must not grow parameter memory"
    out = teacher_forced_logits(model, prompt, cont)
    assert braid_backend.status(model).stats["decode_fused"] >= cont.shape[1]
    err = rel_err(out, ref)
    assert err < 2e-5, f"{name}: fp32 patched vs stock rel err {err}"
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_left_padded_batch_matches_stock(name, device):
    model = build_model(name, dtype=torch.float32, device=device, seed=2)
    prompt, cont = tokens(model, 3, 8, 21, device), tokens(model, 3, 4, 22, device)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    mask[2, :5] = 0
    ref = teacher_forced_logits(model, prompt, cont, mask)
    braid_backend.patch(model)
    out = teacher_forced_logits(model, prompt, cont, mask)
    err = rel_err(out, ref)
    assert err < 2e-5, err


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_bf16_error_within_2x_of_stock(name, device):
    model = build_model(name, dtype=torch.bfloat16, device=device, seed=3)
    prompt, cont = tokens(model, 2, 12, 31, device), tokens(model, 2, 6, 32, device)
    ref = fp32_reference_logits(model, prompt, cont)
    stock_err = rel_err(teacher_forced_logits(model, prompt, cont), ref)
    braid_backend.patch(model)
    braid_err = rel_err(teacher_forced_logits(model, prompt, cont), ref)
    assert braid_err <= 2 * stock_err + 1e-3, (braid_err, stock_err)


def test_unpatch_is_bit_exact_and_patch_idempotent(device):
    model = build_model("tiny-qwen3", dtype=torch.bfloat16, device=device, seed=4)
    prompt, cont = tokens(model, 1, 7, 41, device), tokens(model, 1, 3, 42, device)
    ref = teacher_forced_logits(model, prompt, cont)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    r1 = braid_backend.patch(model)
    w = model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    r2 = braid_backend.patch(model)
    assert r1 is r2 and model.model.layers[0].self_attn.q_proj.weight.data_ptr() == w
    assert braid_backend.is_patched(model)
    braid_backend.unpatch(model)
    assert not braid_backend.is_patched(model)
    assert "forward" not in vars(model) and "generate" not in vars(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(teacher_forced_logits(model, prompt, cont), ref)


def test_report_lists_modules(device):
    model = build_model("tiny-qwen2", dtype=torch.float32, device=device)
    report = braid_backend.patch(model)
    text = str(report)
    assert report.family == "qwen2" and "bias" in text and "prefill" in text
    d = report.to_dict()
    assert d["ok"] and len(d["patched"]) == 2 * model.config.num_hidden_layers + 1


def test_plain_forward_creates_braid_cache(device):
    model = build_model("tiny-llama", dtype=torch.float32, device=device, seed=5)
    ids = tokens(model, 1, 6, 51, device)
    with torch.no_grad():
        full = model(ids).logits
    braid_backend.patch(model)
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        from braid_backend.hf.compat import cache_kwarg_name, output_cache
        cache = output_cache(out)
        assert type(cache).__name__ == "BraidCache"
        step = model(ids[:, 5:], **{cache_kwarg_name(model): cache}, use_cache=True)
    assert rel_err(step.logits[:, -1], full[:, -1]) < 2e-5


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma2"])
def test_split_k_tiles_in_the_decode_step(name, device, monkeypatch):
    """Every projection of the decode step on split-K tensor-core tiles (the GPU's batch 3-16 choice for
    small models), forced here: the step's workspace must serve them all, fp32 logits as stock's."""
    import braid_backend.kernels.fused_gemv as fg

    used = []

    def forced(M, n_out, K, dtype, has_act, dev, path=None, has_norm=False, *tuning_knobs):
        used.append((n_out, K))
        return dict(path="tc", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, SPLIT_K=3)

    monkeypatch.setattr(fg, "default_config", forced)
    grids, launch = [], fg.launch
    monkeypatch.setattr(fg, "launch", lambda kernel, grid: grids.append(grid) or launch(kernel, grid))
    model = build_model(name, dtype=torch.float32, device=device, seed=4)
    prompt, cont = tokens(model, 3, 7, 41, device), tokens(model, 3, 4, 42, device)
    ref = teacher_forced_logits(model, prompt, cont)
    braid_backend.patch(model)
    out = teacher_forced_logits(model, prompt, cont)
    assert braid_backend.status(model).stats["decode_fused"] >= 4
    assert len({n for n, _ in used}) >= 4, used   # qkv, o_proj/down (hidden), gate_up, lm_head
    assert sum(len(g) == 3 and g[2] == 3 for g in grids) >= 5 * model.config.num_hidden_layers, "K not split"
    err = rel_err(out, ref)
    assert err < 2e-5, f"{name}: split-K step vs stock rel err {err}"
