"""Grading tests for dualpipe.py (exercises.py): 1F1B, DualPipe's step counts and its eight steps (report §3.2.1).

Checked against properties written here, not against the repository's simulator: every (pipe, stage, chunk) runs
forward once and backward once, each deferred weight gradient once after its backward; a plain executor finds no
deadlock; a plain timing model gives the published bubbles, (PP-1)(F+B) for 1F1B and (PP/2-1)(F&B+B-3W) for DualPipe
with F&B = F+B and W = F; the step counts follow the eight-step table of the module docstring."""
from collections import Counter

import pytest

import dualpipe


# -- plain references ----------------------------------------------------------------------------------------
# The eight steps' iteration counts of the cases below, written out: the numbers of the module docstring's table
# (deepseek-ai/DualPipe's schedule) for these N and C, not the formula that makes them (which is the exercise).
COUNTS = {  # (kind, N, C) → every rank's eight counts, rank 0 first
    ("dualpipe", 2, 4): [
        [0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1],
    ],
    ("dualpipe", 4, 8): [
        [2, 1, 1, 1, 1, 1, 1, 1], [0, 2, 0, 2, 0, 2, 0, 2], [0, 2, 0, 2, 0, 2, 0, 2], [2, 1, 1, 1, 1, 1, 1, 1],
    ],
    ("dualpipe", 4, 10): [
        [2, 1, 1, 2, 1, 1, 1, 1], [0, 2, 0, 3, 0, 2, 0, 2], [0, 2, 0, 3, 0, 2, 0, 2], [2, 1, 1, 2, 1, 1, 1, 1],
    ],
    ("dualpipe", 6, 12): [
        [4, 1, 2, 1, 2, 1, 2, 1], [2, 2, 1, 2, 1, 2, 1, 2], [0, 3, 0, 3, 0, 3, 0, 3], [0, 3, 0, 3, 0, 3, 0, 3],
        [2, 2, 1, 2, 1, 2, 1, 2], [4, 1, 2, 1, 2, 1, 2, 1],
    ],
    ("dualpipe", 6, 14): [
        [4, 1, 2, 2, 2, 1, 2, 1], [2, 2, 1, 3, 1, 2, 1, 2], [0, 3, 0, 4, 0, 3, 0, 3], [0, 3, 0, 4, 0, 3, 0, 3],
        [2, 2, 1, 3, 1, 2, 1, 2], [4, 1, 2, 2, 2, 1, 2, 1],
    ],
    ("dualpipe", 8, 20): [
        [6, 1, 3, 3, 3, 1, 3, 1], [4, 2, 2, 4, 2, 2, 2, 2], [2, 3, 1, 5, 1, 3, 1, 3], [0, 4, 0, 6, 0, 4, 0, 4],
        [0, 4, 0, 6, 0, 4, 0, 4], [2, 3, 1, 5, 1, 3, 1, 3], [4, 2, 2, 4, 2, 2, 2, 2], [6, 1, 3, 3, 3, 1, 3, 1],
    ],
    ("dualpipe", 8, 40): [
        [6, 1, 3, 13, 3, 1, 3, 1], [4, 2, 2, 14, 2, 2, 2, 2], [2, 3, 1, 15, 1, 3, 1, 3], [0, 4, 0, 16, 0, 4, 0, 4],
        [0, 4, 0, 16, 0, 4, 0, 4], [2, 3, 1, 15, 1, 3, 1, 3], [4, 2, 2, 14, 2, 2, 2, 2], [6, 1, 3, 13, 3, 1, 3, 1],
    ],
    ("dualpipev", 3, 7): [
        [4, 1, 2, 2, 2, 1, 2, 1], [2, 2, 1, 3, 1, 2, 1, 2], [0, 3, 0, 4, 0, 3, 0, 3],
    ],
    ("dualpipev", 4, 8): [
        [6, 1, 3, 1, 3, 1, 3, 1], [4, 2, 2, 2, 2, 2, 2, 2], [2, 3, 1, 3, 1, 3, 1, 3], [0, 4, 0, 4, 0, 4, 0, 4],
    ],
    ("dualpipev", 4, 10): [
        [6, 1, 3, 3, 3, 1, 3, 1], [4, 2, 2, 4, 2, 2, 2, 2], [2, 3, 1, 5, 1, 3, 1, 3], [0, 4, 0, 6, 0, 4, 0, 4],
    ],
    ("dualpipev", 5, 12): [
        [8, 1, 4, 3, 4, 1, 4, 1], [6, 2, 3, 4, 3, 2, 3, 2], [4, 3, 2, 5, 2, 3, 2, 3], [2, 4, 1, 6, 1, 4, 1, 4],
        [0, 5, 0, 7, 0, 5, 0, 5],
    ],
}


def counts_plain(N, C, r, kind="dualpipe"):
    """Rank r's eight counts for N ranks and C chunks, from the table above."""
    return COUNTS[(kind, N, C)][r]


def dualpipe_ops(N, C, kind="dualpipe"):
    """Every rank's op list from the learner's _eight_steps, with the counts of the table above."""
    ops = []
    for r in range(N):
        if kind == "dualpipe":
            middle, flip = min(r, N - 1 - r) == N // 2 - 1, int(r >= N // 2)
        else:
            middle, flip = r == N - 1, 0
        ops.append(dualpipe._eight_steps(counts_plain(N, C, r, kind), middle, flip))
    return ops


def place(kind, N, r, phase):
    """(pipe, stage) of module `phase` on rank r: DualPipe has two pipes, 0 → N-1 and N-1 → 0; DualPipeV one V."""
    if kind == "dualpipe":
        return (0, r) if phase == 0 else (1, N - 1 - r)
    if kind == "dualpipev":
        return (0, r) if phase == 0 else (0, 2 * N - 1 - r)
    return (0, r)


def singles(op):
    return [op[1], op[2]] if op[0] == "FB" else [op]


def execute(kind, N, ops, n_stages, costs=None):
    """Run every rank's list in order, an op as soon as its inputs exist; returns (makespan, busy per rank).

    F(s, c) needs F(s-1, c); a backward B/BI(s, c) needs B(s+1, c), or on the last stage its own F(s, c);
    W(s, c) needs BI(s, c) on its rank. Asserts that no op waits forever (a deadlock)."""
    costs = costs or dict(F=1, B=2, W=1, FB=3)
    done, clock, ptr, busy = {}, [0.0] * N, [0] * N, [0.0] * N

    def needs(r, op):
        kind_, phase, c = op
        pipe, s = place(kind, N, r, phase)
        if kind_ == "F":
            return [("F", pipe, s - 1, c)] if s > 0 else []
        if kind_ == "W":
            return [("B", pipe, s, c)]
        return [("B", pipe, s + 1, c)] if s < n_stages - 1 else [("F", pipe, s, c)]

    while any(ptr[r] < len(ops[r]) for r in range(N)):
        moved = False
        for r in range(N):
            while ptr[r] < len(ops[r]):
                op = ops[r][ptr[r]]
                deps = [d for o in singles(op) for d in needs(r, o)]
                if any(d not in done for d in deps):
                    break
                cost = costs["FB"] if op[0] == "FB" else (costs["B"] - costs["W"] if op[0] == "BI" else costs[op[0]])
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = start + cost
                busy[r] += cost
                for o in singles(op):
                    if o[0] != "W":
                        pipe, s = place(kind, N, r, o[1])
                        done[("F" if o[0] == "F" else "B", pipe, s, o[2])] = clock[r]
                ptr[r] += 1
                moved = True
        stuck = [ops[r][ptr[r]] for r in range(N) if ptr[r] < len(ops[r])]
        assert moved, f"deadlock: ranks wait forever at ops {stuck}"
    return max(clock), busy


def check_each_chunk_once(kind, N, ops, chunks_per_pipe):
    for r in range(N):
        seen = Counter()
        pending_w = []
        for op in ops[r]:
            for o in singles(op):
                if o[0] == "BI":
                    pending_w.append((o[1], o[2]))
                if o[0] == "W":
                    assert pending_w and pending_w.pop(0) == (o[1], o[2]), f"rank {r}: W {o} is not the oldest BI's"
                seen[("F" if o[0] == "F" else "W" if o[0] == "W" else "B", o[1], o[2])] += 1
        assert not pending_w, f"rank {r}: weight gradients never computed for {pending_w}"
        phases = (0, 1) if kind != "1f1b" else (0,)
        for phase in phases:
            for c in range(chunks_per_pipe):
                assert seen[("F", phase, c)] == 1, f"rank {r}, module {phase}, chunk {c}: forward count"
                assert seen[("B", phase, c)] == 1, f"rank {r}, module {phase}, chunk {c}: backward count"
        assert sum(seen.values()) == len(phases) * 2 * chunks_per_pipe + sum(v for k, v in seen.items() if k[0] == "W")


# -- 1F1B ------------------------------------------------------------------------------------------------------
@pytest.mark.grades("dualpipe.schedule_1f1b")
@pytest.mark.parametrize("N, C", [(1, 3), (2, 4), (4, 8), (4, 3), (4, 2), (8, 3), (8, 20)])
def test_schedule_1f1b(N, C):
    sched = dualpipe.schedule_1f1b(N, C)
    ops = sched.ops
    assert len(ops) == N
    check_each_chunk_once("1f1b", N, ops, C)
    for r in range(N):
        warm = min(N - 1 - r, C)
        first_b = next(i for i, op in enumerate(ops[r]) if op[0] == "B")
        assert first_b == min(warm + 1, C), f"rank {r}: {warm} warm-up forwards, one more forward, then the first B"
        in_flight = peak = 0  # chunks forwarded and not yet backwarded: 1F1B keeps at most N - r
        for op in ops[r]:
            in_flight += 1 if op[0] == "F" else -1
            peak = max(peak, in_flight)
        assert peak == min(N - r, C), f"rank {r}: at most {min(N - r, C)} chunks in flight, got {peak}"
    makespan, busy = execute("1f1b", N, ops, N, dict(F=1, B=2, W=1, FB=3))
    assert [makespan - b for b in busy] == [(N - 1) * 3] * N, "1F1B's bubble is (PP-1)(F+B) on every rank"


# -- DualPipe ----------------------------------------------------------------------------------------------------
@pytest.mark.grades("dualpipe.step_counts")
@pytest.mark.parametrize("N, C", [(2, 4), (4, 8), (8, 20), (8, 40), (6, 12)])
def test_step_counts_table(N, C):
    for r in range(N):
        got = list(dualpipe.step_counts(N, C, r))
        assert got == counts_plain(N, C, r), f"rank {r}: {got}, the table gives {counts_plain(N, C, r)}"
        s1, s2, s3, s4, s5, s6, s7, s8 = got
        assert s1 + s2 + s4 == C // 2, "forwards of the near-end phase: steps 1, 2, 4"
        assert s2 + s3 + s4 + s5 == C // 2, "forwards of the far-end phase: steps 2, 3, 4, 5"


@pytest.mark.grades("dualpipe.step_counts")
def test_step_counts_by_hand():
    # N = 8, C = 20: rank 0 (h = 0) warms up longest, rank 3 (h = 3, a middle rank) not at all
    assert list(dualpipe.step_counts(8, 20, 0)) == [6, 1, 3, 3, 3, 1, 3, 1]
    assert list(dualpipe.step_counts(8, 20, 3)) == [0, 4, 0, 6, 0, 4, 0, 4]
    assert list(dualpipe.step_counts(8, 20, 7)) == list(dualpipe.step_counts(8, 20, 0))
    assert list(dualpipe.step_counts(4, 10, 1, "dualpipev")) == counts_plain(4, 10, 1, "dualpipev")


@pytest.mark.grades("dualpipe._eight_steps")
def test_eight_steps_small_by_hand():
    # N = 2, C = 4: counts [0,1,0,1,0,1,0,1], a middle rank: the first main-step pair runs apart, then one F&B pair;
    # in step 6 the second backward defers its weight gradient, drained by step 8
    want = [("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("B", 1, 0), ("FB", ("F", 1, 1), ("B", 0, 0)),
            ("B", 1, 1), ("BI", 0, 1), ("W", 0, 1)]
    assert dualpipe._eight_steps([0, 1, 0, 1, 0, 1, 0, 1], True, 0) == want
    flipped = dualpipe._eight_steps([0, 1, 0, 1, 0, 1, 0, 1], True, 1)
    assert [o for op in flipped for o in singles(op)] == [(o[0], 1 - o[1], o[2]) for op in want for o in singles(op)]


@pytest.mark.grades("dualpipe._eight_steps")
@pytest.mark.parametrize("kind, N, C", [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 8, 20),
                                        ("dualpipe", 6, 14), ("dualpipev", 4, 8), ("dualpipev", 3, 7)])
def test_eight_steps_schedule(kind, N, C):
    ops = dualpipe_ops(N, C, kind)
    per_pipe, n_stages = (C // 2, N) if kind == "dualpipe" else (C, 2 * N)
    check_each_chunk_once(kind, N, ops, per_pipe)
    for r in range(N):  # the steady state overlaps forward and backward chunks of the two phases
        pairs = [op for op in ops[r] if op[0] == "FB"]
        assert all(p[1][0] == "F" and p[2][0] in ("B", "BI") and p[1][1] != p[2][1] for p in pairs)
        s4, s5 = counts_plain(N, C, r, kind)[3:5]
        middle = (min(r, N - 1 - r) == N // 2 - 1) if kind == "dualpipe" else r == N - 1
        assert len(pairs) == 2 * s4 + s5 - (1 if middle and s4 else 0), f"rank {r}: F&B pairs"
    makespan, busy = execute(kind, N, ops, n_stages)
    if kind == "dualpipe":  # F=1, B=2, W=1, F&B=3: each rank idles (PP/2-1)(F&B+B-3W)
        assert [makespan - b for b in busy] == [(N // 2 - 1) * (3 + 2 - 3)] * N


@pytest.mark.grades("dualpipe.step_counts")
@pytest.mark.parametrize("N, C", [(4, 10), (3, 7), (5, 12)])
def test_step_counts_dualpipev_every_rank(N, C):
    # DualPipeV: H → N, h → r (not min(r, N-1-r)), C/2 → C
    for r in range(N):
        got = list(dualpipe.step_counts(N, C, r, "dualpipev"))
        assert got == counts_plain(N, C, r, "dualpipev"), f"rank {r}: {got}"
        assert got[0] + got[1] + got[3] == C and got[1] + got[2] + got[3] + got[4] == C


@pytest.mark.grades("dualpipe._eight_steps")
def test_eight_steps_every_step_by_hand():
    # N = 4, C = 10, rank 0 (not a middle rank): counts [2, 1, 1, 2, 1, 1, 1, 1], every step runs; read off the
    # table: 1 F0 ×2 | 2 F0, F1 | 3 BI1, W, F1 | 4 (F0&B1), (F1&B0) ×2 | 5 B1, (F1&B0) | 6 B1, BI0 | 7 W, BI0 | 8 W
    want = [("F", 0, 0), ("F", 0, 1),
            ("F", 0, 2), ("F", 1, 0),
            ("BI", 1, 0), ("W", 1, 0), ("F", 1, 1),
            ("FB", ("F", 0, 3), ("B", 1, 1)), ("FB", ("F", 1, 2), ("B", 0, 0)),
            ("FB", ("F", 0, 4), ("B", 1, 2)), ("FB", ("F", 1, 3), ("B", 0, 1)),
            ("B", 1, 3), ("FB", ("F", 1, 4), ("B", 0, 2)),
            ("B", 1, 4), ("BI", 0, 3),
            ("W", 0, 3), ("BI", 0, 4),
            ("W", 0, 4)]
    assert counts_plain(4, 10, 0) == [2, 1, 1, 2, 1, 1, 1, 1]
    assert dualpipe._eight_steps([2, 1, 1, 2, 1, 1, 1, 1], False, 0) == want
