"""Calibration data for AWQ and GPTQ: windows of token ids cut from a text file or the built-in default corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmctl import ui
from llmctl.data.text import TEXT_SUFFIXES, default_corpus, expand_sources, tokenize_files
from llmctl.errors import DataError

DEFAULT_SAMPLES = 128  # windows, as in the AWQ and GPTQ papers
DEFAULT_SEQ_LEN = 512  # tokens per window
BYTES_PER_TOKEN = 8  # generous: the default corpus is read until it surely holds enough tokens


def calibration_files(n_tokens: int, seed: int) -> list[Path]:
    """A seeded sample of the standard library's sources, just large enough for `n_tokens` tokens."""
    files = default_corpus()
    order = np.random.default_rng(seed).permutation(len(files))
    chosen, size = [], 0
    for index in order:
        chosen.append(files[index])
        size += files[index].stat().st_size
        if size >= n_tokens * BYTES_PER_TOKEN:
            break
    return sorted(chosen)


def calibration_tokens(
    tokenizer: Any,
    path: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> np.ndarray:
    """(n, seq_len) int64 windows of `path` (a text file, .jsonl with "text", or a folder) tokenized by `tokenizer`.

    Without `path` the text is the Python standard library's own sources. Windows do not overlap and are
    drawn at seeded random places; a text too short for `n_samples` windows gives as many as it holds.
    """
    if n_samples < 1 or seq_len < 2:
        raise DataError(
            f"calibration needs at least 1 window of at least 2 tokens, asked for {n_samples} of {seq_len}.",
            hint="Pass a positive number of samples and a sequence length of 2 or more.",
        )
    if path is None:
        files = calibration_files(n_samples * seq_len, seed)
        name = "the default calibration corpus (Python's standard library)"
    else:
        if not Path(path).expanduser().exists():
            raise DataError(
                f"calibration data {path}: no such file or folder.",
                hint=f"Pass a text file ({', '.join(TEXT_SUFFIXES)}) or leave --calib out to use the built-in default.",
            )
        files = expand_sources([str(path)], key="--calib")
        name = str(path)
    stream = tokenize_files(files, tokenizer, key="--calib")
    n_windows = len(stream) // seq_len
    if n_windows == 0:
        raise DataError(
            f"{name} holds {len(stream)} tokens, fewer than one calibration window of {seq_len}.",
            hint="Use a longer text, or a shorter calibration sequence length.",
        )
    if n_windows < n_samples:
        ui.warn(f"{name} holds {n_windows} windows of {seq_len} tokens; calibrating on those instead of {n_samples}.")
    picked = np.sort(np.random.default_rng(seed).choice(n_windows, size=min(n_samples, n_windows), replace=False))
    index = picked[:, None] * seq_len + np.arange(seq_len)  # (n, seq_len)
    return np.asarray(stream[index], dtype=np.int64)
