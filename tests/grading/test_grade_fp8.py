"""Grading tests for fp8.py (exercises.py): tile and block quantization, and the promoted reference GEMM (report §3.3).

Scales are checked tile by tile against amax/448 (amax floored at fp8.AMAX_EPS); the GEMM against a float64 sum
written here one 128-wide K block at a time, each block's partial sum times its two scales."""
import math

import pytest
import torch

import fp8

E4M3 = torch.float8_e4m3fn


def tile_data(rows, K, gen):
    """Values whose magnitude differs from tile to tile (an outlier tile, a tiny one, an all-zero one)."""
    x = torch.randn(rows, K, generator=gen)
    mags = torch.tensor([10.0 ** (i % 5 - 2) for i in range(K // 128)])  # 0.01 .. 100 per tile
    x = x * mags.repeat_interleave(128)
    x[0, :128] = 0.0  # an all-zero tile: its scale is the floor, AMAX_EPS/448
    return x


@pytest.mark.grades("fp8.quantize_act_ref")
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_act_tiles(pow2):
    gen = torch.Generator().manual_seed(0)
    x = tile_data(3, 640, gen)
    q, scale = fp8.quantize_act_ref(x, pow2) if pow2 else fp8.quantize_act_ref(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (3, 5) and scale.dtype == torch.float32
    for r in range(3):
        for t in range(5):
            tile = x[r, t * 128:(t + 1) * 128]
            want = max(tile.abs().max().item(), fp8.AMAX_EPS) / 448
            if pow2:
                want = 2.0 ** math.ceil(math.log2(want))  # the next power of 2 at or above amax/448
            got = scale[r, t].item()
            assert got == pytest.approx(want, rel=1e-6, abs=0), f"row {r}, tile {t}: scale {got:.6g}, want {want:.6g}"
            back = q[r, t * 128:(t + 1) * 128].double() * scale[r, t].item()
            # E4M3 keeps 3 mantissa bits: each value within half a step (2^-4 relative), tiny ones within a
            # subnormal step
            bound = tile.double().abs() * 2.0 ** -4 + scale[r, t].item() * 2.0 ** -9
            assert ((back - tile.double()).abs() <= bound).all(), f"row {r}, tile {t}: x ≈ x_fp8 · scale"
            if not pow2 and tile.abs().max() > fp8.AMAX_EPS:
                assert q[r, t * 128:(t + 1) * 128].float().abs().max().item() == 448.0, "amax maps to 448"


@pytest.mark.grades("fp8.quantize_act_ref")
def test_quantize_act_batched_shape():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 256, generator=gen).bfloat16()
    q, scale = fp8.quantize_act_ref(x)
    assert q.shape == (2, 3, 256) and scale.shape == (2, 3, 2)
    tiles = x.float().reshape(2, 3, 2, 128)
    torch.testing.assert_close(scale, tiles.abs().amax(-1) / 448, rtol=1e-6, atol=0)


@pytest.mark.grades("fp8.quantize_weight_ref")
@pytest.mark.parametrize("N, K", [(256, 384), (200, 300), (64, 128)])
def test_quantize_weight_blocks(N, K):
    gen = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=gen) * 0.02
    w[:128, :128] *= 50  # an outlier block: its neighbours keep their own, smaller scales
    w[128:, :128] = 0.0  # an all-zero block (when N > 128): its scale is the floor, AMAX_EPS/448
    q, scale = fp8.quantize_weight_ref(w)
    nb, kb = -(-N // 128), -(-K // 128)
    assert q.dtype == E4M3 and q.shape == (N, K) and scale.shape == (nb, kb)
    for i in range(nb):
        for j in range(kb):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]  # edge blocks are smaller
            want = max(block.abs().max().item(), fp8.AMAX_EPS) / 448
            got = scale[i, j].item()
            assert got == pytest.approx(want, rel=1e-6, abs=0), f"block ({i}, {j}): scale {got:.6g}, want {want:.6g}"
            back = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double() * scale[i, j].item()
            bound = block.double().abs() * 2.0 ** -4 + scale[i, j].item() * 2.0 ** -9
            assert ((back - block.double()).abs() <= bound).all(), f"block ({i}, {j}): w ≈ w_fp8 · scale"


# -- the promoted GEMM ---------------------------------------------------------------------------------------
def gemm_plain(a, sa, b, sb_rows):
    """C[m, n] = Σ_kb (Σ_{k in block kb} a[m, k]·b[n, k]) · sa[m, kb] · sb[n, kb], in float64."""
    M, K = a.shape
    out = torch.zeros(M, b.shape[0], dtype=torch.float64)
    for kb in range(K // 128):
        ks = slice(kb * 128, (kb + 1) * 128)
        part = a[:, ks].double() @ b[:, ks].double().T  # (M, N): exact products of fp8 values
        out += part * sa[:, kb:kb + 1].double() * sb_rows[:, kb].double()
    return out


def fp8_operands(M, N, K, gen):
    a = (torch.randn(M, K, generator=gen) * 40).clamp(-448, 448).to(E4M3)
    b = (torch.randn(N, K, generator=gen) * 40).clamp(-448, 448).to(E4M3)
    sa = torch.exp2(torch.randint(-12, -4, (M, K // 128), generator=gen).float()) * (1 + torch.rand(M, K // 128,
                                                                                                   generator=gen))
    return a, b, sa


@pytest.mark.grades("fp8.fp8_gemm_ref")
@pytest.mark.parametrize("M, N, K", [(5, 130, 384), (64, 256, 512), (1, 7, 128)])
def test_fp8_gemm_ref_blocks(M, N, K):
    gen = torch.Generator().manual_seed(M + N + K)
    a, b, sa = fp8_operands(M, N, K, gen)
    sb = torch.rand(-(-N // 128), K // 128, generator=gen) * 0.01 + 1e-3  # 128×128 weight blocks
    got = fp8.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32)
    want = gemm_plain(a, sa, b, sb.repeat_interleave(128, 0)[:N])  # row n uses block n // 128
    assert got.shape == (M, N) and got.dtype == torch.float32
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, f"max error {err:.3g} of the largest entry against the fp64 sum per K block"


@pytest.mark.grades("fp8.fp8_gemm_ref")
def test_fp8_gemm_ref_row_scales_and_bf16():
    gen = torch.Generator().manual_seed(7)
    M, N, K = 9, 20, 256
    a, b, sa = fp8_operands(M, N, K, gen)
    sb = torch.rand(N, K // 128, generator=gen) * 0.01 + 1e-3  # 1×128 tiles on B too (Wgrad's layout)
    want = gemm_plain(a, sa, b, sb)
    got = fp8.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32)
    assert (got.double() - want).abs().max() / want.abs().max() < 1e-5
    got16 = fp8.fp8_gemm_ref(a, sa, b, sb)  # default output: bf16
    assert got16.dtype == torch.bfloat16
    assert (got16.double() - want).abs().max() / want.abs().max() < 1e-2


@pytest.mark.grades("fp8.quantize_act_ref")
def test_quantize_act_zero_tile_scale_is_the_floor():
    # pytest.approx's default abs=1e-12 would accept any scale below 1e-12 here: compare relatively only
    x = torch.zeros(2, 256)
    x[1, 128:] = 1.0
    q, scale = fp8.quantize_act_ref(x)
    assert scale[0].tolist() == pytest.approx([fp8.AMAX_EPS / 448] * 2, rel=1e-6, abs=0)
    assert scale[1].tolist() == pytest.approx([fp8.AMAX_EPS / 448, 1 / 448], rel=1e-6, abs=0)
    assert (q[0].float() == 0).all() and (q[1, 128:].float() == 448).all()


@pytest.mark.grades("fp8.quantize_weight_ref")
def test_quantize_weight_stack_of_experts():
    """(E, N, K), the routed experts' stacked weights (fp8.quantize_weight without the Hopper kernel): every matrix
    gets its own 128×128 blocks."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 200, 300, generator=gen) * 0.02
    w[1, :128, 128:256] *= 50  # an outlier block in one expert only
    q, scale = fp8.quantize_weight_ref(w)
    assert q.dtype == E4M3 and q.shape == (3, 200, 300) and scale.shape == (3, 2, 3)
    for e in range(3):
        for i in range(2):
            for j in range(3):
                block = w[e, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                want = max(block.abs().max().item(), fp8.AMAX_EPS) / 448
                assert scale[e, i, j].item() == pytest.approx(want, rel=1e-6, abs=0), f"expert {e}, block ({i}, {j})"
                back = q[e, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double() * scale[e, i, j].item()
                bound = block.double().abs() * 2.0 ** -4 + scale[e, i, j].item() * 2.0 ** -9
                assert ((back - block.double()).abs() <= bound).all(), f"expert {e}, block ({i}, {j})"
