"""A run folder (runs/NAME/): resolved config, metrics.jsonl, rotating checkpoints, the final model, a loss plot."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmctl import ui
from llmctl.errors import ConfigError, LlmctlError, OutputError
from llmctl.io.outputs import check_output, clean_stale, swap, temporary_sibling, write_error
from llmctl.io.safetensors import atomic_write_text
from llmctl.ui import is_main_process

STATE_FILE = "state.json"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "tokenizer")  # what a run folder holds


class RunFolder:
    """`inputs` (data files, tokenizer, model.from) are never inside the run folder, which --force replaces.

    --force deletes nothing at first: the old folder is set aside (`.NAME.old-PID`) and removed by `settle()` once
    the new run is set up, or put back by `restore()` when the setup fails, so a refused command changes nothing.
    """

    def __init__(self, path: Path, force: bool = False, resume: bool = False, inputs: Sequence[str | Path | None] = ()) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._aside: Path | None = None
        self._created = False  # the folder is new: a failed setup removes it again, so the retry is not blocked
        self._was_empty = False
        if not is_main_process():
            return  # rank 0 checked and created the folder before the others got here
        check_output(self.path, inputs, flag="--out")
        if self.path.exists() and not self.path.is_dir():
            raise LlmctlError(f"--out {self.path} is a file; a run is a folder.", hint="Pick another --out.")
        if self.path.exists() and any(self.path.iterdir()) and not (force or resume):
            raise LlmctlError(
                f"{self.path} already exists.",
                hint="Pass --resume to continue that run, --force to overwrite it, or --out to pick another folder.",
            )
        if resume and self.latest_checkpoint() is None:
            raise LlmctlError(f"--resume: {self.path} holds no checkpoint to resume from.", hint="Drop --resume to start afresh.")
        if force and not resume and self.path.exists() and any(self.path.iterdir()):
            if not any((self.path / name).exists() for name in RUN_MARKERS):
                raise LlmctlError(
                    f"--force: {self.path} holds files but is not a run folder (no {', '.join(RUN_MARKERS)}); "
                    "llmctl replaces only folders it wrote.",
                    hint="Pick a new folder for --out, or empty this one yourself.",
                )
            clean_stale(self.path.parent)
            self._aside = temporary_sibling(self.path, "old")
            os.replace(self.path, self._aside)
        self._was_empty = not resume and self._aside is None and self.path.is_dir() and not any(self.path.iterdir())
        self._created = not resume and (self._aside is not None or not self.path.exists() or self._was_empty)
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.restore()
            raise (write_error(e, self.path) or e) from None
        clean_stale(self.checkpoints)

    def settle(self) -> None:
        """The new run is set up: the old folder that --force replaced goes."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = None
        self._created = False

    def restore(self) -> None:
        """Setting up the new run failed: put the old folder back as it was (or remove the one just made)."""
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
            if self._was_empty:  # the user's own empty folder stays, empty
                self.path.mkdir(parents=True, exist_ok=True)
            self._created = False
        if self._aside is not None:
            os.replace(self._aside, self.path)
            self._aside = None

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def write_config(self, text: str) -> None:
        if is_main_process():
            atomic_write_text(self.path / "config.yaml", text)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (rank 0 only)."""
        if is_main_process():
            path = self.path / "metrics.jsonl"
            try:
                with path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise (write_error(e, path) or e) from e

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop lines logged after the checkpoint, so metrics.jsonl reads as one clean run."""
        path = self.path / "metrics.jsonl"
        if not is_main_process() or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a line torn by a kill mid-write: the step it logged is redone
                    ui.warn(f"{path}:{number}: dropping a torn last line")
                    continue
                raise LlmctlError(f"{path}:{number}: not a JSON line; the run's metrics are damaged.",
                                  hint="Delete or fix that line, then --resume again.") from None
            if isinstance(record, dict) and record.get("step", 0) <= after_step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoints.glob("step-*") if (p / STATE_FILE).is_file()) if self.checkpoints.is_dir() else []
        return done[-1] if done else None

    @contextmanager
    def new_checkpoint(self, step: int, keep_last: int) -> Iterator[Path]:
        """A folder to fill, renamed into place when complete; older checkpoints beyond `keep_last` are removed."""
        final = self.checkpoints / f"step-{step:08d}"
        tmp = temporary_sibling(final)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            yield tmp
        except (OSError, OutputError) as e:  # a full disk: name the checkpoint; the older ones are whole
            shutil.rmtree(tmp, ignore_errors=True)
            error = e if isinstance(e, OutputError) else write_error(e, final)
            if error is None:
                raise
            raise OutputError(
                f"cannot write the checkpoint {final}: {error.reason}.",
                hint="The earlier checkpoints are whole: free some space, then `llmctl train --resume` continues "
                "from the newest.",
                reason=error.reason,
                path=error.path,
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap(tmp, final)
        done = sorted(p for p in self.checkpoints.glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[: max(0, len(done) - max(1, keep_last))]:  # the newest checkpoint is never deleted
            shutil.rmtree(old, ignore_errors=True)


def check_resumable(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when settings that shape the model, data or optimizer state changed."""
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed:
        raise ConfigError(
            f"cannot resume from {checkpoint}: the recipe changed in ways the checkpoint cannot follow:\n  " + "\n  ".join(changed),
            hint="Resume with the original settings, or start a new run with --out (or --force).",
        )


def plot_losses(run: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl (training and validation loss against step)."""
    path = run / "metrics.jsonl"
    if not is_main_process() or not path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run / "loss_curve.png"
    tmp = run / f".loss_curve.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def remember_model(path: Path) -> None:
    """Record the newest model a command produced, the default for `generate` and `chat`."""
    from llmctl.data.text import cache_dir

    if is_main_process():
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_dir() / "last_model", str(Path(path).resolve()))


def last_model() -> Path | None:
    from llmctl.data.text import cache_dir

    marker = cache_dir() / "last_model"
    if marker.is_file():
        path = Path(marker.read_text().strip())
        return path if path.is_dir() else None
    return None
