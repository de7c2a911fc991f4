"""What loading lays out for fast inference (`prepare_inference`: fused projections, tiled or float32-scaled quantized
layers) is invisible to saving and to training: the state dict holds the folder's tensors, and gradients reach each
layer's own parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_hf_model


def _quantize(source: Path, out: Path) -> Path:
    from llmctl.commands.quantize import QuantizeConfig, run
    from llmctl.config import load_recipe

    cfg = load_recipe(QuantizeConfig, "quantize", "default", ["quant.bits=4", "quant.group_size=32", "quant.keep="],
                      {"model": str(source), "out": out})  # fmt: skip
    return run(cfg, "torch")


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
def test_saving_a_loaded_model_writes_the_folder_s_tensors(backend, quantized, tmp_path):
    make_hf_model("qwen2", tmp_path / "source", seed=0)  # q/k/v biases are fused too
    folder = _quantize(tmp_path / "source", tmp_path / "q") if quantized else tmp_path / "source"
    model = backend.load(folder, dtype=None)
    model.greedy([1, 17, 42], 3)  # generation uses the fused layout
    saved = _tensors(model.save(tmp_path / "out"))
    stored = _tensors(folder)
    assert saved.keys() == stored.keys()
    for name, tensor in stored.items():
        assert saved[name].dtype == tensor.dtype and saved[name].equal(tensor), name


def test_training_after_load_reaches_each_layer_s_parameters(backend, tmp_path):
    """The fused products are for inference only: a loaded model trains its q/k/v and gate/up weights themselves."""
    make_hf_model("llama", tmp_path, seed=0)
    model = backend.load(tmp_path)
    tokens = [[1, 17, 42, 7, 99, 3]]
    if backend.name == "torch":
        import torch

        module = model.module.train()
        loss = module(torch.tensor(tokens)[:, :-1], targets=torch.tensor(tokens)[:, 1:])
        loss.backward()
        attn, mlp = module.model.layers[0].self_attn, module.model.layers[0].mlp
        grads = [p.grad for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight)]
        assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
        return
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    module = model.module
    module.train()
    x, y = mx.array(tokens)[:, :-1], mx.array(tokens)[:, 1:]

    def loss(m):
        return nn.losses.cross_entropy(m(x), y).mean()

    _, grads = nn.value_and_grad(module, loss)(module)
    flat = dict(tree_flatten(grads))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        g = np.array(flat[f"model.layers.0.{name}.weight"])
        assert np.abs(g).sum() > 0, name
