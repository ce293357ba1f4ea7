"""What the braid-bench tests share: the tiny CLI arguments and the two shared runs (conftest.py makes
them session fixtures, so test_bench.py and test_bench_plot.py use the same runs)."""
from __future__ import annotations

import contextlib
import io
import json
import os

from helpers import save_tiny_chat_checkpoint

from braid_backend.bench import cli

TINY = ["--model", "tiny", "--device", "cpu", "--prompt-len", "8", "--check-prompt-len", "8", "--check-steps", "1"]
# crash sits between real variants: the ones after it must still run.
VARIANTS = ["stock", "crash", "hf-static"]
# TTFT at a short and a too-long prompt, a chat call too long for the tiny model's 512 positions, cold start.
LATENCY_ARGS = ["--ttft-prompts", "16,4096", "--chat", "600,4", "--cold"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _run(tmp_path_factory, argv, base=TINY):
    out_dir = tmp_path_factory.mktemp("bench") / "run"
    rc, out, err = run_cli(base + argv + ["--out-dir", str(out_dir)])
    doc = json.loads((out_dir / "results.json").read_text())
    return {"rc": rc, "stdout": out, "stderr": err, "dir": out_dir, "doc": doc}


def tiny_run(tmp_path_factory):
    """Stock-side variants and the crash test aid: cheap, so enough tokens/reps for steady numbers."""
    return _run(tmp_path_factory, ["--batch-sizes", "1,2", "--new-tokens", "16", "--reps", "3", "--warmup", "1",
                                   "--variants", ",".join(VARIANTS), *LATENCY_ARGS])


def braid_run(tmp_path_factory):
    """A real checkpoint folder (tiny random Qwen2 + byte-level BPE tokenizer + chat template) against the
    patched model: every fused decode step costs seconds in the Triton interpreter, so the minimum (first
    call 1 step + 1 rep of 1 step + 1 teacher-forced check step), plus a TTFT length (prefill only), a
    2-token chat call (first call + 1 rep) and the cold start's first call."""
    ckpt = save_tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))
    r = _run(tmp_path_factory, ["--batch-sizes", "1", "--new-tokens", "2", "--reps", "1", "--warmup", "0",
                                "--variants", "stock,braid-eager", "--ttft-prompts", "12", "--chat", "12,2", "--cold"],
             base=["--model", ckpt, "--device", "cpu", "--check-prompt-len", "8", "--check-steps", "1"])
    r["ckpt"] = ckpt
    return r


def rows_of(doc, variant):
    return {r["batch"]: r for r in doc["results"] if r["variant"] == variant}
