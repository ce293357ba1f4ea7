"""The CuPy layer backend on the CPU (CI has neither CuPy nor a GPU): option validation, eligibility and
its reasons, the fallbacks to Triton (report, log, strict), the CUDA source compiling with nvcc (where
nvcc is on PATH), and the torch reference of one layer against the Triton step (so the specification
the CUDA kernel is tested against on the GPU is right). GPU tests: tests/test_gpu_cupy.py."""
import logging
import shutil
import subprocess

import pytest
import torch

import braid_backend
import braid_backend.api as api
from braid_backend import PatchOptions
from braid_backend.kernels import cupy_layer
from braid_backend.kernels.cupy_layer import LayerSpec, kernel_source
from braid_backend.model.cupy_step import CupyDecodeStep, cupy_reason, model_reason
from braid_backend.model.spec import plan_model
from braid_backend.model.step import DecodeStep
from braid_backend.runtime.cache import BraidCache
from braid_backend.runtime.interface import fill_inputs
from braid_backend.testing.presets import build_model
from helpers import gen, relerr, toks

# tiny configs the kernel takes (head_dim 64: the presets' tiny head_dims 16-32 are refused)
QWEN2_64 = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=200)
LLAMA_64 = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=136)


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("bad", ["CuPy", "torch", "", None, 1, True])
def test_backend_option_validated(bad):
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'cupy'"):
        PatchOptions.from_kwargs(backend=bad)
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="backend"):
        braid_backend.patch(model, backend=bad)
    assert not braid_backend.is_patched(model)


def test_backend_option_default_and_choices():
    assert PatchOptions().backend == "triton"
    for b in ("auto", "triton", "cupy"):
        assert PatchOptions.from_kwargs(backend=b).backend == b


# -------------------------------------------------------------------------------------- eligibility
@pytest.mark.parametrize("name,overrides,why", [
    ("tiny-qwen2", QWEN2_64, None),
    ("tiny-llama", LLAMA_64, None),
    ("tiny-mistral", dict(LLAMA_64, sliding_window=None), None),
    ("tiny-qwen2", {}, "head_dim 16"),
    ("tiny-qwen3", {}, "q/k norm"),
    ("tiny-gemma2", {}, "RMSNorm"),
    ("tiny-gemma", {}, "RMSNorm"),
    ("tiny-phi3", {}, "partial rotary"),
    ("tiny-granite", {}, "multipliers"),
    ("tiny-smollm3", {}, "NoPE"),
    ("tiny-mistral", dict(LLAMA_64, sliding_window=16), "sliding-window"),
])
def test_model_eligibility_reasons(name, overrides, why):
    model = build_model(name, dtype=torch.bfloat16, **overrides)
    got = model_reason(plan_model(model))
    if why is None:
        assert got is None, got
    else:
        assert got is not None and why in got, got


def test_dtype_and_bucket_reasons():
    plan = plan_model(build_model("tiny-qwen2", dtype=torch.float32, **QWEN2_64))
    assert "dtype" in model_reason(plan)
    spec = LayerSpec(torch.bfloat16, 3584, 18944, 28, 4, 128, True, False, False, False)   # Qwen2.5-7B
    assert spec.check() is None
    assert spec.bucket_reason(1) is None and spec.bucket_reason(4) is None
    assert "shared memory" in spec.bucket_reason(8)          # 8 rows of the 18944-wide MLP input
    assert "> 8" in spec.bucket_reason(16)
    assert LayerSpec(torch.bfloat16, 896, 4864, 14, 2, 64, True, False, False, False).bucket_reason(8) is None


def test_cupy_reason_without_cupy_or_gpu():
    plan = plan_model(build_model("tiny-qwen2", dtype=torch.bfloat16, **QWEN2_64))
    why = cupy_reason(plan, torch.device("cpu"))
    assert why and ("cupy is not importable" in why or "device is cpu" in why), why


# ------------------------------------------------------------------------------- fallbacks to Triton
def test_backend_cupy_without_cupy_runs_triton_with_reason(caplog):
    model = build_model("tiny-qwen2", dtype=torch.bfloat16, seed=2, **QWEN2_64)
    with caplog.at_level(logging.INFO, logger="braid_backend"):
        rep = braid_backend.patch(model, backend="cupy")
    assert rep.ok and rep.backend == "triton"
    assert type(model._braid_session.step) is DecodeStep   # internals: the step object, not only the report
    why = dict(rep.stock)["CuPy layer kernel"]
    assert why and why in caplog.text and "backend cupy" in caplog.text
    assert any(r.levelno == logging.WARNING and "CuPy layer kernel not used" in r.message for r in caplog.records)
    ids = toks(model, 1, 5, 0)
    assert gen(model, ids, max_new_tokens=2).shape == (1, 7)
    braid_backend.unpatch(model)


def test_backend_cupy_strict_raises():
    model = build_model("tiny-qwen2", dtype=torch.bfloat16, seed=3, **QWEN2_64)
    with pytest.raises(api.BraidUnsupportedError, match="backend='cupy'"):
        braid_backend.patch(model, backend="cupy", strict=True)
    assert not braid_backend.is_patched(model)
    # the model itself is fine: strict with the Triton backend patches
    assert braid_backend.patch(model, backend="triton", strict=True).backend == "triton"
    braid_backend.unpatch(model)


def test_backend_auto_without_cupy_is_triton_with_log_line(caplog):
    model = build_model("tiny-qwen2", dtype=torch.bfloat16, seed=4, **QWEN2_64)
    with caplog.at_level(logging.INFO, logger="braid_backend"):
        rep = braid_backend.patch(model, backend="auto")
    assert rep.ok and rep.backend == "triton" and rep.options["backend"] == "auto"
    assert "backend auto: CuPy layer kernel not used" in caplog.text
    assert "decode layers: triton" in str(rep)
    braid_backend.unpatch(model)


def test_backend_triton_says_nothing_about_cupy(caplog):
    model = build_model("tiny-qwen2", dtype=torch.bfloat16, seed=5, **QWEN2_64)
    with caplog.at_level(logging.INFO, logger="braid_backend"):
        rep = braid_backend.patch(model, backend="triton")
    assert rep.backend == "triton" and "CuPy" not in caplog.text and "CuPy layer kernel" not in dict(rep.stock)
    braid_backend.unpatch(model)


# ------------------------------------------------------------------------------ CUDA source compiles
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("spec,M", [
    (LayerSpec(torch.bfloat16, 896, 4864, 14, 2, 64, True, False, False, False), 1),      # Qwen2.5-0.5B
    (LayerSpec(torch.bfloat16, 2048, 8192, 32, 8, 64, False, False, False, False), 8),    # Llama-3.2-1B
    (LayerSpec(torch.float16, 4096, 14336, 32, 8, 128, True, True, True, True), 4),       # biases, fp16
])
def test_cuda_source_compiles_for_sm90(spec, M, tmp_path):
    src = tmp_path / "layer.cu"
    src.write_text(kernel_source(spec.defines(M)))     # the very text the launcher hands to NVRTC
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "layer.o"),
                        "-Xptxas", "-v"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "braid_layer" in r.stderr, r.stderr[-2000:]
    print(r.stderr[-600:])


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("phase_times", [False, True])
def test_cuda_source_compiles_with_and_without_phase_times(phase_times, tmp_path):
    spec, M = LayerSpec(torch.bfloat16, 896, 4864, 14, 2, 64, True, False, False, False), 4   # Qwen2.5-0.5B
    defines = dict(spec.defines(M), BRAID_PHASE_TIMES=1) if phase_times else spec.defines(M)
    src = tmp_path / "layer.cu"
    src.write_text(kernel_source(defines))             # what LayerKernel(..., phase_times=...) hands NVRTC
    r = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "layer.o"),
                        "-Xptxas", "-v"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "braid_layer" in r.stderr, r.stderr[-2000:]
    ptx = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", str(src), "-o", "-"], capture_output=True,
                         text=True, timeout=300)
    assert ptx.returncode == 0, ptx.stderr[-4000:]
    # the extra kernel argument (the stamp table) exists only in the timed variant
    params = ptx.stdout.split(".entry braid_layer(")[1].split(")")[0].count(".param")
    assert params == 33 + int(phase_times), params


def test_phase_stats_from_a_stamp_table():
    # 2 CTAs; stamps in ns: entry, (arrival, release) x 4 barriers, exit
    t = torch.tensor([[1000, 3000, 5000, 6000, 7000, 8000, 9000, 10000, 11000, 12000],
                      [2000, 4500, 5000, 6500, 7000, 8500, 9000, 10000, 11000, 13000]], dtype=torch.int64)
    st = cupy_layer.phase_stats(t)
    assert st["total_us"] == 12.0 and st["entry_spread_us"] == 1.0 and st["ctas"] == 2
    p1, p2, p5 = st["phases"][0], st["phases"][1], st["phases"][4]
    assert p1["work_max_us"] == 2.5 and p1["work_min_us"] == 2.0      # 4500-2000, 3000-1000
    assert p1["wait_max_us"] == 2.0 and p1["wait_min_us"] == 0.5
    assert p2["work_max_us"] == 1.5 and p2["wait_max_us"] == 1.0
    assert p5["wait_max_us"] is None and p5["work_max_us"] == 2.0
    assert abs(sum(p["span_us"] for p in st["phases"]) - st["total_us"]) < 1e-9
    with pytest.raises(ValueError):
        cupy_layer.phase_stats(torch.zeros(2, cupy_layer.PT_SLOTS, dtype=torch.int64))


def test_source_has_no_includes():
    # NVRTC gets no include path from CuPy for CUDA headers: the kernel uses none
    assert "#include" not in cupy_layer.SOURCE_PATH.read_text()


# ------------------------------------------------------- the torch reference of a layer vs Triton
def _state(step, M, B, S, slot, seed):
    """A cache with random contents (left padding in row 0, a NaN at a masked position) and buffers
    pointing at `slot`: rows [B:M] are bucket padding."""
    g = torch.Generator().manual_seed(seed)
    cache = BraidCache(step.num_layers, M, step.n_kv_heads, S, step.head_dim, step.dtype, step.device)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    cache.valid.zero_()
    cache.valid[:B, :slot + 1] = 1
    cache.valid[0, :3] = 0
    cache.k[0][0, :, 1] = float("nan")
    cache.v[0][0, :, 1] = float("nan")
    step.prepare(S)
    b = step.new_buffers(M, S)
    ids = torch.randint(3, step.vocab, (B,), generator=g)
    pos = torch.tensor([slot - 2] + [slot] * (B - 1))
    fill_inputs(b, cache, ids, pos, slot)
    return cache, b


@pytest.mark.parametrize("name,dtype,overrides", [("tiny-qwen2", torch.float32, QWEN2_64),
                                                  ("tiny-qwen2", torch.bfloat16, QWEN2_64),
                                                  ("tiny-llama", torch.bfloat16, LLAMA_64)])
def test_layer_reference_equals_triton_step(name, dtype, overrides):
    model = build_model(name, dtype=dtype, seed=6, **overrides)
    step = CupyDecodeStep(plan_model(model), "cupy")
    step.layer_impl = "reference"
    M, B, S, slot = 4, 3, 40, 17
    cache, b = _state(step, M, B, S, slot, seed=7)
    cache2 = [t.clone() for t in cache.k + cache.v]
    want = DecodeStep.run(step, cache, b).clone()
    k_want = [t.clone() for t in cache.k]
    for t, c in zip(cache.k + cache.v, cache2):
        t.copy_(c)
    b.x.fill_(float("nan"))
    got = step.run(cache, b).clone()
    err = relerr(got[:B], want[:B])
    kerr = max(relerr(a[:B, :, slot], w[:B, :, slot]) for a, w in zip(cache.k, k_want))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    print(f"{dtype}: logits rel err {err:.3g}, k-slot rel err {kerr:.3g}")
    assert err <= tol and kerr <= tol, (err, kerr)
    assert torch.isfinite(got).all()
    step.release()


def test_cupy_step_wiring_end_to_end_with_the_reference_layers(monkeypatch):
    """patch() builds the CuPy step where cupy_reason allows; with the torch reference standing in for the
    kernel (fp32), greedy generate() gives stock's tokens: embedding, per-layer arguments (rope tables,
    slots, kv_lens, valid mask, scale), lm_head and the runtime wiring are right."""
    monkeypatch.setattr(api, "cupy_reason", lambda plan, device: None)
    model = build_model("tiny-qwen2", dtype=torch.float32, seed=8)
    ids = toks(model, 2, 6, 9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    want = gen(model, ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
    rep = braid_backend.patch(model, backend="cupy")
    step = model._braid_session.step   # internals: switch the step's layers to the torch reference
    assert type(step) is CupyDecodeStep and rep.backend == "cupy"
    assert any("persistent CuPy kernel" in e for e in rep.events) and "decode layers: cupy" in str(rep)
    step.layer_impl = "reference"
    got = gen(model, ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
    assert braid_backend.status(model).last_path == "fast"
    assert torch.equal(got, want)
    braid_backend.unpatch(model)
