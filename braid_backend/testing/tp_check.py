"""Tensor-parallel check and benchmark: one process per rank, launched by torchrun.

    torchrun --nproc-per-node 2 -m braid_backend.testing.tp_check CHECKPOINT_DIR [--dtype bf16]
        [--prompt 32] [--steps 8] [--new 16] [--bench-new 0] [--batch 1] [--out result.json]

Every rank loads the checkpoint with transformers' own `tp_plan="auto"` (NCCL on CUDA, gloo on the
CPU with the Triton interpreter), and rank 0 writes one JSON result:
- `ref_err`: teacher-forced logits (a prompt, then `steps` fed tokens) of stock TP in `dtype` and of
  braid TP, each against stock TP in fp32 (`--no-fp32-ref` skips the fp32 load: a model that only fits
  in bf16), and their ratio (the 2x rule);
- greedy `generate()` tokens: braid TP == stock TP, and equal on every rank;
- a seeded sampled `generate()`: equal on every rank (braid broadcasts rank 0's draw);
- with `--bench-new N`: decode ms/step and tok/s of stock TP and braid TP (CUDA events, medians).
`save_preset(name, dir)` writes a random-weight preset as a checkpoint folder to load this way.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

from ..tuning import interpret_mode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_preset(name: str, path: str, dtype=torch.bfloat16, device="cpu", **overrides) -> str:
    """A random-weight preset saved as a checkpoint folder (what tp_plan="auto" loads)."""
    from .presets import build_model

    model = build_model(name, dtype=dtype, device=device, **overrides)
    model.save_pretrained(path)
    del model
    return path


def _load(path: str, dtype):
    from transformers import AutoModelForCausalLM

    if dist.get_world_size() == 1:   # TP=1: transformers would leave the model on the CPU
        dev = "cuda" if torch.cuda.is_available() and not interpret_mode() else "cpu"
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    with warnings.catch_warnings():   # newer transformers prefer distributed_config=...; 5.17 has no such path
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype)
    return model.eval()


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    world = dist.get_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(out[0], o) for o in out[1:])


def _time_decode(model, ids, new: int, reps: int = 3) -> dict:
    """decode ms/step = (generate(new) - generate(1)) / (new - 1), medians of reps (CUDA events)."""
    kw = dict(do_sample=False, pad_token_id=0)

    def timed(n):
        dist.barrier()
        if ids.is_cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return (time.perf_counter() - t0) * 1e3

    if ids.is_cuda:   # the peak of this variant's generate() calls, not of loading or checks before
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_first = timed(new)
    timed(1)
    t1 = statistics.median(timed(1) for _ in range(reps))
    tns = [timed(new) for _ in range(reps)]
    tn = statistics.median(tns)
    step = (tn - t1) / (new - 1)
    return {"reps": reps, "generate_n_all_ms": tns, "first_call_ms": t_first, "generate_1_ms": t1, "generate_n_ms": tn, "decode_ms_per_step": step,
            "tok_s": ids.shape[0] * 1e3 / step if step > 0 else None,
            "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if ids.is_cuda else None}


def run(args) -> dict:
    import braid_backend
    from ..hf.logits import rel_err, teacher_forced_logits
    from .numerics import random_tokens

    cuda = torch.cuda.is_available() and not interpret_mode()
    rank = dist.get_rank()
    dtype = DTYPES[args.dtype]
    res: dict = {"world": dist.get_world_size(), "dtype": args.dtype, "checkpoint": args.checkpoint,
                 "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "versions": {"torch": torch.__version__}}
    import transformers
    res["versions"]["transformers"] = transformers.__version__
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    ref = None
    if not args.no_fp32_ref:
        m32 = _load(args.checkpoint, torch.float32)
        vocab = m32.config.vocab_size
        prompt = random_tokens(vocab, args.batch, args.prompt, 1, dev)
        cont = random_tokens(vocab, args.batch, args.steps, 2, dev)
        ref = teacher_forced_logits(m32, prompt, cont)
        del m32
    model = _load(args.checkpoint, dtype)
    vocab = model.config.vocab_size
    prompt = random_tokens(vocab, args.batch, args.prompt, 1, dev)
    cont = random_tokens(vocab, args.batch, args.steps, 2, dev)
    stock = teacher_forced_logits(model, prompt, cont)
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    stock_greedy = model.generate(prompt, **gen)
    if args.bench_new and not args.no_stock_bench:
        res["stock_tp"] = _time_decode(model, prompt, args.bench_new, args.reps)

    from ..model.tp import local
    # the snapshot lives on the host: a device copy would double the peak memory the bench reports
    before = {n: (local(p).detach().to("cpu", copy=True), getattr(p, "placements", None), p.shape)
              for n, p in model.named_parameters()}
    report = braid_backend.patch(model)
    res["patched"] = report.ok
    res["report"] = str(report)
    if not report.ok:
        return res
    braid = teacher_forced_logits(model, prompt, cont)
    res["braid_vs_stock_err"] = rel_err(braid, stock)
    if ref is not None:
        e_stock, e_braid = rel_err(stock, ref), rel_err(braid, ref)
        res["ref_err"] = {"stock": e_stock, "braid": e_braid, "ratio": e_braid / max(e_stock, 1e-30)}
    greedy = model.generate(prompt, **gen)
    res["greedy_equal_stock"] = bool(torch.equal(greedy, stock_greedy))
    res["greedy_same_on_ranks"] = _same_on_all_ranks(greedy)
    torch.manual_seed(1234 + rank)   # different seeds on purpose: the ranks must still agree
    if cuda:
        torch.cuda.manual_seed(1234 + rank)
    sampled = model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True,
                             top_k=0, temperature=1.0, pad_token_id=0)
    res["sampled_same_on_ranks"] = _same_on_all_ranks(sampled)
    st = braid_backend.status(model)
    res["last_path"], res["graphs"], res["events"] = st.last_path, st.graphs, list(report.events)
    # HF's own loop (a processor the fast path lacks) samples on each rank: the random state is synced
    torch.manual_seed(4321 + rank)
    if cuda:
        torch.cuda.manual_seed(4321 + rank)
    sampled_hf = model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True,
                                top_k=0, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    res["sampled_hf_loop_same_on_ranks"] = _same_on_all_ranks(sampled_hf.sequences)
    res["sampled_hf_loop_path"] = braid_backend.status(model).last_path
    if args.bench_new:
        res["braid_tp"] = _time_decode(model, prompt, args.bench_new, args.reps)
    braid_backend.unpatch(model)
    # parameters: bit-exact, same shape and placement; logits: CPU BLAS results move by ~1 ulp with
    # the address of an identical weight, so they are compared by error, not bit for bit
    res["unpatch_params_exact"] = all(
        torch.equal(local(p).cpu(), before[n][0]) and getattr(p, "placements", None) == before[n][1]
        and p.shape == before[n][2] for n, p in model.named_parameters())
    res["unpatch_err"] = rel_err(teacher_forced_logits(model, prompt, cont), stock)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--bench-new", type=int, default=0)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (medians) with --bench-new")
    p.add_argument("--no-stock-bench", action="store_true", help="time braid only")
    p.add_argument("--no-fp32-ref", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not interpret_mode()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        res = run(args)
        if dist.get_rank() == 0:
            text = json.dumps(res, indent=1)
            print(text, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
