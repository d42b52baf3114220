"""Grading tests for moe.py (exercises.py): group-limited routing, the bias update, the sequence-wise balance loss.

References are written here from the definitions (report §2.1.2): routing by enumerating every choice of groups and
experts, the bias update's sign rule element by element, the balance loss f_i P_i with loops over tokens."""
import inspect
import itertools

import pytest
import torch

import moe
from config import ModelConfig


# -- plain references ----------------------------------------------------------------------------------------
def group_score_plain(values: list, top2: bool) -> float:
    ordered = sorted(values, reverse=True)
    return ordered[0] + ordered[1] if top2 else ordered[0]


def best_groups(row: list, n_groups: int, n_keep: int, top2: bool) -> set:
    """The n_keep groups whose summed group score is largest, by trying every subset of n_keep groups."""
    size = len(row) // n_groups
    score = [group_score_plain(row[g * size:(g + 1) * size], top2) for g in range(n_groups)]
    return set(max(itertools.combinations(range(n_groups), n_keep), key=lambda gs: sum(score[g] for g in gs)))


def limit_groups_plain(scores, n_groups, n_keep, top2):
    N, E = scores.shape
    out = torch.full_like(scores, float("-inf"))
    for t in range(N):
        keep = best_groups(scores[t].tolist(), n_groups, n_keep, top2)
        for e in range(E):
            if e // (E // n_groups) in keep:
                out[t, e] = scores[t, e]
    return out


def route_plain(s, b, k, n_groups, n_keep, score_func, route_scale):
    """Per token: the k experts, inside the best groups, with the largest s + b (every k-subset tried); their
    weights are the unbiased s, renormalized to sum 1 for sigmoid scores, times route_scale. Returns
    [{expert: weight}]. Sigmoid (V3) scores a group by its top-2 sum, softmax (V2) by its max."""
    N, E = s.shape
    sigmoid = score_func == "sigmoid"
    choice = s if b is None else s + b
    out = []
    for t in range(N):
        row = choice[t].tolist()
        allowed = range(E)
        if n_groups > 1:
            keep = best_groups(row, n_groups, n_keep, top2=sigmoid)
            allowed = [e for e in range(E) if e // (E // n_groups) in keep]
        best = max(itertools.combinations(allowed, k), key=lambda es: sum(row[e] for e in es))
        w = {e: s[t, e].item() for e in best}
        total = sum(w.values())
        out.append({e: (v / total if sigmoid else v) * route_scale for e, v in w.items()})
    return out


def call_route(scores, bias, k, n_groups, n_keep, score_func, route_scale):
    """moe.route, whether it takes the score function or (an older signature) a renormalize flag."""
    kw = dict(k=k, n_groups=n_groups, n_keep=n_keep, route_scale=route_scale)
    if "score_func" in inspect.signature(moe.route).parameters:
        kw["score_func"] = score_func
    else:
        kw["renormalize"] = score_func == "sigmoid"
    return moe.route(scores, bias, **kw)


# -- routing ------------------------------------------------------------------------------------------------
@pytest.mark.grades("moe.limit_groups")
@pytest.mark.parametrize("n_groups, n_keep, top2", [(4, 2, True), (4, 1, False), (8, 3, True), (2, 2, False),
                                                    (4, 3, False)])
def test_limit_groups(n_groups, n_keep, top2):
    gen = torch.Generator().manual_seed(n_groups * 10 + n_keep)
    scores = torch.rand(12, 16, generator=gen, dtype=torch.float64)  # distinct values: no ties
    got = moe.limit_groups(scores.clone(), n_groups, n_keep, top2)
    want = limit_groups_plain(scores, n_groups, n_keep, top2)
    assert got.shape == want.shape
    for t in range(len(want)):
        kept = torch.isfinite(got[t]).nonzero().flatten().tolist()
        assert kept == torch.isfinite(want[t]).nonzero().flatten().tolist(), f"token {t}: kept experts {kept}"
        assert torch.equal(got[t], want[t]), f"token {t}: kept scores unchanged, dropped ones -inf"


@pytest.mark.grades("moe.limit_groups")
def test_limit_groups_top2_differs_from_max():
    # group 0 has the highest single score, group 1 the highest sum of its top two: top-2 keeps group 1, max group 0
    s = torch.tensor([[0.95, 0.01, 0.6, 0.55, 0.2, 0.1, 0.3, 0.05]], dtype=torch.float64)
    top2 = moe.limit_groups(s.clone(), 4, 1, True)
    by_max = moe.limit_groups(s.clone(), 4, 1, False)
    assert torch.isfinite(top2[0]).tolist() == [False, False, True, True, False, False, False, False]
    assert torch.isfinite(by_max[0]).tolist() == [True, True, False, False, False, False, False, False]


ROUTE_CASES = [  # (score_func, k, n_groups, n_keep, route_scale); sigmoid routing has a bias, softmax none
    ("sigmoid", 2, 4, 2, 1.0), ("sigmoid", 3, 4, 2, 2.5), ("sigmoid", 2, 1, 1, 1.0), ("sigmoid", 4, 8, 3, 1.0),
    ("softmax", 2, 1, 1, 1.0), ("softmax", 3, 4, 2, 16.0)]


@pytest.mark.grades("moe.route")
@pytest.mark.parametrize("score_func, k, n_groups, n_keep, route_scale", ROUTE_CASES)
def test_route(monkeypatch, score_func, k, n_groups, n_keep, route_scale):
    monkeypatch.setattr(moe, "limit_groups", limit_groups_plain)
    gen = torch.Generator().manual_seed(k * 100 + n_groups)
    logits = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    sigmoid = score_func == "sigmoid"
    s = logits.sigmoid() if sigmoid else logits.softmax(-1)
    b = torch.randn(16, generator=gen, dtype=torch.float64) * 0.3 if sigmoid else None  # large enough to matter
    weights, indices = call_route(s, b, k, n_groups, n_keep, score_func, route_scale)
    assert weights.shape == (10, k) and indices.shape == (10, k)
    for t, want in enumerate(route_plain(s, b, k, n_groups, n_keep, score_func, route_scale)):
        got = {int(e): float(w) for e, w in zip(indices[t], weights[t])}
        assert set(got) == set(want), f"token {t}: experts {sorted(got)}, expected {sorted(want)}"
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-12), f"token {t}, expert {e}: weight"


# -- aux-loss-free bias update ---------------------------------------------------------------------------------
def small_moe(score_func="sigmoid"):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                      n_limited_groups=1, score_func=score_func)
    return moe.MoE(cfg)


@pytest.mark.grades("moe.MoE.update_bias")
@pytest.mark.parametrize("gamma", [0.001, 0.25])
def test_update_bias_sign_rule(gamma):
    layer = small_moe()
    start = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.05, 0.2, 0.0])
    layer.gate.bias.copy_(start)
    load = [5, 1, 3, 3, 0, 6, 2, 4]  # mean 3: under-loaded experts go up by γ, over-loaded down, the rest stay
    layer.load.copy_(torch.tensor(load))
    layer.update_bias(gamma)
    mean = sum(load) / len(load)
    for i, n in enumerate(load):
        step = gamma if n < mean else (-gamma if n > mean else 0.0)
        got, want = layer.gate.bias[i].item(), start[i].item() + step
        assert got == pytest.approx(want, abs=1e-7), f"b_{i} (load {n}, mean {mean}): {got:.4f}, expected {want:.4f}"
    assert layer.load.tolist() == [0] * 8, "the accumulated load is reset after the update"


@pytest.mark.grades("moe.MoE.update_bias")
def test_update_bias_balanced_and_softmax():
    layer = small_moe()
    layer.load.fill_(7)
    layer.update_bias(0.1)
    assert layer.gate.bias.tolist() == [0.0] * 8, "a balanced load leaves b unchanged"
    layer = small_moe("softmax")  # no bias: only the reset
    layer.load.copy_(torch.arange(8))
    layer.update_bias(0.1)
    assert layer.gate.bias is None and layer.load.tolist() == [0] * 8


@pytest.mark.grades("moe.MoE.update_bias")
def test_update_bias_no_gradient_and_fractional_mean():
    layer = small_moe()
    layer.load.copy_(torch.tensor([1, 2, 2, 2, 2, 2, 2, 2]))  # mean 1.875: expert 0 below, the others above
    layer.update_bias(0.5)
    assert layer.gate.bias.tolist() == [0.5] + [-0.5] * 7
    assert not layer.gate.bias.requires_grad and layer.gate.bias.dtype == torch.float32


# -- sequence-wise balance loss --------------------------------------------------------------------------------
def balance_loss_plain(s, indices, E):
    """L = mean over sequences of Σ_i f_i P_i, f_i = E/(K·T) · #{t : i routed at t},
    P_i = (1/T) Σ_t s_{i,t}/Σ_j s_{j,t}."""
    B, T, K = indices.shape
    total = 0.0
    for b in range(B):
        loss = 0.0
        for i in range(E):
            hits = sum(1 for t in range(T) if i in indices[b, t].tolist())
            f = E / (K * T) * hits
            P = sum(s[b, t, i] / s[b, t].sum() for t in range(T)) / T
            loss = loss + f * P
        total = total + loss
    return total / B


@pytest.mark.grades("moe.sequence_balance_loss")
@pytest.mark.parametrize("B, T, E, K", [(1, 5, 4, 1), (3, 7, 8, 2), (2, 16, 16, 4)])
def test_sequence_balance_loss(B, T, E, K):
    gen = torch.Generator().manual_seed(B * T)
    logits = torch.randn(B, T, E, generator=gen, dtype=torch.float64)
    s = logits.sigmoid().requires_grad_()
    bias = torch.randn(E, generator=gen, dtype=torch.float64)
    indices = (s + bias).topk(K, dim=-1).indices  # selected with a bias; the loss still reads the unbiased s
    got = moe.sequence_balance_loss(s, indices, E)
    want = balance_loss_plain(s, indices, E)
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    g_got, = torch.autograd.grad(got, s)
    g_want, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)  # the gradient flows through P_i only


@pytest.mark.grades("moe.sequence_balance_loss")
def test_sequence_balance_loss_uniform_is_one():
    # every expert equally loaded and equally scored: f_i = 1, P_i = 1/E, so Σ f_i P_i = 1
    E, K, T = 4, 2, 6
    s = torch.full((1, T, E), 0.3, dtype=torch.float64)
    indices = torch.tensor([[[0, 1], [2, 3]] * (T // 2)])  # (1, T, K)
    assert indices.shape == (1, T, K)
    assert moe.sequence_balance_loss(s, indices, E).item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.grades("moe.limit_groups")
def test_limit_groups_leaves_its_input_unchanged():
    """Routing without a bias (softmax) passes the gate's s itself, which the gate also returns (the balance loss
    reads it, autograd needs it): the -inf go into a new tensor."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 16, generator=gen, dtype=torch.float64)
    before = scores.clone()
    out = moe.limit_groups(scores, 4, 2, False)
    assert torch.equal(scores, before), "limit_groups wrote into its input"
    assert torch.isinf(out).sum().item() == 6 * 8


@pytest.mark.grades("moe.MoE.update_bias")
def test_update_bias_uses_the_given_load():
    """update_biases all-reduces every layer's load at once and passes each sum as `load`: the update follows it,
    not the layer's own (this rank's) count, which is reset all the same."""
    layer = small_moe()
    layer.load.copy_(torch.tensor([0, 0, 0, 0, 9, 9, 9, 9]))  # this rank's own count: the opposite imbalance
    summed = [10, 2, 6, 6, 1, 7, 6, 10]  # mean 6
    layer.update_bias(0.1, load=torch.tensor(summed))
    want = [0.1 if n < 6 else (-0.1 if n > 6 else 0.0) for n in summed]
    assert layer.gate.bias.tolist() == pytest.approx(want, abs=1e-7)
    assert layer.load.tolist() == [0] * 8


@pytest.mark.grades("moe.route")
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_weights_carry_the_gradient(monkeypatch, score_func):
    """The LM loss reaches the gate's centroids e_i only through g_{i,t}: the weights are differentiable in s
    (the renormalisation's sum included)."""
    monkeypatch.setattr(moe, "limit_groups", limit_groups_plain)
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    s = (logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)).requires_grad_()
    b = torch.randn(16, generator=gen, dtype=torch.float64) * 0.3 if score_func == "sigmoid" else None
    r = torch.randn(6, 16, generator=gen, dtype=torch.float64)  # a random read-out of each expert's weight
    weights, indices = call_route(s, b, 3, 4, 2, score_func, 2.5)
    got, = torch.autograd.grad((weights * r.gather(1, indices)).sum(), s)
    total = 0.0
    for t, chosen in enumerate(route_plain(s.detach(), b, 3, 4, 2, score_func, 2.5)):
        e = torch.tensor(sorted(chosen))
        w = s[t, e] / (s[t, e].sum() if score_func == "sigmoid" else 1.0) * 2.5
        total = total + (w * r[t, e]).sum()
    want, = torch.autograd.grad(total, s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
