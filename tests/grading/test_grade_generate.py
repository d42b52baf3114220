"""Grading tests for generate.py (exercises.py): the sampling distribution and speculative acceptance (report §2.2).

The acceptance rule is checked draft by draft (every token of a small vocabulary is tried as the draft): greedy exactly;
sampling through the exact quantities of the rule, min(1, p(d)/q(d)) for the acceptance and normalize(max(p − q, 0))
for the resample, and the exact output law Σ_d q(d)·[accept d, or reject and resample] = p."""
import pytest
import torch

import generate


def probs_plain(logits, temperature, top_k=None):
    """softmax(logits / T) over the top_k largest logits (all of them without top_k), 0 elsewhere."""
    z = [v / temperature for v in logits.double().tolist()]
    keep = range(len(z)) if top_k is None else sorted(range(len(z)), key=lambda i: -z[i])[:top_k]
    m = max(z[i] for i in keep)
    e = [torch.tensor(z[i] - m, dtype=torch.float64).exp().item() if i in keep else 0.0 for i in range(len(z))]
    return torch.tensor(e, dtype=torch.float64) / sum(e)


@pytest.mark.grades("generate.probs_from_logits")
@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (2.0, 3), (0.8, 1), (1.0, 10)])
def test_probs_from_logits(temperature, top_k):
    logits = torch.tensor([1.5, -0.3, 2.2, 0.7, -1.1, 0.05, 1.9, -2.4])
    got = generate.probs_from_logits(logits, temperature, top_k)
    torch.testing.assert_close(got.double(), probs_plain(logits, temperature, top_k), rtol=1e-6, atol=1e-7)


P_LOGITS = torch.tensor([2.0, 0.5, 1.2, -0.7, 0.9])
Q_LOGITS = torch.tensor([0.3, 1.8, 1.1, 0.4, -0.5])


@pytest.mark.grades("generate.verify_draft")
def test_verify_draft_greedy(monkeypatch):
    monkeypatch.setattr(generate, "probs_from_logits", lambda lg, t, k=None: probs_plain(lg, t, k).float())
    gen = torch.Generator().manual_seed(0)
    best = int(P_LOGITS.argmax())
    for d in range(len(P_LOGITS)):
        token, ok = generate.verify_draft(P_LOGITS, Q_LOGITS, d, 0, None, gen)
        assert (int(token), bool(ok)) == (best, d == best), f"draft {d}: greedy accepts iff it is the argmax of p"


@pytest.mark.grades("generate.verify_draft")
@pytest.mark.parametrize("top_k", [None, 3])
def test_verify_draft_sampling(monkeypatch, top_k):
    monkeypatch.setattr(generate, "probs_from_logits", lambda lg, t, k=None: probs_plain(lg, t, k).float())
    p = probs_plain(P_LOGITS, 1.0, top_k)
    q = probs_plain(Q_LOGITS, 1.0, top_k)
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum()
    gen = torch.Generator().manual_seed(1)
    n = 3000
    law = torch.zeros_like(p)  # the output law rebuilt from the measured behaviour for each draft
    for d in range(len(p)):
        if q[d] == 0:
            continue  # the draft model never proposes it
        accept = min(1.0, (p[d] / q[d]).item())
        outs, n_acc = torch.zeros_like(p), 0
        for _ in range(n):
            token, ok = generate.verify_draft(P_LOGITS, Q_LOGITS, d, 1.0, top_k, gen)
            if ok:
                assert int(token) == d, "an accepted draft is the token"
                n_acc += 1
            else:
                outs[int(token)] += 1
        if accept == 1.0:
            assert n_acc == n, f"draft {d} with p(d) >= q(d) must always be accepted"
        else:
            # sampling noise: 5 standard deviations of a frequency measured from n (or n_rej) draws
            tol = 5 * (accept * (1 - accept) / n) ** 0.5 + 1e-3
            assert abs(n_acc / n - accept) < tol, f"draft {d}: accepted {n_acc / n:.3f}, rule gives {accept:.3f}"
            rejected = outs / outs.sum()
            assert (rejected[residual == 0] == 0).all(), "a rejection never yields a token with p <= q"
            tol = 5 * (0.25 / outs.sum().item()) ** 0.5
            assert (rejected - residual).abs().max() < tol, f"draft {d}: resample {rejected} vs {residual}"
        law[d] += q[d] * n_acc / n
        if n_acc < n:
            law += q[d] * (1 - n_acc / n) * outs / outs.sum()
    assert (law - p).abs().max() < 0.04, f"output law {law} vs p {p}: the rule must leave p unchanged"


@pytest.mark.grades("generate.verify_draft")
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_verify_draft_sampling_temperature(monkeypatch, temperature):
    """p and q both at the sampling temperature: draft d is accepted with min(1, p_T(d)/q_T(d)), a rejection
    resamples only where p_T > q_T."""
    monkeypatch.setattr(generate, "probs_from_logits", lambda lg, t, k=None: probs_plain(lg, t, k).float())
    p, q = probs_plain(P_LOGITS, temperature), probs_plain(Q_LOGITS, temperature)
    gen = torch.Generator().manual_seed(3)
    n = 1000
    for d in range(len(p)):
        accept = min(1.0, (p[d] / q[d]).item())
        n_acc, outs = 0, torch.zeros_like(p)
        for _ in range(n):
            token, ok = generate.verify_draft(P_LOGITS, Q_LOGITS, d, temperature, None, gen)
            n_acc += bool(ok)
            if not ok:
                outs[int(token)] += 1
        tol = 5 * (accept * (1 - accept) / n) ** 0.5 + 1e-3
        assert abs(n_acc / n - accept) < tol, f"T={temperature}, draft {d}: accepted {n_acc / n:.3f}, rule {accept:.3f}"
        assert (outs[p <= q] == 0).all(), f"T={temperature}, draft {d}: a rejection gave a token with p_T <= q_T"


@pytest.mark.grades("generate.verify_draft")
def test_verify_draft_draws_from_gen(monkeypatch):
    """All its randomness comes from `gen` (generate.py's seeded sampling): the same seed gives the same outcomes,
    whatever the global generator's state."""
    monkeypatch.setattr(generate, "probs_from_logits", lambda lg, t, k=None: probs_plain(lg, t, k).float())

    def outcomes(global_seed):
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)
            gen = torch.Generator().manual_seed(4)
            return [tuple(map(int, generate.verify_draft(P_LOGITS, Q_LOGITS, d % 5, 1.0, None, gen)))
                    for d in range(200)]

    assert outcomes(0) == outcomes(1)
