"""Decoding: cached greedy == uncached greedy, speculative == plain, the acceptance rule keeps p."""
import os
import subprocess
import sys

import pytest
import torch

import generate as G
from helpers import full_mtp_logits, tiny_config
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(tiny_config(dict(vocab_size=61, max_seq_len=40, init_std=0.3), **kw)).double().eval()


def greedy_uncached(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_equals_uncached_greedy(seed):
    model = tiny_model(seed)
    prompt = torch.randint(0, 61, (5,)).tolist()
    out, stats = G.generate(model, prompt, 12)
    assert out == greedy_uncached(model, prompt, 12)
    assert stats["main_forwards"] == 12  # prefill + one forward per token after the first


class DraftOracle:
    """Replace MTP drafts by chosen tokens (right, wrong or mixed) while the real MTP module still runs."""

    def __init__(self, model, stream, mode):
        self.real, self.stream, self.mode, self.calls = model.mtp_step, stream, mode, 0

    def __call__(self, h, next_idx, start_pos, depth=0):
        logits, hk = self.real(h, next_idx, start_pos, depth)
        pos = start_pos + next_idx.shape[1] + 1  # the position whose token the last entry drafts
        right = self.stream[pos] if pos < len(self.stream) else 0
        self.calls += 1
        good = self.mode == "right" or (self.mode == "mixed" and self.calls % 3 != 0)
        tok = right if good else (right + 1) % logits.shape[-1]
        forced = torch.full_like(logits, -1e9)
        forced[..., tok] = 0
        return forced, hk


@pytest.mark.parametrize("mode", ["real", "right", "wrong", "mixed"])
def test_greedy_speculative_is_token_identical_to_plain(mode):
    model = tiny_model(3)
    prompt = torch.randint(0, 61, (4,)).tolist()
    plain, _ = G.generate(model, prompt, 25)
    if mode != "real":
        model.mtp_step = DraftOracle(model, prompt + plain, mode)
    spec, stats = G.generate(model, prompt, 25, speculative=True)
    assert spec == plain
    if mode == "right":
        assert stats["accepted"] == stats["drafted"] > 0 and stats["main_forwards"] < 16
    if mode == "wrong":
        assert stats["accepted"] == 0 and stats["drafted"] > 0


def test_speculative_mtp_cache_matches_a_full_mtp_pass():
    """The drafts made while decoding equal what the MTP module computes over the whole sequence at once."""
    model = tiny_model(4)
    prompt = torch.randint(0, 61, (6,)).tolist()
    seen = []
    real = model.mtp_step

    def spy(h, next_idx, start_pos, depth=0):
        logits, hk = real(h, next_idx, start_pos, depth)
        seen.append((start_pos + next_idx.shape[1] - 1, logits[0, -1].clone()))
        return logits, hk

    model.mtp_step = spy
    out, _ = G.generate(model, prompt, 15, speculative=True)
    full = full_mtp_logits(model, torch.tensor([prompt + out]))  # (1, T-1, V)
    assert len(seen) > 3
    for pos, logits in seen:
        assert torch.allclose(logits, full[0, pos], atol=1e-9)


def test_acceptance_rule_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 6, generator=g) * 1.5
    p = G.probs_from_logits(p_logits, 1.0)
    q = G.probs_from_logits(q_logits, 1.0)
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        tok, _ = G.verify_draft(p_logits, q_logits, draft, 1.0, None, g)
        counts[tok] += 1
    assert (counts / n - p).abs().max() < 0.015
    assert (q - p).abs().max() > 0.1  # the draft distribution really differs


def chi2_pvalue(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against the probabilities law: cells expecting fewer than 5 draws are
    pooled into one, so that the chi-square law holds; the p-value is the regularized upper gamma Q(dof/2, χ²/2)."""
    n = counts.sum()
    big = n * law >= 5
    c = torch.cat([counts[big], counts[~big].sum()[None]])
    e = torch.cat([n * law[big], (n * law[~big]).sum()[None]])
    c, e = c[e > 0], e[e > 0]
    chi2 = ((c - e) ** 2 / e).sum()
    return torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), chi2 / 2).item()


@pytest.mark.slow
def test_speculative_sampling_draws_from_the_main_models_law():
    """End to end: generate(speculative=True) at temperature 1 with top_k 3 (MTP drafts, verify_draft, the bonus
    token after an accepted draft, the cache rolled back after a rejection) draws three new tokens from the main
    model's own joint law, computed exactly over a 5-token vocabulary: chi-square tests of the (1st, 2nd) and the
    (2nd, 3rd) pairs over 1,500 draws, each at p > 1e-4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1,500 short decodes of a tiny model: threads only add overhead (98 s → 8 s, 2 cores)
    try:
        torch.manual_seed(7)
        model = Transformer(tiny_config(dict(vocab_size=5, max_seq_len=16, init_std=0.4))).double().eval()
        prompt, n = [1, 3, 0], 1500
        law = torch.ones(1, dtype=torch.float64)  # P(first j new tokens), flattened base 5
        with torch.no_grad():
            for j in range(3):
                prefixes = [[(i // 5 ** (j - 1 - k)) % 5 for k in range(j)] for i in range(5 ** j)]  # i in base 5
                nxt = torch.stack([G.probs_from_logits(model(torch.tensor([prompt + pre]))[0, -1], 1.0, 3)
                                   for pre in prefixes])  # (5^j, 5)
                law = (law[:, None] * nxt).flatten()  # (5^(j+1),)
        law = law.view(5, 5, 5)
        g = torch.Generator().manual_seed(123)
        counts, accepted = torch.zeros(5, 5, 5, dtype=torch.float64), 0
        for _ in range(n):
            out, stats = G.generate(model, prompt, 3, 1.0, 3, None, g, speculative=True)
            counts[tuple(out)] += 1
            accepted += stats["accepted"]
    finally:
        torch.set_num_threads(threads)
    assert counts[law == 0].sum() == 0  # nothing top-k cut away is ever drawn
    for dims in ((2,), (0,)):  # the (1st, 2nd) pair, then the (2nd, 3rd)
        p = chi2_pvalue(counts.sum(dims).flatten(), law.sum(dims).flatten())
        assert p > 1e-4, (dims, p)
    assert 100 < accepted < n - 100, accepted  # both branches of the acceptance test ran many times


def test_top_k_and_temperature():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = G.probs_from_logits(logits, 1.0, top_k=2)
    assert p[2] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    cold = G.probs_from_logits(logits, 0.1)
    assert cold[0] > 0.99


def test_bad_requests_raise():
    model = tiny_model(0)
    with pytest.raises(ValueError, match="context"):
        G.generate(model, list(range(40)), 5)
    with pytest.raises(ValueError, match="MTP"):
        G.generate(tiny_model(0, n_mtp=0), [1, 2], 5, speculative=True)
    for n in (0, -2):  # not one token, nor an error from deep inside the cache
        with pytest.raises(ValueError, match="at least one token"):
            G.generate(model, [1, 2, 3], n)


def test_a_draft_the_main_model_cannot_emit_is_never_accepted(monkeypatch):
    """p(d) = 0 (top-k cut d from the main model's law) rejects d whatever the uniform draw, 0 included: accepting
    on u·q(d) <= p(d) would let u = 0, which torch.rand can return, emit a token the main model never samples."""
    p_logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    q_logits = torch.tensor([0.0, 1.0, 2.0, 3.0])  # top-2 of q: tokens 2 and 3, both outside p's top-2
    monkeypatch.setattr(G.torch, "rand", lambda *a, **k: torch.zeros(()))
    tok, ok = G.verify_draft(p_logits, q_logits, 3, 1.0, 2, torch.Generator().manual_seed(0))
    assert not ok and tok in (0, 1)


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_cli_missing_and_corrupt_checkpoint(tmp_path):
    r = run_cli("--out_dir", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error: generate: no checkpoint") and "Traceback" not in r.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = run_cli("--out_dir", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def save_ckpt(path, model, tokenizer_name):
    """A checkpoint with the keys train.py writes (model, config, tokenizer) and that generate.py reads."""
    from config import config_to_dict
    torch.save({"model": model.state_dict(), "config": config_to_dict(model.cfg), "tokenizer": tokenizer_name,
                "step": 0}, path)


@pytest.mark.slow
def test_cli_samples_from_a_checkpoint(tmp_path):
    import data
    model = tiny_model(5, vocab_size=300).float()
    save_ckpt(tmp_path / "ckpt.pt", model, data.get_tokenizer(300).name)
    r = run_cli("--out_dir", str(tmp_path), "--prompt", "def f(x):", "--max_new_tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(x):") and len(r.stdout) > len("def f(x):\n")
    assert "8 tokens" in r.stderr
    r2 = run_cli("--out_dir", str(tmp_path), "--prompt", "def f(x):", "--max_new_tokens", "8", "--temperature", "0",
                 "--speculative")
    assert r2.returncode == 0 and r2.stdout == r.stdout and "MTP drafts accepted" in r2.stderr
    r3 = run_cli("--out_dir", str(tmp_path), "--max_new_tokens", "4", stdin="import os\n")  # prompt from stdin
    assert r3.returncode == 0 and r3.stdout.startswith("import os\n")


@pytest.mark.slow
def test_cli_rejects_mismatched_checkpoint_and_long_prompt(tmp_path):
    import data
    from config import config_to_dict
    model = tiny_model(6, vocab_size=300).float()
    save_ckpt(tmp_path / "ckpt.pt", model, data.get_tokenizer(300).name)
    r = run_cli("--out_dir", str(tmp_path), "--prompt", "x " * 100)  # more tokens than max_seq_len = 40
    assert r.returncode == 2 and "context" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"] = config_to_dict(tiny_model(6, vocab_size=300, dim=48).cfg)  # weights of another config
    torch.save(ckpt, tmp_path / "ckpt.pt")
    r = run_cli("--out_dir", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "does not match" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_hf_dir_round_trip_and_foreign_vocabulary(tmp_path):
    from hf_io import save_hf_checkpoint
    model = tiny_model(7, vocab_size=300).float()
    save_hf_checkpoint(model, tmp_path / "hf")
    save_ckpt(tmp_path / "ckpt.pt", model, "cl100k_base[:299]+eot")
    args = ("--prompt", "x = 1", "--max_new_tokens", "6", "--temperature", "0")
    r_hf, r_ck = run_cli("--hf_dir", str(tmp_path / "hf"), *args), run_cli("--out_dir", str(tmp_path), *args)
    assert r_hf.returncode == 0 and r_hf.stdout == r_ck.stdout
    big = tiny_model(7, vocab_size=129280).float()  # the released V3 vocabulary: not a cl100k_base prefix
    save_hf_checkpoint(big, tmp_path / "v3vocab")
    r = run_cli("--hf_dir", str(tmp_path / "v3vocab"), *args)
    assert r.returncode == 2 and "vocabulary of 129280" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def ckpt_dir(tmp_path):
    import data
    save_ckpt(tmp_path / "ckpt.pt", tiny_model(5, vocab_size=300).float(), data.get_tokenizer(300).name)
    return str(tmp_path)


def test_cli_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        G.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--max_new_tokens", 200), ("--temperature", 0.8), ("--top_k", 50), ("--seed", 1337),
                          ("--out_dir", "out"), ("--device", "auto"), ("--dtype", "auto")]:
        described = out.rsplit(f"{flag} ", 1)[1]  # the option's own line in the help, not the usage line
        assert described.split("(default: ", 1)[1].split(")")[0] == str(default), flag
    assert out.count("(default: ") == 13


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0 (0 = greedy)"),
    (["--temperature", "inf"], "--temperature inf: must be a finite number >= 0 (0 = greedy)"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
    (["--temperature", "1e-40"], "--temperature 1e-40: too small, the logits divided by it overflow"),
    (["--top_k", "-1"], "--top_k -1: must be >= 0 (0 = no top-k cut)"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
    (["--prompt", "x " * 100], "prompt 2 has 200 tokens; the model's context is 40"),
    (["--prompt", ""], "prompt 2 is empty: give at least one token"),
    (["--static"], "--static decodes greedily only: add --temperature 0 (sampling with --temperature 0.8 runs "
                   "without --static)"),
    (["--prompts_file", "no/such/file"], "--prompts_file no/such/file: no such file"),
    (["--compile"], "--compile compiles the static path's decode steps: add --static"),
])
def test_cli_errors_name_the_flag_and_print_no_prompt(ckpt_dir, capsys, argv, message):
    assert G.main(["--out_dir", ckpt_dir, "--prompt", "def f(x):", "--max_new_tokens", "5", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1


def cli_output(capsys, *argv):
    assert G.main(list(argv)) == 0
    return capsys.readouterr()


@pytest.mark.parametrize("extra", [[], ["--speculative"]])
def test_cli_static_path_prints_the_reference_text(ckpt_dir, capsys, extra):
    """--static (StaticDecoder, all prompts in one batch) writes what the reference writes, prompt by prompt."""
    base = ["--out_dir", ckpt_dir, "--temperature", "0", "--max_new_tokens", "12", *extra]
    for prompts in (["def f(x):"], ["def f(x):", "import", "class A(object):\n    x ="]):
        argv = base + [a for p in prompts for a in ("--prompt", p)]
        ref = cli_output(capsys, *argv)
        fast = cli_output(capsys, *argv, "--static")
        assert fast.out == ref.out
        assert ref.out.count("==> prompt ") == (len(prompts) if len(prompts) > 1 else 0)
        for p in prompts:
            assert p in ref.out
        assert f"{12 * len(prompts)} tokens in " in ref.err and f"{12 * len(prompts)} tokens in " in fast.err
        assert f"static, batch {len(prompts)}, no CUDA graphs" in fast.err and "static" not in ref.err


def test_cli_prompts_file_equals_repeated_prompt(ckpt_dir, capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\n\nimport os\n")  # one prompt per non-empty line
    base = ["--out_dir", ckpt_dir, "--temperature", "0", "--max_new_tokens", "5"]
    from_file = cli_output(capsys, *base, "--prompts_file", str(path))
    from_flags = cli_output(capsys, *base, "--prompt", "def f(x):", "--prompt", "import os")
    assert from_file.out == from_flags.out and from_file.out.startswith("==> prompt 1 <==\ndef f(x):")
    path.write_text("\n  \n")
    assert G.main([*base, "--prompts_file", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: --prompts_file {path}: no prompt in it (one per non-empty line)\n"


def test_cli_top_k_0_is_off_and_max_new_tokens_is_cut(ckpt_dir, capsys, monkeypatch):
    seen = []
    real = G.probs_from_logits
    monkeypatch.setattr(G, "probs_from_logits", lambda logits, t, k=None: seen.append(k) or real(logits, t, k))
    assert G.main(["--out_dir", ckpt_dir, "--prompt", "def f(x):", "--top_k", "0", "--max_new_tokens", "1000"]) == 0
    out, err = capsys.readouterr()
    n = len(G.load_model(ckpt_dir)[1].encode("def f(x):"))
    assert f"note: --max_new_tokens 1000 cut to {40 - n}: the model's context holds 40 tokens and the prompt " \
           f"takes {n}" in err
    assert f"{40 - n} tokens in " in err and out.startswith("def f(x):")
    assert seen and set(seen) == {None}  # no top-k cut


def test_cli_ctrl_c_and_a_prompt_from_a_terminal(ckpt_dir, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def interrupted(model, prompt, n, *a):
        a[-1](prompt[0])  # one token streamed, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "generate", interrupted)
    monkeypatch.setattr("sys.stdin", Terminal("import os"))
    assert G.main(["--out_dir", ckpt_dir, "--max_new_tokens", "5"]) == 130
    out, err = capsys.readouterr()
    assert err == ("reading the prompt from stdin until end of file (Ctrl-D); --prompt TEXT gives it directly\n"
                   "interrupted\n")
    assert out.startswith("import os") and out.endswith("\n")


@pytest.mark.slow
def test_cli_into_a_closed_pipe_exits_quietly(ckpt_dir):
    """`generate.py | head`: once the reader is gone, stop without a traceback or a message."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--out_dir", ckpt_dir, "--prompt",
                          "def f(x):", "--max_new_tokens", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT)
    p.stdout.close()  # the reader goes away before the first token
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == ""


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, generator=g, dtype=torch.float64) * 2
    for k in (1, 3, 9):
        got = G.probs_from_logits(logits, 0.7, top_k=k)
        top = logits.topk(k).indices
        want = torch.zeros(10, dtype=torch.float64)
        want[top] = torch.softmax(logits[top] / 0.7, -1)  # the k largest, renormalised after the temperature
        assert int((got > 0).sum()) == k
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_acceptance_rule_with_temperature_and_top_k_preserves_the_target_distribution():
    """As test_acceptance_rule_preserves_the_target_distribution, at temperature 0.6 with top_k 4 of 8 tokens: with
    the draft drawn as generate() draws it (pick on the MTP logits), the output law is the main model's own law
    after the same temperature and top-k (computed here from the logits)."""
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 8, generator=g) * 1.5
    temp, k = 0.6, 4
    top = p_logits.topk(k).indices
    p = torch.zeros(8)
    p[top] = torch.softmax(p_logits[top] / temp, -1)
    n = 20000
    counts = torch.zeros(8)
    for _ in range(n):
        draft = G.pick(q_logits, temp, k, g)
        tok, _ = G.verify_draft(p_logits, q_logits, draft, temp, k, g)
        counts[tok] += 1
    assert (counts / n - p).abs().max() < 0.015  # the mistakes this catches are off by 0.04 (q without top-k) or more


def test_generate_fills_the_context_and_stops_there():
    """A request past the end of the context gets the tokens that fit (max_seq_len − len(prompt)), plain or
    speculative, and they are the greedy ones."""
    model = tiny_model(0)  # max_seq_len 40
    prompt = torch.randint(0, 61, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    want = greedy_uncached(model, prompt, 3)
    for speculative in (False, True):
        out, _ = G.generate(model, prompt, 10, speculative=speculative)
        assert out == want


def test_cli_prompts_file_that_is_a_folder_or_unreadable_is_one_line(ckpt_dir, capsys, tmp_path, monkeypatch):
    assert G.main(["--out_dir", ckpt_dir, "--prompts_file", str(tmp_path), "--max_new_tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: --prompts_file {tmp_path}: a folder, not a file\n"
    locked = tmp_path / "prompts.txt"
    locked.write_text("def \n")
    real_open = open

    def no_permission(path, *a, **kw):  # what a file without read permission gives (root reads any file here)
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", no_permission)
    assert G.main(["--out_dir", ckpt_dir, "--prompts_file", str(locked), "--max_new_tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: --prompts_file {locked}: cannot read it (Permission denied)\n"


def test_cli_prompt_that_fills_the_context_is_refused(ckpt_dir, capsys):
    """A prompt of exactly max_seq_len tokens leaves no room for one new token: one line, exit 2."""
    tok = G.load_model(ckpt_dir)[1]
    text = "x " * 20
    assert len(tok.encode(text)) == 40  # the model's context
    assert G.main(["--out_dir", ckpt_dir, "--prompt", text, "--max_new_tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: the prompt has 40 tokens; the model's context is 40\n"


def test_cli_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    assert G.main(["--out_dir", str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == (f"error: generate: no checkpoint at {tmp_path / 'ckpt.pt'} (train one first: "
                                       f"python train.py --out_dir {tmp_path})\n")


def test_cli_refuses_a_checkpoint_of_another_tokenizer(ckpt_dir, capsys):
    """Weights trained on another tokenizer's ids would decode to garbage: refused in one line."""
    import data
    path = os.path.join(ckpt_dir, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["tokenizer"] = "gpt2"
    torch.save(ckpt, path)
    assert G.main(["--out_dir", ckpt_dir, "--prompt", "x", "--max_new_tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: checkpoint tokenizer 'gpt2' is not {data.get_tokenizer(300).name!r}\n"
