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

    python generate.py --out_dir out --prompt "def " --max_new_tokens 200 [--speculative]
"""
import argparse
import math
import os
import sys
import time

import torch

from checkpoint import load_checkpoint, pick_device
from config import config_from_dict
from model import Transformer


# -- sampling ----------------------------------------------------------------------------------------------
def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int = None) -> torch.Tensor:
    """(V,) logits → (V,) sampling distribution after temperature and top-k. temperature must be > 0."""
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
    u = torch.rand((), generator=gen, device=p.device)
    if u * q[draft] <= p[draft]:  # accept with probability min(1, p/q)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out", help="directory holding train.py's ckpt.pt")
    p.add_argument("--hf_dir", default=None, help="load a Hugging Face DeepSeek-V3 layout directory instead")
    p.add_argument("--prompt", default=None, help="prompt text; without it the prompt is read from stdin")
    p.add_argument("--max_new_tokens", type=int, default=200,
                   help="tokens to generate at most (cut, with a note, to the room left in the model's context)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0 = among all")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    return p


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top_k {args.top_k}: must be >= 0 (0 = no top-k cut)")


def main(argv=None):
    """The command line. Exit status: 0 done (also when the reader of stdout goes away, as `| head` does), 2 a bad
    option or file (one line on stderr, nothing on stdout), 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    printed = []  # the text written to stdout so far: nothing until the first token, so errors come alone
    try:
        check_args(args)
        device = pick_device(args.device)
        model, tok = load_model(args.out_dir, args.hf_dir, device)
        if args.prompt is None and sys.stdin.isatty():
            print("reading the prompt from stdin until end of file (Ctrl-D); --prompt TEXT gives it directly",
                  file=sys.stderr)
        text = args.prompt if args.prompt is not None else sys.stdin.read()
        prompt = tok.encode(text)
        if not prompt:  # before the note on --max_new_tokens, so that the error comes alone
            raise ValueError("the prompt is empty: give --prompt TEXT or the text on stdin")
        room = model.cfg.max_seq_len - len(prompt)
        max_new = args.max_new_tokens
        if 0 < room < max_new:
            print(f"note: --max_new_tokens {max_new} cut to {room}: the model's context holds "
                  f"{model.cfg.max_seq_len} tokens and the prompt takes {len(prompt)}", file=sys.stderr)
            max_new = room
        gen = torch.Generator(device=device).manual_seed(args.seed)
        new_ids = []

        def on_token(t):  # stream: the prompt first, then the newly decodable part of the text
            if not printed:
                sys.stdout.write(text)
                printed.append(text)
            if t == tok.eot:
                return
            full = text + tok.decode(new_ids + [t])
            new_ids.append(t)
            if full.startswith(printed[-1]) and not full.endswith("\ufffd"):
                sys.stdout.write(full[len(printed[-1]):])
                sys.stdout.flush()
                printed.append(full)

        t0 = time.perf_counter()
        try:
            out, stats = generate(model, prompt, max_new, args.temperature, args.top_k or None, tok.eot, gen,
                                  args.speculative, on_token)
        except RuntimeError as e:  # torch.multinomial refuses probabilities that are not finite
            if "probability tensor" not in str(e):
                raise
            raise ValueError(f"--temperature {args.temperature}: too small, the logits divided by it overflow "
                             f"(0 gives greedy decoding)" if args.temperature < 1e-30 else
                             "the model's next-token probabilities are not finite (a damaged checkpoint?)") from None
        dt = time.perf_counter() - t0
        if not printed:
            sys.stdout.write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if printed:
            sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader is gone (`| head`): stop quietly; stdout must not be flushed at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    msg = f"{len(out)} tokens in {dt:.2f} s ({len(out) / dt:.1f} tokens/s, {stats['main_forwards']} main forwards)"
    if args.speculative:
        rate = stats["accepted"] / max(stats["drafted"], 1)
        msg += f"; MTP drafts accepted {stats['accepted']}/{stats['drafted']} ({100 * rate:.1f}%)"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
