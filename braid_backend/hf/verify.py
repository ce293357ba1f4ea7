"""patch(verify=True): on first use, check a few decode steps of the patched model against stock.

The check feeds the same tokens to both paths (teacher forcing): the call's own prompt, cut to its
last PROMPT tokens and first ROWS rows, as prefill, then STEPS single-token decode steps. Stock is
the class's own forward with a fresh DynamicCache; patched is the braid forward with a braid cache,
so prefill (stock modules writing the braid cache), the cache layout, RoPE tables and every fused
kernel are in the comparison. Graphs are left out: a replay runs the same kernels on the same
buffers, and capturing for a throw-away cache would only cost memory.

Tolerance on max over steps of ||patched - stock|| / ||stock|| of the logits:
- fp32: 5e-3. Both sides are fp32, but on the GPU Triton's tl.dot rounds fp32 operands to TF32
  (10-bit mantissa) by default; that costs ~1e-3 at most on the logits, while real faults (a wrong
  weight, RoPE table, mask or cache slot) show up at 1e-1 and beyond.
- fp16/bf16: 5e-2. Each side rounds at its own points and is ~1e-2 away from an fp32 reference on
  random and real models alike (bf16: 8 mantissa bits), so two correct paths differ by up to about
  twice that; the fused path's allowed error (2x stock's, see DESIGN.md) stays under this bound.
"""
from __future__ import annotations

import logging

import torch

from ..session import PatchSession
from .compat import stock_forward
from .logits import rel_err, teacher_forced_logits

log = logging.getLogger("braid_backend")

PROMPT, ROWS, STEPS = 32, 2, 3
TOLERANCE = {torch.float32: 5e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


class Verifier:
    """The check of one patched model, run once through `run` (HFRunner calls it on first use)."""

    def __init__(self, session: PatchSession):
        self.session = session

    def inputs(self, input_ids, attention_mask):
        """The verification's prompt, mask and continuation tokens, cut from the call's own inputs."""
        dev = self.session.step.device
        ids = input_ids[:ROWS, -PROMPT:].to(dev, torch.long)
        if attention_mask is not None and attention_mask.shape == input_ids.shape:
            mask = attention_mask[:ROWS, -PROMPT:].to(dev, torch.long).clone()
        else:
            mask = torch.ones_like(ids)
        mask[:, -1] = 1   # a row cut down to padding only would have nothing to attend to
        T = ids.shape[1]
        cont = ids[:, torch.arange(STEPS, device=dev) % T]
        return ids, mask, cont

    def run(self, model, input_ids, attention_mask=None, *, patched) -> dict | None:
        """Run the check (`patched(**forward_kwargs)` is the braid forward); on a miss (or an exception)
        warn, record it in the report and run stock from now on."""
        s = self.session
        tol = TOLERANCE.get(s.step.dtype, 5e-2)
        res = dict(ok=False, max_err=None, tol=tol, errs=[], error=None)
        cache = None
        try:
            ids, mask, cont = self.inputs(input_ids, attention_mask)
            res.update(rows=ids.shape[0], prompt_len=ids.shape[1], steps=STEPS)
            stock = teacher_forced_logits(model, ids, cont, mask, forward=stock_forward(model))
        except Exception as e:
            # stock itself fails on these inputs (ids out of range, ...): a bad call, not a bad patch.
            # The call goes on to fail as stock would; the next call is checked instead.
            log.info("braid: verify postponed, stock fails on this call's inputs (%s: %s)", type(e).__name__, e)
            s.status.verified = False
            return None
        try:
            cache = s.new_cache(ids.shape[0], ids.shape[1] + STEPS + 1)
            s.eager_only = True
            try:
                got = teacher_forced_logits(model, ids, cont, mask, cache=cache, forward=patched)
            finally:
                s.eager_only = False
            res["errs"] = [rel_err(p, q) for p, q in zip(got, stock)]
            res["max_err"] = max(res["errs"])
            res["ok"] = res["max_err"] <= tol
        except Exception as e:  # a crash in the check is a failed check, not a failed user call
            log.debug("braid: verification raised", exc_info=True)
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            if cache is not None:
                cache.release()
        s.status.verify_result = res
        if res["ok"]:
            msg = (f"braid: verify passed: patched vs stock logits max rel err {res['max_err']:.2e} over "
                   f"{len(res['errs'])} steps (tol {tol:.0e})")
            log.info(msg)
            s.report.events.append(msg)
        else:
            what = res["error"] or f"max rel err {res['max_err']:.2e} > tol {tol:.0e}"
            s.warn_once("verify", f"braid: verify FAILED ({what}); running stock from now on")
            s.disable(f"verify failed ({what})")
        return res
