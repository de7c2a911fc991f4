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
    bits: Annotated[int | None, typer.Option("--bits", help="Re-quantize the merged weights (affine, group 64) and report the KL divergence to base + adapter.")] = None,
) -> None:
    """Write base + adapter as one float model folder (a quantized base is dequantized first), or with --bits N a
    re-quantized one, reporting its KL divergence to the unmerged model on a built-in text sample."""
    import shutil

    import torch

    from llmctl import ui
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import (dequantize_all, load_adapter, merge_adapters, merge_token_rows,
                                            resolve_adapter_folder, token_rows)
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
    if bits is not None and bits not in (2, 3, 4, 5, 6, 8):
        raise typer.BadParameter(f"--bits {bits}: expected 2, 3, 4, 5, 6 or 8.")
    folder = read_model(source)
    module = load_module(source, "float32")
    names = load_adapter(module, adapter_dir)
    sample = _sample_logprobs(module, source) if bits is not None else None
    quantized = dequantize_all(module) if folder.quantization else 0
    merge_adapters(module)
    added_tokens = bool(token_rows(module))  # the adapter trains rows of tokens its own tokenizer added
    merge_token_rows(module)
    with torch.no_grad():
        state = module.state_dict()
    tensors = {k: from_torch(v.detach().contiguous()) for k, v in state.items()
               if not (module.spec.tie_embeddings and k == "lm_head.weight") and not k.startswith("rope.")}
    dtype = "float32" if folder.quantization else folder.dtype
    entry = None
    if bits is not None:
        from llmctl.backends.torch.quant import quantize_tensors
        from llmctl.commands.quantize import QuantConfig, _params, _sixteen_bit_scales, plan_layers
        from llmctl.quant import config_entry

        q = QuantConfig(bits=bits)
        layers, _, _ = plan_layers(tensors, q, module.spec.tie_embeddings)  # as `llmctl quantize --bits` does
        tensors = quantize_tensors(tensors, layers)
        _sixteen_bit_scales(tensors, layers)
        entry = config_entry(_params(q), layers)
    with replacing(out) as staged:
        write_model(staged, module.spec, tensors, folder.folder, dtype, quantization=entry)
        for name in ("tokenizer.json", "tokenizer_config.json") if added_tokens else ():
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, staged / name)
    remember_model(Path(out))
    note = f"; {quantized} quantized layers written in float" if quantized else ""
    ui.info(f"merged {len(names)} adapted layers of {adapter_dir} into {source} -> {out}{note}")
    if sample is not None:
        tokens, logp = sample
        requantized = load_module(out, "float32")
        with torch.no_grad():
            logq = torch.log_softmax(requantized(tokens).float(), -1)
            kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
            base_logq = torch.log_softmax(_base_logits(source, tokens), -1)
            adapter_kl = float((logp.exp() * (logp - base_logq)).sum(-1).mean())
        ui.info(f"--bits {bits}: mean KL(base + adapter || re-quantized merged model) = {kl:.5f} nats/token on a "
                f"built-in text sample; the adapter itself moves the base by {adapter_kl:.5f}")
        if kl >= adapter_kl:
            ui.warn(f"re-quantizing to {bits} bits changes the model at least as much as the adapter does: the "
                    "adapter may be rounded away. Keep the float merge, or use --adapter on the quantized base.")


def _sample_logprobs(module, source):  # type: ignore[no-untyped-def]
    """Built-in text tokens (1, T) and the unmerged model's log-probabilities on them."""
    import shutil

    import torch

    from llmctl.io.model_folder import load_tokenizer
    from llmctl.quant.calib import calibration_tokens

    seq_len = min(256, module.spec.max_seq_len)
    tokens = torch.from_numpy(calibration_tokens(load_tokenizer(source), None, n_samples=4, seq_len=seq_len))
    with torch.no_grad():
        return tokens, torch.log_softmax(module(tokens).float(), -1)


def _base_logits(source, tokens):  # type: ignore[no-untyped-def]
    from llmctl.backends.torch.engine import load_module

    return load_module(source, "float32")(tokens).float()
