"""Multi-Token Prediction (MTP), DeepSeek-V3 report §2.2.

Besides the next token, the model learns to predict D further tokens with D small *sequential* modules
(unlike parallel heads, each depth keeps the full causal chain). Why: every position then gives D more training
signals, and the hidden state is pushed to carry what the tokens after the next one need (the report's
"pre-plan"); at inference the modules cost nothing unless used as a drafter.
Module k (k = 1..D) at position i combines

    h'^k_i = M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i) ]        (M_k ∈ R^{d×2d}: `eh_proj`)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                   (one transformer block)
    P^k_{i+k+1} = OutHead(h^k_i)                                        (the main model's head, shared)

where h^0 is the main model's final hidden state. The embedding and the output head are the main model's own
modules (shared by reference, not copied). Order of the concatenation: the report writes the hidden state
first, but the released weights (and every implementation that loads them) put the embedding first:
[enorm(emb); hnorm(h)]. We follow the weights. Each module ends with a norm (`shared_head.norm` in the
checkpoints) before the shared head; its output is also what the next depth reads as h^k.

Loss:  L_MTP = (λ / D) · Σ_k CE(P^k, t_{k+2..T+1})   (report: λ = 0.3 for the first 10T tokens, then 0.1).
Each CE_k is averaged over the T−k positions that have a target (as Megatron does); the report's formula divides
the sum by T, which differs by the factor (T−k)/T (0.8% for T = 128, k = 1).

At inference the modules can be dropped, or used as a draft model for self-speculative decoding:
`mtp_hidden` over the prompt fills their caches and depth 1 proposes the token after the next (generate.py).

Indexing used here (0-based): inputs idx[0..T-1], targets[i] = idx[i+1]. Depth k reads positions
i = 0..T-k-1, the embedding of idx[i+k], and predicts targets[i+k] (the token k+1 ahead of idx[i]).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import RMSNorm, at_least_fp32, run_demo


class MTPModule(nn.Module):
    """One MTP depth: two norms, the 2d→d projection M_k, a transformer block (passed in) and a final norm."""

    def __init__(self, dim: int, block: nn.Module, linear=nn.Linear):
        super().__init__()
        self.enorm = RMSNorm(dim)
        self.hnorm = RMSNorm(dim)
        self.eh_proj = linear(2 * dim, dim, bias=False)
        self.block = block  # same kind as the main model's blocks; called as block(x, freqs_cis, start_pos)
        self.norm = RMSNorm(dim)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, freqs_cis: torch.Tensor, start_pos=None):
        """h: (B, T', d) previous depth's hidden; emb: (B, T', d) embeddings of the tokens k ahead."""
        x = torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1)  # (B, T', 2d), embedding first
        x = self.eh_proj(x)  # (B, T', d)
        x = self.block(x, freqs_cis, start_pos)
        return self.norm(x)  # h^k, read by the shared head and by depth k+1


def mtp_hidden(modules, h0: torch.Tensor, idx: torch.Tensor, embed: nn.Module, freqs_cis: torch.Tensor):
    """Run the D modules over a full sequence (training / evaluation, no cache).

    h0: (B, T, d) main model's final hidden; idx: (B, T) input tokens; freqs_cis: (T, dr/2).
    Returns a list of D tensors, depth k (1-based) of shape (B, T-k, d).
    """
    T = idx.shape[1]
    out, h = [], h0
    for k, module in enumerate(modules, start=1):
        if T - k <= 0:
            raise ValueError(f"MTP depth {k} needs a sequence longer than {k} tokens, got {T}")
        emb = embed(idx[:, k:])  # (B, T-k, d): Emb(t_{i+k}) for i = 0..T-k-1
        h = module(h[:, : T - k], emb, freqs_cis[: T - k])  # (B, T-k, d)
        out.append(h)
    return out


def mtp_loss(logits: list, targets: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """L_MTP = (λ/D) Σ_k CE_k. logits[k-1]: (B, T-k, V) predicts targets[:, k:] (the token k+1 ahead)."""
    if not logits:
        return targets.new_zeros((), dtype=torch.float32)
    losses = []
    for k, lk in enumerate(logits, start=1):
        tk = targets[:, k:]  # (B, T-k)
        losses.append(F.cross_entropy(at_least_fp32(lk).reshape(-1, lk.shape[-1]), tk.reshape(-1)))
    return lam * torch.stack(losses).mean()


@torch.no_grad()
def mtp_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of positions where depth 1's argmax equals the true token two ahead (its acceptance proxy)."""
    return (logits.argmax(-1) == targets[:, 1:]).float().mean()


# -- demo: `python mtp.py [--depths D] [WORD ...]` prints which token each depth reads and predicts ------------------
def demo_targets(words: list, depths: int = 2) -> list:
    """One row per input position i: (i, input word, main target, [(read, predicted) or None for each depth]).

    What depth k reads comes from mtp_hidden itself, run with an "embedding" that returns the token id and
    modules that pass it through; what it predicts is targets[:, k:], as mtp_loss slices them."""
    if depths < 1:
        raise ValueError(f"--depths must be at least 1, got {depths}")
    if len(words) < depths + 2:
        raise ValueError(f"{depths} MTP depth(s) need at least {depths + 2} words, got {len(words)}")
    ids = torch.arange(len(words))[None]  # (1, T+1): token i is words[i]
    idx, targets = ids[:, :-1], ids[:, 1:]  # inputs and next-token targets, (1, T) each
    T = idx.shape[1]
    read = mtp_hidden([lambda h, emb, fc: emb] * depths, torch.zeros(1, T, 1), idx,
                      lambda x: x[..., None].float(), torch.zeros(T, 1))  # depth k: (1, T-k, 1) token ids read
    rows = []
    for i in range(T):
        cells = [(words[int(read[k - 1][0, i, 0])], words[targets[0, k:][i]]) if i < T - k else None
                 for k in range(1, depths + 1)]
        rows.append((i, words[idx[0, i]], words[targets[0, i]], cells))
    return rows


def _demo_main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Which token each MTP depth reads and predicts, position by position.")
    p.add_argument("words", nargs="*", default="the cat sat on the mat and purred softly".split(),
                   help="the sequence, one token per word (default: a short sentence)")
    p.add_argument("--depths", type=int, default=2, help="number of MTP depths D (default 2; V3 uses 1)")
    a = p.parse_args(argv)
    try:
        rows = demo_targets(a.words, a.depths)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    w = max(6, *(len(x) for x in a.words)) + 1  # one word column
    cw = max(2 * w + 4, 27)  # one depth column: "reads -> predicts"
    T = len(rows)
    print(f"inputs t_0..t_{T - 1} = {' '.join(a.words[:-1])}; the main model predicts t_(i+1) at position i")
    print("depth k at position i reads Emb(t_(i+k)) beside depth k-1's h_i and predicts t_(i+k+1):")
    head = f"  {'i':>2s}  {'input':{w}s}{'main':{w}s}" + "".join(
        f"{f'depth {k}: reads -> predicts':{cw}s}" for k in range(1, a.depths + 1))
    print(head.rstrip())
    for i, word, main, cells in rows:
        line = f"  {i:2d}  {word:{w}s}{main:{w}s}"
        line += "".join(f"{f'{c[0]:{w}s}-> {c[1]}':{cw}s}" if c else f"{'-':{cw}s}" for c in cells)
        print(line.rstrip())
    counts = ", ".join(f"depth {k}: {T - k}" for k in range(1, a.depths + 1))
    print(f"positions with a target (each CE_k averages over its own): main {T}, {counts}")


if __name__ == "__main__":
    run_demo(_demo_main)
