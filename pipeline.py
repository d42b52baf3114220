"""Pipeline parallelism (report §3.2.1): stages cut from model.py's blocks, run by torch.distributed.pipelining's
Schedule1F1B or ScheduleDualPipeV; the V layout puts embedding, head and MTP on one rank; every loss is scaled per
micro-batch where it is made. dualpipe.py holds the readable schedules (generator, timeline, simulator).

The rank layout these stages live on (pp × dp, ep inside dp), FSDP2 and clipping across meshes are parallel.py's;
`Pipeline`, at the end, is what train.py drives.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from layers import at_least_fp32
from moe import MoE, update_biases
from mtp import mtp_hidden, mtp_loss, mtp_accuracy
from parallel import Layout, clip_grad_norm, shard_experts

# Pipeline parallelism (PP) cuts the blocks into S stages and streams micro-batches through them
# (torch.distributed.pipelining runs the schedule; dualpipe.py explains and simulates it).
#   1F1B       S = pp stages, rank r holds stage r.
#   DualPipeV  S = 2·pp stages in a V: rank r holds stage r and stage S-1-r, so rank 0 holds both the first
#              stage (embedding) and the last (final norm, head, MTP): the MTP module reads the very embedding
#              and head the main model trains (report §2.2, §3.2.1), with no copy to keep in sync.
# Under 1F1B the last stage sits on the last rank, so it keeps its own copy of the embedding for MTP; the two
# copies start equal (identical init on every rank) and stay equal because their gradients are summed between
# the first and the last rank before each optimizer step (`sync_embedding_grads`), as Megatron-LM does.
#
# Losses and gradient scale. A stage's loss is the mean over its micro-batch; the step's loss is the mean over
# the M micro-batches. torch's schedules divide each stage's gradients by M after the step (scale_grads), but a
# parameter held by two stages of one rank (the embedding under DualPipeV) would be divided twice, so here the
# schedule runs with scale_grads=False and every loss is divided by M where it is made:
#   - the last stage returns (L_main + λ·L_MTP + α·Σ L_Bal of its MoE layers) / M, and the schedule seeds its
#     backward with 1;
#   - every other stage adds α·Σ L_Bal of its MoE layers / M through `InjectLoss`, which seeds that loss with
#     the same 1 when the gradient of the stage output comes back.
# Sum over micro-batches = the one-process loss of the whole batch (equal micro-batches), so the gradients are
# the same as one process computes.
class InjectLoss(torch.autograd.Function):
    """y = h in the forward; in the backward, h gets its gradient and `aux` (a scalar loss made inside this stage)
    gets 1, as if it had been added to the final loss. The output is a clone: a Function returning its input
    itself makes y a view of h, and DualPipeV's split backward (input gradients first, weights later) cannot
    detach a view in place."""

    @staticmethod
    def forward(ctx, h, aux):
        ctx.aux_dtype = aux.dtype
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


def stage_layers(n_layers: int, n_stages: int, index: int) -> range:
    """Blocks of stage `index` when n_layers blocks are cut into n_stages equal stages."""
    if n_stages < 1 or n_layers % n_stages:
        raise ValueError(f"pipeline: {n_layers} blocks cannot be cut into {n_stages} equal stages "
                         f"(n_layers must be divisible by the stage count)")
    per = n_layers // n_stages
    return range(index * per, (index + 1) * per)


def stage_indices(kind: str, pp: int, pp_rank: int) -> list:
    """The stages rank `pp_rank` holds: [r] for 1F1B, [r, 2·pp-1-r] for DualPipeV (the V layout)."""
    if kind == "1f1b":
        return [pp_rank]
    if kind == "dualpipev":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"pipeline schedule must be '1f1b' or 'dualpipev', got {kind!r}")


class StageModule(nn.Module):
    """One pipeline stage of a `model.Transformer`: a slice of its blocks, with the embedding on the first stage
    and the final norm, head and MTP modules (and the embedding MTP reads) on the last.

    The submodules are the model's own (by reference), under the model's names (`layers.5.attn...`), so that a
    stage's state dict is a slice of the model's. forward(x, tokens, targets): x is the token ids on the first
    stage and the hidden state (B, T, d) elsewhere; tokens and targets (B, T) reach every stage (the
    schedule's keyword arguments). Returns the hidden state, or on the last stage the scaled loss."""

    def __init__(self, model: nn.Module, index: int, n_stages: int, n_micro: int, lam: float, alpha: float):
        super().__init__()
        self.index, self.is_first, self.is_last = index, index == 0, index == n_stages - 1
        self.has_mtp = len(model.mtp) > 0
        self.n_micro, self.lam, self.alpha = n_micro, lam, alpha
        blocks = stage_layers(model.cfg.n_layers, n_stages, index)
        self.embed = model.embed if self.is_first or (self.is_last and len(model.mtp)) else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in blocks})
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self.register_buffer("freqs_cis", model.freqs_cis, persistent=False)
        self.dim, self.hidden_dtype = model.cfg.dim, model.embed.weight.dtype  # what flows between stages
        self.logged = []  # per micro-batch: detached loss parts of this stage, for logging

    def balance(self, blocks) -> torch.Tensor:
        """Σ L_Bal of the MoE layers among `blocks` in this forward (unweighted)."""
        parts = [b.ffn.balance_loss for b in blocks if isinstance(b.ffn, MoE)]
        return torch.stack(parts).sum() if parts else torch.zeros(())

    def forward(self, x, tokens, targets):
        T = tokens.shape[1]
        freqs_cis = self.freqs_cis[:T]
        h = self.embed(x) if self.is_first else x  # (B, T, d)
        for block in self.layers.values():
            h = block(h, freqs_cis)
        if not self.is_last:
            balance = self.balance(self.layers.values())
            self.logged.append({"balance": balance.detach()})
            if self.training and balance.requires_grad:
                h = InjectLoss.apply(h, self.alpha * balance / self.n_micro)
            return h
        return self.last_stage_loss(h, tokens, targets, freqs_cis)

    def last_stage_loss(self, h, tokens, targets, freqs_cis):
        """(L_main + λ·L_MTP + α·Σ L_Bal) / M, the same objective as train.py, of one micro-batch."""
        h = self.norm(h)
        logits = self.head(h)  # (B, T, V)
        V = logits.shape[-1]
        main = F.cross_entropy(at_least_fp32(logits).reshape(-1, V), targets.reshape(-1))
        blocks = list(self.layers.values())
        zero = main.new_zeros(())
        mtp, acc = zero, zero
        if len(self.mtp) and tokens.shape[1] > len(self.mtp):
            mtp_logits = [self.head(hk) for hk in mtp_hidden(self.mtp, h, tokens, self.embed, freqs_cis)]
            mtp, acc = mtp_loss(mtp_logits, targets), mtp_accuracy(mtp_logits[0], targets)
            blocks += [m.block for m in self.mtp]
        balance = self.balance(blocks).to(main.dtype)
        loss = main + self.lam * mtp + self.alpha * balance
        self.logged.append({"main": main.detach(), "mtp": mtp.detach(), "mtp_acc": acc.detach(),
                            "balance": balance.detach()})
        return loss / self.n_micro


def _last_stage_loss(loss, target):
    """The schedule's loss function: the last stage has already made the (scaled) loss."""
    return loss


def pipeline_step(schedule, mods, x, y) -> list:
    """One forward and backward of the whole batch x, y (B, T) through the pipeline; gradients accumulate into
    the stage modules. Every rank of the pipeline passes the same x and y. Returns the per-micro-batch scaled
    losses on the rank that holds the last stage ([] elsewhere); `pipeline_metrics` reads the loss parts."""
    for m in mods:
        m.logged.clear()
    losses = []
    # x feeds the first stage; tokens and targets (keyword arguments) reach every stage, the last uses them;
    # target is what torch hands to the loss function, which has nothing left to do.
    schedule.step(x, tokens=x, targets=y, target=y, losses=losses, return_outputs=False)
    return losses


@torch.no_grad()
def pipeline_forward(mods, kind: str, layout: Layout, x, y, n_micro: int) -> None:
    """Forward only (evaluation; put the stage modules in eval mode first): micro-batch after micro-batch,
    stage after stage, with plain send/recv and no schedule (torch 2.13's DualPipeV cannot run forward-only).
    `pipeline_metrics` then reads the loss parts."""
    n_stages = layout.pp * (2 if kind == "dualpipev" else 1)
    holder = [s if s < layout.pp else n_stages - 1 - s for s in range(n_stages)]  # the pp rank of each stage
    mine, group, me = {m.index: m for m in mods}, layout.group("pp"), layout.pp_rank
    for m in mods:
        m.logged.clear()
    for xm, ym in zip(x.tensor_split(n_micro), y.tensor_split(n_micro)):  # (B/M, T) each
        h = xm
        for s in (s for s in range(n_stages) if holder[s] == me):
            if s > 0 and holder[s - 1] != me:  # the hidden state (B/M, T, d) from the previous stage's rank
                h = torch.empty(*xm.shape, mine[s].dim, dtype=mine[s].hidden_dtype, device=xm.device)
                dist.recv(h, group=group, group_src=holder[s - 1])
            h = mine[s](h, xm, ym)
            if s < n_stages - 1 and holder[s + 1] != me:
                dist.send(h.contiguous(), group=group, group_dst=holder[s + 1])


PIPELINE_METRICS = ("main", "mtp", "mtp_acc", "balance")


def pipeline_metrics(mods, layout: Layout = None) -> dict:
    """The last step's loss parts, as one process's `Transformer.forward` reports them for the whole batch:
    the mean over micro-batches of main, mtp and mtp_acc (last stage), and of balance summed over every MoE
    layer of every stage. Sums over the pp group: every rank of a pipeline gets the same values."""
    local = torch.zeros(len(PIPELINE_METRICS), dtype=torch.float64)
    for m in mods:
        for rec in m.logged:
            for i, k in enumerate(PIPELINE_METRICS):
                local[i] += float(rec.get(k, 0.0))
    if layout is not None and layout.distributed and layout.pp > 1:
        dist.all_reduce(local, group=layout.group("pp"))
    return dict(zip(PIPELINE_METRICS, (local / max(1, len(mods[0].logged))).tolist()))  # per micro-batch


def build_pipeline(model, kind: str, pp_rank: int, pp: int, n_micro: int, micro_shape: tuple, group=None,
                   lam: float = 0.3, alpha: float = 1e-4):
    """This rank's stage modules and the torch.distributed.pipelining schedule that runs them.

    micro_shape = (micro-batch size, T). Run a step with `pipeline_step`. Raises ValueError on a bad layout."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV
    n_stages = pp * (2 if kind == "dualpipev" else 1)
    check_pipeline(model.cfg.n_layers, kind, pp, n_micro)
    device = model.embed.weight.device
    dtype = model.embed.weight.dtype
    mb, T = micro_shape
    mods, stages = [], []
    for s in stage_indices(kind, pp, pp_rank):
        mod = StageModule(model, s, n_stages, n_micro, lam, alpha)
        # Shapes given up front (meta tensors): no shape-inference forward that would count MoE loads twice.
        # Between stages flows the hidden state (mb, T, d), a tensor with a gradient.
        hidden = torch.empty(mb, T, model.cfg.dim, dtype=dtype, device="meta", requires_grad=True)
        x = torch.empty(mb, T, dtype=torch.long, device="meta") if s == 0 else hidden
        out = torch.empty((), dtype=dtype, device="meta") if s == n_stages - 1 else hidden
        stages.append(PipelineStage(mod, s, n_stages, device, input_args=(x,), output_args=(out,), group=group))
        mods.append(mod)
    if kind == "1f1b":
        sched = Schedule1F1B(stages[0], n_micro, loss_fn=_last_stage_loss, scale_grads=False)
    else:
        sched = ScheduleDualPipeV(stages, n_micro, loss_fn=_last_stage_loss, scale_grads=False)
    return mods, sched


def check_pipeline(n_layers: int, kind: str, pp: int, n_micro: int) -> None:
    """The layout rules, as one-line ValueErrors: equal stages, and enough micro-batches for the schedule."""
    if kind not in ("1f1b", "dualpipev"):
        raise ValueError(f"--pp_schedule must be '1f1b' or 'dualpipev', got {kind!r}")
    n_stages = pp * (2 if kind == "dualpipev" else 1)
    stage_layers(n_layers, n_stages, 0)
    if n_micro < n_stages:
        raise ValueError(f"--microbatches ({n_micro}) must be >= the stage count ({n_stages}: "
                         f"{'2 × pp for DualPipeV' if kind == 'dualpipev' else 'pp'})")


def parallelize_stages(mods, layout: Layout, reshard_after_forward: bool = None):
    """Expert parallelism and FSDP2 for this rank's pipeline stages, as `parallelize` does for a whole model:
    experts by `shard_experts`, one FSDP unit per block and MTP module held, the embedding a unit of its own,
    and each stage module the root of what is left (the final norm and the head). The schedule defers the
    gradient reduce-scatter to the end of the step (its REDUCE_GRAD action).
    Under DualPipeV (two stages a rank):
    - the one embedding that two stages of rank 0 (two FSDP roots) use cannot be nested in both: it stays
      replicated, outside FSDP, and `sync_embedding_grads` averages its gradient over dp;
    - the weights stay gathered from forward to backward (reshard_after_forward=False by default): with
      resharding, the deferred weight gradients of the loss stage's split backward came out wrong on torch
      2.13 (tests/test_pipeline.py compares every gradient with one process)."""
    from torch.distributed.fsdp import fully_shard
    if reshard_after_forward is None:
        reshard_after_forward = len(mods) == 1
    if not layout.distributed:
        return mods
    moes = [x for m in mods for b in held_blocks(m) for x in b.modules() if isinstance(x, MoE)]
    shard_experts(moes, layout, reshard_after_forward)
    if layout.dp == 1:
        return mods
    ignored = set() if layout.efsdp > 1 else {p for m in moes for p in m.experts.parameters()}
    embeds = [m.embed for m in mods if m.embed is not None]
    if len(embeds) > 1:  # shared by two stages of this rank
        ignored.add(embeds[0].weight)
        embeds = []
    for unit in embeds + [b for m in mods for b in held_blocks(m)] + list(mods):
        fully_shard(unit, mesh=layout.dense["dp"], reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored or None)
        unit.set_force_sum_reduction_for_comms(layout.backend == "gloo")
    return mods


def held_blocks(stage) -> list:
    """A stage module's blocks, and its MTP modules on the last stage (each an FSDP unit)."""
    return list(stage.layers.values()) + (list(stage.mtp) if stage.is_last else [])


def embedding_tie_group(layout: Layout):
    """1F1B with MTP: the group of the two ranks that hold the first and the last stage of this rank's pipeline
    (every rank must call this: groups are made collectively). None for ranks in the middle or when pp = 1."""
    if layout.pp == 1:
        return None
    last = (layout.pp - 1) * layout.dp  # rank = pp_rank · dp + dp_rank (header)
    mine, _ = dist.new_subgroups_by_enumeration([[d, d + last] for d in range(layout.dp)])
    return mine


def sync_embedding_grads(mods, kind: str, layout: Layout, tie_group) -> None:
    """After a pipeline step, before clipping: the embedding gradients that FSDP does not handle.
    - 1F1B with MTP on pp > 1: sum the first stage's embedding gradient and the last stage's copy's over
      `tie_group` (`embedding_tie_group`: the two ranks that hold them, which call this together).
    - DualPipeV with dp > 1: the embedding rank 0's two stages share stays replicated (`parallelize_stages`):
      average its gradient over the dp ranks."""
    embeds = [m for m in mods if m.embed is not None]
    if not embeds:
        return
    w = embeds[0].embed.weight
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    g = w.grad.to_local() if hasattr(w.grad, "to_local") else w.grad  # under FSDP: this rank's shard
    if kind == "1f1b" and tie_group is not None and embeds[0].has_mtp:
        dist.all_reduce(g, group=tie_group)  # ranks d and d + (pp-1)·dp hold the same shard
    if kind == "dualpipev" and layout.distributed and layout.dp > 1 and len(embeds) > 1:
        dist.all_reduce(g, group=layout.group("dp"))  # SUM then divide: gloo has no AVG
        g.div_(layout.dp)


class Pipeline(nn.Module):
    """This rank's share of a pipelined Transformer, as train.py drives it.

    Its modules are the ones the rank's stages hold, under the model's names (embed, layers.<i>, norm, head,
    mtp), so its state dict is a slice of the model's and a distributed checkpoint loads at any layout or in
    one process. It answers what the training loop asks of a model (moe_layers, update_moe_bias, train/eval)
    and runs the schedule: `train_step` (forward and backward of every micro-batch, the embedding gradients
    synced, the loss parts summed over the pipeline), `evaluate` (forward only) and `clip_grad_norm`."""

    def __init__(self, model: nn.Module, kind: str, layout: Layout, n_micro: int, micro_shape: tuple,
                 lam: float, alpha: float):
        super().__init__()
        self.cfg, self.kind, self.layout, self.micro_batch = model.cfg, kind, layout, micro_shape[0]
        stages, self._schedule = build_pipeline(model, kind, layout.pp_rank, layout.pp, n_micro, micro_shape,
                                                group=layout.group("pp"), lam=lam, alpha=alpha)
        self._stages = stages  # a plain list: the stages' modules are registered below, once, by their names
        if any(m.embed is not None for m in stages):
            self.embed = model.embed
        self.layers = nn.ModuleDict({k: b for m in stages for k, b in m.layers.items()})
        if any(m.is_last for m in stages):
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self._tie = embedding_tie_group(layout)  # every rank takes part in making the groups
        parallelize_stages(stages, layout)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._stages:
            m.train(mode)
        return self

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_mtp_lambda(self, lam: float) -> None:
        """λ of the next steps' objective (train.py schedules it), on this rank's last stage."""
        for m in self._stages:
            m.lam = lam

    @torch.no_grad()
    def update_moe_bias(self, gamma: float, group=None):
        """The aux-loss-free bias update of this rank's MoE layers, their loads summed over `group` (the dp
        ranks of this stage, which hold the same layers) in one all-reduce."""
        update_biases(self.moe_layers(), gamma, group)

    def _parts(self) -> dict:
        return {k: torch.tensor(v) for k, v in pipeline_metrics(self._stages, self.layout).items()}

    def train_step(self, x, y) -> dict:
        """x, y (M·B, T): the step's M micro-batches. Returns the loss parts (main, mtp, mtp_acc, balance)."""
        pipeline_step(self._schedule, self._stages, x, y)
        sync_embedding_grads(self._stages, self.kind, self.layout, self._tie)
        return self._parts()

    def evaluate(self, x, y) -> dict:
        """x, y (B', T): micro-batches of the training micro-batch size (or one smaller)."""
        pipeline_forward(self._stages, self.kind, self.layout, x, y, -(-x.shape[0] // self.micro_batch))
        return self._parts()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm` over the pipeline, the last stage's embedding copy (1F1B with MTP) counted once but
        clipped alike, so that both copies take the same step."""
        copy = self.kind == "1f1b" and self.layout.pp > 1 and self.layout.pp_rank == self.layout.pp - 1
        copies = [self.embed.weight] if copy and hasattr(self, "embed") else []
        counted = [p for p in self.parameters() if all(p is not c for c in copies)]
        total = clip_grad_norm(counted, max_norm, self.layout)
        if copies and copies[0].grad is not None:
            torch.nn.utils.clip_grads_with_norm_(copies, max_norm, total.to(copies[0].grad.dtype))
        return total
