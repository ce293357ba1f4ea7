"""The fused decode step: one token per sequence through every layer, ~6 kernels per layer.

    x = embed(ids) [* embed_scale]                   (residual stream, updated in place)
    per layer:  qkv  = rmsnorm(x) @ Wqkv^T (+b)      fused_gemv (norm prologue; no norm for OLMo2)
                [q, k = rmsnorm(q), rmsnorm(k)]      rmsnorm on the qkv slices (OLMo2's full q/k norm)
                q, cache[slot] = rope(qkv) (+q/k norm) rope_qkv_cache_write (per-head norm: Qwen3, Gemma-3)
                a    = attention(q, cache)           decode_attention (split-KV + combine; window, softcap)
                x    = x + a @ Wo^T                  fused_gemv (residual epilogue, in place)
                h    = act(g) * u, [g|u] = rmsnorm(x) @ Wgu^T   fused_gemv (norm + act epilogue)
                x    = x + h @ Wd^T                  fused_gemv (residual epilogue, in place)
      or, MoE:  x    = x + moe(rmsnorm(x))           rmsnorm + moe_decode (router, selected experts, sum)
    logits = rmsnorm(x) @ Wlm^T [/ logits_scaling] [softcap]

Sublayer outputs that need more than `x + y` (Gemma-2/3 and OLMo2 post-norms: x + norm(y); Granite:
x + y * m) go through `_sublayer_out`: the GEMV writes y to a scratch buffer, the rmsnorm kernel
normalises it in place, and the multiply / add are plain torch ops on preallocated buffers (the very
ops HF runs, so the cast points match). A kernel with a normalise-then-add epilogue would save them.

Every tensor it touches is preallocated (StepBuffers), so the step can be captured in a CUDA graph.

Quantized checkpoints (FineGrainedFP8, compressed-tensors): a projection weight is then a QuantWeight (views of
the module's own quantized tensors; q|k|v and gate|up packed by concat_quant) and `gemv` runs quant_gemv on it,
fused_gemv otherwise, with the same keywords (model/quant_step.py). Prefill of those modules: quant_prefill.py.

`DecodeStep` is what runtime/ drives (see runtime/interface.py for the contract): it owns the fused
weights and RoPE tables, makes StepBuffers, and runs one step on a cache. A second backend (a persistent
kernel) implements the same few members and runs under the same graphs and loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels._common import num_sms
from ..kernels.decode_attention import attention_workspace, decode_attention, default_num_splits
from ..kernels.moe import moe_decode
from ..kernels.quant_gemv import QuantWeight
from ..kernels.rmsnorm import rmsnorm
from ..kernels.rope_cache import rope_qkv_cache_write
from ..tuning import DEFAULT as DEFAULT_TUNING
from ..tuning import Tuning
from .fuse import unfuse_linears
from .quant import main_tensor
from .quant_prefill import QuantPrefill
from .quant_step import formats, gemv, pack, quant_calls, step_workspace, unpack, weight_of
from .spec import ModelPlan, norm_eps
from .unsupported import Unsupported
from .tp import FlagPartials, local


@dataclass
class FusedLayer:
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_gu: torch.Tensor | None     # None on a MoE layer (and w_down)
    b_gu: torch.Tensor | None
    w_o: torch.Tensor             # this rank's shard under tensor parallelism (all of it otherwise)
    b_o: torch.Tensor | None
    w_down: torch.Tensor | None
    b_down: torch.Tensor | None
    plan: object  # LayerPlan
    eps_attn: float
    eps_mlp: float
    eps_attn_out: float
    eps_mlp_out: float
    eps_qk: float
    moe: dict | None = None        # moe_decode's keywords (MoE layer), read off the HF block in place
    w_sgu: torch.Tensor | None = None    # Qwen2-MoE shared expert: packed gate|up, and down
    w_sdown: torch.Tensor | None = None


def _eps(m) -> float:
    return norm_eps(m) if m is not None else 0.0


def _w(m):
    return local(m.weight) if m is not None else None


def _b(m):
    return local(m.bias) if m.bias is not None else None


class StepBuffers:
    """Static tensors of one decode step for M rows: the inputs runtime/ fills (ids, pos, slots,
    kv_lens), intermediates, and the logits it reads."""

    def __init__(self, st: "DecodeStep", M: int, max_len: int):
        dev, dt, p, tp = st.device, st.dtype, st.plan, st.tp
        n_qkv = (st.n_heads + 2 * st.n_kv_heads) * p.head_dim
        self.M, self.max_len = M, max_len
        self.ids = torch.zeros(M, dtype=torch.long, device=dev)
        self.pos = torch.zeros(M, dtype=torch.long, device=dev)
        self.slots = torch.zeros(M, dtype=torch.long, device=dev)
        self.kv_lens = torch.ones(M, dtype=torch.int32, device=dev)
        self.x = torch.zeros(M, p.hidden, dtype=dt, device=dev)
        self.qkv = torch.zeros(M, n_qkv, dtype=dt, device=dev)
        self.q = torch.zeros(M, st.n_heads, p.head_dim, dtype=dt, device=dev)
        self.attn = torch.zeros(M, st.n_heads * p.head_dim, dtype=dt, device=dev)
        self.act = torch.zeros(M, st.intermediate, dtype=dt, device=dev)
        self.logits = torch.zeros(M, st.vocab, dtype=dt, device=dev)
        # scratch for sublayer outputs that are not just added to x (post-norms, residual multiplier,
        # tensor-parallel partial sums)
        self.tmp = torch.zeros(M, p.hidden, dtype=dt, device=dev) if st.needs_tmp else None
        moe = st.moe_plan
        if moe is not None:   # the MoE block's input (the post-attention norm) and the op's workspace
            self.h = torch.zeros(M, p.hidden, dtype=dt, device=dev)
            self.moe_ws = moe.workspace(M, dev)
            if st.shared_inter:
                self.sact = torch.zeros(M, st.shared_inter, dtype=dt, device=dev)
                self.shared = torch.zeros(M, p.hidden, dtype=dt, device=dev)
        # row-parallel partial sums (None: reduced in place in tmp)
        self.part = tp.partial_buffer((M, p.hidden), dt, dev) if tp is not None else None
        if tp is not None and tp.lm_sharded:
            vl = st.vocab // tp.world
            self.logits_part = torch.zeros(M, vl, dtype=dt, device=dev)
            self.logits_all = torch.zeros(tp.world, M, vl, dtype=dt, device=dev)
        if tp is not None and tp.embed_sharded:
            self.local_ids = torch.zeros(M, dtype=torch.long, device=dev)
            self.in_shard = torch.zeros(M, 1, dtype=torch.bool, device=dev)
            self.below = torch.zeros(M, 1, dtype=torch.bool, device=dev)
        if p.longrope is not None:
            # per-step rope rows: row b holds cos/sin of token b; the kernel then reads row `rows[b]`
            st.ensure_rope_table(max_len)
            rd = st.tables[None][0].shape[1]
            self.rows = torch.arange(M, dtype=torch.long, device=dev)
            self.cos_rows = torch.zeros(M, rd, dtype=dt, device=dev)
            self.sin_rows = torch.zeros(M, rd, dtype=dt, device=dev)
            self.pos_max = torch.zeros((), dtype=torch.long, device=dev)
            self.use_long = torch.zeros((), dtype=torch.long, device=dev)
            self.table_idx = torch.zeros(M, dtype=torch.long, device=dev)
        self.num_splits = default_num_splits(M, st.n_kv_heads, max_len, st.num_sms)
        self.ws = attention_workspace(M, st.n_heads, p.head_dim, self.num_splits, dev)
        # split-K partial sums of the projections (None where no launch config splits K); both norm
        # flags of qkv / gate_up because OLMo2-style layers have no pre-norm (another tile config)
        d_attn = st.n_heads * p.head_dim
        calls = [(M, p.hidden, d_attn, False, False), (M, st.w_lm.shape[0], p.hidden, False, True)]
        calls += [(M, n_qkv, p.hidden, False, norm) for norm in (False, True)]
        if st.intermediate:   # 0 where every layer is a MoE block (no dense MLP to size)
            calls += [(M, p.hidden, st.intermediate, False, False)]
            calls += [(M, st.intermediate, p.hidden, True, norm) for norm in (False, True)]
        if moe is not None and st.shared_inter:
            calls += [(M, st.shared_inter, p.hidden, True, False), (M, p.hidden, st.shared_inter, False, False)]
        self.gemv_ws = step_workspace(calls, quant_calls(M, st.gemv_sites()), dt, dev, st.tuning)


class DecodeStep:
    """Fused weights and RoPE tables of one patched model; runs one decode step (the Triton backend)."""

    backend = "triton"

    def __init__(self, plan: ModelPlan, tuning: Tuning | None = None):
        self.plan, self.tp = plan, plan.tp
        self.tuning = tuning or DEFAULT_TUNING
        lm = weight_of(plan.lm_head)             # a dense tensor or a QuantWeight (quantized lm_head)
        self.device, self.vocab = lm.device, plan.lm_head.out_features
        self.dtype = lm.dtype if plan.quant is None else plan.quant.dtype
        self.w_lm, self.w_embed = lm, local(plan.embed.weight)
        self.views: list = []                    # (module, name) made views of packed QuantWeights
        self.prefill = QuantPrefill(plan.quant) if plan.quant is not None else None
        self.layers, self.tables, self.table_len = [], {}, 0
        try:
            self._build()
        except BaseException:   # never leave packed views or installed forwards behind
            self.release()
            raise

    def _build(self) -> None:
        plan, world = self.plan, self.tp.world if self.tp is not None else 1
        # this rank's heads and MLP slice (all of them on one device)
        self.n_heads, self.n_kv_heads = plan.n_heads // world, plan.n_kv_heads // world
        self.intermediate = plan.intermediate // world
        self.num_layers, self.head_dim = len(plan.layers), plan.head_dim
        self.num_sms = num_sms(self.device)
        self.moe_plan, self.shared_inter = None, 0   # one MoE layer's plan: sizes the step's MoE buffers
        for lp in plan.layers:
            where = f"model.layers.{lp.index}"
            try:
                w_qkv, b_qkv = pack(lp.qkv, self.views)
                w_gu, b_gu = pack(lp.gate_up, self.views, act=True) if lp.moe is None else (None, None)
            except Unsupported as e:
                raise Unsupported(f"{where}: {e}") from None
            eps = (_eps(lp.attn_norm), _eps(lp.mlp_norm), _eps(lp.attn_out_norm), _eps(lp.mlp_out_norm),
                   _eps(lp.q_norm))
            if lp.moe is None:
                self.layers.append(FusedLayer(w_qkv, b_qkv, w_gu, b_gu, weight_of(lp.o), _b(lp.o),
                                              weight_of(lp.down), _b(lp.down), lp, *eps))
                continue
            mp = self.moe_plan = lp.moe
            fl = FusedLayer(w_qkv, b_qkv, None, None, weight_of(lp.o), _b(lp.o), None, None, lp, *eps,
                            moe=mp.op_kwargs())
            if mp.shared_gate_proj is not None:
                fl.w_sgu, _ = pack([mp.shared_gate_proj, mp.shared_up_proj], self.views, act=True)
                fl.w_sdown = weight_of(mp.shared_down_proj)
                self.shared_inter = mp.shared_down_proj.in_features
            self.layers.append(fl)
        # Granite's residual multiplier needs no scratch on one device (GEMV epilogue), only under TP
        self.needs_tmp = self.tp is not None or any(
            lp.attn_out_norm is not None or lp.mlp_out_norm is not None for lp in plan.layers)
        self.rope_keys = sorted({lp.rope_key for lp in plan.layers}, key=lambda k: (k is None, k or ""))
        self.tables: dict = {}      # rope key -> (cos, sin), positions [0, table_len)
        self.table_len = 0
        self.weights_ptr = self._weights_ptr()
        if self.prefill is not None:   # after packing: the prefill forwards read the packed views
            self.prefill.install()

    def _weights_ptr(self) -> int:
        return local(main_tensor(self.plan.layers[0].q)).data_ptr()

    def weights_moved(self) -> bool:
        """True when someone replaced or moved the parameters (model.to(...), load_state_dict with assign):
        layer 0's q weight (the quantized data of a quantized model), lm_head's device, the dense dtype."""
        p = self.plan
        dense = p.embed.weight if p.quant is not None else p.lm_head.weight
        return (self._weights_ptr() != self.weights_ptr or local(main_tensor(p.lm_head)).device != self.device
                or dense.dtype != self.dtype)

    def gemv_sites(self) -> list[tuple]:
        """(weight, act) of every projection the step runs (StepBuffers sizes the split-K workspace from them)."""
        sites = [(self.w_lm, False)]
        for fl in self.layers:
            sites += [(fl.w_qkv, False), (fl.w_o, False), (fl.w_gu, True), (fl.w_down, False), (fl.w_sgu, True),
                      (fl.w_sdown, False)]
        return [s for s in sites if s[0] is not None]

    def release(self) -> None:
        """Undo everything the step changed on the model (also after a half-finished constructor)."""
        if self.prefill is not None:
            self.prefill.remove()
        unpack(self.views)   # packed QuantWeights: every module's parameters get their own copies back
        # only what fuse_linears packed goes back to separate tensors; pre-packed modules are untouched
        groups = [(w, g) for fl in self.layers for w, g in ((fl.w_qkv, fl.plan.qkv), (fl.w_gu, fl.plan.gate_up))]
        groups += [(fl.w_sgu, (fl.plan.moe.shared_gate_proj, fl.plan.moe.shared_up_proj))
                   for fl in self.layers if fl.w_sgu is not None]
        unfuse_linears([m for w, g in groups if len(g) > 1 and not isinstance(w, QuantWeight) for m in g])
        self.layers.clear()
        self.tables.clear()

    # -- rope ----------------------------------------------------------------------------------------
    def _rotary(self, key, length: int):
        pos = torch.arange(length, device=self.device)[None]
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        args = {} if key is None else {"layer_type": key}
        cos, sin = self.plan.rotary(dummy, position_ids=pos, **args)
        if self.plan.spec.rope_half_table:   # gpt-oss rotates halves with head_dim / 2 angles: rotate_half's layout
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()

    def prepare(self, max_len: int) -> None:
        """Whatever positions < max_len need, made outside any captured graph (the RoPE tables)."""
        self.ensure_rope_table(max_len)

    @torch.no_grad()
    def ensure_rope_table(self, length: int) -> None:
        """cos/sin for positions [0, length) from the model's own rotary module (scaling included).

        NoPE layers (key "") get cos = 1, sin = 0: the rope kernel's x*cos + rot(x)*sin is then x
        exactly. Longrope stacks two tables, [short factors; long factors], each `length` rows; the
        step picks one per step on the device (see _rope_inputs)."""
        if length <= self.table_len:
            return
        length = max(length, 2 * self.table_len)
        tables = {}
        for key in self.rope_keys:
            if key == "":
                one = torch.ones(1, self.plan.head_dim, dtype=self.dtype, device=self.device)
                tables[key] = (one.expand(length, -1), torch.zeros_like(one).expand(length, -1))
            elif self.plan.longrope is not None:
                orig = self.plan.longrope
                # stock picks short factors iff max(position_ids) + 1 <= orig for the whole forward:
                # short rows only ever serve positions < orig; long rows are computed with a position
                # range that reaches past orig so the module itself picks the long factors.
                cs, ss = self._rotary(key, min(length, orig))
                cl, sl = self._rotary(key, max(length, orig + 1))
                pad = length - cs.shape[0]
                cs, ss = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (cs, ss))
                tables[key] = (torch.cat([cs, cl[:length]]), torch.cat([ss, sl[:length]]))
            else:
                tables[key] = self._rotary(key, length)
        self.tables, self.table_len = tables, length

    def _rope_inputs(self, b: StepBuffers) -> dict:
        """rope key -> (cos, sin, per-row table index) for this step."""
        if self.plan.longrope is None:
            return {k: (*self.tables[k], b.pos) for k in self.rope_keys}
        # longrope: like stock, long factors for every row iff max(position) + 1 > orig. Gather each
        # row's cos/sin into (M, rope_dim) buffers, so the kernel reads row b for token b.
        torch.amax(b.pos, 0, out=b.pos_max)
        torch.ge(b.pos_max, self.plan.longrope, out=b.use_long)
        torch.add(b.pos, b.use_long, alpha=self.table_len, out=b.table_idx)
        out = {}
        for k in self.rope_keys:
            cos, sin = self.tables[k]
            if k == "":
                out[k] = (cos, sin, b.pos)
                continue
            torch.index_select(cos, 0, b.table_idx, out=b.cos_rows)
            torch.index_select(sin, 0, b.table_idx, out=b.sin_rows)
            out[k] = (b.cos_rows, b.sin_rows, b.rows)
        return out

    def new_buffers(self, M: int, max_len: int) -> StepBuffers:
        return StepBuffers(self, M, max_len)

    # -- the step ------------------------------------------------------------------------------------
    def _sublayer_out(self, b: StepBuffers, h, w, bias, post_norm, eps: float, slot: int) -> None:
        """x += [post_norm](h @ W^T + bias) [* residual_mult], with HF's cast points.

        Tensor parallel: this rank's partial sum is rounded to the dtype, all-reduced, and the bias is
        added after the reduce (once), as transformers' row-wise layer does. `slot`: which of the two
        partial-sum slots of the "flags" reduce (attention 0, MLP 1: consecutive reduces alternate)."""
        p, tp, t = self.plan, self.tp, self.tuning
        direct = post_norm is None   # the sublayer's output goes straight into x (times m for Granite)
        if tp is None:
            if direct:   # x + y, or Granite's x + rnd(y * m), in the GEMV's epilogue
                gemv(h, w, bias=bias, residual=b.x, out=b.x, res_scale=p.residual_mult,
                     workspace=b.gemv_ws, tuning=t)
                return
            gemv(h, w, bias=bias, out=b.tmp, workspace=b.gemv_ws, tuning=t)
        elif isinstance(b.part, FlagPartials):
            gemv(h, w, out=b.part.slot(slot), workspace=b.gemv_ws, tuning=t)
            if direct and p.residual_mult is None:
                b.part.reduce(slot, b.x, residual=b.x, bias=bias)
                return
            b.part.reduce(slot, b.tmp, bias=bias)
        else:
            if direct and p.residual_mult is None and bias is None and t.tp_residual_in_reduce:
                # x = sum over ranks of (rank 0: x + partial, others: partial): the all-reduce does the
                # residual add, saving a kernel per sublayer. Rounds x + partial before the sum where
                # stock rounds the sum first: the same error budget (the TP checks measure it).
                dst = b.x if b.part is None else b.part
                gemv(h, w, residual=b.x if tp.rank == 0 else None, out=dst, workspace=b.gemv_ws, tuning=t)
                tp.reduce_into(b.part, b.x)
                return
            gemv(h, w, out=b.tmp if b.part is None else b.part, workspace=b.gemv_ws, tuning=t)
            tp.reduce_into(b.part, b.tmp)
            if bias is not None:
                b.tmp.add_(bias)
        # b.tmp holds the sublayer's output
        if post_norm is not None:   # HF: residual + post_norm(y)
            if p.residual_mult is None:   # one kernel: norm, then add into x
                rmsnorm(b.tmp, _w(post_norm), eps=eps, norm_mode=p.spec.norm_mode,
                        norm_offset=p.spec.norm_offset, add_to=b.x, out=b.x, tuning=t)
                return
            rmsnorm(b.tmp, _w(post_norm), eps=eps, norm_mode=p.spec.norm_mode,
                    norm_offset=p.spec.norm_offset, out=b.tmp, tuning=t)
        if p.residual_mult is not None:   # HF: residual + y * m (two roundings, as here)
            b.tmp.mul_(p.residual_mult)
        b.x.add_(b.tmp)

    def _embed(self, b: StepBuffers) -> None:
        tp = self.tp
        if tp is None or not tp.embed_sharded:
            torch.index_select(self.w_embed, 0, b.ids, out=b.x)
            return
        # vocab-sharded embedding: rows this rank holds, zeros elsewhere, summed over ranks (exact: one
        # non-zero term per token), as DTensor's masked lookup does for transformers' embedding_rowwise
        n = self.w_embed.shape[0]
        torch.sub(b.ids, tp.vocab_start, out=b.local_ids)
        torch.ge(b.local_ids[:, None], 0, out=b.in_shard)
        torch.lt(b.local_ids[:, None], n, out=b.below)
        b.in_shard.logical_and_(b.below)
        b.local_ids.clamp_(0, n - 1)
        torch.index_select(self.w_embed, 0, b.local_ids, out=b.x)
        b.x.mul_(b.in_shard)
        tp.all_reduce(b.x)

    def agree(self, tokens: torch.Tensor) -> None:
        """Make every rank's copy of `tokens` equal (rank 0's): sampled draws, random states."""
        if self.tp is not None:
            self.tp.broadcast(tokens)

    @torch.no_grad()   # out= ops refuse parameters that require grad; the step is inference only
    def run(self, cache, b: StepBuffers) -> torch.Tensor:
        """One decode step for all b.M rows; reads b.ids/pos/slots/kv_lens, returns b.logits."""
        p = self.plan
        nm, no = p.spec.norm_mode, p.spec.norm_offset
        dq, dk = self.n_heads * p.head_dim, self.n_kv_heads * p.head_dim
        self._embed(b)
        if p.embed_scale is not None:
            b.x.mul_(p.embed_scale)   # HF: embeds * scale (a dtype-rounded tensor or a python float)
        ropes = self._rope_inputs(b)
        full_qk = p.spec.qk_norm == "full"
        t = self.tuning
        for i, fl in enumerate(self.layers):
            lp = fl.plan
            gemv(b.x, fl.w_qkv, bias=fl.b_qkv, norm_weight=_w(lp.attn_norm), eps=fl.eps_attn,
                 norm_mode=nm, norm_offset=no, out=b.qkv, workspace=b.gemv_ws, tuning=t)
            if full_qk:   # OLMo2: one RMSNorm over all heads of q (and of k), in place on the slices
                rmsnorm(b.qkv[:, :dq], _w(lp.q_norm), eps=fl.eps_qk, norm_mode=nm, norm_offset=no,
                        out=b.qkv[:, :dq], tuning=t)
                rmsnorm(b.qkv[:, dq:dq + dk], _w(lp.k_norm), eps=norm_eps(lp.k_norm), norm_mode=nm,
                        norm_offset=no, out=b.qkv[:, dq:dq + dk], tuning=t)
            cos, sin, rows = ropes[lp.rope_key]
            rope_qkv_cache_write(b.qkv, cos, sin, rows, b.slots, cache.k[i], cache.v[i], b.q,
                                 n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=p.head_dim,
                                 q_norm_weight=None if full_qk else _w(lp.q_norm),
                                 k_norm_weight=None if full_qk else _w(lp.k_norm),
                                 eps=fl.eps_qk, norm_mode=nm, norm_offset=no, rope_dim=cos.shape[1], tuning=t)
            decode_attention(b.q, cache.k[i], cache.v[i], b.kv_lens, cache.valid, scale=lp.scale,
                             out=b.attn, softcap=lp.softcap, window=lp.window, num_splits=b.num_splits,
                             workspace=b.ws, sinks=lp.sinks, tuning=t)
            self._sublayer_out(b, b.attn, fl.w_o, fl.b_o, lp.attn_out_norm, fl.eps_attn_out, 0)
            if fl.moe is not None:
                self._moe(b, fl, nm, no)
                continue
            gemv(b.x, fl.w_gu, bias=fl.b_gu, norm_weight=_w(lp.mlp_norm), eps=fl.eps_mlp,
                 norm_mode=nm, norm_offset=no, act=p.act, out=b.act, workspace=b.gemv_ws, tuning=t)
            self._sublayer_out(b, b.act, fl.w_down, fl.b_down, lp.mlp_out_norm, fl.eps_mlp_out, 1)
        return self._head(b)

    def _moe(self, b: StepBuffers, fl: FusedLayer, nm: int, no: float) -> None:
        """x += MoE(rmsnorm(x)) [* Granite's multiplier], the Qwen2-MoE shared expert computed first."""
        t = self.tuning
        rmsnorm(b.x, _w(fl.plan.mlp_norm), eps=fl.eps_mlp, norm_mode=nm, norm_offset=no, out=b.h, tuning=t)
        shared = None
        if fl.w_sgu is not None:
            gemv(b.h, fl.w_sgu, act="silu_mul", out=b.sact, workspace=b.gemv_ws, tuning=t)
            shared = gemv(b.sact, fl.w_sdown, out=b.shared, workspace=b.gemv_ws, tuning=t)
        moe_decode(b.h, b.x, **fl.moe, shared_out=shared, out=b.x, workspace=b.moe_ws, tuning=t)

    def _head(self, b: StepBuffers) -> torch.Tensor:
        """logits = final norm + lm_head of b.x [/ logits_scaling] [soft-cap], gathered under TP."""
        p, tp = self.plan, self.tp
        nm, no = p.spec.norm_mode, p.spec.norm_offset
        lm_out = b.logits_part if tp is not None and tp.lm_sharded else b.logits
        gemv(b.x, self.w_lm, norm_weight=_w(p.final_norm), eps=p.eps,
             norm_mode=nm, norm_offset=no, out=lm_out, workspace=b.gemv_ws, tuning=self.tuning)
        if lm_out is not b.logits:
            tp.gather_logits(lm_out, b.logits_all, b.logits)
        if p.logits_div is not None:      # Granite: logits / logits_scaling, in the model dtype like HF
            b.logits.div_(p.logits_div)
        if p.final_softcap is not None:   # Gemma-2/3: tanh(logits / cap) * cap, each op in the dtype like HF
            b.logits.div_(p.final_softcap).tanh_().mul_(p.final_softcap)
        return b.logits

    def describe(self) -> list[tuple[str, str]]:
        """(module, what replaces its decode work) rows for the PatchReport, read off this step's own
        layers and plan, so they change with the step."""
        p, spec = self.plan, self.plan.spec

        def names(*parts):  # module names as this family calls them (None: the family has no such norm)
            return "+".join(n for n in parts if n)

        rows = []
        for fl in self.layers:
            lp = fl.plan
            pre = "rmsnorm + " if lp.attn_norm is not None else ""
            extra = {"head": " + q/k norm", "full": " + q/k norm (whole projection)"}.get(spec.qk_norm or "", "")
            bias = " + bias" if fl.b_qkv is not None else ""
            win = f", sliding window {lp.window}" if lp.window else ""
            post = " + post-norm" if lp.attn_out_norm is not None else ""
            win += " + sinks" if lp.sinks is not None else ""
            wq = formats(p.quant, dict(zip(spec.proj, (*lp.qkv, lp.o))))
            rows.append((f"model.layers.{lp.index}." + names(spec.attn_norm, spec.attn, spec.attn_out_norm),
                         f"{pre}qkv GEMV{bias}{extra} + rope + cache write; decode attention{win}; "
                         f"o_proj GEMV{post} + residual{wq}"))
            pre = "rmsnorm + " if lp.mlp_norm is not None else ""
            post = " + post-norm" if lp.mlp_out_norm is not None else ""
            where = f"model.layers.{lp.index}." + names(spec.mlp_norm, spec.mlp, spec.mlp_out_norm)
            if lp.moe is not None:
                m = lp.moe
                shared = "; shared expert GEMVs * sigmoid gate" if fl.w_sgu is not None else ""
                rows.append((where, f"{pre}router GEMV + top-{m.top_k} of {m.num_experts} ({m.route}) on the device; "
                                    f"gate_up + {m.act} and down over the selected experts only{shared}; "
                                    f"weighted sum + residual"))
                continue
            wm = formats(p.quant, dict(zip(spec.mlp_proj, (*lp.gate_up, lp.down))))
            rows.append((where, f"{pre}gate_up GEMV + {p.act}; down GEMV{post} + residual{wm}"))
        rows.append(("model.norm+lm_head", "rmsnorm + lm_head GEMV" + formats(p.quant, {"lm_head": p.lm_head})))
        if self.prefill is not None:
            rows.append(("prefill of the quantized Linears", self.prefill.how))
        if self.tp is not None:
            rows.append(("tensor parallelism", self.tp.describe()))
        return rows
