"""`llmctl chat`: a terminal chat that streams answers; reads one message per line when stdin is not a terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.backends import Backend
from llmctl.commands.generate import (
    BackendOpt, DType, DTypeOpt, MaxTokens, MinP, ModelOpt, RepetitionPenalty, Seed, Stop, Temperature, TopK, TopP, check_flags, sampling_params,
)

PROMPT = "\001\033[1;32m\002>>> \001\033[0m\002"  # \001/\002 tell readline the colour codes take no room
MORE = "... "
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9}  # when neither flags nor generation_config.json say


def _note(text: str) -> None:
    """A dim line on stderr, without rich's highlighting of paths and numbers."""
    from llmctl import ui

    ui.console.print(f"[dim]{text}[/]", highlight=False)


def _history_file() -> Path:
    from llmctl.data.text import cache_dir

    return cache_dir() / "chat_history"


def _start_readline() -> Any:
    """Line editing and up/down history kept across sessions; returns a function that saves the history."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return lambda: None
    path = _history_file()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def _read_message(interactive: bool) -> str:
    """One message: a line; at a terminal also a line ending in \\ continued, or a block between \"\"\" lines."""
    if not interactive:
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline().encode("utf-8", "surrogateescape")
        if not raw:
            raise EOFError
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            from llmctl.errors import DataError

            raise DataError(f"stdin: byte {e.start} of this line ({raw[e.start]:#04x}) is not UTF-8 text; the line is skipped.") from None
        return line.rstrip("\r\n")
    line = input(PROMPT)
    if line.strip() == '"""':
        lines = []
        while (more := input(MORE)).strip() != '"""':
            lines.append(more)
        return "\n".join(lines)
    while line.endswith("\\"):
        line = line[:-1] + "\n" + input(MORE)
    return line


def _lines_used(text: str, width: int) -> int:
    from rich.cells import cell_len

    return sum(max(1, -(-cell_len(line) // width)) for line in text.split("\n"))


def _answer(session: Any, text: str, out: Any, markdown: bool) -> None:
    """Stream one answer to stdout; at a terminal, redraw it as Markdown once complete (if it still fits on screen)."""
    from llmctl import ui

    reply = session.ask(text)
    pieces = iter(reply)
    try:
        for piece in pieces:
            out.file.write(piece)
            out.file.flush()
    except KeyboardInterrupt:
        pieces.close()
        reply.finish_reason = "interrupted"
    finally:
        session.record(reply)
    shown = reply.text
    if markdown and shown.strip() and _lines_used(shown, out.width) < out.height:
        from rich.markdown import Markdown

        up = _lines_used(shown, out.width) - 1
        out.file.write((f"\033[{up}A" if up else "") + "\r\033[J")  # back to where the answer began, then clear
        out.print(Markdown(shown))
    else:
        out.file.write("\n")
        out.file.flush()
    if reply.finish_reason == "interrupted":
        _note("(stopped)")
    elif reply.finish_reason == "context":
        ui.warn("the answer filled the model's context and was cut; /reset starts afresh.")


def chat(
    model: ModelOpt = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="LoRA adapter folder (PEFT layout, or a finetune-lora run) on --model.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    stop: Stop = None,
    plain: Annotated[bool, typer.Option(help="Print answers as plain text, not rendered Markdown.")] = False,
    backend: BackendOpt = Backend.auto,
    dtype: DTypeOpt = DType.auto,
) -> None:
    """Chat with a model in the terminal (answers on stdout); /help lists the commands, Ctrl-D leaves."""
    from rich.console import Console

    from llmctl import ui
    from llmctl.chat_session import ChatSession, LeaveChat, turn_end
    from llmctl.errors import LlmctlError
    from llmctl.backends import open_model

    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    check_flags(max_tokens, stop, flags)
    loaded, tokenizer = open_model(model, backend.value, None if dtype is DType.auto else dtype.value, adapter)
    end_ids, end_text = turn_end(tokenizer)
    params = sampling_params(loaded, tokenizer, CHAT_DEFAULTS, max_tokens, [*(stop or []), *end_text], **flags)
    session = ChatSession(loaded, tokenizer, params.with_updates(stop_ids=params.stop_ids | end_ids), system)

    interactive = sys.stdin.isatty()
    out = Console(highlight=False)  # stdout: the answers are the command's output
    markdown = interactive and out.is_terminal and not plain
    save_history = _start_readline() if interactive else (lambda: None)
    if interactive:
        _note('Type a message; /help for commands, """ for several lines, Ctrl-C stops an answer, Ctrl-D leaves.')
    try:
        while True:
            try:
                text = _read_message(interactive)
            except LlmctlError as e:  # a line that is not UTF-8: skipped, the chat goes on
                ui.error(e.message, e.hint)
                continue
            except KeyboardInterrupt:
                _note("\n(Ctrl-D or /exit leaves)")
                continue
            except EOFError:
                if interactive:
                    _note("")
                break
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    ui.console.print(session.command(text), markup=False, highlight=False)
                else:
                    _answer(session, text, out, markdown)
            except LeaveChat:
                break
            except LlmctlError as e:  # a message too long, a template that refuses, a bad /load: the chat goes on
                ui.error(e.message, e.hint)
    finally:
        save_history()
