"""Where the time of one training step goes: tokens/s as `train.py --bench` measures it, then a torch.profiler
table of one more step (top ops by GPU time) and the step's idle and host-sync share.

    python profile_step.py --preset small [--fp8] [any train.py option]     (CUDA; on a CPU: a check that it runs)

It runs train.py's own step functions (forward_backward, optimizer_step) on the same batches, with the model
torch.compiled as train.py compiles it (by default on one CUDA process; --no-compile: eager); only
the model is built directly on the GPU (train_setup.py builds it on the CPU and moves it, which takes long for big
presets).
Idle share = 1 − (time some kernel runs) / (step wall time): time the GPU waits for the host (Python, kernel
launches, host syncs). Host syncs are the calls that make the CPU wait for the GPU (.item(), .tolist(),
.cpu(), torch.cuda.synchronize): each one drains the launch queue, so the kernels after it start late.
"""
import sys
import time

import torch

import data
import train
import train_setup
from checkpoint import pick_device
from model import Transformer, count_params, train_flops_per_token

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "cudaMemcpyAsync")


def busy_time_us(events) -> float:
    """Union of the GPU kernels' time intervals (µs): time during which at least one kernel runs. User annotations
    on the GPU's timeline (torch.compile's "## Call CompiledFxGraph ..." ranges, the optimizer's step) span their
    kernels and the gaps between them: not counted."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            busy += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return busy + ((cur_e - cur_s) if cur_e is not None else 0.0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    profile = "--no_profile" not in argv
    argv = [a for a in argv if a != "--no_profile"]
    try:
        p = train_setup.build_parser()  # train.py's options, plus --no_profile (taken out of argv above)
        p.description = "Where the time of one training step goes: tokens/s, then a profiler table of one step."
        p.epilog = "--no_profile: measure tokens/s only, without the profiler table"
        args = train_setup.resolve_args(p.parse_args(argv))
        cfg = train_setup.resolve_config(args)
        train_setup.check_args(args, cfg)
        device = pick_device(args.device)
        train_setup.check_memory(cfg, args, device)
        linear = train_setup.linear_class(args.fp8, device)
        corpus = data.load_corpus(args.data, cfg.vocab_size, args.cache_dir, log=print)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Transformer(cfg, linear, train_setup.expert_kernels(args.fp8))
    train_setup.set_act_cache(model, args.fp8_act_cache)
    opt = train_setup.make_optimizer(model, args, device)
    try:
        fwd = train_setup.compile_model(model, args, device)  # as train.py: by default on one CUDA process
    except ValueError as e:  # e.g. --cuda_graphs on a CPU
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = train_setup.Run(args, cfg, device, corpus, model, fwd, opt, torch.Generator().manual_seed(args.seed), 0,
                    ckpt_path="", resumed=False)  # the run state, without an out_dir (bench-like)
    tokens = run.tokens_per_step
    flops_tok = train_flops_per_token(cfg, args.block_size, with_mtp=cfg.n_mtp > 0)
    peak = train.peak_flops(device)

    def step(i):
        run.step = i
        m = train.first_step(run, i) if i < train.compiling_steps(args) else train.forward_backward(run)
        train.optimizer_step(run)
        return m

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # (CPU: only a check that the script runs)
    warmup, n = 3, max(1, args.max_iters if "max_iters" in args.typed else 10)
    try:
        for i in range(warmup):
            step(i)
    except train.CompileFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sync()
    t0 = time.time()
    losses = []  # device tensors: reading them inside the timed loop would wait for the GPU
    for i in range(n):
        m = step(warmup + i)
        losses.append(m["loss"])
    sync()
    dt = (time.time() - t0) / n
    tail = max(1, n // 5)  # the last fifth of the timed steps: a training-loss figure to compare modes on
    tail_loss = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in losses[-tail:]]).mean().item()
    mode = ("fp8" if args.fp8 else "bf16" if cuda else "fp32") + (" compile" if args.compile else "") + \
        (" cuda_graphs" if args.cuda_graphs else "")
    n_par = count_params(cfg)
    mfu = 100 * tokens / dt * flops_tok / peak if peak else float("nan")
    print(f"RESULT {args.preset} {mode}: {n} steps of {tokens:,} tokens | "
          f"{tokens / dt:,.0f} tokens/s | {1e3 * dt:.1f} ms/step | MFU {mfu:.1f}% | loss {m['loss']:.4f}, "
          f"mean of the last {tail} {tail_loss:.4f} | "
          f"params {n_par['total'] / 1e9:.2f}B + MTP {n_par['mtp'] / 1e9:.2f}B | "
          f"peak mem {torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.1f} GiB")
    if not profile:
        return 0
    from torch.profiler import profile as prof_ctx, ProfilerActivity
    with prof_ctx(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        sync()
        t0 = time.time()
        step(warmup + n)
        sync()
        wall_us = (time.time() - t0) * 1e6
    events = prof.events()
    busy = busy_time_us(events)
    avg = prof.key_averages()
    syncs = {k: (e.count, e.cpu_time_total / 1e3) for e in avg for k in SYNC_OPS if e.key == k}
    print(f"PROFILE {args.preset} {mode}: step {wall_us / 1e3:.1f} ms (profiled), GPU busy {busy / 1e3:.1f} ms, "
          f"idle {100 * (1 - busy / wall_us):.1f}% | host syncs: "
          + ", ".join(f"{k} ×{c} ({ms:.1f} ms)" for k, (c, ms) in syncs.items()))
    print(avg.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
