"""Perplexity, bits per byte, and KL divergence to a base model, over windows of one token stream (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Logits = Callable[[list[list[int]]], np.ndarray]  # equal-length token rows -> float32 (B, T, V)


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, length, skip) per window: inputs ids[start : start + length] predict ids[start + 1 : start + length + 1],
    of which the first `skip` were scored by an earlier window. Every token but the first is scored exactly once;
    stride == seq_len gives non-overlapping windows, a smaller stride gives each scored token more context."""
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need 1 <= stride <= seq_len, got stride {stride} and seq_len {seq_len}")
    out, scored, start = [], 0, 0  # `scored`: targets 1..scored are done
    while scored < n_tokens - 1:
        length = min(seq_len, n_tokens - 1 - start)
        out.append((start, length, max(0, scored - start)))
        scored = start + length
        start += stride
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@dataclass
class Totals:
    """Running sums over the scored tokens; `kl` keeps every token's KL(base || model) for its percentiles."""

    tokens: int = 0
    nll: float = 0.0  # nats
    base_nll: float = 0.0
    agree: int = 0
    kl: list[np.ndarray] = field(default_factory=list)

    def add(self, lp: np.ndarray, targets: np.ndarray, base_lp: np.ndarray | None) -> None:
        """lp, base_lp: (N, V) log-probabilities at N scored positions; targets (N,)."""
        rows = np.arange(len(targets))
        self.tokens += len(targets)
        self.nll -= float(lp[rows, targets].astype(np.float64).sum())
        if base_lp is not None:
            self.base_nll -= float(base_lp[rows, targets].astype(np.float64).sum())
            self.agree += int((lp.argmax(-1) == base_lp.argmax(-1)).sum())
            self.kl.append((np.exp(base_lp) * (base_lp - lp)).sum(-1).astype(np.float64))


def score(
    model: Logits,
    ids: list[int],
    seq_len: int,
    stride: int,
    batch_size: int,
    base: Logits | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Totals:
    """Run the model (and the base) on every window of `ids`; on_batch(number of windows) after each batch."""
    plan = windows(len(ids), seq_len, stride)
    stream = np.asarray(ids, dtype=np.int64)
    totals = Totals()
    # Windows of one length run together (all but the last one or few are full length).
    for length in sorted({length for _, length, _ in plan}, reverse=True):
        same = [(start, skip) for start, size, skip in plan if size == length]
        for first in range(0, len(same), batch_size):
            batch = same[first : first + batch_size]
            rows = [stream[start : start + length].tolist() for start, _ in batch]
            logits = model(rows)
            base_logits = base(rows) if base is not None else None
            for row, (start, skip) in enumerate(batch):
                targets = stream[start + 1 + skip : start + 1 + length]
                lp = log_softmax(logits[row, skip:])
                base_lp = log_softmax(base_logits[row, skip:]) if base_logits is not None else None
                totals.add(lp, targets, base_lp)
            if on_batch is not None:
                on_batch(len(batch))
    return totals


def summary(totals: Totals, n_bytes: int) -> dict[str, float | int]:
    """Perplexity and bits per byte; with a base, its perplexity, KL statistics and the top-1 agreement."""
    n = max(totals.tokens, 1)
    out: dict[str, float | int] = {
        "tokens": totals.tokens,
        "bytes": n_bytes,
        "nll": totals.nll / n,
        "perplexity": math.exp(totals.nll / n),
        "bits_per_byte": totals.nll / math.log(2) / max(n_bytes, 1),
    }
    if totals.kl:
        kl = np.concatenate(totals.kl)
        out |= {
            "base_perplexity": math.exp(totals.base_nll / n),
            "ln_ppl_ratio": (totals.nll - totals.base_nll) / n,
            "kl_mean": float(kl.mean()),
            "kl_stderr": float(kl.std(ddof=1) / math.sqrt(len(kl))) if len(kl) > 1 else 0.0,
            "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "top1_agreement": totals.agree / n,
        }
    return out
