"""optimum.braid (issue 11): BraidModelForCausalLM.from_pretrained on a saved tiny checkpoint vs the stock
model loaded from the same folder: patched, greedy generate() and text-generation pipelines equal to stock
on the fast path, save_pretrained writing a checkpoint stock transformers loads with identical weights,
clear failures, and `import optimum.braid` needing neither torch nor the optimum distribution."""
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, pipeline

import braid_backend
from braid_backend.testing.presets import TINY, build_model
from optimum.braid import BraidModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def _load_tokenizer(path):
    # not AutoTokenizer: with a config.json of model_type qwen2 next to it, transformers 5.x picks
    # Qwen2Tokenizer over the saved tokenizer.json, which then encodes "w5 w17" to nothing
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny-qwen2 checkpoint + tokenizer, its original state_dict, and the stock model loaded from it."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    original = build_model("tiny-qwen2", dtype=torch.float32, seed=7)
    original.save_pretrained(path)
    _tiny_tokenizer(original.config.vocab_size).save_pretrained(path)
    state = {k: v.detach().clone() for k, v in original.state_dict().items()}
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, state, stock


@pytest.fixture(scope="module")
def braided(ckpt):
    return BraidModelForCausalLM.from_pretrained(ckpt[0], dtype=torch.float32)


def _fast_calls(model) -> int:
    return braid_backend.status(model).stats["generate_fast"]


def _greedy_matches_stock(model, stock, seed=0):
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(seed))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    before = _fast_calls(model)
    out = model.generate(ids, **kw)
    ref = stock.generate(ids, **kw)
    assert out.shape == ref.shape == (2, 12)
    assert torch.equal(out, ref), (out, ref)
    assert braid_backend.status(model).last_path == "fast" and _fast_calls(model) == before + 1


def test_from_pretrained_returns_the_patched_hf_model(ckpt, braided):
    stock = ckpt[2]
    assert isinstance(braided, PreTrainedModel) and type(braided) is type(stock)
    assert braid_backend.is_patched(braided) and not braided.training
    assert braided.dtype == torch.float32
    attn = braided.model.layers[0].self_attn   # q|k|v packed: the HF parameters are views of one buffer
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    with pytest.raises(TypeError, match="from_pretrained"):
        BraidModelForCausalLM()


def test_generate_equals_stock_on_the_fast_path(ckpt, braided):
    _greedy_matches_stock(braided, ckpt[2], seed=1)


def test_text_generation_pipeline_equals_stock_on_the_fast_path(ckpt, braided):
    path, _, stock = ckpt
    tok = _load_tokenizer(path)
    assert tok("w5 w17")["input_ids"] == [5, 17]
    prompt = "w5 w17 w42 w8 w230 w99"
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref = pipeline("text-generation", model=stock, tokenizer=tok)(prompt, **kw)
    before = _fast_calls(braided)
    out = pipeline("text-generation", model=braided, tokenizer=tok)(prompt, **kw)
    assert braid_backend.status(braided).last_path == "fast" and _fast_calls(braided) == before + 1
    assert out == ref
    assert len(out[0]["generated_text"].split()) > len(prompt.split())


def test_save_pretrained_writes_a_stock_checkpoint(ckpt, braided, tmp_path):
    path, original, stock = ckpt
    braided.save_pretrained(tmp_path)
    # the same tensor names as the checkpoint stock transformers wrote, and the same config
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f, \
            safe_open(str(path / "model.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert {k for k in f.keys() if "proj" in k} >= {"model.layers.0.self_attn.q_proj.weight",
                                                          "model.layers.0.self_attn.k_proj.weight",
                                                          "model.layers.0.self_attn.v_proj.weight",
                                                          "model.layers.0.mlp.gate_proj.weight",
                                                          "model.layers.0.mlp.up_proj.weight"}
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    # loads into plain transformers with identical weights, as separate tensors
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not braid_backend.is_patched(reloaded)
    sd = reloaded.state_dict()
    assert set(sd) == set(original)
    unequal = [k for k in original if not torch.equal(sd[k], original[k])]
    assert not unequal, unequal
    attn = reloaded.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    # and the patched model is untouched: still patched, packed, equal to stock on the fast path
    assert braid_backend.is_patched(braided)
    attn = braided.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    _greedy_matches_stock(braided, stock, seed=2)


@pytest.mark.parametrize("name", sorted(set(TINY) - {"tiny"}))
def test_save_pretrained_round_trip_every_family_bf16(name, tmp_path):
    """Each family packs differently (phi3 packs in the checkpoint already; gemma/granite/olmo2 add
    norms and scales): a patched model saves and stock transformers reloads the very same bf16 weights."""
    model = build_model(name, dtype=torch.bfloat16, seed=5)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert braid_backend.patch(model).ok
    model.save_pretrained(tmp_path)
    sd = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    assert set(sd) == set(original)
    assert not [k for k in original if not torch.equal(sd[k], original[k])]
    assert braid_backend.is_patched(model)


def test_missing_path_raises_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        BraidModelForCausalLM.from_pretrained(tmp_path / "missing", dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        BraidModelForCausalLM.from_pretrained(str(tmp_path / "missing"), dtype=torch.float32)


def test_bad_patch_options_raise_before_loading(tmp_path):
    # a missing path would raise FileNotFoundError: the options are checked first
    with pytest.raises(TypeError, match="unknown options"):
        BraidModelForCausalLM.from_pretrained(tmp_path / "missing", patch_options={"graph_step": 4})
    with pytest.raises(ValueError, match="graph_steps"):
        BraidModelForCausalLM.from_pretrained(tmp_path / "missing", patch_options={"graph_steps": 0})


@pytest.fixture(scope="module")
def refused_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2-gelu")
    build_model("tiny-qwen2", dtype=torch.float32, seed=3, hidden_act="gelu").save_pretrained(path)
    return path


def test_a_model_braid_refuses_is_returned_stock_with_a_warning(refused_ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger="optimum.braid"):
        model = BraidModelForCausalLM.from_pretrained(refused_ckpt, dtype=torch.float32)
    assert isinstance(model, PreTrainedModel) and not braid_backend.is_patched(model) and not model.training
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("optimum.braid")]
    assert any("STOCK" in m and "activation 'gelu'" in m for m in warned), warned
    with pytest.raises(braid_backend.BraidUnsupportedError, match="activation 'gelu'"):
        BraidModelForCausalLM.from_pretrained(refused_ckpt, dtype=torch.float32, patch_options={"strict": True})


def _run_python(code: str, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_import_needs_neither_torch_nor_the_optimum_distribution(tmp_path):
    out = _run_python(
        "import sys, optimum.braid as ob\n"
        "assert 'torch' not in sys.modules, 'import optimum.braid pulled torch in'\n"
        "cls = ob.BraidModelForCausalLM\n"
        "assert cls.__module__ == 'optimum.braid.modeling' and 'BraidModelForCausalLM' in dir(ob)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'optimum' and not m.startswith('optimum.braid')))\n",
        cwd=tmp_path)
    assert out.strip() == "['optimum']"   # the namespace package only: no module of the optimum distribution


_NO_OPTIMUM = importlib.util.find_spec("optimum.version") is None


@pytest.mark.skipif(_NO_OPTIMUM, reason="the optimum distribution is not installed")
def test_shares_the_optimum_namespace_with_the_optimum_distribution(tmp_path):
    out = _run_python(
        "import optimum, optimum.braid, optimum.version, optimum.modeling_base\n"
        "assert getattr(optimum, '__file__', None) is None, 'optimum is not a namespace package'\n"
        "print(optimum.version.__version__, optimum.braid.BraidModelForCausalLM.__name__)\n", cwd=tmp_path)
    version, name = out.split()
    assert name == "BraidModelForCausalLM" and tuple(map(int, version.split(".")[:2])) >= (2, 1)


@pytest.mark.gpu
def test_gpu_optimum_entry_and_pipeline(tmp_path):
    """On the GPU: a real-size config (Qwen2.5-0.5B, random weights, bf16) saved with a word-level
    tokenizer, loaded through optimum.braid onto CUDA, served by a text-generation pipeline on the fast
    path (CUDA graphs); the pipeline's text is what the patched model's own generate() decodes to."""
    original = build_model("qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda", seed=5)
    original.save_pretrained(tmp_path)
    tok = _tiny_tokenizer(original.config.vocab_size)
    tok.save_pretrained(tmp_path)
    del original
    model = BraidModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert braid_backend.is_patched(model) and model.device.type == "cuda"
    prompt = " ".join(f"w{i}" for i in range(100, 140))
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    out = pipeline("text-generation", model=model, tokenizer=_load_tokenizer(tmp_path))(
        prompt, return_full_text=False, **kw)
    st = braid_backend.status(model)
    assert st.last_path == "fast" and model._braid_session.graphs.captures > 0, st   # internals: graphs captured
    ids = _load_tokenizer(tmp_path)(prompt, return_tensors="pt")["input_ids"].cuda()
    again = model.generate(ids, pad_token_id=0, **kw)
    new_words = _load_tokenizer(tmp_path).decode(again[0, ids.shape[1]:], skip_special_tokens=True).split()
    # (the pipeline's full text glues prompt and continuation without a space: compare the new words)
    assert out[0]["generated_text"].split() == new_words and len(new_words) == 16
