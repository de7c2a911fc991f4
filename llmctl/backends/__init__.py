"""Backend selection: `get_backend("auto"|"torch"|"mlx")` returns an object with the same methods for both."""

from __future__ import annotations

import importlib.util
import platform
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import BackendUnavailable

if TYPE_CHECKING:
    from llmctl.tokenizer import Tokenizer


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    mlx = "mlx"


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Backends whose framework is installed here (MLX needs `mlx.core`, torch needs `torch`)."""
    return [name for name, module in (("torch", "torch"), ("mlx", "mlx")) if _installed(module)]


def resolve_name(name: str | Backend) -> str:
    name = Backend(name).value if not isinstance(name, Backend) else name.value
    if name == "auto":
        return "mlx" if is_apple_silicon() and _installed("mlx") else "torch"
    return name


def get_backend(name: str | Backend = "auto") -> Any:
    """The runtime of a backend; a clear error when its framework is missing."""
    name = resolve_name(name)
    if name == "torch":
        if not _installed("torch"):
            raise BackendUnavailable("The torch backend needs PyTorch, which is not installed.", hint="pip install torch")
        from llmctl.backends.torch.runtime import Runtime
    else:
        if not _installed("mlx"):
            raise BackendUnavailable(
                f"The mlx backend needs MLX, which has no wheels for {sys.platform}/{platform.machine()} or is not installed.",
                hint='On Apple silicon: pip install mlx; on Linux x86_64: pip install "mlx[cpu]". Or use --backend torch.',
            )
        from llmctl.backends.mlx.runtime import Runtime
    return Runtime()


def open_model(name: str | None, backend: str, dtype: str | None, adapter: str | None = None) -> tuple[Any, Tokenizer]:
    """Load a model and its tokenizer for generation; no name means the latest model `llmctl train` wrote."""
    from llmctl import ui
    from llmctl.errors import LlmctlError
    from llmctl.generation import check_vocab
    from llmctl.io.hub import resolve_model
    from llmctl.io.model_folder import load_tokenizer
    from llmctl.run import last_model

    latest_used = name is None
    if name is None:
        latest = last_model()
        if latest is None:
            raise LlmctlError(
                "No model given, and no model made by `llmctl train` or `llmctl quantize` was found.",
                hint="Pass --model DIR (a model folder or a Hugging Face id), or run `llmctl train` to make one.",
            )
        name = str(latest)
    folder = resolve_model(name)  # a folder, a cached Hugging Face id, or a .gguf file
    _check_memory(folder, dtype)
    tokenizer = load_tokenizer(folder)
    model = get_backend(backend).load(folder, dtype=dtype)
    if adapter is not None:
        model, tokenizer = attach_adapter(model, adapter, backend), adapter_tokenizer(adapter, tokenizer)
    check_vocab(tokenizer, model.spec, folder)
    what = "the latest model (--model not given)" if latest_used else "model"
    ui.info(
        f"[dim]{what} {folder} ({model.spec.family}, {model.spec.param_count() / 1e6:.3g}M parameters, "
        f"{describe_quantization(model.quantization)}) on {resolve_name(backend)}[/]"
    )
    return model, tokenizer


def _check_memory(folder: Path, dtype: str | None) -> None:
    """The weights as stored (x2 when bf16/fp16 files are widened to fp32), against the memory available."""
    from llmctl.io.safetensors import weight_files
    from llmctl.memory import check_fits

    files = [folder] if folder.is_file() else weight_files(folder)
    size = sum(f.stat().st_size for f in files)
    check_fits(size * (2 if dtype in ("fp32", "float32") else 1), f"loading {folder}", hint="Pick a smaller or quantized model.")


def describe_quantization(entry: dict[str, Any] | None) -> str:
    """ "4-bit, group 64", "nf4, group 64" or "float", from config.json's quantization entry."""
    if not isinstance(entry, dict) or "bits" not in entry:
        return "float"
    if entry.get("mode") == "nf4":
        return f"nf4, group {entry.get('group_size')}"
    return f"{entry['bits']}-bit, group {entry.get('group_size')}"


def attach_adapter(model: Any, adapter: str, backend: str) -> Any:
    """`--adapter DIR` (PEFT layout, or a finetune-lora run folder) on a loaded model; the model to use from now on
    (a new one when the adapter's trained token rows grew the vocabulary)."""
    from llmctl import ui

    if resolve_name(backend) == "torch":
        from llmctl.backends.torch.lora import apply_adapter
    else:
        from llmctl.backends.mlx.lora import apply_adapter
    apply_adapter(model.module, adapter)
    ui.info(f"[dim]adapter {adapter}[/]")
    if model.module.spec != model.spec:
        return type(model)(model.module, model.source, model.quantization)
    return model


def adapter_tokenizer(adapter: str, tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer saved with an adapter (finetune-lora writes it: it may hold tokens the chat template added),
    else `tokenizer`."""
    from llmctl.adapters import resolve_adapter_folder
    from llmctl.io.model_folder import load_tokenizer

    folder = resolve_adapter_folder(adapter)
    return load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else tokenizer
