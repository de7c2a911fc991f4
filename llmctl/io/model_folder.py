"""Reading and writing whole model folders (config, weights, tokenizer, generation config), framework-free."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmctl.io.hf import check_tensors, config_from_spec, load_spec
from llmctl.io.hub import resolve_model
from llmctl.io.outputs import replacing
from llmctl.io.paths import inside
from llmctl.io.safetensors import RawTensor, atomic_write_text, load_folder_tensors, save_tensors
from llmctl.spec import ModelSpec

# Files that travel with the weights when a model is saved elsewhere.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class ModelFolder:
    """A model read from disk: where it came from, its spec and its tensors under Hugging Face names."""

    path: Path
    spec: ModelSpec
    tensors: dict[str, RawTensor]


def _tensor_files(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("weight_map", {})
    return {}


def read_model(name: str | Path) -> ModelFolder:
    """Resolve a folder, Hugging Face id or .gguf file, read its spec and weights, and check they agree."""
    if str(name).lower().endswith(".gguf"):
        from llmctl.io.gguf import read_gguf  # a GGUFModel, whose .config holds the quantization

        return read_gguf(name)
    folder = resolve_model(name)
    spec = load_spec(folder)
    tensors = load_folder_tensors(folder)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    for name_ in check_tensors(spec, shapes, folder, _tensor_files(folder)):
        tensors.pop(name_)
    return ModelFolder(folder, spec, tensors)


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
) -> Path:
    """Write config.json, weights (sharded above `max_shard_bytes`) and the source's tokenizer files."""
    with staged_folder(out) as folder:
        config = config_from_spec(spec, dtype) | (extra_config or {})
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
