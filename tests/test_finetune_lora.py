"""`llmctl finetune-lora` end to end on a tiny model: only adapter parameters get gradients and the base stays
bit-identical, the adapter lands in PEFT's layout, resume is exact, QLoRA keeps its base quantized, bad input named."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED, needs_shared

BASE = SHARED / "models" / "stories260K-hf"


def _data(tmp_path, n=16):
    f = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} {w}."} for w in ["cat", "dog", "sun", "moon"] * (n // 4)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def _run(tmp_path, out, *extra, data=None):
    from typer.testing import CliRunner

    from llmctl.cli import app

    args = ["finetune-lora", "--model", str(BASE), "--data", str(data or _data(tmp_path)), "--out", str(out),
            "--backend", "torch", "data.seq_len=64", "data.batch_size=2", "train.dtype=fp32", "train.eval_every=2", *extra]
    return CliRunner().invoke(app, args)


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


@needs_shared
def test_only_adapters_train_and_the_base_stays_bit_identical():
    from llmctl.backends.torch.engine import Engine, load_module
    from llmctl.backends.torch.lora import LoraSettings, add_adapters, is_adapter_param
    from llmctl.backends.torch.objectives import NextToken
    from llmctl.training.batch import Batch
    from llmctl.training.config import LoopConfig, OptimConfig

    from llmctl.commands.options import DType

    engine = Engine(LoopConfig(dtype=DType.fp32), OptimConfig(lr=1e-2, weight_decay=0.1))
    engine.load(BASE, trainable=is_adapter_param, prepare=lambda m: add_adapters(m, LoraSettings(rank=4, dora=True)))
    before = {n: p.detach().clone() for n, p in load_module(BASE).named_parameters()}
    batch = Batch.from_windows(torch.randint(0, 512, (2, 17)).numpy())
    for _ in range(3):
        engine.micro_step(NextToken(), batch, 1.0 / batch.target_count, True)
        grads = {n for n, p in engine.model.named_parameters() if p.grad is not None}
        assert grads and all(is_adapter_param(n) for n in grads)
        engine.optimizer_step(1e-2, 1.0)
    state = engine.model.state_dict()
    for name, tensor in before.items():
        stored = state.get(name, state.get(name.replace(".weight", ".base_layer.weight")))
        assert torch.equal(stored, tensor), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in engine.model.named_parameters() if "lora_B" in n)


@needs_shared
def test_finetune_writes_a_peft_adapter_and_resumes_exactly(tmp_path):
    data = _data(tmp_path)
    result = _run(tmp_path, tmp_path / "full", "--steps", "4", "--rank", "4", "--targets", "q_proj,v_proj", data=data)
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    full = _adapter(tmp_path / "full")
    a = full["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.dtype == torch.float32 and a.shape == (4, 64)
    assert full["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert len(full) == 2 * 2 * 5 + 1  # A and B of q and v in each of 5 layers, and the added ChatML tokens' rows
    half = _run(tmp_path, tmp_path / "half", "--steps", "4", "--rank", "4", "--targets", "q_proj,v_proj", "train.stop_at=2", data=data)
    assert half.exit_code == 0, half.output
    assert not (tmp_path / "half" / "adapter").exists()
    resumed = _run(tmp_path, tmp_path / "half", "--steps", "4", "--rank", "4", "--targets", "q_proj,v_proj", "--resume", data=data)
    assert resumed.exit_code == 0, resumed.output
    for key, tensor in _adapter(tmp_path / "half").items():
        assert torch.equal(tensor, full[key]), key
    assert any(t.abs().max() > 0 for k, t in full.items() if "lora_B" in k)


@needs_shared
@pytest.mark.parametrize("case, args, message", [
    ("target", ["--targets", "q_proj,qkv"], r"no layer of this model is called qkv.*Valid targets: all-linear, down_proj"),
    ("rank", ["--rank", "999"], r"--rank 999 is larger than layer model.layers.0"),
])
def test_bad_lora_settings_are_named(tmp_path, case, args, message):
    result = _run(tmp_path, tmp_path / "out", "--steps", "1", *args)
    assert result.exit_code != 0
    assert __import__("re").search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "out").exists()


@needs_shared
@pytest.mark.parametrize("kind", ["4", "nf4"])
def test_qlora_base_stays_quantized_and_frozen(kind):
    from llmctl.backends.torch.engine import Engine
    from llmctl.backends.torch.lora import LoraLinear, LoraSettings, add_adapters, is_adapter_param, quantize_base
    from llmctl.backends.torch.objectives import NextToken
    from llmctl.backends.torch.quant import QuantizedLinear
    from llmctl.commands.options import DType
    from llmctl.training.batch import Batch
    from llmctl.training.config import LoopConfig, OptimConfig

    engine = Engine(LoopConfig(dtype=DType.fp32), OptimConfig(lr=1e-2))
    quantized: list[str] = []
    engine.load(BASE, trainable=is_adapter_param,
                prepare=lambda m: (quantized.extend(quantize_base(m, kind)), add_adapters(m, LoraSettings(rank=4))))
    layers = [m for m in engine.model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 35 and len(quantized) == 30  # down_proj reads 172 features: no whole groups of 64, kept in float
    for layer in layers:
        if layer.in_features % 64 == 0:
            assert isinstance(layer.base_layer, QuantizedLinear) and layer.base_layer.mode == ("nf4" if kind == "nf4" else "affine")
        else:
            assert type(layer.base_layer) is torch.nn.Linear
    codes = {n: b.clone() for n, b in engine.model.named_buffers() if b.dtype == torch.uint32}
    batch = Batch.from_windows(torch.randint(0, 512, (2, 17)).numpy())
    losses = []
    for _ in range(4):
        losses.append(float(engine.micro_step(NextToken(), batch, 1.0 / batch.target_count, True)["loss"]))
        assert all(is_adapter_param(n) for n, p in engine.model.named_parameters() if p.grad is not None)
        engine.optimizer_step(1e-2, 1.0)
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, codes[n]) for n, b in engine.model.named_buffers() if n in codes)
