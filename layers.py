"""Small building blocks shared by the concept files: RMSNorm and the SwiGLU feed-forward (and run_demo, which
runs a concept file's printed demo).

Both follow the official DeepSeek-V3 inference code:
- RMSNorm(x) = x / sqrt(mean(x²) + eps) · w, with eps = 1e-6 and the statistics in fp32
  (the input is upcast, normalised, cast back, then multiplied by the weight).
- SwiGLU FFN(x) = W2 (SiLU(W1 x) ⊙ W3 x), no biases. W1 is the "gate" projection, W3 the "up" projection,
  W2 the "down" projection (Hugging Face names gate_proj, up_proj, down_proj).

The linear-layer class is passed in (`linear=nn.Linear` by default) so that the FP8 training linear of
`fp8.py` can be dropped in without these files knowing about it.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32 for precision-sensitive math (norms, softmax, router, losses); fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in (at least) fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_fp32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.type_as(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense FFN of the first layers, one routed expert, or the shared experts."""

    def __init__(self, dim: int, inter_dim: int, linear=nn.Linear):
        super().__init__()
        self.w1 = linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def run_demo(main) -> None:
    """`python mla.py` and the other concept files: run the demo's main(); piped into a reader that stops early
    (`python mla.py | head`), end quietly instead of with a BrokenPipeError traceback."""
    try:
        main()
        sys.stdout.flush()  # into a pipe the output waits in a buffer: a reader gone shows here, not at exit
    except BrokenPipeError:  # the reader went away; stdout now points nowhere, so Python's exit flush is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
