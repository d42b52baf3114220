"""hf_io.py: the Hugging Face DeepSeek-V3 checkpoint layout, both ways.

Without transformers: save → load round trips (single file, shards, FP8 block-quantized weights, HF ≥ 5 fused
experts, a checkpoint without its MTP layers), the exact hub key names, config.json fields, atomic overwrite, and
bad inputs. With transformers (skipped if absent): our checkpoint gives the same logits in DeepseekV3ForCausalLM,
and a checkpoint saved by DeepseekV3ForCausalLM gives the same logits here.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_io
from helpers import tiny_config
from hf_io import load_hf_checkpoint, save_hf_checkpoint
from model import Transformer
from mtp import mtp_hidden


def tiny_cfg(**kw):
    """3 blocks (1 dense, 2 MoE), 8 experts in 4 groups, q-lora, YaRN on (64 > 16), one MTP module."""
    return tiny_config(dict(vocab_size=96, n_layers=3, qk_rope_head_dim=8, max_seq_len=64, original_seq_len=16,
                            rope_factor=4.0, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2,
                            route_scale=2.5), **kw)


@torch.no_grad()
def randomize(named_params, named_buffers):
    """Weights ~ N(0, 1/fan_in), norm gains 1 ± 0.1, gate biases ± 0.3 so that the bias changes the selection."""
    for name, p in named_params:
        p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.ndim >= 2 else 1 + 0.1 * torch.randn_like(p))
    for name, b in named_buffers:
        if name.endswith(("gate.bias", "e_score_correction_bias")):
            b.copy_(0.3 * torch.randn_like(b))


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    randomize(model.named_parameters(), model.named_buffers())
    return model.eval()


def tokens(cfg, B=2, T=12, seed=1):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def final_hidden(model, idx):
    freqs = model.freqs_cis[: idx.shape[1]]
    h = model.embed(idx)
    for layer in model.layers:
        h = layer(h, freqs)
    return model.norm(h)


def assert_same_model(a, b, idx):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


# -- round trips (no transformers needed) --------------------------------------------------------------------
def test_round_trip_single_file(tmp_path):
    cfg = tiny_cfg()
    model = random_model(cfg)
    save_hf_checkpoint(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind
    loaded = load_hf_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    idx = tokens(cfg)
    assert_same_model(model, loaded, idx)
    with torch.no_grad():  # the MTP module came back too
        _, la = model(idx, idx)
        _, lb = loaded(idx, idx)
    assert torch.equal(la["mtp"], lb["mtp"])
    half = load_hf_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)  # weights cast, b_i kept in fp32
    for k, t in half.state_dict().items():
        want = torch.float32 if k.endswith("gate.bias") else torch.bfloat16
        assert t.dtype == want and torch.equal(t, model.state_dict()[k].to(want)), k
    assert half.freqs_cis.is_complex()


def test_softmax_router_is_written_as_deepseek_v2(tmp_path):
    """transformers' DeepseekV3 class routes by sigmoid plus bias whatever scoring_func says: a softmax router
    (DeepSeek-V2's) is saved as model_type deepseek_v2, and it gives our logits in DeepseekV2ForCausalLM."""
    cfg = tiny_cfg(score_func="softmax", route_scale=1.0, n_mtp=0)
    model = random_model(cfg)
    save_hf_checkpoint(model, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["model_type"] == "deepseek_v2" and c["architectures"] == ["DeepseekV2ForCausalLM"]
    assert load_hf_checkpoint(tmp_path).cfg == cfg
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    idx = tokens(cfg, T=20)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-5, atol=1e-5)


def test_round_trip_sharded_softmax_no_qlora(tmp_path):
    cfg = tiny_cfg(q_lora_rank=0, score_func="softmax", n_expert_groups=2, n_limited_groups=1,
                   route_scale=1.0, max_seq_len=32, original_seq_len=32, rope_factor=40.0, n_mtp=0)
    model = random_model(cfg)
    save_hf_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    keys = set()
    for s in shards:
        with safe_open(str(tmp_path / "ckpt" / s), "pt") as f:
            keys |= set(f.keys())
            assert all(index["weight_map"][k] == s for k in f.keys())
    assert keys == set(index["weight_map"])
    assert "model.layers.0.self_attn.q_proj.weight" in keys and not any("e_score" in k for k in keys)
    c = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (c["q_lora_rank"], c["rope_scaling"], c["scoring_func"], c["topk_method"], c["norm_topk_prob"]) == \
        (None, None, "softmax", "group_limited_greedy", False)
    loaded = load_hf_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == cfg
    assert_same_model(model, loaded, tokens(cfg))


def test_hub_key_names(tmp_path):
    cfg = tiny_cfg(n_layers=2, n_routed_experts=2, n_expert_groups=1, n_limited_groups=1)
    save_hf_checkpoint(random_model(cfg), tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    attn = [f"self_attn.{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                                               "kv_a_layernorm", "kv_b_proj", "o_proj")]
    common = attn + ["input_layernorm.weight", "post_attention_layernorm.weight"]
    moe = ["mlp.gate.weight", "mlp.gate.e_score_correction_bias"] + [f"mlp.{m}.{p}_proj.weight" for p in (
        "gate", "up", "down") for m in ("experts.0", "experts.1", "shared_experts")]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.0.{k}" for k in common + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]}
    expected |= {f"model.layers.1.{k}" for k in common + moe}
    expected |= {f"model.layers.2.{k}" for k in common + moe + [
        "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
        "embed_tokens.weight"]}
    assert keys == expected


def test_config_json_fields(tmp_path):
    cfg = tiny_cfg(init_std=0.02)
    save_hf_checkpoint(random_model(cfg), tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["model_type"] == "deepseek_v3" and c["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (c["hidden_size"], c["num_key_value_heads"], c["q_lora_rank"], c["n_group"], c["topk_group"]) == \
        (32, 2, 16, 4, 2)
    assert (c["topk_method"], c["norm_topk_prob"], c["num_nextn_predict_layers"], c["initializer_range"]) == \
        ("noaux_tc", True, 1, 0.02)
    assert c["rope_scaling"] == {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 1.0, "mscale_all_dim": 1.0}
    assert (c["max_position_embeddings"], c["rope_interleave"], c["rms_norm_eps"], c["torch_dtype"]) == \
        (64, True, 1e-6, "float32")


def test_config_variants_accepted():
    c = hf_io.hf_config(tiny_cfg())
    rope = c.pop("rope_scaling")
    newer = {**c, "rope_parameters": {**rope, "rope_theta": c.pop("rope_theta")}}  # transformers ≥ 5 spelling
    assert hf_io.config_from_hf(newer) == tiny_cfg()
    v2_lite = {"model_type": "deepseek_v2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
               "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 8,
               "num_experts_per_tok": 2, "n_shared_experts": 2, "kv_lora_rank": 16, "q_lora_rank": None,
               "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 64,
               "first_k_dense_replace": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
               "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rope_scaling": None}
    cfg = hf_io.config_from_hf(v2_lite)
    assert (cfg.score_func, cfg.q_lora_rank, cfg.n_shared_experts, cfg.yarn_active, cfg.n_mtp) == \
        ("softmax", 0, 2, False, 0)


def block_quantized(tensors: dict, block: int):
    """The hub's FP8 layout of every projection matrix: E4M3 weights and weight_scale_inv per block × block, the
    amax of its (edge-cropped) block / 448. Returns (tensors, {name: dequantized weight}), the latter by the plain
    per-element definition w[i, j] = fp8[i, j] · scale_inv[i // block, j // block]."""
    tensors, deq = dict(tensors), {}
    for k in [k for k, t in tensors.items() if k.endswith("proj.weight") and t.ndim == 2]:
        w = tensors[k]
        M, N = w.shape
        rb, cb = -(-M // block), -(-N // block)
        padded = torch.zeros(rb * block, cb * block)
        padded[:M, :N] = w
        amax = padded.abs().reshape(rb, block, cb, block).amax(dim=(1, 3))  # (rb, cb)
        scale = (amax / 448).clamp(min=1e-12)
        q = (w / scale.repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]).to(torch.float8_e4m3fn)
        expect = torch.empty(M, N)
        for i in range(M):
            for j0 in range(0, N, block):
                expect[i, j0:j0 + block] = q[i, j0:j0 + block].float() * scale[i // block, j0 // block]
        tensors[k], tensors[k + "_scale_inv"], deq[k] = q, scale, expect
    return tensors, deq


def test_fp8_block_quantized_checkpoint(tmp_path):
    cfg = tiny_cfg(inter_dim=160)  # dense gate/up (160, 32), down (32, 160): edge blocks to crop
    model = random_model(cfg)
    tensors, deq = block_quantized(hf_io.to_hf_state_dict(model), 128)
    assert ("model.layers.0.mlp.gate_proj.weight_scale_inv", (2, 1)) in \
        [(k, tuple(v.shape)) for k, v in tensors.items()]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_io.hf_config(cfg)))
    loaded = load_hf_checkpoint(tmp_path)
    got = hf_io.to_hf_state_dict(loaded)
    for k, t in got.items():
        ref = deq.get(k, tensors.get(k))
        assert torch.equal(t, ref), k
        if k in deq:  # and the quantization itself is close to the original weights
            orig = hf_io.to_hf_state_dict(model)[k]
            assert (t - orig).norm() / orig.norm() < 0.1


def test_fused_experts_and_missing_mtp(tmp_path):
    cfg = tiny_cfg()
    model = random_model(cfg)
    tensors = hf_io.to_hf_state_dict(model)
    for i in (1, 2):  # MoE layers in the HF ≥ 5 in-memory layout
        p = f"model.layers.{i}.mlp.experts"
        get = lambda e, w: tensors.pop(f"{p}.{e}.{w}_proj.weight")  # noqa: E731
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([get(e, "gate"), get(e, "up")]) for e in range(8)])
        tensors[f"{p}.down_proj"] = torch.stack([get(e, "down") for e in range(8)])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_io.hf_config(cfg)))
    assert_same_model(model, load_hf_checkpoint(tmp_path), tokens(cfg))
    # the same checkpoint without its MTP layer (layer 3): loads as n_mtp = 0, with a warning
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")},
              str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="MTP"):
        loaded = load_hf_checkpoint(tmp_path)
    assert loaded.cfg.n_mtp == 0 and len(loaded.mtp) == 0
    with torch.no_grad():
        assert torch.equal(loaded(tokens(cfg)), model(tokens(cfg)))


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    cfg = tiny_cfg(n_mtp=0)
    old, new = random_model(cfg, seed=0), random_model(cfg, seed=1)
    target = tmp_path / "ckpt"
    save_hf_checkpoint(old, target, max_shard_bytes=30_000)
    mode = os.stat(target).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # a folder's usual mode, not mkdtemp's 0700: other users may read the weights
    (target / "tokenizer.json").write_text("{}")
    (target / "original").mkdir()  # a folder of other files (the released weights' original/, say)
    (target / "original" / "params.json").write_text("{}")
    real_save = hf_io.save_file

    def crash(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(new, target)
    assert os.listdir(tmp_path) == ["ckpt"]  # the temporary directory is gone ...
    assert_same_model(old, load_hf_checkpoint(target), tokens(cfg))  # ... and the old checkpoint intact
    monkeypatch.setattr(hf_io, "save_file", real_save)
    synced = []
    monkeypatch.setattr(hf_io, "fsync_path", lambda p: synced.append(os.path.relpath(p, tmp_path).split(os.sep)[1:]))
    save_hf_checkpoint(new, target)  # single file now: the old shards and index must be gone
    for kept in (["config.json"], ["model.safetensors"], ["tokenizer.json"], ["original", "params.json"]):
        assert kept in synced, kept  # flushed before the renames, the copies of the kept files too
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "original", "tokenizer.json"]
    assert (target / "original" / "params.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert_same_model(new, load_hf_checkpoint(target), tokens(cfg))


def test_bad_inputs(tmp_path):
    cfg = tiny_cfg(n_mtp=0)
    model = random_model(cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "model.safetensors.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors.bin is a file: a checkpoint is a directory"):
        load_hf_checkpoint(tmp_path / "model.safetensors.bin")
    os.remove(tmp_path / "model.safetensors.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_hf_checkpoint(model, tmp_path / "x", max_shard_bytes=0)
    good = hf_io.to_hf_state_dict(model)
    config = hf_io.hf_config(cfg)

    def write(tensors, **changes):
        save_file(tensors, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))

    write(good)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])  # truncated, as by a crash during a copy
    with pytest.raises(ValueError, match="safetensors"):
        load_hf_checkpoint(tmp_path)
    write({k: v for k, v in good.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"})
    with pytest.raises(ValueError, match="1 missing.*experts"):
        load_hf_checkpoint(tmp_path)
    write({**good, "model.layers.0.mlp.gate.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match="1 unexpected.*layers.0.mlp.gate"):
        load_hf_checkpoint(tmp_path)
    write({**good, "model.norm.weight": torch.ones(31)})
    with pytest.raises(ValueError, match="model.norm.weight: shape"):
        load_hf_checkpoint(tmp_path)
    for changes, message in [({"model_type": "llama"}, "model_type"), ({"topk_group": 5}, "n_limited_groups"),
                             ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type"),
                             ({"tie_word_embeddings": True}, "tie_word_embeddings"),
                             ({"rope_scaling": {**hf_io.hf_config(tiny_cfg())["rope_scaling"], "mscale": 0.7}},
                              "mscale_all_dim")]:
        write(good, **changes)
        with pytest.raises(ValueError, match=message):
            load_hf_checkpoint(tmp_path)
    # JSON of the wrong kind: one line that names the file and the field, not an AttributeError
    for text, message in [("[1]", "config.json must hold a JSON object, not an array"),
                          ("null", "must hold a JSON object, not null"),
                          (json.dumps({**config, "quantization_config": [1]}), "quantization_config must be a JSON"),
                          (json.dumps({**config, "rope_scaling": "yarn"}), "rope_scaling must be a JSON object, not a")]:
        write(good)
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_hf_checkpoint(tmp_path)
    write(good)
    for index in ([], {"weight_map": 5}, {"weight_map": {"model.norm.weight": 3}}):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid index"):
            load_hf_checkpoint(tmp_path)


# -- against HF transformers ---------------------------------------------------------------------------------
def hf_model_from(path):
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    return hf.eval(), info


@pytest.mark.parametrize("q_lora_rank,yarn", [(16, True), (0, False)])
def test_ours_gives_same_logits_in_transformers(tmp_path, q_lora_rank, yarn):
    pytest.importorskip("transformers")
    cfg = tiny_cfg(q_lora_rank=q_lora_rank, original_seq_len=16 if yarn else 64)
    model = random_model(cfg)
    save_hf_checkpoint(model, tmp_path)
    hf, info = hf_model_from(tmp_path)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])  # MTP: not in the main model
    idx = tokens(cfg, T=20)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    print(f"ours→HF max |Δlogit| = {(ours - theirs).abs().max().item():.2e} (|logit| max {ours.abs().max():.1f})")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # the MTP module (hub layer 3) through transformers' MtpModel, which looks for MTP layers by the pattern of
    # the 61-layer model unless told the layer number; depth 1 reads h_{0..T-2} and the embeddings of idx[1:]
    mtp_model = pytest.importorskip("transformers.modeling_layers").MtpModel
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layers}\..*"]
    hf_mtp = mtp_model.from_pretrained(hf).eval()
    T = idx.shape[1]
    with torch.no_grad():
        h = hf.model(idx).last_hidden_state
        h1 = hf_mtp.forward_layer(0, h[:, :-1], torch.arange(T - 1)[None], None, input_ids=idx[:, 1:])
        theirs = hf.lm_head(h1)  # (B, T-1, V)
        ours = model.head(mtp_hidden(model.mtp, final_hidden(model, idx), idx, model.embed, model.freqs_cis[:T])[0])
    print(f"ours→HF MTP max |Δlogit| = {(ours - theirs).abs().max().item():.2e}")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank,fused", [(16, False), (None, True)])
def test_transformers_checkpoint_gives_same_logits_here(tmp_path, q_lora_rank, fused):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1, n_group=4,
        topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.8,
                                                  "mscale_all_dim": 0.8}, num_nextn_predict_layers=1)
    hf = transformers.DeepseekV3ForCausalLM(config).eval()
    randomize(hf.named_parameters(), hf.named_buffers())
    hf.save_pretrained(tmp_path, save_original_format=not fused)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys()) == fused
    with pytest.warns(UserWarning, match="MTP"):  # save_pretrained does not write the MTP layer
        model = load_hf_checkpoint(tmp_path)
    assert (model.cfg.q_lora_rank, model.cfg.yarn_active, model.cfg.mscale, model.cfg.n_mtp) == \
        (q_lora_rank or 0, True, 0.8, 0)
    idx = tokens(model.cfg, T=20)
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    print(f"HF→ours max |Δlogit| = {(ours - theirs).abs().max().item():.2e} (|logit| max {ours.abs().max():.1f})")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mtp_layer_holds_copies_of_the_embedding_and_the_head():
    """The hub's MTP layer L = n_layers carries the shared embedding as embed_tokens and the shared output head as
    shared_head.head (vLLM and SGLang read them for the MTP draft model)."""
    cfg = tiny_cfg()
    model = random_model(cfg)
    t, L = hf_io.to_hf_state_dict(model), cfg.n_layers
    assert not torch.equal(model.embed.weight, model.head.weight)
    assert torch.equal(t[f"model.layers.{L}.embed_tokens.weight"], model.embed.weight)
    assert torch.equal(t[f"model.layers.{L}.shared_head.head.weight"], model.head.weight)


def test_shards_fill_up_to_max_shard_bytes():
    """A shard holds tensors up to max_shard_bytes inclusive: 4 tensors of 16 bytes with a 32-byte limit are 2
    shards of 2."""
    shards = hf_io._shards({f"w{i}": torch.zeros(4) for i in range(4)}, 32)
    assert [list(s) for s in shards] == [["w0", "w1"], ["w2", "w3"]]


def test_fp8_checkpoint_with_another_block_size(tmp_path):
    """quantization_config.weight_block_size sets the blocks of weight_scale_inv: 64×64 blocks here, dequantized as
    w = fp8 · scale_inv[i // 64, j // 64]."""
    cfg = tiny_cfg(inter_dim=160)
    model = random_model(cfg)
    tensors, deq = block_quantized(hf_io.to_hf_state_dict(model), 64)
    want = {**tensors, **deq}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    c = hf_io.hf_config(cfg)
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64],
                                "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(c))
    got = hf_io.to_hf_state_dict(load_hf_checkpoint(tmp_path))
    for k, t in got.items():
        assert torch.equal(t, want[k]), k
    for sizes in ([64, 128], [64]):  # blocks of another shape are refused, not read as 64×64
        c["quantization_config"]["weight_block_size"] = sizes
        (tmp_path / "config.json").write_text(json.dumps(c))
        with pytest.raises(ValueError, match=r"weight_block_size .* \(square blocks only\)"):
            load_hf_checkpoint(tmp_path)


def test_a_crash_between_the_final_renames_keeps_the_old_checkpoint_on_disk(tmp_path, monkeypatch):
    """Overwriting: the old checkpoint is moved aside, not deleted, until the new one is in place; killed between the
    two renames, the old weights are still complete on disk (in the folder moved aside), and loading the path says
    where in one line."""
    cfg = tiny_cfg(n_mtp=0)
    old, new = random_model(cfg, seed=0), random_model(cfg, seed=1)
    target = tmp_path / "ckpt"
    save_hf_checkpoint(old, target)
    real = os.replace

    def killed_at_the_second_rename(src, dst):
        if os.path.basename(src).startswith(".ckpt.tmp-"):
            raise KeyboardInterrupt                                   # stands for a kill at that instant
        return real(src, dst)

    monkeypatch.setattr(hf_io.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(new, target)
    monkeypatch.undo()
    kept = [d for d in tmp_path.iterdir() if (d / "model.safetensors").exists()]
    assert len(kept) == 1
    assert_same_model(old, load_hf_checkpoint(kept[0]), tokens(cfg))
    where = f"interrupted; the previous checkpoint is complete in .*{kept[0].name}$"
    with pytest.raises(FileNotFoundError, match=where):
        load_hf_checkpoint(target)


# -- config.json fields read on load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, words", [
    ({"moe_layer_freq": 2}, "moe_layer_freq"),  # every second layer MoE: not what we build
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),  # sigmoid weights not renormalised
    ({"topk_method": "group_limited_greedy"}, "topk_method"),
    ({"rope_scaling": {**hf_io.hf_config(tiny_cfg())["rope_scaling"], "attention_factor": 0.5}}, "attention_factor"),
    ({"rope_scaling": {**hf_io.hf_config(tiny_cfg())["rope_scaling"], "truncate": False}}, "truncate"),
])
def test_config_settings_we_cannot_reproduce_are_refused(changes, words):
    """Settings under which transformers would compute something else than this implementation raise ValueError
    naming them, instead of loading a model that gives other logits."""
    c = hf_io.hf_config(tiny_cfg())
    assert hf_io.config_from_hf(c) == tiny_cfg()
    with pytest.raises(ValueError, match=words):
        hf_io.config_from_hf({**c, **changes})


@pytest.mark.parametrize("key", ["routed_scaling_factor", "first_k_dense_replace", "n_shared_experts", "n_group",
                                 "topk_group"])
def test_routing_settings_without_a_default_must_be_given(key):
    """A config.json without one of the routing's settings is refused naming it: transformers' defaults for them
    differ by class and version (DeepseekV3Config's are V3's: 2.5, 3, 1, 8, 4), so any default here could load a model
    that routes otherwise than transformers does."""
    c = hf_io.hf_config(tiny_cfg())
    del c[key]
    with pytest.raises(ValueError, match=f"config.json lacks {key} "):
        hf_io.config_from_hf(c)


def test_greedy_topk_method_has_no_group_limit():
    """DeepSeek-V2's topk_method "greedy" picks the top-k over all experts whatever n_group / topk_group say;
    "group_limited_greedy" uses them."""
    c = hf_io.hf_config(tiny_cfg(score_func="softmax", route_scale=1.0, n_expert_groups=1, n_limited_groups=1))
    cfg = hf_io.config_from_hf({**c, "topk_method": "greedy", "n_group": 4, "topk_group": 2})
    assert (cfg.n_expert_groups, cfg.n_limited_groups) == (1, 1)
    cfg = hf_io.config_from_hf({**c, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2})
    assert (cfg.n_expert_groups, cfg.n_limited_groups) == (4, 2)


def test_rope_fields_read_from_the_rope_settings():
    """The YaRN factor is rope_scaling's "factor", not max_position_embeddings / original_max_position_embeddings
    (transformers 4.51-4.55 derived it so; the two agree in the V3 hub config, 163840 / 4096 = 40); rope_theta may sit
    inside transformers ≥ 5's rope_parameters only."""
    c = hf_io.hf_config(tiny_cfg())
    rope = {**c.pop("rope_scaling"), "factor": 8.0}  # max_position_embeddings 64 / 16 = 4
    assert hf_io.config_from_hf({**c, "rope_scaling": rope}).rope_factor == 8.0
    del c["rope_theta"]
    cfg = hf_io.config_from_hf({**c, "rope_parameters": {**rope, "rope_theta": 50000.0}})
    assert (cfg.rope_theta, cfg.rope_factor, cfg.original_seq_len) == (50000.0, 8.0, 16)
