"""Hugging Face DeepSeek-V3 checkpoint layout, both ways: `save_hf_checkpoint` and `load_hf_checkpoint`.

A HF-layout checkpoint is a directory with `config.json` (HF field names, model_type "deepseek_v3"; "deepseek_v2"
for a softmax router) and the weights in safetensors, either one `model.safetensors` or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json` ({"weight_map": {hub key: shard
file}}). The released DeepSeek-V3 weights, HF
transformers (`DeepseekV3ForCausalLM`), vLLM and SGLang all read it, so a model trained here can run there, and the
released (or any HF-saved) weights can run here with the same logits.

Key mapping (ours → hub), for block i (0 <= i < n_layers) and MTP module k (hub layer L = n_layers + k):

| ours                                   | hub (prefix `model.layers.{i}.` or `model.layers.{L}.`)          |
|----------------------------------------|------------------------------------------------------------------|
| embed.weight / norm.weight / head.weight | model.embed_tokens.weight / model.norm.weight / lm_head.weight |
| attn_norm / ffn_norm                   | input_layernorm / post_attention_layernorm                       |
| attn.wq (only when q_lora_rank == 0)   | self_attn.q_proj                                                 |
| attn.wq_a / attn.q_norm / attn.wq_b    | self_attn.q_a_proj / self_attn.q_a_layernorm / self_attn.q_b_proj |
| attn.wkv_a / attn.kv_norm / attn.wkv_b | self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj        |
| attn.wo                                | self_attn.o_proj                                                 |
| ffn.w1 / ffn.w3 / ffn.w2 (dense)       | mlp.gate_proj / mlp.up_proj / mlp.down_proj                      |
| ffn.gate.weight / ffn.gate.bias (b_i)  | mlp.gate.weight / mlp.gate.e_score_correction_bias               |
| ffn.experts.w1[e] / w3[e] / w2[e]      | mlp.experts.{e}.gate_proj / up_proj / down_proj (one per expert) |
| ffn.shared_experts.w1 / w3 / w2        | mlp.shared_experts.gate_proj / up_proj / down_proj               |
| mtp.{k}.enorm / hnorm / eh_proj        | enorm / hnorm / eh_proj  (of hub layer L)                        |
| mtp.{k}.block.*                        | the decoder-layer keys above (of hub layer L)                    |
| mtp.{k}.norm                           | shared_head.norm                                                 |
| (embed.weight, head.weight again)      | embed_tokens.weight, shared_head.head.weight (copies, hub layer L) |

No tensor is permuted: our RoPE rotates interleaved pairs (2i, 2i+1) like the official weights, and HF reads them
with `rope_interleave=True`. YaRN is written as rope_scaling with mscale == mscale_all_dim, which makes HF's cos/sin
amplitude factor 1 and its softmax scale qk_head_dim^-0.5 · m², m = 0.1·mscale·ln(factor) + 1, exactly ours.

Loading also accepts: shards; FP8 checkpoints (float8_e4m3fn weights with `<key>_scale_inv` block scales, b×b with
b from quantization_config.weight_block_size, 128 in the released weights, dequantized on load: w = fp8 ·
scale_inv[i//b, j//b]); HF transformers ≥ 5 fused experts
(`mlp.experts.gate_up_proj` (E, 2I, dim) = [gate; up], `mlp.experts.down_proj` (E, dim, I)); `rope_scaling` or the
newer `rope_parameters`; V2-style softmax routers; checkpoints that declare MTP layers but do not hold them (HF
transformers' save_pretrained drops them). Settings this implementation cannot reproduce exactly raise ValueError.
"""
import json
import os
import re
import shutil
import tempfile
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint import fsync_path
from config import ModelConfig
from fp8 import dequantize_weight
from model import Transformer

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
_FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
          "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
          "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj",
          "attn.wo": "self_attn.o_proj", "ffn.gate": "mlp.gate",
          **{f"ffn.{w}": f"mlp.{p}" for w, p in _FFN.items()},
          **{f"ffn.shared_experts.{w}": f"mlp.shared_experts.{p}" for w, p in _FFN.items()}}
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}


# -- names ---------------------------------------------------------------------------------------------------------
def _block_name(sub: str, key: str) -> str:
    module, leaf = sub.rsplit(".", 1)
    if module == "ffn.experts" and leaf in _FFN:  # stacked (E, ., .) → one tensor per expert
        return "mlp.experts.{e}." + _FFN[leaf] + ".weight"
    if module not in _BLOCK:
        raise ValueError(f"no Hugging Face name for parameter {key!r}")
    if module == "ffn.gate" and leaf == "bias":
        leaf = "e_score_correction_bias"
    return f"{_BLOCK[module]}.{leaf}"


def hf_name(key: str, n_layers: int) -> str:
    """Hub key of one of our state_dict keys; stacked experts give a template with '{e}' for the expert index."""
    if key in _TOP:
        return _TOP[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m:
        return f"model.layers.{m[1]}." + _block_name(m[2], key)
    m = re.fullmatch(r"mtp\.(\d+)\.(\w+)\.(.+)", key)
    if m and (m[2] == "block" or m[2] in _MTP):
        layer = f"model.layers.{n_layers + int(m[1])}."
        return layer + (_block_name(m[3], key) if m[2] == "block" else f"{_MTP[m[2]]}.{m[3]}")
    raise ValueError(f"no Hugging Face name for parameter {key!r}")


def to_hf_state_dict(model) -> dict:
    """Our state_dict under hub names: experts split per expert, the MTP layers' embed/head copies added."""
    n, sd = model.cfg.n_layers, model.state_dict()
    out = {}
    for key, t in sd.items():
        name = hf_name(key, n)
        if "{e}" in name:  # clones: safetensors refuses tensors that share storage
            for e in range(t.shape[0]):
                out[name.format(e=e)] = t[e].detach().cpu().clone()
        else:
            out[name] = t.detach().cpu().contiguous()
    for k in range(model.cfg.n_mtp):
        out[f"model.layers.{n + k}.embed_tokens.weight"] = sd["embed.weight"].cpu().clone()
        out[f"model.layers.{n + k}.shared_head.head.weight"] = sd["head.weight"].cpu().clone()
    return out


# -- config --------------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, dtype=torch.float32) -> dict:
    """config.json of a ModelConfig, with the field names of the hub's DeepSeek-V3 config. A softmax router is
    DeepSeek-V2's and is written as model_type deepseek_v2: transformers' DeepseekV3 class always routes by
    sigmoid plus bias, whatever scoring_func says."""
    sigmoid = cfg.score_func == "sigmoid"
    yarn = None
    if cfg.yarn_active:
        yarn = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    return {
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts, "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.route_scale, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "num_experts_per_tok": cfg.n_activated_experts, "first_k_dense_replace": cfg.n_dense_layers,
        "norm_topk_prob": sigmoid, "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy"),
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": 1e-6,
        "rope_theta": cfg.rope_theta, "rope_scaling": yarn, "rope_interleave": True, "attention_bias": False,
        "tie_word_embeddings": False, "num_nextn_predict_layers": cfg.n_mtp, "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _rope_fields(c: dict) -> dict:
    """RoPE settings of an HF config → ours; YaRN only in the form whose cos/sin amplitude factor is 1."""
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta") or rp.get("rope_theta") or 10000.0
    kind = rp.get("rope_type", rp.get("type", "default"))
    max_pos = c["max_position_embeddings"]
    if kind == "default":
        return dict(rope_theta=theta, original_seq_len=max_pos)  # YaRN off
    if kind != "yarn":
        raise ValueError(f"rope type {kind!r} is not supported (only default RoPE and yarn)")
    orig = rp.get("original_max_position_embeddings")
    if orig is None or orig >= max_pos:
        raise ValueError("yarn needs original_max_position_embeddings < max_position_embeddings here "
                         f"(got {orig} and {max_pos})")
    mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
    if not mscale or mscale != mscale_all or rp.get("attention_factor", 1.0) != 1.0 or not rp.get("truncate", True):
        raise ValueError("yarn is supported only with mscale == mscale_all_dim (cos/sin not rescaled), no "
                         f"attention_factor and truncate true; got {rp}")
    return dict(rope_theta=theta, original_seq_len=orig, rope_factor=float(rp.get("factor") or max_pos / orig),
                beta_fast=rp.get("beta_fast") or 32, beta_slow=rp.get("beta_slow") or 1, mscale=float(mscale))


def config_from_hf(c: dict, n_mtp: int = None) -> ModelConfig:
    """ModelConfig of an HF DeepSeek-V3 (or V2) config.json dict; unsupported settings raise ValueError."""
    if c.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"model_type {c.get('model_type')!r} is not supported (deepseek_v3 or deepseek_v2)")
    need = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
    missing = [k for k in need if c.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    unsupported = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
                   "rope_interleave": True, "moe_layer_freq": 1}
    for k, want in unsupported.items():
        if c.get(k, want) != want:
            raise ValueError(f"config.json {k}={c[k]!r} is not supported (only {want!r})")
    if abs(c.get("rms_norm_eps", 1e-6) - 1e-6) > 1e-12:
        raise ValueError(f"config.json rms_norm_eps={c['rms_norm_eps']} is not supported (norms use 1e-6)")
    score = c.get("scoring_func", "sigmoid" if c["model_type"] == "deepseek_v3" else "softmax")
    sigmoid = score == "sigmoid"
    if c.get("norm_topk_prob", sigmoid) != sigmoid:  # our router renormalises exactly when it is sigmoid
        raise ValueError(f"norm_topk_prob={c['norm_topk_prob']} with scoring_func {score!r} is not supported")
    method = c.get("topk_method", "noaux_tc" if sigmoid else "greedy")
    if method not in (("noaux_tc",) if sigmoid else ("greedy", "group_limited_greedy")):
        raise ValueError(f"topk_method {method!r} with scoring_func {score!r} is not supported")
    # no defaults for the routing's shape: transformers' differ by class and version (DeepseekV3Config's are V3's)
    routing = ["routed_scaling_factor", "first_k_dense_replace", "n_shared_experts"]
    missing = [k for k in routing + ([] if method == "greedy" else ["n_group", "topk_group"]) if k not in c]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)} (give them: their defaults differ between versions)")
    groups = (1, 1) if method == "greedy" else (c["n_group"] or 1, c["topk_group"] or 1)
    declared = c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0
    fields = dict(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_dense_layers=min(c.get("first_k_dense_replace") or 0, c["num_hidden_layers"]),
        inter_dim=c["intermediate_size"], n_heads=c["num_attention_heads"], q_lora_rank=c.get("q_lora_rank") or 0,
        kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        max_seq_len=c["max_position_embeddings"], moe_inter_dim=c["moe_intermediate_size"],
        n_routed_experts=c["n_routed_experts"], n_shared_experts=c.get("n_shared_experts") or 0,
        n_activated_experts=c["num_experts_per_tok"], n_expert_groups=groups[0], n_limited_groups=groups[1],
        score_func=score, route_scale=float(c.get("routed_scaling_factor") or 1.0),
        n_mtp=declared if n_mtp is None else n_mtp, init_std=c.get("initializer_range") or 0.006,
        **_rope_fields(c))
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.json describes a model this implementation rejects: {e}") from None


# -- saving --------------------------------------------------------------------------------------------------------
def _shards(tensors: dict, max_bytes: int) -> list:
    """Greedy split in key order; a tensor larger than max_bytes gets a shard of its own."""
    shards, size = [{}], 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def _is_checkpoint_file(name: str) -> bool:
    return name in (CONFIG, INDEX) or name.endswith(".safetensors")


def _swap_in(tmp: str, path: str) -> None:
    """Put the finished directory tmp at path; other files and folders already in path (a tokenizer, the original
    weights) are kept. The new files are flushed to the disk before the renames (fsync), so that a power loss
    cannot leave the renamed folder with files the disk never received."""
    exists = os.path.isdir(path)
    if exists:
        for name in os.listdir(path):
            src, dst = os.path.join(path, name), os.path.join(tmp, name)
            if _is_checkpoint_file(name):
                continue
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst, follow_symlinks=False)
    for folder, _, names in os.walk(tmp):  # the copies of kept files too: their originals go with the old folder
        for name in names:
            if os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)
    old = None
    if exists:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.rmdir(old)
        os.replace(path, old)  # the old checkpoint stays complete until the new one is in place (load names it)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_hf_checkpoint(model, path, max_shard_bytes: int = None) -> None:
    """Write config.json + safetensors in the hub layout; sharded (with an index) when max_shard_bytes is set.

    Written into a temporary sibling directory first and moved into place at the end, so an interrupted save
    never leaves a half-written checkpoint at `path`.
    """
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    tensors = to_hf_state_dict(model)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the checkpoint gets a folder's usual mode
    try:
        if max_shard_bytes is None:
            save_file(tensors, os.path.join(tmp, SINGLE), metadata={"format": "pt"})
        else:
            shards, weight_map = _shards(tensors, max_shard_bytes), {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(hf_config(model.cfg, model.embed.weight.dtype), f, indent=2)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- loading -------------------------------------------------------------------------------------------------------
def _json_kind(v) -> str:
    """What a JSON value is, in JSON's words (for errors)."""
    return {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(v), "a number")


class _Weights:
    """The tensors of a checkpoint directory, read lazily from one file or from the shards of an index."""

    def __init__(self, path: str, block: int):
        if os.path.exists(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                try:
                    where = json.load(f)["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}/{INDEX} is not a valid index: {e}") from None
            if not isinstance(where, dict) or not all(isinstance(v, str) for v in where.values()):
                raise ValueError(f"{path}/{INDEX} is not a valid index: its weight_map must map names to file names")
        elif os.path.exists(os.path.join(path, SINGLE)):
            where = None
        else:
            raise FileNotFoundError(f"{path} holds neither {SINGLE} nor {INDEX}")
        files = sorted(set(where.values())) if where is not None else [SINGLE]
        self.files, self.where, self.block, self.used = {}, {}, block, set()
        for name in files:
            fname = os.path.join(path, name)
            if not os.path.exists(fname):
                raise FileNotFoundError(f"weight file {fname} (listed in the index) is missing")
            try:
                self.files[name] = safe_open(fname, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{fname} is not a readable safetensors file: {e}") from None
            for k in self.files[name].keys():
                self.where[k] = name

    def __contains__(self, key):
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        self.used.add(key)
        try:
            t = self.files[self.where[key]].get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"cannot read {key} from {self.where[key]}: {e}") from None
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if t.ndim != 2 or key + "_scale_inv" not in self:
                raise ValueError(f"FP8 tensor {key} needs a 2-D weight and a {key}_scale_inv block scale")
            t = dequantize_weight(t, self.get(key + "_scale_inv"), block=self.block)
        return t


def _fetch(w: _Weights, name: str, ref: torch.Tensor):
    """The checkpoint tensor for the hub key `name` (template '{e}' = stacked experts), or None if absent."""
    if "{e}" not in name:
        return w.get(name) if name in w else None
    names = [name.format(e=e) for e in range(ref.shape[0])]
    if all(n in w for n in names):
        return torch.stack([w.get(n) for n in names])  # (E, ., .)
    prefix, proj = name.split(".{e}.")
    if proj == "down_proj.weight" and prefix + ".down_proj" in w:  # HF ≥ 5 fused: (E, dim, I), same as ours
        return w.get(prefix + ".down_proj")
    if prefix + ".gate_up_proj" in w:  # HF ≥ 5 fused: (E, 2I, dim) = [gate; up] along dim 1
        gate_up = w.get(prefix + ".gate_up_proj")
        I = ref.shape[1]
        return gate_up[:, :I] if proj == "gate_proj.weight" else gate_up[:, I:2 * I]
    return None


def _mtp_layers_present(keys, n_layers: int, declared: int) -> int:
    present = {int(m[1]) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m[1]) >= n_layers}
    n = 0
    while n < declared and n_layers + n in present:
        n += 1
    if n < declared:
        warnings.warn(f"config declares {declared} MTP layer(s), the checkpoint holds {n}: building n_mtp={n}")
    return n


def load_hf_checkpoint(path, dtype=torch.float32, device="cpu"):
    """A Transformer with the config and weights of a hub-layout checkpoint directory."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file: a checkpoint is a directory (config.json and safetensors files)")
    if not os.path.isdir(path):
        parent, base = os.path.split(os.path.abspath(path))
        kept = sorted((os.path.join(parent, n) for n in (os.listdir(parent) if os.path.isdir(parent) else ())
                       if n.startswith(f".{base}.old-") and os.path.exists(os.path.join(parent, n, CONFIG))),
                      key=os.path.getmtime)
        if kept:  # save_hf_checkpoint was stopped between its two renames: the newest folder moved aside
            raise FileNotFoundError(f"checkpoint directory {path} does not exist: a save into it was interrupted; "
                                    f"the previous checkpoint is complete in {kept[-1]}")
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.exists(os.path.join(path, CONFIG)):
        raise FileNotFoundError(f"{path} has no {CONFIG}")
    try:
        with open(os.path.join(path, CONFIG)) as f:
            c = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}/{CONFIG} is not valid JSON: {e}") from None
    if not isinstance(c, dict):
        raise ValueError(f"{path}/{CONFIG} must hold a JSON object, not {_json_kind(c)}")
    for field in ("quantization_config", "rope_scaling", "rope_parameters"):
        if not isinstance(c.get(field) or {}, dict):
            raise ValueError(f"{path}/{CONFIG}: {field} must be a JSON object, not {_json_kind(c[field])}")
    sizes = (c.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    if (not isinstance(sizes, list) or len(sizes) != 2 or sizes[0] != sizes[1] or not isinstance(sizes[0], int)
            or sizes[0] <= 0):
        raise ValueError(f"quantization_config weight_block_size {sizes} is not supported (square blocks only)")
    block = sizes[0]
    w = _Weights(path, block)
    n_layers = c.get("num_hidden_layers") or 0
    declared = c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0
    cfg = config_from_hf(c, _mtp_layers_present(w.where, n_layers, declared))
    model = Transformer(cfg)
    sd, missing = {}, []
    for key, ref in model.state_dict().items():
        name = hf_name(key, cfg.n_layers)
        t = _fetch(w, name, ref)
        if t is None:
            missing.append(name.format(e=0))
            continue
        if t.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} in the checkpoint, {tuple(ref.shape)} from config.json")
        sd[key] = t.to(ref.dtype)
    copies = {f"model.layers.{cfg.n_layers + k}.{s}" for k in range(cfg.n_mtp)
              for s in ("embed_tokens.weight", "shared_head.head.weight")}
    unexpected = sorted(k for k in w.where if k not in w.used and k not in copies and "rotary_emb" not in k)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config.json: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    model.load_state_dict(sd, strict=True)
    model.to(device=device)  # not Module.to(dtype): it would also cast the complex freqs_cis
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not name.endswith("gate.bias"):  # b_i stays fp32 (selection is fp32)
            t.data = t.data.to(dtype)
    return model.eval()
