"""Checkpoints: one file that a crash, Ctrl-C, SIGTERM or a full disk never leaves half-written.

    save_checkpoint   torch.save to a temporary file in the same folder, then os.replace: on POSIX a rename within
                      a folder is atomic, so `path` is always either the old complete file or the new complete
                      file. The temporary file is removed if anything fails.
    load_checkpoint   torch.load (weights_only: a checkpoint cannot run code); a missing, truncated or foreign file
                      raises one line (FileNotFoundError / ValueError) naming what was being loaded.
    rng_state         every random-number state a run depends on (torch CPU, CUDA, the data generator), and
    set_rng_state     its inverse: with them a resumed run draws exactly the numbers the uninterrupted one would.
    signals_deferred  holds Ctrl-C (SIGINT) and SIGTERM during a critical section (an optimizer step, a checkpoint
                      write) and delivers them right after it, as an Interrupted exception; sections nest.
    stop_on_sigterm   makes SIGTERM (what clusters and `timeout` send) raise Interrupted, as Ctrl-C does.
    lock_out_dir      an exclusive lock on a run folder, so that two runs never write the same files.
    pick_device       the device to load onto or train on: auto (cuda → mps → cpu) or a name, checked.

Used by train.py (save, resume) and generate.py (load).
"""
import contextlib
import os
import signal
import threading

import torch


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; `signum` says which (exit status 128 + signum, the shell's convention)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# -- save and load ----------------------------------------------------------------------------------------------
def save_checkpoint(obj: dict, path: str) -> None:
    """Atomic: write `path`.tmp, then rename it over `path`. Signals wait until the file is complete. A failed
    write (full disk, read-only folder) raises OSError and leaves `path` as it was."""
    tmp = f"{path}.tmp"
    with signals_deferred():
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        except RuntimeError as e:  # torch's file writer reports a failed write (a full disk) as RuntimeError
            reason = (str(e).strip().splitlines() or [""])[-1]
            raise OSError(f"cannot write {path} (is the disk full? {reason})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def load_checkpoint(path: str, what: str, need=("model", "config"), hint: str = "") -> dict:
    """The dict saved at `path`, on the CPU. `what` names the caller in errors (e.g. "--resume"); `need` lists
    the keys the caller reads, so a file from another program is refused in one line, not with a KeyError."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no checkpoint at {path}{hint}")
    try:
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
