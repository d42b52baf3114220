"""Train a DeepSeek-V3-style model: `python train.py` (tiny preset on the Python standard library, a few minutes
on a laptop CPU), `python train.py --preset small` on a GPU, `python train.py --help` for every option.

One optimizer step (report §2 and §4, training details):
    loss = L_main + λ·L_MTP + α·Σ_layers L_balance        (λ = --mtp_lambda, α = --balance_alpha)
    backward over --grad_accum micro-batches, clip the global gradient norm to 1.0, AdamW (β = 0.9/0.95,
    weight decay 0.1 on matrices only; --bf16_moments keeps its moments in bf16 as the report does, §3.3.3),
    then the aux-loss-free update of every MoE gate bias:
    b_i += γ·sign(mean load − load_i)                     (γ = --bias_gamma; bias buffers never see a gradient)
Learning rate: linear warmup to --lr over --warmup_iters steps, held there until --lr_hold_iters (the report's
plateau; default: no plateau), then cosine to --min_lr at --lr_decay_iters, and --final_lr from --final_lr_iters on
(the report's last step; default: none). Unless given, warmup and decay follow --max_iters: warmup over the first
tenth of the steps, decay ending at the last step (so the default 1000 steps warm up for 100). λ and γ switch once if
asked: λ to --mtp_lambda_after at --mtp_lambda_iters, γ to 0 at --bias_gamma_iters (the report's 0.3 → 0.1 and
0.001 → 0; README: the report's schedule scaled to a run). The batch can ramp up: --batch_ramp_iters steps growing
from --batch_ramp_start micro-batches to --grad_accum (train_setup.Run.micro_batches_at). The resolved values are
saved in the checkpoint: a resumed run keeps its schedule even when it is given a larger --max_iters.

The run folder (--out_dir, default out/) holds ckpt.pt, log.jsonl (format: see "the log" below) and a lock file: a
second run on the same folder refuses to start, and so does a fresh run into a folder that holds a run, unless given
--resume (continue it) or --overwrite (replace it; the old files stay intact until the new run's first checkpoint is
complete, and an --overwrite run stopped before that saves nothing). Checkpoints (checkpoint.py: written to a
temporary file, flushed to the disk and then renamed, so neither a crash nor a power loss leaves half a file; every
--ckpt_interval steps and at the end) hold the model (MoE bias buffers included), the optimizer, the step, every RNG
state (the data position is the state of the data generator), the config, the training options, the tokenizer name,
the SHA-256 of the token streams (a resume over other tokens says so) and the sums of the steps not yet logged.
A run stopped part way (by Ctrl-C, SIGTERM or kill -9, or by a smaller --max_iters with the schedule given
explicitly) and continued with `--resume` ends with the weights of a straight run, bit for bit, given the same
thread count, and after Ctrl-C, SIGTERM or kill -9 with its log records too. (A run that ended at a smaller
--max_iters logged that last step and evaluated there, records a straight run does not have; the next train record
averages the steps after it.) On resume, options not given on the command line come from the checkpoint. Ctrl-C and
SIGTERM (what `timeout` and cluster schedulers send) save the last finished step and exit with 128 + the signal
number (130, 143); a non-finite loss, a full disk or an unwritable folder stop with one line and leave the last good
checkpoint in place.

Many processes: `torchrun --nproc_per_node N train.py --ep E ...` runs the same loop on N ranks (parallel.py:
the experts of each MoE layer split over E ranks, FSDP2 over the N data-parallel ranks, each drawing the same
global batch of N·batch_size sequences and keeping its slice). Rank 0 prints and logs; the checkpoint is the
folder out_dir/ckpt.dcp, written by all ranks (checkpoint.py); Ctrl-C and SIGTERM stop all ranks after the same
step. With --pp P the blocks are cut into pipeline stages (pipeline.Pipeline: torch's 1F1B or DualPipeV schedule)
and --microbatches take the place of --grad_accum. `--plan` prints plan.py's estimate of a full-scale layout and
exits. README, "Many processes".

Precision: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU and MPS; `--fp8` swaps the projections for
fp8_linear.FP8Linear (Hopper GPUs). On one CUDA process the model is torch.compiled unless --no-compile
(train_setup.default_compile): the first step compiles, and if compiling fails there the run goes on uncompiled
from the same state (first_step); a --compile typed on the command line stops instead. `--cuda_graphs` replays
the compiled step as CUDA graphs (train_setup.compile_model; forward_backward marks each micro-batch), recorded at
the second step, which first_step covers alike. `--bench` times a few steps and prints tokens/s and MFU (FLOPs per
token: model.train_flops_per_token, whose counting rule is written beside it).

The file reads top to bottom: the training loop, its log, one optimizer step and evaluation, the benchmark, main.
The options, their defaults and the run's state (Run), and setup (everything that can fail because of user input,
done before training starts: the run folder, memory, device, corpus, model, optimizer) are in train_setup.py.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import fields

# Ctrl-C while torch loads (about a second): the line and exit code of setup's, said once under torchrun. Only where
# Ctrl-C has its usual meaning (a run started in the background may ignore it); the handler found is put back below.
def _interrupted_while_importing(*_):
    if os.environ.get("RANK", "0") == "0":
        print("interrupted before training started", file=sys.stderr)
    os._exit(130)


_SIGINT_AT_START = signal.getsignal(signal.SIGINT)
if __name__ == "__main__" and _SIGINT_AT_START is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_importing)

import torch
import torch.nn as nn
from tqdm import tqdm

import data
import parallel
from checkpoint import (Interrupted, rng_state, save_checkpoint, save_distributed, set_rng_state, signals_deferred,
                        stop_on_sigterm)
from config import ModelConfig
from model import count_params, train_flops_per_token
from moe import max_violation
from train_setup import LOG, Run, build_parser, first_line, lr_hold_step, setup

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12}


class Diverged(RuntimeError):
    pass


class CompileFailed(RuntimeError):
    """A --compile typed on the command line failed at the first step (train() stops with one line)."""


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
          f"{'bf16 autocast' if run.device.type == 'cuda' else 'fp32'}{', fp8' if args.fp8 else ''}"
          f"{', torch.compile (the first step compiles)' if args.compile else ''} | "
          f"{run.tokens_per_step:,} tokens/step{ramp_note(run)} | {corpus.tokenizer.name}")
    print(f"unigram baseline on val: {baseline:.4f} nats/token")
    if run.layout.distributed:
        print(f"layout: {run.layout.describe()}")
    if args.bench:
        try:
            return bench(run)
        except CompileFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # Both stdout and stderr on a terminal: a progress bar; otherwise (a file, tee, a batch job) a plain line
    # every log_interval steps.
    interactive = sys.stdout.isatty() and sys.stderr.isatty()
    boundary, ev, start, log, bar = run.snapshot(), None, run.step, None, None
    try:
        log = open_log(run)  # inside: Ctrl-C here saves step `start` like any other, an unwritable log is one line
        bar = tqdm(total=args.max_iters, initial=run.step, unit="step", dynamic_ncols=True, disable=not interactive)
        with loop_signals(run):
            if run.resumed and 0 < run.step and run.is_eval_step() and missed_eval(run):  # stopped before its eval
                ev = evaluate_and_log(run, log)
            if run.step >= args.max_iters:
                print(f"checkpoint is at step {run.step} >= --max_iters {args.max_iters}: nothing to do")
                return 0
            t_last, timed = time.time(), 0  # throughput: tokens trained since t_last
            while run.step < args.max_iters:
                k = run.step - start  # the first steps of this process compile (and record the CUDA graphs)
                metrics = first_step(run, k) if k < compiling_steps(args) else forward_backward(run)
                with step_signals(run):  # the step, its log record and the snapshot move together
                    optimizer_step(run)
                    timed += run.tokens_at(run.step)
                    run.step += 1
                    for k, v in metrics.items():
                        run.log_sums[k] = run.log_sums.get(k, 0.0) + v
                    run.log_count += 1
                    if run.step % args.log_interval == 0 or run.step == args.max_iters:
                        rec = train_record(run, timed / (time.time() - t_last))
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
        close(bar)
        signum = getattr(e, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        # an --overwrite run before its first checkpoint: the old run is worth more (rank 0 holds the log's name;
        # all ranks decide together, since a distributed save needs every rank)
        if parallel.any_rank(run.log_name != LOG, run.layout):
            close(log)
            if run.layout.is_main and os.path.exists(run.path(run.log_name)):
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
        close(bar)
        report(run, f"error: {e}; {kept(run)}")
        return 1
    except OSError as e:  # writing the log: the folder vanished, the disk is full
        close(bar)
        print(f"error: cannot write to {args.out_dir} ({e.strerror or e}); {kept(run)}", file=sys.stderr)
        return 1
    except CompileFailed as e:  # torch.compile compiles at the first call: a missing compiler or backend shows up here
        close(bar)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close(log)
    bar.close()
    val = f"val loss {ev['val_main']:.4f} vs unigram baseline {baseline:.4f} nats/token; " if ev else ""
    print(f"done: step {run.step}, {val}checkpoint {run.ckpt_path}")
    return 0


def ramp_note(run: Run) -> str:
    """For the run's first line: " (from N tokens over K steps)" with a batch-size ramp, else nothing."""
    a = run.args
    return "" if not a.batch_ramp_iters else f" (from {run.tokens_at(0):,} over {a.batch_ramp_iters} steps)"


def close(f) -> None:
    """Close the log or the progress bar if train() got as far as opening it."""
    if f is not None:
        f.close()


def compiling_steps(args) -> int:
    """How many first steps of a process can fail because of the compiler: the first (torch.compile compiles at
    the first call), and with --cuda_graphs the second too (the graphs are recorded at the second call)."""
    return 2 if args.cuda_graphs else 1


def first_step(run: Run, k: int = 0) -> dict:
    """forward_backward of a run's first step (k = 0), where torch.compile compiles, or of the second (k = 1), where
    --cuda_graphs records its graphs. When that fails and --compile was not typed (train_setup.default_compile
    turned it on), the step runs again uncompiled from the state it started from (data position, MoE loads,
    gradients), so the run goes on as --no-compile would from there; a typed --compile raises CompileFailed
    (train() stops with one line). Out of memory and a diverged loss are no compile failures: they go on up as
    they are."""
    rng = rng_state(run.gen)  # the data position (and torch's generators) before the step
    try:
        return forward_backward(run)
    except (Diverged, torch.OutOfMemoryError):  # not the compiler's failures (the eager step needs more memory)
        raise
    except Exception as e:
        if not run.args.compile:
            raise
        why = f"{type(e).__name__}: {first_line(e)}"
        at = "the first step" if k == 0 else "the second step, where the CUDA graphs are recorded"
        if "compile" in run.args.typed:
            raise CompileFailed(f"--compile failed at {at} ({why}); run with --no-compile") from e
        print(f"note: torch.compile failed at {at} ({why}); training uncompiled (--no-compile skips the attempt)",
              file=sys.stderr)
    run.fwd, run.args.compile = run.model, False
    set_rng_state(rng, run.gen)
    run.opt.zero_grad(set_to_none=True)
    for moe in run.model.moe_layers():
        moe.reset_load()
    return forward_backward(run)


def save(run: Run, snapshot: dict) -> None:
    """Write the checkpoint; the first one of an --overwrite run then puts its log in place of the old one.
    Under torchrun every rank writes its shards of the live model and optimizer (they have not changed since
    the snapshot was taken: both happen between the same two optimizer steps). Ctrl-C and SIGTERM wait until the
    checkpoint and the log rename are both done, except inside the training loop under torchrun, where they are
    only noted (loop_signals): a rank that raised right after its save would leave the loop alone, and the others,
    gone on to the next step, would wait for it in a collective that never comes."""
    with contextlib.nullcontext() if run.stop is not None else signals_deferred():
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
            try:
                yield
            finally:
                run.stop = None  # out of the loop (e.g. saving after a stop): signals wait again (train.save)
    return noted()


def step_signals(run: Run):
    """Hold signals during the step and its snapshot (under torchrun they are only noted anyway)."""
    return contextlib.nullcontext() if run.layout.distributed else signals_deferred()


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
    """Keep the records up to `step`; a half-written last line goes too, and so does a damaged line elsewhere (alone:
    the records after it stay). Rewritten atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            at = rec.get("step", 0) if isinstance(rec, dict) else None
            if not line.endswith("\n") or not isinstance(at, (int, float)):
                continue
            if at > step:
                break
            keep.append(line)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def missed_eval(run: Run) -> bool:
    """Whether the log lacks the evaluation at run.step. Rank 0 reads the log (which it alone writes, and has
    just cut back) and tells the others: every rank must take the same branch, evaluation being collective."""
    return parallel.any_rank(run.layout.is_main and not logged_eval(run), run.layout)


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
def fp8_micro_batches(run: Run, n_micro: int):
    """With --fp8, n_micro > 1 micro-batches and one process, the block around one step's micro-batches: every FP8
    weight quantized once for all of them, not once per micro-batch (fp8_linear.weights_quantized_once; the same bits,
    for 2 bytes per weight of memory held through the step), and its gradient summed by its Wgrad GEMM in place,
    not by autograd's extra pass per micro-batch (fp8_linear.grads_accumulated_in_wgrad; the same sums).
    Otherwise nothing (one micro-batch quantizes each weight once and has no sum to make)."""
    if not run.args.fp8 or n_micro == 1 or run.layout.distributed:
        return contextlib.nullcontext()
    return _fp8_step_block(run.model)


@contextlib.contextmanager
def _fp8_step_block(model):
    import fp8_linear
    with fp8_linear.weights_quantized_once(model), fp8_linear.grads_accumulated_in_wgrad(model):
        yield


def forward_backward(run: Run) -> dict:
    """Gradients of one optimizer step, accumulated over its micro-batches (--grad_accum, fewer on the batch-size
    ramp); returns the mean losses."""
    args, n_micro = run.args, run.micro_batches_at(run.step)
    lr = lr_at(run.step, args)
    for group in run.opt.param_groups:
        group["lr"] = lr
    sums = {k: torch.zeros((), device=run.device) for k in ("loss", "main", "mtp", "balance")}
    if run.layout.pp > 1:  # one schedule step runs all --microbatches forward and backward (pipeline.Pipeline)
        # M × (B, T), drawn as one process draws them for --grad_accum M
        xs, ys = zip(*(run.batch("train", run.gen) for _ in range(args.microbatches)))
        run.model.set_mtp_lambda(mtp_lambda_at(run.step, args))  # the last stage makes the loss
        with run.autocast:
            losses = run.model.train_step(torch.cat(xs), torch.cat(ys))
        losses["loss"] = total_loss(losses, args, run.step)
        sums = {k: losses[k].float().to(run.device) for k in sums}
    else:
        if args.cuda_graphs and n_micro > 1:
            # With no .grad yet, autograd keeps the first micro-batch's gradient tensor itself as .grad; replayed as
            # a CUDA graph, that tensor lives in the graphs' memory pool, which the next micro-batch overwrites.
            # Zeros first: every micro-batch's gradient is added into .grad in place.
            for p in run.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        with fp8_micro_batches(run, n_micro):
            for micro in range(n_micro):
                x, y = run.batch("train", run.gen)  # (B, T) each
                parallel.set_gradient_sync(run.model, micro == n_micro - 1)  # under FSDP: one sync per step
                if args.cuda_graphs:  # the graphs' outputs of the last micro-batch are read (sums) and dead now
                    torch.compiler.cudagraph_mark_step_begin()
                with run.autocast:
                    _, losses = run.fwd(x, y)
                loss = total_loss(losses, args, run.step)
                (loss / n_micro).backward()
                losses["loss"] = loss
                for k in sums:
                    sums[k] += losses[k].detach().float() / n_micro
    clip = args.grad_clip if args.grad_clip > 0 else float("inf")  # inf: measure the norm, never clip
    if run.layout.pp > 1:
        sums = parallel.mean_over_dp(sums, run.layout)
        sums["grad_norm"] = run.model.clip_grad_norm(clip)
    elif run.layout.distributed:  # losses: means over the dp ranks; the norm over every rank's gradient shards
        sums = parallel.mean_over_dp(sums, run.layout)
        sums["grad_norm"] = parallel.clip_grad_norm(list(run.model.parameters()), clip, run.layout)
    else:
        sums["grad_norm"] = clip_gradients(run.opt, list(run.model.parameters()), clip)
    out = {k: v.item() for k, v in sums.items()}
    if not all(math.isfinite(v) for v in out.values()):
        run.opt.zero_grad(set_to_none=True)
        raise Diverged(f"non-finite loss or gradient at step {run.step} (loss {out['loss']}, grad norm "
                       f"{out['grad_norm']}): stopped")
    return out


def fused_adamw(opt) -> bool:
    """Whether opt is torch's fused AdamW (CUDA here), whose kernel can divide the gradients by a factor."""
    return isinstance(opt, torch.optim.AdamW) and all(g["fused"] for g in opt.param_groups)


def clip_gradients(opt, params: list, clip: float) -> torch.Tensor:
    """Clip the global gradient norm (one process): g ← g · min(1, clip / (‖g‖ + 1e-6)), clip_grad_norm_'s rule;
    returns ‖g‖ before clipping. With torch's fused AdamW the multiplication is no pass of its own over every
    gradient: the optimizer's kernel divides each gradient by `opt.grad_scale` as it reads it (and writes the
    quotient back), the attribute through which torch's GradScaler hands its unscaling to a fused optimizer.
    Here it is the inverse factor max(1, (‖g‖ + 1e-6) / clip); optimizer_step clears it after the step. The
    result differs from the multiplication by a rounding of the factor (a test). One read of every gradient
    fewer (the kernel still writes them back) and no launches of their own: a `v3-layers` step on an H200 took
    1.2% less time (BENCHMARKS.md)."""
    if not fused_adamw(opt):
        return nn.utils.clip_grad_norm_(params, clip)
    norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    opt.grad_scale = ((norm + 1e-6) / clip).clamp(min=1.0).float()
    return norm


def optimizer_step(run: Run) -> None:
    run.opt.step()
    if fused_adamw(run.opt):
        run.opt.grad_scale = None                            # this step's clipping factor is used up
    run.opt.zero_grad(set_to_none=True)
    # b_i += γ·sign(mean load − load_i), the load over this step's tokens of all data-parallel ranks
    run.model.update_moe_bias(bias_gamma_at(run.step, run.args), run.layout.group("dp"))


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, the peak held until lr_hold_iters, cosine
    decay, then min_lr, and from final_lr_iters on (if given) final_lr."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    hold = lr_hold_step(args)
    if step < hold:
        return args.lr
    if step >= args.lr_decay_iters:
        return args.final_lr if args.final_lr_iters is not None and step >= args.final_lr_iters else args.min_lr
    ratio = (step - hold) / (args.lr_decay_iters - hold)  # in [0, 1)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def mtp_lambda_at(step: int, args) -> float:
    """λ of optimizer step `step`: --mtp_lambda, and from --mtp_lambda_iters on (if given) --mtp_lambda_after."""
    late = args.mtp_lambda_iters is not None and step >= args.mtp_lambda_iters
    return args.mtp_lambda_after if late else args.mtp_lambda


def bias_gamma_at(step: int, args) -> float:
    """γ of optimizer step `step`: --bias_gamma, and from --bias_gamma_iters on (if given) 0."""
    return 0.0 if args.bias_gamma_iters is not None and step >= args.bias_gamma_iters else args.bias_gamma


def total_loss(losses: dict, args, step: int) -> torch.Tensor:
    """The objective of optimizer step `step`: L_main + λ·L_MTP + α·Σ L_balance."""
    return losses["main"] + mtp_lambda_at(step, args) * losses["mtp"] + args.balance_alpha * losses["balance"]


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
            # the uncompiled model: evaluation is a few forwards, and it spares a second compilation (eval mode)
            losses = run.model.evaluate(x, y) if layout.pp > 1 else run.model(x, y)[1]
        for k in sums:
            sums[k] += losses[k[4:]].item() / args.eval_iters
        moes = run.model.moe_layers()
        layer_counts = [m.last_counts.cpu() for m in moes]
        counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
        if layout.ep > 1:  # summed over this rank's MoE layers; the mean over the model's layers comes below
            ranks += sum(float(m.last_ranks_per_token) for m in moes) / args.eval_iters
    run.model.train()
    if layout.distributed:  # every dp rank evaluated its slice of the same batches
        sums = {k: v.item() for k, v in parallel.mean_over_dp(sums, layout).items()}
        counts = parallel.sum_over_dp(counts, layout) if counts else counts
    sums["max_violation"] = max((max_violation(c) for c in counts), default=0.0) if counts else 0.0
    sums["max_violation"] = parallel.max_over_pp(sums["max_violation"], layout)  # each stage: its own layers
    if layout.ep > 1:  # node-limited routing: how many ep ranks a token's experts live on, on average over the
        # tokens (dp ranks) and the MoE layers (each pipeline stage holds its own)
        r = parallel.sum_over_pp(parallel.mean_over_dp({"sum": ranks, "layers": len(moes)}, layout), layout)
        sums["ranks_per_token"] = (r["sum"] / max(float(r["layers"]), 1.0)).item()
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
        first_step(run, i) if i < compiling_steps(args) else forward_backward(run)
        optimizer_step(run)
    sync()
    tok_s = n * run.tokens_per_step / (time.time() - t0)
    achieved = tok_s * flops_tok
    mfu = f"{100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else "n/a (no peak known)"
    print(f"bench {args.preset} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}: "
          f"{n} steps of {run.tokens_per_step:,} tokens | {tok_s:,.0f} tokens/s | {flops_tok / 1e6:.1f} MFLOP/token | "
          f"{achieved / 1e12:.3f} TFLOP/s | MFU {mfu}")
    return 0


# -- main: options and setup (train_setup.py), then the loop --------------------------------------------------
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
    except KeyboardInterrupt:  # during setup there is nothing to save yet (torchrun signals every rank: say it once)
        if rank0:
            print("interrupted before training started", file=sys.stderr)
        parallel.teardown()
        return 130
    try:
        return train(run)
    except KeyboardInterrupt:  # outside train()'s loop: --bench, the summary and baseline before it, the last lines
        if rank0:
            print("interrupted" + ("" if run.args.bench else f": {kept(run)}"), file=sys.stderr)
        return 130
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
    layout = {k: plan.REPORT[k] if getattr(ns, k) is None else getattr(ns, k)  # the report's, where not given
              for k in ("gpus", "gpus_per_node", "ep", "pp", "pp_schedule")}
    if ns.pp_schedule is None and layout["pp"] % 2:  # DualPipe needs an even pp: an odd one given runs 1F1B
        layout["pp_schedule"] = "1f1b"
    return plan.run(preset, layout["gpus"], layout["gpus_per_node"], layout["ep"], layout["pp"],
                    layout["pp_schedule"], 15360, 4096, 1, plan.Assumptions())


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _SIGINT_AT_START)  # from here on Ctrl-C does what it did before the imports
    sys.exit(main())
