"""`llmctl convert IN --out OUT`: a model between a folder and GGUF, or dequantized into a float folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmctl.errors import CheckpointError, UnsupportedModel

if TYPE_CHECKING:
    from llmctl.io.gguf import ConversionReport
    from llmctl.io.safetensors import RawTensor
    from llmctl.spec import ModelSpec
    from llmctl.tokenizer import Tokenizer


class GGUFType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"
    q4_1 = "q4_1"
    q5_0 = "q5_0"
    q5_1 = "q5_1"


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Source:
    """A model to convert, from a folder or a GGUF file."""

    path: Path
    spec: ModelSpec
    tensors: dict[str, RawTensor]
    quantization: dict[str, Any] | None  # the affine layout's group_size/bits (and per-layer entries), or None
    dtype: str  # the float dtype config.json records
    tokenizer: Tokenizer | None
    folder: Path | None  # a folder whose tokenizer files are copied as they are
    notices: list[str] = field(default_factory=list)  # what reading did not keep exactly
    general: dict[str, Any] = field(default_factory=dict)  # a GGUF's general.* metadata (name, license, ...)


def read_source(name: str | Path) -> Source:
    """A model folder (float or affine-quantized), a Hugging Face id, or a .gguf file, read without changing it."""
    from llmctl.io.gguf import QUANT_KEYS, is_gguf, logical_shapes, read_gguf
    from llmctl.io.hf import check_tensors, read_config, spec_from_config
    from llmctl.io.hub import resolve_model
    from llmctl.io.safetensors import load_folder_tensors
    from llmctl.tokenizer import Tokenizer

    if is_gguf(name):
        model = read_gguf(name)
        tokenizer = model.tokenizer() if "tokenizer.ggml.tokens" in model.metadata else None
        return Source(
            model.path,
            model.spec.with_updates(extra={}),  # the quantization travels beside the spec, as for folders
            model.tensors,
            model.quantization,
            model.config["dtype"],
            tokenizer,
            None,
            model.notices,
            {k: v for k, v in model.metadata.items() if k.startswith("general.")},
        )
    folder = resolve_model(name)
    config = read_config(folder)
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization is {quantization!r}; expected an object with group_size and bits.",
            hint="llmctl reads MLX's affine layout and its own NF4 (`llmctl quantize` writes both).",
        )
    if quantization is not None and not {"group_size", "bits"} <= quantization.keys():
        method = quantization.get("quant_method", "unknown")
        raise UnsupportedModel(
            f"{folder / 'config.json'} records quantization method {method!r}; llmctl converts the affine layout "
            "(MLX, mlx-lm, llmctl quantize).",
            hint="Dequantize it with the tool that made it, or start from the float model.",
        )
    spec = spec_from_config({k: v for k, v in config.items() if k not in QUANT_KEYS}, folder / "config.json")
    tensors = load_folder_tensors(folder)
    for extra in check_tensors(spec, logical_shapes(tensors, quantization), folder, {}):
        for suffix in ("weight", "scales", "biases"):
            tensors.pop(f"{extra.rsplit('.', 1)[0]}.{suffix}", None)
    has_tokenizer = any((folder / file).is_file() for file in TOKENIZER_FILES)
    tokenizer = Tokenizer.from_dir(folder) if has_tokenizer else None
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return Source(folder, spec, tensors, quantization, str(dtype), tokenizer, folder)


def to_folder(source: Source, out: Path, dtype: str | None) -> ConversionReport:
    """Write `source` as a model folder: quantized as it is (GGUF -> affine), or every tensor as float `dtype`."""
    import numpy as np

    from llmctl.io.gguf import (
        QUANT_KEYS, ConversionReport, affine_float32, dequantize_tensors, error_stats, float32_of, layer_quantization,
    )  # fmt: skip
    from llmctl.io.model_folder import write_model
    from llmctl.io.outputs import replacing

    report = ConversionReport(notices=list(source.notices))
    tensors, quantization = source.tensors, source.quantization
    if dtype is not None:
        tensors = dequantize_tensors(source.tensors, quantization, dtype)
        for name, tensor in tensors.items():
            module = name.removesuffix(".weight")
            if f"{module}.scales" in source.tensors:
                reference = affine_float32(source.tensors, module, *layer_quantization(quantization or {}, module))
            elif tensor is source.tensors[name]:
                report.exact.append(name)
                continue
            else:
                reference = float32_of(source.tensors[name])
            changed = float32_of(tensor)
            if dtype == "float32" or np.array_equal(reference, changed):
                report.exact.append(name)
            else:
                report.lossy[name] = error_stats(reference, changed)
        quantization = None
    else:
        report.exact.extend(name for name in source.tensors if not name.endswith((".scales", ".biases")))
    with replacing(out) as staged:  # an existing OUT (--force) is removed only once the new one is complete
        # mlx-lm reads RoPE's theta only from the older top-level key, not from rope_parameters
        extra = {"rope_theta": source.spec.rope_theta} | (
            {key: quantization for key in QUANT_KEYS} if quantization else {}
        )
        write_model(staged, source.spec, tensors, source=source.folder, dtype=dtype or source.dtype, extra_config=extra)
        if source.folder is None and source.tokenizer is not None:
            source.tokenizer.save(staged)
    return report


def convert(
    model: Annotated[str, typer.Argument(help="A model folder, a Hugging Face id, or a .gguf file.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="A name ending in .gguf writes GGUF; anything else, a folder.")
    ],
    dtype: Annotated[Dtype | None, typer.Option(help="Write a float folder, dequantizing a quantized model.")] = None,
    type_: Annotated[
        GGUFType | None, typer.Option("--type", help="GGUF tensor type; by default every tensor is kept exactly.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert a model between a folder and GGUF (by OUT's extension), or dequantize it; writes OUT."""
    from llmctl import ui
    from llmctl.io.gguf import is_gguf, write_gguf
    from llmctl.io.outputs import check_output

    to_gguf = is_gguf(out)
    if to_gguf and dtype is not None:
        raise typer.BadParameter("--dtype is for folder outputs; a .gguf output takes --type (f32, f16, ...).")
    if not to_gguf and type_ is not None:
        raise typer.BadParameter("--type is for .gguf outputs; a folder output takes --dtype (fp32, bf16, fp16).")
    if not to_gguf and dtype is None and not is_gguf(model):
        raise typer.BadParameter(
            f"{model} is a model folder already: pass --dtype to write it as floats, or name OUT *.gguf."
        )
    check_output(out, [model])
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists.", hint="Pass --force to replace it, or choose another --out.")
    if out.is_dir() and to_gguf:
        raise CheckpointError(f"{out} is a folder; a GGUF output is a file.", hint="Remove it or choose another --out.")

    source = read_source(model)
    if to_gguf:
        from llmctl.io.outputs import replacing

        with replacing(out) as staged:  # disk full or a kill mid-write keeps an older file whole
            report = write_gguf(
                staged, source.spec, source.tensors, quantization=source.quantization, tokenizer=source.tokenizer,
                target=type_.value if type_ else None, name=source.path.stem, general=source.general,
            )  # fmt: skip
        types = ", ".join(f"{n} {t}" for t, n in sorted(report.types.items()))
        ui.info(f"wrote {out} ({types})")
    else:
        report = to_folder(source, out, DTYPES[dtype.value] if dtype else None)
        what = f"float {DTYPES[dtype.value]}" if dtype else ("affine-quantized" if source.quantization else "float")
        ui.info(f"wrote {out} ({what} model folder)")
    for notice in report.notices:
        ui.warn(notice)
    if report.is_exact:
        ui.info(report.summary())
    else:
        ui.warn(report.summary())
