"""The full-scale run on paper: memory, all-to-all traffic, pipeline bubble, step time and MFU of a layout.

    python plan.py --preset v3-671b --gpus 2048 --gpus_per_node 8 --ep 64 --pp 16
    python train.py --preset v3-671b --plan --gpus 2048 --gpus_per_node 8 --ep 64 --pp 16
(the same plan, except that train.py's --pp_schedule defaults to 1f1b and plan.py's to the report's dualpipe)

Nothing is allocated: parameter counts come from the model built on the meta device, everything else from the
formulas below. Every number printed is an estimate from these formulas and the printed assumptions; none is a
measurement. A layout whose most loaded GPU needs more than --gpu_mem_gb is refused (one line, exit 2).

Layout (as parallel.py): G GPUs, pp stages deep, dp = G / pp ranks per stage; the routed experts of each MoE layer
are split over ep of those dp ranks, each slice replicated efsdp = dp / ep times. Schedules (dualpipe.py):
    1f1b       S = pp stages, rank r holds stage r
    dualpipe   S = pp stages, rank r holds stage r and a second copy of stage pp-1-r (report §3.2.1: two copies
               of the parameters, the price of feeding micro-batches from both ends)
    dualpipev  S = 2·pp stages, rank r holds stage r and stage 2·pp-1-r (no copy)
The L main blocks are cut into S contiguous stages of ⌊L/S⌋ blocks; the L mod S extra blocks go one each to
stages 1, 2, ... (the first and the last stage also carry the embedding, the head and the MTP modules). The
first stage holds the embedding, the last the final norm, the head and the D MTP modules (and the embedding they
read: a rank holds a parameter once even if two of its stages use it).

Per-GPU bytes, for the parameters P_d (dense: everything but the routed experts) and P_e (the rank's slice of the
routed experts, N_r/ep of each MoE layer it holds), as the report keeps them (report §3.3.3, ZeRO-1):
    working weights   2·(P_d + P_e)        BF16 copy used by forward and backward (FP8 copies of the GEMM
                                           weights are made per GEMM and not counted)
    gradients         4·(P_d + P_e)        FP32, accumulated over the micro-batches of a step
    master weights    4·(P_d/dp + P_e/efsdp)          FP32, sharded over the ranks that replicate them (ZeRO-1)
    AdamW moments     2·2·(P_d/dp + P_e/efsdp)        BF16 first and second moments, sharded alike
Activations: what a block's forward saves for its backward, per token (`block_tensors`), in three schemes:
    attention   x d, norm(x) d, c^Q q_c, norm(c^Q) q_c, [c^KV; k^R] k_c+d_r, norm(c^KV) k_c,
                q and k 2H(d_n+d_r), v H·d_v, o H·d_v, log-sum-exp H (FP32)          (q_c = 0: no c^Q terms)
    dense FFN   h d, norm(h) d, W1 u and W3 u 2I, SwiGLU I
    MoE FFN     h d, norm(h) d, scores N_r (FP32), shared W1 u, W3 u and SwiGLU 3·N_s·I_e,
                routed: K_r·(input d, W1 u and W3 u 2I_e, SwiGLU I_e, expert output d)
    last stage  final norm 2d, logits V (BF16) and log-softmax V (FP32); each MTP module: its norms and concat
                8d, its block (MoE), its logits and log-softmax (norm outputs recomputed: d and 5d)
  bf16            every tensor above, 2 bytes an element (FP32 ones 4).
  bf16_recompute  the report's recomputation (report §3.2.3: every RMSNorm and the MLA up-projections are
                  recomputed in the backward; report §3.3.3: the routed SwiGLU output is recomputed from its
                  cached inputs): drops the norm outputs, q, k, v and the routed SwiGLU outputs.
  report          that recomputation and the report's low-precision caching (report §3.3.3): the inputs of
                  linear layers and of the SwiGLU in FP8 (1 byte + one FP32 scale per 128), the attention output
                  projection's input in E5M6 (1.5 bytes), norm inputs in BF16. This plan also assumes the gate
                  weight g is applied to the SwiGLU output inside the expert (dL/dg then comes from W2's input
                  gradient), so the routed expert outputs are not kept: an assumption of this plan, not a
                  statement of the report. The memory check uses this scheme.
A rank holds the activations of the micro-batches it has run forward through a stage and not yet run backward
through (a weight-gradient W frees them, an input-only backward BI does not). The plan walks each rank's op list
from dualpipe.py and takes the peak of Σ (micro-batches in flight at a stage) × (that stage's bytes).

All-to-all per token per MoE layer (report §3.2.2), with g GPUs a node and an EP group spanning n = ep/g nodes:
    dispatch (FP8, 1 byte an element + one FP32 scale per 128): d·(1 + 4/128) bytes a copy; combine (BF16) 2d.
    IB: a token crosses to each other node that holds one of its experts once, then NVLink forwards it to the
    GPUs there. With node-limited routing to at most M nodes (M = n_limited_groups, one expert group a node, as
    the report places them) it crosses at most min(M, n) - [own node chosen] times; for a uniform choice of M of n
    nodes the expected count is M·(1 - 1/n). With ep <= g everything stays on NVLink.
    NVLink: each of its K_r copies moves once inside a node unless it is already on the right GPU:
    K_r·(1 - 1/g) copies on average.
    The backward moves the same bytes again (the backward of dispatch is a combine and vice versa).

Time model, for one micro-batch of b sequences of T tokens (bT tokens) through stage s:
    FLOPs per token of a block (forward) = 2 × its activated matmul parameters + H·T·(d_n+d_r+d_v)
    (causal attention over T/2 keys on average); head 2·d·V; MTP: 2·(2d·d) + its block + the head again.
    F_s = bT·(linear FLOPs / (gemm_tflops·c) + attention FLOPs / (attn_tflops·c)), c = 1 - comm_sms/sms (the
    SMs the report leaves to communication kernels).
    R_s = bT·2·(q_c·H(d_n+d_r) + k_c·H(d_n+d_v))·blocks / (gemm_tflops·c): the up-projections recomputed.
    C_s = bT·(MoE layers × max(IB bytes / ib_gbs, NVLink bytes / nvlink_gbs) + 2d / ib_gbs), the all-to-all
    (forward or backward) and the send of the hidden state to the next stage.
    Ops: F = F_s + C_s, B = 2F_s + R_s + C_s (input and weight gradients), BI = F_s + R_s + C_s, W = F_s;
    under dualpipe(v) an overlapped pair (F of s, B of s') costs max(F_s + 2F_s' + R_s', C_s + C_s') (one
    direction's all-to-all hidden behind the other's compute, report §3.2.1). 1F1B has no pairs.
    dualpipe.simulate runs every rank's op list with these per-stage costs (zero time for the sends themselves
    beyond C_s); the bubble printed is makespan - the busiest rank's work. DualPipe's README formula, which assumes
    equal stages, is printed beside it with the busiest stage's costs.
    Step = makespan, for global_batch / (dp·b) micro-batches, + the data-parallel gradient sync, not overlapped
    (an upper bound): reduce-scatter of FP32 gradients and all-gather of BF16 weights,
    6 bytes × (P_d·(dp-1)/dp + P_e·(efsdp-1)/efsdp) over ib_gbs. The optimizer step is not counted.
    MFU = 3 × forward FLOPs per token (model and MTP) × tokens per step / (step × G × peak_tflops).
Default assumptions (all flags): gemm_tflops 1000, about three quarters of what DeepGEMM reports for its FP8
grouped GEMMs on H800 (1214-1346), leaving room for the quantization around them; attn_tflops 450 for BF16
attention with the MLA head sizes; NVLink 160 GB/s and IB 50 GB/s per GPU and 20 of 132 SMs for communication
(report §3.2.2); the H800's dense BF16 peak, 989 TFLOP/s; 80 GB of memory.

The report's own numbers for comparison: 2048 H800 GPUs (8 a node), PP16 with DualPipe, EP64 over 8 nodes,
ZeRO-1 DP, no TP (report §3.2); 180K H800 GPU-hours per trillion tokens (report §1), i.e. 1e12 / (180e3·3600)
= 1543 tokens/s per GPU; 15360 sequences of 4096 tokens per step (report §4.2, after the batch-size ramp).
"""
import argparse
import functools
import sys
from dataclasses import asdict, dataclass

import torch

from config import PRESETS, get_preset
from dualpipe import formula_bubble, make_schedule, simulate

SCHEDULES = ("1f1b", "dualpipe", "dualpipev")
REPORT = dict(gpus=2048, gpus_per_node=8, ep=64, pp=16, pp_schedule="dualpipe", tokens_per_s_gpu=1e12 / (180e3 * 3600))
BF16, FP32 = 2, 4


@dataclass
class Assumptions:
    gpu_mem_gb: float = 80.0  # H800
    gemm_tflops: float = 1000.0  # achieved by the (mostly FP8) linear GEMMs
    attn_tflops: float = 450.0  # achieved by BF16 attention
    peak_tflops: float = 989.0  # dense BF16 peak of an H800, the MFU denominator
    nvlink_gbs: float = 160.0  # per GPU, report §3.2.2
    ib_gbs: float = 50.0  # per GPU, report §3.2.2
    sms: int = 132
    comm_sms: int = 20  # report §3.2.2


# -- layout ---------------------------------------------------------------------------------------------------
def check_layout(cfg, gpus: int, gpus_per_node: int, ep: int, pp: int, kind: str) -> int:
    """dp = gpus / pp; raises ValueError (one line) for a layout that cannot exist."""
    if kind not in SCHEDULES:
        raise ValueError(f"--pp_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    for name, v in (("gpus", gpus), ("gpus_per_node", gpus_per_node), ("ep", ep), ("pp", pp)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if gpus % pp or (gpus // pp) % ep:
        raise ValueError(f"--gpus {gpus} must split into pp ({pp}) stages of dp ranks, dp divisible by ep ({ep})")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"--ep {ep}: the {cfg.n_routed_experts} routed experts do not split evenly")
    if gpus % gpus_per_node or (ep > gpus_per_node and ep % gpus_per_node):
        raise ValueError(f"--gpus {gpus} and --ep {ep} must fill whole nodes of {gpus_per_node} GPUs")
    if kind == "dualpipe" and pp % 2:
        raise ValueError(f"--pp_schedule dualpipe needs an even --pp, got {pp}")
    n_stages = 2 * pp if kind == "dualpipev" else pp
    if cfg.n_layers < n_stages:
        raise ValueError(f"{cfg.n_layers} blocks cannot fill {n_stages} stages")
    return gpus // pp


def stage_sizes(n_layers: int, n_stages: int) -> list:
    """Blocks per stage: ⌊L/S⌋ each, the L mod S extra ones to stages 1, 2, ... (then 0 if all others have one)."""
    sizes = [n_layers // n_stages] * n_stages
    order = list(range(1, n_stages)) + [0]
    for i in range(n_layers % n_stages):
        sizes[order[i]] += 1
    return sizes


def rank_stages(kind: str, pp: int, rank: int) -> list:
    return {"1f1b": [rank], "dualpipe": [rank, pp - 1 - rank], "dualpipev": [rank, 2 * pp - 1 - rank]}[kind]


# -- parameters -----------------------------------------------------------------------------------------------
def param_table(cfg) -> dict:
    """Parameter counts by module, from the model on the meta device: {name: (dense, routed)} for "embed",
    "head" (final norm + head), "layers.i" and "mtp.k" (each MTP module, its block included)."""
    return dict(_param_table(tuple(sorted(asdict(cfg).items()))))


@functools.lru_cache(maxsize=4)
def _param_table(fields: tuple) -> tuple:
    from model import ModelConfig, Transformer
    cfg = ModelConfig(**dict(fields))
    with torch.device("meta"):
        model = Transformer(cfg)
    table = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else ("embed" if parts[0] == "embed" else "head")
        dense, routed = table.get(key, (0, 0))
        if ".ffn.experts." in name:
            routed += p.numel()
        else:
            dense += p.numel()
        table[key] = (dense, routed)
    return tuple(table.items())


def stage_modules(cfg, n_stages: int, stage: int) -> list:
    """Module keys of `stage` (param_table's names)."""
    sizes = stage_sizes(cfg.n_layers, n_stages)
    lo = sum(sizes[:stage])
    keys = [f"layers.{i}" for i in range(lo, lo + sizes[stage])]
    if stage == 0:
        keys.insert(0, "embed")
    if stage == n_stages - 1:
        keys += ["head"] + [f"mtp.{k}" for k in range(cfg.n_mtp)] + (["embed"] if cfg.n_mtp else [])
    return keys


def rank_params(cfg, table: dict, kind: str, pp: int, ep: int, rank: int) -> tuple:
    """(P_d, P_e) of a rank: dense parameters, and its 1/ep slice of the routed experts; shared modules once."""
    n_stages = 2 * pp if kind == "dualpipev" else pp
    keys = {k for s in rank_stages(kind, pp, rank) for k in stage_modules(cfg, n_stages, s)}
    return sum(table[k][0] for k in keys), sum(table[k][1] for k in keys) // ep


def state_bytes(p_dense: int, p_expert: int, dp: int, efsdp: int) -> dict:
    sharded = p_dense / dp + p_expert / efsdp
    return {"weights (BF16)": BF16 * (p_dense + p_expert), "gradients (FP32)": FP32 * (p_dense + p_expert),
            "master weights (FP32, ZeRO-1)": FP32 * sharded, "AdamW moments (2 x BF16, ZeRO-1)": 2 * BF16 * sharded}


# -- activations ----------------------------------------------------------------------------------------------
FP8 = 1 + 4 / 128  # one byte an element and one FP32 scale per 128 (1x128 tiles)
E5M6 = 1.5  # the attention output projection's input (report §3.3.3)
SCHEMES = ("bf16", "bf16_recompute", "report")


def block_tensors(cfg, moe: bool) -> list:
    """What one block's forward saves per token: (name, elements, BF16 bytes an element, recomputed by the
    report, bytes an element kept the report's way (0: not kept))."""
    d, H = cfg.dim, cfg.n_heads
    dn, dr, dv, qc, kc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    t = [("x", d, BF16, False, BF16), ("norm(x)", d, BF16, True, 0)]
    if qc:
        t += [("c^Q", qc, BF16, False, BF16), ("norm(c^Q)", qc, BF16, True, 0)]
    t += [("[c^KV; k^R]", kc + dr, BF16, False, BF16), ("norm(c^KV)", kc, BF16, True, 0),
          ("q, k", 2 * H * (dn + dr), BF16, True, 0), ("v", H * dv, BF16, True, 0),
          ("o", H * dv, BF16, False, E5M6), ("log-sum-exp", H, FP32, False, FP32),
          ("h", d, BF16, False, BF16), ("norm(h)", d, BF16, True, 0)]
    if not moe:
        return t + [("W1 u, W3 u", 2 * cfg.inter_dim, BF16, False, FP8), ("SwiGLU", cfg.inter_dim, BF16, False, FP8)]
    Ie, Ns, K = cfg.moe_inter_dim, cfg.n_shared_experts, cfg.n_activated_experts
    return t + [("scores", cfg.n_routed_experts, FP32, False, FP32),
                ("shared W1 u, W3 u", 2 * Ns * Ie, BF16, False, FP8), ("shared SwiGLU", Ns * Ie, BF16, False, FP8),
                ("routed inputs", K * d, BF16, False, FP8), ("routed W1 u, W3 u", K * 2 * Ie, BF16, False, FP8),
                ("routed SwiGLU", K * Ie, BF16, True, 0),
                ("routed outputs", K * d, BF16, False, 0)]  # report way: g applied before W2 (docstring)


def block_act_bytes(cfg, moe: bool, scheme: str) -> float:
    """Bytes one block's forward saves per token under a scheme of SCHEMES (module docstring)."""
    if scheme not in SCHEMES:
        raise ValueError(f"activation scheme must be one of {SCHEMES}, got {scheme!r}")
    rows = block_tensors(cfg, moe)
    if scheme == "bf16":
        return sum(n * b for _, n, b, _, _ in rows)
    if scheme == "bf16_recompute":
        return sum(n * b for _, n, b, rc, _ in rows if not rc)
    return sum(n * kept for _, n, _, _, kept in rows)


def tail_act_bytes(cfg, scheme: str) -> float:
    """Per token, the last stage beyond its blocks: final norm, logits and FP32 log-softmax, the MTP modules."""
    d, V = cfg.dim, cfg.vocab_size
    norm = (2 if scheme == "bf16" else 1) * d * BF16  # input (and output unless recomputed)
    logits = V * BF16 + V * FP32
    mtp_norms = (8 if scheme == "bf16" else 5) * d * BF16  # enorm/hnorm in and out, concat, final norm
    return norm + logits + cfg.n_mtp * (mtp_norms + block_act_bytes(cfg, True, scheme) + logits)


def stage_act_bytes(cfg, n_stages: int, stage: int, tokens: int, scheme: str) -> float:
    """Bytes one micro-batch of `tokens` tokens leaves saved on `stage`."""
    sizes = stage_sizes(cfg.n_layers, n_stages)
    lo = sum(sizes[:stage])
    per_token = sum(block_act_bytes(cfg, i >= cfg.n_dense_layers, scheme) for i in range(lo, lo + sizes[stage]))
    if stage == n_stages - 1:
        per_token += tail_act_bytes(cfg, scheme)
    return per_token * tokens


def peak_activations(sched, stage_bytes: dict) -> list:
    """Per rank: the peak over its op list of Σ in-flight micro-batches × their stage's bytes."""
    peaks = []
    for r, ops in enumerate(sched.ops):
        cur = peak = 0.0
        for op in ops:
            for o in (op[1:] if op[0] == "FB" else (op,)):
                stage = sched.where(r, o[1])[1]
                if o[0] == "F":
                    cur += stage_bytes[stage]
                elif o[0] in ("B", "W"):  # a full backward, or the weight half after an input-only BI
                    cur -= stage_bytes[stage]
                peak = max(peak, cur)
        peaks.append(peak)
    return peaks


# -- all-to-all -----------------------------------------------------------------------------------------------
def all_to_all_bytes(cfg, ep: int, gpus_per_node: int) -> dict:
    """Bytes per token per MoE layer, forward (module docstring); IB expected and bound, NVLink expected."""
    d, K = cfg.dim, cfg.n_activated_experts
    dispatch, combine = d * (1 + 4 / 128), BF16 * d
    nodes = max(1, ep // gpus_per_node)
    if nodes == 1:
        ib_copies = ib_bound = 0.0
        nv_copies = K * (1 - 1 / ep)
    else:
        M = min(cfg.n_limited_groups if cfg.n_expert_groups == nodes else K, nodes)
        ib_copies, ib_bound = M * (1 - 1 / nodes), float(M)
        nv_copies = K * (1 - 1 / gpus_per_node)
    return {"nodes": nodes, "ib_copies": ib_copies, "ib_bound": ib_bound, "nv_copies": nv_copies,
            "dispatch": dispatch, "combine": combine,
            "ib": ib_copies * (dispatch + combine), "ib_max": ib_bound * (dispatch + combine),
            "nvlink": nv_copies * (dispatch + combine)}


# -- FLOPs and time -------------------------------------------------------------------------------------------
def block_flops(cfg, moe: bool, T: int) -> tuple:
    """(linear, attention) forward FLOPs per token of one block."""
    d, H = cfg.dim, cfg.n_heads
    dn, dr, dv, qc, kc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    q = d * qc + qc * H * (dn + dr) if qc else d * H * (dn + dr)
    attn = q + d * (kc + dr) + kc * H * (dn + dv) + H * dv * d
    if moe:
        ffn = d * cfg.n_routed_experts + 3 * d * cfg.moe_inter_dim * (cfg.n_shared_experts + cfg.n_activated_experts)
    else:
        ffn = 3 * d * cfg.inter_dim
    return 2 * (attn + ffn), H * T * (dn + dr + dv)


def stage_flops(cfg, n_stages: int, stage: int, T: int) -> tuple:
    sizes = stage_sizes(cfg.n_layers, n_stages)
    lo = sum(sizes[:stage])
    lin = att = 0.0
    for i in range(lo, lo + sizes[stage]):
        a, b = block_flops(cfg, i >= cfg.n_dense_layers, T)
        lin, att = lin + a, att + b
    if stage == n_stages - 1:
        a, b = block_flops(cfg, True, T)
        head = 2 * cfg.dim * cfg.vocab_size
        lin += head + cfg.n_mtp * (2 * 2 * cfg.dim * cfg.dim + a + head)
        att += cfg.n_mtp * b
    return lin, att


def moe_layers_in(cfg, n_stages: int, stage: int) -> int:
    sizes = stage_sizes(cfg.n_layers, n_stages)
    lo = sum(sizes[:stage])
    n = sum(1 for i in range(lo, lo + sizes[stage]) if i >= cfg.n_dense_layers)
    return n + (cfg.n_mtp if stage == n_stages - 1 else 0)


def recompute_flops(cfg, n_stages: int, stage: int) -> float:
    """Per token: the MLA up-projections (W^UQ/W^QR and W^UK/W^UV) each block of `stage` runs again in the
    backward (report §3.2.3); RMSNorm and SwiGLU recomputation are elementwise and not counted."""
    H, dn, dr, dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    up = 2 * (cfg.q_lora_rank * H * (dn + dr) + cfg.kv_lora_rank * H * (dn + dv))
    blocks = stage_sizes(cfg.n_layers, n_stages)[stage] + (cfg.n_mtp if stage == n_stages - 1 else 0)
    return blocks * up


def stage_times(cfg, n_stages: int, stage: int, tokens: int, T: int, a2a: dict, A: Assumptions) -> tuple:
    """(F, R, C) seconds of one micro-batch on `stage`: forward compute, recomputation in the backward,
    communication (all-to-all of its MoE layers and the send of a stage's boundary, dim bf16 values a token). C is
    charged to the forward and the backward alike, so the last stage's forward and the first stage's backward
    count one send they do not make: an upper bound by dim·2 bytes a token, little beside the all-to-all."""
    c = 1 - A.comm_sms / A.sms
    lin, att = stage_flops(cfg, n_stages, stage, T)
    F = tokens * (lin / (A.gemm_tflops * 1e12 * c) + att / (A.attn_tflops * 1e12 * c))
    R = tokens * recompute_flops(cfg, n_stages, stage) / (A.gemm_tflops * 1e12 * c)
    per_layer = max(a2a["ib"] / (A.ib_gbs * 1e9), a2a["nvlink"] / (A.nvlink_gbs * 1e9))
    C = tokens * (moe_layers_in(cfg, n_stages, stage) * per_layer + cfg.dim * BF16 / (A.ib_gbs * 1e9))
    return F, R, C


def op_seconds(kind: str, times: list, sched, rank: int, op: tuple) -> float:
    """Seconds of one op of `rank` (module docstring): F + C, B = 2F + R + C, BI = F + R + C, W = F; an
    overlapped F&B pair max(F + B compute, both communications) under DualPipe(V); 1F1B has no pairs."""
    if op[0] == "FB":
        (f, _, cf), (b, rb, cb) = (times[sched.where(rank, o[1])[1]] for o in op[1:])
        return max(f + 2 * b + rb, cf + cb)
    F, R, C = times[sched.where(rank, op[1])[1]]
    return {"F": F + C, "B": 2 * F + R + C, "BI": F + R + C, "W": F}[op[0]]


def forward_flops_per_token(cfg, T: int) -> float:
    lin = att = 0.0
    for i in range(cfg.n_layers):
        a, b = block_flops(cfg, i >= cfg.n_dense_layers, T)
        lin, att = lin + a, att + b
    a, b = block_flops(cfg, True, T)
    head = 2 * cfg.dim * cfg.vocab_size
    return lin + att + head + cfg.n_mtp * (2 * 2 * cfg.dim * cfg.dim + a + b + head)


# -- the plan -------------------------------------------------------------------------------------------------
def make_plan(cfg, gpus: int, gpus_per_node: int, ep: int, pp: int, kind: str, global_batch: int, seq_len: int,
              micro_batch: int, A: Assumptions) -> dict:
    """Every number of the printed plan, in a dict (tests read it). Raises ValueError for a bad layout."""
    for name, v in (("global_batch", global_batch), ("seq_len", seq_len), ("micro_batch", micro_batch)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    dp = check_layout(cfg, gpus, gpus_per_node, ep, pp, kind)
    efsdp = dp // ep
    if global_batch % (dp * micro_batch):
        raise ValueError(f"--global_batch {global_batch} must split into dp ({dp}) x micro-batches of "
                         f"{micro_batch} sequences")
    n_micro = global_batch // (dp * micro_batch)
    n_stages = 2 * pp if kind == "dualpipev" else pp
    sched = make_schedule(kind, pp, n_micro)  # raises if too few micro-batches for the schedule
    table = param_table(cfg)
    tokens = micro_batch * seq_len
    ranks = []
    per_micro = {sc: [stage_act_bytes(cfg, n_stages, s, tokens, sc) for s in range(n_stages)] for sc in SCHEMES}
    acts = {sc: peak_activations(sched, dict(enumerate(per_micro[sc]))) for sc in SCHEMES}
    for r in range(pp):
        pd, pe = rank_params(cfg, table, kind, pp, ep, r)
        states = state_bytes(pd, pe, dp, efsdp)
        ranks.append({"rank": r, "dense": pd, "expert": pe, "states": states,
                      "act": {sc: acts[sc][r] for sc in SCHEMES}, "total": sum(states.values()) + acts["report"][r]})
    worst = max(ranks, key=lambda x: x["total"])
    a2a = all_to_all_bytes(cfg, ep, gpus_per_node)
    times = [stage_times(cfg, n_stages, s, tokens, seq_len, a2a, A) for s in range(n_stages)]
    tl = simulate(sched, {}, lambda r, op: op_seconds(kind, times, sched, r, op))
    F, R, C = max(times)  # the busiest stage, for DualPipe's README formula (which assumes equal stages)
    costs = {"F": F + C, "B": 2 * F + R + C, "W": F, "FB": max(3 * F + R, 2 * C), "compute_F": F, "comm": C,
             "recompute": R}
    bubble = tl.makespan - max(tl.busy)  # beyond the busiest rank's own work
    sync = 6 * max(r["dense"] * (dp - 1) / dp + r["expert"] * (efsdp - 1) / efsdp for r in ranks) / (A.ib_gbs * 1e9)
    step = tl.makespan + sync
    step_tokens = global_batch * seq_len
    fwd = forward_flops_per_token(cfg, seq_len)
    pp_stages = 2 * pp if kind == "dualpipev" else pp  # the PP of DualPipe's README formula
    return {"cfg": cfg, "gpus": gpus, "gpus_per_node": gpus_per_node, "ep": ep, "pp": pp, "dp": dp,
            "efsdp": efsdp, "kind": kind, "n_stages": n_stages, "n_micro": n_micro, "micro_batch": micro_batch,
            "seq_len": seq_len, "global_batch": global_batch, "sizes": stage_sizes(cfg.n_layers, n_stages),
            "ranks": ranks, "worst": worst, "per_micro": {sc: max(v) for sc, v in per_micro.items()},
            "a2a": a2a, "costs": costs, "times": times, "makespan": tl.makespan, "bubble": bubble,
            "busy": max(tl.busy), "formula_bubble": formula_bubble("1f1b" if kind == "1f1b" else "dualpipe",
                                                                  pp_stages, costs),
            "sync": sync, "step": step, "tokens_per_s_gpu": step_tokens / step / gpus,
            "mfu": 3 * fwd * step_tokens / (step * gpus * A.peak_tflops * 1e12), "fwd_flops": fwd,
            "assumptions": A, "fits": worst["total"] <= A.gpu_mem_gb * 1e9}


def _gb(x):
    return f"{x / 1e9:8.2f} GB" if x >= 1e8 else f"{x / 1e6:8.2f} MB"


def _s(x):
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1e3:.3g} ms"


def render(p: dict) -> str:
    A, w, a = p["assumptions"], p["worst"], p["a2a"]
    sizes = p["sizes"]
    out = [f"Plan: {p['cfg'].n_layers} blocks + {p['cfg'].n_mtp} MTP on {p['gpus']} GPUs "
           f"({p['gpus_per_node']} a node): "
           f"pp {p['pp']} ({p['kind']}, {p['n_stages']} stages of {min(sizes)}-{max(sizes)} blocks) x dp {p['dp']} "
           f"(ep {p['ep']} x efsdp {p['efsdp']}), no TP",
           f"batch {p['global_batch']} x {p['seq_len']} tokens = {p['n_micro']} micro-batches of {p['micro_batch']} "
           f"per pipeline",
           f"assumptions: GEMM {A.gemm_tflops:g} TFLOP/s, attention {A.attn_tflops:g} TFLOP/s, {A.comm_sms} of "
           f"{A.sms} SMs for communication, NVLink {A.nvlink_gbs:g} GB/s, IB {A.ib_gbs:g} GB/s per GPU, "
           f"peak {A.peak_tflops:g} TFLOP/s (BF16), {A.gpu_mem_gb:g} GB a GPU",
           "",
           f"per GPU, the most loaded rank (pp rank {w['rank']}): {w['dense'] / 1e6:,.1f}M dense + "
           f"{w['expert'] / 1e6:,.1f}M expert parameters"]
    for k, v in w["states"].items():
        out.append(f"  {k:34s} {_gb(v)}")
    names = {"bf16": "BF16, no recomputation", "bf16_recompute": "BF16, report recomputation",
             "report": "report recomputation + FP8 caching"}
    out.append("  activations: one micro-batch on its largest stage / the rank's peak in flight")
    for sc in SCHEMES:
        out.append(f"    {names[sc]:32s} {_gb(p['per_micro'][sc])} / {_gb(w['act'][sc])}")
    out += [f"  {'total (states + report activations)':34s} {_gb(w['total'])}  of {A.gpu_mem_gb:g} GB",
            "",
            f"all-to-all per token per MoE layer (forward; the backward moves as much again), EP over "
            f"{a['nodes']} node(s):",
            f"  dispatch FP8 {a['dispatch']:.0f} B a copy, combine BF16 {a['combine']:.0f} B a copy",
            f"  IB      {a['ib_copies']:.2f} copies expected (<= {a['ib_bound']:.0f}): {a['ib'] / 1e3:.1f} KB "
            f"(<= {a['ib_max'] / 1e3:.1f} KB)",
            f"  NVLink  {a['nv_copies']:.2f} copies: {a['nvlink'] / 1e3:.1f} KB",
            ""]
    c = p["costs"]
    out += [f"time of one micro-batch on the busiest stage: compute F {_s(c['compute_F'])} (B = 2F + "
            f"recomputation {_s(c['recompute'])}, W = F), communication {_s(c['comm'])}; F&B pair {_s(c['FB'])} "
            f"(lightest stage: F {_s(min(p['times'])[0])})",
            f"pipeline ({p['kind']}, simulated by dualpipe.simulate): {_s(p['makespan'])}, bubble "
            f"{_s(p['bubble'])} ({100 * p['bubble'] / p['makespan']:.1f}%) beyond the busiest rank's "
            f"{_s(p['busy'])} of work; DualPipe's README formula "
            f"{'(PP-1)(F+B)' if p['kind'] == '1f1b' else '(PP/2-1)(F&B+B-3W)'} with the busiest stage's costs gives "
            f"{_s(p['formula_bubble'])}",
            f"data-parallel gradient sync (not overlapped): {_s(p['sync'])}",
            f"step {_s(p['step'])} -> {p['tokens_per_s_gpu']:.0f} tokens/s per GPU, MFU {100 * p['mfu']:.1f}% "
            f"(forward {p['fwd_flops'] / 1e9:.1f} GFLOP a token, x3 for training)"]
    return "\n".join(out)


def report_comparison(p: dict, others: list) -> str:
    """The report's setup and throughput beside this plan, and the same layout under the other schedules."""
    r, A = REPORT, p["assumptions"]
    if p["cfg"] != PRESETS["v3-671b"]:
        return "\n\n(the report's setup is compared with --preset v3-671b only)"
    same = all(p[k] == r[k] for k in ("gpus", "gpus_per_node", "ep", "pp")) and p["kind"] == r["pp_schedule"]
    report_mfu = 3 * p["fwd_flops"] * r["tokens_per_s_gpu"] / (A.peak_tflops * 1e12)
    out = ["",
           f"report: {r['gpus']} H800, PP{r['pp']} ({r['pp_schedule']}), EP{r['ep']} over "
           f"{r['ep'] // r['gpus_per_node']} nodes, ZeRO-1 DP, no TP; 180K GPU-hours per 1T tokens = "
           f"{r['tokens_per_s_gpu']:.0f} tokens/s per GPU = {100 * report_mfu:.1f}% MFU by this plan's FLOP count",
           f"this plan{' (the same layout)' if same else ''}: {p['tokens_per_s_gpu']:.0f} tokens/s per GPU, "
           f"{p['tokens_per_s_gpu'] / r['tokens_per_s_gpu']:.2f} x the report",
           "",
           f"{'schedule':10s} {'params/GPU':>10s} {'act peak':>9s} {'total':>8s} {'bubble':>7s} {'step':>7s} "
           f"{'tok/s/GPU':>9s} {'MFU':>6s}"]
    for q in [p] + others:
        w = q["worst"]
        out.append(f"{q['kind']:10s} {(w['dense'] + w['expert']) / 1e9:9.2f}B {w['act']['report'] / 1e9:7.1f}GB "
                   f"{w['total'] / 1e9:6.1f}GB {q['bubble']:6.2f}s {q['step']:6.2f}s {q['tokens_per_s_gpu']:9.0f} "
                   f"{100 * q['mfu']:5.1f}%" + ("" if q["fits"] else "  (does not fit)"))
    return "\n".join(out)


def other_schedules(cfg, args: tuple, kind: str) -> list:
    """The same layout planned with the other schedules, where they can run it."""
    out = []
    for k in SCHEDULES:
        if k != kind:
            try:
                out.append(make_plan(cfg, *args[:4], k, *args[4:]))
            except ValueError:
                pass
    return out


def build_parser():
    p = argparse.ArgumentParser(usage="%(prog)s [options]", description="Plan a run on paper: memory, all-to-all, bubble, step time, MFU.")
    p.add_argument("--preset", default="v3-671b", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--gpus", type=int, default=REPORT["gpus"])
    p.add_argument("--gpus_per_node", type=int, default=REPORT["gpus_per_node"])
    p.add_argument("--ep", type=int, default=REPORT["ep"])
    p.add_argument("--pp", type=int, default=REPORT["pp"])
    p.add_argument("--pp_schedule", default=REPORT["pp_schedule"], help=", ".join(SCHEDULES))
    p.add_argument("--global_batch", type=int, default=15360, help="sequences per step (report: 15360)")
    p.add_argument("--seq_len", type=int, default=4096, help="tokens per sequence (report: 4096)")
    p.add_argument("--micro_batch", type=int, default=1, help="sequences per micro-batch")
    for f, v in Assumptions().__dict__.items():
        p.add_argument(f"--{f}", type=type(v), default=v)
    return p


def run(preset: str, gpus: int, gpus_per_node: int, ep: int, pp: int, kind: str, global_batch: int, seq_len: int,
        micro_batch: int, A: Assumptions) -> int:
    """Print the plan; 0 if it fits, 2 (with one line on stderr) if it does not or the layout is invalid."""
    try:
        cfg = get_preset(preset)
        p = make_plan(cfg, gpus, gpus_per_node, ep, pp, kind, global_batch, seq_len, micro_batch, A)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not p["fits"]:
        w = p["worst"]
        print(f"error: does not fit: pp rank {w['rank']} needs {w['total'] / 1e9:.1f} GB of {A.gpu_mem_gb:g} GB "
              f"(states {sum(w['states'].values()) / 1e9:.1f} GB + activations {w['act']['report'] / 1e9:.1f} GB)",
              file=sys.stderr)
        return 2
    args = (gpus, gpus_per_node, ep, pp, global_batch, seq_len, micro_batch, A)
    print(render(p) + report_comparison(p, other_schedules(cfg, args, kind)))
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    A = Assumptions(**{f: getattr(a, f) for f in Assumptions().__dict__})
    return run(a.preset, a.gpus, a.gpus_per_node, a.ep, a.pp, a.pp_schedule, a.global_batch, a.seq_len,
               a.micro_batch, A)


if __name__ == "__main__":
    sys.exit(main())
