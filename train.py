"""Train a DeepSeek-V3-style model: `python train.py` (tiny preset on the Python standard library, a few minutes
on a laptop CPU), `python train.py --preset small` on a GPU, `python train.py --help` for every option.

One optimizer step (report §2 and §4, training details):
    loss = L_main + λ·L_MTP + α·Σ_layers L_balance        (λ = --mtp_lambda, α = --balance_alpha)
    backward over --grad_accum micro-batches, clip the global gradient norm to 1.0, AdamW (β = 0.9/0.95,
    weight decay 0.1 on matrices only; --bf16_moments keeps its moments in bf16 as the report does, §3.3.3),
    then the aux-loss-free update of every MoE gate bias:
    b_i += γ·sign(mean load − load_i)                     (γ = --bias_gamma; bias buffers never see a gradient)
Learning rate: linear warmup to --lr over --warmup_iters steps, then cosine to --min_lr at --lr_decay_iters
(the schedule's lengths do not depend on --max_iters, so stopping early or resuming keeps it unchanged).

Checkpoints (out_dir/ckpt.pt, written to a temporary file and then renamed, so a crash never leaves half a file)
hold the model (MoE bias buffers included), the optimizer, the step, every RNG state (the data position is the
state of the data generator), the config, the training options and the tokenizer name. `--max_iters` counts
steps from 0, so 6 steps then `--resume --max_iters 12` gives bit-identical weights to 12 straight; on resume,
options not given on the command line come from the checkpoint. Ctrl-C saves and exits (130); a non-finite
loss stops without overwriting the last good checkpoint.

Precision: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU and MPS; `--fp8` swaps the projections for
fp8.FP8Linear (Hopper GPUs). `--bench` times a few steps and prints tokens/s and MFU (flops.md).
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields

import torch
import torch.nn as nn
from tqdm import tqdm

import data
from adamw_bf16 import AdamWBF16
from config import ModelConfig, PRESETS, get_preset, config_to_dict, config_from_dict
from model import Transformer, count_params
from moe import max_violation

# Training defaults for the tiny preset, tuned on a 2-core CPU shared with other jobs: `python train.py` took 317 s
# there (1000 steps × 1,024 tokens) and reached val loss 4.39 vs the unigram baseline's 7.01 nats/token.
# Measured on 300k tokens: 8 sequences/step beat 16 (val 5.32 vs 5.64 at equal tokens and time); lr 3e-3 beat
# 6e-3 and 1e-2; γ = 0.01 beat the report's 0.001 (val 5.64 vs 6.10, max violation 0.40 vs 1.39): a short run
# has too few steps for ±0.001 per step to move the biases far enough.
TRAIN_DEFAULTS = dict(
    preset="tiny", data=None, cache_dir=data.DEFAULT_CACHE_DIR, seed=1337, max_iters=1000,
    batch_size=8, block_size=128, grad_accum=1,
    lr=3e-3, min_lr=3e-4, warmup_iters=100, lr_decay_iters=1000,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    mtp_lambda=0.3, balance_alpha=1e-4, bias_gamma=0.01,
    eval_interval=200, eval_iters=20, log_interval=10, fp8=False, fp8_act_cache="bf16", bf16_moments=False,
)
# Other presets change only these (the rest as above).
PRESET_TRAIN = {
    "small": dict(max_iters=5000, batch_size=16, block_size=1024, lr=6e-4, min_lr=6e-5, warmup_iters=200,
                  lr_decay_iters=5000, bias_gamma=0.001, eval_interval=250, eval_iters=20),
}
CKPT_KEYS = ("model", "optimizer", "step", "rng", "config", "args", "tokenizer")  # what --resume needs
RUN_ONLY = ("resume", "device", "compile", "bench", "out_dir")  # never taken from a checkpoint
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


class Diverged(RuntimeError):
    pass


# -- options --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None here so that we know which ones the user typed (they win over a checkpoint)."""
    d = TRAIN_DEFAULTS
    p = argparse.ArgumentParser(description="Train a DeepSeek-V3-style model (see the docstring of train.py).",
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} (default: {d['preset']})")
    p.add_argument("--data", help="text file or folder to train on (default: the Python standard library)")
    p.add_argument("--out_dir", help="checkpoint and log.jsonl folder (default: out)")
    p.add_argument("--cache_dir", help=f"tokenized-corpus cache (default: {d['cache_dir']})")
    p.add_argument("--max_iters", type=int, help=f"total optimizer steps, counted from 0 (default: {d['max_iters']})")
    p.add_argument("--resume", action="store_true", default=None, help="continue from out_dir/ckpt.pt")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto = cuda → mps → cpu)")
    p.add_argument("--seed", type=int, help=f"seed of the init and of the data order (default: {d['seed']})")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, help="FP8 projections (fp8.FP8Linear; Hopper)")
    p.add_argument("--fp8_act_cache", choices=("bf16", "fp8", "e5m6", "report"),
                   help="with --fp8: what each FP8 layer keeps of its input for Wgrad, and the routed experts of "
                        "their SwiGLU inputs: the input itself (bf16, the default), its 1x128 tiles in E4M3 (fp8) or "
                        "E5M6 (e5m6), or as the report: E4M3, and E5M6 for the attention output projection W^O "
                        "(report)")
    p.add_argument("--bf16_moments", action=argparse.BooleanOptionalAction,
                   help="AdamW moments stored in bf16, as the report trains (adamw_bf16.py; default: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument("--bench", action="store_true", default=None, help="time a short run: tokens/s and MFU, no ckpt")
    g = p.add_argument_group("training (defaults for tiny; `small` overrides: "
                             + ", ".join(f"{k}={v}" for k, v in PRESET_TRAIN["small"].items()) + ")")
    helps = dict(batch_size="sequences per micro-batch", block_size="tokens per sequence (<= max_seq_len)",
                 grad_accum="micro-batches per optimizer step", lr="peak learning rate", min_lr="final learning rate",
                 warmup_iters="linear warmup steps", lr_decay_iters="step where the cosine reaches min_lr",
                 weight_decay="AdamW decay (matrices only)", beta1="AdamW β1", beta2="AdamW β2",
                 grad_clip="max global gradient norm (0: off)", mtp_lambda="λ, weight of the MTP loss",
                 balance_alpha="α, weight of the sequence-wise balance loss",
                 bias_gamma="γ, speed of the aux-loss-free gate-bias update",
                 eval_interval="steps between evaluations (and checkpoints)",
                 eval_iters="validation batches per evaluation", log_interval="steps between log lines")
    for name, text in helps.items():
        g.add_argument(f"--{name}", type=type(d[name]), help=f"{text} (default: {d[name]})")
    m = p.add_argument_group("model (ModelConfig fields; default: the preset's value, shown for tiny)")
    for f in fields(ModelConfig):
        m.add_argument(f"--{f.name}", type=type(getattr(PRESETS["tiny"], f.name)),
                       help=f"(default: {getattr(PRESETS['tiny'], f.name)})")
    return p


def resolve_args(ns: argparse.Namespace, ckpt: dict = None) -> argparse.Namespace:
    """Typed options > the checkpoint's training options (on --resume) > the preset's defaults."""
    given = {k: v for k, v in vars(ns).items() if v is not None}
    saved = ckpt["args"] if ckpt else {}
    preset = given.get("preset", saved.get("preset", TRAIN_DEFAULTS["preset"]))
    args = {**TRAIN_DEFAULTS, **PRESET_TRAIN.get(preset, {}), "out_dir": "out", "device": "auto", "resume": False,
            "compile": False, "bench": False}
    args.update({k: v for k, v in saved.items() if k not in RUN_ONLY})
    model_fields = {f.name for f in fields(ModelConfig)}
    args.update({k: v for k, v in given.items() if k not in model_fields})
    args["preset"] = preset
    if args["data"] is not None:
        args["data"] = os.path.abspath(args["data"])
    args["model_overrides"] = {k: v for k, v in given.items() if k in model_fields}
    args["typed"] = set(given)
    return argparse.Namespace(**args)


def resolve_config(args, ckpt: dict = None) -> ModelConfig:
    """The preset with the typed overrides; on --resume it must equal the checkpoint's config."""
    cfg = get_preset(args.preset, **args.model_overrides)
    if ckpt:
        saved = config_from_dict(ckpt["config"])
        if "preset" not in args.typed:  # only typed fields are compared; the rest come from the checkpoint
            cfg = config_from_dict({**ckpt["config"], **args.model_overrides})
        diff = [f"{f.name}: {getattr(saved, f.name)!r} in the checkpoint, {getattr(cfg, f.name)!r} requested"
                for f in fields(ModelConfig) if getattr(saved, f.name) != getattr(cfg, f.name)]
        if diff:
            raise ValueError(f"--resume: the model config does not match the checkpoint ({'; '.join(diff)})")
    return cfg


def check_args(args, cfg: ModelConfig) -> None:
    def need(ok, name, rule):
        if not ok:
            raise ValueError(f"--{name}={getattr(args, name)!r}: {rule}")

    for name in ("batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        need(getattr(args, name) >= 1, name, "must be >= 1")
    for name in ("max_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip", "mtp_lambda",
                 "balance_alpha", "bias_gamma"):
        need(getattr(args, name) >= 0, name, "must be >= 0")
    need(args.lr > 0, "lr", "must be > 0")
    need(args.lr_decay_iters >= args.warmup_iters, "lr_decay_iters", "must be >= warmup_iters")
    need(args.block_size <= cfg.max_seq_len, "block_size", f"must be <= max_seq_len ({cfg.max_seq_len})")
    need(args.block_size > cfg.n_mtp, "block_size", f"must be > n_mtp ({cfg.n_mtp}): MTP predicts further ahead")
    need(args.fp8 or args.fp8_act_cache == "bf16", "fp8_act_cache", "needs --fp8")


# -- device, model, optimizer, schedule -----------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return dev


def set_act_cache(model: nn.Module, mode: str) -> None:
    """What every FP8 layer keeps of its input for Wgrad (fp8.FP8Linear.act_cache), and the routed experts of
    their SwiGLU inputs (moe.Experts.act_cache): one mode for all, or "report": E4M3 tiles everywhere and E5M6
    for the input of W^O, the Linear after attention (TR §3.3.3)."""
    for name, m in model.named_modules():
        if hasattr(m, "act_cache"):
            m.act_cache = ("e5m6" if name.endswith("attn.wo") else "fp8") if mode == "report" else mode


def layer_classes(fp8: bool, device: torch.device):
    """What the model is built with, (linear, routed experts' kernels): (nn.Linear, None), or with --fp8
    (fp8.FP8Linear, fp8_experts.FP8Experts), imported only when asked for and only where the kernel runs."""
    if not fp8:
        return nn.Linear, None
    if device.type != "cuda":
        raise ValueError(f"--fp8 needs a Hopper GPU (sm_90); the device is {device}")
    try:
        import fp8
        import fp8_experts
    except ImportError as e:
        raise ValueError(f"--fp8 is unavailable: cannot import fp8.py ({e})") from None
    if fp8.load_kernel() is None:  # builds fp8_gemm.cu now rather than failing (or crawling) mid-run
        raise ValueError(f"--fp8 is unavailable: {getattr(fp8, '_WHY_NOT', None) or 'the FP8 kernel did not load'}")
    return fp8.FP8Linear, fp8_experts.FP8Experts


def make_optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (ndim >= 2: projections, experts, embedding, head) only, not on norms.
    The gate biases b_i are buffers, so the optimizer never sees them. --bf16_moments keeps the two moments in
    bf16 (TR §3.3.3; adamw_bf16.py), otherwise torch's AdamW keeps them in fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if args.bf16_moments:
        return AdamWBF16(groups, lr=args.lr, betas=(args.beta1, args.beta2))
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine decay, then min_lr."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    if step >= args.lr_decay_iters:
        return args.min_lr
    ratio = (step - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)  # in [0, 1)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def total_loss(losses: dict, args) -> torch.Tensor:
    return losses["main"] + args.mtp_lambda * losses["mtp"] + args.balance_alpha * losses["balance"]


# -- FLOPs and MFU (reference/flops.md) -----------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> dict:
    """Weights a token multiplies with (activated experts only; the embedding lookup is not a matmul)."""
    d, H = cfg.dim, cfg.n_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr) if cfg.q_lora_rank else d * H * (dn + dr)
    attn = q + d * (cfg.kv_lora_rank + dr) + cfg.kv_lora_rank * H * (dn + dv) + H * dv * d
    dense = 3 * d * cfg.inter_dim
    moe = d * cfg.n_routed_experts + 3 * d * cfg.moe_inter_dim * (cfg.n_shared_experts + cfg.n_activated_experts)
    head = d * cfg.vocab_size
    main = cfg.n_layers * attn + cfg.n_dense_layers * dense + cfg.n_moe_layers * moe + head
    mtp = cfg.n_mtp * (2 * d * d + attn + moe + head)  # eh_proj, an MoE block, the shared head again
    return {"main": main, "mtp": mtp}


def train_flops_per_token(cfg: ModelConfig, T: int, with_mtp: bool = True) -> float:
    """6·N_active_matmul + 3·L·H·T·(dn+dr+dv): causal attention counted over T/2 keys on average; MTP modules
    counted over all T positions (they run on T-k)."""
    n = matmul_params(cfg)
    N = n["main"] + (n["mtp"] if with_mtp else 0)
    L = cfg.n_layers + (cfg.n_mtp if with_mtp else 0)
    head_dims = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return 6 * N + 3 * L * cfg.n_heads * T * head_dims


def peak_flops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# -- checkpoints and RNG --------------------------------------------------------------------------------------
@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C during a critical section (an optimizer step, a checkpoint write), deliver it right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj: dict, path: str) -> None:
    """Atomic: write a temporary file in the same folder, then os.replace (the old file survives any crash)."""
    tmp = f"{path}.tmp"
    with sigint_deferred():
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(path: str, what: str = "--resume", hint: str = "") -> dict:
    """torch.load of a checkpoint; a missing, truncated or foreign file raises with one line naming `what`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no checkpoint at {path}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say so in one line
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what}: cannot read checkpoint {path} ({type(e).__name__}: {reason})") from None
    need = CKPT_KEYS if what == "--resume" else ("model", "config")
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{what}: {path} is not a train.py checkpoint (no {', '.join(missing)})")
    return ckpt


# -- evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, raw, corpus, args, device, autocast) -> dict:
    """Validation main/MTP loss, MTP depth-1 acceptance, and the max over MoE layers of each layer's
    max_violation (max load / mean load − 1) over all the evaluation tokens. Uses its own generator with a
    fixed seed: the same batches every time, and the training RNG is untouched."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    raw.eval()
    sums = {"val_main": 0.0, "val_mtp": 0.0, "val_mtp_acc": 0.0}
    counts = None
    for _ in range(args.eval_iters):
        x, y = corpus.get_batch("val", args.batch_size, args.block_size, gen, device)
        with autocast:
            _, losses = model(x, y)
        for k in sums:
            sums[k] += losses[k[4:]].item() / args.eval_iters
        layer_counts = [m.last_counts.cpu() for m in raw.moe_layers()]
        counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
    raw.train()
    sums["max_violation"] = max((max_violation(c) for c in counts), default=0.0) if counts else 0.0
    return sums


# -- the run --------------------------------------------------------------------------------------------------
def setup(ns: argparse.Namespace):
    """Everything that can fail because of user input, before any training: raises ValueError/FileNotFoundError."""
    out_dir = ns.out_dir or "out"
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if ns.resume else None
    args = resolve_args(ns, ckpt)
    cfg = resolve_config(args, ckpt)
    check_args(args, cfg)
    device = pick_device(args.device)
    layers = layer_classes(args.fp8, device)
    corpus = data.load_corpus(args.data, cfg.vocab_size, args.cache_dir, log=print)
    if ckpt and ckpt.get("tokenizer") != corpus.tokenizer.name:
        raise ValueError(f"--resume: the checkpoint's tokenizer {ckpt.get('tokenizer')!r} is not "
                         f"{corpus.tokenizer.name!r}")
    corpus.check_block(args.block_size)
    return args, cfg, device, layers, corpus, ckpt, ckpt_path


def build(args, cfg, device, layers, ckpt):
    torch.manual_seed(args.seed)
    model = Transformer(cfg, *layers).to(device)
    set_act_cache(model, args.fp8_act_cache)
    opt = make_optimizer(model, args, device)
    gen = torch.Generator().manual_seed(args.seed)  # the data order: its state is the position in the data
    step = 0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"--resume: the checkpoint does not fit the model ({str(e).splitlines()[0]})") from None
        set_rng_state(ckpt["rng"], gen)
        step = ckpt["step"]
    return model, opt, gen, step, count_params(cfg)


def train(args, cfg, device, corpus, ckpt, ckpt_path, model, opt, gen, step, n_params) -> int:
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum
    flops_tok = train_flops_per_token(cfg, args.block_size, with_mtp=cfg.n_mtp > 0)  # MTP runs even when λ = 0
    peak = peak_flops(device)
    baseline = data.unigram_baseline(corpus.splits["train"], corpus.splits["val"], corpus.tokenizer.n_vocab)
    print(f"model {args.preset}: {n_params['total'] / 1e6:.2f}M params ({n_params['active'] / 1e6:.2f}M active) "
          f"+ {n_params['mtp'] / 1e6:.2f}M MTP | {device}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', fp8' if args.fp8 else ''} | {tokens_per_step:,} tokens/step | {corpus.tokenizer.name}")
    print(f"unigram baseline on val: {baseline:.4f} nats/token")
    if step >= args.max_iters and not args.bench:
        print(f"checkpoint is at step {step} >= --max_iters {args.max_iters}: nothing to do")
        return 0
    if args.bench:
        return bench(fwd, model, opt, corpus, gen, args, device, autocast, flops_tok, peak, tokens_per_step)
    if not ckpt and os.path.exists(ckpt_path):
        print(f"starting from scratch: {ckpt_path} will be overwritten (--resume continues it instead)")
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a" if ckpt else "w")
    saved = {k: v for k, v in vars(args).items() if k not in RUN_ONLY + ("typed", "model_overrides")}

    def snapshot():  # everything a checkpoint at `step` needs; taken only between optimizer steps
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state(gen),
                "config": config_to_dict(cfg), "args": saved, "tokenizer": corpus.tokenizer.name,
                "data": corpus.key}

    boundary, last, t_last, ev = snapshot(), {}, time.time(), None
    bar = tqdm(total=args.max_iters, initial=step, unit="step", dynamic_ncols=True, disable=None)
    try:
        while step < args.max_iters:
            metrics = forward_backward(fwd, model, opt, corpus, gen, args, step, device, autocast)
            with sigint_deferred():  # the step, the bias update and the step counter move together
                optimizer_step(model, opt, args)
                step += 1
                boundary = snapshot()
            for k, v in metrics.items():
                last[k] = last.get(k, 0.0) + v
            if step % args.log_interval == 0 or step == args.max_iters:
                n = step % args.log_interval or args.log_interval
                dt, t_last = time.time() - t_last, time.time()
                rec = {"step": step, "lr": lr_at(step - 1, args), **{k: v / n for k, v in last.items()},
                       "tok_per_s": n * tokens_per_step / dt}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
                last = {}
            bar.update(1)
            if step % args.eval_interval == 0 or step == args.max_iters:
                ev = evaluate(fwd, model, corpus, args, device, autocast)
                log.write(json.dumps({"step": step, **ev}) + "\n")
                log.flush()
                tqdm.write(f"step {step}: val loss {ev['val_main']:.4f}, mtp {ev['val_mtp']:.4f}, mtp acc "
                           f"{ev['val_mtp_acc']:.3f}, max violation {ev['max_violation']:.2f}")
                save_checkpoint(boundary, ckpt_path)
                t_last = time.time()  # evaluation time is not training throughput
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(boundary, ckpt_path)
        print(f"interrupted: saved step {boundary['step']} to {ckpt_path} (continue with --resume)", file=sys.stderr)
        return 130
    except Diverged as e:
        bar.close()
        kept = f"{ckpt_path} keeps the last good checkpoint" if os.path.exists(ckpt_path) else "no checkpoint written"
        print(f"error: {e}; {kept}", file=sys.stderr)
        return 1
    finally:
        log.close()
    bar.close()
    print(f"done: step {step}, val loss {ev['val_main']:.4f} vs unigram baseline {baseline:.4f} nats/token; "
          f"checkpoint {ckpt_path}")
    return 0


def forward_backward(fwd, model, opt, corpus, gen, args, step, device, autocast) -> dict:
    """Gradients of one optimizer step, accumulated over grad_accum micro-batches; returns the mean losses."""
    lr = lr_at(step, args)
    for group in opt.param_groups:
        group["lr"] = lr
    sums = {k: torch.zeros((), device=device) for k in ("loss", "main", "mtp", "balance")}
    for _ in range(args.grad_accum):
        x, y = corpus.get_batch("train", args.batch_size, args.block_size, gen, device)  # (B, T), (B, T)
        with autocast:
            _, losses = fwd(x, y)
        loss = total_loss(losses, args)
        (loss / args.grad_accum).backward()
        losses["loss"] = loss
        for k in sums:
            sums[k] += losses[k].detach().float() / args.grad_accum
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")  # inf: measure the norm, never clip
    sums["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), clip)
    out = {k: v.item() for k, v in sums.items()}
    if not all(math.isfinite(v) for v in out.values()):
        opt.zero_grad(set_to_none=True)
        raise Diverged(f"non-finite loss or gradient at step {step} (loss {out['loss']}, grad norm "
                       f"{out['grad_norm']}): stopped")
    return out


def optimizer_step(model, opt, args) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_moe_bias(args.bias_gamma)  # b_i += γ·sign(mean load − load_i), load over this step's tokens


def bench(fwd, model, opt, corpus, gen, args, device, autocast, flops_tok, peak, tokens_per_step) -> int:
    """A few untimed warmup steps, then timed steps; prints tokens/s and MFU. Writes nothing."""
    warmup, n = 3, max(1, args.max_iters if "max_iters" in args.typed else 10)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + n):
        if i == warmup:
            sync()
            t0 = time.time()
        forward_backward(fwd, model, opt, corpus, gen, args, i, device, autocast)
        optimizer_step(model, opt, args)
    sync()
    tok_s = n * tokens_per_step / (time.time() - t0)
    achieved = tok_s * flops_tok
    mfu = f"{100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "n/a (no peak known)"
    print(f"bench {args.preset} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}: "
          f"{n} steps of {tokens_per_step:,} tokens | {tok_s:,.0f} tokens/s | {flops_tok / 1e6:.1f} MFLOP/token | "
          f"{achieved / 1e12:.3f} TFLOP/s | MFU {mfu}")
    return 0


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        args, cfg, device, layers, corpus, ckpt, ckpt_path = setup(ns)
        built = build(args, cfg, device, layers, ckpt)  # may refuse too: FP8 dims, a checkpoint that does not fit
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during setup there is nothing to save yet
        print("interrupted before training started", file=sys.stderr)
        return 130
    return train(args, cfg, device, corpus, ckpt, ckpt_path, *built)


if __name__ == "__main__":
    sys.exit(main())
