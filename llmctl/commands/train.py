"""`llmctl train`: pretrain a causal LM from scratch (or continue pretraining one) on text."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from llmctl.backends import Backend
from llmctl.training.config import DataConfig, DType, LoopConfig, OptimConfig, Optimizer, Strategy  # noqa: F401 (recipes' schema)


@dataclass
class ModelConfig:
    from_: str | None = field(default=None, metadata={"key": "from"})  # continue pretraining this folder / HF id
    family: str = "llama"          # llama, mistral, qwen2, mixtral: the architecture written to config.json
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0            # 0: same as n_heads
    ffn_dim: int = 0               # 0: 8/3 * dim rounded up to a multiple of 64
    vocab_size: int = 0            # 0: the tokenizer's
    max_seq_len: int = 0           # 0: data.seq_len
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    sliding_window: int = 0        # 0: full attention
    n_experts: int = 0             # > 0: Mixture-of-Experts (family mixtral)
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01
    init_std: float = 0.02


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # spec fields, or `from` a model folder
    data: DataConfig = field(default_factory=DataConfig)     # data.train, data.val, tokenizer, seq_len, batch_size
    optim: OptimConfig = field(default_factory=OptimConfig)  # optim.lr, optim.weight_decay, ...
    train: LoopConfig = field(default_factory=LoopConfig)    # train.steps, train.seed, train.dtype
    strategy: Strategy = Strategy.ddp                          # how several processes split the work
    out: Path = Path("runs/train")


def train(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value, e.g. optim.lr=3e-4 train.steps=100")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Name under recipes/train/ or a YAML path.")] = "tiny",
    backend: Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")] = Backend.auto,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/train).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    strategy: Annotated[Strategy | None, typer.Option(help="ddp or fsdp under torchrun.")] = None,
    nproc: Annotated[int, typer.Option(help="Launch this many processes through torchrun.")] = 1,
) -> None:
    """Pretrain a causal LM; writes checkpoints, metrics and the final model to runs/NAME/."""
    from llmctl.backends import get_backend, resolve_name
    from llmctl.config import load_recipe
    from llmctl.pretrain import check_config
    from llmctl.pretrain import train as pretrain

    flags = {"out": out, "strategy": strategy.value if strategy else None}
    cfg = load_recipe(TrainConfig, "train", recipe, overrides or [], flags)
    check_config(cfg)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(nproc, resolve_name(backend))
        return
    get_backend(backend)  # a clear error when its framework is missing
    pretrain(cfg, resolve_name(backend), force=force, resume=resume)


def _launch_torchrun(nproc: int, backend: str) -> None:
    """Re-run this very command under torchrun with `nproc` processes."""
    import subprocess

    from llmctl.errors import LlmctlError

    if backend != "torch":
        raise LlmctlError("--nproc launches torchrun (torch backend).", hint="For MLX use `mlx.launch -n N -- llmctl train --backend mlx ...`.")
    args = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
    if "--nproc" in sys.argv:
        i = sys.argv.index("--nproc")
        args = sys.argv[1:i] + sys.argv[i + 2 :]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "llmctl", *args]
    raise typer.Exit(subprocess.call(cmd))
