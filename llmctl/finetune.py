"""`llmctl finetune-lora` on the shared loop: chat data, a frozen (maybe quantized) base with adapters, the adapter out.

The run folder is `train`'s (config.yaml, metrics.jsonl, checkpoints/ with the adapters' tensors and optimizer
state, exact --resume); the final adapter goes to OUT/adapter/ in PEFT's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl import ui
from llmctl.config import to_dict, to_yaml
from llmctl.errors import ConfigError, DataError
from llmctl.training.config import LoopConfig, OptimConfig, at_least, check

DEFAULT_TASKS = "builtin:tasks"  # data.train's value for the generated tasks with checkable answers
TASK_CHECKS = 50                 # held-out built-in tasks whose answers are checked before and after



def data_problems(data: Any) -> list[str]:
    """The checks of a `data` group with seq_len, batch_size, val and val_fraction (finetune-lora's, align's)."""
    out = at_least(data, "data", seq_len=2, batch_size=1)
    if not 0 < data.val_fraction < 1 and not data.val:
        out.append(f"data.val_fraction={data.val_fraction}: must be between 0 and 1.")
    return out

@dataclass
class FinetuneData:
    train: list[str] = field(default_factory=list)  # JSONL files (messages, prompt/completion, instruction, text); empty: built-in tasks
    val: list[str] = field(default_factory=list)    # empty: hold out data.val_fraction of the training examples
    val_fraction: float = 0.1
    seq_len: int = 1024          # packed tokens per row (the model's context, if shorter)
    batch_size: int = 8          # rows per optimizer step, summed over processes and accumulation steps
    train_on_prompt: bool = False

    def problems(self) -> list[str]:
        return data_problems(self)


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    dora: bool = False
    rslora: bool = False

    def problems(self) -> list[str]:
        return self.settings().problems()

    def settings(self) -> Any:
        from llmctl.adapters import LoraSettings

        return LoraSettings(self.rank, self.alpha, self.dropout, list(self.targets), self.dora, self.rslora)


@dataclass
class FinetuneConfig:
    model: str | None = None     # folder, Hugging Face id or .gguf; empty: the latest model llmctl made
    data: FinetuneData = field(default_factory=FinetuneData)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, eval_every=50, save_every=100))
    epochs: float = 1.0          # passes over the training rows, when train.steps is 0
    quantize_base: str = ""      # "", "4", "8" or "nf4": quantize a float base in memory (QLoRA)
    out: Path = Path("runs/finetune-lora")


def check_config(cfg: FinetuneConfig) -> None:
    problems = [p for g in (cfg.data, cfg.lora, cfg.optim) for p in g.problems()]
    loop_problems = [p for p in cfg.train.problems() if not p.startswith("train.steps=")]
    if cfg.quantize_base not in ("", "4", "8", "nf4"):
        problems.append(f"quantize_base={cfg.quantize_base!r}: expected 4, 8 or nf4.")
    if not cfg.epochs > 0:
        problems.append(f"epochs={cfg.epochs}: must be greater than 0.")
    if problems + loop_problems:
        raise ConfigError("the recipe has values no run can use:\n  " + "\n  ".join(problems + loop_problems),
                          hint="Fix these keys in the recipe or the key=value overrides.")


def resolve_base(cfg: FinetuneConfig) -> Path:
    from llmctl.io.hub import resolve_model
    from llmctl.run import last_model

    if not cfg.model:
        latest = last_model()
        if latest is None:
            raise ConfigError("no --model given, and no model made by llmctl was found.",
                              hint="Pass --model DIR (a model folder or a Hugging Face id), or run `llmctl train` first.")
        ui.info(f"[dim]--model not given: fine-tuning the latest model {latest}[/]")
        cfg.model = str(latest)
    return resolve_model(cfg.model)


def build_data(cfg: FinetuneConfig, tokenizer: Any, seq_len: int) -> tuple[Any, Any, dict[str, int], list | None]:
    """Packed training and validation rows, counts for the summary, and the held-out conversations of the built-in
    tasks (whose answers are checked), else None."""
    from llmctl.data.chat import ChatEncoder, encode_files, pack_examples
    from llmctl.data.text import expand_sources

    encoder = ChatEncoder(tokenizer, cfg.data.train_on_prompt)
    held = None
    if not cfg.data.train or cfg.data.train == [DEFAULT_TASKS]:
        from llmctl.data.tasks import task_records

        train_items, val_items = task_records(cfg.train.seed)
        held = val_items[:TASK_CHECKS]
        train = [encoder.encode(m) for m in train_items]
        val = [encoder.encode(m) for m in val_items]
        truncated = sum(len(e.tokens) > seq_len + 1 for e in train + val)
    else:
        files = expand_sources(cfg.data.train, "data.train")
        train, truncated, _ = encode_files(files, encoder, seq_len)
        if cfg.data.val:
            val, t2, _ = encode_files(expand_sources(cfg.data.val, "data.val"), encoder, seq_len)
            truncated += t2
        else:
            import numpy as np

            order = np.random.default_rng(cfg.train.seed).permutation(len(train))
            n_val = max(1, int(len(train) * cfg.data.val_fraction)) if len(train) > 1 else 0
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in sorted(order[n_val:])]
    if not train:
        cut = f" ({truncated} were longer than data.seq_len={seq_len} tokens and were cut)" if truncated else ""
        raise DataError(f"no training example has a token to learn from (an assistant reply or text){cut}.",
                        hint="Raise data.seq_len, or check data.train: each line needs an assistant message, a "
                             "completion, an output or text.")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_rows = pack_examples(train, seq_len, cfg.train.seed, pad)
    val_rows = pack_examples(val or train[:1], seq_len, -1, pad)
    counts = {"examples": len(train), "val_examples": len(val), "truncated": truncated, "rows": train_rows.rows,
              "target_tokens": train_rows.target_count}
    return train_rows, val_rows, counts, held


def run(cfg: FinetuneConfig, backend: str, force: bool = False, resume: bool = False) -> Path | None:
    """Fine-tune adapters; the adapter folder, or None when stopped early (train.stop_at)."""
    from llmctl.data.chat import PackedBatches, add_template_tokens
    from llmctl.io.model_folder import load_tokenizer, read_model
    from llmctl.run import RunFolder
    from llmctl.training import loop
    from llmctl.training.loop import Job

    check_config(cfg)
    base = resolve_base(cfg)
    spec = read_model(base).spec
    tokenizer = load_tokenizer(base)
    added = add_template_tokens(tokenizer)  # their embedding rows train beside the adapters
    seq_len = min(cfg.data.seq_len, spec.max_seq_len)
    engines, lora, objectives = _backend_modules(backend, "engine", "lora", "objectives")
    engine = engines.Engine(cfg.train, cfg.optim)
    try:
        run_folder = RunFolder(cfg.out, force=force, resume=resume, inputs=[*cfg.data.train, *cfg.data.val, str(base)])
        try:
            train_rows, val_rows, counts, held = build_data(cfg, tokenizer, seq_len)
            if cfg.data.batch_size % (cfg.train.grad_accum * engine.world):
                raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into train.grad_accum="
                                  f"{cfg.train.grad_accum} x {engine.world} process(es).")
            source = PackedBatches(train_rows, val_rows, cfg.data.batch_size, cfg.train.seed, cfg.train.eval_batches)
            if cfg.train.steps <= 0:  # 0: data.epochs passes over the training rows
                cfg.train.steps = max(1, math.ceil(cfg.epochs * source.steps_per_epoch()))
            if counts["truncated"]:
                ui.warn(f"{counts['truncated']} example(s) longer than data.seq_len={seq_len} tokens were cut")
            settings = cfg.lora.settings()
            names: list[str] = []

            def prepare(model: Any) -> None:
                if cfg.quantize_base:
                    done = lora.quantize_base(model, cfg.quantize_base)
                    ui.info(f"--quantize-base {cfg.quantize_base}: {len(done)} layers quantized (group 64); layers whose "
                            "width is not a multiple of 64 stay in float")
                names.extend(lora.add_adapters(model, settings))
                if added:
                    settings.tokens = lora.add_token_rows(model, added)

            engine.load(base, trainable=lora.is_adapter_param, prepare=prepare)
            trained = sum(math.prod(t.shape) for t in lora.peft_tensors(engine.model).values())
            if added:
                ui.info(f"the chat template's tokens {[tokenizer.id_to_token(i) for i in added]} were missing from the "
                        f"tokenizer: added as ids {added}; their rows of {', '.join(settings.tokens)} train too")
            ui.info(f"{len(names)} layers adapted (rank {settings.rank}), {trained / 1e6:.3g}M trained parameters; "
                    f"{counts['examples']} examples in {counts['rows']} rows of {seq_len} tokens, "
                    f"{counts['val_examples']} held out; {cfg.train.steps} steps -> {run_folder.path}")
        except BaseException:
            run_folder.restore()
            raise
        adapter_dir = run_folder.path / "adapter"
        before = exact_match(engine.model, tokenizer, held, backend) if held and not resume else None

        def export() -> None:
            if ui.is_main_process():
                from llmctl.io.outputs import replacing

                with replacing(adapter_dir) as staged:
                    staged.mkdir(parents=True, exist_ok=True)
                    lora.write_peft(staged, engine.model, settings, str(cfg.model))
                    tokenizer.save(staged)

        key = {"model": str(base), "lora": to_dict(cfg.lora), "data.seq_len": seq_len, "data.batch_size": cfg.data.batch_size,
               "data.train": list(cfg.data.train), "train.steps": cfg.train.steps, "train.grad_accum": cfg.train.grad_accum,
               "train.seed": cfg.train.seed, "quantize_base": cfg.quantize_base, "processes": engine.world}
        job = Job(loop=cfg.train, optim=cfg.optim, run=run_folder, source=source, objective=objectives.NextToken(), resume_key=key,
                  config_text=to_yaml(cfg), resume=resume, tokens_per_step=cfg.data.batch_size * seq_len,
                  flops_per_unit=spec.flops_per_token(seq_len, training=True), started=run_folder.settle, export=export)
        if not loop.run_settled(engine, job):
            return None
        if held:
            after = exact_match(engine.model, tokenizer, held, backend)
            shown = "" if before is None else f"{before:.0%} before, "
            ui.info(f"held-out exact match on {len(held)} built-in tasks: {shown}{after:.0%} after")
            if ui.is_main_process():
                run_folder.log({"step": cfg.train.steps, "exact_match_before": before, "exact_match_after": after})
        ui.info(f"adapter written to {adapter_dir}")
        return adapter_dir
    finally:
        engine.close()


def _backend_modules(backend: str, *names: str) -> list[Any]:
    """`llmctl.backends.<backend>.<name>` for each name (imported here: torch or MLX only when asked for)."""
    import importlib

    return [importlib.import_module(f"llmctl.backends.{backend}.{name}") for name in names]


def exact_match(model: Any, tokenizer: Any, convs: list, backend: str = "torch", max_new: int = 12) -> float:
    """Share of held-out conversations whose reply greedy decoding reproduces exactly (up to the end of turn)."""
    from llmctl.data.chat import ChatEncoder
    from llmctl.generation import SamplingParams

    (generate,) = _backend_modules(backend, "generate")
    encoder = ChatEncoder(tokenizer)
    was_training = model.training
    model.eval()
    prompts = [tokenizer.encode(encoder.render(conv[:-1], True), add_special_tokens=False) for conv in convs]
    params = SamplingParams(max_tokens=max_new, stop_ids=frozenset(tokenizer.eos_token_ids))
    outs = generate.Generator(model).generate_batch(prompts, params)
    model.train(was_training)
    right = sum(reply_text(tokenizer, [t for t in out if t not in tokenizer.eos_token_ids]).strip()
                == conv[-1]["content"].strip() for conv, out in zip(convs, outs))
    return right / max(1, len(convs))


def reply_text(tokenizer: Any, ids: list[int]) -> str:
    """A generated reply's text, up to its first end-of-turn marker (what the built-in tasks' checks compare)."""
    text = tokenizer.decode(ids)
    for end in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", tokenizer.eos_token):
        if end:
            text = text.split(end)[0]
    return text
