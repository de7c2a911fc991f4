"""Chat and instruction data for fine-tuning: records to conversations, conversations to tokens with exact loss masks.

One record a line (JSONL), in any of four formats:
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   chat, several turns
  {"prompt": ..., "completion": ...}                                          one exchange
  {"instruction": ..., "input": ..., "output": ...}                           Alpaca style ("input" may be empty)
  {"text": ...}                                                              plain text, every token trained

The conversation goes through the model's chat template (a tokenizer without one gets the ChatML default). The loss
covers every assistant reply and the template's end-of-turn text after it (so the model learns to stop); system text,
prompts and role headers are masked (unless `train_on_prompt`). The spans are found by rendering the conversation up
to each assistant turn, so templates without markers for assistant spans still get exact masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.data import jsonl
from llmctl.errors import DataError, TokenizerError
from llmctl.training.batch import Batch, pack

FORMATS = '{"messages": [...]}, {"prompt", "completion"}, {"instruction", "input", "output"} or {"text"}'


@dataclass
class Example:
    """Tokens of one example and, per token, whether it is trained (1.0: the model learns to produce it)."""

    tokens: list[int]
    trained: list[float]

    def weights(self) -> list[float]:
        """Weights of predicting tokens[1:] (what `pack` takes)."""
        return self.trained[1:]


def to_messages(record: Any, where: str) -> list[dict[str, str]] | str:
    """A record as a conversation (list of messages) or as plain text (str); DataError naming `where` otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record is a JSON object, not {type(record).__name__}; expected {FORMATS}.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects.")
        out = []
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} needs a string \"role\" and a string \"content\".")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: message {i} has role {m['role']!r}; expected system, user or assistant.")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn from.")
        return out
    if "prompt" in record and "completion" in record:
        _strings(record, where, "prompt", "completion")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if "instruction" in record and "output" in record:
        _strings(record, where, "instruction", "output")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: \"input\" must be a string.")
        prompt = record["instruction"] + ("\n\n" + extra if extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if "text" in record:
        _strings(record, where, "text")
        return record["text"]
    raise DataError(f"{where}: a record with keys {sorted(record)[:6]} is in none of the formats; expected {FORMATS}.")


def _strings(record: dict, where: str, *keys: str) -> None:
    for key in keys:
        if not isinstance(record[key], str):
            raise DataError(f"{where}: \"{key}\" must be a string, not {type(record[key]).__name__}.")


def read_records(path: Path) -> Iterator[tuple[str, list[dict[str, str]] | str]]:
    """(file:line, conversation or text) of each non-blank line of a JSONL file."""
    for where, record in jsonl.records(path, f"one of {FORMATS}"):
        yield where, to_messages(record, where)


def assistant_spans(template_render: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply with its end-of-turn text.

    `template_render(messages, add_generation_prompt)` renders. A reply's span runs from its content (after the role
    header) to the end of what its turn adds, trailing whitespace excluded: the end-of-turn token stays in.
    """
    text = template_render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template_render(messages[:i], True) if i else ""
        through = template_render(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise TokenizerError(
                "the chat template renders a conversation differently from its beginning, so the assistant replies "
                "cannot be located for the loss mask.",
                hint="Use a chat template whose output for a conversation begins with its output for the earlier turns.",
            )
        content = m["content"].strip()
        start = through.find(content, len(before)) if content else -1
        start = start if start >= 0 else len(before)
        end = len(through.rstrip())
        spans.append((start, max(start, end)))
    return text, spans


def add_template_tokens(tokenizer: Any) -> list[int]:
    """Add to a tokenizer without a chat template the ChatML markers it lacks (the default template's turns begin and
    end with them; as text they would be several pieces the model must learn to read as one); their ids. The end
    marker becomes an end-of-text id, so generation stops at the end of a turn."""
    from llmctl.tokenizer import IM_END, IM_START

    if tokenizer.chat_template:
        return []
    missing = [t for t in (IM_START, IM_END) if tokenizer.token_to_id(t) is None]
    if not missing:
        return []
    ids = tokenizer.add_special_tokens(missing)
    tokenizer.eos_token_ids.add(tokenizer.token_to_id(IM_END))
    return ids


class ChatEncoder:
    """Conversations and text to `Example`s with a tokenizer and its chat template (ChatML by default)."""

    def __init__(self, tokenizer: Any, train_on_prompt: bool = False) -> None:
        from llmctl.chat_template import DEFAULT_CHAT_TEMPLATE

        self.tokenizer, self.train_on_prompt = tokenizer, train_on_prompt
        self.template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from llmctl.chat_template import render_chat

        tok = self.tokenizer
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")

    def encode(self, item: list[dict[str, str]] | str) -> Example:
        tok = self.tokenizer
        if isinstance(item, str):
            ids = tok.encode(item, add_special_tokens=True)
            if tok.eos_id is not None:
                ids = ids + [tok.eos_id]
            return Example(ids, [1.0] * len(ids))
        text, spans = assistant_spans(self.render, item)
        enc = tok.backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if self.train_on_prompt:
            return Example(ids, [1.0] * len(ids))
        return Example(ids, span_mask(offsets, spans))


def span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[float]:
    """1.0 for each token whose characters overlap one of `spans`, else 0.0."""
    out = [0.0] * len(offsets)
    for i, (a, b) in enumerate(offsets):
        if b > a and any(a < end and b > start for start, end in spans):
            out[i] = 1.0
    return out


@dataclass
class ChatData:
    """Tokenized examples of the training and validation files, packed into rows of seq_len tokens."""

    train: Batch
    val: Batch
    examples: int = 0
    truncated: int = 0            # examples longer than the row, cut (counted, and reported)
    skipped: int = 0              # examples with no trained token left after the cut
    target_tokens: int = 0
    sources: list[str] = field(default_factory=list)


def encode_files(files: Sequence[Path], encoder: ChatEncoder, seq_len: int) -> tuple[list[Example], int, int]:
    """Examples of every file (in order), the number truncated to seq_len + 1 tokens and the number left with nothing to learn."""
    out, truncated, skipped = [], 0, 0
    for path in files:
        for _, item in read_records(path):
            ex = encoder.encode(item)
            if len(ex.tokens) > seq_len + 1:
                truncated += 1
                ex = Example(ex.tokens[: seq_len + 1], ex.trained[: seq_len + 1])
            if not any(ex.weights()):
                skipped += 1
                continue
            out.append(ex)
    return out, truncated, skipped


def pack_examples(examples: Sequence[Example], seq_len: int, seed: int, pad_id: int = 0) -> Batch:
    """Examples shuffled with `seed`, packed first-fit into rows (attention stays inside each example)."""
    order = np.random.default_rng(seed).permutation(len(examples)) if seed >= 0 else np.arange(len(examples))
    return pack([(examples[i].tokens, examples[i].weights()) for i in order], seq_len, pad_id)


class PackedBatches:
    """The batch source of fine-tuning: packed rows, each epoch in a fresh order that depends only on (seed, epoch)."""

    def __init__(self, train: Batch, val: Batch, batch_size: int, seed: int, eval_batches: int) -> None:
        self.train, self.val, self.batch_size, self.seed, self.eval_batches = train, val, batch_size, seed, eval_batches

    def steps_per_epoch(self) -> int:
        return max(1, -(-self.train.rows // self.batch_size))

    def _row(self, index: int) -> int:
        epoch, at = divmod(index, self.train.rows)
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.train.rows)
        return int(self._order[at])

    def batch(self, step: int, part: int, parts: int) -> Batch:
        rows = self.batch_size // parts
        first = step * self.batch_size + part * rows
        return self.train.take([self._row(first + i) for i in range(rows)])

    def val_batches(self, rows: int) -> Iterator[Batch]:
        for i in range(0, min(self.val.rows, rows * self.eval_batches), rows):
            yield self.val.slice(i, i + rows)
