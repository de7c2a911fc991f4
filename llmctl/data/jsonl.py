"""JSON Lines input. Every one-record-a-line file llmctl reads (training text, chat and instruction data, preference
pairs, prompts) goes through `records`, so a missing file, a line that is not UTF-8 or not JSON is named the same way
everywhere. The file is streamed line by line: pretraining corpora can be larger than memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.errors import DataError


def records(path: Path, expected: str, replace: bool = False) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed JSON) of each non-blank line. `expected` says what a line holds (in each error's hint);
    `replace` reads bytes that are not UTF-8 as U+FFFD instead of refusing the line (for raw text corpora)."""
    path = Path(path)
    hint = f"Each line of a .jsonl file holds {expected}."
    if not path.is_file():
        raise DataError(f"{path} {'is not a file' if path.exists() else 'does not exist'}.", hint=hint)
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}).", hint=hint) from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8", errors="replace" if replace else "strict")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x}).", hint="Save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}).", hint=hint) from None
