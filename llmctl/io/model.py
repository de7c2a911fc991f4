"""A model read into memory from a folder, a Hugging Face id or a .gguf file: what `read_model` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.io.safetensors import RawTensor
from llmctl.spec import ModelSpec

if TYPE_CHECKING:
    from llmctl.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class ModelFolder:
    """A model as read from disk: its spec, its tensors under Hugging Face names (quantized layers in MLX's affine
    layout: `weight` codes, `scales`, `biases`) and, beside the spec, the quantization that describes them."""

    path: Path  # the folder, or the .gguf file
    spec: ModelSpec  # config.json's model, without its quantization entry
    tensors: dict[str, RawTensor]
    quantization: dict[str, Any] | None = None  # config.json's "quantization" (group_size, bits, per layer); None: float
    dtype: str = "float32"  # the float dtype config.json records (or a GGUF file's float tensors have)
    notices: list[str] = field(default_factory=list)  # what reading did not keep exactly (dequantized GGUF types)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # a GGUF file's key/values; {} for a folder

    @property
    def folder(self) -> Path | None:
        """The model folder (whose tokenizer and generation files travel with the weights), or None for a GGUF file."""
        return None if self.path.is_file() else self.path

    @property
    def general(self) -> dict[str, Any]:
        """A GGUF file's general.* metadata (name, license, ...)."""
        return {k: v for k, v in self.metadata.items() if k.startswith("general.")}

    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer: a folder's files, or rebuilt from a GGUF file's metadata; None when it has none."""
        if self.folder is None:
            if "tokenizer.ggml.tokens" not in self.metadata:
                return None
            from llmctl.io.gguf_vocab import tokenizer_from_metadata

            return tokenizer_from_metadata(self.metadata, self.path)
        if not any((self.path / name).is_file() for name in TOKENIZER_FILES):
            return None
        from llmctl.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)
