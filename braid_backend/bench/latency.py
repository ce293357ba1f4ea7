"""Worker side of braid-bench's latency measurements besides the batch sweep, each at batch 1 on random
token prompts: time to first token at extra prompt lengths (--ttft-prompts), the end-to-end latency of a
short chat-like call (--chat) and, in a process of its own, the cold first call (--cold).

Every measurement here is warm: the first call at a new shape (which may re-allocate the cache or, for
hf-static on a GPU, recompile) is excluded and reported apart as first_call_ms, then the --warmup calls,
then --reps timed calls (median, min-max). Lengths the model cannot hold (prompt + new tokens above its
max_position_embeddings, e.g. the tiny CPU presets' 512) are clamped, with a note saying so.

TTFT always makes at least TTFT_MIN_WARMUP warm-ups: braid's first call of a new prompt-length bucket
prefills eagerly and its second captures the bucket's prefill graph (runtime/prefill.py), so only from
the third call on is a braid TTFT the graph replay a server sees; the first call (eager prefill, decode
graph capture) is first_call_ms.
"""
from __future__ import annotations

from .timing import format_error, make_generate, progress, summary, tick

TTFT_MIN_WARMUP = 2   # warm-ups after the first call: the prefill graph is captured on a bucket's 2nd use


def fit(prompt_len: int, new_tokens: int, max_pos) -> tuple[int, int]:
    """(prompt_len, new_tokens) clamped so that prompt + new tokens fit in max_pos positions (new tokens
    first kept, the prompt shortened; at least 1 of each). max_pos None: no limit."""
    if not max_pos:
        return prompt_len, new_tokens
    new = max(1, min(new_tokens, max_pos - 1))
    return max(1, min(prompt_len, max_pos - new)), new


def _clamp_note(what: str, req: tuple[int, int], got: tuple[int, int], max_pos) -> str | None:
    if req == got:
        return None
    changed = [f"{name} {a} -> {b}" for name, a, b in zip(("prompt", "new tokens"), req, got) if a != b]
    return (f"{what}: {', '.join(changed)} (clamped: prompt + new tokens must fit the model's "
            f"max_position_embeddings {max_pos})")


def warm_calls(gen, n: int, spec: dict, timer, label: str, min_warmup: int = 0) -> tuple[float, dict]:
    """(first call ms, summary of the timed calls ms) of gen(n): one first call at this shape, the warm-ups
    (at least min_warmup), then the reps."""
    progress(f"{label}: first call (generate {n})")
    _, t_first = timer(lambda: gen(n))
    tick(n)
    warmups = max(spec["warmup"], min_warmup)
    for w in range(warmups):
        progress(f"{label}: warm-up {w + 1}/{warmups}")
        timer(lambda: gen(n))
        if w < spec["warmup"]:   # the progress bar counts --warmup calls only
            tick(n)
    times = []
    for r in range(spec["reps"]):
        progress(f"{label}: rep {r + 1}/{spec['reps']}")
        _, t = timer(lambda: gen(n))
        tick(n)
        times.append(t * 1e3)
    return t_first * 1e3, summary(times)


def _prompt(vocab, length, seed, device):
    from ..testing.numerics import random_tokens

    return random_tokens(vocab, 1, length, seed, device)


def ttft_sweep(model, spec: dict, extra: dict, timer, facts: dict, device, emit) -> None:
    """One {"type": "ttft"} record per --ttft-prompts length: generate(max_new_tokens=1) at batch 1, timed
    after the first call and at least TTFT_MIN_WARMUP warm-ups (braid: prefill-graph replays)."""
    max_pos = facts.get("max_position_embeddings")
    for req in spec.get("ttft_prompts") or []:
        length, _ = fit(req, 1, max_pos)
        note = _clamp_note(f"TTFT prompt {req}", (req, 1), (length, 1), max_pos)
        rec = {"type": "ttft", "variant": spec["variant"], "batch": 1, "status": "ok", "error": None,
               "requested_prompt_len": req, "prompt_len": length, "ttft_ms": None, "first_call_ms": None,
               "notes": [note] if note else []}
        try:
            gen = make_generate(model, _prompt(facts["vocab"], length, spec["seed"] + 104729 + length, device), extra)
            rec["first_call_ms"], rec["ttft_ms"] = warm_calls(gen, 1, spec, timer, f"{spec['variant']} ttft p={length}",
                                                              min_warmup=TTFT_MIN_WARMUP)
            progress(f"{spec['variant']} ttft p={length}: {rec['ttft_ms']['median']:.2f} ms")
        except Exception as e:
            rec.update(status="error", error=format_error(e))
            progress(f"{spec['variant']} ttft p={length}: ERROR {e}")
        emit(rec)


def chat_latency(model, spec: dict, extra: dict, timer, facts: dict, device, emit) -> None:
    """One {"type": "chat"} record: generate(N) (min = max new tokens) on a P-token prompt, batch 1."""
    if not spec.get("chat"):
        return
    req = tuple(spec["chat"])
    max_pos = facts.get("max_position_embeddings")
    length, n = fit(*req, max_pos)
    note = _clamp_note(f"chat {req[0]},{req[1]}", req, (length, n), max_pos)
    rec = {"type": "chat", "variant": spec["variant"], "batch": 1, "status": "ok", "error": None,
           "requested": {"prompt_len": req[0], "new_tokens": req[1]}, "prompt_len": length, "new_tokens": n,
           "e2e_ms": None, "e2e_tok_s": None, "speedup_vs_stock": None, "first_call_ms": None,
           "notes": [note] if note else []}
    label = f"{spec['variant']} chat p={length} n={n}"
    try:
        gen = make_generate(model, _prompt(facts["vocab"], length, spec["seed"] + 7561, device), extra)
        rec["first_call_ms"], rec["e2e_ms"] = warm_calls(gen, n, spec, timer, label)
        rec["e2e_tok_s"] = n * 1000.0 / rec["e2e_ms"]["median"]
        progress(f"{label}: {rec['e2e_ms']['median']:.1f} ms end to end")
    except Exception as e:
        rec.update(status="error", error=format_error(e))
        progress(f"{label}: ERROR {e}")
    emit(rec)


def cold_first_call(gen, n: int, timer, label: str) -> float:
    """Seconds of the process's first gen(n) (the caller pointed the compile caches at empty dirs)."""
    progress(f"{label}: first call (generate {n}) with empty compile caches")
    _, t = timer(lambda: gen(n))
    tick(n)
    return t
