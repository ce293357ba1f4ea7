"""braid-bench's plot (matplotlib, no pyplot state): decode tok/s per batch size as grouped bars, and with
several batch sizes a tok/s-vs-batch line plot (one line per variant, log2 x axis)."""
from __future__ import annotations

import math
import os

COLORS = {"stock": "tab:gray", "hf-static": "tab:blue", "braid": "tab:orange", "braid-eager": "tab:green",
          "braid-triton": "tab:red", "braid-cupy": "tab:purple"}
_MORE = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")


def _colors(variants):
    extra = iter(_MORE)
    return {v: COLORS.get(v) or next(extra, "black") for v in variants}


def _why_missing(r) -> str:
    if r["status"] != "ok":
        return r["status"]
    return "below noise" if "decode_ms_per_step" in (r.get("below_noise") or ()) else "no value"


def _has_value(r) -> bool:
    return r is not None and r["status"] == "ok" and bool(r.get("tok_s"))


def _spread(r):
    """(below, above) the median: the error bar from tok_s_range."""
    rng = r.get("tok_s_range") or {}
    return max(0.0, r["tok_s"] - rng.get("min", r["tok_s"])), max(0.0, rng.get("max", r["tok_s"]) - r["tok_s"])


def _line_label(v, batches, get) -> str:
    """The variant's name, plus the batch sizes it has no value at and why (every variant stays in the
    legend, also one without a single point)."""
    missing = {}
    for b in batches:
        r = get.get((v, b))
        if r is not None and not _has_value(r):
            missing.setdefault(_why_missing(r), []).append(b)
    if not missing:
        return v
    if sum(map(len, missing.values())) == sum((v, b) in get for b in batches):
        return f"{v}: no values ({', '.join(missing)})"
    return f"{v} (" + "; ".join(f"b={','.join(map(str, bs))} {why}" for why, bs in missing.items()) + ")"


def _bars(ax, results, variants, batches, color, get, log, vals, tops):
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    width = 0.8 / max(1, len(variants))
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for vi, v in enumerate(variants):
        xs, ys, lo, hi = [], [], [], []
        for bi, b in enumerate(batches):
            r = get.get((v, b))
            if r is None:
                continue
            x = bi + (vi - (len(variants) - 1) / 2) * width
            if not _has_value(r):
                ax.text(x, 0.03, f"{v}: {_why_missing(r)}", transform=trans, rotation=90, ha="center",
                        va="bottom", fontsize=7, color="red", clip_on=True)
                continue
            xs.append(x)
            ys.append(r["tok_s"])
            below, above = _spread(r)
            lo.append(below)
            hi.append(above)
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=color[v], label=v)
            for x, y, h in zip(xs, ys, hi):   # above the error bar, not on it
                ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.2g}", (x, y + h), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
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
    ax.legend(handles=[Patch(color=color[v], label=v) for v in variants], fontsize=8, loc="upper left")


def _lines(lx, variants, batches, color, get, log, tops):
    """One line per variant over the batch sizes (log2 x axis), min-max error bars; a batch size without a
    value breaks the line there (no straight segment across it) and is named in the legend."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    handles = []
    for v in variants:
        ys, lo, hi = [], [], []
        for b in batches:
            r = get.get((v, b))
            ok = _has_value(r)
            ys.append(r["tok_s"] if ok else math.nan)
            below, above = _spread(r) if ok else (0.0, 0.0)
            lo.append(below)
            hi.append(above)
        if any(not math.isnan(y) for y in ys):
            lx.errorbar(batches, ys, yerr=[lo, hi], marker="o", color=color[v], capsize=2, label=v)
        handles.append(Line2D([], [], color=color[v], marker="o", label=_line_label(v, batches, get)))
    lx.set_xscale("log", base=2)
    lx.set_xticks(batches)
    lx.set_xticklabels([str(b) for b in batches])
    lx.xaxis.set_minor_locator(NullLocator())
    lx.set_xlim(batches[0] / 1.3, batches[-1] * 1.3)
    lx.set_xlabel("batch size (log2 scale)")
    lx.set_ylabel("decode tok/s (median, min-max)" + (", log scale" if log else ""))
    if log:
        lx.set_yscale("log")
    elif tops:
        lx.set_ylim(0, max(tops) * 1.15)
    lx.grid(True, alpha=0.3)
    lx.legend(handles=handles, fontsize=8, loc="best")
    lx.set_title("tok/s vs batch size", fontsize=10)


def figure(doc: dict):
    """The tok/s figure (a matplotlib Figure): grouped bars per batch size with every variant in the legend
    and a note where a variant has no number (crashed, below noise); with several batch sizes also the
    tok/s-vs-batch line plot (every variant in its legend, with the batch sizes it lacks). All labels stay
    inside the axes."""
    from matplotlib.figure import Figure

    results = doc["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    batches = sorted({r["batch"] for r in results})
    color = _colors(variants)
    get = {(r["variant"], r["batch"]): r for r in results}
    vals = [r["tok_s"] for r in results if _has_value(r)]
    log = bool(vals) and max(vals) / min(vals) > 30   # stock next to braid: keep the small bars visible
    tops = [r["tok_s"] + _spread(r)[1] for r in results if _has_value(r)]
    several = len(batches) > 1
    bars_w = max(6.0, 0.75 * len(batches) * max(1, len(variants)))
    fig = Figure(figsize=(bars_w + (6.5 if several else 0), 4.6))
    axes = fig.subplots(1, 2 if several else 1, squeeze=False,
                        gridspec_kw={"width_ratios": [bars_w, 6.5] if several else [1]})[0]
    _bars(axes[0], results, variants, batches, color, get, log, vals, tops)
    if several:
        _lines(axes[1], variants, batches, color, get, log, tops)
    env, name = doc["env"], str(doc["model"].get("name"))
    if doc["model"].get("source") == "path":
        name = os.path.basename(os.path.normpath(name))
    axes[0].set_title(f"{name} {env['args'].get('dtype')} on {env['gpu_name'] or 'CPU'}", fontsize=10)
    fig.tight_layout()
    return fig


def plot(doc: dict, path: str) -> None:
    figure(doc).savefig(path, dpi=120)
