"""The parent's side of turning worker records into results.json: the result rows (one per variant x batch
size, a failed one saying why), the speedups, the text samples, the batch-1 latency items (--ttft-prompts,
--chat) and the cold-start runs (--cold: a fresh worker whose compile caches point at empty temp dirs)."""
from __future__ import annotations

import os
import tempfile

from .child import _failure_reason, run_child
from .quant import split_variant
from .schema import CHAT_PROPERTIES, ROW_KEYS, TTFT_PROPERTIES, decode_weight_bytes

# Variants with compiled kernels whose first call --cold repeats with empty caches (stock compiles nothing).
COLD_VARIANTS = ("hf-static", "braid", "braid-eager", "braid-triton", "braid-cupy")
# The compile caches a cold run points at fresh empty dirs: Triton's kernel cache (braid's kernels and
# inductor's generated ones) and inductor's FX-graph / autotune / AOT caches (hf-static's torch.compile).
CACHE_VARS = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")


def _blank_row(variant, batch):
    row = {k: None for k in ROW_KEYS}
    row.update(variant=variant, batch=batch, status="ok", notes=[], below_noise=[])
    return row


def collect_rows(variant: str, s: dict, res: dict, facts_box: dict) -> list[dict]:
    meta = next((r for r in res["records"] if r.get("type") == "meta"), None)
    got = {r["batch"]: r for r in res["records"] if r.get("type") == "row"}
    if meta and not facts_box.get("facts") and split_variant(variant)[1] is None:   # the dense model's facts
        facts_box["facts"] = meta["model"]
    failed = res["timed_out"] or res["returncode"] != 0
    reason = _failure_reason(res, s["timeout"]) if failed else None
    rows = []
    for b in s["batch_sizes"]:
        row = _blank_row(variant, b)
        if b in got:
            rec = dict(got[b])
            rec.pop("type", None)
            row.update(rec)
        else:
            row.update(status="crashed" if failed else "error", returncode=res["returncode"],
                       timed_out=res["timed_out"], reason=reason or "no result",
                       stderr_tail=res["tail"][-4000:] or None,
                       error=None if failed else "worker exited 0 without a result for this batch")
            if facts_box.get("facts"):
                f = facts_box["facts"]
                plen = (((meta or {}).get("prompts") or {}).get("tokens") or {}).get(str(b)) or s["prompt_len"]
                row["prompt_len"] = plen
                row["bytes_per_step"] = int(decode_weight_bytes(f, b) + f["kv_bytes_per_token"] * b
                                            * (plen + s["new_tokens"] / 2))
        if meta:
            row["notes"] = list(meta.get("notes") or []) + list(row.get("notes") or [])
            row["patch"] = meta.get("patch")
        rows.append(row)
    return rows


def add_ratios(rows: list[dict], copy_bw_gbs) -> None:
    def dec(variant, b):
        r = next((r for r in rows if r["variant"] == variant and r["batch"] == b and r["status"] == "ok"), None)
        return r["decode_ms_per_step"]["median"] if r and r.get("decode_ms_per_step") else None

    for r in rows:
        if r["status"] != "ok" or not r.get("decode_ms_per_step"):   # failed, or decode below noise
            continue
        d = r["decode_ms_per_step"]["median"]
        for base, key in (("stock", "speedup_vs_stock"), ("hf-static", "speedup_vs_hf_static")):
            bd = dec(base, r["batch"])
            r[key] = bd / d if bd is not None and bd > 0 and d > 0 else None
        if copy_bw_gbs and r.get("bytes_per_step") and d > 0:   # d <= 0: within timer noise (tiny N)
            r["bw_limit_pct"] = 100.0 * (r["bytes_per_step"] / (copy_bw_gbs * 1e9)) / (d / 1e3)


def collect_samples(rows: list[dict]) -> dict | None:
    """The text sample of each variant for the first batch size that has any (text prompts only)."""
    for b in sorted({r["batch"] for r in rows}):
        got = {r["variant"]: r["sample"] for r in rows if r["batch"] == b and r.get("sample")}
        if got:
            first = next(iter(got.values()))
            return {"batch": b, "prompt": first["prompt"], "outputs": {v: x["output"] for v, x in got.items()}}
    return None


# ------------------------------------------------------------------------------ batch-1 latencies

def _records(res: dict, kind: str) -> list[dict]:
    out = []
    for r in res["records"]:
        if r.get("type") == kind:
            r = dict(r)
            r.pop("type")
            out.append(r)
    return out


def _failed_item(keys, variant: str, s: dict, res: dict, what: str) -> dict:
    """An item the worker never wrote: crashed (with the reason) or, if it exited 0, an error."""
    failed = res["timed_out"] or res["returncode"] != 0
    item = {k: None for k in keys}
    item.update(variant=variant, batch=1, notes=[], status="crashed" if failed else "error",
                error=(f"variant process ended ({_failure_reason(res, s['timeout'])}) before the {what}"
                       if failed else f"worker exited 0 without the {what}"))
    return item


def collect_ttft(variant: str, s: dict, res: dict) -> list[dict]:
    """One item per --ttft-prompts length (a missing one says why)."""
    got = {r["requested_prompt_len"]: r for r in _records(res, "ttft")}
    out = []
    for req in s.get("ttft_prompts") or []:
        item = got.get(req) or _failed_item(TTFT_PROPERTIES, variant, s, res, f"TTFT at prompt {req}")
        item["requested_prompt_len"] = req
        out.append(item)
    return out


def collect_chat(variant: str, s: dict, res: dict) -> list[dict]:
    """The --chat item (none with --chat none), with the speedup filled in later by add_chat_ratios."""
    if not s.get("chat"):
        return []
    got = _records(res, "chat")
    item = got[0] if got else _failed_item(CHAT_PROPERTIES, variant, s, res, "chat call")
    item["requested"] = {"prompt_len": s["chat"][0], "new_tokens": s["chat"][1]}
    return [item]


def add_chat_ratios(items: list[dict]) -> None:
    stock = next((i for i in items if i["variant"] == "stock" and i["status"] == "ok"), None)
    for i in items:
        if stock and i["status"] == "ok" and (i["prompt_len"], i["new_tokens"]) == (stock["prompt_len"],
                                                                                   stock["new_tokens"]):
            i["speedup_vs_stock"] = stock["e2e_ms"]["median"] / i["e2e_ms"]["median"]


# ------------------------------------------------------------------------------------ cold start

def default_cache_dirs() -> dict:
    """Where the main runs' compile caches live (the env var if set, else the library's default)."""
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    dirs = {"TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")}
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        dirs["TORCHINDUCTOR_CACHE_DIR"] = cache_dir()
    except Exception:   # a torch without it: the documented default
        import getpass

        dirs["TORCHINDUCTOR_CACHE_DIR"] = (os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                                           or os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"))
    return dirs


def count_files(path: str, cap: int = 100_000) -> int:
    """Files under path (0 if it does not exist), counting stops at cap."""
    n = 0
    for _, _, files in os.walk(path):
        n += len(files)
        if n >= cap:
            break
    return n


def warm_cache_state() -> dict:
    return {var: {"dir": d, "entries_before": count_files(d)} for var, d in default_cache_dirs().items()}


def run_cold(variant: str, spec: dict, s: dict, tmp_root: str, log_path: str, verbose: bool, on_tick) -> dict:
    """One fresh worker for the variant with every CACHE_VARS dir new and empty; its first generate() call
    (the main run's first call: first batch size, --new-tokens) is cold_first_call_s."""
    dirs = {var: tempfile.mkdtemp(prefix=f"{variant}-{var.lower()}-", dir=tmp_root) for var in CACHE_VARS}
    spec = {k: v for k, v in spec.items() if k not in ("tokens_out", "ref_tokens")}
    spec.update(variant=variant, cold=True)
    res = run_child(spec, s["timeout"], s["device"], log_path, verbose, on_tick, env=dirs)
    got = _records(res, "cold")
    item = {k: None for k in ("variant", "batch", "status", "error", "cold_first_call_s", "warm_first_call_s",
                              "patch_s")}
    if got:
        item.update({k: got[0].get(k) for k in item})
    else:
        failed = res["timed_out"] or res["returncode"] != 0
        item.update(variant=variant, batch=s["batch_sizes"][0], status="crashed" if failed else "error",
                    error=f"cold process: {_failure_reason(res, s['timeout'])}" if failed else
                    "cold process exited 0 without a result")
    item["caches"] = {var: {"entries_before": 0, "entries_after": count_files(d)} for var, d in dirs.items()}
    return item


def cold_section(items: list[dict], rows: list[dict], warm: dict, s: dict) -> dict:
    """results.json's "cold": which caches were emptied, the warm caches as found, each variant's cold
    first call next to its warm one (also copied to the row of that batch size as cold_first_call_s)."""
    for it in items:
        row = next((r for r in rows if (r["variant"], r["batch"]) == (it["variant"], it["batch"])), None)
        if row is not None:
            it["warm_first_call_s"] = row.get("first_call_s")
            row["cold_first_call_s"] = it["cold_first_call_s"]
    notes = [f"--cold: {', '.join(i['variant'] for i in items) or 'no variant'} ran once more in a fresh process "
             f"with {' and '.join(CACHE_VARS)} pointing at new empty temp dirs (deleted afterwards); its first "
             f"generate() call (batch {s['batch_sizes'][0]}, {s['new_tokens']} new tokens, after loading and "
             "patching) is cold_first_call_s. Not emptied: the OS file cache, Python's bytecode cache, the CUDA "
             "driver's JIT cache"]
    for var, st in warm.items():
        empty = not st["entries_before"] and s["device"] != "cpu"
        notes.append(f"warm first call: the main run's, with {var}={st['dir']} as found ({st['entries_before']} "
                     "files before this run" + (": empty, so that first call compiled too" if empty else "") + ")")
    skipped = [v for v in s["variants"] if v not in COLD_VARIANTS]
    if skipped:
        notes.append(f"--cold: {', '.join(skipped)} not run cold (no compiled kernels)")
    if s["device"] == "cpu":
        notes.append("--cold on CPU: nothing is compiled (Triton interpreter; hf-static without torch.compile), "
                     "so cold and warm first calls differ by process noise only")
    return {"emptied": list(CACHE_VARS), "warm": warm, "results": items, "notes": notes}
