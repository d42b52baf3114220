"""Fine-grained FP8 training GEMMs (DeepSeek-V3 technical report §3.3).

The recipe, in the report's terms:
  * Format: every FP8 GEMM operand is E4M3 (``torch.float8_e4m3fn``, largest value 448); no E5M2 for gradients.
  * Granularity: activations (and activation gradients) are scaled per token per 128 channels, **1×128 tiles**;
    weights per **128×128 block**. A scale is amax/448 of its tile, so x ≈ x_fp8 · scale: the ``weight_scale_inv``
    convention of the released checkpoints. The amax is taken **online** from the current tensor (no delayed
    scaling history) and clamped at 1e-4 so an all-zero tile gets a finite scale.
  * Promotion: since the scales change along K they cannot leave the sum. The tensor cores sum one 128-wide
    K slice (N_C = 128, four WGMMA k32 steps); the CUDA cores then multiply that partial sum by its two scales
    and add it into an FP32 accumulator. Without this, H800 tensor cores keep only ~14 bits of the running sum
    (≈2% max relative error at K = 4096 in the report): ``fp8_gemm_no_promotion`` emulates that failure.
  * Fprop, Dgrad and Wgrad all run in FP8 (``FP8Linear``); master weights, their gradients and the bias stay
    in FP32.

Reference and fast path: ``fp8_gemm_ref`` is the reference, a Python loop over 128-wide K slices with FP32
promotion, run on CPU and wherever the kernel is unavailable. The fast path is the hand-written sm_90a kernel in
``fp8_gemm.cu`` (tier 1: mma.sync; tiers 2-4: TMA + wgmma + warp specialization, then a TMA-store epilogue, then
promotion overlapped with the next wgmma; tiers 5-7: tier 4 in thread-block clusters that share operand tiles
through TMA multicast; tier 8: a 128×256 tile), JIT-built on first use by
``torch.utils.cpp_extension.load``; ``fp8_gemm`` picks it on Hopper GPUs and says once when it falls back.
``python fp8.py --bench`` times it against torch's bf16 matmul and cuBLAS's blockwise FP8 ``F.scaled_mm``.
"""
import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128        # tile width along K, side of a weight block, and the promotion interval N_C
AMAX_EPS = 1e-4    # amax floor (DeepGEMM's casts and kernel.py's act_quant)
KERNEL_TIER = 4    # tier of fp8_gemm.cu used by fp8_gemm on Hopper (the fastest measured, BENCHMARKS.md)


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


def quantize_act(x: torch.Tensor, pow2_scale: bool = False):
    """1×128 tiles: x (..., K) → (x_fp8 (..., K) e4m3, scale (..., K/128) fp32), x ≈ x_fp8 · scale."""
    _check_high_precision(x, "x")
    K = x.shape[-1] if x.dim() else 0
    if K == 0 or K % BLOCK:
        raise ValueError(f"quantize_act: last dim must be a positive multiple of {BLOCK}, got shape {tuple(x.shape)}")
    tiles = x.float().reshape(*x.shape[:-1], K // BLOCK, BLOCK)       # (..., K/128, 128)
    scale = tiles.abs().amax(-1).clamp(min=AMAX_EPS) / E4M3_MAX        # (..., K/128)
    if pow2_scale:
        scale = _pow2_ceil(scale)
    q = (tiles / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.reshape(x.shape), scale                                   # (..., K), (..., K/128)


def dequantize_act(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_act, in float32."""
    K = x_fp8.shape[-1]
    tiles = x_fp8.float().reshape(*x_fp8.shape[:-1], K // BLOCK, BLOCK)  # (..., K/128, 128)
    return (tiles * scale.unsqueeze(-1)).reshape(x_fp8.shape)


def quantize_weight(w: torch.Tensor):
    """128×128 blocks: w (N, K) → (w_fp8 (N, K) e4m3, scale (ceil(N/128), ceil(K/128)) fp32).

    Edge blocks are zero-padded for the amax (padding never raises it) and cropped afterwards, as in the
    released checkpoints' ``weight_scale_inv``."""
    _check_high_precision(w, "w")
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: w must be 2-D (N, K), got shape {tuple(w.shape)}")
    N, K = w.shape
    nb, kb = -(-N // BLOCK), -(-K // BLOCK)
    wp = F.pad(w.float(), (0, kb * BLOCK - K, 0, nb * BLOCK - N))     # (nb·128, kb·128)
    blocks = wp.reshape(nb, BLOCK, kb, BLOCK)                          # (nb, 128, kb, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_EPS) / E4M3_MAX  # (nb, kb)
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.reshape(nb * BLOCK, kb * BLOCK)[:N, :K].contiguous(), scale


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
def _check_gemm(a, a_scale, b, b_scale) -> bool:
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
    rowwise = _check_gemm(a, a_scale, b, b_scale)
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

    Emulates an accumulator that keeps `acc_bits` significant bits (≈14 on H800, TR §3.3) and truncates after
    each k32 MMA step adds its (exact) partial sum, over the whole K. The scaled products a·s_a·b·s_b are what is
    summed, so the result differs from the promoted reference only through the accumulator; with power-of-2
    scales this equals summing unscaled products and scaling once (exact in binary)."""
    rowwise = _check_gemm(a, a_scale, b, b_scale)
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


def _notice(msg: str):
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
                src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fp8_gemm.cu")
                _EXT = load(name="fp8_gemm_ext", sources=[src], verbose=False,
                            extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])
            except Exception as e:  # a broken toolchain must not break training: fall back, say why
                _WHY_NOT = f"building fp8_gemm.cu failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return _EXT


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """C = A·Bᵀ (see fp8_gemm_ref for the layouts): the CUDA kernel on Hopper, the reference elsewhere."""
    rowwise = _check_gemm(a, a_scale, b, b_scale)
    if a.is_cuda and not rowwise and load_kernel() is not None:
        out = torch.empty(a.shape[0], b.shape[0], dtype=torch.bfloat16, device=a.device)
        with torch.cuda.device(a.device):   # the kernel launches on the current device's current stream
            _EXT.gemm(a.contiguous(), a_scale.contiguous(), b.contiguous(), b_scale.contiguous(), out, KERNEL_TIER)
        return out.to(out_dtype)
    why = ("1×128 scales on B (wgrad) have no kernel" if a.is_cuda and _WHY_NOT is None
           else _WHY_NOT or f"tensors on {a.device.type}")
    _notice(f"{why}; using the PyTorch reference GEMM (slow)")
    return fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype)


# ---------------------------------------------------------------- FP8 training linear
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Same output dtype as nn.Linear: the autocast dtype inside autocast, else the input's dtype.
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _FP8LinearFn(torch.autograd.Function):
    """Y = X·Wᵀ (+ b) with Fprop, Dgrad and Wgrad in FP8 (TR §3.3, Figure 6)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out_dtype = _compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])                            # (T, K)
        xq, xs = quantize_act(x2)                                  # 1×128 tiles along K
        wq, ws = quantize_weight(weight)                           # 128×128 blocks
        y = fp8_gemm(xq, xs, wq, ws, torch.float32)                # (T, N)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x2, wq, ws)   # x kept in high precision: Wgrad re-quantizes it along tokens
        ctx.meta = (x.shape, x.dtype, bias is not None)
        return y.to(out_dtype).reshape(*x.shape[:-1], -1)          # (..., N)

    @staticmethod
    def backward(ctx, dy):
        x2, wq, ws = ctx.saved_tensors
        x_shape, x_dtype, has_bias = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])                         # (T, N)
        # Dgrad dX = dY·W = dY·(Wᵀ)ᵀ: dY in 1×128 tiles along N; Wᵀ's 128×128 blocks are W's, transposed.
        # N is the contraction here: when it is not a multiple of 128, zero rows of W and zero columns of dY
        # fill the last tile (they add nothing; W's last block scale already covers the padded block).
        pad_n = -dy2.shape[1] % BLOCK
        dyq, dys = quantize_act(F.pad(dy2, (0, pad_n)))           # (T, N'), N' = N rounded up to 128
        wq_t = torch.cat([wq, wq.new_zeros(pad_n, wq.shape[1])]).t().contiguous()  # (K, N')
        dx = fp8_gemm(dyq, dys, wq_t, ws.t().contiguous(), torch.float32)  # (T, K)
        # Wgrad dW = dYᵀ·X sums over tokens, so both are quantized in 1×128 tiles along T (rows of dYᵀ and Xᵀ);
        # T is zero-padded to a multiple of 128 (zero tokens add nothing).
        pad = -dy2.shape[0] % BLOCK
        dytq, dyts = quantize_act(F.pad(dy2.t().float(), (0, pad)))  # (N, T'), (N, T'/128)
        xtq, xts = quantize_act(F.pad(x2.t().float(), (0, pad)))     # (K, T'), (K, T'/128)
        dw = fp8_gemm(dytq, dyts, xtq, xts, torch.float32)           # (N, K)
        db = dy2.float().sum(0) if has_bias else None
        return dx.to(x_dtype).reshape(x_shape), dw, db


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) whose three GEMMs run in FP8.

    Master weight (and bias) are FP32 parameters named like nn.Linear's; they are re-quantized (online amax)
    on every forward. in_features must be a multiple of 128 (the forward contracts over it in whole 1×128
    tiles); out_features may be any size (the last 128×128 weight block is partial, like V3's 576-row wkv_a). Output dtype as
    nn.Linear's (the autocast dtype under autocast, else the input dtype; fp32 on CPU)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if not isinstance(out_features, int) or out_features <= 0:
            raise ValueError(f"FP8Linear: out_features={out_features} must be a positive integer")
        if not isinstance(in_features, int) or in_features <= 0 or in_features % BLOCK:
            raise ValueError(f"FP8Linear: in_features={in_features} must be a positive multiple of {BLOCK} "
                             f"(activations are quantized in 1×128 tiles along it); choose such dims for FP8 runs")
        self.in_features, self.out_features = in_features, out_features
        kw = dict(device=device, dtype=dtype or torch.float32)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))     # nn.Linear's default
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: input last dim {x.shape[-1]} != in_features {self.in_features}")
        return _FP8LinearFn.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------- benchmark
SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def _vendor_blockwise(xq, xs, wq, ws):
    """cuBLAS blockwise FP8 through torch: returns (callable, name). Layouts per torch's ScaledBlas checks:
    A-scales (M, K/128) with strides (1, M); B = Wᵀ column-major; B-scales (round_up(K/128, 4), N/128)."""
    sa = xs.t().contiguous().t()                                          # (M, K/128), M-major
    sb = F.pad(ws, (0, -ws.shape[1] % 4)).t()                              # (Kb4, Nb), strides (1, Kb4)
    tries = [(lambda: torch._scaled_mm(xq, wq.t(), sa, sb, out_dtype=torch.bfloat16), "torch._scaled_mm")]
    if hasattr(F, "scaled_mm"):
        tries.insert(0, (lambda: F.scaled_mm(xq, wq.t(), sa, F.ScalingType.BlockWise1x128, sb,
                                             F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16),
                         "F.scaled_mm"))
    for fn, name in tries:
        try:
            fn()
            return fn, name
        except Exception as e:  # noqa: PERF203 - report the last failure
            err = e
    raise err


def bench(tiers=(1, 2, 3, 4, 5, 6, 7, 8)):
    if load_kernel() is None:
        raise SystemExit(f"fp8.py --bench needs a Hopper GPU and the kernel: {_WHY_NOT}")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("# TFLOP/s = 2MNK / median time (CUDA events, 10 warm-ups, 50 reps, no L2 flush); "
          "(calc_diff vs bf16 x@w.T of the unquantized inputs)")
    head = [f"tier{t}" for t in tiers] + ["bf16 mm", "vendor blockwise"]
    print("| M | N | K | " + " | ".join(head) + " |")
    print("|---" * (3 + len(head)) + "|")
    vendor_name = "n/a"
    shapes = [(4096, n, k) for n, k in SHAPES_NK] + [(8192, 8192, 8192)] + [(128, n, k) for n, k in SHAPES_NK]
    for M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_act(x)
        wq, ws = quantize_weight(w)
        ref = x @ w.T
        cells = []
        for t in tiers:
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            ms = _median_ms(lambda: _EXT.gemm(xq, xs, wq, ws, out, t))
            cells.append(f"{2 * M * N * K / ms / 1e9:.0f} ({calc_diff(out, ref):.1e})")
        ms = _median_ms(lambda: x @ w.T)
        cells.append(f"{2 * M * N * K / ms / 1e9:.0f}")
        try:
            fn, vendor_name = _vendor_blockwise(xq, xs, wq, ws)
            ms = _median_ms(fn)
            cells.append(f"{2 * M * N * K / ms / 1e9:.0f} ({calc_diff(fn(), ref):.1e})")
        except Exception as e:
            cells.append(f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
        print(f"| {M} | {N} | {K} | " + " | ".join(cells) + " |", flush=True)
        del x, w, xq, wq, ref
        torch.cuda.empty_cache()
    print(f"# vendor blockwise = {vendor_name} (BlockWise1x128 × BlockWise128x128)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Fine-grained FP8 GEMM (DeepSeek-V3 §3.3): benchmark on a Hopper GPU")
    p.add_argument("--bench", action="store_true", help="print TFLOP/s of the kernel tiers, bf16 mm, cuBLAS FP8")
    p.add_argument("--tiers", default="1,2,3,4,5,6,7,8", help="kernel tiers to time, comma-separated (default all)")
    args = p.parse_args()
    if not args.bench:
        p.print_help()
        sys.exit(0)
    bench(tuple(int(t) for t in args.tiers.split(",")))
