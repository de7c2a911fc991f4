"""`llmctl eval`: perplexity and bits per byte of a model on a text file; with --base, KL divergence to that model."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.backends import Backend

DEFAULT_SEQ_LEN = 512  # llama.cpp's perplexity context


def read_text(path: Path) -> str:
    """The file's text; a .jsonl's "text" fields joined by blank lines."""
    from llmctl.data.text import read_documents
    from llmctl.errors import DataError

    if not path.is_file():
        raise DataError(
            f"{path}: no such file.",
            hint="Pass the text to score with --data, e.g. a held-out .txt file or a .jsonl with a \"text\" field.",
        )
    return "\n\n".join(read_documents(path))


def tokens_and_bytes(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], int]:
    """The text as one token stream (as training reads it: no BOS), cut to max_tokens + 1, and the UTF-8 bytes
    of the text that the scored tokens (all but the first) cover."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = ids[: max_tokens + 1] if max_tokens else ids
        return ids, len(tokenizer.decode(ids[1:]).encode("utf-8"))
    encoding = backend.encode(text, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
    if max_tokens:
        ids, offsets = ids[: max_tokens + 1], offsets[: max_tokens + 1]
    if len(ids) < 2:
        return ids, 0
    return ids, len(text[offsets[1][0] : offsets[-1][1]].encode("utf-8"))


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['data']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("backend", result["backend"]),
        ("window / stride", f"{result['seq_len']} / {result['stride']}"),
        ("tokens scored / bytes", f"{result['tokens']:,} / {result['bytes']:,}"),
        ("perplexity", f"{result['perplexity']:.4f}"),
        ("mean NLL (nats / token)", f"{result['nll']:.5f}"),
        ("bits per byte", f"{result['bits_per_byte']:.5f}"),
    ]
    if "kl_mean" in result:
        rows += [
            ("base", result["base"]),
            ("base perplexity", f"{result['base_perplexity']:.4f}"),
            ("ln(PPL / base PPL)", f"{result['ln_ppl_ratio']:+.5f}"),
            ("mean KL(base || model)", f"{result['kl_mean']:.6f} ± {result['kl_stderr']:.6f}"),
            ("median / 99% / max KL", f"{result['kl_median']:.6f} / {result['kl_p99']:.6f} / {result['kl_max']:.6f}"),
            ("top-1 agreement", f"{100 * result['top1_agreement']:.3f} %"),
        ]
    rows.append(("time", f"{result['seconds']:.1f} s ({result['tokens'] / max(result['seconds'], 1e-9):,.0f} tokens/s)"))
    for label, value in rows:
        table.add_row(label, value)
    return table


def eval_command(
    model: Annotated[str, typer.Option("--model", help="Model folder (or Hugging Face id) to score.")],
    data: Annotated[Path | None, typer.Option("--data", help="Text file to score (.txt, or .jsonl with \"text\").")] = None,
    pairs: Annotated[Path | None, typer.Option("--pairs", help="Preference JSONL: pairwise accuracy of a reward model (or of a policy's implicit reward against --base).")] = None,
    base: Annotated[str | None, typer.Option("--base", help="Reference model: adds KL(base || model), top-1 agreement.")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="LoRA adapter folder (PEFT layout) on --model.")] = None,
    backend: Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")] = Backend.auto,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window; 0: 512, or the model's context if shorter.")] = 0,
    stride: Annotated[int, typer.Option(help="Start a window every N tokens, scoring only new ones; 0: non-overlapping.")] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Score at most N tokens; 0: the whole file.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")] = False,
) -> None:
    """Print perplexity and bits per byte of --model on --data (with --base: KL divergence and top-1 agreement), or
    with --pairs the pairwise accuracy of a reward model (or of a policy's implicit reward against --base)."""
    from llmctl import scoring, ui
    from llmctl.backends import get_backend
    from llmctl.errors import ConfigError, DataError
    from llmctl.io.model_folder import load_tokenizer

    if (data is None) == (pairs is None):
        raise ConfigError("pass --data (a text file to score) or --pairs (preference pairs), one of them.")
    if pairs is not None:
        return pairwise(model, pairs, base, adapter, seq_len or 1024, as_json, get_backend(backend).name)

    for name, value in (("--seq-len", seq_len), ("--stride", stride), ("--max-tokens", max_tokens)):
        if value < 0:
            raise ConfigError(f"{name}={value}; pass a positive number, or 0 for the default.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size}; pass 1 or more.")
    text = read_text(data)
    runtime = get_backend(backend)
    scored = runtime.load(model)
    if adapter is not None:
        from llmctl.backends import attach_adapter

        scored = attach_adapter(scored, adapter, runtime.name)
    reference = runtime.load(base) if base is not None else None
    if reference is not None and reference.spec.vocab_size != scored.spec.vocab_size:
        raise ConfigError(
            f"--base {base} has a vocabulary of {reference.spec.vocab_size} tokens, --model {model} one of "
            f"{scored.spec.vocab_size}; KL divergence compares models that share a tokenizer.",
            hint="Pass as --base the model that --model was made from.",
        )
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, scored.spec.max_seq_len)
    if seq_len > scored.spec.max_seq_len:
        ui.warn(f"--seq-len {seq_len} is longer than the model's context of {scored.spec.max_seq_len} tokens.")
    stride = min(stride or seq_len, seq_len)
    from llmctl.generation import check_vocab

    tokenizer = load_tokenizer(Path(scored.source or model))
    if adapter is not None:
        from llmctl.backends import adapter_tokenizer

        tokenizer = adapter_tokenizer(adapter, tokenizer)
    check_vocab(tokenizer, scored.spec, Path(scored.source or model))
    ids, n_bytes = tokens_and_bytes(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise DataError(f"{data}: {len(ids)} token(s); scoring needs at least 2.", hint="Pass a longer text.")
    start = time.perf_counter()
    plan = scoring.windows(len(ids), seq_len, stride)
    with ui.progress(len(plan), "eval", log_every=max(1, len(plan) // 10)) as bar:
        totals = scoring.score(scored.logits, ids, seq_len, stride, batch_size,
                               reference.logits if reference is not None else None, on_batch=bar.update)
    result: dict[str, Any] = {"model": str(model), "data": str(data), "backend": runtime.name, "seq_len": seq_len,
                              "stride": stride, **scoring.summary(totals, n_bytes),
                              "seconds": time.perf_counter() - start}
    if base is not None:
        result["base"] = str(base)
    broken = sorted(k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v))
    if broken:
        ui.warn(
            f"{model} gives non-finite scores ({', '.join(broken)}): its weights or logits hold NaN or infinity; "
            "--json writes them as null."
        )
    if as_json:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
        typer.echo(json.dumps(clean, indent=2))  # bare NaN is not JSON
    else:
        from rich.console import Console

        Console().print(_table(result))  # the report is the command's output: stdout


def pairwise(model: str, pairs: Path, base: str | None, adapter: str | None, seq_len: int, as_json: bool,
             backend: str = "torch") -> None:
    """Pairwise accuracy on preference pairs: how often the chosen reply gets the higher reward (ties count half)."""
    import importlib

    import numpy as np

    from llmctl import ui
    from llmctl.data.preferences import Counts, PreferenceEncoder, encode_files
    from llmctl.errors import DataError
    from llmctl.io.hub import resolve_model
    from llmctl.io.model_folder import load_tokenizer

    if not pairs.is_file():
        raise DataError(f"{pairs}: no such file.", hint="Pass --pairs a JSONL of {\"prompt\", \"chosen\", \"rejected\"}.")
    from llmctl.io.hf import load_spec

    folder = resolve_model(model)
    tokenizer = load_tokenizer(folder)
    seq_len = min(seq_len, load_spec(folder).max_seq_len)
    counts = Counts()
    examples = [ex for ex in encode_files([pairs], PreferenceEncoder(tokenizer, seq_len), counts) if ex.rejected]
    if not examples:
        raise DataError(f"{pairs}: no pair to score ({counts.identical} identical, {counts.too_long} too long).")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    pair_rewards = importlib.import_module(f"llmctl.backends.{backend}.align").pair_rewards
    rewards, what = pair_rewards(model, examples, seq_len, pad, base, adapter)
    c, r = rewards[:, 0], rewards[:, 1]
    result = {"model": str(model), "pairs": str(pairs), "backend": backend, "scored": len(examples),
              "skipped": counts.identical + counts.too_long, "rewards": what, "accuracy": float(np.mean((c > r) + 0.5 * (c == r))), "mean_margin": float(np.mean(c - r))}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    skipped = f", {result['skipped']} skipped" if result["skipped"] else ""
    ui.info(f"{model} on {pairs}: pairwise accuracy {result['accuracy']:.1%} over {len(examples)} pairs ({what}; "
            f"mean margin {result['mean_margin']:+.4f}{skipped})")
