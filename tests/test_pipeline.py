"""Pipeline parallelism (pipeline.py) against one process, on CPU with gloo.

pp = 2 with torch's Schedule1F1B (2 stages) and ScheduleDualPipeV (4 stages in a V), pp = 4 with 1F1B (middle
ranks, the embedding tied between ranks 0 and 3 for MTP), and pp 2 × dp 2 with FSDP2 (and ep 2): the summed
micro-batch losses equal the one-process loss of the whole batch, and every gradient (balance and MTP losses
included, the embedding shared by the first and last stages) equals the one-process gradient, in fp64. Then
train.py --pp under torchrun's environment against one process with --grad_accum, its refusals, and --plan."""
import os
import re

import pytest
import torch

import parallel
import pipeline
from dist_utils import run_workers
from helpers import DIST_RUN, TINY_ARGS, assert_same_run, read_log, tiny_config, train_worker
from model import Transformer
from pipeline import (InjectLoss, StageModule, build_pipeline, check_pipeline, embedding_tie_group, pipeline_metrics,
                      pipeline_step, stage_indices, stage_layers, sync_embedding_grads)

LAM, ALPHA = 0.3, 0.05  # a large α so that a missing or mis-scaled balance gradient shows
B, T = 4, 8


def tiny_cfg(**kw):
    return tiny_config(dict(n_layers=4, max_seq_len=16), **kw)


def make_model(cfg):
    torch.manual_seed(0)  # identical init on every rank
    return Transformer(cfg).double().train()


def batch(cfg, rows=B):
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, cfg.vocab_size, (rows, T + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]  # x (B, T), y (B, T)


def reference(cfg, rows=B):
    """One process, the whole batch: loss, gradients by name, MoE loads by layer."""
    model = make_model(cfg)
    x, y = batch(cfg, rows)
    _, losses = model(x, y)
    loss = losses["main"] + LAM * losses["mtp"] + ALPHA * losses["balance"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = {n: m.load.clone() for n, m in model.named_modules() if hasattr(m, "load")}
    return loss.detach(), grads, loads, {k: v.item() for k, v in losses.items()}


def _worker(rank, world, kind, n_micro, cfg):
    lay = parallel.init(pp=world, device="cpu")
    model = make_model(cfg)
    x, y = batch(cfg)
    tie = embedding_tie_group(lay)
    mods, sched = build_pipeline(model, kind, lay.pp_rank, lay.pp, n_micro, (B // n_micro, T),
                                 group=lay.group("pp"), lam=LAM, alpha=ALPHA)
    losses = pipeline_step(sched, mods, x, y)
    sync_embedding_grads(mods, kind, lay, tie)
    metrics = pipeline_metrics(mods, lay)
    grads = {n: p.grad.clone() for m in mods for n, p in m.named_parameters()}
    blocks = {f"layers.{n}": b for m in mods for n, b in m.layers.items()}
    blocks.update({f"mtp.{i}.block": mm.block for m in mods if m.is_last for i, mm in enumerate(m.mtp)})
    loads = {f"{n}.ffn": b.ffn.load.clone() for n, b in blocks.items() if hasattr(b.ffn, "load")}
    early = sum(p["balance"] for m in mods if not m.is_last for p in m.logged)  # L_Bal outside the last stage
    for m in mods:  # evaluation: forward only
        m.eval()
    pipeline.pipeline_forward(mods, kind, lay, x, y, n_micro)
    return {"losses": [l.detach() for l in losses], "grads": grads, "loads": loads, "early": early,
            "metrics": metrics, "eval": pipeline_metrics(mods, lay),
            "stages": [m.index for m in mods], "embed_on": [m.index for m in mods if m.embed is not None]}


@pytest.mark.slow
@pytest.mark.parametrize("kind,pp,n_micro,n_mtp", [("1f1b", 2, 2, 1), ("dualpipev", 2, 4, 1), ("1f1b", 4, 4, 1),
                                                  ("1f1b", 2, 2, 0)])
def test_pipeline_equals_one_process(kind, pp, n_micro, n_mtp):
    cfg = tiny_cfg(n_mtp=n_mtp)
    ref_loss, ref_grads, ref_loads, ref_parts = reference(cfg)
    got = run_workers(_worker, pp, kind, n_micro, cfg, init=False)
    last = pp - 1 if kind == "1f1b" else 0  # the V puts the last stage (and the loss) on rank 0
    assert all(r["losses"] == [] for i, r in enumerate(got) if i != last)
    # the last stage's losses plus the balance losses injected on the way (each / M) make the batch loss
    loss = torch.stack(got[last]["losses"]).sum() + ALPHA * sum(r["early"] for r in got) / n_micro
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-13)
    model = make_model(cfg).eval()
    with torch.no_grad():
        ref_eval = {k: v.item() for k, v in model(*batch(cfg))[1].items()}
    for r in got:  # every rank reports the batch's loss parts (summed over the pipeline)
        assert r["metrics"] == pytest.approx({k: ref_parts[k] for k in r["metrics"]}, rel=1e-12, abs=1e-14)
        assert r["eval"] == pytest.approx({k: ref_eval[k] for k in r["eval"]}, rel=1e-12, abs=1e-14)
    seen = set()
    for r in got:
        for n, g in r["grads"].items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-10, atol=1e-13), (kind, n)
            seen.add(n)
        for n, load in r["loads"].items():
            assert torch.equal(load, ref_loads[n]), n  # each token counted once (no extra forward)
    assert seen == set(ref_grads)  # every parameter lives on some stage
    if kind == "dualpipev":
        assert got[0]["stages"] == [0, 3] and got[1]["stages"] == [1, 2]
        assert got[0]["embed_on"] == [0, 3] and got[1]["embed_on"] == []  # embedding, head and MTP on rank 0


def _pp_dp_worker(rank, world, kind, n_micro, cfg, ep):
    """pp 2 × dp 2 (× ep): each pipeline runs its dp slice of the batch; FSDP2 averages the gradients over dp."""
    lay = parallel.init(ep=ep, pp=2, device="cpu")
    model = make_model(cfg)
    x, y = batch(cfg, 2 * B)
    x, y = parallel.dp_slice(x, lay), parallel.dp_slice(y, lay)  # (B, T) each
    tie = embedding_tie_group(lay)
    mods, sched = build_pipeline(model, kind, lay.pp_rank, lay.pp, n_micro, (B // n_micro, T),
                                 group=lay.group("pp"), lam=LAM, alpha=ALPHA)
    pipeline.parallelize_stages(mods, lay)
    pipeline_step(sched, mods, x, y)
    sync_embedding_grads(mods, kind, lay, tie)
    return {n: parallel.gather_full(p.grad) for m in mods for n, p in m.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("kind,ep", [("1f1b", 1), ("dualpipev", 1), ("dualpipev", 2)])
def test_pipeline_with_fsdp_equals_one_process(kind, ep):
    cfg = tiny_cfg()
    _, ref_grads, _, _ = reference(cfg, 2 * B)
    got = run_workers(_pp_dp_worker, 4, kind, 4, cfg, ep, init=False)
    seen = set()
    for grads in got:
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-10, atol=1e-13), (kind, n)
            seen.add(n)
    assert seen == set(ref_grads)


# -- single-process pieces ----------------------------------------------------------------------------------
def test_pipeline_bias_update_is_one_all_reduce_over_its_group(monkeypatch):
    """Every MoE layer a rank holds is updated from ONE all-reduce of all their loads, over the group given (the
    dp ranks of the stage; under pp the world mixes stages with other layers)."""
    moes = make_model(tiny_cfg()).moe_layers()  # 3 MoE blocks and the MTP block's
    for m in moes:
        m.load += torch.tensor([5, 1, 1, 1])
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: calls.append((tuple(t.shape), group)))
    stub = type("Stub", (), {"moe_layers": lambda self: moes})()
    pipeline.Pipeline.update_moe_bias(stub, 0.01, "dp group")
    assert calls == [((len(moes), 4), "dp group")]
    for m in moes:  # expert 0 had the most tokens: its bias goes down, the others' up; the loads start afresh
        assert m.gate.bias.tolist() == [-0.01, 0.01, 0.01, 0.01] and int(m.load.sum()) == 0


def test_stage_layout():
    assert [stage_layers(8, 4, i) for i in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_indices("1f1b", 4, 1) == [1] and stage_indices("dualpipev", 4, 1) == [1, 6]
    with pytest.raises(ValueError, match="cannot be cut into 3 equal stages"):
        stage_layers(4, 3, 0)


@pytest.mark.parametrize("kind,pp,n_micro,match", [
    ("1f1b", 3, 4, "4 blocks cannot be cut into 3"),
    ("dualpipev", 4, 8, "4 blocks cannot be cut into 8"),
    ("dualpipev", 2, 3, "--microbatches \\(3\\) must be >= the stage count \\(4"),
    ("1f1b", 2, 1, "--microbatches \\(1\\) must be >= the stage count \\(2"),
    ("gpipe", 2, 4, "'1f1b' or 'dualpipev'"),
])
def test_bad_layouts_are_refused(kind, pp, n_micro, match):
    with pytest.raises(ValueError, match=match):
        check_pipeline(4, kind, pp, n_micro)


def test_stages_compose_to_the_model():
    # The stage modules run back to back in one process give the model's loss, and keep its parameter names.
    cfg = tiny_cfg()
    model = make_model(cfg)
    x, y = batch(cfg)
    _, losses = model(x, y)
    ref = losses["main"] + LAM * losses["mtp"] + ALPHA * losses["balance"]
    stages = [StageModule(model, s, 4, 1, LAM, ALPHA) for s in range(4)]
    h = x
    for s in stages:
        h = s(h, x, y)
    early = sum(p["balance"] for s in stages[:-1] for p in s.logged)  # injected on the way, not in h
    assert torch.allclose(h + ALPHA * early, ref, rtol=0, atol=1e-14)
    names = {n for s in stages for n, _ in s.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()}


def test_stage_losses_are_scaled_per_micro_batch():
    """Every loss a stage makes is divided by the number M of micro-batches where it is made: the last stage returns
    (L_main + λ·L_MTP + α·L_Bal) / M and the earlier stages inject α·L_Bal / M (InjectLoss). The stages run back to
    back in one process on each of M micro-batches, one backward each: the summed gradients are the one-process
    gradients of the whole batch (no schedule, no processes: the slow pipeline tests' check, in the fast tier)."""
    cfg = tiny_cfg()
    _, ref_grads, _, _ = reference(cfg)
    model = make_model(cfg)
    x, y = batch(cfg)
    M = 2
    stages = [StageModule(model, s, 4, M, LAM, ALPHA) for s in range(4)]
    for xm, ym in zip(x.tensor_split(M), y.tensor_split(M)):
        h = xm
        for s in stages:
            h = s(h, xm, ym)
        h.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], rtol=1e-10, atol=1e-13), n


def test_inject_loss_adds_the_gradient_of_its_loss():
    h = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn((), dtype=torch.float64, requires_grad=True)
    y = InjectLoss.apply(h, 2 * w)
    assert y.data_ptr() != h.data_ptr() and torch.equal(y, h)  # a clone, not h itself
    (y * 3).sum().backward()
    assert torch.equal(h.grad, torch.full_like(h, 3.0)) and w.grad.item() == 2.0


# -- train.py --pp under torchrun (forked workers with torchrun's environment) --------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind,n_layers,micro,dp,ep", [("1f1b", 2, 2, 1, 1), ("dualpipev", 4, 4, 1, 1),
                                                     ("1f1b", 2, 2, 2, 2), ("dualpipev", 4, 4, 2, 1)])
def test_train_with_pp_equals_one_process(tmp_path, corpus_args, kind, n_layers, micro, dp, ep):
    """train.py --pp 2 on 2·dp ranks (experts over ep) == one process with --grad_accum M on the same
    micro-batches, λ switched after the first step: weights, gate biases and log after 3 steps; the distributed
    checkpoint loads in one process under the model's names."""
    import checkpoint
    import train
    common = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--n_layers", str(n_layers), "--max_iters", "3",
              "--eval_interval", "3", "--mtp_lambda_iters", "1", "--mtp_lambda_after", "0.1"]  # λ switched
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train.main([*common, "--batch_size", str(2 * dp), "--grad_accum", str(micro), "--out_dir", one]) == 0
    out = run_workers(train_worker, 2 * dp, [*common, "--batch_size", "2", "--pp", "2", "--pp_schedule", kind,
                                              "--microbatches", str(micro), "--ep", str(ep), "--out_dir", two],
                      init=False, timeout_s=300)
    assert all(code == 0 for code, _ in out) and all(err == "" for _, err in out[1:])
    assert_same_run(one, two, 3, ("loss", "main", "mtp", "balance", "grad_norm", "val_main", "val_mtp",
                                  "max_violation"))
    if ep > 1:  # the MoE layers all sit on the last stage; 2 expert groups on 2 ranks, a token may use 1 group
        assert read_log(two)[-1]["ranks_per_token"] == 1.0
    if dp == 1 and kind == "dualpipev":  # resumed in the pipeline, one more step: still the one-process run
        assert train.main([*common, "--batch_size", "2", "--grad_accum", str(micro), "--out_dir", one, "--resume",
                           "--max_iters", "4"]) == 0
        out = run_workers(train_worker, 2, [*common, "--batch_size", "2", "--pp", "2", "--pp_schedule", kind,
                                             "--microbatches", str(micro), "--out_dir", two, "--resume",
                                             "--max_iters", "4"], init=False, timeout_s=300)
        assert all(code == 0 for code, _ in out)
        a = checkpoint.load_checkpoint(os.path.join(one, "ckpt.pt"), "test")["model"]
        b = checkpoint.load_checkpoint(os.path.join(two, "ckpt.pt"), "test")["model"]
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("extra,match", [
    (["--pp", "2", "--n_layers", "3"], "3 blocks cannot be cut into 2 equal stages"),
    (["--pp", "2", "--pp_schedule", "dualpipev"], "2 blocks cannot be cut into 4 equal stages"),
    (["--pp", "2", "--pp_schedule", "dualpipev", "--n_layers", "4", "--microbatches", "3"],
     "--microbatches \\(3\\) must be >= the stage count \\(4"),
    (["--pp", "2", "--grad_accum", "2"], "--grad_accum=2: with --pp"),
])
def test_train_refuses_bad_pipelines_once(tmp_path, corpus_args, extra, match):
    """One line from rank 0, nothing from rank 1, exit 2 on both: never a hang."""
    out = run_workers(train_worker, 2, [*corpus_args, *TINY_ARGS, *DIST_RUN, "--out_dir", str(tmp_path), *extra],
                      init=False, timeout_s=120)
    assert [code for code, _ in out] == [2, 2] and out[1][1] == ""
    assert re.search(match, out[0][1]) and out[0][1].count("\n") == 1, out[0][1]


def test_train_refuses_pipeline_options_alone(tmp_path, corpus_args, capsys):
    import train
    base = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--out_dir", str(tmp_path)]
    assert train.main([*base, "--microbatches", "2"]) == 2
    assert capsys.readouterr().err == "error: --microbatches=2: needs --pp > 1 (one process: --grad_accum)\n"
    assert train.main([*base, "--pp_schedule", "dualpipev"]) == 2
    assert capsys.readouterr().err == "error: --pp_schedule='dualpipev': needs --pp > 1\n"
    assert train.main([*base, "--gpus", "8"]) == 2
    assert capsys.readouterr().err == "error: --gpus=8: goes with --plan\n"
    assert train.main([*corpus_args, *TINY_ARGS, *DIST_RUN, "--out_dir", str(tmp_path), "--pp", "2"]) == 2
    assert "needs several processes" in capsys.readouterr().err


def test_train_plan(capsys):
    import train
    argv = ["--preset", "v3-671b", "--plan", "--gpus", "2048", "--gpus_per_node", "8", "--ep", "64", "--pp", "16"]
    assert train.main(argv + ["--pp_schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert "pp 16 (1f1b, 16 stages of 3-4 blocks) x dp 128 (ep 64 x efsdp 2)" in out and "report: 2048 H800" in out
    # what is not given is the report's layout: 2048 GPUs, 8 a node, ep 64, pp 16, DualPipe
    for given in (argv, ["--plan"]):
        assert train.main(given) == 0
        out = capsys.readouterr().out
        assert "2048 GPUs (8 a node): pp 16 (dualpipe, 16 stages of 3-4 blocks) x dp 128 (ep 64" in out
    assert train.main(["--plan", "--preset", "small", "--pp", "1", "--gpus", "8", "--ep", "8"]) == 0
    assert "on 8 GPUs (8 a node): pp 1 (1f1b, 1 stages" in capsys.readouterr().out  # an odd pp: 1F1B, not DualPipe
    assert train.main(["--plan", "--gpus", "0"]) == 2  # refused, not replaced by the default
    assert capsys.readouterr().err == "error: --gpus must be >= 1, got 0\n"
    assert train.main(argv + ["--gpus", "128", "--ep", "8"]) == 2  # 32 experts of a layer on each GPU
    assert capsys.readouterr().err.startswith("error: does not fit: pp rank")
