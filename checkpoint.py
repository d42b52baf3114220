"""Checkpoints: one file that a crash, Ctrl-C, SIGTERM or a full disk never leaves half-written.

    save_checkpoint   torch.save to a temporary file in the same folder, then os.replace: on POSIX a rename within
                      a folder is atomic, so `path` is always either the old complete file or the new complete
                      file. The temporary file is removed if anything fails. The file is flushed to the disk
                      (fsync) before the rename and the folder after it, so that a power loss, not only a crash,
                      leaves one of the two complete files (without it the rename can reach the disk first).
    load_checkpoint   torch.load (weights_only: a checkpoint cannot run code) after checking the CRC-32 of every
                      record; a missing, truncated, damaged or foreign file raises one line (FileNotFoundError /
                      ValueError) naming what was being loaded.
    rng_state         every random-number state a run depends on (torch CPU, CUDA, the data generator), and
    set_rng_state     its inverse: with them a resumed run draws exactly the numbers the uninterrupted one would.
    signals_deferred  holds Ctrl-C (SIGINT) and SIGTERM during a critical section (an optimizer step, a checkpoint
                      write) and delivers them right after it, as an Interrupted exception; sections nest.
    stop_on_sigterm   makes SIGTERM (what clusters and `timeout` send) raise Interrupted, as Ctrl-C does.
    lock_out_dir      an exclusive lock on a run folder, so that two runs never write the same files.
    pick_device       the device to load onto or train on: auto (cuda → mps → cpu) or a name, checked.

A run under torchrun writes a folder instead of a file (the distributed section at the end): every rank writes
its own shards with torch.distributed.checkpoint (DCP), and the folder is put in place by one rename, as atomic
as the file. `load_checkpoint` reads such a folder too (the whole tensors, in one process), so generate.py and
a one-process --resume read a distributed run's output.

Used by train.py (save, resume) and generate.py (load).
"""
import contextlib
import errno
import os
import shutil
import signal
import threading
import zipfile

import torch
import torch.distributed as dist


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `signum` says which (exit status 128 + signum, the shell's convention)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# -- save and load ----------------------------------------------------------------------------------------------
def fsync_path(path: str) -> None:
    """Flush `path` from the OS's cache to the disk: a file's bytes, or a folder's entries (the renames made in
    it). A file is opened for writing (Windows flushes only such handles). A folder that cannot be opened or synced
    (Windows, some network file systems) is skipped, and so is a file system that cannot sync at all (EINVAL,
    ENOTSUP); a failed flush of a file (EIO, a full disk) raises OSError. On macOS fsync reaches the drive but not
    the drive's own cache."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR | getattr(os, "O_BINARY", 0))
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP) + ((errno.EBADF,) if folder else ()):
            raise
    finally:
        os.close(fd)


def save_checkpoint(obj: dict, path: str) -> None:
    """Atomic: write `path`.tmp, flush it to the disk, then rename it over `path` (and flush the folder). Signals
    wait until the file is in place. A failed write (full disk, read-only folder) raises OSError and leaves `path`
    as it was."""
    tmp = f"{path}.tmp"
    with signals_deferred():
        try:
            torch.save(obj, tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(os.path.dirname(os.path.abspath(path)))
        except RuntimeError as e:  # torch's file writer reports a failed write (a full disk) as RuntimeError
            reason = (str(e).strip().splitlines() or [""])[-1]
            raise OSError(f"cannot write {path} (is the disk full? {reason})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(path: str, what: str, need=("model", "config"), hint: str = "") -> dict:
    """The dict saved at `path`, on the CPU. `what` names the caller in errors (e.g. "--resume"); `need` lists
    the keys the caller reads, so a file from another program is refused in one line, not with a KeyError. A file is
    read twice: first its records' CRC-32 checksums are checked, so that damaged bytes are refused here instead of
    being loaded as weights."""
    path = newest_checkpoint(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no checkpoint at {path}{hint}")
    try:
        if os.path.isdir(path):  # a distributed run's folder: gather its shards into whole tensors
            ckpt = load_distributed_full(path, keys=("model", "optimizer") if "optimizer" in need else ("model",))
        else:
            if zipfile.is_zipfile(path):  # torch.load does not check the CRC-32 torch.save writes for every record
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    raise RuntimeError(f"its record {bad} fails its CRC-32 check: the file is damaged")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged or not a torch file: the first line of the reason is enough
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what}: cannot read checkpoint {path} ({type(e).__name__}: {reason})") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{what}: {path} is not a train.py checkpoint (no {', '.join(missing)})")
    return ckpt


# -- random-number state ------------------------------------------------------------------------------------------
def rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- signals ------------------------------------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_DEFERRING = []  # non-empty while a signals_deferred block runs


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM while the block runs; if one came, raise Interrupted(signum) right after it.
    Blocks nest: an inner one holds nothing itself, the outermost delivers after its whole block. Signal handlers
    can only be set from the main thread; elsewhere the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread() or _DEFERRING:
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in STOP_SIGNALS}
    _DEFERRING.append(True)
    try:
        yield
    finally:
        _DEFERRING.pop()
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if caught:
        raise Interrupted(caught[0])


@contextlib.contextmanager
def stop_on_sigterm():
    """Inside the block SIGTERM raises Interrupted(SIGTERM) wherever the program is, as Ctrl-C raises
    KeyboardInterrupt, so one `except KeyboardInterrupt` saves the run for both."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


# -- device ---------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """"auto" = cuda → mps → cpu; otherwise the named device, refused in one line if this machine lacks it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return dev


# -- the run folder -----------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


def lock_out_dir(out_dir: str):
    """Create out_dir if needed and take an exclusive lock on it; returns the open lock file, which holds the lock
    until it is closed or the process ends. A second process asking for the same folder gets a ValueError naming
    the holder's pid. The lock is flock(2) on out_dir/.lock: the kernel drops it when its process dies, even by
    kill -9, so a lock is never stale (the pid in the file is for people to read). Where fcntl does not exist
    (Windows) the folder is not locked."""
    where = f"--out_dir {out_dir}"
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{where}: this is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"{where}: cannot write there ({e.strerror or e})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):  # the lock file may be writable in a folder that is not
        os.close(fd)
        raise ValueError(f"{where}: cannot write there (the folder is read-only)")
    f = os.fdopen(fd, "r+")
    try:
        import fcntl
    except ImportError:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = f.read().strip() or "?"
        f.close()
        raise ValueError(f"{where}: another run (pid {pid}) is using this folder") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


# -- distributed checkpoints (a run under torchrun) -------------------------------------------------------------
DCP_META = "meta.pt"  # inside the folder: everything but the model and optimizer (step, RNG, config, options)


def dcp_path(path: str) -> str:
    """The folder a distributed run writes where a one-process run writes `path` (out/ckpt.pt → out/ckpt.dcp)."""
    return os.path.splitext(path)[0] + ".dcp"


def newest_checkpoint(path: str) -> str:
    """`path` (a ckpt.pt), or the distributed folder beside it if that is the only one or the newer of the two."""
    folder = dcp_path(path)
    if path == folder or not os.path.isdir(_existing(folder)):
        return path
    if not os.path.exists(path) or os.path.getmtime(_existing(folder)) > os.path.getmtime(path):
        return _existing(folder)
    return path


def _existing(folder: str) -> str:
    """`folder`, or folder.old when a crash came between the two renames of save_distributed."""
    return folder if os.path.isdir(folder) or not os.path.isdir(f"{folder}.old") else f"{folder}.old"


def _dcp_options():
    """The optimizer state flattened to one key per parameter and value ("state.<name>.exp_avg",
    "param_groups.<name>.lr"): under pipeline parallelism each rank holds other parameters, and a nested
    param_groups list, written once for all ranks, would keep only one rank's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp_state(model, opt) -> dict:
    """Model and optimizer state keyed by parameter names, each tensor as this rank's shard (DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, opt_sd = get_state_dict(model, opt, options=_dcp_options())
    return {"model": model_sd, "optimizer": opt_sd}


def save_distributed(path: str, model, opt, meta: dict) -> None:
    """Every rank writes its shards of the model and optimizer; rank 0 writes `meta`; atomic like a file.

    All ranks write into path.tmp; after a barrier rank 0 moves the finished folder into place (the old one is
    renamed aside first and deleted last, so at every moment one complete checkpoint exists: loading falls back
    to path.old if a crash came between the two renames). On several nodes `path` must be on a shared disk.
    A failed write raises OSError on the rank that failed. Signals are the caller's to hold (train.py notes them
    and lets all ranks stop together: a rank that left a collective alone would leave the others waiting)."""
    import torch.distributed.checkpoint as dcp
    main = dist.get_rank() == 0
    tmp, old = f"{path}.tmp", f"{path}.old"
    if main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    try:
        dcp.save(_dcp_state(model, opt), checkpoint_id=tmp)  # its file writer fsyncs each file it writes
        if main:
            torch.save(meta, os.path.join(tmp, DCP_META))
            fsync_path(os.path.join(tmp, DCP_META))
            fsync_path(tmp)
    except RuntimeError as e:  # a full disk, as in save_checkpoint
        raise OSError(f"cannot write {path} ({(str(e).strip().splitlines() or [''])[-1]})") from None
    dist.barrier()  # every shard and the metadata are on disk
    if main:
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody reads or writes the folder before it is in place


def read_meta(path: str) -> dict:
    return torch.load(os.path.join(_existing(path), DCP_META), map_location="cpu", weights_only=True)


def _last_line(e: BaseException) -> str:
    """torch.distributed.checkpoint's errors end with the cause (after every rank's traceback): that line."""
    return (str(e).strip().splitlines() or ["unreadable"])[-1]


def check_distributed(path: str) -> str:
    """The folder to load (path, or path.old after a crash between save_distributed's renames) once its .metadata
    reads: checked first, because torch's loader would log each failed attempt with a traceback before it gives up.
    RuntimeError otherwise."""
    from torch.distributed.checkpoint import FileSystemReader
    path = _existing(path)
    try:
        FileSystemReader(path).read_metadata()
    except Exception as e:
        raise RuntimeError(f"no readable .metadata in it ({type(e).__name__}: {e})") from None
    return path


def load_distributed(path: str, model, opt) -> dict:
    """Load a folder of save_distributed into an already parallelized model and its optimizer, on every rank;
    the world size and layout may differ from the run that saved it (DCP re-slices every tensor). Returns meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict
    path = check_distributed(path)
    state = _dcp_state(model, opt)
    try:
        dcp.load(state, checkpoint_id=path)
    except CheckpointException as e:  # a BaseException, not an Exception: a shard missing or cut short
        raise RuntimeError(_last_line(e)) from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_dcp_options())
    return read_meta(path)


def load_optimizer_state(model, opt, state: dict) -> None:
    """The optimizer part of `load_distributed_full` into `opt` (whose parameters are `model`'s)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=_dcp_options())


def load_distributed_full(path: str, keys=("model",)) -> dict:
    """One process, no process group: the whole tensors of a distributed checkpoint as a plain state dict
    ({"model": {name: tensor}, "optimizer": {"state.<name>.<key>": ..., "param_groups.<name>.<key>": ...}}
    plus the meta entries). The optimizer state is keyed by parameter names (flattened, `_dcp_options`): load it
    with `load_optimizer_state`, which works without a process group too."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    from torch.distributed.checkpoint.api import CheckpointException
    path = check_distributed(path)
    state = {}  # filled from the checkpoint's own metadata, as format_utils.dcp_to_torch_save does
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path),
                         planner=_EmptyStateDictLoadPlanner(keys=set(keys)), no_dist=True)
    except CheckpointException as e:  # a BaseException, not an Exception: a shard missing or cut short
        raise RuntimeError(_last_line(e)) from None
    return {**read_meta(path), **state}
