"""A chat conversation: history, the model's template, context trimming, /commands, save and load (framework-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmctl import ui
from llmctl.errors import DataError, LlmctlError, TokenizerError
from llmctl.generation import Completion, SamplingParams
from llmctl.tokenizer import Tokenizer

HELP = """\
/help           this list
/reset          forget the conversation (the system prompt stays)
/system TEXT    set the system prompt (/system alone removes it)
/save FILE      write the conversation as JSON ([{"role", "content"}, ...])
/load FILE      continue a conversation saved with /save
/stats          speed of the last answer and how much of the context is used
/exit           leave (or Ctrl-D); Ctrl-C stops an answer"""


class LeaveChat(Exception):
    """Raised by /exit and /quit."""


def read_conversation(path: Path) -> list[dict[str, str]]:
    """A JSON list of {"role", "content"} messages, checked."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist.", hint="Give the path of a file written by /save.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a JSON file: {e}", hint="/load reads what /save writes.") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of messages.")
    for number, message in enumerate(data, 1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise DataError(f'{path}: message {number} is not {{"role": "...", "content": "..."}}: {str(message)[:80]}')
    return [{"role": m["role"], "content": m["content"]} for m in data]


def turn_end(tokenizer: Tokenizer) -> tuple[frozenset[int], tuple[str, ...]]:
    """What the template writes after an answer (e.g. "<|im_end|>"), as a stop id when it is one token, else as text.

    Chat models end a turn with this marker; the tokenizer's EOS ids do not always list it.
    """
    marker = "\x00answer\x00"
    try:
        text = str(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], add_generation_prompt=False))
    except LlmctlError:
        return frozenset(), ()
    after = text.split(marker, 1)[1].strip() if marker in text else ""
    if not after:
        return frozenset(), ()
    ids = tokenizer.encode(after, add_special_tokens=False)
    return (frozenset(ids), ()) if len(ids) == 1 else (frozenset(), (after,))


class ChatSession:
    """Multi-turn history rendered with the model's chat template; the KV cache keeps the shared prefix between turns."""

    def __init__(self, model: Any, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.messages: list[dict[str, str]] = []   # the whole conversation, as /save writes it
        self.start = 0                             # first non-system message still sent to the model
        self.cache = model.new_cache()
        self.last: Completion | None = None
        if system:
            self.messages.append({"role": "system", "content": system})

    @property
    def context(self) -> int:
        return self.model.spec.max_seq_len

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def window(self) -> list[dict[str, str]]:
        """The messages the model sees: the system prompt, then the turns that still fit."""
        head = self.messages[:1] if self.system is not None else []
        return head + self.messages[max(self.start, len(head)) :]

    def prompt(self) -> list[int]:
        """Template ids of the window; the oldest turns are dropped, with a notice, until an answer has room."""
        room = min(self.params.max_tokens, self.context // 4)  # tokens kept free for the answer
        ids = self._render(self.window())
        if len(ids) + room <= self.context:
            return ids
        head = self.messages[:1] if self.system is not None else []
        alone = self._render(head + self.messages[-1:])
        if len(alone) + room > self.context:
            raise LlmctlError(
                f"This message makes a prompt of {len(alone)} tokens; the model's context holds {self.context} "
                f"and {room} are kept for the answer.",
                hint="Send a shorter message.",
            )
        dropped = 0
        while len(ids) + room > self.context and self._drop_oldest_turn():
            ids = self._render(self.window())
            dropped += 1
        if dropped:
            ui.warn(f"the conversation outgrew the model's context ({self.context} tokens): dropped the oldest {dropped} turn(s).")
        return ids

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def _drop_oldest_turn(self) -> bool:
        """Move the window past the oldest user message and its answers; False when only the newest message is left."""
        first = max(self.start, 1 if self.system is not None else 0)
        users = [i for i in range(first, len(self.messages)) if self.messages[i]["role"] == "user"]
        if len(users) < 2:
            return False
        self.start = users[1]
        return True

    def ask(self, text: str) -> Completion:
        """Add a user message; iterate the returned Completion to stream the answer, then call `record`."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.prompt()
        except LlmctlError as e:
            self.messages.pop()  # refused (too long, or the template rejects it): the conversation stays as it was
            if isinstance(e, TokenizerError) and self.system is not None:
                e.hint = f"{e.hint or ''} Some templates take no system prompt: /system alone removes it.".strip()
            raise
        self.last = Completion(self.model, self.tokenizer, prompt, self.params, self.cache)
        return self.last

    def record(self, reply: Completion) -> None:
        """Keep the answer (also a partial one, after Ctrl-C) in the history."""
        if reply.finish_reason == "interrupted":
            self.cache.repair()
        self.messages.append({"role": "assistant", "content": reply.text})

    # --- /commands --------------------------------------------------------------------------------------------------

    def command(self, line: str) -> str:
        """Run a /command; returns the text to show. Raises LeaveChat for /exit."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            raise LeaveChat
        if name in ("/help", "/?"):
            return HELP
        if name == "/reset":
            self.messages = self.messages[:1] if self.system is not None else []
            self.start = 0
            return "Conversation cleared."
        if name == "/system":
            if self.system is not None:
                self.messages.pop(0)
                self.start = max(0, self.start - 1)
            if not arg:
                return "System prompt removed."
            self.messages.insert(0, {"role": "system", "content": arg})
            self.start += 1
            return "System prompt set."
        if name == "/save":
            if not arg:
                return "Usage: /save FILE"
            from llmctl.io.outputs import replacing

            target = Path(arg).expanduser()
            if target.is_dir():
                raise DataError(f"/save {arg}: that is a folder.", hint="Give a file name, e.g. /save chat.json.")
            with replacing(target, parents=False) as staged:  # an unwritable path is an error message; the chat goes on
                staged.write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            return f"Saved {len(self.messages)} messages to {arg}."
        if name == "/load":
            if not arg:
                return "Usage: /load FILE"
            self.messages, self.start = read_conversation(Path(arg).expanduser()), 0
            return f"Loaded {len(self.messages)} messages from {arg}."
        if name == "/stats":
            return self.stats()
        return f"Unknown command {name}; /help lists the commands."

    def stats(self) -> str:
        used = len(self.cache.tokens)
        lines = [f"context: {used} of {self.context} tokens used; {len(self.window())} of {len(self.messages)} messages in view"]
        if self.last is not None:
            s = self.last.stats
            lines.append(
                f"last answer: {s.new_tokens} tokens at {s.decode_tokens_per_s:.1f} tokens/s; first token after "
                f"{s.time_to_first_token * 1e3:.0f} ms ({s.prompt_tokens} prompt tokens, {s.reused_tokens} reused from the cache)"
            )
        return "\n".join(lines)
