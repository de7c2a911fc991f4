"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them (sandboxed Jinja)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmctl.errors import TokenizerError

# ChatML, for models that ship no template (and the tokenizers `Tokenizer.train_bpe` makes). BOS is printed by the
# template, so rendered text is encoded without adding special tokens; it renders as "" where there is no BOS.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


MAX_RENDERED_CHARS = 1_000_000  # a rendered conversation longer than this is a template gone wrong
MAX_SECONDS = 5.0               # and so is one that takes longer to render


class _TemplateLimit(Exception):
    """The template's output or running time passed a limit; carries the message."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `**` and `+` refused where their result would pass the size limit."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and isinstance(left, (int, float)) and abs(right) > 1024:
            raise _TemplateLimit(f"it computes {left!r} ** {right}, a number too large to print")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                    raise _TemplateLimit(
                        f"it repeats a {len(seq)}-item text or list {n} times, past the limit of "
                        f"{MAX_RENDERED_CHARS:,} characters"
                    )
        if operator == "+" and isinstance(left, (str, list)) and isinstance(right, (str, list)):
            if len(left) + len(right) > MAX_RENDERED_CHARS:
                raise _TemplateLimit(f"it builds a text longer than {MAX_RENDERED_CHARS:,} characters")
        return super().call_binop(context, operator, left, right)


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt a template that runs longer than `seconds` (main thread on POSIX; elsewhere `_render` checks time)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _TemplateLimit(f"it ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, old_delay)


def _render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render piece by piece, stopping at MAX_RENDERED_CHARS or MAX_SECONDS."""
    start, size, pieces = time.monotonic(), 0, []
    with _time_limit(MAX_SECONDS):
        for piece in template.generate(**variables):
            size += len(piece)
            pieces.append(piece)
            if size > MAX_RENDERED_CHARS:
                raise _TemplateLimit(f"its output passed the limit of {MAX_RENDERED_CHARS:,} characters")
            if time.monotonic() - start > MAX_SECONDS:
                raise _TemplateLimit(f"it ran for more than {MAX_SECONDS:g} s")
    return "".join(pieces)


class _TemplateRefused(Exception):
    """Raised by the template's own `raise_exception(...)`; carries the template's message."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefused(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' filter: plain json.dumps, without Jinja's HTML escaping of <, >, & and '
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names (as transformers does) so templates cannot reach internals."""

    # No named `self`: Jinja's own signature trick, so that `namespace(self=1)` still works
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        if isinstance(value, (str, list)) and len(value) > MAX_RENDERED_CHARS:  # `ns.s = ns.s ~ ns.s` doubling
            raise _TemplateLimit(f"it builds a value of {len(value):,} items in namespace().{name}, past the limit")
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the underscore name {name!r}")


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"The chat template does not parse: {e.message} (template line {e.lineno}).",
            hint="Fix chat_template.jinja (or `chat_template` in tokenizer_config.json) of the model.",
        ) from e


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs: Any,
) -> str:
    """Render `messages` with a Jinja chat template; extra kwargs (tools, documents, ...) are template variables."""
    if not messages:
        raise TokenizerError("Cannot render an empty conversation: it needs at least one message.")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise TokenizerError(
                f"Message {number} is a {type(message).__name__}; a chat message is a dict such as "
                '{"role": "user", "content": "Hi"}.'
            )
    # As transformers does: keys whose value is None are dropped, since templates test for presence (tool_calls).
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    variables = {"tools": None, "documents": None, **kwargs}
    try:
        return _render(
            _compile(template),
            dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token, **variables),
        )
    except _TemplateLimit as e:
        raise TokenizerError(
            f"The chat template was stopped: {e.args[0]}.",
            hint="The model's chat template loops or grows without bound; fix chat_template.jinja or use another model.",
        ) from None
    except RecursionError:
        raise TokenizerError(
            "The chat template was stopped: it calls itself without end (a recursive macro).",
            hint="Fix the recursion in chat_template.jinja, or use another model.",
        ) from None
    except _TemplateRefused as e:
        raise TokenizerError(
            str(e.args[0]) if e.args else "The chat template refused this conversation.",
            hint="The model's chat template refused this conversation; change the messages to the form it accepts.",
        ) from e
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, OverflowError) as e:
        # Template code is foreign: `'a' + None`, a missing key or a bad index all mean messages it did not expect
        raise TokenizerError(
            f"The chat template failed on this conversation: {e}",
            hint="Check the message roles and keys the template expects (role, content, ...).",
        ) from e
