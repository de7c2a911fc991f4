"""`llmctl convert ADAPTER --to peft|mlx-lm`: an mlx-lm adapter converted by llmctl gives in PEFT the logits it gives
in mlx-lm, and a PEFT adapter converted to mlx-lm gives in mlx-lm the logits it gives in PEFT (LoRA and DoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, needs_shared

peft = pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
BASE = SHARED / "models" / "stories260K-hf"
TOKENS = [[1, 5, 9, 33, 100, 7, 250, 3, 64, 12]]


def _mlx_model():
    from mlx_lm.utils import load_model

    model, _ = load_model(BASE)
    model.set_dtype(mx.float32)
    return model


def _cli(*args):
    from typer.testing import CliRunner

    from llmctl.cli import app

    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output


@needs_shared
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mlx_lm_adapter_converted_gives_the_same_logits_in_peft(tmp_path, dora):
    import transformers
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _mlx_model()
    params = {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 3, params, use_dora=dora)  # the last 3 of 5 blocks
    rng = np.random.default_rng(0)
    adapters = {k: mx.array((rng.standard_normal(v.shape) * 0.1 + (v if k.endswith(".m") else 0)).astype(np.float32))
                for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b", ".m"))}
    model.load_weights(list(adapters.items()), strict=False)
    ours_mlx = np.array(model(mx.array(TOKENS)))
    (tmp_path / "mlx").mkdir()
    mx.save_safetensors(str(tmp_path / "mlx" / "adapters.safetensors"), adapters)
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora" if dora else "lora", "num_layers": 3, "lora_parameters": params}))
    _cli("convert", tmp_path / "mlx", "--to", "peft", "--out", tmp_path / "peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()(torch.tensor(TOKENS)).logits.detach().numpy()
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)(torch.tensor(TOKENS)).logits.detach().numpy()
    assert np.abs(theirs - base).max() > 1e-2
    # --adapter reads mlx-lm's layout too
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import load_adapter

    ours = load_module(BASE)
    load_adapter(ours, tmp_path / "mlx")
    with torch.no_grad():
        np.testing.assert_allclose(ours(torch.tensor(TOKENS)).numpy(), ours_mlx, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(theirs, ours_mlx, atol=1e-4, rtol=1e-4)
    # and back: the PEFT adapter as mlx-lm's layout loads in mlx-lm with the same logits
    _cli("convert", tmp_path / "peft", "--to", "mlx-lm", "--out", tmp_path / "mlx2")
    from mlx_lm.tuner.utils import load_adapters

    again = load_adapters(_mlx_model(), str(tmp_path / "mlx2"))
    np.testing.assert_allclose(np.array(again(mx.array(TOKENS))), theirs, atol=1e-4, rtol=1e-4)
