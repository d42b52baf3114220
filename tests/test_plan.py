"""plan.py: hand-computed bytes, all-to-all and bubbles on small inputs; the refusal; the v3-671b plan's sanity."""
import dataclasses

import pytest
import torch

import plan
from config import ModelConfig, get_preset
from dualpipe import formula_bubble, make_schedule, simulate
from model import Transformer, count_params

# A block small enough to count by hand: d 8, H 2, d_n 4, d_r 2, d_v 4, q_c 4, k_c 4, dense FFN 16,
# MoE: 4 routed experts of width 4, 1 shared, K_r 2.
SMALL = ModelConfig(vocab_size=32, dim=8, n_layers=2, n_dense_layers=1, inter_dim=16, n_heads=2, q_lora_rank=4,
                    kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, max_seq_len=16,
                    moe_inter_dim=4, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2,
                    n_expert_groups=2, n_limited_groups=1, n_mtp=1)


def test_state_bytes_by_hand():
    # 1000 dense + 400 expert parameters, dense replicated over dp 4, experts over efsdp 2:
    # BF16 weights 2·1400, FP32 grads 4·1400, FP32 master 4·(250+200), BF16 moments 2·2·(250+200).
    assert list(plan.state_bytes(1000, 400, 4, 2).values()) == [2800, 5600, 1800, 1800]


def test_block_activations_by_hand():
    # Dense block, BF16: x 8, norm(x) 8, c^Q 4, norm(c^Q) 4, [c^KV;k^R] 6, norm(c^KV) 4, q and k 2·2·6, v 8, o 8,
    # h 8, norm(h) 8, W1 u and W3 u 32, SwiGLU 16 = 138 elements · 2 bytes, + log-sum-exp 2 · 4 bytes.
    assert plan.block_act_bytes(SMALL, False, "bf16") == 138 * 2 + 8
    # recomputed: norm(x), norm(c^Q), norm(c^KV), q, k, v, norm(h) = 56 elements fewer
    assert plan.block_act_bytes(SMALL, False, "bf16_recompute") == (138 - 56) * 2 + 8
    # the report's way: x, c^Q, [c^KV;k^R], h in BF16 (2·(8+4+6+8)), o in E5M6 (8·1.5), lse FP32 (8),
    # W1 u, W3 u and SwiGLU in FP8 with a scale per 128 (48·(1 + 4/128))
    assert plan.block_act_bytes(SMALL, False, "report") == 2 * 26 + 12 + 8 + 48 * (1 + 4 / 128)
    # MoE block, BF16: attention 74 elements + lse 8 bytes; h, norm(h) 16; scores 4 in FP32; shared 3·4;
    # routed 2 copies of (input 8, W1 u and W3 u 8, SwiGLU 4, output 8) = 56
    assert plan.block_act_bytes(SMALL, True, "bf16") == (74 + 16 + 12 + 56) * 2 + 8 + 16
    with pytest.raises(ValueError, match="scheme"):
        plan.block_act_bytes(SMALL, True, "fp4")


def test_all_to_all_by_hand():
    cfg = get_preset("v3-671b", dim=256)  # K_r 8, 8 expert groups, at most 4 of them (nodes) per token
    a = plan.all_to_all_bytes(cfg, ep=64, gpus_per_node=8)  # 8 nodes, one expert group a node
    assert (a["dispatch"], a["combine"]) == (256 * (1 + 4 / 128), 512)  # FP8 + scales, BF16
    assert a["ib_copies"] == 4 * (1 - 1 / 8) and a["ib_bound"] == 4  # own node chosen with probability 4/8
    assert a["ib"] == pytest.approx(3.5 * 776) and a["ib_max"] == pytest.approx(4 * 776)
    assert a["nv_copies"] == 8 * (1 - 1 / 8) and a["nvlink"] == pytest.approx(7 * 776)
    inside = plan.all_to_all_bytes(cfg, ep=8, gpus_per_node=8)  # one node: NVLink only
    assert inside["ib"] == 0 and inside["nvlink"] == pytest.approx(8 * (1 - 1 / 8) * 776)
    two = plan.all_to_all_bytes(cfg, ep=16, gpus_per_node=8)  # 2 nodes, groups not one a node: min(K_r, 2)
    assert two["ib_copies"] == 2 * (1 - 1 / 2)


def test_op_seconds_by_hand():
    sched = make_schedule("dualpipe", 2, 4)
    times = [(1.0, 0.5, 2.0)] * 2  # F, R (recomputation), C (communication) of each stage
    cost = lambda op: plan.op_seconds("dualpipe", times, sched, 0, op)  # noqa: E731
    assert [cost(("F", 0, 0)), cost(("B", 0, 0)), cost(("BI", 0, 0)), cost(("W", 0, 0))] == [3.0, 4.5, 3.5, 1.0]
    assert cost(("FB", ("F", 0, 1), ("B", 1, 0))) == max(1 + 2 + 0.5, 2 + 2)  # communication hidden up to 3.5


@pytest.mark.parametrize("kind,pp", [("1f1b", 8), ("dualpipe", 8), ("dualpipev", 4)])
def test_equal_stages_give_the_readme_bubble(kind, pp):
    # Equal stages, no communication: F = 1, B = 2, W = 1, F&B = 3, the costs of DualPipe's README, under which the
    # simulated bubble is exactly its formula: 21 for 1F1B at PP 8, 6 for DualPipe(V).
    sched = make_schedule(kind, pp, 20)
    times = [(1.0, 0.0, 0.0)] * sched.n_stages
    tl = simulate(sched, {}, lambda r, op: plan.op_seconds(kind, times, sched, r, op))
    readme = dict(F=1, B=2, W=1, FB=3)
    assert max(tl.bubble) == formula_bubble("1f1b" if kind == "1f1b" else "dualpipe", 8, readme)


def test_peak_activations_follow_the_schedules():
    # In units of one stage's micro-batch: 1F1B holds pp - r on rank r, DualPipe pp + 1 everywhere (DualPipe's README).
    one = lambda s: {i: 1.0 for i in range(s.n_stages)}  # noqa: E731
    s = make_schedule("1f1b", 8, 20)
    assert plan.peak_activations(s, one(s)) == [8, 7, 6, 5, 4, 3, 2, 1]
    s = make_schedule("dualpipe", 8, 20)
    assert plan.peak_activations(s, one(s)) == [9] * 8


def test_stage_sizes():
    assert plan.stage_sizes(61, 16) == [3] + [4] * 13 + [3, 3]
    assert plan.stage_sizes(8, 4) == [2, 2, 2, 2] and sum(plan.stage_sizes(61, 32)) == 61


@pytest.fixture(scope="module")
def v3():
    return get_preset("v3-671b")


@pytest.mark.parametrize("kind,copies", [("1f1b", 1), ("dualpipe", 2), ("dualpipev", 1)])
def test_v3_parameters_per_gpu_add_up_to_count_params(v3, kind, copies):
    p = plan.make_plan(v3, 2048, 8, 64, 16, kind, 15360, 4096, 1, plan.Assumptions())
    n = count_params(v3)
    held = sum(r["dense"] + 64 * r["expert"] for r in p["ranks"])  # every rank of one pipeline, experts × ep
    embed_copy = v3.vocab_size * v3.dim if kind == "1f1b" else 0  # 1F1B: the last stage's copy for MTP
    assert held == copies * (n["total"] + n["mtp"]) + embed_copy


def test_v3_report_layout_is_sane(v3, capsys):
    assert plan.main([]) == 0  # the defaults are the report's layout
    out = capsys.readouterr().out
    assert "report: 2048 H800, PP16 (dualpipe), EP64 over 8 nodes" in out and "tokens/s per GPU" in out
    p = plan.make_plan(v3, 2048, 8, 64, 16, "dualpipe", 15360, 4096, 1, plan.Assumptions())
    w = p["worst"]
    assert 1e9 < w["dense"] + w["expert"] < 5e9  # a few billion parameters a GPU (two stages under DualPipe)
    assert w["act"]["report"] < w["act"]["bf16_recompute"] < w["act"]["bf16"]
    assert 20e9 < w["total"] <= 80e9 and p["fits"]
    assert 0 < p["bubble"] < 0.2 * p["makespan"]
    assert 0.2 < p["mfu"] < 0.7
    assert 0.5 < p["tokens_per_s_gpu"] / plan.REPORT["tokens_per_s_gpu"] < 2
    assert p["n_micro"] == 120 and p["dp"] == 128 and p["efsdp"] == 2


def test_refusals_are_one_line(capsys):
    assert plan.main(["--gpu_mem_gb", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: does not fit: pp rank") and err.count("\n") == 1
    for bad in (["--pp", "7"], ["--pp_schedule", "dualpipe", "--pp", "15", "--gpus", "1920"], ["--micro_batch", "0"],
                ["--global_batch", "100"], ["--preset", "nope"], ["--pp_schedule", "gpipe"]):
        assert plan.main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, bad


# -- FLOPs, MFU, stage times, the DualPipeV formula, the last stage's activations and the gradient sync ----------
def activated_matmul_weights(cfg) -> int:
    """Weights a token multiplies with, counted on the model itself (meta device): every matrix but the embedding
    (a lookup), the routed experts at K_r/N_r of their size (only K_r of them run), and the shared head once more
    for each MTP depth. Independent of plan.py's hand formulas."""
    with torch.device("meta"):
        model = Transformer(cfg)
    n = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "embed.weight":
            continue  # norm gains, the embedding lookup
        share = cfg.n_activated_experts / cfg.n_routed_experts if ".ffn.experts." in name else 1
        n += p.numel() * share
    return n + cfg.n_mtp * cfg.vocab_size * cfg.dim  # the shared head again in each MTP depth


@pytest.mark.parametrize("preset", [None, "v3-671b"])
def test_forward_flops_match_the_models_activated_weights(preset):
    """Forward FLOPs per token = 2 × activated matmul weights (main model and MTP) + causal attention, which over
    T/2 keys on average costs H·T·(d_n + d_r + d_v) per attention layer (the MTP blocks' included)."""
    cfg = SMALL if preset is None else get_preset(preset)
    T = 64 if preset is None else 4096
    layers = cfg.n_layers + cfg.n_mtp
    want = 2 * activated_matmul_weights(cfg) + layers * cfg.n_heads * T * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert plan.forward_flops_per_token(cfg, T) == pytest.approx(want, rel=1e-12)


def test_mfu_is_achieved_model_flops_over_the_bf16_peak():
    """MFU = 3 × forward FLOPs a token × tokens/s per GPU / peak: the peak (not the assumed GEMM speed) is the
    denominator, so changing it leaves the step alone and scales MFU inversely."""
    cfg = dataclasses.replace(SMALL, n_layers=8)
    args = (cfg, 4, 2, 2, 2, "dualpipe", 8, 64, 1)  # gpus, gpus_per_node, ep, pp, schedule, batch, T, micro-batch
    A = plan.Assumptions()
    p = plan.make_plan(*args, A)
    tokens_per_s_gpu = 8 * 64 / p["step"] / 4
    assert p["tokens_per_s_gpu"] == pytest.approx(tokens_per_s_gpu, rel=1e-12)
    flops = 3 * p["fwd_flops"] * tokens_per_s_gpu  # model FLOP/s achieved per GPU
    assert p["mfu"] == pytest.approx(flops / (A.peak_tflops * 1e12), rel=1e-12)
    q = plan.make_plan(*args, dataclasses.replace(A, peak_tflops=2 * A.peak_tflops))
    assert q["step"] == p["step"] and q["mfu"] == pytest.approx(p["mfu"] / 2, rel=1e-12)


def test_stage_times_by_hand():
    """F: a stage's FLOPs over GEMM/attention speed on the SMs left after communication (20 of 132); C: the
    all-to-all of each MoE layer (the slower of IB and NVLink) and the send of the hidden state (BF16) over IB."""
    A = plan.Assumptions()
    c = 1 - 20 / 132
    tokens, T = 64, 32
    a2a = {"ib": 3000.0, "nvlink": 5000.0}  # bytes a token per MoE layer
    # stage 0 of 2 = block 0, dense: matmuls q_a 8·4, q_b 4·12, kv_a 8·6, kv_b 4·16, o 8·8, FFN 3·8·16
    # → 2·640 FLOPs; attention H·T·(d_n + d_r + d_v) = 2·T·10
    F, R, C = plan.stage_times(SMALL, 2, 0, tokens, T, a2a, A)
    assert F == pytest.approx(tokens * (1280 / (1000e12 * c) + 20 * T / (450e12 * c)), rel=1e-12)
    assert R == pytest.approx(tokens * 2 * (4 * 12 + 4 * 16) / (1000e12 * c), rel=1e-12)  # MLA up-projections
    assert C == pytest.approx(tokens * 8 * 2 / 50e9, rel=1e-12)  # no MoE layer: only the hidden state's send
    # stage 1 = block 1 and the MTP block: two MoE layers, each max(3000 B / 50 GB/s, 5000 B / 160 GB/s)
    _, _, C1 = plan.stage_times(SMALL, 2, 1, tokens, T, a2a, A)
    assert C1 == pytest.approx(tokens * (2 * 3000 / 50e9 + 8 * 2 / 50e9), rel=1e-12)
    # no SMs given to communication: the same FLOPs at full speed
    F0, R0, C0 = plan.stage_times(SMALL, 2, 0, tokens, T, a2a, dataclasses.replace(A, comm_sms=0))
    assert (F0, R0, C0) == pytest.approx((F * c, R * c, C), rel=1e-12)


def test_dualpipev_formula_has_two_stages_a_rank():
    """DualPipeV on pp ranks runs 2·pp stages, so its bubble formula (PP/2 - 1)(F&B + B - 3W) takes PP = 2·pp:
    (pp - 1)(F&B + B - 3W)."""
    cfg = dataclasses.replace(SMALL, n_layers=8)
    p = plan.make_plan(cfg, 4, 2, 2, 2, "dualpipev", 8, 64, 1, plan.Assumptions())
    c = p["costs"]
    assert p["n_stages"] == 4
    assert p["formula_bubble"] == pytest.approx((2 - 1) * (c["FB"] + c["B"] - 3 * c["W"]), rel=1e-12)
    assert p["formula_bubble"] > 0


def test_last_stage_activations_and_gradient_sync_by_hand():
    """Last stage per token, BF16 scheme: final norm in and out 2·d BF16, logits V in BF16 and their FP32
    log-softmax, and per MTP module its norms and concat 8·d BF16, its MoE block and its logits again.
    Gradient sync per step: FP32 gradients reduce-scattered (4 B) and BF16 weights all-gathered (2 B), each
    moving (n-1)/n of the parameters a rank holds, over IB."""
    d, V = SMALL.dim, SMALL.vocab_size
    moe_block = (74 + 16 + 12 + 56) * 2 + 8 + 16  # test_block_activations_by_hand
    assert plan.tail_act_bytes(SMALL, "bf16") == 2 * d * 2 + V * (2 + 4) + (8 * d * 2 + moe_block + V * (2 + 4))
    cfg = dataclasses.replace(SMALL, n_layers=8)
    A = plan.Assumptions()
    p = plan.make_plan(cfg, 8, 4, 2, 2, "1f1b", 16, 64, 1, A)  # dp 4, ep 2, efsdp 2
    moved = max(r["dense"] * 3 / 4 + r["expert"] * 1 / 2 for r in p["ranks"])
    assert p["sync"] == pytest.approx((4 + 2) * moved / (A.ib_gbs * 1e9), rel=1e-12)
    assert p["step"] == pytest.approx(p["makespan"] + p["sync"], rel=1e-12)
