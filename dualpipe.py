"""DualPipe: bidirectional pipeline parallelism with overlapped forward/backward pairs (DeepSeek-V3 report §3.2.1).

Pipeline parallelism (PP) cuts the layers into PP stages, one per rank, and streams micro-batches ("chunks")
through them. The classic 1F1B schedule leaves every rank idle for (PP-1)(F+B) while the pipeline fills and
drains (F = one forward chunk, B = one full backward chunk). DualPipe attacks that bubble two ways:
- Bidirectional feeding. Micro-batches enter from *both* ends at once: half of them flow rank 0 → N-1 (direction
  0), the other half N-1 → 0 (direction 1). Rank r therefore holds two stage modules: stage r of direction 0 and
  stage N-1-r of direction 1 (a copy of what rank N-1-r holds as its first module). That costs 2× parameters,
  and the two gradients of each stage are summed across the mirrored pair after the step. Ranks 0 and N-1 are
  both entry points and loss points.
- Overlapped F&B chunk pairs. In the steady state a rank pairs the forward of one direction with the backward of
  the other. In the real model each chunk is split into attention / all-to-all dispatch / MLP / all-to-all
  combine (and the backward also into input-grad B and weight-grad W, the ZeroBubble split), and the SMs are
  divided by hand so that the EP all-to-all and PP send/recv of one chunk hide under the compute of the other.
  Here F&B is just a cost number: F&B = F+B means "no overlap", F&B < F+B models the hidden communication.
- Zero-bubble B/W split in warm-up/cool-down only (steps 3, 6, 7, 8 below): a backward that computes just the
  input gradient ("BI") unblocks the previous stage sooner; its weight gradient ("W") runs later, FIFO.
DualPipeV ("cut in half") folds the two directions into one V: N ranks, 2N stages, rank r holds stages r and
2N-1-r, nothing duplicated; it runs the same 8-step skeleton with H→N, h→r, C/2→C.

Bubble per device (deepseek-ai/DualPipe README; F&B = an overlapped pair, W = weight-grad part of B):
    1F1B       (PP-1)(F+B)              1× params   PP activations     PP devices
    ZB1P       (PP-1)(F+B-2W)           1×          PP                 PP
    DualPipe   (PP/2-1)(F&B+B-3W)       2×          PP+1               PP
    DualPipeV  (PP/2-1)(F&B+B-3W)       2×          PP+1               PP/2
With F=1, B=2, W=1, F&B=3 and PP=8: 21 for 1F1B, 6 for DualPipe.

The per-rank DualPipe schedule (h = min(r, N-1-r), H = N/2, C micro-batches, C/2 per direction), in the code's
"phase" terms: phase 0 is the direction that enters at this rank's nearer end (phase ^= is_in_second_half):
    1 nF0        F0                                   × 2(H-h-1)
    2 nF0F1      F0, F1                               × h+1
    3 nB1W1F1    BI1 (zero-bubble), W, F1             × H-h-1
    4 nF0B1F1B0  (F0 & B1), (F1 & B0)                 × C/2-N+h+1   (middle ranks: first F0, B1 un-overlapped)
    5 nB1F1B0    B1, (F1 & B0)                        × H-h-1
    6 nB1B0      B1, B0; the second half as BI        × h+1
    7 nWB0       W, BI0                               × H-h-1
    8 nW         W (drain the FIFO)                   × h+1

What is here:
- Reference (read first; in an exercise copy some of these are the homework): pure-Python schedule generators
  `schedule_1f1b`, `schedule_dualpipe`, `schedule_dualpipev` and `step_counts`. An op is ("F", phase, chunk), ("B", phase, chunk) (full backward),
  ("BI", phase, chunk) (input-grad only, its W deferred), ("W", phase, chunk) (the deferred weight grad, popped
  FIFO), or ("FB", f_op, b_op) (an overlapped pair). In op tuples `phase` is the *module* index after the flip:
  for DualPipe it equals the direction, for DualPipeV phase 0 is stage r and phase 1 is stage 2N-1-r.
- A timeline simulator `simulate` (zero communication time, data dependencies only) and `render_timeline`.
  `python dualpipe.py --ranks 8 --chunks 20` prints the timelines and a bubble table. With F&B = F+B and W = F
  (the example costs under the bubble table above: F=1, B=2, W=1, F&B=3) every rank's simulated bubble equals
  the formula exactly; with other costs it is an upper bound on the worst rank's as long as a weight gradient takes
  no longer than a forward, the input-gradient backward no less (W <= F <= B-W) and an overlapped pair no more than
  its two halves (max(F, B) <= F&B <= F+B); outside that it can be exceeded (F=B=2, W=1, F&B=4 on 4 ranks: 4
  against 3). tests/test_dualpipe.py checks all three.
- `torch_dualpipev_order`: torch.distributed.pipelining's ScheduleDualPipeV action lists in these op tuples.
  Training runs torch's schedule (pipeline.py's stages); tests/test_dualpipe.py checks that its order
  is `schedule_dualpipev`'s, op for op, so what this file draws and simulates is what training runs.
- `run_dualpipe`: an executor on torch.distributed (gloo on CPU works) that runs a DualPipe schedule over real
  stage modules with isend/recv; tested against a sequential model (losses bit-exact, summed mirrored grads
  within calc_diff 1e-13, calc_diff = 1 − 2Σxy / Σ(x² + y²) as in fp8.py). BI/W are two autograd.backward
  calls (inputs=[x] with the graph kept, then inputs=params) instead of DeepSeek's WeightGradStore closures.
  Why it stays although training uses torch's DualPipeV: torch ships DualPipeV only, not the bidirectional
  DualPipe of the report, and its input/weight split is graph surgery inside `stage_backward_input`. This
  executor is the one place where the report's schedule runs: two directions, each stage held twice, the
  mirrored copies' gradients summed after the step, and the B/W split as two plain backward calls. It is not
  used for training (no DualPipe option in train.py: DualPipeV has the same bubble without the second copy).
Not implemented: a DualPipeV executor (torch's is used), overlap of communication with compute (sends are isend,
receives block, F&B pairs run serially), forward-only (inference) steps, and freeing sent activations early.
"""
import argparse
import math
import os
import sys
from collections import deque
from dataclasses import dataclass

KINDS = ("1f1b", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Schedule:
    """ops[r] is the ordered op list of rank r. A (phase of rank r) maps to a (pipe, stage) via `where`."""
    kind: str
    n_ranks: int
    n_chunks: int
    ops: list

    @property
    def n_stages(self) -> int:  # length of one pipe
        return 2 * self.n_ranks if self.kind == "dualpipev" else self.n_ranks

    @property
    def chunks_per_pipe(self) -> int:  # DualPipe splits the batch between its two directions
        return self.n_chunks // 2 if self.kind == "dualpipe" else self.n_chunks

    def where(self, rank: int, phase: int) -> tuple:
        """(pipe, stage) of module `phase` on `rank`. DualPipe has two pipes (directions); the others one."""
        N = self.n_ranks
        if self.kind == "dualpipe":
            return phase, (rank if phase == 0 else N - 1 - rank)
        if self.kind == "dualpipev":
            return 0, (rank if phase == 0 else 2 * N - 1 - rank)
        return 0, rank


# -- reference: schedule generators ---------------------------------------------------------------------------
def _check(kind: str, n_ranks: int, n_chunks: int) -> None:
    if n_ranks < 1 or n_chunks < 1:
        raise ValueError(f"{kind}: n_ranks ({n_ranks}) and n_chunks ({n_chunks}) must be >= 1")
    if kind == "dualpipe" and (n_ranks % 2 or n_chunks % 2):
        raise ValueError(f"dualpipe: n_ranks ({n_ranks}) and n_chunks ({n_chunks}) must both be even")
    if kind in ("dualpipe", "dualpipev") and n_chunks < 2 * n_ranks:
        raise ValueError(f"{kind}: n_chunks ({n_chunks}) must be >= 2 * n_ranks ({2 * n_ranks})")


def _skeleton(kind: str, n_ranks: int, rank: int) -> tuple:
    """(H, h, half): the 8-step skeleton's parameters. DualPipeV maps H→N, h→r, C/2→C."""
    if kind == "dualpipe":
        return n_ranks // 2, min(rank, n_ranks - 1 - rank)
    return n_ranks, rank


def step_counts(n_ranks: int, n_chunks: int, rank: int, kind: str = "dualpipe") -> list:
    """Iterations of the 8 steps on `rank` (see the table in the module docstring)."""
    if kind not in ("dualpipe", "dualpipev"):
        raise ValueError(f"step_counts: kind must be 'dualpipe' or 'dualpipev', got {kind!r}")
    _check(kind, n_ranks, n_chunks)
    if not 0 <= rank < n_ranks:
        raise ValueError(f"step_counts: rank {rank} is outside [0, {n_ranks})")
    H, h = _skeleton(kind, n_ranks, rank)
    half = n_chunks // 2 if kind == "dualpipe" else n_chunks  # micro-batches per phase
    warm = H - h - 1  # distance to the middle: how many extra chunks the warm-up must fill
    return [2 * warm, h + 1, warm, half - 2 * H + h + 1, warm, h + 1, warm, h + 1]


def _eight_steps(counts: list, is_middle: bool, flip: int) -> list:
    """One rank's op list. Steps speak in code phases; `flip` turns them into module phases."""
    ops, n_f, n_b, w_queue = [], [0, 0], [0, 0], deque()

    def F(p):
        p ^= flip
        n_f[p] += 1
        return ("F", p, n_f[p] - 1)

    def B(p, zb=False):
        p ^= flip
        n_b[p] += 1
        if zb:  # input grad now, weight grad queued (WeightGradStore.flush)
            w_queue.append((p, n_b[p] - 1))
        return ("BI" if zb else "B", p, n_b[p] - 1)

    def W():  # the oldest deferred weight grad (FIFO, WeightGradStore.pop)
        return ("W",) + w_queue.popleft()

    s1, s2, s3, s4, s5, s6, s7, s8 = counts
    for _ in range(s1):
        ops.append(F(0))
    for _ in range(s2):
        ops += [F(0), F(1)]
    for _ in range(s3):
        ops += [B(1, zb=True), W(), F(1)]
    for i in range(s4):
        # On the middle ranks the first F0/B1 run apart: B1's result is then sent earlier ("to reduce bubble").
        ops += [F(0), B(1)] if (i == 0 and is_middle) else [("FB", F(0), B(1))]
        ops.append(("FB", F(1), B(0)))
    for _ in range(s5):
        ops += [B(1), ("FB", F(1), B(0))]
    zb = False
    for i in range(s6):  # the second half of these 2(h+1) backwards defer W; the parity picks who switches first
        if i == s6 // 2 and s6 % 2 == 0:
            zb = True
        ops.append(B(1, zb))
        if i == s6 // 2 and s6 % 2 == 1:
            zb = True
        ops.append(B(0, zb))
    for _ in range(s7):
        ops += [W(), B(0, zb=True)]
    for _ in range(s8):
        ops.append(W())
    assert not w_queue, "every deferred W must be drained by step 8"
    return ops


def schedule_dualpipe(n_ranks: int, n_chunks: int) -> Schedule:
    """DualPipe on n_ranks (even), n_chunks (even, >= 2·n_ranks) micro-batches, half from each end."""
    _check("dualpipe", n_ranks, n_chunks)
    ops = []
    for r in range(n_ranks):
        counts = step_counts(n_ranks, n_chunks, r, "dualpipe")
        is_middle = min(r, n_ranks - 1 - r) == n_ranks // 2 - 1
        ops.append(_eight_steps(counts, is_middle, flip=int(r >= n_ranks // 2)))
    return Schedule("dualpipe", n_ranks, n_chunks, ops)


def schedule_dualpipev(n_ranks: int, n_chunks: int) -> Schedule:
    """DualPipeV on n_ranks (any), 2·n_ranks stages in a V, n_chunks >= 2·n_ranks micro-batches from rank 0."""
    _check("dualpipev", n_ranks, n_chunks)
    ops = [_eight_steps(step_counts(n_ranks, n_chunks, r, "dualpipev"), r == n_ranks - 1, flip=0)
           for r in range(n_ranks)]
    return Schedule("dualpipev", n_ranks, n_chunks, ops)


def schedule_1f1b(n_ranks: int, n_chunks: int) -> Schedule:
    """Classic 1F1B: warm up with N-1-r forwards (all the chunks if there are fewer), alternate F and B, drain the
    remaining backwards."""
    _check("1f1b", n_ranks, n_chunks)
    ops = []
    for r in range(n_ranks):
        warm = min(n_ranks - 1 - r, n_chunks)
        rank_ops = [("F", 0, c) for c in range(warm)]
        for c in range(n_chunks - warm):
            rank_ops += [("F", 0, warm + c), ("B", 0, c)]
        rank_ops += [("B", 0, c) for c in range(n_chunks - warm, n_chunks)]
        ops.append(rank_ops)
    return Schedule("1f1b", n_ranks, n_chunks, ops)


def make_schedule(kind: str, n_ranks: int, n_chunks: int) -> Schedule:
    makers = {"1f1b": schedule_1f1b, "dualpipe": schedule_dualpipe, "dualpipev": schedule_dualpipev}
    if kind not in makers:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")
    return makers[kind](n_ranks, n_chunks)


# -- timeline simulator ---------------------------------------------------------------------------------------
@dataclass
class Timeline:
    schedule: Schedule
    spans: list  # spans[r] = [(start, end, op), ...] in execution order
    makespan: float
    busy: list  # busy[r] = total compute time of rank r
    bubble: list  # bubble[r] = makespan - busy[r]: idle time of rank r, warm-up and drain included


def _deps(sched: Schedule, rank: int, op: tuple) -> list:
    """Keys ("F"|"B", pipe, stage, chunk) that must have finished before `op` may start on `rank`."""
    if op[0] == "FB":
        return _deps(sched, rank, op[1]) + _deps(sched, rank, op[2])
    kind, phase, chunk = op
    pipe, s = sched.where(rank, phase)
    if kind == "F":  # activations from the previous stage
        return [("F", pipe, s - 1, chunk)] if s > 0 else []
    if kind == "W":  # after its own input-grad backward
        return [("B", pipe, s, chunk)]
    # B / BI: gradient from the next stage; the last stage needs its own forward (the loss)
    return [("B", pipe, s + 1, chunk) if s < sched.n_stages - 1 else ("F", pipe, s, chunk)]


def _done_keys(sched: Schedule, rank: int, op: tuple) -> list:
    if op[0] == "FB":
        return _done_keys(sched, rank, op[1]) + _done_keys(sched, rank, op[2])
    if op[0] == "W":
        return []
    pipe, s = sched.where(rank, op[1])
    return [("F" if op[0] == "F" else "B", pipe, s, op[2])]


def op_cost(op: tuple, costs: dict) -> float:
    """F, B (full), BI = B - W (input grad only), W, FB = costs['FB'] (the overlapped pair)."""
    return costs["B"] - costs["W"] if op[0] == "BI" else costs[op[0]]


def simulate(sched: Schedule, costs: dict, cost_fn=None) -> Timeline:
    """Run every rank's op list in order; an op starts when its rank is free and its inputs exist.

    Communication takes zero time, so only data dependencies delay an op. Each op's start time depends only on
    its dependencies and its rank's previous op, so the sweep order does not change the result. A sweep that
    makes no progress while ops remain is a deadlock (a schedule bug) and raises RuntimeError.
    cost_fn(rank, op), if given, replaces `op_cost` and `costs` (stages of different sizes: plan.py)."""
    for key in ("F", "B", "W", "FB") if cost_fn is None else ():
        if not 0 <= costs.get(key, -1) < math.inf:  # NaN fails too
            raise ValueError(f"costs[{key!r}] must be given, finite and >= 0, got {costs.get(key)}")
    if cost_fn is None and costs["W"] > costs["B"]:
        raise ValueError(f"costs: W ({costs['W']}) is part of B ({costs['B']}) and cannot exceed it")
    N = sched.n_ranks
    finish, clock, ptr = {}, [0.0] * N, [0] * N
    spans = [[] for _ in range(N)]
    remaining = sum(len(o) for o in sched.ops)
    while remaining:
        progressed = False
        for r in range(N):
            while ptr[r] < len(sched.ops[r]):
                op = sched.ops[r][ptr[r]]
                deps = _deps(sched, r, op)
                if any(d not in finish for d in deps):
                    break
                start = max([clock[r]] + [finish[d] for d in deps])
                clock[r] = start + (cost_fn(r, op) if cost_fn else op_cost(op, costs))
                for key in _done_keys(sched, r, op):
                    finish[key] = clock[r]
                spans[r].append((start, clock[r], op))
                ptr[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: sched.ops[r][ptr[r]] for r in range(N) if ptr[r] < len(sched.ops[r])}
            raise RuntimeError(f"{sched.kind}: deadlock, ranks waiting on {stuck}")
    makespan = max(clock)
    busy = [sum(e - s for s, e, _ in sp) for sp in spans]
    return Timeline(sched, spans, makespan, busy, [makespan - b for b in busy])


def formula_bubble(kind: str, pp: int, costs: dict) -> float:
    """The per-device bubble of the table in this file's header (from deepseek-ai/DualPipe's README) with PP
    stages (DualPipeV: PP = 2 × its rank count)."""
    F, B, W, FB = costs["F"], costs["B"], costs["W"], costs["FB"]
    return (pp - 1) * (F + B) if kind == "1f1b" else (pp // 2 - 1) * (FB + B - 3 * W)


# -- cross-check against torch.distributed.pipelining ---------------------------------------------------------
def torch_dualpipev_order(n_ranks: int, n_chunks: int) -> list:
    """torch's ScheduleDualPipeV per-rank action lists (the schedule that pipeline.py trains with), in this
    file's op tuples: stage r → phase 0, stage 2N-1-r → phase 1; F, B (full), I → "BI", W, OVERLAP_F_B → "FB".

    The lists come from the schedule object's `pipeline_order`, built by torch's own helper for its schedule
    pictures (`get_schedule_ops`, a private module: it stands in mock stages, no process group needed)."""
    from torch.distributed.pipelining import ScheduleDualPipeV
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    kinds = {"F": "F", "B": "B", "I": "BI", "W": "W"}

    def convert(rank, action):
        if action.computation_type.value == "OVERLAP_F_B":
            return ("FB",) + tuple(convert(rank, a) for a in action.sub_actions)
        phase = 0 if action.stage_index == rank else 1
        return (kinds[action.computation_type.value], phase, action.microbatch_index)

    order = get_schedule_ops(ScheduleDualPipeV, n_ranks, n_chunks)
    return [[convert(r, a) for a in actions if a is not None] for r, actions in enumerate(order)]


# -- executor on torch.distributed ----------------------------------------------------------------------------
def _tag(sched: Schedule, kind: str, pipe: int, stage: int, chunk: int) -> int:
    """A unique P2P tag per message, so that out-of-order sends between two ranks never get mixed up."""
    return ((("FB".index(kind)) * 2 + pipe) * sched.n_stages + stage) * sched.n_chunks + chunk


def run_dualpipe(modules, inputs, labels, criterion, n_chunks: int, shape, dtype=None) -> list:
    """One training step of `schedule_dualpipe` on this rank (a process group must be initialised).

    modules = (model stage r, model stage N-1-r): the second is the mirrored copy of rank N-1-r's first module.
    Rank 0 gets `inputs` = the half of the batch that enters at rank 0 and `labels` = the labels of the half that
    enters at rank N-1 (it computes their loss); rank N-1 the mirror; other ranks pass None. Each micro-batch is
    one of n_chunks/2 `tensor_split` pieces and every stage maps activations of `shape` to `shape`.
    Gradients accumulate (summed over micro-batches) into both modules' .grad; the caller sums mirrored copies.
    Communication is plain isend + blocking recv, not overlapped; F&B pairs run serially (no overlap here).
    Returns the per-micro-batch losses on ranks 0 and N-1, None elsewhere."""
    import torch
    import torch.distributed as dist
    rank, N = dist.get_rank(), dist.get_world_size()
    sched = schedule_dualpipe(N, n_chunks)
    xs = inputs.tensor_split(n_chunks // 2) if inputs is not None else None
    ys = labels.tensor_split(n_chunks // 2) if labels is not None else None
    saved, losses, sends, deferred = {}, [], [], {}

    def peer(phase, downstream):  # direction 0 flows to rank+1, direction 1 to rank-1
        return rank + (1 if phase == 0 else -1) * (1 if downstream else -1)

    def forward(phase, c):
        pipe, s = sched.where(rank, phase)
        if s == 0:
            x = xs[c]
        else:  # activations of the previous stage, a leaf whose .grad is the input gradient to send back
            x = torch.empty(shape, dtype=dtype)
            dist.recv(x, peer(phase, False), tag=_tag(sched, "F", pipe, s - 1, c))
            x.requires_grad_()
        out = modules[phase](x)
        if s == N - 1:  # the loss point of this direction
            out = criterion(out, ys[c])
            losses.append(out.detach())
        else:
            sends.append(dist.isend(out.detach(), peer(phase, True), tag=_tag(sched, "F", pipe, s, c)))
        saved[phase, c] = (x, out)

    def backward(phase, c, input_only):
        pipe, s = sched.where(rank, phase)
        x, out = saved.pop((phase, c))
        grad = None
        if s < N - 1:
            grad = torch.empty(shape, dtype=dtype)
            dist.recv(grad, peer(phase, True), tag=_tag(sched, "B", pipe, s + 1, c))
        if input_only and s > 0:  # ZeroBubble B: input grad now, keep the graph for the weight grad (W)
            torch.autograd.backward(out, grad, inputs=[x], retain_graph=True)
            deferred[phase, c] = (out, grad)
        elif input_only:  # the first stage has no input grad to hurry: all of it is W
            deferred[phase, c] = (out, grad)
        else:
            torch.autograd.backward(out, grad)
        if s > 0:
            sends.append(dist.isend(x.grad, peer(phase, False), tag=_tag(sched, "B", pipe, s, c)))

    def weight(phase, c):
        out, grad = deferred.pop((phase, c))
        torch.autograd.backward(out, grad, inputs=list(modules[phase].parameters()))

    def run(op):
        if op[0] == "FB":
            run(op[1]), run(op[2])
        elif op[0] == "F":
            forward(op[1], op[2])
        elif op[0] == "W":
            weight(op[1], op[2])
        else:
            backward(op[1], op[2], input_only=op[0] == "BI")

    for op in sched.ops[rank]:
        run(op)
    for req in sends:
        req.wait()
    assert not saved and not deferred
    return losses if rank in (0, N - 1) else None


# -- rendering ------------------------------------------------------------------------------------------------
def _label(op: tuple) -> str:
    """Upper case = phase 0, lower case = phase 1; the digit is chunk mod 10. FB shows both halves."""
    if op[0] == "FB":
        return _label(op[1]) + _label(op[2])
    letter = {"F": "F", "B": "B", "BI": "I", "W": "W"}[op[0]]
    return (letter if op[1] == 0 else letter.lower()) + str(op[2] % 10)


def render_timeline(tl: Timeline, scale: int = 2) -> str:
    """One row per rank, `scale` characters per time unit; '.' is idle time."""
    width = round(tl.makespan * scale)
    rows = []
    for r, spans in enumerate(tl.spans):
        row = ["."] * width
        for start, end, op in spans:
            a, b = round(start * scale), round(end * scale)
            text = _label(op).ljust(b - a, "-")[: b - a]
            row[a:b] = list(text)
        rows.append(f"rank {r:2d} |{''.join(row)}| bubble {tl.bubble[r]:g}")
    return "\n".join(rows)


def bubble_table(n_ranks: int, n_chunks: int, costs: dict) -> list:
    """Rows (method, devices, formula, simulated max per-rank bubble, makespan) at PP = n_ranks stages."""
    rows = []
    for kind in KINDS:
        devices = n_ranks // 2 if kind == "dualpipev" else n_ranks
        tl = simulate(make_schedule(kind, devices, n_chunks), costs)
        rows.append((kind, devices, formula_bubble(kind, n_ranks, costs), max(tl.bubble), tl.makespan, tl))
    return rows


def fold_timeline(text: str, width: int = 100, scale: int = 2) -> str:
    """Cut render_timeline's rows into panels of at most `width` characters, stacked one under the other, each
    headed by the time span it shows; the bubble column goes after the last panel."""
    rows = [(line[: line.index("|")], line[line.index("|") + 1: line.rindex("|")], line[line.rindex("|") + 1:])
            for line in text.splitlines()]
    label = len(rows[0][0])
    room = width - label - 2 - max(len(tail) for _, _, tail in rows)  # body characters per panel
    room -= room % scale  # cut between time units
    if room < 4 * scale:
        raise ValueError(f"width {width} leaves no room for the timeline")
    body = len(rows[0][1])
    n = -(-body // room)  # panels needed; share the body evenly between them
    room = -(-body // n // scale) * scale if n > 1 else room
    panels = []
    for a in range(0, body, room):
        b = min(body, a + room)
        lines = [f"{'':{label}s} t = {a / scale:g} .. {b / scale:g}"]
        lines += [f"{head}|{mid[a:b]}|" + (tail if b == body else "") for head, mid, tail in rows]
        panels.append("\n".join(lines))
    return "\n".join(panels)


def gantt_rows(tl: Timeline) -> list:
    """rows[r] = [(start, end, kind, label)] for plots.png_gantt; an overlapped pair is drawn as its two halves,
    forward on top and backward below, sharing the pair's time."""
    kind = {"F": "F", "B": "B", "BI": "I", "W": "W"}
    rows = []
    for spans in tl.spans:
        row = []
        for start, end, op in spans:
            if op[0] == "FB":
                row += [(start, end, "F^", _label(op[1])), (start, end, kind[op[2][0]] + "_", _label(op[2]))]
            else:
                row.append((start, end, kind[op[0]], _label(op)))
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print 1F1B / DualPipe / DualPipeV timelines and bubbles.")
    p.add_argument("--ranks", type=int, default=8, help="PP stages (DualPipeV runs them on ranks/2 devices)")
    p.add_argument("--chunks", type=int, default=20, help="micro-batches per step")
    p.add_argument("--F", type=float, default=1.0, help="cost of one forward chunk")
    p.add_argument("--B", type=float, default=2.0, help="cost of one full backward chunk")
    p.add_argument("--W", type=float, default=1.0, help="cost of the weight-grad part of B")
    p.add_argument("--FB", type=float, default=3.0, help="cost of an overlapped F&B pair (F+B = no overlap)")
    p.add_argument("--width", type=int, default=100, help="fold the text timelines into this many columns")
    p.add_argument("--png", metavar="PATH", help="also draw the timelines as a PNG (needs matplotlib)")
    a = p.parse_args(argv)
    costs = dict(F=a.F, B=a.B, W=a.W, FB=a.FB)
    try:
        for key, cost in costs.items():
            if not 0 <= cost < math.inf:
                raise ValueError(f"--{key} must be a finite cost >= 0, got {cost}")
        if a.ranks % 2:
            raise ValueError(f"--ranks ({a.ranks}) must be even so DualPipe and DualPipeV share PP stages")
        rows = bubble_table(a.ranks, a.chunks, costs)
        pictures = [fold_timeline(render_timeline(tl), a.width) for *_, tl in rows]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print("F/B/I/W = forward / full backward / input-grad backward / weight-grad; upper case = phase 0, lower")
    print("case = phase 1, digit = chunk mod 10; two letters = an overlapped F&B pair; '.' = idle")
    for (kind, devices, *_), picture in zip(rows, pictures):
        print(f"\n{kind}: {devices} ranks, {a.chunks} chunks")
        print(picture)
    print(f"\nPP = {a.ranks}, costs {costs}")
    print(f"{'method':10s} {'devices':>7s} {'formula':>8s} {'simulated':>9s} {'makespan':>8s}")
    for kind, devices, formula, sim, makespan, _ in rows:
        print(f"{kind:10s} {devices:7d} {formula:8g} {sim:9g} {makespan:8g}")
    if a.png:
        import plots
        panels = [(f"{kind}: {devices} ranks, {a.chunks} chunks, bubble per rank up to {sim:g}", gantt_rows(tl))
                  for kind, devices, _, sim, _, tl in rows]
        try:
            plots.png_gantt(a.png, panels)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        print(f"wrote {a.png}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader is gone (`| head`): stop quietly; stdout must not be flushed at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
