"""Static-cache decoding: batched greedy decoding over a fixed-size latent cache, each step one CUDA graph, with
MTP self-speculative verification (DeepSeek-V3 report §2.2, "MTP in inference"). The fast path of generate.py.

generate.generate is the reference: one sequence, Python ints for positions, a host round trip per token (the
pick, the acceptance test). StaticDecoder computes the same greedy tokens for a batch of B prompts of any lengths:
every row keeps its own position n_b in a (B,) tensor, the MLA latent cache (kv_norm(c^KV) and the roped k^R,
d_c + d^R_h values per token) is allocated once, max_batch × max_seq_len, and each step attends over all of it
under a mask (mla.MLA._write_cache_at), so every step has the same shapes and reads nothing back to the host (on a
GPU the fused kernel of mla_decode.py takes the mask as positions and stops reading at the newest visible one).
On a GPU one step is then captured once as a CUDA graph (GraphedStep) and replayed: one launch per token instead
of hundreds. With compile=True each step is torch.compiled (static shapes) before it is captured, so the graph
replays fused kernels. Prompts are right-padded; a row's padding sits after its last token, so no real token
attends to it, and decoding overwrites it.

Speculative decoding here costs one main forward per iteration, over two tokens [x_n, d] (d = the MTP draft of
x_{n+1}), and one MTP forward over the same two positions, which drafts for both outcomes at once: if d is
accepted the MTP entry of position n+1 drafts x_{n+3}, else the entry of position n drafts x_{n+2} (the entry
at n+1 is overwritten next time). Greedy only (accept iff d == argmax p_n): the output equals plain greedy
decoding, and an accepted draft yields two tokens for one main forward. generate.py's header gives the sampling
acceptance rule, which only the reference runs.

tests/test_decode.py checks StaticDecoder against generate.generate; decode_bench.py times both;
`python generate.py --static --temperature 0` runs it from the command line.
"""
import torch

from mla_decode import kernel_available
from moe import grouped_mm_supported


class GraphedStep:
    """fn(*tensors) → tuple of tensors, run eagerly or replayed from a CUDA graph captured at the first call.

    Replay copies the arguments into the captured input buffers; the returned tensors are the graph's own output
    buffers, overwritten by the next replay (clone what must outlive it). fn must not read anything back to the
    host. The first call runs fn once on a side stream before capture, so lazy set-up (library handles, the
    grouped-GEMM probe) stays out of the graph."""

    def __init__(self, fn, use_graph: bool):
        self.fn, self.use_graph, self.graph = fn, use_graph, None

    def __call__(self, *args):
        if not self.use_graph:
            return self.fn(*args)
        if self.graph is None:
            self.inputs = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(*self.inputs)  # warm-up; the cache writes it makes are the ones the replay makes again
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn(*self.inputs)
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.outputs


def _plain_step(model, x, n):
    """x (B,) the tokens at positions n (B,) → (logits (B, V) of the next tokens, greedy next tokens (B,))."""
    logits, _ = model.forward_cached(x[:, None], n)  # (B, 1, V)
    return logits[:, -1], logits[:, -1].argmax(-1)


def _speculative_iteration(model, x, draft, n, active):
    """One verify-and-draft iteration for every row (greedy). x (B,) tokens at positions n, draft (B,) the MTP
    guess for n+1, active (B,) bool: rows still decoding (the others keep their state).

    Returns p (B, 2) the main model's greedy tokens for n+1 and n+2, step (B,) how many of them row b emits
    (2 if the draft was right, 1 if not, 0 if inactive), and the next x, draft and n."""
    S = model.layers[0].attn.kv_cache.shape[1]
    at = torch.where(active, n, n.clamp(max=S - 2))  # a finished row may have run past its cache: park it
    logits, h = model.forward_cached(torch.stack([x, draft], 1), at)  # (B, 2, V): one forward, two positions
    p = logits.argmax(-1)  # (B, 2)
    ok = (p[:, 0] == draft) & active  # the draft is what the main model picks: p[:, 1] is valid too
    q, _ = model.mtp_step(h, p, at)  # MTP entries (h_n, p_n), (h_n+1, p_n+1) → drafts for n+2 and n+3
    d = q.argmax(-1)  # (B, 2)
    step = active.long() * (1 + ok.long())  # (B,)
    new_x = torch.where(ok, p[:, 1], torch.where(active, p[:, 0], x))
    new_draft = torch.where(ok, d[:, 1], torch.where(active, d[:, 0], draft))
    return p, step, new_x, new_draft, n + step


class StaticDecoder:
    """Greedy decoding of batches of prompts over a latent cache allocated once (max_batch × max_seq_len).

    graphs: capture each step as a CUDA graph (default: on CUDA). The graphs hold the cache's addresses: do not
    call model.setup_cache / free_cache / generate.generate() while a StaticDecoder is in use; close() frees the
    cache.
    compile: torch.compile each step (static shapes) before it is captured, so that the graph replays fused
    kernels instead of the eager step's many small ones; the first call of each step kind and batch size then
    compiles (tens of seconds). torch keeps at most torch._dynamo.config.recompile_limit (8) compiled variants of
    a step function per process; further batch sizes run uncompiled, with a warning from torch. In bf16 the MoE
    runs the grouped GEMM and the whole step is one compiled graph (a test); its fused kernels round differently,
    so a near-tied argmax can pick another token than the eager step. In fp32 the expert loop reads the segment
    sizes back, so it runs eagerly between compiled pieces; the tokens are the eager ones (a test).
    attn_impl: the MLA path (mla.MLA.attn_impl); default "fused" (mla_decode.py's kernel) where it runs (CUDA and
    Triton), "absorb" elsewhere."""

    def __init__(self, model, max_batch: int, max_seq_len: int = None, graphs: bool = None, compile: bool = False,
                 attn_impl: str = None):
        self.model, self.max_batch, self.compile = model, max_batch, compile
        self.max_seq_len = max_seq_len or model.cfg.max_seq_len
        self.device = model.embed.weight.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        dtype = model.embed.weight.dtype
        # probed here, before any step runs: inside a compiled step the probe would split the graph
        grouped = not model.moe_layers() or grouped_mm_supported(self.device, dtype)
        if self.graphs and not grouped:
            if graphs:  # the MoE would loop over experts, reading the segment sizes back on every step
                raise ValueError(f"CUDA graphs need the grouped GEMM for {dtype} on {self.device} (use bf16)")
            self.graphs = False
        self.attn_impl = attn_impl or ("fused" if kernel_available(self.device) else "absorb")
        model.setup_cache(max_batch, self.max_seq_len, attn_impl=self.attn_impl)
        self.steps = {}  # (kind, batch) → GraphedStep

    def close(self):
        self.model.free_cache()
        self.steps = {}

    def _step(self, kind, B):
        if (kind, B) not in self.steps:
            fn = _plain_step if kind == "plain" else _speculative_iteration
            step = (lambda *a: fn(self.model, *a))
            if self.compile:  # shapes fixed (dynamic=False): each kind and batch size compiles once (see above)
                step = torch.compile(step, dynamic=False)
            self.steps[kind, B] = GraphedStep(step, self.graphs)
        return self.steps[kind, B]

    def _check(self, prompts, max_new_tokens, speculative):
        if not isinstance(prompts, (list, tuple)) or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed the decoder's max_batch {self.max_batch}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the cache "
                             f"length {self.max_seq_len}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if speculative and self.model.cfg.n_mtp == 0:
            raise ValueError("speculative decoding needs a model with MTP modules (n_mtp >= 1)")

    @torch.no_grad()
    def prefill(self, prompts):
        """All prompts in one forward from position 0 (right-padded) → (ids (B, T), hidden (B, T, d),
        index of each last prompt token (B,), first new token x (B,), logits of x (B, V))."""
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p, device=self.device)
        logits, h = self.model.forward_cached(ids, torch.zeros(B, dtype=torch.long, device=self.device))
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # (B,)
        rows = torch.arange(B, device=self.device)
        return ids, h, last, logits[rows, last].argmax(-1), logits[rows, last]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, speculative: bool = False, eot: int = None):
        """prompts: B lists of token ids. Returns (B lists of up to max_new_tokens new ids, each cut after its
        first eot, stats). Greedy; stats as generate()'s, summed over the rows, and "steps": the batched steps
        after the prefill (what the call's time is made of): max_new_tokens − 1 plain, or the speculative
        iterations, which run until the row with the fewest accepted drafts has all its tokens."""
        self._check(prompts, max_new_tokens, speculative)
        B = len(prompts)
        ids, h, last, x, _ = self.prefill(prompts)
        n = last + 1  # (B,) position of x
        if speculative and max_new_tokens > 1:
            rows = self._speculative(ids, h, last, x, n, max_new_tokens)
            stats = self.last_stats
        else:
            step, toks = self._step("plain", B), [x]
            for _ in range(max_new_tokens - 1):
                x = step(x, n)[1].clone()
                n = n + 1
                toks.append(x)
            rows = torch.stack(toks, 1).tolist()  # the only read-back: once, at the end
            stats = {"drafted": 0, "accepted": 0, "main_forwards": max_new_tokens * B, "steps": max_new_tokens - 1}
        outs = []
        for r in rows:
            r = r[:max_new_tokens]
            outs.append(r[:r.index(eot) + 1] if eot is not None and eot in r else r)
        return outs, stats

    def _speculative(self, ids, h, last, x, n, max_new):
        B = ids.shape[0]
        rows = torch.arange(B, device=self.device)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # (B, T): the token one ahead of each position ...
        nxt[rows, last] = x  # ... the last prompt position's being the first new token
        q, _ = self.model.mtp_step(h, nxt, torch.zeros_like(n))  # MTP cache over the prompt
        draft = q[rows, last].argmax(-1)  # (B,) guess for position n+1
        it = self._step("spec", B)
        emitted = torch.ones(B, dtype=torch.long, device=self.device)
        first, record, iters = x, [], 0
        while True:
            behind = max_new - int(emitted.min())  # a host sync, a few times per call, not per token
            if behind <= 0:
                break
            for _ in range(max(1, behind // 2)):  # at most 2 tokens an iteration: no row overshoots by much
                active = emitted < max_new  # a row that is done stays where it is (its cache cannot overflow)
                p, step, x, draft, n = (t.clone() for t in it(x, draft, n, active))
                emitted += step
                record.append((p, step))
                iters += 1
        P = torch.stack([p for p, _ in record]).tolist()  # (I, B, 2)
        S = torch.stack([s for _, s in record]).tolist()  # (I, B)
        out = []
        for b, f in enumerate(first.tolist()):
            toks = [f]
            for i in range(iters):
                toks += P[i][b][:S[i][b]]
            out.append(toks)
        drafted = sum(1 for i in range(iters) for b in range(B) if S[i][b] > 0)
        accepted = sum(1 for i in range(iters) for b in range(B) if S[i][b] == 2)
        self.last_stats = {"drafted": drafted, "accepted": accepted, "main_forwards": B + drafted, "steps": iters}
        return out
