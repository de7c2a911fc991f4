"""Reading any model (folder, Hugging Face id, .gguf file) and writing model folders, framework-free."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.io.hf import check_tensors, config_from_spec, read_config, spec_from_config
from llmctl.io.hub import resolve_model
from llmctl.io.model import ModelFolder
from llmctl.io.outputs import replacing
from llmctl.io.paths import inside
from llmctl.io.safetensors import RawTensor, atomic_write_text, load_folder_tensors, save_tensors
from llmctl.quant import AUX_SUFFIXES, QUANT_KEYS, quantization_of
from llmctl.spec import ModelSpec

if TYPE_CHECKING:
    from llmctl.tokenizer import Tokenizer

# Files that travel with the weights when a model is saved elsewhere.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def _tensor_files(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("weight_map", {})
    return {}


def read_model(name: str | Path) -> ModelFolder:
    """The one reader of a model, for every command: a folder, a Hugging Face id or a .gguf file, read without changing
    it. Its spec and tensors are checked against each other; quantization metadata sits beside the spec."""
    from llmctl.io.gguf import is_gguf, read_gguf

    if is_gguf(name) and not Path(name).is_dir():  # a folder may be named *.gguf too
        return read_gguf(name)
    folder = resolve_model(name)
    config = read_config(folder)
    quantization = quantization_of(config, folder / "config.json")
    spec = spec_from_config({k: v for k, v in config.items() if k not in QUANT_KEYS}, folder / "config.json")
    tensors = load_folder_tensors(folder)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    for extra in check_tensors(spec, shapes, folder, _tensor_files(folder), quantization):
        module = extra.removesuffix(".weight")  # a tied head stored anyway: its quantized parts go with it
        for suffix in ("", *AUX_SUFFIXES):
            tensors.pop(module + suffix if suffix else extra, None)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return ModelFolder(folder, spec, tensors, quantization, dtype)


def load_tokenizer(name: str | Path) -> Tokenizer:
    """A model's tokenizer, without its weights: a folder's (Tokenizer.from_dir), or rebuilt from a .gguf file's
    metadata."""
    path = Path(name)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from llmctl.io.gguf import read_tokenizer

        return read_tokenizer(path)
    from llmctl.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def generation_config(spec: ModelSpec) -> dict:
    eos = list(spec.eos_token_ids)
    return {
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "transformers_version": "5.23.0",
    }


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new folder filled under a temporary name; it replaces `out` (an older model there included) only when
    complete, so a failed or killed write leaves the old model whole."""
    with replacing(out) as tmp:
        tmp.mkdir()
        yield tmp


def write_model(
    out: Path,
    spec: ModelSpec,
    tensors: dict[str, RawTensor],
    source: Path | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    extra_config: dict | None = None,
    quantization: dict | None = None,
) -> Path:
    """Write config.json (with `quantization`, the quantized layers' entry, under both keys mlx-lm reads), weights
    (sharded above `max_shard_bytes`) and the source's tokenizer files."""
    with staged_folder(out) as folder:
        config = config_from_spec(spec, dtype) | (extra_config or {})
        if quantization:
            config |= {key: quantization for key in QUANT_KEYS}
        save_tensors(folder, tensors, max_shard_bytes=max_shard_bytes)
        atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        carried = set()
        if source is not None:  # the source may be `out` itself: it stays in place until the swap
            for name in CARRIED_FILES:
                if inside(source, name).is_file():  # a symlink out of the source folder is refused, not copied
                    shutil.copyfile(Path(source) / name, folder / name)
                    carried.add(name)
        if "generation_config.json" not in carried and not (folder / "generation_config.json").exists():
            atomic_write_text(folder / "generation_config.json", json.dumps(generation_config(spec), indent=2) + "\n")
    return Path(out)
