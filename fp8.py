"""Fine-grained FP8 training GEMMs (DeepSeek-V3 technical report §3.3).

The recipe, in the report's terms:
  * Format: every FP8 GEMM operand is E4M3 (``torch.float8_e4m3fn``, largest value 448); no E5M2 for gradients.
  * Granularity: activations (and activation gradients) are scaled per token per 128 channels, **1×128 tiles**;
    weights per **128×128 block**. Small groups keep outliers local: one large value only inflates the scale of
    its own tile or block, so the rest of the tensor keeps its precision. A scale is amax/448 of its tile, so
    x ≈ x_fp8 · scale: the ``weight_scale_inv`` convention of the released checkpoints. The amax is taken
    **online** from the current tensor (no delayed scaling history), floored at 1e-20 only so that an all-zero
    tile gets a finite scale. (DeepGEMM's test casts and the released inference code floor at 1e-4, harmless for
    their O(1) activations; in training it would pin the scale of the backward's small gradient tiles, a mean
    loss's dY often being far below 1e-4, and push their values into E4M3's subnormals.)
  * Promotion: since the scales change along K they cannot leave the sum. The tensor cores sum one 128-wide
    K slice (N_C = 128, four WGMMA k32 steps); the CUDA cores then multiply that partial sum by its two scales
    and add it into an FP32 accumulator. Without this, H800 tensor cores keep only ~14 bits of the running sum
    (≈2% max relative error at K = 4096 in the report). ``fp8_gemm_no_promotion`` emulates such an accumulator
    (14 bits, truncating); on this file's random demo data (`python fp8.py`) it errs by 0.34% at K = 4096, less
    than the report measured, growing with K (0.05% at K = 512, 0.67% at 8192).
  * Fprop, Dgrad and Wgrad all run in FP8 (``fp8_linear.FP8Linear``, the training layer built on this file);
    master weights, their gradients and the bias stay in FP32 (the Wgrad kernels write FP32 too). Wgrad contracts
    over tokens, so both of its operands are quantized in 1×128 tiles along the tokens ("1D1D": a per-row scale
    on B too, not a 128×128 block).
  * The routed experts run in FP8 as well: ``fp8_experts.py`` (M-grouped and K-grouped GEMMs over the experts'
    token segments) builds on this file.
  * What a layer keeps of its input for Wgrad: by default Wgrad's own E4M3 tiles along the tokens, made in the
    forward from the input itself (``quantize_act_both``). Low-precision storage (report §3.3.3):
    ``fp8_linear.FP8Linear.act_cache`` can keep the Fprop's 1×128 E4M3 tiles instead, or E5M6 tiles with
    power-of-2 scales (``quantize_e5m6``), which Wgrad dequantizes and quantizes again along the tokens.
  * With gradient accumulation the weights do not change between micro-batches:
    ``fp8_linear.weights_quantized_once`` quantizes each one once per optimizer step (the same bits), not once
    per micro-batch.

Reference and fast path: ``fp8_gemm_ref`` (with ``quantize_act_ref`` and ``quantize_weight_ref``) is the reference,
plain PyTorch run on CPU and wherever the kernels are unavailable. The fast path is the hand-written sm_90a kernel of
``fp8_gemm.cu`` (TMA loads, WGMMA, promotion overlapped with the next K block's WGMMA, A scales carried into shared
memory with each pipeline stage; its Wgrad, M-grouped and K-grouped variants) plus the one-pass quantizers of
``fp8_quant.cu`` (the weight's one writes W and Dgrad's Wᵀ together; ``quantize_act_both`` tiles an activation
along both of its dims), JIT-built on first use by
``torch.utils.cpp_extension.load``; the functions here pick them on Hopper GPUs and say once when they fall back.
Each kernel call is a torch.library operator (``fp8_operator``), so torch.compile keeps an FP8 model in one
graph.
``python fp8_bench.py`` times the kernel against torch's bf16 matmul and cuBLAS's blockwise FP8; ``fp8_teaching/``
shows, step by step, how such a kernel is built.
"""
import functools
import os
import sys

import torch
import torch.nn.functional as F

from layers import run_demo

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128        # tile width along K, side of a weight block, and the promotion interval N_C
AMAX_EPS = 1e-20   # amax floor: an all-zero tile's scale stays finite, every scale >= 2^-76 (fp8_quant.cu's division)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """The field's FP8 accuracy metric (DeepGEMM): 1 − 2Σxy / Σ(x² + y²) in float64; 0 when x == y."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return (1 - 2 * (x * y).sum() / denom).item() if denom > 0 else 0.0


# ---------------------------------------------------------------- quantization
def _check_high_precision(x: torch.Tensor, name: str):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.element_size() == 1:
        raise ValueError(f"{name} must be a float32/bfloat16/float16 tensor, got {getattr(x, 'dtype', type(x))}")


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    # Power-of-2 scales (rounded up so that amax/scale stays ≤ 448): scaling by them is exact in binary.
    return torch.exp2(torch.ceil(torch.log2(s)))


def _check_act(x: torch.Tensor) -> int:
    _check_high_precision(x, "x")
    K = x.shape[-1] if x.dim() else 0
    if K == 0 or K % BLOCK:
        raise ValueError(f"quantize_act: last dim must be a positive multiple of {BLOCK}, got shape {tuple(x.shape)}")
    return K


def _fused_quant_ok(x: torch.Tensor) -> bool:
    # fp8_quant.cu: bf16/fp32 on a GPU where the extension builds; bit-identical to the reference (tests)
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float32) and x.numel() > 0 and load_kernel() is not None


def quantize_act(x: torch.Tensor, pow2_scale: bool = False, mmajor: bool = False):
    """1×128 tiles: x (..., K) → (x_fp8 (..., K) e4m3, scale (..., K/128) fp32), x ≈ x_fp8 · scale.

    On Hopper the fused kernel of fp8_quant.cu does it in one pass (the operator v3fp8::quant_rows), compiled or
    not; quantize_act_ref is the reference. (Letting inductor compile the reference's ops inside the graph, fused
    with the op that produced x, ran `small` a few % faster on an H200 but did not give the kernel's values:
    Triton divides fp32 approximately unless inductor's eager_numerics.division_rounding is set, and a fused
    producer's result is quantized before it is rounded to bf16; the numbers: `git show 33d3c5e^:BENCHMARKS.md`.)
    mmajor (x 2-D): the same scales laid out as `mmajor_scales` lays them, which fp8_gemm then uses as they are."""
    _check_act(x)
    if mmajor and x.dim() != 2:
        raise ValueError(f"quantize_act: mmajor scales need a 2-D x, got {tuple(x.shape)}")
    if pow2_scale:                                                     # no kernel for power-of-2 scales
        q, s = quantize_act_ref(x, pow2_scale)
        return (q, mmajor_scales(s)) if mmajor else (q, s)
    q, s = _quant_rows(x, mmajor)
    return (q, s.t()[:x.shape[0]]) if mmajor else (q, s)              # mmajor: a view of the (K/128, ld) buffer


def quantize_act_t(x: torch.Tensor):
    """The 1×128 tiles of xᵀ for x (R, C), i.e. x quantized along its rows (the tokens, for Wgrad), with R
    zero-padded to a multiple of 128 → (q (C, R'), scale (C, R'/128)). Equals quantize_act(pad(xᵀ)); fused into
    one pass (transpose included) on Hopper (the operator v3fp8::quant_cols)."""
    _check_high_precision(x, "x")
    if x.dim() != 2:
        raise ValueError(f"quantize_act_t: x must be 2-D, got shape {tuple(x.shape)}")
    R, C = x.shape
    if R == 0:                                                         # no tokens: no tiles
        return torch.empty(C, 0, dtype=FP8, device=x.device), torch.empty(C, 0, device=x.device)
    return _quant_cols(x)


def quantize_act_both(x: torch.Tensor, mmajor: bool = False):
    """x (R, C) quantized both ways, as a linear layer's training wants its input X and its output gradient dY:
    (quantize_act(x, mmajor), quantize_act_t(x)), the 1×128 tiles along C (Fprop, Dgrad) and those along the rows
    R (Wgrad). The same values as the two calls; on Hopper one pass over a bf16 x (the operator
    v3fp8::quant_rows_cols), which reads x once instead of twice."""
    _check_act(x)
    if x.dim() != 2:
        raise ValueError(f"quantize_act_both: x must be 2-D, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:                                                # no rows: no tiles
        return quantize_act(x, mmajor=mmajor), quantize_act_t(x)
    q, s, qt, st = _quant_rows_cols(x, mmajor)
    return (q, s.t()[:x.shape[0]] if mmajor else s), (qt, st)         # mmajor: a view, as quantize_act's


def quantize_act_ref(x: torch.Tensor, pow2_scale: bool = False):
    """Reference of quantize_act in PyTorch ops (the same arithmetic, step by step)."""
    K = _check_act(x)
    tiles = x.float().reshape(*x.shape[:-1], K // BLOCK, BLOCK)       # (..., K/128, 128)
    scale = tiles.abs().amax(-1).clamp(min=AMAX_EPS) * (1 / E4M3_MAX)  # (..., K/128); as fp8_quant.cu does it
    if pow2_scale:
        scale = _pow2_ceil(scale)
    q = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.reshape(x.shape), scale                                   # (..., K), (..., K/128)


def dequantize_act(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_act, in float32."""
    K = x_fp8.shape[-1]
    tiles = x_fp8.float().reshape(*x_fp8.shape[:-1], K // BLOCK, BLOCK)  # (..., K/128, 128)
    return (tiles * scale.unsqueeze(-1)).reshape(x_fp8.shape)


E5M6_MAX = 65024.0  # (2 − 2⁻⁶)·2¹⁵: the largest E5M6 value (5 exponent bits with fp16's bias, 6 mantissa bits)


def quantize_e5m6(x: torch.Tensor):
    """1×128 tiles in E5M6 with power-of-2 scales (report §3.3.3: the cached input of the Linear after attention):
    x (..., K) → (q (..., K), scale (..., K/128)), x ≈ q · scale. E5M6 has fp16's exponent range and 6 mantissa
    bits, so every E5M6 value is an fp16 value: q is stored as float16 (the numerics of the format, not its 12-bit
    storage). Rounding is to nearest, ties to even, in one step from fp32."""
    K = _check_act(x)
    tiles = x.float().reshape(*x.shape[:-1], K // BLOCK, BLOCK)       # (..., K/128, 128)
    scale = _pow2_ceil(tiles.abs().amax(-1).clamp(min=AMAX_EPS) / E5M6_MAX)  # exact division below
    y = tiles / scale.unsqueeze(-1)                                    # |y| ≤ 65024
    bits = y.view(torch.int32)                                         # normals: keep 6 of fp32's 23 mantissa bits
    lsb = (bits >> 17) & 1
    normal = ((bits + 0xFFFF + lsb) & ~0x1FFFF).view(torch.float32)
    sub = torch.round(y * 2.0 ** 20) * 2.0 ** -20                      # below 2⁻¹⁴: multiples of 2⁻²⁰
    q = torch.where(y.abs() < 2.0 ** -14, sub, normal).to(torch.float16)
    return q.reshape(x.shape), scale


def _is_mmajor(scale: torch.Tensor) -> bool:
    """Laid out as mmajor_scales lays it out (strides (1, ld), ld a multiple of 128, the padded rows there)."""
    M, kb = scale.shape
    ld = scale.stride(1)
    room = scale.untyped_storage().nbytes() // 4 - scale.storage_offset()   # floats from the first scale on
    return (scale.stride(0) == 1 and ld % BLOCK == 0 and ld >= M and scale.data_ptr() % 16 == 0
            and room >= (kb - 1) * ld + -(-M // BLOCK) * BLOCK)


def mmajor_scales(scale: torch.Tensor) -> torch.Tensor:
    """The (M, K/128) activation scales laid out M-major: a view with strides (1, ld) of a zero-padded (K/128, ld)
    buffer, ld = M rounded up to 128. The values are the same; each K block's scales of 128 consecutive rows
    are then 512 contiguous bytes, which the kernel's producer copies into the pipeline stage with the tiles
    (cuBLAS and DeepGEMM take A-scales M-major too). fp8_gemm's kernel wants them so."""
    return _mmajor_buffer(scale).t()[:scale.shape[0]]


def quantize_weight(w: torch.Tensor, transpose: bool = False):
    """128×128 blocks: w (N, K) → (w_fp8 (N, K) e4m3, scale (ceil(N/128), ceil(K/128)) fp32); a stack of matrices
    (E, N, K), such as the routed experts' weights, → each its own blocks: (E, N, K), (E, ceil(N/128), ceil(K/128)).

    transpose=True also returns w_t, Dgrad's operand: w_fp8 transposed (..., K, N'), N' = N rounded up to 128 with
    zero columns (Dgrad contracts over N in whole 128-wide tiles), its scales the tiny scale.transpose(-1, -2).
    On Hopper fp8_quant.cu's quant_blocks writes w_fp8, w_t and scale in one pass over w (the operator
    v3fp8::quant_blocks); quantize_weight_ref and transpose_weight are the reference (bit-identical, tests)."""
    _check_high_precision(w, "w")
    if w.dim() not in (2, 3):
        raise ValueError(f"quantize_weight: w must be 2-D (N, K) or 3-D (E, N, K), got shape {tuple(w.shape)}")
    q, scale, w_t = _quant_blocks(w, transpose)                        # w_t: empty unless transpose
    return (q, scale, w_t) if transpose else (q, scale)


def quantize_weight_ref(w: torch.Tensor):
    """Reference of quantize_weight in PyTorch ops: w (..., N, K) → (w_fp8 (..., N, K), scale (..., ceil(N/128),
    ceil(K/128))). Edge blocks are zero-padded for the amax (padding never raises it) and cropped afterwards, as
    in the released checkpoints' ``weight_scale_inv``."""
    *lead, N, K = w.shape
    nb, kb = -(-N // BLOCK), -(-K // BLOCK)
    wp = F.pad(w.float(), (0, kb * BLOCK - K, 0, nb * BLOCK - N))     # (..., nb·128, kb·128)
    blocks = wp.reshape(*lead, nb, BLOCK, kb, BLOCK)                   # (..., nb, 128, kb, 128)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_EPS) / E4M3_MAX  # (..., nb, kb)
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.reshape(*lead, nb * BLOCK, kb * BLOCK)[..., :N, :K].contiguous(), scale


def transpose_weight(w_fp8: torch.Tensor) -> torch.Tensor:
    """Reference of quantize_weight's w_t: w_fp8 (..., N, K) → (..., K, N'), N' = N rounded up to 128, zero
    columns past N. Each 128×128 block transposed is a block of Wᵀ with the same scale."""
    *lead, N, K = w_fp8.shape
    w_t = w_fp8.new_zeros(*lead, K, N + -N % BLOCK)                    # (..., K, N'), fp8 zeros (0x00)
    w_t[..., :N] = w_fp8.transpose(-1, -2)
    return w_t


def _expand_blocks(scale: torch.Tensor, N: int, K: int, block: int = BLOCK) -> torch.Tensor:
    """(ceil(N/block), ceil(K/block)) block scales → one scale per element (N, K)."""
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :K]


def dequantize_weight(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = BLOCK) -> torch.Tensor:
    """w = w_fp8 · scale per block×block block (kernel.py's ``weight_dequant``; used to import FP8 HF checkpoints,
    whose `weight_block_size` is 128)."""
    if w_fp8.dim() != 2 or w_fp8.dtype != FP8:
        raise ValueError(f"dequantize_weight: w_fp8 must be 2-D float8_e4m3fn, got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    N, K = w_fp8.shape
    if tuple(scale.shape) != (-(-N // block), -(-K // block)):
        raise ValueError(f"dequantize_weight: scale shape {tuple(scale.shape)} does not match weight {(N, K)} "
                         f"in {block}×{block} blocks")
    return (w_fp8.float() * _expand_blocks(scale.float(), N, K, block)).to(dtype)


# ---------------------------------------------------------------- GEMM: reference
def check_gemm_operands(a, a_scale, b, b_scale) -> bool:
    """Validate C = A·Bᵀ operands; returns True when b_scale is per row of B (1×128 tiles, used by wgrad)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != FP8 or t.dim() != 2:
            raise ValueError(f"fp8_gemm: {name} must be a 2-D float8_e4m3fn tensor, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    (M, K), N = a.shape, b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"fp8_gemm: a is (M, K) = {tuple(a.shape)} but b is (N, K) = {tuple(b.shape)}")
    if K == 0 or K % BLOCK:
        raise ValueError(f"fp8_gemm: K = {K} must be a positive multiple of {BLOCK}")
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale)):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            raise ValueError(f"fp8_gemm: {name} must be a float32 tensor")
    if tuple(a_scale.shape) != (M, K // BLOCK):
        raise ValueError(f"fp8_gemm: a_scale must be (M, K/128) = {(M, K // BLOCK)}, got {tuple(a_scale.shape)}")
    blocks, rows = (-(-N // BLOCK), K // BLOCK), (N, K // BLOCK)
    if tuple(b_scale.shape) not in (blocks, rows):
        raise ValueError(f"fp8_gemm: b_scale must be {blocks} (128×128 blocks) or {rows} (1×128 tiles), "
                         f"got {tuple(b_scale.shape)}")
    if len({t.device for t in (a, a_scale, b, b_scale)}) != 1:
        raise ValueError("fp8_gemm: all operands must be on the same device")
    return tuple(b_scale.shape) == rows and rows != blocks


def fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Reference C = A·Bᵀ with FP32 promotion every N_C = 128 along K.

    a (M, K) e4m3 with a_scale (M, K/128); b (N, K) e4m3 with b_scale (ceil(N/128), K/128) for 128×128 blocks
    or (N, K/128) for 1×128 tiles. Each 128-wide slice is summed unscaled (what the tensor cores do), then
    multiplied by its two scales and added into FP32 (what the CUDA cores do)."""
    rowwise = check_gemm_operands(a, a_scale, b, b_scale)
    (M, K), N = a.shape, b.shape[0]
    sb = b_scale if rowwise else b_scale.repeat_interleave(BLOCK, 0)[:N]   # (N, K/128)
    af, bt = a.float(), b.float().t().contiguous()                        # (M, K), (K, N): fp8 is exact in fp32
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):                    # keep every step in fp32
        for kb in range(K // BLOCK):
            ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
            part = af[:, ks] @ bt[ks]                                     # (M, N) one K slice, unscaled
            acc += part * a_scale[:, kb:kb + 1] * sb[:, kb]               # promotion: scale, add in fp32
    return acc.to(out_dtype)


def _truncate_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep `bits` significant bits of each value, rounding toward zero (bits beyond the accumulator fall off)."""
    m, e = torch.frexp(x)                                   # x = m · 2^e, 0.5 ≤ |m| < 1
    return torch.ldexp(torch.trunc(m * 2.0 ** bits) / 2.0 ** bits, e)


def fp8_gemm_no_promotion(a, a_scale, b, b_scale, acc_bits: int = 14, out_dtype=torch.float32) -> torch.Tensor:
    """What C = A·Bᵀ becomes when the whole K is summed inside the tensor core, with no promotion.

    Emulates an accumulator that keeps `acc_bits` significant bits (≈14 on H800, report §3.3) and truncates after
    each k32 MMA step adds its (exact) partial sum, over the whole K. The scaled products a·s_a·b·s_b are what is
    summed, so the result differs from the promoted reference only through the accumulator; with power-of-2
    scales this equals summing unscaled products and scaling once (exact in binary)."""
    rowwise = check_gemm_operands(a, a_scale, b, b_scale)
    (M, K), N = a.shape, b.shape[0]
    sb = b_scale if rowwise else b_scale.repeat_interleave(BLOCK, 0)[:N]   # (N, K/128)
    A = (a.double().reshape(M, -1, BLOCK) * a_scale.double()[..., None]).reshape(M, K)  # exact in fp64
    Bt = (b.double().reshape(N, -1, BLOCK) * sb.double()[..., None]).reshape(N, K).t().contiguous()  # (K, N)
    acc = torch.zeros(M, N, dtype=torch.float64, device=a.device)
    for k0 in range(0, K, 32):                              # one k32 MMA step at a time
        acc = _truncate_mantissa(acc + A[:, k0:k0 + 32] @ Bt[k0:k0 + 32], acc_bits)
    return acc.to(out_dtype)


# ---------------------------------------------------------------- GEMM: CUDA kernel and dispatch
_EXT, _WHY_NOT, _SAID = None, None, set()


def say_once(msg: str):
    """One line on stderr, once per message and process (why a kernel falls back to the reference)."""
    if msg not in _SAID:            # one line, once per reason and process
        _SAID.add(msg)
        print(f"fp8: {msg}", file=sys.stderr)


def load_kernel():
    """JIT-build (cached by torch in ~/.cache/torch_extensions) and return fp8_gemm.cu's module, or None."""
    global _EXT, _WHY_NOT
    if _EXT is None and _WHY_NOT is None:
        if not torch.cuda.is_available():
            _WHY_NOT = "no CUDA device"
        elif torch.cuda.get_device_capability() != (9, 0):
            _WHY_NOT = f"GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}, the kernel needs sm_90a"
        else:
            try:
                from torch.utils.cpp_extension import load
                here = os.path.dirname(os.path.abspath(__file__))
                srcs = [os.path.join(here, f) for f in ("fp8_gemm.cu", "fp8_quant.cu")]
                _EXT = load(name="fp8_gemm_ext", sources=srcs, verbose=False,
                            extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])
            except Exception as e:  # a broken toolchain must not break training: fall back, say why
                _WHY_NOT = f"building fp8_gemm.cu failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return _EXT


def why_no_kernel() -> str:
    """Why load_kernel() gave None ("" while it has not been tried or the kernel loaded)."""
    return _WHY_NOT or ""


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """C = A·Bᵀ (see fp8_gemm_ref for the layouts): the CUDA kernel on Hopper, the reference elsewhere (the
    operator v3fp8::gemm).

    128×128 block scales on B run the kernel with bf16 output; it takes the A scales M-major (as
    quantize_act(..., mmajor=True) or mmajor_scales lay them out) and lays row-major ones out so first. 1×128
    scales on B (Wgrad) run its "1D1D" variant (fp32 output), which wants them transposed to (K/128, N rounded up
    to 128) and N a multiple of 8."""
    check_gemm_operands(a, a_scale, b, b_scale)
    return _gemm(a, a_scale, b, b_scale, out_dtype)


def fp8_gemm_into(a, a_scale, b, b_scale, out: torch.Tensor) -> None:
    """out += A·Bᵀ for Wgrad's operands (1×128 scales on both, see fp8_gemm) and out an fp32 (M, N) tensor: a
    weight's gradient summed over micro-batches in place (fp8_linear.grads_accumulated_in_wgrad). On Hopper the
    1D1D kernel adds its tile to what out holds in its epilogue, instead of writing a new gradient that autograd
    then adds with another pass over both; elsewhere out += fp8_gemm_ref(...). The same fp32 sums either way (the
    operator v3fp8::gemm_into)."""
    if not check_gemm_operands(a, a_scale, b, b_scale):
        raise ValueError("fp8_gemm_into: b_scale must hold 1×128 tiles along K, (N, K/128)")
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != (a.shape[0], b.shape[0])
            or out.device != a.device):
        raise ValueError(f"fp8_gemm_into: out must be a float32 {(a.shape[0], b.shape[0])} tensor on {a.device}, got "
                         f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    _gemm_into(a, a_scale, b, b_scale, out)


# ---------------------------------------------------------------- the kernels as PyTorch operators
# Each kernel call above goes through a torch.library operator, so that torch.compile sees one opaque op (with a
# "fake" twin that gives only the output's shape, dtype and strides) instead of an unknown extension call that
# would split the graph. Each operator runs the kernel where it can and its reference elsewhere (CPU: so that
# torch.library.opcheck can test the operators there). Validation stays in the Python functions above; the
# operators take and return plain tensors and do the layout work that needs real memory (alignment, padding).
_LIB = torch.library.Library("v3fp8", "DEF")  # the operators' namespace (kept alive for the process)


def fp8_operator(name: str, mutates_args=()):
    """Decorator: fn becomes the operator v3fp8::<name> (`.op`; its fake implementation is registered with
    `.register_fake`). The function it returns calls the operator while torch.compile traces, so that the graph
    holds one opaque node, and fn itself otherwise: in eager mode an operator call only adds dispatch time.
    The operator is defined with a schema inferred from fn's annotations and fn as its one kernel for every device
    (fn picks the kernel or the reference itself). The lower-level torch.library.Library is used rather than
    torch.library.custom_op, which wraps every call in more Python (autograd and aliasing checks): dispatch took
    34 µs per call that way and 12 µs this way on a 2-core CPU, paid on the host ~1,000 times per compiled FP8
    training step of `small`. mutates_args: the names of the arguments fn writes into (it then returns None)."""
    def register(fn):
        def no_grad_through(args):
            # No autograd formula: the operators run inside FP8Linear's and the experts' autograd functions, whose
            # backward calls them again. Asked for gradients through one, fail instead of giving none.
            if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                raise RuntimeError(f"v3fp8::{name} has no autograd formula; call it inside an autograd.Function "
                                   "(as FP8Linear does) or without gradients")

        def kernel(*args):
            no_grad_through(args)
            return fn(*args)

        def register_fake(fake):
            def checked(*args):
                no_grad_through(args)
                return fake(*args)
            torch.library.register_fake(f"v3fp8::{name}", checked, lib=_LIB)
            return fake

        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args),
                    tags=(torch.Tag.pt2_compliant_tag,))
        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        op = getattr(torch.ops.v3fp8, name).default

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)
        call.op, call.register_fake = op, register_fake
        return call
    return register


def _mmajor_buffer(scale: torch.Tensor) -> torch.Tensor:
    """The zero-padded (K/128, ld) buffer of which mmajor_scales(scale) is a view."""
    M, kb = scale.shape
    buf = scale.new_zeros(kb, -(-M // BLOCK) * BLOCK)
    buf[:, :M] = scale.t()
    return buf


def _loadable(x: torch.Tensor) -> torch.Tensor:
    """x contiguous and 16-byte aligned, as the quantizers' 16-byte loads want it (copied only if it is not)."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x


def _rows_outputs(x: torch.Tensor, mmajor: bool):
    """The outputs quant_rows writes, allocated (the fakes' too): q like x in FP8, the scales (..., K/128) row-major
    (ld = 0) or with mmajor the (K/128, ld) buffer, ld = M rounded up to 128, whose padded rows (only when
    M % 128 != 0) are zero-filled here (the kernel writes rows < M); and ld."""
    kb = x.shape[-1] // BLOCK
    if not mmajor:
        return x.new_empty(x.shape, dtype=FP8), x.new_empty(*x.shape[:-1], kb, dtype=torch.float32), 0
    ld = -(-x.shape[0] // BLOCK) * BLOCK
    s = (x.new_empty if ld == x.shape[0] else x.new_zeros)(kb, ld, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=FP8), s, ld


def _cols_outputs(x: torch.Tensor):
    """The outputs quant_cols writes for x (R, C), allocated: q (C, R'), scales (C, R'/128), R' = R rounded up to
    128."""
    R_pad = -(-x.shape[0] // BLOCK) * BLOCK
    return x.new_empty(x.shape[1], R_pad, dtype=FP8), x.new_empty(x.shape[1], R_pad // BLOCK, dtype=torch.float32)


@fp8_operator("quant_rows")
def _quant_rows(x: torch.Tensor, mmajor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act's 1×128 tiles → (q, scales (..., K/128)), or with mmajor the (K/128, ld) scale buffer."""
    if not _fused_quant_ok(x):                                         # outputs contiguous, as the fake's
        q, s = quantize_act_ref(x)
        return q.contiguous(), _mmajor_buffer(s) if mmajor else s.contiguous()
    x = _loadable(x)
    q, s, ld = _rows_outputs(x, mmajor)
    _EXT.quant_rows(x, q.view(torch.uint8), s, ld)
    return q, s


@_quant_rows.register_fake
def _(x, mmajor):
    return _rows_outputs(x, mmajor)[:2]


@fp8_operator("quant_cols")
def _quant_cols(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act_t for x (R, C), R > 0: (q (C, R'), scale (C, R'/128)), R' = R rounded up to 128."""
    R, C = x.shape
    if not _fused_quant_ok(x):                                         # outputs contiguous, as the fake's
        q, s = quantize_act_ref(F.pad(x.t(), (0, -R % BLOCK)))
        return q.contiguous(), s.contiguous()
    q, s = _cols_outputs(x)
    _EXT.quant_cols(x.contiguous(), q.view(torch.uint8), s)
    return q, s


@_quant_cols.register_fake
def _(x):
    return _cols_outputs(x)


@fp8_operator("quant_rows_cols")
def _quant_rows_cols(x: torch.Tensor, mmajor: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_act_both for x (R, C), R > 0: quant_rows' q and scales (with mmajor its (C/128, ld) buffer), then
    quant_cols' q and scales."""
    if not (_fused_quant_ok(x) and x.dtype == torch.bfloat16):         # two passes (fp32 x: one kernel each)
        return *_quant_rows(x, mmajor), *_quant_cols(x)
    x = _loadable(x)
    (q, s, ld), (qt, st) = _rows_outputs(x, mmajor), _cols_outputs(x)
    _EXT.quant_rows_cols(x, q.view(torch.uint8), s, ld, qt.view(torch.uint8), st)
    return q, s, qt, st


@_quant_rows_cols.register_fake
def _(x, mmajor):
    return *_rows_outputs(x, mmajor)[:2], *_cols_outputs(x)


@fp8_operator("quant_blocks")
def _quant_blocks(w: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_weight's (w_fp8, scale, w_t); w_t is an empty tensor unless transpose."""
    if not _fused_quant_ok(w):
        q, scale = quantize_weight_ref(w)
        return q, scale, transpose_weight(q) if transpose else q.new_empty(0)
    w3 = _loadable(w.reshape(-1, *w.shape[-2:]))                      # (E, N, K), E = 1 for one matrix
    E, N, K = w3.shape
    nb, kb = -(-N // BLOCK), -(-K // BLOCK)
    q = torch.empty(w3.shape, dtype=FP8, device=w.device)
    scale = torch.empty(E, nb, kb, dtype=torch.float32, device=w.device)
    w_t = torch.empty(E, K, nb * BLOCK, dtype=FP8, device=w.device) if transpose else None
    _EXT.quant_blocks(w3, q.view(torch.uint8), w_t.view(torch.uint8) if transpose else None, scale)
    lead = w.shape[:-2]                                                # () or (E,)
    w_t = w_t.reshape(*lead, K, nb * BLOCK) if transpose else q.new_empty(0)
    return q.reshape(w.shape), scale.reshape(*lead, nb, kb), w_t


@_quant_blocks.register_fake
def _(w, transpose):
    *lead, N, K = w.shape
    nb, kb = -(-N // BLOCK), -(-K // BLOCK)
    w_t = w.new_empty(*lead, K, nb * BLOCK, dtype=FP8) if transpose else w.new_empty(0, dtype=FP8)
    return w.new_empty(w.shape, dtype=FP8), w.new_empty(*lead, nb, kb, dtype=torch.float32), w_t


@fp8_operator("gemm")
def _gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
          out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm on validated operands."""
    (M, K), N = a.shape, b.shape[0]
    rowwise = tuple(b_scale.shape) == (N, K // BLOCK) != (-(-N // BLOCK), K // BLOCK)
    if a.is_cuda and load_kernel() is not None and not (rowwise and N % 8):
        # the Wgrad variant writes fp32 (Wgrad stays FP32 in the report), the other bf16
        out = torch.empty(M, N, dtype=torch.float32 if rowwise else torch.bfloat16, device=a.device)
        if rowwise:
            sbt = F.pad(b_scale.t(), (0, -N % BLOCK)).contiguous()            # (K/128, N'), N' = ⌈N/128⌉·128
            _EXT.gemm_wgrad(a.contiguous(), a_scale.contiguous(), b.contiguous(), sbt, out)
        else:
            sa = a_scale if _is_mmajor(a_scale) else mmajor_scales(a_scale)
            _EXT.gemm(a.contiguous(), sa, b.contiguous(), b_scale.contiguous(), out)
        return out.to(out_dtype)
    why = (f"1×128 scales on B with N = {N} (not a multiple of 8) have no kernel" if a.is_cuda and _WHY_NOT is None
           else _WHY_NOT or f"tensors on {a.device.type}")
    say_once(f"{why}; using the PyTorch reference GEMM (slow)")
    return fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype)


@_gemm.register_fake
def _(a, a_scale, b, b_scale, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@fp8_operator("gemm_into", mutates_args=("out",))
def _gemm_into(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               out: torch.Tensor) -> None:
    """fp8_gemm_into on validated operands."""
    M, N = a.shape[0], b.shape[0]
    if M == 0 or N == 0:
        return
    if (a.is_cuda and load_kernel() is not None and N % 8 == 0 and out.is_contiguous()
            and out.data_ptr() % 16 == 0):
        sbt = F.pad(b_scale.t(), (0, -N % BLOCK)).contiguous()                # (K/128, N'), N' = ⌈N/128⌉·128
        _EXT.gemm_wgrad(a.contiguous(), a_scale.contiguous(), b.contiguous(), sbt, out, accumulate=True)
        return
    if a.is_cuda:
        say_once(f"{_WHY_NOT or f'N = {N} (not a multiple of 8) or out not contiguous and 16-byte aligned'}; "
                 f"using the PyTorch reference GEMM (slow) for the Wgrad sum")
    out += fp8_gemm_ref(a, a_scale, b, b_scale, torch.float32)


@_gemm_into.register_fake
def _(a, a_scale, b, b_scale, out):
    return None


# ---------------------------------------------------------------- demo: `python fp8.py` (CPU, seconds)
def quantize_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """One scale for the whole tensor (the coarse alternative to 1×128 tiles), dequantized back to fp32."""
    scale = x.abs().amax().float().clamp(min=AMAX_EPS) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).float() * scale


def demo_outlier(magnitudes=(1e2, 1e3, 1e4, 1e5), seed: int = 0) -> list:
    """A (64, 1024) N(0, 1) activation with one outlier; rows (magnitude, per-tensor mean relative error, its
    share of values flushed to 0, the same two for 1×128 tiles), over every value outside the outlier's tile."""
    rows = []
    for mag in magnitudes:
        x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(seed))
        x[3, 200] = mag
        others = torch.ones_like(x, dtype=torch.bool)
        others[3, 128:256] = False  # the outlier's own 1×128 tile
        row = [mag]
        for deq in (quantize_per_tensor(x), dequantize_act(*quantize_act_ref(x))):
            rel, zero = (deq - x).abs() / x.abs(), (deq == 0) & (x != 0)
            row += [rel[others].mean().item(), zero[others].float().mean().item()]
        rows.append(tuple(row))
    return rows


def demo_promotion(ks=(512, 1024, 2048, 4096, 8192), seed: int = 0) -> list:
    """Rows (K, error with FP32 promotion every 128, error of a 14-bit accumulator over the whole K): max |C − C*|
    / max |C*| for C* the exact (fp64) product of the same FP8 operands, so only the summation differs."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for K in ks:
        a, b = torch.randn(64, K, generator=gen), torch.randn(64, K, generator=gen)
        (qa, sa), (qb, sb) = quantize_act_ref(a), quantize_weight(b)
        exact = dequantize_act(qa, sa).double() @ dequantize_weight(qb, sb).double().T  # (64, 64)
        err = [((c.double() - exact).abs().max() / exact.abs().max()).item()
               for c in (fp8_gemm_ref(qa, sa, qb, sb, out_dtype=torch.float32), fp8_gemm_no_promotion(qa, sa, qb, sb))]
        rows.append((K, *err))
    return rows


def _demo_main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="CPU demo of the FP8 recipe: 1x128 tiles against one scale per tensor, "
                                "and FP32 promotion against none. The GPU benchmark is `python fp8_bench.py`.")
    _, extra = p.parse_known_args(argv)
    if extra:  # the GPU benchmark has its own command line
        p.error("the CPU demo takes no options; the GPU benchmark is `python fp8_bench.py` (see its --help)")
    print("E4M3 quantization of a (64, 1024) N(0,1) activation with one outlier; mean relative error and share")
    print("of values flushed to 0, over all values outside the outlier's own 1x128 tile:")
    print(f"  {'outlier':>8s}   {'one scale per tensor':>24s}   {'1x128 tiles (V3)':>24s}")
    for mag, t_err, t_zero, b_err, b_zero in demo_outlier():
        print(f"  {mag:8.0e}   {t_err:10.2%} {t_zero:7.2%} zeros   {b_err:10.2%} {b_zero:7.2%} zeros")
    print("\nFP8 GEMM C = A·B^T (64x64, A in 1x128 tiles, B in 128x128 blocks), max |C - C*| / max |C*| against")
    print("the exact product C* of the same FP8 operands, so only the summation differs:")
    print(f"  {'K':>6s}   {'FP32 promotion every 128':>24s}   {'no promotion (14-bit acc.)':>26s}")
    for K, promoted, plain in demo_promotion():
        print(f"  {K:6d}   {promoted:24.1e}   {plain:26.1e}")
    print("  (a 14-bit truncating accumulator emulates the H800's; the report measured nearly 2% at K = 4096)")


if __name__ == "__main__":
    run_demo(_demo_main)
