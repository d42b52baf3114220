"""Sampling from a trained model: latent-KV-cached decoding and MTP self-speculative decoding.

Plain decoding: one prefill forward over the prompt fills every MLA layer's latent cache (kv_lora_rank + d^R_h
values per token), then one token per step through the absorbed attention path.

Self-speculative decoding with the MTP module (report §2.2, "MTP in inference"): after the main model has
produced token x_n (not yet fed), MTP depth 1 reads the main hidden state h_{n-1} and Emb(x_n) and drafts
d ≈ x_{n+1}. One main forward over [x_n, d] then verifies the draft and, if it is accepted, also yields x_{n+2}:
two tokens for one main forward. Acceptance rule:
  greedy (temperature 0): accept iff d == argmax p_n (output identical to plain greedy decoding);
  sampling: accept with probability min(1, p(d)/q(d)), else resample from normalize(max(p − q, 0)), which
  leaves the output distribution exactly that of the main model (Leviathan et al. 2023; Chen et al. 2023).
The report quotes 85–90% acceptance for DeepSeek-V3; a tiny model trained for minutes reaches far less.

`generate` is the reference (one sequence, a host round trip per token). The fast path for GPUs is
static_decode.py's `StaticDecoder`: a batch of prompts of any lengths, a latent cache of fixed size with one
position per row kept on the device, each step captured once as a CUDA graph and replayed, greedy; its speculative
iteration verifies with one main forward over two tokens and drafts for both outcomes with one MTP forward.
tests/test_decode.py checks it against `generate`; decode_bench.py times both.

    python generate.py --out_dir out --prompt "def " --max_new_tokens 200 [--speculative]
    python generate.py --out_dir out --static --temperature 0 --prompt "def " --prompt "class " [--speculative]

The command line runs `generate` by default (streamed, sampling or greedy, one prompt after the other); --static
runs StaticDecoder on all prompts as one batch (greedy; in bf16 on a GPU, where a near-tie between two logits can
pick another token than the float32 reference does).
"""
import argparse
import math
import os
import signal
import sys
import time

# Ctrl-C while torch loads (about a second): the line and exit code of main's. Only where Ctrl-C has its usual
# meaning (a process started in the background may ignore it); the handler found is put back below.
def _interrupted_while_importing(*_):
    print("interrupted", file=sys.stderr)
    os._exit(130)


_SIGINT_AT_START = signal.getsignal(signal.SIGINT)
if __name__ == "__main__" and _SIGINT_AT_START is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_importing)

import torch

from checkpoint import load_checkpoint, pick_device
from config import config_from_dict
from model import Transformer
from static_decode import StaticDecoder


# -- sampling ----------------------------------------------------------------------------------------------
def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int = None) -> torch.Tensor:
    """(V,) logits → (V,) sampling distribution after temperature and top-k. temperature must be > 0. Every
    token whose logit ties the k-th largest stays, so an exact tie can leave more than top_k tokens."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs_from_logits(logits, temperature, top_k), 1, generator=gen))


def verify_draft(p_logits, q_logits, draft: int, temperature, top_k, gen):
    """Speculative acceptance for one drafted token. Returns (token, accepted)."""
    if temperature == 0:
        target = int(p_logits.argmax())
        return target, target == draft
    p = probs_from_logits(p_logits, temperature, top_k)
    q = probs_from_logits(q_logits, temperature, top_k)
    u = torch.rand((), generator=gen, device=p.device)  # uniform on [0, 1)
    if u * q[draft] < p[draft]:  # accept with probability min(1, p/q); strict, so p(d) = 0 never accepts
        return draft, True
    residual = (p - q).clamp_min(0)
    if residual.sum() <= 0:  # p == q: nothing to correct, any rejection is impossible in exact arithmetic
        residual = p
    return int(torch.multinomial(residual / residual.sum(), 1, generator=gen)), False


# -- decoding loops ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=0.0, top_k=None, eot=None, gen=None,
             speculative=False, on_token=None):
    """Decode up to max_new_tokens after `prompt` (list of ids). Returns (new ids, stats dict)."""
    cfg = model.cfg
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}: ask for at least one token")
    if len(prompt) >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {cfg.max_seq_len}")
    if speculative and cfg.n_mtp == 0:
        raise ValueError("--speculative needs a model with MTP modules (n_mtp >= 1)")
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(prompt))
    device = model.embed.weight.device
    cache_len = len(prompt) + max_new_tokens  # the last token is never fed back, so this always suffices
    model.setup_cache(1, cache_len)
    out, stats = [], {"drafted": 0, "accepted": 0, "main_forwards": 1}

    def emit(tok):  # returns True when generation must stop
        out.append(tok)
        if on_token:
            on_token(tok)
        return tok == eot or len(out) >= max_new_tokens

    ids = torch.tensor([prompt], device=device)  # (1, T0)
    logits, h = model.forward_cached(ids, 0)
    x, n = pick(logits[0, -1], temperature, top_k, gen), len(prompt)  # x is the token at position n
    # MTP cache entries still to write: hidden of positions pend_start.. and the token one ahead of each.
    pend_h, pend_tok, pend_start = h, torch.cat([ids[:, 1:], ids.new_tensor([[x]])], 1), 0
    try:
        while not emit(x):
            # Plain step; also the tail of speculative decoding (one token left, or no room for a 2-token
            # verify), after which no draft is made again, so the MTP cache need not be kept in step.
            if not speculative or len(out) + 1 >= max_new_tokens or n + 1 >= cache_len:
                logits, h = model.forward_cached(ids.new_tensor([[x]]), n)
                stats["main_forwards"] += 1
                x, n = pick(logits[0, -1], temperature, top_k, gen), n + 1
                continue
            q_logits, _ = model.mtp_step(pend_h, pend_tok, pend_start)  # fills MTP cache up to position n-1
            q_logits = q_logits[0, -1]
            draft = pick(q_logits, temperature, top_k, gen)  # guess for the token at position n+1
            logits, h = model.forward_cached(ids.new_tensor([[x, draft]]), n)  # verify: positions n, n+1
            stats["drafted"] += 1
            stats["main_forwards"] += 1
            tok, ok = verify_draft(logits[0, 0], q_logits, draft, temperature, top_k, gen)
            if ok:
                stats["accepted"] += 1
                if emit(draft):
                    break
                x_next = pick(logits[0, 1], temperature, top_k, gen)  # token at n+2, a free extra token
                pend_h, pend_tok, pend_start = h, ids.new_tensor([[draft, x_next]]), n
                x, n = x_next, n + 2
            else:  # position n+1 of the cache holds the rejected draft; it is overwritten next step
                pend_h, pend_tok, pend_start = h[:, :1], ids.new_tensor([[tok]]), n
                x, n = tok, n + 1
    finally:
        model.free_cache()
    return out, stats


# -- loading -----------------------------------------------------------------------------------------------
def load_model(out_dir=None, hf_dir=None, device="cpu"):
    """Model + tokenizer from train.py's checkpoint (out_dir/ckpt.pt) or a Hugging Face layout directory."""
    from data import get_tokenizer

    if hf_dir:
        from data import FULL_VOCAB
        from hf_io import load_hf_checkpoint
        model = load_hf_checkpoint(hf_dir, device=device)
        if model.cfg.vocab_size > FULL_VOCAB:  # e.g. the released V3 weights (129280): their own tokenizer
            raise ValueError(f"{hf_dir}: vocabulary of {model.cfg.vocab_size} tokens; generate.py tokenizes with "
                             f"cl100k_base or a prefix of it (at most {FULL_VOCAB} tokens)")
        return model.eval(), get_tokenizer(model.cfg.vocab_size)
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, "generate", hint=f" (train one first: python train.py --out_dir {out_dir})")
    try:
        cfg = config_from_dict(ckpt["config"])
        state = ckpt["model"]
    except (KeyError, TypeError, ValueError) as e:  # a readable file that is not train.py's checkpoint
        raise ValueError(f"generate: {path} is not a train.py checkpoint ({type(e).__name__}: {e})") from None
    model = Transformer(cfg)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    bad = [k for k in state if k in want and state[k].shape != want[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"checkpoint {path} does not match its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {bad[:3]})")
    model.load_state_dict(state)
    tok = get_tokenizer(cfg.vocab_size)
    if ckpt.get("tokenizer") not in (None, tok.name):
        raise ValueError(f"checkpoint tokenizer {ckpt.get('tokenizer')!r} is not {tok.name!r}")
    return model.to(device).eval(), tok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(usage="%(prog)s [options]", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out", help="directory holding train.py's ckpt.pt")
    p.add_argument("--hf_dir", default=None, help="load a Hugging Face DeepSeek-V3 layout directory instead")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat it for several prompts; without it (and without --prompts_file) the "
                        "prompt is read from stdin")
    p.add_argument("--prompts_file", default=None, help="a text file of prompts, one per non-empty line")
    p.add_argument("--max_new_tokens", type=int, default=200,
                   help="tokens to generate at most (cut, with a note, to the room the longest prompt leaves in the "
                        "model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 = among all")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    p.add_argument("--static", action="store_true",
                   help="the fast path (StaticDecoder): all prompts decoded as one batch over a fixed-size latent "
                        "cache, each step a CUDA graph on a GPU; greedy only (temperature 0); the text is "
                        "printed at the end, not streamed")
    p.add_argument("--compile", action="store_true",
                   help="with --static: torch.compile each decode step first (fused kernels; the first step of "
                        "each kind compiles, tens of seconds)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights' dtype; auto = bfloat16 for --static on CUDA (its CUDA graphs need it), else float32")
    return p


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top_k {args.top_k}: must be >= 0 (0 = no top-k cut)")
    if args.compile and not args.static:
        raise ValueError("--compile compiles the static path's decode steps: add --static")
    if args.static and args.temperature > 0:
        raise ValueError(f"--static decodes greedily only: add --temperature 0 (sampling with --temperature "
                         f"{args.temperature} runs without --static)")


def read_prompts(args) -> list:
    """The prompt texts: every --prompt, then the lines of --prompts_file; else stdin as one prompt."""
    texts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = [line.rstrip("\r\n") for line in f]
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts_file {args.prompts_file}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"--prompts_file {args.prompts_file}: a folder, not a file") from None
        except UnicodeDecodeError:
            raise ValueError(f"--prompts_file {args.prompts_file}: not UTF-8 text") from None
        except OSError as e:  # unreadable (permissions), a device error
            raise ValueError(f"--prompts_file {args.prompts_file}: cannot read it ({e.strerror or e})") from None
        file_prompts = [line for line in lines if line.strip()]
        if not file_prompts:
            raise ValueError(f"--prompts_file {args.prompts_file}: no prompt in it (one per non-empty line)")
        texts += file_prompts
    if texts:
        return texts
    if sys.stdin.isatty():
        print("reading the prompt from stdin until end of file (Ctrl-D); --prompt TEXT gives it directly",
              file=sys.stderr)
    return [sys.stdin.read()]


def check_prompts(prompts, context: int, max_new: int) -> int:
    """Token lists against the model's context → max_new, cut (with a note) to the room the longest one leaves."""
    for i, p in enumerate(prompts):
        name = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        if not p:
            raise ValueError(f"{name} is empty: give at least one token")
        if len(p) >= context:
            raise ValueError(f"{name} has {len(p)} tokens; the model's context is {context}")
    longest = max(map(len, prompts))
    if context - longest < max_new:
        print(f"note: --max_new_tokens {max_new} cut to {context - longest}: the model's context holds {context} "
              f"tokens and the {'' if len(prompts) == 1 else 'longest '}prompt takes {longest}", file=sys.stderr)
    return min(max_new, context - longest)


class TextStream:
    """Writes one prompt and its continuation to stdout: the prompt with the first new token (so that an error
    before it comes alone), then each newly decodable piece of the text (a token may end inside a character)."""

    def __init__(self, tok, text: str, header: str = ""):
        self.tok, self.text, self.header = tok, text, header
        self.ids, self.shown = [], None  # shown: the text written so far (None: nothing yet)

    def __call__(self, t: int):
        if self.shown is None:
            self._start()
        if t == self.tok.eot:
            return
        self.ids.append(t)
        full = self.text + self.tok.decode(self.ids)
        if full.startswith(self.shown) and not full.endswith("\ufffd"):
            sys.stdout.write(full[len(self.shown):])
            sys.stdout.flush()
            self.shown = full

    def _start(self):
        sys.stdout.write(self.header + self.text)
        self.shown = self.text

    def finish(self):
        if self.shown is None:
            self._start()
        sys.stdout.write("\n")
        sys.stdout.flush()


def decode_reference(model, prompts, streams, max_new, args, eot):
    """generate() on one prompt after the other, streaming each. Returns (new tokens, summed stats)."""
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(args.seed)
    total, stats = 0, {"drafted": 0, "accepted": 0, "main_forwards": 0}
    for prompt, stream in zip(prompts, streams):
        try:
            out, st = generate(model, prompt, max_new, args.temperature, args.top_k or None, eot, gen,
                               args.speculative, stream)
        except RuntimeError as e:  # torch.multinomial refuses probabilities that are not finite
            if "probability tensor" not in str(e):
                raise
            raise ValueError(f"--temperature {args.temperature}: too small, the logits divided by it overflow "
                             f"(0 gives greedy decoding)" if args.temperature < 1e-30 else
                             "the model's next-token probabilities are not finite (a damaged checkpoint?)") from None
        stream.finish()
        total += len(out)
        stats = {k: stats[k] + st[k] for k in stats}
    return total, stats


def decode_static(model, prompts, streams, max_new, args, eot):
    """StaticDecoder on all prompts as one batch (greedy); the text is written once decoding is done."""
    dec = StaticDecoder(model, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + max_new,
                        compile=args.compile)
    try:
        rows, stats = dec.generate(prompts, max_new, speculative=args.speculative, eot=eot)
    finally:
        dec.close()
    for row, stream in zip(rows, streams):
        for t in row:
            stream(t)
        stream.finish()
    stats["path"] = (f"static, batch {len(prompts)}, {'CUDA graphs' if dec.graphs else 'no CUDA graphs'}"
                     + (", compiled" if dec.compile else ""))
    return sum(map(len, rows)), stats


def main(argv=None):
    """The command line. Exit status: 0 done (also when the reader of stdout goes away, as `| head` does), 2 a bad
    option or file (one line on stderr, nothing on stdout), 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    streams = []  # one TextStream per prompt; nothing reaches stdout before the first token, so errors come alone
    try:
        check_args(args)
        device = pick_device(args.device)
        model, tok = load_model(args.out_dir, args.hf_dir, device)
        texts = read_prompts(args)
        dtype = args.dtype if args.dtype != "auto" else \
            "bfloat16" if args.static and device.type == "cuda" else "float32"
        model = model.bfloat16() if dtype == "bfloat16" else model.float()  # (.to(dtype) would cast RoPE's table)
        prompts = [tok.encode(t) for t in texts]
        max_new = check_prompts(prompts, model.cfg.max_seq_len, args.max_new_tokens)
        streams = [TextStream(tok, t, f"==> prompt {i + 1} <==\n" if len(texts) > 1 else "")
                   for i, t in enumerate(texts)]
        decode = decode_static if args.static else decode_reference
        t0 = time.perf_counter()
        n_new, stats = decode(model, prompts, streams, max_new, args, tok.eot)
        dt = time.perf_counter() - t0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if any(s.shown is not None for s in streams):
            sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader is gone (`| head`): stop quietly; stdout must not be flushed at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    msg = f"{n_new} tokens in {dt:.2f} s ({n_new / dt:.1f} tokens/s, {stats['main_forwards']} main forwards)"
    if args.speculative:
        rate = stats["accepted"] / max(stats["drafted"], 1)
        msg += f"; MTP drafts accepted {stats['accepted']}/{stats['drafted']} ({100 * rate:.1f}%)"
    if "path" in stats:
        msg += f"; {stats['path']}"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _SIGINT_AT_START)  # from here on Ctrl-C does what it did before the imports
    sys.exit(main())
