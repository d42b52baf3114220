"""Multi-Token Prediction: semantics pinned against the report and the released-weight layout."""
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from model import Transformer
from mtp import mtp_accuracy, mtp_hidden, mtp_loss


def tiny(**kw):
    return tiny_config(dict(vocab_size=97, init_std=0.05), **kw)


def test_depth_zero_reproduces_the_base_model():
    torch.manual_seed(0)
    with_mtp = Transformer(tiny(n_mtp=1)).double()
    base = Transformer(tiny(n_mtp=0)).double()
    missing, unexpected = base.load_state_dict(with_mtp.state_dict(), strict=False)
    assert not missing and all(k.startswith("mtp.") for k in unexpected)
    idx = torch.randint(0, 97, (2, 12))
    tgt = torch.randint(0, 97, (2, 12))
    la, losses_a = with_mtp(idx, tgt)
    lb, losses_b = base(idx, tgt)
    assert torch.equal(la, lb)
    assert torch.equal(losses_a["main"], losses_b["main"])
    assert losses_b["mtp"].item() == 0.0 and losses_a["mtp"].item() > 0.0


def test_depth_k_prediction_sees_no_token_after_t_plus_k():
    torch.manual_seed(1)
    model = Transformer(tiny(n_mtp=2)).double().eval()
    idx = torch.randint(0, 97, (1, 16))
    T = idx.shape[1]

    def mtp_logits(x):
        h = model.norm(model.layers[1](model.layers[0](model.embed(x), model.freqs_cis[:T]), model.freqs_cis[:T]))
        return [model.head(hk) for hk in mtp_hidden(model.mtp, h, x, model.embed, model.freqs_cis[:T])]

    ref = mtp_logits(idx)
    for k in (1, 2):
        t = 5
        changed = idx.clone()
        changed[0, t + k + 1:] = (changed[0, t + k + 1:] + 1) % 97  # every token after t+k
        out = mtp_logits(changed)
        assert torch.equal(out[k - 1][0, : t + 1], ref[k - 1][0, : t + 1])
        # ... while the token at t+k (the embedding depth k reads at position t) does matter
        changed = idx.clone()
        changed[0, t + k] = (changed[0, t + k] + 1) % 97
        out = mtp_logits(changed)
        assert not torch.allclose(out[k - 1][0, t], ref[k - 1][0, t])


def test_mtp_loss_formula_and_targets():
    torch.manual_seed(2)
    B, T, V, D = 2, 10, 11, 2
    logits = [torch.randn(B, T - k, V, dtype=torch.float64) for k in range(1, D + 1)]
    targets = torch.randint(0, V, (B, T))
    lam = 0.3
    manual = sum(F.cross_entropy(logits[k - 1].reshape(-1, V), targets[:, k:].reshape(-1)) for k in (1, 2))
    assert torch.allclose(mtp_loss(logits, targets, lam), lam / D * manual)


def test_model_scores_depth_k_against_the_token_k_plus_1_ahead():
    """Through Transformer.forward: depth k at position i is scored against idx[i+k+1] (built by hand)."""
    torch.manual_seed(5)
    model = Transformer(tiny(n_mtp=2)).double().eval()
    full = torch.randint(0, 97, (2, 13))  # a stream of T+1 tokens
    idx, targets = full[:, :-1], full[:, 1:]
    T = idx.shape[1]
    _, losses = model(idx, targets)
    f = model.freqs_cis[:T]
    h = model.embed(idx)
    for layer in model.layers:
        h = layer(h, f)
    h = model.norm(h)
    ces = []
    for k in (1, 2):
        emb = model.embed(torch.stack([full[:, i + k] for i in range(T - k)], 1))  # Emb(t_{i+k})
        h = model.mtp[k - 1](h[:, : T - k], emb, f[: T - k])
        want = torch.stack([full[:, i + k + 1] for i in range(T - k)], 1)  # the token k+1 ahead of idx[i]
        ces.append(F.cross_entropy(model.head(h).reshape(-1, 97), want.reshape(-1)))
    assert torch.allclose(losses["mtp"], (ces[0] + ces[1]) / 2)


def test_concat_order_is_embedding_then_hidden():
    """Zeroing the first d input columns of eh_proj must remove the embedding's influence (released layout)."""
    torch.manual_seed(3)
    model = Transformer(tiny()).double().eval()
    m = model.mtp[0]
    d = model.cfg.dim
    with torch.no_grad():
        m.eh_proj.weight[:, :d] = 0
    h = torch.randn(1, 6, d, dtype=torch.float64)
    e1, e2 = torch.randn(2, 1, 6, d, dtype=torch.float64)
    f = model.freqs_cis[:6]
    assert torch.allclose(m(h, e1, f), m(h, e2, f))
    assert not torch.allclose(m(h + 1.0 * torch.randn_like(h), e1, f), m(h, e1, f))


def test_mtp_loss_trains_shared_embedding_and_head():
    torch.manual_seed(4)
    model = Transformer(tiny()).double()
    assert not any("embed" in n or "head" in n for n, _ in model.mtp.named_parameters()), "must share, not copy"
    idx = torch.randint(0, 97, (2, 12))
    _, losses = model(idx, torch.roll(idx, -1, 1))
    losses["mtp"].backward()
    for p in (model.embed.weight, model.head.weight, model.mtp[0].eh_proj.weight, model.layers[0].attn.wkv_a.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_demo_targets_are_what_mtp_loss_trains(capsys):
    """The demo's table (`python mtp.py`): depth k at position i reads Emb(t_(i+k)) and its printed target is
    the one mtp_loss scores: logits peaked on the printed targets give a loss of ~0, shifted by one they don't."""
    import re

    import mtp
    words = "a b c d e f g h i".split()  # token id = position in this list
    rows = mtp.demo_targets(words, depths=2)
    T, V = 8, len(words)
    for k in (1, 2):
        cells = [r[3][k - 1] for r in rows]
        assert all(c is None for c in cells[T - k:])
        assert [c[0] for c in cells[:T - k]] == words[k:T]  # Emb(t_(i+k))
    logits = [torch.full((1, T - k, V), -50.0) for k in (1, 2)]
    for k, lk in zip((1, 2), logits):
        for i in range(T - k):
            lk[0, i, words.index(rows[i][3][k - 1][1])] = 50.0
    targets = torch.arange(1, T + 1)[None]  # t_(i+1) at position i
    assert mtp_loss(logits, targets).item() < 1e-6
    assert mtp_loss([logits[0], logits[1].roll(1, dims=1)], targets).item() > 10
    mtp._demo_main(words)
    out = capsys.readouterr().out
    printed = re.findall(r"^\s+(\d+)\s+(\w)\s+(\w)\s+(\w)\s+-> (\w)\s+(?:(\w)\s+-> (\w)|-)$", out, re.M)
    assert len(printed) == T - 1  # the last position has no depth-1 target
    for p, r in zip(printed, rows):
        assert (p[1], p[2], p[3], p[4]) == (r[1], r[2], *r[3][0])
    assert "main 8, depth 1: 7, depth 2: 6" in out


def test_demo_bad_input_is_one_line():
    import mtp
    with pytest.raises(SystemExit, match="error: 2 MTP depth.s. need at least 4 words, got 3"):
        mtp._demo_main(["a", "b", "c"])
    with pytest.raises(SystemExit, match="error: --depths must be at least 1"):
        mtp._demo_main(["--depths", "0", "a", "b", "c"])


def test_forward_mtp_loss_is_the_formula_with_trained_norm_gains():
    """Transformer.forward's MTP loss against the report's equations written out here, with every norm gain random.
    At init all gains are 1, and then the final norm hides a skipped or swapped enorm/hnorm and an MTP depth fed the
    pre-norm hidden state: h^0 = the main model's final *normed* hidden state, h'_i = eh_proj([RMSNorm_e(Emb(t_{i+1}));
    RMSNorm_h(h^0_i)]), the block, a last RMSNorm, the shared head, scored against t_{i+2}."""
    torch.manual_seed(6)
    model = Transformer(tiny(n_mtp=1)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # the norm gains
                p.uniform_(0.5, 1.5)
    full = torch.randint(0, 97, (2, 13))
    idx, targets = full[:, :-1], full[:, 1:]
    T = idx.shape[1]
    _, losses = model(idx, targets)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    f = model.freqs_cis[:T]
    with torch.no_grad():
        h = model.embed(idx)
        for layer in model.layers:
            h = layer(h, f)
        h0 = rms(h, model.norm.weight)  # the main model's final normed hidden state
        m = model.mtp[0]
        x = torch.cat([rms(model.embed(full[:, 1:T]), m.enorm.weight), rms(h0[:, :T - 1], m.hnorm.weight)], -1)
        hk = rms(m.block(x @ m.eh_proj.weight.T, f[:T - 1]), m.norm.weight)
        want = F.cross_entropy((hk @ model.head.weight.T).reshape(-1, 97), full[:, 2:].reshape(-1))
    torch.testing.assert_close(losses["mtp"], want, rtol=1e-9, atol=1e-12)


def test_mtp_accuracy_scores_depth_one_against_the_token_two_ahead():
    """mtp_acc (train.py logs it as the acceptance proxy): depth 1 at position i is right iff its argmax is
    targets[i+1] = t_{i+2}."""
    targets = (torch.arange(18) % 11).view(2, 9)  # no two neighbours equal: an off-by-one cannot score
    logits = F.one_hot(targets[:, 1:], 11).double()  # (2, 8, 11): every position right
    assert mtp_accuracy(logits, targets).item() == 1.0
    logits[0, :4] = F.one_hot((targets[0, 1:5] + 1) % 11, 11).double()  # 4 of the 16 wrong
    assert mtp_accuracy(logits, targets).item() == pytest.approx(12 / 16)
