"""LoRA, rsLoRA and DoRA adapters on the torch model, and adapters in PEFT's layout (read and written).

An adapted layer computes base(x) + scale * B(A(dropout(x))), scale = alpha / r (alpha / sqrt(r) with rsLoRA);
DoRA (Liu et al., 2024) rescales each output row of W + scale * B A to a trained magnitude m, the norm detached,
exactly as PEFT computes it. The base layer (a Linear or a QuantizedLinear) stays frozen and untouched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmctl.adapters import (LoraSettings, check_adapter_fits, peft_config, pick_targets, read_peft, resolve_adapter_folder,
                             token_span)

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _is_linear(module: nn.Module) -> bool:
    from llmctl.backends.torch.quant import QuantizedEmbedding, QuantizedLinear

    return type(module) is nn.Linear or (isinstance(module, QuantizedLinear) and not isinstance(module, QuantizedEmbedding))


class LoraLinear(nn.Module):
    """A frozen base layer plus a trained low-rank update (and DoRA's magnitude), under PEFT's names."""

    def __init__(self, base: nn.Module, settings: LoraSettings) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        r = settings.rank
        self.scale, self.dora = settings.scale, settings.dora
        device = next(iter(base.buffers() if hasattr(base, "scales") else base.parameters())).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT: B = 0, so training starts at the base
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.disabled = False  # True: the base layer alone (a reference model without a second copy)
        if self.dora:
            with torch.no_grad():
                self.lora_magnitude_vector = nn.Parameter(self.base_weight().norm(p=2, dim=1))
        else:
            self.lora_magnitude_vector = None

    def base_weight(self) -> Tensor:
        base = self.base_layer
        return base.dequantized(torch.float32) if hasattr(base, "dequantized") else base.weight

    def delta(self) -> Tensor:
        """scale * B A, (out, in)."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        xd = self.dropout(x)
        lora = self.lora_B(self.lora_A(xd.to(self.lora_A.weight.dtype))) * self.scale
        if not self.dora:
            return y + lora.to(y.dtype)
        weight = self.base_weight()
        norm = (weight + self.delta().to(weight.dtype)).norm(p=2, dim=1).detach()
        mag = (self.lora_magnitude_vector / norm).to(y.dtype)
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = y if bias is None else y - bias.to(y.dtype)
        else:
            base = F.linear(xd, weight.to(xd.dtype))
        return y + (mag - 1) * base + mag * lora.to(y.dtype)

    def merged_weight(self) -> Tensor:
        """The float weight this layer computes with (base + update, DoRA's rescaling included)."""
        w = self.base_weight().float() + self.delta().float()
        if self.dora:
            w = w * (self.lora_magnitude_vector.float() / w.norm(p=2, dim=1))[:, None]
        return w


class TokenRows(nn.Module):
    """An embedding (or untied output head) whose rows start .. start + n - 1 are trained (PEFT's trainable tokens):
    `trainable_tokens_delta` holds those rows whole, the base stays frozen; rows past the base's end extend it."""

    def __init__(self, base: nn.Module, start: int, n: int) -> None:
        super().__init__()
        self.base_layer, self.start = base, start
        rows = self.base_matrix()
        # new tokens start at the mean of the existing rows (a neutral point; the rows they replace, if any, were unused)
        self.trainable_tokens_delta = nn.Parameter(rows.float().mean(0, keepdim=True).repeat(n, 1))

    def base_matrix(self) -> Tensor:
        base = self.base_layer
        return base.dequantized(torch.float32) if hasattr(base, "dequantized") else base.weight

    @property
    def weight(self) -> Tensor:
        """The whole (V', D) matrix, V' = max(base rows, start + n)."""
        w, delta = self.base_matrix(), self.trainable_tokens_delta
        return torch.cat([w[: self.start], delta.to(w.dtype), w[self.start + len(delta) :]])

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.base_layer, nn.Embedding) or hasattr(self.base_layer, "as_linear"):
            return F.embedding(x, self.weight)
        return F.linear(x, self.weight)

    def as_linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


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
        setattr(parent, name, TokenRows(getattr(parent, name), start, n))
    model.spec = dataclasses.replace(model.spec, vocab_size=max(model.spec.vocab_size, start + n))
    return {leaf: list(range(start, start + n)) for leaf in leaves}


def merge_token_rows(model: nn.Module) -> None:
    """Replace each TokenRows by a plain float layer holding its whole matrix (inference at the base's speed)."""
    for name, layer in token_rows(model).items():
        weight = layer.weight.detach().float()
        if isinstance(layer.base_layer, nn.Embedding) or hasattr(layer.base_layer, "as_linear"):
            new: nn.Module = nn.Embedding(*weight.shape)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        new.weight.data = weight
        new.requires_grad_(False)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, new)


def linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear layer inside the blocks (the output head and embeddings excluded), by full name."""
    return {name: m for name, m in model.named_modules() if name.startswith("model.layers.") and _is_linear(m)}


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return root.get_submodule(parent), leaf


def add_adapters(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the target layers in LoraLinear (in place), freeze everything else; the adapted layers' names."""
    names = pick_targets({n: (m.in_features, m.out_features) for n, m in linear_names(model).items()}, settings)
    model.requires_grad_(False)
    for name in names:
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), settings))
    return names


def adapters(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_magnitude_vector", ".trainable_tokens_delta"))


# --- PEFT's layout ----------------------------------------------------------------------------------------------------


def peft_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under PEFT's names and shapes (lora_A [r, in], lora_B [out, r], magnitude [out])."""
    out = {}
    for name, layer in adapters(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
        if layer.dora:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().float().cpu().contiguous()
    for name, rows in token_rows(model).items():
        out[f"{PEFT_PREFIX}{name}.token_adapter.trainable_tokens_delta"] = rows.trainable_tokens_delta.detach().float().cpu().contiguous()
    return out


def write_peft(folder: Path, model: nn.Module, settings: LoraSettings, base: str | None) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder` (which exists)."""
    from llmctl.io.safetensors import atomic_write_text, from_torch, write_safetensors

    names = list(adapters(model))
    write_safetensors(folder / ADAPTER_WEIGHTS, {k: from_torch(v) for k, v in peft_tensors(model).items()})
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(peft_config(settings, names, base), indent=2) + "\n")


def read_adapter(folder: str | Path) -> tuple[LoraSettings, dict[str, Tensor]]:
    """A PEFT (or mlx-lm) adapter folder: its settings and float32 tensors keyed by layer name + PEFT suffix."""
    from llmctl.io.safetensors import to_torch

    settings, raw = read_peft(folder)
    return settings, {k: to_torch(t).float() for k, t in raw.items()}


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Add the adapter in `folder` (PEFT layout) to `model` in place (frozen, eval): the layers it adapts.
    An adapter made for another model is refused with the first mismatching shape named."""
    settings, tensors = read_adapter(folder)
    names = settings.targets
    layers = {n: (m.in_features, m.out_features) for n, m in linear_names(model).items()}
    check_adapter_fits(Path(folder), tensors, layers, names)
    model.requires_grad_(False)
    if settings.tokens:
        add_token_rows(model, settings.tokens["embed_tokens"])
        with torch.no_grad():
            for name, rows in token_rows(model).items():
                rows.trainable_tokens_delta.copy_(tensors[f"{name}.trainable_tokens_delta"])
    for name in names:
        parent, leaf = _parent(model, name)
        layer = LoraLinear(getattr(parent, leaf), settings)
        with torch.no_grad():
            layer.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])
            if settings.dora:
                layer.lora_magnitude_vector.copy_(tensors[f"{name}.lora_magnitude_vector"])
        layer.requires_grad_(False)
        setattr(parent, leaf, layer)
    model.eval()
    return names


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Fold every adapter into a float Linear in place (the model then computes base + adapter with no adapter);
    in `dtype`, else the base layer's own float dtype (float32 for a quantized base)."""
    for name, layer in adapters(model).items():
        base = layer.base_layer
        dt = dtype or (base.weight.dtype if type(base) is nn.Linear else torch.float32)
        merged = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, dtype=dt)
        with torch.no_grad():
            merged.weight.copy_(layer.merged_weight())
            if base.bias is not None:
                merged.bias.copy_(base.bias.float())
        merged.requires_grad_(False)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, merged)


def quantize_base(model: nn.Module, kind: str, group_size: int = 64) -> list[str]:
    """Quantize the float linear layers of the blocks in place (QLoRA's frozen base): affine 4-/8-bit or NF4, 16-bit
    scales; layers already quantized stay as they are. The names of the layers quantized."""
    from llmctl.backends.torch.quant import QuantizedLinear, quantize_tensors
    from llmctl.io.safetensors import from_torch, to_torch
    from llmctl.quant import QuantParams

    params = QuantParams(group_size, 4 if kind == "nf4" else int(kind), "nf4" if kind == "nf4" else "affine", False)
    done = []
    for name, layer in linear_names(model).items():
        if type(layer) is not nn.Linear or layer.in_features % group_size:
            continue
        tensors = quantize_tensors({f"{name}.weight": from_torch(layer.weight.detach().to(torch.float16).contiguous())},
                                   {name: params})
        q = QuantizedLinear(layer.in_features, layer.out_features, layer.bias is not None, params, torch.float16)
        state = {k.removeprefix(name + "."): to_torch(v) for k, v in tensors.items()}
        if layer.bias is not None:
            state["bias"] = layer.bias.detach().to(torch.float16)
        q.load_state_dict(state, strict=True)
        q.dtype = torch.float32  # activations stay float32; the scales are 16-bit
        q.requires_grad_(False)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, q)
        done.append(name)
    return done


def apply_adapter(model: nn.Module, folder: str | Path) -> None:
    """`--adapter DIR` for inference: load the adapter (PEFT or mlx-lm layout); on a float base fold it into the
    weights (the same products, at the base's speed), on a quantized one keep it beside the frozen codes."""
    from llmctl.backends.torch.model import prepare_inference

    folder = resolve_adapter_folder(folder)
    load_adapter(model, folder)
    merge_token_rows(model)
    if all(type(layer.base_layer) is nn.Linear for layer in adapters(model).values()):
        merge_adapters(model)
    prepare_inference(model)


def dequantize_all(model: nn.Module) -> int:
    """Replace every quantized layer by its float twin (dequantized weights), in place; how many were replaced."""
    from llmctl.backends.torch.quant import QuantizedEmbedding, QuantizedLinear

    count = 0
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QuantizedLinear):
            continue
        weight = layer.dequantized(torch.float32)
        if isinstance(layer, QuantizedEmbedding):
            new: nn.Module = nn.Embedding(*weight.shape)
        else:
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            if layer.bias is not None:
                new.bias.data = layer.bias.detach().float()
        new.weight.data = weight
        new.requires_grad_(False)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, new)
        count += 1
    return count
