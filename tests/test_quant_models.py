"""Quantized checkpoints through patch() + generate() (issue #24): FineGrainedFP8 block, compressed-tensors fp8
channel and int4 pack-quantized checkpoints written offline (testing/quant_ckpt.py), loaded into transformers'
own quantized modules, patched, and compared with the model whose weights are the dequantised ones.

Reference: the fp32 model with the dequantised weights (exact fp32 data * scale). Yardstick: the bf16 model with
the same dequantised weights (rounded to bf16), i.e. its own error vs that reference; the patched model may be
at most 2x worse. Stock FineGrainedFP8 is no reference: it quantizes the activations to fp8 (and cannot run
offline at all); stock compressed-tensors decompresses to exactly the bf16-dequantised model.
"""
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import braid_backend
from braid_backend.kernels.quant_gemv import dequantize
from braid_backend.model.quant import quant_weight
from braid_backend.testing.numerics import random_tokens, rel_err, teacher_forced_logits
from braid_backend.testing.presets import build_model
from braid_backend.testing.quant_ckpt import dequantized_twin, load_quantized, write_quant_checkpoint

# 128-wide tiny Llamas: K a multiple of every int4 group; BLOCKED puts q, k and v on 128-row FP8 scale blocks
# (one layer where two add only interpreter time; the FP8-block model keeps two)
SMALL = dict(preset="tiny-llama", hidden_size=128, intermediate_size=256, num_attention_heads=8,
             num_key_value_heads=2, head_dim=16, num_hidden_layers=1, peaked=8.0)
BLOCKED = dict(SMALL, num_attention_heads=4, head_dim=64, num_hidden_layers=2)
CASES = {  # case: (format, writer options, config, what the report must name)
    "fp8_block": ("fp8_block", {}, BLOCKED, "fp8 e4m3, 128x128 block scales"),
    "fp8_channel": ("fp8_channel", {}, SMALL, "fp8 e4m3, per-channel scales"),
    "int4_g32": ("int4", dict(group=32), SMALL, "int4, group 32, symmetric"),
    "int4_g128": ("int4", dict(group=128), SMALL, "int4, group 128, symmetric"),
    "int4_g32_asym": ("int4", dict(group=32, symmetric=False), SMALL, "int4, group 32, asymmetric"),
}
FLOOR = 1e-4   # helpers.BF16_FLOOR: the 2x rule's floor (relative norm)


def _needs_ct():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (braid-backend[test])")


def _load(path, fmt, kw, cfg, device="cpu"):
    if fmt != "fp8_block":
        _needs_ct()
    written = write_quant_checkpoint(path, fmt, **kw, **cfg)
    if kw.get("symmetric", True):
        return load_quantized(path, device=device)
    return _asymmetric(path, written, kw, cfg, device)


@torch.no_grad()
def _asymmetric(path, written, kw, cfg, device):
    """compressed-tensors 0.20.1 builds asymmetric int4 modules without packing their zero points, so transformers
    reports a shape mismatch for the genuine on-disk layout (tests/test_quant_ckpt.py): where the load does not
    give the written zero points back, load the symmetric twin and set each module up as that loader should."""
    try:
        return load_quantized(path, device=device)   # a compressed-tensors that loads its own layout
    except RuntimeError as e:
        assert "mismatch" in str(e).lower() or "weight_zero_point" in str(e), e
    sym = os.path.join(str(path), "sym")
    write_quant_checkpoint(sym, "int4", **dict(kw, symmetric=True), **cfg)
    model = load_quantized(sym, device=device)
    for name, t in written.items():
        m = model.get_submodule(name)
        m.quantization_scheme.weights.symmetric = False
        m.weight_zero_point = nn.Parameter(t["weight_zero_point"].to(device), requires_grad=False)
        m.weight_scale.copy_(t["weight_scale"])
        m.weight_packed.copy_(t["weight_packed"])
    return model


def _references(model):
    """(prompt, cont, fp32 dequantised twin, its bf16 copy, their teacher-forced logits l32 / l16, the bf16 twin's
    error): the reference and the yardstick of a quantized model's logits (module docstring)."""
    ref32 = dequantized_twin(model)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    V = model.config.vocab_size
    prompt, cont = random_tokens(V, 2, 8, 1, "cpu"), random_tokens(V, 2, 2, 2, "cpu")
    l32, l16 = teacher_forced_logits(ref32, prompt, cont), teacher_forced_logits(ref16, prompt, cont)
    return prompt, cont, ref32, ref16, l32, l16, rel_err(l16, l32)


def _storage_bytes(model):
    seen = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _clear_prefix(ref_out, prompt_len, tau):
    """Per row: how many generated tokens the bf16 reference chose with a top-1 margin >= tau."""
    scores = torch.stack([s.float() for s in ref_out.scores], 1)          # (B, steps, V)
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) >= tau                           # (B, steps)
    return [int(torch.cumprod(c.long(), 0).sum()) for c in clear]


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_checkpoint_patch_and_generate(case, tmp_path):
    fmt, kw, cfg, desc = CASES[case]
    model = _load(tmp_path, fmt, kw, cfg)
    q = model.model.layers[0].self_attn.q_proj
    assert quant_weight(q) is not None and quant_weight(q).format == fmt
    fwd_before = vars(q).get("forward")   # compressed-tensors installs its own instance forward
    hooks_before = dict(model._forward_pre_hooks)
    state, nbytes = _state(model), _storage_bytes(model)
    prompt, cont, ref32, ref16, l32, l16, bf16_err = _references(model)
    if fmt == "fp8_block":   # stock FineGrainedFP8 cannot run here: its kernel comes from the hub at run time
        with pytest.raises(ImportError, match="finegrained-fp8"):
            model(prompt[:, :2])

    report = braid_backend.patch(model, graph_steps=4)   # the 4 decode steps of generate() below, no more
    assert report.ok, report.reason
    text = str(report)
    assert desc in text and "lm_head: dense bfloat16" in text and "quant_linear_prefill" in text, text
    assert _storage_bytes(model) == nbytes, "weights must stay quantized, packed without growing memory"
    assert "ct_decompress_hook" not in str(list(model._forward_pre_hooks.values()))
    out = teacher_forced_logits(model, prompt, cont)
    assert braid_backend.status(model).stats["decode_fused"] >= cont.shape[1]
    err = rel_err(out, l32)
    assert err <= 2 * bf16_err + FLOOR, f"{case}: patched {err:.3e} vs the bf16-dequantised model's {bf16_err:.3e}"

    # greedy generate(): the bf16-dequantised model's tokens wherever its top-1 margin is clear
    tau = 4 * float((out - l16).abs().max()) + 1e-3
    g16 = ref16.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    gq = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert braid_backend.status(model).stats["generate_fast"] >= 1
    T = prompt.shape[1]
    n = _clear_prefix(g16, T, tau)
    assert sum(n) > 0 and len(set(g16.sequences[:, T:].flatten().tolist())) > 1, (n, tau, g16.sequences)
    for b, k in enumerate(n):
        assert torch.equal(gq[b, T:T + k], g16.sequences[b, T:T + k]), (b, k, gq, g16.sequences)

    braid_backend.unpatch(model)
    assert vars(q).get("forward") is fwd_before and dict(model._forward_pre_hooks) == hooks_before
    assert _storage_bytes(model) == nbytes
    after = model.state_dict()
    assert all(torch.equal(after[k].view(torch.uint8) if after[k].dtype == torch.float8_e4m3fn else after[k],
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v) for k, v in state.items())
    if fmt == "fp8_block":
        with pytest.raises(ImportError, match="finegrained-fp8"):
            model(prompt[:, :2])
    else:   # the hook is back: the first stock forward decompresses the model (to the bf16-dequantised weights)
        with torch.no_grad():
            logits = model(prompt).logits
            assert quant_weight(q) is None and torch.equal(q.weight, ref16.model.layers[0].self_attn.q_proj.weight)
            assert rel_err(logits, ref16(prompt).logits) < 1e-2


def test_quantized_lm_head(tmp_path):
    """An FP8 lm_head (FP8Linear, 128x128 blocks; vocab 307: a partial last block) runs quant_gemv in the step
    and quant_linear_prefill in prefill."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from braid_backend.testing.quant_ckpt import quantize_fp8_block

    cfg = dict(BLOCKED, num_hidden_layers=1)
    model = _load(tmp_path, "fp8_block", {}, cfg)
    dense = model.lm_head
    head = FP8Linear(dense.in_features, dense.out_features, block_size=(128, 128))
    w, s = quantize_fp8_block(dense.weight)
    with torch.no_grad():
        head.weight.copy_(w)
        head.weight_scale_inv.copy_(s)
    model.lm_head = head.eval()
    ref32 = dequantized_twin(model)
    V = model.config.vocab_size
    prompt, cont = random_tokens(V, 2, 6, 3, "cpu"), random_tokens(V, 2, 2, 4, "cpu")
    l32 = teacher_forced_logits(ref32, prompt, cont)
    bf16_err = rel_err(teacher_forced_logits(ref32.to(torch.bfloat16), prompt, cont), l32)
    report = braid_backend.patch(model)
    assert report.ok and "lm_head: fp8 e4m3, 128x128 block scales" in str(report), str(report)
    err = rel_err(teacher_forced_logits(model, prompt, cont), l32)
    assert err <= 2 * bf16_err + FLOOR, (err, bf16_err)
    braid_backend.unpatch(model)
    assert "forward" not in vars(model.lm_head)


def test_weights_moved_sees_the_quantized_tensors(tmp_path):
    """Replacing a quantized tensor after patch() is noticed (the step then runs stock), and the prefill forward
    reads the module's new tensors."""
    model = _load(tmp_path, "int4", dict(group=32), SMALL)
    braid_backend.patch(model)
    step = model._braid_session.step
    q = model.model.layers[0].self_attn.q_proj
    assert not step.weights_moved()
    with torch.no_grad():
        q.weight_packed = nn.Parameter(q.weight_packed.detach().clone(), requires_grad=False)
        q.weight_scale.mul_(2)
    assert step.weights_moved()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    ref = x.float() @ dequantize(quant_weight(q)).t()
    assert rel_err(y, ref) < 1e-2
    braid_backend.unpatch(model)


def test_packing_refusals(tmp_path):
    """q|k|v that cannot share one packed weight: patch() says why and leaves the model as it was."""
    model = _load(tmp_path / "a", "fp8_block", {}, SMALL)          # k/v: 32 rows, not on 128-row scale blocks
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    report = braid_backend.patch(model)
    assert not report.ok and "straddle" in report.reason and "q|k|v" in report.reason, report.reason
    assert report.reason.startswith("model.layers.0.self_attn"), report.reason
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    model = _load(tmp_path / "b", "fp8_block", {}, BLOCKED)
    attn = model.model.layers[1].self_attn
    attn.v_proj = nn.Linear(128, 128, bias=False, dtype=torch.bfloat16)   # e.g. modules_to_not_convert: v_proj
    report = braid_backend.patch(model)
    assert not report.ok and "mixes dense and quantized" in report.reason, report.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="transformers keeps FP8 quantized where a GPU is present")
def test_fp8_dequantised_at_load_is_patched_dense(tmp_path):
    """Without a GPU transformers loads FineGrainedFP8 dequantised to bf16 (quantization_config.dequantize): a dense
    model to patch, the report names no quantized format."""
    from transformers import AutoModelForCausalLM

    write_quant_checkpoint(tmp_path, "fp8_block", **BLOCKED)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    report = braid_backend.patch(model)
    assert report.ok and "fp8" not in str(report) and "prefill of the quantized" not in str(report), str(report)
    braid_backend.unpatch(model)


def test_int4_decompressed_by_a_stock_forward_is_patched_dense(tmp_path):
    """After a stock forward compressed-tensors holds dense bf16 weights plus its packed bookkeeping (weight_shape
    int64): patch() runs the dense weights it now computes with, matching that stock model."""
    model = _load(tmp_path, "int4", dict(group=32), SMALL)
    V = model.config.vocab_size
    prompt, cont = random_tokens(V, 2, 6, 3, "cpu"), random_tokens(V, 2, 2, 4, "cpu")
    ref32 = dequantized_twin(model)
    stock = teacher_forced_logits(model, prompt, cont)   # the decompress hook runs here
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    report = braid_backend.patch(model)
    assert report.ok and "int4" not in str(report), str(report)
    out = teacher_forced_logits(model, prompt, cont)
    assert braid_backend.status(model).stats["decode_fused"] >= cont.shape[1]
    ref = teacher_forced_logits(ref32, prompt, cont)
    assert rel_err(out, ref) <= 2 * max(rel_err(stock, ref), FLOOR), (rel_err(out, ref), rel_err(stock, ref))
    braid_backend.unpatch(model)


def test_activation_quantized_scheme_is_refused(tmp_path):
    """compressed-tensors W8A8 (dynamic per-token fp8 activations): the kernels would change its numerics."""
    _needs_ct()
    write_quant_checkpoint(tmp_path, "fp8_channel", **SMALL)
    path = os.path.join(tmp_path, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = dict(
        num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True, observer=None)
    json.dump(cfg, open(path, "w"))
    model = load_quantized(tmp_path)
    hooks = dict(model._forward_pre_hooks)
    report = braid_backend.patch(model)
    assert not report.ok and "activation-quantized" in report.reason and "quantized model" not in report.reason
    assert dict(model._forward_pre_hooks) == hooks and not braid_backend.is_patched(model)


@pytest.mark.parametrize("method,word", [("gptq", "gptqmodel"), ("awq", "AWQ"), ("bitsandbytes", "bitsandbytes"),
                                         ("hqq", "not supported")])
def test_other_quant_methods_are_refused(method, word):
    model = build_model("tiny-llama", dtype=torch.bfloat16)
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method))
    report = braid_backend.patch(model)
    assert not report.ok and word in report.reason and report.reason.startswith("quantized model"), report.reason


def test_failed_construction_undoes_the_prefill_forwards(tmp_path, monkeypatch):
    """A step that fails after installing the prefill forwards (and taking the decompress hook) undoes both."""
    from braid_backend.model import quant_prefill

    model = _load(tmp_path, "int4", dict(group=32), SMALL)
    q = model.model.layers[0].self_attn.q_proj
    fwd, hooks, state = vars(q).get("forward"), dict(model._forward_pre_hooks), _state(model)
    orig = quant_prefill.QuantPrefill.install

    def install_then_fail(self):
        orig(self)
        assert isinstance(vars(q)["forward"], quant_prefill.QuantLinearForward) and not model._forward_pre_hooks
        raise RuntimeError("injected")

    monkeypatch.setattr(quant_prefill.QuantPrefill, "install", install_then_fail)
    report = braid_backend.patch(model)
    assert not report.ok and "injected" in report.reason
    assert vars(q).get("forward") is fwd and dict(model._forward_pre_hooks) == hooks
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_fp8_block_llama_1b_offline(tmp_path):
    """A FineGrainedFP8 Llama-3.2-1B-shaped checkpoint (4 layers) on the GPU: stock raises (no hub kernel),
    patch() + generate() run end to end, logits within 2x of the bf16-dequantised model's error."""
    cfg = dict(preset="llama-3.2-1b", num_hidden_layers=4)
    write_quant_checkpoint(tmp_path, "fp8_block", **cfg)
    model = load_quantized(tmp_path, device="cuda")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "FP8Linear"
    V = model.config.vocab_size
    prompt, cont = random_tokens(V, 2, 24, 1, "cuda"), random_tokens(V, 2, 8, 2, "cuda")
    try:
        with torch.no_grad():
            model(prompt)
    except ImportError as e:
        assert "finegrained-fp8" in str(e)
    else:
        pytest.skip("stock FineGrainedFP8 runs on this machine (its hub kernel is available)")
    ref32 = dequantized_twin(model)
    l32 = teacher_forced_logits(ref32, prompt, cont)
    ref16 = ref32.to(torch.bfloat16)
    del ref32
    bf16_err = rel_err(teacher_forced_logits(ref16, prompt, cont), l32)
    report = braid_backend.patch(model)
    assert report.ok and "fp8 e4m3, 128x128 block scales" in str(report), str(report)
    err = rel_err(teacher_forced_logits(model, prompt, cont), l32)
    assert err <= 2 * bf16_err + FLOOR, (err, bf16_err)
    out = model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 24 + 32) and braid_backend.status(model).stats["generate_fast"] >= 1
    braid_backend.unpatch(model)
    assert "forward" not in vars(model.model.layers[0].self_attn.q_proj)


@pytest.mark.parametrize("qt,double", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_4bit_patch_and_generate(qt, double, tmp_path):
    """bitsandbytes 4-bit (quantized at load, on the CPU too): braid reads its bytes and absmax in place (double
    quantisation decoded exactly as bitsandbytes does), logits within 2x of the bf16-dequantised model's error,
    unpatch gives back the stock module bit for bit."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (braid-backend[test])")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    shape = {k: v for k, v in SMALL.items() if k not in ("preset", "peaked")}
    build_model(SMALL["preset"], dtype=torch.bfloat16, **shape).save_pretrained(tmp_path)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=double,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=cfg, dtype=torch.bfloat16,
                                                 device_map="cpu").eval()
    q = model.model.layers[0].self_attn.q_proj
    qw = quant_weight(q)
    assert qw.lut is not None and q.weight.quant_state.nested == double
    assert torch.equal(dequantize(qw, torch.bfloat16), F.dequantize_4bit(q.weight.data, q.weight.quant_state))
    state, nbytes = _state(model), _storage_bytes(model)
    prompt, cont, _, _, l32, _, bf16_err = _references(model)
    stock = teacher_forced_logits(model, prompt, cont)
    report = braid_backend.patch(model, graph_steps=2)
    assert report.ok, report.reason
    assert f"bitsandbytes {qt}" in str(report) and "stock Linear4bit.forward" in str(report), str(report)
    assert _storage_bytes(model) == nbytes, "q|k|v / gate|up packing must not copy the 4-bit weights"
    err = rel_err(teacher_forced_logits(model, prompt, cont), l32)
    assert braid_backend.status(model).stats["decode_fused"] >= cont.shape[1]
    assert err <= 2 * max(bf16_err, FLOOR), (err, bf16_err)
    braid_backend.unpatch(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    assert torch.equal(teacher_forced_logits(model, prompt, cont), stock)


def test_bitsandbytes_8bit_is_refused():
    from transformers import BitsAndBytesConfig

    model = build_model("tiny-llama", dtype=torch.bfloat16)
    model.hf_quantizer = SimpleNamespace(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    report = braid_backend.patch(model)
    assert not report.ok and "8-bit" in report.reason and "4-bit NF4 / FP4 is" in report.reason, report.reason
