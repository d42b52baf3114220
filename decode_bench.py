"""Decoding speed of a trained checkpoint: the reference generate() against static_decode.StaticDecoder (static latent
cache, CUDA graphs), batch 1 plain and MTP-speculative, and a batch of prompts of different lengths; then the
rate at which the absorbed attention reads the latent cache (bytes of c^KV and k^R per second), as PyTorch ops and as
mla_decode.py's fused kernel (StaticDecoder's default on a GPU).

    python decode_bench.py --out_dir out [--batch 64] [--max_new_tokens 256] [--prompt_tokens 64] [--compile]
    python decode_bench.py --kernel_sweep      # mla_decode's kernel alone over a grid of configurations

Greedy throughout. Prompts are windows of a standard-library source file (the training corpus's kind of text),
batch row b taking prompt_tokens·(b+1)/B tokens, so the rows have different lengths. Each StaticDecoder
timing is the second call (the first captures the graphs); the timings include the prefill.
"""
import argparse
import os
import sys
import time

import torch

import generate as G
import static_decode as SD
from config import get_preset
from mla import MLA
from mla_decode import kernel_available


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def event_time(fn, reps=20) -> float:
    """Median seconds of fn() over reps calls after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            times.append(timed(fn)[1])
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def attention_read_rate(attn, B: int, S: int, dtype=torch.bfloat16, fused: bool = False):
    """One absorbed-attention call of layer `attn` for B one-token queries over S cached positions, the PyTorch ops
    (_attend_absorb) or the fused kernel (_attend_fused, mla_decode.py): (seconds, bytes of latent cache it must
    read at least: B·S·(d_c + d^R_h) values). The call is captured as a CUDA graph with its inputs in place and
    replayed: the time of its kernels alone (no launch gaps, no copies of the inputs)."""
    dev = attn.kv_norm.weight.device
    H, c, dr = attn.n_heads, attn.kv_lora_rank, attn.dr
    q_nope = torch.randn(B, 1, H, attn.dn, device=dev, dtype=dtype)
    q_pe = torch.randn(B, 1, H, dr, device=dev, dtype=dtype)
    latent = torch.randn(B, S, c, device=dev, dtype=dtype)
    k_pe = torch.randn(B, S, dr, device=dev, dtype=dtype)
    if fused:  # every position visible: the query sits at S-1
        at = torch.full((B, 1), S - 1, device=dev)
        fn = lambda: attn._attend_fused(q_nope, q_pe, latent, k_pe, at, dtype)
    else:
        bias = torch.zeros(B, 1, 1, S, device=dev)  # mla.CachePositions.bias: every position visible
        fn = lambda: attn._attend_absorb(q_nope, q_pe, latent, k_pe, 0, dtype, bias)
    step = SD.GraphedStep(fn, dev.type == "cuda")
    with torch.no_grad():
        sec = event_time(step)
    return sec, B * S * (c + dr) * latent.element_size()


def kernel_sweep(device="cuda", shapes=None, reps=20) -> list:
    """mla_decode's kernel alone (latent_attention, one new token per row, bf16, every position visible) under a grid
    of configurations (BLOCK_M, BLOCK_S, num_warps, num_stages, splits), the heuristic's first: the sweep the
    heuristic was fitted to, to re-run on another GPU. shapes: (heads, d_c, d^R_h, batch, positions) tuples, by
    default `small`'s and V3's layers. Prints and returns (shape, config, seconds) rows; a configuration that Triton
    refuses (more shared memory than a block may have) is printed as such and skipped."""
    import itertools
    import mla_decode as MD
    from triton.runtime.errors import OutOfResources
    rows = []
    for H, C, DR, B, S in shapes or ((16, 256, 32, 64, 4096), (16, 256, 32, 64, 1024), (16, 256, 32, 64, 320),
                                     (16, 256, 32, 1, 4096), (16, 256, 32, 1, 320),
                                     (128, 512, 64, 64, 4096), (128, 512, 64, 128, 4096)):
        g = torch.Generator(device=device).manual_seed(0)
        q, qr = (torch.randn(B, 1, H, n, device=device, generator=g).bfloat16() for n in (C, DR))
        lat, pe = (torch.randn(B, S, n, device=device, generator=g).bfloat16() for n in (C, DR))
        at = torch.full((B, 1), S - 1, device=device)
        heuristic = MD._heuristic(H, C, DR, B, S, q.device, q.dtype)
        sp = heuristic[4]
        if C * 2 > 512:  # V3's d_c 512: 32 or 64 rows per block
            grid = itertools.product([32, 64], [32, 64, 128], [4, 8], [2, 3], [sp, 2 * sp])
        else:
            grid = itertools.product([16], [64, 128, 256], [4], [2, 3, 4], sorted({max(1, sp // 2), sp, 2 * sp}))
        nbytes = B * S * (C + DR) * 2
        print(f"{H} heads, d_c {C}, d^R_h {DR}: batch {B}, {S} positions ({nbytes / 1e6:.1f} MB of latent cache)")
        for config in [heuristic] + [c for c in grid if c != heuristic]:
            step = SD.GraphedStep(lambda: MD.latent_attention(q, qr, lat, pe, at, 0.1, config=config),
                                  q.device.type == "cuda")
            try:
                sec = event_time(step, reps)
            except OutOfResources as e:  # raised at the first launch, before any graph capture
                print(f"  {config}: refused ({e})")
                continue
            rows.append(((H, C, DR, B, S), config, sec))
            print(f"  {config}{' (heuristic)' if config == heuristic else ''}: {1e6 * sec:.1f} µs, "
                  f"{nbytes / sec / 1e12:.3f} TB/s ({100 * nbytes / sec / 4.8e12:.0f}% of 4.8 TB/s)", flush=True)
    return rows


@torch.no_grad()  # inference throughout: no autograd records in the timed or captured calls
def main(argv=None) -> int:
    p = argparse.ArgumentParser(usage="%(prog)s [options]", description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="out", help="directory holding train.py's ckpt.pt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: 256, or what the model's max_seq_len leaves after the prompt")
    p.add_argument("--prompt_tokens", type=int, default=None, help="default: 64, or a quarter of max_seq_len")
    p.add_argument("--no_reference", action="store_true", help="skip the (slow) reference generate() rows")
    p.add_argument("--compile", action="store_true",
                   help="also time StaticDecoder(compile=True) at batch 1, plain and speculative")
    p.add_argument("--attn_impl", default=None, choices=["absorb", "fused"],
                   help="StaticDecoder's MLA path (default: fused where CUDA and Triton are, else absorb)")
    p.add_argument("--kernel_sweep", action="store_true",
                   help="only time mla_decode's kernel over a grid of configurations (CUDA and Triton), then exit")
    p.add_argument("--random_preset", default=None, help="no checkpoint: this preset with random weights")
    p.add_argument("--device", default="cuda", help="cuda (timings) or cpu (a check that the script runs)")
    args = p.parse_args(argv)
    try:
        for name in ("batch", "max_new_tokens", "prompt_tokens"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("decode_bench.py times CUDA; this machine has no CUDA device (--device cpu checks it)")
        if args.kernel_sweep:
            if not kernel_available(args.device):
                raise ValueError("--kernel_sweep times mla_decode's Triton kernel: it needs CUDA and Triton")
            kernel_sweep(args.device)
            return 0
        if args.random_preset:  # speed only: random weights decode as fast (but drafts are rarely accepted)
            from data import get_tokenizer
            torch.manual_seed(0)
            with torch.device(args.device):
                model = G.Transformer(get_preset(args.random_preset)).eval()
            tok, source = get_tokenizer(model.cfg.vocab_size), f"{args.random_preset} (random weights)"
        else:
            model, tok = G.load_model(args.out_dir, device=args.device)
            source = args.out_dir
        L = model.cfg.max_seq_len  # the prompt and the new tokens must fit the model's positions
        P = args.prompt_tokens or min(64, L // 4)
        if P >= L:
            raise ValueError(f"--prompt_tokens {P} leaves no room for new tokens in the model's max_seq_len {L}")
        N = args.max_new_tokens or min(256, L - P)
        if P + N > L:
            raise ValueError(f"--prompt_tokens {P} + --max_new_tokens {N} = {P + N} positions exceed the model's "
                             f"max_seq_len {L}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = open(os.path.join(os.path.dirname(os.__file__), "argparse.py")).read()
    stream = tok.encode(text)
    B = args.batch
    specs = (False, True) if model.cfg.n_mtp else (False,)  # no MTP module: no speculative rows
    starts = [(997 * b) % (len(stream) - P) for b in range(B)]
    prompts = [stream[s:s + max(1, P * (b + 1) // B)] for b, s in enumerate(starts)]
    prompt = stream[:P]
    rows = []

    def row(name, n_tok, sec, extra=""):
        rows.append(f"| {name} | {n_tok} | {sec:.3f} | {n_tok / sec:,.1f} | {extra} |")
        print(rows[-1], flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device_name} | torch {torch.__version__} CUDA {torch.version.cuda} | attention "
          f"{args.attn_impl or ('fused' if kernel_available(args.device) else 'absorb')} | model {source}: dim "
          f"{model.cfg.dim}, {model.cfg.n_layers} layers | prompt {P} tokens, {N} new, batch {B}")
    print("| path | new tokens | s | tokens/s | notes |\n|---|---|---|---|---|")
    if not args.no_reference:
        for dtype in (torch.float32, torch.bfloat16):
            m = model.float() if dtype == torch.float32 else model.bfloat16()
            (plain, st), sec = timed(lambda: G.generate(m, prompt, N, temperature=0.0))
            row(f"generate() {str(dtype)[6:]}, batch 1", len(plain), sec, f"{st['main_forwards']} main forwards")
            if not model.cfg.n_mtp:
                continue
            (spec, st), sec = timed(lambda: G.generate(m, prompt, N, temperature=0.0, speculative=True))
            row(f"generate(speculative) {str(dtype)[6:]}, batch 1", len(spec), sec,
                f"accepted {st['accepted']}/{st['drafted']}, {st['main_forwards']} main forwards, "
                f"same tokens as plain: {spec == plain}")
    model = model.bfloat16()
    dec = SD.StaticDecoder(model, max_batch=B, max_seq_len=max(len(p) for p in prompts + [prompt]) + N,
                           attn_impl=args.attn_impl)
    for speculative in specs:
        dec.generate([prompt], N, speculative=speculative)  # capture
        (out1, st), sec = timed(lambda: dec.generate([prompt], N, speculative=speculative))
        if not speculative:
            plain1 = out1
        note = (f"accepted {st['accepted']}/{st['drafted']}, {st['main_forwards']} main forwards, same tokens as "
                f"plain: {out1 == plain1}") if speculative else f"graphs {dec.graphs}"
        row(f"StaticDecoder bf16{' speculative' if speculative else ''}, batch 1", len(out1[0]), sec, note)
    for speculative in specs:
        dec.generate(prompts, N, speculative=speculative)
        (outB, st), sec = timed(lambda: dec.generate(prompts, N, speculative=speculative))
        if not speculative:
            plainB = outB
        note = (f"accepted {st['accepted']}/{st['drafted']}, {st['steps']} batched steps (the row with the fewest "
                f"accepted drafts sets them), same tokens as plain: {sum(a == b for a, b in zip(outB, plainB))}/{B} "
                f"rows") if speculative else f"{st['steps']} batched steps"
        row(f"StaticDecoder bf16{' speculative' if speculative else ''}, batch {B}", sum(map(len, outB)), sec, note)
    # one graphed plain step at batch B over the whole cache: latent-cache bytes per second of the full step
    x = torch.zeros(B, dtype=torch.long, device=args.device)
    n = torch.full((B,), N // 2, dtype=torch.long, device=args.device)
    step = dec._step("plain", B)
    sec = event_time(lambda: step(x, n))
    attn = model.layers[0].attn
    S = attn.kv_cache.shape[1]
    visible = int((n + 1).sum())  # positions 0..n_b of each row: what the step must read
    cache_bytes = len(model.layers) * visible * (attn.kv_lora_rank + attn.dr) * 2
    print(f"graphed decode step ({dec.attn_impl}), batch {B}, positions 0..{N // 2} of a {S}-position cache: "
          f"{1e3 * sec:.3f} ms, latent cache {cache_bytes / 1e6:.1f} MB read → {cache_bytes / sec / 1e12:.3f} TB/s "
          f"over the whole step")
    # what one step is made of (on CUDA: the kernels an eager step launches), and a speculative iteration against
    # it: a two-token main forward, then the MTP module over the same two positions
    # (static_decode._speculative_iteration), each timed on its own (graphed on CUDA)
    if args.device == "cuda":
        from torch.profiler import profile, ProfilerActivity
    for Bk in (1, B):
        xk, nk, on = x[:Bk], n[:Bk], torch.ones(Bk, dtype=torch.bool, device=args.device)
        if args.device == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                SD._plain_step(model, xk, nk)
                torch.cuda.synchronize()
            kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kern) / 1e3
            print(f"decode step, batch {Bk}: {len(kern)} kernels, {busy:.3f} ms of kernel time (eager, profiled)")
        parts = {"plain step": (dec._step("plain", Bk), (xk, nk))}
        if model.cfg.n_mtp:
            x2 = torch.stack([xk, xk], 1)  # (Bk, 2)
            h2 = torch.zeros(Bk, 2, model.cfg.dim, dtype=model.embed.weight.dtype, device=args.device)
            parts.update({"speculative iteration": (dec._step("spec", Bk), (xk, xk, nk, on)),
                          "two-token main forward": (SD.GraphedStep(model.forward_cached, dec.graphs), (x2, nk)),
                          "two-position MTP step": (SD.GraphedStep(model.mtp_step, dec.graphs), (h2, x2, nk))})
        ms = {k: 1e3 * event_time(lambda: f(*a)) for k, (f, a) in parts.items()}
        shown = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
        cost = (f"; the iteration costs {ms['speculative iteration'] / ms['plain step']:.2f} plain steps"
                if model.cfg.n_mtp else "")
        print(f"batch {Bk}, {'graphed' if dec.graphs else 'eager'}: {shown}{cost}")
    print("absorbed attention alone (one layer, one new token per row, bf16, CUDA-graph replays):")
    v3 = MLA(get_preset("v3-layers")).to(args.device).bfloat16()  # V3's MLA: 128 heads, d_c 512, d^R_h 64
    paths = (False, True) if kernel_available(args.device) else (False,)
    for a, Bq, Sq in ((attn, B, 1024), (attn, B, 4096), (v3, B, 4096), (v3, 128, 4096)):
        for fused in paths:
            sec, nbytes = attention_read_rate(a, Bq, Sq, fused=fused)
            print(f"  {'fused kernel' if fused else 'PyTorch ops '} {a.n_heads} heads, d_c {a.kv_lora_rank}: batch "
                  f"{Bq}, {Sq} positions: {1e6 * sec:.1f} µs, {nbytes / 1e6:.1f} MB → {nbytes / sec / 1e12:.3f} "
                  f"TB/s ({100 * nbytes / sec / 4.8e12:.0f}% of 4.8 TB/s)", flush=True)
    del v3
    dec.close()
    if args.compile:  # the same batch-1 rows with every step compiled before its capture
        dec = SD.StaticDecoder(model, max_batch=1, max_seq_len=dec.max_seq_len, compile=True,
                               attn_impl=args.attn_impl)
        for speculative in specs:
            _, sec = timed(lambda: dec.generate([prompt], N, speculative=speculative))
            print(f"StaticDecoder(compile=True){' speculative' if speculative else ''}: first call (compiles, "
                  f"captures) {sec:.1f} s", flush=True)
            (outc, st), sec = timed(lambda: dec.generate([prompt], N, speculative=speculative))
            note = f"same tokens as uncompiled plain: {outc == plain1}"
            if speculative:
                note = f"accepted {st['accepted']}/{st['drafted']}, {note}"
            row(f"StaticDecoder bf16 compiled{' speculative' if speculative else ''}, batch 1", len(outc[0]), sec,
                note)
        dec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
