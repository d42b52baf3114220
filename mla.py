"""Multi-head Latent Attention (MLA), DeepSeek-V3 report §2.1.1 (introduced in DeepSeek-V2).

Standard multi-head attention caches, per token and per layer, a key and a value for every head:
H·(d_h + d_h) values. MLA caches one small latent instead. For the hidden state h_t of token t:

    c^KV_t = W^DKV h_t                          joint key/value latent, width d_c (`kv_lora_rank`)
    k^C_t  = W^UK c^KV_t,  v^C_t = W^UV c^KV_t  per-head keys and values, up-projected from the latent
    k^R_t  = RoPE(W^KR h_t)                     ONE rotary key of width d^R_h, shared by all heads
    k_t,i  = [k^C_t,i ; k^R_t]                  content ("nope") dims first, rotary dims last

and for the query (optionally compressed too, width d'_c = `q_lora_rank`; 0 = a plain projection `wq`):

    c^Q_t = W^DQ h_t,  q^C_t = W^UQ c^Q_t,  q^R_t = RoPE(W^QR c^Q_t),  q_t,i = [q^C_t,i ; q^R_t,i]
    o_t,i = Σ_j softmax_j(q_t,i · k_j,i / sqrt(d_h + d^R_h)) v^C_j,i,      u_t = W^O [o_t,1 ; ... ; o_t,H]

RoPE cannot act on c^KV (a rotation between W^UK and the query would depend on the position and so could
not be folded into a weight), hence the *decoupled* rotary part k^R / q^R. An RMSNorm follows each latent
(`q_norm` on c^Q, `kv_norm` on c^KV only; k^R is taken from the down-projection before that norm).

Weights, named as in the released checkpoints: `wkv_a` = [W^DKV ; W^KR] (dim → d_c + d^R_h), `wkv_b` =
[W^UK ; W^UV] (d_c → H·(d_h + d_v), viewed (H, d_h + d_v, d_c): per head the first d_h rows are W^UK, the
last d_v rows W^UV), `wq_a` = W^DQ, `wq_b` = [W^UQ ; W^QR] per head, `wo` = W^O. In code dn = d_h
(`qk_nope_head_dim`), dr = d^R_h (`qk_rope_head_dim`), dv = `v_head_dim` (may differ from dn), c = d_c.
"pe" (positional embedding) names the rotary part, as in the released code: q_pe = q^R, k_pe = k^R, and
`pe_cache` holds the roped k^R; "nope" (no positional embedding) names the content part q^C, k^C.

Two attention paths, equal up to rounding (tests/test_mla.py), and a third for GPU decoding:
- naive (the reference; training and prefill): expand c^KV to per-head K and V with W^UK, W^UV and call
  F.scaled_dot_product_attention.
- absorb (the fast path for decoding): since q^C_i·(W^UK_i c^KV_j) = (W^UK_i^T q^C_i)·c^KV_j, fold W^UK into
  the query and W^UV into the output, and attend over the cached latents directly; no per-head K or V is
  ever formed. The KV cache holds only kv_norm(c^KV) and the roped k^R: d_c + d^R_h values per token
  (576 for V3 instead of 128·(192+128) = 40960 for MHA).
- fused (decoding on a GPU): absorb with the attention over the latents as one Triton kernel that reads the
  cache in one pass per block of query rows and stops at the newest visible position (mla_decode.py, flash
  decoding over the latent cache).

RoPE rotates interleaved pairs (x[2i], x[2i+1]), the layout of the released weights. YaRN extends the
context when max_seq_len > original_seq_len: low-frequency pairs are slowed by rope_factor, high-frequency
ones kept, a linear ramp in between; the softmax scale is multiplied by m², m = 0.1·mscale·ln(rope_factor)+1
(the cos/sin themselves are not scaled). Why m²: over a longer context the softmax spreads its weight over
more keys, and YaRN sharpens it again with a lower temperature (logits × 1/t, fitted as √(1/t) = 0.1·ln s + 1
for a stretch s). YaRN applies √(1/t) = m to q and to k alike (through their cos/sin), so their dot product
carries m²; DeepSeek's code puts the whole m² into the softmax scale instead, which sharpens the content dims
as well as the rotary ones, and this file does the same.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import RMSNorm, at_least_fp32, run_demo
from mla_decode import latent_attention


# ---------------------------------------------------------------------------------------------------------
# RoPE and YaRN (pure functions)
# ---------------------------------------------------------------------------------------------------------
def yarn_correction_range(d: int, theta: float, original_seq_len: int, beta_fast: float, beta_slow: float):
    """(low, high) pair indices of the YaRN ramp: pair j makes original_seq_len·θ_j/(2π) turns over the
    original context; pairs turning more than beta_fast times keep their frequency, fewer than beta_slow
    times are interpolated (divided by the factor)."""

    def dim_for(turns):  # the (fractional) pair index that makes `turns` rotations in original_seq_len
        return d * math.log(original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for(beta_fast)), 0)
    high = min(math.ceil(dim_for(beta_slow)), d - 1)
    return low, high


def rope_frequencies(cfg) -> torch.Tensor:
    """θ_i = rope_theta^(-2i/d) for i < d/2 (d = qk_rope_head_dim), with the YaRN ramp when active. (d/2,) fp32."""
    d = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (d/2,)
    if cfg.yarn_active:
        low, high = yarn_correction_range(d, cfg.rope_theta, cfg.original_seq_len, cfg.beta_fast, cfg.beta_slow)
        span = (high - low) if high > low else 0.001  # avoid 0/0 when the ramp collapses
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / span).clamp(0, 1)  # 0: keep, 1: slow
        freqs = freqs * (1 - ramp) + freqs / cfg.rope_factor * ramp
    return freqs


def precompute_freqs_cis(cfg) -> torch.Tensor:
    """e^{i·p·θ_j} for every position p < max_seq_len: complex64 (max_seq_len, dr/2)."""
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, rope_frequencies(cfg))  # (S, dr/2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, T, H, dr) or (B, T, dr) by angle p·θ_i (freqs_cis (T, dr/2),
    or (B, T, dr/2) when each sequence sits at its own positions).

    Computed in fp32 (fp64 for fp64 input) with real arithmetic, returned in x's dtype."""
    want = (x.shape[1], x.shape[-1] // 2) if freqs_cis.dim() == 2 else (x.shape[0], x.shape[1], x.shape[-1] // 2)
    if x.dim() not in (3, 4) or freqs_cis.shape != want or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary_emb: x {tuple(x.shape)} (B, T, [H,] dr) does not match "
                         f"freqs_cis {tuple(freqs_cis.shape)} ([B,] T, dr/2)")
    pairs = x.unflatten(-1, (-1, 2))  # (B, T, [H,] dr/2, 2): (a, b) = (x[2i], x[2i+1])
    lead = (x.shape[0] if freqs_cis.dim() == 3 else 1, x.shape[1])  # broadcast over B unless per sequence
    shape = (*lead, 1, -1, 2) if x.dim() == 4 else (*lead, -1, 2)  # ([B|1], T, [1,] dr/2, 2): broadcast over H
    # (cos, sin) side by side: a view of the complex table. A bf16 x times it is computed in fp32 (type promotion).
    cos_sin = torch.view_as_real(freqs_cis).to(torch.promote_types(x.dtype, torch.float32)).view(shape)
    a_cos, b_sin = (pairs * cos_sin).unbind(-1)  # (B, T, [H,] dr/2) each
    b_cos, a_sin = (pairs.flip(-1) * cos_sin).unbind(-1)
    out = torch.stack([a_cos - b_sin, a_sin + b_cos], dim=-1)  # (B, T, [H,] dr/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, T, [H,] dr)


def softmax_scale(cfg) -> float:
    """1/sqrt(dn + dr), times m² with m = 0.1·mscale·ln(rope_factor) + 1 when YaRN is active.

    m is the factor YaRN puts on q and on k each (a lower softmax temperature for the longer context), hence
    squared in the score q·k."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn_active:
        m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
        scale *= m * m
    return scale


def causal_mask(T: int, S: int, start_pos: int, device=None) -> torch.Tensor:
    """Boolean (T, S), True where query t (at position start_pos + t) may attend to key position s."""
    q_pos = torch.arange(start_pos, start_pos + T, device=device)  # (T,)
    return torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # (T, S)


class CachePositions(NamedTuple):
    """Where a static-cache step writes and what its queries see: the same for every layer of the step, so the
    model computes it once per step (cache_positions) rather than each layer again."""
    at: torch.Tensor  # (B, T) absolute position of each new entry (row b's chunk starts at its own position)
    bias: torch.Tensor  # (B, 1, T, S) added to the scores: 0 where key s <= the query's position, −inf elsewhere
    #                     (None for the fused path, which masks by `at` itself)


def cache_positions(pos: torch.Tensor, T: int, S: int, dtype=torch.float32, bias: bool = True) -> CachePositions:
    """(B,) start positions of T-token chunks over a cache of S positions → CachePositions. dtype: the scores'
    softmax dtype (fp32, fp64 for fp64 models); bf16 scores plus an fp32 bias come out fp32, as the softmax wants.
    bias=False: no mask tensor (the fused path needs only the positions)."""
    at = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
    if not bias:
        return CachePositions(at, None)
    hidden = torch.arange(S, device=pos.device) > at[..., None]  # (B, T, S): keys after the query's position
    bias = torch.zeros(hidden.shape, dtype=dtype, device=pos.device).masked_fill_(hidden, float("-inf"))
    return CachePositions(at, bias[:, None])  # bias (B, 1, T, S): the same for every head


def kv_cache_bytes_per_token(cfg, bytes_per_value: int = 2) -> dict:
    """KV-cache bytes per token per layer: MLA (c^KV and k^R) and standard MHA with the same heads."""
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    mha = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + cfg.n_heads * cfg.v_head_dim
    return dict(mla=mla * bytes_per_value, mha=mha * bytes_per_value)


# ---------------------------------------------------------------------------------------------------------
# The attention layer
# ---------------------------------------------------------------------------------------------------------
class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE, a naive and an absorbed path, and a latent KV cache."""

    def __init__(self, cfg, linear=nn.Linear):
        super().__init__()
        self.dim, self.n_heads = cfg.dim, cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        H, dqk = self.n_heads, self.dn + self.dr
        if self.q_lora_rank == 0:
            self.wq = linear(self.dim, H * dqk, bias=False)  # [W^UQ ; W^QR] applied to h directly
        else:
            self.wq_a = linear(self.dim, self.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(self.q_lora_rank)
            self.wq_b = linear(self.q_lora_rank, H * dqk, bias=False)  # [W^UQ ; W^QR]
        self.wkv_a = linear(self.dim, self.kv_lora_rank + self.dr, bias=False)  # [W^DKV ; W^KR]
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = linear(self.kv_lora_rank, H * (self.dn + self.dv), bias=False)  # [W^UK ; W^UV] per head
        self.wo = linear(H * self.dv, self.dim, bias=False)  # W^O
        self.softmax_scale = softmax_scale(cfg)
        self.attn_impl = "naive"  # "naive" (reference), "absorb" (decode) or "fused" (absorb, one GPU kernel)
        self.register_buffer("kv_cache", None, persistent=False)  # (maxB, maxS, c): kv_norm(c^KV)
        self.register_buffer("pe_cache", None, persistent=False)  # (maxB, maxS, dr): roped k^R

    # -- cache ----------------------------------------------------------------------------------------------
    def setup_cache(self, max_batch: int, max_seq_len: int, device=None, dtype=None):
        """Allocate the latent cache (zeros) for max_batch sequences of up to max_seq_len tokens."""
        for name, v in (("max_batch", max_batch), ("max_seq_len", max_seq_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"MLA.setup_cache: {name} must be a positive integer, got {v!r}")
        device = device if device is not None else self.kv_norm.weight.device
        dtype = dtype if dtype is not None else self.kv_norm.weight.dtype
        self.kv_cache = torch.zeros(max_batch, max_seq_len, self.kv_lora_rank, device=device, dtype=dtype)
        self.pe_cache = torch.zeros(max_batch, max_seq_len, self.dr, device=device, dtype=dtype)

    def free_cache(self):
        self.kv_cache = None
        self.pe_cache = None

    def _check_cache_use(self, B, T, start_pos):
        if self.kv_cache is None:
            raise ValueError("MLA.forward with start_pos needs setup_cache(max_batch, max_seq_len) first")
        max_b, max_s, _ = self.kv_cache.shape
        if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
            raise ValueError(f"MLA.forward: start_pos must be an integer >= 0, got {start_pos!r}")
        if start_pos + T > max_s:
            raise ValueError(f"MLA.forward: start_pos + T = {start_pos + T} exceeds the cache length {max_s}")
        if B > max_b:
            raise ValueError(f"MLA.forward: batch {B} exceeds the cache batch size {max_b}")

    def _write_and_read_cache(self, latent, k_pe, start_pos):
        """Store positions [start_pos, start_pos+T) of rows [0, B); return the cached (B, start_pos+T, ·)."""
        B, T, _ = latent.shape
        end = start_pos + T
        # The cache is an inference structure: no gradient flows through it, and rewriting a position
        # overwrites it (speculative decoding rolls back by writing again).
        self.kv_cache[:B, start_pos:end] = latent.detach()
        self.pe_cache[:B, start_pos:end] = k_pe.detach()
        return self.kv_cache[:B, :end].to(latent.dtype), self.pe_cache[:B, :end].to(k_pe.dtype)  # (B, S, ·)

    def _write_cache_at(self, latent, k_pe, at):
        """Static-cache form: row b's T new entries go to positions at[b] (at (B, T), cache_positions, so
        sequences of a batch may sit at different positions); returns the whole cache of rows [0, B), (B, S, ·).
        The shapes never depend on the positions, and nothing is read back to the host: a CUDA graph can capture
        it. The caller checks that at[b] < S (no check here would run without a host sync)."""
        B, T, _ = latent.shape
        self.kv_cache[:B].scatter_(1, at[..., None].expand(B, T, self.kv_lora_rank), latent.detach())
        self.pe_cache[:B].scatter_(1, at[..., None].expand(B, T, self.dr), k_pe.detach())
        return self.kv_cache[:B].to(latent.dtype), self.pe_cache[:B].to(k_pe.dtype)

    # -- projections ----------------------------------------------------------------------------------------
    def _query(self, x):
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, H·(dn+dr))
        return q.view(B, T, self.n_heads, self.dn + self.dr)  # (B, T, H, dn+dr)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos=None) -> torch.Tensor:
        """x (B, T, dim), freqs_cis (T, dr/2) for positions [start_pos or 0, +T). Returns (B, T, dim).

        start_pos None: causal self-attention over x, no cache. start_pos int: write this chunk to the
        cache, then attend over positions [0, start_pos + T). start_pos a (B,) integer tensor: row b's chunk
        sits at positions start_pos[b].. (freqs_cis then (B, T, dr/2)); attend over the whole cache, masked
        (_write_cache_at: static shapes, no host sync). start_pos may also be the CachePositions of such a
        tensor, computed once for all layers (cache_positions)."""
        if self.attn_impl not in ("naive", "absorb", "fused"):
            raise ValueError(f"MLA.attn_impl must be 'naive', 'absorb' or 'fused', got {self.attn_impl!r}")
        B, T, _ = x.shape
        if freqs_cis.shape[-2] != T:
            raise ValueError(f"MLA.forward: freqs_cis has {freqs_cis.shape[-2]} positions for T={T} tokens")
        if torch.is_tensor(start_pos) and start_pos.shape == (B,) and self.kv_cache is not None:
            start_pos = cache_positions(start_pos, T, self.kv_cache.shape[1], at_least_fp32(x).dtype,
                                        bias=self.attn_impl != "fused")
        static = isinstance(start_pos, CachePositions)
        if torch.is_tensor(start_pos) or static and (self.kv_cache is None or B > self.kv_cache.shape[0]
                                                     or start_pos.at.shape != (B, T)):
            raise ValueError("MLA.forward: per-sequence positions need setup_cache(max_batch >= B) and a (B,) "
                             "tensor of start positions")
        if start_pos is not None and not static:
            self._check_cache_use(B, T, start_pos)
        q = self._query(x)  # (B, T, H, dn+dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)  # (B, T, H, dn), (B, T, H, dr)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)  # q^R, per head
        kv = self.wkv_a(x)  # (B, T, c+dr)
        latent, k_pe = kv.split([self.kv_lora_rank, self.dr], dim=-1)  # (B, T, c), (B, T, dr)
        k_pe = apply_rotary_emb(k_pe, freqs_cis)  # k^R: one per token, shared by the heads, not normalised
        latent = self.kv_norm(latent)  # the norm covers only the c^KV part
        start, bias = 0, None
        if static:
            latent, k_pe = self._write_cache_at(latent, k_pe, start_pos.at)  # (B, S, c), (B, S, dr)
            bias = start_pos.bias  # (B, 1, T, S)
        elif start_pos is not None:
            latent, k_pe = self._write_and_read_cache(latent, k_pe, start_pos)  # (B, S, c), (B, S, dr)
            start = start_pos
        if self.attn_impl == "fused":  # the mask as the queries' positions: (B, T)
            at = start_pos.at if static else (start + torch.arange(T, device=x.device)).expand(B, T)
            o = self._attend_fused(q_nope, q_pe, latent, k_pe, at, x.dtype)
        else:
            attend = self._attend_naive if self.attn_impl == "naive" else self._attend_absorb
            o = attend(q_nope, q_pe, latent, k_pe, start, x.dtype, bias)  # (B, T, H, dv)
        return self.wo(o.flatten(2))  # (B, T, H·dv) -> (B, T, dim)

    # -- the attention paths --------------------------------------------------------------------------------
    def _attend_naive(self, q_nope, q_pe, latent, k_pe, start, out_dtype, bias=None):
        """Reference: expand c^KV to per-head k^C, v^C and run standard attention with k = [k^C ; k^R]."""
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        kv = self.wkv_b(latent).view(B, S, H, self.dn + self.dv)  # (B, S, H, dn+dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, S, H, dn), (B, S, H, dv)
        k_rope = k_pe.to(k_nope.dtype)[:, :, None, :].expand(B, S, H, self.dr)  # (B, S, H, dr), shared
        k = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)  # (B, H, S, dn+dr)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn+dr)
        v = v.transpose(1, 2)  # (B, H, S, dv)
        if bias is not None:  # per-sequence positions: (B, 1, T, S) of 0 / −inf, the same for every head
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.softmax_scale)
        elif T == S:  # no cache or a prefill from position 0: the usual square causal mask
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # queries sit at positions start..start+T-1; is_causal would align them to 0 instead
            mask = causal_mask(T, S, start, device=q.device)  # (T, S)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        # SDPA accumulates the softmax in fp32 for low-precision inputs
        return o.transpose(1, 2).to(out_dtype)  # (B, T, H, dv)

    def _attend_absorb(self, q_nope, q_pe, latent, k_pe, start, out_dtype, bias=None):
        """Fast: fold W^UK into the query and W^UV into the output; attend over the latents directly.
        bias: None (positions start..start+T-1 over keys 0..S-1) or CachePositions.bias (B, 1, T, S)."""
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        w = self.wkv_b.weight.view(H, self.dn + self.dv, self.kv_lora_rank)  # (H, dn+dv, c)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]  # (H, dn, c), (H, dv, c)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, c): W^UK_i^T q^C_i
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, latent)  # (B, H, T, S): content part
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe.to(q_pe.dtype)))  # + rotary part, k^R shared
        scores = scores * self.softmax_scale
        if bias is not None:  # per-sequence positions: 0 / −inf, in the softmax's dtype (fp32 for bf16 scores)
            scores = scores + bias
        elif T > 1:  # a single query is the newest position and sees all S keys: nothing to mask
            scores = scores.masked_fill(~causal_mask(T, S, start, device=scores.device), float("-inf"))
        p = F.softmax(at_least_fp32(scores), dim=-1).to(out_dtype)  # softmax in (at least) fp32  # (B, H, T, S)
        o_lat = torch.einsum("bhts,bsc->bthc", p, latent.to(p.dtype))  # (B, T, H, c)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv.to(o_lat.dtype))  # (B, T, H, dv): W^UV_i o_lat

    def _attend_fused(self, q_nope, q_pe, latent, k_pe, at, out_dtype):
        """_attend_absorb with the attention over the latents (scores, mask, softmax, P·c^KV) as one GPU kernel
        (mla_decode.py; its reference elsewhere). at (B, T): the queries' positions, key s visible iff s <= at."""
        H = self.n_heads
        w = self.wkv_b.weight.view(H, self.dn + self.dv, self.kv_lora_rank)  # (H, dn+dv, c)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]  # (H, dn, c), (H, dv, c)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, c)
        o_lat = latent_attention(q_lat, q_pe, latent, k_pe, at, self.softmax_scale, out_dtype)  # (B, T, H, c)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv.to(o_lat.dtype))  # (B, T, H, dv)


# ---------------------------------------------------------------------------------------------------------
# Demo: `python mla.py` prints what MLA buys (cache size) and that the absorbed path equals the naive one
# ---------------------------------------------------------------------------------------------------------
def demo_cache_sizes(cfg, context: int = 128 * 1024, gqa_groups: int = 8) -> list:
    """Rows (name, values per token per layer, bf16 bytes, GiB for `context` tokens over all layers)."""
    sizes = kv_cache_bytes_per_token(cfg, bytes_per_value=2)
    gqa = gqa_groups * (cfg.qk_head_dim + cfg.v_head_dim)  # GQA: one key and value per group of heads
    rows = [(f"MHA, {cfg.n_heads} heads", sizes["mha"] // 2), (f"GQA, {gqa_groups} groups", gqa),
            ("MLA, c^KV + k^R", sizes["mla"] // 2)]
    return [(name, v, 2 * v, 2 * v * cfg.n_layers * context / 2**30) for name, v in rows]


def demo_agreement(seed: int = 0, T: int = 16) -> dict:
    """Max |naive − absorbed| of one small random MLA in fp64 and fp32, and of a token-by-token absorbed
    decode from the latent cache against the naive full pass (fp32)."""
    from config import ModelConfig
    cfg = ModelConfig(max_seq_len=64)  # the tiny preset's attention: dim 128, 4 heads, d_c 64, dr 16
    torch.manual_seed(seed)
    m = MLA(cfg)
    x = torch.randn(2, T, cfg.dim)
    fc = precompute_freqs_cis(cfg)[:T]
    out = {}
    with torch.no_grad():
        for name, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
            m.to(dtype)
            m.attn_impl = "naive"
            naive = m(x.to(dtype), fc)
            m.attn_impl = "absorb"
            out[name] = (m(x.to(dtype), fc) - naive).abs().max().item()
        out["scale"] = naive.abs().max().item()  # `naive` is now the fp32 full pass, the decode's reference
        m.setup_cache(2, T)
        steps = [m(x[:, t:t + 1], fc[t:t + 1], start_pos=t) for t in range(T)]  # absorb, one token at a time
        out["decode"] = (torch.cat(steps, dim=1) - naive).abs().max().item()
    return out


def _demo_main(argv=None):
    import argparse
    from config import get_preset
    argparse.ArgumentParser(description="MLA in numbers: the KV cache at DeepSeek-V3's size against MHA and GQA, "
                            "and the naive and absorbed paths agreeing.").parse_args(argv)
    cfg = get_preset("v3-671b")
    print(f"KV cache at DeepSeek-V3's size ({cfg.n_heads} heads, d_h {cfg.qk_nope_head_dim} + d^R_h "
          f"{cfg.qk_rope_head_dim}, d_v {cfg.v_head_dim}, d_c {cfg.kv_lora_rank}, {cfg.n_layers} layers), bf16:")
    rows = demo_cache_sizes(cfg)
    print(f"  {'attention':22s} {'values/token/layer':>18s} {'bytes':>7s} {'GiB for 128K tokens':>20s}")
    for name, values, nbytes, gib in rows:
        print(f"  {name:22s} {values:18,d} {nbytes:7,d} {gib:20,.1f}")
    mha, gqa, mla = (r[2] for r in rows)
    print(f"  MLA caches {mha / mla:.1f}x less than MHA and {gqa / mla:.1f}x less than 8-group GQA: "
          f"as little as GQA with {mla / (gqa / 8):.1f} groups")
    r = demo_agreement()
    print("\nnaive (expand c^KV to per-head K, V) vs absorbed (W^UK into q, W^UV into the output), small random")
    print(f"MLA (dim 128, 4 heads, T 16), outputs up to {r['scale']:.2f} in size:")
    print(f"  max |naive - absorbed|  fp64 {r['fp64']:.1e}   fp32 {r['fp32']:.1e}")
    print(f"  absorbed decode from the latent cache, one token at a time, vs naive full pass: {r['decode']:.1e}")


if __name__ == "__main__":
    run_demo(_demo_main)
