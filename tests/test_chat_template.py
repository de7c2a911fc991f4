"""Chat templates render exactly as transformers' apply_chat_template renders them, refusals included."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from llmctl.chat_template import DEFAULT_CHAT_TEMPLATE, render_chat
from llmctl.errors import TokenizerError

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEMPLATES = sorted((SHARED / "chat_templates").glob("*.jinja"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")

# Leading/trailing whitespace and non-ASCII text exercise the templates' `trim` and the renderer's escaping.
SYSTEM = {"role": "system", "content": "You are terse. Answer in one line.  "}
TURNS = [
    {"role": "user", "content": " Hi there! "},
    {"role": "assistant", "content": "Hello! Ça va? 😀"},
    {"role": "user", "content": "Tell me a joke about <tags> & \"quotes\".\n"},
]
NOT_ALTERNATING = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer built offline from the smallest shared tokenizer.json."""
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED}")
    transformers = pytest.importorskip("transformers")
    path = SHARED / "models" / "stories260K" / "tokenizer.json"
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>")


def hf_render(hf_tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    hf_tokenizer.chat_template = template
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def ours(template: str, messages: list[dict], **kwargs) -> str:
    return render_chat(template, messages, bos_token="<s>", eos_token="</s>", **kwargs)


@needs_shared
def test_all_shared_templates_are_found():
    assert len(TEMPLATES) == 11, [t.name for t in TEMPLATES]


@needs_shared
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("system", [True, False], ids=["system", "nosystem"])
@pytest.mark.parametrize("template_file", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_render_matches_transformers(hf_tokenizer, template_file: Path, system: bool, add_generation_prompt: bool):
    template = template_file.read_text(encoding="utf-8")
    messages = ([SYSTEM] if system else []) + TURNS
    try:
        expected = hf_render(hf_tokenizer, template, messages, add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.TemplateError as e:  # the template refuses (a system role, say): so must llmctl
        with pytest.raises(TokenizerError) as ours_error:
            ours(template, messages, add_generation_prompt=add_generation_prompt)
        assert ours_error.value.message == str(e)
        return
    got = ours(template, messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert "Hi there!" in got and "😀" in got


@needs_shared
@pytest.mark.parametrize("template_file", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_refusals_match_transformers(hf_tokenizer, template_file: Path):
    template = template_file.read_text(encoding="utf-8")
    refuses = "raise_exception" in template
    if refuses:
        with pytest.raises(jinja2.exceptions.TemplateError) as theirs:
            hf_render(hf_tokenizer, template, NOT_ALTERNATING, add_generation_prompt=True)
        with pytest.raises(TokenizerError) as mine:
            ours(template, NOT_ALTERNATING, add_generation_prompt=True)
        assert mine.value.message == str(theirs.value)
        assert mine.value.message == "Conversation roles must alternate user/assistant/user/assistant/..."
    else:  # templates without checks render anything; then both must render the same
        expected = hf_render(hf_tokenizer, template, NOT_ALTERNATING, add_generation_prompt=True)
        assert ours(template, NOT_ALTERNATING, add_generation_prompt=True) == expected


@needs_shared
def test_tools_tojson_and_none_keys_match_transformers(hf_tokenizer):
    template = (SHARED / "chat_templates" / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Température à <city> & \"quoted\"",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Zürich?", "tool_calls": None},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": "21°C"},
    ]
    expected = hf_render(hf_tokenizer, template, messages, add_generation_prompt=True, tools=tools)
    assert ours(template, messages, add_generation_prompt=True, tools=tools) == expected
    assert '"Température à <city> & \\"quoted\\""' in expected  # no ASCII or HTML escaping


def test_globals_loopcontrols_and_namespace_match_transformers(hf_tokenizer):
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{{ m | tojson }}|{% endfor %}{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ custom }}"
    )
    messages = [{"role": "user", "content": f"m{i} é"} for i in range(4)]
    expected = hf_render(hf_tokenizer, template, messages, add_generation_prompt=False, custom="x")
    assert ours(template, messages, add_generation_prompt=False, custom="x") == expected
    assert expected.endswith("2|4|x")


def test_default_template_is_chatml(hf_tokenizer):
    messages = [SYSTEM, *TURNS]
    got = ours(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert got == hf_render(hf_tokenizer, DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert got.startswith("<s><|im_start|>system\nYou are terse.")
    assert got.endswith("<|im_end|>\n<|im_start|>assistant\n")
    no_bos = render_chat(DEFAULT_CHAT_TEMPLATE, TURNS[:1], add_generation_prompt=False)
    assert no_bos == "<|im_start|>user\n Hi there! <|im_end|>\n"


@needs_shared
def test_system_refusal_matches_transformers(hf_tokenizer):
    # Gemma's official template refuses system messages; the shared gemma-it.jinja folds them into the first turn
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + (SHARED / "chat_templates" / "gemma-it.jinja").read_text(encoding="utf-8")
    )
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        hf_render(hf_tokenizer, template, [SYSTEM, *TURNS], add_generation_prompt=True)
    with pytest.raises(TokenizerError) as mine:
        ours(template, [SYSTEM, *TURNS], add_generation_prompt=True)
    assert mine.value.message == "System role not supported"
    assert ours(template, TURNS, add_generation_prompt=True) == hf_render(
        hf_tokenizer, template, TURNS, add_generation_prompt=True
    )


def test_template_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="does not parse"):
        render_chat("{% for m in messages %}", TURNS, add_generation_prompt=False)
    with pytest.raises(TokenizerError, match="empty conversation"):
        render_chat(DEFAULT_CHAT_TEMPLATE, [], add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="Message 2 is a str"):
        render_chat(DEFAULT_CHAT_TEMPLATE, [TURNS[0], "hello"], add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="failed on this conversation"):
        render_chat("{{ messages[0]['content'] + 1 }}", TURNS, add_generation_prompt=False)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages.append(1) }}",  # immutable sandbox: templates cannot change the caller's data
        "{{ messages.__class__.__mro__ }}",
        "{% set ns = namespace() %}{% set ns._secret = 1 %}",
    ],
    ids=["mutate", "dunder", "namespace-underscore"],
)
def test_sandbox_refuses_unsafe_templates(template: str):
    with pytest.raises(TokenizerError):
        render_chat(template, TURNS, add_generation_prompt=False)
