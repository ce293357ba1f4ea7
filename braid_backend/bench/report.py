"""braid-bench output: the results.json JSON Schema (checked with jsonschema), the console tables (rich),
results.md, and the plot (matplotlib)."""
from __future__ import annotations

import io
import math
import os

# 2: decode_ms_per_step / tok_s / first_call_overhead_s may be null on an ok row, with the field named in
# below_noise (the difference was not above the timer noise); new keys below_noise, noise_ms, prompt_len,
# sample; top-level prompts and samples. Everything schema 1 had is still there with the same meaning.
SCHEMA_VERSION = 2
STATUSES = ("ok", "error", "crashed")

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_POS_OR_NULL = {"type": ["number", "null"], "exclusiveMinimum": 0}
_STATS = {   # {"median", "min", "max", "n", ...} over the timed reps, milliseconds; never negative
    "type": "object", "required": ["median", "min", "max", "n"],
    "properties": {"median": {"type": "number", "minimum": 0}, "min": {"type": "number", "minimum": 0},
                   "max": {"type": "number", "minimum": 0}, "n": {"type": "integer", "minimum": 1},
                   "mean": _NUM, "stdev": _NUM_OR_NULL},
}
_STATS_OR_NULL = {"anyOf": [_STATS, {"type": "null"}]}
_POSITIVE_STATS = {"allOf": [_STATS, {"properties": {"min": {"exclusiveMinimum": 0}}}]}

# Every result row (one per variant x batch size) carries all of these keys; null where not measured.
ROW_PROPERTIES: dict[str, dict] = {
    "variant": {"type": "string"}, "batch": {"type": "integer", "minimum": 1},
    "status": {"enum": list(STATUSES)},
    "error": {"type": ["string", "null"]}, "returncode": {"type": ["integer", "null"]},
    "stderr_tail": {"type": ["string", "null"]},
    "prompt_len": {"type": ["integer", "null"]},   # prompt tokens per sequence (text prompts: padded length)
    "prefill_ms": _STATS_OR_NULL,            # generate(max_new_tokens=1)
    "decode_ms_per_step": _STATS_OR_NULL,    # (generate(N) - generate(1)) / (N - 1), paired per rep
    "e2e_ms": _STATS_OR_NULL,                # generate(N)
    "tok_s": _POS_OR_NULL,                   # batch * 1000 / median decode ms
    "tok_s_range": {"type": ["object", "null"]},   # {"min", "max"} from the decode max / min
    "first_call_s": _POS_OR_NULL,
    "first_call_overhead_s": _POS_OR_NULL,   # first generate(N) minus the median one
    "below_noise": {"type": "array", "items": {"type": "string"}},   # fields left null: not above noise
    "noise_ms": _NUM_OR_NULL,                # spread of the repeated calls (the noise those fields missed)
    "peak_mem_mib": _NUM_OR_NULL,            # torch.cuda.max_memory_allocated; null on CPU
    "bytes_per_step": {"type": ["integer", "null"]},   # weights (tied once) + KV at the mean context
    "bw_limit_pct": _POS_OR_NULL,            # (bytes_per_step / copy bandwidth) / decode time * 100
    "speedup_vs_stock": _POS_OR_NULL, "speedup_vs_hf_static": _POS_OR_NULL,   # decode-time ratios
    # {"batch", "prompt_len", "steps", "stock_err", "variant_err", "err_ratio"} or {"error"}
    "correctness": {"type": ["object", "null"]},
    "greedy_agreement": {"type": ["number", "null"], "minimum": 0, "maximum": 1},   # null for stock
    "sample": {"type": ["object", "null"]},  # {"prompt", "output"}: first sequence, text prompts only
    "notes": {"type": "array", "items": {"type": "string"}}, "patch": {"type": ["object", "null"]},
}
ROW_KEYS = tuple(ROW_PROPERTIES)
ENV_KEYS = ("gpu_name", "driver", "torch", "transformers", "triton", "python", "date", "hostname", "args")

ROW_SCHEMA = {
    "type": "object", "required": list(ROW_KEYS), "properties": ROW_PROPERTIES,
    "allOf": [
        {   # ok: the timings are there; a decode left null must say it was below noise
            "if": {"properties": {"status": {"const": "ok"}}, "required": ["status"]},
            "then": {
                "properties": {"prefill_ms": _STATS, "e2e_ms": _STATS},
                "if": {"properties": {"decode_ms_per_step": {"type": "null"}}},
                "then": {"properties": {"below_noise": {"contains": {"const": "decode_ms_per_step"}}}},
                "else": {"properties": {"decode_ms_per_step": _POSITIVE_STATS, "tok_s": _NUM}},
            },
        },
        {   # a failed row says why
            "if": {"properties": {"status": {"enum": ["error", "crashed"]}}, "required": ["status"]},
            "then": {"anyOf": [{"properties": {"error": {"type": "string", "minLength": 1}}},
                               {"properties": {"stderr_tail": {"type": "string", "minLength": 1}}}]},
        },
    ],
}
RESULTS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "braid-bench results.json",
    "type": "object",
    "required": ["schema_version", "tool", "env", "model", "device", "copy_bw_gbs", "probe", "results", "notes"],
    "properties": {
        "schema_version": {"type": "integer"}, "tool": {"const": "braid-bench"},
        "env": {"type": "object", "required": list(ENV_KEYS)},
        "model": {"type": "object"}, "device": {"type": "string"},
        "copy_bw_gbs": _POS_OR_NULL, "probe": {"type": ["object", "null"]},
        "results": {"type": "array", "items": ROW_SCHEMA},
        "notes": {"type": "array", "items": {"type": "string"}},
        "prompts": {"type": ["object", "null"]},    # {"source": "random" | "text", "chat_template", "tokens", "texts"}
        "samples": {"type": ["object", "null"]},    # {"batch", "prompt", "outputs": {variant: text}}
    },
}


def validate(doc: dict) -> list[str]:
    """Problems with a results.json document against RESULTS_SCHEMA (empty list: valid). Needs jsonschema."""
    import jsonschema

    v = jsonschema.Draft202012Validator(RESULTS_SCHEMA)
    out = []
    for e in sorted(v.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "doc" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        out.append(f"{where}: {e.message}")
    return out


# ------------------------------------------------------------------------------------ formatting

def _f(x, fmt="{:.2f}", none="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _g(x):
    return _f(x, "{:.2e}")


def _x(x):   # a speedup: 2 decimals, or 2 significant digits when that would print 0.00x
    return _f(x, "{:.2f}x" if x is None or x >= 0.01 else "{:.2g}x")


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


def _noise(row, key, cell):
    return "below noise" if key in (row.get("below_noise") or ()) else cell


COLUMNS = ("variant", "batch", "prefill ms", "decode ms/step (min-max)", "tok/s", "x stock", "x hf-static",
           "% BW limit", "peak MiB", "first-call s", "logits err (vs stock bf16)", "agree", "status")
RIGHT = set(range(1, 12))   # numeric columns


def table_rows(results):
    out = []
    for r in results:
        ok = r["status"] == "ok"
        dec = r.get("decode_ms_per_step") or {}
        dec_cell = (f"{_f(dec.get('median'), '{:.3f}')} ({_f(dec.get('min'), '{:.3f}')}-{_f(dec.get('max'), '{:.3f}')})"
                    if ok and dec else "-")
        out.append([
            r["variant"], str(r["batch"]),
            _f((r.get("prefill_ms") or {}).get("median")) if ok else "-",
            _noise(r, "decode_ms_per_step", dec_cell),
            _noise(r, "decode_ms_per_step", _f(r.get("tok_s"), "{:.1f}")),
            _x(r.get("speedup_vs_stock")), _x(r.get("speedup_vs_hf_static")),
            _f(r.get("bw_limit_pct"), "{:.1f}%"), _f(r.get("peak_mem_mib"), "{:.0f}"),
            _noise(r, "first_call_overhead_s", _f(r.get("first_call_overhead_s"), "{:.2f}")),
            _err_cell(r), _f(r.get("greedy_agreement"), "{:.2f}"), _status_cell(r),
        ])
    return out


def _render(table, width: int) -> str:
    from rich.console import Console

    con = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False,
                  soft_wrap=False)
    con.print(table)
    return "\n".join(line.rstrip() for line in con.file.getvalue().rstrip("\n").splitlines())


def terminal_table(results, width: int = 1000, ascii_only: bool = False) -> str:
    """The results as a console table (rich; a plain fallback without it). At the default width nothing
    wraps; a terminal's width makes rich wrap cells inside their columns."""
    rows = table_rows(results)
    try:
        from rich import box
        from rich.table import Table
    except ImportError:   # rich comes with transformers (via typer); keep the numbers visible without it
        return "\n".join("  ".join(r) for r in [list(COLUMNS)] + rows)
    t = Table(box=box.ASCII2 if ascii_only else box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, c in enumerate(COLUMNS):
        t.add_column(c, justify="right" if i in RIGHT else "left", overflow="fold")
    for r in rows:
        t.add_row(*r)
    return _render(t, width)


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
         + (" (tied embeddings counted once)" if model.get("tied_embeddings") else "")),
        prompt_line,
        (f"- {a.get('warmup')} warm-ups excluded, median of {a.get('reps')} reps (min-max); "
         f"timer: {env.get('timer') or '-'}"),
        ("- prefill = generate(1); decode/step = (generate(N) - generate(1)) / (N - 1); "
         "x stock / x hf-static = decode-time speedup; first-call s = first generate(N) minus the median; "
         "below noise = the difference was not above the noise (the spread of the repeats)"),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if i in RIGHT else "---" for i in range(len(COLUMNS))) + "|",
    ]
    for r in table_rows(doc["results"]):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    s = doc.get("samples")
    if s and s.get("outputs"):
        lines += ["", f"Text sample (batch {s['batch']}, first prompt: {s['prompt']!r}):", "",
                  "| " + " | ".join(s["outputs"]) + " |", "|" + "|".join("---" for _ in s["outputs"]) + "|",
                  "| " + " | ".join(" ".join(o.split()).replace("|", "/") for o in s["outputs"].values()) + " |"]
    if doc["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plot

COLORS = {"stock": "tab:gray", "hf-static": "tab:blue", "braid": "tab:orange", "braid-eager": "tab:green"}
_MORE = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")


def _colors(variants):
    extra = iter(_MORE)
    return {v: COLORS.get(v) or next(extra, "black") for v in variants}


def _why_missing(r) -> str:
    if r["status"] != "ok":
        return r["status"]
    return "below noise" if "decode_ms_per_step" in (r.get("below_noise") or ()) else "no value"


def figure(doc: dict):
    """The tok/s figure (a matplotlib Figure, no pyplot state): grouped bars per batch size with every
    variant in the legend and a note where a variant has no number (crashed, below noise); with several
    batch sizes also a tok/s-vs-batch line plot. All labels stay inside the axes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    results = doc["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    batches = sorted({r["batch"] for r in results})
    color = _colors(variants)
    get = {(r["variant"], r["batch"]): r for r in results}
    vals = [r["tok_s"] for r in results if r["status"] == "ok" and r.get("tok_s")]
    log = bool(vals) and max(vals) / min(vals) > 30   # stock next to braid: keep the small bars visible
    several = len(batches) > 1
    fig = Figure(figsize=(max(6.0, 1.5 * len(batches) * max(1, len(variants)) / 2) + (5.0 if several else 0), 4.6))
    axes = fig.subplots(1, 2 if several else 1, squeeze=False)[0]
    ax = axes[0]
    width = 0.8 / max(1, len(variants))
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for vi, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for bi, b in enumerate(batches):
            r = get.get((v, b))
            if r is None:
                continue
            x = bi + (vi - (len(variants) - 1) / 2) * width
            if r["status"] != "ok" or not r.get("tok_s"):
                ax.text(x, 0.03, f"{v}: {_why_missing(r)}", transform=trans, rotation=90, ha="center",
                        va="bottom", fontsize=7, color="red", clip_on=True)
                continue
            rng = r.get("tok_s_range") or {}
            xs.append(x)
            ys.append(r["tok_s"])
            lo.append(max(0.0, r["tok_s"] - rng.get("min", r["tok_s"])))
            hi.append(max(0.0, rng.get("max", r["tok_s"]) - r["tok_s"]))
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=color[v], label=v)
            for x, y, h in zip(xs, ys, hi):   # above the error bar, not on it
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.2g}", (x, y + h), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
    tops = [r["tok_s_range"]["max"] if r.get("tok_s_range") else r["tok_s"]
            for r in results if r["status"] == "ok" and r.get("tok_s")]
    if log:
        ax.set_yscale("log")
        ax.set_ylim(min(vals) / 3, max(tops) * 8)
    elif tops:
        ax.set_ylim(0, max(tops) * 1.3)
    else:
        ax.set_ylim(0, 1)
        ax.set_yticks([])
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_xlim(-0.5, len(batches) - 0.5)
    ax.set_ylabel("decode tok/s (median, min-max)" + (", log scale" if log else ""))
    handles = [Patch(color=color[v], label=v) for v in variants]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    if several:
        lx = axes[1]
        for v in variants:
            pts = [(b, get[(v, b)]["tok_s"]) for b in batches
                   if (v, b) in get and get[(v, b)]["status"] == "ok" and get[(v, b)].get("tok_s")]
            if pts:
                lx.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color[v], label=v)
        lx.set_xscale("log", base=2)
        lx.set_xticks(batches)
        lx.set_xticklabels([str(b) for b in batches])
        lx.set_xlabel("batch size")
        lx.set_ylabel("decode tok/s (median)")
        if log:
            lx.set_yscale("log")
        elif tops:
            lx.set_ylim(0, max(tops) * 1.15)
        lx.grid(True, alpha=0.3)
        lx.legend(handles=[Patch(color=color[v], label=v) for v in variants], fontsize=8, loc="best")
        lx.set_title("tok/s vs batch size", fontsize=10)
    env, name = doc["env"], str(doc["model"].get("name"))
    if doc["model"].get("source") == "path":
        name = os.path.basename(os.path.normpath(name))
    ax.set_title(f"{name} {env['args'].get('dtype')} on {env['gpu_name'] or 'CPU'}", fontsize=10)
    fig.tight_layout()
    return fig


def plot(doc: dict, path: str) -> None:
    figure(doc).savefig(path, dpi=120)
