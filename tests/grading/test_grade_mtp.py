"""Grading tests for mtp.py (exercises.py): the shifted inputs of the MTP depths and the MTP loss (report §2.2).

Targets are built here by explicit shifting (depth k at input position i predicts the token k+1 ahead, idx[i+k+1]),
and cross-entropy is written out as logsumexp minus the target's logit."""
import pytest
import torch
import torch.nn as nn

import mtp


class Recorder(nn.Module):
    """A stand-in MTP module: remembers what it was given and returns a known function of it."""

    def __init__(self, k):
        super().__init__()
        self.k, self.seen = k, None

    def forward(self, h, emb, freqs_cis, start_pos=None):
        self.seen = (h.clone(), emb.clone(), freqs_cis.clone())
        return h * 0.5 + emb + self.k  # (B, T', d)


@pytest.mark.grades("mtp.mtp_hidden")
@pytest.mark.parametrize("D", [1, 3])
def test_mtp_hidden_shifts(D):
    B, T, d, V = 2, 7, 4, 11
    torch.manual_seed(0)
    embed = nn.Embedding(V, d)
    idx = torch.randint(0, V, (B, T))
    h0 = torch.randn(B, T, d)
    freqs = torch.randn(T, 3)
    modules = [Recorder(k) for k in range(1, D + 1)]
    out = mtp.mtp_hidden(modules, h0, idx, embed, freqs)
    assert len(out) == D
    h_prev = h0
    for k, m in enumerate(modules, start=1):
        h_in, emb_in, f_in = m.seen
        # depth k reads positions i = 0..T-k-1: the previous depth's hidden at i and the embedding of idx[i+k]
        want_emb = torch.stack([torch.stack([embed.weight[idx[b, i + k]] for i in range(T - k)]) for b in range(B)])
        torch.testing.assert_close(h_in, h_prev[:, : T - k])
        torch.testing.assert_close(emb_in, want_emb)
        torch.testing.assert_close(f_in, freqs[: T - k])
        want_out = h_prev[:, : T - k] * 0.5 + want_emb + k
        torch.testing.assert_close(out[k - 1], want_out)
        h_prev = want_out


def cross_entropy_plain(logits, target):
    return torch.logsumexp(logits.double(), -1) - logits.double()[target]


@pytest.mark.grades("mtp.mtp_loss")
@pytest.mark.parametrize("D, lam", [(1, 1.0), (2, 0.3), (3, 0.1)])
def test_mtp_loss(D, lam):
    B, T, V = 2, 8, 13
    gen = torch.Generator().manual_seed(D)
    idx = torch.randint(0, V, (B, T + 1), generator=gen)  # the token stream
    targets = idx[:, 1:]  # targets[i] = idx[i+1]
    logits = [torch.randn(B, T - k, V, generator=gen, dtype=torch.float64, requires_grad=True)
              for k in range(1, D + 1)]
    got = mtp.mtp_loss(logits, targets, lam)
    ce = []
    for k in range(1, D + 1):
        # depth k at position i predicts the token k+1 ahead of idx[i]: idx[i + k + 1]; mean over its T-k positions
        terms = [cross_entropy_plain(logits[k - 1][b, i], idx[b, i + k + 1]) for b in range(B) for i in range(T - k)]
        ce.append(sum(terms) / len(terms))
    want = lam / D * sum(ce)
    torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=0)
    grads_got = torch.autograd.grad(got, logits)
    grads_want = torch.autograd.grad(want, logits)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.grades("mtp.mtp_loss")
def test_mtp_loss_bf16_logits_and_empty():
    B, T, V = 1, 6, 9
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, V, (B, T + 1), generator=gen)
    logits = torch.randn(B, T - 1, V, generator=gen).bfloat16()
    got = mtp.mtp_loss([logits], idx[:, 1:], 1.0)
    want = sum(cross_entropy_plain(logits[0, i], idx[0, i + 2]) for i in range(T - 1)) / (T - 1)
    assert got.dtype == torch.float32, "the loss is computed in fp32 from low-precision logits"
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert mtp.mtp_loss([], idx[:, 1:], 0.3).item() == 0.0  # no MTP modules: no loss


@pytest.mark.grades("mtp.mtp_hidden")
def test_mtp_hidden_keeps_the_causal_chain():
    """The MTP loss also trains the trunk and every earlier depth: h^0 → h^1 → ... → h^D is never detached."""
    B, T, d, V, D = 2, 7, 4, 11, 3
    torch.manual_seed(0)
    embed = nn.Embedding(V, d)
    idx = torch.randint(0, V, (B, T))
    h0 = torch.randn(B, T, d, requires_grad=True)
    out = mtp.mtp_hidden([Recorder(k) for k in range(1, D + 1)], h0, idx, embed, torch.randn(T, 3))
    grad, = torch.autograd.grad(sum(o.sum() for o in out), h0)
    # out_k = 0.5 · h^{k-1}[:, :T-k] + ...: position i of h^0 reaches depth k iff i < T - k, with weight 0.5^k
    want = torch.tensor([sum(0.5 ** k for k in range(1, D + 1) if i < T - k) for i in range(T)])
    torch.testing.assert_close(grad, want[None, :, None].expand(B, T, d))
