"""checkpoint.py: the write is atomic (a failed save keeps the old file, leaves no temporary file), loading refuses
missing, truncated and foreign files in one line, RNG states round-trip, signals wait for a critical section."""
import os
import signal

import pytest
import torch

import checkpoint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"step": 1, "w": torch.arange(5)}, path)

    def broken_save(obj, f):  # dies half-way through writing
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({"step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_checkpoint_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """Durable as well as atomic: the new file's bytes are flushed (fsync) before the rename, and the folder (which
    holds the rename) after it; otherwise a power loss can persist the rename before the data, leaving an empty
    ckpt.pt where a complete old one was."""
    path = str(tmp_path / "ckpt.pt")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    checkpoint.save_checkpoint({"step": 1}, path)
    monkeypatch.undo()
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    if os.path.isdir("/proc/self/fd"):  # which file and folder were flushed (Linux names an fd's path there)
        assert events[0][1] == os.path.realpath(path + ".tmp") and events[2][1] == os.path.realpath(tmp_path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_fsync_path_raises_for_a_file_and_skips_an_unsyncable_folder(tmp_path, monkeypatch):
    """A file whose flush fails (EIO: the disk lost the write) raises; a file system that cannot flush (EINVAL) is
    skipped, for a folder and a file alike."""
    import errno
    f = tmp_path / "f"
    f.write_bytes(b"x")

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(checkpoint.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError):
        checkpoint.fsync_path(str(f))
    monkeypatch.setattr(checkpoint.os, "fsync", failing(errno.EINVAL))
    checkpoint.fsync_path(str(tmp_path))
    checkpoint.fsync_path(str(f))


def test_load_errors_are_one_line(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match=r"^gen: no checkpoint at .*ckpt.pt \(hint\)$"):
        checkpoint.load_checkpoint(path, "gen", hint=" (hint)")
    torch.save({"model": {"w": torch.ones(3)}, "config": {}, "step": 4}, path)
    assert checkpoint.load_checkpoint(path, "gen")["step"] == 4
    with pytest.raises(ValueError, match=r"is not a train.py checkpoint \(no optimizer, rng\)$"):
        checkpoint.load_checkpoint(path, "--resume", need=("model", "optimizer", "step", "rng"))
    whole = open(path, "rb").read()
    at = whole.index(torch.ones(3).numpy().tobytes())  # the tensor's bytes: overwritten, the file still a zip
    flipped = whole[:at] + b"\xff" * 12 + whole[at + 12:]
    for damaged in (whole[: len(whole) // 2], b"not a checkpoint", flipped):  # truncated, foreign, damaged
        open(path, "wb").write(damaged)
        with pytest.raises(ValueError, match="^--resume: cannot read checkpoint ") as e:
            checkpoint.load_checkpoint(path, "--resume")
        assert "\n" not in str(e.value)
    assert "fails its CRC-32 check: the file is damaged" in str(e.value)


def test_a_damaged_distributed_folder_is_refused_in_one_line(tmp_path, capfd):
    """A ckpt.dcp folder with an empty or missing .metadata (a crash of another tool, a copy cut short), and a folder
    where ckpt.pt should be, are refused with the usual line, and torch's loader prints no tracebacks of its own."""
    folder = tmp_path / "ckpt.dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    plain = tmp_path / "other"
    (plain / "ckpt.pt").mkdir(parents=True)
    for path, cause in ((tmp_path / "ckpt.pt", "Ran out of input"), (plain / "ckpt.pt", "No such file")):
        with pytest.raises(ValueError, match=rf"^--resume: cannot read checkpoint .*no readable .metadata.*{cause}"):
            checkpoint.load_checkpoint(str(path), "--resume")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "metadata is not found" not in err, err


def test_a_distributed_folder_with_a_cut_shard_is_refused_in_one_line(tmp_path, capfd):
    """A readable .metadata but a shard cut short: torch's loader raises a CheckpointException, a BaseException that
    `except Exception` would let through as a traceback; here it is the usual line. The folder read whole first."""
    import torch.distributed.checkpoint as dcp
    folder = tmp_path / "ckpt.dcp"
    dcp.save({"model": {"w": torch.arange(64.0)}}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"step": 3, "config": {}}, folder / checkpoint.DCP_META)
    got = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"), "gen", need=("model", "step"))
    assert got["step"] == 3 and torch.equal(got["model"]["w"], torch.arange(64.0))
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"^gen: cannot read checkpoint .*ckpt.dcp \(RuntimeError: ") as e:
        checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"), "gen", need=("model", "step"))
    assert "\n" not in str(e.value) and "Traceback" not in capfd.readouterr().err


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(7)
    state = checkpoint.rng_state(gen)
    first = (torch.rand(3), torch.rand(3, generator=gen))
    torch.manual_seed(0)
    gen.manual_seed(0)
    checkpoint.set_rng_state(state, gen)
    again = (torch.rand(3), torch.rand(3, generator=gen))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_wait_for_the_critical_section(signum):
    done, before = [], signal.getsignal(signal.SIGINT)  # Python's handler; SIG_IGN in a job started with & or nohup
    with pytest.raises(KeyboardInterrupt) as e:
        with checkpoint.signals_deferred():
            os.kill(os.getpid(), signum)  # delivered at once to this (main) thread, held by the handler
            done.append("the rest of the block ran")
    assert done and isinstance(e.value, checkpoint.Interrupted) and e.value.signum == signum
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    with checkpoint.stop_on_sigterm():
        with pytest.raises(checkpoint.Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


def test_nested_deferral_delivers_after_the_outer_block():
    """A checkpoint write (deferring on its own) inside a larger deferred section (the write plus the log rename):
    the signal waits for the whole section, not only for the inner block."""
    done, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(checkpoint.Interrupted):
        with checkpoint.signals_deferred():
            with checkpoint.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("inner")
            done.append("outer")  # the inner block did not raise
    assert done == ["inner", "outer"] and signal.getsignal(signal.SIGINT) is before


_RAN = []


def _side_effect():
    _RAN.append("code ran")
    return {}


class _RunsCode:
    """What a malicious pickle does: calls a function as it is loaded."""
    def __reduce__(self):
        return (_side_effect, ())


def test_load_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """torch.load with weights_only: a checkpoint (say, downloaded) whose pickle calls a function is refused in one
    line, and the function never runs."""
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {"w": torch.ones(2)}, "config": {}, "hook": _RunsCode()}, path)
    with pytest.raises(ValueError, match="^gen: cannot read checkpoint "):
        checkpoint.load_checkpoint(path, "gen")
    assert _RAN == []


def test_rng_state_keeps_the_cuda_generators(monkeypatch):
    """On a machine whose CUDA is in use the state holds every GPU's generator, and set_rng_state puts it back
    (simulated: torch.cuda's RNG functions are stand-ins that record what they are given)."""
    gpus, put = [torch.tensor([1, 2, 3], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", put.append)
    gen = torch.Generator().manual_seed(3)
    state = checkpoint.rng_state(gen)
    assert state["cuda"] is gpus
    checkpoint.set_rng_state(state, gen)
    assert put == [gpus]


def test_newest_checkpoint_picks_the_newer_of_file_and_folder(tmp_path):
    """ckpt.pt, or the distributed folder ckpt.dcp beside it when that is the only one or the newer; ckpt.dcp.old
    stands for the folder after a crash between save_distributed's two renames."""
    path = str(tmp_path / "ckpt.pt")
    assert checkpoint.newest_checkpoint(path) == path  # neither: the file's name (load_checkpoint says it is missing)
    os.mkdir(tmp_path / "ckpt.dcp.old")
    assert checkpoint.newest_checkpoint(path) == str(tmp_path / "ckpt.dcp.old")
    os.rename(tmp_path / "ckpt.dcp.old", tmp_path / "ckpt.dcp")
    assert checkpoint.newest_checkpoint(path) == str(tmp_path / "ckpt.dcp")
    torch.save({}, path)
    os.utime(tmp_path / "ckpt.dcp", (1, 1))
    assert checkpoint.newest_checkpoint(path) == path
    os.utime(path, (0, 0))
    assert checkpoint.newest_checkpoint(path) == str(tmp_path / "ckpt.dcp")
