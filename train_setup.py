"""From a command line to a ready Run: options, the run folder, memory, device, corpus, model, optimizer.
Everything that can fail because of user input is checked here, before training starts; train.py then runs the
loop on the Run that setup() returns.

Options: typed on the command line > saved in the checkpoint (on --resume) > the preset's training defaults
(resolve_args); the model is the preset with the typed ModelConfig fields (resolve_config). setup() takes the
run folder's lock, builds the device, corpus, model (parallelized under torchrun: parallel.py, pipeline.py) and
optimizer, and on --resume loads their saved state. Bad input raises ValueError/FileNotFoundError with one line,
and nothing is written before the lock is held.
"""
import argparse
import contextlib
import math
import os
import shutil
import sys
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

import data
import parallel
import pipeline
from adamw_bf16 import AdamWBF16
from checkpoint import (check_distributed, dcp_path, load_checkpoint, load_distributed, load_optimizer_state,
                        lock_out_dir, newest_checkpoint, read_meta, rng_state, set_rng_state)
from config import ModelConfig, PRESETS, get_preset, config_to_dict, config_from_dict
from model import Transformer, count_params
from moe import grouped_mm_supported

# Training defaults for the tiny preset, chosen on a 2-core CPU for `python train.py` (1000 steps × 1,024 tokens):
# at equal tokens and time 8 sequences per step beat 16, lr 3e-3 beat 6e-3 and 1e-2, and γ = 0.01 beat the
# report's 0.001 (lower validation loss and a better-balanced load): a short run has too few steps for ±0.001
# per step to move the biases far enough.
TRAIN_DEFAULTS = dict(
    preset="tiny", data=None, cache_dir=data.DEFAULT_CACHE_DIR, seed=1337, max_iters=1000,
    batch_size=8, block_size=128, grad_accum=1, batch_ramp_iters=None, batch_ramp_start=None,  # None: no ramp
    lr=3e-3, min_lr=3e-4, warmup_iters=None, lr_hold_iters=None, lr_decay_iters=None,  # None: derived (resolve_args)
    final_lr_iters=None, final_lr=None,  # None: no switch (min_lr to the end; λ and γ constant)
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    mtp_lambda=0.3, mtp_lambda_iters=None, mtp_lambda_after=None, balance_alpha=1e-4,
    bias_gamma=0.01, bias_gamma_iters=None,
    eval_interval=200, ckpt_interval=None, eval_iters=20, log_interval=10,  # ckpt_interval None: eval_interval
    fp8=False, fp8_act_cache="bf16", bf16_moments=False,
)
# Other presets change only these (the rest as above).
PRESET_TRAIN = {
    "small": dict(max_iters=5000, batch_size=16, block_size=1024, lr=6e-4, min_lr=6e-5, bias_gamma=0.001,
                  eval_interval=250, eval_iters=20),
    # V3's layer shapes take V3's own peak learning rate and bias update speed (report §4.2: 2.2e-4, γ = 0.001) and
    # one 4096-token sequence per micro-batch. The tiny preset's 3e-3 is far too high for hidden 7168: --fp8 diverges
    # there (BENCHMARKS.md, "FP8 against bf16 loss at V3's layer shapes"). 8 micro-batches per optimizer step:
    # 32,768 tokens, about what one GPU of V3's run trained on between two optimizer steps (15,360 sequences of
    # 4,096 tokens over 2,048 GPUs: 30,720), so the optimizer's pass over all weights weighs as much as it did there.
    "v3-layers": dict(batch_size=1, block_size=4096, grad_accum=8, lr=2.2e-4, min_lr=2.2e-5, bias_gamma=0.001),
}
CKPT_KEYS = ("model", "optimizer", "step", "rng", "config", "args", "tokenizer")  # what --resume needs
RUN_ONLY = ("resume", "overwrite", "device", "compile", "cuda_graphs", "bench", "out_dir",  # never from a checkpoint
            "ep", "pp", "dist_timeout", "pp_schedule", "microbatches", "plan", "gpus", "gpus_per_node")
LOG, LOG_NEW = "log.jsonl", "log.jsonl.new"  # the log, and its name while an --overwrite run has no checkpoint


# -- options --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None here so that we know which ones the user typed (they win over a checkpoint)."""
    d = TRAIN_DEFAULTS
    p = argparse.ArgumentParser(usage="%(prog)s [options]",
                                description="Train a DeepSeek-V3-style model (see the docstring of train.py).",
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, width=min(
                                    100, shutil.get_terminal_size().columns - 2)))
    p.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} (default: {d['preset']})")
    p.add_argument("--data", help="text file or folder to train on (default: the Python standard library)")
    p.add_argument("--out_dir", help="checkpoint and log.jsonl folder (default: out)")
    p.add_argument("--cache_dir", help=f"tokenized-corpus cache (default: {d['cache_dir']})")
    p.add_argument("--max_iters", type=int, help=f"total optimizer steps, counted from 0 (default: {d['max_iters']})")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in out_dir from its ckpt.pt (options not given come from the checkpoint)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start afresh in an out_dir that holds a run; its files stay until the first checkpoint")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto = cuda → mps → cpu)")
    p.add_argument("--seed", type=int, help=f"seed of the init and of the data order (default: {d['seed']})")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction,
                   help="FP8 projections (fp8_linear.FP8Linear; Hopper)")
    p.add_argument("--fp8_act_cache", choices=("bf16", "fp8", "e5m6", "report"),
                   help="with --fp8: what each FP8 layer keeps of its input for Wgrad, and the routed experts of "
                        "their SwiGLU inputs: Wgrad's own E4M3 tiles of the input along the tokens, made in the "
                        "forward from the input itself, and the SwiGLU inputs as they are (bf16, the default); "
                        "their 1x128 tiles in E4M3 (fp8) or E5M6 (e5m6), which Wgrad quantizes again; or as the "
                        "report: E4M3, and E5M6 for the attention output projection W^O (report)")
    p.add_argument("--bf16_moments", action=argparse.BooleanOptionalAction,
                   help="AdamW moments stored in bf16, as the report trains (adamw_bf16.py; default: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on for one CUDA process, off elsewhere)")
    p.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction,
                   help="with --compile on a CUDA GPU: replay the compiled step as CUDA graphs (torch.compile's "
                        "mode reduce-overhead), one launch per graph instead of one per kernel; pays where kernels "
                        "are short, e.g. --fp8 on small models (BENCHMARKS.md); with --fp8, --grad_accum 1 only "
                        "(default: off)")
    p.add_argument("--bench", action="store_true", default=None, help="time a short run: tokens/s and MFU, no ckpt")
    t = p.add_argument_group("many processes (start with torchrun --nproc_per_node N train.py ...; README)")
    t.add_argument("--ep", type=int, help="expert parallelism: the routed experts split over ep ranks; data "
                                          "parallelism over dp = N / pp ranks is implied, each expert slice "
                                          "held by N / (ep·pp) of them (default: 1)")
    t.add_argument("--pp", type=int, help="pipeline parallelism: ranks a micro-batch flows through (default: 1)")
    t.add_argument("--pp_schedule", choices=("1f1b", "dualpipev"),
                   help="with --pp: 1f1b (pp stages) or dualpipev (2·pp stages in a V, embedding and head on rank 0; "
                        "dualpipe.py) (default: 1f1b)")
    t.add_argument("--microbatches", type=int, help="with --pp: micro-batches of --batch_size sequences per step, "
                                                    "in place of --grad_accum (default: the stage count)")
    t.add_argument("--plan", action="store_true", default=None,
                   help="print the on-paper plan of --preset on --gpus GPUs with --ep, --pp, --pp_schedule and exit "
                        "(plan.py: memory, all-to-all, bubble, step time, MFU; the report's batch; any of the five "
                        "not given takes the report's layout: 2048 GPUs, 8 a node, ep 64, pp 16, dualpipe, or "
                        "1f1b for an odd --pp)")
    t.add_argument("--gpus", type=int, help="with --plan: GPUs in all (default: 2048)")
    t.add_argument("--gpus_per_node", type=int, help="with --plan: GPUs a node (default: 8)")
    t.add_argument("--dist_timeout", type=float,
                   help="seconds a rank waits for the others in a collective before the job ends with an error "
                        "(a dead or stuck rank; default: 600)")
    g = p.add_argument_group("training (defaults for the tiny preset)", "; ".join(
        f"--preset {name} changes " + ", ".join(f"{k}={v}" for k, v in changes.items())
        for name, changes in PRESET_TRAIN.items()))
    helps = dict(batch_size="sequences per micro-batch", block_size="tokens per sequence (<= max_seq_len)",
                 grad_accum="micro-batches per optimizer step",
                 batch_ramp_iters="steps over which the micro-batches per step grow linearly from --batch_ramp_start "
                                  "to --grad_accum (the report: 3,072 to 15,360 sequences over its first 469B tokens)",
                 batch_ramp_start="micro-batches per step at step 0 of the ramp",
                 lr="peak learning rate", min_lr="learning rate at the cosine's end",
                 warmup_iters="linear warmup steps",
                 lr_hold_iters="step until which the peak lr holds before the cosine (the report holds it for 10T of "
                               "its 14.8T tokens)",
                 lr_decay_iters="step where the cosine reaches min_lr",
                 final_lr_iters="step from which the lr is --final_lr (the report: min_lr 2.2e-5 for 333B tokens "
                                "after the cosine, then 7.3e-6 for the last 167B)",
                 final_lr="learning rate from --final_lr_iters on",
                 ckpt_interval="steps between checkpoints",
                 weight_decay="AdamW decay (matrices only)", beta1="AdamW β1", beta2="AdamW β2",
                 grad_clip="max global gradient norm (0: off)", mtp_lambda="λ, weight of the MTP loss",
                 mtp_lambda_iters="step from which λ is --mtp_lambda_after (the report: 0.3 for the first 10T of its "
                                  "14.8T tokens, then 0.1)",
                 mtp_lambda_after="λ from --mtp_lambda_iters on",
                 balance_alpha="α, weight of the sequence-wise balance loss",
                 bias_gamma="γ, speed of the aux-loss-free gate-bias update",
                 bias_gamma_iters="step from which γ is 0: the biases stay (the report: 0.001 for the first 14.3T "
                                  "tokens, then 0)",
                 eval_interval="steps between evaluations",
                 eval_iters="validation batches per evaluation", log_interval="steps between log lines")
    shown = dict(warmup_iters="max_iters // 10", lr_hold_iters="warmup_iters", lr_decay_iters="max_iters",
                 ckpt_interval="eval_interval", final_lr_iters="none", final_lr="none", mtp_lambda_iters="none",
                 mtp_lambda_after="none", bias_gamma_iters="none", batch_ramp_iters="none",
                 batch_ramp_start="none")  # defaults that are no plain value
    for name, text in helps.items():
        kind = type(d[name]) if d[name] is not None else float if name in ("final_lr", "mtp_lambda_after") else int
        g.add_argument(f"--{name}", type=kind, help=f"{text} (default: {shown.get(name, d[name])})")
    m = p.add_argument_group("model (ModelConfig fields; default: the preset's value, shown for tiny)")
    for f in fields(ModelConfig):
        m.add_argument(f"--{f.name}", type=type(getattr(PRESETS["tiny"], f.name)),
                       help=f"(default: {getattr(PRESETS['tiny'], f.name)})")
    return p


def lr_hold_step(args) -> int:
    """The step until which the peak learning rate holds: --lr_hold_iters, or (None, also in a checkpoint) the end of
    the warmup, whatever --warmup_iters a resumed run is given."""
    return args.warmup_iters if args.lr_hold_iters is None else args.lr_hold_iters


def corpus_digest(corpus) -> list:
    """The SHA-256 of the train and validation token streams (data.py's cache header holds them): a resumed run
    compares them with its checkpoint's to tell whether it trains on the same tokens."""
    return [corpus.meta["train_sha256"], corpus.meta["val_sha256"]]


def resolve_args(ns: argparse.Namespace, ckpt: dict = None) -> argparse.Namespace:
    """Typed options > the checkpoint's training options (on --resume) > the preset's defaults."""
    given = {k: v for k, v in vars(ns).items() if v is not None}
    saved = ckpt["args"] if ckpt else {}
    preset = given.get("preset", saved.get("preset", TRAIN_DEFAULTS["preset"]))
    args = {**TRAIN_DEFAULTS, **PRESET_TRAIN.get(preset, {}), "out_dir": "out", "device": "auto", "resume": False,
            "overwrite": False, "compile": None, "cuda_graphs": False, "bench": False, "ep": 1, "pp": 1,
            "dist_timeout": 600.0, "pp_schedule": "1f1b", "microbatches": None, "plan": False, "gpus": None,
            "gpus_per_node": None}
    args.update({k: v for k, v in saved.items() if k not in RUN_ONLY})
    model_fields = {f.name for f in fields(ModelConfig)}
    args.update({k: v for k, v in given.items() if k not in model_fields})
    args["preset"] = preset
    if args["data"] is not None:
        args["data"] = os.path.abspath(args["data"])
    # The schedule follows the run's length unless given: warmup over the first tenth, cosine down to min_lr at the
    # last step (1000 steps: warmup 100, decay at 1000). The values are saved, so a resumed run keeps them.
    if args["warmup_iters"] is None:
        args["warmup_iters"] = args["max_iters"] // 10
    if args["lr_decay_iters"] is None:
        args["lr_decay_iters"] = args["max_iters"]
    if args["ckpt_interval"] is None:
        args["ckpt_interval"] = args["eval_interval"]
    if args["pp"] > 1 and "grad_accum" not in given:  # --microbatches take its place (a preset's value too)
        args["grad_accum"] = 1
    if args["microbatches"] is None:  # with --pp: the fewest the schedule takes, one per stage
        args["microbatches"] = args["pp"] * (2 if args["pp_schedule"] == "dualpipev" else 1) if args["pp"] > 1 else 1
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


def check_args(args, cfg: ModelConfig, start: int = 0, resumed: bool = False) -> None:
    """Every rule on the training options, for a run that starts at step `start` (a resumed run: the checkpoint's,
    whose saved options fill in what was not typed)."""
    origin = "the checkpoint's min_lr" if resumed else f"the {args.preset} preset's default"  # of min_lr
    def need(ok, name, rule):
        if not ok:
            raise ValueError(f"--{name}={getattr(args, name)!r}: {rule}")

    for name in ("lr", "min_lr", "final_lr", "weight_decay", "beta1", "beta2", "grad_clip", "mtp_lambda",
                 "mtp_lambda_after", "balance_alpha", "bias_gamma", "dist_timeout"):
        need(getattr(args, name) is None or math.isfinite(getattr(args, name)), name, "must be a finite number")
    for name in ("max_iters", "batch_size", "block_size", "grad_accum", "eval_interval", "ckpt_interval",
                 "eval_iters", "log_interval"):
        need(getattr(args, name) >= 1, name, "must be >= 1")
    for name in ("warmup_iters", "min_lr", "weight_decay", "grad_clip", "mtp_lambda",
                 "balance_alpha", "bias_gamma"):
        need(getattr(args, name) >= 0, name, "must be >= 0")
    for name in ("final_lr_iters", "final_lr", "mtp_lambda_iters", "mtp_lambda_after", "bias_gamma_iters"):
        need(getattr(args, name) is None or getattr(args, name) >= 0, name, "must be >= 0")
    for when, value in (("final_lr_iters", "final_lr"), ("mtp_lambda_iters", "mtp_lambda_after"),  # in pairs
                        ("batch_ramp_iters", "batch_ramp_start")):
        need(getattr(args, when) is not None or getattr(args, value) is None, value, f"needs --{when}")
    for when, value in (("final_lr_iters", "final_lr"), ("mtp_lambda_iters", "mtp_lambda_after")):
        need(getattr(args, when) is None or getattr(args, value) is not None, when, f"needs --{value}")
    need(args.lr > 0, "lr", "must be > 0")
    if not resumed or {"lr", "min_lr"} & args.typed:  # a checkpoint's own pair is its run's, whatever it is
        need(args.min_lr <= args.lr, "min_lr", f"must be <= lr ({args.lr}): the cosine goes down from lr to min_lr"
             + ("" if "min_lr" in args.typed else f" ({origin}: give --min_lr)"))
    for name in ("beta1", "beta2"):
        need(0 <= getattr(args, name) < 1, name, "must be in [0, 1)")
    need(args.bench or args.max_iters >= start, "max_iters",  # (--bench: the steps to time, from any start)
         f"must be >= the checkpoint's step ({start}): a run does not go back")
    hold = lr_hold_step(args)
    need(hold >= args.warmup_iters, "lr_hold_iters", "must be >= warmup_iters")
    if args.lr_decay_iters < hold and "lr_decay_iters" not in args.typed:  # name what was typed, and the default
        held = "lr_hold_iters" if args.lr_hold_iters is not None else "warmup_iters"
        need(False, held, f"must be <= lr_decay_iters ({args.lr_decay_iters}: "
                          + ("the checkpoint's; give --lr_decay_iters)" if resumed else "--max_iters unless given)"))
    need(args.lr_decay_iters >= hold, "lr_decay_iters",
         "must be >= lr_hold_iters" if args.lr_hold_iters is not None else "must be >= warmup_iters")
    need(args.final_lr_iters is None or args.final_lr_iters >= args.lr_decay_iters, "final_lr_iters",
         f"must be >= lr_decay_iters ({args.lr_decay_iters}): the final lr follows the cosine")
    ramp = args.batch_ramp_iters
    if ramp is not None:  # 0: no ramp (how a resumed run turns a saved one off)
        need(ramp >= 0, "batch_ramp_iters", "must be >= 0 (0: no ramp)")
        need(ramp == 0 or args.batch_ramp_start is not None, "batch_ramp_iters", "needs --batch_ramp_start")
        need(not args.bench or ramp == 0, "batch_ramp_iters", "--bench times full steps: leave the ramp out (0: none)")
        if start < ramp:  # the ramp is still ahead of this run
            need(args.pp == 1, "batch_ramp_iters", "needs --pp 1 while it runs (the pipeline's micro-batches are "
                                                   "fixed)")
            need(1 <= args.batch_ramp_start <= args.grad_accum, "batch_ramp_start", "must be in [1, grad_accum]")
    need(args.block_size <= cfg.max_seq_len, "block_size", f"must be <= max_seq_len ({cfg.max_seq_len})"
         + ("" if "block_size" in args.typed else f" (the {args.preset} preset's default: give --block_size)"))
    need(args.block_size > cfg.n_mtp, "block_size", f"must be > n_mtp ({cfg.n_mtp}): MTP predicts further ahead")
    need(args.fp8 or args.fp8_act_cache == "bf16", "fp8_act_cache", "needs --fp8")
    need(args.ep >= 1, "ep", "must be >= 1")
    need(args.pp >= 1, "pp", "must be >= 1")
    if args.pp > 1:  # equal stages, enough micro-batches for the schedule (pipeline.check_pipeline)
        need(args.grad_accum == 1, "grad_accum", "with --pp the pipeline's --microbatches take its place")
        pipeline.check_pipeline(cfg.n_layers, args.pp_schedule, args.pp, args.microbatches)
    else:
        need(args.microbatches == 1, "microbatches", "needs --pp > 1 (one process: --grad_accum)")
    need(args.pp > 1 or "pp_schedule" not in args.typed, "pp_schedule", "needs --pp > 1")
    for name in ("gpus", "gpus_per_node"):
        need(getattr(args, name) is None, name, "goes with --plan")
    need(args.dist_timeout > 0, "dist_timeout", "must be > 0")
    need(not (args.compile and parallel.under_torchrun()), "compile", "is not supported under torchrun yet")
    need(not (args.cuda_graphs and args.compile is False), "cuda_graphs", "needs --compile (the graphs replay "
                                                                          "what torch.compile generates)")
    need(not (args.cuda_graphs and args.fp8 and args.grad_accum > 1), "cuda_graphs",
         "with --fp8 needs --grad_accum 1 (the weights' FP8 copies and gradient buffers, new every optimizer step, "
         "are inputs the graphs would record again each step)")


# -- the run's state ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run holds; setup() builds it, train() advances it step by step."""
    args: argparse.Namespace    # resolved training options (typed > checkpoint > preset defaults)
    cfg: ModelConfig
    device: torch.device
    corpus: data.Corpus
    model: Transformer          # the module whose weights are saved
    fwd: nn.Module              # what the loop calls: `model`, or torch.compile(model)
    opt: torch.optim.Optimizer
    gen: torch.Generator        # the data order: its state is the position in the data
    step: int                   # optimizer steps done
    ckpt_path: str
    resumed: bool
    log_sums: dict = field(default_factory=dict)  # sums of the metrics of the steps not yet logged
    log_count: int = 0                            # how many steps those sums hold
    log_name: str = LOG                           # LOG_NEW while an --overwrite run has no checkpoint yet
    saved_step: int = None                        # step of the checkpoint on disk (None: none from this run)
    lock: object = None                           # the open lock file of out_dir (checkpoint.lock_out_dir)
    layout: parallel.Layout = field(default_factory=parallel.Layout)  # this rank's place (one process: 0 of 1)
    stop: parallel.StopRequest = None             # under torchrun: a signal noted, acted on by all ranks together

    @property
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks (batch_size sequences per data-parallel rank), past the
        batch-size ramp."""
        return (self.args.batch_size * self.args.block_size * self.args.grad_accum * self.args.microbatches
                * self.layout.dp)

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches of optimizer step `step`: --grad_accum, or on the batch-size ramp (the report's 3,072 to
        15,360 sequences) --batch_ramp_start + (grad_accum − batch_ramp_start)·step / batch_ramp_iters, rounded to
        the nearest (so the ramp's mean is halfway), until step batch_ramp_iters."""
        a = self.args
        if a.batch_ramp_iters is None or step >= a.batch_ramp_iters:
            return a.grad_accum
        n = a.batch_ramp_iters
        return a.batch_ramp_start + ((a.grad_accum - a.batch_ramp_start) * step + n // 2) // n

    def tokens_at(self, step: int) -> int:
        """Tokens of optimizer step `step` over all ranks."""
        return self.tokens_per_step * self.micro_batches_at(step) // self.args.grad_accum

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    def snapshot(self) -> dict:
        """What a checkpoint at `step` holds; taken only between optimizer steps. The tensors are the live ones
        (no copy): they do not change until the next optimizer step, and a checkpoint is written before it."""
        saved = {k: v for k, v in vars(self.args).items() if k not in RUN_ONLY + ("typed", "model_overrides")}
        meta = {"step": self.step, "rng": rng_state(self.gen), "config": config_to_dict(self.cfg), "args": saved,
                "tokenizer": self.corpus.tokenizer.name, "data": self.corpus.key, "tokens": corpus_digest(self.corpus),
                "log_sums": dict(self.log_sums), "log_count": self.log_count, "log_file": self.log_name}
        if self.layout.distributed:  # the model and optimizer shards are written by every rank (train.save)
            return meta
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), **meta}

    def batch(self, split: str, gen: torch.Generator):
        """(x, y), each (B, T): one process draws B sequences; under torchrun every rank draws the same global
        batch of B·dp and keeps its slice (parallel.get_batch)."""
        args = self.args
        if self.layout.distributed:
            return parallel.get_batch(self.corpus, split, args.batch_size, args.block_size, gen, self.layout,
                                      self.device)
        return self.corpus.get_batch(split, args.batch_size, args.block_size, gen, self.device)

    def is_eval_step(self) -> bool:
        return self.step % self.args.eval_interval == 0 or self.step == self.args.max_iters


# -- setup: everything that can fail because of user input, before training ----------------------------------
def setup(ns: argparse.Namespace) -> Run:
    """Options, config, device, corpus, model, optimizer and (on --resume) their saved state.
    Raises ValueError/FileNotFoundError with one line for anything the user can fix; writes nothing before the
    out_dir lock is taken, and nothing at all when it refuses."""
    if ns.out_dir == "":
        raise ValueError("--out_dir is empty: name a folder (the default is out)")
    out_dir = ns.out_dir or "out"
    if not ns.bench:
        check_out_dir(out_dir, ns.resume, ns.overwrite)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if parallel.under_torchrun():  # every rank writes its shards into one folder (checkpoint.save_distributed)
        ckpt_path = dcp_path(ckpt_path)
        ckpt = resume_meta(ckpt_path) if ns.resume else None
    else:  # a file, or on --resume the folder of a distributed run if that is newer
        ckpt = load_checkpoint(ckpt_path, "--resume", need=CKPT_KEYS) if ns.resume else None
    args = resolve_args(ns, ckpt)
    cfg = resolve_config(args, ckpt)
    check_args(args, cfg, ckpt["step"] if ckpt else 0, resumed=ckpt is not None)
    # the process group (under torchrun; checks the sizes first, alike on every rank) and the device
    layout = parallel.init(args.ep, args.pp, args.device, args.dist_timeout, cfg.n_routed_experts)
    parallel.quiet_other_ranks(layout)
    device = layout.device
    if not layout.distributed:  # under torchrun each rank holds a share that depends on the layout
        check_memory(cfg, args, device)
    linear = linear_class(args.fp8, device)
    # rank 0 tokenizes (and caches) the corpus and locks out_dir before the others read the cache
    corpus = parallel.rank0_first(lambda: data.load_corpus(args.data, cfg.vocab_size, args.cache_dir, log=print),
                                  layout)
    if ckpt and ckpt.get("tokenizer") != corpus.tokenizer.name:
        raise ValueError(f"--resume: the checkpoint's tokenizer {ckpt.get('tokenizer')!r} is not "
                         f"{corpus.tokenizer.name!r}")
    digest = corpus_digest(corpus)
    if ckpt and ckpt.get("tokens", digest) != digest:  # another --data, an edited file
        print("note: --resume: the corpus's tokens are not those the checkpoint was trained on; the run goes on over "
              "these, so it will not end as a straight run on the old ones would", file=sys.stderr)
    corpus.check_block(args.block_size)
    lock = parallel.rank0_first(lambda: None if args.bench or not layout.is_main else lock_out_dir(out_dir), layout)
    try:
        run = build(args, cfg, device, linear, corpus, ckpt, ckpt_path, layout)
        run.lock = lock

        def prepare():  # the folder's files are rank 0's; the other ranks stop if it refuses
            if not args.bench and layout.is_main:
                check_out_dir(out_dir, ns.resume, ns.overwrite)  # again, now that we hold the lock
                prepare_log(run, ckpt)
        parallel.rank0_first(prepare, layout)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return run


def build(args, cfg, device, linear, corpus, ckpt, ckpt_path, layout=None) -> Run:
    layout = layout or parallel.Layout.single(device)
    torch.manual_seed(args.seed)  # the same seed on every rank: identical weights (FSDP does not broadcast them)
    model = Transformer(cfg, linear, expert_kernels(args.fp8)).to(device)
    if args.pp > 1:  # this rank's pipeline stages, and on them experts over ep, FSDP2 over dp (pipeline.py)
        model = pipeline.Pipeline(model, args.pp_schedule, layout, args.microbatches,
                                  (args.batch_size, args.block_size), args.mtp_lambda, args.balance_alpha)
    else:
        parallel.parallelize(model, layout)  # under torchrun: experts over ep, FSDP2 over dp (parallel.py)
    set_act_cache(model, args.fp8_act_cache)
    opt = make_optimizer(model, args, device)
    gen = torch.Generator().manual_seed(args.seed)
    run = Run(args, cfg, device, corpus, model, model, opt, gen, 0, ckpt_path, resumed=ckpt is not None,
              layout=layout)
    if ckpt:
        try:
            if layout.distributed:  # every rank reads its shards, whatever layout wrote them
                load_distributed(ckpt_path, model, opt)
            else:
                load_full_state(model, opt, ckpt)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"--resume: the checkpoint does not fit the model ({first_line(e)})") from None
        set_rng_state(ckpt["rng"], gen)
        run.step = run.saved_step = ckpt["step"]
        run.log_sums, run.log_count = dict(ckpt.get("log_sums", {})), ckpt.get("log_count", 0)
    run.fwd = compile_model(model, args, device)
    return run


def default_compile(args, device: torch.device) -> bool:
    """--compile when it is not given: on for one CUDA process, where the compiled step ran 1.3-1.9x the eager
    one's tokens/s in bf16 and 1.5x with --fp8 (BENCHMARKS.md, "the default step" and "--fp8 compiled as one
    graph": the FP8 kernels are torch.library operators, so they do not split the graph); off on the CPU and MPS
    (compiling takes longer than the tiny preset's whole run) and under torchrun (not supported yet)."""
    return device.type == "cuda" and not parallel.under_torchrun()


def compile_model(model: nn.Module, args, device: torch.device) -> nn.Module:
    """What the loop calls (Run.fwd): torch.compile(model) if args.compile (None: default_compile decides, and
    args.compile is set to the answer), else the model itself; with args.cuda_graphs in torch.compile's mode
    "reduce-overhead", which records each compiled graph as a CUDA graph and replays it (train.forward_backward
    marks where each micro-batch starts; the graphs are recorded at the second call, which train.first_step
    covers too). The lazy set-up is done first: the grouped-GEMM probe (moe.grouped_mm_supported) would otherwise
    run inside the first compiled call, split that graph and make the next call compile again. A torch.compile that
    refuses at once (e.g. a Python version it does not support yet): a typed --compile is a ValueError (one line), the
    default goes on with the model itself (a note; args.compile becomes False)."""
    if args.compile is None:
        args.compile = default_compile(args, device)
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda_graphs needs a CUDA device (here: {device})")
    if args.cuda_graphs and not args.compile:
        raise ValueError("--cuda_graphs needs --compile (the graphs replay what torch.compile generates)")
    if not args.compile:
        return model
    for dtype in (torch.bfloat16, torch.float32):
        grouped_mm_supported(device, dtype)
    try:
        return torch.compile(model, mode="reduce-overhead") if args.cuda_graphs else torch.compile(model)
    except Exception as e:
        why = f"{type(e).__name__}: {first_line(e)}"
        if "compile" in args.typed:
            raise ValueError(f"--compile is unavailable here ({why})") from None
        print(f"note: torch.compile is unavailable here ({why}); training uncompiled", file=sys.stderr)
        args.compile = False
        return model


def resume_meta(path: str) -> dict:
    """Under torchrun, --resume reads the folder's small meta file first (options, config, step, RNG); the
    shards follow once the model is built and parallelized."""
    if not os.path.isdir(path) and not os.path.isdir(f"{path}.old"):
        single = os.path.join(os.path.dirname(path), "ckpt.pt")
        hint = f" ({single} is a one-process run: continue it with python train.py --resume)" \
            if os.path.exists(single) else ""
        raise FileNotFoundError(f"--resume: no distributed checkpoint at {path}{hint}")
    single = os.path.join(os.path.dirname(path), "ckpt.pt")
    if newest_checkpoint(single) == single:  # a one-process --resume went on from the folder: do not go back
        raise ValueError(f"--resume: {single} is newer than {path} (a one-process run continued it): continue "
                         f"with python train.py --resume, or move {single} aside to resume the older {path}")
    try:
        meta = read_meta(check_distributed(path))
    except Exception as e:
        raise ValueError(f"--resume: cannot read {path} ({type(e).__name__}: {first_line(e)})") from None
    missing = [k for k in CKPT_KEYS if k not in ("model", "optimizer") and k not in meta]
    if missing:
        raise ValueError(f"--resume: {path} is not a train.py checkpoint (no {', '.join(missing)})")
    return meta


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, ckpt: dict) -> None:
    """Whole-tensor state into one process: from ckpt.pt, or from a distributed run's folder, whose optimizer
    state is keyed by parameter names (torch.distributed.checkpoint's form) rather than by position."""
    model.load_state_dict(ckpt["model"])
    if any(k.startswith("param_groups.") for k in ckpt["optimizer"]):  # a distributed run's (flattened) state
        load_optimizer_state(model, opt, ckpt["optimizer"])
    else:
        opt.load_state_dict(ckpt["optimizer"])


def check_out_dir(out_dir: str, resume: bool, overwrite: bool) -> None:
    """A fresh run never writes into a folder that holds a run unless told to (--overwrite)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in out_dir and --overwrite replaces it: give one of them")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir}: this is a file, not a folder")
    held = [name for name in ("ckpt.pt", "ckpt.dcp", LOG) if os.path.exists(os.path.join(out_dir, name))]
    if held == [LOG] and not overwrite:  # a run stopped (kill -9, a crash) before its first checkpoint
        raise ValueError(f"--out_dir {out_dir} holds the log of a run that saved no checkpoint, so it cannot be "
                         f"resumed: --overwrite replaces it")
    if held and not resume and not overwrite:
        raise ValueError(f"--out_dir {out_dir} holds a run ({', '.join(held)}): --resume continues it, "
                         f"--overwrite replaces it (the old files stay until the new run's first checkpoint)")


def prepare_log(run: Run, ckpt: dict) -> None:
    """Name the log this run appends to. A fresh run into a folder that holds a run (--overwrite) writes
    LOG_NEW, which replaces LOG at its first checkpoint (save). A resumed run first finishes that rename if
    a crash came between the checkpoint and the rename, and drops the LOG_NEW of a run that never saved."""
    new = run.path(LOG_NEW)
    if ckpt and ckpt.get("log_file") == LOG_NEW and os.path.exists(new):
        os.replace(new, run.path(LOG))
    elif os.path.exists(new):
        os.remove(new)
    if not ckpt and (os.path.exists(run.ckpt_path) or os.path.exists(run.path(LOG))):
        run.log_name = LOG_NEW


def check_memory(cfg: ModelConfig, args, device: torch.device) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and AdamW moments alone do not fit
    in the device's free memory (activations come on top of that)."""
    n = count_params(cfg)  # on the meta device: no memory
    params = n["total"] + n["mtp"]
    per_param = 4 + 4 + (2 * 2 if args.bf16_moments else 2 * 4)  # fp32 weight and gradient, two moments
    need, free = params * per_param, free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"the model ({args.preset} preset{' with overrides' if args.model_overrides else ''}) "
                         f"has {params / 1e9:.2f}B parameters: weights, gradients and AdamW moments need "
                         f"{need / 1e9:,.1f} GB ({per_param} bytes each) before any activation, and {device} has "
                         f"{free / 1e9:,.1f} GB free")


def free_memory(device: torch.device):
    """Free bytes: of the GPU for CUDA, else of the machine (MemAvailable on Linux, physical memory elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def set_act_cache(model: nn.Module, mode: str) -> None:
    """What every FP8 layer keeps of its input for Wgrad (fp8_linear.FP8Linear.act_cache), and the routed experts of
    their SwiGLU inputs (moe.Experts.act_cache): one mode for all, or "report": E4M3 tiles everywhere and E5M6
    for the input of W^O, the Linear after attention (report §3.3.3)."""
    for name, m in model.named_modules():
        if hasattr(m, "act_cache"):
            m.act_cache = ("e5m6" if name.endswith("attn.wo") else "fp8") if mode == "report" else mode


def linear_class(fp8: bool, device: torch.device):
    """nn.Linear, or fp8_linear.FP8Linear (imported only when asked for, and only where its kernel runs)."""
    if not fp8:
        return nn.Linear
    if device.type != "cuda":
        raise ValueError(f"--fp8 needs a Hopper GPU (sm_90); the device is {device}")
    try:
        import fp8
    except ImportError as e:
        raise ValueError(f"--fp8 is unavailable: cannot import fp8.py ({e})") from None
    if fp8.load_kernel() is None:  # builds fp8_gemm.cu now rather than failing (or crawling) mid-run
        raise ValueError(f"--fp8 is unavailable: {getattr(fp8, '_WHY_NOT', None) or 'the FP8 kernel did not load'}")
    import fp8_linear
    return fp8_linear.FP8Linear


def expert_kernels(fp8: bool):
    """The routed experts' kernels that go with linear_class(fp8): fp8_experts.FP8Experts, or None (high
    precision). The model hands them to every MoE layer (model.Transformer's `experts`)."""
    if not fp8:
        return None
    import fp8_experts
    return fp8_experts.FP8Experts


def make_optimizer(model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (ndim >= 2: projections, experts, embedding, head) only, not on norms.
    The gate biases b_i are buffers, so the optimizer never sees them. --bf16_moments keeps the two moments in
    bf16 (report §3.3.3; adamw_bf16.py), otherwise torch's AdamW keeps them in fp32."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if args.bf16_moments:
        return AdamWBF16(groups, lr=args.lr, betas=(args.beta1, args.beta2))
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]
