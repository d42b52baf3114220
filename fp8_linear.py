"""FP8 training linear layer (DeepSeek-V3 technical report §3.3, Figure 6): Y = X·Wᵀ (+ b) with its three GEMMs in
FP8, built on fp8.py's quantization and kernels.

  * Fprop Y = X·Wᵀ: X in 1×128 tiles along K, W in 128×128 blocks.
  * Dgrad dX = dY·W: dY in 1×128 tiles along N, W's blocks transposed (Wᵀ is written with W in one pass).
  * Wgrad dW = dYᵀ·X: both operands quantized in 1×128 tiles along the tokens ("1D1D"), FP32 output.
  * Master weight, bias and their gradients stay FP32; the output dtype is nn.Linear's.
  * X and dY are each quantized both ways in one pass (fp8.quantize_act_both): what the backward keeps of X for
    Wgrad is its FP8 tiles along the tokens, made in the forward from X itself (one byte per value).
  * Low-precision storage (report §3.3.3): ``FP8Linear.act_cache`` keeps X's Fprop tiles (1×128 E4M3), or 1×128
    E5M6 tiles with power-of-2 scales, instead; Wgrad then quantizes their values again along the tokens.
  * With gradient accumulation the weights do not change between micro-batches: ``weights_quantized_once``
    quantizes each FP8 weight of a model (these layers and the routed experts of fp8_experts.py) once per
    optimizer step, the same bits as quantizing in every forward; and ``grads_accumulated_in_wgrad`` has the
    Wgrad GEMM add each micro-batch's weight gradient into ``.grad`` itself (the same sums as autograd's).

The reference for every GEMM here is fp8.fp8_gemm_ref (with fp8.quantize_act_ref and fp8.quantize_weight_ref):
on a CPU the functions this layer calls run it. Tests compare the layer's outputs and gradients with the same
linear in fp32 (calc_diff < 1e-3) and, bit for bit, with fp8's functions composed by hand.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fp8 import (BLOCK, dequantize_act, fp8_gemm, fp8_gemm_into, quantize_act, quantize_act_both, quantize_act_t,
                 quantize_e5m6, quantize_weight)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Same output dtype as nn.Linear: the autocast dtype inside autocast, else the input's dtype.
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _FP8LinearFn(torch.autograd.Function):
    """Y = X·Wᵀ (+ b) with Fprop, Dgrad and Wgrad in FP8 (report §3.3, Figure 6)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act_cache="bf16", grad_mode=True, grad_into=None, wq=None, ws=None,
                wq_t=None):
        # What the backward will want; grad_mode: whether gradients were on where the layer was called (inside
        # forward they are off, and ctx.needs_input_grad says only which inputs require one)
        want_dx, want_dw = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        out_dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])                            # (T, K)
        # 1×128 tiles along K, scales as the kernel wants; with act_cache "bf16", Wgrad's tiles along the tokens
        # too, made now from x itself in the same pass (xt: (K, T'), (K, T'/128)), and kept instead of x
        xt = None
        if act_cache == "bf16" and want_dw:
            (xq, xs), xt = quantize_act_both(x2, mmajor=True)
        else:
            xq, xs = quantize_act(x2, mmajor=True)
        if wq is not None:           # quantized once for this optimizer step (weights_quantized_once)
            wq_t = wq_t if want_dx else None
        elif want_dx:                # 128×128 blocks, and Wᵀ for Dgrad (N padded to N'↑128) in the same pass
            wq, ws, wq_t = quantize_weight(weight, transpose=True)    # (N, K), (N/128, K/128), (K, N')
        else:                        # no dX wanted (inference, or an input without grad): no Wᵀ
            (wq, ws), wq_t = quantize_weight(weight), None
        y = fp8_gemm(xq, xs, wq, ws, out_dtype if bias is None else torch.float32)  # (T, N)
        if bias is not None:
            y = (y + bias.float()).to(out_dtype)
        # What Wgrad gets of x (report §3.3.3, low-precision storage): its 128×1 tiles along the tokens, quantized
        # from x itself ("bf16": made above; x is kept instead where they were not), or what it re-quantizes so:
        # the Fprop's own 1×128 E4M3 tiles ("fp8") or 1×128 E5M6 tiles ("e5m6"), dequantized.
        # Of the weight, the backward needs only Wᵀ and the scales (Dgrad); Wgrad does not read W.
        # grad_into: the weight's gradient, which Wgrad adds into in place (grads_accumulated_in_wgrad), or None.
        if act_cache == "fp8":
            ctx.save_for_backward(xq, xs, wq_t, ws, grad_into)
        elif act_cache == "e5m6":
            ctx.save_for_backward(*quantize_e5m6(x2), wq_t, ws, grad_into)
        elif xt is not None:
            ctx.save_for_backward(*xt, wq_t, ws, grad_into)
        else:
            ctx.save_for_backward(x2, wq_t, ws, grad_into)
        ctx.meta = (x.shape, x.dtype, weight.dtype, bias is not None, act_cache, xt is not None)
        return y.reshape(*x.shape[:-1], y.shape[-1])               # (..., N)

    @staticmethod
    def backward(ctx, dy):
        x_shape, x_dtype, w_dtype, has_bias, act_cache, kept_t = ctx.meta
        x2 = xt = None
        if kept_t:  # Wgrad's tiles of x, made in the forward
            *xt, wq_t, ws, grad_into = ctx.saved_tensors
        elif act_cache == "bf16":
            x2, wq_t, ws, grad_into = ctx.saved_tensors
        else:  # the cached 1×128 tiles, back to values: their 128×1 tiles along tokens are cut below
            xc, xcs, wq_t, ws, grad_into = ctx.saved_tensors
            x2 = dequantize_act(xc, xcs)
        dy2 = dy.reshape(-1, dy.shape[-1])                         # (T, N)
        N = dy2.shape[1]
        # Wgrad dW = dYᵀ·X sums over tokens, so both are quantized in 1×128 tiles along T (rows of dYᵀ and Xᵀ);
        # T is zero-padded to a multiple of 128 (zero tokens add nothing).
        # Dgrad dX = dY·W = dY·(Wᵀ)ᵀ: dY in 1×128 tiles along N; Wᵀ's 128×128 blocks are W's, transposed.
        # N is the contraction here: when it is not a multiple of 128, zero columns of Wᵀ (written so by
        # quantize_weight) and of dY fill the last tile (they add nothing; W's last block scale covers the padding).
        # dY's two tilings come from one pass; Wgrad drops those of the zero columns.
        dx = None
        if wq_t is not None:
            pad_n = -N % BLOCK
            dyp = F.pad(dy2, (0, pad_n)) if pad_n else dy2        # (T, N'), N' = N↑128
            (dyq, dys), (dytq, dyts) = quantize_act_both(dyp, mmajor=True)
            dytq, dyts = dytq[:N], dyts[:N]                        # (N, T'), (N, T'/128): the first rows, contiguous
            dx = fp8_gemm(dyq, dys, wq_t, ws.t().contiguous(), x_dtype).reshape(x_shape)  # (T, K) → x's shape
        else:
            dytq, dyts = quantize_act_t(dy2)                       # (N, T'), (N, T'/128)
        xtq, xts = xt if xt is not None else quantize_act_t(x2)    # (K, T'), (K, T'/128)
        if grad_into is not None:  # added to the weight's gradient in place: none for autograd to add
            if dy2.shape[0]:
                fp8_gemm_into(dytq, dyts, xtq, xts, grad_into)
            dw = None
        else:
            dw = (fp8_gemm(dytq, dyts, xtq, xts, w_dtype) if dy2.shape[0]  # (N, K)
                  else torch.zeros(dy2.shape[1], x_shape[-1], dtype=w_dtype, device=dy.device))  # no tokens
        db = dy2.float().sum(0) if has_bias else None
        return dx, dw, db, None, None, None, None, None, None


ACT_CACHES = ("bf16", "fp8", "e5m6")


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) whose three GEMMs run in FP8.

    Master weight (and bias) are FP32 parameters named like nn.Linear's; they are re-quantized (online amax)
    on every forward, or once per optimizer step inside `weights_quantized_once` (`quantized`). in_features must
    be a multiple of 128 (the forward contracts over it in whole 1×128 tiles); out_features may be any size (the
    last 128×128 weight block is partial, like V3's 576-row wkv_a).
    Under autocast the input is cast to the autocast dtype first, as nn.Linear casts it; the output dtype is
    nn.Linear's (the autocast dtype under autocast, else the input dtype; fp32 on CPU).

    act_cache (class attribute, or set per layer): what the layer keeps of its input for Wgrad. "bf16" (the
    default: quantized from the input in its own precision) keeps Wgrad's 128×1 E4M3 tiles along the tokens,
    made in the forward in the same pass as Fprop's (the values a backward would make from the input itself).
    "fp8" keeps the Fprop's 1×128 E4M3 tiles, and "e5m6" 1×128 E5M6 tiles with power-of-2 scales. The report
    does the latter two (E5M6 for the input of the Linear after attention); Wgrad then re-quantizes the
    dequantized values in 128×1 tiles along tokens, a second rounding."""

    act_cache = "bf16"
    quantized = None  # (weight, w_fp8, scale, w_t), set by weights_quantized_once; None: quantize per call
    grad_into = None  # (weight, its .grad), set by grads_accumulated_in_wgrad; None: autograd sums the gradients

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
        if self.act_cache not in ACT_CACHES:
            raise ValueError(f"FP8Linear: act_cache={self.act_cache!r}, expected one of {ACT_CACHES}")
        # Under autocast the input is cast to the autocast dtype first, as nn.Linear's is: the FP8 GEMMs quantize
        # BF16 activations (report Figure 6), and dX comes out in that dtype (the cast's backward brings it back).
        x = x.to(compute_dtype(x))
        # the copy made from this very weight, or none (e.g. torch.func.functional_call passing another one)
        q = copies_for(self.quantized, (self.weight,))
        g = copies_for(self.grad_into, (self.weight,)) or (None,)
        return _FP8LinearFn.apply(x, self.weight, self.bias, self.act_cache, torch.is_grad_enabled(), *g, *q)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_cache={self.act_cache}")


def copies_for(quantized, weights) -> tuple:
    """The FP8 copies in `quantized` (what weights_quantized_once stores: the weights, then each one's w_fp8,
    scale and w_t) if they were made from these very weights, else () (quantize them now). The same for the
    gradient buffers grads_accumulated_in_wgrad stores (the weights, then their .grad)."""
    n = len(weights)
    # `is not None and len(...)`, not `bool(quantized)`: torch 2.11's dynamo cannot trace bool() of a tuple and
    # would split the compiled model's graph at every FP8 layer.
    fresh = quantized is not None and len(quantized) > n and all(a is b for a, b in zip(quantized[:n], weights))
    return tuple(quantized[n:]) if fresh else ()


@contextlib.contextmanager
def weights_quantized_once(model: nn.Module):
    """Quantize each FP8 weight of `model` once for all the passes inside the block: the micro-batches of one
    optimizer step, between which the weights do not change.

    Outside such a block an FP8 layer quantizes its weight (128×128 blocks, and Wᵀ for Dgrad) in every forward, so
    M micro-batches of gradient accumulation pass M times over every weight to get the same bits. Inside, the
    FP8Linear layers and the FP8 routed experts (moe.Experts with an `ffn`) use what was quantized on entering
    (their `quantized` attribute: the weights it was made from, then each one's w_fp8, scale and w_t): the same
    values, one pass. The price is memory: W and Wᵀ in FP8 of every layer are held for the whole block (2 bytes
    per weight), where per forward only Wᵀ is kept, from a layer's forward to its backward. So it pays with M > 1.
    The weights must stay as they are inside the block (the optimizer step comes after it): leaving it checks
    their version counters and raises if one was changed in place. One process only: sharded weights (FSDP,
    expert parallelism: DTensors) are refused."""
    held = _fp8_weights(model)
    if any(isinstance(w, DTensor) for _, ws in held for w in ws):
        raise ValueError("weights_quantized_once: sharded (DTensor) weights are not supported; one process only")
    versions = [(w, w._version) for _, ws in held for w in ws]
    try:
        with torch.no_grad():
            made = [ws + tuple(t for w in ws for t in quantize_weight(w, transpose=True)) for _, ws in held]
        for (m, _), q in zip(held, made):  # set only once every copy is made: a failure leaves none behind
            m.quantized = q
        yield
    finally:
        for m, _ in held:
            m.quantized = None
    if any(w._version != v for w, v in versions):
        raise RuntimeError("weights_quantized_once: a weight changed inside the block, where its FP8 copy was "
                           "quantized once; step the optimizer outside the block")


def _fp8_weights(model: nn.Module) -> list:
    """[(module, its FP8 weights)]: each FP8Linear's weight, and w1, w3, w2 of the FP8 routed experts (moe.Experts
    with an `ffn`)."""
    held = [(m, (m.weight,)) for m in model.modules() if isinstance(m, FP8Linear)]
    return held + [(m, (m.w1, m.w3, m.w2)) for m in model.modules()
                   if hasattr(m, "quantized") and getattr(m, "ffn", None) is not None]


@contextlib.contextmanager
def grads_accumulated_in_wgrad(model: nn.Module):
    """Inside the block, each FP8 weight's gradient is summed over the micro-batches by its Wgrad GEMM itself.

    Outside, autograd sums them: each micro-batch's Wgrad writes a new fp32 gradient, which AccumulateGrad then
    adds into `.grad` (a pass that reads both and writes one), M − 1 times for M micro-batches, over every weight.
    Inside, every FP8 weight that wants a gradient has one from the start (`.grad` as it was, or zeros), handed to
    its layer (`grad_into`: the weights, then their gradients); the layer's backward has the Wgrad kernel add its
    tile to what `.grad` holds as it stores it (fp8.fp8_gemm_into, fp8_experts.fp8_gemm_kgrouped_into) and gives
    autograd no gradient for that weight. The sums are the same bits: 0 + g = g, then the same fp32 additions.

    Since autograd never sees those gradients, nothing it runs when a gradient arrives runs: hooks on the weights
    (refused here) and those of DDP / FSDP (one process only: sharded weights are refused). FP32 weights only
    (others are left to autograd). Setting the gradients to None inside the block (zero_grad()'s default) would
    drop the buffers the layers add into: leaving it checks that every weight's `.grad` is still its buffer and
    raises if not. A weight shared by two FP8 layers, and a block inside another, are refused on entering.

    Where it differs from autograd, by design: every FP8 weight leaves the block with a `.grad`, zeros for one no
    backward reached (autograd would leave None, and an optimizer would skip it); each backward run inside adds
    its weight gradients, also one restricted with `inputs=` or `torch.autograd.grad`; and a layer called twice
    in one forward adds its two gradients one after the other (the same sum, in another order than autograd's;
    on the CPU the in-place add trips autograd's check of saved tensors and the backward raises). train.py's
    models call each FP8 layer once per forward and reach every weight."""
    held = [(m, ws) for m, ws in _fp8_weights(model)
            if all(w.requires_grad and w.dtype == torch.float32 for w in ws)]
    if any(isinstance(w, DTensor) for _, ws in held for w in ws):
        raise ValueError("grads_accumulated_in_wgrad: sharded (DTensor) weights are not supported; one process only")
    if any(m.grad_into is not None for m, _ in held):
        raise ValueError("grads_accumulated_in_wgrad: already inside such a block for this model")
    if len({id(w) for _, ws in held for w in ws}) < sum(len(ws) for _, ws in held):
        raise ValueError("grads_accumulated_in_wgrad: a weight is shared by two FP8 layers, whose Wgrads would "
                         "add into its gradient in another order than autograd's; leave this block out")
    if any(w._backward_hooks or getattr(w, "_post_accumulate_grad_hooks", None) for _, ws in held for w in ws):
        raise ValueError("grads_accumulated_in_wgrad: a weight has gradient hooks, which would not run "
                         "(its gradient never passes through autograd inside the block)")
    with torch.no_grad():
        for _, ws in held:
            for w in ws:
                if w.grad is None:
                    w.grad = torch.zeros_like(w, memory_format=torch.contiguous_format)
                elif not w.grad.is_contiguous():
                    w.grad = w.grad.contiguous()
    grads = [tuple(w.grad for w in ws) for _, ws in held]
    try:
        for (m, ws), g in zip(held, grads):
            m.grad_into = ws + g
        yield
    finally:
        for m, _ in held:
            m.grad_into = None
    if any(w.grad is not b for (_, ws), g in zip(held, grads) for w, b in zip(ws, g)):
        raise RuntimeError("grads_accumulated_in_wgrad: a weight's .grad was replaced or cleared inside the block, "
                           "where its Wgrad adds into it; zero the gradients outside the block")
