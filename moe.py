"""DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3 report §2.1.2).

The FFN of an MoE block maps the token's input u_t (after ffn_norm) to
    FFN(u_t) = Σ_{i=1..N_s} FFN^(s)_i(u_t) + Σ_{i=1..N_r} g_{i,t} FFN^(r)_i(u_t)
(the residual "u_t +" of the report's h'_t is added by the Block). Every expert is a small SwiGLU FFN of width
moe_inter_dim ("fine-grained" experts: many narrow ones rather than a few wide ones).
- N_s shared experts see every token and are added unweighted. N_s SwiGLU experts of width moe_inter_dim sum to
  exactly one SwiGLU of width N_s·moe_inter_dim (concatenate their hidden units), which is how they are stored.
- N_r routed experts: each token goes to K_r of them. The affinity of token t to expert i is
      s_{i,t} = Sigmoid(u_t^T e_i)                      (e_i = row i of gate.weight; computed in fp32)
  and the gate values are
      g'_{i,t} = s_{i,t} if s_{i,t} + b_i ∈ TopK({s_{j,t} + b_j}, K_r) else 0,    g_{i,t} = g'_{i,t} / Σ_j g'_{j,t}
  then × route_scale (2.5 for V3; a factor of the official code, not written in the report).
  The bias b_i only decides *which* experts are chosen; the weights use the unbiased s_{i,t}.
- Auxiliary-Loss-Free Load Balancing: b_i is not trained by gradient. After each optimizer step it moves by γ
  against the load of that step: b_i -= γ for overloaded experts, b_i += γ for underloaded ones (γ = 0.001 in the
  report). `MoE.load` accumulates the token counts of all micro-batches of a step; `update_bias` applies and resets.
  Why balance: a router left alone sends most tokens to a few experts (the others stop learning), and under
  expert parallelism the GPUs holding the busy experts hold up every step. Why not with a loss: an auxiliary
  balance loss strong enough to balance pulls the gate against the language-modelling loss and costs model
  quality (report §2.1.2); the bias changes only which experts are chosen, gets no gradient, and leaves the gate
  values g to the language-modelling loss.
- Complementary Sequence-Wise Auxiliary Loss: to stop single sequences from being extremely unbalanced, a tiny
  L_Bal = α Σ_i f_i P_i per sequence (α = 1e-4, applied by train.py), with T the sequence length,
      f_i = N_r/(K_r·T) · Σ_t 1[token t is routed to i]       (a count: carries no gradient)
  (the report's eq. 18 counts the K_r highest unbiased s_{i,t}; this counts the experts chosen, bias and group
  limit included: the load each expert really gets. README, "Simplified or not implemented".)
      P_i = (1/T) Σ_t s'_{i,t},   s'_{i,t} = s_{i,t} / Σ_j s_{j,t}   (differentiable w.r.t. the gate)
  Perfectly balanced routing gives f_i = 1 for every i and hence Σ_i f_i P_i = 1.
- Node-Limited Routing: a token may reach at most M nodes, ranked by the sum of the K_r/M highest affinities of
  the experts they hold. The code form is group-limited routing: N_r experts in n_expert_groups groups, group
  score = sum of the top-2 biased affinities (K_r/M = 8/4 = 2 in V3), keep the best n_limited_groups groups and
  exclude the rest with -inf (not 0: biased scores can be negative). Why: under expert parallelism the experts
  are spread over nodes (V3: 8 nodes, one group each), and a token's hidden state crosses the slower
  inter-node network (InfiniBand, 50 GB/s against NVLink's 160 GB/s in the report's cluster) once for every
  node it reaches, before NVLink carries it to the experts inside the node; at most M = 4 nodes bounds each
  token's cross-node traffic, so the dispatch can stay hidden under computation.
- No token dropping, no capacity factor: every token is processed by all of its K_r experts.
- V2-style configs (score_func="softmax"): s = softmax over experts, no bias, group score = max, no
  renormalisation of the top-k weights (still × route_scale).

Three dispatch paths with identical results (tests/test_moe.py and tests/test_parallel.py check outputs and
gradients):
- "loop" (the reference, read it first): for each expert, gather its tokens, run it, add the weighted outputs.
- "grouped" (the fast one, default): sort the N·K_r (token, expert) pairs by expert id with argsort so each expert
  owns one contiguous segment, run all experts with one grouped GEMM per projection (torch._grouped_mm, where
  this build supports it for the device and dtype; otherwise a loop over the segments), then gather the outputs
  back into (token, slot) order and sum each token's K weighted slots (gathers only, forward and backward: no
  atomic scatter-add, the same bits on every run).
  With `--fp8` (MoE is handed fp8_experts.FP8Experts) the experts' whole FFN is fp8_experts.fp8_expert_ffn
  instead: three grouped FP8 GEMMs over padded segments, the SwiGLU output recomputed in the backward pass.
- "ep" (expert parallelism, once `MoE.shard` has split the experts over the ranks of an ep group, report
  §3.2.2): each rank holds N_r/ep consecutive experts (w1/w2/w3 are DTensors sharded on dim 0 over the ep mesh,
  so FSDP2, distributed checkpoints and gradient clipping all see the split). `dispatch_ep` sorts the pairs by
  expert as "grouped" does, sends each row to the rank holding its expert (all-to-all), runs the local experts
  and sends the results back (all-to-all); the backward of sending is sending back. It equals "grouped" on the
  whole batch (tests/test_parallel.py).
  Node-limited routing becomes real here: expert group g lives on the ranks that hold its experts, so when
  n_expert_groups is a multiple of ep a token reaches at most n_limited_groups ranks (`ranks_per_token`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from layers import MLP, at_least_fp32, run_demo

DISPATCH = ("loop", "grouped")


# -- routing: pure functions ---------------------------------------------------------------------------------
def limit_groups(scores: torch.Tensor, n_groups: int, n_keep: int, top2: bool) -> torch.Tensor:
    """Group-limited routing: keep the n_keep best of n_groups expert groups, set the others to -inf.

    The group score is the sum of its top-2 scores (sigmoid/V3) or its max (softmax/V2)."""
    N, E = scores.shape
    grouped = scores.view(N, n_groups, E // n_groups)  # (N, G, E/G)
    group_score = grouped.topk(2, dim=-1).values.sum(-1) if top2 else grouped.amax(-1)  # (N, G)
    keep = group_score.topk(n_keep, dim=-1).indices  # (N, n_keep)
    drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)  # (N, G)
    return grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(N, E)  # (N, E)


def route(scores, bias, k, n_groups, n_keep, score_func, route_scale):
    """scores s (N, E) unbiased affinities → (weights g (N, K), indices (N, K)).

    Each token picks its k (K_r) experts with the highest s + b, among the n_keep of n_groups expert groups that the
    group limit keeps (limit_groups; n_groups 1: no limit); the weights gather the *unbiased* s of the chosen
    experts. score_func says which routing the scores came from: "sigmoid" (V3: group score = top-2 sum, weights
    renormalised to sum to 1) or "softmax" (V2: group score = max, no renormalisation). Then every weight is
    multiplied by route_scale (2.5 in V3's released config). bias may be None."""
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"route: score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    choice = scores if bias is None else scores + bias
    if n_groups > 1:
        choice = limit_groups(choice, n_groups, n_keep, top2=score_func == "sigmoid")
    indices = choice.topk(k, dim=-1).indices  # (N, K)
    weights = scores.gather(1, indices)  # (N, K)
    if score_func == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    if route_scale != 1.0:  # (× 1 is exact: no kernel for it)
        weights = weights * route_scale
    return weights, indices


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss Σ_i f_i P_i, averaged over sequences (α not applied).

    scores (B, T, E) affinities s_{i,t} (differentiable), indices (B, T, K) the routed experts."""
    B, T, K = indices.shape
    counts = torch.zeros(B, n_experts, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, indices.reshape(B, T * K), torch.ones_like(indices, dtype=scores.dtype).view(B, T * K))
    f = counts * (n_experts / (K * T))  # (B, E), a count: no gradient flows through f
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E), P_i over the normalised s'_{i,t}
    return (f * p).sum(-1).mean()


def max_violation(counts: torch.Tensor) -> float:
    """Load imbalance of per-expert token counts: max load / mean load − 1 (0 = perfectly balanced)."""
    if counts.numel() == 0:
        raise ValueError("max_violation: counts is empty")
    counts = counts.double()
    mean = counts.mean()
    return 0.0 if mean == 0 else (counts.max() / mean - 1).item()


class Gate(nn.Module):
    """Router: fp32 affinities s = sigmoid(u·e_i) (or softmax), bias b_i for selection only, group limit, top-k."""

    def __init__(self, cfg):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups, self.n_keep = cfg.n_expert_groups, cfg.n_limited_groups
        self.score_func, self.route_scale = cfg.score_func, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        nn.init.normal_(self.weight, std=cfg.init_std)
        if self.score_func == "sigmoid":
            # b_i: saved with the model, moved only by update_bias (a buffer never receives a gradient)
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None

    def _apply(self, fn, recurse=True):
        """A cast to bf16 or fp16 (model.bfloat16(): generate.py --dtype bfloat16, decode_bench) leaves b_i in fp32,
        as the released checkpoints keep it: selection adds it to fp32 scores, and a rounded b_i can pick other
        experts. Moves and other casts apply to it as to any buffer."""
        bias = self.bias
        super()._apply(fn, recurse)
        low = (torch.bfloat16, torch.float16)
        if bias is not None and self.bias is not None and self.bias.dtype in low and bias.dtype not in low:
            self.bias = bias.to(self.bias.device)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, dim) → s (N, E) in fp32 (fp64 for fp64 models), also under bf16 autocast (routing is
        precision-sensitive)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(at_least_fp32(x), at_least_fp32(self.weight))  # (N, E)
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(-1)

    def forward(self, x: torch.Tensor):
        s = self.scores(x)
        w, idx = route(s, self.bias, self.topk, self.n_groups, self.n_keep, self.score_func, self.route_scale)
        return w.type_as(x), idx, s


# -- experts and the two dispatch paths ------------------------------------------------------------------------
_GROUPED_MM_OK = {}  # (device type, dtype) → whether torch._grouped_mm works there (probed once)


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny forward+backward of torch._grouped_mm against per-segment matmuls; False on any failure."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(24, 16, generator=gen).to(device, dtype).requires_grad_()
            w = torch.randn(3, 32, 16, generator=gen).to(device, dtype).requires_grad_()
            sizes = [5, 0, 19]  # an empty segment on purpose
            offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
            out = torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)  # (24, 32)
            ref = torch.cat([ai @ wi.T for ai, wi in zip(a.split(sizes), w)])  # (24, 32)
            g = torch.randn(out.shape, generator=gen).to(device, dtype)
            got, want = (out, *torch.autograd.grad(out, (a, w), g)), (ref, *torch.autograd.grad(ref, (a, w), g))
            tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
            return all(((p.float() - q.float()).norm() <= tol * q.float().norm()).item() for p, q in zip(got, want))
    except Exception:  # unsupported device, dtype or build: use the segment loop instead
        return False


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM_OK[key]


def resolve_impl(a: torch.Tensor, w: torch.Tensor, impl: str = "auto") -> str:
    """segment_mm's choice for "auto": the grouped GEMM where it runs (device, dtype, 16-byte rows), else the loop."""
    if impl != "auto":
        return impl
    dtype = torch.get_autocast_dtype(a.device.type) if torch.is_autocast_enabled(a.device.type) else a.dtype
    aligned = all(n * dtype.itemsize % 16 == 0 for n in w.shape[1:])  # kernel needs 16-byte rows
    # Under torch.compile the grouped GEMM's shape rules accept bf16 only, whatever eager mode accepts.
    compiled_ok = dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return "grouped_mm" if aligned and compiled_ok and grouped_mm_supported(a.device, dtype) else "loop"


def segment_mm(a: torch.Tensor, w: torch.Tensor, sizes, impl: str = "auto") -> torch.Tensor:
    """Rows of a (M, in), sorted into len(sizes) contiguous segments, times w (E, out, in)ᵀ per segment → (M, out)

    sizes: a list of ints, or a 1-D integer tensor on a's device (then the grouped GEMM reads the segment ends
    from the device and the host never waits for the GPU; the loop has to copy them to the host).
    impl: "grouped_mm" (one torch._grouped_mm call), "loop" (one F.linear per segment) or "auto"."""
    dtype = torch.get_autocast_dtype(a.device.type) if torch.is_autocast_enabled(a.device.type) else a.dtype
    impl = resolve_impl(a, w, impl)
    if impl == "grouped_mm":
        sizes = sizes if torch.is_tensor(sizes) else torch.tensor(sizes, device=a.device)
        offs = sizes.cumsum(0, dtype=torch.int32)  # (E,) end row of each segment
        return torch._grouped_mm(a.to(dtype), w.to(dtype).transpose(-2, -1), offs=offs)  # (M, out)
    sizes = sizes.tolist() if torch.is_tensor(sizes) else sizes  # the loop needs them on the host
    # unbind, not w[i]: the backward of E separate w[i] would build E full-size (E, out, in) gradients
    parts = [F.linear(seg, wi) for seg, wi, n in zip(a.split(sizes), w.unbind(0), sizes) if n > 0]
    # no rows at all: still an (0, out) result that depends on a and w, so that a backward pass runs through it
    # (under expert parallelism the all-to-all behind it must run on every rank, even on one that got no rows)
    return torch.cat(parts) if parts else F.linear(a, w[0])


class Experts(nn.Module):
    """N_r routed SwiGLU experts with stacked weights w1 (E, inter, dim), w2 (E, dim, inter), w3 (E, inter, dim).

    `mm`: the grouped GEMM of the fast path, segment_mm's signature without `impl` (None: segment_mm itself);
    FP8 training passes fp8_experts.fp8_segment_mm. `ffn` (FP8: fp8_experts.fp8_expert_ffn), if given, runs
    the whole FFN, ffn(x, w1, w3, w2, sizes, act_cache, quantized, grad_into), as one step that keeps the padded
    input's FP8 tiles along the tokens and the SwiGLU's inputs (as `act_cache` says, report §3.3.3) for the
    backward pass, not the SwiGLU's output. The loop reference (`expert`) always runs in high precision."""

    act_cache = "bf16"  # with ffn: how the SwiGLU inputs are kept ("bf16", "fp8" or "e5m6")
    quantized = None  # with ffn: the FP8 copies of the weights made once per step by fp8_linear.weights_quantized_once
    grad_into = None  # with ffn: the weights' .grad the Wgrad kernels add into (fp8_linear.grads_accumulated_in_wgrad)

    def __init__(self, n_experts: int, dim: int, inter_dim: int, init_std: float, mm=None, ffn=None):
        super().__init__()
        self.mm, self.ffn = mm, ffn
        self.w1 = nn.Parameter(torch.randn(n_experts, inter_dim, dim) * init_std)  # gate_proj
        self.w2 = nn.Parameter(torch.randn(n_experts, dim, inter_dim) * init_std)  # down_proj
        self.w3 = nn.Parameter(torch.randn(n_experts, inter_dim, dim) * init_std)  # up_proj

    def expert(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """FFN^(r)_i(x) for x (n, dim) → (n, dim); simple, not fast (each w[i] gets a full-size gradient)."""
        return F.linear(F.silu(F.linear(x, self.w1[i])) * F.linear(x, self.w3[i]), self.w2[i])

    def segments(self, x: torch.Tensor, sizes, impl: str = "auto") -> torch.Tensor:
        """All experts at once on rows sorted by expert (sizes[i] rows for expert i): (M, dim) → (M, dim).
        sizes: list or device tensor (segment_mm); a grouped GEMM passed in as `mm` gets them as they come."""
        host = self.mm is None and "loop" in (resolve_impl(x, self.w1, impl), resolve_impl(x, self.w2, impl))
        if host and torch.is_tensor(sizes):
            sizes = sizes.tolist()  # the loop splits by them: read once
        mm = self.mm or (lambda a, w, n: segment_mm(a, w, n, impl))
        w1, w2, w3 = (local(w) for w in (self.w1, self.w2, self.w3))  # this rank's experts under ep
        if self.ffn is not None:
            return self.ffn(x, w1, w3, w2, sizes, self.act_cache, self.quantized, self.grad_into)
        h = F.silu(mm(x, w1, sizes)) * mm(x, w3, sizes)  # (M, inter)
        return mm(h, w2, sizes)  # (M, dim)


def dispatch_loop(x, weights, indices, experts: Experts) -> torch.Tensor:
    """Reference: y_t = Σ_k g_{t,k} FFN^(r)_{idx_{t,k}}(x_t), one expert at a time. x (N, dim) → (N, dim)."""
    y = torch.zeros_like(x)
    counts = torch.bincount(indices.flatten(), minlength=experts.w1.shape[0]).tolist()
    for i, n in enumerate(counts):
        if n == 0:  # skip idle experts (as the official code does)
            continue
        token, slot = torch.where(indices == i)  # (n,), (n,): which tokens chose i, in which of their K slots
        y = y.index_add(0, token, experts.expert(i, x[token]) * weights[token, slot, None])
    return y


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, (n_experts,) int64 on indices' device. Not torch.bincount: on CUDA that
    reads max(indices) back to the host to size its output, a sync that stalls the launch queue."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class _GatherRows(torch.autograd.Function):
    """rows = x[index] where every row of x is read by the same number r of rows (r = len(index) / len(x)) and
    back (len(index),) lists them: back.view(len(x), r)[i] = the r positions j with index[j] = i.

    The backward is then a gather as well, grad_x[i] = Σ_j grad[back[i, j]], summed in a fixed order: no atomic
    scatter-add (autograd's backward of x[index] would be one, since it cannot know that index is so regular).
    The r terms are added one after the other (`sum_slots`)."""

    @staticmethod
    def forward(ctx, x, index, back):
        ctx.save_for_backward(back)
        ctx.n, ctx.r = x.shape[0], index.shape[0] // max(x.shape[0], 1)  # r = 0 when there are no rows
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        rows = grad.index_select(0, back)  # (n·r, ...): the r rows that read row i, together
        if ctx.r != 1:  # r = 1, a permutation: each row's gradient is one row of grad, nothing to add
            rows = sum_slots(rows.view(ctx.n, ctx.r, *grad.shape[1:])).to(grad.dtype)  # (n, r, ...) → (n, ...)
        return rows, None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """x[index] whose backward is a gather too (_GatherRows): (n, ...) → (len(index), ...)."""
    return _GatherRows.apply(x, index, back)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[j]] = j: where each position went. (M,) → (M,)"""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device))


def sort_by_expert(indices: torch.Tensor):
    """The N·K (token, slot) pairs of indices (N, K) sorted by expert id (stable: by token within an expert):
    order (N·K,) the pair t·K + k at each sorted position, inv its inverse (pair t·K + k's sorted position; token
    t's K pairs sit at inv.view(N, K)[t]) and token (N·K,) the token of each sorted pair."""
    order = torch.argsort(indices.reshape(-1), stable=True)  # (N·K,)
    return order, inverse_permutation(order), order // indices.shape[1]


def sum_slots(rows: torch.Tensor, weights: torch.Tensor = None) -> torch.Tensor:
    """Σ_j rows[:, j] (· weights[:, j]) in at least fp32, the r terms added in the order j = 0, 1, ...
    (n, r, ...) → (n, ...). Written as r terms added one after the other, not .sum(1): compiled, with rows a
    gather, this is one elementwise kernel with r loads per value; inductor made the reduction over the short r axis
    a kernel 3-4× slower on a GPU (`v3-layers`' MoE layers: r = 8 slots of 7168 values)."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    if weights is not None:
        acc = torch.promote_types(acc, weights.dtype)
        weights = weights.to(acc).view(*weights.shape, *([1] * (rows.dim() - 2))).unbind(1)  # r × (n, 1, ...)
    out = rows.new_zeros((rows.shape[0], *rows.shape[2:]), dtype=acc) if rows.shape[1] == 0 else None  # (n, ...)
    # unbind, not rows[:, j]: unbind's backward stacks the r gradients in one tensor, where r selects would each
    # fill a zero tensor of rows' size (eager autograd)
    for j, row in enumerate(rows.unbind(1)):  # row: (n, ...)
        term = row.to(acc) if weights is None else row * weights[j]
        out = term if j == 0 else out + term
    return out


def combine(out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, dtype) -> torch.Tensor:
    """y_t = Σ_k g_{t,k} · FFN_{idx_{t,k}}(u_t) from the experts' outputs in sorted order: out[inv] puts them back in
    (token, slot) order (a gather), then each token's K slots are weighted and summed in a fixed order (no atomic
    scatter-add, so the same bits every run). out (N·K, dim) sorted by expert → (N, dim) in `dtype`."""
    N, K = weights.shape
    rows = gather_rows(out, inv, order).view(N, K, out.shape[-1])  # (N, K, dim): row t·K + k is token t's slot k
    return sum_slots(rows, weights).to(dtype)  # (N, dim), products and sum in fp32 at least (the gate's dtype)


def dispatch_grouped(x, weights, indices, experts: Experts, impl: str = "auto", counts=None) -> torch.Tensor:
    """Fast path: sort (token, slot) pairs by expert, run contiguous segments, combine. (N, dim) → (N, dim).
    counts: expert_counts(indices) if the caller has them. The segment sizes stay on the device.
    Moving rows in and out is gathers only, forward and backward (gather_rows, combine)."""
    order, inv, token = sort_by_expert(indices)  # (N·K,) each
    sizes = expert_counts(indices, experts.w1.shape[0]) if counts is None else counts  # rows of each segment
    out = experts.segments(gather_rows(x, token, inv), sizes, impl)  # (N·K, dim)
    return combine(out, weights, order, inv, x.dtype)  # (N, dim) sum over the K slots


# -- expert parallelism ------------------------------------------------------------------------------------------
def local(w: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a (possibly) sharded weight; a plain tensor is returned as it is."""
    return w.to_local() if isinstance(w, DTensor) else w


def shard_experts(experts: Experts, ep_mesh) -> None:
    """Keep only this rank's N_r/ep consecutive experts, as DTensors Shard(0) over the 1-D `ep_mesh`.

    Every rank holds the same full weights beforehand (same seed), so each cuts out its own slice: no
    communication. A DTensor, not a plain slice, so that whoever reads the parameters (FSDP2, distributed
    checkpoints, norms for clipping) knows the other experts live on other ranks."""
    ep, r = ep_mesh.size(), ep_mesh.get_local_rank()
    for name in ("w1", "w2", "w3"):
        w = getattr(experts, name)
        if w.shape[0] % ep != 0:
            raise ValueError(f"{w.shape[0]} routed experts do not split evenly over ep = {ep} ranks")
        mine = w.detach().chunk(ep, dim=0)[r].clone()  # (E/ep, ..., ...)
        setattr(experts, name, nn.Parameter(DTensor.from_local(mine, ep_mesh, [Shard(0)], run_check=False)))


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks: send_splits[r] rows go to rank r, recv_splits[r] rows come from it.

    The backward sends the gradients back the way the rows came (the splits swapped): the backward of the
    dispatch all-to-all is a combine all-to-all, and vice versa."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x, send_splits: list, recv_splits: list, group) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def dispatch_ep(x, weights, indices, experts: Experts, group, impl: str = "auto", counts=None) -> torch.Tensor:
    """Expert parallelism over `group` (ep ranks, rank r holding experts [r·E/ep, (r+1)·E/ep)). (N, dim) → (N, dim)

    The same sums as dispatch_grouped; only where each expert runs changes. counts: expert_counts(indices)."""
    ep = dist.get_world_size(group)
    E = experts.w1.shape[0]  # the global count: a DTensor's shape is the whole tensor's
    E_local = E // ep
    # 1. sort the (token, slot) pairs by expert: the rows for rank r are then one contiguous block
    order, inv, token = sort_by_expert(indices)  # (N·K,) each
    counts = expert_counts(indices, E) if counts is None else counts  # (E,) rows this rank sends to each expert
    # 2. exchange the counts: recv[r, j] = rows rank r sends to my local expert j
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)  # E_local counts to and from every rank
    recv = recv.view(ep, E_local)  # (ep, E_local)
    send_splits = counts.view(ep, E_local).sum(1).tolist()  # rows to each rank
    recv_splits = recv.sum(1).tolist()  # rows from each rank (the one host sync of the dispatch)
    # 3. dispatch: the rows travel to their experts' ranks
    rows = all_to_all(gather_rows(x, token, inv), send_splits, recv_splits, group)  # (M, dim), by source, then expert
    # 4. regroup rank-major → expert-major, so each local expert owns one contiguous segment
    chunk = torch.repeat_interleave(torch.arange(ep * E_local, device=x.device), recv.flatten())  # (M,)
    regroup = torch.argsort(chunk % E_local, stable=True)  # (M,) local expert of each row, then source rank
    unregroup = inverse_permutation(regroup)  # (M,)
    out = experts.segments(gather_rows(rows, regroup, unregroup), recv.sum(0), impl)  # (M, dim); sizes stay on device
    # 5. undo the regrouping, then combine: the results travel back to the tokens' ranks
    out = gather_rows(out, unregroup, regroup)  # (M, dim) rank-major again
    out = all_to_all(out, recv_splits, send_splits, group)  # (N·K, dim) in this rank's sorted order
    # 6. weight by the gates and sum each token's K slots
    return combine(out, weights, order, inv, x.dtype)  # (N, dim)


def ranks_per_token(indices: torch.Tensor, n_experts: int, ep: int) -> torch.Tensor:
    """Mean number of distinct ep ranks a token's K_r experts live on (what node-limited routing bounds), as a
    0-d tensor: reading it (.item()) would wait for the device, so the caller does that only when it reports."""
    owner = indices // (n_experts // ep)  # (N, K) rank holding each chosen expert
    hit = torch.zeros(indices.shape[0], ep, device=indices.device).scatter_(1, owner, 1.0)  # (N, ep)
    return hit.sum(1).mean()


@torch.no_grad()
def update_biases(moes: list, gamma: float, group=None) -> None:
    """Aux-loss-free update of several MoE layers with ONE all-reduce of all their loads over `group`.

    `group` is the data-parallel group: its ranks hold the same layers and see different tokens (under
    pipeline parallelism the world mixes stages, whose layers differ)."""
    if not moes:
        return
    load = torch.stack([m.load for m in moes])  # (layers, E)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load, group=group)
    for m, layer_load in zip(moes, load):
        m.update_bias(gamma, load=layer_load)


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts (unweighted) + K_r of N_r routed experts (weighted by g_{i,t}).

    Keeps the per-expert token counts for aux-loss-free balancing (`load`, `update_bias`) and the complementary
    sequence-wise balance loss of the last training forward (`balance_loss`, unweighted)."""

    def __init__(self, cfg, linear=nn.Linear, experts=None):
        super().__init__()
        self.dim, self.n_routed, self.topk = cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts
        self.gate = Gate(cfg)
        # Routed experts are stacked tensors (for the grouped GEMM), not `linear` modules. `experts` brings their
        # kernels (fp8_experts.FP8Experts: mm, ffn, check_dims); None runs them with segment_mm.
        mm = ffn = None
        if experts is not None:
            experts.check_dims(cfg.dim, cfg.moe_inter_dim)
            mm, ffn = experts.mm, experts.ffn
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.init_std, mm, ffn)
        if cfg.n_shared_experts > 0:
            self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, linear)
        else:
            self.shared_experts = None
        self.dispatch = "grouped"
        self.ep_group = None  # set by shard(): routed experts split over this process group (dispatch_ep)
        self.last_ranks_per_token = torch.zeros(())  # under ep: of the last forward (ranks_per_token)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
        self.last_counts = torch.zeros(cfg.n_routed_experts, dtype=torch.long)
        self.balance_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE input must be (B, T, {self.dim}), got {tuple(x.shape)}")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"MoE.dispatch={self.dispatch!r}: must be one of {DISPATCH}")
        B, T, D = x.shape
        u = x.reshape(B * T, D)  # (N, dim), N = B·T tokens
        weights, indices, scores = self.gate(u)  # (N, K), (N, K), (N, E)
        counts = expert_counts(indices, self.n_routed)  # (E,)
        if self.ep_group is not None:
            y = dispatch_ep(u, weights, indices, self.experts, self.ep_group, counts=counts)  # (N, dim)
            ep = dist.get_world_size(self.ep_group)
            self.last_ranks_per_token = ranks_per_token(indices, self.n_routed, ep)
        elif self.dispatch == "loop":
            y = dispatch_loop(u, weights, indices, self.experts)  # (N, dim)
        else:
            y = dispatch_grouped(u, weights, indices, self.experts, counts=counts)  # (N, dim)
        if self.shared_experts is not None:
            y = y + self.shared_experts(u)
        self._record(indices, scores, B, T, counts)
        return y.view(B, T, D)

    def _record(self, indices, scores, B, T, counts):
        """Token counts for logging and for the bias update; the balance loss in training."""
        self.last_counts = counts
        if self.training:
            self.load += counts
            self.balance_loss = sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1), self.n_routed)
        else:
            self.balance_loss = scores.new_zeros(())

    @torch.no_grad()
    def update_bias(self, gamma: float, group=None, load: torch.Tensor = None):
        """After an optimizer step: b_i += γ·sign(mean load − load_i) from the accumulated `load`, then reset it.

        Under torch.distributed the load is summed over `group` (default: the world) first, so every rank applies
        the same update; `load` given: already summed (`update_biases` sums all layers in one all-reduce).
        No-op (except the reset) for softmax routing, which has no bias."""
        if load is None:
            load = self.load.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(load, group=group)
        if self.gate.bias is not None:
            load = load.double()
            self.gate.bias += gamma * torch.sign(load.mean() - load).to(self.gate.bias.dtype)
        self.reset_load()

    def shard(self, ep_mesh) -> None:
        """Expert parallelism: keep this rank's slice of the routed experts, dispatch over the ep group."""
        shard_experts(self.experts, ep_mesh)
        self.ep_group = ep_mesh.get_group()

    def reset_load(self):
        self.load.zero_()


# -- demo: `python moe.py` balances a skewed router with the bias alone, and shows the group limit -----------------
def demo_balancing(steps: int = 40, gamma: float = 0.01, update: bool = True, seed: int = 0) -> dict:
    """A router whose gate rows 0 and 1 lean along the inputs' common direction, so experts 0 and 1 take most
    tokens. No optimizer runs: only b_i moves (update_bias after each step, or never). Returns the max violation
    and the load/mean of every expert at each step, and the final bias."""
    from config import ModelConfig
    cfg = ModelConfig(dim=32, moe_inter_dim=8, n_routed_experts=16, n_shared_experts=0, n_activated_experts=2,
                      n_expert_groups=1, n_limited_groups=1, init_std=0.1)
    torch.manual_seed(seed)
    m = MoE(cfg).train()
    c = F.normalize(torch.randn(cfg.dim), dim=0)
    with torch.no_grad():
        m.gate.weight[:2] += 2.0 * c
    gen = torch.Generator().manual_seed(seed + 1)
    violation, load = [], []
    for _ in range(steps):
        x = torch.randn(8, 32, cfg.dim, generator=gen) * 0.5 + c  # one step: 256 tokens
        with torch.no_grad():
            m(x)
        counts = m.last_counts.double()
        violation.append(max_violation(counts))
        load.append((counts / counts.mean()).tolist())
        if update:
            m.update_bias(gamma)
        else:
            m.reset_load()
    return dict(violation=violation, load=load, bias=m.gate.bias.clone())


def demo_group_limit(n_tokens: int = 4096, seed: int = 0) -> dict:
    """V3's routing shape (256 experts in 8 groups, top-8, best 4 groups) on random affinities: how many groups
    (nodes, when each node holds one group) a token's experts span with and without the limit, and how much of
    the unrestricted top-8's affinity the limited choice keeps."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n_tokens, 256, generator=gen).pow(4)  # skewed affinities in [0, 1), like sigmoid outputs
    out = {}
    for name, keep in (("unlimited", 8), ("limited", 4)):
        _, idx = route(s, torch.zeros(256), 8, 8, keep, "sigmoid", 1.0)
        groups = F.one_hot(idx // 32, 8).amax(1).sum(-1).double()  # (N,) distinct groups per token
        out[name] = dict(mean=groups.mean().item(), max=int(groups.max()), mass=s.gather(1, idx).sum().item())
    out["kept"] = out["limited"]["mass"] / out["unlimited"]["mass"]
    return out


def _demo_main(argv=None):
    import argparse
    import plots
    p = argparse.ArgumentParser(description="Aux-loss-free balancing and group-limited routing, in numbers.")
    p.add_argument("--png", metavar="PATH", help="also write the expert load over the steps as a PNG")
    a = p.parse_args(argv)
    runs = {u: demo_balancing(update=u) for u in (False, True)}
    print("A skewed router (16 experts, top-2, experts 0 and 1 favoured), 256 tokens a step, fixed gate.")
    print("Max violation = max load / mean load - 1 (0 is perfect balance) of each step's tokens:")
    print(f"  {'step':>4s} {'no bias':>8s} {'bias, gamma=0.01':>17s}   (the report's 0.001 needs more steps)")
    for t in list(range(0, 40, 5)) + [39]:
        print(f"  {t + 1:4d} {runs[False]['violation'][t]:8.2f} {runs[True]['violation'][t]:17.2f}")
    b = runs[True]["bias"]
    print(f"  after 40 steps b_0 = {b[0]:+.2f}, b_1 = {b[1]:+.2f}, the others {b[2:].min():+.2f}..{b[2:].max():+.2f}")
    load = runs[True]["load"]
    print("\nLoad of each expert (load / mean) over the 40 steps with the bias update, one column a step:")
    rows = [[step[e] for step in load] for e in range(16)]
    print("\n".join(plots.text_heatmap(rows, [f"  expert {e:2d}" for e in range(16)], top=4.5)))
    print("  shade by half a mean: ' ' 0, '.' to 0.5, ':' to 1, '-' to 1.5, '=' to 2, '+' to 2.5,")
    print("  '*' to 3, '#' to 3.5, '%' to 4, '@' more (perfect balance: all ':')")
    g = demo_group_limit()
    print("\nGroup-limited routing at V3's shape (256 experts in 8 groups, top-8), random affinities:")
    print(f"  groups (nodes) a token's experts sit in: unlimited mean {g['unlimited']['mean']:.2f}, max "
          f"{g['unlimited']['max']}")
    print(f"  {'':39s} best 4 groups only: mean {g['limited']['mean']:.2f}, max {g['limited']['max']}")
    print(f"  the limited top-8 keeps {100 * g['kept']:.1f}% of the unrestricted top-8's affinity")
    if a.png:
        try:
            plots.png_heatmap(a.png, rows, "expert load with the bias update (load / mean)", "step", "expert",
                              "load / mean")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        print(f"wrote {a.png}")


if __name__ == "__main__":
    run_demo(_demo_main)
