"""`llmctl finetune-lora`: LoRA, rsLoRA, DoRA and QLoRA adapters on chat and instruction data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.backends import Backend


def finetune_lora(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value, e.g. optim.lr=1e-4 data.seq_len=512")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model: folder, Hugging Face id or .gguf (default: the latest llmctl made).")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Training JSONL (messages, prompt/completion, instruction/input/output or text); repeatable. Default: built-in tasks.")] = None,
    val: Annotated[list[str] | None, typer.Option("--val", help="Validation JSONL (default: hold out 10% of --data).")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Adapter rank r (default 8).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Scaling numerator: scale = alpha / r (default 16).")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Dropout on the adapter's input (default 0).")] = None,
    targets: Annotated[str | None, typer.Option("--targets", help="all-linear or layer names: q_proj,v_proj,...")] = None,
    dora: Annotated[bool, typer.Option("--dora", help="DoRA: trained magnitude per output row.")] = False,
    rslora: Annotated[bool, typer.Option("--rslora", help="rsLoRA: scale = alpha / sqrt(r).")] = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: one epoch).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the training data.")] = None,
    quantize_base: Annotated[str | None, typer.Option("--quantize-base", help="QLoRA on a float base: 4, 8 or nf4 (group 64).")] = None,
    train_on_prompt: Annotated[bool, typer.Option("--train-on-prompt", help="Train on prompts and role headers too.")] = False,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Name under recipes/finetune-lora/ or a YAML path.")] = "default",
    backend: Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")] = Backend.auto,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/finetune-lora); the adapter goes to OUT/adapter/.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
) -> None:
    """Fine-tune LoRA adapters on a frozen (or quantized) base; writes checkpoints, metrics and OUT/adapter/."""
    from llmctl.backends import get_backend, resolve_name
    from llmctl.config import load_recipe
    from llmctl.finetune import FinetuneConfig, check_config, run

    flags = {
        "model": model, "data.train": data or None, "data.val": val or None, "lora.rank": rank, "lora.alpha": alpha,
        "lora.dropout": dropout, "lora.targets": targets.split(",") if targets else None,
        "lora.dora": True if dora else None, "lora.rslora": True if rslora else None, "train.steps": steps,
        "epochs": epochs, "quantize_base": quantize_base, "data.train_on_prompt": True if train_on_prompt else None,
        "out": out,
    }
    if epochs is not None and steps is None:
        flags["train.steps"] = 0
    cfg = load_recipe(FinetuneConfig, "finetune-lora", recipe, overrides or [], flags)
    check_config(cfg)
    get_backend(backend)
    run(cfg, resolve_name(backend), force=force, resume=resume)
