"""braid-bench: A/B benchmark of stock transformers against the braid-patched model.

Each variant runs in its own subprocess (braid_backend.bench.runner), so a crash in one is recorded
(with the last lines of its log on the console) and the rest go on. A progress bar with an ETA (tqdm)
counts the tokens the timed generate() calls produce. Besides the batch sweep: time to first token at
extra prompt lengths (--ttft-prompts), a short chat-like call (--chat) and, with --cold, each compiled
variant's first call in a fresh process with empty compile caches (collect.py). Writes results.json,
results.md and tokps.png to --out-dir.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile

from tqdm import tqdm

from . import report
from .report import check_notes  # noqa: F401  (cli.check_notes: tests and callers)
from .child import _BarLines, _failure_reason, _units, log_excerpt, run_child
from .collect import (COLD_VARIANTS, add_chat_ratios, add_ratios, collect_chat, collect_rows, collect_samples,
                      collect_ttft, cold_section, run_cold, warm_cache_state)
from .quant import ALL_QUANT_VARIANTS, QUANT, parse_quant_list, quant_variants, split_variant
from .runner import INTERPRET_NOTE
from .timing import PROGRESS

VARIANTS = ("stock", "hf-static", "braid", "braid-eager", "braid-triton", "braid-cupy")
DEFAULT_VARIANTS = ("stock", "hf-static", "braid")
TEST_VARIANTS = ("crash", "hang")   # test aids, not listed in --help
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Defaults: (GPU, CPU). On CPU the Triton interpreter takes ~3 s per fused decode step, so a bare
# `braid-bench` on a GPU-less machine is a smoke test (~2-3 minutes). 8 new tokens x 3 reps keep the
# difference generate(8) - generate(1) well above the CPU timer noise (the spread of the repeats) for
# every variant; the first call warms up, so no extra warm-up there. The chat call keeps its 512-token
# prompt on CPU (prefill is stock and cheap) but makes 8 new tokens, not 64.
DEFAULTS = {
    "model": ("qwen2.5-0.5b", "qwen2.5-0.5b"), "batch_sizes": ([1, 16], [1]), "prompt_len": (128, 8),
    "new_tokens": (256, 8), "warmup": (2, 0), "reps": (3, 3), "check_prompt_len": (64, 8), "check_steps": (16, 1),
    "chat": ((512, 64), (512, 8)),
}


def _say(msg: str) -> None:
    tqdm.write(f"{PROGRESS} {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------- arguments

def _positive(name):
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {v}")
        return v
    return conv


def _non_negative(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _batch_list(s):
    parts = [p.strip() for p in s.split(",")]
    out = []
    for p in parts:
        if not p.isdigit() or int(p) <= 0:
            raise argparse.ArgumentTypeError(
                f"batch sizes must be a comma-separated list of positive integers (e.g. 1,4,16); bad entry {p!r} in {s!r}")
        out.append(int(p))
    return list(dict.fromkeys(out))


def _length_list(s):
    """--ttft-prompts: comma-separated positive prompt lengths, or 'none'."""
    if s.strip().lower() == "none":
        return []
    try:
        return _batch_list(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"prompt lengths must be a comma-separated list of positive integers (e.g. 128,2048,8192) or "
            f"'none'; got {s!r}") from None


def _chat(s):
    """--chat P,N (prompt tokens, new tokens) or 'none'."""
    if s.strip().lower() == "none":
        return "none"
    parts = [p.strip() for p in s.split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--chat takes PROMPT,NEW_TOKENS (two positive integers, e.g. 512,64) "
                                         f"or 'none'; got {s!r}")
    return (int(parts[0]), int(parts[1]))


def _variant_list(s):
    if s.strip() == "all":
        return list(VARIANTS)
    out = []
    for v in (p.strip() for p in s.split(",")):
        if v not in VARIANTS + ALL_QUANT_VARIANTS + TEST_VARIANTS:
            raise argparse.ArgumentTypeError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)} (or 'all'), "
                                             f"or stock-Q / braid-Q with Q in {', '.join(QUANT)}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no variants given")
    return list(dict.fromkeys(out))


def _quant_list(s):
    try:
        return parse_quant_list(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from .presets import known_presets

    presets = known_presets()
    p = argparse.ArgumentParser(
        prog="braid-bench",
        description="A/B benchmark: stock transformers vs HF static cache vs braid_backend.patch(), each variant "
                    "in its own subprocess. Without a GPU, big presets are replaced by the tiny-peaked preset.",
        epilog="Defaults (GPU / CPU): batch 1,16 / 1; prompt 128 / 8; new tokens 256 / 8; warm-ups 2 / 0; "
               "reps 3 / 3; logits check prompt 64 / 8, steps 16 / 1; chat 512,64 / 512,8.")
    p.add_argument("-m", "--model", default=None,
                   help=f"preset ({', '.join(presets)}; real configs, random weights), a local checkpoint "
                        "folder or a hub id (org/name). Default qwen2.5-0.5b")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda if available, else cpu (Triton kernels then run under TRITON_INTERPRET=1)")
    p.add_argument("-b", "--batch-sizes", type=_batch_list, default=None, metavar="B1,B2,...",
                   help="batch sizes to sweep")
    p.add_argument("-p", "--prompt-len", type=_positive("--prompt-len"), default=None,
                   help="random prompt tokens (not used with text prompts)")
    p.add_argument("--prompts", choices=("auto", "text", "random"), default="auto",
                   help="auto: the built-in text prompts through the model's tokenizer and chat template when "
                        "the checkpoint has a tokenizer (a text sample of each variant is printed), else random "
                        "tokens; presets have no tokenizer")
    p.add_argument("-n", "--new-tokens", type=_positive("--new-tokens"), default=None,
                   help="tokens generated per call (>= 2; min_new_tokens = max_new_tokens)")
    p.add_argument("--reps", type=_positive("--reps"), default=None, help="timed repetitions (median, min/max)")
    p.add_argument("--warmup", type=_non_negative, default=None, help="warm-up repetitions, excluded")
    p.add_argument("--variants", type=_variant_list, default=None, metavar="V1,V2,...",
                   help=f"from {', '.join(VARIANTS)} or 'all' (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--ttft-prompts", type=_length_list, default=[], metavar="L1,L2,...",
                   help="also measure time to first token (generate(max_new_tokens=1), batch 1, random tokens, "
                        "warm, median of --reps) at these prompt lengths, e.g. 128,2048,8192; lengths above the "
                        "model's max_position_embeddings are clamped (with a note). Default: none")
    p.add_argument("--chat", type=_chat, default=None, metavar="PROMPT,NEW",
                   help="end-to-end latency of a chat-like call: generate(NEW) on a PROMPT-token prompt, batch 1, "
                        "warm, median/min/max of --reps; 'none' skips it. Default 512,64 (CPU: 512,8); clamped "
                        "to the model's max_position_embeddings (with a note)")
    p.add_argument("--cold", action="store_true",
                   help="also run hf-static / braid / braid-eager once more in a fresh process with "
                        "TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR pointing at new empty dirs and report "
                        "its first generate() call (kernel compilation included) as cold_first_call_s")
    p.add_argument("--check", choices=("first", "all", "none"), default="first",
                   help="batch sizes that get the teacher-forced logits check vs an fp32 reference")
    p.add_argument("--check-prompt-len", type=_positive("--check-prompt-len"), default=None)
    p.add_argument("--check-steps", type=_positive("--check-steps"), default=None,
                   help="teacher-forced decode steps in the logits check")
    p.add_argument("--no-agreement", action="store_true", help="skip greedy-token agreement with stock")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=_positive("--timeout"), default=3600, help="seconds per variant subprocess")
    p.add_argument("-o", "--out-dir", default=None, help="default braid-results/<timestamp>")
    p.add_argument("--allow-big-on-cpu", action="store_true",
                   help="run a big preset on CPU instead of switching to the tiny preset")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any variant/batch, TTFT length, chat call or cold run did not finish ok")
    p.add_argument("-v", "--verbose", action="store_true", help="echo the variant subprocesses' full output")
    p.add_argument("--no-bar", action="store_true", help="no progress bar (the progress lines still print)")
    p.add_argument("--quant", type=_quant_list, default=[], metavar="Q1,Q2,...",
                   help="also run the model quantized into these checkpoint formats, stock-Q and braid-Q each "
                        f"({'; '.join(f'{k}: {v[2]}' for k, v in QUANT.items())}); see braid_backend/bench/quant.py")
    p.add_argument("--tp", type=_positive("--tp"), default=1,
                   help="tensor parallelism over N local GPUs (gloo processes on CPU): stock HF TP vs braid TP, "
                        "through torchrun and transformers' tp_plan='auto' (see braid_backend/bench/tp.py)")
    return p


def resolve(args, parser) -> tuple[dict, list[str]]:
    """Fill device-dependent defaults and check what argparse can't; returns (settings, notes)."""
    import torch

    from ..testing.presets import PRESETS
    from .presets import BENCH_PRESETS, PEAKED, known_presets

    presets = known_presets()
    notes = []
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible to torch")
    cpu = device == "cpu"
    s = {k: (getattr(args, k) if getattr(args, k) is not None else DEFAULTS[k][cpu]) for k in DEFAULTS}
    if s["new_tokens"] < 2:
        parser.error("--new-tokens must be >= 2 (decode time is (generate(N) - generate(1)) / (N - 1))")
    requested = s["model"]
    if requested in presets:
        source = "preset"
    elif os.path.exists(requested):
        source = "path"
    elif HUB_ID.fullmatch(requested):
        source = "hub"
    else:
        parser.error(f"unknown model {requested!r}: not a preset ({', '.join(presets)}), "
                     "not an existing path, not a hub id (org/name)")
    model = requested
    if args.prompts == "text" and source == "preset":
        parser.error("--prompts text needs a checkpoint with a tokenizer; presets have random weights and no tokenizer")
    if cpu and source == "preset" and requested in PRESETS and not args.allow_big_on_cpu:
        model = PEAKED
        notes.append(f"no GPU: running the {PEAKED} preset ({BENCH_PRESETS[PEAKED]}) instead of {requested} "
                     "(pass --allow-big-on-cpu to force it); CPU timings only prove the tool works")
    chat = DEFAULTS["chat"][cpu] if args.chat is None else (None if args.chat == "none" else args.chat)
    if cpu and args.chat is None:
        notes.append(f"CPU: the chat call makes {chat[1]} new tokens instead of {DEFAULTS['chat'][0][1]} (fused steps "
                     "are slow in the Triton interpreter); --chat P,N sets it")
    if cpu:
        notes.append(INTERPRET_NOTE)
        notes.append("CPU run: no copy bandwidth (% of BW limit) and no peak GPU memory")
    variants = list(dict.fromkeys((args.variants or list(DEFAULT_VARIANTS)) + quant_variants(args.quant)))
    if args.tp > 1 and any(split_variant(v)[1] for v in variants):
        parser.error("--quant and the stock-Q / braid-Q variants run on one GPU (not with --tp)")
    if any(split_variant(v)[1] for v in variants) and args.dtype == "fp32":
        parser.error("quantized variants need --dtype bf16 or fp16 (their activations and scales are 16-bit)")
    s.update(model=model, requested_model=requested, model_source=source, device=device,
             dtype=args.dtype, variants=variants, check=args.check,
             agreement=not args.no_agreement, seed=args.seed, timeout=args.timeout, prompts=args.prompts,
             ttft_prompts=args.ttft_prompts, chat=chat, cold=args.cold)
    return s, notes


# ------------------------------------------------------------------------------------------- main

def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _package_version():
    v = _version("braid-backend")
    if v is None:
        try:
            from .. import __version__ as v
        except Exception:
            v = None
    return v


def _git_commit():
    """HEAD of the checkout this package runs from (with '-dirty' if it has changes), or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _where(batches) -> str:
    return f"at batch {','.join(map(str, batches))}" if batches else "after the batch sweep"


def _ticker(bar, units: int):
    """(on_tick, top_up) for one worker: ticks advance the bar by at most `units`; top_up() adds what the
    worker did not tick (a crash, or lengths clamped shorter), so its share always ends complete."""
    done = [0]

    def on_tick(k):
        k = min(k, units - done[0])
        done[0] += k
        bar.update(k)

    return on_tick, lambda: on_tick(units - done[0])


def _width(table: bool) -> int:
    """Console width for rich: the terminal's on a TTY; else no wrapping for the results table and
    120 columns for the text sample."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 1000 if table else 120


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    s, notes = resolve(args, parser)
    out_dir = args.out_dir or os.path.join("braid-results", _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    for n in notes:
        _say("NOTE: " + n)
    if args.tp > 1:
        from .tp import run_tp
        return run_tp(s, args.tp, out_dir, _say)
    prompt_desc = (f"prompt {s['prompt_len']}" if s["prompts"] == "random" or s["model_source"] == "preset"
                   else f"prompts {s['prompts']} (text if the checkpoint has a tokenizer)")
    _say(f"model {s['model']} {s['dtype']} on {s['device']}; variants {','.join(s['variants'])}; "
         f"batch {s['batch_sizes']}, {prompt_desc}, new tokens {s['new_tokens']}, "
         f"warm-up {s['warmup']}, reps {s['reps']}; output {out_dir}")
    extras = ([f"TTFT at prompts {','.join(map(str, s['ttft_prompts']))}"] if s["ttft_prompts"] else []) \
        + ([f"chat {s['chat'][0]},{s['chat'][1]}"] if s["chat"] else []) + (["cold start"] if s["cold"] else [])
    if extras:
        _say("batch 1 as well: " + "; ".join(extras))

    probe = None
    if s["device"] == "cuda":
        _say("probe: GPU facts and device-to-device copy bandwidth")
        res = run_child({"kind": "probe"}, 600, "cuda", os.path.join(out_dir, "logs", "probe.log"), args.verbose)
        probe = next((r for r in res["records"] if r.get("type") == "probe"), None)
        if probe is None:
            notes.append(f"copy-bandwidth probe failed ({_failure_reason(res, 600)}): % of BW limit not reported")
        else:
            _say(f"probe: {probe['gpu_name']}, driver {probe['driver']}, "
                 f"copy {report._f(probe['copy_bw_gbs'], '{:.0f} GB/s', 'not measured')}")
    copy_bw = probe.get("copy_bw_gbs") if probe else None

    spec_keys = ("model", "model_source", "dtype", "device", "batch_sizes", "prompt_len", "new_tokens", "warmup",
                 "reps", "seed", "check", "check_prompt_len", "check_steps", "agreement", "prompts", "ttft_prompts",
                 "chat")
    rows, facts_box, metas, failures, ttft, chat, cold = [], {}, {}, [], [], [], []
    # stock runs first: its greedy tokens are the reference for the others' agreement (saves re-generating).
    order = sorted(s["variants"], key=lambda v: v != "stock")
    cold_order = [v for v in order if v in COLD_VARIANTS] if s["cold"] else []
    warm_caches = warm_cache_state() if s["cold"] else None   # before any variant filled them
    per_variant = _units(s)
    tty = sys.stderr.isatty()
    bar_out = sys.stderr if tty else _BarLines(sys.stderr, every=30.0)
    bar = tqdm(total=per_variant * len(order) + s["new_tokens"] * len(cold_order), unit="tok", file=bar_out,
               disable=args.no_bar, dynamic_ncols=tty, ncols=None if tty else 100, mininterval=0.5,
               bar_format="{desc}{percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} tok "
                          "[{elapsed} elapsed, ETA {remaining}]")
    run_tmp = tempfile.TemporaryDirectory(prefix="braid-bench-run-")
    tokens_path = os.path.join(run_tmp.name, "stock_tokens.json")
    try:
        for i, v in enumerate(order):
            _say(f"({i + 1}/{len(order)}) variant {v}: starting subprocess")
            bar.set_description(f"{v} ({i + 1}/{len(order)})", refresh=False)
            spec = {k: s[k] for k in spec_keys}
            spec["variant"] = v
            spec["tokens_out" if v == "stock" else "ref_tokens"] = tokens_path
            on_tick, top_up = _ticker(bar, per_variant)
            log_path = os.path.join(out_dir, "logs", f"{v}.log")
            res = run_child(spec, s["timeout"], s["device"], log_path, args.verbose, on_tick)
            top_up()   # a crash or error skipped calls: the bar still ends at 100%
            meta = next((r for r in res["records"] if r.get("type") == "meta"), None)
            if meta:
                metas[v] = meta
            vrows = collect_rows(v, s, res, facts_box)
            bad = [r for r in vrows if r["status"] != "ok"]
            if res["timed_out"] or res["returncode"] != 0:
                reason = _failure_reason(res, s["timeout"])
                at = [r["batch"] for r in bad]
                excerpt = log_excerpt(res["tail"])
                failures.append((v, reason, at, log_path, excerpt))
                _say(f"variant {v}: CRASHED ({reason}) {_where(at)}; recorded, "
                     f"continuing. Last lines of {log_path}:\n" + "\n".join("    | " + ln for ln in excerpt))
            elif bad:
                _say(f"variant {v}: {len(bad)} batch size(s) failed; recorded")
            _say(f"variant {v}: done in {res['wall_s']:.1f}s")
            rows.extend(vrows)
            ttft.extend(collect_ttft(v, s, res))
            chat.extend(collect_chat(v, s, res))
            if v in cold_order:
                _say(f"variant {v}: cold start, a fresh subprocess with empty compile caches")
                on_tick, top_up = _ticker(bar, s["new_tokens"])
                cold.append(run_cold(v, spec, s, run_tmp.name, os.path.join(out_dir, "logs", f"{v}-cold.log"),
                                     args.verbose, on_tick))
                top_up()
                _say(f"variant {v}: cold first call {report._f(cold[-1]['cold_first_call_s'], '{:.2f} s')} "
                     f"({cold[-1]['status']})")
    finally:
        bar.close()
        if bar_out is not sys.stderr:
            bar_out.finish()
        run_tmp.cleanup()
    add_ratios(rows, copy_bw)
    add_chat_ratios(chat)
    notes.extend(check_notes(rows, s["dtype"]))
    cold_doc = cold_section(cold, rows, warm_caches, s) if s["cold"] else None

    facts = facts_box.get("facts") or {}
    run_args = {k: v for k, v in s.items()}
    run_args["out_dir"] = out_dir
    first_meta = next(iter(metas.values()), {})
    prompts = next((m["prompts"] for m in metas.values() if (m.get("prompts") or {}).get("source") == "text"),
                   first_meta.get("prompts"))
    doc = {
        "schema_version": report.SCHEMA_VERSION, "tool": "braid-bench",
        "env": {
            "gpu_name": probe.get("gpu_name") if probe else None,
            "driver": probe.get("driver") if probe else None,
            "cuda_runtime": probe.get("cuda_runtime") if probe else None,
            "torch": _version("torch"), "transformers": _version("transformers"), "triton": _version("triton"),
            "braid_backend": _package_version(), "git_commit": _git_commit(),
            "python": platform.python_version(), "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(), "args": run_args,
            "triton_interpret": s["device"] == "cpu", "timer": first_meta.get("timer"),
        },
        "device": s["device"],
        "model": {"name": s["model"], "requested": s["requested_model"], "source": s["model_source"],
                  "dtype": s["dtype"], **facts},
        "copy_bw_gbs": copy_bw, "probe": probe, "prompts": prompts, "samples": collect_samples(rows),
        "results": rows, "ttft": ttft, "chat": chat, "cold": cold_doc,
        "notes": notes + sorted({n for r in rows + ttft + chat for n in (r.get("notes") or [])} - set(notes))
        + (cold_doc["notes"] if cold_doc else []),
    }
    try:
        problems = report.validate(doc)
    except ImportError:   # jsonschema not installed: the self-check is skipped, nothing else changes
        problems = []
    if problems:   # a bug in this tool, not in what it measured; say so, still write everything
        doc["notes"].append("schema problems: " + "; ".join(problems))
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("json", "results.json"), ("md", "results.md"), ("png", "tokps.png"))}
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(report.markdown(doc))
    try:
        report.plot(doc, paths["png"])
    except Exception as e:   # matplotlib missing or broken: the numbers are already saved
        _say(f"plot not written: {e}")
        paths.pop("png")

    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    plain = enc.lower().replace("-", "").replace("_", "") not in ("utf8", "utf16", "utf32")

    def say(text=""):   # generated text may hold what this console can't encode
        print(text.encode(enc, "replace").decode(enc) if plain else text)

    say()
    say(f"braid-bench: {doc['model']['name']} {s['dtype']} on {doc['env']['gpu_name'] or 'CPU'}"
        + (f", copy bandwidth {copy_bw:.0f} GB/s" if copy_bw else ""))
    say(report.terminal_table(rows, width=_width(table=True), ascii_only=plain, dtype=s["dtype"]))
    for title, table in report.latency_tables(doc):
        say()
        say(title)
        say(report.render_table(table, width=_width(table=True), ascii_only=plain))
    if doc["samples"]:
        say()
        say(report.side_by_side(doc["samples"], width=_width(table=False), ascii_only=plain))
    for v, reason, at, log_path, excerpt in failures:
        say()
        say(f"variant {v} crashed ({reason}) {_where(at)}; last lines of {log_path}:")
        for ln in excerpt:
            say("    | " + ln)
    say()
    for n in doc["notes"]:
        say(f"note: {n}")
    say("wrote " + ", ".join(paths.values()))
    n_ok = sum(r["status"] == "ok" for r in rows)
    if n_ok == 0:
        return 1
    if args.strict and any(r["status"] != "ok" for r in rows + ttft + chat + cold):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
