"""Prompts and rewards for online RL (`llmctl align --method grpo`): the prompt file, the built-in reward functions
(finetune-lora's checkable tasks), a user's `module:function`, and group-normalized advantages as TRL computes them.

A reward function is `(prompt: str, completion: str, example: dict) -> float`; `example` is the prompt file's record
(its "answer", when given). One that raises or returns something other than a finite number is reported with the
example it failed on; with `on_reward_error=skip` that completion gets no reward (NaN: its advantage is 0).
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import ConfigError, DataError

RewardFn = Callable[[str, str, dict], float]
PROMPT_FORMAT = '{"prompt": text or [{"role": "user", "content": ...}], "answer": optional}'


@dataclass
class Prompt:
    """One prompt: its token ids as `llmctl generate` encodes it, its text, its record, and where it came from."""

    ids: list[int]
    text: str
    example: dict[str, Any]
    where: str


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """The ids `llmctl generate` gives the same prompt (`--chat` for messages): plain text as it is, messages through
    the chat template with the assistant's turn opened."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}; expected an object {PROMPT_FORMAT}.")
    prompt = record.get("prompt")
    chat = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    if not (isinstance(prompt, str) and prompt) and not chat:
        raise DataError(f'{where}: "prompt" is missing, empty, or neither text nor a list of {{"role", "content"}} messages.',
                        hint=f"Each line is {PROMPT_FORMAT}.")
    if "answer" in record and not isinstance(record["answer"], str):
        raise DataError(f'{where}: "answer" must be a string.', hint=f"Each line is {PROMPT_FORMAT}.")


def read_prompts(path: Path) -> list[tuple[dict[str, Any], str]]:
    """The records of a prompt JSONL file with "file:line" for each; bad lines are errors naming the line."""
    from llmctl.data import jsonl

    out = []
    for where, record in jsonl.records(path, PROMPT_FORMAT):
        _check_record(record, where)
        out.append((record, where))
    if not out:
        raise DataError(f"{path} holds no prompts.", hint=f"Give one {PROMPT_FORMAT} a line.")
    return out


def builtin_prompts(seed: int) -> tuple[list[tuple[dict, str]], list[tuple[dict, str]]]:
    """finetune-lora's built-in tasks as prompts with answers: (training, held-out)."""
    from llmctl.data.tasks import task_records

    train, val = task_records(seed)
    records = lambda convs, name: [({"prompt": c[:1], "answer": c[1]["content"]}, f"built-in {name} task {i}")  # noqa: E731
                                   for i, c in enumerate(convs)]
    return records(train, "training"), records(val, "held-out")


def to_prompts(records: list[tuple[dict, str]], tokenizer: Any) -> list[Prompt]:
    out = []
    for record, where in records:
        prompt = record["prompt"]
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        out.append(Prompt(encode_prompt(tokenizer, prompt), text, record, where))
    return out


# --- reward functions --------------------------------------------------------------------------------------------


def _answer(example: dict) -> str:
    if not isinstance(example.get("answer"), str):
        raise ValueError('the example has no "answer" to check the completion against')
    return example["answer"].strip()


def exact(prompt: str, completion: str, example: dict) -> float:
    """1 when the completion is the answer (surrounding spaces aside), as finetune-lora's held-out check counts it."""
    return float(completion.strip() == _answer(example))


def _shape(answer: str) -> str:
    """A pattern of the answer's form: a number, digits between spaces, lowercase or capital letters, else the text."""
    for pattern in (r"\d+", r"\d( \d)+", r"[a-z]+", r"[A-Z]+"):
        if re.fullmatch(pattern, answer):
            return pattern
    return re.escape(answer)


def format_reward(prompt: str, completion: str, example: dict) -> float:
    """1 when the completion has the answer's form (a number, sorted-digit list, lowercase or capital word), right
    or not: the partial credit that makes a task's format learnable before its answers."""
    return float(re.fullmatch(_shape(_answer(example)), completion.strip()) is not None)


BUILTIN: dict[str, RewardFn] = {"exact": exact, "format": format_reward}


def load_reward_fn(name: str) -> RewardFn:
    """A built-in reward function by name, or a user's `module:function` (the module importable from here)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--reward-fn {name}: expected one of {', '.join(BUILTIN)} or module:function.",
                          hint="e.g. --reward-fn exact, or --reward-fn my_rewards:score with my_rewards.py importable.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--reward-fn {name}: cannot import {module_name} ({e}).",
                          hint="Run from the folder that holds it, or add that folder to PYTHONPATH.") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn {name}: {module_name} has no function {attr}.")
    return fn


def score(fn: RewardFn, name: str, prompt: Prompt, completion: str, skip: bool) -> float:
    """fn's reward for one completion; a failure names the example (NaN under skip, an error otherwise)."""
    try:
        value = fn(prompt.text, completion, prompt.example)
        problem = None if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            else f"returned {value!r}, not a finite number"
    except Exception as e:  # a user's function can fail in any way; the example it failed on is what matters
        problem = f"raised {type(e).__name__}: {e}"
    if problem is None:
        return float(value)
    if skip:
        return math.nan
    raise DataError(f"reward function {name} on {prompt.where} ({prompt.text[:60]!r}) {problem}.",
                    hint="Fix the reward function or the example, or pass --on-reward-error skip to give such "
                         "completions no reward.")


def group_advantages(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, per-group reward std) from rewards (N,) in groups of `group_size` consecutive completions, as TRL's
    GRPO computes them: (r - group mean) / (group std + 1e-4), std with Bessel's correction, NaN rewards left out of
    mean and std and given advantage 0."""
    grouped = rewards.reshape(-1, group_size).astype(np.float64)
    with warnings.catch_warnings():  # an all-NaN group (every reward skipped) has no mean: its advantages are 0
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(grouped, axis=1, keepdims=True)
        std = np.nanstd(grouped, axis=1, keepdims=True, ddof=1)
    advantages = np.nan_to_num((grouped - mean) / (std + 1e-4), nan=0.0)
    return advantages.reshape(-1).astype(np.float32), std[:, 0]

