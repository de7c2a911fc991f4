"""`llmctl finetune-lora --backend mlx`: an adapter trained on MLX gives in PEFT the logits it gives on MLX, our LoRA /
DoRA layers compute what mlx-lm's own (mlx_lm.tuner) compute for the same weights, float or quantized base, only
adapter parameters get gradients (QLoRA's codes untouched), resume is exact, and `--adapter` works on MLX."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED, needs_shared

mx = pytest.importorskip("mlx.core")
BASE = SHARED / "models" / "stories260K-hf"
TOKENS = [[1, 5, 9, 33, 100, 7, 250, 3, 64, 12]]


def _data(tmp_path, n=16):
    f = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} {w}."} for w in ["cat", "dog", "sun", "moon"] * (n // 4)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def _run(tmp_path, out, *extra):
    from typer.testing import CliRunner

    from llmctl.cli import app

    args = ["finetune-lora", "--model", str(BASE), "--data", str(_data(tmp_path)), "--out", str(out), "--backend", "mlx",
            "data.seq_len=64", "data.batch_size=2", "train.dtype=fp32", "train.eval_every=2", "optim.lr=2e-2", *extra]
    return CliRunner().invoke(app, args)


def _adapter(folder):
    from safetensors.numpy import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


@needs_shared
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_trained_adapter_gives_peft_the_same_logits(tmp_path, kind):
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.backends import attach_adapter
    from llmctl.backends.mlx.engine import load_module
    from llmctl.backends.mlx.lora import load_adapter
    from llmctl.backends.mlx.runtime import Runtime

    extra = ["--dora"] if kind == "dora" else ["--rslora"]
    result = _run(tmp_path, tmp_path / "run", "--steps", "3", "--rank", "4", *extra)
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (kind == "dora") and len(cfg["target_modules"]) == 7
    assert max(np.abs(v).max() for k, v in _adapter(tmp_path / "run").items() if "lora_B" in k) > 1e-3  # it trained

    hf = AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32)
    base_logits = hf(torch.tensor(TOKENS)).logits
    hf.resize_token_embeddings(514)  # the adapter's tokenizer: stories260K's 512 tokens and ChatML's two
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(theirs[..., :512] - base_logits.detach().numpy()).max() > 1e-3  # the adapter changes the logits
    model = load_module(BASE)
    load_adapter(model, adapter)  # unmerged: the layers that trained
    ours = np.array(model(mx.array(TOKENS)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    loaded = Runtime().load(BASE)  # --adapter: folded into the weights, the inference layout made again
    attach_adapter(loaded, str(tmp_path / "run"), "mlx")
    np.testing.assert_allclose(loaded.logits(TOKENS), theirs, atol=1e-4, rtol=1e-4)


def _mlx_lm_pair(quantized: bool, dora: bool):
    """Our layer and mlx-lm's on the same base (float, or 4-bit at group 64) with the same adapter weights."""
    import mlx.nn as nn
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear as TheirLoRA

    from llmctl.adapters import LoraSettings
    from llmctl.backends.mlx.lora import LoraLinear
    from llmctl.backends.mlx.quant import QuantizedLinear
    from llmctl.quant import QuantParams

    mx.random.seed(0)
    linear = nn.Linear(128, 96, bias=False)
    if quantized:
        theirs_base = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
        ours_base = QuantizedLinear(128, 96, False, QuantParams(64, 4, "affine", False))
        ours_base.update({"weight": theirs_base.weight, "scales": theirs_base.scales, "biases": theirs_base.biases})
    else:
        theirs_base = ours_base = linear
    settings = LoraSettings(rank=8, alpha=24, dora=dora)
    ours = LoraLinear(ours_base, settings)
    ours.lora_B.weight = mx.random.normal(ours.lora_B.weight.shape) * 0.1
    theirs = (DoRALinear if dora else TheirLoRA).from_base(theirs_base, r=8, scale=settings.scale)
    theirs.lora_a, theirs.lora_b = ours.lora_A.weight.T, ours.lora_B.weight.T
    if dora:
        ours.lora_magnitude_vector = ours.lora_magnitude_vector * (1 + 0.1 * mx.random.normal((96,)))
        theirs.m = ours.lora_magnitude_vector
    return ours, theirs


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_our_mlx_layers_compute_what_mlx_lm_layers_compute(quantized, dora):
    ours, theirs = _mlx_lm_pair(quantized, dora)
    x = mx.random.normal((2, 5, 128))
    delta = np.abs(np.array(theirs(x) - ours.base_layer(x))).max()
    assert delta > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), atol=1e-5, rtol=1e-5)


@needs_shared
@pytest.mark.parametrize("kind", ["", "4", "nf4"], ids=["float", "qlora4", "qlora-nf4"])
def test_only_mlx_adapters_get_gradients_and_the_base_is_untouched(kind):
    from mlx.utils import tree_flatten

    from llmctl.adapters import LoraSettings
    from llmctl.backends.mlx.engine import Engine, load_module
    from llmctl.backends.mlx.lora import LoraLinear, add_adapters, is_adapter_param, quantize_base
    from llmctl.backends.mlx.objectives import NextToken
    from llmctl.backends.mlx.quant import QuantizedLinear
    from llmctl.commands.options import DType
    from llmctl.training.batch import Batch
    from llmctl.training.config import LoopConfig, OptimConfig

    engine = Engine(LoopConfig(dtype=DType.fp32), OptimConfig(lr=1e-2, weight_decay=0.1))
    quantized: list[str] = []

    def prepare(m):
        if kind:
            quantized.extend(quantize_base(m, kind))
        add_adapters(m, LoraSettings(rank=4, dora=True))

    engine.load(BASE, trainable=is_adapter_param, prepare=prepare)
    layers = [m for _, m in engine.model.named_modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 35 and len(quantized) == (30 if kind else 0)  # down_proj reads 172 features: kept in float
    assert all(isinstance(m.base_layer, QuantizedLinear) == (bool(kind) and m.in_features % 64 == 0) for m in layers)
    before = dict(tree_flatten(engine.model.parameters()))
    batch = Batch.from_windows(np.random.default_rng(0).integers(0, 512, (2, 17)))
    losses = []
    for _ in range(4):
        metrics = engine.micro_step(NextToken(), batch, 1.0 / batch.target_count, True)
        losses.append(float(metrics["loss"].item()))
        grads = dict(tree_flatten(engine.grads))
        assert grads and all(is_adapter_param(n) for n in grads)
        engine.optimizer_step(1e-2, 1.0)
    assert losses[-1] < losses[0]
    after = dict(tree_flatten(engine.model.parameters()))
    for name, value in before.items():
        if not is_adapter_param(name):
            assert np.array_equal(np.array(after[name]), np.array(value)), name
    assert any(np.abs(np.array(v)).max() > 0 for n, v in after.items() if "lora_B" in n)
    if not kind:
        float_base = dict(tree_flatten(load_module(BASE).parameters()))
        for name, value in float_base.items():
            stored = after.get(name, after.get(name.replace(".weight", ".base_layer.weight")))
            assert np.array_equal(np.array(stored), np.array(value)), name


@needs_shared
def test_mlx_finetune_resumes_exactly(tmp_path):
    args = ["--steps", "4", "--rank", "4", "--targets", "q_proj,v_proj"]
    full = _run(tmp_path, tmp_path / "full", *args)
    assert full.exit_code == 0, full.output
    half = _run(tmp_path, tmp_path / "half", *args, "train.stop_at=2")
    assert half.exit_code == 0, half.output
    assert not (tmp_path / "half" / "adapter").exists()
    resumed = _run(tmp_path, tmp_path / "half", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    want = _adapter(tmp_path / "full")
    assert len(want) == 2 * 2 * 5 + 1 and any(np.abs(v).max() > 0 for k, v in want.items() if "lora_B" in k)
    for key, value in _adapter(tmp_path / "half").items():
        assert np.array_equal(value, want[key]), key
