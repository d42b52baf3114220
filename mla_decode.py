"""Absorbed MLA attention over the latent cache as one fused GPU pass (the decode kernel of mla.py's absorb path).

After absorption (mla.py's header) every head attends over the SAME cached sequence: for query row i (a head of a
new token) and cached position s,

    score_i,s = scale · (q^lat_i · c^KV_s + q^R_i · k^R_s),    q^lat_i = W^UK_i^T q^C_i  (width d_c)
    o^lat_i   = Σ_s softmax_s(score_i,s) c^KV_s                 (width d_c; W^UV_i is applied afterwards)

This is multi-query attention with keys [c^KV ; k^R] (d_c + d^R_h values) and values c^KV (the first d_c of them).
A decode step does 2·H·(2·d_c + d^R_h) flops per cached position of d_c + d^R_h values: with few heads (`small`'s
16: ≈ 30 flops per byte) it is bound by reading the cache; with V3's 128 heads (≈ 240 per byte) the tensor cores
must run near their peak to keep up with it. The goal: read each cached position once per block of query rows (V3's
128 heads take two blocks, the second reading mostly from L2), at HBM speed, and keep the (H, S) scores on chip.
mla.MLA._attend_absorb computes the same thing with separate PyTorch ops (scores, scale, mask, softmax, casts,
P·c^KV), writing the scores to memory between them; `latent_attention_ref` below is that computation in one
function, the reference of the kernel; `latent_attention_split` is the kernel's algorithm in PyTorch loops.

The kernel is flash decoding: the cached positions of a sequence are cut into `splits` ranges so that enough
thread blocks run at once even for one sequence; a block holds BLOCK_M query rows (rows r = t·H + h: all heads of
the T new tokens) and walks its range BLOCK_S positions at a time with an online softmax (running maximum m, running
sum l, rescaled accumulator). A second small kernel merges the ranges of each row j = 1..splits:

    M = max_j m_j,    o = Σ_j e^(m_j − M) acc_j / Σ_j e^(m_j − M) l_j      (the kernels keep m in log2 units: 2^)

Masking by position: query row r of sequence b sits at position at[b, t] and sees keys s <= at[b, t] (causal
within a chunk of T tokens, and the static cache's unused tail is never read: a block stops at max(at) + 1).
The softmax runs in fp32 with exp2 (the scale folded with log2 e); P is cast to the cache's dtype for P·c^KV as
the PyTorch path does. fp32 inputs use IEEE fp32 products (no TF32), so fp32 models get fp32-exact attention.
The ranges are cut from the cache's length S (StaticDecoder: max_seq_len), not from the newest position, which a
CUDA graph cannot read back: ranges past it end at once, so a short context in a long cache has fewer busy blocks.

V3's 64-row blocks run on two warpgroups (8 warps) and Hopper's wgmma gives each warpgroup 64 rows. For a matmul
whose result feeds another matmul (the flash-attention pattern) Triton puts all warps along the rows, so with 64
rows each warpgroup would compute every score of the tile, the same ones, twice the products. With more warps than
the rows fill (SPLIT), the kernel masks the scores inside a branch that is always taken (`if s0 < hi`): the
compiler does not follow the scores through it to P·c^KV, lays them out as for a lone matmul (each warpgroup takes
half of the tile's positions), and P crosses to the other warpgroup through shared memory (BLOCK_M·BLOCK_S values,
counted by `_shared_bytes`). The two score products are scaled before they are added, so that neither is folded
into the other as its accumulator (one matmul feeding another again).

On a machine without CUDA or Triton, `latent_attention` runs the reference (same results up to rounding).
tests/test_mla_decode.py checks kernel against reference (on the GPU, and through Triton's CPU interpreter where
Triton is installed); decode_bench.py measures the bytes per second it reads.
"""
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference runs instead
    triton = None

from layers import run_demo


def latent_attention_ref(q_lat, q_pe, latent, k_pe, at, scale: float, out_dtype=None):
    """q_lat (B, T, H, d_c), q_pe (B, T, H, dr), latent (B, S, d_c), k_pe (B, S, dr), at (B, T) positions of the
    queries (key s visible iff s <= at[b, t]) → o^lat (B, T, H, d_c) in out_dtype (default q_lat's).
    Scores and softmax in at least fp32; P cast to the cache's dtype for P·c^KV, as MLA._attend_absorb does."""
    acc = torch.promote_types(q_lat.dtype, torch.float32)
    scores = (torch.einsum("bthc,bsc->bths", q_lat.to(acc), latent.to(acc))  # (B, T, H, S)
              + torch.einsum("bthr,bsr->bths", q_pe.to(acc), k_pe.to(acc))) * scale
    S = latent.shape[1]
    visible = torch.arange(S, device=at.device) <= at[..., None]  # (B, T, S)
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(latent.dtype)  # (B, T, H, S)
    o = torch.einsum("bths,bsc->bthc", p.to(acc), latent.to(acc))  # (B, T, H, d_c)
    return o.to(out_dtype or q_lat.dtype)


def latent_attention_split(q_lat, q_pe, latent, k_pe, at, scale: float, splits: int = 4, block: int = 16):
    """The kernel's algorithm step by step in PyTorch, for reading and for CPU tests (same arguments and result as
    latent_attention_ref, computed in at least fp32, P not rounded): the cached positions in `splits` ranges of whole
    tiles of `block` positions; per range an online softmax over its tiles (running max m, running sum l, the
    accumulator rescaled by e^(m_old − m_new)); then the merge of the ranges. The kernel does the same per block of
    query rows, in log2 units, and also stops each range at the newest visible position."""
    B, T, H, C = q_lat.shape
    S = latent.shape[1]
    acc_t = torch.promote_types(q_lat.dtype, torch.float32)
    q = q_lat.reshape(B, T * H, C).to(acc_t)  # (B, R, d_c), rows r = t·H + h
    qr = q_pe.reshape(B, T * H, -1).to(acc_t)  # (B, R, dr)
    kv, pe = latent.to(acc_t), k_pe.to(acc_t)
    pos = at.repeat_interleave(H, dim=1)  # (B, R): the position of each row's token
    split_len = _cdiv(_cdiv(S, splits), block) * block
    neg_inf = torch.tensor(float("-inf"), dtype=acc_t)
    ranges = []
    for lo in range(0, S, split_len):  # one range: what one thread block of the kernel computes
        m = torch.full((B, T * H), float("-inf"), dtype=acc_t)  # running max of the scores
        l = torch.zeros(B, T * H, dtype=acc_t)  # running sum of e^(score − m)
        acc = torch.zeros(B, T * H, C, dtype=acc_t)  # running Σ e^(score − m) c^KV_s
        for s0 in range(lo, min(lo + split_len, S), block):
            s = torch.arange(s0, min(s0 + block, S))  # one tile of positions
            score = (q @ kv[:, s].mT + qr @ pe[:, s].mT) * scale  # (B, R, tile)
            score = torch.where(s <= pos[..., None], score, neg_inf)  # keys after the row's position: hidden
            m_new = torch.maximum(m, score.amax(-1))
            m_use = torch.where(m_new == neg_inf, 0.0, m_new)  # nothing visible yet: e^(−inf − 0) = 0, no NaN
            alpha = torch.exp(m - m_use)  # rescales what was summed under the old max
            p = torch.exp(score - m_use[..., None])  # (B, R, tile)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ kv[:, s]  # (B, R, d_c)
            m = m_new
        ranges.append((m, l, acc))
    top = torch.stack([m for m, _, _ in ranges]).amax(0)  # (B, R): M = max_j m_j
    top = torch.where(top == neg_inf, 0.0, top)
    num = sum(torch.exp(m - top)[..., None] * acc for m, _, acc in ranges)
    den = sum(torch.exp(m - top) * l for m, l, _ in ranges)
    return (num / den[..., None]).reshape(B, T, H, C).to(q_lat.dtype)


def kernel_available(device) -> bool:
    """True where latent_attention runs the Triton kernel: a CUDA device and Triton importable."""
    device = torch.device(device)
    if triton is None or device.type != "cuda":
        return False
    _limits(device)  # read here, outside any step that torch.compile traces
    return True


def latent_attention(q_lat, q_pe, latent, k_pe, at, scale: float, out_dtype=None, config=None):
    """The fused path of latent_attention_ref (same arguments and result). Inference only (no autograd).
    config: (BLOCK_M, BLOCK_S, num_warps, num_stages, splits) to override the heuristic (benchmark sweeps)."""
    out_dtype = out_dtype or q_lat.dtype
    if not kernel_available(q_lat.device) or q_lat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return latent_attention_ref(q_lat, q_pe, latent, k_pe, at, scale, out_dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_lat, q_pe, latent, k_pe)):
        raise ValueError("mla_decode.latent_attention is inference only (no backward); use MLA.attn_impl 'absorb'")
    if config is None:
        B, T, H, C = q_lat.shape
        config = _heuristic(T * H, C, k_pe.shape[-1], B, latent.shape[1], q_lat.device, q_lat.dtype)
    return _launch(q_lat, q_pe, latent, k_pe, at, scale, out_dtype, config)


def _launch(q_lat, q_pe, latent, k_pe, at, scale, out_dtype, config):
    B, T, H, C = q_lat.shape
    S, DR = latent.shape[1], k_pe.shape[-1]
    # every tensor's last dim contiguous; the kernel takes the other strides as they are
    q_lat, q_pe, latent, k_pe = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_lat, q_pe, latent, k_pe))
    latent, k_pe = latent.to(q_lat.dtype), k_pe.to(q_lat.dtype)
    q_pe = q_pe.to(q_lat.dtype)
    at = at.to(torch.int32).contiguous()
    rows = T * H
    block_m, block_s, warps, stages, splits = config
    split_len = _cdiv(_cdiv(S, splits), block_s) * block_s  # positions per range, whole blocks
    splits = _cdiv(S, split_len)
    acc = torch.empty(B, splits, rows, C, device=q_lat.device, dtype=torch.float32)  # (B, splits, T·H, d_c)
    m = torch.empty(B, splits, rows, device=q_lat.device, dtype=torch.float32)  # running max (log2 units)
    l = torch.empty_like(m)  # running sum
    grid = (_cdiv(rows, block_m), splits, B)
    _split_kernel[grid](
        q_lat, q_pe, latent, k_pe, at, acc, m, l, H, T, S, split_len, scale * math.log2(math.e),
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        latent.stride(0), latent.stride(1), k_pe.stride(0), k_pe.stride(1),
        C=C, DR=DR, CP=_padded(C), DRP=_padded(DR), BLOCK_M=block_m, BLOCK_S=block_s,
        PREC="ieee" if q_lat.dtype == torch.float32 else "tf32", SPLIT=block_m >= 64 and 16 * warps > block_m,
        num_warps=warps, num_stages=stages)
    out = torch.empty(B, T, H, C, device=q_lat.device, dtype=out_dtype)  # rows r = t·H + h: (B, T·H, d_c)
    _combine_kernel[(_cdiv(rows, 16), B)](acc, m, l, out, rows, splits, C=C, CP=_padded(C), BLOCK_M=16, num_warps=4)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded(n: int) -> int:
    """Tile width for n values: a power of two (tl.arange) and at least 16 (the smallest tl.dot); masked beyond n."""
    return max(16, 1 << (n - 1).bit_length())


_LIMITS = {}  # device index → (number of SMs, shared memory a block may have)


def _limits(device) -> tuple:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _LIMITS:
        p = torch.cuda.get_device_properties(i)
        _LIMITS[i] = p.multi_processor_count, getattr(p, "shared_memory_per_block_optin", 232448)  # H100/H200's
    return _LIMITS[i]


def _shared_bytes(block_m, block_s, stages, C, DR, elt):
    """An upper estimate of a configuration's shared memory (bytes): `stages` cache tiles in flight, the queries and,
    with two warpgroups (64 rows or more), P on its way between them. Triton 3.6 allotted exactly the tiles and
    queries to the configuration it refused (a 64-token prefill: 252 KiB) and all three to V3's (224 KiB); it allots
    less to others, and other Triton versions differ."""
    exchange = block_m * block_s if block_m >= 64 else 0
    return ((stages * block_s + block_m) * (_padded(C) + _padded(DR)) + exchange) * elt


def _heuristic(rows, C, DR, B, S, device, dtype):
    """(BLOCK_M, BLOCK_S, num_warps, num_stages, splits), fitted to a sweep on an H200 (BENCHMARKS.md). Up to 64
    query rows per block (V3's 128 heads: two blocks per token, sharing each cache tile through L2). d_c 256 in
    bf16 (`small`, one token): 128-position tiles, 3 stages, at most one block per SM. d_c 512 (V3): 64-position
    tiles, 8 warps, 2 stages, about two waves of blocks (more blocks hide the longer arithmetic of 128 heads).
    Stages, then tile sizes, shrink until the shared memory fits (a prefill's many rows, fp32)."""
    elt = dtype.itemsize
    block_m = min(64, _padded(rows))
    wide = C * elt > 512
    block_s, warps, stages = (64, 8, 2) if wide else (128, 4, 3)
    while _shared_bytes(block_m, block_s, stages, C, DR, elt) > _limits(device)[1]:
        if stages > 2:
            stages -= 1
        elif block_s > 32:
            block_s //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            break
    warps = 8 if block_m * C >= 64 * 512 else warps
    per_split = B * _cdiv(rows, block_m)
    sms = _limits(device)[0]
    blocks = _cdiv(2 * sms, per_split) if wide else sms // per_split  # about two waves / at most one wave
    splits = max(1, min(blocks, _cdiv(S, 2 * block_s)))
    return block_m, block_s, warps, stages, splits


if triton is not None:
    @triton.jit
    def _split_kernel(Q, QPE, KV, PE, AT, ACC, Mx, L, H, T, S, split_len, scale_log2,
                      s_qb, s_qt, s_qh, s_pb, s_pt, s_ph, s_kb, s_ks, s_eb, s_es,
                      C: tl.constexpr, DR: tl.constexpr, CP: tl.constexpr, DRP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
        """One block: BLOCK_M query rows of sequence b over positions [split·split_len, +split_len) ∩ visible."""
        mb, sp, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: b·stride, big caches
        n_rows, splits = T * H, tl.num_programs(1)
        r = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows r = t·H + h
        live = r < n_rows
        t, h = r // H, r % H
        pos = tl.load(AT + b * T + t, mask=live, other=-1)  # (BLOCK_M,) each row sees keys s <= pos
        lo = sp * split_len
        hi = tl.minimum(tl.minimum(lo + split_len, S), tl.max(pos, axis=0) + 1)  # not past the newest key
        c, e = tl.arange(0, CP), tl.arange(0, DRP)
        q = tl.load(Q + b * s_qb + t[:, None] * s_qt + h[:, None] * s_qh + c[None, :],
                    mask=live[:, None] & (c[None, :] < C), other=0.0)  # (BLOCK_M, d_c)
        qr = tl.load(QPE + b * s_pb + t[:, None] * s_pt + h[:, None] * s_ph + e[None, :],
                     mask=live[:, None] & (e[None, :] < DR), other=0.0)  # (BLOCK_M, dr)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, CP], tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            inside = s < hi
            kv = tl.load(KV + b * s_kb + s[:, None] * s_ks + c[None, :],
                         mask=inside[:, None] & (c[None, :] < C), other=0.0)  # (BLOCK_S, d_c)
            pe = tl.load(PE + b * s_eb + s[:, None] * s_es + e[None, :],
                         mask=inside[:, None] & (e[None, :] < DR), other=0.0)  # (BLOCK_S, dr)
            qk_c = tl.dot(q, tl.trans(kv), input_precision=PREC)  # (BLOCK_M, BLOCK_S) fp32: q^lat · c^KV
            qk_r = tl.dot(qr, tl.trans(pe), input_precision=PREC)  # q^R · k^R
            seen = inside[None, :] & (s[None, :] <= pos[:, None])
            if SPLIT:  # two warpgroups share 64 rows: the scores are split between them (header)
                qk = (qk_c * scale_log2 + qk_r * scale_log2).to(tl.float32)  # fp32 (inductor passes fp64)
                if s0 < hi:  # always true: the branch hides the P·c^KV product from the scores' layout
                    qk = tl.where(seen, qk, float("-inf"))
            else:
                qk = tl.where(seen, ((qk_c + qk_r) * scale_log2).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(qk - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PREC)
            m_i = m_new
        o = (b * splits + sp) * n_rows + r  # (BLOCK_M,) this block's rows in (B, splits, T·H)
        tl.store(ACC + o[:, None] * C + c[None, :], acc, mask=live[:, None] & (c[None, :] < C))
        tl.store(Mx + o, m_i, mask=live)
        tl.store(L + o, l_i, mask=live)

    @triton.jit
    def _combine_kernel(ACC, Mx, L, OUT, n_rows, splits, C: tl.constexpr, CP: tl.constexpr, BLOCK_M: tl.constexpr):
        """o = Σ_j 2^(m_j − M) acc_j / Σ_j 2^(m_j − M) l_j over the ranges j of each row (a range with no visible
        key has m_j = −inf, l_j = 0, acc_j = 0 and weighs 0)."""
        mb, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        live = r < n_rows
        c = tl.arange(0, CP)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for j in range(0, splits):
            top = tl.maximum(top, tl.load(Mx + (b * splits + j) * n_rows + r, mask=live, other=float("-inf")))
        top = tl.where(top == float("-inf"), 0.0, top)
        num = tl.zeros([BLOCK_M, CP], tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        for j in range(0, splits):
            o = (b * splits + j) * n_rows + r
            w = tl.exp2(tl.load(Mx + o, mask=live, other=float("-inf")) - top)
            num += w[:, None] * tl.load(ACC + o[:, None] * C + c[None, :], mask=live[:, None] & (c[None, :] < C),
                                        other=0.0)
            den += w * tl.load(L + o, mask=live, other=0.0)
        out = num / den[:, None]
        tl.store(OUT + (b * n_rows + r)[:, None] * C + c[None, :], out.to(OUT.dtype.element_ty),
                 mask=live[:, None] & (c[None, :] < C))


# ---------------------------------------------------------------------------------------------------------
# Demo: `python mla_decode.py` prints that the split algorithm is the softmax, and what one cached position costs
# ---------------------------------------------------------------------------------------------------------
def demo_agreement(seed: int = 0) -> list:
    """(splits, block, max |latent_attention_split − latent_attention_ref|) in float64, two tokens per row."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, C, DR, S = 2, 2, 4, 32, 8, 100
    q, qr = (torch.randn(B, T, H, n, generator=g, dtype=torch.float64) for n in (C, DR))
    lat, pe = (torch.randn(B, S, n, generator=g, dtype=torch.float64) for n in (C, DR))
    at = torch.tensor([[40, 41], [98, 99]])  # row 0 sees 41 of the 100 cached positions, row 1 all of them
    ref = latent_attention_ref(q, qr, lat, pe, at, 0.2)
    return [(sp, bl, (latent_attention_split(q, qr, lat, pe, at, 0.2, sp, bl) - ref).abs().max().item())
            for sp, bl in ((1, 16), (3, 16), (7, 8), (4, 32))]


def demo_costs(cfg) -> dict:
    """Per cached position and layer, one new token: bytes of cache (bf16), bytes of one pass over fp32 scores,
    flops of the attention (scores over d_c + d^R_h, then P·c^KV over d_c), and flops per cache byte."""
    H, C, DR = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache, flops = (C + DR) * 2, 2 * H * (C + DR) + 2 * H * C
    return dict(heads=H, d_c=C, cache=cache, scores=H * 4, flops=flops, intensity=flops / cache)


def _demo_main(argv=None):
    import argparse
    from config import get_preset
    argparse.ArgumentParser(description="Flash decoding over the latent cache in numbers: the ranges and their "
                            "merge give the softmax, and what one cached position costs.").parse_args(argv)
    print("ranges of tiles with an online softmax, then a merge = one softmax over the whole cache")
    print("(latent_attention_split vs latent_attention_ref in float64; 2 rows, 2 tokens, 4 heads, 100 cached):")
    for splits, block, err in demo_agreement():
        print(f"  {splits} range{'s' if splits > 1 else ''} of {block}-position tiles: max |difference| {err:.1e}")
    print("\none cached position, one new token, one layer:")
    rows = [(name, demo_costs(get_preset(p))) for name, p in (("small", "small"), ("V3", "v3-671b"))]
    heads = [f"{name} ({c['heads']} heads)" for name, c in rows]
    print(f"  {'':38s}" + "".join(f"{h:>20s}" for h in heads))
    for label, key, fmt in (("latent cache read, bf16 (bytes)", "cache", "{:,}"),
                            ("one pass over fp32 scores (bytes)", "scores", "{:,}"),
                            ("flops: scores and P·c^KV", "flops", "{:,}"),
                            ("flops per byte of cache", "intensity", "{:.0f}")):
        print(f"  {label:38s}" + "".join(f"{fmt.format(c[key]):>20s}" for _, c in rows))
    for name, c in rows:
        need = c["intensity"] * 4.8e12 / 1e12
        print(f"  {name}: the cache at 4.8 TB/s (an H200's HBM) takes {need:,.0f} TFLOP/s "
              f"({100 * need / 989:.0f}% of its 989 bf16 peak)")
    print("The PyTorch ops write and read the scores several times a step; the kernel keeps them on chip.")


if __name__ == "__main__":
    run_demo(_demo_main)
