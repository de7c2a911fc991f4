"""AWQ (Lin et al. 2023): scale up the input channels that see large activations before rounding, clip weight ranges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from llmctl import ui
from llmctl.backends.torch.model import Block, Transformer, attention_mask
from llmctl.quant.layers import (
    Triple,
    block_inputs,
    capture_inputs,
    dequantize,
    fake_quantize,
    linears,
    quantizable,
    quantize_embeddings,
    rtn,
    run_block,
)


@dataclass
class ScaleGroup:
    """Linears that read one input, the op that writes it (where 1/s is folded) and the module whose output is compared."""

    prev: str  # a norm, or a linear whose output rows are divided by s
    layers: list[str]  # their input columns are multiplied by s
    source: str  # the module whose recorded input is the layers' input
    inspect: Callable[[Tensor], Tensor]  # output compared during the search, from that input


def scale_groups(model: Transformer, block: Block) -> list[ScaleGroup]:
    """q/k/v after input_layernorm; o_proj after v_proj (same shapes only); gate/up after the norm; down after up."""
    attn = block.self_attn
    mask_cache: dict[int, Tensor | None] = {}

    def attention(x: Tensor) -> Tensor:
        T = x.shape[1]
        if T not in mask_cache:
            mask_cache[T] = attention_mask(T, 0, model.spec.sliding_window, x.device)
        return attn(x, model.rope, mask_cache[T], None)

    groups = [ScaleGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn", attention)]
    # With grouped-query attention v_proj has fewer rows than o_proj has columns: one s cannot serve both.
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj", attn.o_proj))
    if hasattr(block, "mlp"):
        mlp = block.mlp
        groups.append(ScaleGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp", mlp))
        groups.append(ScaleGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj", mlp.down_proj))
        return groups
    moe = block.block_sparse_moe
    experts = range(len(moe.experts))
    # The router reads the same normed input: its columns are scaled too, so routing is unchanged in float.
    first = ["block_sparse_moe.gate"] + [f"block_sparse_moe.experts.{e}.w{k}" for e in experts for k in (1, 3)]
    groups.append(ScaleGroup("post_attention_layernorm", first, "block_sparse_moe", lambda x: moe(x)[0]))
    for e in experts:
        name = f"block_sparse_moe.experts.{e}"
        groups.append(ScaleGroup(f"{name}.w3", [f"{name}.w2"], f"{name}.w2", moe.experts[e].w2))
    return groups


def search_scale(
    group: ScaleGroup, modules: dict[str, nn.Linear], quantized: list[str], x: Tensor, bits: int, group_size: int, n_grid: int
) -> Tensor:
    """s = mean|x|^alpha, normalised, for the alpha on a grid over [0, 1) whose quantized output is closest to float.

    alpha = 0 is plain round-to-nearest, so the result is never worse than it on the calibration set.
    """
    with torch.no_grad():
        reference = group.inspect(x)
        magnitude = x.abs().reshape(-1, x.shape[-1]).float().mean(0)  # (in,)
        originals = {name: modules[name].weight.detach().clone() for name in quantized}
        best, best_loss = torch.ones_like(magnitude), float("inf")
        for step in range(n_grid):
            s = magnitude.pow(step / n_grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()  # geometric centre at 1: neither weights nor norms drift in size
            for name in quantized:
                modules[name].weight.copy_(fake_quantize(originals[name] * s, bits, group_size) / s)
            loss = (group.inspect(x) - reference).float().pow(2).mean().item()
            if loss < best_loss:
                best, best_loss = s, loss
        for name in quantized:
            modules[name].weight.copy_(originals[name])
    return best


def apply_scale(block: Block, group: ScaleGroup, s: Tensor) -> list[str]:
    """Divide the writer's output by s and multiply the readers' columns by s (the float block is unchanged)."""
    prev = block.get_submodule(group.prev)
    changed = []
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None])
            if prev.bias is not None:
                prev.bias.div_(s)
                changed.append(f"{group.prev}.bias")
        else:
            prev.weight.div_(s)
        changed.append(f"{group.prev}.weight")
        for name in group.layers:
            block.get_submodule(name).weight.mul_(s)
            changed.append(f"{name}.weight")
    return changed


def clip_weight(
    weight: Tensor, x: Tensor, bits: int, group_size: int, n_grid: int = 20, max_shrink: float = 0.5, n_tokens: int = 512
) -> Tensor:
    """Per row and group, the range [-m, m] (m shrunk from max|w| by up to `max_shrink`) that quantizes with the
    least output error on a sample of `n_tokens` input rows; returns the clipped weight (out, in)."""
    rows, cols = weight.shape
    x = x.reshape(-1, cols).float()
    x = x[:: max(1, len(x) // n_tokens)][:n_tokens].reshape(-1, cols // group_size, group_size)  # (N, G, g)
    w = weight.detach().float().reshape(rows, cols // group_size, group_size)  # (out, G, g)
    clipped = torch.empty_like(w)
    for r0 in range(0, rows, 256):  # (out, N, G) products, a slice of rows at a time
        wr = w[r0 : r0 + 256]
        reference = torch.einsum("ngk,ogk->ong", x, wr)
        largest = wr.abs().amax(-1, keepdim=True)  # (o, G, 1)
        best, best_error = largest.clone(), torch.full_like(largest, float("inf"))
        for step in range(int(max_shrink * n_grid)):
            bound = largest * (1 - step / n_grid)
            q = fake_quantize(torch.clamp(wr, -bound, bound).reshape(len(wr), cols), bits, group_size)
            error = (torch.einsum("ngk,ogk->ong", x, q.reshape(wr.shape)) - reference).pow(2).mean(1)[..., None]
            better = error < best_error
            best_error, best = torch.where(better, error, best_error), torch.where(better, bound, best)
        clipped[r0 : r0 + 256] = torch.clamp(wr, -best, best)
    return clipped.reshape(rows, cols)


def quantize_awq(
    model: Transformer,
    calib: np.ndarray,
    bits: int,
    group_size: int,
    skip: set[str],
    *,
    n_grid: int = 20,
    clip: bool = True,
    search_tokens: int = 16384,
    batch_size: int = 8,
) -> tuple[dict[str, Triple], dict[str, Tensor]]:
    """AWQ of every linear of a float32 torch Transformer not in `skip`, block by block on `calib` (n, T) token ids.

    Returns the MLX-layout triple of each quantized module path and the float parameters the scaling changed
    (norm weights, biases, and the weights of scaled layers kept in float). `model` is changed in place into its
    fake-quantized self. Scales are searched on the first `search_tokens` calibration tokens (at least one window).
    Layers whose input width is not a multiple of `group_size` stay float and are left out of the result.
    """
    model.eval()
    quantized = quantize_embeddings(model, bits, group_size, skip)
    changed: set[str] = set()
    x = block_inputs(model, calib)  # (n, T, D)
    sample = max(1, search_tokens // x.shape[1])
    with ui.progress(len(model.model.layers), f"awq {bits}-bit") as bar, torch.no_grad():
        for index, block in enumerate(model.model.layers):
            prefix = f"model.layers.{index}"
            modules = linears(block)
            targets = [n for n, m in modules.items() if quantizable(f"{prefix}.{n}", m.weight, group_size, skip)]
            groups = scale_groups(model, block)
            recorded: dict[str, list[Tensor]] = {}
            watched = {name: block.get_submodule(name) for name in {g.source for g in groups} | set(targets)}
            capture_inputs(model, block, x[:sample], watched, lambda name, inp: recorded.setdefault(name, []).append(inp), batch_size)
            features = {name: torch.cat(parts) for name, parts in recorded.items()}
            searched = []
            for group in groups:
                chosen = [name for name in group.layers if name in targets]
                if chosen and group.source in features:  # an expert no calibration token reached has nothing to weigh
                    s = search_scale(group, modules, chosen, features[group.source], bits, group_size, n_grid)
                    searched.append((group, s))
            for group, s in searched:
                changed.update(f"{prefix}.{name}" for name in apply_scale(block, group, s))
                for name in group.layers:
                    if name in features:
                        features[name] = features[name] / s  # what the scaled layer now reads
            for name in targets:
                weight = modules[name].weight
                # Clipping inside q and k would be judged by their products alone, not by attention (as in AWQ).
                if clip and name in features and name not in ("self_attn.q_proj", "self_attn.k_proj"):
                    weight.copy_(clip_weight(weight, features[name], bits, group_size))
                triple = rtn(weight, bits, group_size)
                weight.copy_(dequantize(triple, bits, group_size))
                quantized[f"{prefix}.{name}"] = triple
            x = run_block(model, block, x, batch_size)
            bar.update()
    head = getattr(model, "lm_head", None)
    if head is not None and quantizable("lm_head", head.weight, group_size, skip):
        triple = rtn(head.weight, bits, group_size)
        with torch.no_grad():
            head.weight.copy_(dequantize(triple, bits, group_size))
        quantized["lm_head"] = triple
    params = dict(model.named_parameters())
    floats = {name: params[name].detach().clone() for name in sorted(changed) if name.removesuffix(".weight") not in quantized}
    return quantized, floats
