"""Tests of moe.py: gate semantics against hand computations, bias update, balancing, dispatch equivalence,
the sequence-wise balance loss and the shared experts. CPU, tiny dims, fp64/fp32."""
import pytest
import torch

import moe
from config import ModelConfig
from moe import MoE, max_violation, sequence_balance_loss


def cfg_(**kw):
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=1.0, init_std=0.1)
    base.update(kw)
    return ModelConfig(**base)


def set_scores_by_input(m, s):
    """Identity gate weight; returns x whose sigmoid scores are s (sigmoid) or whose logits are s (softmax)."""
    m.gate.weight.data.copy_(torch.eye(s.shape[-1]))
    return torch.logit(s) if m.gate.score_func == "sigmoid" else s


def hand_gate(s, bias, k, n_groups, n_keep, score_func, route_scale):
    """Per-token reference of the official gate, written with Python lists (no tensor tricks)."""
    out = []
    E = s.shape[1]
    per = E // n_groups
    for t in range(s.shape[0]):
        sc = s[t].tolist()
        ch = [sc[i] + (bias[i].item() if bias is not None else 0.0) for i in range(E)]
        groups = [ch[g * per:(g + 1) * per] for g in range(n_groups)]
        gscore = [sum(sorted(g, reverse=True)[:2]) if score_func == "sigmoid" else max(g) for g in groups]
        keep = sorted(range(n_groups), key=lambda g: -gscore[g])[:n_keep]
        allowed = [i for i in range(E) if i // per in keep]
        chosen = sorted(sorted(allowed, key=lambda i: -ch[i])[:k])
        w = [sc[i] for i in chosen]
        if score_func == "sigmoid":
            w = [v / sum(w) for v in w]
        out.append((chosen, [v * route_scale for v in w]))
    return out


def sorted_routes(w, idx):
    order = idx.argsort(-1)
    return idx.gather(1, order), w.gather(1, order)


# -- gate ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_gate_matches_hand_computation(seed, score_func):
    torch.manual_seed(seed)
    cfg = cfg_(n_routed_experts=12, n_expert_groups=3, n_limited_groups=2, n_activated_experts=3,
               score_func=score_func, route_scale=2.5, init_std=0.5)
    m = MoE(cfg)
    if score_func == "sigmoid":
        m.gate.bias.copy_(torch.randn(12) * 0.3)
    x = torch.randn(32, cfg.dim)
    w, idx, s = m.gate(x)
    assert w.dtype == x.dtype and idx.dtype == torch.long and s.dtype == torch.float32
    logits = x.double() @ m.gate.weight.double().T  # (N, E), computed independently of the module
    expect = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    torch.testing.assert_close(s.double(), expect, rtol=1e-5, atol=1e-6)
    idx_s, w_s = sorted_routes(w, idx)
    for t, (chosen, wt) in enumerate(hand_gate(s, m.gate.bias, 3, 3, 2, score_func, 2.5)):
        assert idx_s[t].tolist() == chosen
        torch.testing.assert_close(w_s[t], torch.tensor(wt))
    picked = s.gather(1, idx)
    if score_func == "sigmoid":
        # weights = route_scale × unbiased scores of the chosen experts / their sum, and they sum to route_scale
        torch.testing.assert_close(w, 2.5 * picked / picked.sum(-1, keepdim=True))
        torch.testing.assert_close(w.sum(-1), torch.full((32,), 2.5))
        # the bias did change which experts were chosen, for some tokens
        bias = m.gate.bias.clone()
        m.gate.bias.zero_()
        _, idx0, s0 = m.gate(x)
        assert torch.equal(s0, s)  # scores are unbiased
        assert not torch.equal(sorted_routes(w, idx0)[0], idx_s)
        m.gate.bias.copy_(bias)
    else:
        torch.testing.assert_close(w, 2.5 * picked)  # softmax: no renormalisation
        assert (w.sum(-1) < 2.5).all()


def test_bias_is_a_buffer_without_gradient():
    torch.manual_seed(0)
    m = MoE(cfg_())
    assert "gate.bias" in m.state_dict() and m.state_dict()["gate.bias"].dtype == torch.float32
    assert "gate.bias" not in dict(m.named_parameters())
    m.gate.bias.copy_(torch.randn(8))
    m.train()
    y = m(torch.randn(2, 6, 16))
    (y.square().sum() + m.balance_loss).backward()
    assert m.gate.bias.grad is None and not m.gate.bias.requires_grad
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    names = {n for n, _ in m.named_parameters()}
    assert names == {"gate.weight", "experts.w1", "experts.w2", "experts.w3",
                     "shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight"}
    assert m.experts.w1.shape == (8, 8, 16) and m.experts.w2.shape == (8, 16, 8) and m.experts.w3.shape == (8, 8, 16)


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_groups_excluded_even_with_negative_biased_scores(seed):
    torch.manual_seed(seed)
    cfg = cfg_(n_routed_experts=12, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3, init_std=0.5)
    m = MoE(cfg)
    m.gate.bias.copy_(-5.0 + 0.5 * torch.rand(12))  # every biased score s + b is negative
    x = torch.randn(40, cfg.dim)
    w, idx, s = m.gate(x)
    biased = s + m.gate.bias
    assert (biased < 0).all()
    group_score = biased.view(40, 4, 3).topk(2, -1).values.sum(-1)  # (N, G)
    allowed = group_score.topk(2, -1).indices  # (N, 2)
    assert (idx.div(3, rounding_mode="floor").unsqueeze(-1) == allowed.unsqueeze(1)).any(-1).all()
    # what the HF ≤5.0 fill with 0.0 would do: the masked experts (0) beat every allowed one (< 0)
    filled = biased.view(40, 4, 3).clone()
    filled[torch.ones(40, 4, dtype=torch.bool).scatter_(1, allowed, False)] = 0.0
    wrong = filled.view(40, 12).topk(3, -1).indices
    assert not (wrong.div(3, rounding_mode="floor").unsqueeze(-1) == allowed.unsqueeze(1)).any(-1).all()


def test_group_score_is_sum_of_top2():
    cfg = cfg_(dim=12, n_routed_experts=12, n_expert_groups=3, n_limited_groups=1, n_activated_experts=2,
               route_scale=2.5)
    m = MoE(cfg)
    s = torch.tensor([[0.9, 0.1, 0.1, 0.1,  # group 0: best by max (0.9)
                       0.6, 0.6, 0.05, 0.05,  # group 1: best by top-2 sum (1.2)
                       0.5, 0.5, 0.5, 0.5]])  # group 2: best by sum of all (2.0)
    w, idx, _ = m.gate(set_scores_by_input(m, s))
    idx, w = sorted_routes(w, idx)
    assert idx.tolist() == [[4, 5]]
    torch.testing.assert_close(w, torch.tensor([[1.25, 1.25]]))


def test_softmax_mode_max_group_score_and_no_renormalisation():
    cfg = cfg_(dim=8, n_routed_experts=8, n_expert_groups=2, n_limited_groups=1, n_activated_experts=2,
               score_func="softmax", route_scale=1.5)
    m = MoE(cfg)
    assert m.gate.bias is None and "gate.bias" not in m.state_dict()
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0,  # group 0: max 3, top-2 sum 4
                            2.5, 2.5, 0.0, 0.0]])  # group 1: max 2.5, top-2 sum 5
    w, idx, s = m.gate(set_scores_by_input(m, logits))
    idx, w = sorted_routes(w, idx)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w, 1.5 * logits.softmax(-1)[:, :2])
    m.train()
    m(torch.randn(1, 3, 8))
    m.update_bias(0.1)  # no bias: nothing to update, no error
    assert m.load.sum() == 0


# -- aux-loss-free bias update ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_update_bias_direction_training_only_and_reset(seed):
    torch.manual_seed(seed)
    m = MoE(cfg_(init_std=0.5))
    m.gate.bias.copy_(torch.randn(8) * 0.1)
    m.train()
    m(torch.randn(2, 5, 16))
    c1 = m.last_counts.clone()
    m(torch.randn(3, 4, 16))
    load = c1 + m.last_counts
    assert torch.equal(m.load, load)  # micro-batches accumulate
    m.eval()
    m(torch.randn(2, 5, 16))
    assert torch.equal(m.load, load)  # an eval forward adds nothing
    before = m.gate.bias.clone()
    m.update_bias(0.001)
    delta = m.gate.bias - before
    mean = load.double().mean()
    over, under = load > mean, load < mean
    assert over.any() and under.any()
    torch.testing.assert_close(delta[over], torch.full((int(over.sum()),), -0.001), rtol=0, atol=1e-7)
    torch.testing.assert_close(delta[under], torch.full((int(under.sum()),), 0.001), rtol=0, atol=1e-7)
    assert (delta[load == mean] == 0).all()
    assert m.load.sum() == 0  # reset after the update
    m.eval()
    m(torch.randn(2, 5, 16))
    after_eval = m.gate.bias.clone()
    m.update_bias(0.001)  # only eval forwards since the last update: nothing moves
    assert torch.equal(m.gate.bias, after_eval)


def skewed_router(seed):
    """Experts 0 and 1 get nearly every token: the inputs lean along c and so do their gate rows."""
    torch.manual_seed(seed)
    cfg = cfg_(n_shared_experts=0, n_expert_groups=1, n_limited_groups=1, init_std=0.1)
    m = MoE(cfg)
    c = torch.nn.functional.normalize(torch.randn(16), dim=0)
    m.gate.weight.data[:2] += 2.0 * c
    gen = torch.Generator().manual_seed(seed + 100)
    sample = lambda n: torch.randn(n, 16, 16, generator=gen) * 0.5 + c  # noqa: E731
    return m, sample, sample(16)


def held_out_violation(m, held_out):
    m.eval()
    m(held_out)
    m.train()
    return max_violation(m.last_counts)


@pytest.mark.parametrize("seed", [0, 1])
def test_bias_updates_balance_a_skewed_router(seed):
    for update in (True, False):
        m, sample, held_out = skewed_router(seed)
        first = held_out_violation(m, held_out)
        assert first > 2.5  # experts 0 and 1 take nearly all 2N assignments: max/mean ≈ N/(2N/8) = 4
        m.train()
        for _ in range(60):  # no optimizer: the gate weight never moves, only b_i
            with torch.no_grad():
                m(sample(2))
            if update:
                m.update_bias(0.01)
        last = held_out_violation(m, held_out)
        if update:
            assert last < 0.35 * first
        else:
            assert last == first and m.gate.bias.abs().sum() == 0


# -- dispatch -----------------------------------------------------------------------------------------------------
def run_and_grads(m, x, g):
    m.zero_grad()
    x = x.clone().requires_grad_()
    y = m(x)
    ((y * g).sum() + m.balance_loss).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("seed,shape", [(0, (2, 5)), (1, (3, 4)), (2, (1, 3))])
def test_loop_and_grouped_dispatch_agree_fp64(seed, shape):
    torch.manual_seed(seed)
    cfg = cfg_(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
               n_shared_experts=2, route_scale=2.5, init_std=0.3)
    m = MoE(cfg).double().train()
    m.gate.bias.copy_(torch.randn(16) * 0.2)
    x, g = torch.randn(*shape, 16, dtype=torch.float64), torch.randn(*shape, 16, dtype=torch.float64)
    m.dispatch = "loop"
    y_ref, dx_ref, grads_ref = run_and_grads(m, x, g)
    counts_ref = m.last_counts.clone()
    m.dispatch = "grouped"
    y, dx, grads = run_and_grads(m, x, g)
    assert torch.equal(m.last_counts, counts_ref)
    if shape == (1, 3):
        assert (counts_ref == 0).any()  # idle experts (empty segments) are covered
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(grads_ref)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_segment_impls_agree_with_reference_fp32(impl):
    if impl == "grouped_mm" and not moe.grouped_mm_supported(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is not usable for CPU fp32 in this build")
    torch.manual_seed(0)
    m = MoE(cfg_(n_routed_experts=16, n_activated_experts=3, init_std=0.3))
    u = torch.randn(12, 16, requires_grad=True)
    w, idx, _ = m.gate(u)
    ref = moe.dispatch_loop(u, w, idx, m.experts)
    got = moe.dispatch_grouped(u, w, idx, m.experts, impl=impl)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    params = (u, m.gate.weight, m.experts.w1, m.experts.w2, m.experts.w3)
    got_grads = torch.autograd.grad(got, params, g, retain_graph=True)  # the gate's graph is shared
    for a, b in zip(got_grads, torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n, r", [(5, 3), (7, 1), (0, 0)])
def test_gather_rows_backward_is_the_sum_over_the_rows_that_read_each_row(n, r):
    """gather_rows(x, index, back) = x[index]; its backward (a gather over `back`, no scatter-add) equals
    autograd's own backward of x[index] (fp64, so the sums are exact enough to compare to 1e-12)."""
    torch.manual_seed(n)
    index = torch.randperm(n * r) // max(r, 1)  # every row of x read r times, in a shuffled order
    back = torch.argsort(index, stable=True)  # the r positions that read row i: back.view(n, r)[i]
    x = torch.randn(n, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n * r, 4, 3, dtype=torch.float64)
    got = moe.gather_rows(x, index, back)
    assert torch.equal(got, x[index])
    (dx,) = torch.autograd.grad(got, x, g)
    (dx_ref,) = torch.autograd.grad(x[index], x, g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r", [3, 1, 0])
def test_sum_slots_adds_the_slots_in_order_in_at_least_fp32(r):
    """sum_slots(rows, w) = (rows[:, 0]·w[:, 0] + rows[:, 1]·w[:, 1]) + ... term by term in the order of the slots,
    in fp32 for bf16 rows (fp64 where the weights are), the same bits as that loop written out; no slots: zeros."""
    torch.manual_seed(r)
    rows = torch.randn(4, r, 5, 2).bfloat16()
    w = torch.rand(4, r)
    got = moe.sum_slots(rows, w)
    ref = torch.zeros(4, 5, 2)
    for j in range(r):
        ref = rows[:, j].float() * w[:, j, None, None] if j == 0 else ref + rows[:, j].float() * w[:, j, None, None]
    assert got.dtype == torch.float32 and got.shape == (4, 5, 2) and torch.equal(got, ref)
    plain = moe.sum_slots(rows)
    assert plain.dtype == torch.float32 and torch.equal(plain, moe.sum_slots(rows, torch.ones(4, r)))
    assert moe.sum_slots(rows, w.double()).dtype == torch.float64
    if r == 3:  # in the slots' order: (1e8 − 1e8) + 1 = 1, where (1 − 1e8) + 1e8 = 0 in fp32
        big = torch.tensor([[[1e8], [-1e8], [1.0]]])
        assert moe.sum_slots(big).item() == 1.0 and moe.sum_slots(big.flip(1)).item() == 0.0
        # one after the other, not in pairs: ((1e8 + 1) − 1e8) + 1 = 1, where (1e8 + 1) + (−1e8 + 1) = 0
        assert moe.sum_slots(torch.tensor([[[1e8], [1.0], [-1e8], [1.0]]])).item() == 1.0


@pytest.mark.parametrize("N", [6, 0])
def test_combine_is_the_weighted_sum_of_each_tokens_slots_in_fixed_order(N):
    """combine(out, g, order, inv) sums token t's K slots, each the expert output at its sorted position inv[t·K+k]
    times g_{t,k}, in fp32, then casts once to the dtype asked for; its gradients are autograd's of that sum (no
    tokens: an empty result). That the GPU gives the same bits every run is test_fp8_moe_step_does_not_sync's."""
    torch.manual_seed(0)
    K, D = 3, 5
    order = torch.randperm(N * K)
    inv = moe.inverse_permutation(order)
    assert torch.equal(order[inv], torch.arange(N * K)) and torch.equal(inv[order], torch.arange(N * K))
    out = torch.randn(N * K, D, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(N, K, requires_grad=True)
    ref = torch.zeros(N, D)
    for t in range(N):
        for k in range(K):
            ref[t] += w[t, k].detach() * out[inv[t * K + k]].detach().float()
    got = moe.combine(out, w, order, inv, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (N, D)
    torch.testing.assert_close(got, ref)
    got_bf16 = moe.combine(out, w, order, inv, torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16 and torch.equal(got_bf16, got.bfloat16())
    g = torch.randn(N, D)
    grads = torch.autograd.grad(got, (out, w), g)
    plain = (out[inv].view(N, K, D).float() * w.unsqueeze(-1)).sum(1)  # x[index]: autograd's scatter-add backward
    for a, b in zip(grads, torch.autograd.grad(plain, (out, w), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype, grouped", [(torch.float32, False), (torch.bfloat16, True)])
def test_segment_mm_under_torch_compile_uses_grouped_mm_for_bf16_only(monkeypatch, dtype, grouped):
    """Compiled, torch._grouped_mm accepts bf16 only (eager CPU also takes fp32): `train.py --compile` on a CPU
    would fail at its first step. The rule is checked with torch.compiler.is_compiling faked (compiling is slow)."""
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda device, dt: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: calls.append(a.dtype) or
                        torch.cat([ai @ b[i] for i, ai in enumerate(a.split(offs.diff(prepend=offs.new_zeros(1))
                                                                             .tolist()))]), raising=False)
    a, w, sizes = torch.randn(8, 16, dtype=dtype), torch.randn(2, 32, 16, dtype=dtype), [3, 5]
    got = moe.segment_mm(a, w, sizes)
    torch.testing.assert_close(got, torch.cat([a[:3] @ w[0].T, a[3:] @ w[1].T]))
    assert calls == ([dtype] if grouped else [])


# -- sequence-wise balance loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_loss_matches_direct_formula_and_f_has_no_gradient(seed):
    torch.manual_seed(seed)
    cfg = cfg_(n_routed_experts=8, n_activated_experts=3, init_std=0.5)
    m = MoE(cfg).train()
    B, T, E, K = 3, 5, 8, 3
    x = torch.randn(B, T, 16)
    m(x)
    _, idx, s = m.gate(x.view(B * T, 16))
    idx, s = idx.view(B, T, K), s.view(B, T, E)
    total = 0.0
    for b in range(B):
        for i in range(E):
            count = sum(int(i in idx[b, t].tolist()) for t in range(T))  # a plain number: no gradient
            f_i = E / (K * T) * count
            P_i = sum(s[b, t, i] / s[b, t].sum() for t in range(T)) / T
            total = total + f_i * P_i
    direct = total / B
    torch.testing.assert_close(m.balance_loss, direct)
    got = torch.autograd.grad(m.balance_loss, m.gate.weight)[0]
    want = torch.autograd.grad(direct, m.gate.weight)[0]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)
    m.eval()
    m(x)
    assert m.balance_loss.item() == 0.0


def test_balance_loss_is_one_for_uniform_routing():
    # any affinities, perfectly balanced counts (f_i = 1): Σ_i f_i P_i = Σ_i P_i = 1
    torch.manual_seed(0)
    scores = torch.rand(2, 4, 8)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]).expand(2, 4, 2)
    torch.testing.assert_close(sequence_balance_loss(scores, idx, 8), torch.tensor(1.0))
    # through the module: 4 experts, K=2, tokens routed to {0, 1} and {2, 3}
    cfg = cfg_(dim=4, n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2)
    m = MoE(cfg).train()
    m.gate.weight.data.copy_(torch.eye(4))
    x = torch.tensor([[[5.0, 4.0, -5.0, -4.0], [-5.0, -4.0, 5.0, 4.0]]])
    m(x)
    assert m.last_counts.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(m.balance_loss, torch.tensor(1.0))


# -- shared experts, logging, errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("route_scale", [1.0, 2.5])
def test_shared_experts_are_added_unweighted(route_scale):
    torch.manual_seed(0)
    m = MoE(cfg_(n_shared_experts=2, route_scale=route_scale)).double()
    assert m.shared_experts.w1.weight.shape == (2 * 8, 16)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        m.experts.w2.zero_()  # routed experts now output 0
        torch.testing.assert_close(m(x), m.shared_experts(x), rtol=0, atol=0)
    # without shared experts the output is the routed sum alone
    m0 = MoE(cfg_(n_shared_experts=0)).double()
    assert m0.shared_experts is None and not any(k.startswith("shared") for k in m0.state_dict())
    w, idx, _ = m0.gate(x.view(10, 16))
    torch.testing.assert_close(m0(x).view(10, 16), moe.dispatch_loop(x.view(10, 16), w, idx, m0.experts))


def test_max_violation_and_errors():
    assert max_violation(torch.tensor([4, 2, 2, 0])) == pytest.approx(1.0)
    assert max_violation(torch.tensor([3, 3, 3])) == 0.0
    assert max_violation(torch.zeros(4, dtype=torch.long)) == 0.0
    m = MoE(cfg_())
    with pytest.raises(ValueError, match="dispatch"):
        m.dispatch = "fast"
        m(torch.randn(1, 2, 16))
    m.dispatch = "grouped"
    with pytest.raises(ValueError, match="MoE input"):
        m(torch.randn(2, 16))


# -- mistakes that the tests above alone would let through ------------------------------------------------------
def test_route_takes_the_score_function_explicitly():
    """The group score and the renormalisation follow score_func, not whether a bias was passed."""
    s = torch.tensor([[0.9, 0.1, 0.1, 0.1,  # group 0: best by max
                       0.6, 0.6, 0.05, 0.05]])  # group 1: best by top-2 sum
    for bias in (None, torch.zeros(8)):
        w, idx = moe.route(s, bias, 2, 2, 1, "sigmoid", 2.0)
        assert sorted(idx[0].tolist()) == [4, 5]
        torch.testing.assert_close(w, torch.tensor([[1.0, 1.0]]))  # renormalised, × route_scale
    for bias in (None, torch.zeros(8)):
        w, idx = moe.route(s, bias, 2, 2, 1, "softmax", 2.0)
        assert sorted(idx[0].tolist()) == [0, 1]
        torch.testing.assert_close(w.sort(-1).values, torch.tensor([[0.2, 1.8]]))  # not renormalised
    with pytest.raises(ValueError, match="score_func"):
        moe.route(s, None, 2, 2, 1, "relu", 2.0)


def test_limit_groups_sets_dropped_groups_to_minus_inf():
    """Dropped groups become -inf, not 0: with negative (biased) scores a 0 would outrank every kept expert."""
    s = -torch.tensor([[1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 0.5, 8.0]])  # groups of 2: top-2 sums -3, -18, -7, -8.5
    out = moe.limit_groups(s, 4, 2, top2=True)
    inf = float("-inf")
    assert out.tolist() == [[-1.0, -2.0, inf, inf, -3.0, -4.0, inf, inf]]
    w, idx = moe.route(s, torch.zeros(8), 3, 4, 2, "sigmoid", 1.0)
    assert sorted(idx[0].tolist()) == [0, 1, 4]


def test_router_runs_in_fp32_under_bf16_autocast():
    """The gate's affinities and choices under CPU bf16 autocast equal the fp32 ones (the linear is not cast)."""
    torch.manual_seed(0)
    m = MoE(cfg_(n_routed_experts=16, n_activated_experts=4, init_std=0.5))
    m.gate.bias.copy_(torch.randn(16) * 0.05)
    x = torch.randn(64, 16)
    w, idx, s = m.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_ac, idx_ac, s_ac = m.gate(x)
    assert s_ac.dtype == torch.float32
    torch.testing.assert_close(s_ac, s, rtol=1e-6, atol=1e-7)
    assert torch.equal(idx_ac, idx)
    m.bfloat16()  # a bf16 model: the bf16 weights and inputs are upcast, the product taken in fp32
    xb = x.bfloat16()
    _, idx_b, s_b = m.gate(xb)
    want = torch.sigmoid(xb.double() @ m.gate.weight.double().T)
    assert s_b.dtype == torch.float32
    torch.testing.assert_close(s_b.double(), want, rtol=1e-6, atol=1e-7)


def test_balance_loss_uses_unbiased_scores():
    """L_Bal's P_i is built from s_{i,t}, never from s + b (the bias only selects); a large bias shows the
    difference."""
    torch.manual_seed(0)
    B, T, E, K = 2, 6, 8, 2
    m = MoE(cfg_(init_std=0.5)).train()
    m.gate.bias.copy_(torch.linspace(-0.4, 0.4, E))
    x = torch.randn(B, T, 16)
    m(x)
    s = torch.sigmoid(x.view(B * T, 16) @ m.gate.weight.T).view(B, T, E)  # s_{i,t}, unbiased
    idx = m.gate(x.view(B * T, 16))[1].view(B, T, K)
    f = torch.nn.functional.one_hot(idx, E).sum((1, 2)).float() * E / (K * T)  # (B, E)
    want = (f * (s / s.sum(-1, keepdim=True)).mean(1)).sum(-1).mean()
    torch.testing.assert_close(m.balance_loss, want)
    biased = s + m.gate.bias
    assert not torch.allclose(want, (f * (biased / biased.sum(-1, keepdim=True)).mean(1)).sum(-1).mean())


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_moe_output_matches_a_per_token_reference(dispatch):
    """u_t ↦ Σ shared SwiGLU(u_t) + Σ_k g_k FFN_k(u_t), written per token from the report's formula with
    route_scale 2.5, a bias and a group limit: shared experts are added unweighted, routed ones × g."""
    torch.manual_seed(1)
    cfg = cfg_(n_routed_experts=8, n_shared_experts=2, n_activated_experts=2, route_scale=2.5, init_std=0.3)
    m = MoE(cfg).double()
    m.dispatch = dispatch
    m.gate.bias.copy_(torch.randn(8, dtype=torch.float64) * 0.2)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    s = torch.sigmoid(x[0] @ m.gate.weight.T)

    def swiglu(u, w1, w2, w3):
        return w2 @ (torch.nn.functional.silu(w1 @ u) * (w3 @ u))

    se = m.shared_experts
    want = []
    for t, (chosen, g) in enumerate(hand_gate(s, m.gate.bias, 2, 4, 2, "sigmoid", 2.5)):
        u = x[0, t]
        y = swiglu(u, se.w1.weight, se.w2.weight, se.w3.weight)
        for i, gi in zip(chosen, g):
            y = y + gi * swiglu(u, m.experts.w1[i], m.experts.w2[i], m.experts.w3[i])
        want.append(y)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], torch.stack(want), rtol=1e-10, atol=1e-12)


def _all_reduce_worker(rank, port, loads, gamma, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        m = MoE(cfg_())
        m.load.copy_(torch.tensor(loads[rank]))
        m.update_bias(gamma)
        torch.save({"bias": m.gate.bias.clone(), "load": m.load.clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_update_bias_sums_the_load_over_ranks(tmp_path):
    """Two gloo ranks with different local loads: both apply the update of the summed load, so their biases
    stay equal (a rank that used its own load would move differently)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    loads = [[9, 0, 1, 1, 1, 1, 1, 2], [0, 9, 1, 1, 1, 1, 1, 2]]  # summed: [9, 9, 2, 2, 2, 2, 2, 4], mean 4
    mp.start_processes(_all_reduce_worker, args=(port, loads, 0.5, str(tmp_path)), nprocs=2, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    want = torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0])
    for r in range(2):
        assert torch.equal(got[r]["bias"], want), r
        assert got[r]["load"].sum() == 0


# -- the demo (`python moe.py`) prints true numbers ----------------------------------------------------------------
def test_demo_bias_balances_and_group_limit_bounds_the_groups(capsys):
    import re
    moe._demo_main([])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    table = [tuple(map(float, r)) for r in re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)]
    assert [int(r[0]) for r in table] == [1, 6, 11, 16, 21, 26, 31, 36, 40]
    first, last = table[0], table[-1]
    assert first[1] == first[2] > 3  # the same skewed start
    assert last[2] < 0.25 * last[1] and last[1] > 3  # the bias run balances, the other stays skewed
    heat = re.findall(r"^  expert\s+(\d+) \|(.{40})\|$", out, re.M)
    assert len(heat) == 16 and heat[0][1][:3] == "@@@" and set(heat[0][1][-5:]) <= set(".:-=+")
    unl = re.search(r"unlimited mean ([\d.]+), max (\d+)", out).groups()
    lim = re.search(r"best 4 groups only: mean ([\d.]+), max (\d+)", out).groups()
    assert int(lim[1]) == 4 and float(lim[0]) <= 4 and int(unl[1]) > 4 and float(unl[0]) > float(lim[0])
    kept = float(re.search(r"keeps ([\d.]+)%", out).group(1))
    assert 50 < kept < 100


def test_expert_counts_and_device_segment_sizes_match_the_host_list():
    """expert_counts (no host sync) equals bincount; segment_mm gives the same rows with sizes as a device
    tensor as with the host list, on both implementations."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 6, (13, 3), generator=g)
    counts = moe.expert_counts(idx, 8)  # two experts never chosen: empty segments
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    a = torch.randn(39, 16, generator=g, dtype=torch.float64)
    w = torch.randn(8, 24, 16, generator=g, dtype=torch.float64)
    ref = torch.cat([seg @ wi.T for seg, wi in zip(a.split(counts.tolist()), w)])  # (39, 24)
    for impl in ("loop", "auto"):
        assert torch.allclose(moe.segment_mm(a, w, counts, impl), ref, atol=1e-12)
        assert torch.allclose(moe.segment_mm(a, w, counts.tolist(), impl), ref, atol=1e-12)


def test_gate_bias_stays_fp32_when_the_model_is_cast_to_bf16():
    """model.bfloat16() (generate.py --dtype bfloat16) keeps b_i in fp32, its values unrounded (bf16 would round these
    biases, and a rounded b_i can select other experts)."""
    from helpers import tiny_config
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    gates = [m.gate for m in model.moe_layers()]
    for g in gates:
        g.bias.copy_(torch.randn(g.bias.shape) * 0.7)
    before = [g.bias.clone() for g in gates]
    model.bfloat16()
    assert all(g.bias.dtype == torch.float32 and torch.equal(g.bias, b) for g, b in zip(gates, before))
    assert all(g.weight.dtype == torch.bfloat16 for g in gates)
    model.double()  # a cast to a wider type applies to it as to any buffer
    assert all(g.bias.dtype == torch.float64 for g in gates)
    assert any(not torch.equal(b.bfloat16().float(), b) for b in before)  # bf16 would have rounded them


# -- the dispatch machinery: the implementation chosen, autocast, idle experts, gathers -----------------------------
def test_explicit_grouped_mm_runs_torch_grouped_mm(monkeypatch):
    """impl="grouped_mm" is honoured (test_segment_impls_agree_with_reference_fp32 relies on it): every projection of
    dispatch_grouped goes through torch._grouped_mm, one call each, and "loop" never does."""
    if not moe.grouped_mm_supported(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is not usable for CPU fp32 in this build")
    calls, real = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert moe.resolve_impl(torch.randn(4, 16), torch.randn(2, 32, 16), "grouped_mm") == "grouped_mm"
    torch.manual_seed(0)
    m = MoE(cfg_(n_routed_experts=16, n_activated_experts=3, init_std=0.3))
    u = torch.randn(12, 16)
    w, idx, _ = m.gate(u)
    moe.dispatch_grouped(u, w, idx, m.experts, impl="grouped_mm")
    assert len(calls) == 3  # w1, w3, w2
    moe.dispatch_grouped(u, w, idx, m.experts, impl="loop")
    assert len(calls) == 3


def test_resolve_impl_needs_16_byte_rows_in_both_weight_dims(monkeypatch):
    """The grouped GEMM's kernel needs 16-byte rows: "auto" takes it only when both the in and the out dims of the
    weight are multiples of 16 bytes in the compute dtype (autocast's where it is on), else the loop."""
    monkeypatch.setattr(moe, "grouped_mm_supported", lambda device, dtype: True)
    a = torch.randn(4, 16)
    assert moe.resolve_impl(a, torch.randn(2, 8, 16)) == "grouped_mm"  # 32- and 64-byte rows
    assert moe.resolve_impl(a, torch.randn(2, 5, 16)) == "loop"  # out rows of 20 bytes
    assert moe.resolve_impl(a[:, :6], torch.randn(2, 8, 6)) == "loop"  # in rows of 24 bytes
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 12 values: 48 bytes in fp32, 24 in bf16
        assert moe.resolve_impl(torch.randn(4, 12), torch.randn(2, 8, 12)) == "loop"


def test_grouped_mm_under_autocast_computes_in_the_autocast_dtype():
    """torch._grouped_mm has no autocast rule (it returns fp32 for fp32 inputs under bf16 autocast), so segment_mm
    casts a and w itself: the grouped path gives the loop's (F.linear's) bf16 result, same dtype and bits."""
    if not moe.grouped_mm_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("torch._grouped_mm is not usable for CPU bf16 in this build")
    g = torch.Generator().manual_seed(0)
    a, w, sizes = torch.randn(9, 16, generator=g), torch.randn(3, 32, 16, generator=g), [4, 0, 5]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe.segment_mm(a, w, sizes, "grouped_mm")
        want = moe.segment_mm(a, w, sizes, "loop")
    assert want.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_dispatch_grouped_counts_every_expert_when_the_last_ones_are_idle(impl):
    """dispatch_grouped without counts sizes its segments over all E experts (not up to the largest index chosen),
    so tokens that never reach the last experts give the reference's output and gradients."""
    if impl == "grouped_mm" and not moe.grouped_mm_supported(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is not usable for CPU fp32 in this build")
    torch.manual_seed(0)
    m = MoE(cfg_(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, init_std=0.3))
    u = torch.randn(5, 16, requires_grad=True)
    idx = torch.tensor([[0, 1], [2, 0], [1, 3], [3, 2], [0, 2]])  # experts 4-7 idle
    w = torch.rand(5, 2, requires_grad=True)
    ref = moe.dispatch_loop(u, w, idx, m.experts)
    got = moe.dispatch_grouped(u, w, idx, m.experts, impl=impl)
    torch.testing.assert_close(got, ref)
    params = (u, w, m.experts.w1, m.experts.w2, m.experts.w3)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def test_dispatch_grouped_moves_rows_by_gathers_only_in_the_backward_too():
    """The rows move into expert order and back through _GatherRows (its backward a gather over `back`): no
    index_select / indexing node whose backward is a scatter-add (atomic, so not the same bits every run on a GPU)."""
    torch.manual_seed(0)
    m = MoE(cfg_(n_routed_experts=8, n_activated_experts=3, init_std=0.3))
    u = torch.randn(6, 16, requires_grad=True)
    w, idx, _ = m.gate(u)
    y = moe.dispatch_grouped(u, w, idx, m.experts)
    names, stack, seen = [], [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    assert names.count("_GatherRowsBackward") == 2  # in (tokens → sorted rows) and out (sorted → token slots)
    scatters = {"IndexSelectBackward0", "IndexBackward0", "IndexAddBackward0", "ScatterAddBackward0"}
    assert not scatters & set(names), names
