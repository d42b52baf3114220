"""FP8 for the routed experts (DeepSeek-V3 technical report §3.3): fp8.py's recipe on a MoE layer's experts.

The routed experts' GEMMs run in FP8 too, with the same 1×128 activation tiles and 128×128 weight blocks as
``fp8.FP8Linear``. The trouble is that an expert sees only its own tokens, a few hundred rows of varying
count. Launching one GEMM per expert wastes the GPU on small problems, so all experts go in one launch:

  * Layout: tokens come sorted by expert (``moe.Experts``); each expert's segment is padded with zero rows to
    whole 128-row tiles (``_tile_layout``), so that no 1×128 tile, and no tile of the GEMM, mixes two experts.
  * Fprop and Dgrad: one **M-grouped** GEMM (``fp8_gemm_grouped``, DeepGEMM's "contiguous" layout). Row tile t
    multiplies expert groups[t]'s weight out of the stacked (E, N, K) tensor.
  * Wgrad: one **K-grouped** GEMM (``fp8_gemm_kgrouped``). dW[e] = dY_segᵀ·X_seg contracts over the expert's own
    tokens, so both operands are quantized along the tokens (1×128 tiles on both, "1D1D") and each expert sums
    only its own K range. The output is FP32, as the report keeps Wgrad.
  * ``fp8_segment_mm`` wraps the three in an autograd function: the FP8 twin of ``moe.segment_mm``.
  * Low-precision storage with recomputation (§3.3.3): ``fp8_swiglu_down`` runs the experts' SwiGLU and their
    down projection W2 as one autograd step. It keeps only the SwiGLU's inputs for the backward pass, in 1×128
    E4M3 tiles with ``act_cache="fp8"`` (the report's choice), and recomputes the SwiGLU output (W2's input)
    there.

``FP8Experts`` gathers what the MoE layer takes (``moe.MoE(cfg, linear, experts=FP8Experts)``, handed down by
``model.Transformer`` where train.py builds the model with --fp8).

Each GEMM has its reference beside it (``fp8_gemm_grouped_ref``, ``fp8_gemm_kgrouped_ref``: fp8.fp8_gemm_ref per
expert), used on CPU and wherever the kernels are unavailable. The kernels are fp8_gemm.cu's kExperts and
kExpertsWgrad.
"""
import torch
import torch.nn.functional as F

from fp8 import (ACT_CACHES, BLOCK, FP8, check_gemm_operands, compute_dtype, dequantize_act, fp8_gemm_ref,
                 load_kernel, quantize_act, quantize_act_t, quantize_e5m6, quantize_weight, say_once, why_no_kernel)


# ---------------------------------------------------------------- grouped GEMM (routed experts)
def _check_grouped(a, a_scale, b, b_scale, groups):
    if not isinstance(b, torch.Tensor) or b.dtype != FP8 or b.dim() != 3:
        raise ValueError(f"fp8_gemm_grouped: b must be (E, N, K) float8_e4m3fn, got {getattr(b, 'dtype', None)} "
                         f"{tuple(getattr(b, 'shape', ()))}")
    E, N, K = b.shape
    if N % BLOCK:
        raise ValueError(f"fp8_gemm_grouped: N = {N} must be a multiple of {BLOCK} (weight blocks per expert)")
    if a.dim() != 2 or a.shape[0] % BLOCK:
        raise ValueError(f"fp8_gemm_grouped: a must be (M, K) with M a multiple of {BLOCK} (whole tiles per "
                         f"expert), got {tuple(a.shape)}")
    if tuple(b_scale.shape) != (E, N // BLOCK, K // BLOCK):
        raise ValueError(f"fp8_gemm_grouped: b_scale must be {(E, N // BLOCK, K // BLOCK)}, got {tuple(b_scale.shape)}")
    if groups.dtype != torch.int32 or tuple(groups.shape) != (a.shape[0] // BLOCK,):
        raise ValueError(f"fp8_gemm_grouped: groups must be int32 of shape (M/128,) = ({a.shape[0] // BLOCK},)")
    check_gemm_operands(a, a_scale, b[0], b_scale[0])                   # dtypes, K, a_scale, devices


def fp8_gemm_grouped_ref(a, a_scale, b, b_scale, groups, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Reference M-grouped GEMM: rows [128·t, 128·t + 128) of a use expert groups[t]'s weight b[e] (N, K) with
    its block scales b_scale[e]; out (M, N). Runs of tiles of one expert are one fp8_gemm_ref call."""
    _check_grouped(a, a_scale, b, b_scale, groups)
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    g = groups.tolist()
    start = 0
    for t in range(1, len(g) + 1):
        if t == len(g) or g[t] != g[start]:
            rows = slice(start * BLOCK, t * BLOCK)
            out[rows] = fp8_gemm_ref(a[rows], a_scale[rows], b[g[start]], b_scale[g[start]], out_dtype)
            start = t
    return out


def fp8_gemm_grouped(a, a_scale, b, b_scale, groups, out_dtype=torch.bfloat16) -> torch.Tensor:
    """M-grouped C = A·B[e]ᵀ for routed experts (DeepGEMM's "contiguous" layout): a (M, K) holds the tokens sorted
    by expert, each expert's segment padded to whole 128-row tiles, groups (M/128,) int32 the expert of each tile;
    b (E, N, K) and b_scale (E, N/128, K/128) the stacked experts. One kernel launch on Hopper."""
    _check_grouped(a, a_scale, b, b_scale, groups)
    ext = load_kernel() if a.is_cuda else None
    if ext is not None:
        E, N, K = b.shape
        out = torch.empty(a.shape[0], N, dtype=torch.bfloat16, device=a.device)
        with torch.cuda.device(a.device):
            ext.gemm_experts(a.contiguous(), a_scale.contiguous(), b.reshape(E * N, K).contiguous(),
                             b_scale.reshape(E * N // BLOCK, K // BLOCK).contiguous(), groups.contiguous(), out, E)
        return out.to(out_dtype)
    say_once(f"{why_no_kernel() or f'tensors on {a.device.type}'}; using the PyTorch reference grouped GEMM (slow)")
    return fp8_gemm_grouped_ref(a, a_scale, b, b_scale, groups, out_dtype)


def _check_kgrouped(a, a_scale, b, b_scale, sizes):
    if not check_gemm_operands(a, a_scale, b, b_scale):
        raise ValueError("fp8_gemm_kgrouped: b_scale must hold 1×128 tiles along K, (N, K/128)")
    if any(n % BLOCK for n in sizes) or sum(sizes) != a.shape[1]:
        raise ValueError(f"fp8_gemm_kgrouped: segment sizes must be multiples of {BLOCK} summing to K = {a.shape[1]}")


def fp8_gemm_kgrouped_ref(a, a_scale, b, b_scale, sizes, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Reference K-grouped GEMM (routed-expert Wgrad): out[e] = A[:, seg_e]·B[:, seg_e]ᵀ over the e-th segment
    of K (`sizes`, multiples of 128), both operands in 1×128 tiles along K → (E, M, N); empty segments give 0."""
    if a.shape[1] == 0:                                                # no tokens at all: zero gradients
        return torch.zeros(len(sizes), a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    _check_kgrouped(a, a_scale, b, b_scale, sizes)
    out = torch.zeros(len(sizes), a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            k, ks = slice(start, start + n), slice(start // BLOCK, (start + n) // BLOCK)
            out[e] = fp8_gemm_ref(a[:, k], a_scale[:, ks], b[:, k], b_scale[:, ks], out_dtype)
        start += n
    return out


def fp8_gemm_kgrouped(a, a_scale, b, b_scale, sizes, out_dtype=torch.bfloat16) -> torch.Tensor:
    """K-grouped GEMM (see the reference): one kernel launch on Hopper, with the segments read in place."""
    (M, K), N = a.shape, b.shape[0]
    ext = load_kernel() if a.is_cuda else None
    if not (ext is not None and M % BLOCK == 0 and N % 8 == 0 and M and K):
        if a.is_cuda and M and K:
            say_once(f"{why_no_kernel() or f'M = {M} (not a multiple of 128) or N = {N} (not of 8)'}; "
                    f"using the PyTorch reference K-grouped GEMM (slow)")
        return fp8_gemm_kgrouped_ref(a, a_scale, b, b_scale, sizes, out_dtype)
    _check_kgrouped(a, a_scale, b, b_scale, sizes)
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    kg = [(e, s // BLOCK, n // BLOCK) for e, (s, n) in enumerate(zip(starts, sizes)) if n]   # busy experts
    out = torch.zeros(len(sizes) * M, N, dtype=torch.float32, device=a.device)              # idle ones stay 0
    if kg:
        sbt = F.pad(b_scale.t(), (0, -N % BLOCK)).contiguous()                               # (K/128, N')
        with torch.cuda.device(a.device):
            ext.gemm_experts_wgrad(a.contiguous(), a_scale.contiguous(), b.contiguous(), sbt,
                                   torch.tensor(kg, dtype=torch.int32, device=a.device), out)
    return out.view(len(sizes), M, N).to(out_dtype)


# ---------------------------------------------------------------- FP8 routed experts
_LAYOUT = {}  # the last layout built: w1, w3 and w2 of one MoE forward (and their backward) share it


def _tile_layout(sizes: list, device):
    """Segments of `sizes` rows, each padded to whole 128-row tiles: (dst (M,) the padded row of each row,
    groups (M'/128,) int32 the expert of each tile, padded sizes as a list)."""
    key = (tuple(sizes), str(device))
    if key not in _LAYOUT:
        _LAYOUT.clear()
        _LAYOUT[key] = _build_tile_layout(sizes, device)
    return _LAYOUT[key]


def _build_tile_layout(sizes: list, device):
    padded = [-(-n // BLOCK) * BLOCK for n in sizes]
    shift = torch.tensor([sum(padded[:e]) - sum(sizes[:e]) for e in range(len(sizes))], device=device)
    counts = torch.tensor(sizes, device=device)
    dst = torch.arange(sum(sizes), device=device) + shift.repeat_interleave(counts)            # (M,)
    groups = torch.arange(len(sizes), device=device, dtype=torch.int32).repeat_interleave(
        torch.tensor([p // BLOCK for p in padded], device=device))                             # (M'/128,)
    return dst, groups, padded


def _padded(x, dst, padded):
    """Rows of x into the tile layout: (M', K) with zero rows between the segments."""
    xp = x.new_zeros(sum(padded), x.shape[1])
    xp[dst] = x
    return xp


def _experts_forward(x, w, sizes):
    """Fprop of Y_seg = X_seg·W[e]ᵀ: y (M, N), the padded input xp, and what the backward needs besides it."""
    out_dtype = compute_dtype(x)
    E, N, K = w.shape
    dst, groups, padded = _tile_layout(sizes, x.device)
    xp = _padded(x, dst, padded)                                       # (M', K)
    xq, xs = quantize_act(xp)
    wq, ws, wq_t = quantize_weight(w, transpose=True)                 # (E, N, K), (E, N/128, K/128), (E, K, N)
    y = fp8_gemm_grouped(xq, xs, wq, ws, groups, out_dtype)[dst]      # (M, N)
    return y, xp, (wq_t, ws, dst, groups), (padded, x.dtype, w.dtype)


def _experts_backward(dy, xp, saved, meta):
    """Dgrad and Wgrad of _experts_forward, given its padded input xp (kept, or recomputed)."""
    wq_t, ws, dst, groups = saved
    padded, x_dtype, w_dtype = meta
    dyp = _padded(dy, dst, padded)                                     # (M', N)
    # Dgrad: dX_seg = dY_seg·W[e], i.e. a grouped GEMM against the transposed experts (E, K, N).
    dyq, dys = quantize_act(dyp)
    dx = fp8_gemm_grouped(dyq, dys, wq_t, ws.transpose(1, 2).contiguous(), groups,
                          x_dtype)[dst]                                # (M, K)
    # Wgrad: dW[e] = dY_segᵀ·X_seg over the expert's own (padded) tokens, both quantized along tokens.
    dytq, dyts = quantize_act_t(dyp)                                   # (N, M'), (N, M'/128)
    xtq, xts = quantize_act_t(xp)                                      # (K, M'), (K, M'/128)
    dw = fp8_gemm_kgrouped(dytq, dyts, xtq, xts, padded, w_dtype)      # (E, N, K), one launch on Hopper
    return dx, dw


class _FP8ExpertsFn(torch.autograd.Function):
    """Y_seg = X_seg·W[e]ᵀ for every expert e at once, Fprop, Dgrad and Wgrad in FP8 (the routed experts of
    report §3.3). Rows arrive sorted by expert (`sizes` per expert); each segment is padded with zero rows to whole
    128-row tiles, so that one grouped GEMM serves all experts and no 1×128 tile mixes two experts' tokens."""

    @staticmethod
    def forward(ctx, x, w, sizes):
        y, xp, saved, meta = _experts_forward(x, w, sizes)
        ctx.save_for_backward(xp, *saved)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, *saved = ctx.saved_tensors
        dx, dw = _experts_backward(dy, xp, saved, ctx.meta)
        return dx, dw, None


class _FP8SwiGLUDownFn(torch.autograd.Function):
    """Y = (SiLU(A) ⊙ B)·W2[e]ᵀ per segment: the experts' SwiGLU fused with their down projection (report §3.3.3).

    A and B (the outputs of the gate and up projections) are kept for the backward pass, "cached" as
    `act_cache` says: as they are ("bf16"), in 1×128 E4M3 tiles ("fp8", the report's choice) or in E5M6 tiles
    ("e5m6"). The SwiGLU output H, the input of W2, is not kept: the backward recomputes it from A and B. With
    "bf16" every gradient is bit-identical to SiLU, ⊙ and fp8_segment_mm composed by autograd (a test), which keep
    SiLU(A), A, B and H padded."""

    @staticmethod
    def forward(ctx, a, b, w2, sizes, act_cache):
        h = F.silu(a) * b                                                  # (M, inter)
        y, _, saved, meta = _experts_forward(h, w2, sizes)
        if act_cache == "bf16":
            kept = (a, b)
        else:
            quant = quantize_act if act_cache == "fp8" else quantize_e5m6
            kept = quant(a) + quant(b)                                     # (q, scale) of A, then of B
        ctx.save_for_backward(*kept, *saved)
        ctx.meta = (meta, act_cache, a.dtype, len(kept))
        return y

    @staticmethod
    def backward(ctx, dy):
        meta, act_cache, ab_dtype, n_kept = ctx.meta
        kept, saved = ctx.saved_tensors[:n_kept], ctx.saved_tensors[n_kept:]
        if act_cache == "bf16":
            a, b = kept
        else:
            a, b = dequantize_act(*kept[:2]).to(ab_dtype), dequantize_act(*kept[2:]).to(ab_dtype)
        s = F.silu(a)                                                      # recomputed: SiLU(A) and H
        h = s * b
        dst, padded = saved[2], meta[0]                                 # the rows' places in the tile layout
        dh, dw2 = _experts_backward(dy, _padded(h, dst, padded), saved, meta)
        da = torch.ops.aten.silu_backward(dh * b, a)                      # the ops autograd would run
        db = dh * s
        return da, db, dw2, None, None


def fp8_swiglu_down(a: torch.Tensor, b: torch.Tensor, w2: torch.Tensor, sizes: list,
                    act_cache: str = "bf16") -> torch.Tensor:
    """(SiLU(a) ⊙ b)·w2[e]ᵀ per segment of rows, in FP8, for a, b (M, inter) and w2 (E, dim, inter) → (M, dim),
    keeping a and b for the backward pass as `act_cache` says (see _FP8SwiGLUDownFn)."""
    if act_cache not in ACT_CACHES:
        raise ValueError(f"fp8_swiglu_down: act_cache={act_cache!r}, expected one of {ACT_CACHES}")
    if a.shape != b.shape or w2.dim() != 3 or len(sizes) != w2.shape[0] or a.shape != (sum(sizes), w2.shape[2]):
        raise ValueError(f"fp8_swiglu_down: a {tuple(a.shape)}, b {tuple(b.shape)}, w2 {tuple(w2.shape)} and "
                         f"{len(sizes)} segment sizes do not fit together")
    return _FP8SwiGLUDownFn.apply(a, b, w2, list(sizes), act_cache)


def fp8_segment_mm(x: torch.Tensor, w: torch.Tensor, sizes: list) -> torch.Tensor:
    """Rows of x (M, in) sorted into len(sizes) segments, times w (E, out, in)ᵀ per segment, in FP8 → (M, out).
    The FP8 twin of moe.segment_mm; in and out must be multiples of 128."""
    if w.dim() != 3 or len(sizes) != w.shape[0] or x.shape != (sum(sizes), w.shape[2]):
        raise ValueError(f"fp8_segment_mm: x {tuple(x.shape)}, w {tuple(w.shape)} and {len(sizes)} segment sizes "
                         f"do not fit together")
    return _FP8ExpertsFn.apply(x, w, list(sizes))


class FP8Experts:
    """The routed experts' FP8 kernels, handed to the model where it is built:
    ``Transformer(cfg, linear=fp8.FP8Linear, experts=FP8Experts)`` passes this class to every ``moe.MoE``, whose
    ``Experts`` run their gate/up and down projections with ``mm`` (the FP8 twin of ``moe.segment_mm``) and the
    SwiGLU with the down projection with ``swiglu_down``."""

    mm = staticmethod(fp8_segment_mm)
    swiglu_down = staticmethod(fp8_swiglu_down)

    @staticmethod
    def check_dims(dim: int, inter_dim: int):
        """The experts' weights are quantized in whole 128×128 blocks: both dims must be multiples of 128."""
        if dim % BLOCK or inter_dim % BLOCK:
            raise ValueError(f"FP8 routed experts need dim ({dim}) and moe_inter_dim ({inter_dim}) to be multiples "
                             f"of {BLOCK}; choose such dims for FP8 runs")
