"""`llmctl distill`: teacher -> student knowledge distillation on next-token distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.backends import Backend
from llmctl.commands.options import DistillLoss
from llmctl.training.config import Strategy


def distill(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value, e.g. optim.lr=3e-4 data.seq_len=512")] = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="The frozen teacher: folder, Hugging Face id or .gguf.")] = None,
    student: Annotated[str | None, typer.Option("--student", help="A model folder the student starts from (the teacher's tokenizer).")] = None,
    student_recipe: Annotated[str | None, typer.Option("--student-recipe", help="Or a fresh student of this shape: a name under recipes/train/ or a YAML path.")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Text (.txt, folders, globs, .jsonl with text) or chat/instruction JSONL; repeatable. Default: built-in tasks.")] = None,
    val: Annotated[list[str] | None, typer.Option("--val", help="Validation files (default: hold out part of --data).")] = None,
    loss: Annotated[DistillLoss | None, typer.Option("--loss", help="Divergence to the teacher (default kl).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Softens both distributions; the term is scaled by T^2 (default 1).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Weight of the distillation term; 1 - alpha weighs the next-token loss (default 0.5).")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="jsd: the teacher's weight in the mixture (default 0.5).")] = None,
    skew: Annotated[float | None, typer.Option("--skew", help="skew-kl: the teacher's share of the skewed mixture (default 0.1).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: one epoch).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the training data.")] = None,
    cache_topk: Annotated[int | None, typer.Option("--cache-topk", help="Run the teacher once and keep its top-K log-probabilities in teacher-cache/ beside --out; later epochs and runs with the same teacher and data skip its forward pass.")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Name under recipes/distill/ or a YAML path.")] = "default",
    backend: Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")] = Backend.auto,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/distill); the student goes to OUT/model/.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    strategy: Annotated[Strategy | None, typer.Option(help="ddp or fsdp under torchrun.")] = None,
    nproc: Annotated[int, typer.Option(help="Launch this many processes through torchrun.")] = 1,
) -> None:
    """Distill a teacher into a smaller student; writes checkpoints, metrics and the student to OUT/model/."""
    import os

    from llmctl.backends import get_backend, resolve_name
    from llmctl.commands.train import _launch_torchrun
    from llmctl.config import load_recipe
    from llmctl.distill import DistillConfig, check_config, run

    flags = {
        "teacher": teacher, "student": student, "student_recipe": student_recipe, "data.train": data or None,
        "data.val": val or None, "loss.kind": loss.value if loss else None, "loss.temperature": temperature,
        "loss.alpha": alpha, "loss.beta": beta, "loss.skew": skew, "train.steps": steps, "epochs": epochs,
        "cache_topk": cache_topk, "out": out, "strategy": strategy.value if strategy else None,
    }
    if epochs is not None and steps is None:
        flags["train.steps"] = 0
    cfg = load_recipe(DistillConfig, "distill", recipe, overrides or [], flags)
    check_config(cfg)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(nproc, resolve_name(backend))
        return
    get_backend(backend)
    run(cfg, resolve_name(backend), force=force, resume=resume)
