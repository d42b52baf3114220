"""The DeepSeek-V3 Transformer: composition only. Each idea lives in its own file:

    mla.py     Multi-head Latent Attention (+ RoPE/YaRN, latent KV cache)          report §2.1.1
    moe.py     DeepSeekMoE, aux-loss-free balancing, sequence-wise balance loss    report §2.1.2
    mtp.py     Multi-Token Prediction                                              report §2.2
    layers.py  RMSNorm and the SwiGLU feed-forward
    config.py  ModelConfig, presets, validation

Layout (as in the official inference code): token embedding → n_layers pre-norm residual blocks
(x += MLA(norm(x)); x += FFN(norm(x))), where the first n_dense_layers use a dense SwiGLU FFN and the rest
DeepSeekMoE → final RMSNorm → output head (not tied to the embedding) → logits for every position.
The D MTP modules read the final hidden state and share the embedding and the head.

Unlike the official inference forward (last position only, under inference_mode), `forward` returns logits for
all positions and, given targets, the training losses. Cached decoding is a separate method.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import ModelConfig, PRESETS, get_preset  # noqa: F401  (re-exported for users of model.py)
from layers import RMSNorm, MLP, at_least_fp32
from mla import MLA, CachePositions, cache_positions, precompute_freqs_cis
from moe import MoE, update_biases
from mtp import MTPModule, mtp_hidden, mtp_loss, mtp_accuracy


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(attn_norm(x)), then + FFN(ffn_norm(x)); FFN dense or MoE by depth."""

    def __init__(self, layer_id: int, cfg: ModelConfig, linear=nn.Linear, experts=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = MLA(cfg, linear)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = MLP(cfg.dim, cfg.inter_dim, linear) if layer_id < cfg.n_dense_layers else MoE(cfg, linear, experts)

    def forward(self, x, freqs_cis, start_pos=None):
        x = x + self.attn(self.attn_norm(x), freqs_cis, start_pos)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """DeepSeek-V3: embedding, dense then MoE blocks, final norm, untied head, D MTP modules.

    `linear` is the class used for the projections inside attention and FFNs (nn.Linear, or fp8_linear.FP8Linear);
    `experts` the routed experts' kernels (None: high precision; fp8_experts.FP8Experts with fp8_linear.FP8Linear).
    The embedding, the output head, the MoE gate and the norms always stay in high precision (report §3.3).
    """

    def __init__(self, cfg: ModelConfig, linear=nn.Linear, experts=None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg, linear, experts) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # MTP module k holds the block of "layer" n_layers + k (an MoE block, as in the released weights).
        self.mtp = nn.ModuleList(MTPModule(cfg.dim, Block(cfg.n_layers + k, cfg, linear, experts), linear)
                                 for k in range(cfg.n_mtp))
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Every matrix ~ N(0, init_std) (report: 0.006); norm gains 1; gate biases 0 (buffers, untouched)."""
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, mean=0.0, std=self.cfg.init_std)
            else:
                nn.init.ones_(p)

    # -- training / full-sequence forward ---------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        """idx (B, T) → logits (B, T, V); with targets (B, T) → (logits, losses).

        losses: `main` next-token CE; `mtp` = (1/D) Σ_k CE_k (0 without MTP); `balance` = Σ over MoE layers of the
        unweighted sequence-wise balance loss (0 in eval); `mtp_acc` = depth-1 argmax accuracy (detached).
        The training objective is main + λ·mtp + α·balance (train.py).
        """
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        freqs_cis = self.freqs_cis[:T]
        h = self.embed(idx)  # (B, T, d)
        for layer in self.layers:
            h = layer(h, freqs_cis)
        h = self.norm(h)
        logits = self.head(h)  # (B, T, V)
        if targets is None:
            return logits
        V = logits.shape[-1]
        losses = {"main": F.cross_entropy(at_least_fp32(logits).reshape(-1, V), targets.reshape(-1))}
        zero = losses["main"].new_zeros(())
        ran = list(self.layers)  # the MoE layers whose balance loss belongs to this forward
        if len(self.mtp) and T > len(self.mtp):
            mtp_logits = [self.head(hk) for hk in mtp_hidden(self.mtp, h, idx, self.embed, freqs_cis)]
            losses["mtp"] = mtp_loss(mtp_logits, targets)
            losses["mtp_acc"] = mtp_accuracy(mtp_logits[0], targets)
            ran += [m.block for m in self.mtp]
        else:  # too short a sequence for the MTP depths: they did not run (and keep no stale loss here)
            losses["mtp"], losses["mtp_acc"] = zero, zero
        balance = [b.ffn.balance_loss for b in ran if isinstance(b.ffn, MoE)]
        losses["balance"] = torch.stack(balance).sum() if balance else zero
        return logits, losses

    # -- cached inference (absorbed MLA over the latent cache) -------------------------------------------------
    def attention_modules(self):
        return [b.attn for b in self.layers] + [m.block.attn for m in self.mtp]

    def setup_cache(self, max_batch: int, max_seq_len: int = None, attn_impl: str = "absorb"):
        """Allocate each MLA's latent cache (kv_lora_rank + dr values per token) and pick its decode path."""
        max_seq_len = max_seq_len or self.cfg.max_seq_len
        if max_seq_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        w = self.embed.weight
        for attn in self.attention_modules():
            attn.setup_cache(max_batch, max_seq_len, device=w.device, dtype=w.dtype)
            attn.attn_impl = attn_impl

    def free_cache(self):
        for attn in self.attention_modules():
            attn.free_cache()
            attn.attn_impl = "naive"

    def freqs_at(self, start_pos, T: int) -> torch.Tensor:
        """RoPE factors of positions start_pos..start_pos+T-1: (T, dr/2) for an int start, (B, T, dr/2) for a
        (B,) tensor of per-sequence starts or their CachePositions (gathered on the device)."""
        if isinstance(start_pos, CachePositions):
            return self.freqs_cis[start_pos.at]  # (B, T, dr/2)
        if not torch.is_tensor(start_pos):
            return self.freqs_cis[start_pos:start_pos + T]
        return self.freqs_cis[start_pos[:, None] + torch.arange(T, device=start_pos.device)]  # (B, T, dr/2)

    def positions(self, start_pos, T: int, attn: MLA):
        """An int start as it is; a (B,) tensor → its mla.CachePositions over attn's cache, computed once per
        forward for all layers (the write positions and the mask do not depend on the layer)."""
        if not torch.is_tensor(start_pos) or attn.kv_cache is None:
            return start_pos  # (no cache: MLA.forward refuses the tensor with its own message)
        return cache_positions(start_pos, T, attn.kv_cache.shape[1], at_least_fp32(self.embed.weight).dtype,
                               bias=attn.attn_impl != "fused")  # the fused kernel masks by the positions

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, start_pos):
        """Tokens idx (B, T) at absolute positions start_pos.. → (logits (B, T, V), final hidden (B, T, d)).

        start_pos: an int (every row at the same positions), or a (B,) integer tensor on the model's device,
        row b at start_pos[b]..: the static-cache form (mla.MLA._write_cache_at) that a CUDA graph can capture;
        the caller keeps start_pos[b] + T within the cache."""
        T = idx.shape[1]
        start_pos = self.positions(start_pos, T, self.layers[0].attn)
        freqs_cis = self.freqs_at(start_pos, T)
        h = self.embed(idx)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos)
        h = self.norm(h)
        return self.head(h), h

    @torch.no_grad()
    def mtp_step(self, h: torch.Tensor, next_idx: torch.Tensor, start_pos: int, depth: int = 0):
        """Cached MTP module `depth` at positions start_pos..: h (B, T, d) hidden of those positions,
        next_idx (B, T) the tokens one ahead of them → (logits (B, T, V) for the tokens two ahead, h^k).
        start_pos: int or (B,) tensor, as in forward_cached."""
        T = next_idx.shape[1]
        start_pos = self.positions(start_pos, T, self.mtp[depth].block.attn)
        freqs_cis = self.freqs_at(start_pos, T)
        hk = self.mtp[depth](h, self.embed(next_idx), freqs_cis, start_pos)
        return self.head(hk), hk

    # -- MoE bookkeeping ---------------------------------------------------------------------------------------
    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_moe_bias(self, gamma: float, group=None):
        """Aux-loss-free balancing: after each optimizer step, nudge every gate bias by ±γ (moe.MoE.update_bias);
        the loads of all layers are summed over `group` (the data-parallel ranks) in one all-reduce."""
        update_biases(self.moe_layers(), gamma, group)


def count_params(cfg: ModelConfig) -> dict:
    """Parameter counts of a config, built on the meta device (no memory, seconds even for 671B).

    total / active: main model (embedding and head included); active counts only K_r of the N_r routed experts
    of each MoE layer. mtp / mtp_active: the MTP modules' own parameters (their embedding and head are shared).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    per_expert = 3 * cfg.dim * cfg.moe_inter_dim
    idle = (cfg.n_routed_experts - cfg.n_activated_experts) * per_expert
    return {"total": main, "active": main - cfg.n_moe_layers * idle, "mtp": mtp,
            "mtp_active": mtp - cfg.n_mtp * idle}


# -- FLOPs per token ----------------------------------------------------------------------------------------------
# The counting rule (used for tokens/s → FLOP/s → MFU in `train.py --bench`):
#   * a multiply-add is 2 FLOPs; a token passing through a weight matrix of shape (out, in) costs 2·out·in forward;
#   * training costs 3× the forward (the backward computes two products per forward product: the gradient of the
#     input and the gradient of the weight), so a weight costs 6·out·in per trained token;
#   * the weights a token passes through are: in MLA W^DQ, W^UQ/W^QR (or one W^Q), W^DKV/W^KR, W^UK/W^UV, W^O; the
#     three matrices of a dense FFN; in an MoE layer the gate, the shared experts and only the K_r *activated*
#     routed experts; the output head; in each MTP module its projection M_k (2d → d), its block and the shared
#     head once more. The embedding is a lookup, not a matmul: 0 FLOPs. Norms, RoPE, softmax and SwiGLU's
#     elementwise product are left out (a few FLOPs per element, small beside the matmuls);
#   * the attention core (q·k scores and the weighted sum of v) has no weights: per layer and token it costs
#     2·H·(d_h + d^R_h)·t + 2·H·d_h·t forward over the t keys the token attends to. Causal attention over a
#     sequence of T sees on average T/2 keys, so per layer H·T·(d_h + d^R_h + d_h) forward and 3× that to train.
#     (nanoGPT counts all T keys instead; this file counts T/2.)
# Check: for the v3-671b preset the activated matmul weights of the main model come to about 37B, as the report's
# "37B activated parameters per token" (tests/test_train.py::test_matmul_params_match_the_model).
def matmul_params(cfg: ModelConfig) -> dict:
    """Weights a token multiplies with, main model and MTP modules (activated experts only, no embedding)."""
    d, H = cfg.dim, cfg.n_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr) if cfg.q_lora_rank else d * H * (dn + dr)
    attn = q + d * (cfg.kv_lora_rank + dr) + cfg.kv_lora_rank * H * (dn + dv) + H * dv * d
    dense = 3 * d * cfg.inter_dim
    moe = d * cfg.n_routed_experts + 3 * d * cfg.moe_inter_dim * (cfg.n_shared_experts + cfg.n_activated_experts)
    head = d * cfg.vocab_size
    main = cfg.n_layers * attn + cfg.n_dense_layers * dense + cfg.n_moe_layers * moe + head
    mtp = cfg.n_mtp * (2 * d * d + attn + moe + head)  # M_k, an MoE block, the shared head again
    return {"main": main, "mtp": mtp}


def train_flops_per_token(cfg: ModelConfig, T: int, with_mtp: bool = True) -> float:
    """Training FLOPs per token at sequence length T, by the rule above: 6·N_matmul + 3·L·H·T·(d_h + d^R_h + d_h),
    where L counts the MTP modules' attention too (counted over all T positions; they run on T − k)."""
    n = matmul_params(cfg)
    N = n["main"] + (n["mtp"] if with_mtp else 0)
    L = cfg.n_layers + (cfg.n_mtp if with_mtp else 0)
    head_dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return 6 * N + 3 * L * cfg.n_heads * T * head_dims
