"""Train a DeepSeek-V3-style model: `python train.py` (tiny preset on the Python standard library, a few minutes
on a laptop CPU), `python train.py --preset small` on a GPU, `python train.py --help` for every option.

One optimizer step (report §2 and §4, training details):
    loss = L_main + λ·L_MTP + α·Σ_layers L_balance        (λ = --mtp_lambda, α = --balance_alpha)
    backward over --grad_accum micro-batches, clip the global gradient norm to 1.0, AdamW (β = 0.9/0.95,
    weight decay 0.1 on matrices only; --bf16_moments keeps its moments in bf16 as the report does, §3.3.3),
    then the aux-loss-free update of every MoE gate bias:
    b_i += γ·sign(mean load − load_i)                     (γ = --bias_gamma; bias buffers never see a gradient)
Learning rate: linear warmup to --lr over --warmup_iters steps, then cosine to --min_lr at --lr_decay_iters. Unless
given, both follow --max_iters: warmup over the first tenth of the steps, decay ending at the last step (so the
default 1000 steps warm up for 100). The resolved values are saved in the checkpoint: a resumed run keeps its
schedule even when it is given a larger --max_iters.

The run folder (--out_dir, default out/) holds ckpt.pt, log.jsonl (format: see "the log" below) and a lock file: a
second run on the same folder refuses to start, and so does a fresh run into a folder that holds a run, unless given
--resume (continue it) or --overwrite (replace it; the old files stay intact until the new run's first checkpoint is
complete, and an --overwrite run stopped before that saves nothing). Checkpoints (checkpoint.py: written to a
temporary file and then renamed, so a crash never leaves half a file; every --ckpt_interval steps and at the end)
hold the model (MoE bias buffers included), the optimizer, the step, every RNG state (the data position is the state
of the data generator), the config, the training options, the tokenizer name and the sums of the steps not yet
logged. A run stopped part way (by Ctrl-C, SIGTERM or kill -9, or by a smaller --max_iters with the schedule given
explicitly) and continued with `--resume` ends with the weights and log records of a straight run, bit for bit,
given the same thread count; on resume, options not given on the command line come from the checkpoint. Ctrl-C and
SIGTERM (what `timeout` and cluster schedulers send) save the last finished step and exit with 128 + the signal
number (130, 143); a non-finite loss, a full disk or an unwritable folder stop with one line and leave the last good
checkpoint in place.

Many processes: `torchrun --nproc_per_node N train.py --ep E ...` runs the same loop on N ranks (parallel.py:
the experts of each MoE layer split over E ranks, FSDP2 over the N data-parallel ranks, each drawing the same
global batch of N·batch_size sequences and keeping its slice). Rank 0 prints and logs; the checkpoint is the
folder out_dir/ckpt.dcp, written by all ranks (checkpoint.py); Ctrl-C and SIGTERM stop all ranks after the same
step. With --pp P the blocks are cut into pipeline stages (parallel.Pipeline: torch's 1F1B or DualPipeV schedule)
and --microbatches take the place of --grad_accum. `--plan` prints plan.py's estimate of a full-scale layout and
exits. README, "Many processes".

Precision: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU and MPS; `--fp8` swaps the projections for
fp8.FP8Linear (Hopper GPUs). `--bench` times a few steps and prints tokens/s and MFU (FLOPs per token:
model.train_flops_per_token, whose counting rule is written beside it).

The file reads top to bottom: defaults, the run's state, the training loop, its log, one optimizer step and
evaluation, the benchmark, then setup (everything that can fail because of user input, done before training
starts: the run folder, memory, device, corpus, model) and options.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import parallel
from adamw_bf16 import AdamWBF16
from checkpoint import (Interrupted, dcp_path, load_checkpoint, load_distributed, load_optimizer_state, lock_out_dir,
                        read_meta, rng_state, save_checkpoint, save_distributed, set_rng_state, signals_deferred,
                        stop_on_sigterm)
from config import ModelConfig, PRESETS, get_preset, config_to_dict, config_from_dict
from model import Transformer, count_params, train_flops_per_token
from moe import max_violation

# Training defaults for the tiny preset, chosen on a 2-core CPU for `python train.py` (1000 steps × 1,024 tokens):
# at equal tokens and time 8 sequences per step beat 16, lr 3e-3 beat 6e-3 and 1e-2, and γ = 0.01 beat the
# report's 0.001 (lower validation loss and a better-balanced load): a short run has too few steps for ±0.001
# per step to move the biases far enough.
TRAIN_DEFAULTS = dict(
    preset="tiny", data=None, cache_dir=data.DEFAULT_CACHE_DIR, seed=1337, max_iters=1000,
    batch_size=8, block_size=128, grad_accum=1,
    lr=3e-3, min_lr=3e-4, warmup_iters=None, lr_decay_iters=None,  # None: from max_iters (resolve_args)
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    mtp_lambda=0.3, balance_alpha=1e-4, bias_gamma=0.01,
    eval_interval=200, ckpt_interval=None, eval_iters=20, log_interval=10,  # ckpt_interval None: eval_interval
    fp8=False, fp8_act_cache="bf16", bf16_moments=False,
)
# Other presets change only these (the rest as above).
PRESET_TRAIN = {
    "small": dict(max_iters=5000, batch_size=16, block_size=1024, lr=6e-4, min_lr=6e-5, bias_gamma=0.001,
                  eval_interval=250, eval_iters=20),
}
CKPT_KEYS = ("model", "optimizer", "step", "rng", "config", "args", "tokenizer")  # what --resume needs
RUN_ONLY = ("resume", "overwrite", "device", "compile", "bench", "out_dir",  # never taken from a checkpoint
            "ep", "pp", "dist_timeout", "pp_schedule", "microbatches", "plan", "gpus", "gpus_per_node")
LOG, LOG_NEW = "log.jsonl", "log.jsonl.new"  # the log, and its name while an --overwrite run has no checkpoint
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


class Diverged(RuntimeError):
    pass


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
        """Tokens of one optimizer step over all ranks (batch_size sequences per data-parallel rank)."""
        return (self.args.batch_size * self.args.block_size * self.args.grad_accum * self.args.microbatches
                * self.layout.dp)

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    def snapshot(self) -> dict:
        """What a checkpoint at `step` holds; taken only between optimizer steps. The tensors are the live ones
        (no copy): they do not change until the next optimizer step, and a checkpoint is written before it."""
        saved = {k: v for k, v in vars(self.args).items() if k not in RUN_ONLY + ("typed", "model_overrides")}
        meta = {"step": self.step, "rng": rng_state(self.gen), "config": config_to_dict(self.cfg), "args": saved,
                "tokenizer": self.corpus.tokenizer.name, "data": self.corpus.key,
                "log_sums": dict(self.log_sums), "log_count": self.log_count, "log_file": self.log_name}
        if self.layout.distributed:  # the model and optimizer shards are written by every rank (save)
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


class SaveFailed(RuntimeError):
    pass


# -- the training loop ----------------------------------------------------------------------------------------
def train(run: Run) -> int:
    """Steps from run.step to --max_iters; returns the exit status (0 done, 1 stopped by an error, 2 --compile
    failed, 128 + signal number after Ctrl-C or SIGTERM, the checkpoint saved)."""
    args, corpus = run.args, run.corpus
    n_params = count_params(run.cfg)
    baseline = data.unigram_baseline(corpus.splits["train"], corpus.splits["val"], corpus.tokenizer.n_vocab)
    print(f"model {args.preset}: {n_params['total'] / 1e6:.2f}M params ({n_params['active'] / 1e6:.2f}M active) "
          f"+ {n_params['mtp'] / 1e6:.2f}M MTP | {run.device}, "
          f"{'bf16 autocast' if run.device.type == 'cuda' else 'fp32'}{', fp8' if args.fp8 else ''} | "
          f"{run.tokens_per_step:,} tokens/step | {corpus.tokenizer.name}")
    print(f"unigram baseline on val: {baseline:.4f} nats/token")
    if run.layout.distributed:
        print(f"layout: {run.layout.describe()}")
    if args.bench:
        return bench(run)
    log = open_log(run)
    # Both stdout and stderr on a terminal: a progress bar; otherwise (a file, tee, a batch job) a plain line
    # every log_interval steps.
    interactive = sys.stdout.isatty() and sys.stderr.isatty()
    bar = tqdm(total=args.max_iters, initial=run.step, unit="step", dynamic_ncols=True, disable=not interactive)
    boundary, ev, start = run.snapshot(), None, run.step
    try:
        with loop_signals(run):
            if run.resumed and run.is_eval_step() and not logged_eval(run):  # stopped between the step and its eval
                ev = evaluate_and_log(run, log)
            if run.step >= args.max_iters:
                print(f"checkpoint is at step {run.step} >= --max_iters {args.max_iters}: nothing to do")
                return 0
            t_last, timed = time.time(), 0  # throughput: steps run since t_last
            while run.step < args.max_iters:
                metrics = forward_backward(run)
                with step_signals(run):  # the step, its log record and the snapshot move together
                    optimizer_step(run)
                    run.step += 1
                    timed += 1
                    for k, v in metrics.items():
                        run.log_sums[k] = run.log_sums.get(k, 0.0) + v
                    run.log_count += 1
                    if run.step % args.log_interval == 0 or run.step == args.max_iters:
                        rec = train_record(run, timed * run.tokens_per_step / (time.time() - t_last))
                        write_record(log, rec)
                        show_progress(bar, interactive, rec, args.max_iters)
                        t_last, timed = time.time(), 0
                    boundary = run.snapshot()
                bar.update(1)
                if run.stop is not None and parallel.any_rank(run.stop.signum is not None, run.layout):
                    raise Interrupted(run.stop.signum or signal.SIGTERM)  # every rank, after the same step
                if run.is_eval_step():
                    ev = evaluate_and_log(run, log)
                if run.step % args.ckpt_interval == 0 or run.step == args.max_iters:
                    save(run, boundary)
                if run.is_eval_step() or run.step % args.ckpt_interval == 0:
                    t_last, timed = time.time(), 0  # evaluation and saving are not training throughput
    except KeyboardInterrupt as e:
        bar.close()
        signum = getattr(e, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        # an --overwrite run before its first checkpoint: the old run is worth more (rank 0 holds the log's name;
        # all ranks decide together, since a distributed save needs every rank)
        if parallel.any_rank(run.log_name != LOG, run.layout):
            log.close()
            if run.layout.is_main:
                os.remove(run.path(run.log_name))
            report(run, f"{what} before the first checkpoint of this --overwrite run: nothing saved, {args.out_dir} "
                        f"keeps the run it held")
            return 128 + signum
        try:
            save(run, boundary)
        except KeyboardInterrupt:  # pressed again during the save: it waited, the checkpoint is complete
            pass
        except SaveFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        report(run, f"{what}: saved step {boundary['step']} to {run.ckpt_path} (continue with --resume)")
        return 128 + signum
    except (Diverged, SaveFailed) as e:
        bar.close()
        report(run, f"error: {e}; {kept(run)}")
        return 1
    except OSError as e:  # writing the log: the folder vanished, the disk is full
        bar.close()
        print(f"error: cannot write to {args.out_dir} ({e.strerror or e}); {kept(run)}", file=sys.stderr)
        return 1
    except Exception as e:
        if not (args.compile and run.step == start):
            raise
        bar.close()  # torch.compile compiles at the first call: a missing compiler or backend shows up here
        print(f"error: --compile failed at the first step ({type(e).__name__}: {first_line(e)}); run without "
              f"--compile", file=sys.stderr)
        return 2
    finally:
        log.close()
    bar.close()
    val = f"val loss {ev['val_main']:.4f} vs unigram baseline {baseline:.4f} nats/token; " if ev else ""
    print(f"done: step {run.step}, {val}checkpoint {run.ckpt_path}")
    return 0


def save(run: Run, snapshot: dict) -> None:
    """Write the checkpoint; the first one of an --overwrite run then puts its log in place of the old one.
    Under torchrun every rank writes its shards of the live model and optimizer (they have not changed since
    the snapshot was taken: both happen between the same two optimizer steps). Ctrl-C and SIGTERM wait until the
    checkpoint and the log rename are both done."""
    with signals_deferred():
        try:
            if run.layout.distributed:
                save_distributed(run.ckpt_path, run.model, run.opt, snapshot)
            else:
                save_checkpoint(snapshot, run.ckpt_path)
        except OSError as e:
            raise SaveFailed(str(e)) from None
        run.saved_step = snapshot["step"]
        if run.log_name != LOG and run.layout.is_main:
            os.replace(run.path(run.log_name), run.path(LOG))  # the open log file follows the rename
            run.log_name = LOG


def kept(run: Run) -> str:
    if run.saved_step is not None:
        return f"{run.ckpt_path} holds step {run.saved_step}"
    return f"{run.ckpt_path} is unchanged" if os.path.exists(run.ckpt_path) else "no checkpoint written"


def report(run: Run, text: str) -> None:
    """An outcome every rank meets alike (divergence, a save, a signal) is told once, by rank 0."""
    if run.layout.is_main:
        print(text, file=sys.stderr)


def loop_signals(run: Run):
    """One process: SIGTERM raises Interrupted like Ctrl-C. Under torchrun: both only note the signal in
    run.stop, and all ranks act on it together after the step (parallel.signals_as_flag)."""
    if not run.layout.distributed:
        return stop_on_sigterm()

    @contextlib.contextmanager
    def noted():
        with parallel.signals_as_flag() as run.stop:
            yield
    return noted()


def step_signals(run: Run):
    """Hold signals during the step and its snapshot (under torchrun they are only noted anyway)."""
    return contextlib.nullcontext() if run.layout.distributed else signals_deferred()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def show_progress(bar, interactive: bool, rec: dict, max_iters: int) -> None:
    if interactive:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
    else:
        print(f"step {rec['step']}/{max_iters}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
              f"{rec['tok_per_s']:,.0f} tokens/s", flush=True)


# -- the log: out_dir/log.jsonl ------------------------------------------------------------------------------
# One JSON record per line: every log_interval steps {"step", "lr", "loss", "main", "mtp", "balance", "grad_norm"
# (means over the steps since the last record), "tok_per_s"}, and at each evaluation {"step", "val_main",
# "val_mtp", "val_mtp_acc", "max_violation"}. Resuming is exact, so the log of an interrupted and resumed run
# equals the log of a straight run record by record (tok_per_s aside): the checkpoint keeps the sums of the steps
# not yet logged, and a resumed run first cuts the log back to the checkpoint's step (a run killed after its last
# checkpoint logged steps that it will run again).
def open_log(run: Run):
    if not run.layout.is_main:  # one log per run, written by rank 0
        return open(os.devnull, "w")
    if not run.resumed:
        return open(run.path(run.log_name), "w")
    truncate_log(run.path(LOG), run.step)
    return open(run.path(LOG), "a")


def truncate_log(path: str, step: int) -> None:
    """Keep the records up to `step`; a half-written last line goes too. Rewritten atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith("\n") or rec.get("step", 0) > step:
                break
            keep.append(line)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def logged_eval(run: Run) -> bool:
    """Whether the log holds the evaluation at run.step (a run stopped during an evaluation saved the step first)."""
    if not os.path.exists(run.path(LOG)):
        return False
    with open(run.path(LOG)) as f:
        return any('"val_main"' in line and json.loads(line)["step"] == run.step for line in f)


def train_record(run: Run, tok_per_s: float) -> dict:
    """The record of the steps since the last one (their mean metrics); starts the sums afresh."""
    rec = {"step": run.step, "lr": lr_at(run.step - 1, run.args),
           **{k: v / run.log_count for k, v in run.log_sums.items()}, "tok_per_s": tok_per_s}
    run.log_sums, run.log_count = {}, 0
    return rec


def write_record(log, rec: dict) -> None:
    log.write(json.dumps(rec) + "\n")
    log.flush()


def evaluate_and_log(run: Run, log) -> dict:
    ev = evaluate(run)
    write_record(log, {"step": run.step, **ev})
    tqdm.write(f"step {run.step}: val loss {ev['val_main']:.4f}, mtp {ev['val_mtp']:.4f}, mtp acc "
               f"{ev['val_mtp_acc']:.3f}, max violation {ev['max_violation']:.2f}"
               + (f", ranks per token {ev['ranks_per_token']:.2f}" if "ranks_per_token" in ev else ""))
    return ev


# -- one optimizer step ----------------------------------------------------------------------------------------
def forward_backward(run: Run) -> dict:
    """Gradients of one optimizer step, accumulated over grad_accum micro-batches; returns the mean losses."""
    args = run.args
    lr = lr_at(run.step, args)
    for group in run.opt.param_groups:
        group["lr"] = lr
    sums = {k: torch.zeros((), device=run.device) for k in ("loss", "main", "mtp", "balance")}
    if run.layout.pp > 1:  # one schedule step runs all --microbatches forward and backward (parallel.Pipeline)
        # M × (B, T), drawn as one process draws them for --grad_accum M
        xs, ys = zip(*(run.batch("train", run.gen) for _ in range(args.microbatches)))
        with run.autocast:
            losses = run.model.train_step(torch.cat(xs), torch.cat(ys))
        losses["loss"] = total_loss(losses, args)
        sums = {k: losses[k].float().to(run.device) for k in sums}
    else:
        for micro in range(args.grad_accum):
            x, y = run.batch("train", run.gen)  # (B, T) each
            parallel.set_gradient_sync(run.model, micro == args.grad_accum - 1)  # under FSDP: one sync per step
            with run.autocast:
                _, losses = run.fwd(x, y)
            loss = total_loss(losses, args)
            (loss / args.grad_accum).backward()
            losses["loss"] = loss
            for k in sums:
                sums[k] += losses[k].detach().float() / args.grad_accum
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")  # inf: measure the norm, never clip
    if run.layout.pp > 1:
        sums = parallel.mean_over_dp(sums, run.layout)
        sums["grad_norm"] = run.model.clip_grad_norm(clip)
    elif run.layout.distributed:  # losses: means over the dp ranks; the norm over every rank's gradient shards
        sums = parallel.mean_over_dp(sums, run.layout)
        sums["grad_norm"] = parallel.clip_grad_norm(list(run.model.parameters()), clip, run.layout)
    else:
        sums["grad_norm"] = nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    out = {k: v.item() for k, v in sums.items()}
    if not all(math.isfinite(v) for v in out.values()):
        run.opt.zero_grad(set_to_none=True)
        raise Diverged(f"non-finite loss or gradient at step {run.step} (loss {out['loss']}, grad norm "
                       f"{out['grad_norm']}): stopped")
    return out


def optimizer_step(run: Run) -> None:
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    # b_i += γ·sign(mean load − load_i), the load over this step's tokens of all data-parallel ranks
    run.model.update_moe_bias(run.args.bias_gamma, run.layout.group("dp"))


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


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Validation main/MTP loss, MTP depth-1 acceptance, and the max over MoE layers of each layer's
    max_violation (max load / mean load − 1) over all the evaluation tokens. Uses its own generator with a
    fixed seed: the same batches every time, and the training RNG is untouched."""
    args, layout = run.args, run.layout
    gen = torch.Generator().manual_seed(args.seed + 1)
    run.model.eval()
    sums = {"val_main": 0.0, "val_mtp": 0.0, "val_mtp_acc": 0.0}
    counts, ranks = None, 0.0
    for _ in range(args.eval_iters):
        x, y = run.batch("val", gen)
        with run.autocast:
            losses = run.model.evaluate(x, y) if layout.pp > 1 else run.fwd(x, y)[1]
        for k in sums:
            sums[k] += losses[k[4:]].item() / args.eval_iters
        moes = run.model.moe_layers()
        layer_counts = [m.last_counts.cpu() for m in moes]
        counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
        if layout.ep > 1 and moes:
            ranks += sum(float(m.last_ranks_per_token) for m in moes) / len(moes) / args.eval_iters
    run.model.train()
    if layout.distributed:  # every dp rank evaluated its slice of the same batches
        sums = {k: v.item() for k, v in parallel.mean_over_dp(sums, layout).items()}
        counts = parallel.sum_over_dp(counts, layout) if counts else counts
    sums["max_violation"] = max((max_violation(c) for c in counts), default=0.0) if counts else 0.0
    sums["max_violation"] = parallel.max_over_pp(sums["max_violation"], layout)  # each stage: its own layers
    if layout.ep > 1:  # node-limited routing: how many ep ranks a token's experts live on, on average
        sums["ranks_per_token"] = parallel.mean_over_dp({"r": ranks}, layout)["r"].item()
    return sums


# -- benchmark ------------------------------------------------------------------------------------------------
def peak_flops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench(run: Run) -> int:
    """A few untimed warmup steps, then timed steps; prints tokens/s and MFU. Writes nothing."""
    args, device = run.args, run.device
    flops_tok = train_flops_per_token(run.cfg, args.block_size, with_mtp=run.cfg.n_mtp > 0)  # MTP runs even at λ = 0
    peak = peak_flops(device)
    warmup, n = 3, max(1, args.max_iters if "max_iters" in args.typed else 10)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + n):
        if i == warmup:
            sync()
            t0 = time.time()
        run.step = i
        forward_backward(run)
        optimizer_step(run)
    sync()
    tok_s = n * run.tokens_per_step / (time.time() - t0)
    achieved = tok_s * flops_tok
    mfu = f"{100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "n/a (no peak known)"
    print(f"bench {args.preset} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}: "
          f"{n} steps of {run.tokens_per_step:,} tokens | {tok_s:,.0f} tokens/s | {flops_tok / 1e6:.1f} MFLOP/token | "
          f"{achieved / 1e12:.3f} TFLOP/s | MFU {mfu}")
    return 0


# -- setup: everything that can fail because of user input, before training ----------------------------------
def setup(ns: argparse.Namespace) -> Run:
    """Options, config, device, corpus, model, optimizer and (on --resume) their saved state.
    Raises ValueError/FileNotFoundError with one line for anything the user can fix; writes nothing before the
    out_dir lock is taken, and nothing at all when it refuses."""
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
    check_args(args, cfg)
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
    if args.pp > 1:  # this rank's pipeline stages, and on them experts over ep, FSDP2 over dp (parallel.py)
        model = parallel.Pipeline(model, args.pp_schedule, layout, args.microbatches,
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
    if args.compile:
        try:
            run.fwd = torch.compile(model)
        except Exception as e:  # e.g. a Python version that torch.compile does not support yet
            raise ValueError(f"--compile is unavailable here ({type(e).__name__}: {first_line(e)})") from None
    return run


def resume_meta(path: str) -> dict:
    """Under torchrun, --resume reads the folder's small meta file first (options, config, step, RNG); the
    shards follow once the model is built and parallelized."""
    if not os.path.isdir(path) and not os.path.isdir(f"{path}.old"):
        single = os.path.join(os.path.dirname(path), "ckpt.pt")
        hint = f" ({single} is a one-process run: continue it with python train.py --resume)" \
            if os.path.exists(single) else ""
        raise FileNotFoundError(f"--resume: no distributed checkpoint at {path}{hint}")
    try:
        meta = read_meta(path)
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
    """What every FP8 layer keeps of its input for Wgrad (fp8.FP8Linear.act_cache), and the routed experts of
    their SwiGLU inputs (moe.Experts.act_cache): one mode for all, or "report": E4M3 tiles everywhere and E5M6
    for the input of W^O, the Linear after attention (report §3.3.3)."""
    for name, m in model.named_modules():
        if hasattr(m, "act_cache"):
            m.act_cache = ("e5m6" if name.endswith("attn.wo") else "fp8") if mode == "report" else mode


def linear_class(fp8: bool, device: torch.device):
    """nn.Linear, or fp8.FP8Linear (imported only when asked for, and only where its kernel runs)."""
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
    return fp8.FP8Linear


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


# -- options --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None here so that we know which ones the user typed (they win over a checkpoint)."""
    d = TRAIN_DEFAULTS
    p = argparse.ArgumentParser(description="Train a DeepSeek-V3-style model (see the docstring of train.py).",
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
    t = p.add_argument_group("many processes (start with torchrun --nproc_per_node N train.py ...; README)")
    t.add_argument("--ep", type=int, help="expert parallelism: the routed experts split over ep ranks; data "
                                          "parallelism over dp = N / (ep·pp) ranks is implied (default: 1)")
    t.add_argument("--pp", type=int, help="pipeline parallelism: ranks a micro-batch flows through (default: 1)")
    t.add_argument("--pp_schedule", choices=("1f1b", "dualpipev"),
                   help="with --pp: 1f1b (pp stages) or dualpipev (2·pp stages in a V, embedding and head on rank 0; "
                        "dualpipe.py) (default: 1f1b)")
    t.add_argument("--microbatches", type=int, help="with --pp: micro-batches of --batch_size sequences per step, "
                                                    "in place of --grad_accum (default: the stage count)")
    t.add_argument("--plan", action="store_true", default=None,
                   help="print the on-paper plan of --preset on --gpus GPUs with --ep, --pp, --pp_schedule and exit "
                        "(plan.py: memory, all-to-all, bubble, step time, MFU; the report's batch)")
    t.add_argument("--gpus", type=int, help="with --plan: GPUs in all (default: 2048)")
    t.add_argument("--gpus_per_node", type=int, help="with --plan: GPUs a node (default: 8)")
    t.add_argument("--dist_timeout", type=float,
                   help="seconds a rank waits for the others in a collective before the job ends with an error "
                        "(a dead or stuck rank; default: 600)")
    g = p.add_argument_group("training (defaults for the tiny preset)", "--preset small changes these: "
                             + ", ".join(f"{k}={v}" for k, v in PRESET_TRAIN["small"].items()))
    helps = dict(batch_size="sequences per micro-batch", block_size="tokens per sequence (<= max_seq_len)",
                 grad_accum="micro-batches per optimizer step", lr="peak learning rate", min_lr="final learning rate",
                 warmup_iters="linear warmup steps", lr_decay_iters="step where the cosine reaches min_lr",
                 ckpt_interval="steps between checkpoints",
                 weight_decay="AdamW decay (matrices only)", beta1="AdamW β1", beta2="AdamW β2",
                 grad_clip="max global gradient norm (0: off)", mtp_lambda="λ, weight of the MTP loss",
                 balance_alpha="α, weight of the sequence-wise balance loss",
                 bias_gamma="γ, speed of the aux-loss-free gate-bias update",
                 eval_interval="steps between evaluations",
                 eval_iters="validation batches per evaluation", log_interval="steps between log lines")
    derived = dict(warmup_iters="max_iters // 10", lr_decay_iters="max_iters", ckpt_interval="eval_interval")
    for name, text in helps.items():
        g.add_argument(f"--{name}", type=int if name in derived else type(d[name]),
                       help=f"{text} (default: {derived.get(name, d[name])})")
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
            "overwrite": False, "compile": False, "bench": False, "ep": 1, "pp": 1, "dist_timeout": 600.0,
            "pp_schedule": "1f1b", "microbatches": None, "plan": False, "gpus": None, "gpus_per_node": None}
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


def check_args(args, cfg: ModelConfig) -> None:
    def need(ok, name, rule):
        if not ok:
            raise ValueError(f"--{name}={getattr(args, name)!r}: {rule}")

    for name in ("batch_size", "block_size", "grad_accum", "eval_interval", "ckpt_interval", "eval_iters",
                 "log_interval"):
        need(getattr(args, name) >= 1, name, "must be >= 1")
    for name in ("max_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip", "mtp_lambda",
                 "balance_alpha", "bias_gamma"):
        need(getattr(args, name) >= 0, name, "must be >= 0")
    need(args.lr > 0, "lr", "must be > 0")
    need(args.lr_decay_iters >= args.warmup_iters, "lr_decay_iters", "must be >= warmup_iters")
    need(args.block_size <= cfg.max_seq_len, "block_size", f"must be <= max_seq_len ({cfg.max_seq_len})")
    need(args.block_size > cfg.n_mtp, "block_size", f"must be > n_mtp ({cfg.n_mtp}): MTP predicts further ahead")
    need(args.fp8 or args.fp8_act_cache == "bf16", "fp8_act_cache", "needs --fp8")
    need(args.ep >= 1, "ep", "must be >= 1")
    need(args.pp >= 1, "pp", "must be >= 1")
    if args.pp > 1:  # equal stages, enough micro-batches for the schedule (parallel.check_pipeline)
        need(args.grad_accum == 1, "grad_accum", "with --pp the pipeline's --microbatches take its place")
        parallel.check_pipeline(cfg.n_layers, args.pp_schedule, args.pp, args.microbatches)
    else:
        need(args.microbatches == 1, "microbatches", "needs --pp > 1 (one process: --grad_accum)")
    need(args.pp > 1 or "pp_schedule" not in args.typed, "pp_schedule", "needs --pp > 1")
    for name in ("gpus", "gpus_per_node"):
        need(getattr(args, name) is None, name, "goes with --plan")
    need(args.dist_timeout > 0, "dist_timeout", "must be > 0")
    need(not (args.compile and parallel.under_torchrun()), "compile", "is not supported under torchrun yet")


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun the same error comes from every rank: say it once
    if ns.plan:  # on paper only: nothing is allocated, no process group
        return plan_run(ns)
    try:
        run = setup(ns)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        parallel.teardown()
        return 2
    except parallel.PeerFailed:  # rank 0 has said why
        parallel.teardown()
        return 2
    except KeyboardInterrupt:  # during setup there is nothing to save yet
        print("interrupted before training started", file=sys.stderr)
        parallel.teardown()
        return 130
    try:
        return train(run)
    finally:
        if run.lock is not None:  # the process may go on (a test, a notebook): let the folder go now
            run.lock.close()
        parallel.teardown()


def plan_run(ns: argparse.Namespace) -> int:
    """--plan: plan.py's estimate for the layout given (the report's batch: 15360 sequences of 4096 tokens)."""
    import plan
    preset = ns.preset or "v3-671b"
    overrides = {f.name: getattr(ns, f.name) for f in fields(ModelConfig) if getattr(ns, f.name) is not None}
    if overrides:
        print("error: --plan plans a preset as it is (give --preset only, no model fields)", file=sys.stderr)
        return 2
    return plan.run(preset, ns.gpus or plan.REPORT["gpus"], ns.gpus_per_node or plan.REPORT["gpus_per_node"],
                    ns.ep or 1, ns.pp or 1, ns.pp_schedule or "1f1b", 15360, 4096, 1, plan.Assumptions())


if __name__ == "__main__":
    sys.exit(main())
