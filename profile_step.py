"""Where the time of one training step goes: tokens/s as `train.py --bench` measures it, then a torch.profiler
table of one more step (top ops by GPU time) and the step's idle and host-sync share.

    python profile_step.py --preset small [--fp8] [--no_profile | --cuda_only] [--rows N] [any train.py option]
    (CUDA; on a CPU: a check that it runs)

It runs train.py's own step functions (forward_backward, optimizer_step) on the same batches, with the model
torch.compiled as train.py compiles it (by default on one CUDA process; --no-compile: eager); only
the model is built directly on the GPU (train_setup.py builds it on the CPU and moves it, which takes long for big
presets).
Idle share = 1 − (time some kernel runs) / (step wall time): time the GPU waits for the host (Python, kernel
launches, host syncs). Host syncs are the calls that make the CPU wait for the GPU (.item(), .tolist(),
.cpu(), torch.cuda.synchronize): each one drains the launch queue, so the kernels after it start late.
The gaps between kernels (from the first kernel's start to the last one's end) say the same from the GPU's side:
many short gaps are launch overhead, a few long ones a host that falls behind.
--cuda_only records the GPU's activity alone: recording every host-side op slows the host, and in a step the
host keeps up with only barely, that shows as idle GPU time the unprofiled step does not have (no host syncs
are counted then).
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


def kernel_spans(events) -> list:
    """(start, end) in µs of every GPU kernel (and GPU memcpy / memset), sorted. User annotations on the GPU's
    timeline (torch.compile's "## Call CompiledFxGraph ..." ranges, the optimizer's step) span their kernels and
    the gaps between them: left out."""
    return sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))


def timeline(events, short_us: float = 5.0) -> dict:
    """The GPU's timeline: kernels (count), busy (µs during which at least one kernel runs: the union of their
    intervals), gaps (µs between them, from the first start to the last end), short_gaps / short_gap_us (the gaps
    under short_us: their count and time)."""
    spans = kernel_spans(events)
    busy = gaps = short_gap_us = 0.0
    short_gaps, cur_s, cur_e = 0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:  # a new busy interval; the one before it ended at cur_e
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps += s - cur_e
                if s - cur_e < short_us:
                    short_gaps, short_gap_us = short_gaps + 1, short_gap_us + (s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += (cur_e - cur_s) if cur_e is not None else 0.0
    return dict(kernels=len(spans), busy=busy, gaps=gaps, short_gaps=short_gaps, short_gap_us=short_gap_us)


def take_rows(argv: list) -> tuple:
    """`--rows N` (the profiler table's length, 30 unless given) taken out of argv → (N, the rest)."""
    if "--rows" not in argv:
        return 30, argv
    i = argv.index("--rows")
    value = argv[i + 1] if i + 1 < len(argv) else ""
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--rows must be a positive integer, got {value!r}")
    return int(value), argv[:i] + argv[i + 2:]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    profile, cuda_only = "--no_profile" not in argv, "--cuda_only" in argv
    argv = [a for a in argv if a not in ("--no_profile", "--cuda_only")]
    try:
        rows, argv = take_rows(argv)
        p = train_setup.build_parser()  # train.py's options, plus --no_profile, --cuda_only, --rows (taken out above)
        p.description = "Where the time of one training step goes: tokens/s, then a profiler table of one step."
        p.epilog = ("--no_profile: measure tokens/s only, without the profiler table; --cuda_only: profile the "
                    "GPU's activity alone (the host runs at its unprofiled pace; host syncs are not counted); "
                    "--rows N: the table's length (30)")
        args = train_setup.resolve_args(p.parse_args(argv))
        cfg = train_setup.resolve_config(args)
        train_setup.check_args(args, cfg)
        if args.batch_ramp_iters is not None:
            raise ValueError(f"--batch_ramp_iters={args.batch_ramp_iters}: this script times full steps: leave the "
                             f"ramp out")
        device = pick_device(args.device)
        if cuda_only and device.type != "cuda":
            raise ValueError(f"--cuda_only needs a CUDA device (here: {device.type})")
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
    activities = [ProfilerActivity.CUDA] if cuda_only else [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with prof_ctx(activities=activities) as prof:
        sync()
        t0 = time.time()
        step(warmup + n)
        sync()
        wall_us = (time.time() - t0) * 1e6
    gpu = timeline(prof.events())
    avg = prof.key_averages()
    syncs = {k: (e.count, e.cpu_time_total / 1e3) for e in avg for k in SYNC_OPS if e.key == k}
    print(f"PROFILE {args.preset} {mode}: step {wall_us / 1e3:.1f} ms (profiled), GPU busy {gpu['busy'] / 1e3:.1f} "
          f"ms, idle {100 * (1 - gpu['busy'] / wall_us):.1f}% | {gpu['kernels']:,} kernels and copies, "
          f"{gpu['gaps'] / 1e3:.1f} ms of gaps between them ({gpu['short_gap_us'] / 1e3:.1f} ms in "
          f"{gpu['short_gaps']:,} gaps under 5 µs) | host syncs: "
          + ("not recorded (--cuda_only)" if cuda_only else
             ", ".join(f"{k} ×{c} ({ms:.1f} ms)" for k, (c, ms) in syncs.items())))
    print(avg.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
