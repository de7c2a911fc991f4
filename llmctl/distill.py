"""`llmctl distill` on the shared loop: a student learns a frozen teacher's next-token distributions (or its cached
top-K) on text or chat data, with the loss alpha * T^2 * divergence + (1 - alpha) * next-token loss.

The run folder is `train`'s (config.yaml, metrics.jsonl, checkpoints, exact --resume); the student goes to
OUT/model/ with the teacher's tokenizer. Rows are fixed (text cut into windows, chat examples packed) so an epoch
means something and a teacher's top-K can be cached per row, beside OUT, for later epochs and other students.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl import ui
from llmctl.commands.options import DistillLoss
from llmctl.config import load_recipe, to_dict, to_yaml
from llmctl.errors import ConfigError, LlmctlError, TokenizerError
from llmctl.finetune import FinetuneData
from llmctl.training.batch import Batch, TopK
from llmctl.training.config import LoopConfig, OptimConfig, Strategy

TEACHER_PASS_TOKENS = 8192  # tokens per teacher forward pass while its top-K is cached


# --loss -> the objectives' names of the divergences (backends/*/objectives.py: divergence_from_logprobs)
DIVERGENCES = {DistillLoss.kl: "forward_kl", DistillLoss.reverse_kl: "reverse_kl", DistillLoss.jsd: "jsd",
               DistillLoss.skew_kl: "skew_kl"}


@dataclass
class LossConfig:
    kind: DistillLoss = DistillLoss.kl
    temperature: float = 1.0   # both distributions are softened by T; the divergence is scaled by T^2 (Hinton et al.)
    alpha: float = 0.5         # weight of the distillation term; 1 - alpha weighs the next-token loss
    beta: float = 0.5          # jsd: the teacher's weight in the mixture m = beta q + (1 - beta) p
    skew: float = 0.1          # skew-kl: the teacher's share of the mixture the student is compared through

    def problems(self) -> list[str]:
        out = []
        if not self.temperature > 0:
            out.append(f"loss.temperature={self.temperature}: must be greater than 0.")
        if not 0 <= self.alpha <= 1:
            out.append(f"loss.alpha={self.alpha}: must be in [0, 1] (the distillation term's weight).")
        if not 0 < self.beta < 1:
            out.append(f"loss.beta={self.beta}: must be in (0, 1); at 0 or 1 the Jensen-Shannon divergence is 0.")
        if not 0 <= self.skew < 1:
            out.append(f"loss.skew={self.skew}: must be in [0, 1) (0 is plain kl; at 1 the divergence is 0).")
        return out

    def objective(self, teacher: Any, backend: str) -> Any:
        """The backend's Distill objective with these settings (teacher None: batches carry its cached top-K)."""
        if backend == "torch":
            from llmctl.backends.torch.objectives import Distill
        else:
            from llmctl.backends.mlx.objectives import Distill
        coefficient = self.skew if self.kind == DistillLoss.skew_kl else self.beta
        return Distill(teacher, DIVERGENCES[self.kind], coefficient, self.temperature, self.alpha)


@dataclass
class DistillConfig:
    teacher: str | None = None         # model folder, Hugging Face id or .gguf; frozen
    student: str | None = None         # a model folder the student starts from (it must share the teacher's tokenizer)
    student_recipe: str | None = None  # or a fresh student: a model shape under recipes/train/ (or a YAML path)
    data: FinetuneData = field(default_factory=lambda: FinetuneData(seq_len=256, batch_size=16))  # text or chat files
    loss: LossConfig = field(default_factory=LossConfig)
    cache_topk: int = 0                # > 0: the teacher's top-K log-probabilities are cached on disk and it runs once
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=0, eval_every=50, save_every=100))
    epochs: float = 1.0                # passes over the training rows, when train.steps is 0
    strategy: Strategy = Strategy.ddp
    out: Path = Path("runs/distill")


def check_config(cfg: DistillConfig) -> None:
    """Every nonsense value at once, before anything is read or written."""
    problems = [p for g in (cfg.data, cfg.loss, cfg.optim) for p in g.problems()]
    problems += [p for p in cfg.train.problems() if not p.startswith("train.steps=")]
    if not cfg.teacher:
        problems.append("teacher is not set: pass --teacher DIR.")
    if bool(cfg.student) == bool(cfg.student_recipe):
        problems.append("give exactly one of --student DIR (a model to start from) and --student-recipe NAME (a fresh "
                        f"model; student={cfg.student!r}, student_recipe={cfg.student_recipe!r}).")
    if cfg.cache_topk < 0:
        problems.append(f"cache_topk={cfg.cache_topk}: must be 0 (no cache) or more.")
    if not cfg.epochs > 0:
        problems.append(f"epochs={cfg.epochs}: must be greater than 0.")
    if problems:
        raise ConfigError("the recipe has values no run can use:\n  " + "\n  ".join(problems),
                          hint="Fix these flags, recipe keys or key=value overrides.")


# -- teacher and student ------------------------------------------------------------------------------------------

def tokenizer_differences(teacher: Any, student: Any) -> list[str]:
    """What differs between two tokenizers in ways that change token ids (empty: they agree)."""
    out = []
    if teacher.vocab_size != student.vocab_size:
        out.append(f"vocabulary: {teacher.vocab_size} tokens vs {student.vocab_size}")
    else:
        a, b = ({i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()} for tok in (teacher, student))
        differ = sorted(i for i in a if a[i] != b.get(i))
        if differ:
            out.append(f"{len(differ)} token(s) differ, the first id {differ[0]}: {a[differ[0]]!r} vs {b.get(differ[0])!r}")
    for name in ("bos", "eos", "pad"):
        ta, tb = getattr(teacher, f"{name}_token"), getattr(student, f"{name}_token")
        if ta != tb:
            out.append(f"{name} token: {ta!r} vs {tb!r}")
    if not out:
        ja, jb = json.loads(teacher.backend.to_str()), json.loads(student.backend.to_str())
        out += [f"tokenizer.json's {key}" for key in ("normalizer", "pre_tokenizer", "model") if ja.get(key) != jb.get(key)]
    return out


def check_pair(teacher: Path, teacher_spec: Any, tokenizer: Any, student: Path | None, student_spec: Any) -> None:
    """Refuse a student whose tokens are not the teacher's: distillation compares distributions id by id."""
    from llmctl.io.model_folder import load_tokenizer

    differences = []
    if teacher_spec.vocab_size != student_spec.vocab_size:
        differences.append(f"vocab_size (rows of the embedding and head): {teacher_spec.vocab_size} vs {student_spec.vocab_size}")
    if student is not None and any((student / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        differences += tokenizer_differences(tokenizer, load_tokenizer(student))
    if differences:
        raise TokenizerError(
            f"the teacher {teacher} and the student {student} have different tokenizers (teacher vs student):\n  "
            + "\n  ".join(differences),
            hint="Distillation compares next-token distributions id by id: the student needs the teacher's tokenizer. "
                 "--student-recipe NAME builds a fresh student with it.")


def student_spec(cfg: DistillConfig, teacher_spec: Any, tokenizer: Any) -> tuple[Any, Path | None]:
    """The student's spec, and its folder when it starts from one (None: a fresh model of a train recipe's shape)."""
    from llmctl.io.hub import resolve_model
    from llmctl.io.model_folder import read_model

    if cfg.student:
        folder = resolve_model(cfg.student)
        model = read_model(folder)
        if model.quantization:  # its quantized layers could not train, and the written student would lack them
            raise ConfigError(f"--student {cfg.student} is a quantized model; distillation trains every weight of a "
                              "float student.", hint="Distill into the float model, then `llmctl quantize` the result.")
        return model.spec, folder
    from llmctl.commands.train import TrainConfig
    from llmctl.pretrain import _spec

    try:
        shape = load_recipe(TrainConfig, "train", cfg.student_recipe, [], {})
    except ConfigError as e:
        raise ConfigError(f"--student-recipe {cfg.student_recipe}: {e.message}", hint=e.hint) from None
    if shape.model.from_:
        raise ConfigError(f"--student-recipe {cfg.student_recipe}: the recipe continues model.from={shape.model.from_}; "
                          "a student recipe gives a shape (dim, n_layers, n_heads, ...).", hint="Use --student DIR for that model.")
    shape.model.vocab_size = teacher_spec.vocab_size  # the teacher's rows, padding included, so the logits line up
    shape.model.max_seq_len = shape.model.max_seq_len or teacher_spec.max_seq_len
    return _spec(shape, tokenizer)[0], None


# -- data -----------------------------------------------------------------------------------------------------------

def is_chat(files: Sequence[Path]) -> bool:
    """Chat/instruction data when a JSONL file's first record is one (its loss goes on the replies), else text."""
    from llmctl.data.chat import read_records

    for path in files:
        if path.suffix == ".jsonl":
            first = next(iter(read_records(path)), None)
            if first is not None and not isinstance(first[1], str):
                return True
    return False


def windows(stream: np.ndarray, seq_len: int) -> Batch:
    """A token stream cut into consecutive rows of seq_len predictions (each row's last token starts the next)."""
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return Batch.from_windows(np.asarray(stream[idx], dtype=np.int64))


def build_rows(cfg: DistillConfig, tokenizer: Any, seq_len: int) -> tuple[Batch, Batch, str]:
    """Training and validation rows and what they are ("text" or "chat")."""
    from llmctl.data.text import TokenData, expand_sources, split, tokenize_files

    from llmctl.finetune import DEFAULT_TASKS, build_data

    files = expand_sources(cfg.data.train, "data.train") if cfg.data.train and cfg.data.train != [DEFAULT_TASKS] else []
    if not files or is_chat(files):

        train, val, counts, _ = build_data(cfg, tokenizer, seq_len)  # finetune-lora's path: templates, reply masks, packing
        if counts["truncated"]:
            ui.warn(f"{counts['truncated']} example(s) longer than data.seq_len={seq_len} tokens were cut")
        return train, val, "chat"
    tokens = tokenize_files(files, tokenizer)
    if cfg.data.val:
        data = TokenData(tokens, tokenize_files(expand_sources(cfg.data.val, "data.val"), tokenizer, "data.val"), seq_len)
    else:
        data = split(tokens, cfg.data.val_fraction, seq_len)
    return windows(data.train, seq_len), windows(data.val, seq_len), "text"


# -- the teacher's cached top-K ----------------------------------------------------------------------------------------

def cache_folder(cfg: DistillConfig, teacher: Path, rows: Sequence[Batch]) -> Path:
    """Beside OUT, named by what the cached values depend on: the teacher's files, K, the temperature and the rows."""
    h = hashlib.sha256(json.dumps([cfg.cache_topk, cfg.loss.temperature]).encode())
    files = [teacher] if teacher.is_file() else sorted(p for p in teacher.iterdir()
                                                       if p.suffix in (".json", ".safetensors", ".gguf") and p.is_file())
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    for batch in rows:
        h.update(np.ascontiguousarray(batch.input_ids).tobytes())
        h.update(b"-" if batch.segment_ids is None else np.ascontiguousarray(batch.segment_ids).tobytes())
    return Path(cfg.out).resolve().parent / "teacher-cache" / h.hexdigest()[:20]


def open_cache(folder: Path, name: str) -> TopK:
    return TopK(*(np.load(folder / f"{name}.{part}.npy", mmap_mode="r") for part in ("ids", "logprobs", "rest")))


def write_cache(folder: Path, teacher: Any, backend: str, splits: dict[str, Batch], k: int, temperature: float,
                rows_per_pass: int) -> None:
    """Run the teacher once over every row and store its top-K (numpy files, filled under a temporary name)."""
    if backend == "torch":
        from llmctl.backends.torch.objectives import DeviceBatch, teacher_topk

        device = next(teacher.parameters()).device
        to_device, to_numpy = (lambda b: DeviceBatch.of(b, device)), (lambda a: a.cpu().numpy())
    else:
        from llmctl.backends.mlx.objectives import DeviceBatch, teacher_topk

        to_device, to_numpy = DeviceBatch.of, np.asarray
    from llmctl.io.outputs import write_error

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        total = sum(b.rows for b in splits.values())
        with ui.progress(total, f"teacher top-{k}", log_every=max(1, total // 10)) as bar:
            for name, batch in splits.items():
                B, T = batch.input_ids.shape
                arrays = [np.lib.format.open_memmap(tmp / f"{name}.{part}.npy", "w+", dtype, shape)
                          for part, dtype, shape in (("ids", np.int32, (B, T, k)), ("logprobs", np.float32, (B, T, k)),
                                                     ("rest", np.float32, (B, T)))]
                for start in range(0, B, rows_per_pass):
                    part = batch.slice(start, start + rows_per_pass)
                    for array, value in zip(arrays, teacher_topk(teacher, to_device(part), k, temperature)):
                        array[start : start + part.rows] = to_numpy(value)
                    bar.update(part.rows)
                for array in arrays:
                    array.flush()
        rows = {name: batch.rows for name, batch in splits.items()}
        (tmp / "cache.json").write_text(json.dumps({"k": k, "temperature": temperature, "rows": rows}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:  # a full disk: say which folder, and leave no half cache behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise (write_error(e, folder) or e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- the run ----------------------------------------------------------------------------------------------------------

def run(cfg: DistillConfig, backend: str, force: bool = False, resume: bool = False, keep_zeros: bool = False) -> Path | None:
    """Distill; the student's model folder, or None when stopped early (train.stop_at). `keep_zeros`: the student's
    zero weights in its blocks' matrices stay zero (a sparse-pruned student, torch backend)."""
    from llmctl.data.chat import PackedBatches
    from llmctl.io.hub import resolve_model
    from llmctl.io.model_folder import load_tokenizer, read_model
    from llmctl.pretrain import _engine
    from llmctl.run import RunFolder, remember_model
    from llmctl.training import loop
    from llmctl.training.loop import Job

    check_config(cfg)
    teacher_path = resolve_model(cfg.teacher)
    teacher_spec = read_model(teacher_path).spec
    tokenizer = load_tokenizer(teacher_path)
    spec, student_path = student_spec(cfg, teacher_spec, tokenizer)
    check_pair(teacher_path, teacher_spec, tokenizer, student_path, spec)
    seq_len = min(cfg.data.seq_len, teacher_spec.max_seq_len, spec.max_seq_len)
    engine = _engine(backend, cfg)
    try:
        # Process 0 sets up the run folder, data and cache first; the others then find them.
        if engine.rank != 0 and engine.barrier():
            raise LlmctlError("process 0 failed while preparing the run; its own error message says why.")
        inputs = [*cfg.data.train, *cfg.data.val, str(teacher_path), student_path]
        run_folder = RunFolder(cfg.out, force=force, resume=resume, inputs=inputs)
        try:
            train_rows, val_rows, kind = build_rows(cfg, tokenizer, seq_len)
            if cfg.data.batch_size % (cfg.train.grad_accum * engine.world):
                raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into train.grad_accum="
                                  f"{cfg.train.grad_accum} x {engine.world} process(es).")
            teacher = None if cfg.cache_topk else engine.load_frozen(teacher_path)
            if cfg.cache_topk:  # every batch carries what the loss needs of the teacher, which runs once, here
                k = min(cfg.cache_topk, teacher_spec.vocab_size)
                folder = cache_folder(cfg, teacher_path, [train_rows, val_rows])
                if (folder / "cache.json").is_file():
                    ui.info(f"the teacher's top-{k} comes from {folder}")
                else:
                    write_cache(folder, engine.load_frozen(teacher_path), backend, {"train": train_rows, "val": val_rows},
                                k, cfg.loss.temperature, rows_per_pass=max(1, TEACHER_PASS_TOKENS // seq_len))
                    ui.info(f"the teacher's top-{k} is cached in {folder}")
                train_rows.topk, val_rows.topk = open_cache(folder, "train"), open_cache(folder, "val")
        except BaseException:
            run_folder.restore()
            if engine.rank == 0:
                engine.barrier(failed=True)
            raise
        if engine.rank == 0:
            engine.barrier()
        source = PackedBatches(train_rows, val_rows, cfg.data.batch_size, cfg.train.seed, cfg.train.eval_batches)
        if cfg.train.steps <= 0:  # 0: `epochs` passes over the training rows
            cfg.train.steps = max(1, math.ceil(cfg.epochs * source.steps_per_epoch()))
        objective = cfg.loss.objective(teacher, backend)
        shape = spec.to_dict() | {"rope_scaling": to_dict(spec.rope_scaling)}
        key = {"teacher": str(teacher_path), "student": str(student_path), "model": shape, "loss": to_dict(cfg.loss),
               "cache_topk": cfg.cache_topk, "data.train": list(cfg.data.train), "data.seq_len": seq_len,
               "data.batch_size": cfg.data.batch_size, "train.steps": cfg.train.steps,
               "train.grad_accum": cfg.train.grad_accum, "train.seed": cfg.train.seed, "processes": engine.world}
        job = Job(loop=cfg.train, optim=cfg.optim, run=run_folder, source=source, objective=objective, resume_key=key,
                  config_text=to_yaml(cfg), resume=resume, tokens_per_step=cfg.data.batch_size * seq_len,
                  flops_per_unit=spec.flops_per_token(seq_len, training=True), save_extras=tokenizer.save,
                  started=run_folder.settle)
        try:
            if student_path is None:
                engine.build(spec)
            else:
                engine.load(student_path, prepare=keep_zero_weights if keep_zeros else None)
            ui.info(f"student {spec.param_count() / 1e6:.3g}M parameters, teacher {teacher_spec.param_count() / 1e6:.3g}M; "
                    f"{train_rows.rows} {kind} rows of {seq_len} tokens ({train_rows.target_count:,} targets), "
                    f"{val_rows.rows} held out; loss {cfg.loss.kind.value}; {cfg.train.steps} steps -> {run_folder.path}")
            finished = loop.run(engine, job)
        except BaseException:
            run_folder.restore()  # no-op once the first step settled the folder
            raise
        run_folder.settle()
        if not finished:
            return None
        remember_model(run_folder.model_dir)
        ui.info(f"student written to {run_folder.model_dir}")
        return run_folder.model_dir
    finally:
        engine.close()


def keep_zero_weights(model: Any) -> None:
    """Mask the gradient of every zero in the blocks' weight matrices (torch): with a zero gradient from the start,
    Adam's moments stay zero and so does its update, and decoupled weight decay keeps zero at zero, so the sparsity
    (and an N:M pattern) of a pruned student survives training exactly."""
    for name, p in model.named_parameters():
        if p.dim() == 2 and ".layers." in f".{name}" and bool((p == 0).any()):
            keep = (p != 0).to(p.dtype)
            p.register_hook(lambda grad, keep=keep: grad * keep)


def distill(teacher: str | Path, student: str | Path | None, data: Sequence[str] | None, steps: int, out: str | Path, *,
            student_recipe: str | None = None, backend: str = "torch", recipe: str = "default",
            overrides: Sequence[str] = (), force: bool = False, keep_zeros: bool = False) -> Path | None:
    """Distill `teacher` into `student` (a model folder; or a fresh `student_recipe` shape) for `steps` steps on `data`
    (None: the built-in tasks): what another command (prune --recover) calls in-process. The student's folder."""
    flags = {"teacher": str(teacher), "student": str(student) if student else None, "student_recipe": student_recipe,
             "data.train": list(data) if data else None, "train.steps": steps or None, "out": Path(out)}
    cfg = load_recipe(DistillConfig, "distill", recipe, list(overrides), flags)
    return run(cfg, backend, force=force, keep_zeros=keep_zeros)
