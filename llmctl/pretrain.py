"""`llmctl train` on the shared loop: run folder, tokenizer, token batches, spec, then the loop on a backend's engine."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl import ui
from llmctl.config import to_dict, to_yaml
from llmctl.data.text import TokenData, default_corpus, expand_sources, read_documents, split, tokenize_files
from llmctl.errors import ConfigError, LlmctlError, SpecError
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
        from llmctl.io.hub import resolve_model

        from llmctl.io.model_folder import read_model

        folder = resolve_model(m.from_)
        spec = read_model(folder).spec  # config.json checked against the tensor headers before anything is built
        if tokenizer.vocab_size > spec.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.from={m.from_} has vocab_size {spec.vocab_size}.",
                hint="Continue pretraining with the model's own tokenizer (leave data.tokenizer unset).",
            )
        return spec, folder
    vocab = m.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens.")
    try:
        return _new_spec(cfg, tokenizer, vocab), None
    except SpecError as e:
        # the spec's words (dim, n_heads, head_dim) as the keys `train` takes
        message = e.message.replace("; set head_dim", "").replace("head_dim", "the head width (model.dim / model.n_heads)")
        for word in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "n_experts",
                     "experts_per_token", "sliding_window", "dim"):  # fmt: skip
            message = re.sub(rf"(?<![\w.]){word}\b", f"model.{word}", message)
        raise ConfigError(message, hint="model.dim must be a multiple of model.n_heads, and model.n_heads of model.n_kv_heads.") from None


def _new_spec(cfg: Any, tokenizer: Tokenizer, vocab: int) -> ModelSpec:
    m = cfg.model
    return ModelSpec(
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
    """Set up runs/NAME/, get a tokenizer and token files, build the spec (the recipe was checked before, and the
    config is written by the loop once a resumed run's settings are checked).

    The run folder is not settled here: a run that fails before its first step puts back what --force set aside
    (or removes the folder it made), so a refused or failed command changes nothing and blocks no retry.
    """
    inputs = [*_paths(cfg.data.train), *_paths(cfg.data.val), cfg.data.tokenizer, cfg.model.from_]
    run = RunFolder(cfg.out, force=force, resume=resume, inputs=inputs)
    try:
        return _prepare(cfg, run, resume)
    except BaseException:
        run.restore()  # a refused command changes nothing: the old run folder (--force) is back as it was
        raise


def _paths(sources: Any) -> list[str]:
    """The files and folders named by data.train / data.val (globs stand for the folder they search)."""
    if not sources:
        return []
    out = []
    for source in [sources] if isinstance(sources, (str, Path)) else list(sources):
        text = str(source)
        out.append(text.split("*")[0].rsplit("/", 1)[0] or "." if "*" in text else text)
    return out


def _prepare(cfg: Any, run: RunFolder, resume: bool) -> Prepared:
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
    from llmctl.memory import check_fits, training_bytes

    batch_tokens = cfg.data.batch_size * cfg.data.seq_len // max(1, cfg.train.grad_accum)
    check_fits(
        training_bytes(spec.param_count(), batch_tokens, spec.dim, spec.n_layers),
        f"training this {spec.param_count() / 1e6:,.1f}M-parameter model (batch of {batch_tokens:,} tokens)",
        hint="Make the model smaller (model.dim, model.n_layers) or the batch (data.batch_size, train.grad_accum).",
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

    def __init__(self, data: TokenData, batch_size: int, seed: int, eval_batches: int) -> None:
        self.data, self.batch_size, self.seed, self.eval_batches = data, batch_size, seed, eval_batches

    def batch(self, step: int, part: int, parts: int) -> Batch:
        rows = self.batch_size // parts
        return Batch.from_windows(self.data.batch(step, self.batch_size, self.seed, part * rows, rows))

    def val_batches(self, rows: int) -> Iterator[Batch]:
        for windows in self.data.val_batches(rows, self.eval_batches):
            yield Batch.from_windows(windows)


def check_config(cfg: Any) -> None:
    """Every nonsense value of the recipe at once, before anything is written."""
    check(cfg.data, cfg.optim, cfg.train)


def train(cfg: Any, backend: str, force: bool = False, resume: bool = False) -> Path | None:
    """Pretrain on `backend` ("torch" or "mlx"): the model folder, or None when stopped early (train.stop_at)."""
    check_config(cfg)
    engine = _engine(backend, cfg)
    try:
        return _run(engine, backend, cfg, force, resume)
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


def _run(engine: Any, backend: str, cfg: Any, force: bool, resume: bool) -> Path | None:
    micro_batch(cfg, engine.world)  # the batch must split before anything is written
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
    source = TextBatches(prep.data, cfg.data.batch_size, cfg.train.seed, cfg.train.eval_batches)
    job = Job(
        loop=cfg.train, optim=cfg.optim, run=prep.run, source=source, objective=_objective(backend),
        resume_key=prep.resume_key(cfg, engine.world), config_text=to_yaml(cfg), resume=resume,
        flops_per_unit=prep.spec.flops_per_token(cfg.data.seq_len, training=True),
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len, save_extras=prep.tokenizer.save,
        started=prep.run.settle,
    )
    try:
        engine.build(prep.spec, prep.init_from)
        finished = loop.run(engine, job)
    except BaseException:
        prep.run.restore()  # no-op once the first step settled the folder
        raise
    prep.run.settle()
    if not finished:
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
