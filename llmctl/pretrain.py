"""`llmctl train` on the shared loop: run folder, tokenizer, token batches, spec, then the loop on a backend's engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl import ui
from llmctl.config import to_dict, to_yaml
from llmctl.data.text import TokenData, default_corpus, expand_sources, read_documents, split, tokenize_files
from llmctl.errors import ConfigError, LlmctlError
from llmctl.io.safetensors import atomic_write_text
from llmctl.run import RunFolder, remember_model
from llmctl.spec import ModelSpec
from llmctl.tokenizer import Tokenizer
from llmctl.training import loop
from llmctl.training.batch import Batch
from llmctl.training.config import check
from llmctl.training.loop import Job


@dataclass
class Prepared:
    run: RunFolder
    tokenizer: Tokenizer
    data: TokenData
    spec: ModelSpec
    init_from: Path | None   # a model folder whose weights start the run (continued pretraining)

    def resume_key(self, cfg: Any, world: int) -> dict[str, Any]:
        """Settings a checkpoint depends on: a resumed run must keep them."""
        spec = self.spec.to_dict() | {"rope_scaling": to_dict(self.spec.rope_scaling)}
        return {f"model.{k}": v for k, v in spec.items()} | {
            "data.seq_len": cfg.data.seq_len,
            "data.batch_size": cfg.data.batch_size,
            "optim.name": to_dict(cfg)["optim"]["name"],
            "train.grad_accum": cfg.train.grad_accum,
            "train.seed": cfg.train.seed,
            "processes": world,
        }


def _ffn_dim(dim: int) -> int:
    # SwiGLU keeps the parameter count of a 4*dim MLP with 2/3 of the width, rounded up to 64.
    return -(-int(8 * dim / 3) // 64) * 64


def _spec(cfg: Any, tokenizer: Tokenizer) -> tuple[ModelSpec, Path | None]:
    m = cfg.model
    if m.from_:
        from llmctl.io.hf import load_spec
        from llmctl.io.hub import resolve_model

        folder = resolve_model(m.from_)
        spec = load_spec(folder)
        if tokenizer.vocab_size > spec.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.from={m.from_} has vocab_size {spec.vocab_size}.",
                hint="Continue pretraining with the model's own tokenizer (leave data.tokenizer unset).",
            )
        return spec, folder
    vocab = m.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens.")
    spec = ModelSpec(
        vocab_size=vocab,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads or m.n_heads,
        ffn_dim=m.ffn_dim or _ffn_dim(m.dim),
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        max_seq_len=m.max_seq_len or cfg.data.seq_len,
        tie_embeddings=m.tie_embeddings,
        sliding_window=m.sliding_window or None,
        n_experts=m.n_experts,
        experts_per_token=m.experts_per_token,
        router_aux_loss_coef=m.router_aux_loss_coef if m.n_experts else 0.0,
        family="mixtral" if m.n_experts else m.family,
        bos_token_id=tokenizer.bos_id,
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        pad_token_id=tokenizer.pad_id,
        init_std=m.init_std,
    )
    return spec, None


def _tokenizer(cfg: Any, run: RunFolder, files: list[Path], resume: bool) -> Tokenizer:
    saved = run.path / "tokenizer"
    if (resume or not ui.is_main_process()) and (saved / "tokenizer.json").is_file():
        return Tokenizer.from_dir(saved)
    if cfg.data.tokenizer:
        from llmctl.io.hub import resolve_model

        return Tokenizer.from_dir(resolve_model(cfg.data.tokenizer))
    if cfg.model.from_:
        from llmctl.io.hub import resolve_model

        return Tokenizer.from_dir(resolve_model(cfg.model.from_))
    ui.info(f"training a byte-level BPE tokenizer of {cfg.data.vocab_size} tokens on {len(files)} file(s)")
    tokenizer = Tokenizer.train_bpe((doc for f in files for doc in read_documents(f)), cfg.data.vocab_size)
    if ui.is_main_process():
        tokenizer.save(saved)
        # The chat-turn end token is a stop id too; tokenizer files alone do not record it.
        eos = sorted(tokenizer.eos_token_ids)
        atomic_write_text(saved / "generation_config.json", json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    return tokenizer


def prepare(cfg: Any, force: bool, resume: bool) -> Prepared:
    """Set up runs/NAME/, get a tokenizer and token files, build the spec (the config is written by the loop,
    once a resumed run's settings are checked)."""
    run = RunFolder(cfg.out, force=force, resume=resume)
    files = expand_sources(cfg.data.train) if cfg.data.train else default_corpus()
    if not cfg.data.train:
        ui.info(f"data.train not set: training on the Python standard library's sources ({len(files)} files)")
    tokenizer = _tokenizer(cfg, run, files, resume)
    spec, init_from = _spec(cfg, tokenizer)
    if cfg.data.seq_len > spec.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} does not fit the model's context of {spec.max_seq_len} tokens.",
            hint=f"Set data.seq_len={spec.max_seq_len} or less.",
        )
    tokens = tokenize_files(files, tokenizer)
    if cfg.data.val:
        data = TokenData(tokens, tokenize_files(expand_sources(cfg.data.val, "data.val"), tokenizer, "data.val"), cfg.data.seq_len)
    else:
        data = split(tokens, cfg.data.val_fraction, cfg.data.seq_len)
    ui.info(
        f"{spec.param_count() / 1e6:.2f}M parameters, {len(data.train):,} training tokens, "
        f"{len(data.val):,} validation tokens -> {run.path}"
    )
    return Prepared(run, tokenizer, data, spec, init_from)


class TextBatches:
    """Pretraining batches: random windows of the token stream, one segment per row (documents run together)."""

    def __init__(self, data: TokenData, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def batch(self, step: int, part: int, parts: int) -> Batch:
        rows = self.batch_size // parts
        return Batch.from_windows(self.data.batch(step, self.batch_size, self.seed, part * rows, rows))

    def val_batches(self, rows: int) -> Iterator[Batch]:
        for windows in self.data.val_batches(rows, self.eval_batches):
            yield Batch.from_windows(windows)

    eval_batches = 8


def check_config(cfg: Any) -> None:
    """Every nonsense value of the recipe at once, before anything is written."""
    check(cfg.data, cfg.optim, cfg.train)


def train(cfg: Any, backend: str, force: bool = False, resume: bool = False) -> Path | None:
    """Pretrain on `backend` ("torch" or "mlx"): the model folder, or None when stopped early (train.stop_at)."""
    check_config(cfg)
    engine = _engine(backend, cfg)
    try:
        return _train(engine, backend, cfg, force, resume)
    finally:
        engine.close()


def _engine(backend: str, cfg: Any) -> Any:
    if backend == "torch":
        from llmctl.backends.torch.engine import Engine
    else:
        from llmctl.backends.mlx.engine import Engine
    return Engine(cfg.train, cfg.optim, cfg.strategy.value)


def _objective(backend: str) -> Any:
    if backend == "torch":
        from llmctl.backends.torch.objectives import NextToken
    else:
        from llmctl.backends.mlx.objectives import NextToken
    return NextToken()


def _train(engine: Any, backend: str, cfg: Any, force: bool, resume: bool) -> Path | None:
    micro_batch(cfg, engine.world)  # the batch must split before anything is written
    out = Path(cfg.out)
    fresh = not out.exists() or not any(out.iterdir())
    try:
        return _run(engine, backend, cfg, force, resume)
    except BaseException:
        # A run that failed before its first step leaves no folder to block the retry (unless it was there before).
        if fresh and not resume and engine.rank == 0 and out.is_dir() and not (out / "metrics.jsonl").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(engine: Any, backend: str, cfg: Any, force: bool, resume: bool) -> Path | None:
    # Process 0 creates the run folder, tokenizer and token cache first; the others then find them.
    if engine.rank != 0 and engine.barrier():
        raise LlmctlError("process 0 failed while preparing the run; its own error message says why.")
    try:
        prep = prepare(cfg, force, resume)
    except BaseException:
        if engine.rank == 0:
            engine.barrier(failed=True)
        raise
    if engine.rank == 0:
        engine.barrier()
    source = TextBatches(prep.data, cfg.data.batch_size, cfg.train.seed)
    source.eval_batches = cfg.train.eval_batches
    job = Job(
        loop=cfg.train, optim=cfg.optim, run=prep.run, source=source, objective=_objective(backend),
        resume_key=prep.resume_key(cfg, engine.world), config_text=to_yaml(cfg), resume=resume,
        flops_per_unit=prep.spec.flops_per_token(cfg.data.seq_len, training=True),
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len, save_extras=prep.tokenizer.save,
    )
    engine.build(prep.spec, prep.init_from)
    if not loop.run(engine, job):
        return None
    remember_model(prep.run.model_dir)
    ui.info(f"model written to {prep.run.model_dir}")
    return prep.run.model_dir


def micro_batch(cfg: Any, world: int) -> int:
    """Sequences per process per micro-step; the global batch must split evenly."""
    parts = cfg.train.grad_accum * world
    if cfg.data.batch_size % parts:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} does not split into train.grad_accum={cfg.train.grad_accum} "
            f"x {world} process(es).",
            hint=f"Use a multiple of {parts}.",
        )
    return cfg.data.batch_size // parts
