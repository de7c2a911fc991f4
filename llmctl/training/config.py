"""Settings every training command shares (optimizer, loop, data), each checked before anything is written."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmctl.commands.options import DType
from llmctl.errors import ConfigError


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    lion = "lion"


class Strategy(str, enum.Enum):
    ddp = "ddp"    # every process holds the whole model; gradients are averaged
    fsdp = "fsdp"  # FSDP2 fully_shard: parameters, gradients and optimizer state are sharded


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # files, folders, globs (.txt, .jsonl "text"); empty: Python's stdlib sources
    val: list[str] = field(default_factory=list)    # empty: hold out data.val_fraction of the training tokens
    val_fraction: float = 0.05
    tokenizer: str | None = None   # folder with tokenizer.json; default: model.from's, else a byte-level BPE trained on the corpus
    vocab_size: int = 4096         # vocabulary of a tokenizer trained here
    seq_len: int = 256
    batch_size: int = 16           # sequences per optimizer step, summed over processes and accumulation steps

    def problems(self) -> list[str]:
        out = at_least(self, "data", seq_len=2, batch_size=1, vocab_size=1)
        if not 0 < self.val_fraction < 1 and not self.val:
            out.append(f"data.val_fraction={self.val_fraction}: must be between 0 and 1 (the share of tokens held out); "
                       "or give validation files with data.val.")
        return out


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
    lr: float = 1e-3
    weight_decay: float = 0.1      # decoupled; never applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0         # max global gradient norm; 0: off

    def problems(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"optim.lr={self.lr}: must be greater than 0.")
        for name in ("weight_decay", "eps", "warmup_steps", "grad_clip"):
            if not getattr(self, name) >= 0:
                out.append(f"optim.{name}={getattr(self, name)}: must be 0 or more.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"optim.{name}={getattr(self, name)}: must be in [0, 1).")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1].")
        return out


@dataclass
class LoopConfig:
    steps: int = 300
    seed: int = 0
    dtype: DType = DType.auto      # bf16 where the hardware runs it fast, else fp32
    grad_accum: int = 1            # micro-batches per optimizer step
    eval_every: int = 100          # validation loss every N steps (and at the end)
    eval_batches: int = 8
    log_every: int = 10            # plain progress lines every N steps when stderr is not a terminal
    save_every: int = 100          # checkpoint every N steps (and at the end); 0: only at the end
    keep_last: int = 2             # checkpoints kept (the newest is never deleted)
    stop_at: int = 0               # stop after this step (with a checkpoint) as if interrupted; 0: run to the end
    compile: bool = False          # torch.compile / mx.compile the step
    grad_checkpointing: bool = False  # recompute activations in the backward pass to save memory
    max_bad_steps: int = 5         # non-finite losses in a row before the run stops

    def problems(self) -> list[str]:
        return at_least(self, "train", steps=1, seed=0, grad_accum=1, eval_every=1, eval_batches=1, log_every=1,
                         save_every=0, stop_at=0, max_bad_steps=1)


def at_least(group: object, prefix: str, **minimum: int) -> list[str]:
    return [f"{prefix}.{name}={getattr(group, name)}: must be at least {low}." for name, low in minimum.items()
            if getattr(group, name) < low]


def check(*groups: object) -> None:
    """Every problem of the given config groups at once, as one ConfigError naming the keys."""
    problems = [p for group in groups for p in group.problems()]
    if problems:
        raise ConfigError("the recipe has values no run can use:\n  " + "\n  ".join(problems),
                          hint="Fix these keys in the recipe or the key=value overrides.")
