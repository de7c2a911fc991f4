"""Pretraining text: find files, tokenize once into cached memory-mapped token files, serve batches by step."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmctl import ui
from llmctl.data import jsonl
from llmctl.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")


def cache_dir() -> Path:
    """Where token files are cached: $LLMCTL_CACHE, else ~/.cache/llmctl."""
    root = os.environ.get("LLMCTL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "llmctl"
    return Path(root).expanduser()


def default_corpus() -> list[Path]:
    """A corpus every machine has: the Python standard library's own source files (a few MB of text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:
        raise DataError(f"no Python sources found in {stdlib} for the default corpus.", hint="Set data.train=PATH.")
    return files


def expand_sources(sources: list[str], key: str = "data.train") -> list[Path]:
    """Files, folders (searched recursively for text files) and globs, in a stable order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if any(ch in source for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
            if not matches:
                raise DataError(f"{key}={source}: the pattern matches no file.")
            files += [m for m in matches if m.is_file()]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{key}={source}: the folder holds no {', '.join(TEXT_SUFFIXES)} files.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{key}={source}: no such file or folder.")
    return files


def read_documents(path: Path) -> Iterator[str]:
    """A .jsonl yields the `text` field of each line; any other file is one document."""
    if path.suffix != ".jsonl":
        try:
            yield path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror}).") from None
        return
    for where, record in jsonl.records(path, '{"text": ...}', replace=True):
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{where}: "text" is missing (each line needs {{"text": ...}}).')
        if not isinstance(record["text"], str):
            raise DataError(f'{where}: "text" must be a string, found {type(record["text"]).__name__}.')
        yield record["text"]


def _fingerprint(files: list[Path], tokenizer_json: str) -> str:
    h = hashlib.sha256(tokenizer_json.encode())
    for path in files:
        h.update(str(path.resolve()).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:24]


def tokenize_files(files: list[Path], tokenizer, key: str = "data.train") -> np.ndarray:
    """All documents as one token stream, EOS after each, cached by content and tokenizer (memory-mapped)."""
    fingerprint = _fingerprint(files, tokenizer.backend.to_str())
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path = cache_dir() / "tokens" / f"{fingerprint}.{np.dtype(dtype).name}"
    if path.is_file():
        return np.memmap(path, dtype=dtype, mode="r")
    eos = tokenizer.eos_id
    chunks: list[np.ndarray] = []
    with ui.progress(len(files), "tokenize", log_every=max(1, len(files) // 5)) as bar:
        for file in files:
            docs = [d for d in read_documents(file) if d]
            # encode_batch runs on all cores inside the tokenizers library.
            for ids in tokenizer.encode_batch(docs, add_special_tokens=False):
                chunks.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype))
            bar.update(1)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    if tokens.size == 0:
        raise DataError(f"{key}: the corpus ({len(files)} file(s), first {files[0] if files else '-'}) holds no text.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tokens.tofile(tmp)
    os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class TokenData:
    """Train and validation token streams and how batches are cut from them."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int

    def __post_init__(self) -> None:
        for name, stream in (("training", self.train), ("validation", self.val)):
            if len(stream) < self.seq_len + 2:
                raise DataError(
                    f"the {name} split has {len(stream)} tokens, fewer than one sequence of data.seq_len={self.seq_len} (+1).",
                    hint="Use more text, a smaller data.seq_len, or a smaller data.val_fraction.",
                )

    def batch(self, step: int, rows: int, seed: int, first_row: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Rows [first_row, first_row + n_rows) of the global batch of `rows` windows for `step`: (n, seq_len + 1).

        Offsets depend only on (seed, step), so the data position of a run is its step number and
        every process of a distributed run cuts its slice of the same global batch.
        """
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=rows)
        n = rows if n_rows is None else n_rows
        idx = starts[first_row : first_row + n, None] + np.arange(self.seq_len + 1)
        return np.asarray(self.train[idx], dtype=np.int64)

    def val_batches(self, rows: int, max_batches: int) -> Iterator[np.ndarray]:
        """Consecutive non-overlapping windows from the start of the validation split (the same every time)."""
        n_windows = (len(self.val) - 1) // self.seq_len
        count = min(max_batches * rows, n_windows)
        for first in range(0, count, rows):
            idx = (np.arange(first, min(first + rows, count))[:, None] * self.seq_len) + np.arange(self.seq_len + 1)
            yield np.asarray(self.val[idx], dtype=np.int64)


def split(tokens: np.ndarray, val_fraction: float, seq_len: int) -> TokenData:
    """Hold out the last `val_fraction` of the stream (at least two sequences) for validation."""
    n_val = max(int(len(tokens) * val_fraction), 2 * seq_len + 2)
    if n_val >= len(tokens):
        raise DataError(
            f"the corpus has {len(tokens)} tokens: too few to hold out validation data at data.seq_len={seq_len}.",
            hint="Use more text or a smaller data.seq_len.",
        )
    return TokenData(tokens[:-n_val], tokens[-n_val:], seq_len)
