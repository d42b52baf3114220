"""data.py: the prefix tokenizer round-trips, the corpus split is by file and deterministic, the cache is reused,
user errors are one line."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_text(seed: int, n: int = 3000) -> str:
    """ASCII, Latin, Greek, CJK, emoji, controls and whitespace runs: the cases byte-level BPE must survive."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
             (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        c = chr(rng.randint(lo, hi))
        out.append(c if not 0xD800 <= ord(c) <= 0xDFFF else "?")
        if rng.random() < 0.05:
            out.append(rng.choice(["  ", "\n\n", "\t", " \r\n", "<|endoftext|>", "    "]))
    return "".join(out)


@pytest.mark.parametrize("vocab_size", [8192, 100277])
def test_round_trip(vocab_size):
    tok = data.get_tokenizer(vocab_size)
    with open(os.path.join(ROOT, "data.py"), encoding="utf-8") as f:
        source = f.read()
    for text in (source, random_text(0), random_text(1), "", "a", "\x00\xff\u2028"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.n_vocab and i != tok.eot for i in ids)  # text never produces end-of-text
    assert tok.decode([tok.eot]) == "<|endoftext|>"


def test_prefix_vocabulary():
    tok = data.get_tokenizer(8192)
    assert (tok.n_vocab, tok.eot, tok.name) == (8192, 8191, "cl100k_base[:8191]+eot")
    ranks = [tok.enc.encode_single_token(bytes([b])) for b in range(256)]
    assert sorted(ranks) == list(range(256))  # the 256 single bytes are all inside the prefix
    full = data.get_tokenizer(100277)
    assert (full.n_vocab, full.eot, full.name) == (100277, 100257, "cl100k_base")
    assert data.get_tokenizer(200000).name == "cl100k_base"
    # With only the bytes left, every UTF-8 byte is one token: the smallest prefix still round-trips.
    text = random_text(2, 500)
    assert len(data.get_tokenizer(257).encode(text)) == len(text.encode("utf-8"))


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=256"):
        data.get_tokenizer(256)


def make_folder(root, n_files=200):
    os.makedirs(root)
    for i in range(n_files):
        sub = os.path.join(root, f"pkg{i % 7}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"mod_{i}.py"), "w") as f:
            f.write(f"# module {i}\n" + "".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(i % 13 + 1)))
    with open(os.path.join(root, "blob.bin"), "wb") as f:  # not UTF-8: skipped
        f.write(bytes(range(256)))
    os.makedirs(os.path.join(root, ".git"))
    with open(os.path.join(root, ".git", "HEAD"), "w") as f:  # hidden: skipped
        f.write("ref: refs/heads/main\n")


def expected_stream(root, rels, tok):
    ids = []
    for rel in rels:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            ids += tok.encode(f.read()) + [tok.eot]
    return ids


def test_split_by_file_deterministic_and_disjoint(tmp_path):
    root = str(tmp_path / "corpus")
    make_folder(root)
    a = data.load_corpus(root, 512, str(tmp_path / "cache_a"))
    b = data.load_corpus(root, 512, str(tmp_path / "cache_b"))  # tokenized again from scratch: same split
    for split in ("train", "val"):
        assert np.array_equal(a.splits[split], b.splits[split])
    _, rels = data.user_files(root)
    assert "blob.bin" in rels and not any(r.startswith(".git") for r in rels)
    rels = [r for r in rels if r.endswith(".py")]
    val_files = [r for r in rels if data.is_val_file(r)]
    assert 0 < len(val_files) < len(rels) // 10
    # Each split is exactly its own files, in sorted order, each closed by eot: no document on both sides.
    tok = a.tokenizer
    assert a.splits["val"].tolist() == expected_stream(root, val_files, tok)
    assert a.splits["train"].tolist() == expected_stream(root, [r for r in rels if r not in val_files], tok)
    assert a.splits["train"].dtype == np.uint16


@pytest.mark.parametrize("name", ["one.txt", "notes21.txt"])
def test_single_file_takes_last_tenth(tmp_path, name):
    """One file: the last tenth of its tokens is validation, also when its name falls in the 2% validation share
    (notes21.txt), which leaves the train split empty by the file rule (not 'corpus too short')."""
    path = tmp_path / name
    assert data.is_val_file(name) == (name == "notes21.txt")
    path.write_text("hello world, " * 500)
    c = data.load_corpus(str(path), 8192, str(tmp_path / "cache"))
    tok = c.tokenizer
    stream = tok.encode(path.read_text()) + [tok.eot]
    cut = len(stream) - len(stream) // 10
    assert c.splits["train"].tolist() == stream[:cut] and c.splits["val"].tolist() == stream[cut:]
    with pytest.raises(ValueError, match="val split has"):
        c.check_block(len(stream) - cut)  # needs block_size + 1 tokens
    c.check_block(len(stream) - cut - 1)


def test_stdlib_file_list():
    root, rels = data.stdlib_files()
    assert os.path.isdir(root) and "os.py" in rels and "json/__init__.py" in rels
    for rel in rels:
        parts = rel.split("/")
        assert rel.endswith(".py") and not set(parts[:-1]) & data.SKIP_DIRS, rel
    assert any(data.is_val_file(r) for r in rels) and sum(map(data.is_val_file, rels)) < 0.05 * len(rels)


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    root = str(tmp_path / "corpus")
    make_folder(root, 30)
    cache = str(tmp_path / "cache")
    first = data.load_corpus(root, 512, cache)
    calls = []
    real = data.build_splits
    monkeypatch.setattr(data, "build_splits", lambda *a: calls.append(1) or real(*a))
    again = data.load_corpus(root, 512, cache)
    assert calls == [] and again.key == first.key and isinstance(again.splits["train"], np.memmap)
    assert np.array_equal(again.splits["train"], first.splits["train"])
    with open(os.path.join(root, "pkg0", "mod_0.py"), "a") as f:
        f.write("x = 1\n")  # a changed file re-tokenizes
    changed = data.load_corpus(root, 512, cache)
    assert calls == [1] and changed.key != first.key
    assert data.load_corpus(root, 1024, cache).key != changed.key  # so does another tokenizer
    assert len(os.listdir(cache)) == 3


def test_get_batch_windows():
    stream = np.arange(1000, dtype=np.uint16)
    c = data.Corpus(stream, stream[:100], data.get_tokenizer(8192), "k", {})
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = c.get_batch("train", 4, 16, g1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one token (the stream counts up)
    assert torch.equal(x, c.get_batch("train", 4, 16, g2)[0])  # the generator alone decides the batch
    assert int(c.get_batch("val", 64, 99, g1)[1].max()) == 99  # windows stay inside the split


def test_unigram_baseline():
    # p(0) = (2+1)/(3+3), p(2) = (0+1)/(3+3) → CE on [0, 2] = -(ln 1/2 + ln 1/6) / 2
    got = data.unigram_baseline(np.array([0, 0, 1]), np.array([0, 2]), 3)
    assert got == pytest.approx(-(np.log(0.5) + np.log(1 / 6)) / 2)


def test_library_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_corpus(str(tmp_path / "missing"), 512, str(tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        data.load_corpus(str(tmp_path / "empty"), 512, str(tmp_path / "c"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="empty corpus"):
        data.load_corpus(str(tmp_path / "bin"), 512, str(tmp_path / "c"))


def test_unwritable_cache_dir_is_one_line(tmp_path, monkeypatch):
    """A --cache_dir that cannot be written (a file in the way; a full disk while writing) is a ValueError naming
    the flag, not a traceback; nothing half-written is left to be trusted later."""
    (tmp_path / "code.py").write_text("x = 1\n" * 200)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"^--cache_dir .*afile.sub: cannot write the tokenized corpus there \(Not "
                       r"a directory\)$"):
        data.load_corpus(str(tmp_path / "code.py"), 512, str(tmp_path / "afile" / "sub"))
    real = data._write_atomic

    def full_disk(path, write):
        if os.path.basename(path) == "val.bin":
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(data, "_write_atomic", full_disk)
    with pytest.raises(ValueError, match=r"cannot write the tokenized corpus there \(No space left on device\)$"):
        data.load_corpus(str(tmp_path / "code.py"), 512, str(tmp_path / "c"))
    monkeypatch.undo()
    (folder,) = os.listdir(tmp_path / "c")
    assert "meta.json" not in os.listdir(tmp_path / "c" / folder)  # no header: the next load tokenizes again
    assert len(data.load_corpus(str(tmp_path / "code.py"), 512, str(tmp_path / "c")).splits["val"]) > 0


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--data", str(tmp_path / "nope"),
                        "--cache_dir", str(tmp_path / "c")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_damaged_cache_is_detected_and_rebuilt(tmp_path):
    """A truncated or altered .bin, or a broken header, is noticed on load and tokenized again."""
    root = str(tmp_path / "corpus")
    make_folder(root, 30)
    cache = str(tmp_path / "cache")
    first = data.load_corpus(root, 512, cache)
    want = {k: np.array(v) for k, v in first.splits.items()}
    folder = first.meta["cache_dir"]
    train_bin = os.path.join(folder, "train.bin")
    n_bytes = os.path.getsize(train_bin)

    def truncate():
        with open(train_bin, "r+b") as f:
            f.truncate(100)

    def flip_a_byte():
        with open(train_bin, "r+b") as f:
            f.seek(n_bytes // 2)
            b = f.read(1)
            f.seek(n_bytes // 2)
            f.write(bytes([b[0] ^ 1]))

    def break_header():
        with open(os.path.join(folder, "meta.json"), "w") as f:
            f.write("{")

    for damage, message in [(truncate, f"train.bin holds 100 bytes, its header says {n_bytes:,}"),
                            (flip_a_byte, "train.bin does not match the checksum in its header"),
                            (break_header, "meta.json is unreadable (JSONDecodeError)")]:
        del first
        damage()
        assert data.cache_damage(folder) == message
        logged = []
        first = data.load_corpus(root, 512, cache, log=logged.append)
        assert logged[0] == f"the cached corpus in {folder} is damaged ({message}): tokenizing again"
        assert all(np.array_equal(first.splits[k], want[k]) for k in want)
        assert data.cache_damage(folder) is None


# -- the split rule, the cache and the files read --------------------------------------------------------------------
def test_val_split_is_the_documented_hash_rule():
    """The validation files are fixed by the rule in is_val_file's docstring, computed here independently: the first
    8 bytes of sha256(relative path), big-endian, over 2^64, below VAL_FRACTION (2%). A change of the rule would move
    files between the splits of every existing corpus."""
    import hashlib
    names = [f"pkg{i % 7}/mod_{i}.py" for i in range(3000)] + ["os.py", "json/__init__.py", "notes21.txt"]
    want = [int(hashlib.sha256(n.encode()).hexdigest()[:16], 16) < 0.02 * 2 ** 64 for n in names]
    assert [data.is_val_file(n) for n in names] == want
    assert 30 < sum(want) < 90 and want[-1]  # about 2% of 3000; notes21.txt is one of them


def test_cache_key_sees_same_size_edits_and_size_changes_under_an_old_mtime(tmp_path, monkeypatch):
    """The cache key holds each file's size and mtime: an edit that keeps the size (a changed character) and an edit
    whose mtime was put back (a copy keeping times, a checkout) both re-tokenize; so does a change of the split rule."""
    root = tmp_path / "corpus"
    root.mkdir()
    f = root / "a.py"
    f.write_text("x = 1\n" * 300)
    tok = data.get_tokenizer(512)
    key = lambda: data.corpus_key("src", *data.user_files(str(root)), tok)  # noqa: E731
    k0 = key()
    st = os.stat(f)
    f.write_text("x = 2\n" * 300)  # the same size, a new mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    k1 = key()
    assert os.path.getsize(f) == st.st_size and k1 != k0
    f.write_text("x = 2\n" * 301)  # another size, the previous mtime
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert key() not in (k0, k1)
    k2 = key()
    monkeypatch.setattr(data, "TAIL_VAL_SHARE", 0.2)
    assert key() != k2


def test_full_vocabulary_is_stored_in_32_bits(tmp_path):
    """With the full cl100k_base (100277 tokens, end-of-text 100257 > 65535) the cached streams are uint32: uint16
    cannot hold the ids above 65535, end-of-text included (numpy 2 raises OverflowError, numpy 1 wrapped them)."""
    path = tmp_path / "one.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 40)
    c = data.load_corpus(str(path), 100277, str(tmp_path / "cache"))
    tok = c.tokenizer
    stream = tok.encode(path.read_text()) + [tok.eot]
    assert tok.eot == 100257 and c.splits["train"].dtype == np.uint32
    assert c.splits["train"].tolist() + c.splits["val"].tolist() == stream


def test_write_atomic_leaves_the_old_file_until_the_new_one_is_complete(tmp_path):
    """A cache file is written beside its place and renamed over it: a write that fails half-way leaves the previous
    file untouched and no partial or temporary file behind."""
    path = str(tmp_path / "train.bin")
    data._write_atomic(path, lambda p: open(p, "wb").write(b"old"))

    def half_then_fail(p):
        with open(p, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        data._write_atomic(path, half_then_fail)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["train.bin"]
    with pytest.raises(OSError):
        data._write_atomic(str(tmp_path / "val.bin"), half_then_fail)
    assert os.listdir(tmp_path) == ["train.bin"]  # nothing at all where there was nothing


def test_hidden_empty_and_nul_files_are_left_out(tmp_path):
    """--data folder: hidden files (not only hidden folders), empty files and files with NUL bytes (UTF-16 text is
    valid UTF-8 byte by byte) are not part of the corpus; each kept file adds its tokens and one end-of-text."""
    root = tmp_path / "corpus"
    make_folder(str(root), 60)
    (root / ".notes.txt").write_text("hidden text\n" * 50)
    (root / "empty.py").write_text("")
    (root / "wide.txt").write_bytes("utf-16 text\n".encode("utf-16-le") * 50)
    assert data.read_text(str(root / "wide.txt")) is None
    _, rels = data.user_files(str(root))
    assert ".notes.txt" not in rels and "empty.py" in rels and "wide.txt" in rels
    c = data.load_corpus(str(root), 512, str(tmp_path / "cache"))
    py = [r for r in rels if r.endswith(".py") and r != "empty.py"]
    assert c.meta["n_files"] == len(py)
    stream = c.splits["train"].tolist() + c.splits["val"].tolist()
    val = [r for r in py if data.is_val_file(r)]
    assert stream == expected_stream(str(root), [r for r in py if r not in val], c.tokenizer) + \
        expected_stream(str(root), val, c.tokenizer)
