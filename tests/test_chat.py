"""`llmctl chat`: cached turns equal recomputation, history and /commands, pipes and a pseudo-terminal, errors."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.chat_session import ChatSession, LeaveChat, read_conversation, turn_end
from llmctl.cli import app
from llmctl.errors import DataError, LlmctlError
from llmctl.generation import SamplingParams, stop_ids
from llmctl.tokenizer import Tokenizer
from test_generate import tiny_chat_model

from conftest import LLMCTL_ROOT as ROOT  # noqa: E402
MESSAGES = ["Hello there", "How are you today?", "Tell me a story about a fox", "What did the fox do next?"]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="module")
def short_context_folder(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("chat-model-128"), context=128, seed=1)


def session_for(backend, folder: Path, max_tokens: int = 16, system: str | None = None) -> ChatSession:
    loaded, tokenizer = backend.load(folder), Tokenizer.from_dir(folder)
    end_ids, end_text = turn_end(tokenizer)
    params = SamplingParams(max_tokens=max_tokens, stop=end_text, stop_ids=stop_ids(loaded, tokenizer) | end_ids)
    return ChatSession(loaded, tokenizer, params, system)


def test_turn_end_of_chatml_is_a_stop_id(chat_folder):
    tokenizer = Tokenizer.from_dir(chat_folder)
    assert turn_end(tokenizer) == (frozenset({tokenizer.token_to_id("<|im_end|>")}), ())


def test_cached_chat_equals_recomputing_from_scratch(chat_folder, backend):
    session = session_for(backend, chat_folder, system="You are a helpful assistant.")
    turns = []
    for message in MESSAGES:
        reply = session.ask(message)
        reply.run()
        session.record(reply)
        turns.append((reply.prompt, reply.ids, reply.stats.reused_tokens))
    assert all(reused > 0 for _, _, reused in turns[1:])  # later turns start from the cached prefix
    assert turns[-1][2] > len(turns[-1][0]) // 2
    fresh = backend.load(chat_folder)
    for prompt, ids, _ in turns:
        again = [t for t in fresh.generate(prompt, session.params) if t not in session.params.stop_ids]
        assert again == ids


def test_interrupted_answer_is_kept_and_the_cache_stays_right(chat_folder, backend):
    session = session_for(backend, chat_folder, max_tokens=24)
    reply = session.ask(MESSAGES[0])
    pieces = iter(reply)
    shown = next(pieces) + next(pieces)
    pieces.close()                      # what Ctrl-C in the middle of an answer does
    session.record(reply)
    assert reply.finish_reason == "interrupted" and session.messages[-1] == {"role": "assistant", "content": shown}
    session.cache.layers[0].offset += 1  # as if a forward pass was cut off after one layer
    session.cache.repair()
    reply = session.ask(MESSAGES[1])
    reply.run()
    fresh = backend.load(chat_folder)
    assert [t for t in fresh.generate(reply.prompt, session.params) if t not in session.params.stop_ids] == reply.ids


def test_commands_reset_system_save_load(chat_folder, backend, tmp_path):
    session = session_for(backend, chat_folder, max_tokens=4)
    for message in MESSAGES[:2]:
        reply = session.ask(message)
        reply.run()
        session.record(reply)
    assert "/reset" in session.command("/help")
    assert session.command("/system Be brief.") == "System prompt set."
    assert session.window()[0] == {"role": "system", "content": "Be brief."} and len(session.messages) == 5
    path = tmp_path / "conversation.json"
    session.command(f"/save {path}")
    assert read_conversation(path) == session.messages
    saved = list(session.messages)
    assert session.command("/reset") == "Conversation cleared."
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert "context:" in session.command("/stats")
    session.command(f"/load {path}")
    assert session.messages == saved
    assert session.command("/system") == "System prompt removed." and session.system is None
    assert "Unknown command /nope" in session.command("/nope")
    with pytest.raises(LeaveChat):
        session.command("/exit")
    path.write_text('[{"role": "user"}]')
    with pytest.raises(DataError, match="message 1"):
        session.command(f"/load {path}")


def test_over_long_history_drops_the_oldest_turns(short_context_folder, backend):
    session = session_for(backend, short_context_folder, max_tokens=12, system="Be brief.")
    for i in range(12):
        reply = session.ask(f"{MESSAGES[i % 4]} ({i})")
        assert len(reply.prompt) + min(12, session.context // 4) <= session.context
        reply.run()
        session.record(reply)
    assert session.start > 1 and session.window()[0]["role"] == "system" and session.window()[1]["role"] == "user"
    assert len(session.messages) == 1 + 2 * 12  # /save still has everything
    with pytest.raises(LlmctlError, match="context holds 128"):
        session.ask("word " * 200)
    assert session.messages[-1]["role"] == "assistant"  # the refused message is not kept


def run_chat(folder: Path, lines: list[str], *flags: str, cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "llmctl", "chat", "--model", str(folder), "--temperature", "0", "--max-tokens", "12",
               "--stop", "\\n", *flags]  # a backslash and n, as a shell passes "\n"
    env = os.environ | {"PYTHONPATH": str(ROOT), "LLMCTL_CACHE": str(cache)}
    done = subprocess.run(command, input="".join(line + "\n" for line in lines).encode(), capture_output=True, timeout=300, env=env)
    # decoded by hand: text=True would turn a "\r" the model wrote into a line break
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.mark.slow
def test_chat_through_a_pipe(chat_folder, tmp_path):
    done = run_chat(chat_folder, ["Hello there", "/system You answer briefly.", "How are you?", "/reset", "Tell me a story"], cache=tmp_path)
    assert done.returncode == 0, done.stderr
    answers = done.stdout.split("\n")
    assert len(answers) == 4 and answers[-1] == ""  # one line per message
    assert "System prompt set." in done.stderr and "Conversation cleared." in done.stderr
    assert any(answers[:3])
    alone = run_chat(chat_folder, ["Tell me a story"], "--system", "You answer briefly.", cache=tmp_path)
    assert alone.stdout == answers[2] + "\n"  # after /reset only the system prompt and the new message count


def test_chat_pipe_survives_an_over_long_history(short_context_folder):
    lines = [f"{MESSAGES[i % 4]} number {i}" for i in range(14)] + ["/stats"]
    args = ["chat", "--model", str(short_context_folder), "--temperature", "0", "--max-tokens", "12", "--stop", "\n"]
    result = CliRunner().invoke(app, args, input="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split("\n")) == 14 + 1
    stderr = " ".join(result.stderr.split())
    assert "dropped the oldest" in stderr and "of 128 tokens used" in stderr


def test_chat_errors_are_clear(chat_folder, tmp_path):
    result = CliRunner().invoke(app, ["chat", "--model", str(tmp_path / "missing")], input="hi\n")
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    assert CliRunner().invoke(app, ["chat", "--model", str(chat_folder), "--tempreature", "1"], input="hi\n").exit_code == 2
    result = CliRunner().invoke(app, ["chat", "--model", str(chat_folder), "--temperature", "-1"], input="hi\n")
    assert result.exit_code == 1 and "--temperature must be >= 0" in result.output
    result = CliRunner().invoke(app, ["chat", "--model", str(chat_folder), "--max-tokens", "4"], input=f"/load {tmp_path / 'none.json'}\nhi\n")
    assert result.exit_code == 0 and "none.json does not exist" in " ".join(result.stderr.split()) and result.stdout.count("\n") == 1


def _read_until(fd: int, text: str, timeout: float = 60.0) -> str:
    """What the terminal shows up to and including `text`."""
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {text!r}; the terminal showed {seen.decode(errors='replace')!r}")
        seen += os.read(fd, 1)  # byte by byte: nothing after `text` is consumed
    return seen.decode(errors="replace")


@pytest.mark.slow
def test_chat_in_a_pseudo_terminal(chat_folder, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = os.environ | {"PYTHONPATH": str(ROOT), "LLMCTL_CACHE": str(tmp_path), "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    command = [sys.executable, "-m", "llmctl", "chat", "--model", str(chat_folder), "--temperature", "0", "--max-tokens", "16"]
    # SIGINT back to its default in the child: a test run started in the background of a script (`cmd &`) ignores
    # it, a child would inherit that, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(slave)
    try:
        _read_until(master, ">>> ")
        os.write(master, b"Hello there\r")
        answer = _read_until(master, ">>> ")
        assert "Hello there" in answer and len(answer.split("Hello there", 1)[1].strip()) > 3
        os.write(master, b"/reset\r")
        assert "Conversation cleared." in _read_until(master, ">>> ")
        time.sleep(0.5)                  # let readline start waiting for keys, as a person would
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt does not end the session
        assert "Ctrl-D or /exit leaves" in _read_until(master, ">>> ")
        os.write(master, b"\x04")        # Ctrl-D leaves
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "Hello there" in (tmp_path / "chat_history").read_text()  # up-arrow history is kept for the next session
