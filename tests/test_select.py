"""Device-side token selection vs HF's own processors (hf/select.py + runtime/sampling.py).

For every processor the fast path implements, the processors are built the way generate() builds them
(HF's classes, HF's order), hf/select.py turns them into a SelectConfig, and runtime.sampling's
process_scores must give HF's scores on random inputs. Anything it does not recognise must send the
call to HF's loop with a reason."""
import itertools

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc

from braid_backend.hf.select import select_config
from braid_backend.runtime.sampling import SelectState, process_scores

V, B, T = 97, 3, 6
EOS = [5, 11]


def _hf(procs, input_ids, scores):
    out = scores.clone()
    for p in procs:
        out = p(input_ids, out)
    return out


def _ours(procs, input_ids, scores, do_sample, generated=0, stopping=None):
    cfg, why = select_config(procs, stopping or [sc.MaxLengthCriteria(T + 8), sc.EosTokenCriteria(EOS)],
                             GenerationConfig(do_sample=do_sample, pad_token_id=0), T)
    assert why is None, why
    st = SelectState(B, V, cfg, "cpu")
    st.reset(input_ids[:, :T], B)
    if generated:   # tokens generated after the prompt: seen by the penalty, counted for min length
        st.seen.scatter_(1, input_ids[:, T:], True) if st.seen is not None else None
        st.count.fill_(generated)
    return process_scores(scores, st)


def _same(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different tokens filtered out"
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-6, atol=1e-6)


WARPERS = {
    "temperature": [lambda: lp.TemperatureLogitsWarper(t) for t in (0.3, 0.7, 1.5)],
    "top_k": [lambda k=k: lp.TopKLogitsWarper(k) for k in (1, 5, 40, V + 10)],
    "top_p": [lambda p=p: lp.TopPLogitsWarper(p) for p in (0.05, 0.5, 0.9, 0.999)],
    "min_p": [lambda p=p: lp.MinPLogitsWarper(p) for p in (0.01, 0.2, 0.9)],
}


@pytest.mark.parametrize("seed", range(4))
def test_every_processor_and_combination_matches_hf(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 2), generator=g)
    checked = 0
    for penalty, minlen, names in itertools.product((None, 1.3, 0.8), (None, "min_length", "min_new_tokens"),
                                                    [(), ("temperature",), ("top_k",), ("top_p",), ("min_p",),
                                                     ("temperature", "top_k", "top_p"), ("top_k", "min_p")]):
        procs = []
        if penalty is not None:
            procs.append(lp.RepetitionPenaltyLogitsProcessor(penalty))
        if minlen == "min_length":
            procs.append(lp.MinLengthLogitsProcessor(T + 4, EOS))
        elif minlen == "min_new_tokens":
            procs.append(lp.MinNewTokensLengthLogitsProcessor(T, 3, EOS))
        for n in names:
            procs.append(WARPERS[n][(seed + checked) % len(WARPERS[n])]())
        scores = torch.randn(B, V, generator=g) * 3
        ids_now = ids[:, :T + 2]   # two tokens generated: min lengths of 3 / T+4 still mask EOS
        want = _hf(procs, ids_now, scores)
        got = _ours(procs, ids_now, scores, do_sample=bool(names), generated=2)
        _same(got, want)
        checked += 1
    assert checked == 63


def test_min_length_stops_masking_once_reached():
    ids = torch.randint(0, V, (B, T + 4))
    scores = torch.randn(B, V)
    procs = [lp.MinNewTokensLengthLogitsProcessor(T, 3, EOS)]
    _same(_ours(procs, ids, scores, False, generated=4), _hf(procs, ids, scores))
    assert torch.isfinite(_hf(procs, ids, scores)[:, EOS]).all()


class MyTopK(lp.TopKLogitsWarper):
    pass


class Custom(lp.LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


@pytest.mark.parametrize("procs,stop,word", [
    ([Custom()], None, "Custom"),
    ([MyTopK(5)], None, "MyTopK"),                                             # a subclass may change behaviour
    ([lp.TopKLogitsWarper(5, filter_value=-1e4)], None, "TopKLogitsWarper"),
    ([lp.TopPLogitsWarper(0.9, min_tokens_to_keep=3)], None, "TopPLogitsWarper"),
    ([lp.RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=2)], None, "RepetitionPenalty"),
    ([lp.TopKLogitsWarper(5), lp.TemperatureLogitsWarper(0.5)], None, "order"),
    ([lp.NoRepeatNGramLogitsProcessor(2)], None, "NoRepeatNGram"),
    ([], [sc.MaxLengthCriteria(20), sc.StopStringCriteria.__new__(sc.StopStringCriteria)], "StopStringCriteria"),
    ([lp.MinLengthLogitsProcessor(T + 2, [7])], [sc.MaxLengthCriteria(20), sc.EosTokenCriteria(EOS)], "differ"),
])
def test_unrecognised_goes_to_hf_loop_with_reason(procs, stop, word):
    cfg, why = select_config(procs, stop or [sc.MaxLengthCriteria(20)], GenerationConfig(do_sample=True), T)
    assert cfg is None and word in why, why
