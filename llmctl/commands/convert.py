"""`llmctl convert IN --out OUT`: a model between a folder and GGUF, or dequantized into a float folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.commands.options import DType, GGUFType
from llmctl.errors import CheckpointError

if TYPE_CHECKING:
    from llmctl.io.gguf import ConversionReport
    from llmctl.io.model import ModelFolder


def to_folder(source: ModelFolder, out: Path, dtype: str | None) -> ConversionReport:
    """Write `source` as a model folder: quantized as it is (GGUF -> affine), or every tensor as float `dtype`."""
    from collections import Counter

    import numpy as np

    from llmctl.io.gguf import (
        ConversionReport, affine_float32, dequantize_tensors, error_stats, float32_of, layer_quantization,
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
        from llmctl.io.gguf import regroup_to_32
        from llmctl.quant import config_entry, quantized_layers

        tensors, layers = dict(tensors), quantized_layers(quantization, tensors)
        regrouped = regroup_to_32(tensors, layers, "an mlx-lm folder")
        if regrouped is not None:
            report.notices.append(regrouped[0])
            report.lossy.update(regrouped[1])
            quantization = config_entry(Counter(layers.values()).most_common(1)[0][0], layers)
        report.exact.extend(n for n in source.tensors if not n.endswith((".scales", ".biases")) and n not in report.lossy)
    with replacing(out) as staged:  # an existing OUT (--force) is removed only once the new one is complete
        # mlx-lm reads RoPE's theta only from the older top-level key, not from rope_parameters
        extra = {"rope_theta": source.spec.rope_theta}
        write_model(staged, source.spec, tensors, source=source.folder, dtype=dtype or source.dtype, extra_config=extra,
                    quantization=quantization)  # fmt: skip
        tokenizer = source.tokenizer() if source.folder is None else None  # a folder's files are copied as they are
        if tokenizer is not None:
            tokenizer.save(staged)
    return report


def convert(
    model: Annotated[str, typer.Argument(help="A model folder, a Hugging Face id, or a .gguf file.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="A name ending in .gguf writes GGUF; anything else, a folder.")
    ],
    dtype: Annotated[
        DType | None, typer.Option(help="Write a float folder (auto: the stored float dtype), dequantizing a quantized model.")
    ] = None,
    type_: Annotated[
        GGUFType | None, typer.Option("--type", help="GGUF tensor type; by default every tensor is kept exactly.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    to: Annotated[str | None, typer.Option("--to", help="Adapters: mlx-lm or peft (MODEL is then an adapter folder).")] = None,
) -> None:
    """Convert a model between a folder and GGUF (by OUT's extension), or dequantize it; with --to, convert a LoRA
    adapter between PEFT's and mlx-lm's layouts; writes OUT."""
    from llmctl import ui

    if to is not None:
        _convert_adapter(model, to, out, force)
        return
    from llmctl.io.gguf import is_gguf, write_gguf
    from llmctl.io.model_folder import read_model
    from llmctl.io.outputs import check_output
    from llmctl.memory import check_model_job

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

    source = read_model(model)
    check_model_job(source, "converting", 8)  # dequantized float32 tensors and the written copy of them
    if to_gguf:
        from llmctl.io.outputs import replacing

        with replacing(out) as staged:  # disk full or a kill mid-write keeps an older file whole
            report = write_gguf(
                staged, source.spec, source.tensors, quantization=source.quantization, tokenizer=source.tokenizer(),
                target=type_.value if type_ else None, name=source.path.stem, general=source.general,
            )  # fmt: skip
        types = ", ".join(f"{n} {t}" for t, n in sorted(report.types.items()))
        ui.info(f"wrote {out} ({types})")
    else:
        float_dtype = None if dtype is None else dtype.full_name or source.dtype
        report = to_folder(source, out, float_dtype)
        what = f"float {float_dtype}" if float_dtype else ("affine-quantized" if source.quantization else "float")
        ui.info(f"wrote {out} ({what} model folder)")
    for notice in report.notices:
        ui.warn(notice)
    if report.is_exact:
        ui.info(report.summary())
    else:
        ui.warn(report.summary())


def _convert_adapter(source: str, to: str, out: Path, force: bool) -> None:
    from llmctl import ui
    from llmctl.adapters import convert_adapter
    from llmctl.io.outputs import check_output, replacing

    if to not in ("mlx-lm", "peft"):
        raise typer.BadParameter(f"--to {to}: expected mlx-lm or peft.")
    src = Path(source)
    if (src / "adapter" / "adapter_config.json").is_file():
        src = src / "adapter"  # a finetune-lora run folder
    check_output(out, [src])
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists.", hint="Pass --force to replace it, or choose another --out.")
    with replacing(out) as staged:
        staged.mkdir(parents=True, exist_ok=True)
        kind = convert_adapter(src, to, staged)
    ui.info(f"adapter {src} ({kind}) -> {out} ({to})")
