"""Tests of fp8_teaching/: every step of the kernel ladder computes fp8.fp8_gemm_ref's C = A·Bᵀ (on a Hopper GPU)."""
import os

import pytest
import torch

import fp8

hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                            reason="needs a Hopper (sm_90) GPU")


def test_steps_are_numbered_files():
    """The ladder's files exist in the order load() builds them, so that a reader can diff step n with step n + 1."""
    import fp8_teaching
    here = os.path.dirname(os.path.abspath(fp8_teaching.__file__))
    assert [f[:2] for f in fp8_teaching.STEPS] == ["01", "02", "03", "04"]
    assert all(os.path.isfile(os.path.join(here, f)) for f in fp8_teaching.STEPS + ("bind.cu", "README.md"))


def test_gemm_refuses_what_a_step_cannot_take():
    """One clear ValueError, on any machine, before anything is built or launched."""
    import fp8_teaching
    aq, a_s = fp8.quantize_act(torch.randn(4, 256))
    wq, ws = fp8.quantize_weight(torch.randn(136, 256))
    with pytest.raises(ValueError, match="step must be 1, 2, 3 or 4"):
        fp8_teaching.gemm(5, aq, a_s, wq, ws)
    with pytest.raises(ValueError, match="128×128 blocks"):
        fp8_teaching.gemm(1, aq, a_s, aq, a_s)                          # 1×128 scales on B: the Wgrad layout
    with pytest.raises(ValueError, match="contiguous CUDA tensors"):
        fp8_teaching.gemm(1, aq, a_s, wq, ws)                           # on the CPU
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_teaching.gemm(1, aq[:, :100], a_s, wq[:, :100], ws)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("step", [1, 2, 3, 4])
@pytest.mark.parametrize("M,N,K", [(1, 128, 128), (65, 136, 256), (65, 130, 256), (200, 384, 1024),
                                   (1000, 4096, 7168), (2000, 2112, 640), (4161, 1032, 128)])
def test_step_matches_reference(step, M, N, K):
    """Each step against the reference, on fresh inputs, twice (a race shows as a difference), poisoned output.
    (2000, 2112, 640) and (4161, 1032, 128) give the persistent grid's CTAs two or three tiles with an odd number of
    K blocks (step 4 ends a tile in either accumulator). N = 130 is refused by the steps that store by TMA."""
    import fp8_teaching
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    x = torch.randn(M, K, device="cuda") * torch.rand(M, 1, device="cuda") * 4
    w = torch.randn(N, K, device="cuda")
    xq, xs = fp8.quantize_act(x)
    wq, ws = fp8.quantize_weight(w)
    if step >= 3 and N % 8:
        with pytest.raises(ValueError, match="N % 8 == 0"):
            fp8_teaching.gemm(step, xq, xs, wq, ws)
        return
    ref = fp8.fp8_gemm_ref(xq, xs, wq, ws, torch.float32)
    outs = []
    for _ in range(2):
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        assert fp8_teaching.gemm(step, xq, xs, wq, ws, out) is out
        torch.cuda.synchronize()
        outs.append(out)
    assert not outs[0].isnan().any(), f"unwritten outputs (seed {seed})"
    assert torch.equal(outs[0], outs[1]), f"non-deterministic (seed {seed})"
    assert fp8.calc_diff(outs[0], ref) < 1e-5, f"seed {seed}"
    torch.testing.assert_close(outs[0].float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.gpu
@hopper
def test_module_returns_errors_instead_of_raising():
    """Called directly, the module refuses what a step cannot take with a message (no C++ exception crosses into
    Python), and runs nothing."""
    import fp8_teaching
    ext = fp8_teaching.load()
    xq, xs = fp8.quantize_act(torch.randn(65, 256, device="cuda"))
    wq, ws = fp8.quantize_weight(torch.randn(130, 256, device="cuda"))
    out = torch.full((65, 130), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert "N % 8 == 0" in ext.gemm(3, xq, xs, wq, ws, out)
    assert "bf16 out" in ext.gemm(1, xq, xs, wq, ws, out.float())
    assert "step must be" in ext.gemm(7, xq, xs, wq, ws, out)
    assert out.isnan().all()
    assert ext.gemm(2, xq, xs, wq, ws, out) == "" and not out.isnan().any()
