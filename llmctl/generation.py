"""Framework-free generation: sampling settings, stop strings, streamed text, prompt-cache bookkeeping, timings."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError
from llmctl.tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the (T, S) mask and activations of long prompts
PREFILL_BATCH = 1024  # padded prompt tokens that a server prefills in one forward (prefill_groups)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen and when generation ends; temperature 0 is greedy (argmax)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0                   # keep the k most likely tokens; 0: off
    top_p: float = 1.0               # keep the smallest set whose probability reaches p; 1: off
    min_p: float = 0.0               # drop tokens less likely than min_p * the most likely one; 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the answer (CTRL's rule)
    seed: int | None = None          # None: a different sample each run
    stop: tuple[str, ...] = ()       # text that ends generation; it is not part of the answer
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # token ids that end generation (EOS, end of turn)

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            problems.append(f"--min-p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            problems.append("--stop cannot be an empty string")
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_updates(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)


def generation_defaults(folder: Path) -> dict[str, Any]:
    """Sampling settings a model ships in generation_config.json, as SamplingParams fields (checked, naming the file)."""
    from llmctl.io.paths import inside

    path = inside(folder, "generation_config.json") if Path(folder).is_dir() else Path(folder) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}", hint="Fix or delete generation_config.json.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}; expected an object.", hint="Fix or delete it.")
    checks = {
        "temperature": (float, lambda v: v >= 0, ">= 0"),
        "top_k": (int, lambda v: v >= 0, ">= 0"),
        "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
        "min_p": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
        "repetition_penalty": (float, lambda v: v > 0, "> 0"),
    }
    values: dict[str, Any] = {}
    for key, (cast, ok, rule) in checks.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (cast is int and value != int(value)) or not ok(value):
            raise ConfigError(
                f"{path}: {key} is {json.dumps(value)}; it must be a number {rule}.",
                hint=f"Fix {key} in generation_config.json, or override it with --{key.replace('_', '-')}.",
            )
        values[key] = cast(value)
    out: dict[str, Any] = {}
    if config.get("do_sample") and values.get("temperature", 1.0) > 0:
        out["temperature"] = values.get("temperature", 1.0)
        out |= {key: values[key] for key in ("top_k", "top_p", "min_p") if key in values}
    if "repetition_penalty" in values:
        out["repetition_penalty"] = values["repetition_penalty"]
    return out


class TextStream:
    """Ids in, printable text out: whole characters only, nothing twice, and stop strings cut and never shown."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop = tuple(stop)
        self.stopped = False
        self.text = ""       # everything released so far
        self._pending = ""   # decoded text held back because it may be the start of a stop string

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._pending + self.decoder.feed(token_id), final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._release(self._pending + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = text[: min(hits)], ""
        elif final or not self.stop:
            out, self._pending = text, ""
        else:
            # Hold back the longest tail that could still grow into a stop string.
            hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])), default=0)
            out, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        self.text += out
        return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """A model's key/value cache plus the token ids it holds, so a new prompt computes only what is new.

    A chat sends the whole conversation each turn; everything up to the first token that differs from what the
    cache holds is reused, so time to first token does not grow with the conversation.
    """

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.tokens: list[int] = []  # ids whose keys/values are in every layer, in order

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the longest prefix shared with `prompt` (never all of it: its last token must run to give logits)."""
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        self.trim(keep)
        return keep

    def trim(self, n: int) -> None:
        for layer in self.layers:
            layer.trim(n)
        del self.tokens[n:]

    def repair(self) -> None:
        """After an interruption mid-forward, drop positions some layers stored but `tokens` does not list."""
        self.trim(len(self.tokens))

    def clear(self) -> None:
        self.trim(0)


@dataclass(eq=False)
class BatchSlot:
    """One sequence of a backend's BatchDecoder: its own prompt cache (as prefill left it) and its length so far.

    While the sequence decodes in a batch its keys and values live in the decoder's joint cache; `cache` keeps the
    prompt's, so a later request that shares the prompt's prefix can copy them.
    """

    cache: PromptCache
    length: int


def best_prefix(cached: Sequence[PromptCache], prompt: Sequence[int]) -> tuple[PromptCache | None, int]:
    """The one of `cached` sharing the longest prefix with `prompt`, and how long (never all of the prompt: its last
    token must run to give logits); (None, 0) when none shares any."""
    best, keep = None, 0
    for other in cached:
        n = min(common_prefix(other.tokens, prompt), len(prompt) - 1)
        if n > keep:
            best, keep = other, n
    return best, keep


def prefill_groups(prompts: Sequence[Sequence[int]], cached: Sequence[PromptCache], tokens: int = PREFILL_BATCH) -> list[list[int]]:
    """Which of `prompts` a BatchDecoder prefills together, group by group (indices into `prompts`).

    A group runs in one forward, each row padded to the most new tokens among them, up to `tokens` padded tokens:
    a matmul of many rows costs far less per token than one short prompt's. A prompt that shares a longer prefix
    with an earlier one of `prompts` than any of `cached` holds (a system prompt) waits for a later group, which
    then reuses that one's cache, when this at least halves what it computes. Within a wave, shortest first: the
    least padding, and the earliest first tokens.
    """
    new = [len(p) - best_prefix(cached, p)[1] for p in prompts]
    wave = [0] * len(prompts)
    for j, prompt in enumerate(prompts):
        shares = [min(common_prefix(prompts[i], prompt), len(prompt) - 1) for i in range(j)]
        if shares and 2 * (len(prompt) - max(shares)) <= new[j]:
            leader = shares.index(max(shares))  # the earliest: identical prompts all wait for the first
            wave[j], new[j] = wave[leader] + 1, len(prompt) - max(shares)
    groups: list[list[int]] = []
    for w in sorted(set(wave)):
        group: list[int] = []
        for j in sorted((j for j in range(len(prompts)) if wave[j] == w), key=lambda j: new[j]):
            if group and new[j] * (len(group) + 1) > tokens:  # sorted: j's count is the group's longest
                groups.append(group)
                group = []
            group.append(j)
        groups.append(group)
    return groups


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0           # prompt tokens served from the cache
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds, prompt processing included
    decode_seconds: float = 0.0       # from the first token to the last

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.time_to_first_token if self.time_to_first_token > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens, {self.decode_tokens_per_s:.1f} tokens/s, first token {self.time_to_first_token * 1e3:.0f} ms "
            f"(prompt {self.prompt_tokens} tokens, {self.reused_tokens} from cache)"
        )


class Completion:
    """One answer: iterate for text pieces as they are generated; afterwards `.text`, `.ids`, `.stats`, `.finish_reason`.

    `model` is a backend's Model (`.generate(prompt, params, cache)` yields ids). `finish_reason` is "stop" (a stop
    id or string), "length" (max tokens), "context" (the model's context is full) or "interrupted".
    """

    def __init__(self, model: Any, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams, cache: PromptCache | None = None) -> None:
        self.model, self.tokenizer, self.prompt, self.params, self.cache = model, tokenizer, prompt, params, cache
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason = "interrupted"
        self.stats = GenerationStats(prompt_tokens=len(prompt))

    def __iter__(self) -> Iterator[str]:
        stream = TextStream(self.tokenizer, self.params.stop)
        if self.cache is not None:
            self.stats.reused_tokens = min(common_prefix(self.cache.tokens, self.prompt), len(self.prompt) - 1)
        start = time.perf_counter()
        first = None
        tokens = self.model.generate(self.prompt, self.params, self.cache)
        try:
            for token in tokens:
                if first is None:
                    first = time.perf_counter()
                    self.stats.time_to_first_token = first - start
                self.stats.new_tokens += 1
                if token in self.params.stop_ids:
                    self.finish_reason = "stop"
                    break
                self.ids.append(token)
                piece = stream.feed(token)
                if piece:
                    self.text += piece
                    yield piece
                if stream.stopped:
                    self.finish_reason = "stop"
                    break
            else:
                full = len(self.prompt) + len(self.ids) >= self.model.spec.max_seq_len
                self.finish_reason = "context" if full and len(self.ids) < self.params.max_tokens else "length"
            tail = stream.flush()
            if tail:
                self.text += tail
                yield tail
        finally:
            tokens.close()
            if first is not None:
                self.stats.decode_seconds = time.perf_counter() - first

    def run(self) -> str:
        for _ in self:
            pass
        return self.text


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (the accelerator's peak where one is in use)."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    import resource  # Unix only, and only needed here

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def check_vocab(tokenizer: Tokenizer, spec: Any, folder: Path) -> None:
    """A tokenizer with more ids than the model has embeddings would index past the embedding table."""
    if tokenizer.vocab_size > spec.vocab_size:
        from llmctl.errors import TokenizerError

        raise TokenizerError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{spec.vocab_size}; ids past {spec.vocab_size - 1} have no embedding.",
            hint="The tokenizer files belong to another model: copy the model's own tokenizer into the folder.",
        )


def stop_ids(model: Any, tokenizer: Tokenizer) -> frozenset[int]:
    """Ids that end an answer: the tokenizer's EOS and end-of-turn ids and the model config's eos_token_id."""
    return frozenset(tokenizer.eos_token_ids) | frozenset(model.spec.eos_token_ids)
