"""FP8 for the routed experts (DeepSeek-V3 technical report §3.3): fp8.py's recipe on a MoE layer's experts.

The routed experts' GEMMs run in FP8 too, with the same 1×128 activation tiles and 128×128 weight blocks as
``fp8_linear.FP8Linear``. The trouble is that an expert sees only its own tokens, a few hundred rows of varying
count. Launching one GEMM per expert wastes the GPU on small problems, so all experts go in one launch:

  * Layout: tokens come sorted by expert (``moe.Experts``); each expert's segment is padded with zero rows to
    whole 128-row tiles (``tile_layout``), so that no 1×128 tile, and no tile of the GEMM, mixes two experts.
    The plan lives on the device: it is computed there from the (E,) token counts, never read back, because a
    host read waits for the GPU to drain its queue and stalls the launches behind it. So the padded buffer has
    a static size (a bound on the tiles needed), and the tiles past the last expert's are marked -1.
  * Fprop and Dgrad: one **M-grouped** GEMM (``fp8_gemm_grouped``, DeepGEMM's "contiguous" layout). Row tile t
    multiplies expert groups[t]'s weight out of the stacked (E, N, K) tensor; tiles of group -1 are skipped.
  * Wgrad: one **K-grouped** GEMM (``fp8_gemm_kgrouped``). dW[e] = dY_segᵀ·X_seg contracts over the expert's own
    tokens, so both operands are quantized along the tokens (1×128 tiles on both, "1D1D") and each expert sums
    only its own K range (``k_groups``; an idle expert's range is empty, its dW is 0). The output is FP32, as
    the report keeps Wgrad; ``fp8_gemm_kgrouped_into`` adds it to the weights' gradient in place instead.
  * ``fp8_segment_mm`` wraps the three in an autograd function: the FP8 twin of ``moe.segment_mm``.
  * Low-precision storage with recomputation (§3.3.3): ``fp8_swiglu_down`` runs the experts' SwiGLU and their
    down projection W2 as one autograd step. It keeps only the SwiGLU's inputs for the backward pass, in 1×128
    E4M3 tiles with ``act_cache="fp8"`` (the report's choice), and recomputes the SwiGLU output (W2's input)
    there.
  * ``fp8_expert_ffn``, what training runs: the whole expert FFN (W1, W3, SwiGLU, W2) as one autograd step
    that stays in the tile layout from x to y, so x is padded and quantized once for W1 and W3, and no tensor
    between two GEMMs is gathered back and padded again. Its reference is the composition of the two above.

``FP8Experts`` gathers what the MoE layer takes (``moe.MoE(cfg, linear, experts=FP8Experts)``, handed down by
``model.Transformer`` where train.py builds the model with --fp8).

Each GEMM has its reference beside it (``fp8_gemm_grouped_ref``, ``fp8_gemm_kgrouped_ref``: fp8.fp8_gemm_ref per
expert), used on CPU and wherever the kernels are unavailable. The kernels are fp8_gemm.cu's kExperts and
kExpertsWgrad.
"""
import torch
import torch.nn.functional as F

from fp8 import (BLOCK, FP8, check_gemm_operands, dequantize_act, fp8_gemm_ref, fp8_operator, load_kernel, quantize_act,
                 quantize_act_both, quantize_act_t, quantize_e5m6, quantize_weight, say_once, why_no_kernel)
from fp8_linear import ACT_CACHES, compute_dtype, copies_for


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
    its block scales b_scale[e]; out (M, N). Tiles of group -1 (the unused tail of the tile layout) give zero rows.
    Runs of tiles of one expert are one fp8_gemm_ref call."""
    _check_grouped(a, a_scale, b, b_scale, groups)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    g = groups.tolist()
    start = 0
    for t in range(1, len(g) + 1):
        if t == len(g) or g[t] != g[start]:
            rows = slice(start * BLOCK, t * BLOCK)
            if g[start] >= 0:
                out[rows] = fp8_gemm_ref(a[rows], a_scale[rows], b[g[start]], b_scale[g[start]], out_dtype)
            start = t
    return out


def fp8_gemm_grouped(a, a_scale, b, b_scale, groups, out_dtype=torch.bfloat16) -> torch.Tensor:
    """M-grouped C = A·B[e]ᵀ for routed experts (DeepGEMM's "contiguous" layout): a (M, K) holds the tokens sorted
    by expert, each expert's segment padded to whole 128-row tiles, groups (M/128,) int32 the expert of each tile
    (-1: a tile of no expert, skipped; its output rows are not written, the reference makes them 0);
    b (E, N, K) and b_scale (E, N/128, K/128) the stacked experts. One kernel launch on Hopper (the operator
    v3fp8::gemm_grouped)."""
    _check_grouped(a, a_scale, b, b_scale, groups)
    return _gemm_grouped(a, a_scale, b, b_scale, groups, out_dtype)


# The grouped kernels as torch.library operators, like fp8.py's (see there): the kernel where it runs, the
# reference elsewhere; validation stays in the Python functions.
@fp8_operator("gemm_grouped")
def _gemm_grouped(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  groups: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm_grouped on validated operands."""
    ext = load_kernel() if a.is_cuda else None
    if ext is None:
        say_once(f"{why_no_kernel() or f'tensors on {a.device.type}'}; using the PyTorch reference grouped GEMM (slow)")
        return fp8_gemm_grouped_ref(a, a_scale, b, b_scale, groups, out_dtype)
    E, N, K = b.shape
    out = torch.empty(a.shape[0], N, dtype=torch.bfloat16, device=a.device)
    ext.gemm_experts(a.contiguous(), a_scale.contiguous(), b.reshape(E * N, K).contiguous(),
                     b_scale.reshape(E * N // BLOCK, K // BLOCK).contiguous(), groups.contiguous(), out, E)
    return out.to(out_dtype)


@_gemm_grouped.register_fake
def _(a, a_scale, b, b_scale, groups, out_dtype):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


def _check_kgrouped(a, a_scale, b, b_scale, sizes):
    if not check_gemm_operands(a, a_scale, b, b_scale):
        raise ValueError("fp8_gemm_kgrouped: b_scale must hold 1×128 tiles along K, (N, K/128)")
    if torch.is_tensor(sizes) and (sizes.is_cuda or torch.compiler.is_compiling()):
        return                             # not read: the host would wait for the GPU / not known while tracing
    sizes = sizes.tolist() if torch.is_tensor(sizes) else sizes
    if any(n % BLOCK for n in sizes) or sum(sizes) > a.shape[1]:
        raise ValueError(f"fp8_gemm_kgrouped: segment sizes must be multiples of {BLOCK} summing to at most "
                         f"K = {a.shape[1]}")


def k_groups(sizes: torch.Tensor) -> torch.Tensor:
    """The K-grouped kernel's table of segments of `sizes` (E,) rows of K, multiples of 128 laid end to end from
    K = 0: (E, 3) int32 rows (e, first K block, number of K blocks), 0 blocks for an empty segment. Computed
    where `sizes` lives: on the GPU nothing is read back."""
    blocks = sizes.long() // BLOCK                                     # (E,)
    first = blocks.cumsum(0) - blocks                                  # (E,)
    expert = torch.arange(len(blocks), device=blocks.device)
    return torch.stack([expert, first, blocks], 1).to(torch.int32)     # (E, 3)


def fp8_gemm_kgrouped_ref(a, a_scale, b, b_scale, sizes, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Reference K-grouped GEMM (routed-expert Wgrad): out[e] = A[:, seg_e]·B[:, seg_e]ᵀ over the e-th segment
    of K (`sizes`, a list or a 1-D integer tensor, multiples of 128, from K = 0; K blocks past the last segment
    are unused), both operands in 1×128 tiles along K → (E, M, N); empty segments give 0."""
    sizes = sizes.tolist() if torch.is_tensor(sizes) else sizes       # a loop on the host, as references are
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
    """K-grouped GEMM (see the reference): one kernel launch on Hopper, with the segments read in place (the
    operator v3fp8::gemm_kgrouped). sizes on the GPU stay there (k_groups): the kernel writes zeros for the empty
    segments (the output is not zero-filled first)."""
    if a.shape[1]:                                                     # no tokens at all: zero gradients
        _check_kgrouped(a, a_scale, b, b_scale, sizes)                 # a list's sizes too, on the host
    sizes = sizes if torch.is_tensor(sizes) else torch.tensor(sizes, dtype=torch.long, device=a.device)
    return _gemm_kgrouped(a, a_scale, b, b_scale, sizes, out_dtype)


@fp8_operator("gemm_kgrouped")
def _gemm_kgrouped(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   sizes: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm_kgrouped with sizes a tensor."""
    (M, K), N = a.shape, b.shape[0]
    ext = load_kernel() if a.is_cuda else None
    if not (ext is not None and M % BLOCK == 0 and N % 8 == 0 and M and K):
        if a.is_cuda and M and K:
            say_once(f"{why_no_kernel() or f'M = {M} (not a multiple of 128) or N = {N} (not of 8)'}; "
                     f"using the PyTorch reference K-grouped GEMM (slow)")
        return fp8_gemm_kgrouped_ref(a, a_scale, b, b_scale, sizes, out_dtype)
    E = len(sizes)
    out = torch.empty(E * M, N, dtype=torch.float32, device=a.device)                     # idle experts: 0s
    sbt = F.pad(b_scale.t(), (0, -N % BLOCK)).contiguous()                                 # (K/128, N')
    ext.gemm_experts_wgrad(a.contiguous(), a_scale.contiguous(), b.contiguous(), sbt,
                           k_groups(sizes.to(a.device)), out)
    return out.view(E, M, N).to(out_dtype)


@_gemm_kgrouped.register_fake
def _(a, a_scale, b, b_scale, sizes, out_dtype):
    return a.new_empty(sizes.shape[0], a.shape[0], b.shape[0], dtype=out_dtype)


def fp8_gemm_kgrouped_into(a, a_scale, b, b_scale, sizes, out: torch.Tensor) -> None:
    """out += fp8_gemm_kgrouped(a, a_scale, b, b_scale, sizes) for out an fp32 (E, M, N) tensor: the routed experts'
    gradients summed over micro-batches in place (fp8_linear.grads_accumulated_in_wgrad). On Hopper the kernel adds
    each tile to what out holds (an idle expert's rows are left as they are); elsewhere out += the reference. The
    same fp32 sums either way (the operator v3fp8::gemm_kgrouped_into)."""
    E = sizes.numel() if torch.is_tensor(sizes) else len(sizes)
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device != a.device
            or tuple(out.shape) != (E, a.shape[0], b.shape[0])):
        raise ValueError(f"fp8_gemm_kgrouped_into: out must be a float32 {(E, a.shape[0], b.shape[0])} tensor on "
                         f"{a.device}, got {getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if a.shape[1] == 0:                                                # no tokens at all: nothing to add
        return
    _check_kgrouped(a, a_scale, b, b_scale, sizes)
    sizes = sizes if torch.is_tensor(sizes) else torch.tensor(sizes, dtype=torch.long, device=a.device)
    _gemm_kgrouped_into(a, a_scale, b, b_scale, sizes, out)


@fp8_operator("gemm_kgrouped_into", mutates_args=("out",))
def _gemm_kgrouped_into(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                        sizes: torch.Tensor, out: torch.Tensor) -> None:
    """fp8_gemm_kgrouped_into with sizes a tensor."""
    (M, K), N = a.shape, b.shape[0]
    ext = load_kernel() if a.is_cuda else None
    fits = M % BLOCK == 0 and N % 8 == 0 and M and K and out.is_contiguous() and out.data_ptr() % 16 == 0
    if ext is not None and fits:
        sbt = F.pad(b_scale.t(), (0, -N % BLOCK)).contiguous()                             # (K/128, N')
        ext.gemm_experts_wgrad(a.contiguous(), a_scale.contiguous(), b.contiguous(), sbt,
                               k_groups(sizes.to(a.device)), out.view(-1, N), accumulate=True)
        return
    if a.is_cuda and M and K:
        say_once(f"{why_no_kernel() or f'M = {M} (not a multiple of 128), N = {N} (not of 8) or out not contiguous'}; "
                 f"using the PyTorch reference K-grouped GEMM (slow) for the Wgrad sum")
    out += fp8_gemm_kgrouped_ref(a, a_scale, b, b_scale, sizes, torch.float32)


@_gemm_kgrouped_into.register_fake
def _(a, a_scale, b, b_scale, sizes, out):
    return None


# ---------------------------------------------------------------- FP8 routed experts
def tile_layout(counts: torch.Tensor, M: int):
    """The tile layout of M rows sorted by expert, counts (E,) the rows of each expert (an integer tensor summing
    to M), computed where counts lives without reading it back:
      dst (M,) int64     the padded row of each row
      groups (T,) int32  the expert of each 128-row tile of the padded buffer, -1 for the unused tiles at its end
      padded (E,)        each expert's rows rounded up to whole tiles (the K segments of Wgrad), counts' dtype"""
    E, device = counts.shape[0], counts.device
    # The tiles needed, Σ_e ⌈n_e/128⌉, are known only on the GPU, so the padded buffer gets the static size of
    # their bound: at most min(E, M) experts have rows, each rounded up by at most 127, so
    # Σ_e ⌈n_e/128⌉ ≤ Σ_{n_e > 0} (n_e + 127)/128 ≤ (M + 127·min(E, M))/128, and the left side is an integer.
    T = (M + (BLOCK - 1) * min(E, M)) // BLOCK
    tiles = (counts + BLOCK - 1) // BLOCK                                       # (E,) ⌈n_e/128⌉
    tile_end, row_end = tiles.cumsum(0), counts.cumsum(0)                      # (E,), (E,)
    # The expert of tile t (of row i): the number of segments that end at or before it; E past the last one.
    groups = torch.searchsorted(tile_end, torch.arange(T, device=device), right=True, out_int32=True)  # (T,)
    groups = torch.where(groups < E, groups, -1)                               # (T,) the unused tail: -1
    expert = torch.searchsorted(row_end, torch.arange(M, device=device), right=True)  # (M,)
    shift = (tile_end - tiles) * BLOCK - (row_end - counts)                    # (E,) padded start − start
    dst = torch.arange(M, device=device) + shift.index_select(0, expert)       # (M,)
    return dst, groups, tiles * BLOCK


_LAST_LAYOUT = []  # [(counts, its _version, M, layout)] of the last layout built


def _shared_layout(counts: torch.Tensor, M: int):
    """tile_layout(counts, M), built once for the gate, up and down projections of one MoE forward, which get
    the same counts tensor: the same object (held here, so that its id is not reused), unchanged since
    (`_version`), and the same M. A list of sizes becomes a new tensor each call, hence a new layout."""
    if counts.is_inference():                                          # no version counter to trust
        return tile_layout(counts, M)
    last = _LAST_LAYOUT[0] if _LAST_LAYOUT else None
    if last is None or last[0] is not counts or last[1] != counts._version or last[2] != M:
        _LAST_LAYOUT[:] = [(counts, counts._version, M, tile_layout(counts, M))]
    return _LAST_LAYOUT[0][3]


def _padded(x, dst, groups):
    """Rows of x into the tile layout: (T·128, K) with zero rows between the segments and after the last.
    A gather, not a scatter into a zero-filled buffer of rows: x gets one zero row appended, which every padding
    row reads (only the (T·128,) index is filled first), so the padded rows are written once; eager, F.pad copies
    x first, as much work as the zero fill was."""
    M = x.shape[0]
    src = torch.full((groups.shape[0] * BLOCK,), M, dtype=dst.dtype, device=dst.device)  # (T·128,) row M: zeros
    src.scatter_(0, dst, torch.arange(M, device=dst.device))              # padded row dst[i] reads row i
    return F.pad(x, (0, 0, 0, 1)).index_select(0, src)                    # (M + 1, K) → (T·128, K)


def _experts_forward(x, w, counts, keep_t):
    """Fprop of Y_seg = X_seg·W[e]ᵀ: y (M, N); with keep_t what Wgrad wants of the padded input xp, its tiles
    along the tokens (made in the same pass as Fprop's), else None; and what the backward needs besides."""
    out_dtype = compute_dtype(x)
    E, N, K = w.shape
    dst, groups, padded = _shared_layout(counts, x.shape[0])
    xp = _padded(x, dst, groups)                                       # (T·128, K)
    (xq, xs), xt = quantize_act_both(xp) if keep_t else (quantize_act(xp), None)
    wq, ws, wq_t = quantize_weight(w, transpose=True)                 # (E, N, K), (E, N/128, K/128), (E, K, N)
    y = fp8_gemm_grouped(xq, xs, wq, ws, groups, out_dtype).index_select(0, dst)  # (M, N)
    return y, xt, (wq_t, ws, dst, groups, padded), (x.dtype, w.dtype)


def _dgrad(dyq, wq_t, ws, groups, out_dtype):
    """Dgrad in the tile layout: dX_seg = dY_seg·W[e] for the padded dY (T·128, N) in 1×128 tiles, dyq = (q,
    scale), i.e. a grouped GEMM against the transposed experts wq_t (E, K, N) → (T·128, K)."""
    return fp8_gemm_grouped(*dyq, wq_t, ws.transpose(1, 2).contiguous(), groups, out_dtype)


def _wgrad(dyt, xt, padded, out_dtype, into=None):
    """Wgrad: dW[e] = dY_segᵀ·X_seg over the expert's own (padded) tokens, both quantized along tokens: dyt and xt
    are quantize_act_t of the padded dY and X, (N, T·128), (N, T) and (K, T·128), (K, T). → (E, N, K), one launch
    on Hopper; or, given the weight's gradient `into` (fp8_linear.grads_accumulated_in_wgrad), added to it in
    place → None."""
    if into is not None:
        return fp8_gemm_kgrouped_into(*dyt, *xt, padded, into)
    return fp8_gemm_kgrouped(*dyt, *xt, padded, out_dtype)


def _experts_backward(dy, xt, saved, meta):
    """Dgrad and Wgrad of _experts_forward, given xt, the padded input's tiles along the tokens (kept, or made
    from the recomputed input). dY is padded and quantized both ways in one pass."""
    wq_t, ws, dst, groups, padded = saved
    x_dtype, w_dtype = meta
    dyq, dyt = quantize_act_both(_padded(dy, dst, groups))            # dY (T·128, N) along N, and along tokens
    dx = _dgrad(dyq, wq_t, ws, groups, x_dtype).index_select(0, dst)   # (M, K)
    return dx, _wgrad(dyt, xt, padded, w_dtype)


class _FP8ExpertsFn(torch.autograd.Function):
    """Y_seg = X_seg·W[e]ᵀ for every expert e at once, Fprop, Dgrad and Wgrad in FP8 (the routed experts of
    report §3.3). Rows arrive sorted by expert (`counts` (E,) per expert); each segment is padded with zero rows to
    whole 128-row tiles, so that one grouped GEMM serves all experts and no 1×128 tile mixes two experts' tokens."""

    @staticmethod
    def forward(ctx, x, w, counts, backward):
        y, xt, saved, meta = _experts_forward(x, w, counts, keep_t=backward)
        if backward:
            ctx.save_for_backward(*xt, *saved)
        ctx.meta = meta
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, *saved = ctx.saved_tensors
        dx, dw = _experts_backward(dy, (xtq, xts), saved, ctx.meta)
        return dx, dw, None, None


def _keep(a, b, act_cache):
    """The SwiGLU inputs A and B as the backward pass keeps them: as they are ("bf16"), or (q, scale) of A then of
    B in 1×128 E4M3 ("fp8") or E5M6 ("e5m6") tiles."""
    if act_cache == "bf16":
        return a, b
    quant = quantize_act if act_cache == "fp8" else quantize_e5m6
    return quant(a) + quant(b)


def _restore(kept, act_cache, dtype):
    """A and B back from _keep's tensors, in `dtype`."""
    if act_cache == "bf16":
        return kept
    return dequantize_act(*kept[:2]).to(dtype), dequantize_act(*kept[2:]).to(dtype)


class _FP8SwiGLUDownFn(torch.autograd.Function):
    """Y = (SiLU(A) ⊙ B)·W2[e]ᵀ per segment: the experts' SwiGLU fused with their down projection (report §3.3.3).

    A and B (the outputs of the gate and up projections) are kept for the backward pass, "cached" as
    `act_cache` says: as they are ("bf16"), in 1×128 E4M3 tiles ("fp8", the report's choice) or in E5M6 tiles
    ("e5m6"). The SwiGLU output H, the input of W2, is not kept: the backward recomputes it from A and B. With
    "bf16" every gradient is bit-identical to SiLU, ⊙ and fp8_segment_mm composed by autograd (a test), which keep
    SiLU(A), A, B and H padded."""

    @staticmethod
    def forward(ctx, a, b, w2, counts, act_cache):
        h = F.silu(a) * b                                                  # (M, inter)
        y, _, saved, meta = _experts_forward(h, w2, counts, keep_t=False)
        kept = _keep(a, b, act_cache)
        ctx.save_for_backward(*kept, *saved)
        ctx.meta = (meta, act_cache, a.dtype, len(kept))
        return y

    @staticmethod
    def backward(ctx, dy):
        meta, act_cache, ab_dtype, n_kept = ctx.meta
        kept, saved = ctx.saved_tensors[:n_kept], ctx.saved_tensors[n_kept:]
        a, b = _restore(kept, act_cache, ab_dtype)
        s = F.silu(a)                                                      # recomputed: SiLU(A) and H
        h = s * b
        dst, groups = saved[2], saved[3]                                   # the rows' places in the tile layout
        dh, dw2 = _experts_backward(dy, quantize_act_t(_padded(h, dst, groups)), saved, meta)
        da = torch.ops.aten.silu_backward(dh * b, a)                      # the ops autograd would run
        db = dh * s
        return da, db, dw2, None, None


class _FP8ExpertFFNFn(torch.autograd.Function):
    """FFN(x) = (SiLU(x·W1[e]ᵀ) ⊙ x·W3[e]ᵀ)·W2[e]ᵀ per segment: the routed experts' whole SwiGLU FFN in FP8, in the
    tile layout from its input to its output. The same products as fp8_segment_mm for W1 and W3 followed by
    fp8_swiglu_down (the same bits: a test), with less work between them:

      * x is padded once and quantized once for both W1 and W3, in the same pass along the tokens too for both
        their Wgrads: those tiles (one byte per value) are what the backward keeps of x, not x itself and not one
        copy per projection (A and B are kept padded, T·128 rows instead of M);
      * the gate and up outputs A and B, the SwiGLU output H and the gradients dH, dA and dB stay in padded rows:
        no gather back to M rows and scatter into a new padded buffer between two GEMMs. Only y and dx are
        gathered back (dx once, the sum of the W1 and W3 paths).

    Padding rows stay zero throughout (x's are, 0·W = 0, SiLU(0)·0 = 0, and dy is padded with zeros). The rows of
    the unused tail tiles (groups -1) are not written by the GEMM kernels and hold what the allocation held; what
    is computed from them is never used: elementwise ops and 1×128 tiles act on one row, the M-grouped GEMMs skip
    those tiles and each expert's K range of the K-grouped Wgrad ends before them."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, counts, act_cache, backward, g1, g3, g2, *quantized):
        dtype, x_dtype = compute_dtype(x), x.dtype
        dst, groups, padded = tile_layout(counts, x.shape[0])
        # under autocast x in the autocast dtype, as segment_mm casts it (report Figure 6: the FP8 GEMMs quantize
        # BF16); dX comes back in x's own dtype, its W1 and W3 halves summed there (below), as autograd sums them
        xp = _padded(x.to(dtype), dst, groups)                             # (T·128, dim)
        # Fprop's tiles of xp, and with a backward to come its tiles along the tokens for both Wgrads, one pass
        (xq, xs), xt = quantize_act_both(xp) if backward else (quantize_act(xp), None)
        if quantized:                # quantized once for this optimizer step (fp8_linear.weights_quantized_once)
            q1, s1, q1t, q3, s3, q3t, q2, s2, q2t = quantized
            q1t, q3t, q2t = ([q1t], [q3t], [q2t]) if backward else ([], [], [])
        else:
            q1, s1, *q1t = quantize_weight(w1, transpose=backward)       # (E, inter, dim), ·, [(E, dim, inter)]
            q3, s3, *q3t = quantize_weight(w3, transpose=backward)
            q2, s2, *q2t = quantize_weight(w2, transpose=backward)       # (E, dim, inter), ·, [(E, inter, dim)]
        a = fp8_gemm_grouped(xq, xs, q1, s1, groups, dtype)                # (T·128, inter)
        b = fp8_gemm_grouped(xq, xs, q3, s3, groups, dtype)                # (T·128, inter)
        hq, hs = quantize_act(F.silu(a) * b)
        y = fp8_gemm_grouped(hq, hs, q2, s2, groups, dtype).index_select(0, dst)  # (M, dim)
        if backward:
            kept = _keep(a, b, act_cache)
            ctx.save_for_backward(*xt, *q1t, s1, *q3t, s3, *q2t, s2, dst, groups, padded, g1, g3, g2, *kept)
        ctx.meta = (act_cache, dtype, x_dtype, (w1.dtype, w3.dtype, w2.dtype))
        ctx.n_quantized = len(quantized)
        return y

    @staticmethod
    def backward(ctx, dy):
        act_cache, dtype, x_dtype, (w1_dtype, w3_dtype, w2_dtype) = ctx.meta
        xtq, xts, q1t, s1, q3t, s3, q2t, s2, dst, groups, padded, g1, g3, g2, *kept = ctx.saved_tensors
        xt = (xtq, xts)                                                    # (dim, T·128), (dim, T): both Wgrads'
        a, b = _restore(kept, act_cache, dtype)                           # (T·128, inter) each
        s = F.silu(a)                                                      # recomputed: SiLU(A) and H
        h = s * b
        dyq, dyt = quantize_act_both(_padded(dy, dst, groups))            # dY (T·128, dim), both tilings
        dh = _dgrad(dyq, q2t, s2, groups, dtype)                           # (T·128, inter)
        dw2 = _wgrad(dyt, quantize_act_t(h), padded, w2_dtype, g2)     # None when added to g2 in place
        # dA = SiLU'(A)·dH·B and dB = dH·SiLU(A) (the ops autograd would run), each tiled both ways in one pass and
        # used for its Dgrad and Wgrad before the next is made; dX's two halves summed in x's dtype
        daq, dat = quantize_act_both(torch.ops.aten.silu_backward(dh * b, a))
        dx = _dgrad(daq, q1t, s1, groups, dtype).to(x_dtype)              # (T·128, dim)
        dw1 = _wgrad(dat, xt, padded, w1_dtype, g1)
        del daq, dat
        dbq, dbt = quantize_act_both(dh * s)
        dx += _dgrad(dbq, q3t, s3, groups, dtype)                          # in place: one buffer fewer
        dw3 = _wgrad(dbt, xt, padded, w3_dtype, g3)
        return (dx.index_select(0, dst), dw1, dw3, dw2) + (None,) * (6 + ctx.n_quantized)


def _segment_counts(sizes, M: int, n_experts: int, device, fits: bool, operands: str) -> torch.Tensor:
    """`sizes` (a list of ints, or a 1-D integer tensor on `device`) as an (E,) int64 tensor on `device`; a
    ValueError naming `operands` unless they fit (`fits`) and sizes fit E = n_experts segments of M rows in all.
    The sum of sizes on the GPU is not checked (reading it would make the host wait for the GPU), nor while
    torch.compile traces (it is not known then)."""
    if torch.is_tensor(sizes):
        n = sizes.numel()
        fits = fits and (sizes.shape == (n_experts,) and not sizes.is_floating_point() and sizes.device == device
                         and (sizes.is_cuda or torch.compiler.is_compiling() or sizes.sum().item() == M))
        counts = sizes.long()                                          # an int64 tensor is itself: the layout's key
    else:
        sizes = list(sizes)
        n = len(sizes)
        fits = fits and n == n_experts and sum(sizes) == M
        counts = torch.tensor(sizes, dtype=torch.long, device=device) if fits else None  # once; free on the CPU
    if not fits:
        raise ValueError(f"{operands} and {n} segment sizes do not fit together")
    return counts


def fp8_swiglu_down(a: torch.Tensor, b: torch.Tensor, w2: torch.Tensor, sizes,
                    act_cache: str = "bf16") -> torch.Tensor:
    """(SiLU(a) ⊙ b)·w2[e]ᵀ per segment of rows, in FP8, for a, b (M, inter) and w2 (E, dim, inter) → (M, dim),
    keeping a and b for the backward pass as `act_cache` says (see _FP8SwiGLUDownFn). sizes: the rows of each
    segment, a list or a 1-D integer tensor on a's device (on the GPU the host then never waits for it)."""
    if act_cache not in ACT_CACHES:
        raise ValueError(f"fp8_swiglu_down: act_cache={act_cache!r}, expected one of {ACT_CACHES}")
    fits = a.shape == b.shape and a.dim() == 2 and w2.dim() == 3 and a.shape[1] == w2.shape[2]
    counts = _segment_counts(sizes, a.shape[0] if fits else 0, w2.shape[0] if fits else 0, a.device, fits,
                             f"fp8_swiglu_down: a {tuple(a.shape)}, b {tuple(b.shape)}, w2 {tuple(w2.shape)}")
    return _FP8SwiGLUDownFn.apply(a, b, w2, counts, act_cache)


def fp8_segment_mm(x: torch.Tensor, w: torch.Tensor, sizes) -> torch.Tensor:
    """Rows of x (M, in) sorted into len(sizes) segments, times w (E, out, in)ᵀ per segment, in FP8 → (M, out).
    The FP8 twin of moe.segment_mm; in and out must be multiples of 128. sizes: a list, or a 1-D integer tensor on
    x's device (on the GPU the host then never waits for it: the tile layout is planned there)."""
    fits = x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[2]
    counts = _segment_counts(sizes, x.shape[0] if fits else 0, w.shape[0] if fits else 0, x.device, fits,
                             f"fp8_segment_mm: x {tuple(x.shape)}, w {tuple(w.shape)}")
    x = x.to(compute_dtype(x))                                         # under autocast: as segment_mm casts it
    backward = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)  # else no Wgrad tiles, nothing kept
    return _FP8ExpertsFn.apply(x, w, counts, backward)


def fp8_expert_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, sizes,
                   act_cache: str = "bf16", quantized=None, grad_into=None) -> torch.Tensor:
    """The routed experts' SwiGLU FFN in FP8, (SiLU(x·w1[e]ᵀ) ⊙ x·w3[e]ᵀ)·w2[e]ᵀ per segment of rows, for x (M, dim),
    w1 and w3 (E, inter, dim), w2 (E, dim, inter) → (M, dim); A = x·w1ᵀ and B = x·w3ᵀ kept for the backward pass
    as `act_cache` says. The fast twin of fp8_swiglu_down(fp8_segment_mm(x, w1), fp8_segment_mm(x, w3), w2)
    (see _FP8ExpertFFNFn). sizes: a list, or a 1-D integer tensor on x's device. quantized: None (the weights are
    quantized here), or what fp8_linear.weights_quantized_once made once per optimizer step: (w1, w3, w2) it was made
    from, then quantize_weight(w, transpose=True) of each, 12 tensors in one flat tuple; used only if made from
    these very w1, w3 and w2. grad_into: None (autograd gets the weights' gradients), or what
    fp8_linear.grads_accumulated_in_wgrad hands over: (w1, w3, w2, then their .grad), into which the Wgrad kernels
    add in place; used only if these are those very w1, w3 and w2."""
    if act_cache not in ACT_CACHES:
        raise ValueError(f"fp8_expert_ffn: act_cache={act_cache!r}, expected one of {ACT_CACHES}")
    fits = (x.dim() == 2 and w1.dim() == 3 and w1.shape == w3.shape and x.shape[1] == w1.shape[2]
            and w2.shape == (w1.shape[0], w1.shape[2], w1.shape[1]))
    counts = _segment_counts(sizes, x.shape[0] if fits else 0, w1.shape[0] if fits else 0, x.device, fits,
                             f"fp8_expert_ffn: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)}, "
                             f"w2 {tuple(w2.shape)}")
    # No gradient wanted (evaluation, torch.no_grad): no Wᵀ and nothing kept for a backward pass that never runs.
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w3, w2))
    q = copies_for(quantized, (w1, w3, w2))
    g = copies_for(grad_into, (w1, w3, w2)) if backward else ()
    return _FP8ExpertFFNFn.apply(x, w1, w3, w2, counts, act_cache, backward, *(g or (None,) * 3), *q)


class FP8Experts:
    """The routed experts' FP8 kernels, handed to the model where it is built:
    ``Transformer(cfg, linear=fp8_linear.FP8Linear, experts=FP8Experts)`` passes this class to every ``moe.MoE``, whose
    ``Experts`` run their whole FFN with ``ffn`` (fp8_expert_ffn) and any single projection with ``mm`` (the FP8
    twin of ``moe.segment_mm``)."""

    mm = staticmethod(fp8_segment_mm)
    ffn = staticmethod(fp8_expert_ffn)

    @staticmethod
    def check_dims(dim: int, inter_dim: int):
        """The experts' weights are quantized in whole 128×128 blocks: both dims must be multiples of 128."""
        if dim % BLOCK or inter_dim % BLOCK:
            raise ValueError(f"FP8 routed experts need dim ({dim}) and moe_inter_dim ({inter_dim}) to be multiples "
                             f"of {BLOCK}; choose such dims for FP8 runs")
