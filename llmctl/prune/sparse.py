"""Unstructured and N:M pruning of the blocks' linear layers: magnitude, Wanda (Sun et al. 2023) and SparseGPT
(Frantar & Alistarh 2023), calibrated block by block as GPTQ is, whose Hessians SparseGPT shares."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from llmctl import ui
from llmctl.backends.torch.model import Block, Transformer
from llmctl.prune import Pattern
from llmctl.quant.gptq import Hessian, _inverse_cholesky, sequential_groups
from llmctl.quant.layers import block_inputs, capture_inputs, linears, run_block

METHODS = ("magnitude", "wanda", "sparsegpt")
ROUTER = "block_sparse_moe.gate"  # a MoE router decides where tokens go: it stays whole


class InputNorms:
    """Sum of squares of each input channel over the rows a linear layer saw: Wanda's ||X_j||^2, (in,) float64."""

    def __init__(self, n: int) -> None:
        self.sum = torch.zeros(n, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        self.sum += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)

    def value(self) -> Tensor:
        return self.sum


def prunable(block: Block) -> dict[str, nn.Linear]:
    """The block's linear layers that pruning zeroes, by path inside the block (the router stays whole)."""
    return {name: m for name, m in linears(block).items() if name != ROUTER}


def lowest(scores: Tensor, sparsity: float, pattern: Pattern | None = None) -> Tensor:
    """Mask (out, in), True where a weight goes: the `sparsity` lowest scores of each row, or with `pattern` the N
    lowest of every M consecutive inputs of each row."""
    rows, cols = scores.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if pattern is None:
        return mask.scatter_(1, scores.topk(round(sparsity * cols), dim=1, largest=False).indices, True)
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)  # (out, in / M, M)
    chosen = groups.topk(pattern.n, dim=2, largest=False).indices
    return mask.view(rows, cols // pattern.m, pattern.m).scatter_(2, chosen, True).view(rows, cols)


def magnitude_weight(weight: Tensor, sparsity: float, pattern: Pattern | None = None) -> Tensor:
    """The smallest |w| of each row (or of each M inputs) set to zero."""
    W = weight.detach().float()
    return W.masked_fill(lowest(W.abs(), sparsity, pattern), 0.0)


def wanda_weight(weight: Tensor, norms: Tensor, sparsity: float, pattern: Pattern | None = None) -> Tensor:
    """Zero the lowest |w_ij| * ||x_j|| of each row: a weight matters as much as the inputs it multiplies."""
    W = weight.detach().float()
    return W.masked_fill(lowest(W.abs() * norms.sqrt().float()[None, :], sparsity, pattern), 0.0)


def sparsegpt_weight(
    weight: Tensor, hessian: Tensor, sparsity: float, pattern: Pattern | None = None, *, damp: float = 0.01,
    block_size: int = 128,
) -> Tensor:
    """`weight` (out, in) pruned column by column, each pruned weight's error spread over the later columns (OBS).

    Masks are chosen per block of `block_size` columns by w^2 / [H^-1]_jj^2 on the weights updated so far: the
    `sparsity` lowest of the block (exactly that many), or the N lowest of every M inputs of each row.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights get no error feedback
    H[dead, dead] = 1.0
    U = _inverse_cholesky(H, damp).float()  # upper factor of H^-1: row i holds the OBS update of column i on i..end
    if pattern is not None:
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)  # an M-group never straddles two blocks
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d2 = U1.diagonal()[None, :] ** 2  # w^2 / d2: the OBS error of removing each weight of the block
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            scores = (W1**2 / d2).flatten()
            mask.view(-1)[scores.topk(round(sparsity * scores.numel()), largest=False).indices] = True
        errors = torch.empty_like(W1)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                span = slice(i, i + pattern.m)
                mask[:, span] = lowest(W1[:, span] ** 2 / d2[:, span], 0.0, pattern)
            w = W1[:, i]
            q = w.masked_fill(mask[:, i], 0.0)
            errors[:, i] = (w - q) / U1[i, i]
            W1[:, i:] -= errors[:, i : i + 1] @ U1[i : i + 1, i:]
            W1[:, i] = q  # exact zeros, not zeros up to rounding
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ U[i1:i2, i2:]  # the block's errors reach the later columns in one product
    return W


def prune_sparse(
    model: Transformer, calib: np.ndarray | None, method: str, sparsity: float, pattern: Pattern | None = None,
    *, batch_size: int = 8, damp: float = 0.01,
) -> dict[str, float]:
    """Prune every linear layer of the blocks of a float32 torch Transformer in place; the achieved sparsity per
    module path. Calibrated methods walk the blocks in order on `calib` (n, T) token ids, each block's inputs
    being what the pruned blocks before it compute (as in both papers)."""
    model.eval()
    achieved: dict[str, float] = {}
    x = None if method == "magnitude" else block_inputs(model, calib)  # (n, T, D)
    label = f"{method} {pattern}" if pattern is not None else f"{method} {sparsity:.0%}"
    with ui.progress(len(model.model.layers), label) as bar:
        for index, block in enumerate(model.model.layers):
            modules = prunable(block)
            groups = [[name for name in g if name in modules] for g in sequential_groups(block)]
            for group in groups:
                targets = {name: modules[name] for name in group}
                stats = {}
                if x is not None:
                    kind = Hessian if method == "sparsegpt" else InputNorms
                    stats = {name: kind(m.in_features) for name, m in targets.items()}
                    capture_inputs(model, block, x, targets, lambda name, inp: stats[name].add(inp), batch_size)
                for name, module in targets.items():
                    if method == "magnitude":
                        pruned = magnitude_weight(module.weight, sparsity, pattern)
                    elif method == "wanda":
                        pruned = wanda_weight(module.weight, stats[name].value(), sparsity, pattern)
                    else:
                        pruned = sparsegpt_weight(module.weight, stats[name].value(), sparsity, pattern, damp=damp)
                    with torch.no_grad():
                        module.weight.copy_(pruned)
                    achieved[f"model.layers.{index}.{name}"] = float((pruned == 0).float().mean())
            if x is not None:
                x = run_block(model, block, x, batch_size)  # the next block sees what the pruned one computes
            bar.update()
    return achieved
