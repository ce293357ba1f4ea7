"""braid-bench through its real CLI: tiny preset end to end on CPU (variants in subprocesses), crash and
timeout recording, argument errors. One shared run keeps the file around two minutes on 2 cores."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from braid_backend.bench import cli, report
from braid_backend.bench.runner import model_facts
from braid_backend.testing.presets import build_model

TINY = ["--model", "tiny", "--device", "cpu", "--prompt-len", "8", "--check-prompt-len", "8", "--check-steps", "1"]
# crash sits between real variants: the ones after it must still run.
VARIANTS = ["stock", "crash", "hf-static"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _run(tmp_path_factory, argv):
    out_dir = tmp_path_factory.mktemp("bench") / "run"
    rc, out, err = run_cli(TINY + argv + ["--out-dir", str(out_dir)])
    doc = json.loads((out_dir / "results.json").read_text())
    return {"rc": rc, "stdout": out, "stderr": err, "dir": out_dir, "doc": doc}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Stock-side variants and the crash test aid: cheap, so enough tokens/reps for steady numbers."""
    return _run(tmp_path_factory, ["--batch-sizes", "1,2", "--new-tokens", "16", "--reps", "3", "--warmup", "1",
                                   "--variants", ",".join(VARIANTS)])


@pytest.fixture(scope="module")
def braid_run(tmp_path_factory):
    """The patched model: every fused decode step costs seconds in the Triton interpreter, so the minimum
    (first call 1 step + 1 rep of 1 step + 1 teacher-forced check step)."""
    return _run(tmp_path_factory, ["--batch-sizes", "1", "--new-tokens", "2", "--reps", "1", "--warmup", "0",
                                   "--variants", "braid-eager"])


def rows_of(doc, variant):
    return {r["batch"]: r for r in doc["results"] if r["variant"] == variant}


def test_end_to_end_json(tiny_run):
    doc = tiny_run["doc"]
    assert tiny_run["rc"] == 0, tiny_run["stderr"][-3000:]
    assert report.validate(doc) == []
    env = doc["env"]
    for k in ("gpu_name", "driver", "torch", "transformers", "triton", "python", "date", "hostname", "args"):
        assert k in env
    assert env["torch"] and env["transformers"] and isinstance(env["date"], str)
    assert env["gpu_name"] is None and env["driver"] is None and doc["copy_bw_gbs"] is None
    assert env["args"]["batch_sizes"] == [1, 2] and env["args"]["new_tokens"] == 16
    assert [(r["variant"], r["batch"]) for r in doc["results"]] == [(v, b) for v in VARIANTS for b in (1, 2)]
    assert any("TRITON_INTERPRET=1" in n for n in doc["notes"])

    for v in ("stock", "hf-static"):
        for b, r in rows_of(doc, v).items():
            assert r["status"] == "ok", (v, b, r["error"], r["stderr_tail"])
            for k in ("prefill_ms", "decode_ms_per_step", "e2e_ms"):
                st = r[k]
                assert 0 < st["min"] <= st["median"] <= st["max"] and st["n"] == 3, (v, b, k, st)
            assert r["tok_s"] == pytest.approx(b * 1000 / r["decode_ms_per_step"]["median"])
            assert r["first_call_s"] > 0 and r["peak_mem_mib"] is None and r["bw_limit_pct"] is None
            assert r["new_tokens_generated"] == 16
            stock = rows_of(doc, "stock")[b]["decode_ms_per_step"]["median"]
            assert r["speedup_vs_stock"] == pytest.approx(stock / r["decode_ms_per_step"]["median"])
            hf = rows_of(doc, "hf-static")[b]["decode_ms_per_step"]["median"]
            assert r["speedup_vs_hf_static"] == pytest.approx(hf / r["decode_ms_per_step"]["median"])
        assert rows_of(doc, "hf-static")[b]["greedy_agreement"] == 1.0   # HF's static cache: same math
        assert rows_of(doc, "stock")[b]["greedy_agreement"] is None
    # the reference tokens came from the stock variant's own run, not a second stock generate
    assert "stock greedy tokens" not in (tiny_run["dir"] / "logs" / "hf-static.log").read_text()

    # bytes per step: every parameter once (tied lm_head == embed_tokens) + KV at the mean context
    facts = doc["model"]
    m = build_model("tiny")
    assert facts["tied_embeddings"] is True
    assert facts["weight_bytes"] == 2 * sum(p.numel() for p in m.parameters())
    cfg = m.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    assert facts["kv_bytes_per_token"] == kv
    assert rows_of(doc, "stock")[2]["bytes_per_step"] == int(facts["weight_bytes"] + kv * 2 * (8 + 16 / 2))

    stock = rows_of(doc, "stock")[1]["correctness"]
    assert 0 < stock["stock_err"] < 0.1 and stock["steps"] == 2 and stock["prompt_len"] == 8
    assert rows_of(doc, "stock")[2]["correctness"] is None    # --check first


def test_braid_eager_ok_with_correctness(braid_run):
    doc = braid_run["doc"]
    assert braid_run["rc"] == 0, braid_run["stderr"][-3000:]
    assert report.validate(doc) == []
    r = rows_of(doc, "braid-eager")[1]
    assert r["status"] == "ok", (r["error"], r["stderr_tail"])
    assert r["tok_s"] > 0 and r["new_tokens_generated"] == 2
    assert r["speedup_vs_stock"] is None      # stock not in this run
    chk = r["correctness"]
    assert "error" not in chk, chk.get("error")
    assert 0 < chk["stock_err"] < 0.1 and math.isfinite(chk["variant_err"])
    assert chk["err_ratio"] == pytest.approx(chk["variant_err"] / chk["stock_err"])
    assert chk["err_ratio"] <= 2.0, chk       # DESIGN: a fused path may be at most 2x worse than stock bf16
    assert 0.0 <= r["greedy_agreement"] <= 1.0
    patch = r["patch"]
    assert patch["graphs"] is False and patch["text"] and isinstance(patch["dict"], dict)
    assert any(line.startswith("braid-eager") and line.rstrip().endswith("ok")
               for line in braid_run["stdout"].splitlines())


def test_crash_recorded_and_run_goes_on(tiny_run):
    doc = tiny_run["doc"]
    crash = rows_of(doc, "crash")
    assert crash[1]["status"] == "ok"          # rows written before the crash survive it
    r = crash[2]
    assert r["status"] == "crashed"
    assert r["returncode"] == -signal.SIGABRT and "SIGABRT" in r["reason"]
    assert "os.abort" in r["stderr_tail"]
    assert r["tok_s"] is None and r["bytes_per_step"] > 0
    assert (tiny_run["dir"] / "logs" / "crash.log").exists()
    assert "variant crash: CRASHED" in tiny_run["stderr"]
    assert all(r["status"] == "ok" for r in rows_of(doc, "hf-static").values())   # ran after the crash


def test_outputs_table_markdown_plot(tiny_run):
    d, out, err = tiny_run["dir"], tiny_run["stdout"], tiny_run["stderr"]
    assert "rep 3/3" in err and "variant stock: starting" in err          # progress while it runs
    assert "decode ms/step (min-max)" in out and "x hf-static" in out
    assert any(line.startswith("hf-static") and line.rstrip().endswith("ok") for line in out.splitlines())
    assert "crashed (signal SIGABRT)" in out
    md = (d / "results.md").read_text()
    assert "| variant | batch | prefill ms | decode ms/step (min-max) | tok/s |" in md
    assert sum(line.startswith("| hf-static |") for line in md.splitlines()) == 2
    png = (d / "tokps.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 2000


def test_timeout_recorded(tmp_path):
    rc, out, err = run_cli(TINY + ["--batch-sizes", "1", "--variants", "hang", "--timeout", "3", "--new-tokens", "2",
                                   "--out-dir", str(tmp_path)])
    assert rc == 1                              # nothing finished
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate(doc) == []
    (r,) = doc["results"]
    assert r["status"] == "crashed" and r["timed_out"] is True and "timeout" in r["reason"]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "stock,bogus"], "unknown variant 'bogus'"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--batch-sizes", "1,x"], "bad entry 'x'"),
    (["--batch-sizes", "0"], "bad entry '0'"),
    (["--prompt-len", "0"], "--prompt-len must be positive"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--reps", "two"], "--reps must be an integer"),
    (["--dtype", "int4"], "invalid choice: 'int4'"),
])
def test_bad_arguments(argv, message, tmp_path, capsys):
    out_dir = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["--device", "cpu", "--out-dir", str(out_dir)] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_cpu_runs_tiny_instead_of_big_preset():
    p = cli.build_parser()
    s, notes = cli.resolve(p.parse_args(["--device", "cpu"]), p)
    assert s["model"] == "tiny" and s["requested_model"] == "qwen2.5-0.5b"
    assert any("tiny preset" in n for n in notes)
    assert s["new_tokens"] >= 2 and s["batch_sizes"] == [1]
    s, _ = cli.resolve(p.parse_args(["--device", "cpu", "--allow-big-on-cpu", "-m", "llama-3.2-1b"]), p)
    assert s["model"] == "llama-3.2-1b"
    s, _ = cli.resolve(p.parse_args(["--device", "cpu", "-m", "Qwen/Qwen2.5-0.5B"]), p)
    assert s["model_source"] == "hub"


def test_untied_lm_head_counted():
    m = build_model("tiny-llama")
    f = model_facts(m, 2)
    assert not f["tied_embeddings"]
    emb = m.get_input_embeddings().weight.numel()
    assert f["weight_bytes"] == 2 * sum(p.numel() for p in m.parameters())
    assert f["weight_bytes"] > 2 * 2 * emb     # embed_tokens and lm_head both in


def test_validator_catches_problems(tiny_run):
    doc = json.loads(json.dumps(tiny_run["doc"]))
    row = next(r for r in doc["results"] if r["status"] == "ok")
    del row["tok_s"]
    doc["results"][1]["status"] = "fine"
    doc["env"].pop("driver")
    problems = report.validate(doc)
    assert any("tok_s" in p for p in problems) and any("status" in p for p in problems)
    assert any("driver" in p for p in problems)


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "braid_backend.bench", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == 0 and "--batch-sizes" in r.stdout and "crash" not in r.stdout


@pytest.mark.gpu
def test_gpu_tiny_end_to_end(tmp_path):
    rc, out, err = run_cli(["--model", "tiny", "--device", "cuda", "--batch-sizes", "1,4", "--prompt-len", "16",
                            "--new-tokens", "16", "--reps", "2", "--warmup", "1", "--variants", "all",
                            "--out-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert report.validate(doc) == []
    assert doc["copy_bw_gbs"] > 100 and doc["env"]["gpu_name"]
    for r in doc["results"]:
        assert r["status"] == "ok", (r["variant"], r["batch"], r["error"], r["stderr_tail"])
        assert r["peak_mem_mib"] > 0 and r["bw_limit_pct"] > 0
    assert rc == 0
