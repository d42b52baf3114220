"""Static-cache decoding (static_decode.StaticDecoder) against the reference generate(): per-sequence positions give the
same logits as shared ones, a batch of prompts of different lengths gives each row's own greedy tokens, the
two-token speculative iteration gives the plain greedy tokens, and (GPU) the CUDA-graphed steps equal eager ones."""
import pytest
import torch

import generate as G
import static_decode as SD
from helpers import full_mtp_logits, tiny_config
from model import Transformer


def tiny_model(seed=0, dtype=torch.float64, device="cpu", **kw):
    torch.manual_seed(seed)
    model = Transformer(tiny_config(dict(vocab_size=61, max_seq_len=48, init_std=0.3), **kw)).to(device)
    # .double() / .bfloat16() / .float() cast the floating tensors only; .to(dtype) would also turn the complex
    # RoPE table real
    return {torch.float64: model.double, torch.bfloat16: model.bfloat16, torch.float32: model.float}[dtype]().eval()


def prompts_of(lengths, seed=0, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _step_args(prompts, device="cpu"):
    """x (B,) the last prompt tokens, n (B,) their positions: the inputs of one plain step."""
    return (torch.tensor([p[-1] for p in prompts], device=device),
            torch.tensor([len(p) - 1 for p in prompts], device=device))


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_per_sequence_positions_give_the_same_logits_as_one_shared_position(impl):
    model = tiny_model(1)
    idx = torch.randint(0, 61, (3, 9))
    model.setup_cache(3, 16, attn_impl=impl)
    ref = [model.forward_cached(idx[:, :6], 0)[0], model.forward_cached(idx[:, 6:], 6)[0]]  # (3, ·, V)
    model.setup_cache(3, 16, attn_impl=impl)
    zero = torch.zeros(3, dtype=torch.long)
    got = [model.forward_cached(idx[:, :6], zero)[0], model.forward_cached(idx[:, 6:], zero + 6)[0]]
    model.free_cache()
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, atol=1e-10, rtol=0)


def test_rows_at_different_positions_match_each_row_alone():
    model = tiny_model(2)
    idx = torch.randint(0, 61, (2, 10))
    starts = [3, 7]
    model.setup_cache(2, 16)
    model.forward_cached(idx[:, :8], torch.zeros(2, dtype=torch.long))  # prefill 8 positions of both rows
    got = model.forward_cached(torch.stack([idx[0, 3:5], idx[1, 7:9]]), torch.tensor(starts))[0]  # (2, 2, V)
    for b, s in enumerate(starts):
        model.setup_cache(1, 16)
        ref = model.forward_cached(idx[b:b + 1, :s + 2], 0)[0][0, s:s + 2]  # (2, V)
        assert torch.allclose(got[b], ref, atol=1e-10, rtol=0)
    model.free_cache()


@pytest.mark.parametrize("seed", [0, 1])
def test_static_greedy_equals_reference_for_a_batch_of_different_lengths(seed):
    model = tiny_model(seed)
    prompts = prompts_of([3, 9, 1, 6], seed)
    ref = [G.generate(model, p, 14)[0] for p in prompts]
    dec = SD.StaticDecoder(model, max_batch=4, max_seq_len=9 + 14, graphs=False)
    out, stats = dec.generate(prompts, 14)
    assert out == ref
    assert stats["main_forwards"] == 4 * 14 and stats["steps"] == 13
    single, _ = dec.generate(prompts[1:2], 14)  # fewer rows than max_batch
    dec.close()
    assert single == ref[1:2]


def test_static_decoder_cuts_at_eot_and_refuses_bad_input():
    model = tiny_model(3)
    prompts = prompts_of([4, 5], 3)
    dec = SD.StaticDecoder(model, max_batch=2, max_seq_len=20, graphs=False)
    full, _ = dec.generate(prompts, 10)
    eot = full[0][4]
    cut, _ = dec.generate(prompts, 10, eot=eot)
    assert cut[0] == full[0][:full[0].index(eot) + 1]
    for bad, words in (([], "non-empty"), ([[1], []], "non-empty"), ([[1]] * 3, "max_batch"),
                       ([[1] * 15], "cache length")):
        with pytest.raises(ValueError, match=words):
            dec.generate(bad, 10)
    dec.close()
    with pytest.raises(ValueError, match="MTP"):
        SD.StaticDecoder(tiny_model(3, n_mtp=0), 1, 20, graphs=False).generate([[1, 2]], 5, speculative=True)


class StaticDraftOracle:
    """Force the MTP drafts of the static path (right, wrong or mixed) while the real MTP module still runs:
    entry t of row b at position start_pos[b] + t drafts the token of position start_pos[b] + t + 2."""

    def __init__(self, model, streams, mode):
        self.real, self.streams, self.mode, self.calls = model.mtp_step, streams, mode, 0

    def __call__(self, h, next_idx, start_pos, depth=0):
        logits, hk = self.real(h, next_idx, start_pos, depth)
        forced = torch.full_like(logits, -1e9)
        B, T = next_idx.shape
        for b in range(B):
            for t in range(T):
                pos = int(start_pos[b]) + t + 2
                right = self.streams[b][pos] if pos < len(self.streams[b]) else 0
                self.calls += 1
                good = self.mode == "right" or (self.mode == "mixed" and self.calls % 3 != 0)
                forced[b, t, right if good else (right + 1) % logits.shape[-1]] = 0
        return forced, hk


@pytest.mark.parametrize("mode", ["real", "right", "wrong", "mixed"])
def test_static_speculative_is_token_identical_to_plain(mode):
    model = tiny_model(4)
    prompts = prompts_of([4, 7, 2], 4)
    dec = SD.StaticDecoder(model, max_batch=3, max_seq_len=7 + 17, graphs=False)
    plain, _ = dec.generate(prompts, 17)
    if mode != "real":
        model.mtp_step = StaticDraftOracle(model, [p + o for p, o in zip(prompts, plain)], mode)
    spec, stats = dec.generate(prompts, 17, speculative=True)
    dec.close()
    assert spec == plain
    assert 0 <= stats["accepted"] <= stats["drafted"]
    if mode == "right":  # two tokens per main forward: 16 tokens after the first in 8 iterations per row
        assert stats["accepted"] == stats["drafted"] == 3 * 8 and stats["main_forwards"] == 3 + 3 * 8
        assert stats["steps"] == 8
    if mode == "wrong":
        assert stats["accepted"] == 0 and stats["drafted"] == 3 * 16 and stats["steps"] == 16
    # each row drafts once per step it is active in; the slowest row is active in every step
    assert stats["drafted"] <= 3 * stats["steps"] and 8 <= stats["steps"] <= 16


@pytest.mark.gpu
@pytest.mark.parametrize("speculative", [False, True])
def test_cuda_graphs_give_the_eager_tokens_and_logits(speculative):
    # bf16: the grouped GEMM that keeps the segment sizes on the device (the fp32 loop reads them back)
    model = tiny_model(5, dtype=torch.bfloat16, device="cuda", dim=64, moe_inter_dim=64)
    prompts = prompts_of([5, 12, 3, 8], 5)
    eager = SD.StaticDecoder(model, max_batch=4, max_seq_len=40, graphs=False)
    want, _ = eager.generate(prompts, 20, speculative=speculative)
    x, n = _step_args(prompts, "cuda")
    want_logits = SD._plain_step(model, x, n)[0].clone()
    eager.close()
    graphed = SD.StaticDecoder(model, max_batch=4, max_seq_len=40, graphs=True)
    got, _ = graphed.generate(prompts, 20, speculative=speculative)
    again, _ = graphed.generate(prompts, 20, speculative=speculative)  # replays the captured graphs
    got_logits = graphed._step("plain", 4)(x, n)[0]
    graphed.close()
    assert got == want and again == want
    assert torch.allclose(got_logits.float(), want_logits.float(), atol=1e-2, rtol=1e-2)


def _compiler_available() -> bool:
    import shutil
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))  # torch.compile's CPU backend builds C++


@pytest.mark.parametrize("kind", ["plain", "spec"])
def test_bf16_decode_steps_trace_to_one_graph(kind):
    """What StaticDecoder(compile=True) compiles in bf16 is one whole graph: no graph break (the MoE's grouped GEMM
    keeps the segment sizes on the device, and the decoder probes it before any step is traced)."""
    model = tiny_model(7, dtype=torch.bfloat16)
    dec = SD.StaticDecoder(model, max_batch=3, max_seq_len=32, graphs=False, compile=True)
    x, n = _step_args(prompts_of([5, 9, 3], 7))
    if kind == "plain":
        fn, args = SD._plain_step, (x, n)
    else:
        fn, args = SD._speculative_iteration, (x, (x + 1) % 61, n, torch.ones(3, dtype=torch.bool))
    explained = torch._dynamo.explain(lambda *a: fn(model, *a))(*args)
    dec.close()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def _one_step_logits(model, prompts, compile_, graphs=False):
    """Prefill the prompts (eager), then one plain step (compiled or not) over that cache: its logits (B, V)."""
    dec = SD.StaticDecoder(model, max_batch=len(prompts), max_seq_len=32, graphs=graphs, compile=compile_)
    dec.prefill(prompts)
    x, n = _step_args(prompts, model.embed.weight.device)
    out = dec._step("plain", len(prompts))(x, n)[0].double().clone()
    dec.close()
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _compiler_available(), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_steps_give_the_eager_tokens_and_logits():
    """StaticDecoder(compile=True) on the CPU. float32 (the expert loop runs eagerly between compiled pieces): the
    compiled plain step and speculative iteration give the eager steps' tokens, and the logits of one step to
    float32 rounding. bf16 (one compiled graph): one step's logits are no further from the float32 step's than
    the eager bf16 step's are (twice their distance at most): fused kernels round differently, not worse."""
    prompts = prompts_of([5, 9, 3], 7)
    model = tiny_model(7, dtype=torch.float32)
    runs = []
    for compile_ in (False, True):
        dec = SD.StaticDecoder(model, max_batch=3, max_seq_len=32, graphs=False, compile=compile_)
        runs.append([dec.generate(prompts, 12, speculative=s)[0] for s in (False, True)])
        dec.close()
    assert runs[0] == runs[1] and runs[0][0] == runs[0][1]
    ref = _one_step_logits(model, prompts, False)
    torch.testing.assert_close(_one_step_logits(model, prompts, True), ref, atol=1e-5, rtol=1e-5)
    bf16 = tiny_model(7, dtype=torch.bfloat16)
    eager, compiled = ((_one_step_logits(bf16, prompts, c) - ref).abs().max() for c in (False, True))
    assert 0 < eager and compiled <= 2 * eager, (eager, compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_graphed_steps_on_gpu(speculative):
    """On the GPU: in float32 (no graphs: the fp32 MoE reads its segment sizes back) the compiled steps give the
    eager tokens; in bf16, compiled and captured, one step's logits are no further from the float32 step's than
    the eager bf16 step's are (twice their distance at most)."""
    model = tiny_model(6, dtype=torch.float32, device="cuda", dim=64, moe_inter_dim=64)
    prompts = prompts_of([4, 9], 6)
    runs = []
    for compile_ in (False, True):
        dec = SD.StaticDecoder(model, max_batch=2, max_seq_len=32, graphs=False, compile=compile_)
        runs.append(dec.generate(prompts, 16, speculative=speculative)[0])
        dec.close()
    assert runs[0] == runs[1]
    ref = _one_step_logits(model, prompts, False)
    bf16 = tiny_model(6, dtype=torch.bfloat16, device="cuda", dim=64, moe_inter_dim=64)
    eager = (_one_step_logits(bf16, prompts, False) - ref).abs().max()
    compiled = (_one_step_logits(bf16, prompts, True, graphs=True) - ref).abs().max()
    assert 0 < eager and compiled <= 2 * eager, (eager, compiled)


def test_static_speculative_mtp_entries_equal_a_full_mtp_pass(monkeypatch):
    """Every MTP entry the static speculative path computes for real tokens (the prompt's positions at the
    prefill; position n of an active row's iteration; n+1 too when the draft was accepted) has the logits of the
    MTP module run over the row's whole final sequence at once: the MTP cache holds the right next token at the
    right position. The greedy tokens cannot show this (a bad draft is only rejected, at the cost of speed)."""
    model = tiny_model(4, vocab_size=6)  # a 6-token vocabulary: the untrained MTP module's drafts are right at times
    prompts = prompts_of([4, 7, 2], 4, vocab=6)
    real_mtp, real_iter = model.mtp_step, SD._speculative_iteration
    calls, iters = [], []

    def mtp_spy(h, next_idx, start_pos, depth=0):
        logits, hk = real_mtp(h, next_idx, start_pos, depth)
        calls.append(logits.clone())
        return logits, hk

    def iter_spy(model_, x, draft, n, active):
        out = real_iter(model_, x, draft, n, active)
        iters.append((n.clone(), active.clone(), out[1].clone()))  # positions, active rows, tokens emitted
        return out

    model.mtp_step = mtp_spy
    monkeypatch.setattr(SD, "_speculative_iteration", iter_spy)
    dec = SD.StaticDecoder(model, max_batch=3, max_seq_len=7 + 17, graphs=False)
    out, _ = dec.generate(prompts, 17, speculative=True)
    dec.close()
    assert len(calls) == 1 + len(iters)  # the prefill's MTP pass, then one per iteration
    checked, kinds = 0, set()
    for b, (prompt, new) in enumerate(zip(prompts, out)):
        L = len(prompt) + len(new)
        full = full_mtp_logits(model, torch.tensor([prompt + new]))[0]  # (L-1, V)
        entries = [(0, t, t) for t in range(len(prompt))]  # (call, entry, position): the prefill's real positions
        for i, (n, active, step) in enumerate(iters):
            if active[b]:
                entries += [(i + 1, 0, int(n[b]))] + ([(i + 1, 1, int(n[b]) + 1)] if step[b] == 2 else [])
                kinds.add(int(step[b]))
        for call, t, pos in entries:
            if pos < L - 1:  # the full pass has no entry for the last token (its next one is not known)
                torch.testing.assert_close(calls[call][b, t], full[pos], rtol=0, atol=1e-9)
                checked += 1
    assert kinds == {1, 2} and checked > 40  # drafts both rejected and accepted


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--max_new_tokens", "-3"], "--max_new_tokens must be at least 1, got -3"),
    (["--prompt_tokens", "1000"], "--prompt_tokens 1000 leaves no room for new tokens in the model's max_seq_len"),
    (["--prompt_tokens", "200", "--max_new_tokens", "100"], "= 300 positions exceed the model's max_seq_len 256"),
])
def test_decode_bench_refuses_sizes_that_do_not_fit_in_one_line(argv, message, capsys):
    """decode_bench.py checks its sizes against each other and the model's positions before it decodes anything:
    one line on stderr and exit code 2 (the tiny preset has 256 positions)."""
    import decode_bench
    assert decode_bench.main(["--device", "cpu", "--random_preset", "tiny", "--no_reference", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_decode_bench_runs_a_model_without_mtp_without_speculative_rows(monkeypatch, capsys):
    """A checkpoint trained with --n_mtp 0 has no drafter: decode_bench.py times the plain paths and leaves the
    speculative rows out (it used to stop with a traceback at the first speculative call)."""
    import config
    import decode_bench
    monkeypatch.setattr(decode_bench, "get_preset", lambda name, **kw: config.get_preset(
        name, **({"n_mtp": 0} if name == "tiny" else {}), **kw))
    argv = ["--device", "cpu", "--random_preset", "tiny", "--batch", "2", "--prompt_tokens", "4",
            "--max_new_tokens", "4"]
    assert decode_bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "generate() float32, batch 1" in out and "StaticDecoder bf16, batch 2" in out
    assert "speculative" not in out and "plain step" in out
