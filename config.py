"""ModelConfig: the architecture of a DeepSeek-V3-style model, its presets and its validation.

Field names follow `ModelArgs` of the official inference code (dim, inter_dim, n_routed_experts, ...).
Every invalid combination raises a ValueError naming the field and the rule, at construction, before any
tensor is allocated. Training options (learning rate, λ, α, γ, ...) live in train_setup.py, not here.
"""
from dataclasses import dataclass, fields, asdict, replace


@dataclass
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 8192
    dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1  # the first n_dense_layers blocks use a dense SwiGLU FFN, the rest MoE
    inter_dim: int = 384  # hidden width of the dense FFN
    # Multi-head Latent Attention (mla.py)
    n_heads: int = 4
    q_lora_rank: int = 64  # d'_c; 0 = plain query projection (no compression)
    kv_lora_rank: int = 64  # d_c, width of the latent c^KV
    qk_nope_head_dim: int = 32  # d_h
    qk_rope_head_dim: int = 16  # d^R_h
    v_head_dim: int = 32
    # RoPE / YaRN
    max_seq_len: int = 256
    original_seq_len: int = 4096  # YaRN is active iff max_seq_len > original_seq_len
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # YaRN: softmax scale × m², m = 0.1·mscale·ln(rope_factor) + 1 (mla.softmax_scale)
    # DeepSeekMoE (moe.py)
    moe_inter_dim: int = 64  # width of one routed expert (and of one shared expert)
    n_routed_experts: int = 8  # N_r
    n_shared_experts: int = 1  # N_s
    n_activated_experts: int = 2  # K_r
    n_expert_groups: int = 4  # node-limited routing in code form (moe.limit_groups): V3 has 8, one per node
    n_limited_groups: int = 2  # groups a token may reach: M, the node limit (4 in V3)
    score_func: str = "sigmoid"  # "sigmoid" (V3: bias, top-2 group score, renormalised) or "softmax" (V2)
    route_scale: float = 1.0
    # Multi-Token Prediction (mtp.py)
    n_mtp: int = 1  # D, number of sequential MTP modules
    # initialisation
    init_std: float = 0.006

    def __post_init__(self):
        self.validate()

    # -- derived sizes ---------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def yarn_active(self) -> bool:
        return self.max_seq_len > self.original_seq_len

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok, name, rule):
            if not ok:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {rule}")

        for name in ("vocab_size", "dim", "n_layers", "inter_dim", "n_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len",
                     "moe_inter_dim", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                     "n_limited_groups"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        for name in ("q_lora_rank", "n_dense_layers", "n_shared_experts", "n_mtp"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "must be an integer >= 0")
        for name in ("rope_theta", "route_scale", "mscale", "init_std"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.rope_factor >= 1, "rope_factor", "must be >= 1")
        need(self.beta_fast > self.beta_slow > 0, "beta_fast", "YaRN needs beta_fast > beta_slow > 0")
        need(self.n_dense_layers <= self.n_layers, "n_dense_layers", f"must be <= n_layers ({self.n_layers})")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.score_func in ("sigmoid", "softmax"), "score_func", "must be 'sigmoid' or 'softmax'")
        need(self.n_routed_experts % self.n_expert_groups == 0, "n_routed_experts",
             f"must be divisible by n_expert_groups ({self.n_expert_groups})")
        need(self.n_limited_groups <= self.n_expert_groups, "n_limited_groups",
             f"must be <= n_expert_groups ({self.n_expert_groups})")
        per_group = self.n_routed_experts // self.n_expert_groups
        need(self.n_activated_experts <= self.n_limited_groups * per_group, "n_activated_experts",
             f"must be <= the experts in the allowed groups (n_limited_groups × experts per group = "
             f"{self.n_limited_groups * per_group})")
        if self.score_func == "sigmoid" and self.n_expert_groups > 1:
            need(per_group >= 2, "n_expert_groups",
                 "the group score sums the top-2 affinities of a group, so each group needs >= 2 experts")


PRESETS = {
    # Trains on a laptop CPU in minutes (the default of train.py).
    "tiny": ModelConfig(),
    # One GPU.
    "small": ModelConfig(vocab_size=32768, dim=1024, n_layers=12, n_dense_layers=1, inter_dim=2816, n_heads=16,
                         q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                         v_head_dim=64, max_seq_len=1024, moe_inter_dim=512, n_routed_experts=32,
                         n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                         route_scale=1.0, n_mtp=1),
    # DeepSeek-V2-Lite (16B): softmax router, no query compression, 2 shared experts, no MTP.
    "v2-lite-16b": ModelConfig(vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, inter_dim=10944,
                               n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                               qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, mscale=0.707,
                               moe_inter_dim=1408, n_routed_experts=64, n_shared_experts=2,
                               n_activated_experts=6, n_expert_groups=1, n_limited_groups=1,
                               score_func="softmax", route_scale=1.0, n_mtp=0),
    # DeepSeek-V3's own layer shapes at a depth one GPU trains (H200, 141 GB: AdamW with fp32 master weights and
    # moments is 16 bytes a parameter, 4.9B here including MTP, ~78 GB before activations): hidden 7168, V3's MLA
    # (128 heads, ranks 1536/512, head dims 128+64/128), one dense layer of 18432 and three MoE layers of
    # 16 routed experts of width 2048 (8 groups of 2, top-4 groups) with top-8 routing and one shared expert, one
    # MTP module. The GEMMs are the ones one GPU runs in V3's training; only the expert count and the depth
    # are cut to fit (V3: 256 experts, 61 layers). Vocabulary 32768 as `small` (the cl100k prefix of data.py).
    "v3-layers": ModelConfig(vocab_size=32768, dim=7168, n_layers=4, n_dense_layers=1, inter_dim=18432,
                             n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                             qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096, moe_inter_dim=2048,
                             n_routed_experts=16, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                             n_limited_groups=4, score_func="sigmoid", route_scale=2.5, n_mtp=1),
    # DeepSeek-V3 (671B total, ~37B activated per token), plus one MTP module.
    "v3-671b": ModelConfig(vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, inter_dim=18432,
                           n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                           qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, moe_inter_dim=2048,
                           n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                           n_limited_groups=4, score_func="sigmoid", route_scale=2.5, n_mtp=1),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A named preset with optional field overrides; unknown names or fields raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    for k in overrides:
        if k not in known:
            raise ValueError(f"unknown ModelConfig field {k!r}")
    return replace(PRESETS[name], **overrides)


def config_to_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
    return ModelConfig(**d)
