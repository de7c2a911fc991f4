"""LoRA adapters between PEFT's layout and mlx-lm's, framework-free (numpy over safetensors).

PEFT: adapter_config.json (r, lora_alpha, use_rslora, use_dora, target_modules) and adapter_model.safetensors with
`base_model.model.<layer>.lora_A.weight` [r, in], `lora_B.weight` [out, r], DoRA's `lora_magnitude_vector` [out].
mlx-lm: adapter_config.json (fine_tune_type lora|dora, num_layers, lora_parameters {rank, scale, dropout, keys}) and
adapters.safetensors with `<layer>.lora_a` [in, r], `lora_b` [r, out], DoRA's `m` [out]; scale = alpha / r.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import ConfigError, LlmctlError

PEFT_PREFIX = "base_model.model."
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MLX_FILES = ("adapter_config.json", "adapters.safetensors")


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # leaf names (q_proj, ...) or all-linear
    dora: bool = False
    rslora: bool = False
    tokens: dict[str, list[int]] = field(default_factory=dict)  # trained rows: embed_tokens (lm_head if untied) -> ids

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"lora.rank={self.rank}: must be at least 1.")
        if not 0 <= self.dropout < 1:
            out.append(f"lora.dropout={self.dropout}: must be in [0, 1).")
        if not self.targets:
            out.append("lora.targets is empty: name the layers to adapt (q_proj,v_proj,...) or all-linear.")
        return out


def peft_config(settings: LoraSettings, names: Sequence[str], base: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
        "use_dora": settings.dora, "use_rslora": settings.rslora, "base_model_name_or_path": base, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "trainable_token_indices": dict(settings.tokens) or None,
    }


def token_span(ids: Sequence[int], where: str) -> tuple[int, int]:
    """(first id, count) of trained token rows, which are consecutive (a tokenizer appends the tokens it adds)."""
    ids = sorted(ids)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise LlmctlError(f"{where}: trained token rows {ids} are not consecutive; llmctl trains the rows of tokens "
                          "added at the end of a vocabulary.")
    return ids[0], len(ids)


def pick_targets(layers: Mapping[str, tuple[int, int]], settings: LoraSettings) -> list[str]:
    """Full names of the layers `settings.targets` pick (all-linear, or leaf names / name suffixes as PEFT matches
    them) among `layers` (name -> (in, out) features), each wide enough for the rank."""
    targets = settings.targets
    if "all-linear" in targets:
        names = list(layers)
    else:
        picked, unknown = set(), []
        for target in targets:
            hits = [n for n in layers if n == target or n.endswith("." + target)]
            (picked.update(hits) if hits else unknown.append(target))
        if unknown:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise ConfigError(f"--targets: no layer of this model is called {', '.join(unknown)}.",
                              hint=f"Valid targets: all-linear, {', '.join(leaves)}.")
        names = [n for n in layers if n in picked]
    for name in names:
        n_in, n_out = layers[name]
        if settings.rank > min(n_in, n_out):
            width = min(n_in, n_out)
            raise ConfigError(f"--rank {settings.rank} is larger than layer {name}'s width ({n_in} -> {n_out}); a rank "
                              f"above {width} adds nothing.", hint=f"Use --rank {width} or less.")
    return names


def resolve_adapter_folder(folder: str | Path) -> Path:
    """An adapter folder, or a finetune-lora run folder (its adapter/)."""
    folder = Path(folder)
    if not (folder / PEFT_FILES[0]).is_file() and (folder / "adapter" / PEFT_FILES[0]).is_file():
        return folder / "adapter"
    return folder


def read_peft(folder: str | Path) -> tuple[LoraSettings, dict[str, Any]]:
    """An adapter folder (PEFT layout, or mlx-lm's read through it): its settings and raw tensors keyed by layer name
    + PEFT suffix (`model.layers.0.self_attn.q_proj.lora_A.weight`, no base_model.model. and no .default)."""
    from llmctl.io.safetensors import read_safetensors

    folder = Path(folder)
    if not (folder / PEFT_FILES[1]).is_file() and (folder / MLX_FILES[1]).is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # mlx-lm's layout, read through PEFT's
            mlx_to_peft(folder, Path(tmp))
            return read_peft(tmp)
    config_path = folder / PEFT_FILES[0]
    if not config_path.is_file():
        raise LlmctlError(f"{folder} holds no {PEFT_FILES[0]}; an adapter folder is what `finetune-lora` writes "
                          "(OUT/adapter) or PEFT's save_pretrained.", hint="Pass the adapter's folder to --adapter.")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{config_path} cannot be read: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LlmctlError(f"{config_path}: peft_type {config.get('peft_type')!r}; llmctl loads LORA adapters.")
    weights = folder / PEFT_FILES[1]
    if not weights.is_file():
        raise LlmctlError(f"{folder} holds no {PEFT_FILES[1]}.")
    tensors = {}
    for key, t in read_safetensors(weights).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = name.replace(".lora_magnitude_vector.default", ".lora_magnitude_vector")
        if name.endswith(".lora_magnitude_vector.weight"):
            name = name.removesuffix(".weight")
        tensors[name.replace(".token_adapter.trainable_tokens_delta", ".trainable_tokens_delta")] = t
    rank = next((int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_A.weight")), int(config.get("r", 8)))
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    settings = LoraSettings(rank=rank, alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0.0)),
                            targets=targets, dora=bool(config.get("use_dora", False)),
                            rslora=bool(config.get("use_rslora", False)))
    tokens = config.get("trainable_token_indices") or {}
    if isinstance(tokens, list):  # PEFT's short form: the input embedding's rows
        tokens = {"embed_tokens": tokens}
    settings.tokens = {str(k): [int(i) for i in v] for k, v in tokens.items()}
    if config.get("modules_to_save"):
        raise LlmctlError(f"{config_path}: modules_to_save {config['modules_to_save']} (whole trained copies of layers) "
                          "are not loaded by llmctl; it reads trained token rows as trainable_token_indices.")
    return settings, tensors


def check_adapter_fits(folder: Path, tensors: Mapping[str, Any], layers: Mapping[str, tuple[int, int]],
                       targets: Sequence[str]) -> None:
    """Refuse an adapter made for another model, naming the first layer or shape that does not match; `layers` maps
    each adaptable layer's name to its (in, out) features."""
    for name in targets:
        if name not in layers:
            raise LlmctlError(f"the adapter in {folder} adapts {name}, which this model does not have "
                              f"(it has {len(layers)} linear layers, e.g. {next(iter(layers), '-')}).",
                              hint="Use the adapter with the model it was trained on.")
        (n_in, n_out), a, b = layers[name], tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        want_a, want_b = (a.shape[0], n_in), (n_out, a.shape[0])
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise LlmctlError(f"the adapter in {folder} does not fit this model: {name}.lora_A is {list(a.shape)} and "
                              f"lora_B {list(b.shape)}, but the layer needs {list(want_a)} and {list(want_b)}.",
                              hint="Use the adapter with the model it was trained on.")



def layout(folder: Path) -> str:
    """"peft" or "mlx-lm", by the files the folder holds."""
    if (folder / PEFT_FILES[1]).is_file():
        return "peft"
    if (folder / MLX_FILES[1]).is_file():
        return "mlx-lm"
    raise LlmctlError(f"{folder} holds neither adapter_model.safetensors (PEFT) nor adapters.safetensors (mlx-lm).",
                      hint="Pass an adapter folder: finetune-lora's OUT/adapter, PEFT's save_pretrained or mlx_lm.lora's output.")


def _read(path: Path) -> dict[str, np.ndarray]:
    from llmctl.io.safetensors import read_safetensors, to_torch

    return {k: to_torch(t).float().numpy() for k, t in read_safetensors(path).items()}


def _write(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from llmctl.io.safetensors import RawTensor, write_safetensors

    write_safetensors(path, {k: RawTensor.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()})


def _config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{folder / 'adapter_config.json'} cannot be read: {e}") from None


def mlx_to_peft(src: Path, out: Path) -> None:
    cfg = _config(src)
    params = cfg.get("lora_parameters", {})
    tensors = _read(src / MLX_FILES[1])
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_a")})
    if not layers:
        raise LlmctlError(f"{src / MLX_FILES[1]} holds no lora_a tensors.")
    rank = int(tensors[layers[0] + ".lora_a"].shape[1])
    scale = float(params.get("scale", 20.0))
    out_tensors = {}
    for name in layers:
        out_tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = tensors[name + ".lora_a"].T
        out_tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = tensors[name + ".lora_b"].T
        if name + ".m" in tensors:
            out_tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = tensors[name + ".m"]
    settings = LoraSettings(rank=rank, alpha=scale * rank, dropout=float(params.get("dropout", 0.0)),
                            dora=cfg.get("fine_tune_type") == "dora")
    config = peft_config(settings, layers, cfg.get("model"))
    config["target_modules"] = layers  # exactly the adapted layers (mlx-lm adapts the last num_layers blocks)
    _write(out / PEFT_FILES[1], out_tensors)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def peft_to_mlx(src: Path, out: Path) -> None:
    cfg = _config(src)
    tensors = _read(src / PEFT_FILES[1])
    out_tensors, layers = {}, []
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default", "")
        if name.endswith(".lora_A.weight"):
            layers.append(name.removesuffix(".lora_A.weight"))
            out_tensors[layers[-1] + ".lora_a"] = value.T
        elif name.endswith(".lora_B.weight"):
            out_tensors[name.removesuffix(".lora_B.weight") + ".lora_b"] = value.T
        elif name.endswith(".lora_magnitude_vector") or name.endswith(".lora_magnitude_vector.weight"):
            out_tensors[name.split(".lora_magnitude_vector")[0] + ".m"] = value
    if not layers:
        raise LlmctlError(f"{src / PEFT_FILES[1]} holds no lora_A tensors.")
    rank = int(out_tensors[layers[0] + ".lora_a"].shape[1])
    alpha = float(cfg.get("lora_alpha", 8))
    scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    blocks = sorted({int(m.group(1)) for n in layers if (m := re.search(r"layers\.(\d+)\.", n))})
    keys = sorted({re.sub(r"^.*layers\.\d+\.", "", n) for n in layers})
    config = {"fine_tune_type": "dora" if cfg.get("use_dora") else "lora", "num_layers": len(blocks),
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(cfg.get("lora_dropout", 0.0)), "keys": keys},
              "model": cfg.get("base_model_name_or_path")}
    if blocks and blocks != list(range(blocks[-1] - len(blocks) + 1, blocks[-1] + 1)):
        raise LlmctlError("mlx-lm adapts the last num_layers blocks; this adapter adapts blocks "
                          f"{blocks}, which mlx-lm's layout cannot say.")
    _write(out / MLX_FILES[1], out_tensors)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def convert_adapter(src: Path, to: str, out: Path) -> str:
    """Write the adapter in `src` to `out` (which exists, empty) in layout `to`; the source's layout."""
    kind = layout(src)
    if kind == to:
        raise LlmctlError(f"{src} is in the {to} layout already.")
    (mlx_to_peft if to == "peft" else peft_to_mlx)(src, out)
    return kind
