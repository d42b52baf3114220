"""The FP8 GEMM kernel built step by step: numbered CUDA files a reader can open and diff one after the other
(README.md beside this file walks the ladder with its measured speeds). Each step computes what fp8.fp8_gemm_ref
computes; tests/test_fp8_teaching.py checks every one against it on a Hopper GPU.

``gemm(step, a, a_scale, b, b_scale)`` runs one step after checking its operands; ``load()`` JIT-builds the four
steps into one module (steps 2-4 need sm_90a) and returns it.
"""
import os

import torch

from fp8 import BLOCK, FP8, check_gemm_operands

STEPS = ("01_mma_sync.cu", "02_tma_wgmma.cu", "03_tma_store.cu", "04_overlap.cu")
_EXT = None


def load():
    """The module: its gemm(step, a, a_scale, b, b_scale, out) runs a step and returns "" or what went wrong (see
    bind.cu). Raises RuntimeError where the kernels cannot run."""
    global _EXT
    if _EXT is None:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
            raise RuntimeError("the teaching kernels need a Hopper (sm_90) GPU")
        from torch.utils.cpp_extension import load as build
        here = os.path.dirname(os.path.abspath(__file__))
        _EXT = build(name="fp8_teaching_ext", sources=[os.path.join(here, f) for f in STEPS + ("bind.cu",)],
                     extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
    return _EXT


def gemm(step: int, a, a_scale, b, b_scale, out=None) -> torch.Tensor:
    """C = A·Bᵀ in bf16 by teaching step `step` (1-4): a (M, K) e4m3 with a_scale (M, K/128), b (N, K) e4m3 with
    128×128 block scales b_scale (ceil(N/128), K/128), as fp8.fp8_gemm_ref takes them; all contiguous on a Hopper
    GPU. Writes into `out` (M, N) bf16 when given. Raises ValueError for operands the step cannot take."""
    if step not in (1, 2, 3, 4):
        raise ValueError(f"teaching gemm: step must be 1, 2, 3 or 4, got {step!r}")
    if check_gemm_operands(a, a_scale, b, b_scale):
        raise ValueError("teaching gemm: b_scale must hold 128×128 blocks, (ceil(N/128), K/128)")
    (M, K), N = a.shape, b.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    tensors = (a, a_scale, b, b_scale, out)
    if not all(t.is_cuda and t.is_contiguous() for t in tensors):
        raise ValueError("teaching gemm: operands and out must be contiguous CUDA tensors")
    if out.dtype != torch.bfloat16 or tuple(out.shape) != (M, N):
        raise ValueError(f"teaching gemm: out must be ({M}, {N}) bfloat16")
    if any(t.data_ptr() % 16 for t in (a, b, out)):
        raise ValueError("teaching gemm: a, b and out must be 16-byte aligned")
    if step >= 3 and N % 8:
        raise ValueError(f"teaching gemm: step {step} stores by TMA, which needs N % 8 == 0 (N = {N})")
    assert a.dtype == FP8 and K % BLOCK == 0                              # (check_gemm_operands saw to it)
    err = load().gemm(step, *tensors)
    if err:
        raise RuntimeError(f"teaching gemm: {err}")
    return out
