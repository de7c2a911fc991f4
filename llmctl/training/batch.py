"""Example batches (framework-free, numpy): input ids, targets, a loss mask and segment ids, and how rows are packed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100  # target id of a position that has no target (padding); its loss mask is 0 too


@dataclass
class TopK:
    """A teacher's K most likely next tokens at each position, their log-probabilities and the log of the mass left
    to the rest of the vocabulary (what distillation needs of a teacher when it is cached instead of run)."""

    ids: np.ndarray        # (..., K) int32
    logprobs: np.ndarray   # (..., K) float32
    rest: np.ndarray       # (...,) float32; a very negative number (never -inf) when K covers the vocabulary

    def take(self, rows: np.ndarray | list[int] | slice) -> TopK:
        # copies: the cache is a read-only memory map, and a batch is handed to frameworks that may write
        return TopK(np.array(self.ids[rows]), np.array(self.logprobs[rows]), np.array(self.rest[rows]))


@dataclass
class Batch:
    """Rows of tokens with what to predict at each position.

    `targets[b, t]` is the token to predict after `input_ids[b, : t + 1]`; `loss_mask` (float32) weights each
    position's loss (0 where nothing is predicted: prompts, padding); `segment_ids` numbers the examples packed into
    a row (1, 2, ...; 0 is padding): attention never crosses from one segment into another and positions restart at
    each. None means one segment per row (pretraining: documents run into each other as in the token stream).
    """

    input_ids: np.ndarray            # (B, T) int64
    targets: np.ndarray              # (B, T) int64
    loss_mask: np.ndarray            # (B, T) float32
    segment_ids: np.ndarray | None = None  # (B, T) int32
    topk: TopK | None = None         # the teacher's cached top-K at each position (distillation), (B, T, K)
    extras: dict[str, np.ndarray] | None = None  # per-row values an objective needs beside the tokens, each (B,)

    @classmethod
    def from_windows(cls, windows: np.ndarray) -> Batch:
        """Next-token prediction on token windows (B, T + 1): every position has a target, one segment per row."""
        windows = np.asarray(windows, dtype=np.int64)
        return cls(windows[:, :-1], windows[:, 1:], np.ones(windows[:, 1:].shape, np.float32))

    @property
    def rows(self) -> int:
        return len(self.input_ids)

    @property
    def target_count(self) -> int:
        """Positions that count in the loss (what the loss of a step is divided by)."""
        return int(np.count_nonzero(self.loss_mask))

    def positions(self) -> np.ndarray | None:
        """Position of each token inside its segment, (B, T) int64; None for one segment per row (0..T-1)."""
        if self.segment_ids is None:
            return None
        seg = self.segment_ids
        start = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        idx = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
        first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
        return (idx - first).astype(np.int64)

    def slice(self, start: int, stop: int) -> Batch:
        return self.take(slice(start, stop))

    def take(self, rows: np.ndarray | list[int] | slice) -> Batch:
        """The chosen rows (a slice or row indices)."""
        seg = None if self.segment_ids is None else self.segment_ids[rows]
        topk = None if self.topk is None else self.topk.take(rows)
        extras = None if self.extras is None else {k: v[rows] for k, v in self.extras.items()}
        return Batch(self.input_ids[rows], self.targets[rows], self.loss_mask[rows], seg, topk, extras)


def pack(examples: Sequence[tuple[Sequence[int], Sequence[float]]], seq_len: int, pad_id: int = 0) -> Batch:
    """Pack examples (tokens, per-token loss weights of predicting each next token) into rows of `seq_len`.

    An example of n tokens predicts n - 1 of them (weights[i] weighs predicting tokens[i + 1]; len(weights) == n - 1);
    examples are placed first-fit in order, each whole in one row; an example longer than seq_len + 1 tokens is cut.
    """
    rows: list[list[tuple[list[int], list[float]]]] = []
    room: list[int] = []
    for tokens, weights in examples:
        tokens, weights = list(tokens)[: seq_len + 1], list(weights)[:seq_len]
        n = len(tokens) - 1  # positions this example fills
        if n < 1:
            continue
        for i, free in enumerate(room):
            if free >= n:
                rows[i].append((tokens, weights))
                room[i] -= n
                break
        else:
            rows.append([(tokens, weights)])
            room.append(seq_len - n)
    B = len(rows)
    ids = np.full((B, seq_len), pad_id, np.int64)
    targets = np.full((B, seq_len), IGNORE, np.int64)
    mask = np.zeros((B, seq_len), np.float32)
    seg = np.zeros((B, seq_len), np.int32)
    for b, row in enumerate(rows):
        at = 0
        for s, (tokens, weights) in enumerate(row, 1):
            n = len(tokens) - 1
            ids[b, at : at + n] = tokens[:-1]
            targets[b, at : at + n] = tokens[1:]
            mask[b, at : at + n] = weights
            seg[b, at : at + n] = s
            at += n
    return Batch(ids, targets, mask, seg)
