"""Quantized layers for the MLX backend (mx.quantized_matmul; NF4 by a code-book lookup), and quantizing a model's tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from llmctl import kernels
from llmctl.io.gguf import regroup_to_32
from llmctl.io.model import ModelFolder
from llmctl.io.safetensors import RawTensor, from_mlx, to_mlx
from llmctl.quant import AUX_SUFFIXES, QuantParams, expand_double_quant, quantized_layers
from llmctl.quant.nf4 import NF4_LEVELS


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as `weight` (uint32 codes), `scales` and, for affine, `biases`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, params: QuantParams, dtype: mx.Dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype  # of the model's activations; None: the scales' dtype
        dtype = dtype or mx.float32
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits, self.mode = params.group_size, params.bits, params.mode
        groups = in_features // params.group_size
        self.weight = mx.zeros((out_features, in_features * params.bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((out_features, groups), dtype=dtype)
        if params.mode == "affine":
            self.biases = mx.zeros((out_features, groups), dtype=dtype)
        if bias:
            self.bias = mx.zeros((out_features,), dtype=dtype)
        self.freeze()  # codes are not trained; adapters go on top

    def matmul(self, x: mx.array) -> mx.array:
        """x (..., in) @ W^T with no bias."""
        if self.mode == "nf4":
            return x @ self.dequantized(x.dtype).T
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True, group_size=self.group_size, bits=self.bits)

    def dequantized(self, dtype: mx.Dtype = mx.float32, rows: mx.array | None = None) -> mx.array:
        """The weight (or the rows picked by `rows`) as a float (out, in) matrix."""
        weight, scales = (self.weight, self.scales) if rows is None else (self.weight[rows], self.scales[rows])
        if self.mode == "affine":
            biases = self.biases if rows is None else self.biases[rows]
            return mx.dequantize(weight, scales, biases, group_size=self.group_size, bits=self.bits).astype(dtype)
        shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
        codes = (weight[..., None] >> shifts) & 15                             # (..., in / 8, 8)
        levels = mx.take(mx.array(NF4_LEVELS), codes.reshape(*weight.shape[:-1], -1))  # (..., in)
        blocks = levels.reshape(*scales.shape, self.group_size) * scales[..., None].astype(mx.float32)
        return blocks.reshape(*weight.shape[:-1], -1).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.matmul(x)
        return y + self.bias if "bias" in self else y


class QuantizedEmbedding(QuantizedLinear):
    """An Embedding stored like QuantizedLinear: rows are gathered, then dequantized; `as_linear` is the tied head."""

    def __init__(self, num_embeddings: int, dim: int, params: QuantParams, dtype: mx.Dtype | None = None) -> None:
        super().__init__(dim, num_embeddings, False, params, dtype)

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.dequantized(self.dtype or self.scales.dtype, tokens)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.matmul(x)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module | list, str]:
    *parents, name = path.split(".")
    node = root
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, name


def apply_quantized_layers(module: nn.Module, layers: Mapping[str, QuantParams], dtype: mx.Dtype | None = None) -> None:
    """Swap the Linear/Embedding at each path for its quantized twin (empty, to be filled by load_weights)."""
    for path, params in layers.items():
        parent, name = _parent(module, path)
        old = parent[int(name)] if isinstance(parent, list) else parent[name]
        if isinstance(old, nn.Embedding):
            vocab, dim = old.weight.shape
            new: nn.Module = QuantizedEmbedding(vocab, dim, params, dtype)
        elif isinstance(old, nn.Linear):
            out_features, in_features = old.weight.shape
            new = QuantizedLinear(in_features, out_features, "bias" in old, params, dtype)
        else:
            raise TypeError(f"{path} is a {type(old).__name__}; only Linear and Embedding layers are quantized")
        if isinstance(parent, list):
            parent[int(name)] = new
        else:
            setattr(parent, name, new)


def quantize_tensors(
    tensors: Mapping[str, RawTensor], layers: Mapping[str, QuantParams], on_layer: Callable[[str], None] | None = None
) -> dict[str, RawTensor]:
    """The folder's tensors with each layer's `.weight` replaced by its quantized form (MLX's layout; NF4 beside it)."""
    from llmctl.quant.nf4 import double_quantize

    out = dict(tensors)
    for path, p in layers.items():
        weight = to_mlx(out.pop(path + ".weight"))
        if p.mode == "nf4":
            wq, scales = kernels.quantize_nf4(weight, p.group_size)
            out[path + ".weight"], out[path + ".scales"] = from_mlx(wq), from_mlx(scales)
            if p.double_quant:
                import numpy as np

                codes, absmax, offset = double_quantize(np.array(scales.astype(mx.float32)))
                out[path + ".scales"] = RawTensor.from_numpy(codes)
                out[path + ".scales_absmax"], out[path + ".scales_offset"] = RawTensor.from_numpy(absmax), RawTensor.from_numpy(offset)
        else:
            wq, scales, biases = mx.quantize(weight, group_size=p.group_size, bits=p.bits, stream=mx.cpu)
            out[path + ".weight"], out[path + ".scales"], out[path + ".biases"] = map(from_mlx, (wq, scales, biases))
        if on_layer is not None:
            on_layer(path)
    return out


def prepare_quantized(module: nn.Module, folder: ModelFolder, dtype: mx.Dtype | None = None) -> set[str]:
    """For a quantized folder: swap in quantized layers, expand NF4 double-quantized scales and regroup groups of 16
    (GGUF K-quants) to 32, which MLX has, with a notice.

    Returns the tensor names to load as stored (codes, scales, biases), not cast to the model's dtype `dtype`
    (None: as stored), which quantized embeddings still produce.
    """
    layers = quantized_layers(folder.quantization, folder.tensors)
    regrouped = regroup_to_32(folder.tensors, layers, "MLX")
    if regrouped is not None:
        from llmctl import ui

        ui.warn(regrouped[0])
        folder.notices.append(regrouped[0])
    expand_double_quant(folder.tensors, layers)
    apply_quantized_layers(module, layers, dtype)
    return {path + suffix for path in layers for suffix in (".weight", *AUX_SUFFIXES)}
