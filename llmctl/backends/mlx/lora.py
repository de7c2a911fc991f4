"""LoRA, rsLoRA and DoRA adapters on the MLX model, and adapters in PEFT's layout (read and written).

An adapted layer computes base(x) + scale * B(A(dropout(x))), scale = alpha / r (alpha / sqrt(r) with rsLoRA);
DoRA (Liu et al., 2024) rescales each output row of W + scale * B A to a trained magnitude m, the norm detached,
exactly as PEFT computes it. The base layer (a Linear or a QuantizedLinear) stays frozen and untouched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from llmctl.adapters import (LoraSettings, check_adapter_fits, peft_config, pick_targets, read_peft, resolve_adapter_folder,
                             token_span)
from llmctl.backends.mlx.quant import QuantizedEmbedding, QuantizedLinear, _parent

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (isinstance(module, QuantizedLinear) and not isinstance(module, QuantizedEmbedding))


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear or a QuantizedLinear."""
    if isinstance(layer, QuantizedLinear):
        return layer.in_features, layer.out_features
    out_features, in_features = layer.weight.shape
    return in_features, out_features


class LoraLinear(nn.Module):
    """A frozen base layer plus a trained low-rank update (and DoRA's magnitude), under PEFT's names."""

    def __init__(self, base: nn.Module, settings: LoraSettings) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = _features(base)
        r = settings.rank
        self.scale, self.dora = settings.scale, settings.dora
        self.disabled = False  # True: the base layer alone (preference.adapters_off: the reference without a copy)
        # as PEFT: A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)), MLX's Linear default; B = 0, so
        # training starts at the base
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        self.lora_B.weight = mx.zeros_like(self.lora_B.weight)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        if self.dora:
            self.lora_magnitude_vector = mx.linalg.norm(self.base_weight(), axis=1)

    def base_weight(self) -> mx.array:
        base = self.base_layer
        return base.dequantized(mx.float32) if isinstance(base, QuantizedLinear) else base.weight

    def delta(self) -> mx.array:
        """scale * B A, (out, in)."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base_layer(x)
        if self.disabled:
            return y
        xd = self.dropout(x)
        lora = self.lora_B(self.lora_A(xd.astype(self.lora_A.weight.dtype))) * self.scale
        if not self.dora:
            return y + lora.astype(y.dtype)
        weight = self.base_weight()
        norm = mx.stop_gradient(mx.linalg.norm(weight + self.delta().astype(weight.dtype), axis=1))
        mag = (self.lora_magnitude_vector / norm).astype(y.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = y - self.base_layer.bias.astype(y.dtype) if "bias" in self.base_layer else y
        else:
            base = xd @ weight.astype(xd.dtype).T
        return y + (mag - 1) * base + mag * lora.astype(y.dtype)

    def merged_weight(self) -> mx.array:
        """The float weight this layer computes with (base + update, DoRA's rescaling included)."""
        w = self.base_weight().astype(mx.float32) + self.delta().astype(mx.float32)
        if self.dora:
            w = w * (self.lora_magnitude_vector.astype(mx.float32) / mx.linalg.norm(w, axis=1))[:, None]
        return w


class TokenRows(nn.Module):
    """An embedding (or untied output head) whose rows start .. start + n - 1 are trained (PEFT's trainable tokens):
    `trainable_tokens_delta` holds those rows whole, the base stays frozen; rows past the base's end extend it."""

    def __init__(self, base: nn.Module, start: int, n: int) -> None:
        super().__init__()
        self.base_layer, self.start = base, start
        self.is_embedding = isinstance(base, (nn.Embedding, QuantizedEmbedding))
        rows = self.base_matrix()
        # new tokens start at the mean of the existing rows (a neutral point; the rows they replace, if any, were unused)
        self.trainable_tokens_delta = mx.repeat(rows.astype(mx.float32).mean(0, keepdims=True), n, axis=0)

    def base_matrix(self) -> mx.array:
        base = self.base_layer
        return base.dequantized(mx.float32) if isinstance(base, QuantizedLinear) else base.weight

    @property
    def weight(self) -> mx.array:
        """The whole (V', D) matrix, V' = max(base rows, start + n)."""
        w, delta = self.base_matrix(), self.trainable_tokens_delta
        return mx.concatenate([w[: self.start], delta.astype(w.dtype), w[self.start + delta.shape[0] :]])

    def __call__(self, x: mx.array) -> mx.array:
        return self.weight[x] if self.is_embedding else self.as_linear(x)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


def token_rows(model: nn.Module) -> dict[str, TokenRows]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenRows)}


def add_token_rows(model: nn.Module, ids: Sequence[int]) -> dict[str, list[int]]:
    """Train the embedding rows of tokens `ids` (added to the tokenizer), and the output head's if it is untied; the
    model's vocabulary grows to hold them. PEFT's trainable_token_indices: layer leaf name -> ids."""
    import dataclasses

    start, n = token_span(ids, "added tokens")
    leaves = ["embed_tokens"] + ([] if model.spec.tie_embeddings else ["lm_head"])
    for leaf in leaves:
        path = "model.embed_tokens" if leaf == "embed_tokens" else "lm_head"
        parent, name = _parent(model, path)
        setattr(parent, name, TokenRows(parent[name], start, n))
    model.spec = dataclasses.replace(model.spec, vocab_size=max(model.spec.vocab_size, start + n))
    return {leaf: list(range(start, start + n)) for leaf in leaves}


def merge_token_rows(model: nn.Module) -> None:
    """Replace each TokenRows by a plain float layer holding its whole matrix (inference at the base's speed)."""
    for name, layer in token_rows(model).items():
        weight = layer.weight.astype(mx.float32)
        new: nn.Module = nn.Embedding(*weight.shape) if layer.is_embedding else nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        new.weight = weight
        new.freeze()
        _set(model, name, new)


def linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear layer inside the blocks (the output head and embeddings excluded), by full name."""
    return {name: m for name, m in model.named_modules() if name.startswith("model.layers.") and _is_linear(m)}


def _set(root: nn.Module, path: str, layer: nn.Module) -> None:
    parent, leaf = _parent(root, path)
    if isinstance(parent, list):
        parent[int(leaf)] = layer
    else:
        setattr(parent, leaf, layer)


def add_adapters(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the target layers in LoraLinear (in place), freeze everything else; the adapted layers' names."""
    layers = linear_names(model)
    names = pick_targets({n: _features(m) for n, m in layers.items()}, settings)
    model.freeze()
    for name in names:
        _set(model, name, LoraLinear(layers[name], settings))
    return names


def adapters(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_magnitude_vector", ".trainable_tokens_delta"))


# --- PEFT's layout ----------------------------------------------------------------------------------------------------


def peft_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The adapters' tensors under PEFT's names and shapes (lora_A [r, in], lora_B [out, r], magnitude [out])."""
    out = {}
    for name, layer in adapters(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.astype(mx.float32)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.astype(mx.float32)
        if layer.dora:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.astype(mx.float32)
    for name, rows in token_rows(model).items():
        out[f"{PEFT_PREFIX}{name}.token_adapter.trainable_tokens_delta"] = rows.trainable_tokens_delta.astype(mx.float32)
    return out


def write_peft(folder: Path, model: nn.Module, settings: LoraSettings, base: str | None) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder` (which exists)."""
    from llmctl.io.safetensors import atomic_write_text, from_mlx, write_safetensors

    names = list(adapters(model))
    write_safetensors(folder / ADAPTER_WEIGHTS, {k: from_mlx(v) for k, v in peft_tensors(model).items()})
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(peft_config(settings, names, base), indent=2) + "\n")


def read_adapter(folder: str | Path) -> tuple[LoraSettings, dict[str, mx.array]]:
    """A PEFT (or mlx-lm) adapter folder: its settings and float32 tensors keyed by layer name + PEFT suffix."""
    from llmctl.io.safetensors import to_mlx

    settings, raw = read_peft(folder)
    return settings, {k: to_mlx(t).astype(mx.float32) for k, t in raw.items()}


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Add the adapter in `folder` (PEFT layout) to `model` in place (frozen, eval): the layers it adapts.
    An adapter made for another model is refused with the first mismatching shape named."""
    settings, tensors = read_adapter(folder)
    names = settings.targets
    layers = linear_names(model)
    check_adapter_fits(Path(folder), tensors, {n: _features(m) for n, m in layers.items()}, names)
    if settings.tokens:
        add_token_rows(model, settings.tokens["embed_tokens"])
        for name, rows in token_rows(model).items():
            rows.trainable_tokens_delta = tensors[f"{name}.trainable_tokens_delta"]
    for name in names:
        layer = LoraLinear(layers[name], settings)
        layer.lora_A.weight = tensors[f"{name}.lora_A.weight"]
        layer.lora_B.weight = tensors[f"{name}.lora_B.weight"]
        if settings.dora:
            layer.lora_magnitude_vector = tensors[f"{name}.lora_magnitude_vector"]
        _set(model, name, layer)
    model.freeze()
    model.eval()
    return names


def merge_adapters(model: nn.Module, dtype: mx.Dtype | None = None) -> None:
    """Fold every adapter into a float Linear in place (the model then computes base + adapter with no adapter);
    in `dtype`, else the base layer's own float dtype (float32 for a quantized base)."""
    for name, layer in adapters(model).items():
        base = layer.base_layer
        dt = dtype or (base.weight.dtype if type(base) is nn.Linear else mx.float32)
        merged = nn.Linear(layer.in_features, layer.out_features, bias="bias" in base)
        merged.weight = layer.merged_weight().astype(dt)
        if "bias" in base:
            merged.bias = base.bias.astype(dt)
        merged.freeze()
        _set(model, name, merged)
    mx.eval(model.parameters())


def quantize_base(model: nn.Module, kind: str, group_size: int = 64) -> list[str]:
    """Quantize the float linear layers of the blocks in place (QLoRA's frozen base): affine 4-/8-bit or NF4, 16-bit
    scales; layers already quantized stay as they are. The names of the layers quantized."""
    from llmctl.backends.mlx.quant import quantize_tensors
    from llmctl.io.safetensors import from_mlx, to_mlx
    from llmctl.quant import QuantParams

    params = QuantParams(group_size, 4 if kind == "nf4" else int(kind), "nf4" if kind == "nf4" else "affine", False)
    # MLX's CPU quantized_matmul is ~35x slower with float16 scales than float32 ones (see model._quantized_on_cpu):
    # on the CPU the float16 values are kept in float32, the same numbers
    scale_dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    done = []
    for name, layer in linear_names(model).items():
        n_in, n_out = _features(layer)
        if type(layer) is not nn.Linear or n_in % group_size:
            continue
        tensors = quantize_tensors({f"{name}.weight": from_mlx(layer.weight.astype(mx.float16))}, {name: params})
        q = QuantizedLinear(n_in, n_out, "bias" in layer, params, mx.float32)
        state = [(k.removeprefix(name + "."), to_mlx(v)) for k, v in tensors.items()]
        state = [(k, v if k == "weight" else v.astype(scale_dtype)) for k, v in state]
        if "bias" in layer:
            state.append(("bias", layer.bias.astype(mx.float16).astype(mx.float32)))
        q.load_weights(state, strict=True)
        q.freeze()
        _set(model, name, q)
        done.append(name)
    mx.eval(model.parameters())
    return done


def apply_adapter(model: nn.Module, folder: str | Path) -> None:
    """`--adapter DIR` for inference: load the adapter (PEFT or mlx-lm layout); on a float base fold it into the
    weights (the same products, at the base's speed), on a quantized one keep it beside the frozen codes."""
    from llmctl.backends.mlx.model import prepare_inference

    folder = resolve_adapter_folder(folder)
    load_adapter(model, folder)
    merge_token_rows(model)
    if all(type(layer.base_layer) is nn.Linear for layer in adapters(model).values()):
        merge_adapters(model)
    prepare_inference(model)

