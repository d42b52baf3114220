"""train.py: exact resume (also after Ctrl-C, SIGTERM and kill -9, weights and log), the run folder (refusal,
--overwrite, lock), non-finite loss, full disk, LR schedule, FLOP count, one-line user errors. Every run uses a tiny
model on a small generated text, so each takes about a second."""
import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import train
import train_setup
from adamw_bf16 import AdamWBF16
from config import get_preset
from helpers import TINY_ARGS
from model import Transformer, count_params, matmul_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The schedule is given explicitly, so that a 6-step run resumed to 12 steps has the schedule of a 12-step run (by
# default warmup and decay follow the first run's --max_iters: test_lr_schedule_follows_max_iters_unless_given).
RUN = ["--batch_size", "4", "--block_size", "16", "--lr", "2e-3", "--warmup_iters", "3", "--lr_decay_iters", "20",
       "--min_lr", "1e-4", "--eval_iters", "2", "--log_interval", "1", "--device", "cpu"]


def run(out_dir, corpus_args, *extra):
    return train.main(["--out_dir", str(out_dir), *corpus_args, *TINY_ARGS, *RUN, *extra])


def resolve(*argv) -> argparse.Namespace:
    """train.py's options as setup() resolves them (no checkpoint)."""
    return train_setup.resolve_args(train_setup.build_parser().parse_args(list(argv)))


def load(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus_args):
    """12 steps in one go, evaluating only at the end."""
    out = tmp_path_factory.mktemp("straight")
    assert run(out, corpus_args, "--max_iters", "12", "--eval_interval", "12") == 0
    return load(out)


def test_resume_is_bit_identical(tmp_path, corpus_args, straight):
    # 6 steps, evaluating (and saving) every 2; then resume: every option comes back from the checkpoint.
    assert run(tmp_path, corpus_args, "--max_iters", "6", "--eval_interval", "2") == 0
    assert load(tmp_path)["step"] == 6
    # --device is not taken from the checkpoint (a run may move machines): pin it, or a GPU host resumes on CUDA.
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--max_iters", "12", "--device", "cpu"]) == 0
    ckpt = load(tmp_path)
    assert ckpt["step"] == 12 and ckpt["args"]["lr"] == 2e-3 and ckpt["tokenizer"] == "cl100k_base[:511]+eot"
    assert_same_state(ckpt["model"], straight["model"])  # gate bias buffers b_i included
    assert any(k.endswith("gate.bias") for k in ckpt["model"])
    assert torch.equal(ckpt["rng"]["data"], straight["rng"]["data"])
    # evaluation ran 6 times here and once there: it did not touch the training RNG or data order.


def test_bf16_moments_train_and_resume_exactly(tmp_path, corpus_args, straight):
    """--bf16_moments: AdamW's moments in bf16 (report §3.3.3), saved as bf16, resumed bit-identically; the weights
    end near the fp32-moment run's but not equal to them."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, corpus_args, "--bf16_moments", "--max_iters", "12", "--eval_interval", "12") == 0
    assert run(b, corpus_args, "--bf16_moments", "--max_iters", "6", "--eval_interval", "6") == 0
    assert train.main(["--out_dir", str(b), "--resume", "--max_iters", "12", "--device", "cpu"]) == 0
    ca, cb = load(a), load(b)
    assert cb["args"]["bf16_moments"] is True                     # restored from the checkpoint on resume
    assert_same_state(ca["model"], cb["model"])
    moments = [t for st in ca["optimizer"]["state"].values() for k, t in st.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    w, w32 = ca["model"]["embed.weight"], straight["model"]["embed.weight"]
    assert not torch.equal(w, w32) and (w - w32).abs().max() < 0.1 * (w32.abs().max())


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, corpus_args, straight, monkeypatch, capsys):
    """Ctrl-C in step 8 after its batch was drawn (the data generator has moved on): the checkpoint holds the state
    at the end of step 7, so the resumed run draws step 8's batch again and ends with the straight run's weights."""
    real, calls = data.Corpus.get_batch, []

    def get_batch(self, split, *a, **kw):
        batch = real(self, split, *a, **kw)
        if split == "train":
            calls.append(1)
            if len(calls) == 8:
                raise KeyboardInterrupt
        return batch

    monkeypatch.setattr(data.Corpus, "get_batch", get_batch)
    assert run(tmp_path, corpus_args, "--max_iters", "12", "--eval_interval", "100") == 130
    assert "interrupted: saved step 7" in capsys.readouterr().err
    assert load(tmp_path)["step"] == 7
    monkeypatch.setattr(data.Corpus, "get_batch", real)
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--device", "cpu"]) == 0  # max_iters 12 from the ckpt
    assert_same_state(load(tmp_path)["model"], straight["model"])


def test_ctrl_c_pressed_again_during_the_save(tmp_path, corpus_args, monkeypatch, capsys):
    """An impatient second Ctrl-C while the interrupted run writes its checkpoint: the write finishes, the run exits
    130 with its one line, no traceback."""
    import signal
    real_batch, real_save, calls = data.Corpus.get_batch, torch.save, []

    def get_batch(self, split, *a, **kw):
        calls.append(split)
        if len(calls) == 4:  # in step 4: saves step 3
            raise KeyboardInterrupt
        return real_batch(self, split, *a, **kw)

    def save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the file is being written
        return real_save(obj, f)

    monkeypatch.setattr(data.Corpus, "get_batch", get_batch)
    monkeypatch.setattr(torch, "save", save)
    try:
        rc = run(tmp_path, corpus_args, "--max_iters", "10")
    except KeyboardInterrupt:  # caught here, or it would stop pytest itself
        pytest.fail("the second Ctrl-C escaped train.main")
    monkeypatch.undo()
    assert rc == 130
    assert capsys.readouterr().err == f"interrupted: saved step 3 to {tmp_path / 'ckpt.pt'} (continue with --resume)\n"
    assert load(tmp_path)["step"] == 3 and sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "log.jsonl"]


def test_non_finite_loss_keeps_last_checkpoint(tmp_path, corpus_args, monkeypatch, capsys):
    real, calls = train.total_loss, []

    def total_loss(losses, args, step):  # the 6th step's loss is NaN
        calls.append(1)
        out = real(losses, args, step)
        return out * float("nan") if len(calls) == 6 else out

    monkeypatch.setattr(train, "total_loss", total_loss)
    assert run(tmp_path, corpus_args, "--max_iters", "10", "--eval_interval", "4") == 1
    assert "non-finite loss" in capsys.readouterr().err
    ckpt = load(tmp_path)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def schedule(**kw):
    """The options lr_at reads: peak 1e-3, min_lr 1e-4, no final step unless given."""
    return argparse.Namespace(**{"lr": 1e-3, "min_lr": 1e-4, "final_lr_iters": None, "final_lr": None, **kw})


def test_lr_schedule():
    a = schedule(warmup_iters=10, lr_hold_iters=10, lr_decay_iters=110)
    assert train.lr_at(0, a) == pytest.approx(1e-4)  # (0+1)/10 of the peak
    assert train.lr_at(9, a) == pytest.approx(1e-3)  # end of warmup: the peak
    assert train.lr_at(10, a) == pytest.approx(1e-3)  # cosine starts at the peak
    assert train.lr_at(60, a) == pytest.approx(5.5e-4)  # half-way: (lr + min_lr) / 2
    assert train.lr_at(35, a) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(110, a) == train.lr_at(10_000, a) == pytest.approx(1e-4)


def test_lr_schedule_with_a_plateau():
    """--lr_hold_iters: the peak holds from the warmup's end to the hold step, then the cosine runs over the steps
    left to lr_decay_iters (the report's shape: warmup, a constant peak, a cosine down to min_lr)."""
    a = schedule(warmup_iters=10, lr_hold_iters=50, lr_decay_iters=150)
    assert train.lr_at(4, a) == pytest.approx(5e-4)
    assert train.lr_at(10, a) == train.lr_at(49, a) == train.lr_at(50, a) == pytest.approx(1e-3)
    assert train.lr_at(100, a) == pytest.approx(5.5e-4)  # half-way through the cosine's 100 steps
    assert train.lr_at(75, a) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(150, a) == pytest.approx(1e-4)
    b = schedule(warmup_iters=10, lr_hold_iters=None, lr_decay_iters=110)
    plain = schedule(warmup_iters=10, lr_hold_iters=10, lr_decay_iters=110)
    assert [train.lr_at(s, b) for s in range(120)] == [train.lr_at(s, plain) for s in range(120)]  # None: no plateau


def test_an_untyped_hold_follows_the_warmup_on_resume(tmp_path, corpus_args):
    """Not given, --lr_hold_iters is saved as None ("where the warmup ends"), so a resume given another --warmup_iters
    gets no plateau it did not ask for (nor a refusal of an option it never typed)."""
    assert run(tmp_path, corpus_args, "--max_iters", "2", "--eval_interval", "2") == 0
    assert load(tmp_path)["args"]["lr_hold_iters"] is None
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--max_iters", "3", "--warmup_iters", "5",
                       "--device", "cpu"]) == 0


@pytest.mark.parametrize("preset", ["tiny", "small", "v2-lite-16b", "v3-671b"])
def test_matmul_params_match_the_model(preset):
    """matmul_params = activated parameters minus the embedding and the norm gains (no matmul), plus the shared
    head once more for each MTP depth."""
    cfg = get_preset(preset)
    n, ref = matmul_params(cfg), count_params(cfg)
    d = cfg.dim
    norms = cfg.n_layers * (2 * d + cfg.q_lora_rank + cfg.kv_lora_rank) + d
    assert n["main"] == ref["active"] - cfg.vocab_size * d - norms
    mtp_norms = cfg.n_mtp * (3 * d + 2 * d + cfg.q_lora_rank + cfg.kv_lora_rank)
    assert n["mtp"] == ref["mtp_active"] - mtp_norms + cfg.n_mtp * cfg.vocab_size * d
    if preset == "v3-671b":  # the report's 37B activated parameters
        assert 36e9 < n["main"] < 39e9


def test_training_defaults_are_the_reports():
    """Report §4.2's optimizer and loss settings are the defaults of every preset: AdamW β1 0.9, β2 0.95, weight
    decay 0.1, the gradient norm clipped to 1.0, λ 0.3, α 1e-4; the presets at V3's scale take γ 0.001 and
    v3-layers V3's learning rate, 2.2e-4 decaying to 2.2e-5 (the tiny preset's γ is 0.01: README, Training
    schedule)."""
    for preset in ("tiny", "small", "v3-layers"):
        a = resolve("--preset", preset)
        assert (a.beta1, a.beta2, a.weight_decay, a.grad_clip, a.mtp_lambda, a.balance_alpha) == (
            0.9, 0.95, 0.1, 1.0, 0.3, 1e-4), preset
        assert a.bias_gamma == (0.01 if preset == "tiny" else 0.001), preset
    v3 = resolve("--preset", "v3-layers")
    assert (v3.lr, v3.min_lr) == (2.2e-4, 2.2e-5)


@pytest.mark.parametrize("bf16_moments", [False, True])
def test_optimizer_decays_matrices_only(bf16_moments):
    cfg = get_preset("tiny", dim=32, inter_dim=64, vocab_size=512)
    model = Transformer(cfg)
    opt = train_setup.make_optimizer(model, argparse.Namespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95,
                                                         bf16_moments=bf16_moments), torch.device("cpu"))
    assert isinstance(opt, AdamWBF16 if bf16_moments else torch.optim.AdamW)
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim >= 2) and (id(p) in no_decay) == (p.ndim < 2), name
    biases = [b for n, b in model.named_buffers() if n.endswith("gate.bias")]
    assert biases and not any(id(b) in decay | no_decay for b in biases)


def _stepped(clip, fused, fold, device="cpu"):
    """A small model after one backward and one AdamW step, its gradients clipped to `clip` by clip_grad_norm_
    (fold False) or by train.clip_gradients (True); the returned norm, parameters and gradients."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)).to(device)
    model(torch.randn(8, 16).to(device)).square().sum().backward()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)
    params = list(model.parameters())
    if fold:
        norm = train.clip_gradients(opt, params, clip)
        run = SimpleNamespace(opt=opt, model=SimpleNamespace(update_moe_bias=lambda *a: None),
                              args=SimpleNamespace(bias_gamma=0.0, bias_gamma_iters=None), step=0,
                              layout=SimpleNamespace(group=lambda name: None))
        grads, zero_grad = [], opt.zero_grad

        def keep_grads(set_to_none=True):                             # the gradients the step used, then zeroed
            grads.extend(p.grad.clone() for p in params)
            zero_grad(set_to_none=set_to_none)
        opt.zero_grad = keep_grads
        train.optimizer_step(run)
        assert getattr(opt, "grad_scale", None) is None                # the factor does not outlive its step
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        grads = [p.grad.clone() for p in params]
    return norm, [p.detach().clone() for p in params], grads


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("clip", [0.05, 1e9, float("inf")])
def test_clipping_folded_into_fused_adamw(clip, device):
    """train.py's optimizer on CUDA is torch's fused AdamW: the clipping factor goes into its kernel (grad_scale)
    instead of a pass of its own over the gradients. The same norm, and parameters and clipped gradients within a
    rounding of the factor of clip_grad_norm_ followed by the step; other optimizers run clip_grad_norm_ itself."""
    norm, params, grads = _stepped(clip, True, False, device)
    f_norm, f_params, f_grads = _stepped(clip, True, True, device)
    assert torch.equal(f_norm, norm)
    for p, q in zip(f_params + f_grads, params + grads):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if clip < norm:                                                    # the clipping happened: not a no-op
        unclipped = _stepped(float("inf"), True, False, device)
        assert not torch.allclose(unclipped[1][0], f_params[0])
        assert math.isclose(torch.linalg.vector_norm(torch.stack([g.norm() for g in f_grads])).item(), clip,
                            rel_tol=1e-5)
    plain = _stepped(clip, False, True, device)                        # not fused: clip_grad_norm_, the same bits
    ref = _stepped(clip, False, False, device)
    assert all(torch.equal(a, b) for a, b in zip([plain[0], *plain[1], *plain[2]], [ref[0], *ref[1], *ref[2]]))


def test_bench_writes_nothing(tmp_path, corpus_args, capsys):
    assert run(tmp_path / "b", corpus_args, "--bench", "--max_iters", "2") == 0
    assert "tokens/s" in capsys.readouterr().out and not os.path.exists(tmp_path / "b")


def test_profile_step_runs_on_the_cpu_and_refuses_bad_input(corpus_args, capsys):
    """profile_step.py (a GPU tool) runs train.py's step functions on a CPU too: the tokens/s line, then the
    profile line and table; a bad option gets one line and exit code 2."""
    import profile_step
    argv = [*corpus_args, *TINY_ARGS, "--batch_size", "4", "--block_size", "16", "--device", "cpu", "--max_iters", "2"]
    assert profile_step.main(argv) == 0
    out = capsys.readouterr().out
    assert "RESULT tiny fp32: 2 steps of 64 tokens |" in out and "PROFILE tiny fp32: step" in out
    assert profile_step.main([*argv, "--fp8"]) == 2                      # FP8 needs a Hopper GPU
    err = capsys.readouterr().err
    assert err.startswith("error: --fp8 needs a Hopper GPU") and err.count("\n") == 1
    assert profile_step.main([*argv, "--cuda_graphs"]) == 2               # CUDA graphs need a GPU
    assert capsys.readouterr().err == "error: --cuda_graphs needs a CUDA device (here: cpu)\n"
    assert profile_step.main([*argv, "--cuda_only"]) == 2                 # nothing to record on a CPU
    assert capsys.readouterr().err == "error: --cuda_only needs a CUDA device (here: cpu)\n"
    assert profile_step.main([*argv, "--batch_ramp_iters", "2", "--batch_ramp_start", "1"]) == 2  # full steps only
    assert capsys.readouterr().err == "error: --batch_ramp_iters=2: this script times full steps: leave the ramp out\n"
    for bad in (["--rows", "0"], ["--rows", "x"], ["--rows"]):
        assert profile_step.main([*argv, *bad]) == 2
        assert capsys.readouterr().err.startswith("error: --rows must be a positive integer, got ")
    assert profile_step.take_rows(["--preset", "tiny", "--rows", "80", "--fp8"]) == (80, ["--preset", "tiny", "--fp8"])
    assert profile_step.take_rows(["--preset", "tiny"]) == (30, ["--preset", "tiny"])


def test_profile_step_busy_time_is_the_union_of_kernels_only():
    """GPU busy time: the union of the kernels' intervals; overlapping kernels count once, CPU events and user
    annotations on the GPU timeline (a compiled graph's range spans its kernels and the gaps between them) not at
    all. The gaps: the idle time between the busy intervals, the short ones counted apart."""
    import types
    import profile_step
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(start, end, device=cuda, annotation=False):
        return types.SimpleNamespace(device_type=device, is_user_annotation=annotation,
                                     time_range=types.SimpleNamespace(start=start, end=end))
    kernels = [ev(0, 10), ev(5, 12), ev(20, 30), ev(30, 31), ev(50, 60)]         # busy 12 + 11 + 10 = 33
    busy = lambda events: profile_step.timeline(events)["busy"]  # noqa: E731
    assert busy(kernels) == 33
    assert busy(kernels + [ev(0, 60, annotation=True), ev(0, 100, device=cpu)]) == 33
    assert busy([]) == 0
    # the gaps between the busy intervals [0, 12], [20, 31], [50, 60]: 8 and 19 µs; under 10 µs: the first
    got = profile_step.timeline(kernels[::-1] + [ev(0, 100, device=cpu)], short_us=10)
    assert got == dict(kernels=5, busy=33, gaps=27, short_gaps=1, short_gap_us=8)
    assert profile_step.timeline([]) == dict(kernels=0, busy=0, gaps=0, short_gaps=0, short_gap_us=0)


def test_resume_mismatch_is_refused(tmp_path, corpus_args, capsys):
    assert run(tmp_path, corpus_args, "--max_iters", "1") == 0
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--dim", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the model config") and "dim: 32" in err and err.count("\n") == 1
    ckpt = load(tmp_path)
    ckpt["tokenizer"] = "gpt2"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert train.main(["--out_dir", str(tmp_path), "--resume"]) == 2
    assert "tokenizer 'gpt2'" in capsys.readouterr().err
    torch.save({"model": ckpt["model"], "config": ckpt["config"]}, tmp_path / "ckpt.pt")  # e.g. an export
    assert train.main(["--out_dir", str(tmp_path), "--resume"]) == 2
    assert "is not a train.py checkpoint (no optimizer, step, rng, args, tokenizer)" in capsys.readouterr().err
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert train.main(["--out_dir", str(tmp_path), "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume: cannot read checkpoint")


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    """As a command: exit 2, one line on stderr, no traceback (two cases; the rest run in-process below)."""
    cases = [["--data", str(tmp_path / "missing.txt")], ["--resume", "--out_dir", str(tmp_path / "empty")]]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *c], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cases]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        errs.append(err)
    assert errs[0].startswith("error: --data path ") and errs[0].endswith("missing.txt does not exist\n")
    assert errs[1].startswith("error: --resume: no checkpoint at ")


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """Ctrl-C during `import torch` (the first second of a run): the line and exit code 130 of a Ctrl-C during
    setup, no traceback, from train.py and generate.py. A stand-in torch package delivers the SIGINT mid-import
    (then exits 7 if it is still running). A process started with SIGINT ignored (`python train.py &` from a script)
    keeps ignoring it."""
    import signal
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os, signal, sys, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.5)\nsys.exit(7)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for script, line in (("train.py", "interrupted before training started\n"), ("generate.py", "interrupted\n")):
        for ignored in (False, True):
            p = subprocess.run([sys.executable, os.path.join(ROOT, script)], cwd=tmp_path, env=env, text=True,
                               capture_output=True, timeout=60,
                               preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None)
            want = (7, "") if ignored else (130, line)
            assert (p.returncode, p.stderr) == want and p.stdout == "", (script, ignored, p.returncode, p.stderr)


def test_fp8_act_cache_modes():
    """--fp8_act_cache report: E4M3 tiles for every FP8 layer, E5M6 for W^O's input (the Linear after attention)."""
    import fp8_linear
    cfg = get_preset("tiny", dim=128, inter_dim=256, moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128,
                     n_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, vocab_size=512)
    model = Transformer(cfg, fp8_linear.FP8Linear)
    train_setup.set_act_cache(model, "report")
    modes = {n: m.act_cache for n, m in model.named_modules() if isinstance(m, fp8_linear.FP8Linear)}
    wo = {n for n in modes if n.endswith("attn.wo")}
    assert wo and len(wo) == cfg.n_layers + cfg.n_mtp                   # every block's W^O, the MTP blocks' too
    assert all(modes[n] == ("e5m6" if n in wo else "fp8") for n in modes) and len(modes) > len(wo)
    train_setup.set_act_cache(model, "bf16")
    assert {m.act_cache for m in model.modules() if isinstance(m, fp8_linear.FP8Linear)} == {"bf16"}


def test_help_fits_a_terminal(monkeypatch, capsys):
    """--help is wrapped (at most 100 columns, even on a wider terminal) and shows each training default."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    flat = " ".join(out.split())
    assert "--preset small changes max_iters=5000," in flat and "--preset v3-layers changes batch_size=1," in flat
    assert "(default: max_iters // 10)" in flat
    assert all(f"--{k}" in flat for k in train_setup.TRAIN_DEFAULTS)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--block_size", "64"], "--block_size=64: must be <= max_seq_len (32)"),
    (["--batch_size", "0"], "--batch_size=0: must be >= 1"),
    (["--max_iters", "0"], "--max_iters=0: must be >= 1"),  # it would leave an empty log that blocks the folder
    (["--out_dir", ""], "--out_dir is empty: name a folder (the default is out)"),
    (["--n_expert_groups", "3"], "n_routed_experts"),
    (["--fp8"], "--fp8 needs a Hopper GPU (sm_90); the device is cpu"),
    (["--fp8_act_cache", "e5m6"], "--fp8_act_cache='e5m6': needs --fp8"),
    (["--device", "foo"], "--device foo: not a device"),
])
def test_user_errors_are_one_line(tmp_path, corpus_args, capsys, argv, message):
    assert run(tmp_path, corpus_args, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_corpus_shorter_than_a_block(tmp_path, capsys):
    text = " x = 1" * 20
    n = len(data.get_tokenizer(512).encode(text)) + 1  # + eot
    n_val = int(0.1 * n)  # a single file: the last tenth is validation
    assert n - n_val >= 17 > n_val
    (tmp_path / "short.txt").write_text(text)
    argv = ["--data", str(tmp_path / "short.txt"), "--cache_dir", str(tmp_path / "c"), "--out_dir",
            str(tmp_path / "out"), *TINY_ARGS, *RUN]
    assert train.main(argv) == 2
    assert f"error: corpus too short: the val split has {n_val} tokens, fewer than block_size+1 = 17" in \
        capsys.readouterr().err
    (tmp_path / "tiny.txt").write_text("x")
    assert train.main(["--data", str(tmp_path / "tiny.txt"), *argv[2:]]) == 2
    assert "error: corpus too short: " in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_grad_accum_equals_one_big_batch(tmp_path, corpus_args):
    """2 micro-batches of 2 sequences == 1 batch of 4 (same windows: the data generator draws them in order):
    the losses are means, the MoE load of both micro-batches feeds one bias update, and the gradient is the mean
    over the micro-batches: its logged norm before clipping is the big batch's, so --grad_clip means the same
    whatever --grad_accum (clipping and AdamW would hide a gradient grad_accum times too large from the weights)."""
    common = [a for a in RUN if a not in ("--batch_size", "4")]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(["--out_dir", str(a), *corpus_args, *TINY_ARGS, *common, "--batch_size", "4",
                       "--grad_accum", "1", "--max_iters", "3", "--eval_interval", "3"]) == 0
    assert train.main(["--out_dir", str(b), *corpus_args, *TINY_ARGS, *common, "--batch_size", "2",
                       "--grad_accum", "2", "--max_iters", "3", "--eval_interval", "3"]) == 0
    sa, sb = load(a)["model"], load(b)["model"]
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), k
    assert any("gate.bias" in k and sa[k].abs().sum() > 0 for k in sa)
    la, lb = ([r for r in read_log(d) if "loss" in r] for d in (a, b))
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    for ra, rb in zip(la, lb):
        for k in ("loss", "main", "mtp", "balance", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4), (k, ra, rb)


def test_batch_ramp_grows_the_micro_batches_per_step():
    """--batch_ramp_iters N --batch_ramp_start M0: step s < N runs M0 + (grad_accum − M0)·s / N micro-batches,
    rounded to the nearest (the report's batch-size ramp, 3,072 to 15,360 sequences: a fifth to the full batch),
    then --grad_accum; N = 0 is no ramp."""
    args = argparse.Namespace(grad_accum=5, batch_ramp_iters=8, batch_ramp_start=1, batch_size=2, block_size=16,
                              microbatches=1)
    run = train_setup.Run(args, *[None] * 7, step=0, ckpt_path="", resumed=False)
    assert [run.micro_batches_at(s) for s in range(10)] == [1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    assert [run.tokens_at(s) for s in (0, 8)] == [32, 160] and run.tokens_per_step == 160
    args.batch_ramp_iters = 800  # a long ramp averages halfway: (1 + 5) / 2
    assert sum(run.micro_batches_at(s) for s in range(800)) == 3 * 800
    for off in (None, 0):
        args.batch_ramp_iters = off
        assert {run.micro_batches_at(s) for s in range(10)} == {5}


def test_a_batch_ramp_trains_as_runs_of_its_micro_batch_counts(tmp_path, corpus_args, capsys):
    """A ramp from 1 to 3 micro-batches over 4 steps (1, 2, 2, 3, then 3) ends with the weights and training log of
    a run of 1 step at --grad_accum 1, resumed for 2 at --grad_accum 2 and 2 more at --grad_accum 3: the same
    batches, each step's gradient the mean over its own micro-batches."""
    opts = ["--eval_interval", "5", "--batch_size", "2"]
    ramp, parts = tmp_path / "ramp", tmp_path / "parts"
    assert run(ramp, corpus_args, *opts, "--grad_accum", "3", "--batch_ramp_iters", "4", "--batch_ramp_start", "1",
               "--max_iters", "5") == 0
    assert " | 96 tokens/step (from 32 over 4 steps) | " in capsys.readouterr().out  # 2 × 16 tokens a micro-batch
    assert run(parts, corpus_args, *opts, "--grad_accum", "1", "--max_iters", "1") == 0
    for accum, end in (("2", "3"), ("3", "5")):
        assert train.main(["--out_dir", str(parts), "--resume", "--grad_accum", accum, "--max_iters", end,
                           "--device", "cpu"]) == 0
    assert_same_state(load(ramp)["model"], load(parts)["model"])
    got, want = ([r for r in read_log(d) if "loss" in r] for d in (ramp, parts))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and without_speed(got) == without_speed(want)


def test_tokens_per_second_count_each_steps_own_tokens_on_the_ramp(tmp_path, corpus_args, monkeypatch):
    """The log's tok_per_s: the tokens of the steps since the last record (each step its own micro-batches) over
    the time they took. A clock that ticks 1 s per reading: one tick per logged step."""
    import itertools
    from types import SimpleNamespace
    ticks = itertools.count()
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: float(next(ticks))))
    assert run(tmp_path, corpus_args, "--max_iters", "6", "--eval_interval", "6", "--grad_accum", "3",
               "--batch_ramp_iters", "4", "--batch_ramp_start", "1") == 0
    rates = [r["tok_per_s"] for r in read_log(tmp_path) if "tok_per_s" in r]
    assert rates == [64.0, 128.0, 128.0, 192.0, 192.0, 192.0]  # 4 sequences of 16 tokens a micro-batch (RUN)


def test_a_saved_ramp_binds_only_while_it_runs(tmp_path, corpus_args):
    """A ramp is refused with --pp (the pipeline's micro-batches are fixed), and its start must fit --grad_accum,
    only while it is ahead of the run: a run resumed past it may use the pipeline or fewer micro-batches;
    --batch_ramp_iters 0 turns it off (what --bench needs)."""
    assert run(tmp_path, corpus_args, "--max_iters", "2", "--grad_accum", "3", "--batch_ramp_iters", "2",
               "--batch_ramp_start", "2") == 0
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--max_iters", "3", "--grad_accum", "1", "--device",
                       "cpu"]) == 0  # its start (2) is more than 1, but the ramp is over at step 2
    parse = lambda *a: resolve(*TINY_ARGS, "--block_size", "16", *a)  # noqa: E731
    args = parse("--pp", "2", "--batch_ramp_iters", "4", "--batch_ramp_start", "1")
    cfg = train_setup.resolve_config(args)
    with pytest.raises(ValueError, match=r"^--batch_ramp_iters=4: needs --pp 1 while it runs"):
        train_setup.check_args(args, cfg, start=3)
    train_setup.check_args(args, cfg, start=4)
    with pytest.raises(ValueError, match=r"^--batch_ramp_iters=4: --bench times full steps"):
        train_setup.check_args(parse("--bench", "--batch_ramp_iters", "4", "--batch_ramp_start", "1"), cfg)
    train_setup.check_args(parse("--bench", "--batch_ramp_iters", "0"), cfg)


# -- never lose a run ---------------------------------------------------------------------------------------------
def folder_hashes(folder) -> dict:
    import hashlib
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def read_log(out_dir) -> list:
    import json
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_speed(records) -> list:
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in records]


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path, corpus_args, capsys):
    assert run(tmp_path, corpus_args, "--max_iters", "3") == 0
    before = folder_hashes(tmp_path)
    assert {"ckpt.pt", "log.jsonl"} <= set(before)
    capsys.readouterr()
    assert run(tmp_path, corpus_args, "--max_iters", "5") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out_dir {tmp_path} holds a run") and err.count("\n") == 1
    assert "--resume continues it" in err and "--overwrite replaces it" in err
    assert run(tmp_path, corpus_args, "--resume", "--overwrite") == 2
    assert "give one of them" in capsys.readouterr().err
    assert folder_hashes(tmp_path) == before  # nothing written, nothing removed
    os.remove(tmp_path / "ckpt.pt")  # a run killed before its first checkpoint leaves only its log
    before = folder_hashes(tmp_path)
    for resume in ([], ["--resume"]):  # --resume is not offered, nor accepted, where there is nothing to resume
        assert run(tmp_path, corpus_args, "--max_iters", "5", *resume) == 2
        assert capsys.readouterr().err == (f"error: --out_dir {tmp_path} holds the log of a run that saved no "
                                           f"checkpoint, so it cannot be resumed: --overwrite replaces it\n")
    assert folder_hashes(tmp_path) == before


def test_overwrite_keeps_the_old_run_until_the_first_checkpoint(tmp_path, corpus_args, monkeypatch, capsys):
    assert run(tmp_path, corpus_args, "--max_iters", "4") == 0
    old = folder_hashes(tmp_path)
    # The new run diverges at its 2nd step, before its first checkpoint (step 3): the old run is untouched.
    real, calls = train.total_loss, []
    monkeypatch.setattr(train, "total_loss", lambda losses, *a: calls.append(1) or
                        (real(losses, *a) * (float("nan") if len(calls) == 2 else 1.0)))
    assert run(tmp_path, corpus_args, "--overwrite", "--max_iters", "6", "--ckpt_interval", "3") == 1
    assert {k: v for k, v in folder_hashes(tmp_path).items() if k in old} == old
    monkeypatch.undo()
    # At the moment the first checkpoint is written the old files are still there; after it, the new run's.
    seen = []
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda obj, path: seen.append(folder_hashes(tmp_path))
                        or real_save(obj, path))
    assert run(tmp_path, corpus_args, "--overwrite", "--max_iters", "6", "--ckpt_interval", "3") == 0
    assert {k: v for k, v in seen[0].items() if k in old} == old
    assert load(tmp_path)["step"] == 6 and [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 7))
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "log.jsonl"]


def test_overwrite_interrupted_before_its_first_checkpoint_keeps_the_old_run(tmp_path, corpus_args, monkeypatch,
                                                                             capsys):
    """Ctrl-C soon after starting an --overwrite run (the natural way to abort it) saves nothing: the old run,
    possibly long, is worth more than the new run's first steps."""
    assert run(tmp_path, corpus_args, "--max_iters", "4") == 0
    old = folder_hashes(tmp_path)
    real, calls = data.Corpus.get_batch, []

    def get_batch(self, split, *a, **kw):
        calls.append(split)
        if len(calls) == 3:  # in step 3; the first checkpoint would come at step 5
            raise KeyboardInterrupt
        return real(self, split, *a, **kw)

    monkeypatch.setattr(data.Corpus, "get_batch", get_batch)
    capsys.readouterr()
    assert run(tmp_path, corpus_args, "--overwrite", "--max_iters", "8", "--ckpt_interval", "5") == 130
    assert capsys.readouterr().err == (f"interrupted before the first checkpoint of this --overwrite run: nothing "
                                       f"saved, {tmp_path} keeps the run it held\n")
    assert folder_hashes(tmp_path) == old  # log.jsonl.new gone too


def test_overwrite_killed_between_its_first_checkpoint_and_the_log_rename(tmp_path, corpus_args, monkeypatch):
    """The first checkpoint of an --overwrite run is complete but its log is still log.jsonl.new: --resume
    finishes the rename, so the log belongs to the checkpoint's run."""
    assert run(tmp_path, corpus_args, "--max_iters", "4") == 0
    real = os.replace

    def replace(src, dst):
        if str(src).endswith("log.jsonl.new"):
            raise Killed()
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        run(tmp_path, corpus_args, "--overwrite", "--max_iters", "6", "--ckpt_interval", "3")
    monkeypatch.undo()
    assert load(tmp_path)["step"] == 3 and os.path.exists(tmp_path / "log.jsonl.new")
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--device", "cpu"]) == 0
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 7))
    assert not os.path.exists(tmp_path / "log.jsonl.new")


def test_a_locked_folder_is_refused(tmp_path, corpus_args, capsys):
    import checkpoint
    lock = checkpoint.lock_out_dir(str(tmp_path))  # another open file description: as another process would hold it
    try:
        assert run(tmp_path, corpus_args, "--max_iters", "2") == 2
        err = capsys.readouterr().err
        assert f"another run (pid {os.getpid()}) is using this folder" in err and err.count("\n") == 1
    finally:
        lock.close()
    assert run(tmp_path, corpus_args, "--max_iters", "2") == 0  # the lock went with its holder


class Killed(BaseException):
    """Stands for kill -9: nothing in train.py catches it, so nothing is saved on the way out."""


def test_log_after_interruptions_equals_a_straight_run(tmp_path, corpus_args, monkeypatch, capsys):
    """Ctrl-C in a step, Ctrl-C in an evaluation and a kill, each followed by --resume: the log holds one record per
    logged step, each equal to the straight run's (tok_per_s aside), and the weights are the straight run's."""
    opts = ["--max_iters", "14", "--log_interval", "3", "--eval_interval", "4", "--ckpt_interval", "5"]
    straight_dir, dir_ = tmp_path / "straight", tmp_path / "interrupted"
    assert run(straight_dir, corpus_args, *opts) == 0
    lines = capsys.readouterr().out
    assert "step 3/14: loss " in lines and "step 14/14: loss " in lines  # not a terminal: plain progress lines
    real, calls = data.Corpus.get_batch, {"train": 0, "val": 0}

    def stop_at(split, n, exc):
        def get_batch(self, s, *a, **kw):
            calls[s] += 1
            if s == split and calls[s] == n:
                raise exc
            return real(self, s, *a, **kw)
        calls.update(train=0, val=0)
        monkeypatch.setattr(data.Corpus, "get_batch", get_batch)

    resume = ["--out_dir", str(dir_), "--resume", "--device", "cpu"]
    stop_at("train", 7, KeyboardInterrupt)  # in step 7: saves step 6 (mid log interval: 1 step not yet logged)
    assert run(dir_, corpus_args, *opts) == 130 and load(dir_)["step"] == 6
    stop_at("val", 1, KeyboardInterrupt)  # in the evaluation of step 8: saves step 8, its evaluation not logged
    assert train.main(resume) == 130 and load(dir_)["step"] == 8
    stop_at("train", 5, Killed())  # killed in step 13: the log holds step 12, the checkpoint step 10
    with pytest.raises(Killed):
        train.main(resume)
    assert load(dir_)["step"] == 10 and read_log(dir_)[-1]["step"] == 12
    monkeypatch.setattr(data.Corpus, "get_batch", real)
    assert train.main(resume) == 0
    got, want = read_log(dir_), read_log(straight_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert without_speed(got) == without_speed(want)
    assert_same_state(load(dir_)["model"], load(straight_dir)["model"])


def test_ctrl_c_before_the_first_step_saves_step_0_and_resumes_exactly(tmp_path, corpus_args, monkeypatch, capsys):
    """Ctrl-C as the run opens its log: step 0 is saved, and the resumed run's log and weights are a straight
    run's (no evaluation at step 0, which a straight run never makes)."""
    opts = ["--max_iters", "6", "--log_interval", "3", "--eval_interval", "4"]
    straight_dir, dir_ = tmp_path / "straight", tmp_path / "interrupted"
    assert run(straight_dir, corpus_args, *opts) == 0
    real = train.open_log

    def interrupted(r):
        monkeypatch.setattr(train, "open_log", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "open_log", interrupted)
    assert run(dir_, corpus_args, *opts) == 130
    assert "interrupted: saved step 0 to " in capsys.readouterr().err and load(dir_)["step"] == 0
    assert train.main(["--out_dir", str(dir_), "--resume", "--device", "cpu"]) == 0
    assert without_speed(read_log(dir_)) == without_speed(read_log(straight_dir))
    assert_same_state(load(dir_)["model"], load(straight_dir)["model"])


def test_full_disk_during_a_save_keeps_the_old_checkpoint(tmp_path, corpus_args, monkeypatch, capsys):
    real, calls = torch.save, []

    def save(obj, f):  # the second checkpoint hits a full disk half-way (torch reports it as a RuntimeError)
        calls.append(1)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, f)

    monkeypatch.setattr(torch, "save", save)
    assert run(tmp_path, corpus_args, "--max_iters", "8", "--ckpt_interval", "4") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "is the disk full?" in err and err.count("\n") == 1
    assert "ckpt.pt holds step 4" in err
    monkeypatch.undo()
    assert load(tmp_path)["step"] == 4 and "ckpt.pt.tmp" not in os.listdir(tmp_path)


def test_unusable_out_dir_is_one_line(tmp_path, corpus_args, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    assert run(tmp_path / "file", corpus_args, "--max_iters", "1") == 2
    assert capsys.readouterr().err == f"error: --out_dir {tmp_path / 'file'}: this is a file, not a folder\n"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse the lock file as a read-only one would
        real = os.open
        monkeypatch.setattr(os, "open", lambda p, *a, **kw: (_ for _ in ()).throw(PermissionError(13, "Permission "
                            "denied")) if str(p).startswith(str(ro)) else real(p, *a, **kw))
    assert run(ro, corpus_args, "--max_iters", "1") == 2
    assert capsys.readouterr().err == f"error: --out_dir {ro}: cannot write there (Permission denied)\n"


def test_read_only_folder_holding_a_run_is_one_line(tmp_path, corpus_args, monkeypatch, capsys):
    """--resume or --overwrite into a read-only folder that holds a run (its lock file still writable): one line,
    exit 2, the run's files as they were."""
    assert run(tmp_path, corpus_args, "--max_iters", "2") == 0
    capsys.readouterr()
    files = sorted(os.listdir(tmp_path))
    tmp_path.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anywhere: the folder answers as a read-only one would
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path)
                                else real(p, mode, **kw))
        for extra in (["--resume"], ["--overwrite"]):
            assert run(tmp_path, corpus_args, "--max_iters", "4", *extra) == 2
            assert capsys.readouterr().err == f"error: --out_dir {tmp_path}: cannot write there (the folder is " \
                                              f"read-only)\n"
    finally:
        tmp_path.chmod(0o755)
    assert sorted(os.listdir(tmp_path)) == files and load(tmp_path)["step"] == 2


def test_compile_failure_is_one_line(tmp_path, corpus_args, monkeypatch, capsys):
    def broken(*a, **kw):  # as when the backend cannot build (no C compiler): the failure comes at the first call
        raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")
    monkeypatch.setattr(torch, "compile", lambda model: broken)
    assert run(tmp_path, corpus_args, "--compile", "--max_iters", "2") == 2
    err = capsys.readouterr().err
    assert err == ("error: --compile failed at the first step (RuntimeError: InductorError: no working C++ compiler "
                   "found); run with --no-compile\n")
    assert run(tmp_path / "bench", corpus_args, "--compile", "--bench", "--max_iters", "2") == 2  # --bench too
    assert capsys.readouterr().err.startswith("error: --compile failed at the first step (RuntimeError: ")
    monkeypatch.setattr(torch, "compile", broken)  # or torch.compile refuses at once (an unsupported Python)
    assert run(tmp_path / "b", corpus_args, "--compile", "--max_iters", "2") == 2
    assert capsys.readouterr().err.startswith("error: --compile is unavailable here (RuntimeError: ")


def _compile_that_fails_after_running(model):
    """A torch.compile whose first call runs the model eagerly, forward and backward (as a graph split lets part of
    it run; here on a batch of one repeated token, so that the MoE loads it counts all fall on a few experts and
    its gradients are not the batch's) and then fails, as a backend that cannot build does. The data generator has
    moved on by then too."""
    def first_call(x, y):
        model(torch.zeros_like(x), y)[1]["main"].backward()
        raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")
    return first_call


def test_default_compile_falls_back_to_the_uncompiled_run(tmp_path, corpus_args, monkeypatch, capsys, straight):
    """Compiling is on by default on a GPU (train_setup.default_compile); if it fails at the first step, the run goes
    on uncompiled from the state that step started from: the same weights, bias buffers and data position as a run
    that never tried. The same failure with --compile typed stops (test_compile_failure_is_one_line)."""
    monkeypatch.setattr(train_setup, "default_compile", lambda args, device: True)
    monkeypatch.setattr(torch, "compile", _compile_that_fails_after_running)
    assert run(tmp_path, corpus_args, "--max_iters", "12", "--eval_interval", "12") == 0
    out, err = capsys.readouterr()
    assert "torch.compile (the first step compiles)" in out
    assert err.splitlines()[0] == ("note: torch.compile failed at the first step (RuntimeError: InductorError: no "
                                   "working C++ compiler found); training uncompiled (--no-compile skips the "
                                   "attempt)")
    ckpt = load(tmp_path)
    assert_same_state(ckpt["model"], straight["model"])
    assert torch.equal(ckpt["rng"]["data"], straight["rng"]["data"])
    assert run(tmp_path / "b", corpus_args, "--bench", "--max_iters", "2") == 0  # --bench falls back alike
    assert "tokens/s" in capsys.readouterr().out
    monkeypatch.setattr(torch, "compile", lambda model: (_ for _ in ()).throw(RuntimeError("unsupported Python")))
    assert run(tmp_path / "c", corpus_args, "--max_iters", "2") == 0  # torch.compile refusing at once: the same
    assert capsys.readouterr().err.startswith("note: torch.compile is unavailable here (RuntimeError: unsupported "
                                              "Python); training uncompiled\n")


def test_a_failure_to_record_the_cuda_graphs_falls_back_or_stops_alike(tmp_path, corpus_args, monkeypatch, capsys,
                                                                       straight):
    """--cuda_graphs records its graphs at the second call: a failure there is handled as one at the first step
    (the step again, uncompiled, from the state it started from; or, with --compile typed, one line). Simulated on
    the CPU, where compile_model (which refuses CUDA graphs off a GPU) hands over a stand-in that runs the model
    and fails at its second call after a forward and backward of its own."""
    def compile_model(model, args, device):
        calls = []

        def fwd(x, y):
            calls.append(1)
            if len(calls) == 2:
                model(torch.zeros_like(x), y)[1]["main"].backward()
                raise RuntimeError("CUDA graph capture failed\nmore lines")
            return model(x, y)
        args.compile = True
        return fwd
    monkeypatch.setattr(train_setup, "compile_model", compile_model)
    assert run(tmp_path, corpus_args, "--cuda_graphs", "--max_iters", "12", "--eval_interval", "12") == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "note: torch.compile failed at the second step, where the CUDA graphs are recorded (RuntimeError: CUDA graph "
        "capture failed); training uncompiled (--no-compile skips the attempt)")
    ckpt = load(tmp_path)
    assert_same_state(ckpt["model"], straight["model"])
    assert torch.equal(ckpt["rng"]["data"], straight["rng"]["data"])
    assert run(tmp_path / "b", corpus_args, "--cuda_graphs", "--compile", "--max_iters", "3") == 2
    assert capsys.readouterr().err == ("error: --compile failed at the second step, where the CUDA graphs are "
                                       "recorded (RuntimeError: CUDA graph capture failed); run with --no-compile\n")


def test_only_compile_failures_fall_back_or_stop_as_compile_failures(tmp_path, corpus_args, monkeypatch):
    """Out of memory in the first (compiled) step is no compile failure: the eager retry would need more memory.
    And with --compile typed, an error elsewhere in the first step (here the optimizer's) keeps its own traceback
    instead of being reported as "--compile failed"."""
    monkeypatch.setattr(train_setup, "default_compile", lambda args, device: True)

    def oom(model):
        def first_call(x, y):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return first_call
    monkeypatch.setattr(torch, "compile", oom)
    with pytest.raises(torch.OutOfMemoryError):
        run(tmp_path / "a", corpus_args, "--max_iters", "2")
    monkeypatch.setattr(torch, "compile", lambda model: model)  # compiling works ...
    monkeypatch.setattr(train, "optimizer_step", lambda r: (_ for _ in ()).throw(RuntimeError("optimizer bug")))
    with pytest.raises(RuntimeError, match="optimizer bug"):  # ... the optimizer does not
        run(tmp_path / "b", corpus_args, "--compile", "--max_iters", "2")


def test_compile_default_rule(monkeypatch):
    """On by default only for one CUDA process (--fp8 or not); a typed --compile / --no-compile wins."""
    args = argparse.Namespace(fp8=False)
    assert train_setup.default_compile(args, torch.device("cuda"))
    assert not train_setup.default_compile(args, torch.device("cpu"))
    assert train_setup.default_compile(argparse.Namespace(fp8=True), torch.device("cuda"))
    monkeypatch.setattr(train_setup.parallel, "under_torchrun", lambda: True)
    assert not train_setup.default_compile(args, torch.device("cuda"))
    assert resolve().compile is None and resolve("--compile").compile is True and resolve("--no-compile").compile is False


def _losses_and_grads(model, fwd, idx, tgt):
    model.zero_grad(set_to_none=True)
    for m in model.moe_layers():
        m.reset_load()
    _, losses = fwd(idx, tgt)
    (losses["main"] + 0.3 * losses["mtp"] + 1e-4 * losses["balance"]).backward()
    moes = model.moe_layers()
    return ({k: v.detach().clone() for k, v in losses.items()}, [m.load.clone() for m in moes],
            [m.balance_loss.detach().clone() for m in moes],
            {n: p.grad.clone() for n, p in model.named_parameters()})


def _compare_compiled(device, dtype, backend, rtol, atol, exact_routing):
    cfg = get_preset("tiny", n_layers=2)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    idx, tgt = (torch.randint(0, cfg.vocab_size, (2, 64), device=device) for _ in range(2))
    cast = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else torch.autocast(device, enabled=False)
    with cast:
        want = _losses_and_grads(model, model, idx, tgt)
        compiled = torch.compile(model, backend=backend)
        got = _losses_and_grads(model, compiled, idx, tgt)
        again = _losses_and_grads(model, compiled, idx, tgt)  # the compiled code, not only the first trace
    for g in (got, again):
        torch.testing.assert_close(g[0], want[0], rtol=rtol, atol=atol)
        assert g[3].keys() == want[3].keys()
        if exact_routing:
            assert all(torch.equal(a, b) for a, b in zip(g[1], want[1]))  # the routing: the same token counts
            torch.testing.assert_close(g[2], want[2], rtol=rtol, atol=atol)
            for name in want[3]:
                torch.testing.assert_close(g[3][name], want[3][name], rtol=rtol, atol=atol, msg=name)
        else:  # a near-tie in the router may go the other way: every load counted, the gradient the same direction
            assert all(a.sum() == b.sum() > 0 for a, b in zip(g[1], want[1]))
            flat = [torch.cat([d[n].flatten().float() for n in want[3]]) for d in (g[3], want[3])]
            assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_forward_backward_keeps_the_eager_semantics(dtype):
    """train.py compiles the model on a GPU by default. Traced by dynamo and AOT autograd (no code generation, so
    that it runs in seconds on a CPU), a forward and backward give the eager losses and gradients, and the MoE's
    side effects (the loads that drive the bias update, the balance loss the training objective reads) happen as
    in eager mode, on every call. Under bf16 autocast the MoE runs the grouped GEMM inside the graph, as on the GPU
    (fp32 compiled takes the expert loop, whose segment sizes split the graph)."""
    _compare_compiled("cpu", dtype, "aot_eager", 1e-5, 1e-6, exact_routing=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_training_step_on_gpu_matches_eager(dtype):
    """The default GPU path: inductor's generated kernels. fp32: the eager values up to reduction order; bf16 (the
    training precision): fused kernels round in other places, within bf16's resolution."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tol = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-3)
    _compare_compiled("cuda", dtype, "inductor", *tol, exact_routing=dtype == torch.float32)


@pytest.mark.parametrize("extra, message", [
    (["--cuda_graphs"], "error: --cuda_graphs needs a CUDA device (here: cpu)"),  # the CPU: not compiled by default
    (["--cuda_graphs", "--compile"], "error: --cuda_graphs needs a CUDA device (here: cpu)"),
    (["--cuda_graphs", "--no-compile"], "error: --cuda_graphs=True: needs --compile (the graphs replay what "
                                        "torch.compile generates)"),
    (["--cuda_graphs", "--fp8", "--grad_accum", "2"], "error: --cuda_graphs=True: with --fp8 needs --grad_accum 1"),
])
def test_cuda_graphs_refusals_are_one_line(tmp_path, corpus_args, capsys, extra, message):
    """--cuda_graphs replays what torch.compile generates on a GPU; with --fp8 one micro-batch per step only (the
    FP8 weight copies made once per step are new graph inputs every step). Each refusal is one line."""
    assert run(tmp_path / "x", corpus_args, "--max_iters", "1", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_cuda_graphs_is_off_by_default_and_never_taken_from_a_checkpoint():
    """Off unless typed; a run option, as --compile is: a resumed run decides afresh."""
    assert "cuda_graphs" in train_setup.RUN_ONLY
    assert resolve().cuda_graphs is False and resolve("--cuda_graphs").cuda_graphs is True
    saved = {"args": {**vars(resolve("--cuda_graphs")), "typed": []}}
    assert train_setup.resolve_args(train_setup.build_parser().parse_args([]), saved).cuda_graphs is False


# FP8's tiles need every contraction (dim, the LoRA ranks, heads × v_head_dim, the FFN widths) a multiple of 128
FP8_TINY = ["--dim", "128", "--inter_dim", "256", "--q_lora_rank", "128", "--kv_lora_rank", "128",
            "--qk_nope_head_dim", "32", "--qk_rope_head_dim", "32", "--v_head_dim", "64", "--moe_inter_dim", "128"]


@pytest.mark.gpu
@pytest.mark.parametrize("fp8, grad_accum", [(False, 1), (False, 2), (True, 1)], ids=["bf16", "bf16-accum2", "fp8"])
def test_cuda_graphs_train_as_the_compiled_step(tmp_path, corpus_args, fp8, grad_accum):
    """4 optimizer steps compiled, then compiled and replayed as CUDA graphs (none skipped): the same losses and
    gradient norms step by step, and the same validation loss. The batches must reach every replay, and with 2
    micro-batches each one's gradients must be summed before the next replay overwrites the graphs' memory (without
    train.forward_backward's zeros the second micro-batch read overwritten memory): a graph that kept the first
    step's values would train on stale ones, which moves the losses of the later steps by about what one step
    changes them (checked to be far above the tolerance)."""
    if not torch.cuda.is_available() or (fp8 and torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip("needs CUDA (--fp8: a Hopper GPU)")
    from torch._dynamo.utils import counters
    logs = []
    for graphs in ("--no-cuda_graphs", "--cuda_graphs"):
        out = tmp_path / graphs
        extra = [*FP8_TINY, "--fp8"] if fp8 else []
        assert run(out, corpus_args, "--device", "cuda", "--compile", graphs, "--grad_accum", str(grad_accum),
                   "--block_size", "32", "--lr", "1e-2", "--max_iters", "4", "--eval_interval", "4", *extra) == 0
        logs.append(read_log(out))
        if graphs == "--no-cuda_graphs":
            counters.clear()
    assert counters["inductor"]["cudagraph_skips"] == 0  # no compiled graph ran without CUDA graphs ...
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0  # ... and graphs were recorded (the
    # batches are inputs of the forward's graph that it copies in at each replay)
    plain, graphed = ([r for r in log if "loss" in r] for log in logs)
    assert [r["step"] for r in plain] == [r["step"] for r in graphed] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        a, b = [r[key] for r in plain], [r[key] for r in graphed]
        assert a == pytest.approx(b, rel=2e-3), key   # kernels that add in a varying order: runs differ a little
        moved = max(abs(u - v) for u, v in zip(a, a[1:]))
        assert moved > 10 * 2e-3 * abs(a[0]), (key, a)  # a step moves it far more than that
    val = [[r["val_main"] for r in log if "val_main" in r] for log in logs]
    assert len(val[0]) == 1 and val[0] == pytest.approx(val[1], rel=2e-3)


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path, corpus_args, monkeypatch, capsys):
    out = tmp_path / "big"
    assert train.main(["--preset", "v3-671b", "--device", "cpu", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    n = count_params(get_preset("v3-671b"))
    need = (n["total"] + n["mtp"]) * 16 / 1e9
    assert err.startswith(f"error: the model (v3-671b preset) has {(n['total'] + n['mtp']) / 1e9:.2f}B parameters")
    assert f"need {need:,.1f} GB (16 bytes each)" in err and err.count("\n") == 1 and not out.exists()
    monkeypatch.setattr(train_setup, "free_memory", lambda device: 100_000)  # 100 kB: even the test model is refused
    assert run(tmp_path / "small", corpus_args, "--bf16_moments", "--max_iters", "1") == 2
    assert "(12 bytes each)" in capsys.readouterr().err


def test_lr_schedule_follows_max_iters_unless_given(tmp_path, corpus_args):
    def resolved(*argv):
        a = resolve(*argv)
        return a.warmup_iters, a.lr_decay_iters
    assert resolved() == (100, 1000)  # the default run: warmup 100, cosine to step 1000
    assert resolved("--max_iters", "30") == (3, 30)
    assert resolved("--max_iters", "30", "--warmup_iters", "5") == (5, 30)
    assert resolved("--preset", "small", "--max_iters", "300", "--lr_decay_iters", "5000") == (30, 5000)
    # The resolved schedule is saved: resuming with a larger --max_iters keeps it.
    common = [a for a in RUN if a not in ("--warmup_iters", "3", "--lr_decay_iters", "20")]
    assert train.main(["--out_dir", str(tmp_path), *corpus_args, *TINY_ARGS, *common, "--max_iters", "20"]) == 0
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--max_iters", "40", "--device", "cpu"]) == 0
    args = load(tmp_path)["args"]
    assert (args["warmup_iters"], args["lr_decay_iters"], args["max_iters"]) == (2, 20, 40)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_real_signal_to_a_training_process(tmp_path, corpus_args, sig):
    """SIGTERM saves the last finished step and exits 143; after either signal --resume continues exactly: the log
    and the weights equal a straight run's."""
    import signal
    import time
    opts = ["--log_interval", "2", "--eval_interval", "50", "--ckpt_interval", "7"]
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(out), *corpus_args,
                          *TINY_ARGS, *RUN, *opts, "--max_iters", "100000"], cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not ((out / "ckpt.pt").exists() and len(read_log(out)) >= 10):
        assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "too slow"
        time.sleep(0.2)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    step = load(out)["step"]
    if sig == "SIGTERM":
        assert p.returncode == 143 and "Traceback" not in err, err
        assert err.endswith(f"stopped by SIGTERM: saved step {step} to {out / 'ckpt.pt'} (continue with --resume)\n")
        assert step >= 10
    else:
        assert p.returncode == -9 and step % 7 == 0
    end = str(step + 5)
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", end, "--device", "cpu"]) == 0
    assert run(tmp_path / "straight", corpus_args, *opts, "--max_iters", end) == 0
    got, want = read_log(out), read_log(tmp_path / "straight")
    assert [r["step"] for r in got] == [r["step"] for r in want] and without_speed(got) == without_speed(want)
    assert_same_state(load(out)["model"], load(tmp_path / "straight")["model"])


def test_v3_layers_trains_with_the_reports_learning_rate():
    """V3's layer shapes take V3's peak LR, final LR and bias speed (2.2e-4, 2.2e-5, γ = 0.001), one 4096-token
    sequence per micro-batch and 8 micro-batches per optimizer step (32,768 tokens, about the 30,720 one GPU of
    V3's run trained on per step); an option typed by the user still wins."""
    def resolved(*argv):
        a = resolve(*argv)
        return a.lr, a.min_lr, a.bias_gamma, a.batch_size, a.block_size, a.grad_accum
    assert resolved("--preset", "v3-layers") == (2.2e-4, 2.2e-5, 0.001, 1, 4096, 8)
    assert resolved("--preset", "v3-layers", "--grad_accum", "1")[5] == 1
    assert resolved("--preset", "v3-layers", "--pp", "2")[5] == 1  # under --pp, --microbatches take its place
    assert resolved("--preset", "v3-layers", "--lr", "1e-4")[0] == 1e-4
    assert resolved()[0] == 3e-3  # the tiny preset keeps its own


def test_preset_block_size_over_a_typed_max_seq_len_names_the_preset(tmp_path, capsys):
    assert train.main(["--preset", "v3-layers", "--max_seq_len", "2048", "--out_dir", str(tmp_path / "o"),
                       "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --block_size=4096: must be <= max_seq_len (2048) (the v3-layers preset's default: give "
                   "--block_size)\n")


def test_lr_schedule_without_a_cosine_phase():
    """--lr_decay_iters equal to --warmup_iters (check_args allows it): the peak through the warmup, then min_lr."""
    a = schedule(warmup_iters=10, lr_hold_iters=10, lr_decay_iters=10)
    assert train.lr_at(9, a) == pytest.approx(1e-3)
    assert train.lr_at(10, a) == train.lr_at(11, a) == pytest.approx(1e-4)


def test_total_loss_weights_mtp_by_lambda_and_balance_by_alpha():
    """loss = L_main + λ·L_MTP + α·L_balance, λ = --mtp_lambda and α = --balance_alpha."""
    losses = {"main": torch.tensor(2.0), "mtp": torch.tensor(3.0), "balance": torch.tensor(5.0)}
    args = argparse.Namespace(mtp_lambda=0.3, balance_alpha=1e-4, mtp_lambda_iters=None)
    assert train.total_loss(losses, args, 10).item() == pytest.approx(2.0 + 0.3 * 3.0 + 1e-4 * 5.0)


def test_lr_schedule_ends_with_the_final_step():
    """--final_lr_iters: min_lr from the cosine's end, then --final_lr (the report: 2.2e-5 for 333B tokens after
    the cosine, then 7.3e-6 for the last 167B)."""
    a = schedule(warmup_iters=10, lr_hold_iters=50, lr_decay_iters=150, final_lr_iters=180, final_lr=3e-5)
    plain = schedule(warmup_iters=10, lr_hold_iters=50, lr_decay_iters=150)
    assert [train.lr_at(s, a) for s in range(180)] == [train.lr_at(s, plain) for s in range(180)]
    assert train.lr_at(179, a) == pytest.approx(1e-4) and train.lr_at(180, a) == train.lr_at(10_000, a) == 3e-5
    b = schedule(warmup_iters=10, lr_hold_iters=50, lr_decay_iters=150, final_lr_iters=150, final_lr=3e-5)
    assert train.lr_at(149, b) > 1e-4 and train.lr_at(150, b) == 3e-5  # at the cosine's end: no min_lr phase


def test_mtp_lambda_and_bias_gamma_switch_once():
    """λ is --mtp_lambda before --mtp_lambda_iters and --mtp_lambda_after from there on; γ is --bias_gamma before
    --bias_gamma_iters and 0 from there on (the report: λ 0.3 → 0.1 after 10T tokens, γ 0.001 → 0 for the last
    500B); without the step options both stay constant."""
    a = argparse.Namespace(mtp_lambda=0.3, mtp_lambda_iters=20, mtp_lambda_after=0.1, balance_alpha=1e-4,
                           bias_gamma=1e-3, bias_gamma_iters=30)
    assert [train.mtp_lambda_at(s, a) for s in (0, 19, 20, 10_000)] == [0.3, 0.3, 0.1, 0.1]
    assert [train.bias_gamma_at(s, a) for s in (0, 29, 30, 10_000)] == [1e-3, 1e-3, 0.0, 0.0]
    losses = {"main": torch.tensor(2.0), "mtp": torch.tensor(3.0), "balance": torch.tensor(5.0)}
    assert train.total_loss(losses, a, 19).item() == pytest.approx(2.0 + 0.3 * 3.0 + 1e-4 * 5.0)
    assert train.total_loss(losses, a, 20).item() == pytest.approx(2.0 + 0.1 * 3.0 + 1e-4 * 5.0)
    b = argparse.Namespace(mtp_lambda=0.3, mtp_lambda_iters=None, mtp_lambda_after=None, bias_gamma=1e-3,
                           bias_gamma_iters=None)
    assert train.mtp_lambda_at(10 ** 6, b) == 0.3 and train.bias_gamma_at(10 ** 6, b) == 1e-3


def test_a_run_switches_lambda_gamma_and_lr_at_the_given_steps(tmp_path, corpus_args):
    """A run with the three switches, stopped and resumed across them: every step's logged loss is
    main + λ(s)·mtp + α·balance with λ switched at --mtp_lambda_iters, the gate biases stop moving at
    --bias_gamma_iters, the logged lr is --final_lr from --final_lr_iters on, and the resumed run (its switches
    from the checkpoint) ends with the weights of a straight one."""
    switches = ["--lr_decay_iters", "4", "--final_lr_iters", "5", "--final_lr", "3e-5", "--mtp_lambda_iters", "2",
                "--mtp_lambda_after", "0.1", "--bias_gamma_iters", "3", "--bias_gamma", "0.02", "--eval_interval", "3"]
    out = tmp_path / "resumed"
    assert run(out, corpus_args, *switches, "--max_iters", "3") == 0
    before = {k: t for k, t in load(out)["model"].items() if k.endswith("gate.bias")}
    assert before and all(t.abs().max() > 0 for t in before.values())  # γ moved them in steps 0-2
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", "6", "--device", "cpu"]) == 0
    assert_same_state({k: t for k, t in load(out)["model"].items() if k.endswith("gate.bias")}, before)
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:  # record of step s + 1 holds step s
        lam = 0.3 if r["step"] - 1 < 2 else 0.1
        assert r["loss"] == pytest.approx(r["main"] + lam * r["mtp"] + 1e-4 * r["balance"], rel=1e-6), r
    assert [r["lr"] for r in records[-2:]] == [pytest.approx(1e-4), 3e-5]
    assert run(tmp_path / "straight", corpus_args, *switches, "--max_iters", "6") == 0
    assert_same_state(load(out)["model"], load(tmp_path / "straight")["model"])


def test_each_step_applies_and_logs_its_scheduled_lr_and_clip(tmp_path, corpus_args, monkeypatch):
    """Step s (0-based) runs with lr(s) of the documented schedule (linear warmup to --lr over --warmup_iters, cosine to
    --min_lr at --lr_decay_iters) on gradients clipped to --grad_clip, and its log record (step s + 1) shows that lr
    and the norm before clipping."""
    seen, real = [], train.optimizer_step

    def optimizer_step(r):
        grads = [p.grad.norm() for p in r.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(grads))
        seen.append(([g["lr"] for g in r.opt.param_groups], norm.item()))
        real(r)

    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    assert run(tmp_path, corpus_args, "--max_iters", "5", "--eval_interval", "5", "--grad_clip", "0.05") == 0
    lr, warm, decay, min_lr = 2e-3, 3, 20, 1e-4                     # RUN's schedule
    want = [lr * (s + 1) / warm if s < warm else
            min_lr + 0.5 * (1 + math.cos(math.pi * (s - warm) / (decay - warm))) * (lr - min_lr) for s in range(5)]
    assert [lrs for lrs, _ in seen] == [[pytest.approx(w)] * len(seen[0][0]) for w in want]
    records = [r for r in read_log(tmp_path) if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in records] == pytest.approx(want)
    for (_, clipped), r in zip(seen, records):
        assert r["grad_norm"] > 0.05 and clipped == pytest.approx(0.05, rel=1e-4)


def test_the_last_step_is_evaluated(tmp_path, corpus_args):
    """Evaluation every --eval_interval steps and at --max_iters, even when it is not a multiple of the interval."""
    assert run(tmp_path, corpus_args, "--max_iters", "5", "--eval_interval", "4") == 0
    assert [r["step"] for r in read_log(tmp_path) if "val_main" in r] == [4, 5]


def test_bias_update_moves_each_gate_bias_by_gamma(tmp_path, corpus_args):
    """After the first step every gate bias b_i is ±γ (--bias_gamma), or 0 for an expert at exactly the mean load:
    b_i += γ·sign(mean load − load_i) from b = 0."""
    assert run(tmp_path, corpus_args, "--max_iters", "1", "--eval_interval", "1", "--bias_gamma", "0.02") == 0
    biases = [t for k, t in load(tmp_path)["model"].items() if k.endswith("gate.bias")]
    assert biases
    for b in biases:
        assert ((b == 0) | torch.isclose(b.abs(), torch.tensor(0.02))).all() and b.abs().max() > 0, b


@pytest.mark.parametrize("bf16_moments", [False, True])
def test_optimizer_takes_the_training_options(bf16_moments):
    """make_optimizer hands --lr, --beta1, --beta2 and --weight_decay (matrices) to the optimizer, with or without
    --bf16_moments."""
    model = Transformer(get_preset("tiny", dim=32, inter_dim=64, vocab_size=512))
    args = argparse.Namespace(weight_decay=0.05, lr=7e-4, beta1=0.8, beta2=0.97, bf16_moments=bf16_moments)
    opt = train_setup.make_optimizer(model, args, torch.device("cpu"))
    assert [(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in opt.param_groups] == \
        [(7e-4, (0.8, 0.97), 0.05), (7e-4, (0.8, 0.97), 0.0)]


# -- the run folder, signals, the log and the option checks ----------------------------------------------------------
@pytest.mark.parametrize("name, value, rule", [
    *[(n, "0", "must be >= 1") for n in ("batch_size", "block_size", "grad_accum", "eval_interval", "ckpt_interval",
                                          "eval_iters", "log_interval")],
    *[(n, "-1", "must be >= 0") for n in ("warmup_iters", "min_lr", "weight_decay", "grad_clip", "mtp_lambda",
                                           "balance_alpha", "bias_gamma")],
    ("lr", "0", "must be > 0"),
    ("lr", "inf", "must be a finite number"),
    ("weight_decay", "nan", "must be a finite number"),
    ("beta1", "1.5", "must be in [0, 1)"),
    ("beta2", "-0.1", "must be in [0, 1)"),
    ("min_lr", "3e-3", "must be <= lr (0.002): the cosine goes down from lr to min_lr"),  # RUN's --lr is 2e-3
    ("lr_decay_iters", "2", "must be >= warmup_iters"),  # RUN's --warmup_iters is 3
    ("lr_hold_iters", "2", "must be >= warmup_iters"),
    ("lr_decay_iters", "2 --lr_hold_iters 4", "must be >= lr_hold_iters"),
    ("final_lr_iters", "-1 --final_lr 1e-5", "must be >= 0"),
    ("final_lr", "-1 --final_lr_iters 30", "must be >= 0"),
    ("mtp_lambda_iters", "-1 --mtp_lambda_after 0.1", "must be >= 0"),
    ("mtp_lambda_after", "-1 --mtp_lambda_iters 5", "must be >= 0"),
    ("bias_gamma_iters", "-1", "must be >= 0"),
    ("final_lr_iters", "30", "needs --final_lr"),
    ("final_lr", "1e-5", "needs --final_lr_iters"),
    ("mtp_lambda_iters", "5", "needs --mtp_lambda_after"),
    ("mtp_lambda_after", "0.1", "needs --mtp_lambda_iters"),
    ("final_lr_iters", "19 --final_lr 1e-5", "must be >= lr_decay_iters (20): the final lr follows the cosine"),
    ("batch_ramp_iters", "4", "needs --batch_ramp_start"),
    ("batch_ramp_start", "1", "needs --batch_ramp_iters"),
    ("batch_ramp_iters", "-1 --batch_ramp_start 1", "must be >= 0 (0: no ramp)"),
    ("batch_ramp_start", "3 --batch_ramp_iters 4 --grad_accum 2", "must be in [1, grad_accum]"),
    ("batch_ramp_start", "0 --batch_ramp_iters 4 --grad_accum 2", "must be in [1, grad_accum]"),
    ("batch_ramp_iters", "4 --batch_ramp_start 1 --bench", "--bench times full steps: leave the ramp out (0: none)"),
    ("batch_ramp_iters", "4 --batch_ramp_start 2 --pp 2",  # before the start's range: --pp sets grad_accum to 1
     "needs --pp 1 while it runs (the pipeline's micro-batches are fixed)"),
])
def test_every_training_option_rule_is_one_line(tmp_path, corpus_args, capsys, name, value, rule):
    """Each rule of check_args refuses its option in one line before anything is written (without it a 0 interval
    is a ZeroDivisionError traceback mid-run, and a 0 --grad_accum or --lr, a negative --min_lr or --grad_clip train
    silently wrong)."""
    assert run(tmp_path / "out", corpus_args, f"--{name}", *value.split()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --{name}=") and err.endswith(f": {rule}\n") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_resume_meta_refuses_a_folder_without_readable_metadata(tmp_path):
    """Under torchrun --resume reads the folder's meta file first: a folder whose .metadata is empty is refused there
    in one line, before every rank's loader would log its tracebacks."""
    folder = tmp_path / "ckpt.dcp"
    folder.mkdir()
    torch.save({k: 0 for k in train_setup.CKPT_KEYS}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--resume: cannot read .*ckpt.dcp \(RuntimeError: no readable .metadata"):
        train_setup.resume_meta(str(folder))


def test_option_rules_name_the_option_typed():
    """Where a rule breaks through a default, the error names the option the user typed and the default: the end of
    the cosine follows --max_iters, min_lr is the preset's; a resumed run cannot go back to an earlier step."""
    cfg = get_preset("tiny")
    for argv, message in [
        (("--warmup_iters", "10", "--max_iters", "3"), "--warmup_iters=10: must be <= lr_decay_iters (3: --max_iters"),
        (("--lr_hold_iters", "50", "--max_iters", "40"), "--lr_hold_iters=50: must be <= lr_decay_iters (40"),
        (("--lr", "1e-4",), "--min_lr=0.0003: must be <= lr (0.0001): the cosine goes down from lr to min_lr (the "
                            "tiny preset's default: give --min_lr)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            train_setup.check_args(resolve(*argv), cfg)
    with pytest.raises(ValueError, match=re.escape("--max_iters=3: must be >= the checkpoint's step (5)")):
        train_setup.check_args(resolve("--max_iters", "3"), cfg, start=5, resumed=True)
    train_setup.check_args(resolve("--max_iters", "5"), cfg, start=5, resumed=True)  # equal: nothing to do
    train_setup.check_args(resolve("--bench", "--max_iters", "2"), cfg, start=5, resumed=True)  # 2 steps to time
    # resumed: what was not typed is the checkpoint's (saved before these rules: min_lr above lr), and runs as saved
    saved = {"args": {"preset": "tiny", "lr": 1e-4, "min_lr": 3e-4, "warmup_iters": 1, "lr_decay_iters": 2}}
    parse = train_setup.build_parser().parse_args
    train_setup.check_args(train_setup.resolve_args(parse(["--max_iters", "4"]), saved), cfg, 2, resumed=True)
    for argv, message in [(["--lr", "2e-4"], "--min_lr=0.0003: must be <= lr (0.0002): the cosine goes down from lr "
                                             "to min_lr (the checkpoint's min_lr: give --min_lr)"),
                          (["--lr_hold_iters", "5"], "--lr_hold_iters=5: must be <= lr_decay_iters (2: the "
                                                     "checkpoint's; give --lr_decay_iters)")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            train_setup.check_args(train_setup.resolve_args(parse(argv), saved), cfg, 2, resumed=True)


def test_lr_decay_iters_may_equal_warmup_iters(tmp_path, corpus_args):
    """The schedule without a cosine phase (test_lr_schedule_without_a_cosine_phase) is accepted by check_args."""
    assert run(tmp_path, corpus_args, "--lr_decay_iters", "3", "--max_iters", "1") == 0


def test_resume_of_the_old_run_keeps_its_log_after_a_killed_overwrite(tmp_path, corpus_args, monkeypatch):
    """An --overwrite run killed (kill -9) before its first checkpoint leaves its log.jsonl.new beside the old run.
    --resume of the old run (its checkpoint names log.jsonl) drops that file and keeps the old run's own log: the
    new run's records must not replace it."""
    assert run(tmp_path, corpus_args, "--max_iters", "4", "--eval_interval", "2") == 0
    old_log = read_log(tmp_path)
    real, calls = data.Corpus.get_batch, []

    def get_batch(self, split, *a, **kw):
        calls.append(split)
        if len(calls) == 3:  # in the 3rd step of the new run; its first checkpoint would come at step 5
            raise Killed()
        return real(self, split, *a, **kw)

    monkeypatch.setattr(data.Corpus, "get_batch", get_batch)
    with pytest.raises(Killed):
        run(tmp_path, corpus_args, "--overwrite", "--seed", "7", "--max_iters", "8", "--ckpt_interval", "5")
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "log.jsonl.new") and load(tmp_path)["step"] == 4
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--max_iters", "6", "--device", "cpu"]) == 0
    assert read_log(tmp_path)[:len(old_log)] == old_log
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 7))
    assert not os.path.exists(tmp_path / "log.jsonl.new")


def test_ctrl_c_as_the_first_checkpoint_of_an_overwrite_run_lands(tmp_path, corpus_args, monkeypatch, capsys):
    """Ctrl-C right after the first checkpoint of an --overwrite run is in place, before its log replaces the old
    one: the signal waits for the rename too (train.save), so the folder holds the new run's checkpoint with the new
    run's log, and says so; it must not drop the new log and claim the old run is kept."""
    import signal
    assert run(tmp_path, corpus_args, "--max_iters", "4") == 0
    real = train.save_checkpoint

    def save_checkpoint(obj, path):
        real(obj, path)
        os.kill(os.getpid(), signal.SIGINT)  # the checkpoint is complete; the log is still log.jsonl.new

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    capsys.readouterr()
    assert run(tmp_path, corpus_args, "--overwrite", "--seed", "7", "--max_iters", "8", "--ckpt_interval", "3") == 130
    monkeypatch.undo()
    assert capsys.readouterr().err == f"interrupted: saved step 3 to {tmp_path / 'ckpt.pt'} (continue with --resume)\n"
    assert load(tmp_path)["step"] == 3 and load(tmp_path)["args"]["seed"] == 7
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "log.jsonl"]


def test_ctrl_c_during_an_optimizer_step_saves_that_step_and_resumes_exactly(tmp_path, corpus_args, monkeypatch,
                                                                              capsys, straight):
    """A Ctrl-C (a real SIGINT) while step 5's update is applied waits until the step, its count and its snapshot are
    done: the checkpoint holds step 5 with step 5's weights (the snapshot's tensors are the live ones, so a checkpoint
    labelled step 4 would hold step 5's weights and the resumed run would apply step 5 twice)."""
    import signal
    real, calls = train.optimizer_step, []

    def optimizer_step(r):
        calls.append(1)
        real(r)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    assert run(tmp_path, corpus_args, "--max_iters", "12", "--eval_interval", "12") == 130
    monkeypatch.undo()
    assert "interrupted: saved step 5 " in capsys.readouterr().err and load(tmp_path)["step"] == 5
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--device", "cpu"]) == 0
    assert_same_state(load(tmp_path)["model"], straight["model"])


def test_resume_at_an_evaluated_step_does_not_evaluate_it_again(tmp_path, corpus_args):
    """The checkpoints fall on evaluation steps by default (--ckpt_interval = --eval_interval): a resumed run
    evaluates its first step only if the log lacks that evaluation, so its log equals a straight run's."""
    opts = ["--eval_interval", "2", "--log_interval", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, corpus_args, *opts, "--max_iters", "6") == 0
    assert run(b, corpus_args, *opts, "--max_iters", "4") == 0
    assert train.main(["--out_dir", str(b), "--resume", "--max_iters", "6", "--device", "cpu"]) == 0
    got = read_log(b)
    assert [r["step"] for r in got if "val_main" in r] == [2, 4, 6]
    assert without_speed(got) == without_speed(read_log(a))


def test_a_failed_log_write_is_one_line_and_keeps_the_checkpoint(tmp_path, corpus_args, monkeypatch, capsys):
    """The disk fills up while a log record is written: one line, exit 1, the last checkpoint named and intact."""
    import errno
    real, calls = train.write_record, []

    def write_record(log, rec):
        calls.append(1)
        if len(calls) == 6:  # step 6's record; the checkpoint of step 4 is on disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(log, rec)

    monkeypatch.setattr(train, "write_record", write_record)
    assert run(tmp_path, corpus_args, "--max_iters", "8", "--ckpt_interval", "4", "--eval_interval", "100") == 1
    assert capsys.readouterr().err == (f"error: cannot write to {tmp_path} (No space left on device); "
                                       f"{tmp_path / 'ckpt.pt'} holds step 4\n")
    assert load(tmp_path)["step"] == 4


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update(tmp_path, corpus_args, monkeypatch, capsys):
    """A gradient that overflows while the loss stays finite (bf16, FP8): the run stops before the optimizer step, so
    no checkpoint of NaN weights replaces the last good one."""
    real, calls = train.clip_gradients, []

    def clip_gradients(opt, params, clip):
        calls.append(1)
        if len(calls) == 8:  # the last step, whose checkpoint would replace step 4's
            params[0].grad[0] = float("inf")
        return real(opt, params, clip)

    monkeypatch.setattr(train, "clip_gradients", clip_gradients)
    assert run(tmp_path, corpus_args, "--max_iters", "8", "--eval_interval", "4") == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 7" in err and err.count("\n") == 1
    ckpt = load(tmp_path)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_ctrl_c_then_a_full_disk_is_one_line(tmp_path, corpus_args, monkeypatch, capsys):
    """Ctrl-C, and the checkpoint it triggers hits a full disk: one line and exit 1, no traceback, no partial file."""
    real_batch, calls = data.Corpus.get_batch, []

    def get_batch(self, split, *a, **kw):
        calls.append(split)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_batch(self, split, *a, **kw)

    def full_disk(obj, f):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(data.Corpus, "get_batch", get_batch)
    monkeypatch.setattr(torch, "save", full_disk)
    assert run(tmp_path, corpus_args, "--max_iters", "10") == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "is the disk full?" in err and err.count("\n") == 1
    assert "ckpt.pt" not in os.listdir(tmp_path) and "ckpt.pt.tmp" not in os.listdir(tmp_path)


def test_ctrl_c_before_the_loop_is_one_line(tmp_path, corpus_args, monkeypatch, capsys):
    """Ctrl-C while train() prints its summary (the unigram baseline reads the whole corpus): exit 130, one line."""
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "unigram_baseline", interrupted)
    try:
        rc = run(tmp_path, corpus_args, "--max_iters", "2")
    except KeyboardInterrupt:  # caught here, or it would stop pytest itself
        pytest.fail("the Ctrl-C escaped train.main")
    assert rc == 130
    assert capsys.readouterr().err == "interrupted: no checkpoint written\n"


def test_bench_runs_a_short_timing_unless_given_max_iters(tmp_path, corpus_args, monkeypatch):
    """--bench without --max_iters times 10 steps after 3 warmup steps, not the run's 1000 steps."""
    real, calls = train.optimizer_step, []

    def optimizer_step(r):
        calls.append(1)
        assert len(calls) <= 13, "--bench ran more than 3 + 10 steps"
        real(r)

    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    assert train.main(["--out_dir", str(tmp_path / "b"), *corpus_args, *TINY_ARGS, *RUN, "--bench"]) == 0
    assert len(calls) == 13


def test_resume_takes_the_preset_from_the_checkpoint_and_a_typed_one_must_match(tmp_path, corpus_args, capsys):
    """On --resume the preset comes from the checkpoint (and its training defaults under the saved options); a
    --preset typed on the command line is compared with the checkpoint's model like any typed model field."""
    parse = train_setup.build_parser().parse_args
    assert train_setup.resolve_args(parse([]), {"args": {"preset": "small"}}).preset == "small"
    assert train_setup.resolve_args(parse([]), {"args": {"preset": "small"}}).lr == 6e-4
    assert run(tmp_path, corpus_args, "--max_iters", "1") == 0
    capsys.readouterr()
    assert train.main(["--out_dir", str(tmp_path), "--resume", "--preset", "small", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the model config does not match the checkpoint") and err.count("\n") == 1


def test_run_options_are_never_taken_from_a_checkpoint():
    """--device (a run may move machines), the folder, the layout and the other run options are this process's:
    a checkpoint holding them (an older or edited one) does not bring them back."""
    saved = {"args": {"device": "cuda:3", "out_dir": "elsewhere", "compile": True, "bench": True, "ep": 4, "pp": 2,
                      "resume": True, "overwrite": True, "plan": True, "dist_timeout": 1.0}}
    a = train_setup.resolve_args(train_setup.build_parser().parse_args([]), saved)
    assert (a.device, a.out_dir, a.compile, a.bench, a.ep, a.pp, a.resume, a.overwrite, a.plan, a.dist_timeout) == \
        ("auto", "out", None, False, 1, 1, False, False, False, 600.0)


def test_resume_from_another_folder_finds_a_relative_data_path(tmp_path, corpus_args, monkeypatch):
    """--data is saved as an absolute path: --resume started from another working directory reads the same file."""
    monkeypatch.chdir(os.path.dirname(corpus_args[1]))
    out = tmp_path / "run"
    assert train.main(["--out_dir", str(out), "--data", os.path.basename(corpus_args[1]), *corpus_args[2:],
                       *TINY_ARGS, *RUN, "--max_iters", "2"]) == 0
    assert load(out)["args"]["data"] == corpus_args[1]
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", "3", "--device", "cpu"]) == 0


def test_resume_over_other_tokens_says_so(tmp_path, corpus_args, capsys):
    """The checkpoint holds the SHA-256 of the token streams it trained on; a resume over the same tokens is silent, one
    over others (an edited corpus, another --data) goes on with a note that it is no straight run's continuation."""
    out = tmp_path / "run"
    assert train.main(["--out_dir", str(out), *corpus_args, *TINY_ARGS, *RUN, "--max_iters", "2"]) == 0
    digest = load(out)["tokens"]
    assert len(digest) == 2 and all(len(h) == 64 for h in digest)
    capsys.readouterr()
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", "3", "--device", "cpu"]) == 0
    assert "note: --resume" not in capsys.readouterr().err
    other = tmp_path / "other.txt"
    with open(corpus_args[1]) as f:
        other.write_text(f.read() + "x = 1\n" * 50)
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", "4", "--device", "cpu",
                       "--data", str(other)]) == 0
    assert "note: --resume: the corpus's tokens are not those the checkpoint was trained on" in capsys.readouterr().err


def test_a_missing_gpu_is_one_line(tmp_path, corpus_args, monkeypatch, capsys):
    """--device cuda on a machine without CUDA: one line before anything is written (not a traceback from the
    memory check's CUDA query)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(tmp_path / "out", corpus_args, "--device", "cuda") == 2
    assert capsys.readouterr().err == "error: --device cuda: CUDA is not available on this machine\n"
    assert not (tmp_path / "out").exists()


def test_fresh_run_refuses_a_folder_holding_a_distributed_checkpoint(tmp_path, corpus_args, capsys):
    """A torchrun run's checkpoint folder (ckpt.dcp) is a run like ckpt.pt: a fresh run refuses the folder."""
    (tmp_path / "ckpt.dcp").mkdir()
    assert run(tmp_path, corpus_args, "--max_iters", "1") == 2
    assert capsys.readouterr().err == (f"error: --out_dir {tmp_path} holds a run (ckpt.dcp): --resume continues it, "
                                       f"--overwrite replaces it (the old files stay until the new run's first "
                                       f"checkpoint)\n")
    assert os.listdir(tmp_path) == ["ckpt.dcp"]


def test_free_memory_reads_meminfo_in_kilobytes(monkeypatch):
    """/proc/meminfo counts kB: 1000 kB available is 1,024,000 bytes for the memory check."""
    import builtins
    import io
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **kw: io.StringIO("MemTotal: 2000 kB\nMemAvailable: 1000 kB\n")
                        if p == "/proc/meminfo" else real(p, *a, **kw))
    assert train_setup.free_memory(torch.device("cpu")) == 1000 * 1024


def test_plan_refuses_model_fields(capsys):
    """--plan plans a preset as it is: a model field beside it is refused in one line, not silently ignored."""
    assert train.main(["--plan", "--dim", "64"]) == 2
    assert capsys.readouterr().err == "error: --plan plans a preset as it is (give --preset only, no model fields)\n"


def test_overwrite_run_diverging_before_its_first_checkpoint_says_the_old_one_is_kept(tmp_path, corpus_args,
                                                                                     monkeypatch, capsys):
    """The stop line names what is on disk: the old run's checkpoint, unchanged (not "no checkpoint written")."""
    assert run(tmp_path, corpus_args, "--max_iters", "4") == 0
    real, calls = train.total_loss, []
    monkeypatch.setattr(train, "total_loss", lambda losses, *a: calls.append(1) or
                        (real(losses, *a) * (float("nan") if len(calls) == 2 else 1.0)))
    capsys.readouterr()
    assert run(tmp_path, corpus_args, "--overwrite", "--max_iters", "6", "--ckpt_interval", "3") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: non-finite loss") and err.endswith(f"; {tmp_path / 'ckpt.pt'} is unchanged\n")


def test_truncate_log_drops_damaged_lines_alone(tmp_path):
    """Resume cuts the log back to the checkpoint's step: records after it go, and so does a half-written last line;
    a damaged line in the middle (bad bytes, not JSON, not a record) goes alone, the records after it stay."""
    log = tmp_path / "log.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4, 5)]
    log.write_bytes("".join([good[0], '{"step": 2, "lo\n', good[1], "7\n", '{"step": "x"}\n', good[2]]).encode()
                    + b"\xff\xfe{\n" + "".join(good[3:]).encode() + b'{"step": 6, "lo')
    train.truncate_log(str(log), 4)
    assert log.read_text() == "".join(good[:4])
