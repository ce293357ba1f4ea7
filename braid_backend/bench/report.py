"""braid-bench output: the JSON schema (and its validator), the terminal/markdown table, the PNG plot."""
from __future__ import annotations

import math

SCHEMA_VERSION = 1
NUM = (int, float)
N = type(None)
STATUSES = ("ok", "error", "crashed")

# Every result row (one per variant x batch size) carries all of these keys; None where not measured.
ROW_SCHEMA: dict[str, tuple] = {
    "variant": (str,), "batch": (int,), "status": (str,),
    "error": (str, N), "returncode": (int, N), "stderr_tail": (str, N),
    "prefill_ms": (dict, N),            # {"median", "min", "max", "n"} over reps, ms of generate(max_new_tokens=1)
    "decode_ms_per_step": (dict, N),    # same, (generate(N) - generate(1)) / (N - 1)
    "e2e_ms": (dict, N),                # same, generate(N)
    "tok_s": NUM + (N,),                # batch * 1000 / median decode ms (None if that is <= 0: timer noise)
    "tok_s_range": (dict, N),           # {"min", "max"} from the decode max/min
    "first_call_s": NUM + (N,), "first_call_overhead_s": NUM + (N,),
    "peak_mem_mib": NUM + (N,),         # torch.cuda.max_memory_allocated; None on CPU
    "bytes_per_step": (int, N),         # weights (tied once) + KV at the mean context
    "bw_limit_pct": NUM + (N,),         # (bytes_per_step / copy bandwidth) / decode time * 100
    "speedup_vs_stock": NUM + (N,), "speedup_vs_hf_static": NUM + (N,),   # decode-time ratios, same run
    "correctness": (dict, N),           # {"batch", "prompt_len", "steps", "stock_err", "variant_err", "err_ratio"} or {"error"}
    "greedy_agreement": NUM + (N,),     # fraction of generated tokens equal to stock's (None for stock)
    "notes": (list,), "patch": (dict, N),
}
STAT_KEYS = ("median", "min", "max")
ENV_KEYS = ("gpu_name", "driver", "torch", "transformers", "triton", "python", "date", "hostname", "args")
TOP_SCHEMA: dict[str, tuple] = {
    "schema_version": (int,), "tool": (str,), "env": (dict,), "model": (dict,),
    "device": (str,), "copy_bw_gbs": NUM + (N,), "probe": (dict, N), "results": (list,), "notes": (list,),
}


def validate(doc: dict) -> list[str]:
    """Problems with a results.json document (empty list: valid)."""
    errs = []

    def check(obj, schema, where):
        for k, types in schema.items():
            if k not in obj:
                errs.append(f"{where}: missing {k!r}")
            elif not isinstance(obj[k], types) or (isinstance(obj[k], bool) and bool not in types):
                errs.append(f"{where}.{k}: {type(obj[k]).__name__} not in {[t.__name__ for t in types]}")

    check(doc, TOP_SCHEMA, "doc")
    if errs:
        return errs
    for k in ENV_KEYS:
        if k not in doc["env"]:
            errs.append(f"env: missing {k!r}")
    for i, row in enumerate(doc["results"]):
        where = f"results[{i}]"
        check(row, ROW_SCHEMA, where)
        if row.get("status") not in STATUSES:
            errs.append(f"{where}.status: {row.get('status')!r} not in {STATUSES}")
        if row.get("status") == "ok":
            for k in ("prefill_ms", "decode_ms_per_step", "e2e_ms"):
                st = row.get(k)
                if not isinstance(st, dict) or not all(isinstance(st.get(s), NUM) for s in STAT_KEYS):
                    errs.append(f"{where}.{k}: needs numeric {STAT_KEYS} when status is ok")
            dec = (row.get("decode_ms_per_step") or {}).get("median")
            if not isinstance(row.get("tok_s"), NUM) and not (isinstance(dec, NUM) and dec <= 0):
                errs.append(f"{where}.tok_s: needs a number when status is ok (None only if decode <= 0: noise)")
        elif row.get("status") in ("error", "crashed") and not (row.get("error") or row.get("stderr_tail")):
            errs.append(f"{where}: a failed row needs error or stderr_tail")
    return errs


# ------------------------------------------------------------------------------------ formatting

def _f(x, fmt="{:.2f}", none="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _g(x):
    return _f(x, "{:.2e}")


def _err_cell(row):
    c = row.get("correctness")
    if not c:
        return "-"
    if c.get("error"):
        return "check failed"
    if row["variant"] == "stock":
        return _g(c.get("stock_err"))
    return f"{_g(c.get('variant_err'))} vs {_g(c.get('stock_err'))} (x{_f(c.get('err_ratio'))})"


def _status_cell(row):
    if row["status"] == "ok":
        return "ok"
    if row["status"] == "crashed":
        return f"crashed ({row.get('reason') or row.get('returncode')})"
    last = (row.get("error") or "").strip().splitlines()
    return "error: " + (last[-1][:60] if last else "?")


COLUMNS = ("variant", "batch", "prefill ms", "decode ms/step (min-max)", "tok/s", "x stock", "x hf-static",
           "% BW limit", "peak MiB", "first-call s", "logits err (vs stock bf16)", "agree", "status")


def table_rows(results):
    out = []
    for r in results:
        ok = r["status"] == "ok"
        dec = r.get("decode_ms_per_step") or {}
        out.append([
            r["variant"], str(r["batch"]),
            _f((r.get("prefill_ms") or {}).get("median")) if ok else "-",
            (f"{_f(dec.get('median'), '{:.3f}')} ({_f(dec.get('min'), '{:.3f}')}-{_f(dec.get('max'), '{:.3f}')})"
             if ok else "-"),
            _f(r.get("tok_s"), "{:.1f}"),
            _f(r.get("speedup_vs_stock"), "{:.2f}x"), _f(r.get("speedup_vs_hf_static"), "{:.2f}x"),
            _f(r.get("bw_limit_pct"), "{:.1f}%"), _f(r.get("peak_mem_mib"), "{:.0f}"),
            _f(r.get("first_call_overhead_s"), "{:.2f}"),
            _err_cell(r), _f(r.get("greedy_agreement"), "{:.2f}"), _status_cell(r),
        ])
    return out


def terminal_table(results) -> str:
    rows = [list(COLUMNS)] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if 1 <= i <= 10 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    env, model = doc["env"], doc["model"]
    a = env["args"]
    lines = [
        f"# braid-bench: {model.get('name')} ({a.get('dtype')}, {doc['device']})", "",
        f"- date: {env['date']}, host: {env['hostname']}",
        f"- GPU: {env['gpu_name'] or 'none (CPU)'}, driver {env['driver'] or '-'}; torch {env['torch']}, "
        f"transformers {env['transformers']}, triton {env['triton']}, python {env['python']}",
        f"- device-to-device copy bandwidth (read+write): "
        f"{_f(doc['copy_bw_gbs'], '{:.0f} GB/s', 'not measured (CPU)')}",
        f"- model: {model.get('config_class')} {_f(model.get('n_params'), '{:,}')} params, "
        f"{_f(model.get('weight_bytes'), '{:,}')} weight bytes"
        + (" (tied embeddings counted once)" if model.get("tied_embeddings") else ""),
        f"- prompt {a.get('prompt_len')} random tokens, {a.get('new_tokens')} new tokens (greedy, min=max), "
        f"{a.get('warmup')} warm-ups excluded, median of {a.get('reps')} reps (min-max)",
        "- prefill = generate(1); decode/step = (generate(N) - generate(1)) / (N - 1); "
        "x stock / x hf-static = decode-time speedup; first-call s = first generate(N) minus the median",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 or i == len(COLUMNS) - 1 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for r in table_rows(doc["results"]):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> None:
    """Grouped bars: tok/s per variant per batch size (failed runs marked, not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    batches = sorted({r["batch"] for r in results})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(batches) * max(1, len(variants)) / 2), 4.2))
    width = 0.8 / max(1, len(variants))
    for vi, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for bi, b in enumerate(batches):
            r = next((r for r in results if r["variant"] == v and r["batch"] == b), None)
            x = bi + (vi - (len(variants) - 1) / 2) * width
            if r is None:
                continue
            if r["status"] != "ok" or r.get("tok_s") is None:
                ax.text(x, 0, r["status"], rotation=90, ha="center", va="bottom", fontsize=7, color="red")
                continue
            rng = r.get("tok_s_range") or {}
            xs.append(x)
            ys.append(r["tok_s"])
            lo.append(max(0.0, r["tok_s"] - rng.get("min", r["tok_s"])))
            hi.append(max(0.0, rng.get("max", r["tok_s"]) - r["tok_s"]))
        bars = ax.bar(xs, ys, width, yerr=[lo, hi] if xs else None, capsize=2, label=v)
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.0f}" if y >= 10 else f"{y:.2g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("decode tok/s (median, min-max)")
    env = doc["env"]
    ax.set_title(f"{doc['model'].get('name')} {env['args'].get('dtype')} on {env['gpu_name'] or 'CPU'}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
