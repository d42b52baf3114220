"""The FP8 GEMM kernel built step by step: numbered CUDA files a reader can open and diff one after the other
(README.md beside this file walks the ladder with its measured speeds). Each step computes what fp8.fp8_gemm_ref
computes; tests/test_fp8_teaching.py checks every one against it on a Hopper GPU.

``load()`` JIT-builds the four steps into one module (steps 2-4 need sm_90a) and returns it, or raises
RuntimeError saying why not.
"""
import os

import torch

STEPS = ("01_mma_sync.cu", "02_tma_wgmma.cu", "03_tma_store.cu", "04_overlap.cu")
_EXT = None


def load():
    """The module with step1 ... step4(a, a_scale, b, b_scale, out) (layouts in bind.cu)."""
    global _EXT
    if _EXT is None:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
            raise RuntimeError("the teaching kernels need a Hopper (sm_90) GPU")
        from torch.utils.cpp_extension import load as build
        here = os.path.dirname(os.path.abspath(__file__))
        _EXT = build(name="fp8_teaching_ext", sources=[os.path.join(here, f) for f in STEPS + ("bind.cu",)],
                     extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
    return _EXT
