"""Tensor parallelism on the CPU: two gloo processes under torchrun load a tiny checkpoint with
transformers' tp_plan="auto", patch it, and compare with stock TP (the Triton interpreter runs the
kernels on each rank's shards). See braid_backend/testing/tp_check.py for what each field means."""
import json
import os
import sys
import time

import pytest
import torch

import braid_backend
from braid_backend.bench.tp import run_group
from braid_backend.testing.tp_check import save_preset

pytest.importorskip("accelerate")   # transformers needs it to load with tp_plan (the test extra has it)
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def run_tp(tmp_path, preset, dtype, *extra, world=2, **overrides):
    ckpt = save_preset(preset, str(tmp_path / preset), dtype=torch.float32, **overrides)
    out = tmp_path / f"{preset}-{dtype}.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", "braid_backend.testing.tp_check", ckpt, "--dtype", dtype, "--prompt", "9", "--steps", "3",
           "--new", "5", "--out", str(out), *extra]
    log = tmp_path / f"{preset}-{dtype}.log"
    with open(log, "w") as f:
        code = run_group(cmd, env, 300, f)   # a hang kills every rank, not only torchrun
    assert code == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


def check_agrees(res):
    assert res["patched"], res["report"]
    assert "rank 0 of 2" in res["report"]
    assert res["last_path"] == "fast"
    assert res["greedy_equal_stock"] and res["greedy_same_on_ranks"] and res["sampled_same_on_ranks"]
    assert res["sampled_hf_loop_same_on_ranks"] and res["sampled_hf_loop_path"].startswith("hf-loop")
    assert res["unpatch_params_exact"] and res["unpatch_err"] < 1e-5


def test_tp_fp32_matches_stock_tp(tmp_path):
    res = run_tp(tmp_path, "tiny-llama", "fp32", "--no-fp32-ref", vocab_size=308)
    check_agrees(res)
    # fp32 on both sides: only summation order differs (the all-reduce is the same op)
    assert res["braid_vs_stock_err"] < 1e-5, res


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3", "tiny-gemma2"])
def test_tp_bf16_within_2x_of_stock_tp(tmp_path, preset):
    # qwen2: q/k/v biases on sharded rows; qwen3: per-head q/k norms; gemma2: post-norms after the
    # all-reduce, embed scale on the summed vocab-sharded lookup, final softcap on gathered logits
    res = run_tp(tmp_path, preset, "bf16", vocab_size=308)
    check_agrees(res)
    assert res["ref_err"]["ratio"] <= 2.0, res["ref_err"]


def test_uneven_vocab_is_left_stock_with_a_reason(tmp_path):
    res = run_tp(tmp_path, "tiny-llama", "fp32", "--no-fp32-ref", vocab_size=307)
    assert not res["patched"]
    assert "does not split evenly over 2 ranks" in res["report"]


def test_all_reduce_choice_follows_the_tuning():
    import torch.distributed as dist

    from braid_backend.model.tp import _choose_all_reduce

    with pytest.raises(ValueError, match="BRAID_TP_ALLREDUCE"):
        braid_backend.Tuning.from_env({"BRAID_TP_ALLREDUCE": "bogus"})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group, cpu = dist.group.WORLD, torch.device("cpu")
        with pytest.raises(ValueError, match="needs CUDA"):
            _choose_all_reduce(group, cpu, braid_backend.Tuning.from_env({"BRAID_TP_ALLREDUCE": "symm"}).tp_allreduce)
        assert _choose_all_reduce(group, cpu, "auto") == ("gloo", None)
    finally:
        dist.destroy_process_group()


def test_bench_tp_flag_runs_torchrun_and_reports_a_refusal(tmp_path):
    # the tiny presets' vocabulary (307) does not split over 2 ranks: stock TP is timed, braid says why
    from braid_backend.bench.cli import main

    out = tmp_path / "bench"
    rc = main(["-m", "tiny-llama", "--tp", "2", "-b", "1", "-n", "3", "--reps", "1", "-p", "8",
               "-o", str(out), "--no-bar"])
    summary = json.loads((out / "tp-summary.json").read_text())
    assert rc == 0 and summary["tp"] == 2
    row = summary["rows"][0]
    assert row["batch"] == 1 and row["world"] == 2 and not row["patched"]
    assert "does not split evenly" in row["report"]
    assert row["stock_tp"]["generate_n_ms"] > 0


def test_run_group_timeout_kills_the_workers_too(tmp_path):
    # what a hung rank looks like to the launcher: a child that never returns, under a parent that waits
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "print(c.pid, flush=True); time.sleep(120)")
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        assert run_group([sys.executable, "-c", code], dict(os.environ), 3, f) == 124
    pid = int(out.read_text().split()[0])
    for _ in range(50):   # the kill is asynchronous: give the kernel a moment to reap it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as st:   # a zombie (Z) is dead, just not reaped by its dead parent
            if st.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker survived its launcher's timeout")
