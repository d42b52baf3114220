"""What several test files share: a tiny model config, the tiny model and corpus for train.py runs, and the check
that a distributed run equals the one-process run. (The corpus fixture lives in conftest.py, where pytest finds it.)"""
import contextlib
import io
import json
import os

import pytest
import torch

import checkpoint
from config import ModelConfig

# 2 blocks (1 dense, 1 MoE), 4 routed experts in 2 groups (a token may use 1), one shared, q- and kv-LoRA, one MTP
# module: small enough for fp64 on a CPU.
TINY = dict(vocab_size=64, dim=32, n_layers=2, n_dense_layers=1, inter_dim=48, n_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32,
            moe_inter_dim=16, n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
            n_limited_groups=1, n_mtp=1)


def tiny_config(file_defaults=(), **kw) -> ModelConfig:
    """TINY, then a test file's own `file_defaults` (a dict), then the test's `kw`."""
    return ModelConfig(**{**TINY, **dict(file_defaults), **kw})


# train.py's flags for a tiny model (2 blocks, 4 experts in 2 groups) that trains in about a second
TINY_ARGS = ["--vocab_size", "512", "--dim", "32", "--n_layers", "2", "--n_dense_layers", "1", "--inter_dim", "64",
             "--n_heads", "2", "--q_lora_rank", "16", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
             "--qk_rope_head_dim", "8", "--v_head_dim", "8", "--max_seq_len", "32", "--moe_inter_dim", "16",
             "--n_routed_experts", "4", "--n_activated_experts", "2", "--n_expert_groups", "2",
             "--n_limited_groups", "1"]
# train.py's run flags of the distributed tests (test_parallel.py, test_pipeline.py): CPU, a short LR schedule
DIST_RUN = ["--block_size", "16", "--lr", "2e-3", "--warmup_iters", "2", "--lr_decay_iters", "20", "--min_lr", "1e-4",
            "--eval_iters", "2", "--log_interval", "1", "--device", "cpu", "--seed", "3"]


@torch.no_grad()
def full_mtp_logits(model, stream):
    """The MTP depth-1 logits of every position of stream (1, L) at once, (1, L-1, V): the main model over the
    whole sequence, its normed hidden states with the next tokens' embeddings into the MTP module, the shared head.
    What a decoder's MTP cache entries must equal."""
    L = stream.shape[1]
    f = model.freqs_cis[:L]
    h = model.embed(stream)
    for layer in model.layers:
        h = layer(h, f)
    return model.head(model.mtp[0](model.norm(h)[:, :-1], model.embed(stream[:, 1:]), f[:-1]))


def write_corpus(d):
    """A small generated Python file in folder d; train.py's --data and --cache_dir for it."""
    text = "".join(f"def f{i}(x, y):\n    return x * {i} + y  # {i % 7}\n\n" for i in range(400))
    (d / "code.py").write_text(text)
    return ["--data", str(d / "code.py"), "--cache_dir", str(d / "cache")]


def train_worker(rank, world, argv, hook=None):
    """train.main on one rank (for dist_utils.run_workers); returns (exit status, what it printed on stderr)."""
    import train
    if hook is not None:
        hook(rank, train)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(argv)
    return code, err.getvalue()


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(one, other, steps, log_keys):
    """The run in folder `other` (a distributed checkpoint) equals the one-process run in `one`: both at `steps`,
    the same weights (close), the same gate biases (exactly), the same logged steps with `log_keys` close.
    Returns both logs."""
    a = checkpoint.load_checkpoint(os.path.join(one, "ckpt.pt"), "test")
    b = checkpoint.load_checkpoint(os.path.join(other, "ckpt.pt"), "test")  # finds other/ckpt.dcp
    assert a["step"] == b["step"] == steps and a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        if name.endswith("gate.bias"):
            assert torch.equal(a["model"][name], b["model"][name]), name
        else:
            torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-6)
    log_one, log_other = read_log(one), read_log(other)
    assert [r["step"] for r in log_one] == [r["step"] for r in log_other]
    for r1, r2 in zip(log_one, log_other):
        for k in log_keys:
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-4), (k, r1, r2)
    return log_one, log_other
