"""`llmctl align` on the shared loop: preference pairs (or KTO examples), a policy with a reference beside it, and
the adapter (--lora), the model, or a reward model out.

The reference costs no second copy with --lora (the policy with its adapters switched off); otherwise it is a frozen
model in the same process, or, with --precompute-ref, its log-probabilities computed once, kept in the run folder
(so --resume reuses them) and the model freed before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl import ui
from llmctl.config import to_dict, to_yaml
from llmctl.errors import ConfigError, DataError
from llmctl.finetune import LoraConfig, data_problems, resolve_base
from llmctl.preference import REFERENCE_FREE, PreferenceSettings, same_tokenizer
from llmctl.rl import RL_METHODS, RLSettings, check_rl
from llmctl.training.config import LoopConfig, OptimConfig, at_least

DEFAULT_PAIRS = "builtin:tasks"  # data.train's value for the built-in task pairs (correct answer chosen)
REFERENCE_FILE = "reference_logps.npz"
LR_FULL, LR_LORA = 5e-6, 5e-5     # optim.lr 0 picks one of these


@dataclass
class AlignData:
    train: list[str] = field(default_factory=list)  # preference JSONL files; empty: the built-in task pairs
    val: list[str] = field(default_factory=list)    # empty: hold out data.val_fraction of the training pairs
    val_fraction: float = 0.1
    seq_len: int = 1024          # tokens per sequence, prompt + response (the model's context, if shorter)
    batch_size: int = 8          # pairs (KTO: examples) per optimizer step, over processes and accumulation steps

    def problems(self) -> list[str]:
        return data_problems(self)


@dataclass
class AlignConfig:
    model: str | None = None     # the policy's start: folder, Hugging Face id or .gguf; empty: the latest llmctl made
    ref: str | None = None       # the reference model; empty: the starting model (with lora: its adapters switched off)
    pref: PreferenceSettings = field(default_factory=PreferenceSettings)
    rl: RLSettings = field(default_factory=RLSettings)  # --method grpo: sampling, rewards, the GRPO loss
    use_lora: bool = False       # train LoRA adapters (lora.*) instead of every weight
    lora: LoraConfig = field(default_factory=LoraConfig)
    precompute_ref: bool = False  # reference log-probabilities computed once and cached; the reference freed
    data: AlignData = field(default_factory=AlignData)  # grpo: data.train the prompt files, data.batch_size completions
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.0))  # lr 0: 5e-6, or 5e-5 with lora
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, eval_every=50, save_every=100))
    epochs: float = 1.0          # passes over the training pairs, when train.steps is 0
    out: Path = Path("runs/align")


def check_config(cfg: AlignConfig) -> None:
    if cfg.optim.lr == 0:
        cfg.optim.lr = LR_LORA if cfg.use_lora else LR_FULL
    problems = [p for g in (cfg.pref, cfg.data, cfg.lora, cfg.optim) for p in g.problems()]
    problems += [p for p in cfg.train.problems() if not p.startswith("train.steps=")]
    if not cfg.epochs > 0:
        problems.append(f"epochs={cfg.epochs}: must be greater than 0.")
    if cfg.pref.method == "reward" and cfg.use_lora:
        problems.append("--lora with --method reward: a reward model trains every weight and its score head.")
    if cfg.pref.method in RL_METHODS:
        problems += check_rl(cfg)
    elif cfg.pref.method in REFERENCE_FREE and (cfg.ref or cfg.precompute_ref):
        problems.append(f"--ref/--precompute-ref with --method {cfg.pref.method}: this method uses no reference.")
    if problems:
        raise ConfigError("the recipe has values no run can use:\n  " + "\n  ".join(problems),
                          hint="Fix these keys in the recipe or the key=value overrides.")


def build_examples(cfg: AlignConfig, tokenizer: Any, seq_len: int) -> tuple[list, list, Any]:
    """Training and held-out examples, and the counts of what was skipped or cut."""
    from llmctl.data.preferences import Counts, PreferenceEncoder, encode_files, unpair
    from llmctl.data.text import expand_sources

    encoder, counts = PreferenceEncoder(tokenizer, seq_len), Counts()
    if not cfg.data.train or cfg.data.train == [DEFAULT_PAIRS]:
        from llmctl.data.tasks import task_preferences

        train_records, val_records = task_preferences(cfg.train.seed)
        train = [ex for i, rec in enumerate(train_records) for ex in encoder.encode(rec, f"built-in pair {i}", counts)]
        val = [ex for i, rec in enumerate(val_records) for ex in encoder.encode(rec, f"built-in pair {i}", counts)]
    else:
        train = encode_files(expand_sources(cfg.data.train, "data.train"), encoder, counts)
        if cfg.data.val:
            val = encode_files(expand_sources(cfg.data.val, "data.val"), encoder, counts)
        else:
            order = np.random.default_rng(cfg.train.seed).permutation(len(train))
            n_val = max(1, int(len(train) * cfg.data.val_fraction)) if len(train) > 1 else 0
            val, train = [train[i] for i in order[:n_val]], [train[i] for i in sorted(order[n_val:])]
    if cfg.pref.method == "kto":
        train, val = unpair(train), unpair(val)
    if not train:
        raise DataError(f"no preference pair is left to train on ({counts.identical} had identical chosen and rejected, "
                        f"{counts.too_long} a response longer than data.seq_len={seq_len} tokens).",
                        hint="Check data.train, or raise data.seq_len.")
    return train, val or train[:1], counts


def precompute(engine: Any, reference: Any, source: Any, path: Path, resume: bool) -> None:
    """Reference log-probabilities of every training and held-out example, cached in `path` (reused on --resume)."""
    if resume and path.is_file():
        cached = np.load(path)
        source.train_ref, source.val_ref = cached["train"], cached["val"]
        return
    from llmctl.io.outputs import replacing

    source.train_ref = engine.reference_logps(reference, source.rows, source.train)
    source.val_ref = engine.reference_logps(reference, source.rows, source.val)
    if ui.is_main_process():
        with replacing(path) as staged:
            with open(staged, "wb") as f:
                np.savez(f, train=source.train_ref, val=source.val_ref)


def run(cfg: AlignConfig, backend: str, force: bool = False, resume: bool = False) -> Path | None:
    """Align a model; the adapter or model folder, or None when stopped early (train.stop_at)."""
    from llmctl.data.preferences import PreferenceBatches, Rows
    from llmctl.io.model_folder import load_tokenizer, read_model
    from llmctl.run import RunFolder
    from llmctl.training import loop
    from llmctl.training.loop import Job

    check_config(cfg)
    s = cfg.pref
    if s.method in RL_METHODS:
        from llmctl import rl

        return rl.run(cfg, backend, force=force, resume=resume)
    base = resolve_base(cfg)
    spec = read_model(base).spec
    tokenizer = load_tokenizer(base)
    ref_folder = None
    if s.method not in REFERENCE_FREE and (cfg.ref or not cfg.use_lora):
        from llmctl.io.hub import resolve_model

        ref_folder = resolve_model(cfg.ref) if cfg.ref else base
        if cfg.ref:
            same_tokenizer(tokenizer, load_tokenizer(ref_folder), f"--ref {cfg.ref}")
    seq_len = min(cfg.data.seq_len, spec.max_seq_len)
    import importlib

    engine = importlib.import_module(f"llmctl.backends.{backend}.align").AlignEngine(cfg.train, cfg.optim)
    try:
        run_folder = RunFolder(cfg.out, force=force, resume=resume,
                               inputs=[*cfg.data.train, *cfg.data.val, str(base), str(ref_folder or base)])
        try:
            train, val, counts = build_examples(cfg, tokenizer, seq_len)
            if cfg.data.batch_size % (cfg.train.grad_accum * engine.world):
                raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into train.grad_accum="
                                  f"{cfg.train.grad_accum} x {engine.world} process(es).")
            kind = "reward" if s.method == "reward" else "kto" if s.method == "kto" else "pairs"
            pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
            source = PreferenceBatches(Rows(kind, pad, seq_len), train, val, cfg.data.batch_size, cfg.train.seed,
                                       cfg.train.eval_batches)
            if cfg.train.steps <= 0:
                cfg.train.steps = max(1, math.ceil(cfg.epochs * source.steps_per_epoch()))
            skipped = [f"{counts.identical} with identical chosen and rejected"] if counts.identical else []
            skipped += [f"{counts.too_long} whose response is longer than {seq_len} tokens"] if counts.too_long else []
            if skipped:
                ui.warn(f"skipped {' and '.join(skipped)}")
            if counts.cut_prompts:
                ui.info(f"[dim]{counts.cut_prompts} sequence(s) had their prompt cut from the left to fit {seq_len} tokens[/]")
            engine.setup(base, cfg.lora.settings() if cfg.use_lora else None, s.method == "reward")
            # Precomputed from the starting policy itself (adapters off) unless --ref names another model.
            own = ref_folder is None or (cfg.precompute_ref and not cfg.ref)
            reference = None if s.method in REFERENCE_FREE else "adapters" if own else engine.load_frozen(ref_folder)
            if cfg.precompute_ref:
                precompute(engine, reference, source, run_folder.path / REFERENCE_FILE, resume)
                reference = None  # freed: the batches carry its log-probabilities
            objective = engine.objective(s, reference)
            mean_tokens = float(np.mean([len(ex.chosen.tokens) for ex in train[:1000]]))
            said = ("none" if s.method in REFERENCE_FREE else "precomputed" if cfg.precompute_ref
                    else "the base (adapters off)" if reference == "adapters" else str(ref_folder))
            ui.info(f"align --method {s.method}: {len(train)} {'examples' if kind == 'kto' else 'pairs'}, {len(val)} held "
                    f"out; {engine.trained_parameters() / 1e6:.3g}M trained parameters; reference: {said}; "
                    f"{cfg.train.steps} steps -> {run_folder.path}")
        except BaseException:
            run_folder.restore()
            raise
        engine.set_train(False)
        before = engine.evaluate(objective, source.val_batches(2 * max(1, cfg.data.batch_size))) if not resume else None
        engine.set_train(True)
        out_dir = run_folder.path / ("adapter" if cfg.use_lora else "model")

        def export() -> None:
            engine.write_output(out_dir, base, tokenizer, cfg.lora.settings() if cfg.use_lora else None, str(cfg.model), pad)

        key = {"model": str(base), "ref": str(ref_folder), "pref": to_dict(s), "use_lora": cfg.use_lora,
               "lora": to_dict(cfg.lora), "data.seq_len": seq_len, "data.batch_size": cfg.data.batch_size,
               "data.train": list(cfg.data.train), "train.steps": cfg.train.steps, "train.grad_accum": cfg.train.grad_accum,
               "train.seed": cfg.train.seed, "precompute_ref": cfg.precompute_ref, "processes": engine.world}
        job = Job(loop=cfg.train, optim=cfg.optim, run=run_folder, source=source, objective=objective, resume_key=key,
                  config_text=to_yaml(cfg), resume=resume, tokens_per_step=int(2 * cfg.data.batch_size * mean_tokens),
                  flops_per_unit=spec.flops_per_token(int(mean_tokens), training=True), started=run_folder.settle,
                  export=export)
        if not loop.run_settled(engine, job):
            return None
        engine.set_train(False)
        after = engine.evaluate(objective, source.val_batches(2 * max(1, cfg.data.batch_size)))
        shown = "" if before is None else f"{before['accuracy']:.0%} before, "
        ui.info(f"held-out {'reward' if kind == 'reward' else 'implicit-reward'} accuracy on {len(val)} "
                f"{'examples' if kind == 'kto' else 'pairs'}: {shown}{after['accuracy']:.0%} after")
        if ui.is_main_process():
            run_folder.log({"step": cfg.train.steps, "accuracy_before": None if before is None else before["accuracy"],
                            "accuracy_after": after["accuracy"]})
        ui.info(f"{'adapter' if cfg.use_lora else 'reward model' if kind == 'reward' else 'model'} written to {out_dir}")
        return out_dir
    finally:
        engine.close()
