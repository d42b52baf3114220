"""Tests of mla.py: RoPE/YaRN, naive == absorbed attention, the latent KV cache, and the report's equations.

Everything runs on CPU with tiny dimensions; modules are cast to fp64 where a comparison must be tight.
"""
import copy
import math

import pytest
import torch

from config import ModelConfig, get_preset
from mla import (MLA, apply_rotary_emb, cache_positions, causal_mask, kv_cache_bytes_per_token,
                 precompute_freqs_cis, rope_frequencies, softmax_scale, yarn_correction_range)

SEEDS = (0, 1, 2)


def make_cfg(q_lora_rank=16, v_head_dim=8, yarn=False, **kw):
    # YaRN is active iff max_seq_len (32) > original_seq_len
    args = dict(dim=32, n_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=v_head_dim, max_seq_len=32,
                original_seq_len=16 if yarn else 4096, rope_factor=4.0, mscale=0.8)
    return ModelConfig(**{**args, **kw})


def make_mla(cfg, seed):
    torch.manual_seed(seed)
    m = MLA(cfg).double()
    with torch.no_grad():  # non-trivial norm gains, so that a skipped or misplaced norm shows
        for mod in m.modules():
            if mod.__class__.__name__ == "RMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return m


def rand_x(B, T, dim, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(B, T, dim, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# An independent reference written from the report's equations (complex RoPE, fp64 norms, explicit mask)
# ---------------------------------------------------------------------------------------------------------
def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_complex(x, freqs_cis):  # x (..., T, [H,] dr): pairs (2i, 2i+1) as complex numbers
    xc = torch.view_as_complex(x.contiguous().unflatten(-1, (-1, 2)))
    f = freqs_cis.to(torch.complex128)
    f = f[:, None, :] if x.dim() == 4 else f
    return torch.view_as_real(xc * f).flatten(-2)


def paper_mla(m, cfg, x, freqs_cis):
    B, T, _ = x.shape
    H, dn, dr, dv, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        c_q = rms(x @ m.wq_a.weight.T, m.q_norm.weight)  # c^Q = W^DQ h, normed
        q = (c_q @ m.wq_b.weight.T).view(B, T, H, dn + dr)  # [q^C ; W^QR c^Q] per head
    else:
        q = (x @ m.wq.weight.T).view(B, T, H, dn + dr)
    q_c, q_r = q[..., :dn], rope_complex(q[..., dn:], freqs_cis)
    down = x @ m.wkv_a.weight.T  # [W^DKV h ; W^KR h]
    c_kv = rms(down[..., :c], m.kv_norm.weight)
    k_r = rope_complex(down[..., c:], freqs_cis)  # (B, T, dr): one rotary key per token
    w_b = m.wkv_b.weight.view(H, dn + dv, c)
    k_c = torch.einsum("hdc,btc->bthd", w_b[:, :dn], c_kv)  # W^UK c^KV
    v_c = torch.einsum("hdc,btc->bthd", w_b[:, dn:], c_kv)  # W^UV c^KV
    k = torch.cat([k_c, k_r[:, :, None].expand(B, T, H, dr)], -1)  # k_{t,i} = [k^C_{t,i} ; k^R_t]
    qq = torch.cat([q_c, q_r], -1)
    scale = (dn + dr) ** -0.5
    if cfg.max_seq_len > cfg.original_seq_len:
        scale *= (0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1) ** 2
    scores = torch.einsum("bthd,bshd->bhts", qq, k) * scale
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v_c)
    return o.flatten(2) @ m.wo.weight.T


@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("yarn", [False, True])
def test_both_paths_match_paper_equations(q_lora_rank, yarn):
    cfg = make_cfg(q_lora_rank=q_lora_rank, v_head_dim=6, yarn=yarn)
    fc = precompute_freqs_cis(cfg)
    for seed in SEEDS:
        m, x = make_mla(cfg, seed), rand_x(2, 9, cfg.dim, seed)
        ref = paper_mla(m, cfg, x, fc[:9])
        for impl in ("naive", "absorb"):
            m.attn_impl = impl
            torch.testing.assert_close(m(x, fc[:9]), ref, rtol=1e-5, atol=1e-6)  # module norms run in fp32


def test_parameter_names_and_shapes():
    H, dn, dr, dv, c = 3, 8, 8, 6, 16
    shapes = {n: tuple(p.shape) for n, p in MLA(make_cfg(q_lora_rank=12, v_head_dim=dv)).named_parameters()}
    assert shapes == {"wq_a.weight": (12, 32), "q_norm.weight": (12,), "wq_b.weight": (H * (dn + dr), 12),
                      "wkv_a.weight": (c + dr, 32), "kv_norm.weight": (c,), "wkv_b.weight": (H * (dn + dv), c),
                      "wo.weight": (32, H * dv)}
    names = {n for n, _ in MLA(make_cfg(q_lora_rank=0)).named_parameters()}
    assert "wq.weight" in names and not any(n.startswith(("wq_a", "q_norm", "wq_b")) for n in names)


# ---------------------------------------------------------------------------------------------------------
# naive == absorbed, cached == uncached
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("v_head_dim", [8, 6])  # equal to and different from qk_nope_head_dim
@pytest.mark.parametrize("yarn", [False, True])
def test_naive_equals_absorb(q_lora_rank, v_head_dim, yarn):
    cfg = make_cfg(q_lora_rank=q_lora_rank, v_head_dim=v_head_dim, yarn=yarn)
    fc = precompute_freqs_cis(cfg)
    for seed in SEEDS:
        m, x = make_mla(cfg, seed), rand_x(2, 11, cfg.dim, seed)
        m.attn_impl = "naive"
        naive = m(x, fc[:11])
        m.attn_impl = "absorb"
        torch.testing.assert_close(m(x, fc[:11]), naive, rtol=1e-10, atol=1e-12)


def run_chunks(m, x, fc, sizes, start=0):
    outs = []
    for n in sizes:
        outs.append(m(x[:, start:start + n], fc[start:start + n], start_pos=start))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("yarn", [False, True])
def test_cached_decode_and_chunked_prefill_equal_full_forward(impl, yarn):
    cfg = make_cfg(q_lora_rank=16, v_head_dim=6, yarn=yarn)
    fc = precompute_freqs_cis(cfg)
    T = 12
    for seed in SEEDS:
        m, x = make_mla(cfg, seed), rand_x(2, T, cfg.dim, seed)
        full = m(x, fc[:T])  # naive, no cache: the reference
        m.attn_impl = impl
        m.setup_cache(max_batch=3, max_seq_len=16)  # larger than needed in both dimensions
        decode = run_chunks(m, x, fc, [5] + [1] * (T - 5))  # prefill, then token by token
        torch.testing.assert_close(decode, full, rtol=1e-9, atol=1e-10)
        chunked = run_chunks(m, x, fc, [3, 4, 1, 4])  # T > 1 chunks at start_pos > 0
        torch.testing.assert_close(chunked, full, rtol=1e-9, atol=1e-10)
        m.free_cache()
        m.setup_cache(max_batch=1, max_seq_len=T)  # one sequence of a batch alone
        torch.testing.assert_close(run_chunks(m, x[1:], fc, [2, 7, 3]), full[1:], rtol=1e-9, atol=1e-10)


def test_rewriting_a_position_overwrites_it():
    cfg = make_cfg()
    fc = precompute_freqs_cis(cfg)
    m, x = make_mla(cfg, 0), rand_x(1, 8, cfg.dim, 0)
    full = m(x, fc[:8])
    m.attn_impl = "absorb"
    m.setup_cache(1, 8)
    m(x[:, :5], fc[:5], start_pos=0)
    m(torch.randn_like(x[:, 5:8]), fc[5:8], start_pos=5)  # rejected draft tokens at 5..7
    torch.testing.assert_close(run_chunks(m, x, fc, [1, 2], start=5), full[:, 5:], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# The cache content and size
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_latent_and_rope_key_only(dtype):
    cfg = make_cfg(q_lora_rank=0, v_head_dim=6)
    m = MLA(cfg)
    m.setup_cache(max_batch=2, max_seq_len=5, dtype=dtype)
    bufs = dict(m.named_buffers())
    assert set(bufs) == {"kv_cache", "pe_cache"} and not any("cache" in k for k in m.state_dict())
    assert bufs["kv_cache"].shape == (2, 5, cfg.kv_lora_rank) and bufs["pe_cache"].shape == (2, 5, 8)
    per_token = sum(b.numel() for b in bufs.values()) // (2 * 5)
    assert per_token == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    size = torch.tensor([], dtype=dtype).element_size()
    got = kv_cache_bytes_per_token(cfg, bytes_per_value=size)
    assert got["mla"] == sum(b.numel() * b.element_size() for b in bufs.values()) // (2 * 5)
    assert got["mha"] == cfg.n_heads * (8 + 8 + 6) * size
    m.free_cache()
    assert m.kv_cache is None and m.pe_cache is None and dict(m.named_buffers()) == {}


def test_kv_cache_bytes_v3():
    cfg = get_preset("v3-671b")
    assert kv_cache_bytes_per_token(cfg) == dict(mla=576 * 2, mha=128 * (192 + 128) * 2)


def test_rope_key_is_shared_and_taken_before_kv_norm():
    cfg = make_cfg(yarn=True)
    fc = precompute_freqs_cis(cfg)
    m, x = make_mla(cfg, 0), rand_x(2, 6, cfg.dim, 0)
    assert m.wkv_a.out_features == cfg.kv_lora_rank + cfg.qk_rope_head_dim  # one k^R, not one per head
    m.setup_cache(2, 6)
    m(x, fc[:6], start_pos=0)
    kv, pe = m.kv_cache.clone(), m.pe_cache.clone()
    down = m.wkv_a(x)
    torch.testing.assert_close(pe, rope_complex(down[..., cfg.kv_lora_rank:], fc[:6]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kv, rms(down[..., :cfg.kv_lora_rank], m.kv_norm.weight), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        m.kv_norm.weight.mul_(3.0)
    m(x, fc[:6], start_pos=0)
    assert torch.equal(m.pe_cache, pe)  # k^R does not see kv_norm
    torch.testing.assert_close(m.kv_cache, 3.0 * kv)


def test_output_is_causal():
    cfg = make_cfg()
    fc = precompute_freqs_cis(cfg)
    m, x = make_mla(cfg, 1), rand_x(1, 8, cfg.dim, 1)
    y = x.clone()
    y[:, 5] += 1.0
    for impl in ("naive", "absorb"):
        m.attn_impl = impl
        a, b = m(x, fc[:8]), m(y, fc[:8])
        assert torch.equal(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_causal_mask_for_offset_chunks():
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 5, 2), expected)


# ---------------------------------------------------------------------------------------------------------
# RoPE, YaRN and the softmax scale
# ---------------------------------------------------------------------------------------------------------
def test_yarn_with_factor_one_is_plain_rope():
    plain = make_cfg(yarn=False)
    yarn1 = make_cfg(yarn=True, rope_factor=1.0)
    assert yarn1.yarn_active and not plain.yarn_active
    torch.testing.assert_close(precompute_freqs_cis(yarn1), precompute_freqs_cis(plain), rtol=0, atol=0)
    assert softmax_scale(yarn1) == softmax_scale(plain) == 16 ** -0.5
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = torch.arange(32, dtype=torch.float64)[:, None] * theta  # (S, dr/2)
    torch.testing.assert_close(precompute_freqs_cis(plain).to(torch.complex128),
                               torch.polar(torch.ones_like(angles), angles), rtol=0, atol=1e-5)


def test_yarn_frequencies_v3():
    cfg = ModelConfig(qk_rope_head_dim=64, max_seq_len=8192, original_seq_len=4096, rope_factor=40.0)
    assert yarn_correction_range(64, 10000.0, 4096, 32, 1) == (10, 23)
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    f = rope_frequencies(cfg)
    torch.testing.assert_close(f[:11], base[:11], rtol=1e-6, atol=0)  # ramp 0 up to low: unchanged
    torch.testing.assert_close(f[23:], base[23:] / 40, rtol=1e-6, atol=0)  # ramp 1 from high: slowed
    mid = f[11:23] / base[11:23]
    assert bool(((mid < 1) & (mid > 1 / 40)).all()) and bool((mid[1:] < mid[:-1]).all())
    torch.testing.assert_close(f[16] / base[16], torch.tensor(1 - 6 / 13 + 6 / 13 / 40))  # ramp (16-10)/13


def test_softmax_scale_values():
    v3 = get_preset("v3-671b")
    assert v3.yarn_active
    assert softmax_scale(v3) == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert softmax_scale(v3) == pytest.approx(0.13523, abs=5e-6)
    assert softmax_scale(get_preset("v2-lite-16b")) == pytest.approx(0.11472, abs=5e-6)
    assert softmax_scale(get_preset("v3-671b", max_seq_len=4096)) == 192 ** -0.5  # YaRN off


def test_rope_rotates_interleaved_pairs():
    cfg = make_cfg(yarn=True)
    fc = precompute_freqs_cis(cfg)
    theta = rope_frequencies(cfg).double()  # (4,)
    x = rand_x(2, 7, 3 * 8, 0).view(2, 7, 3, 8)  # (B, T, H, dr)
    got = apply_rotary_emb(x, fc[:7])
    a = torch.arange(7, dtype=torch.float64)[:, None, None] * theta  # (T, 1, dr/2): angle p·θ_i
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([x0 * a.cos() - x1 * a.sin(), x0 * a.sin() + x1 * a.cos()], -1).flatten(-2)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)  # freqs_cis is complex64
    torch.testing.assert_close(got, rope_complex(x, fc[:7]), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)  # a rotation
    # the (B, T, dr) form broadcasts like a single head; the result keeps x's dtype
    torch.testing.assert_close(apply_rotary_emb(x[:, :, 0], fc[:7]), got[:, :, 0], rtol=0, atol=0)
    assert apply_rotary_emb(x.float(), fc[:7]).dtype == torch.float32


def test_rope_of_bf16_is_the_fp32_rotation_rounded_once():
    fc = precompute_freqs_cis(make_cfg())
    x = (torch.randn(2, 5, 3, 8) * 30).bfloat16()  # (B, T, H, dr)
    for f in (fc[3:8], fc[torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])]):  # shared, per-sequence positions
        got = apply_rotary_emb(x, f)
        assert got.dtype == torch.bfloat16 and torch.equal(got, apply_rotary_emb(x.float(), f).bfloat16())


def test_cache_positions_mask_the_keys_after_each_query():
    pos = torch.tensor([0, 3, 6])
    p = cache_positions(pos, 2, 9, torch.float64)
    assert torch.equal(p.at, torch.tensor([[0, 1], [3, 4], [6, 7]]))
    assert p.bias.shape == (3, 1, 2, 9) and p.bias.dtype == torch.float64
    for b, s in enumerate(pos.tolist()):  # the same mask as a chunk at one shared start position
        assert torch.equal(p.bias[b, 0] == 0, causal_mask(2, 9, s))
        assert torch.isneginf(p.bias[b, 0][~causal_mask(2, 9, s)]).all()


def test_rope_scores_depend_only_on_relative_position():
    cfg = make_cfg(yarn=True)
    fc = precompute_freqs_cis(cfg)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 1, 1, 8, generator=g, dtype=torch.float64).unbind(0)  # (1, 1, dr) each

    def score(p, s):
        return (apply_rotary_emb(q, fc[p:p + 1]) * apply_rotary_emb(k, fc[s:s + 1])).sum()

    for p, s, shift in [(5, 2, 9), (0, 4, 20), (7, 7, 13)]:
        torch.testing.assert_close(score(p, s), score(p + shift, s + shift), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score(5, 2), score(5, 3))


# ---------------------------------------------------------------------------------------------------------
# Bad use
# ---------------------------------------------------------------------------------------------------------
def test_bad_use_raises():
    cfg = make_cfg()
    fc = precompute_freqs_cis(cfg)
    m, x = make_mla(cfg, 0), rand_x(2, 4, cfg.dim, 0)
    with pytest.raises(ValueError, match="setup_cache"):
        m(x, fc[:4], start_pos=0)
    m.setup_cache(max_batch=2, max_seq_len=6)
    with pytest.raises(ValueError, match="cache length"):
        m(x, fc[3:7], start_pos=3)
    with pytest.raises(ValueError, match="batch"):
        m(rand_x(3, 4, cfg.dim, 0), fc[:4], start_pos=0)
    with pytest.raises(ValueError, match="freqs_cis"):
        m(x, fc[:5])
    with pytest.raises(ValueError, match="max_seq_len"):
        m.setup_cache(max_batch=2, max_seq_len=0)
    m.attn_impl = "flash"
    with pytest.raises(ValueError, match="attn_impl"):
        m(x, fc[:4])
    m.attn_impl = "absorb"
    m.free_cache()
    with pytest.raises(ValueError, match="setup_cache"):
        m(x, fc[:4], start_pos=0)


# ---------------------------------------------------------------------------------------------------------
# Mistakes that the tests above alone would let through
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_positions_enter_only_through_relative_rotary_dims(impl):
    """Shifting every position by the same offset leaves the output unchanged (RoPE is relative), and with
    W^QR and W^KR zeroed (the last dr rows of each head of wq_b, the last dr rows of wkv_a) no rotary phase
    reaches the output at all. RoPE on the content half of q, or the halves of q split the other way
    round, breaks one of the two."""
    cfg = make_cfg(v_head_dim=6, yarn=True)
    fc, T = precompute_freqs_cis(cfg), 9
    m, x = make_mla(cfg, 0), rand_x(2, T, cfg.dim, 0)
    m.attn_impl = impl
    base = m(x, fc[:T])
    for shift in (3, 20):
        torch.testing.assert_close(m(x, fc[shift:shift + T]), base, rtol=1e-5, atol=1e-6)  # complex64 phases
    g = torch.Generator().manual_seed(5)
    angles = torch.rand(T, cfg.qk_rope_head_dim // 2, generator=g) * 100  # arbitrary phases per position
    random_fc = torch.polar(torch.ones_like(angles), angles)
    assert not torch.allclose(m(x, random_fc), base)  # the phases matter while W^QR, W^KR are not zero
    dn, dr, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    for zero in ("W^QR", "W^KR"):  # either one alone removes every rotary phase from the scores
        z = copy.deepcopy(m)
        with torch.no_grad():
            if zero == "W^QR":
                z.wq_b.weight.view(cfg.n_heads, dn + dr, -1)[:, dn:] = 0  # q^R = 0 for every head
            else:
                z.wkv_a.weight[c:] = 0  # k^R = 0
        torch.testing.assert_close(z(x, random_fc), z(x, fc[:T]), rtol=1e-12, atol=1e-12, msg=zero)


def test_yarn_keeps_fast_pairs_and_slows_slow_ones():
    """YaRN from its definition: a pair that turns more than β_fast times over the original context keeps its
    frequency, one that turns fewer than β_slow times is divided by the factor, the ones between fall
    strictly between (a config other than V3's)."""
    cfg = ModelConfig(qk_rope_head_dim=32, rope_theta=50000.0, max_seq_len=1024, original_seq_len=512,
                      rope_factor=8.0, beta_fast=32, beta_slow=1)
    base = 50000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)  # θ_j
    turns = 512 * base / (2 * math.pi)  # rotations of pair j over the original context
    f = rope_frequencies(cfg).double()
    fast, slow = turns > 32, turns < 1
    assert fast.sum() >= 2 and slow.sum() >= 2 and (~fast & ~slow).sum() >= 2
    torch.testing.assert_close(f[fast], base[fast], rtol=1e-6, atol=0)
    torch.testing.assert_close(f[slow], base[slow] / 8, rtol=1e-6, atol=0)
    ratio = f[~fast & ~slow] / base[~fast & ~slow]
    assert bool(((ratio <= 1) & (ratio >= 1 / 8)).all())


def test_softmax_of_the_absorbed_path_runs_in_fp32(monkeypatch):
    """DESIGN: softmax runs in fp32. CPU's bf16 softmax kernel accumulates in fp32 itself, so a softmax on bf16
    scores would give the same numbers here; what is pinned is the dtype softmax receives, with a bf16 model
    and under bf16 autocast, and the bf16 output stays near the fp64 reference."""
    cfg = make_cfg(v_head_dim=6)
    fc = precompute_freqs_cis(cfg)
    m, x = make_mla(cfg, 0), rand_x(2, 9, cfg.dim, 0)
    m.attn_impl = "absorb"
    ref = m(x, fc[:9])
    seen, real_softmax = [], torch.nn.functional.softmax

    def spy(t, *args, **kw):
        seen.append(t.dtype)
        return real_softmax(t, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "softmax", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.float()(x.float(), fc[:9])
    low = m.bfloat16()(x.bfloat16(), fc[:9])
    assert seen == [torch.float32, torch.float32]
    assert (low.double() - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------------
# The demo (`python mla.py`) prints true numbers
# ---------------------------------------------------------------------------------------------------------
def test_demo_prints_the_cache_saving_and_the_agreement(capsys):
    import re

    import mla
    mla._demo_main([])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100

    def row(name):  # values/token/layer and bytes of one table row
        m = re.search(rf"^  {re.escape(name)}\s+([\d,]+)\s+([\d,]+)\s+([\d,.]+)$", out, re.M)
        return [float(g.replace(",", "")) for g in m.groups()]

    mha, gqa, lat = row("MHA, 128 heads"), row("GQA, 8 groups"), row("MLA, c^KV + k^R")
    assert (mha[0], gqa[0], lat[0]) == (128 * (192 + 128), 8 * (192 + 128), 512 + 64)
    assert (mha[1], lat[1]) == (2 * mha[0], 2 * lat[0])
    assert mha[2] == pytest.approx(mha[1] * 61 * 131072 / 2**30, abs=0.05)
    ratio = float(re.search(r"MLA caches ([\d.]+)x less than MHA", out).group(1))
    assert ratio == pytest.approx(40960 / 576, abs=0.05)
    fp64, fp32 = map(float, re.search(r"fp64 (\S+)\s+fp32 (\S+)", out).groups())
    decode = float(re.search(r"naive full pass: (\S+)", out).group(1))
    assert fp64 < 1e-12 and fp32 < 1e-5 and decode < 1e-5
