"""Grading test for mla_decode.py (exercises.py): flash decoding over the latent cache in PyTorch.

latent_attention_split must give, for every query row (a head of a new token), the softmax over the cached positions
it may see, whatever the number of ranges and the tile size; it is compared with a plain per-row softmax written
here from the module docstring's equations."""
import pytest
import torch

import mla_decode


def attention_plain(q_lat, q_pe, latent, k_pe, at, scale):
    """o[b, t, h] = Σ_{s <= at[b, t]} softmax_s(scale · (q^lat · c_s + q^R · k^R_s)) c_s, one row at a time."""
    B, T, H, C = q_lat.shape
    out = torch.zeros(B, T, H, C, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = int(at[b, t]) + 1  # positions 0 .. at[b, t]
            for h in range(H):
                score = scale * (latent[b, :n] @ q_lat[b, t, h] + k_pe[b, :n] @ q_pe[b, t, h])  # (n,)
                w = torch.exp(score - score.max())
                out[b, t, h] = (w / w.sum()) @ latent[b, :n]
    return out


@pytest.mark.grades("mla_decode.latent_attention_split")
@pytest.mark.parametrize("splits, block, first", [(1, 4, None), (3, 4, None), (4, 8, 15), (6, 2, None)])
def test_latent_attention_split(splits, block, first):
    """Two sequences of two new tokens over 32 cached positions; `first` 15: with 4 ranges of 8, the second range
    starts between the two tokens' positions 15 and 16, so there the first token sees nothing."""
    gen = torch.Generator().manual_seed(splits * 10 + block)
    B, T, H, C, DR, S = 2, 2, 3, 6, 4, 32
    q_lat = torch.randn(B, T, H, C, generator=gen, dtype=torch.float64) * 2  # peaked scores: the max moves
    q_pe = torch.randn(B, T, H, DR, generator=gen, dtype=torch.float64)
    latent = torch.randn(B, S, C, generator=gen, dtype=torch.float64)
    k_pe = torch.randn(B, S, DR, generator=gen, dtype=torch.float64)
    start = torch.tensor([7, 30]) if first is None else torch.tensor([first, first])
    at = start[:, None] + torch.arange(T)  # (B, T)
    got = mla_decode.latent_attention_split(q_lat, q_pe, latent, k_pe, at, 0.4, splits, block)
    want = attention_plain(q_lat, q_pe, latent, k_pe, at, 0.4)
    assert got.shape == (B, T, H, C)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.grades("mla_decode.latent_attention_split")
@pytest.mark.parametrize("splits, block", [(4, 8), (3, 4)])
def test_latent_attention_split_large_scores_fp32(splits, block):
    """fp32 inputs with scores of a few hundred (e^x overflows fp32 past x = 88.7): the running max and the merge
    relative to the max of the ranges' maxima keep every exponent <= 0."""
    gen = torch.Generator().manual_seed(splits)
    B, T, H, C, DR, S = 2, 2, 3, 6, 4, 32
    q_lat = torch.randn(B, T, H, C, generator=gen) * 30
    q_pe = torch.randn(B, T, H, DR, generator=gen) * 30
    latent = torch.randn(B, S, C, generator=gen)
    k_pe = torch.randn(B, S, DR, generator=gen)
    at = torch.tensor([[7, 8], [30, 31]])
    got = mla_decode.latent_attention_split(q_lat, q_pe, latent, k_pe, at, 1.0, splits, block)
    want = attention_plain(q_lat.double(), q_pe.double(), latent.double(), k_pe.double(), at, 1.0)
    assert got.dtype == torch.float32 and torch.isfinite(got).all(), "overflow: an exponent above 0"
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)


@pytest.mark.grades("mla_decode.latent_attention_split")
def test_latent_attention_split_computes_it_itself(monkeypatch):
    """The exercise is the split online softmax: the one-shot reference and the kernel's entry point are off limits."""
    def forbidden(*args, **kwargs):
        raise AssertionError("latent_attention_split must not call latent_attention_ref / latent_attention")
    monkeypatch.setattr(mla_decode, "latent_attention_ref", forbidden)
    monkeypatch.setattr(mla_decode, "latent_attention", forbidden)
    gen = torch.Generator().manual_seed(9)
    q_lat, q_pe, latent, k_pe = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                                 for shape in ((1, 2, 2, 4), (1, 2, 2, 2), (1, 12, 4), (1, 12, 2)))
    at = torch.tensor([[9, 10]])
    got = mla_decode.latent_attention_split(q_lat, q_pe, latent, k_pe, at, 0.5, 2, 4)
    torch.testing.assert_close(got, attention_plain(q_lat, q_pe, latent, k_pe, at, 0.5), rtol=1e-9, atol=1e-10)
