"""braid-bench's plot: every variant labelled inside the axes, synthetic one-batch and batch-sweep
figures (line breaks at missing batch sizes, min-max bars); uses the shared tiny run (conftest.py)."""
from __future__ import annotations

import math
import re

from bench_common import PNG_MAGIC, VARIANTS

from braid_backend.bench import report


def test_outputs_table_markdown_plot(tiny_run):
    d, out, err = tiny_run["dir"], tiny_run["stdout"], tiny_run["stderr"]
    assert "rep 3/3" in err and "variant stock: starting" in err          # progress while it runs
    assert "decode ms/step (min-max)" in out and "x hf-static" in out
    assert any(line.startswith("hf-static") and line.rstrip().endswith("ok") for line in out.splitlines())
    assert "crashed (signal SIGABRT)" in out
    md = (d / "results.md").read_text()
    assert "| variant | batch | TTFT ms (min-max) | decode ms/step (min-max) | tok/s |" in md
    main_table = md[:md.index("Time to first token")]
    assert sum(line.startswith("| hf-static |") for line in main_table.splitlines()) == 2
    png = (d / "tokps.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 2000


def _inside(fig, ax, artists):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    r = fig.canvas.get_renderer()
    box = ax.get_window_extent(r)
    for a in artists:
        bb = a.get_window_extent(r)
        assert (bb.x0 >= box.x0 - 1 and bb.x1 <= box.x1 + 1 and bb.y0 >= box.y0 - 1 and bb.y1 <= box.y1 + 1), \
            (a, bb, box)


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_every_variant_labels_inside(tiny_run):
    """Bars + a tok/s-vs-batch line plot (two batch sizes); every variant in both legends, the crashed one
    marked in the bars; every label inside its axes."""
    fig = report.figure(tiny_run["doc"])
    bars, lines = fig.axes
    assert _legend(bars) == VARIANTS
    # a variant's name, then what it lacks: "crash (b=2 crashed)", "stock: no values (below noise)" on a busy
    # CPU; there the crash variant's batch 1 can be below noise too: "crash: no values (below noise, crashed)"
    assert [re.split(r"[ :]", t)[0] for t in _legend(lines)] == VARIANTS
    crash = [t for t in _legend(lines) if t.startswith("crash")]
    assert len(crash) == 1 and ("b=2 crashed" in crash[0] or crash[0].endswith("crashed)")), crash
    assert any(t.get_text() == "crash: crashed" for t in bars.texts)
    assert lines.get_xscale() == "log" and lines.xaxis.get_transform().base == 2
    assert list(lines.get_xticks()) == [1, 2]
    drawn = {c.get_label() for c in lines.containers}
    ok = {r["variant"] for r in tiny_run["doc"]["results"] if r["tok_s"]}
    assert drawn == ok
    _inside(fig, bars, bars.texts + [bars.get_legend()])
    _inside(fig, lines, [lines.get_legend()])


def _row(variant, batch, tok_s=None, status="ok", below=()):
    dec = {"median": batch * 1000 / tok_s, "min": 1.0, "max": 2.0, "n": 3} if tok_s else None
    return {"variant": variant, "batch": batch, "status": status, "tok_s": tok_s, "decode_ms_per_step": dec,
            "tok_s_range": {"min": tok_s * 0.9, "max": tok_s * 1.1} if tok_s else None, "below_noise": list(below)}


def test_plot_synthetic_one_batch():
    """One batch size: bars only. The stock bar is tiny next to braid (log scale keeps it visible), a
    below-noise and a crashed variant are still in the legend, with a note inside the axes."""
    doc = {"model": {"name": "m"}, "env": {"args": {"dtype": "bf16"}, "gpu_name": "GPU"},
           "results": [_row("stock", 1, 30.0), _row("hf-static", 1, below=["decode_ms_per_step"]),
                       _row("braid", 1, 1300.0), _row("braid-eager", 1, status="crashed")]}
    fig = report.figure(doc)
    (ax,) = fig.axes
    assert _legend(ax) == ["stock", "hf-static", "braid", "braid-eager"]
    assert ax.get_yscale() == "log"
    assert len(ax.patches) == 2 and min(p.get_height() for p in ax.patches) == 30.0
    assert {t.get_text() for t in ax.texts} >= {"hf-static: below noise", "braid-eager: crashed", "30", "1300"}
    _inside(fig, ax, ax.texts + [ax.get_legend()])


def test_plot_synthetic_batch_sweep():
    """Four batch sizes: one line per variant over a log2 batch axis; a batch size without a value breaks
    the line there (no segment across it) and the legend says which and why; a variant without any value
    is still in the legend."""
    rows = [_row(v, b, t * b) for b in (1, 2, 4, 8) for v, t in (("stock", 30.0), ("braid", 1300.0))]
    rows[5] = _row("braid", 4, below=["decode_ms_per_step"])
    rows += [_row("braid-eager", b, status="crashed") for b in (1, 2, 4, 8)]
    doc = {"model": {"name": "m"}, "env": {"args": {"dtype": "bf16"}, "gpu_name": "GPU"}, "results": rows}
    fig = report.figure(doc)
    _, lines = fig.axes
    assert lines.get_xscale() == "log" and lines.xaxis.get_transform().base == 2
    assert list(lines.get_xticks()) == [1, 2, 4, 8] and lines.get_xlim()[0] < 1 and lines.get_xlim()[1] > 8
    assert _legend(lines) == ["stock", "braid (b=4 below noise)", "braid-eager: no values (crashed)"]
    data = {c.get_label(): c.lines[0].get_ydata() for c in lines.containers}
    assert set(data) == {"stock", "braid"}
    assert list(data["stock"]) == [30.0, 60.0, 120.0, 240.0]
    assert math.isnan(data["braid"][2]) and data["braid"][3] == 1300.0 * 8
    _inside(fig, lines, [lines.get_legend()])
