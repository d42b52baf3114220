"""The composition: parameter counts against the report, config validation, losses, cached decoding."""
import math

import pytest
import torch

from helpers import tiny_config
from model import PRESETS, Transformer, count_params, get_preset


def tiny(**kw):
    return tiny_config(dict(vocab_size=101, n_layers=3, v_head_dim=6, init_std=0.02), **kw)


def test_v3_671b_counts_match_the_report():
    c = count_params(PRESETS["v3-671b"])
    # Report and DeepSeek-V3's README_WEIGHTS.md: 671B total, 37B activated per token, MTP module 11.5B unique
    # parameters (its 14B on disk include copies of the 0.9B embedding and the 0.9B head).
    assert abs(c["total"] / 1e9 - 671) < 1.0, c
    assert abs(c["active"] / 1e9 - 37) < 1.0, c
    assert abs(c["mtp"] / 1e9 - 11.5) < 0.2, c


def test_v2_lite_counts():
    c = count_params(PRESETS["v2-lite-16b"])
    cfg = PRESETS["v2-lite-16b"]
    assert abs(c["total"] / 1e9 - 15.7) < 0.1, c  # DeepSeek-V2-Lite: 15.7B total, 2.4B activated
    # The 2.4B leaves out the input embedding (a lookup, 0.21B): with it the count is 2.66B.
    assert abs((c["active"] - cfg.vocab_size * cfg.dim) / 1e9 - 2.4) < 0.1, c


def test_v3_layers_has_v3_layer_shapes_and_fits_one_h200():
    v3, cfg = PRESETS["v3-671b"], PRESETS["v3-layers"]
    same = ("dim", "inter_dim", "n_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "v_head_dim", "moe_inter_dim", "n_shared_experts", "n_activated_experts", "n_expert_groups",
            "n_limited_groups", "score_func", "route_scale")
    assert {f: getattr(cfg, f) for f in same} == {f: getattr(v3, f) for f in same}
    c = count_params(cfg)
    # AdamW training state: fp32 weight, gradient and two moments = 16 bytes a parameter, under 100 GB so that
    # the activations of 4096 tokens fit beside it in an H200's 141 GB
    assert 4e9 < c["total"] + c["mtp"] < 100e9 / 16, c


@pytest.mark.parametrize("field, value, words", [
    ("n_routed_experts", 9, "divisible by n_expert_groups"),
    ("n_activated_experts", 3, "allowed groups"),
    ("dim", 0, "positive"),
    ("qk_rope_head_dim", 5, "even"),
    ("n_limited_groups", 3, "<= n_expert_groups"),
    ("score_func", "relu", "sigmoid"),
    ("n_dense_layers", 4, "<= n_layers"),
    ("q_lora_rank", -1, ">= 0"),
])
def test_bad_configs_raise_naming_field_and_rule(field, value, words):
    with pytest.raises(ValueError) as e:
        tiny(**{field: value})
    assert field in str(e.value) and words in str(e.value)


def test_presets_are_valid_and_unknown_names_raise():
    for name in PRESETS:
        assert get_preset(name).dim > 0
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_preset("tiny", dimension=3)


def test_forward_shapes_losses_and_initial_loss():
    torch.manual_seed(0)
    cfg = tiny(init_std=0.006)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, cfg.vocab_size)
    logits2, losses = model(idx, torch.roll(idx, -1, 1))
    assert torch.equal(logits, logits2)
    assert set(losses) == {"main", "mtp", "balance", "mtp_acc"}
    # With N(0, 0.006) weights the logits are ~0, so the loss starts at ln V.
    assert abs(losses["main"].item() - math.log(cfg.vocab_size)) < 0.05
    assert abs(losses["mtp"].item() - math.log(cfg.vocab_size)) < 0.05
    # the balance loss covers the main MoE layers and the MTP block's MoE; ≈ 1 per layer for near-uniform routing
    n_moe = len(model.moe_layers())
    assert n_moe == cfg.n_layers - cfg.n_dense_layers + cfg.n_mtp
    assert 0.5 * n_moe < losses["balance"].item() < 2.0 * n_moe
    model.eval()
    _, losses = model(idx, torch.roll(idx, -1, 1))
    assert losses["balance"].item() == 0.0


def test_init_norm_eps_and_untied_head():
    torch.manual_seed(0)
    model = Transformer(tiny(dim=64, inter_dim=128, vocab_size=512, init_std=0.006))
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # every matrix ~ N(0, 0.006): mean and std within 5 standard errors
            n = p.numel()
            assert abs(p.std().item() - 0.006) < 5 * 0.006 / (2 * n) ** 0.5, name
            assert abs(p.mean().item()) < 5 * 0.006 / n ** 0.5, name
        else:  # norm gains start at 1
            assert torch.equal(p, torch.ones_like(p)), name
    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert model.head.weight.data_ptr() != model.embed.weight.data_ptr()


def test_rms_norm_statistics_in_fp32():
    """A bf16 input is normalised with its statistics in fp32: the output is the exact (fp64) result rounded once
    to bf16. Statistics taken in bf16 round every square and the product, and miss that for about a third of the
    values."""
    from layers import RMSNorm
    torch.manual_seed(0)
    x = (torch.randn(64, 1024) * 3).bfloat16()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    got = RMSNorm(1024)(x)
    assert got.dtype == torch.bfloat16
    assert (got != exact.bfloat16()).float().mean() < 0.001  # double rounding (fp32, then bf16) aside
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # the mistake the test must catch
    assert (in_bf16 != exact.bfloat16()).float().mean() > 0.1


def test_short_sequence_skips_mtp_without_stale_balance_loss():
    torch.manual_seed(2)
    model = Transformer(tiny())
    idx = torch.randint(0, 101, (2, 8))
    _, losses = model(idx, torch.roll(idx, -1, 1))  # MTP's MoE block runs and records a balance loss
    one = torch.randint(0, 101, (2, 1))
    _, losses = model(one, one)  # T = 1: the MTP depth cannot run
    n_main_moe = model.cfg.n_layers - model.cfg.n_dense_layers
    manual = sum(b.ffn.balance_loss for b in model.layers[model.cfg.n_dense_layers:])
    assert torch.equal(losses["balance"], manual) and n_main_moe == 2
    (losses["main"] + losses["balance"]).backward()  # no stale graph from the previous forward
    model.eval()
    _, losses = model(one, one)
    assert losses["balance"].item() == 0.0


def test_gate_bias_is_saved_but_not_trained():
    model = Transformer(tiny())
    sd = model.state_dict()
    names = {n for n, _ in model.named_parameters()}
    assert "layers.1.ffn.gate.bias" in sd and "layers.1.ffn.gate.bias" not in names
    assert "freqs_cis" not in sd
    assert not any(n.endswith("kv_cache") for n in sd)


def test_training_steps_fit_a_batch():
    torch.manual_seed(1)
    cfg = tiny(init_std=0.02)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 16))
    tgt = torch.roll(idx, -1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        _, losses = model(idx, tgt)
        loss = losses["main"] + 0.3 * losses["mtp"] + 1e-4 * losses["balance"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_moe_bias(0.001)
    assert loss.item() < 0.5 * first
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_decode_matches_full_forward(seed):
    torch.manual_seed(seed)
    model = Transformer(tiny(q_lora_rank=0 if seed else 16)).double().eval()
    idx = torch.randint(0, 101, (2, 20))
    full = model(idx)
    model.setup_cache(2, 24)
    pieces = [model.forward_cached(idx[:, :7], 0)[0]]
    pieces.append(model.forward_cached(idx[:, 7:12], 7)[0])  # chunked prefill at start_pos > 0
    for t in range(12, 20):
        pieces.append(model.forward_cached(idx[:, t:t + 1], t)[0])
    cached = torch.cat(pieces, 1)
    assert torch.allclose(cached, full, atol=1e-10, rtol=1e-8)
    model.free_cache()


def test_sequence_longer_than_context_raises():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def _measured_flops_per_token(cfg, B, T):
    """One training step's forward and backward counted by torch's FlopCounterMode, per token: (the weights'
    matrix products, everything else = the attention core's batched products over all T keys)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as fc:
        _, losses = model(idx, idx.roll(-1, 1))
        (losses["main"] + losses["mtp"]).backward()
    weights = sum(v for op, v in fc.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    return weights / (B * T), (fc.get_total_flops() - weights) / (B * T)


def test_train_flops_per_token_match_a_counted_training_step():
    """train_flops_per_token against the FLOPs torch counts in a real forward + backward: the weights' products
    exactly (6 per weight and token), the attention core at half of the counted all-keys products (a causal query
    sees T/2 keys on average); with MTP, the depth's part within 1/T (it runs on T−1 positions, the rule counts T)."""
    from model import train_flops_per_token
    T = 64
    base = tiny_config(n_mtp=0, max_seq_len=T)
    weights, attn = _measured_flops_per_token(base, 2, T)
    assert train_flops_per_token(base, T, with_mtp=False) == pytest.approx(weights + attn / 2, rel=1e-12)
    cfg = tiny_config(n_mtp=1, max_seq_len=T)
    weights1, attn1 = _measured_flops_per_token(cfg, 2, T)
    rule_mtp = train_flops_per_token(cfg, T) - train_flops_per_token(cfg, T, with_mtp=False)
    measured_mtp = (weights1 - weights) + (attn1 - attn) / 2
    assert rule_mtp == pytest.approx(measured_mtp * T / (T - 1), rel=1 / T)


def test_dense_block_is_pre_norm_swiglu():
    """Block 0 (dense) from its definition, with random norm gains: h = x + MLA(RMSNorm_a(x)), then
    h + W2(SiLU(W1 u) ⊙ W3 u) with u = RMSNorm_f(h) (W1 the gate, W3 the up projection). Without transformers
    installed (test_hf_io.py skips) nothing else pins the block's composition to an independent formula."""
    import torch.nn.functional as F

    from model import Block
    cfg = tiny()
    torch.manual_seed(8)
    blk = Block(0, cfg).double()
    with torch.no_grad():
        for p in blk.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, cfg.dim, dtype=torch.float64)
    f = Transformer(cfg).freqs_cis[:7]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    with torch.no_grad():
        h = x + blk.attn(rms(x, blk.attn_norm.weight), f)
        u = rms(h, blk.ffn_norm.weight)
        want = h + (F.silu(u @ blk.ffn.w1.weight.T) * (u @ blk.ffn.w3.weight.T)) @ blk.ffn.w2.weight.T
        torch.testing.assert_close(blk(x, f), want, rtol=1e-9, atol=1e-12)


# -- presets against the published configs, validation, config dicts ------------------------------------------------
# DeepSeek-V3's inference/configs/config_671B.json (ModelArgs defaults where the JSON is silent: original_seq_len
# 4096, rope_theta 10000, beta_fast 32, beta_slow 1, mscale 1.0), the hub config's max_position_embeddings 163840 and
# num_nextn_predict_layers 1, and the report's init std 0.006; DeepSeek-V2-Lite's config (config_16B.json).
V3_671B = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
               n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
               n_limited_groups=4, score_func="sigmoid", route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096, rope_theta=10000.0,
               rope_factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0, max_seq_len=163840, n_mtp=1, init_std=0.006)
V2_LITE_16B = dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
                   n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
                   n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, mscale=0.707, n_mtp=0)


@pytest.mark.parametrize("name, published", [("v3-671b", V3_671B), ("v2-lite-16b", V2_LITE_16B)])
def test_presets_are_the_published_configs(name, published):
    cfg = get_preset(name)
    assert {k: getattr(cfg, k) for k in published} == published


@pytest.mark.parametrize("changes, field, words", [
    (dict(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2), "n_expert_groups",
     "top-2"),  # sigmoid groups of one expert: no top-2 sum
    (dict(route_scale=0.0), "route_scale", "> 0"),
    (dict(mscale=-1.0), "mscale", "> 0"),
    (dict(rope_factor=0.5), "rope_factor", ">= 1"),
    (dict(beta_fast=1, beta_slow=1), "beta_fast", "beta_fast > beta_slow"),
    (dict(beta_slow=0), "beta_fast", "beta_slow > 0"),
    (dict(dim=32.0), "dim", "positive integer"),
    (dict(n_layers=True), "n_layers", "positive integer"),
])
def test_more_bad_configs_raise_naming_field_and_rule(changes, field, words):
    with pytest.raises(ValueError) as e:
        tiny(**changes)
    assert f"ModelConfig.{field}=" in str(e.value) and words in str(e.value)


def test_softmax_groups_of_one_expert_are_valid():
    """The top-2 rule is the sigmoid router's: a softmax router's group score is the max, so 1 expert a group is fine."""
    assert tiny(score_func="softmax", n_routed_experts=4, n_expert_groups=4, n_limited_groups=2).n_expert_groups == 4


def test_config_dict_round_trip_and_unknown_fields():
    """config_to_dict → config_from_dict (what checkpoints store and generate.py / --resume read) gives back every
    preset; a field this version does not know is a ValueError naming it, not dropped and not a TypeError."""
    from config import config_from_dict, config_to_dict
    for name in PRESETS:
        d = config_to_dict(get_preset(name))
        assert config_from_dict(d) == get_preset(name)
    with pytest.raises(ValueError, match="unknown ModelConfig field.*n_future_layers"):
        config_from_dict({**config_to_dict(tiny()), "n_future_layers": 2})
