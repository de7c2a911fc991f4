"""Chat templates rendered exactly as transformers' `apply_chat_template` renders them (sandboxed Jinja)."""

from __future__ import annotations

import json
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
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the underscore name {name!r}")


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
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
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except _TemplateRefused as e:
        raise TokenizerError(
            str(e.args[0]) if e.args else "The chat template refused this conversation.",
            hint="The model's chat template refused this conversation; change the messages to the form it accepts.",
        ) from e
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
        # Template code is foreign: `'a' + None`, a missing key or a bad index all mean messages it did not expect
        raise TokenizerError(
            f"The chat template failed on this conversation: {e}",
            hint="Check the message roles and keys the template expects (role, content, ...).",
        ) from e
