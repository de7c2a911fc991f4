"""The training loop, written once for every command and both backends.

A command supplies a batch source and an objective, a backend an engine; the loop does the rest: resume, the
learning-rate schedule, gradient accumulation with the loss normalized over the whole step, clipping, the
non-finite-step policy, evaluation, checkpoints and `stop_at`, progress, metrics, and the final export.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llmctl import ui
from llmctl.errors import LlmctlError
from llmctl.io.safetensors import atomic_write_text
from llmctl.run import STATE_FILE, RunFolder, check_resumable, plot_losses
from llmctl.schedule import lr_at
from llmctl.training.batch import Batch
from llmctl.training.config import LoopConfig, OptimConfig


class BatchSource(Protocol):
    """Where a command's batches come from; a batch depends only on (seed, step, part), so resume is exact."""

    def batch(self, step: int, part: int, parts: int) -> Batch:
        """Part `part` of the global batch of optimizer step `step` cut into `parts` equal parts (rows)."""

    def val_batches(self, rows: int) -> Iterable[Batch]:
        """The validation batches, the same every time."""


class Objective(Protocol):
    """batch -> loss. Built per backend (backends/*/objectives.py); the loop never looks inside.

    `units(batch)` counts what the loss is averaged over (target tokens; pairs for a pair objective); the loss of an
    optimizer step is the sum of `__call__`'s first value over every micro-batch and process divided by the sum of
    their units. The metrics are sums over the same units (the loop divides them the same way); "loss" is shown.
    """

    def units(self, batch: Batch) -> int: ...

    def __call__(self, model: Any, batch: Any) -> tuple[Any, dict[str, Any]]: ...


class Engine(Protocol):
    """A backend's side of training: the model (built or loaded, wrapped), micro-steps, the optimizer, collectives."""

    rank: int
    world: int
    peak_flops: float   # FLOP/s of this device (a measured matmul), for MFU

    def micro_step(self, objective: Objective, batch: Batch, scale: float, last: bool) -> dict[str, Any]:
        """Forward and backward of objective * scale (scale = 1 / the step's units), gradients accumulated."""

    def optimizer_step(self, lr: float, max_norm: float) -> float:
        """Clip, update, zero the gradients; the gradient norm before clipping."""

    def zero_grad(self) -> None: ...

    def all_sum(self, values: dict[str, Any]) -> dict[str, float]: ...

    def evaluate(self, objective: Objective, batches: Iterable[Batch]) -> dict[str, float]: ...

    def snapshot(self) -> Any:
        """What a checkpoint holds (a collective: every process calls it); None off process 0."""

    def write_checkpoint(self, folder: Path, snapshot: Any) -> dict[str, Any]:
        """Write the snapshot's tensors under `folder`; returns what state.json should add."""

    def load_checkpoint(self, folder: Path, state: dict[str, Any]) -> None: ...

    def export(self, folder: Path) -> None:
        """The final model folder (every process calls it; process 0 writes)."""

    def set_train(self, on: bool) -> None: ...


@dataclass
class Job:
    """What the loop needs besides the engine: settings, run folder, and the command's own pieces."""

    loop: LoopConfig
    optim: OptimConfig
    run: RunFolder
    source: BatchSource
    objective: Objective
    resume_key: dict[str, Any]                 # settings a checkpoint depends on; --resume refuses a change
    config_text: str                           # the resolved recipe, written once the resume check passed
    flops_per_unit: float = 0.0                # training FLOPs per unit, for MFU (0: no MFU)
    tokens_per_step: int = 0                   # for tokens/s
    save_extras: Callable[[Path], None] | None = None   # e.g. the tokenizer, beside each saved model
    started: Callable[[], None] | None = None   # called once the first step is logged (the run folder then stays)
    export: Callable[[], None] | None = None    # the final export instead of the engine's model folder (an adapter)
    step_metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # more of a step's record, given the record
    validate: bool = True                       # the validation loss every eval_every steps (False: the command checks)
    resume: bool = False
    state: dict[str, Any] = field(default_factory=dict)


def resume_point(run: RunFolder) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint whose state.json reads; a corrupt newest one falls back to the one before, with a warning."""
    for folder in sorted(run.checkpoints.glob("step-*"), reverse=True):
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            if isinstance(state, dict) and "step" in state:
                return folder, state
            problem = "holds no step"
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = f"cannot be read ({e})"
        ui.warn(f"{folder / STATE_FILE} {problem}; trying the checkpoint before it")
    raise LlmctlError(f"--resume: {run.path} holds no complete checkpoint to resume from.",
                      hint="Drop --resume (with --force) to start the run afresh.")


def run_settled(engine: Engine, job: Job) -> bool:
    """`run`, then the run folder settled (it replaces what --force or --resume found there); on any failure it is
    restored instead, so the user's previous run comes back (a no-op once the first step settled the folder)."""
    try:
        finished = run(engine, job)
    except BaseException:
        job.run.restore()
        raise
    job.run.settle()
    return finished


def run(engine: Engine, job: Job) -> bool:
    """Train to the end (True) or to `train.stop_at` (False)."""
    cfg, optim = job.loop, job.optim
    start, bad_steps = 0, 0
    key = json.loads(json.dumps(job.resume_key))
    if job.resume:
        folder, state = resume_point(job.run)
        check_resumable(state.get("resume_key", {}), key, folder)
        job.run.write_config(job.config_text)
        engine.load_checkpoint(folder, state)
        start, bad_steps = state["step"], state.get("bad_steps", 0)
        job.run.truncate_metrics(start)
        ui.info(f"resumed from {folder} at step {start}")
    else:
        job.run.write_config(job.config_text)
    parts = cfg.grad_accum * engine.world
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps

    def save(step: int) -> None:
        snapshot = engine.snapshot()
        if snapshot is None:
            return
        with job.run.new_checkpoint(step, cfg.keep_last) as folder:
            state = {"step": step, "resume_key": key, "bad_steps": bad_steps, "tokens_seen": step * job.tokens_per_step}
            state |= engine.write_checkpoint(folder, snapshot)
            if job.save_extras is not None:
                job.save_extras(folder / "model")
            atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1))

    def log(record: dict[str, Any]) -> None:
        job.run.log(record)
        if job.started is not None:
            job.started()  # a step ran: the run folder is the user's now
            job.started = None

    engine.set_train(True)
    with ui.progress(cfg.steps, "train", start=start, log_every=cfg.log_every) as bar:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, optim.lr, optim.warmup_steps, cfg.steps, optim.min_lr_ratio)
            batches = [job.source.batch(step, micro * engine.world + engine.rank, parts) for micro in range(cfg.grad_accum)]
            totals = accumulate(engine, job.objective, batches)
            loss = totals["loss"]
            if not math.isfinite(loss):
                engine.zero_grad()
                bad_steps += 1
                log({"step": step + 1, "skipped": True, "loss": None})
                ui.warn(f"step {step + 1}: loss is {loss}; step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    raise LlmctlError(
                        f"{bad_steps} steps in a row had a non-finite loss; the run stopped at step {step + 1}.",
                        hint=f"The last good checkpoint is {job.run.latest_checkpoint()}. Lower optim.lr or use train.dtype=fp32, then --resume.",
                    )
                bar.update(1)
                continue
            bad_steps = 0
            norm = engine.optimizer_step(lr, optim.grad_clip or math.inf)
            seconds = time.perf_counter() - t0
            tok_s = job.tokens_per_step / seconds
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "tok_s": round(tok_s, 1), "step_s": round(seconds, 4),
                      "mfu": round(job.flops_per_unit * tok_s / (engine.peak_flops * engine.world), 4)}
            record |= {k: v for k, v in totals.items() if k != "loss"}
            done = step + 1
            if job.step_metrics is not None:
                record |= job.step_metrics(record)  # e.g. online RL's rewards and its sampling time
            if job.validate and (done % cfg.eval_every == 0 or done == cfg.steps):
                engine.set_train(False)
                val = engine.evaluate(job.objective, job.source.val_batches(max(1, _rows(batches))))
                engine.set_train(True)
                record |= {"val_loss": val["loss"], "val_ppl": math.exp(min(val["loss"], 50))}
                record |= {f"val_{k}": v for k, v in val.items() if k != "loss"}  # an objective's parts (distill's ce, a pair objective's accuracy)
            log(record)
            bar.update(1, loss=loss, tok_s=round(tok_s), **({"val": record["val_loss"]} if "val_loss" in record else {}))
            if (cfg.save_every and done % cfg.save_every == 0) or done == end:
                save(done)
    if end < cfg.steps:
        ui.info(f"stopped after step {end} (train.stop_at); continue with --resume")
        return False
    if job.export is not None:
        job.export()
        return True
    engine.export(job.run.model_dir)
    if ui.is_main_process():
        if job.save_extras is not None:
            job.save_extras(job.run.model_dir)
        plot_losses(job.run.path)
    return True


def accumulate(engine: Engine, objective: Objective, batches: list[Batch]) -> dict[str, float]:
    """Forward and backward of this process's micro-batches of one step, the gradients summed; the step's metrics.

    The loss is normalized by the units (target tokens) of the whole step, over every micro-batch and process,
    counted before the first backward: so how a batch is split (accumulation, processes) leaves the gradient as it is.
    """
    units = max(engine.all_sum({"units": sum(objective.units(b) for b in batches)})["units"], 1)
    sums: dict[str, Any] = {}
    for micro, batch in enumerate(batches):
        metrics = engine.micro_step(objective, batch, 1.0 / units, micro == len(batches) - 1)
        for name, value in metrics.items():
            sums[name] = sums[name] + value if name in sums else value
    return {k: v / units for k, v in engine.all_sum(sums).items()}


def _rows(batches: list[Batch]) -> int:
    return batches[0].rows if batches else 1


def evaluate_sums(step: Callable[[Batch], dict[str, Any]], batches: Iterable[Batch], units: Callable[[Batch], int]) -> dict[str, float]:
    """Metric sums over `batches` divided by their units: the engines' evaluate, framework-free."""
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        for name, value in step(batch).items():
            sums[name] = sums.get(name, 0.0) + float(value)
        count += units(batch)
    return {k: v / max(count, 1) for k, v in sums.items()}
