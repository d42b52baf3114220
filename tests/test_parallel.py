"""parallel.py and moe.dispatch_ep on CPU with gloo: every distributed result equals the single process.

Workers are forked from the pytest process (tests/dist_utils.py), tiny fp64 models, a few steps."""
import json
import os
import signal
from functools import partial

import pytest
import torch
import torch.distributed as dist

import checkpoint
import parallel
from dist_utils import run_workers
from helpers import DIST_RUN, TINY_ARGS, assert_same_run, read_log, tiny_config, train_worker

pytestmark = pytest.mark.slow


# -- layout -------------------------------------------------------------------------------------------------------
def _layout_worker(rank, world, ep, pp):
    lay = parallel.init(ep=ep, pp=pp, device="cpu")
    groups = {name: dist.get_process_group_ranks(lay.group(name)) for name in ("pp", "dp", "efsdp", "ep")}
    return lay.describe(), lay.pp_rank, lay.dp_rank, lay.ep_rank, groups


def test_layout_of_8_ranks():
    """The picture in parallel.py's header: pp 2 × dp 4 with ep 2 on 8 ranks."""
    out = run_workers(_layout_worker, 8, 2, 2, init=False)
    for rank, (text, pp_rank, dp_rank, ep_rank, groups) in enumerate(out):
        assert text == "dp 4 (ep 2 × efsdp 2) × pp 2 on 8 ranks, gloo"
        assert (pp_rank, dp_rank, ep_rank) == (rank // 4, rank % 4, rank % 2)
        stage = 4 * (rank // 4)
        assert groups["dp"] == [stage, stage + 1, stage + 2, stage + 3]
        assert groups["ep"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["efsdp"] == [stage + rank % 2, stage + rank % 2 + 2]
        assert groups["pp"] == [rank % 4, rank % 4 + 4]


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="not divisible by ep × pp"):
        parallel.check_sizes(6, 4, 1)
    with pytest.raises(ValueError, match="do not split evenly"):
        parallel.check_sizes(4, 4, 1, n_experts=6)
    assert parallel.check_sizes(8, 2, 2, n_experts=8) == 4


def test_ep_without_torchrun_raises(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        parallel.init(ep=2, device="cpu")
    assert not parallel.init(device="cpu").distributed


def test_dp_slices_cover_the_global_batch():
    batch = torch.arange(12).view(6, 2)
    lays = [parallel.Layout(rank=r, world=3, dp=3) for r in range(3)]
    assert torch.equal(torch.cat([parallel.dp_slice(batch, lay) for lay in lays]), batch)


# -- expert parallelism: dispatch_ep == dispatch_grouped ---------------------------------------------------------
def _moe_cfg(**kw):
    from config import ModelConfig
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
                n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5, init_std=0.2)
    return ModelConfig(**{**base, **kw})


def _dispatch_ep_worker(rank, world, n_tokens):
    import copy
    from torch.distributed.device_mesh import init_device_mesh
    import moe

    torch.manual_seed(0)
    cfg = _moe_cfg()
    ref = moe.MoE(cfg).double()
    ref.gate.bias.copy_(torch.randn(8, dtype=torch.float64) * 0.05)
    m = copy.deepcopy(ref)
    m.shard(init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))["ep"])
    X = torch.randn(world, n_tokens, cfg.dim, dtype=torch.float64, requires_grad=True)  # the global batch
    G = torch.randn(world, n_tokens, cfg.dim, dtype=torch.float64)  # d loss / d output
    x = X.detach()[rank:rank + 1].clone().requires_grad_()  # (1, n, dim): this rank's sequence
    # expert-parallel run on this rank's tokens; the reference on all tokens in one process
    y = m(x)
    (y * G[rank:rank + 1]).sum().backward()
    y_ref = ref(X)
    (y_ref * G).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref[rank:rank + 1], **tol)
    torch.testing.assert_close(x.grad, X.grad[rank:rank + 1], **tol)
    E_local = cfg.n_routed_experts // world
    for name in ("w1", "w2", "w3"):
        got = getattr(m.experts, name).grad  # a DTensor: this rank's experts, gradients from every rank's tokens
        assert got.placements[0].is_shard(0)
        want = getattr(ref.experts, name).grad[rank * E_local:(rank + 1) * E_local]
        torch.testing.assert_close(got.to_local(), want, **tol)
    for p, p_ref in ((m.gate.weight, ref.gate.weight), (m.shared_experts.w1.weight, ref.shared_experts.w1.weight)):
        g = p.grad.clone()
        dist.all_reduce(g)  # replicated parameters: the gradient of the whole batch is the sum over ranks
        torch.testing.assert_close(g, p_ref.grad, **tol)
    # node-limited routing: expert groups live on ranks, so a token reaches at most n_limited_groups ranks
    _, idx, _ = m.gate(x.detach().view(-1, cfg.dim))
    owners = [len(set(row)) for row in (idx // E_local).tolist()]
    assert max(owners) <= min(cfg.n_limited_groups, world)  # each rank holds n_expert_groups / ep whole groups
    assert float(m.last_ranks_per_token) == pytest.approx(sum(owners) / len(owners))
    # aux-loss-free update: the loads of all ranks in one all-reduce, the same biases as the whole batch gives
    m.update_bias(0.01)
    ref.update_bias(0.01, load=ref.load.clone())  # the whole batch: nothing to sum
    assert torch.equal(m.gate.bias, ref.gate.bias)
    return rank


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_ep_equals_grouped(world):
    """Outputs, input gradients, expert and gate gradients, bias updates: ep ranks == one process, fp64."""
    assert run_workers(_dispatch_ep_worker, world, 24) == list(range(world))


def _skewed_worker(rank, world):
    """Every token picks experts 0-2 (rank 0): rank 1 receives no rows, ranks send different amounts."""
    import copy
    from torch.distributed.device_mesh import init_device_mesh
    import moe

    torch.manual_seed(1)
    ref = moe.MoE(_moe_cfg(n_expert_groups=1, n_limited_groups=1)).double()
    ref.gate.bias.copy_(torch.tensor([9.0, 9, 9, 0, 0, 0, 0, 0], dtype=torch.float64))  # experts 0-2 always win
    m = copy.deepcopy(ref)
    m.shard(init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))["ep"])
    X = torch.randn(world, 5, 16, dtype=torch.float64)
    n = [5, 2][rank % 2]  # tokens per rank
    x = X[rank:rank + 1, :n].clone().requires_grad_()
    y = m(x)
    y.sum().backward()
    parts = [X[r:r + 1, :[5, 2][r % 2]] for r in range(world)]
    y_ref = [ref(p) for p in parts]
    sum(t.sum() for t in y_ref).backward()
    torch.testing.assert_close(y, y_ref[rank], rtol=1e-12, atol=1e-12)
    E_local = 8 // world
    want = ref.experts.w2.grad[rank * E_local:(rank + 1) * E_local]
    torch.testing.assert_close(m.experts.w2.grad.to_local(), want, rtol=1e-12, atol=1e-12)
    return rank


def test_dispatch_ep_uneven_and_empty():
    assert run_workers(_skewed_worker, 2) == [0, 1]


# -- gradient clipping across meshes ------------------------------------------------------------------------------
def _clip_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    g = torch.Generator().manual_seed(0)  # the same numbers on every rank
    rep, plain = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    shards = torch.randn(world, 2, 4, generator=g, dtype=torch.float64)  # rank r holds shards[r]
    params = []
    for local, placement in ((rep, Replicate()), (shards[rank], Shard(0))):
        p = torch.nn.Parameter(DTensor.from_local(torch.zeros_like(local), mesh, [placement], run_check=False))
        p.grad = DTensor.from_local(local.clone(), mesh, [placement], run_check=False)
        params.append(p)
    p = torch.nn.Parameter(torch.zeros_like(plain))
    p.grad = plain.clone()
    params.append(p)
    norm = parallel.clip_grad_norm(params, 1.0)
    # replicated copies counted once, every shard once, the plain (replicated) tensor once
    want = (rep.square().sum() + shards.square().sum() + plain.square().sum()).sqrt()
    torch.testing.assert_close(norm, want, rtol=1e-12, atol=0)
    assert want > 1.0  # clipping is active: every gradient scaled by 1 / ‖g‖
    scale = 1.0 / (want + 1e-6)
    torch.testing.assert_close(params[0].grad.to_local(), rep * scale, rtol=1e-9, atol=0)
    torch.testing.assert_close(params[1].grad.to_local(), shards[rank] * scale, rtol=1e-9, atol=0)
    torch.testing.assert_close(params[2].grad, plain * scale, rtol=1e-9, atol=0)
    return rank


def test_clip_grad_norm_counts_replicated_gradients_once():
    """A gradient replicated over a mesh dimension is one copy, not a shard: its ‖g‖² must not be summed over the
    ranks of that dimension (only sharded dimensions are)."""
    assert run_workers(_clip_worker, 2) == [0, 1]


# -- data parallelism (FSDP2) with and without expert parallelism == one process --------------------------------
def tiny_cfg(**kw):
    return tiny_config(dict(n_layers=3, qk_rope_head_dim=8, max_seq_len=16, n_routed_experts=8, n_expert_groups=4,
                            n_limited_groups=2, init_std=0.1), **kw)


def _losses(model, x, y, accum):
    _, losses = model(x, y)
    return (losses["main"] + 0.3 * losses["mtp"] + 0.01 * losses["balance"]) / accum


def _dp_worker(rank, world, ep, optimizer, steps, accum):
    import copy
    from model import Transformer

    lay = parallel.init(ep=ep, device="cpu")
    parallel.seed_all(0)
    ref = Transformer(tiny_cfg()).double()  # the single process, run on every rank on the whole batch
    model = parallel.parallelize(copy.deepcopy(ref), lay)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1)}[optimizer]
    opt, opt_ref = make(model.parameters()), make(ref.parameters())
    gen = torch.Generator().manual_seed(1)
    B, T = 2, 12
    warned = _record_warnings("torch.distributed.tensor")  # the other ranks print nothing but errors
    for step in range(steps):
        for micro in range(accum):
            tokens = torch.randint(64, (B * lay.dp, T + 1), generator=gen)  # the global batch, alike everywhere
            x, y = tokens[:, :-1], tokens[:, 1:]
            parallel.set_gradient_sync(model, micro == accum - 1)
            _losses(model, parallel.dp_slice(x, lay), parallel.dp_slice(y, lay), accum).backward()
            _losses(ref, x, y, accum).backward()
        norm = parallel.clip_grad_norm(list(model.parameters()), 0.5, lay)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        assert norm_ref > 0.5  # clipping is active
        torch.testing.assert_close(norm, norm_ref, rtol=1e-12, atol=0)
        for o, m in ((opt, model), (opt_ref, None)):
            o.step()
            o.zero_grad(set_to_none=True)
        model.update_moe_bias(0.01, lay.group("dp"))
        for m in ref.moe_layers():  # the whole batch's loads: nothing to sum over ranks
            m.update_bias(0.01, load=m.load.clone())
    assert warned == [], warned  # (gathering whole tensors below may warn: that is the test's, not training's)
    tol = 1e-12 if optimizer == "sgd" else 1e-10
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(parallel.gather_full(p.detach()), ref_params[name].detach(), rtol=tol, atol=tol)
    moved = 0
    for m, m_ref in zip(model.moe_layers(), ref.moe_layers()):
        assert torch.equal(m.gate.bias, m_ref.gate.bias)  # bit-equal
        moved += int(m.gate.bias.abs().sum() > 0)
    assert moved > 0
    parallel.teardown()
    return rank


def _record_warnings(logger: str) -> list:
    """The messages of warnings that `logger` (and its children) emit from now on."""
    import logging
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    logging.getLogger(logger).addHandler(Keep(logging.WARNING))
    return seen


@pytest.mark.parametrize("world,ep,optimizer,accum", [(2, 1, "sgd", 2), (2, 1, "adamw", 1), (2, 2, "adamw", 1),
                                                      (4, 2, "sgd", 1)])
def test_data_and_expert_parallel_equal_one_process(world, ep, optimizer, accum):
    """dp = world/ep ranks (FSDP2), experts over ep: weights after 3 steps and gate biases == one process."""
    assert run_workers(_dp_worker, world, ep, optimizer, 3, accum, init=False, timeout_s=300) == list(range(world))


# -- distributed checkpoints ---------------------------------------------------------------------------------------
def _build(lay, seed):
    from model import Transformer
    parallel.seed_all(seed)
    model = parallel.parallelize(Transformer(tiny_cfg()).double(), lay)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def _steps(model, opt, lay, gen, n, global_rows=None):
    """n AdamW steps on global batches of global_rows (default 2 per dp rank), of which this rank keeps its slice."""
    for _ in range(n):
        tokens = torch.randint(64, (global_rows or 2 * lay.dp, 13), generator=gen)  # the global batch
        x, y = parallel.dp_slice(tokens[:, :-1], lay), parallel.dp_slice(tokens[:, 1:], lay)
        _losses(model, x, y, 1).backward()
        parallel.clip_grad_norm(list(model.parameters()), 0.5, lay)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_bias(0.01, lay.group("dp"))


def _full_state(model):
    sd = {name: parallel.gather_full(p.detach()).clone() for name, p in model.named_parameters()}
    sd.update({name: b.clone() for name, b in model.named_buffers() if name.endswith("gate.bias")})
    return sd


def _resume_worker(rank, world, folder):
    lay = parallel.init(ep=2, device="cpu")
    model, opt = _build(lay, 0)
    gen = torch.Generator().manual_seed(1)
    _steps(model, opt, lay, gen, 2)
    checkpoint.save_distributed(os.path.join(folder, "ckpt"), model, opt, {"step": 2, "data": gen.get_state()})
    _steps(model, opt, lay, gen, 2)
    straight = _full_state(model)
    model, opt = _build(lay, 123)  # other weights: everything must come from the checkpoint
    meta = checkpoint.load_distributed(os.path.join(folder, "ckpt"), model, opt)
    gen = torch.Generator()
    gen.set_state(meta["data"])
    _steps(model, opt, lay, gen, 2)
    resumed = _full_state(model)
    assert meta["step"] == 2 and straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    parallel.teardown()
    return rank


def test_distributed_resume_is_bit_identical(tmp_path):
    """ep=2 on 2 ranks, AdamW: 2 steps, save, 2 steps == 2 steps, save, fresh model, load, 2 steps (bit-equal)."""
    assert run_workers(_resume_worker, 2, str(tmp_path), init=False, timeout_s=300) == [0, 1]


def _save_worker(rank, world, folder, load_from, save_to):
    lay = parallel.init(ep=2, device="cpu")
    model, opt = _build(lay, 0)
    if load_from:
        checkpoint.load_distributed(os.path.join(folder, load_from), model, opt)
    loaded = _full_state(model)
    _steps(model, opt, lay, torch.Generator().manual_seed(7), 1)
    checkpoint.save_distributed(os.path.join(folder, save_to), model, opt, {"step": 1})
    after = _full_state(model)  # a collective: every rank gathers
    out = (loaded, after) if rank == 0 else None
    parallel.teardown()
    return out


def _one_process(folder, name, dp):
    """Load a distributed checkpoint in this process (no process group), then one step on the global batch of a
    dp-rank run: returns (the loaded weights, the weights after the step)."""
    from model import Transformer
    state = checkpoint.load_distributed_full(os.path.join(folder, name), keys=("model", "optimizer"))
    model = Transformer(tiny_cfg()).double()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model.load_state_dict(state["model"])
    checkpoint.load_optimizer_state(model, opt, state["optimizer"])
    loaded = _full_state(model)
    _steps(model, opt, parallel.Layout(), torch.Generator().manual_seed(7), 1, global_rows=2 * dp)
    return state, loaded, _full_state(model)


def test_checkpoint_2_ranks_to_4_ranks_to_one_process(tmp_path):
    """Save on 2 ranks (ep 2), load on 4 ranks (dp 4, ep 2), save, load in one process: every expert is there
    and each step continues from exactly the saved model and optimizer state."""
    folder = str(tmp_path)
    _, after2 = run_workers(_save_worker, 2, folder, None, "a", init=False, timeout_s=300)[0]
    loaded4, after4 = run_workers(_save_worker, 4, folder, "a", "b", init=False, timeout_s=300)[0]
    for name in after2:
        assert torch.equal(loaded4[name], after2[name]), name
    # one process reads the 2-rank checkpoint: every expert of every layer, then the same step as the 4 ranks
    state, loaded1, stepped1 = _one_process(folder, "a", dp=4)
    assert state["step"] == 1
    experts = [n for n in state["model"] if n.endswith("experts.w1")]
    assert len(experts) == 3 and all(state["model"][n].shape[0] == 8 for n in experts)
    for name in after2:
        assert torch.equal(loaded1[name], after2[name]), name
        torch.testing.assert_close(stepped1[name], after4[name], rtol=1e-10, atol=1e-12)
    # and the 4-rank checkpoint
    _, loaded1b, _ = _one_process(folder, "b", dp=4)
    for name in after4:
        assert torch.equal(loaded1b[name], after4[name]), name
    assert not os.path.exists(os.path.join(folder, "b.tmp")) and not os.path.exists(os.path.join(folder, "b.old"))
    # a crash between save_distributed's two renames leaves only b.old (and perhaps a half-written b.tmp)
    os.replace(os.path.join(folder, "b"), os.path.join(folder, "b.old"))
    os.makedirs(os.path.join(folder, "b.tmp"))
    state = checkpoint.load_distributed_full(os.path.join(folder, "b"))
    for name in after4:
        assert torch.equal(state["model"][name], after4[name]), name


# -- faults: a dead or stuck rank ends the job ----------------------------------------------------------------------
def _fault_worker(rank, world, how):
    import signal
    import time
    parallel.init(device="cpu", timeout_s=2)
    x = torch.ones(4)
    dist.all_reduce(x)  # every rank is up
    if rank == 1:
        if how == "dead":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(6)  # stuck for longer than the timeout
    for _ in range(100):
        dist.all_reduce(x)
    return "finished"


@pytest.mark.parametrize("how", ["dead", "stuck"])
def test_dead_or_stuck_rank_ends_the_others(how):
    """The other ranks fail with an error (not a hang): immediately for a dead peer, after the 2 s
    process-group timeout for a stuck one."""
    outcomes = run_workers(_fault_worker, 3, how, init=False, check=False, timeout_s=40)
    codes = [code for code, _ in outcomes]
    assert codes[0] == 1 and codes[2] == 1, outcomes
    assert codes[1] == (-9 if how == "dead" else 1)  # killed itself, or woke up to find the others gone
    error = outcomes[0][1].strip().splitlines()[-1]
    assert ("Timed out" in error) if how == "stuck" else ("peer" in error), error


def _rank0_first_worker(rank, world, fail):
    lay = parallel.init(device="cpu")
    order = []

    def build():
        order.append(rank)
        if fail:
            raise ValueError("no such corpus")
        return rank

    try:
        result = parallel.rank0_first(build, lay)
    except (ValueError, parallel.PeerFailed) as e:
        result = type(e).__name__
    stop = parallel.any_rank(rank == world - 1, lay)  # only the last rank saw a signal
    return result, order, stop


def test_rank0_first_and_any_rank():
    ok = run_workers(_rank0_first_worker, 3, False, init=False)
    assert ok == [(0, [0], True), (1, [1], True), (2, [2], True)]
    failed = run_workers(_rank0_first_worker, 3, True, init=False)
    assert [r[0] for r in failed] == ["ValueError", "PeerFailed", "PeerFailed"]
    assert [r[1] for r in failed] == [[0], [], []]  # the others never tried


# -- train.py under torchrun (forked workers with torchrun's environment) ---------------------------------------
def test_train_under_torchrun_equals_one_process(tmp_path, corpus_args):
    """dp 4 with the experts over ep 2, on 4 ranks (fp32, gloo) == one process on the same global batch: weights,
    gate biases, log. Then a one-process --resume continues the distributed checkpoint, generate.py reads it and
    hf_io writes it in the Hugging Face layout."""
    import generate
    import hf_io
    import train
    common = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--max_iters", "3", "--eval_interval", "3"]
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    assert train.main([*common, "--batch_size", "4", "--out_dir", one]) == 0
    out = run_workers(train_worker, 4, [*common, "--batch_size", "1", "--ep", "2", "--out_dir", four],
                      init=False, timeout_s=300)
    assert [code for code, _ in out] == [0, 0, 0, 0] and all(err == "" for _, err in out[1:])
    assert os.path.isdir(os.path.join(four, "ckpt.dcp")) and not os.path.exists(os.path.join(four, "ckpt.pt"))
    _, log_four = assert_same_run(one, four, 3, ("loss", "main", "grad_norm", "val_main"))
    assert log_four[-1]["ranks_per_token"] == 1.0  # 2 expert groups on 2 ep ranks, a token may use 1 group
    # the distributed run continues in one process, and generate.py reads its checkpoint
    assert train.main([*common, "--batch_size", "4", "--out_dir", four, "--resume", "--max_iters", "4"]) == 0
    assert checkpoint.load_checkpoint(os.path.join(four, "ckpt.pt"), "test")["step"] == 4
    model, _ = generate.load_model(four)
    assert model.layers[1].ffn.experts.w1.shape[0] == 4
    hf_io.save_hf_checkpoint(model, str(tmp_path / "hf"))  # and on to the Hugging Face layout and back
    back = hf_io.load_hf_checkpoint(str(tmp_path / "hf"))
    assert torch.equal(back.layers[1].ffn.experts.w2, model.layers[1].ffn.experts.w2)


@pytest.mark.parametrize("world,extra,message", [(3, ["--ep", "2"], "not divisible by ep × pp"),
                                                 (3, ["--ep", "3"], "do not split evenly")])
def test_bad_layout_one_line_from_rank_0(tmp_path, corpus_args, world, extra, message):
    out = run_workers(train_worker, world, [*corpus_args, *TINY_ARGS, *DIST_RUN, "--out_dir", str(tmp_path), *extra],
                      init=False, timeout_s=120)
    assert [code for code, _ in out] == [2] * world
    assert out[0][1].count("\n") == 1 and message in out[0][1] and out[0][1].startswith("error: ")
    assert all(err == "" for _, err in out[1:])


def test_ep_without_torchrun_is_refused(tmp_path, corpus_args, capsys, monkeypatch):
    import train
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert train.main([*corpus_args, *TINY_ARGS, *DIST_RUN, "--out_dir", str(tmp_path), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchrun" in err


def test_torchrun_resume_refuses_to_go_back_behind_a_newer_one_process_checkpoint(tmp_path):
    """out/ckpt.dcp (a distributed run), then out/ckpt.pt (python train.py --resume went on from it): --resume
    under torchrun must not silently restart from the older folder."""
    import time
    from train_setup import resume_meta
    import torch.distributed.checkpoint as dcp
    folder = tmp_path / "ckpt.dcp"
    dcp.save({"w": torch.zeros(1)}, checkpoint_id=str(folder), no_dist=True)  # a readable .metadata
    torch.save({"step": 4}, folder / checkpoint.DCP_META)
    time.sleep(0.01)
    torch.save({"step": 6}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt is newer than .*python train.py --resume"):
        resume_meta(str(folder))
    os.utime(tmp_path / "ckpt.pt", (0, 0))  # the folder is the newer one: read it
    with pytest.raises(ValueError, match="is not a train.py checkpoint"):  # (this meta holds a step only)
        resume_meta(str(folder))


@pytest.mark.parametrize("rank,said", [("0", "interrupted before training started\n"), ("1", "")])
def test_ctrl_c_during_setup_is_told_by_rank_0_only(capsys, monkeypatch, rank, said):
    """torchrun hands Ctrl-C to every rank; during setup (nothing to save) each exits 130 and rank 0 says why."""
    import train

    def interrupted(ns):
        raise KeyboardInterrupt
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(train, "setup", interrupted)
    assert train.main([]) == 130
    assert capsys.readouterr().err == said


def _signal_rank_1_at_step_2(sig, rank, train):
    """Rank 1 gets signal `sig` during its third optimizer step; the other ranks run on."""
    step = train.optimizer_step

    def patched(run):
        step(run)
        if rank == 1 and run.step == 2:
            os.kill(os.getpid(), sig)
    train.optimizer_step = patched


def test_sigterm_under_torchrun_saves_and_stops_every_rank(tmp_path, corpus_args):
    """Only rank 1 gets SIGTERM: all ranks must stop together after that step, with one checkpoint."""
    out_dir = str(tmp_path / "run")
    argv = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--batch_size", "2", "--ep", "2", "--max_iters", "50",
            "--out_dir", out_dir]
    out = run_workers(train_worker, 2, argv, partial(_signal_rank_1_at_step_2, signal.SIGTERM), init=False,
                      timeout_s=300)
    assert [code for code, _ in out] == [143, 143]
    assert "stopped by SIGTERM: saved step 3" in out[0][1] and out[1][1] == ""
    ckpt = checkpoint.load_checkpoint(os.path.join(out_dir, "ckpt.pt"), "test")
    experts = [v for n, v in ckpt["model"].items() if n.endswith("experts.w1")]
    assert ckpt["step"] == 3 and len(experts) == 2 and all(v.shape[0] == 4 for v in experts)  # layer 1 and MTP


def _signal_during_save_at_step_2(rank, train):
    """Only rank 1 gets SIGTERM, while it writes the checkpoint of step 2: it must not leave the loop alone (the
    others go on to step 3), but stop with them after the next step. It gets another one while it writes that
    last checkpoint, which must wait for the save to end, as in one process."""
    save = train.save_distributed

    def patched(path, model, opt, meta):
        save(path, model, opt, meta)
        if rank == 1 and meta["step"] in (2, 3):
            os.kill(os.getpid(), signal.SIGTERM)
    train.save_distributed = patched


def test_sigterm_during_a_save_stops_every_rank_together(tmp_path, corpus_args):
    out_dir = str(tmp_path / "run")
    argv = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--batch_size", "2", "--ep", "2", "--max_iters", "50",
            "--ckpt_interval", "2", "--dist_timeout", "60", "--out_dir", out_dir]
    out = run_workers(train_worker, 2, argv, _signal_during_save_at_step_2, init=False, timeout_s=200)
    assert [code for code, _ in out] == [143, 143], out
    assert "stopped by SIGTERM: saved step 3" in out[0][1] and out[1][1] == ""
    assert checkpoint.load_checkpoint(os.path.join(out_dir, "ckpt.pt"), "test")["step"] == 3


def test_dead_rank_ends_the_training_job(tmp_path, corpus_args):
    argv = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--batch_size", "2", "--ep", "2", "--max_iters", "50",
            "--dist_timeout", "20", "--out_dir", str(tmp_path / "run")]
    out = run_workers(train_worker, 2, argv, partial(_signal_rank_1_at_step_2, signal.SIGKILL), init=False,
                      check=False, timeout_s=120)
    assert out[1][0] == -9 and out[0][0] == 1  # the survivor raised (its traceback is its error report)
    assert "RuntimeError" in out[0][1]


def test_resume_under_torchrun_at_another_world_size(tmp_path, corpus_args):
    """2 ranks × 2 sequences for 2 steps, then --resume on 4 ranks × 1 sequence (the same global batch) for 2
    more == 4 steps straight on 2 ranks (fp32: up to rounding; the gate biases exactly)."""
    common = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--ep", "2", "--eval_interval", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_workers(train_worker, 2, [*common, "--batch_size", "2", "--max_iters", "4", "--out_dir", straight],
                       init=False, timeout_s=300) == [(0, ""), (0, "")]
    assert run_workers(train_worker, 2, [*common, "--batch_size", "2", "--max_iters", "2", "--out_dir", split],
                       init=False, timeout_s=300) == [(0, ""), (0, "")]
    out = run_workers(train_worker, 4, [*common, "--batch_size", "1", "--max_iters", "4", "--out_dir", split,
                                         "--resume"], init=False, timeout_s=300)
    assert [code for code, _ in out] == [0] * 4
    a = checkpoint.load_checkpoint(os.path.join(straight, "ckpt.pt"), "test")
    b = checkpoint.load_checkpoint(os.path.join(split, "ckpt.pt"), "test")
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        if name.endswith("gate.bias"):
            assert torch.equal(a["model"][name], b["model"][name]), name
        else:
            torch.testing.assert_close(b["model"][name], a["model"][name], rtol=1e-4, atol=1e-6)
    assert [r["step"] for r in read_log(split)] == [r["step"] for r in read_log(straight)]


def _log_seen_otherwise_on_rank_1(rank, train):
    """Rank 1 reads another log than rank 0 (a folder not shared alike, a line half written while it read)."""
    if rank == 1:
        train.logged_eval = lambda run: True


def test_resume_between_a_step_and_its_eval_decided_by_rank_0(tmp_path, corpus_args):
    """A run stopped after its step-2 checkpoint, before the step-2 evaluation reached the log: on --resume every
    rank evaluates first, as rank 0 (which writes the log) decides, whatever the others read."""
    out_dir = str(tmp_path / "run")
    common = [*corpus_args, *TINY_ARGS, *DIST_RUN, "--batch_size", "2", "--ep", "2", "--eval_interval", "2",
              "--dist_timeout", "60", "--out_dir", out_dir]
    assert run_workers(train_worker, 2, [*common, "--max_iters", "2"], init=False) == [(0, ""), (0, "")]
    log = read_log(out_dir)
    with open(os.path.join(out_dir, "log.jsonl"), "w") as f:  # the evaluation of step 2 never made it
        f.writelines(json.dumps(r) + "\n" for r in log if "val_main" not in r)
    out = run_workers(train_worker, 2, [*common, "--max_iters", "3", "--resume"], _log_seen_otherwise_on_rank_1,
                      init=False, timeout_s=200)
    assert out == [(0, ""), (0, "")]
    steps = [(r["step"], "val_main" in r) for r in read_log(out_dir)]
    assert steps == [(1, False), (2, False), (2, True), (3, False), (3, True)]
