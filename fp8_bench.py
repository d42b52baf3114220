"""Timing of fp8.py's kernels on a Hopper GPU: `python fp8_bench.py [--interleave] [--training] [--ladder]
[--sustained] [--quant] [--flush-l2]`.

The main table prints TFLOP/s per shape for fp8_gemm.cu's Fprop kernel, torch's bf16 matmul and cuBLAS's blockwise
FP8 (`F.scaled_mm`, BlockWise1x128 × BlockWise128x128), with each result's calc_diff against the bf16 product of
the unquantized inputs. `--interleave` times the kernel and cuBLAS again taking turns, so that clock drift hits
both alike; `--training` times the Wgrad and grouped-expert kernels next to the Fprop kernel, and the Wgrad sums
made in the epilogue against kernel + add_; `--ladder` the teaching kernels of fp8_teaching/ beside it;
`--sustained` runs the kernel and cuBLAS for seconds each with the SM clock and board power sampled, because FP8
GEMMs at these sizes run into the GPU's power limit and then the clock, not only the kernel, sets the rate;
`--quant` times fp8_quant.cu's activation quantizers in GB/s against a copy of the same input (they are
memory-bound: the copy is the rate to aim at). BENCHMARKS.md records the tables.
"""
import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from fp8 import (BLOCK, calc_diff, fp8_gemm, fp8_gemm_into, load_kernel, mmajor_scales, quantize_act, quantize_weight,
                 why_no_kernel)
from fp8_experts import fp8_gemm_kgrouped, fp8_gemm_kgrouped_into

SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
LARGE_SHAPES = [(4096, n, k) for n, k in SHAPES_NK] + [(8192, 8192, 8192)]  # the goal's shapes (M, N, K)


def _kernel_call(xq, xs_m, wq, ws, out):
    """One call of the Fprop kernel into out, the A scales already M-major (laid out outside the timing, as
    cuBLAS's are below)."""
    ext = load_kernel()
    return lambda: ext.gemm(xq, xs_m, wq, ws, out)


FLUSH_L2 = False  # set by --flush-l2: every timed call starts with a cold L2, as DeepGEMM times
_scratch = None


def _median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    global _scratch
    if FLUSH_L2 and _scratch is None:
        _scratch = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")   # 256 MiB > the 50 MiB L2
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if FLUSH_L2:
            _scratch.zero_()  # outside the timed region, which starts after it on the stream
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


def _vendor_blockwise(xq, xs, wq, ws):
    """cuBLAS blockwise FP8 through torch: returns (callable, name). Layouts per torch's ScaledBlas checks:
    A-scales (M, K/128) with strides (1, M); B = Wᵀ column-major; B-scales (round_up(K/128, 4), N/128)."""
    sa = xs.t().contiguous().t()                                          # (M, K/128), M-major
    sb = F.pad(ws, (0, -ws.shape[1] % 4)).t()                              # (Kb4, Nb), strides (1, Kb4)
    tries = [(lambda: torch._scaled_mm(xq, wq.t(), sa, sb, out_dtype=torch.bfloat16), "torch._scaled_mm")]
    if hasattr(F, "scaled_mm"):
        tries.insert(0, (lambda: F.scaled_mm(xq, wq.t(), sa, F.ScalingType.BlockWise1x128, sb,
                                             F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16),
                         "F.scaled_mm"))
    for fn, name in tries:
        try:
            fn()
            return fn, name
        except Exception as e:  # noqa: PERF203 - report the last failure
            err = e
    raise err


def _need_kernel():
    if load_kernel() is None:
        raise SystemExit(f"fp8_bench.py needs a Hopper GPU and the kernel: {why_no_kernel()}")


def bench():
    """The main table: the M = 4096 shapes, 8192³ and the M = 128 shapes; each kernel's calls in one block."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"# TFLOP/s = 2MNK / median time (CUDA events, 10 warm-ups, 50 reps, "
          f"{'L2 flushed before each call' if FLUSH_L2 else 'no L2 flush'}); "
          "(calc_diff vs bf16 x@w.T of the unquantized inputs)")
    print("| M | N | K | kernel | bf16 mm | vendor blockwise |")
    print("|---" * 6 + "|")
    vendor_name = "n/a"
    shapes = LARGE_SHAPES + [(128, n, k) for n, k in SHAPES_NK]
    for M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_act(x)
        wq, ws = quantize_weight(w)
        ref = x @ w.T
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        ms = _median_ms(_kernel_call(xq, mmajor_scales(xs), wq, ws, out))
        cells = [f"{2 * M * N * K / ms / 1e9:.0f} ({calc_diff(out, ref):.1e})"]
        ms = _median_ms(lambda: x @ w.T)
        cells.append(f"{2 * M * N * K / ms / 1e9:.0f}")
        try:
            fn, vendor_name = _vendor_blockwise(xq, xs, wq, ws)
            ms = _median_ms(fn)
            cells.append(f"{2 * M * N * K / ms / 1e9:.0f} ({calc_diff(fn(), ref):.1e})")
        except Exception as e:
            cells.append(f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
        print(f"| {M} | {N} | {K} | " + " | ".join(cells) + " |", flush=True)
        del x, w, xq, wq, ref
        torch.cuda.empty_cache()
    print(f"# vendor blockwise = {vendor_name} (BlockWise1x128 × BlockWise128x128)")


def take_turns(kernels, rounds: int, time_one) -> list:
    """`rounds` rounds in which every kernel is timed once by time_one(kernel), the order rotated by one each
    round (round r starts with kernel r mod n), so that over n rounds each kernel runs in every position.
    Returns one list of times per kernel, in round order."""
    per = [[] for _ in kernels]
    for r in range(rounds):
        for i in [(j + r) % len(kernels) for j in range(len(kernels))]:
            per[i].append(time_one(kernels[i]))
    return per


def bench_interleaved(rounds: int = 8, reps: int = 20):
    """The M = 4096 shapes and 8192³ again, with the kernel and cuBLAS blockwise taking turns: `rounds` rounds in
    each of which each runs `reps` timed calls, the order rotated by one each round. In `bench` each kernel runs
    all its calls in one block, in a fixed order (cuBLAS last, right after bf16 mm); at the power limit the SM
    clock depends on what ran just before, so a fixed order can favour one kernel. Here each runs in every
    position. Prints the median over rounds of each round's median call, the spread of the round medians, and
    kernel / vendor."""
    print(f"\n# interleaved: {rounds} rounds × {reps} calls per kernel, order rotated each round; TFLOP/s as median "
          "of round medians [min–max]")
    print("| M | N | K | kernel | vendor blockwise | kernel / vendor |")
    print("|---" * 6 + "|")
    for M, N, K in LARGE_SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_act(x)
        wq, ws = quantize_weight(w)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        kernels = [_kernel_call(xq, mmajor_scales(xs), wq, ws, out), _vendor_blockwise(xq, xs, wq, ws)[0]]
        for fn in kernels:
            _median_ms(fn, warmup=5, reps=5)
        per = take_turns(kernels, rounds, lambda fn: _median_ms(fn, warmup=2, reps=reps))
        rate = [[2 * M * N * K / ms / 1e9 for ms in p] for p in per]
        med = [statistics.median(r) for r in rate]
        cells = [f"{m:.0f} [{min(r):.0f}–{max(r):.0f}]" for m, r in zip(med, rate)]
        cells += [f"{m / med[-1]:.2f}" for m in med[:-1]]
        print(f"| {M} | {N} | {K} | " + " | ".join(cells) + " |", flush=True)
        del x, w, xq, wq
        torch.cuda.empty_cache()


def bench_training(experts=32, rows=2048):
    """The other training GEMMs next to the Fprop kernel on the same sizes: Wgrad (1×128 scales on both operands)
    and the routed experts' grouped GEMMs (`experts` segments of `rows` tokens: `small` preset-like at 16K tokens
    × top-4)."""
    ext = load_kernel()
    print("\n# training kernels vs the Fprop kernel on the same M, N, K (TFLOP/s)")
    print("| GEMM | M | N | K | kernel | Fprop kernel (128×128 B scales, one weight) |\n|---|---|---|---|---|---|")

    def rate(M, N, K, fn):
        return f"{2 * M * N * K / _median_ms(fn) / 1e9:.0f}"

    for M, N, K in [(1024, 1024, 16384), (2816, 1024, 16384), (7168, 2048, 4096), (4096, 7168, 8192)]:
        aq, a_s = quantize_act(torch.randn(M, K, device="cuda"))
        bq, b_s = quantize_act(torch.randn(N, K, device="cuda"))
        wq, ws = quantize_weight(torch.randn(N, K, device="cuda"))
        sbt = F.pad(b_s.t(), (0, -N % BLOCK)).contiguous()
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        out32 = torch.empty(M, N, device="cuda", dtype=torch.float32)     # the wgrad variants write fp32
        a_m = mmajor_scales(a_s)
        print(f"| wgrad 1D1D | {M} | {N} | {K} | "
              f"{rate(M, N, K, lambda: ext.gemm_wgrad(aq, a_s, bq, sbt, out32))} | "
              f"{rate(M, N, K, lambda: ext.gemm(aq, a_m, wq, ws, out))} |", flush=True)
    # expert wgrad: dW[e] = dY_eᵀ·X_e over each expert's own tokens; `small`-like, then v3-layers' experts
    # (16 of width 2048 at hidden 7168, 4,096 tokens × top-8 spread evenly: 2,048 tokens each)
    for n_exp, n_tok, M, N in [(experts, rows, 512, 1024), (experts, rows, 1024, 512),
                               (16, 2048, 2048, 7168), (16, 2048, 7168, 2048)]:
        K = n_exp * n_tok
        aq, a_s = quantize_act(torch.randn(M, K, device="cuda"))
        bq, b_s = quantize_act(torch.randn(N, K, device="cuda"))
        sbt = F.pad(b_s.t(), (0, -N % BLOCK)).contiguous()
        out = torch.empty(M, N, device="cuda", dtype=torch.float32)
        kgrouped = rate(M, N, K, lambda: fp8_gemm_kgrouped(aq, a_s, bq, b_s, [n_tok] * n_exp, torch.float32))
        print(f"| wgrad, {n_exp} experts × {n_tok} tokens (K-grouped) | {M} | {N} | {K} | {kgrouped} | "
              f"{rate(M, N, K, lambda: ext.gemm_wgrad(aq, a_s, bq, sbt, out))} (1D1D, one sum over all K) |",
              flush=True)
        del aq, bq, out
        torch.cuda.empty_cache()
    for N, K in [(512, 1024), (1024, 512), (2048, 7168), (7168, 2048)]:
        M = experts * rows
        aq, a_s = quantize_act(torch.randn(M, K, device="cuda"))
        wq, ws = quantize_weight(torch.randn(experts * N, K, device="cuda"))
        groups = torch.arange(experts, device="cuda", dtype=torch.int32).repeat_interleave(rows // BLOCK)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        grouped = rate(M, N, K, lambda: ext.gemm_experts(aq, a_s, wq, ws, groups, out, experts))
        a_m = mmajor_scales(a_s)
        print(f"| {experts} experts × {rows} rows | {M} | {N} | {K} | {grouped} | "
              f"{rate(M, N, K, lambda: ext.gemm(aq, a_m, wq[:N], ws[:N // BLOCK], out))} |", flush=True)
        del aq, wq
        torch.cuda.empty_cache()


def bench_wgrad_sums(rounds: int = 3, reps: int = 20):
    """A weight gradient summed over micro-batches: the Wgrad kernels adding their tiles into the gradient in the
    epilogue (C += the product: fp8.fp8_gemm_into, fp8_experts.fp8_gemm_kgrouped_into) against writing the product
    and adding it with `add_` (what autograd's gradient accumulation does), the two taking turns. ms per call and
    the speed-up; v3-layers' dense Wgrad shapes at 4,096 tokens and its experts' at 16 × 2,048 tokens."""
    print("\n# Wgrad summed into the gradient: in the epilogue vs kernel + add_ (ms, taking turns)")
    print("| GEMM | M | N | K | C += in the epilogue | kernel, then add_ | speed-up |\n|---|---|---|---|---|---|---|")
    T = 4096
    cases = [("wgrad 1D1D", M, N, T, None) for M, N in [(24576, 1536), (7168, 16384), (18432, 7168), (2048, 7168)]]
    cases += [("wgrad, 16 experts × 2048 tokens (K-grouped)", M, N, 16 * 2048, [2048] * 16)
              for M, N in [(2048, 7168), (7168, 2048)]]
    for name, M, N, K, sizes in cases:
        aq, a_s = quantize_act(torch.randn(M, K, device="cuda"))
        bq, b_s = quantize_act(torch.randn(N, K, device="cuda"))
        rows = M * len(sizes) if sizes else M
        grad = torch.zeros(rows, N, device="cuda")
        if sizes:
            into = lambda: fp8_gemm_kgrouped_into(aq, a_s, bq, b_s, sizes, grad.view(len(sizes), M, N))  # noqa: E731
            apart = lambda: grad.add_(  # noqa: E731
                fp8_gemm_kgrouped(aq, a_s, bq, b_s, sizes, torch.float32).view(rows, N))
        else:
            into = lambda: fp8_gemm_into(aq, a_s, bq, b_s, grad)  # noqa: E731
            apart = lambda: grad.add_(fp8_gemm(aq, a_s, bq, b_s, torch.float32))  # noqa: E731
        ms = take_turns([into, apart], rounds, lambda fn: _median_ms(fn, warmup=3, reps=reps))
        t_into, t_apart = (statistics.median(m) for m in ms)
        print(f"| {name} | {M} | {N} | {K} | {t_into:.3f} | {t_apart:.3f} | {t_apart / t_into:.2f}× |", flush=True)
        del aq, bq, grad
        torch.cuda.empty_cache()


def bench_ladder():
    """fp8_teaching's steps 1-4 beside the production kernel (and cuBLAS) on the M = 4096 shapes and 8192³, each
    kernel's calls in one block, in the order of the columns."""
    import fp8_teaching
    steps = fp8_teaching.load()
    print("\n# the teaching ladder (fp8_teaching/): TFLOP/s, each kernel's calls in one block")
    print("| M | N | K | step 1 | step 2 | step 3 | step 4 | kernel | vendor blockwise |")
    print("|---" * 9 + "|")
    for M, N, K in LARGE_SHAPES:
        xq, xs = quantize_act(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
        wq, ws = quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16))
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        calls = [lambda i=i: steps.gemm(i, xq, xs, wq, ws, out) for i in range(1, 5)]
        calls += [_kernel_call(xq, mmajor_scales(xs), wq, ws, out), _vendor_blockwise(xq, xs, wq, ws)[0]]
        cells = [f"{2 * M * N * K / _median_ms(fn) / 1e9:.0f}" for fn in calls]
        print(f"| {M} | {N} | {K} | " + " | ".join(cells) + " |", flush=True)
        del xq, wq, out
        torch.cuda.empty_cache()


def bench_sustained(seconds: float = 2.0):
    """The Fprop kernel and cuBLAS blockwise, `seconds` each, with nvidia-smi sampling the SM clock and the board
    power every 50 ms. At the power cap the GPU lowers its clock until the board draws its limit, so the rate
    depends on the energy a kernel spends per FLOP as well as on the work it does per clock cycle; TFLOP/s per GHz
    is the latter. nvidia-smi samples every GPU of the host: run it where the benchmark's GPU is the only one."""
    print("\n# sustained: TFLOP/s over the run, median SM clock and power of the samples in its second half")
    print("| M | N | K | kernel | TFLOP/s | SM clock (MHz) | power (W) | TFLOP/s per GHz |")
    print("|---" * 8 + "|")
    for M, N, K in [(4096, 4096, 7168), (4096, 32768, 512), (4096, 7168, 16384), (4096, 2112, 7168)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_act(x)
        wq, ws = quantize_weight(w)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        kernels = [("kernel", _kernel_call(xq, mmajor_scales(xs), wq, ws, out)),
                   ("vendor blockwise", _vendor_blockwise(xq, xs, wq, ws)[0])]
        for name, fn in kernels:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            try:
                query = ["--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"]
                smi = subprocess.Popen(["nvidia-smi", *query], stdout=subprocess.PIPE, text=True)
            except OSError as e:
                raise SystemExit(f"fp8_bench.py --sustained needs nvidia-smi on PATH ({e})")
            t0, calls = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                for _ in range(20):
                    fn()
                calls += 20
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            smi.terminate()
            samples = [tuple(map(float, line.split(","))) for line in smi.communicate()[0].splitlines() if line.strip()]
            samples = samples[len(samples) // 2:]  # after the clock has settled
            tflops = 2 * M * N * K * calls / dt / 1e12
            mhz = statistics.median(c for c, _ in samples) if samples else float("nan")
            watts = statistics.median(p for _, p in samples) if samples else float("nan")
            print(f"| {M} | {N} | {K} | {name} | {tflops:.0f} | {mhz:.0f} | {watts:.0f} | {tflops / mhz * 1e3:.0f} |",
                  flush=True)


# The activations one v3-layers micro-batch (4,096 tokens) quantizes, (rows, columns): the block input (into
# wq_a, wkv_a, the shared expert, the dense FFN), the query latent, the attention output (into wo), the dense FFN's
# hidden, and the routed experts' padded input and hidden (4,096 tokens x 8 experts each).
QUANT_SHAPES = [(4096, 7168), (4096, 1536), (4096, 16384), (4096, 18432), (32768, 7168), (32768, 2048)]
HBM_TBS = 4.8  # the H200's HBM3e bandwidth, TB/s


def bench_quant(shapes=QUANT_SHAPES, dtypes=(torch.bfloat16, torch.float32)):
    """GB/s of fp8_quant.cu's activation quantizers, each kernel called into preallocated outputs (as the GEMM
    tables time theirs): rows (1×128 tiles along the last dim, scales M-major as the Fprop kernel reads them) and
    cols (the transposed 128×1 tiles along the tokens, for Wgrad); bytes = input read + FP8 output and fp32
    scales written. rows + cols: both in one pass (quant_rows_cols, bf16 only: a linear layer's input and output
    gradient), and in brackets how much faster it is than the two kernels one after the other. A copy of the input
    into a preallocated tensor (read + write) is the rate a plain pass over memory reaches on this GPU."""
    ext = load_kernel()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; GB/s = bytes read and written / median "
          f"time (CUDA events, 10 warm-ups, 50 reps, {'L2 flushed before each call' if FLUSH_L2 else 'no L2 flush'})"
          f"; in brackets the share of {HBM_TBS} TB/s")
    print("| rows | columns | input | rows (1×128) | cols (128×1, transposed) | rows + cols, one pass | copy of the "
          "input |")
    print("|---" * 7 + "|")
    for dtype in dtypes:
        for R, C in shapes if dtype == torch.bfloat16 else shapes[:1]:
            print(f"| {R} | {C} | {str(dtype).removeprefix('torch.')} | " + " | ".join(_quant_cells(ext, R, C, dtype))
                  + " |", flush=True)
            torch.cuda.empty_cache()                                          # the shape's tensors died with the call


def _quant_cells(ext, R, C, dtype) -> list:
    """One row of bench_quant's table: the cells of rows, cols, both in one pass and the copy."""
    x = torch.randn(R, C, device="cuda").to(dtype)
    n, e, r_pad = R * C, x.element_size(), -(-R // BLOCK) * BLOCK
    q = torch.empty(R, C, dtype=torch.uint8, device="cuda")
    sm = torch.zeros(C // BLOCK, r_pad, device="cuda")                         # M-major scales, rows padded
    qt = torch.empty(C, r_pad, dtype=torch.uint8, device="cuda")
    st = torch.empty(C, r_pad // BLOCK, device="cuda")
    y = torch.empty_like(x)
    cells, ms = [], []
    rows_b, cols_b = n * (e + 1) + n // BLOCK * 4, n * e + C * r_pad * (1 + 4 / BLOCK)
    both = (lambda: ext.quant_rows_cols(x, q, sm, r_pad, qt, st)) if dtype == torch.bfloat16 else None
    for fn, nbytes in ((lambda: ext.quant_rows(x, q, sm, r_pad), rows_b),
                       (lambda: ext.quant_cols(x, qt, st), cols_b),
                       (both, rows_b + cols_b - n * e),                         # x read once
                       (lambda: y.copy_(x), 2 * n * e)):
        if fn is None:
            cells.append("—")
            continue
        ms.append(_median_ms(fn))
        gbs = nbytes / ms[-1] / 1e6
        cells.append(f"{gbs:,.0f} ({gbs / HBM_TBS / 10:.0f}%)")
    if both is not None:
        cells[2] += f", {(ms[0] + ms[1]) / ms[2]:.2f}×"
    return cells


def main(argv=None):
    global FLUSH_L2
    p = argparse.ArgumentParser(
        prog="fp8_bench.py", description="Time fp8_gemm.cu's FP8 GEMM against bf16 matmul and cuBLAS's blockwise "
        "FP8 on a Hopper GPU (report §3.3). Without flags: the main table only.")
    p.add_argument("--interleave", action="store_true",
                   help="also time the kernel and cuBLAS taking turns, order rotated (clock drift hits both alike)")
    p.add_argument("--training", action="store_true", help="also time the Wgrad (1D1D) and grouped-expert kernels")
    p.add_argument("--sustained", action="store_true",
                   help="also run the kernel and cuBLAS for 2 s each with the SM clock and power sampled (nvidia-smi)")
    p.add_argument("--ladder", action="store_true",
                   help="also time the teaching kernels of fp8_teaching/ (steps 1-4) beside the kernel")
    p.add_argument("--quant", action="store_true",
                   help="also time the activation quantization kernels (GB/s, against a copy of the input)")
    p.add_argument("--flush-l2", action="store_true", help="time every call with a cold L2 (write 256 MiB first)")
    args = p.parse_args(argv)
    _need_kernel()
    FLUSH_L2 = args.flush_l2
    bench()
    if args.interleave:
        bench_interleaved()
    if args.training:
        bench_training()
        bench_wgrad_sums()
    if args.ladder:
        bench_ladder()
    if args.sustained:
        bench_sustained()
    if args.quant:
        bench_quant()


if __name__ == "__main__":
    main()
