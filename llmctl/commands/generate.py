"""`llmctl generate`: continue one prompt (streamed to stdout) or a file of prompts (one JSON line each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.backends import Backend
from llmctl.commands.options import DType


ModelOpt = Annotated[str | None, typer.Option("--model", help="Model folder or Hugging Face id; default: the latest `llmctl train` output.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most new tokens per answer.")]
Temperature = Annotated[float | None, typer.Option(help="0 is greedy. Default: the model's generation_config.json, else greedy (generate) or 0.7 (chat).")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling: keep the likeliest tokens up to this probability.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Keep the k likeliest tokens (0: off).")]
MinP = Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min-p times the likeliest one's probability.")]
RepetitionPenalty = Annotated[float | None, typer.Option("--repetition-penalty", help="> 1 discourages repeating tokens.")]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable; \\n and \\t are understood); it is not printed.")]
BackendOpt = Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")]
DTypeOpt = Annotated[DType, typer.Option(help="Weights' dtype in memory; auto keeps the stored one.")]


def sampling_params(model: Any, tokenizer: Any, builtin: dict[str, Any], max_tokens: int, stop: list[str] | None, **flags: Any) -> Any:
    """Flags given on the command line, else the model's generation_config.json, else `builtin`."""
    from llmctl.generation import SamplingParams, generation_defaults, stop_ids

    chosen = builtin | (generation_defaults(model.source) if model.source else {}) | {k: v for k, v in flags.items() if v is not None}
    return SamplingParams(max_tokens=max_tokens, stop=_unescape(stop), stop_ids=stop_ids(model, tokenizer), **chosen)


def _unescape(stop: list[str] | None) -> tuple[str, ...]:
    r"""`--stop "\n"` typed in a shell arrives as backslash + n; it means a newline."""
    return tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in stop or ())


def check_flags(max_tokens: int, stop: list[str] | None, flags: dict[str, Any]) -> None:
    """Refuse bad sampling flags before a model is loaded."""
    from llmctl.generation import SamplingParams

    SamplingParams(max_tokens=max_tokens, stop=_unescape(stop), **{k: v for k, v in flags.items() if v is not None})


def _encode(tokenizer: Any, text: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(text)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _read_prompt_file(path: Path) -> list[str]:
    from llmctl.data import jsonl
    from llmctl.errors import DataError

    expected = 'an object such as {"prompt": "Once upon a time"}'
    prompts = []
    for where, record in jsonl.records(path, expected):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'{where}: "prompt" is missing or not a string.', hint=f"Each line holds {expected}.")
        prompts.append(record["prompt"])
    if not prompts:
        raise DataError(f"{path} holds no prompts.", hint='Give a .jsonl file with one {"prompt": "..."} per line.')
    return prompts


def read_stdin_text(what: str) -> str:
    """All of stdin as UTF-8 text; bytes that are not UTF-8 are an error naming where they are."""
    from llmctl.errors import DataError

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what}: byte {e.start} ({data[e.start]:#04x}) is not UTF-8 text.", hint="Send UTF-8 text.") from None


def check_text(text: str, what: str) -> str:
    """Text from the command line arrives with undecodable bytes as surrogates; refuse them with a message."""
    from llmctl.errors import DataError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{what} is not UTF-8 text (character {e.start}).", hint="Pass UTF-8 text.") from None
    return text


def generate(
    prompt: Annotated[str | None, typer.Option(help="Text to continue; - reads it from stdin.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help='A .jsonl of {"prompt"} lines, run as batches; one JSON line out per prompt.')] = None,
    model: ModelOpt = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="LoRA adapter folder (PEFT layout, or a finetune-lora run) on --model.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template as a user message.")] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (with --chat).")] = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    stop: Stop = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object: text, prompt, speed, memory.")] = False,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together with --prompt-file.")] = 8,
    backend: BackendOpt = Backend.auto,
    dtype: DTypeOpt = DType.auto,
) -> None:
    """Continue a prompt and stream the text to stdout (greedy unless the model's generation_config samples)."""
    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of --prompt TEXT|- and --prompt-file F.jsonl")
    if batch_size < 1:
        raise typer.BadParameter(f"--batch-size must be at least 1, got {batch_size}")
    from llmctl import ui
    from llmctl.backends import open_model
    from llmctl.generation import Completion, TextStream, peak_memory_bytes

    flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    check_flags(max_tokens, stop, flags)
    if prompt == "-":
        texts = [read_stdin_text("--prompt - (stdin)")]
    elif prompt is not None:
        texts = [check_text(prompt, "--prompt")]
    else:
        texts = _read_prompt_file(prompt_file)
    if system is not None:
        check_text(system, "--system")
    loaded, tokenizer = open_model(model, backend.value, None if dtype is DType.auto else dtype.value, adapter)
    params = sampling_params(loaded, tokenizer, {}, max_tokens, stop, **flags)
    if chat:
        from llmctl.chat_session import turn_end

        end_ids, end_text = turn_end(tokenizer)
        params = params.with_updates(stop_ids=params.stop_ids | end_ids, stop=params.stop + end_text)
    ids = [_encode(tokenizer, text, chat, system) for text in texts]

    if prompt_file is not None:
        for first in range(0, len(ids), batch_size):
            for text, new in zip(texts[first : first + batch_size], loaded.generate_batch(ids[first : first + batch_size], params)):
                stopped = bool(new) and new[-1] in params.stop_ids
                stream = TextStream(tokenizer, params.stop)
                answer = "".join(stream.feed(t) for t in (new[:-1] if stopped else new)) + stream.flush()
                reason = "stop" if stopped or stream.stopped else "length"
                record = {"prompt": text, "text": answer, "tokens": len(new), "finish_reason": reason}
                sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        return

    room = loaded.spec.max_seq_len - len(ids[0])
    if 0 < room < max_tokens:
        ui.warn(f"only {room} new tokens fit in the model's context ({loaded.spec.max_seq_len}) after the {len(ids[0])}-token prompt.")
    reply = Completion(loaded, tokenizer, ids[0], params)
    try:
        for piece in reply:
            if not json_out:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        ui.warn("interrupted")
    if json_out:
        s = reply.stats
        record = {
            "prompt": texts[0], "text": reply.text, "finish_reason": reply.finish_reason,
            "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
            "time_to_first_token_s": round(s.time_to_first_token, 6), "prompt_tokens_per_s": round(s.prompt_tokens_per_s, 2),
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 2), "peak_memory_bytes": peak_memory_bytes(),
        }
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    if sys.stdout.isatty() and not reply.text.endswith("\n"):
        sys.stdout.write("\n")
    ui.info(f"[dim]{reply.stats.summary()}[/]")
