"""Offline quantized checkpoints (testing/quant_ckpt.py): written here, loaded by transformers into its own
quantized modules, read back by model/quant.py as QuantWeights that view those modules' tensors and
dequantise to exactly what was written / what compressed-tensors itself decompresses."""
import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from braid_backend.kernels.quant_gemv import QuantWeight, dequantize, unpack_int4  # noqa: E402
from braid_backend.model.quant import Unsupported, describe, model_quant_method, quant_weight  # noqa: E402
from braid_backend.testing.quant_ckpt import load_quantized, quantize_int4, write_quant_checkpoint  # noqa: E402

# 128-wide tiny Llama: K a multiple of every int4 group, q/o/gate/up rows on 128-row FP8 blocks
TINY = dict(preset="tiny-llama", hidden_size=128, intermediate_size=256, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _needs_ct():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install compressed-tensors)")


def _written_weight(fmt, t, shape):
    if fmt == "fp8_block":
        return dequantize(QuantWeight("fp8_block", t["weight"], t["weight_scale_inv"], shape))
    if fmt == "fp8_channel":
        return t["weight"].float() * t["weight_scale"].float()
    zp = t.get("weight_zero_point")
    g = shape[1] // t["weight_scale"].shape[1]
    return dequantize(QuantWeight("int4", t["weight_packed"], t["weight_scale"], shape, group_size=g, zero_point=zp))


def _check_model(model, written, fmt):
    from transformers.integrations.finegrained_fp8 import FP8Linear

    mods = dict(model.named_modules())
    assert written and all(n.split(".")[-1] in PROJ for n in written)
    for name, t in written.items():
        m = mods[name]
        if fmt == "fp8_block":
            assert type(m) is FP8Linear
        else:
            assert type(m) is nn.Linear and str(m.quantization_status.value) == "compressed"
        qw = quant_weight(m)
        src = m.weight if fmt != "int4" else m.weight_packed
        assert qw.data.data_ptr() == src.data_ptr(), "must view the module's tensor, not copy it"
        assert torch.equal(dequantize(qw), _written_weight(fmt, t, qw.shape)), name
    assert quant_weight(model.lm_head) is None   # lm_head stays dense
    return qw


def test_fp8_block_checkpoint(tmp_path):
    written = write_quant_checkpoint(tmp_path, "fp8_block", **TINY)
    model = load_quantized(tmp_path)
    assert model_quant_method(model) == "fp8"
    qw = _check_model(model, written, "fp8_block")
    assert qw.format == "fp8_block" and describe(qw) == "fp8 e4m3, 128x128 block scales"
    m = model.model.layers[0].self_attn.k_proj                       # 32 rows: one partial scale block
    assert tuple(m.weight_scale_inv.shape) == (1, 1) and quant_weight(m).shape == (32, 128)


def _ct_roundtrip(model, tmp_path, written, fmt):
    """The stock forward decompresses the model in place (compressed-tensors' hook): its dense weights must
    be our dequantisation rounded to bf16, and quant.py then sees dense Linears."""
    mods = dict(model.named_modules())
    qws = {n: quant_weight(mods[n]) for n in written}
    model(torch.randint(0, 300, (1, 4)))
    for n, qw in qws.items():
        assert torch.equal(mods[n].weight, dequantize(qw, torch.bfloat16)), n
        assert quant_weight(mods[n]) is None


def test_fp8_channel_checkpoint(tmp_path):
    _needs_ct()
    written = write_quant_checkpoint(tmp_path, "fp8_channel", **TINY)
    model = load_quantized(tmp_path)
    assert model_quant_method(model) == "compressed-tensors"
    qw = _check_model(model, written, "fp8_channel")
    assert describe(qw) == "fp8 e4m3, per-channel scales"
    _ct_roundtrip(model, tmp_path, written, "fp8_channel")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_checkpoint(tmp_path, group):
    _needs_ct()
    written = write_quant_checkpoint(tmp_path, "int4", group=group, symmetric=True, **TINY)
    model = load_quantized(tmp_path)
    qw = _check_model(model, written, "int4")
    assert qw.group_size == group and describe(qw).startswith(f"int4, group {group}, symmetric")
    if group == 64:
        _ct_roundtrip(model, tmp_path, written, "int4")


def test_int4_asymmetric_checkpoint(tmp_path):
    """On disk: zero points packed along N (compressed-tensors' compress()). compressed-tensors 0.20.1 builds the
    compressed module on the meta device without packing them, so transformers reports a shape mismatch for
    this (genuine) layout: then read the layout through a module set up as that loader should have."""
    _needs_ct()
    written = write_quant_checkpoint(tmp_path, "int4", group=32, symmetric=False, **TINY)
    name = "model.layers.1.mlp.down_proj"
    t = written[name]
    assert tuple(t["weight_zero_point"].shape) == (128 // 8, 256 // 32)
    try:
        model = load_quantized(tmp_path)
    except RuntimeError as e:
        assert "weight_zero_point" in str(e) or "mismatch" in str(e).lower()
        model = load_quantized(_sym_copy(tmp_path))
        m = dict(model.named_modules())[name]
        m.quantization_scheme.weights.symmetric = False
        m.weight_zero_point = nn.Parameter(t["weight_zero_point"], requires_grad=False)
        m.weight_scale.data.copy_(t["weight_scale"])
        m.weight_packed.data.copy_(t["weight_packed"])
        qw = quant_weight(m)
        assert torch.equal(dequantize(qw), _written_weight("int4", t, (128, 256)))
        assert "asymmetric" in describe(qw)
        return
    _check_model(model, written, "int4")


def _sym_copy(path):
    """The same model written symmetric (to get compressed modules of the right shapes)."""
    sym = os.path.join(str(path), "sym")
    write_quant_checkpoint(sym, "int4", group=32, symmetric=True, **TINY)
    return sym


def test_quantizer_conventions():
    """Our int4 writer against compressed-tensors' own quantize (the stored integers)."""
    _needs_ct()
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for sym in (True, False):
        packed, scale, zp, q = quantize_int4(w, 32, sym)
        args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
        z = None if sym else (unpack_int4(zp, 0)[:16] - 8).to(torch.int8)
        ref = quantize(w, scale, z, args, dtype=torch.int8)
        assert (ref.to(torch.int64) - q).abs().max() <= 1          # rounding ties may differ by one step
        assert torch.equal(unpack_int4(packed)[:, :64].to(torch.int64) - 8, q)


def test_refusals():
    """What quant.py refuses, with its reason."""
    for method, word in (("gptq", "gptqmodel"), ("awq", "AWQ"), ("bitsandbytes", "bitsandbytes"), ("hqq", "hqq")):
        model = nn.Module()
        model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method))
        with pytest.raises(Unsupported, match=word):
            model_quant_method(model)
    assert model_quant_method(nn.Linear(4, 4)) is None
    lin = nn.Linear(8, 8)
    lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(Unsupported, match="no known quantization scheme"):
        quant_weight(lin)
    FP8Linear = pytest.importorskip("transformers.integrations.finegrained_fp8").FP8Linear
    m = FP8Linear(128, 128, block_size=(128, 128), activation_scheme="static")
    with pytest.raises(Unsupported, match="static activation"):
        quant_weight(m)
    m = FP8Linear(128, 64, block_size=None)
    assert quant_weight(m).format == "fp8_tensor"
    _needs_ct()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus

    lin = nn.Linear(64, 16)
    w8 = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    a8 = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    lin.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=w8, input_activations=a8)
    lin.quantization_status = QuantizationStatus.COMPRESSED
    with pytest.raises(Unsupported, match="activation-quantized"):
        quant_weight(lin)
    lin.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="int"))
    with pytest.raises(Unsupported, match="int8"):
        quant_weight(lin)
    lin.quantization_status = QuantizationStatus.FROZEN
    with pytest.raises(Unsupported, match="frozen"):
        quant_weight(lin)
