"""The fast decode loop behind generate(): K decode steps per CUDA-graph replay, token selection and
EOS tracking on the device, the host looking only once per K steps.

It plugs into HF's own generate() as its decoding method (`custom_generate=`), so input validation,
generation-config defaults, attention-mask inference, num_return_sequences expansion and the
prompt's streamer.put all stay HF's. It handles greedy and sampling with the standard processors
(sampling.SelectConfig.from_hf); anything else falls back to HF's `_sample` loop, which still runs
every decode step through the patched forward (fused kernels, one-step graph replay).
"""
from __future__ import annotations

import logging

import torch

from .sampling import SelectConfig, SelectState, select_next

log = logging.getLogger("braid_backend")

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def fast_path_reason(st, generation_config, model_kwargs) -> str | None:
    if not st.options.get("fast_generate"):
        return "fast_generate=False"
    for flag in _UNSUPPORTED_OUTPUTS:
        if getattr(generation_config, flag, False):
            return f"{flag}=True"
    if model_kwargs.get("inputs_embeds") is not None:
        return "inputs_embeds"
    if not st.owns(model_kwargs.get(st.cache_key)):
        return "no braid cache"
    extra = set(model_kwargs) - {"attention_mask", "position_ids", "use_cache", "cache", "past_key_values",
                                 "logits_to_keep", "synced_gpus", "streamer", "output_attentions",
                                 "output_hidden_states", "return_dict"}
    if extra:
        return f"model kwargs {sorted(extra)}"
    return None


class FastLoop:
    """Captured K-step decode graphs for one (bucket, selection config) plus their device state."""

    def __init__(self, st, cache, bucket: int, K: int, sel_cfg: SelectConfig):
        self.K, self.bucket = K, bucket
        dec = st.decode
        self.sel = SelectState(bucket, dec.vocab, sel_cfg, dec.device)
        self.ring = torch.zeros(K, bucket, dtype=torch.long, device=dec.device)
        self.all_done = torch.zeros(K, dtype=torch.bool, device=dec.device)
        self.ones = torch.ones(bucket, 1, dtype=torch.int8, device=dec.device)

        def body(b, warmup=False):
            for k in range(K):
                # the token being fed attends to itself: HF appends 1 to attention_mask each step
                cache.valid[:bucket].scatter_(1, b.slots[:, None], self.ones)
                tok = select_next(dec.forward(cache, b), self.sel)
                self.ring[k].copy_(tok)
                self.all_done[k] = self.sel.done.all()
                b.ids.copy_(tok)
                b.pos.add_(1)
                b.slots.add_(1)
                b.kv_lens.add_(1)
            return self.ring

        self.graphed = bool(st.options.get("graphs")) and dec.device.type == "cuda"
        if self.graphed:
            rng = torch.cuda.get_rng_state(dec.device)
            cs = st.graph_runner().capture(bucket, cache, ("fast", K, sel_cfg), body, warm_slots=K)
            # capture's warm-up drew random numbers: restore, so seeded calls repeat from the first call on
            torch.cuda.set_rng_state(rng, dec.device)
            self.bufs, self.run = cs.bufs, cs.graph.replay
        else:  # same loop without graphs (CPU interpreter, graphs=False): what the CPU tests exercise
            from ..patches.decode import DecodeBuffers

            self.bufs = DecodeBuffers(dec, bucket, cache.max_len)
            self.run = lambda: body(self.bufs)


def fast_generate(st, model, input_ids, logits_processor, stopping_criteria, generation_config,
                  streamer=None, **model_kwargs):
    """HF decoding-method signature. Returns what HF's _sample returns."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from ..patches.model import batch_bucket

    B, T = input_ids.shape
    sel_cfg, why = SelectConfig.from_hf(logits_processor, stopping_criteria, generation_config, T)
    why = why or fast_path_reason(st, generation_config, model_kwargs)
    if why is not None:
        log.info("braid: generate() decode loop is HF's (%s); steps still run the fused forward", why)
        st.last_path = f"hf-loop ({why})"
        st.stats["generate_hf_loop"] += 1
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   streamer=streamer, **model_kwargs)
    st.stats["generate_fast"] += 1
    st.last_path = "fast"
    max_length = next((int(c.max_length) for c in stopping_criteria if type(c).__name__ == "MaxLengthCriteria"),
                      T + 20)
    new = max_length - T
    cache = model_kwargs[st.cache_key]
    K = int(st.options.get("graph_steps", 8))
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if new <= 0:
        if streamer is not None:
            streamer.end()
        return _result(generation_config, input_ids, cache, st, GenerateDecoderOnlyOutput)
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 0)
    # prefill: stock HF modules writing the braid cache, last position's logits only
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{st.cache_key: cache})
    bucket = min(batch_bucket(B), cache.batch_capacity)
    st.decode.ensure_rope_table(cache.max_len)
    key = (bucket, cache.serial, cache.version, K, sel_cfg)
    loop = st.fast_loops.get(key)
    if loop is None:
        st.fast_loops = {k: v for k, v in st.fast_loops.items() if k[1:3] == key[1:3]}
        loop = st.fast_loops[key] = FastLoop(st, cache, bucket, K, sel_cfg)
    sel, b = loop.sel, loop.bufs
    sel.reset(input_ids, B)
    first = select_next(_pad_rows(out.logits[:, -1], bucket), sel)
    tokens = [first[:B]]
    n_new = 1
    if streamer is not None:
        streamer.put(first[:B].cpu())
    done_host = bool(sel.done[:B].all()) if sel_cfg.eos else False
    # feed: the first token goes in at slot T, rope position = last prompt position + 1
    b.ids.copy_(first)
    b.pos.zero_()
    b.pos[:B].copy_(pos[:, -1] + 1)
    b.slots.fill_(T)
    b.kv_lens.fill_(T + 1)
    cache.valid[B:bucket].zero_()
    while n_new < new and not done_host:
        loop.run()
        # the one host sync per K steps; copy=True because on CPU .cpu() would alias the ring
        ring, all_done = loop.ring.to("cpu", copy=True), loop.all_done.to("cpu", copy=True)
        take = min(loop.K, new - n_new)
        stop = take
        if sel_cfg.eos:
            hit = torch.nonzero(all_done[:take])
            if hit.numel():
                stop = int(hit[0]) + 1
                done_host = True
        chunk = ring[:stop, :B]
        tokens.append(chunk.t().to(input_ids.device, non_blocking=True))
        if streamer is not None:
            for row in chunk:
                streamer.put(row)
        n_new += stop
    cache.seen = T + n_new - 1   # the last token is returned, not fed (as in HF's loop)
    seq = torch.cat([input_ids] + [t if t.dim() == 2 else t[:, None] for t in tokens], dim=1)
    if streamer is not None:
        streamer.end()
    return _result(generation_config, seq, cache, st, GenerateDecoderOnlyOutput)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def _result(generation_config, seq, cache, st, cls):
    if generation_config.return_dict_in_generate:
        return cls(sequences=seq, **{st.cache_key: cache})
    return seq
