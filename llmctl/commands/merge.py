"""`llmctl merge`: fold a LoRA adapter into a model's weights and write a float model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def merge(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model folder or Hugging Face id (float or quantized).")],
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter folder (PEFT layout) or a finetune-lora run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model.")],
    force: Annotated[bool, typer.Option(help="Replace an existing --out (once the new model is complete).")] = False,
) -> None:
    """Write base + adapter as one float model folder (a quantized base is dequantized first)."""
    import torch

    from llmctl import ui
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import dequantize_all, load_adapter, merge_adapters, resolve_adapter_folder
    from llmctl.errors import LlmctlError
    from llmctl.io.hub import resolve_model
    from llmctl.io.model_folder import read_model, write_model
    from llmctl.io.outputs import check_output, replacing
    from llmctl.io.safetensors import from_torch
    from llmctl.run import remember_model

    source = resolve_model(model)
    adapter_dir = resolve_adapter_folder(adapter)
    check_output(out, [source, adapter_dir])
    if Path(out).exists() and any(Path(out).iterdir()) and not force:
        raise LlmctlError(f"{out} already exists.", hint="Pass --force to replace it, or pick another --out.")
    folder = read_model(source)
    module = load_module(source, "float32")
    names = load_adapter(module, adapter_dir)
    quantized = dequantize_all(module) if folder.quantization else 0
    merge_adapters(module)
    with torch.no_grad():
        state = module.state_dict()
    tensors = {k: from_torch(v.detach().contiguous()) for k, v in state.items()
               if not (module.spec.tie_embeddings and k == "lm_head.weight") and not k.startswith("rope.")}
    dtype = "float32" if folder.quantization else folder.dtype
    with replacing(out) as staged:
        write_model(staged, module.spec, tensors, folder.folder, dtype)
    remember_model(Path(out))
    note = f"; {quantized} quantized layers written in float" if quantized else ""
    ui.info(f"merged {len(names)} adapted layers of {adapter_dir} into {source} -> {out}{note}")
