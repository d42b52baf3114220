"""Tests of fp8_experts.py: the tile layout of the experts' token segments, the M-grouped and K-grouped GEMMs
against their references, and FP8 routed experts (fp8_segment_mm) against fp32 per-expert matmuls."""
import os

import pytest
import torch

import fp8
import fp8_experts
import fp8_linear
from test_fp8 import _abs8, _assert_fp32_close, hopper

def _grouped_operands(sizes, N, K, device="cpu", seed=0):
    """Random segments of `sizes` rows laid out in whole 128-row tiles, and E stacked expert weights (E, N, K)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(sum(sizes), K, generator=g).to(device)
    w = torch.randn(len(sizes), N, K, generator=g).to(device)
    dst, groups, padded = fp8_experts.tile_layout(torch.tensor(sizes, device=device), sum(sizes))
    xp = x.new_zeros(groups.shape[0] * 128, K)
    xp[dst] = x
    return x, w, xp, dst, groups


def test_tile_layout_pads_segments_to_whole_tiles():
    dst, groups, padded = fp8_experts.tile_layout(torch.tensor([3, 0, 130, 128]), 261)
    assert padded.tolist() == [128, 0, 256, 128]
    assert dst.tolist() == [0, 1, 2] + list(range(128, 258)) + list(range(384, 512))
    # 4 tiles used of the static (261 + 127·4) // 128 = 6: the unused tail is marked -1
    assert groups.tolist() == [0, 2, 2, 3, -1, -1] and groups.dtype == torch.int32


@pytest.mark.parametrize("sizes", [[3, 0, 130, 128], [0, 0, 0], [1] * 9])
def test_padded_puts_each_row_at_dst_and_zeros_elsewhere(sizes):
    """_padded (a gather from x with one zero row appended) is the scatter of x's rows to dst in a zero buffer of
    the static tile count: padding rows and the unused tail are zeros, bf16 kept bf16."""
    dst, groups, _ = fp8_experts.tile_layout(torch.tensor(sizes), sum(sizes))
    x = torch.randn(sum(sizes), 256).bfloat16()
    xp = fp8_experts._padded(x, dst, groups)
    want = torch.zeros(groups.shape[0] * 128, 256, dtype=torch.bfloat16)
    want[dst] = x
    assert xp.dtype == torch.bfloat16 and torch.equal(xp, want)


def _host_layout(sizes):
    """The tile layout planned on the host from a list of sizes, the plain way: (padded sizes, dst, groups with
    the -1 tail up to the static tile count, the K-group table of the padded segments)."""
    M, E = sum(sizes), len(sizes)
    padded = [-(-n // 128) * 128 for n in sizes]
    dst, groups, kg = [], [], []
    for e, n in enumerate(sizes):
        start = sum(padded[:e])
        dst += range(start, start + n)
        groups += [e] * (padded[e] // 128)
        kg.append((e, start // 128, padded[e] // 128))
    groups += [-1] * ((M + 127 * min(E, M)) // 128 - len(groups))
    return padded, dst, groups, kg


@pytest.mark.parametrize("sizes", [[3, 0, 130, 128], [0, 0, 0], [0, 500, 0], [128, 1, 255, 256, 0, 7],
                                   [1] * 9, [0] * 4 + [129] + [0] * 3, [2, 0, 1]])
def test_tile_layout_on_device_equals_host_plan(sizes):
    """The layout planned from a counts tensor (on the device, in training) equals the plain host construction:
    empty experts, all rows in one expert, no rows at all (M = 0), more experts than rows."""
    dst, groups, padded = fp8_experts.tile_layout(torch.tensor(sizes), sum(sizes))
    h_padded, h_dst, h_groups, h_kg = _host_layout(sizes)
    assert padded.tolist() == h_padded and dst.tolist() == h_dst and groups.tolist() == h_groups
    assert groups.dtype == torch.int32 and dst.dtype == torch.int64
    kg = fp8_experts.k_groups(padded)
    assert kg.tolist() == [list(t) for t in h_kg] and kg.dtype == torch.int32   # idle experts: 0 K blocks
    assert groups.shape[0] * 128 >= sum(h_padded)                               # the static bound holds


def test_tensor_sizes_equal_list_sizes():
    """fp8_segment_mm and fp8_swiglu_down given the sizes as a tensor (as moe.Experts passes them) give the same
    bits, outputs and gradients, as given a list; and one counts tensor's layout is built once and shared."""
    sizes, N, K = [70, 0, 300, 128, 1], 256, 384
    x, w, *_ = _grouped_operands(sizes, N, K, seed=2)
    g = torch.randn(sum(sizes), N)
    a, b = torch.randn(2, sum(sizes), K).unbind(0)
    w2 = torch.randn(len(sizes), N, K)
    runs = []
    for sz in (sizes, torch.tensor(sizes)):
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_experts.fp8_segment_mm(x1, w1, sz)
        y.backward(g)
        fused = _swiglu_down_run(lambda a, b, w: fp8_experts.fp8_swiglu_down(a, b, w, sz, "fp8"), a, b, w2, g)
        runs.append([y.detach(), x1.grad, w1.grad, *fused[:4]])
    assert all(torch.equal(p, q) for p, q in zip(*runs))
    counts = torch.tensor(sizes)
    layout = fp8_experts._shared_layout(counts, sum(sizes))
    assert fp8_experts._shared_layout(counts, sum(sizes)) is layout                       # w1, w3, w2 share it
    assert fp8_experts._shared_layout(counts.clone(), sum(sizes)) is not layout           # another tensor
    counts.add_(0)                                                                        # changed in place
    assert fp8_experts._shared_layout(counts, sum(sizes)) is not layout
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_segment_mm(x, w, torch.tensor(sizes[:-1]))
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_segment_mm(x, w, torch.tensor(sizes) + 1)                         # wrong sum (on the CPU)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_swiglu_down(a, b, w2, torch.tensor(sizes, dtype=torch.float32))


def test_grouped_reference_is_per_expert_gemm():
    sizes, N, K = [5, 0, 200, 128], 256, 384
    x, w, xp, dst, groups = _grouped_operands(sizes, N, K)
    xq, xs = fp8.quantize_act(xp)
    wq, ws = fp8.quantize_weight(w.reshape(-1, K))
    wq, ws = wq.view(len(sizes), N, K), ws.view(len(sizes), N // 128, K // 128)
    out = fp8_experts.fp8_gemm_grouped(xq, xs, wq, ws, groups, torch.float32)[dst]       # CPU: the reference
    start = 0
    for e, n in enumerate(sizes):                                              # each expert on its own rows
        rows = slice(start, start + n)
        exact = x[rows].double() @ w[e].double().T
        if n:
            assert fp8.calc_diff(out[rows], exact) < 1e-3
        start += n
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_experts.fp8_gemm_grouped(xq[:100], xs[:100], wq, ws, groups)
    with pytest.raises(ValueError, match="groups"):
        fp8_experts.fp8_gemm_grouped(xq, xs, wq, ws, groups.long())


def test_fp8_experts_match_fp32():
    """Fprop, Dgrad and Wgrad of the FP8 routed experts against fp32 per-expert matmuls (calc_diff < 1e-3)."""
    sizes, N, K = [70, 0, 300, 128, 1], 256, 384
    x, w, *_ = _grouped_operands(sizes, N, K, seed=1)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_experts.fp8_segment_mm(x1, w1, sizes)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y2 = torch.cat([seg @ we.T for seg, we in zip(x2.split(sizes), w2.unbind(0))])
    y2.backward(g)
    assert y.shape == (sum(sizes), N) and w1.grad.shape == w.shape
    assert fp8.calc_diff(y, y2) < 1e-3
    assert fp8.calc_diff(x1.grad, x2.grad) < 1e-3
    for e, n in enumerate(sizes):                                             # every expert's own gradient
        if n >= 64:
            assert fp8.calc_diff(w1.grad[e], w2.grad[e]) < 1e-3, e
    assert w1.grad[1].abs().sum() == 0                                        # an idle expert gets no gradient
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_segment_mm(x, w, sizes[:-1])


def test_fp8_layers_without_tokens():
    """Zero tokens (an expert group or a batch with none): empty outputs and zero weight gradients, no error."""
    w = torch.randn(2, 256, 128, requires_grad=True)
    x = torch.randn(0, 128, requires_grad=True)
    fp8_experts.fp8_segment_mm(x, w, [0, 0]).sum().backward()
    assert x.grad.shape == (0, 128) and w.grad.abs().sum() == 0
    lin = fp8_linear.FP8Linear(128, 256)
    x = torch.randn(0, 128, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad.shape == (256, 128) and lin.weight.grad.abs().sum() == 0
    q, s = fp8.quantize_act_t(torch.randn(0, 256))
    assert q.shape == (256, 0) and s.shape == (256, 0)


def test_moe_routed_experts_run_in_fp8():
    from config import ModelConfig
    from moe import MoE
    cfg = ModelConfig(dim=256, moe_inter_dim=128, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                      n_limited_groups=1, n_shared_experts=1)
    torch.manual_seed(0)
    m8, m32 = MoE(cfg, fp8_linear.FP8Linear, fp8_experts.FP8Experts), MoE(cfg)
    assert m8.experts.mm is fp8_experts.fp8_segment_mm and m32.experts.mm is None
    m32.load_state_dict(m8.state_dict())
    x = torch.randn(2, 256, 256)
    y8, y32 = m8(x), m32(x)
    # Two FP8 GEMMs in series (w1/w3, then w2) roughly double one GEMM's ~7e-4: the shared expert (FP8Linear)
    # and the routed experts both measure ~2e-3 here, on the output and on every weight gradient (a fixed
    # upstream gradient, so that FP8 error in y does not feed back into dy). Not 0: the experts really use FP8.
    assert 1e-4 < fp8.calc_diff(y8, y32) < 3e-3
    g = torch.randn_like(y8)
    y8.backward(g)
    y32.backward(g)
    for (n, p8), p32 in zip(m8.named_parameters(), m32.parameters()):
        assert fp8.calc_diff(p8.grad, p32.grad) < 3e-3, n
    with pytest.raises(ValueError, match="moe_inter_dim"):
        MoE(ModelConfig(dim=256, moe_inter_dim=96, n_shared_experts=0), fp8_linear.FP8Linear, fp8_experts.FP8Experts)


def test_transformer_hands_fp8_experts_to_every_moe():
    """Transformer(cfg, linear, experts) gives every MoE layer, the MTP blocks' too, the experts' kernels it was
    handed, and none without them: the hand-over is explicit, not found on the linear class."""
    from config import ModelConfig
    from model import Transformer
    from moe import MoE
    cfg = ModelConfig(dim=128, inter_dim=256, moe_inter_dim=128, n_layers=2, n_dense_layers=1, n_mtp=1,
                      n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
                      q_lora_rank=128, kv_lora_rank=128, n_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=64,
                      v_head_dim=64, vocab_size=512)
    for experts, mm, ffn in ((fp8_experts.FP8Experts, fp8_experts.fp8_segment_mm, fp8_experts.fp8_expert_ffn),
                             (None, None, None)):
        moes = [m for m in Transformer(cfg, fp8_linear.FP8Linear, experts).modules() if isinstance(m, MoE)]
        assert len(moes) == 2 and all(m.experts.mm is mm and m.experts.ffn is ffn for m in moes)


def _ffn_run(fn, tensors, g):
    """Forward and backward of fn(*tensors) with upstream gradient g: y, the grads of the tensors, and the bytes of
    every tensor the autograd graph keeps for the backward pass."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = fn(*tensors)
    y.backward(g)
    return (y.detach(), *(t.grad for t in tensors), sum(kept))


def _swiglu_down_run(fn, a, b, w2, g):
    """_ffn_run of fn(a, b, w2): y, the grads of a, b, w2, and the bytes kept for the backward pass."""
    return _ffn_run(fn, (a, b, w2), g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_down_recomputes_and_caches_its_inputs(dtype):
    """The experts' SwiGLU fused with W2 (report §3.3.3). Kept as they are ("bf16"), A and B give the bits of SiLU, ⊙
    and fp8_segment_mm composed by autograd while keeping less (H is recomputed, not kept); in E4M3 tiles ("fp8",
    the report's choice) they keep less again and the gradients move by about one E4M3 rounding."""
    sizes, inter, dim = [70, 0, 300, 1], 256, 128
    g0 = torch.Generator().manual_seed(5)
    a, b = (torch.randn(sum(sizes), inter, generator=g0).to(dtype) for _ in range(2))
    w2 = torch.randn(len(sizes), dim, inter, generator=g0)
    g = torch.randn(sum(sizes), dim, generator=g0).to(dtype)
    composed = _swiglu_down_run(lambda a, b, w: fp8_experts.fp8_segment_mm(torch.nn.functional.silu(a) * b, w, sizes),
                                a, b, w2, g)
    runs = {c: _swiglu_down_run(lambda a, b, w: fp8_experts.fp8_swiglu_down(a, b, w, sizes, c), a, b, w2, g)
            for c in ("bf16", "fp8", "e5m6")}
    for x, y in zip(composed[:4], runs["bf16"][:4]):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert runs["bf16"][4] < 0.75 * composed[4]                        # no SiLU(A), no padded H
    bound = 0.75 if dtype == torch.bfloat16 else 0.4                  # 1 byte (+ a scale per 128) against 2 or 4
    assert runs["fp8"][4] < bound * runs["bf16"][4]
    for c in ("fp8", "e5m6"):
        assert torch.equal(runs[c][0], composed[0])                    # the forward does not use the cache
        for x, y in zip(composed[1:4], runs[c][1:4]):
            assert 0 < fp8.calc_diff(y, x) < 2e-3, c                   # rounded, not lost
    assert fp8.calc_diff(runs["e5m6"][1], composed[1]) < fp8.calc_diff(runs["fp8"][1], composed[1])  # 6 bits vs 3
    assert runs["fp8"][3][1].abs().sum() == 0                          # the idle expert
    with pytest.raises(ValueError, match="act_cache"):
        fp8_experts.fp8_swiglu_down(a, b, w2, sizes, "fp4")
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_swiglu_down(a, b[1:], w2, sizes)
    e = torch.zeros(0, inter, requires_grad=True)                      # no tokens at all
    fp8_experts.fp8_swiglu_down(e, e, w2.requires_grad_(), [0] * len(sizes), "fp8").sum().backward()
    assert w2.grad.abs().sum() == 0 and e.grad.shape == (0, inter)


def _composed_ffn(sizes, act_cache):
    """The reference of fp8_expert_ffn: W1 and W3 by fp8_segment_mm, then fp8_swiglu_down."""
    return lambda x, w1, w3, w2: fp8_experts.fp8_swiglu_down(
        fp8_experts.fp8_segment_mm(x, w1, sizes), fp8_experts.fp8_segment_mm(x, w3, sizes), w2, sizes, act_cache)


def _poison_unused_tiles(monkeypatch):
    """Make the grouped GEMM fill the rows of the unused tail tiles (group -1) with NaN, as uninitialised memory
    might hold them: the CPU reference writes zeros there, the kernel leaves them alone."""
    grouped = fp8_experts.fp8_gemm_grouped

    def poisoned(a, a_scale, b, b_scale, groups, out_dtype=torch.bfloat16):
        out = grouped(a, a_scale, b, b_scale, groups, out_dtype)
        return out.masked_fill((groups < 0).repeat_interleave(128)[:, None], float("nan"))
    monkeypatch.setattr(fp8_experts, "fp8_gemm_grouped", poisoned)


def _assert_ffn_is_the_composition(sizes, dim, inter, device, dtype, monkeypatch):
    g0 = torch.Generator().manual_seed(6)
    E, M = len(sizes), sum(sizes)
    x = torch.randn(M, dim, generator=g0).to(device, dtype)
    w1, w3 = (torch.randn(E, inter, dim, generator=g0).to(device) / dim ** 0.5 for _ in range(2))
    w2 = torch.randn(E, dim, inter, generator=g0).to(device) / inter ** 0.5
    g = torch.randn(M, dim, generator=g0).to(device, dtype)
    for c in ("bf16", "fp8", "e5m6"):
        composed = _ffn_run(_composed_ffn(sizes, c), (x, w1, w3, w2), g)
        with monkeypatch.context() as m:
            _poison_unused_tiles(m)
            fused = _ffn_run(lambda *t: fp8_experts.fp8_expert_ffn(*t, torch.tensor(sizes, device=device), c),
                             (x, w1, w3, w2), g)
        for name, want, got in zip(("y", "dx", "dw1", "dw3", "dw2"), composed[:5], fused[:5]):
            assert got.dtype == want.dtype and torch.equal(got, want), (c, name)
        # x's tiles along the tokens kept once instead of once per projection, A and B kept padded (T·128 rows)
        # instead of M rows: less whenever that second copy of x, dim·T·128 bytes, outweighs the padding rows of A
        # and B, 2·inter·(T·128 − M) values, as here and in training (dim 7168, inter 2048 in V3).
        assert fused[5] < composed[5], c
        assert all(t[1].abs().sum() == 0 for t in fused[2:5]), c       # the idle expert's gradients


def test_expert_ffn_without_gradients_skips_the_transposes(monkeypatch):
    """Evaluation (no gradient wanted): the same output bits, and no Wᵀ built for a backward pass that never runs."""
    sizes, dim, inter = [70, 0, 300], 128, 256
    x = torch.randn(sum(sizes), dim)
    w1, w3 = torch.randn(2, 3, inter, dim).unbind(0)
    w2 = torch.randn(3, dim, inter)
    y = fp8_experts.fp8_expert_ffn(x, w1.requires_grad_(), w3, w2, sizes, "fp8")
    asked, quantize = [], fp8_experts.quantize_weight
    monkeypatch.setattr(fp8_experts, "quantize_weight", lambda w, transpose=False: asked.append(transpose) or
                        quantize(w, transpose))
    with torch.no_grad():
        y_eval = fp8_experts.fp8_expert_ffn(x, w1, w3, w2, sizes, "fp8")
    assert torch.equal(y_eval, y.detach()) and asked == [False] * 3
    fp8_experts.fp8_expert_ffn(x, w1, w3, w2, sizes, "fp8").sum().backward()   # with a gradient: all three
    assert asked == [False] * 3 + [True] * 3 and w1.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_is_the_composition(dtype, monkeypatch):
    """fp8_expert_ffn stays in the tile layout from x to y: the bits of fp8_segment_mm for W1 and W3 composed with
    fp8_swiglu_down (output and every gradient, each activation cache), while keeping less, and whatever the rows
    of the unused tail tiles hold (NaN here).

    One CPU thread: the two paths run the reference GEMMs' fp32 matmuls on different buffers, and a multi-threaded
    BLAS may split (and so sum) a product differently by where its operands lie in memory (seen with 16 threads on
    an Intel Xeon: one gradient's last bits differed; with one thread the same machine gave the same bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _assert_ffn_is_the_composition([700, 0, 1100, 1], 512, 128, "cpu", dtype, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    x, w1 = torch.randn(4, 128), torch.randn(2, 256, 128)
    with pytest.raises(ValueError, match="act_cache"):
        fp8_experts.fp8_expert_ffn(x, w1, w1, w1.transpose(1, 2), [2, 2], "fp4")
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_expert_ffn(x, w1, w1, w1, [2, 2])             # w2 must be (E, dim, inter)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_experts.fp8_expert_ffn(x, w1, w1, w1.transpose(1, 2), [3, 2])
    e = torch.zeros(0, 128, requires_grad=True)                        # no tokens at all
    w = w1.clone().requires_grad_()
    fp8_experts.fp8_expert_ffn(e, w, w, w.transpose(1, 2), [0, 0], "fp8").sum().backward()
    assert w.grad.abs().sum() == 0 and e.grad.shape == (0, 128)


def test_expert_ffn_casts_its_input_to_the_autocast_dtype():
    """Under autocast fp8_segment_mm takes an fp32 input cast to the autocast dtype, as moe.segment_mm does (the
    same bits as on x.bfloat16(), dX back in x's dtype); the fused FFN gives the bits of its composition under
    autocast, dX included: its W1 and W3 halves summed in fp32, as autograd sums the two casts' gradients."""
    g0 = torch.Generator().manual_seed(3)
    sizes, dim, inter = [50, 0, 90], 128, 128
    x = torch.randn(sum(sizes), dim, generator=g0)
    w1, w3 = (torch.randn(3, inter, dim, generator=g0) / dim ** 0.5 for _ in range(2))
    w2 = torch.randn(3, dim, inter, generator=g0) / inter ** 0.5
    g = torch.randn(sum(sizes), dim, generator=g0).bfloat16()

    def run(fn, inp, autocast=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _ffn_run(fn, (inp, w1, w3, w2), g)
    mm = lambda t, a, b, c: fp8_experts.fp8_segment_mm(t, a, sizes)   # noqa: E731
    (y_a, dx_a, dw_a, *_), (y_b, dx_b, dw_b, *_) = run(mm, x), run(mm, x.bfloat16(), autocast=False)
    assert y_a.dtype == torch.bfloat16 and dx_a.dtype == torch.float32 and torch.equal(y_a, y_b)
    assert torch.equal(dx_a, dx_b.float()) and torch.equal(dw_a, dw_b)
    fused = run(lambda t, a, b, c: fp8_experts.fp8_expert_ffn(t, a, b, c, sizes), x)
    composed = run(_composed_ffn(sizes, "bf16"), x)
    assert fused[1].dtype == torch.float32
    assert all(torch.equal(f, c) for f, c in zip(fused[:5], composed[:5]))


def test_moe_experts_cache_follows_act_cache():
    """In an FP8 MoE the routed experts run the fused FFN: under bf16 autocast with the default cache, the same
    bits as the unfused composition; train_setup.set_act_cache reaches their cache too ("report": E4M3)."""
    import train_setup
    from config import ModelConfig
    from moe import MoE
    cfg = ModelConfig(dim=128, moe_inter_dim=128, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1,
                      n_limited_groups=1, n_shared_experts=0)
    x = torch.randn(2, 64, 128)
    outs = []
    for fused in (True, False):
        torch.manual_seed(1)
        m = MoE(cfg, fp8_linear.FP8Linear, fp8_experts.FP8Experts)
        if not fused:
            m.experts.ffn = None                                          # W1, W3, SiLU, ⊙ and W2 by autograd
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.backward(torch.ones_like(y))
        outs.append([y.detach()] + [p.grad for p in m.parameters()])
    assert all(torch.equal(f, u) for f, u in zip(*outs))
    torch.manual_seed(1)
    m8, m32 = MoE(cfg, fp8_linear.FP8Linear, fp8_experts.FP8Experts), MoE(cfg)
    m32.load_state_dict(m8.state_dict())
    assert m8.experts.ffn is fp8_experts.fp8_expert_ffn and m32.experts.ffn is None
    train_setup.set_act_cache(m8, "report")
    assert m8.experts.act_cache == "fp8"
    y8, y32 = m8(x), m32(x)
    g = torch.randn_like(y8)
    y8.backward(g)
    y32.backward(g)
    assert fp8.calc_diff(y8, y32) < 3e-3
    for (n, p8), p32 in zip(m8.named_parameters(), m32.parameters()):
        assert fp8.calc_diff(p8.grad, p32.grad) < 4e-3, n


# ------------------------------------------------------------------ GPU: the grouped kernels
@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("sizes,N,K", [([1, 0, 300, 128], 256, 384), ([700] * 3 + [0, 5] + [260] * 11, 1024, 512),
                                       ([700] * 3 + [0, 5] + [260] * 11, 1024, 640)])
def test_kernel_grouped_matches_reference(sizes, N, K):
    ext = fp8.load_kernel()
    assert ext is not None, fp8.why_no_kernel()
    seed = int.from_bytes(os.urandom(4), "little")
    x, w, xp, dst, groups = _grouped_operands(sizes, N, K, "cuda", seed)
    xq, xs = fp8.quantize_act(xp)
    wq, ws = fp8.quantize_weight(w.reshape(-1, K))
    E = len(sizes)
    wq, ws = wq.view(E, N, K), ws.view(E, N // 128, K // 128)
    ref = fp8_experts.fp8_gemm_grouped_ref(xq, xs, wq, ws, groups, torch.float32)
    out = torch.full((xp.shape[0], N), float("nan"), device="cuda", dtype=torch.bfloat16)
    ext.gemm_experts(xq, xs, wq.reshape(E * N, K), ws.reshape(-1, K // 128), groups, out, E)
    torch.cuda.synchronize()
    used = (groups >= 0).repeat_interleave(128)                       # rows of the tiles of some expert
    assert (groups < 0).any()                                          # the layout's unused tail is there
    assert not out[used].isnan().any() and out[~used].isnan().all(), f"seed {seed}"  # -1 tiles: not written
    torch.testing.assert_close(out[used].float(), ref[used], rtol=2 ** -7, atol=1e-3 * ref.abs().max().item(),
                               msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(fp8_experts.fp8_gemm_grouped(xq, xs, wq, ws, groups)[used], out[used])  # dispatch


@pytest.mark.gpu
@hopper
def test_kernel_grouped_skips_tiles_of_no_expert():
    """Tiles of group -1 anywhere (first, between experts, last, all of them) are skipped by the producer and the
    math warps alike: the other tiles get the bits they get without the skipped ones, and no launch hangs."""
    ext = fp8.load_kernel()
    assert ext is not None, fp8.why_no_kernel()
    E, N, K, T = 3, 256, 640, 40
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(T * 128, K, generator=g).cuda()
    w = torch.randn(E, N, K, generator=g).cuda()
    xq, xs = fp8.quantize_act(x)
    wq, ws = fp8.quantize_weight(w.reshape(-1, K))
    full = torch.randint(0, E, (T,), generator=g, dtype=torch.int32).cuda()          # every tile busy
    dense = torch.empty(T * 128, N, device="cuda", dtype=torch.bfloat16)
    ext.gemm_experts(xq, xs, wq, ws, full, dense, E)
    for skip in ([0], [0, 5, 6, 17, T - 1], list(range(1, T, 2)), list(range(T))):
        groups = full.clone()
        groups[skip] = -1
        out = torch.full((T * 128, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        ext.gemm_experts(xq, xs, wq, ws, groups, out, E)
        torch.cuda.synchronize()
        used = (groups >= 0).repeat_interleave(128)
        assert out[~used].isnan().all() and torch.equal(out[used], dense[used]), skip
        ref = fp8_experts.fp8_gemm_grouped_ref(xq, xs, wq.view(E, N, K), ws.view(E, N // 128, K // 128), groups)
        assert ref[~used].abs().sum() == 0                             # the reference: zero rows


@pytest.mark.gpu
@hopper
def test_fp8_experts_on_gpu_match_fp32():
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()                # not the PyTorch fallback
    sizes, N, K = [300, 0, 1, 1000, 129], 512, 1024
    x, w, *_ = _grouped_operands(sizes, N, K, "cuda", seed=3)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_experts.fp8_segment_mm(x1, w1, sizes)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.cat([seg @ we.T for seg, we in zip(x2.split(sizes), w2.unbind(0))]).backward(g)
    assert fp8.calc_diff(y, torch.cat([s @ we.T for s, we in zip(x.split(sizes), w.unbind(0))])) < 1e-3
    assert fp8.calc_diff(x1.grad, x2.grad) < 1e-3
    assert all(fp8.calc_diff(w1.grad[e], w2.grad[e]) < 1e-3 for e in (0, 3, 4))
    assert w1.grad[1].abs().sum() == 0                                 # the idle expert


def _old_expert_quantization(w, transpose=False):
    """The experts' weight quantization as it was: the reference on the flattened (E·N, K), the transposed experts
    (E, K, N) made by torch."""
    E, N, K = w.shape
    wq, ws = fp8.quantize_weight_ref(w.reshape(E * N, K))
    wq, ws = wq.view(E, N, K), ws.view(E, N // 128, K // 128)
    return (wq, ws, wq.transpose(1, 2).contiguous()) if transpose else (wq, ws)


def _assert_experts_are_the_old_composition(device, monkeypatch):
    sizes, N, K = [300, 0, 1, 400, 129], 256, 384
    x, w, *_ = _grouped_operands(sizes, N, K, device, seed=4)
    g = torch.randn(sum(sizes), N, device=device)
    runs = []
    for quantize in (fp8_experts.quantize_weight, _old_expert_quantization):
        monkeypatch.setattr(fp8_experts, "quantize_weight", quantize)
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_experts.fp8_segment_mm(x1, w1, sizes)
        y.backward(g)
        runs.append((y, x1.grad, w1.grad))
    for name, new, old in zip(("y", "dx", "dw"), *runs):
        assert torch.equal(new, old), name


def test_fp8_experts_are_bit_identical_to_the_old_composition(monkeypatch):
    """The experts quantized as a stack (E, N, K) with their transposes (E, K, N) from quantize_weight: the same
    outputs and gradients as the reference on the flattened weight with torch's transposes."""
    _assert_experts_are_the_old_composition("cpu", monkeypatch)


@pytest.mark.gpu
@hopper
def test_fp8_experts_on_gpu_are_bit_identical_to_the_old_composition(monkeypatch):
    """The same on the kernels: the fused W and Wᵀ of the stacked experts give the old bits."""
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    _assert_experts_are_the_old_composition("cuda", monkeypatch)


@pytest.mark.gpu
@hopper
def test_swiglu_down_on_gpu():
    """The fused SwiGLU and W2 on the kernels: bf16 inputs, the same bits as the composition with the inputs kept,
    about one E4M3 rounding away with them cached in FP8."""
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    sizes, inter, dim = [300, 0, 1, 1000, 129], 512, 256
    a, b = (torch.randn(sum(sizes), inter, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w2 = torch.randn(len(sizes), dim, inter, device="cuda")
    g = torch.randn(sum(sizes), dim, device="cuda", dtype=torch.bfloat16)
    composed = _swiglu_down_run(lambda a, b, w: fp8_experts.fp8_segment_mm(torch.nn.functional.silu(a) * b, w, sizes),
                                a, b, w2, g)
    kept = _swiglu_down_run(lambda a, b, w: fp8_experts.fp8_swiglu_down(a, b, w, sizes, "bf16"), a, b, w2, g)
    cached = _swiglu_down_run(lambda a, b, w: fp8_experts.fp8_swiglu_down(a, b, w, sizes, "fp8"), a, b, w2, g)
    assert all(torch.equal(x, y) for x, y in zip(composed[:4], kept[:4])) and kept[4] < composed[4]
    assert all(0 < fp8.calc_diff(y, x) < 2e-3 for x, y in zip(composed[1:4], cached[1:4])) and cached[4] < kept[4]


@pytest.mark.gpu
@hopper
def test_expert_ffn_on_gpu_is_the_composition(monkeypatch):
    """The same on the kernels, bf16 activations: the bits of the composition, the unused tail tiles poisoned."""
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    _assert_ffn_is_the_composition([300, 0, 1, 1000, 129], 512, 256, "cuda", torch.bfloat16, monkeypatch)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("sizes,M,N", [([128, 0, 384, 128], 256, 384), ([0, 1280, 0, 256] * 4, 512, 1024),
                                       ([384, 0, 640, 128] * 3, 512, 1024)])
def test_kernel_kgrouped_matches_reference(sizes, M, N):
    """Routed-expert Wgrad in one launch: per expert, the 1D1D product over its own slice of tokens."""
    ext = fp8.load_kernel()
    assert ext is not None, fp8.why_no_kernel()
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    a = torch.randn(M, sum(sizes), device="cuda") * torch.rand(M, 1, device="cuda") * 4
    b = torch.randn(N, sum(sizes), device="cuda") * torch.rand(N, 1, device="cuda") * 4
    aq, a_s = fp8.quantize_act(a)
    bq, b_s = fp8.quantize_act(b)
    ref = fp8_experts.fp8_gemm_kgrouped_ref(aq, a_s, bq, b_s, sizes, torch.float32)
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    kg = torch.tensor([(e, s // 128, n // 128) for e, (s, n) in enumerate(zip(starts, sizes)) if n],
                      dtype=torch.int32, device="cuda")
    sbt = torch.nn.functional.pad(b_s.t(), (0, -N % 128)).contiguous()
    busy = torch.tensor([n > 0 for n in sizes], device="cuda")
    outs = []
    for _ in range(2):                                                 # poisoned, twice: races show
        out = torch.full((len(sizes) * M, N), float("nan"), device="cuda")
        ext.gemm_experts_wgrad(aq, a_s, bq, sbt, kg, out)
        torch.cuda.synchronize()
        outs.append(out.view(len(sizes), M, N))
    out = outs[0]
    assert not out[busy].isnan().any() and out[~busy].isnan().all(), f"seed {seed}"  # idle rows left alone
    assert torch.equal(outs[0][busy], outs[1][busy]), f"non-deterministic (seed {seed})"
    absprod = fp8_experts.fp8_gemm_kgrouped_ref(_abs8(aq), a_s, _abs8(bq), b_s, sizes, torch.float32)
    _assert_fp32_close(out[busy], ref[busy], absprod[busy], seed)
    wrapped = fp8_experts.fp8_gemm_kgrouped(aq, a_s, bq, b_s, sizes, torch.float32)  # zeros for the idle experts
    assert torch.equal(wrapped[busy], out[busy]) and wrapped[~busy].abs().sum() == 0, f"seed {seed}"
    # The table of every expert, idle ones with 0 K blocks (as the routed experts pass it): they get zeros.
    kg_all = fp8_experts.k_groups(torch.tensor(sizes, device="cuda"))
    out_all = torch.full((len(sizes) * M, N), float("nan"), device="cuda")
    ext.gemm_experts_wgrad(aq, a_s, bq, sbt, kg_all, out_all)
    torch.cuda.synchronize()
    out_all = out_all.view(len(sizes), M, N)
    assert torch.equal(out_all[busy], out[busy]) and (out_all[~busy] == 0).all(), f"seed {seed}"
    on_device = fp8_experts.fp8_gemm_kgrouped(aq, a_s, bq, b_s, torch.tensor(sizes, device="cuda"), torch.float32)
    assert torch.equal(on_device, wrapped), f"seed {seed}"
    # accumulate: out[e] += the product (an idle expert's rows as they were), as adding the products afterwards
    prior = torch.randn(len(sizes), M, N, device="cuda")
    into = prior.clone()
    ext.gemm_experts_wgrad(aq, a_s, bq, sbt, kg_all, into.view(-1, N), accumulate=True)
    assert torch.equal(into, prior + out_all), f"seed {seed}"
    fp8_experts.fp8_gemm_kgrouped_into(aq, a_s, bq, b_s, torch.tensor(sizes, device="cuda"), into)
    assert torch.equal(into, prior + out_all + out_all), f"seed {seed}"


@pytest.mark.gpu
@hopper
def test_kernel_kgrouped_skips_idle_experts():
    """Idle experts (0 K blocks) first, between busy ones, last, or all of them, and K blocks past the last
    segment: no hang, the busy experts' bits unchanged, zeros written for the idle ones (the wrapper's output is
    not zeroed first: its memory is poisoned before the call, as a reused block would be)."""
    ext = fp8.load_kernel()
    assert ext is not None, fp8.why_no_kernel()
    M, N, K = 256, 512, 128 * 12
    g = torch.Generator(device="cpu").manual_seed(11)
    aq, a_s = fp8.quantize_act(torch.randn(M, K, generator=g).cuda())
    bq, b_s = fp8.quantize_act(torch.randn(N, K, generator=g).cuda())
    sbt = torch.nn.functional.pad(b_s.t(), (0, -N % 128)).contiguous()
    for sizes in ([0, 384, 0, 0, 640, 128, 0], [0, 0, 0], [128] * 12, [0, 1024]):   # the last: 4 blocks unused
        ref = fp8_experts.fp8_gemm_kgrouped_ref(aq, a_s, bq, b_s, sizes, torch.float32)
        out = torch.full((len(sizes) * M, N), float("nan"), device="cuda")
        ext.gemm_experts_wgrad(aq, a_s, bq, sbt, fp8_experts.k_groups(torch.tensor(sizes, device="cuda")), out)
        torch.cuda.synchronize()
        out = out.view(len(sizes), M, N)
        busy = torch.tensor([n > 0 for n in sizes], device="cuda")
        assert (out[~busy] == 0).all(), sizes
        absprod = fp8_experts.fp8_gemm_kgrouped_ref(_abs8(aq), a_s, _abs8(bq), b_s, sizes, torch.float32)
        if busy.any():
            _assert_fp32_close(out[busy], ref[busy], absprod[busy], sizes)
        sizes_d = torch.tensor(sizes, device="cuda")
        torch.full((len(sizes) * M, N), float("nan"), device="cuda")   # freed at once: the next block of its size
        wrapped = fp8_experts.fp8_gemm_kgrouped(aq, a_s, bq, b_s, sizes_d, torch.float32)
        assert torch.equal(wrapped[busy], out[busy]) and (wrapped[~busy] == 0).all(), sizes


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("act_cache", ["bf16", "fp8"])
def test_fp8_moe_step_does_not_sync(act_cache):
    """One FP8 MoE forward and backward (routed experts in FP8, segment sizes on the device) never makes the host
    wait for the GPU: torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call (.item(),
    .tolist(), a blocking copy, torch.cuda.synchronize). The run after the warm-up (kernel build, probes) gives the
    same bits: the dispatch and combine are gathers, with no atomic adds."""
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    from config import ModelConfig
    from moe import MoE
    cfg = ModelConfig(dim=256, moe_inter_dim=256, n_routed_experts=16, n_activated_experts=4, n_expert_groups=1,
                      n_limited_groups=1, n_shared_experts=1)
    torch.manual_seed(0)
    m = MoE(cfg, fp8_linear.FP8Linear, fp8_experts.FP8Experts).cuda()
    m.experts.act_cache = act_cache
    x = torch.randn(2, 300, 256, device="cuda")
    g = torch.randn(2, 300, 256, device="cuda")

    def step():
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.backward(g.to(y.dtype))
        return [y.detach()] + [p.grad for p in m.parameters()]

    warm = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(got, warm))


# -- the CPU reference path's operand checks and its tile layout ----------------------------------------------------
def test_kgrouped_and_grouped_refuse_operands_that_do_not_fit_on_the_cpu():
    """A list of Wgrad segment sizes is checked on the host wherever the GEMM runs: sizes not multiples of 128, or
    summing past K, are a ValueError (the CPU reference would otherwise contract a truncated K range silently);
    the M-grouped GEMM refuses a weight whose N is not whole 128-row blocks."""
    kq, ks = fp8.quantize_act_t(torch.randn(256, 256))                 # K = 256 tokens
    for bad in ([100, 28, 128], [128, 256]):                           # not multiples of 128; more rows than K
        with pytest.raises(ValueError, match="segment sizes"):
            fp8_experts.fp8_gemm_kgrouped(kq, ks, kq[:128], ks[:128], bad)
        with pytest.raises(ValueError, match="segment sizes"):
            fp8_experts.fp8_gemm_kgrouped_into(kq, ks, kq[:128], ks[:128], bad, torch.zeros(len(bad), 256, 128))
    xq, xs = fp8.quantize_act(torch.randn(128, 128))
    wq = torch.zeros(2, 64, 128).to(torch.float8_e4m3fn)              # N = 64: half a weight block
    with pytest.raises(ValueError, match="N = 64 must be a multiple of 128"):
        fp8_experts.fp8_gemm_grouped(xq, xs, wq, torch.ones(2, 1, 1), torch.zeros(1, dtype=torch.int32))


def test_shared_layout_follows_counts_changed_in_place():
    """The layout shared by the W1/W3/W2 GEMMs of one forward is keyed by the counts tensor and its version: the same
    tensor overwritten in place (a reused or static counts buffer) gets the layout of its new values."""
    counts = torch.tensor([200, 0, 56])
    first = fp8_experts._shared_layout(counts, 256)
    assert first[0].tolist() == _host_layout([200, 0, 56])[1]
    counts.copy_(torch.tensor([0, 256, 0]))                            # same tensor, same M, other segments
    dst, groups, padded = fp8_experts._shared_layout(counts, 256)
    _, h_dst, h_groups, _ = _host_layout([0, 256, 0])
    assert dst.tolist() == h_dst and groups.tolist() == h_groups and padded.tolist() == [0, 256, 0]
