"""Quantized model folders without a framework: which layers are quantized and how, as config.json records it.

The layout is mlx-lm's: a quantized layer `p` stores `p.weight` (uint32 codes), `p.scales` and (affine) `p.biases`;
config.json holds `"quantization": {"group_size", "bits", ["mode"], "<p>": {...} | false}` and the same under
`"quantization_config"`. NF4 is `"mode": "nf4"` (llmctl's own): no biases, and with `"double_quant": true` the
scales are uint8 codes plus `p.scales_absmax` and `p.scales_offset` (see llmctl.quant.nf4). Affine groups of 16
(GGUF's Q6_K, Q3_K and Q2_K read exactly) are `"mode": "affine16"`, also llmctl's own: MLX has no groups of 16, so
mlx-lm refuses the mode rather than misreading the layer.

AWQ and GPTQ live in llmctl.quant.awq / llmctl.quant.gptq with the signature of `CalibratedQuantizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llmctl.errors import CheckpointError, UnsupportedModel

if TYPE_CHECKING:
    import torch

    from llmctl.io.safetensors import RawTensor

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = ("affine", "nf4")
AFFINE16 = "affine16"  # config.json's mode for affine groups of 16; in memory they are mode "affine", group_size 16
AUX_SUFFIXES = (".scales", ".biases", ".scales_absmax", ".scales_offset")  # stored beside a quantized `.weight`
QUANT_KEYS = ("quantization", "quantization_config")  # where config.json records the quantization (mlx-lm writes both)


@dataclass(frozen=True)
class QuantParams:
    """How one layer is quantized."""

    group_size: int
    bits: int
    mode: str = "affine"  # affine | nf4
    double_quant: bool = False  # nf4 only: scales stored as 8-bit codes

    def entry(self) -> dict[str, Any]:
        """The config.json form, as mlx-lm writes it (mode only when not affine)."""
        out: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits}
        if self.mode != "affine":
            out["mode"] = self.mode
        elif self.group_size == 16:
            out["mode"] = AFFINE16
        if self.double_quant:
            out["double_quant"] = True
        return out


class CalibratedQuantizer(Protocol):
    """`llmctl.quant.awq.quantize_awq` and `llmctl.quant.gptq.quantize_gptq`, as `llmctl quantize` calls them.

    model: the torch Transformer (llmctl.backends.torch.model) in float32, eval mode, on the CPU.
    calib: int token ids (n_sequences, seq_len). skip: module paths to leave in full precision
    (e.g. "lm_head", "model.layers.0.mlp.down_proj"; layers whose width is not a multiple of group_size are
    in it too). Returns ({module path: (wq uint32, scales, biases)} in MLX's affine layout for every quantized
    Linear, {parameter name: float tensor} for any float parameter it changed, e.g. norms that absorbed AWQ scales).
    """

    def __call__(
        self, model: Any, calib: np.ndarray, bits: int, group_size: int, skip: set[str]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]: ...


def quantization_of(config: Mapping[str, Any], where: Any = "config.json") -> dict[str, Any] | None:
    """config.json's quantization entry, checked; None for a float model. `where` names the file in errors."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(
            f"{where}: quantization is {q!r}; expected an object with group_size and bits.",
            hint="llmctl reads MLX's affine layout and its own NF4 (`llmctl quantize` writes both).",
        )
    if "bits" not in q or "group_size" not in q:
        method = q.get("quant_method", "unknown")
        raise UnsupportedModel(
            f"{where} records quantization method {method!r}; llmctl reads the affine layout (MLX, mlx-lm, "
            "llmctl quantize) and its own NF4.",
            hint="Dequantize it with the tool that made it, or start from the float model.",
        )
    return q


def _params(entry: Mapping[str, Any]) -> QuantParams:
    mode = entry.get("mode", "affine")
    if mode == AFFINE16 or (mode == "affine" and int(entry["group_size"]) == 16):
        if int(entry["group_size"]) != 16 or mode != AFFINE16:
            raise CheckpointError(
                f"quantization {dict(entry)}: mode {AFFINE16!r} goes with group_size 16, and group_size 16 with it."
            )
        return QuantParams(16, int(entry["bits"]))
    if mode not in MODES:
        raise CheckpointError(f"quantization mode {mode!r} is not one llmctl runs ({', '.join(MODES + (AFFINE16,))}).")
    return QuantParams(int(entry["group_size"]), int(entry["bits"]), mode, bool(entry.get("double_quant", False)))


def quantized_layers(quantization: Mapping[str, Any] | None, names: set[str] | Mapping[str, Any]) -> dict[str, QuantParams]:
    """Module path -> QuantParams for every layer whose `.scales` is stored (a per-layer entry overrides the default)."""
    if not quantization:
        return {}
    default = _params(quantization)
    out = {}
    for name in names:
        if not name.endswith(".scales"):
            continue
        path = name.removesuffix(".scales")
        entry = quantization.get(path)
        if entry is False:
            continue
        out[path] = _params(entry) if isinstance(entry, dict) else default
    return out


def float_shapes(quantization: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, ...]], folder: Any = "") -> dict[str, tuple[int, ...]]:
    """The shapes a float checkpoint would have: quantized weights unpacked, scales and biases dropped."""
    layers = quantized_layers(quantization, shapes)
    if not layers:
        return dict(shapes)
    out = {k: v for k, v in shapes.items() if not any(k == p + s for p in layers for s in AUX_SUFFIXES)}
    for path, p in layers.items():
        weight = shapes.get(path + ".weight")
        if weight is None or len(weight) != 2:
            raise CheckpointError(f"{folder}: {path}.scales is stored but {path}.weight is {'missing' if weight is None else list(weight)}.")
        features = weight[1] * 32 // p.bits
        want = (weight[0], features // p.group_size)
        if features % p.group_size or tuple(shapes[path + ".scales"]) != want:
            raise CheckpointError(
                f"{folder}: {path} has packed weight {list(weight)} and scales {list(shapes[path + '.scales'])}, "
                f"which do not fit {p.bits} bits at group size {p.group_size}.",
                hint="config.json's quantization entry may not match the weights.",
            )
        out[path + ".weight"] = (weight[0], features)
    return out


def expand_double_quant(tensors: dict[str, RawTensor], layers: Mapping[str, QuantParams]) -> None:
    """Replace double-quantized NF4 scales (uint8 codes + absmax + offset) by float32 scales, in place."""
    from llmctl.io.safetensors import RawTensor
    from llmctl.quant.nf4 import double_dequantize

    for path, p in layers.items():
        if not p.double_quant:
            continue
        codes = tensors[path + ".scales"].data
        scales = double_dequantize(codes, tensors.pop(path + ".scales_absmax").data, tensors.pop(path + ".scales_offset").data)
        tensors[path + ".scales"] = RawTensor.from_numpy(scales)


def config_entry(default: QuantParams, layers: Mapping[str, QuantParams]) -> dict[str, Any]:
    """config.json's `quantization` value: the default plus an entry for each layer quantized differently."""
    entry = default.entry()
    for path, p in sorted(layers.items()):
        if p != default:
            entry[path] = p.entry()
    return entry
