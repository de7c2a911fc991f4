"""Preference data for `llmctl align`: records to tokenized prompts and responses, and the batches the objectives read.

One record a line (JSONL):
  {"prompt", "chosen", "rejected"}        a pair (optional "margin" for a reward model); the prompt is plain text
                                          (chosen and rejected appended as they are, then the end-of-text token) or
                                          chat messages (chosen and rejected a reply string or a list of assistant
                                          messages, rendered by the model's chat template)
  {"prompt", "completion", "label"}       one unpaired example for KTO (label true: desirable)

Rows are prompt + response; the loss mask covers the response's trained tokens (a reply and its end-of-turn text).
A prompt too long for data.seq_len is cut from the left; a pair whose response alone does not fit is skipped and
counted, and so is a pair whose chosen and rejected are identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.data import jsonl
from llmctl.data.chat import ChatEncoder, assistant_spans, span_mask, to_messages
from llmctl.errors import DataError
from llmctl.training.batch import IGNORE, Batch

FORMATS = '{"prompt", "chosen", "rejected"} or, for KTO, {"prompt", "completion", "label"}'


@dataclass
class Response:
    """A prompt's tokens and one response's tokens, with the weight of each response token in the loss."""

    prompt: list[int]
    response: list[int]
    weights: list[float]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.response


@dataclass
class Example:
    """A pair (`rejected` set) or an unpaired KTO example (`label`); `margin`: a reward model's wanted score gap."""

    chosen: Response
    rejected: Response | None = None
    label: bool = True
    margin: float = 0.0


@dataclass
class Counts:
    examples: int = 0
    identical: int = 0      # chosen == rejected: nothing to prefer, skipped
    too_long: int = 0       # a response longer than data.seq_len, skipped
    cut_prompts: int = 0    # sequences whose prompt was cut from the left to fit


class PreferenceEncoder:
    """Records to `Example`s with a tokenizer and its chat template (ChatML by default)."""

    def __init__(self, tokenizer: Any, seq_len: int) -> None:
        self.tokenizer, self.seq_len, self.chat = tokenizer, seq_len, ChatEncoder(tokenizer)

    def response(self, prompt: str | list[dict[str, str]], reply: Any, where: str, key: str) -> Response:
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not isinstance(reply, str):
                raise DataError(f"{where}: \"{key}\" must be a string when the prompt is plain text.")
            enc = tok.backend.encode(prompt + reply, add_special_tokens=True)
            ids, trained = list(enc.ids), span_mask(enc.offsets, [(len(prompt), len(prompt) + len(reply))])
            if tok.eos_id is not None:
                ids, trained = ids + [tok.eos_id], trained + [1.0]
        else:
            replies = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
            if not isinstance(replies, list) or not replies or not all(
                    isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) for m in replies):
                raise DataError(f"{where}: \"{key}\" must be a string or a list of assistant messages.")
            messages = to_messages({"messages": prompt + replies}, where)
            text, spans = assistant_spans(self.chat.render, messages)
            spans = spans[sum(m["role"] == "assistant" for m in prompt):]  # the replies only, not earlier turns
            enc = tok.backend.encode(text, add_special_tokens=False)
            ids, trained = list(enc.ids), span_mask(enc.offsets, spans)
        marked = [i for i, w in enumerate(trained) if w]
        if not marked:
            raise DataError(f"{where}: \"{key}\" has no tokens.")
        first, last = max(marked[0], 1), marked[-1] + 1  # the first token is predicted from at least one before it
        return Response(ids[:first], ids[first:last], trained[first:last])

    def fit(self, r: Response, counts: Counts) -> Response | None:
        """The response whole with as much of the prompt's end as fits (seq_len + 1 tokens), or None."""
        room = self.seq_len + 1 - len(r.response)
        if room < 1:
            return None
        if len(r.prompt) <= room:
            return r
        counts.cut_prompts += 1
        return Response(r.prompt[-room:], r.response, r.weights)

    def encode(self, record: Any, where: str, counts: Counts) -> list[Example]:
        """The examples of one record: one pair, or one KTO example; [] when it is skipped (and counted)."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record is a JSON object, not {type(record).__name__}; expected {FORMATS}.")
        unpaired = "completion" in record or "label" in record
        keys = ("prompt", "completion", "label") if unpaired else ("prompt", "chosen", "rejected")
        missing = [k for k in keys if k not in record]
        if missing:
            raise DataError(f"{where}: missing {', '.join(repr(k) for k in missing)}; expected {FORMATS}.")
        prompt = record["prompt"]
        if isinstance(prompt, list):
            to_messages({"messages": prompt + [{"role": "assistant", "content": ""}]}, where)  # checks roles and fields
        elif not isinstance(prompt, str):
            raise DataError(f"{where}: \"prompt\" must be a string or a list of messages.")
        if unpaired:
            if not isinstance(record["label"], bool):
                raise DataError(f"{where}: \"label\" must be true or false.")
            r = self.fit(self.response(prompt, record["completion"], where, "completion"), counts)
            return self._kept([Example(r, label=record["label"])] if r else [], counts, r is None)
        if record["chosen"] == record["rejected"]:
            counts.identical += 1
            return []
        margin = record.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise DataError(f"{where}: \"margin\" must be a number.")
        c = self.fit(self.response(prompt, record["chosen"], where, "chosen"), counts)
        r = self.fit(self.response(prompt, record["rejected"], where, "rejected"), counts)
        fits = c is not None and r is not None
        return self._kept([Example(c, r, margin=float(margin))] if fits else [], counts, not fits)

    def _kept(self, out: list[Example], counts: Counts, too_long: bool) -> list[Example]:
        counts.too_long += too_long
        counts.examples += len(out)
        return out


def encode_files(files: Sequence[Path], encoder: PreferenceEncoder, counts: Counts) -> list[Example]:
    return [ex for path in files for where, record in jsonl.records(path, f"one of {FORMATS}") for ex in encoder.encode(record, where, counts)]


def unpair(examples: Sequence[Example]) -> list[Example]:
    """Pairs as KTO's unpaired examples (chosen desirable, rejected not), as TRL converts them; KTO ones as they are."""
    out = []
    for ex in examples:
        out += [Example(ex.chosen, label=True), Example(ex.rejected, label=False)] if ex.rejected else [ex]
    return out


# --- rows ----------------------------------------------------------------------------------------------------------


def policy_rows(responses: Sequence[Response], pad_id: int) -> Batch:
    """Rows of prompt + response padded to the longest; the mask weighs predicting each response token."""
    T = max(len(r.tokens) for r in responses) - 1
    ids = np.full((len(responses), T), pad_id, np.int64)
    targets = np.full((len(responses), T), IGNORE, np.int64)
    mask = np.zeros((len(responses), T), np.float32)
    for b, r in enumerate(responses):
        tokens = r.tokens
        n = len(tokens) - 1
        ids[b, :n], targets[b, :n] = tokens[:-1], tokens[1:]
        mask[b, len(r.prompt) - 1 : n] = r.weights  # position t predicts token t + 1
    return Batch(ids, targets, mask)


def score_rows(responses: Sequence[Response], pad_id: int) -> Batch:
    """Whole sequences for a reward model; the mask marks the position scored: the last one that is not the padding
    token (as transformers' *ForSequenceClassification picks it)."""
    T = max(len(r.tokens) for r in responses)
    ids = np.full((len(responses), T), pad_id, np.int64)
    mask = np.zeros((len(responses), T), np.float32)
    for b, r in enumerate(responses):
        tokens = r.tokens
        ids[b, : len(tokens)] = tokens
        real = [i for i, t in enumerate(tokens) if t != pad_id]
        mask[b, real[-1] if real else len(tokens) - 1] = 1.0
    return Batch(ids, np.full(ids.shape, IGNORE, np.int64), mask)


def kl_partner(examples: Sequence[Example], i: int) -> Response:
    """KTO's mismatched row for example i: its prompt with the next example's completion (the batch KL estimate)."""
    other = examples[(i + 1) % len(examples)].chosen
    return Response(examples[i].chosen.prompt, other.response, other.weights)


@dataclass
class Rows:
    """How examples become rows for one method: pairs (chosen rows, then rejected rows), KTO (examples, then their
    mismatched rows) or reward (whole sequences, scored at the end)."""

    kind: str                    # "pairs", "kto" or "reward"
    pad_id: int
    seq_len: int

    def responses(self, examples: Sequence[Example], index: Sequence[int]) -> list[Response]:
        if self.kind == "kto":
            items = [examples[i] for i in index]
            return [ex.chosen for ex in items] + [self._fit(kl_partner(examples, i)) for i in index]
        return [examples[i].chosen for i in index] + [examples[i].rejected for i in index]

    def _fit(self, r: Response) -> Response:
        room = self.seq_len + 1 - len(r.response)
        return Response(r.prompt[-max(room, 1):], r.response[: self.seq_len], r.weights[: self.seq_len])

    def batch(self, examples: Sequence[Example], index: Sequence[int], ref: np.ndarray | None = None) -> Batch:
        """Rows of the examples at `index`; `ref` (N, 2): precomputed reference log-probabilities of each example's
        two rows (chosen and rejected, or the example and its mismatched row)."""
        responses = self.responses(examples, index)
        out = (score_rows if self.kind == "reward" else policy_rows)(responses, self.pad_id)
        extras: dict[str, np.ndarray] = {}
        if self.kind == "kto":
            labels = [float(examples[i].label) for i in index]
            extras["label"] = np.array(labels + [-1.0] * len(index), np.float32)
        if self.kind == "reward":
            extras["margin"] = np.array([examples[i].margin for i in index] * 2, np.float32)
        if ref is not None:
            extras["ref_logps"] = np.concatenate([ref[list(index), 0], ref[list(index), 1]]).astype(np.float32)
        out.extras = extras or None
        return out


@dataclass
class PreferenceBatches:
    """The batch source of `align`: `batch_size` examples a step, each epoch in a fresh order fixed by (seed, epoch)."""

    rows: Rows
    train: list[Example]
    val: list[Example]
    batch_size: int
    seed: int
    eval_batches: int
    train_ref: np.ndarray | None = None
    val_ref: np.ndarray | None = None
    _order: dict[int, np.ndarray] = field(default_factory=dict)

    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.train) // self.batch_size))

    def _index(self, i: int) -> int:
        epoch, at = divmod(i, len(self.train))
        if epoch not in self._order:
            self._order = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.train))}
        return int(self._order[epoch][at])

    def batch(self, step: int, part: int, parts: int) -> Batch:
        n = self.batch_size // parts
        first = step * self.batch_size + part * n
        return self.rows.batch(self.train, [self._index(first + i) for i in range(n)], self.train_ref)

    def val_batches(self, rows: int) -> Iterator[Batch]:
        n = max(1, rows // 2)
        for start in range(0, min(len(self.val), n * self.eval_batches), n):
            yield self.rows.batch(self.val, list(range(start, min(start + n, len(self.val)))), self.val_ref)
