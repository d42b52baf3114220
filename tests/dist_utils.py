"""Run a function in N forked processes joined by a gloo process group, from inside the pytest process.

Forking a parent that has already imported torch costs about a second per world, where torchrun (or spawned
workers, which import torch again) costs 15-50 s on 2 cores: that makes a CI suite of distributed tests
affordable. Each worker runs with one thread, gets the torchrun environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), optionally joins a gloo group itself, runs `fn(rank, world, *args)` and
sends its return value (or its traceback) back to the parent.

    results = run_workers(fn, 2, arg)           # [fn's result on rank 0, on rank 1]; raises if a rank failed
    outcomes = run_workers(fn, 2, check=False)  # [(exitcode, result or traceback text or None), ...]
"""
import datetime
import os
import pickle
import socket
import traceback

import torch
import torch._dynamo  # noqa: F401  (imported before forking, so no worker pays for it)
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, init, timeout_s, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    code = 0
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        queue.put(pickle.dumps((rank, True, result)))  # plain pickle: no shared memory
    except BaseException:  # noqa: BLE001 (SystemExit included: report it, then leave with a failure code)
        queue.put(pickle.dumps((rank, False, traceback.format_exc())))
        code = 1
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a failed peer may have broken the group already
                pass
    os._exit(code)  # skip the atexit handlers the forked child inherited from pytest


def run_workers(fn, world: int, *args, init: bool = True, timeout_s: float = 120.0, check: bool = True,
                dist_timeout_s: float = 60.0):
    """fn(rank, world, *args) on `world` forked ranks. check=True: their results in rank order, or an
    AssertionError carrying the first failed rank's traceback. check=False: [(exitcode, payload)] per rank.
    Workers still alive after timeout_s are killed (the test then fails: never a hung CI)."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, init, dist_timeout_s, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    payload = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while any(p.is_alive() for p in procs) and datetime.datetime.now() < deadline:
        while not queue.empty():
            rank, ok, value = pickle.loads(queue.get())
            payload[rank] = (ok, value)
        for p in procs:
            p.join(timeout=0.05)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    while not queue.empty():
        rank, ok, value = pickle.loads(queue.get())
        payload[rank] = (ok, value)
    codes = [p.exitcode for p in procs]
    if not check:
        return [(codes[r], payload.get(r, (None, None))[1]) for r in range(world)]
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout_s} s (killed)")
    failed = {r: payload.get(r, (False, f"exited with code {codes[r]} and no result")) for r in range(world)}
    failed = {r: text for r, (ok, text) in failed.items() if not ok}
    if failed:  # every failed rank's traceback: the first one in rank order is not always the cause
        raise AssertionError("\n".join(f"rank {r} failed:\n{text}" for r, text in failed.items()))
    return [payload[r][1] for r in range(world)]
