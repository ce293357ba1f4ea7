"""Merge braid-bench results.json files into one document and plot it (tok/s vs batch, every variant).

    python benchmarks/merge_results.py OUT_DIR BASE.json [EXTRA.json[:variant[=new_name]] ...]

BASE's metadata (env, model, copy bandwidth) is kept; each EXTRA adds its rows (all, or one variant's,
optionally renamed), replacing BASE's rows of the same (variant, batch). For sweeps whose variants were
measured in separate calls (e.g. HF static + compile one batch per call): say so next to the plot, the
rows come from different runs (and maybe cards)."""
import json
import os
import sys

from braid_backend.bench.plot import plot


def merge(base: dict, extras: list[tuple[dict, str | None, str | None]]) -> dict:
    doc = json.loads(json.dumps(base))
    rows = {(r["variant"], r["batch"]): r for r in doc["results"]}
    for extra, variant, rename in extras:
        for r in extra["results"]:
            if variant is not None and r["variant"] != variant:
                continue
            r = dict(r, variant=rename or r["variant"])
            rows[(r["variant"], r["batch"])] = r
    doc["results"] = sorted(rows.values(), key=lambda r: (r["variant"], r["batch"]))
    doc.setdefault("notes", []).append("merged by benchmarks/merge_results.py from: " + ", ".join(sys.argv[2:]))
    return doc


def main(argv):
    out, base, *rest = argv
    extras = []
    for spec in rest:
        path, _, sel = spec.partition(":")
        variant, _, rename = sel.partition("=")
        extras.append((json.load(open(path)), variant or None, rename or None))
    doc = merge(json.load(open(base)), extras)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, os.path.join(out, "tokps.png"))
    print(f"wrote {out}/results.json, {out}/tokps.png ({len(doc['results'])} rows)")


if __name__ == "__main__":
    main(sys.argv[1:])
