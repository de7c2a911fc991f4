"""`llmctl quantize`: post-training weight quantization into MLX's layout (RTN, AWQ, GPTQ, NF4) or a GGUF file."""

from __future__ import annotations

import enum
import fnmatch
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.backends import Backend
from llmctl.commands.options import DType, GGUFType
from llmctl.training.config import DataConfig, LoopConfig, OptimConfig


class Method(str, enum.Enum):
    rtn = "rtn"    # round to nearest, group-wise affine
    awq = "awq"    # activation-aware scaling of salient input channels (calibrated)
    gptq = "gptq"  # second-order error compensation, column by column (calibrated)
    nf4 = "nf4"    # QLoRA's 4-bit NormalFloat, absmax per block
    qat = "qat"    # quantization-aware training on --data: the quantizer in the forward pass, scales learned


HEAD_BITS = 6  # the least bits of the output head (or tied embedding) in an affine --bits B folder: max(B, 6)


class Format(str, enum.Enum):
    folder = "folder"  # a model folder in mlx-lm's quantized layout
    gguf = "gguf"      # one .gguf file for llama.cpp / ollama


@dataclass
class QuantConfig:
    bits: int = 4                  # 2, 3, 4, 5, 6 or 8 (nf4: 4)
    group_size: int = 64           # values sharing one scale (and bias): 32, 64 or 128
    method: Method = Method.rtn
    double_quant: bool = False     # nf4: store the block scales in 8 bits too (QLoRA's double quantization)
    keep: list[str] = field(default_factory=list)  # module globs left in float (default: every matrix quantized)
    head_bits: int = 0             # the output head's (or tied embedding's) bits; 0: max(bits, 6)
    qat_loss: str = "kl"           # qat: kl (to the float model's next-token distribution) or ce (next-token loss on --data)


@dataclass
class CalibConfig:
    data: str | None = None        # awq/gptq: text file, .jsonl or folder; empty: Python's stdlib sources
    samples: int = 128             # windows of calibration text
    seq_len: int = 512             # tokens per window
    seed: int = 0


@dataclass
class QuantizeConfig:
    model: str = ""                # the float model folder (or Hugging Face id) to quantize
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    format: Format = Format.folder
    gguf_type: GGUFType = GGUFType.q4_0  # --format gguf: the type of the weight matrices
    # qat: training text (data.train is --data), optimizer and loop as `llmctl train` has them, tuned for a short run
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=256, batch_size=8))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=10))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(steps=100, dtype=DType.fp32, save_every=0))
    out: Path = Path("")


def quantize(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value, e.g. quant.bits=8 calib.samples=64")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Float model folder or Hugging Face id.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (or FILE.gguf with --format gguf).")] = None,
    bits: Annotated[int | None, typer.Option(help="Bits per weight: 2, 3, 4, 5, 6, 8.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Weights per scale: 32, 64, 128.")] = None,
    method: Annotated[Method | None, typer.Option(help="rtn, awq, gptq (calibrated), nf4 or qat (trained on --data).")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration text for awq/gptq (default: built-in).")] = None,
    data: Annotated[list[str] | None, typer.Option(help="qat: training text (files, folders, globs; repeatable).")] = None,
    steps: Annotated[int | None, typer.Option(help="qat: optimizer steps.")] = None,
    keep: Annotated[list[str] | None, typer.Option(help="Module glob to keep in float (repeatable); by default every matrix is quantized.")] = None,
    double_quant: Annotated[bool | None, typer.Option("--double-quant", help="nf4: quantize the block scales too.")] = None,
    format_: Annotated[Format | None, typer.Option("--format", help="folder (mlx-lm layout) or gguf.")] = None,
    type_: Annotated[GGUFType | None, typer.Option("--type", help="GGUF tensor type with --format gguf.")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Name under recipes/quantize/ or a YAML path.")] = "default",
    backend: Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")] = Backend.auto,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out.")] = False,
) -> None:
    """Quantize a float model's weights; writes a model folder in mlx-lm's layout (or a .gguf file) to --out."""
    from llmctl.config import load_recipe
    from llmctl.io.outputs import check_output

    if out is not None:
        check_output(out, [])  # `--out .` (the current folder) reads like "no --out" once it is a Path: refuse it here
    flags = {
        "model": model, "out": out, "quant.bits": bits, "quant.group_size": group_size, "quant.method": method.value if method else None,
        "calib.data": calib, "quant.keep": keep, "quant.double_quant": double_quant,
        "format": format_.value if format_ else None, "gguf_type": type_.value if type_ else None,
        "data.train": data, "train.steps": steps,
    }  # fmt: skip
    if format_ is None and (type_ is not None or (out is not None and out.suffix == ".gguf")):
        flags["format"] = Format.gguf.value  # --type q4_0 or --out model.gguf mean a GGUF file
    cfg = load_recipe(QuantizeConfig, "quantize", recipe, overrides or [], flags)
    run(cfg, backend, force)


def run(cfg: QuantizeConfig, backend: Backend | str = Backend.auto, force: bool = False) -> Path:
    """Check the request, quantize, write the output and print a summary; returns the output path."""
    from llmctl import ui
    from llmctl.backends import resolve_name
    from llmctl.config import to_yaml
    from llmctl.io.model_folder import read_model, write_model
    from llmctl.io.outputs import replacing
    from llmctl.io.safetensors import atomic_write_text
    from llmctl.memory import check_model_job
    from llmctl.quant import config_entry
    from llmctl.run import remember_model

    start = time.perf_counter()
    _defaults(cfg)
    _check(cfg, force)
    folder = read_model(cfg.model)
    if folder.quantization:
        raise _already_quantized(cfg.model)
    # A float32 copy of the weights to quantize from, plus the codes and the calibration's working set.
    check_model_job(folder, "quantizing", 6)
    if cfg.format == Format.gguf:
        return _write_gguf(cfg, folder)
    layers, kept, misfits = plan_layers(folder.tensors, cfg.quant, folder.spec.tie_embeddings)
    if not layers:
        from llmctl.errors import ConfigError

        raise ConfigError(
            f"no layer of {cfg.model} would be quantized: --keep {' '.join(cfg.quant.keep)} keeps "
            f"{len(kept)} and {len(misfits)} do not fit group size {cfg.quant.group_size}.",
            hint="Keep fewer modules in float (by default none is kept).",
        )
    for path in misfits:
        ui.warn(f"{path} is left in float: its width is not a multiple of group size {cfg.quant.group_size}.")
    if kept:
        ui.info(f"kept in float: {', '.join(kept)}")
    from llmctl.io.safetensors import is_finite

    broken = [n for n in sorted(folder.tensors) if not is_finite(folder.tensors[n])]
    if broken:
        from llmctl.errors import CheckpointError

        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        message = f"{cfg.model} has NaN or infinite weights in {', '.join(broken[:3])}{more}"
        if any(n.removesuffix(".weight") in layers for n in broken):
            raise CheckpointError(message + "; such weights cannot be quantized.", hint="Quantize a healthy checkpoint (an earlier one of the run).")
        ui.warn(message + "; they stay in float as they are.")
    import importlib

    quant = importlib.import_module(f"llmctl.backends.{resolve_name(backend)}.quant")
    default = _params(cfg.quant)
    rounded = layers  # quantized by round-to-nearest (or NF4)
    tensors = folder.tensors
    run_folder = None
    if cfg.quant.method in (Method.awq, Method.gptq, Method.qat):
        # the blocks' linear layers are calibrated (or trained); embeddings and the head (at more bits) are rounded
        calibrated = {path: p for path, p in layers.items() if p == default and ".layers." in f".{path}."}
        rounded = {path: p for path, p in layers.items() if path not in calibrated}
        if cfg.quant.method == Method.qat:
            tensors, run_folder = _qat(cfg, folder, calibrated)
        else:
            tensors = _calibrated(cfg, folder, calibrated, kept + misfits + list(rounded))
        layers = calibrated | rounded
    with ui.progress(len(rounded), f"{cfg.quant.method.value} {cfg.quant.bits}-bit") as bar:
        tensors = quant.quantize_tensors(tensors, rounded, on_layer=lambda path: bar.update(layer=path))
    _sixteen_bit_scales(tensors, layers)
    entry = config_entry(default, layers)
    try:
        with replacing(cfg.out) as staged:  # the old output (--force) stays until the new one is complete
            write_model(staged, folder.spec, tensors, folder.folder, folder.dtype, quantization=entry)
            atomic_write_text(staged / "llmctl_quantize.yaml", to_yaml(cfg))
            if run_folder is not None and (run_folder / "metrics.jsonl").is_file():
                shutil.copyfile(run_folder / "metrics.jsonl", staged / "qat_metrics.jsonl")
    finally:
        if run_folder is not None:
            shutil.rmtree(run_folder, ignore_errors=True)
    remember_model(cfg.out)
    _summary(folder.tensors, tensors, layers, time.perf_counter() - start, cfg.out)
    return Path(cfg.out)


def _defaults(cfg: QuantizeConfig) -> None:
    """No --model: the latest model llmctl wrote; no --out: a sibling `<model>-q<bits>` (one line says so)."""
    from llmctl import ui
    from llmctl.errors import ConfigError
    from llmctl.run import last_model

    defaulted = not cfg.model
    if defaulted:
        latest = last_model()
        if latest is None:
            raise ConfigError(
                "Cannot quantize: no --model given, and no model made by llmctl was found.",
                hint="Pass --model DIR (a model folder or a Hugging Face id), or run `llmctl train` to make one.",
            )
        cfg.model = str(_float_source(latest))
        if str(cfg.out) and str(cfg.out) != ".":  # else the one line below names both
            ui.info(f"[dim]--model not given: quantizing the latest model {latest}[/]")
    if not str(cfg.out) or str(cfg.out) == ".":
        source = Path(cfg.model)
        if not source.exists():  # a Hugging Face id: the output goes in the current folder, named after it
            source = Path(cfg.model.split("@")[0].rsplit("/", 1)[-1])
        suffix = "nf4" if cfg.quant.method == Method.nf4 else f"q{cfg.quant.bits}"
        stem = source.stem if source.suffix.lower() == ".gguf" else source.name
        if cfg.format == Format.gguf:
            cfg.out = source.with_name(f"{stem}-{cfg.gguf_type.value}.gguf")
        else:
            cfg.out = source.with_name(f"{stem}-{suffix}")
        latest_note = " (the latest model; --model not given)" if defaulted else ""
        ui.info(f"[dim]quantizing {cfg.model}{latest_note} -> {cfg.out}[/]")


def _float_source(model: Path) -> Path:
    """The latest model may be one `llmctl quantize` wrote: quantize the float model it was made from instead."""
    import yaml

    record = model / "llmctl_quantize.yaml"
    try:
        source = Path(yaml.safe_load(record.read_text(encoding="utf-8"))["model"]) if record.is_file() else None
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        source = None
    return source if source is not None and source.is_dir() else model


def _params(q: QuantConfig) -> Any:
    from llmctl.quant import QuantParams

    nf4 = q.method == Method.nf4
    return QuantParams(q.group_size, 4 if nf4 else q.bits, "nf4" if nf4 else "affine", nf4 and q.double_quant)


def _already_quantized(model: str) -> Exception:
    from llmctl.errors import CheckpointError

    return CheckpointError(
        f"{model} is already quantized (config.json has a quantization entry).",
        hint=f"Dequantize it first: `llmctl convert {model} --out {model}-fp32 --dtype fp32`, then quantize that.",
    )


def _check(cfg: QuantizeConfig, force: bool) -> None:
    """Every problem with the request, before any work: bits, group size, paths, calibration file."""
    from llmctl.errors import ConfigError, DataError
    from llmctl.quant import BITS, GROUP_SIZES

    q = cfg.quant
    problems = []
    if q.method == Method.nf4 and q.bits != 4:
        problems.append(f"--method nf4 stores 4 bits per weight, not --bits {q.bits}")
    elif q.bits not in BITS:
        problems.append(f"--bits {q.bits} is not supported; choose one of {', '.join(map(str, BITS))}")
    if q.head_bits and q.head_bits not in BITS:
        problems.append(f"quant.head_bits={q.head_bits} is not supported; choose one of {', '.join(map(str, BITS))} (0: max(bits, 6))")
    if q.group_size not in GROUP_SIZES:
        problems.append(f"--group-size {q.group_size} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}")
    if q.double_quant and q.method != Method.nf4:
        problems.append("--double-quant applies to --method nf4 only")
    if q.method == Method.qat and not cfg.data.train:
        problems.append("--method qat trains the model: pass its training text with --data")
    if q.qat_loss not in ("kl", "ce"):
        problems.append(f"quant.qat_loss={q.qat_loss!r}: expected kl (distil the float model) or ce (next-token loss)")
    if q.method == Method.qat and cfg.format == Format.gguf:
        problems.append("--method qat writes a model folder; convert it to GGUF afterwards with `llmctl convert`")
    if problems:
        raise ConfigError("Cannot quantize:\n  " + "\n  ".join(problems), hint="`llmctl quantize --help` lists the options.")
    if cfg.calib.data and not Path(cfg.calib.data).expanduser().exists():
        raise DataError(
            f"calibration data {cfg.calib.data}: no such file or folder.",
            hint="Pass a text file (.txt, .jsonl with \"text\") or leave --calib out to use the built-in default.",
        )
    from llmctl.io.outputs import check_output

    out = Path(cfg.out)
    check_output(out, [cfg.model, cfg.calib.data, *(cfg.data.train if q.method == Method.qat else [])])
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists.", hint="Pass --force to replace it, or choose another --out.")
    if out.is_dir() and cfg.format == Format.gguf:
        raise ConfigError(f"--out {out} is a folder; a GGUF output is a file.", hint="Choose another --out, ending in .gguf.")


def plan_layers(tensors: dict[str, Any], q: QuantConfig, tied: bool = False) -> tuple[dict[str, Any], list[str], list[str]]:
    """(layers to quantize -> params, paths kept by --keep, paths whose width does not fit the group size).

    The output head (the embedding matrix when `tied`: one matrix, quantized once) takes max(bits, 6) bits (or
    quant.head_bits), as llama.cpp gives it Q6_K: its error reaches every logit directly. NF4 has one width, so its head stays NF4."""
    from llmctl.quant import QuantParams

    params = _params(q)
    layers, kept, misfits = {}, [], []
    for name, t in tensors.items():
        path = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(t.shape) != 2:
            continue  # norms and biases stay in float
        if any(fnmatch.fnmatchcase(path, pattern) or path == pattern for pattern in q.keep):
            kept.append(path)
        elif t.shape[1] % q.group_size:
            misfits.append(path)
        else:
            layers[path] = params
    head = "model.embed_tokens" if tied else "lm_head"
    head_bits = q.head_bits or max(params.bits, HEAD_BITS)
    if head in layers and params.mode == "affine" and head_bits != params.bits:
        layers[head] = QuantParams(params.group_size, head_bits)
    return layers, sorted(kept), sorted(misfits)


def _sixteen_bit_scales(tensors: dict[str, Any], layers: dict[str, Any]) -> None:
    """Affine scales and biases of a float32 source rounded to float16, in place, as mlx-lm stores them (a bfloat16 or
    float16 source's are already in its dtype): 16 of their 32 bits are half the size of the scales at no measurable cost."""
    import numpy as np

    from llmctl.io.safetensors import RawTensor

    for path, p in layers.items():
        for suffix in (".scales", ".biases") if p.mode == "affine" else ():
            tensor = tensors[path + suffix]
            if tensor.dtype == "F32":
                tensors[path + suffix] = RawTensor.from_numpy(tensor.data.astype(np.float16))


def _calibrated(cfg: QuantizeConfig, folder: Any, layers: dict[str, Any], skip: list[str]) -> dict[str, Any]:
    """AWQ or GPTQ on the torch backend: the quantizer returns triples and float parameters it changed."""
    import importlib

    from llmctl.backends import get_backend
    from llmctl.io.model_folder import load_tokenizer
    from llmctl.quant.calib import calibration_tokens

    method = cfg.quant.method.value
    quantizer = getattr(importlib.import_module(f"llmctl.quant.{method}"), f"quantize_{method}")  # awq or gptq

    model = get_backend("torch").load(folder.path, dtype="float32").module
    tokens = calibration_tokens(load_tokenizer(folder.path), cfg.calib.data, cfg.calib.samples, cfg.calib.seq_len, cfg.calib.seed)
    skip_set = set(skip) | {p for p in _all_matrices(folder.tensors) if p not in layers}
    triples, changed = quantizer(model, tokens, cfg.quant.bits, cfg.quant.group_size, skip_set)
    return _with_triples(folder, layers, triples, changed)


def _qat(cfg: QuantizeConfig, folder: Any, layers: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Quantization-aware training on the torch engine; the tensors to write and the run folder (metrics) it used."""
    from llmctl.io.outputs import temporary_sibling
    from llmctl.quant.qat import export_qat, train_qat
    from llmctl.training.config import check

    check(cfg.data, cfg.optim, cfg.train)
    run_folder = temporary_sibling(Path(cfg.out), "qat")  # removed once the output is written
    try:
        model = train_qat(folder.path, layers, cfg, run_folder)
        return _with_triples(folder, layers, *export_qat(model)), run_folder
    except BaseException:
        shutil.rmtree(run_folder, ignore_errors=True)
        raise


def _with_triples(folder: Any, layers: dict[str, Any], triples: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """The folder's tensors with `changed` float parameters replaced and the quantized layers in MLX's layout, in the
    folder's float dtype; layers the quantizer left in float leave `layers`."""
    from llmctl.io.safetensors import from_torch

    out = dict(folder.tensors)
    for name, value in changed.items():
        stored = folder.tensors.get(name)
        out[name] = from_torch(value.to(_torch_dtype(stored.dtype if stored else "F32")).contiguous())
    for path, (wq, scales, biases) in triples.items():
        out.pop(path + ".weight")
        dtype = _torch_dtype(folder.tensors[path + ".weight"].dtype)
        out[path + ".weight"] = from_torch(wq.contiguous())
        out[path + ".scales"], out[path + ".biases"] = from_torch(scales.to(dtype).contiguous()), from_torch(biases.to(dtype).contiguous())
    for path in set(layers) - set(triples):
        layers.pop(path)  # left in float by the quantizer
    return out


def _torch_dtype(safetensors_dtype: str) -> Any:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(safetensors_dtype, torch.float32)


def _all_matrices(tensors: dict[str, Any]) -> list[str]:
    return [n.removesuffix(".weight") for n, t in tensors.items() if n.endswith(".weight") and len(t.shape) == 2]


def _write_gguf(cfg: QuantizeConfig, source: Any) -> Path:
    from llmctl import ui
    from llmctl.io.gguf import write_gguf
    from llmctl.io.outputs import replacing

    with replacing(cfg.out) as staged:  # disk full or a kill mid-write keeps an older file whole
        report = write_gguf(
            staged, source.spec, source.tensors, tokenizer=source.tokenizer(), target=cfg.gguf_type.value,
            name=Path(cfg.model).name, general=source.general,
        )  # fmt: skip
    types = ", ".join(f"{n} {t}" for t, n in sorted(report.types.items()))
    ui.info(f"wrote {cfg.out} ({types}); {report.summary()}")
    return Path(cfg.out)


def _summary(before: dict[str, Any], after: dict[str, Any], layers: dict[str, Any], seconds: float, out: Path) -> None:
    from llmctl import ui
    from llmctl.commands.info import _bytes
    from llmctl.quant import AUX_SUFFIXES

    size_before = sum(t.nbytes for t in before.values())
    size_after = sum(t.nbytes for t in after.values())
    weights = sum(before[p + ".weight"].shape[0] * before[p + ".weight"].shape[1] for p in layers)
    stored = sum(after[p + s].nbytes for p in layers for s in (".weight", *AUX_SUFFIXES) if p + s in after)
    total = sum(t.data.size for n, t in before.items())
    ui.info(
        f"wrote {out}: {len(layers)} layers quantized in {seconds:.1f}s; size {_bytes(size_before)} -> {_bytes(size_after)} "
        f"({size_before / max(size_after, 1):.2f}x smaller); {8 * stored / max(weights, 1):.3f} bits per quantized weight "
        f"(codes, scales and biases), {8 * size_after / max(total, 1):.2f} bits per weight over the whole model"
    )
