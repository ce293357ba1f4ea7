"""Tensor parallelism: what a transformers `tp_plan="auto"` model holds on each rank, checked against
what the fused step assumes, and the collectives the step runs.

transformers shards a TP model's parameters as DTensors over a 1-D "tp" device mesh (torchrun, one
process per GPU): q/k/v and gate/up column-wise (Shard(0): each rank owns whole heads and a slice of
the intermediate), o_proj and down row-wise (Shard(1): each rank computes a partial sum, all-reduced
before the residual add, bias added once after it), the embedding either replicated or vocab-sharded
(partial lookups summed), lm_head column-wise with its output gathered. The fused step runs each rank
on its local shards (`local()` is the DTensor's own storage, no copy) with the same collectives stock
runs, in the same order, so each rank's cast points match stock's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels.tp_reduce import programs_for, tp_reduce
from ..tuning import DEFAULT as DEFAULT_TUNING
from ..tuning import Tuning

try:  # torch builds without distributed support have no DTensor: then nothing is sharded
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - such builds are rare
    DTensor = None

# transformers tp_plan styles whose layout the fused step reproduces, per role of a fused module
STYLES = {
    "col": {"colwise"},
    "row": {"rowwise"},
    "replicated": {None, "replicate", "replicated_with_grad_allreduce"},
    "embed": {None, "embedding_rowwise"},
    "lm_head": {None, "colwise_gather_output", "colwise_rep"},
}


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """This rank's shard of a parameter (its own storage, not a copy); plain tensors as they are."""
    return t.to_local() if is_dtensor(t) else t


def has_dtensors(model) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def _style(plan: dict, name: str):
    """The tp_plan style of module `name` (exact key or its layer-number wildcard), else None."""
    if name in plan:
        return plan[name]
    return plan.get(re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name))


@dataclass(eq=False)
class TPComm:
    """The process group of a TP model and the collectives of one fused decode step."""
    group: object
    world: int
    rank: int
    src: int                 # global rank of the group's rank 0 (broadcast source)
    embed_sharded: bool      # embedding rows split over ranks: masked local lookup + all-reduce
    vocab_start: int         # first embedding row this rank holds
    lm_sharded: bool         # lm_head rows split over ranks: local logits + all-gather
    # the group's backend ("nccl", "gloo"), "symm" (torch's symmetric-memory one-shot) or "flags" (ours:
    # kernels/tp_reduce.py over symmetric memory, residual and bias folded in)
    all_reduce_impl: str = "nccl"
    note: str | None = None         # why the faster all-reduce is not used, for the report
    device: torch.device = torch.device("cpu")   # this rank's device
    tuning: Tuning = DEFAULT_TUNING              # the launch knobs of the flag reduce

    def all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, group=self.group)

    def partial_buffer(self, shape, dtype, device):
        """Where a row-parallel GEMV writes its partial sums: symmetric memory that peers read directly
        ("flags": `FlagPartials`, two slots, up to FLAGS_MAX_ELEMS; "symm" and bigger "flags" buffers: one
        tensor for torch's one-shot op), None for the group's backend (which reduces the output in place)."""
        if self.all_reduce_impl == "flags" and shape[0] * shape[1] <= FLAGS_MAX_ELEMS:
            return FlagPartials(self, shape, dtype, device)
        if self.all_reduce_impl not in ("symm", "flags"):
            return None
        import torch.distributed._symmetric_memory as symm_mem
        t = symm_mem.empty(shape, dtype=dtype, device=device)
        symm_mem.rendezvous(t, self.group.group_name)
        return t

    def reduce_into(self, part: torch.Tensor | None, out: torch.Tensor) -> None:
        """out <- sum over ranks of `part` (None: of `out` itself, in place)."""
        if part is None:
            dist.all_reduce(out, group=self.group)
        else:
            torch.ops.symm_mem.one_shot_all_reduce_out(part, "sum", self.group.group_name, out)

    def gather_logits(self, part: torch.Tensor, gathered: torch.Tensor, out: torch.Tensor) -> None:
        """out (M, V) <- the ranks' (M, V / world) slices, in rank order (gathered: (world, M, V / world))."""
        dist.all_gather_into_tensor(gathered.flatten(0, 1), part, group=self.group)
        M, Vl = part.shape
        out.view(M, self.world, Vl).copy_(gathered.transpose(0, 1))

    def broadcast(self, t: torch.Tensor) -> None:
        """t <- rank 0's t. A host tensor (a random state) travels through the device for NCCL, which
        moves CUDA tensors only; device tensors go as they are (no host sync: capturable)."""
        if t.device.type == "cpu" and self.device.type == "cuda":
            tmp = t.to(self.device)
            dist.broadcast(tmp, src=self.src, group=self.group)
            t.copy_(tmp.cpu())
            return
        dist.broadcast(t, src=self.src, group=self.group)

    def describe(self) -> str:
        impl = self.all_reduce_impl
        if impl == "flags":
            impl = f"flags all-reduce (torch's one-shot above {FLAGS_MAX_ELEMS} elements)"
        else:
            impl += " all-reduce"
        return (f"rank {self.rank} of {self.world}: local heads and MLP slice, {impl} after "
                f"o_proj and down{', vocab-sharded embedding' if self.embed_sharded else ''}"
                f"{', lm_head logits all-gathered' if self.lm_sharded else ''}")


# Largest (rows x hidden) the flags reduce takes; bigger batches use torch's one-shot op. Measured on 2x
# H200, Llama-3.1-8B TP=2 (benchmarks/results/2026-11-26-h200x2-tp, run 10): batch 1 (4,096 elements)
# flags 2.63 ms/step vs symm 2.86; batch 16 (65,536) flags 5.81 vs symm 5.02. Batches 2-8 unmeasured:
# the cut keeps flags up to 4 rows of an 8B model.
FLAGS_MAX_ELEMS = 16384


class FlagPartials:
    """Two partial-sum slots (attention output, MLP output) and the flag words of `tp_reduce`, in one
    symmetric-memory allocation that every rank of the group maps.

    The flags are zeroed and the device synchronised before the rendezvous: a peer learns this
    buffer's address only from the rendezvous, so no signal of its can land before the zeros."""

    def __init__(self, comm: "TPComm", shape, dtype, device):
        import torch.distributed._symmetric_memory as symm_mem
        M, N = shape
        n = M * N
        self.shape, self.rank, self.world, self.n = (M, N), comm.rank, comm.world, n
        self.tuning = comm.tuning
        self.nprog = programs_for(n)
        data_bytes = -(-2 * n * dtype.itemsize // 16) * 16
        buf = symm_mem.empty(data_bytes + comm.world * self.nprog * 8, dtype=torch.uint8, device=device)
        buf.zero_()
        torch.cuda.synchronize(device)
        h = symm_mem.rendezvous(buf, comm.group.group_name)
        off = buf.data_ptr() - h.buffer_ptrs[comm.rank]   # the tensor's place in its allocation
        bases = [int(p) + off for p in h.buffer_ptrs]
        self._buf, self._handle = buf, h                  # keep the mapping alive as long as the slots
        self.data = buf[:data_bytes].view(dtype)
        self.data_ptrs = torch.tensor(bases, dtype=torch.int64, device=device)
        self.flag_ptrs = torch.tensor([b + data_bytes for b in bases], dtype=torch.int64, device=device)
        self.counters = torch.zeros(self.nprog, dtype=torch.int64, device=device)

    def slot(self, k: int) -> torch.Tensor:
        return self.data[k * self.n:(k + 1) * self.n].view(self.shape)

    def reduce(self, k: int, out: torch.Tensor, residual: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> None:
        """out <- [residual +] [bias +] sum over ranks of slot k (every rank gets the same bits)."""
        tp_reduce(self.data_ptrs, self.flag_ptrs, self.counters, k * self.n, self.rank, self.world, out,
                  residual=residual, bias=bias, nprog=self.nprog, tuning=self.tuning)


class TPMismatch(Exception):
    """A TP layout the fused step does not reproduce (the caller turns it into Unsupported)."""


def _mesh_group(mesh):
    if mesh.ndim == 1:
        return mesh.get_group()
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        raise TPMismatch(f"{mesh.ndim}-D device mesh without a 'tp' dimension")
    others = [n for n in names if n != "tp" and mesh[n].size() > 1]
    if others:
        raise TPMismatch(f"device mesh also shards over {others} (only tensor parallelism is fused)")
    return mesh.get_group("tp")


def _placement(p):
    return tuple(p.placements) if is_dtensor(p) else None


def _wanted(role: str, pname: str) -> set:
    rep = {None, (Replicate(),)}
    if role == "col":
        return {(Shard(0),)}
    if role == "row":   # the row-wise bias is added once, after the all-reduce
        return {(Shard(1),)} if pname == "weight" else rep
    if role in ("embed", "lm_head"):
        return rep | {(Shard(0),)}
    return rep


def tp_layout(model, roles: dict[str, tuple[str, object]], n_heads: int, n_kv: int,
              tuning: Tuning = DEFAULT_TUNING) -> TPComm | None:
    """Check every sharded parameter against the role of its module; None when nothing is sharded.

    roles: module name -> (role, module) for every module the fused step reads (see STYLES)."""
    sharded = {n: p for n, p in model.named_parameters() if is_dtensor(p)}
    if not sharded:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise TPMismatch("parameters are DTensors but torch.distributed is not initialised")
    mesh = next(iter(sharded.values())).device_mesh
    if any(p.device_mesh != mesh for p in sharded.values()):
        raise TPMismatch("parameters live on several device meshes")
    group = _mesh_group(mesh)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if n_heads % world or n_kv % world:
        raise TPMismatch(f"{n_heads} query / {n_kv} key-value heads do not split evenly over {world} ranks")
    plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
    seen = set()
    embed_sharded = lm_sharded = False
    for name, (role, module) in roles.items():
        style = _style(plan, name)
        if style not in STYLES[role]:
            raise TPMismatch(f"{name}: tp_plan style {style!r} (fused for this module: "
                             f"{sorted(map(str, STYLES[role]))})")
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            seen.add(full)
            pl = _placement(p)
            if pl not in _wanted(role, pname):
                raise TPMismatch(f"{full}: placement {pl} where the fused step needs one of "
                                 f"{sorted(map(str, _wanted(role, pname)))} (None: a plain tensor)")
            if pl is not None and any(isinstance(s, Shard) for s in pl):
                d = pl[0].dim
                if p.shape[d] % world:
                    raise TPMismatch(f"{full}: dim {d} of size {p.shape[d]} does not split evenly over {world} ranks")
            if role == "embed":
                embed_sharded = pl == (Shard(0),)
            if role == "lm_head":
                lm_sharded = pl == (Shard(0),)
    unknown = sorted(set(sharded) - seen)
    if unknown:
        raise TPMismatch(f"sharded parameters outside the fused modules: {unknown[:3]}")
    vocab_start = rank * (local(model.get_input_embeddings().weight).shape[0]) if embed_sharded else 0
    device = next(iter(sharded.values())).device
    impl, note = _choose_all_reduce(group, device, tuning.tp_allreduce)
    return TPComm(group, world, rank, dist.get_global_rank(group, 0), embed_sharded, vocab_start, lm_sharded,
                  impl, note, device, tuning)


def _choose_all_reduce(group, device, want: str = "auto") -> tuple[str, str | None]:
    """("flags", None) when every rank can map symmetric memory (CUDA, NVLink/P2P peers): our flag-synced
    reduce kernel, part of the PDL chain (kernels/tp_reduce.py); "symm" is torch's one-shot op over the
    same memory (cut Llama-3.1-8B TP=2 batch 1 from 3.05 to 2.77-2.92 ms/step against NCCL on 2 H200s);
    else the group's own backend, with the reason. Tuning.tp_allreduce = nccl|symm|flags forces one
    (BRAID_TP_ALLREDUCE)."""
    backend = str(dist.get_backend(group))
    if device.type != "cuda":
        if want in ("symm", "flags"):
            raise ValueError(f"tp_allreduce={want!r} (BRAID_TP_ALLREDUCE) needs CUDA devices (symmetric memory)")
        return backend, None
    if want == "nccl":
        return backend, None
    why = None
    try:   # every rank tries, then all agree: a rank that cannot must not leave the others waiting
        import torch.distributed._symmetric_memory as symm_mem
        probe = symm_mem.empty(16, dtype=torch.float32, device=device)
        symm_mem.rendezvous(probe, group.group_name)
        # "flags" needs the one-shot op too: it takes the buffers above FLAGS_MAX_ELEMS
        ok = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
        if not ok:
            why = "this torch has no symm_mem.one_shot_all_reduce_out"
    except Exception as e:  # no P2P access, an old torch, ...
        ok, why = False, f"{type(e).__name__}: {e}"
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if int(flag.item()):
        return ("symm" if want == "symm" else "flags"), None
    why = why or "another rank could not map symmetric memory"
    if want != "auto":
        raise ValueError(f"tp_allreduce={want!r} (BRAID_TP_ALLREDUCE): {why}")
    return backend, f"symmetric-memory all-reduce unavailable ({why}); using {backend}"
