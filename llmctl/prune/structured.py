"""Structured pruning: whole blocks by block influence (ShortGPT, Men et al. 2024), or MLP channels and key/value groups
by their measured contribution (Minitron, Muralidharan et al. 2024); the result is a smaller model of a valid spec."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from llmctl import ui
from llmctl.backends.torch.model import Transformer
from llmctl.prune import WidthPlan
from llmctl.quant.layers import block_inputs, inputs_of, run_block
from llmctl.spec import ModelSpec


def block_influence(model: Transformer, calib: np.ndarray, batch_size: int = 8) -> list[float]:
    """1 - mean cos(input, output) of each block over the calibration tokens: a block that barely turns the residual
    stream changes the model least when it goes."""
    model.eval()
    x = block_inputs(model, calib)  # (n, T, D)
    scores = []
    with ui.progress(len(model.model.layers), "block influence") as bar:
        for block in model.model.layers:
            y = run_block(model, block, x, batch_size)
            scores.append(1.0 - float(F.cosine_similarity(x, y, dim=-1).mean()))
            x = y
            bar.update()
    return scores


def remove_layers(model: Transformer, drop: list[int]) -> Transformer:
    """A new Transformer without the blocks in `drop`, the later ones renumbered."""
    n_layers = len(model.model.layers)
    keep = [i for i in range(n_layers) if i not in set(drop)]
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        state[name] = tensor
    return _rebuilt(model.spec.with_updates(n_layers=len(keep)), state)


def width_importance(model: Transformer, calib: np.ndarray, batch_size: int = 8) -> tuple[list[Tensor], list[Tensor]]:
    """Per block, the mean size of what each MLP channel and each key/value group adds to the residual stream on the
    calibration tokens: |silu(gate_j) up_j| ||down[:, j]||, and sum over the group's query heads of ||o_proj_h(y_h)||."""
    model.eval()
    x = block_inputs(model, calib)
    channels, groups = [], []
    with ui.progress(len(model.model.layers), "channel and head importance") as bar:
        for block in model.model.layers:
            attn, down = block.self_attn, block.mlp.down_proj
            H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
            W_o = attn.o_proj.weight.detach().view(-1, H, D)                      # (dim, H, D)
            column_norms = down.weight.detach().norm(dim=0).double()              # (ffn,)
            sums = {"heads": torch.zeros(H, dtype=torch.float64), "channels": torch.zeros(down.in_features, dtype=torch.float64)}

            def on_input(name: str, inp: Tensor) -> None:
                flat = inp.reshape(-1, inp.shape[-1]).float()                     # (N, in)
                if name == "o_proj":
                    per_head = torch.einsum("nhd,ehd->nhe", flat.view(-1, H, D), W_o)  # (N, H, dim)
                    sums["heads"] += per_head.norm(dim=-1).sum(0).double()
                else:
                    sums["channels"] += flat.abs().sum(0).double() * column_norms

            with inputs_of({"o_proj": attn.o_proj, "down_proj": down}, on_input):
                y = run_block(model, block, x, batch_size)
            channels.append(sums["channels"])
            groups.append(sums["heads"].view(KV, H // KV).sum(1))  # query head h reads key/value head h // (H / KV)
            x = y
            bar.update()
    return channels, groups


def shrink_width(model: Transformer, plan: WidthPlan, channels: list[Tensor], groups: list[Tensor]) -> Transformer:
    """A new Transformer with the `plan.channels` least important MLP channels and `plan.kv_groups` key/value groups
    (with their query heads) of every block removed."""
    spec = model.spec
    D, G = spec.head_dim, spec.n_heads // spec.n_kv_heads
    state = dict(model.state_dict())
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        keep = channels[i].topk(spec.ffn_dim - plan.channels).indices.sort().values
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            state[p + name] = state[p + name][keep]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, keep]
        kept_groups = groups[i].topk(spec.n_kv_heads - plan.kv_groups).indices.sort().values
        kv_rows = (kept_groups[:, None] * D + torch.arange(D)).flatten()                        # (KV' * D,)
        heads = (kept_groups[:, None] * G + torch.arange(G)).flatten()                          # (H',)
        q_rows = (heads[:, None] * D + torch.arange(D)).flatten()                               # (H' * D,)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                name = f"{p}self_attn.{proj}.{kind}"
                if name in state:
                    state[name] = state[name][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows]
    return _rebuilt(plan.spec(spec), state)


def _rebuilt(spec: ModelSpec, state: dict[str, Tensor]) -> Transformer:
    """A Transformer of `spec` holding `state`: loading strictly proves the weights fit the smaller spec."""
    model = Transformer(spec)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model.eval()
