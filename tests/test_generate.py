"""generate() on a patched tiny model vs stock HF: the features users rely on, through the fast loop
(eager on CPU: the same device-side selection and EOS logic the CUDA graphs capture) and HF's loop."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import braid_backend
from braid_backend.testing.presets import build_model
from helpers import tiny_tokenizer


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


@pytest.fixture(scope="module")
def pair():
    """A stock model and a patched copy of the same weights (fp32: greedy must match exactly)."""
    stock = build_model("tiny-qwen2", dtype=torch.float32, seed=7)
    patched = build_model("tiny-qwen2", dtype=torch.float32, seed=7)
    braid_backend.patch(patched, graph_steps=3)
    return stock, patched


def prompt(B=2, T=6, seed=0):
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def both(pair, *args, **kw):
    stock, patched = pair
    a = stock.generate(*args, **kw)
    b = patched.generate(*args, **kw)
    return a, b, braid_backend.status(patched).last_path


def test_greedy_eos_list_and_padding(pair):
    ids = prompt(3, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = pair[0].generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    eos = [int(ref[0, 7 + 2]), int(ref[2, 7 + 5])]   # two rows stop at different steps
    a, b, path = both(pair, ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)
    assert path == "fast" and torch.equal(a, b)
    assert (b[0, 7 + 3:] == 0).all()


def test_min_new_tokens_masks_eos(pair):
    ids = prompt(1, 5, 1)
    ref = pair[0].generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(ref[0, 5])                                  # the very first token would end it
    a, b, path = both(pair, ids, max_new_tokens=6, min_new_tokens=4, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)
    assert path == "fast" and torch.equal(a, b) and b.shape[1] > 5 + 1


def test_repetition_penalty_and_max_length(pair):
    ids = prompt(2, 6, 2)
    a, b, path = both(pair, ids, max_length=14, repetition_penalty=1.3, do_sample=False, pad_token_id=0)
    assert path == "fast" and torch.equal(a, b) and b.shape[1] == 14


def test_streamer_gets_every_token_and_return_dict(pair):
    ids = prompt(1, 6, 3)
    s = Collect()
    out = pair[1].generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0, streamer=s,
                           return_dict_in_generate=True)
    ref = pair[0].generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    streamed = torch.cat([c.reshape(-1) for c in s.chunks])
    assert s.ended and torch.equal(streamed, out.sequences[0])     # prompt first, then each new token
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert type(cache).__name__ == "BraidCache" and cache.get_seq_length() == out.sequences.shape[1] - 1


def test_sampling_seeded_and_topk1_is_greedy(pair):
    stock, patched = pair
    ids = prompt(2, 6, 4)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, pad_token_id=0)
    torch.manual_seed(5)
    x = patched.generate(ids, **kw)
    torch.manual_seed(5)
    y = patched.generate(ids, **kw)
    assert braid_backend.status(patched).last_path == "fast" and torch.equal(x, y)
    greedy = stock.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    top1 = patched.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, pad_token_id=0,
                            num_return_sequences=2)
    assert torch.equal(top1, greedy.repeat_interleave(2, dim=0))


def test_unsupported_settings_use_hf_loop_and_match(pair):
    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 5] = -float("inf")
            return scores

    ids = prompt(2, 6, 5)
    a, b, path = both(pair, ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                      logits_processor=LogitsProcessorList([Ban()]))
    assert path.startswith("hf-loop") and torch.equal(a, b)
    a, b, path = both(pair, ids, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True)
    assert path.startswith("hf-loop") and torch.equal(a.sequences, b.sequences)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(a.scores, b.scores))
    a, b, path = both(pair, ids, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert path.startswith("stock") and torch.equal(a, b)


def test_generation_config_defaults_and_cache_growth(pair):
    stock, patched = pair
    ids = prompt(1, 5, 6)
    for m in pair:
        m.generation_config.max_new_tokens = 4
    try:
        a, b, _ = both(pair, ids, do_sample=False, pad_token_id=0)
        assert b.shape[1] == 9 and torch.equal(a, b)
    finally:
        for m in pair:
            m.generation_config.max_new_tokens = None
    # a prompt + generation longer than the shared cache: the cache is re-allocated, output stays exact
    before = patched._braid_session.cache.max_len   # internals: the shared cache's size
    long_ids = prompt(1, before + 3, 7)
    a, b, _ = both(pair, long_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b) and patched._braid_session.cache.max_len > before


def test_text_iterator_streamer_in_a_thread(pair):
    """The usual streaming pattern: generate() in a thread, text read from TextIteratorStreamer."""
    import threading

    from transformers import TextIteratorStreamer

    stock, patched = pair
    tokenizer = tiny_tokenizer(patched.config.vocab_size)
    ids = prompt(1, 5, 9)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    box = {}
    t = threading.Thread(target=lambda: box.update(out=patched.generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=streamer)))
    t.start()
    text = "".join(streamer)
    t.join()
    ref = stock.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert braid_backend.status(patched).last_path == "fast" and torch.equal(box["out"], ref)
    assert text.split() == tokenizer.decode(ref[0, 5:]).split()
