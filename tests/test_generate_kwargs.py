"""Every generate() keyword a user passes, on a patched model vs stock: the same output (tokens exact in
fp32, scores and logits to rounding, the same exception for a call stock rejects), on the path the
routing documents for it (status(model).last_route: path and reason).

Most rows generate one token: that runs HF's whole preparation, our routing, the prefill and the first
token's selection (device-side on the fast path) without a decode step in the Triton interpreter; the
rows whose keyword acts on later steps generate 3.
"""
import pytest
import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import braid_backend
from braid_backend.testing.presets import build_model
from helpers import outcome, tiny_bpe_tokenizer

T = 5


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.ended = True


class Ban(LogitsProcessor):
    def __call__(self, input_ids, scores):
        scores[:, 5] = -float("inf")
        return scores


class Never(StoppingCriteria):
    def __call__(self, input_ids, scores, **kw):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.fixture(scope="module")
def pair():
    """A stock model and a patched copy of the same weights (fp32: greedy tokens match exactly); the
    lm_head is untied so that greedy decoding does not just repeat the last prompt token."""
    stock = build_model("tiny-qwen2", dtype=torch.float32, seed=11, tie_word_embeddings=False)
    patched = build_model("tiny-qwen2", dtype=torch.float32, seed=11, tie_word_embeddings=False)
    assert braid_backend.patch(patched, graph_steps=2).ok
    return stock, patched


def ids_of(B=2, seed=0):
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def _left_padded():
    ids = ids_of(2, 3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return dict(input_ids=ids, attention_mask=mask)


TOK = tiny_bpe_tokenizer(307)

# (id, generate() kwargs (a callable: made per model), expected path, reason substring)
CASES = [
    ("greedy", dict(), "fast", None),
    ("pad_token_id unset (eos as pad)", dict(pad_token_id=None), "fast", None),
    ("generation_config object", dict(generation_config=GenerationConfig(max_new_tokens=1, do_sample=False)),
     "fast", None),
    ("temperature + top_k=1", dict(do_sample=True, temperature=0.5, top_k=1), "fast", None),
    ("top_p tiny", dict(do_sample=True, top_k=0, top_p=1e-6), "fast", None),
    ("min_p=1", dict(do_sample=True, top_k=0, min_p=1.0), "fast", None),
    ("repetition_penalty", dict(repetition_penalty=1.3, max_new_tokens=3), "fast", None),
    ("eos_token_id list + min_new_tokens", dict(eos_token_id=[7, 9], min_new_tokens=2, max_new_tokens=3),
     "fast", None),
    ("max_length", dict(max_new_tokens=None, max_length=T + 3), "fast", None),
    ("return_dict_in_generate", dict(return_dict_in_generate=True), "fast", None),
    ("num_return_sequences (top_k=1)", dict(do_sample=True, top_k=1, num_return_sequences=2), "fast", None),
    ("attention_mask, left padding", _left_padded(), "fast", None),
    ("tokenizer without stop strings", dict(tokenizer=TOK), "fast", None),
    ("stop_strings + tokenizer", lambda ref: dict(stop_strings=[TOK.decode([int(ref[0, T + 1])])],
                                                  tokenizer=TOK, max_new_tokens=3), "hf-loop", "tokenizer"),
    ("stop_strings without tokenizer", dict(stop_strings=["the"]), "fast", None),   # HF raises, as stock
    ("no_repeat_ngram_size", dict(no_repeat_ngram_size=1), "hf-loop", "NoRepeatNGram"),
    ("bad_words_ids", dict(bad_words_ids=[[5], [6, 7]]), "hf-loop", "NoBadWords"),
    ("sequence_bias", dict(sequence_bias={(5,): -3.0}), "hf-loop", "SequenceBias"),
    ("begin_suppress_tokens", dict(begin_suppress_tokens=[5, 6]), "hf-loop", "SuppressTokensAtBegin"),
    ("suppress_tokens", dict(suppress_tokens=[5, 6]), "hf-loop", "SuppressTokens"),
    ("forced_eos_token_id", dict(forced_eos_token_id=3, max_new_tokens=2), "hf-loop", "ForcedEOS"),
    ("renormalize_logits", dict(renormalize_logits=True), "hf-loop", "LogitNormalization"),
    ("typical_p (HF samples, seeded)", dict(do_sample=True, typical_p=0.9, seed=3), "hf-loop", "Typical"),
    ("epsilon_cutoff (HF samples, seeded)", dict(do_sample=True, epsilon_cutoff=3e-4, seed=4), "hf-loop",
     "Epsilon"),
    ("prefix_allowed_tokens_fn", dict(prefix_allowed_tokens_fn=lambda b, ids: [5, 6, 7]), "hf-loop",
     "PrefixConstrained"),
    ("logits_processor", lambda ref: dict(logits_processor=LogitsProcessorList([Ban()])), "hf-loop", "Ban"),
    ("stopping_criteria", lambda ref: dict(stopping_criteria=[Never()]), "hf-loop", "Never"),
    ("output_scores", dict(output_scores=True, return_dict_in_generate=True, max_new_tokens=2), "hf-loop",
     "output_scores"),
    ("output_logits", dict(output_logits=True, return_dict_in_generate=True), "hf-loop", "output_logits"),
    ("output_hidden_states", dict(output_hidden_states=True, return_dict_in_generate=True), "hf-loop",
     "output_hidden_states"),
    ("inputs_embeds", "embeds", "hf-loop", "inputs_embeds"),
    ("streamer", "streamer", "fast", None),
    ("synced_gpus=True", dict(synced_gpus=True), "hf-loop", "synced_gpus"),   # stock raises (no process group)
    ("num_beams", dict(num_beams=2, max_new_tokens=2), "stock", "beam search"),
    ("use_cache=False", dict(use_cache=False), "stock", "use_cache=False"),
    ("past_key_values given", lambda ref: dict(past_key_values=DynamicCache()), "stock", "own cache"),
    ("cache_implementation=static", dict(cache_implementation="static"), "stock", "cache_implementation"),
    ("contrastive search", dict(penalty_alpha=0.6, top_k=4), "stock", "contrastive"),   # both raise
    ("DoLa", dict(dola_layers="high"), "stock", "dola"),                             # both raise
    ("assistant_model", "assistant", "stock", "assisted"),
    ("prompt_lookup_num_tokens", dict(prompt_lookup_num_tokens=2, max_new_tokens=2), "stock", "assisted"),
    ("negative_prompt_ids (CFG)", "cfg", "hf-loop", "ClassifierFreeGuidance"),
]


def _kwargs(spec, model, stock, ref):
    """The call's kwargs for `model` (stock or patched): some need the model or stock's greedy output."""
    if callable(spec):
        return spec(ref)
    if spec == "embeds":
        return dict(inputs_embeds=model.get_input_embeddings()(ids_of()), input_ids=None)
    if spec == "streamer":
        return dict(streamer=Collect(), max_new_tokens=3)
    if spec == "assistant":
        return dict(assistant_model=stock, input_ids=ids_of(1))
    if spec == "cfg":
        return dict(input_ids=ids_of(1), guidance_scale=1.5, negative_prompt_ids=ids_of(1, 9)[:, :3])
    return dict(spec)


def _call(model, kw):
    kw = dict(kw)
    seed = kw.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    ids = kw.pop("input_ids", ids_of())
    kw.setdefault("max_new_tokens", 1)
    kw.setdefault("do_sample", False)
    if "pad_token_id" not in kw:
        kw["pad_token_id"] = 0
    elif kw["pad_token_id"] is None:
        del kw["pad_token_id"]
    args = () if ids is None else (ids,)
    return outcome(lambda: model.generate(*args, **kw)), kw


def _same(a, b) -> bool:
    """Stock's and the patched model's outcome: equal tokens (scores/logits/hidden states to rounding),
    or the same exception type."""
    if a[0] != b[0]:
        return False
    if a[0] == "exc":
        return a[1] is b[1]
    x, y = a[1], b[1]
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if not torch.equal(x.sequences, y.sequences):
        return False
    for name in ("scores", "logits"):
        xs, ys = getattr(x, name, None), getattr(y, name, None)
        if (xs is None) != (ys is None) or (xs is not None and not all(
                torch.allclose(p, q, rtol=1e-4, atol=1e-4) for p, q in zip(xs, ys))):
            return False
    hx, hy = getattr(x, "hidden_states", None), getattr(y, "hidden_states", None)
    if (hx is None) != (hy is None):
        return False
    return hx is None or all(torch.allclose(p, q, rtol=1e-4, atol=1e-4) for hs, gs in zip(hx, hy)
                             for p, q in zip(hs, gs))


@pytest.mark.parametrize("name,spec,path,why", CASES, ids=[c[0] for c in CASES])
def test_generate_kwarg(pair, name, spec, path, why):
    stock, patched = pair
    ref = stock.generate(ids_of(), max_new_tokens=3, do_sample=False, pad_token_id=0)   # stock's greedy tokens
    want, kw_s = _call(stock, _kwargs(spec, stock, stock, ref))
    got, kw_p = _call(patched, _kwargs(spec, patched, stock, ref))
    assert _same(want, got), (name, want, got)
    if "tokenizer" in name and "without" not in name:
        assert got[0] == "ok", got   # both raising the same would prove nothing here
    st = braid_backend.status(patched)
    assert st.last_route.path == path, (name, st.last_route)
    if why is None:
        assert st.last_route.reason is None, (name, st.last_route)
    else:
        assert why.lower() in st.last_route.reason.lower(), (name, st.last_route)
    assert (st.last_error is None) == (got[0] == "ok"), st.last_error
    if spec == "streamer":   # the streamer saw what stock's saw: the prompt, then each new token
        a, b = kw_s["streamer"], kw_p["streamer"]
        assert b.ended and torch.equal(torch.cat(a.chunks), torch.cat(b.chunks))


def test_stop_strings_stop_where_stock_stops(pair):
    """The regression of the tokenizer HF withheld from the custom decoding method: the stop string
    actually cuts the generation short, on both models alike."""
    stock, patched = pair
    ids = ids_of()
    ref = stock.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    clean = [r for r in range(ids.shape[0]) if TOK.decode([int(ref[r, T])]).strip("\ufffd ")]
    assert clean, "no first token decodes to whole characters: pick another seed"
    r = clean[0]
    stop = TOK.decode([int(ref[r, T])])           # row r's first new token ends row r
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, stop_strings=[stop], tokenizer=TOK)
    a, b = stock.generate(ids, **kw), patched.generate(ids, **kw)
    assert torch.equal(a, b) and b.shape[1] > T + 1 and (b[r, T + 1:] == 0).all(), (a, b, stop)


def test_sampling_is_seeded_on_the_fast_path(pair):
    """Real sampling runs on the device (exponential race: the same distribution as HF's multinomial,
    other draws), so it equals stock only in law: the same seed gives the same tokens, on the fast path."""
    _, patched = pair
    kw = dict(max_new_tokens=3, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    torch.manual_seed(5)
    x = patched.generate(ids_of(), **kw)
    torch.manual_seed(5)
    y = patched.generate(ids_of(), **kw)
    assert torch.equal(x, y) and braid_backend.status(patched).last_path == "fast"
