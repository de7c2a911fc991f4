"""What AWQ and GPTQ share: walking a torch Transformer block by block on calibration tokens, and MLX-layout rounding."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from llmctl import kernels
from llmctl.backends.torch.model import Block, Transformer, attention_mask
from llmctl.errors import DataError

Triple = tuple[Tensor, Tensor, Tensor]  # packed uint32 weight (out, in * bits / 32), scales and biases (out, in / group)


def quantizable(path: str, weight: Tensor, group_size: int, skip: set[str]) -> bool:
    """Not kept in float by the caller, and rows that split into whole groups (others stay float, as in mlx-lm)."""
    return path not in skip and weight.shape[-1] % group_size == 0


def rtn(weight: Tensor, bits: int, group_size: int) -> Triple:
    """Round-to-nearest in MLX's affine layout (min/max of each group), float32 scales and biases."""
    return kernels.quantize(weight.detach().float().contiguous(), group_size, bits)


def dequantize(triple: Triple, bits: int, group_size: int) -> Tensor:
    return kernels.dequantize(*triple, group_size, bits)


def fake_quantize(weight: Tensor, bits: int, group_size: int) -> Tensor:
    """The float weight the quantized layer computes with."""
    return dequantize(rtn(weight, bits, group_size), bits, group_size)


def linears(block: Block) -> dict[str, nn.Linear]:
    """Every linear layer of a block by its path inside the block (`self_attn.q_proj`, `mlp.down_proj`, ...)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def block_inputs(model: Transformer, calib: np.ndarray) -> Tensor:
    """Embeddings of the calibration windows, (n, T, D) float32: the input of the first block."""
    tokens = torch.as_tensor(np.asarray(calib, dtype=np.int64))
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise DataError(f"calibration tokens have shape {tuple(tokens.shape)}; expected (samples, seq_len) token ids.")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.spec.vocab_size:
        raise DataError(
            f"calibration token ids span {low}..{high}, outside the model's vocabulary of {model.spec.vocab_size}.",
            hint="Tokenize the calibration text with the model's own tokenizer.",
        )
    with torch.no_grad():
        return model.model.embed_tokens(tokens).float()


def run_block(model: Transformer, block: Block, x: Tensor, batch_size: int) -> Tensor:
    """The block's output on (n, T, D) inputs, `batch_size` windows at a time."""
    mask = attention_mask(x.shape[1], 0, model.spec.sliding_window, x.device)
    with torch.no_grad():
        return torch.cat([block(x[i : i + batch_size], model.rope, mask, None)[0] for i in range(0, len(x), batch_size)])


class _AllSeen(Exception):
    """Raised inside a block once every module of interest has seen its input: the rest of the block is not run."""


def capture_inputs(
    model: Transformer, block: Block, x: Tensor, modules: dict[str, nn.Module], on_input: Callable[[str, Tensor], None],
    batch_size: int,
) -> None:
    """Calls on_input(name, input) for each of `modules` on the block's (n, T, D) inputs, `batch_size` windows at a
    time, each batch run only as far into the block as the last of them: a group's inputs, not the block's output
    (the q/k/v projections' inputs cost a norm, not a block)."""
    mask = attention_mask(x.shape[1], 0, model.spec.sliding_window, x.device)
    pending: set[str] = set()

    def seen(name: str, inp: Tensor) -> None:
        on_input(name, inp)
        pending.discard(name)
        if not pending:
            raise _AllSeen

    with inputs_of(modules, seen), torch.no_grad():
        for i in range(0, len(x), batch_size):
            pending.update(modules)
            try:
                block(x[i : i + batch_size], model.rope, mask, None)
            except _AllSeen:
                pass


@contextmanager
def inputs_of(modules: dict[str, nn.Module], on_input: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Calls on_input(name, first positional input) whenever one of `modules` is about to run, inside the block."""
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: on_input(name, args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantize_embeddings(model: Transformer, bits: int, group_size: int, skip: set[str]) -> dict[str, Triple]:
    """Round-to-nearest for the embedding table when the caller did not keep it in float (no activations to weigh)."""
    weight = model.model.embed_tokens.weight
    if not quantizable("model.embed_tokens", weight, group_size, skip):
        return {}
    triple = rtn(weight, bits, group_size)
    with torch.no_grad():
        weight.copy_(dequantize(triple, bits, group_size))
    return {"model.embed_tokens": triple}
