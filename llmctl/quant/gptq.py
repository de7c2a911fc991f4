"""GPTQ (Frantar et al. 2022): quantize weights column by column, spreading each rounding error over later columns."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from llmctl import kernels, ui
from llmctl.backends.torch.model import Block, Transformer
from llmctl.quant.layers import (
    Triple, block_inputs, capture_inputs, linears, quantizable, quantize_embeddings, run_block,
)


def sequential_groups(block: Block) -> list[list[str]]:
    """Linears in the order their inputs are computed; a group is quantized before the next one's inputs are taken."""
    attention = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    if hasattr(block, "mlp"):
        return [*attention, ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    experts = range(len(block.block_sparse_moe.experts))
    first = ["block_sparse_moe.gate"] + [f"block_sparse_moe.experts.{e}.w{k}" for e in experts for k in (1, 3)]
    return [*attention, first, [f"block_sparse_moe.experts.{e}.w2" for e in experts]]


class Hessian:
    """H = 2/N sum x x^T over the N input rows a linear layer saw, (in, in) float64."""

    def __init__(self, n: int) -> None:
        self.sum = torch.zeros(n, n, dtype=torch.float64)
        self.count = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        self.sum += (x.T @ x).double()
        self.count += x.shape[0]

    def value(self) -> Tensor:
        return 2 * self.sum / max(self.count, 1)


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) after adding `damp` * mean diagonal; more damping if H is singular."""
    mean_diag = H.diagonal().mean()
    for factor in (1.0, 10.0, 100.0, 1000.0):
        damped = H.clone()
        damped.diagonal().add_(damp * factor * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    damped = H.clone()
    damped.diagonal().add_(mean_diag)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def _group_params(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Scale and bias (out,) of one group of columns (out, group_size), by the MLX affine formula itself."""
    _, scales, biases = kernels.quantize(w.contiguous(), group_size, bits)
    return scales[:, 0], biases[:, 0]


def gptq_weight(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Codes (out, in) uint8, scales and biases (out, in / group_size) and the dequantized weight of `weight` (out, in).

    Each group's scale and bias come from its weights as updated so far (with `act_order`, from the original
    weights, since its columns are visited out of order); `scale * code + bias` is what `kernels.dequantize` gives.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    n_bins = float(2**bits - 1)
    H = hessian.double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their columns get no error feedback
    H[dead, dead] = 1.0
    scales = torch.empty(rows, cols // group_size)
    biases = torch.empty_like(scales)
    if act_order:
        _, scales, biases = kernels.quantize(W.contiguous(), group_size, bits)
        perm = torch.argsort(H.diagonal(), descending=True)  # most active inputs first
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(cols)
    U = _inverse_cholesky(H, damp).float()
    block_size = max(group_size, block_size // group_size * group_size)  # a group never straddles two blocks
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    Q = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        errors = torch.empty_like(W1)
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            group = column // group_size
            if not act_order and column % group_size == 0:
                scales[:, group], biases[:, group] = _group_params(W1[:, i : i + group_size], bits, group_size)
            s, b = scales[:, group], biases[:, group]
            w = W1[:, i]
            q = ((w - b) / s).clamp_(0.0, n_bins).round_()  # the C++ rounding: clamp, then round half to even
            codes[:, i1 + i] = q.to(torch.uint8)
            Q[:, i1 + i] = q * s + b
            errors[:, i] = (w - Q[:, i1 + i]) / U1[i, i]
            W1[:, i:] -= errors[:, i : i + 1] @ U1[i : i + 1, i:]
        W[:, i2:] -= errors @ U[i1:i2, i2:]  # the block's errors reach the later columns in one product
    if act_order:
        inverse = torch.argsort(perm)
        codes, Q = codes[:, inverse], Q[:, inverse]
    return codes, scales, biases, Q


def _quantize_linear(module: nn.Linear, hessian: Tensor, bits: int, group_size: int, **options: object) -> Triple:
    codes, scales, biases, dequantized = gptq_weight(module.weight, hessian, bits, group_size, **options)
    with torch.no_grad():
        module.weight.copy_(dequantized)
    return kernels.pack(codes, bits), scales, biases


def quantize_gptq(
    model: Transformer,
    calib: np.ndarray,
    bits: int,
    group_size: int,
    skip: set[str],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    batch_size: int = 8,
) -> tuple[dict[str, Triple], dict[str, Tensor]]:
    """GPTQ of every linear of a float32 torch Transformer not in `skip`, block by block on `calib` (n, T) token ids.

    Returns the MLX-layout triple of each quantized module path and the float parameters changed (none for
    GPTQ). `model` is changed in place into its fake-quantized self: each quantized weight holds its dequantized
    values. Layers whose input width is not a multiple of `group_size` stay float and are left out of the result.
    """
    options = dict(damp=damp, block_size=block_size, act_order=act_order)
    model.eval()
    quantized = quantize_embeddings(model, bits, group_size, skip)
    x = block_inputs(model, calib)  # (n, T, D)
    with ui.progress(len(model.model.layers), f"gptq {bits}-bit") as bar:
        for index, block in enumerate(model.model.layers):
            modules = linears(block)
            for group in sequential_groups(block):
                targets = {
                    name: modules[name] for name in group
                    if quantizable(f"model.layers.{index}.{name}", modules[name].weight, group_size, skip)
                }
                if not targets:
                    continue
                stats = {name: Hessian(m.in_features) for name, m in targets.items()}
                capture_inputs(model, block, x, targets, lambda name, inp: stats[name].add(inp), batch_size)
                for name, module in targets.items():
                    quantized[f"model.layers.{index}.{name}"] = _quantize_linear(
                        module, stats[name].value(), bits, group_size, **options)
            x = run_block(model, block, x, batch_size)  # the next block sees what the quantized one computes
            bar.update()
    head = getattr(model, "lm_head", None)
    if head is not None and quantizable("lm_head", head.weight, group_size, skip):
        stats = Hessian(head.in_features)
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                stats.add(model.model.norm(x[i : i + batch_size]))
        quantized["lm_head"] = _quantize_linear(head, stats.value(), bits, group_size, **options)
    return quantized, {}
