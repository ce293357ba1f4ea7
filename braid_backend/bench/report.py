"""braid-bench output: the console tables (rich) and results.md. The results.json schema lives in
schema.py and the plot in plot.py; both are re-exported here (report.validate, report.figure, ...)."""
from __future__ import annotations

import io
import math
from typing import NamedTuple

from .plot import figure, plot  # noqa: F401  (re-exported)
from .schema import ENV_KEYS, RESULTS_SCHEMA, ROW_KEYS, SCHEMA_VERSION, STATUSES, validate  # noqa: F401

# ------------------------------------------------------------------------------------ formatting

def _f(x, fmt="{:.2f}", none="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _g(x):
    return _f(x, "{:.2e}")


def _x(x):   # a speedup: 2 decimals, or 2 significant digits when that would print 0.00x
    return _f(x, "{:.2f}x" if x is None or x >= 0.01 else "{:.2g}x")


def err_header(dtype) -> str:
    """The logits column's title: what the run's error is measured against."""
    if dtype == "fp32":   # stock fp32 is the fp32 reference itself: its error is 0, a ratio to it means nothing
        return "logits err vs fp32 ref (= stock: no ratio)"
    return f"logits err (vs stock {dtype or '?'})"


def _err_cell(row):
    c = row.get("correctness")
    if not c:
        return "-"
    if c.get("error"):
        return "check failed"
    if row["variant"] == "stock":
        return _g(c.get("stock_err"))
    if not c.get("stock_err"):   # 0: the stock model is the reference (an fp32 run)
        return _g(c.get("variant_err"))
    return f"{_g(c.get('variant_err'))} vs {_g(c.get('stock_err'))} (x{_f(c.get('err_ratio'))})"


def _agree_cell(row):
    a = _f(row.get("greedy_agreement"), "{:.2f}")
    return f"{a} (vacuous: stock repeats one token)" if row.get("agreement_vacuous") else a


def _variant_cell(row):
    """The variant; for braid (backend "auto") the decode-layer backend it ran for this batch size."""
    lb = row.get("layer_backend")
    return f"{row['variant']} ({lb})" if row["variant"] == "braid" and lb else row["variant"]


def _status_cell(row):
    if row["status"] == "ok":
        pd = (row.get("patch") or {}).get("dict") or {}
        if pd.get("ok") is False:   # patch() refused: this row timed the stock model
            return "ok, LEFT STOCK: " + str(pd.get("reason") or "?")[:60]
        return "ok"
    if row["status"] == "crashed":
        return f"crashed ({row.get('reason') or row.get('returncode')})"
    last = (row.get("error") or "").strip().splitlines()
    return "error: " + (last[-1][:60] if last else "?")


def _noise(row, key, cell):
    return "below noise" if key in (row.get("below_noise") or ()) else cell


def columns(dtype) -> tuple:
    return ("variant", "batch", "TTFT ms (min-max)", "decode ms/step (min-max)", "tok/s", "x stock", "x hf-static",
            "% BW limit", "peak MiB", "first-call s", err_header(dtype), "agree", "status")


RIGHT = set(range(1, 12))   # numeric columns


class Tab(NamedTuple):
    """A table for the console (rich) and results.md: column names, rows of cells, right-aligned columns."""
    columns: tuple
    rows: list
    right: set


def _stats(st, fmt="{:.2f}") -> str:
    """median (min-max) of a timing summary, '-' without one."""
    if not st:
        return "-"
    return f"{_f(st.get('median'), fmt)} ({_f(st.get('min'), fmt)}-{_f(st.get('max'), fmt)})"


def table_rows(results):
    out = []
    for r in results:
        ok = r["status"] == "ok"
        ttft = r.get("ttft_ms") or r.get("prefill_ms")   # results.json of schema 2 has prefill_ms only
        out.append([
            _variant_cell(r), str(r["batch"]),
            _stats(ttft) if ok else "-",
            _noise(r, "decode_ms_per_step", _stats(r.get("decode_ms_per_step"), "{:.3f}") if ok else "-"),
            _noise(r, "decode_ms_per_step", _f(r.get("tok_s"), "{:.1f}")),
            _x(r.get("speedup_vs_stock")), _x(r.get("speedup_vs_hf_static")),
            _f(r.get("bw_limit_pct"), "{:.1f}%"), _f(r.get("peak_mem_mib"), "{:.0f}"),
            _noise(r, "first_call_overhead_s", _f(r.get("first_call_overhead_s"), "{:.2f}")),
            _err_cell(r), _agree_cell(r), _status_cell(r),
        ])
    return out


def _render(table, width: int) -> str:
    from rich.console import Console

    con = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False,
                  soft_wrap=False)
    con.print(table)
    return "\n".join(line.rstrip() for line in con.file.getvalue().rstrip("\n").splitlines())


def render_table(tab: Tab, width: int = 1000, ascii_only: bool = False) -> str:
    """A console table (rich; a plain fallback without it). At the default width nothing wraps; a
    terminal's width makes rich wrap cells inside their columns."""
    try:
        from rich import box
        from rich.table import Table
    except ImportError:   # rich comes with transformers (via typer); keep the numbers visible without it
        return "\n".join("  ".join(r) for r in [list(tab.columns)] + tab.rows)
    t = Table(box=box.ASCII2 if ascii_only else box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, c in enumerate(tab.columns):
        t.add_column(c, justify="right" if i in tab.right else "left", overflow="fold")
    for r in tab.rows:
        t.add_row(*r)
    return _render(t, width)


def md_table(tab: Tab) -> list[str]:
    return (["| " + " | ".join(tab.columns) + " |",
             "|" + "|".join("---:" if i in tab.right else "---" for i in range(len(tab.columns))) + "|"]
            + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in tab.rows])


def terminal_table(results, width: int = 1000, ascii_only: bool = False, dtype: str | None = None) -> str:
    """The batch-sweep results as a console table (dtype: the run's, for the logits column's title)."""
    return render_table(Tab(columns(dtype), table_rows(results), RIGHT), width, ascii_only)


def _item_status(it) -> str:
    if it["status"] == "ok":
        return "ok"
    last = (it.get("error") or "").strip().splitlines()
    return f"{it['status']}: " + (last[-1][:60] if last else "?")


def _ttft_tab(items) -> Tab:
    """TTFT at the --ttft-prompts lengths, grouped by length, with the ratio to stock's."""
    stock = {i["requested_prompt_len"]: i["ttft_ms"]["median"] for i in items
             if i["variant"] == "stock" and i["status"] == "ok"}
    rows = []
    for it in sorted(items, key=lambda i: i["requested_prompt_len"]):   # stable: variant order kept
        req, got, ok = it["requested_prompt_len"], it.get("prompt_len"), it["status"] == "ok"
        med = it["ttft_ms"]["median"] if ok else None
        rows.append([str(got if got == req or got is None else f"{got} (asked {req})"), it["variant"],
                     _stats(it.get("ttft_ms")),
                     _x(stock[req] / med) if med and req in stock else "-",
                     _f(it.get("first_call_ms")), _item_status(it)])
    return Tab(("prompt", "variant", "TTFT ms (min-max)", "x stock", "first call ms", "status"), rows, {0, 2, 3, 4})


def _chat_tab(items) -> Tab:
    rows = []
    for it in items:
        req = it["requested"]
        size = f"{it.get('prompt_len') or '-'} + {it.get('new_tokens') or '-'}"
        if (it.get("prompt_len"), it.get("new_tokens")) not in ((req["prompt_len"], req["new_tokens"]), (None, None)):
            size += f" (asked {req['prompt_len']} + {req['new_tokens']})"
        rows.append([it["variant"], size, _stats(it.get("e2e_ms"), "{:.1f}"), _f(it.get("e2e_tok_s"), "{:.1f}"),
                     _x(it.get("speedup_vs_stock")), _f(it.get("first_call_ms"), "{:.1f}"), _item_status(it)])
    return Tab(("variant", "prompt + new tokens", "end-to-end ms (min-max)", "tok/s incl. prefill", "x stock",
                "first call ms", "status"), rows, {2, 3, 4, 5})


def _cold_tab(cold) -> Tab:
    rows = []
    for it in cold["results"]:
        c, w = it.get("cold_first_call_s"), it.get("warm_first_call_s")
        files = ", ".join(f"{k.split('_')[0].lower()} {v['entries_after']}"
                          for k, v in (it.get("caches") or {}).items())
        rows.append([it["variant"], str(it["batch"]), _f(w), _f(c), _f(c - w if c and w else None, "{:+.2f}"),
                     files or "-", _item_status(it)])
    return Tab(("variant", "batch", "first call s, warm caches", "first call s, empty caches", "cold - warm s",
                "files written to the empty caches", "status"), rows, {1, 2, 3, 4})


def latency_tables(doc: dict) -> list[tuple[str, Tab]]:
    """(title, table) of the batch-1 latency sections that ran: --ttft-prompts, --chat, --cold."""
    out = []
    if doc.get("ttft"):
        out.append(("Time to first token, batch 1 (generate(max_new_tokens=1), random prompt, warm; median of "
                    "reps):", _ttft_tab(doc["ttft"])))
    if doc.get("chat"):
        out.append(("Chat-like call, batch 1 (one generate() call end to end, greedy min=max new tokens, warm; "
                    "median of reps):", _chat_tab(doc["chat"])))
    if doc.get("cold"):
        out.append(("Cold start (first generate() call of a fresh process; empty caches: "
                    f"{', '.join(doc['cold']['emptied'])}):", _cold_tab(doc["cold"])))
    return out


def side_by_side(samples: dict, width: int = 120, max_chars: int = 400, ascii_only: bool = False) -> str:
    """The text sample: the prompt, then each variant's output in its own column (truncated)."""
    outs = samples["outputs"]

    def cut(s):
        s = " ".join(s.split())
        return s if len(s) <= max_chars else s[:max_chars - 3] + "..."

    head = f"text sample (batch {samples['batch']}, first prompt): {samples['prompt']!r}"
    try:
        from rich import box
        from rich.table import Table
    except ImportError:
        return "\n".join([head] + [f"{v}: {cut(o)}" for v, o in outs.items()])
    t = Table(box=box.ASCII if ascii_only else box.SQUARE)
    for v in outs:
        t.add_column(v, overflow="fold", ratio=1)
    t.add_row(*(cut(o) or "(empty)" for o in outs.values()))
    return head + "\n" + _render(t, width)


def markdown(doc: dict) -> str:
    env, model = doc["env"], doc["model"]
    a = env["args"]
    pr = doc.get("prompts") or {}
    if pr.get("source") == "text":
        toks = ", ".join(f"batch {b}: {t}" for b, t in (pr.get("tokens") or {}).items())
        how = " through the chat template" if pr.get("chat_template") else ""
        prompt_line = (f"- prompts: the built-in text prompts{how}, left-padded ({toks} tokens); "
                       f"{a.get('new_tokens')} new tokens (greedy, min=max)")
    else:
        prompt_line = (f"- prompt {a.get('prompt_len')} random tokens, {a.get('new_tokens')} new tokens "
                       "(greedy, min=max)")
    lines = [
        f"# braid-bench: {model.get('name')} ({a.get('dtype')}, {doc['device']})", "",
        f"- date: {env['date']}, host: {env['hostname']}",
        (f"- GPU: {env['gpu_name'] or 'none (CPU)'}, driver {env['driver'] or '-'}; torch {env['torch']}, "
         f"transformers {env['transformers']}, triton {env['triton']}, python {env['python']}"),
        ("- device-to-device copy bandwidth (read+write): "
         f"{_f(doc['copy_bw_gbs'], '{:.0f} GB/s', 'not measured (CPU)')}"),
        (f"- model: {model.get('config_class')} {_f(model.get('n_params'), '{:,}')} params, "
         f"{_f(model.get('weight_bytes'), '{:,}')} weight bytes"
         + (" (tied embeddings counted once)" if model.get("tied_embeddings") else "")
         + (f", {model['decode_weight_bytes']:,} read per decode step (the input embedding table is not; the "
            "% BW limit counts these)" if model.get("decode_weight_bytes", model.get("weight_bytes"))
            != model.get("weight_bytes") else "")
         + (f"; mixture of experts: top-{model['moe']['top_k']} of {model['moe']['experts']} experts, the % BW "
            "limit counts the expected union of the selected experts at each batch (uniform routing)"
            if model.get("moe") else "")),
        prompt_line,
        (f"- {a.get('warmup')} warm-ups excluded, median of {a.get('reps')} reps (min-max); "
         f"timer: {env.get('timer') or '-'}"),
        ("- TTFT (time to first token) = generate(max_new_tokens=1): prefill + the first token; decode/step = "
         "(generate(N) - generate(1)) / (N - 1); x stock / x hf-static = decode-time speedup; first-call s = "
         "first generate(N) minus the median; below noise = the difference was not above the noise (the "
         "spread of the repeats)"),
        "",
    ] + md_table(Tab(columns(a.get("dtype")), table_rows(doc["results"]), RIGHT))
    for title, tab in latency_tables(doc):
        lines += ["", title, ""] + md_table(tab)
    s = doc.get("samples")
    if s and s.get("outputs"):
        lines += ["", f"Text sample (batch {s['batch']}, first prompt: {s['prompt']!r}):", "",
                  "| " + " | ".join(s["outputs"]) + " |", "|" + "|".join("---" for _ in s["outputs"]) + "|",
                  "| " + " | ".join(" ".join(o.split()).replace("|", "/") for o in s["outputs"].values()) + " |"]
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def check_notes(rows, dtype) -> list[str]:
    """What the logits and agreement columns cannot tell in this run, said once."""
    out = []
    if dtype == "fp32" and any(r.get("correctness") for r in rows):
        out.append("fp32 run: the stock fp32 model is the fp32 reference itself (its error is 0), so the logits "
                   "column shows each variant's own relative error against it, with no ratio to stock (the "
                   "2x-of-stock rule needs a bf16/fp16 run)")
    if any(r.get("quant") and r.get("correctness") for r in rows):
        out.append("stock-Q / braid-Q rows: logits error against the fp32 model with the dequantised weights, next to "
                   "(x ratio to) the same weights rounded to the run's dtype; greedy agreement with that model's tokens")
    vacuous = sorted({f"{r['variant']} b={r['batch']}" for r in rows if r.get("agreement_vacuous")})
    if vacuous:
        out.append(f"greedy agreement is vacuous for {', '.join(vacuous)}: stock repeats one token in every "
                   f"sequence (random weights), so any variant that does the same agrees; the tiny-peaked preset "
                   "or a real checkpoint gives tokens that vary")
    return out
