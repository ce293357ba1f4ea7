"""The bench's correctness check: teacher-forced logits of a variant against an fp32 reference, next to
the stock model's own error (DESIGN.md's 2x-of-stock rule)."""
from __future__ import annotations


def check_inputs(vocab, b, spec, device):
    from ..testing.numerics import random_tokens

    ids = random_tokens(vocab, b, spec["check_prompt_len"] + spec["check_steps"], spec["seed"] + 7919 + b, device)
    return ids[:, :spec["check_prompt_len"]], ids[:, spec["check_prompt_len"]:]


def stock_check(model, vocab, b, spec, device, twins=None) -> dict:
    """fp32 reference and the stock model's own error, before any patching. twins: (fp32, run dtype) dense
    models of a quantized one (bench/quant.py): the reference and the yardstick instead."""
    from ..testing.numerics import fp32_reference_logits, rel_err, teacher_forced_logits

    prompt, cont = check_inputs(vocab, b, spec, device)
    if twins is None:
        ref = fp32_reference_logits(model, prompt, cont).cpu()
        stock = teacher_forced_logits(model, prompt, cont).cpu()
    else:
        ref, stock = (teacher_forced_logits(t, prompt, cont).cpu() for t in twins)
    return {"batch": b, "prompt_len": prompt.shape[1], "steps": cont.shape[1] + 1,
            "stock_err": rel_err(stock, ref), "_ref": ref,
            "yardstick": "stock" if twins is None else "dequantised weights in the run's dtype"}


def finish_check(model, vocab, chk: dict, spec, device, own: bool) -> dict:
    """own: the model's logits differ from the yardstick's (patched, or a quantized stock model)."""
    from ..testing.numerics import rel_err, teacher_forced_logits

    ref = chk.pop("_ref")
    if own:
        prompt, cont = check_inputs(vocab, chk["batch"], spec, device)
        logits = teacher_forced_logits(model, prompt, cont).cpu()
        err = rel_err(logits, ref)
        chk["variant_err"] = err
        chk["err_ratio"] = err / chk["stock_err"] if chk["stock_err"] > 0 else None
    else:
        chk["variant_err"] = chk["stock_err"]
        chk["err_ratio"] = 1.0
    return chk
