"""The rank layout: how N processes split the work of one training step (report §3.2).

Three kinds of parallelism compose, each a dimension of one grid of ranks:
- pp (pipeline): the blocks are cut into pp stages; a micro-batch flows stage to stage (pipeline.py).
- ep (expert): the N_r routed experts of every MoE layer are split into ep equal slices; tokens travel to the
  rank that holds their expert and back (moe.dispatch_ep, two all-to-alls per MoE layer).
- dp (data): dp = world / pp ranks hold the same stage and see different slices of the global batch; FSDP2 shards
  their parameters, gradients and optimizer states over them.
Expert parallelism does not take ranks of its own: it re-uses the data-parallel ranks of a stage. The dp ranks of
a stage are viewed twice ("parallel folding", as Megatron and torchtitan do):

    dense mesh  (pp, dp)            attention, dense FFNs, gates, shared experts, embedding, head: FSDP over dp
    sparse mesh (pp, efsdp, ep)     routed experts: sliced over ep, each slice FSDP-sharded over efsdp = dp / ep

Rank r sits at dense coordinates (r // dp, r % dp) and sparse coordinates (r // dp, (r % dp) // ep, r % ep), so the
ranks of one ep group are consecutive: with 8 GPUs per node and ep <= 8 the all-to-all stays inside a node.
Picture for 8 ranks, pp 2 × dp 4, ep 2 (efsdp 2):

    stage 0:  rank 0 1 2 3        ep groups {0,1} {2,3}   efsdp groups {0,2} {1,3}   dp group {0,1,2,3}
    stage 1:  rank 4 5 6 7        ep groups {4,5} {6,7}   efsdp groups {4,6} {5,7}   dp group {4,5,6,7}

Every rank builds the model from the same seed (FSDP2 does not broadcast weights, so identical initialisation is
what makes the replicas agree), draws the same global batch from one data generator and keeps its dp slice:
one data state to checkpoint, and exact equality with one process on the whole batch.

Processes are started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); gloo on
CPU, NCCL on CUDA. `python train.py` without torchrun uses no process group at all (`Layout.single()`).

No rank may leave the others waiting: sizes are checked on every rank before the process group exists (the same
error everywhere); a step that only rank 0 does (building the data cache, locking the run folder) tells the
others whether it failed (`rank0_first`); a signal one rank received is acted on by all after the same step
(`signals_as_flag`, `any_rank`); and any collective gives up after the process group's timeout. Checkpoints of
a distributed run: checkpoint.py, distributed section.

Sections: layout and init; seeding and data; rank-0 output and agreement; expert and data parallelism on the
model (FSDP2, clipping). The pipeline stages built on this layout: pipeline.py.
"""
import contextlib
import datetime
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import checkpoint


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_sizes(world: int, ep: int, pp: int, n_experts: int = None) -> int:
    """dp = world / pp data-parallel ranks per stage, split into groups of ep that share out the experts; raises
    ValueError when the ranks or the experts do not divide."""
    for name, v in (("ep", ep), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name}={v!r}: must be a positive integer")
    if world % (ep * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by ep × pp = {ep} × {pp}")
    if n_experts is not None and n_experts % ep != 0:
        raise ValueError(f"--ep {ep}: the {n_experts} routed experts do not split evenly over {ep} ranks")
    return world // pp


@dataclass
class Layout:
    """Where this process sits in the grid; the meshes are None in a single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    pp: int = 1
    dp: int = 1
    ep: int = 1
    backend: str = "none"
    device: torch.device = torch.device("cpu")
    dense: DeviceMesh = None  # (pp, dp)
    sparse: DeviceMesh = None  # (pp, efsdp, ep)

    @classmethod
    def single(cls, device: torch.device = torch.device("cpu")) -> "Layout":
        return cls(device=device)

    @property
    def distributed(self) -> bool:
        return self.dense is not None

    @property
    def efsdp(self) -> int:
        return self.dp // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def group(self, name: str):
        """The process group of one mesh dimension ("pp", "dp", "efsdp" or "ep"); None in a single process."""
        if not self.distributed:
            return None
        return (self.dense if name in ("pp", "dp") else self.sparse)[name].get_group()

    def describe(self) -> str:
        """E.g. "dp 4 (ep 2 × efsdp 2) × pp 1 on 4 ranks, gloo": dp × pp = ranks; the parenthesis says how
        the dp ranks of a stage hold the experts (ep slices, each on efsdp ranks)."""
        return (f"dp {self.dp} (ep {self.ep} × efsdp {self.efsdp}) × pp {self.pp} on {self.world} ranks, "
                f"{self.backend}")


# -- init and teardown --------------------------------------------------------------------------------------------
def init(ep: int = 1, pp: int = 1, device: str = "auto", timeout_s: float = 600.0, n_experts: int = None) -> Layout:
    """Join the process group torchrun prepared and build both meshes; without torchrun, a single process.

    Every rank checks the sizes before any collective, so bad input fails on all ranks alike (no hang).
    `timeout_s`: a collective that waits longer (a dead or stuck rank) raises instead of blocking forever."""
    if not under_torchrun():
        if ep > 1 or pp > 1:
            raise ValueError(f"--ep {ep} --pp {pp} needs several processes: start with "
                             f"torchrun --nproc_per_node N train.py ...")
        return Layout.single(checkpoint.pick_device(device))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dp = check_sizes(world, ep, pp, n_experts)
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return Layout(rank, world, local_rank, pp, dp, ep, backend, dev, *build_meshes(dev.type, world, pp, dp, ep))


def build_meshes(device_type: str, world: int, pp: int, dp: int, ep: int):
    """Two views of the same ranks: dense (pp, dp) and sparse (pp, efsdp, ep), ep the fastest-varying."""
    ranks = torch.arange(world)
    dense = DeviceMesh(device_type, ranks.view(pp, dp), mesh_dim_names=("pp", "dp"))
    sparse = DeviceMesh(device_type, ranks.view(pp, dp // ep, ep), mesh_dim_names=("pp", "efsdp", "ep"))
    return dense, sparse


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """checkpoint.pick_device, except that a plain "cuda" (or auto) under torchrun means this rank's own GPU."""
    dev = checkpoint.pick_device(name)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


# -- seeding and data ---------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    """The same seed on every rank: identical initial weights everywhere (FSDP2 does not broadcast them)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def dp_slice(batch: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's rows of a global batch (B·dp, ...) that every rank drew alike → (B, ...)."""
    if batch.shape[0] % layout.dp != 0:
        raise ValueError(f"global batch of {batch.shape[0]} rows does not split over dp = {layout.dp}")
    B = batch.shape[0] // layout.dp
    return batch[layout.dp_rank * B:(layout.dp_rank + 1) * B]


def get_batch(corpus, split: str, batch_size: int, block_size: int, gen: torch.Generator, layout: Layout,
              device="cpu"):
    """Draw the global batch (batch_size·dp sequences) from the shared generator, keep this rank's slice."""
    x, y = corpus.get_batch(split, batch_size * layout.dp, block_size, gen, "cpu")  # (B·dp, T) each
    x, y = dp_slice(x, layout), dp_slice(y, layout)  # (B, T) each
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -- rank-0 output ------------------------------------------------------------------------------------------------
def quiet_other_ranks(layout: Layout) -> None:
    """Ranks other than 0 print nothing but errors: their stdout goes to /dev/null (stderr stays)."""
    if not layout.is_main:
        sys.stdout = open(os.devnull, "w")


def print0(*args, layout: Layout = None, **kw) -> None:
    if layout is None or layout.is_main:
        print(*args, **kw)


def any_rank(flag: bool, layout: Layout) -> bool:
    """True on every rank iff `flag` is true on at least one (one all-reduce): lets all ranks act together on
    something only some of them saw (a signal, a local failure)."""
    if not layout.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=layout.device)
    dist.all_reduce(t)
    return t.item() > 0


def mean_over_dp(values: dict, layout: Layout) -> dict:
    """{name: number or 0-d tensor} → the same names, each the mean over the data-parallel ranks (one all-reduce)."""
    names = list(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(layout.device) for k in names])
    dist.all_reduce(t, group=layout.group("dp"))
    return {k: v / layout.dp for k, v in zip(names, t)}


def sum_over_dp(tensors: list, layout: Layout) -> list:
    """Equal-shaped tensors (e.g. each MoE layer's token counts) summed over the data-parallel ranks."""
    t = torch.stack(tensors).to(layout.device)
    dist.all_reduce(t, group=layout.group("dp"))
    return list(t.cpu())


def sum_over_pp(values: dict, layout: Layout) -> dict:
    """{name: number or 0-d tensor} summed over the ranks of this rank's pipeline (one all-reduce); unchanged
    without pipeline stages."""
    if not (layout.distributed and layout.pp > 1):
        return values
    names = list(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(layout.device) for k in names])
    dist.all_reduce(t, group=layout.group("pp"))
    return dict(zip(names, t))


def max_over_pp(value: float, layout: Layout) -> float:
    """The largest value over the ranks of this rank's pipeline (each stage reports on its own layers)."""
    if not (layout.distributed and layout.pp > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=layout.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=layout.group("pp"))
    return t.item()


class StopRequest:
    """The first SIGINT or SIGTERM this process received inside `signals_as_flag` (None: none)."""
    signum = None


@contextlib.contextmanager
def signals_as_flag():
    """Inside the block Ctrl-C and SIGTERM (torchrun forwards both to every rank) only note the signal. A rank must
    not leave the step on its own: the others would wait for it in the next collective. The training loop asks
    `any_rank(stop.signum is not None)` once per step, and all ranks save and stop together."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def note(signum, _frame):
        stop.signum = stop.signum or signum

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class PeerFailed(RuntimeError):
    """Another rank failed and has reported why; this rank only stops (and prints nothing)."""


def rank0_first(fn, layout: Layout):
    """Run fn() on rank 0, then, if it succeeded, on the others: e.g. build a cache once, then read it everywhere.
    If rank 0 raises, it re-raises there and the other ranks raise PeerFailed: no rank waits forever."""
    if not layout.distributed:
        return fn()
    result, error = None, None
    if layout.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the others know
            error = e
    failed = torch.tensor([1 if error is not None else 0], device=layout.device)
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if failed.item():
        raise PeerFailed("rank 0 failed")
    return result if layout.is_main else fn()


# -- expert and data parallelism on the model ---------------------------------------------------------------------
def parallelize(model, layout: Layout, reshard_after_forward: bool = True):
    """Expert parallelism, then FSDP2 (ZeRO-3 style sharding of parameters, gradients and optimizer states).

    - MoE layers: the routed experts are cut over the ep ranks (moe.MoE.shard) and FSDP-sharded over efsdp.
      Their gradient already sums the tokens of all ep ranks (the combine all-to-all brought them back), and the
      efsdp reduce-scatter sums the rest: divided by dp (not by efsdp) it is the mean over the dp ranks like
      every other gradient. `segments` is called from outside `forward`, so FSDP must hook it to gather the
      weights. With efsdp = 1 there is nothing to shard: a gradient hook divides by dp instead.
    - One FSDP unit per block and per MTP module (gathered just before use, freed after), and the root for the
      embedding, final norm and head. The gate biases b_i are buffers: FSDP leaves them replicated, and the
      one-all-reduce bias update keeps them equal.
    Parameters stay fp32 (the router reads them in fp32); bf16 compute comes from autocast, as in one process.
    Gloo has no averaging reduce-scatter: there FSDP sums, then divides."""
    from torch.distributed.fsdp import fully_shard
    if not layout.distributed:
        return model
    on_gloo = layout.backend == "gloo"
    shard_experts(model.moe_layers(), layout, reshard_after_forward)
    if layout.dp == 1:
        return model
    dp_mesh = layout.dense["dp"]
    unsharded_experts = set() if layout.efsdp > 1 else {p for m in model.moe_layers() for p in m.experts.parameters()}
    for unit in list(model.layers) + list(model.mtp) + [model]:
        fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=unsharded_experts or None)
        unit.set_force_sum_reduction_for_comms(on_gloo)
    return model


def shard_experts(moe_layers, layout: Layout, reshard_after_forward: bool = True) -> None:
    """The expert half of `parallelize`: routed experts cut over ep, FSDP-sharded over efsdp."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    on_gloo = layout.backend == "gloo"
    for moe in moe_layers:
        if layout.ep > 1:
            moe.shard(layout.sparse["ep"])
        if layout.efsdp > 1:
            fully_shard(moe.experts, mesh=layout.sparse["efsdp"], reshard_after_forward=reshard_after_forward)
            moe.experts.set_gradient_divide_factor(float(layout.dp))
            moe.experts.set_force_sum_reduction_for_comms(on_gloo)
            register_fsdp_forward_method(moe.experts, "segments")
        elif layout.dp > 1:
            for p in moe.experts.parameters():
                p.register_hook(lambda g, dp=layout.dp: g / dp)


def set_gradient_sync(model, sync: bool) -> None:
    """Gradient accumulation: reduce-scatter only after the last micro-batch of a step (FSDP2 keeps the
    unsharded gradients of the others), so grad_accum micro-batches cost one gradient sync, not grad_accum."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def _mesh_of(t):
    return getattr(t, "device_mesh", None)  # a DTensor's mesh; None for a plain tensor


def _sharding(t) -> tuple:
    """(mesh, the mesh dimensions t is sharded over) of a DTensor; (None, ()) for a plain tensor."""
    mesh = _mesh_of(t)
    if mesh is None:
        return None, ()
    return mesh, tuple(i for i, pl in enumerate(t.placements) if not pl.is_replicate())  # FSDP2 over ep: strided


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, layout: Layout = None) -> torch.Tensor:
    """Clip the global gradient norm when gradients live on different meshes (dense dp, sparse efsdp × ep).

    torch's clip_grad_norm_ cannot mix meshes in one norm. Here, for each group of gradients sharded alike:
    ‖g‖² of this rank's shards, summed over the ranks of every mesh dimension they are sharded over (one
    all-reduce a dimension; replicated dimensions hold copies and are not summed); then √(Σ ‖g‖²) over the groups,
    and with pipeline stages over the stages too; then every gradient is scaled by min(1, max_norm / ‖g‖).
    Returns ‖g‖ before clipping (a plain tensor, the same on all ranks)."""
    by_sharding = {}
    for p in params:
        if p.grad is not None:
            by_sharding.setdefault(_sharding(p.grad), []).append(p)
    squares = []
    for (mesh, dims), ps in by_sharding.items():
        local = [p.grad.to_local() if mesh is not None else p.grad for p in ps]
        sq = torch.nn.utils.get_total_norm(local).double() ** 2
        for d in dims:  # the shards' squares summed over the ranks that hold the other shards
            dist.all_reduce(sq, group=mesh.get_group(d))
        squares.append(sq)
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    if layout is not None and layout.distributed and layout.pp > 1:
        dist.all_reduce(total, group=layout.group("pp"))  # every stage holds different parameters
    total = total.sqrt()
    for ps in by_sharding.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total.to(ps[0].grad.dtype))
    return total


def gather_full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded parameter, on every rank."""
    return t.full_tensor() if _mesh_of(t) is not None else t
