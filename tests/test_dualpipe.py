"""Tests for dualpipe.py: schedule structure against the step table of its header, the simulator against the bubble
formulas there (the table and formulas of deepseek-ai/DualPipe's README)."""
import random
from collections import Counter

import pytest

import dualpipe
from dualpipe import (Schedule, bubble_table, formula_bubble, make_schedule, render_timeline, schedule_1f1b,
                      schedule_dualpipe, schedule_dualpipev, simulate, step_counts)

README_COSTS = dict(F=1, B=2, W=1, FB=3)  # the example costs under dualpipe.py's bubble table
CONFIGS = [(2, 4), (2, 10), (4, 8), (4, 12), (6, 12), (8, 16), (8, 20), (10, 30)]


def flat(ops):
    """Split overlapped FB pairs into their F and B halves."""
    for op in ops:
        yield from (op[1:] if op[0] == "FB" else (op,))


# -- step counts --------------------------------------------------------------------------------------------
def test_step_counts_match_the_step_table():  # dualpipe.py's header: h = min(r, N-1-r), H = N/2
    assert step_counts(8, 20, 0) == step_counts(8, 20, 7) == [6, 1, 3, 3, 3, 1, 3, 1]
    assert step_counts(8, 20, 3) == step_counts(8, 20, 4) == [0, 4, 0, 6, 0, 4, 0, 4]


def test_dualpipev_counts_equal_dualpipe_first_half():
    for r in range(4):
        assert step_counts(4, 10, r, kind="dualpipev") == step_counts(8, 20, r)


# -- schedule structure -------------------------------------------------------------------------------------
def test_small_dualpipe_schedule_by_hand():
    # N=2, C=4: H=1, h=0, counts [0,1,0,1,0,1,0,1]; both ranks are middle ranks, so the first main-step pair
    # runs un-overlapped; step 6 has one iteration and h is even, so only its B0 defers W.
    rank0 = [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("B", 1, 0), ("FB", ("F", 1, 1), ("B", 0, 0)),
             ("B", 1, 1), ("BI", 0, 1), ("W", 0, 1)]
    swap = {0: 1, 1: 0}  # rank 1 is in the second half: phase ^= 1
    rank1 = [(op[0], (op[1][0], swap[op[1][1]], op[1][2]), (op[2][0], swap[op[2][1]], op[2][2]))
             if op[0] == "FB" else (op[0], swap[op[1]], op[2]) for op in rank0]
    assert schedule_dualpipe(2, 4).ops == [rank0, rank1]


@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS)
def test_dualpipe_per_rank_counts(n_ranks, n_chunks):
    for ops in schedule_dualpipe(n_ranks, n_chunks).ops:
        c = Counter((op[0] if op[0] != "BI" else "B", op[1]) for op in flat(ops))
        for phase in (0, 1):
            assert c["F", phase] == n_chunks // 2 and c["B", phase] == n_chunks // 2


@pytest.mark.parametrize("kind", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS)
def test_weight_grads_follow_their_backward_fifo(kind, n_ranks, n_chunks):
    sched = make_schedule(kind, n_ranks if kind == "dualpipe" else n_ranks // 2, n_chunks)
    for ops in sched.ops:
        deferred = [op[1:] for op in flat(ops) if op[0] == "BI"]
        weights = [op[1:] for op in flat(ops) if op[0] == "W"]
        assert weights == deferred  # one W per deferred backward, popped in FIFO order
        for i, op in enumerate(ops):
            if op[0] == "W":
                assert ("BI",) + op[1:] in ops[:i]


@pytest.mark.parametrize("kind", ["dualpipe", "dualpipev"])
def test_zero_bubble_only_outside_steady_state(kind):
    # Steps 4 and 5 hold every FB pair and run full backwards; BI/W may only appear before or after them.
    sched = make_schedule(kind, 8 if kind == "dualpipe" else 4, 20)
    for ops in sched.ops:
        fb = [i for i, op in enumerate(ops) if op[0] == "FB"]
        split = [i for i, op in enumerate(ops) if op[0] in ("BI", "W")]
        assert fb and split and all(i < fb[0] or i > fb[-1] for i in split)


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS)
def test_each_stage_chunk_runs_once(kind, n_ranks, n_chunks):
    sched = make_schedule(kind, n_ranks if kind != "dualpipev" else n_ranks // 2, n_chunks)
    seen = Counter()
    for r, ops in enumerate(sched.ops):
        for op in flat(ops):
            if op[0] != "W":
                seen[("F" if op[0] == "F" else "B",) + sched.where(r, op[1]) + (op[2],)] += 1
    pipes = 2 if kind == "dualpipe" else 1
    expected = {(k, p, s, c) for k in "FB" for p in range(pipes) for s in range(sched.n_stages)
                for c in range(sched.chunks_per_pipe)}
    assert set(seen) == expected and set(seen.values()) == {1}


# -- simulator ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["1f1b", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS + [(8, 40)])
def test_simulation_runs_every_op_and_respects_dependencies(kind, n_ranks, n_chunks):
    sched = make_schedule(kind, n_ranks if kind != "dualpipev" else n_ranks // 2, n_chunks)
    tl = simulate(sched, dict(F=1, B=2, W=0.5, FB=2.5))
    end = {}
    for r, spans in enumerate(tl.spans):
        assert [op for _, _, op in spans] == sched.ops[r]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # a rank runs one op at a time
        for s, e, op in spans:
            for half in flat([op]):
                if half[0] != "W":
                    end[("F" if half[0] == "F" else "B",) + sched.where(r, half[1]) + (half[2],)] = (s, e)
    for (k, p, s, c), (start, _) in end.items():
        if k == "F" and s > 0:
            assert end["F", p, s - 1, c][1] <= start
        if k == "B":
            prev = end["B", p, s + 1, c] if s < sched.n_stages - 1 else end["F", p, s, c]
            assert prev[1] <= start


def test_deadlock_is_detected():
    good = schedule_1f1b(2, 2)
    bad = Schedule("1f1b", 2, 2, [good.ops[0], good.ops[1][::-1]])  # last stage: backward before its forward
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(bad, README_COSTS)


@pytest.mark.parametrize("costs", [README_COSTS, dict(F=2, B=3, W=1, FB=4), dict(F=1, B=2, W=0.5, FB=2.5)])
@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS)
def test_1f1b_bubble_is_exactly_the_formula(costs, n_ranks, n_chunks):
    tl = simulate(schedule_1f1b(n_ranks, n_chunks), costs)
    assert tl.bubble == [formula_bubble("1f1b", n_ranks, costs)] * n_ranks


@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS + [(8, 40)])
def test_dualpipe_bubble_with_readme_costs_is_exactly_the_formula(n_ranks, n_chunks):
    # F&B = F+B and W = F: every rank idles exactly (PP/2-1)(F&B+B-3W), e.g. 6 at PP=8 against 21 for 1F1B.
    dp = simulate(schedule_dualpipe(n_ranks, n_chunks), README_COSTS)
    assert dp.bubble == [formula_bubble("dualpipe", n_ranks, README_COSTS)] * n_ranks
    assert max(dp.bubble) < min(simulate(schedule_1f1b(n_ranks, n_chunks), README_COSTS).bubble)


@pytest.mark.parametrize("costs", [dict(F=2, B=3, W=1, FB=4), dict(F=1, B=2, W=0.5, FB=2.5),
                                   dict(F=1, B=2, W=1, FB=2), dict(F=1, B=2, W=0, FB=3)])
@pytest.mark.parametrize("n_ranks,n_chunks", CONFIGS)
def test_dualpipe_bubble_never_exceeds_the_formula(costs, n_ranks, n_chunks):
    # With zero communication and W <= F <= B - W the bubble formula is the worst rank's bubble or an upper bound.
    dp = simulate(schedule_dualpipe(n_ranks, n_chunks), costs)
    assert max(dp.bubble) <= formula_bubble("dualpipe", n_ranks, costs)


def test_dualpipe_bubble_bound_over_random_costs():
    """The bound of dualpipe.py's header over 400 random costs with W <= F <= B - W and max(F, B) <= F&B <= F + B,
    and its limits: an input-gradient backward shorter than a forward (B - W < F), or a weight gradient longer than
    a forward (W > F), idles a rank longer than the formula says."""
    rng = random.Random(0)
    for i in range(400):
        F = rng.uniform(0.3, 3)
        W = rng.uniform(0, F)
        B = F + W + rng.uniform(0, 2)
        costs = dict(F=F, B=B, W=W, FB=rng.uniform(B, F + B))
        n_ranks, n_chunks = CONFIGS[2:][i % 6]
        bubble = max(simulate(schedule_dualpipe(n_ranks, n_chunks), costs).bubble)
        assert bubble <= formula_bubble("dualpipe", n_ranks, costs) + 1e-9, costs
    short_b = dict(F=2, B=2, W=1, FB=4)  # B - W = 1 < F = 2
    assert max(simulate(schedule_dualpipe(4, 8), short_b).bubble) == 4 > formula_bubble("dualpipe", 4, short_b) == 3
    long_w = dict(F=1, B=2.5, W=1.5, FB=3)  # W = 1.5 > F = 1, B - W = F
    assert max(simulate(schedule_dualpipe(8, 20), long_w).bubble) > formula_bubble("dualpipe", 8, long_w)


@pytest.mark.parametrize("n_ranks,n_chunks", [(4, 8), (8, 20), (10, 30)])
def test_dualpipev_matches_dualpipe_on_half_the_ranks(n_ranks, n_chunks):
    costs = dict(F=2, B=3, W=1, FB=4)
    dp = simulate(schedule_dualpipe(n_ranks, n_chunks), costs)
    v = simulate(schedule_dualpipev(n_ranks // 2, n_chunks), costs)
    assert v.bubble == dp.bubble[: n_ranks // 2]


def test_bubble_table_orders_methods():
    rows = {kind: (devices, formula, sim) for kind, devices, formula, sim, _, _ in bubble_table(8, 20, README_COSTS)}
    assert rows == {"1f1b": (8, 21, 21), "dualpipe": (8, 6, 6), "dualpipev": (4, 6, 6)}


def test_render_timeline_draws_busy_time():
    tl = simulate(schedule_dualpipe(4, 8), README_COSTS)
    rows = render_timeline(tl, scale=2).splitlines()
    assert len(rows) == 4
    for r, row in enumerate(rows):
        cells = row.split("|")[1]
        assert len(cells) == 2 * tl.makespan and len(cells) - cells.count(".") == 2 * tl.busy[r]


# -- invalid configurations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,args,match", [
    (schedule_dualpipe, (3, 12), "even"), (schedule_dualpipe, (4, 9), "even"),
    (schedule_dualpipe, (4, 6), "2 \\* n_ranks"), (schedule_dualpipev, (4, 7), "2 \\* n_ranks"),
    (schedule_1f1b, (0, 4), ">= 1"), (step_counts, (4, 8, 4), "rank"),
    (step_counts, (4, 8, 0, "1f1b"), "kind"), (make_schedule, ("gpipe", 4, 8), "kind"),
])
def test_invalid_configs_raise(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("n_ranks,n_chunks", [(1, 2), (1, 5), (3, 7), (5, 11)])
def test_dualpipev_any_rank_count_and_odd_chunks(n_ranks, n_chunks):
    # DualPipeV has no evenness rule; its bubble still follows the formula with PP = 2 × ranks stages.
    v = schedule_dualpipev(n_ranks, n_chunks)
    for ops in v.ops:
        c = Counter((op[0] if op[0] != "BI" else "B", op[1]) for op in flat(ops))
        assert [c["F", 0], c["F", 1], c["B", 0], c["B", 1]] == [n_chunks] * 4
    assert simulate(v, README_COSTS).bubble == [formula_bubble("dualpipev", 2 * n_ranks, README_COSTS)] * n_ranks


def test_costs_are_checked():
    with pytest.raises(ValueError, match="W"):
        simulate(schedule_dualpipev(1, 2), dict(F=1, B=1, W=2, FB=2))
    with pytest.raises(ValueError, match="FB"):
        simulate(schedule_dualpipev(1, 2), dict(F=1, B=1, W=0))


# -- torch's ScheduleDualPipeV runs the same order ----------------------------------------------------------
@pytest.mark.parametrize("n_ranks,n_chunks", [(1, 2), (1, 5), (2, 4), (2, 5), (2, 10), (3, 6), (3, 9), (4, 8),
                                              (4, 11), (4, 16)])
def test_dualpipev_order_equals_torch(n_ranks, n_chunks):
    from dualpipe import torch_dualpipev_order
    assert torch_dualpipev_order(n_ranks, n_chunks) == schedule_dualpipev(n_ranks, n_chunks).ops


# -- executor on torch.distributed (gloo, forked processes) ------------------------------------------------
MB, DIM = 3, 8


def _stages(n_pp):
    import torch
    torch.manual_seed(233)
    return [torch.nn.Sequential(torch.nn.Linear(DIM, 4 * DIM, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(4 * DIM, DIM, bias=False)).double() for _ in range(n_pp)]


def _batch(n_chunks):
    import torch
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n_chunks * MB, DIM, generator=g, dtype=torch.float64),
            torch.randn(n_chunks * MB, DIM, generator=g, dtype=torch.float64))


def _criterion(out, y):
    import torch.nn.functional as F
    return F.mse_loss(out, y)


def _worker(rank, n_pp, n_chunks):
    import torch
    from dualpipe import run_dualpipe
    stages = _stages(n_pp)
    modules = (stages[rank], stages[n_pp - 1 - rank])  # stage r and the mirrored copy of stage N-1-r
    x, y = _batch(n_chunks)
    half = n_chunks // 2 * MB
    inputs = {0: x[:half], n_pp - 1: x[half:]}.get(rank)
    labels = {0: y[half:], n_pp - 1: y[:half]}.get(rank)
    losses = run_dualpipe(modules, inputs, labels, _criterion, n_chunks, shape=(MB, DIM), dtype=torch.float64)
    return {"losses": losses, "grads": [[p.grad for p in m.parameters()] for m in modules]}


@pytest.mark.slow  # starts one process per pipeline rank
@pytest.mark.parametrize("n_pp,n_chunks", [(2, 4), (4, 8)])  # N=4 also runs BI/W on non-first stages
@pytest.mark.slow
def test_dualpipe_executor_matches_sequential(n_pp, n_chunks):
    import torch
    from dist_utils import run_workers
    got = run_workers(_worker, n_pp, n_chunks)
    ref = _stages(n_pp)  # sequential reference: every micro-batch through all stages, one backward each
    x, y = _batch(n_chunks)
    ref_losses = []
    for xc, yc in zip(x.tensor_split(n_chunks), y.tensor_split(n_chunks)):
        h = xc
        for stage in ref:
            h = stage(h)
        loss = _criterion(h, yc)
        loss.backward()
        ref_losses.append(loss.detach())
    half = n_chunks // 2
    assert torch.equal(torch.stack(got[n_pp - 1]["losses"]), torch.stack(ref_losses[:half]))  # bit-exact
    assert torch.equal(torch.stack(got[0]["losses"]), torch.stack(ref_losses[half:]))
    for s in range(n_pp):  # model stage s: module 0 of rank s + module 1 of rank N-1-s
        for g0, g1, p in zip(got[s]["grads"][0], got[n_pp - 1 - s]["grads"][1], ref[s].parameters()):
            g, r = g0 + g1, p.grad
            diff = 1 - 2 * (g * r).sum() / (g * g + r * r).sum()  # calc_diff, as in fp8.py
            assert diff < 1e-13


# -- the pictures of `python dualpipe.py` -------------------------------------------------------------------------
@pytest.mark.parametrize("width", [100, 60])
def test_fold_timeline_keeps_every_column_within_the_width(width):
    import dualpipe
    tl = simulate(schedule_dualpipe(8, 20), README_COSTS)
    text = render_timeline(tl)
    folded = dualpipe.fold_timeline(text, width)
    assert max(len(line) for line in folded.splitlines()) <= width
    bodies = [line.split("|")[1] for line in text.splitlines()]
    got = ["" for _ in bodies]
    spans = []
    for line in folded.splitlines():
        if line.lstrip().startswith("t = "):
            spans.append(line.split("= ")[1])
        else:
            r = int(line.split("|")[0].split()[1])
            got[r] += line.split("|")[1]
    assert got == bodies and len(spans) >= 2
    assert spans[0].startswith("0 ..") and spans[-1].endswith(f".. {tl.makespan:g}")
    assert folded.splitlines()[-1].endswith(f"| bubble {tl.bubble[-1]:g}")


def test_cli_prints_narrow_timelines_and_the_bubble_table(capsys):
    import re

    import dualpipe
    dualpipe.main([])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    table = dict((k, tuple(map(float, v))) for k, *v in
                 re.findall(r"^(1f1b|dualpipe|dualpipev)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M))
    assert table == {"1f1b": (8, 21, 21, 81), "dualpipe": (8, 6, 6, 66), "dualpipev": (4, 6, 6, 126)}
    assert out.count("rank  0 |") == len(re.findall(r"^\s+t = ", out, re.M)) > 3


@pytest.mark.parametrize("argv, message", [(["--F", "inf"], "--F must be a finite cost >= 0, got inf"),
                                           (["--FB", "nan"], "--FB must be a finite cost >= 0, got nan"),
                                           (["--W", "-1"], "--W must be a finite cost >= 0, got -1.0")])
def test_cli_refuses_costs_that_are_not_finite_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        dualpipe.main(argv)
    with pytest.raises(ValueError, match="must be given, finite and >= 0"):
        simulate(schedule_1f1b(2, 4), {"F": 1.0, "B": 2.0, "W": 1.0, "FB": float("nan")})


@pytest.mark.slow
def test_cli_into_a_closed_pipe_exits_quietly():
    """`python dualpipe.py | head -c 0`: once the reader is gone, stop without a traceback."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, dualpipe.__file__], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # gone before the first line: the whole output (a few KB) would fit in the pipe's buffer
    assert p.wait(timeout=60) == 0 and p.stderr.read() == b""


def test_cli_png_without_matplotlib_is_one_line_error(tmp_path, monkeypatch):
    import dualpipe
    import plots
    monkeypatch.setattr(plots, "pyplot", lambda: None)
    with pytest.raises(SystemExit, match="needs matplotlib"):
        dualpipe.main(["--ranks", "4", "--chunks", "8", "--png", str(tmp_path / "t.png")])
    assert not (tmp_path / "t.png").exists()


def test_cli_png_draws_every_span(tmp_path):
    pytest.importorskip("matplotlib")
    import dualpipe
    tl = simulate(schedule_dualpipe(4, 8), README_COSTS)
    rows = dualpipe.gantt_rows(tl)
    pairs = sum(op[0] == "FB" for spans in tl.spans for _, _, op in spans)
    assert sum(map(len, rows)) == sum(map(len, tl.spans)) + pairs  # a pair is drawn as two halves
    dualpipe.main(["--ranks", "4", "--chunks", "8", "--png", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
