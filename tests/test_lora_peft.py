"""LoRA adapters against the `peft` library: an llmctl adapter loads in PEFT with the same logits, and PEFT-made
LoRA / DoRA / rsLoRA adapters load in llmctl with the same logits (float32, 1e-4); merging equals base + adapter."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_hf_model

peft = pytest.importorskip("peft")
TOKENS = torch.tensor([[1, 5, 9, 33, 100, 7, 250, 3, 64, 12]])


def _randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "magnitude" in name else 0.0))


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_llmctl_adapter_loads_in_peft_with_the_same_logits(tmp_path, kind):
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import LoraSettings, add_adapters, write_peft

    hf = make_hf_model("llama", tmp_path / "base")
    model = load_module(tmp_path / "base")
    settings = LoraSettings(rank=4, alpha=8, dora=kind == "dora", rslora=kind == "rslora")
    names = add_adapters(model, settings)
    assert len(names) == 2 * 7
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    _randomize(model)
    (tmp_path / "adapter").mkdir()
    write_peft(tmp_path / "adapter", model, settings, str(tmp_path / "base"))
    ours = model.eval()(TOKENS)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(TOKENS).logits
    base = make_hf_model("llama", tmp_path / "base2")(TOKENS).logits
    assert (theirs - base).abs().max() > 1e-2  # the adapter changes the logits, so the comparison means something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "dora", "rslora"])
def test_peft_adapter_loads_in_llmctl_with_the_same_logits(tmp_path, kind):
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import load_adapter, merge_adapters

    hf = make_hf_model("qwen2", tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                             use_dora=kind == "dora", use_rslora=kind == "rslora")
    wrapped = peft.get_peft_model(hf, config)
    _randomize(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    theirs = wrapped.eval()(TOKENS).logits
    model = load_module(tmp_path / "base")
    names = load_adapter(model, tmp_path / "adapter")
    assert len(names) == 2 * 3
    with torch.no_grad():
        ours = model(TOKENS)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        merge_adapters(model)
        torch.testing.assert_close(model(TOKENS), theirs, atol=1e-4, rtol=1e-4)


def test_adapter_for_another_model_is_refused(tmp_path):
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import load_adapter
    from llmctl.errors import LlmctlError

    hf = make_hf_model("llama", tmp_path / "small")
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    make_hf_model("llama", tmp_path / "wide", hidden_size=128, num_attention_heads=4)
    with pytest.raises(LlmctlError, match=r"q_proj.lora_A is \[2, 64\].*needs \[2, 128\]"):
        load_adapter(load_module(tmp_path / "wide"), tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_merge_and_adapter_flags_match_peft(tmp_path):
    """`llmctl merge` writes base + adapter (transformers loads it with PEFT's logits); `--adapter` on eval and
    generate gives what the merged model gives."""
    import transformers
    from typer.testing import CliRunner

    from conftest import SHARED
    from llmctl.cli import app

    base = SHARED / "models" / "stories260K-hf"
    if not base.is_dir():
        pytest.skip("shared models not found")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    _randomize(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    theirs = wrapped.eval()(TOKENS).logits
    run = CliRunner().invoke
    result = run(app, ["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    torch.testing.assert_close(merged(TOKENS).logits, theirs, atol=1e-4, rtol=1e-4)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl who liked to play in the park. " * 8)
    scores = {}
    for name, args in {"adapter": ["--model", str(base), "--adapter", str(tmp_path / "adapter")],
                       "merged": ["--model", str(tmp_path / "merged")], "base": ["--model", str(base)]}.items():
        result = run(app, ["eval", *args, "--data", str(text), "--json", "--backend", "torch", "--seq-len", "64"])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(result.output[result.output.index("{"):])["perplexity"]
    assert scores["adapter"] == pytest.approx(scores["merged"], rel=1e-4)
    assert scores["adapter"] != pytest.approx(scores["base"], rel=1e-3)
    outs = [run(app, ["generate", *args, "--prompt", "Once upon", "--max-tokens", "8", "--backend", "torch"])
            for args in (["--model", str(base), "--adapter", str(tmp_path / "adapter")], ["--model", str(tmp_path / "merged")])]
    assert outs[0].exit_code == 0, outs[0].output
    assert outs[0].stdout.strip().splitlines()[-1] == outs[1].stdout.strip().splitlines()[-1]


def test_merge_bits_requantizes_and_reports_kl(tmp_path):
    from typer.testing import CliRunner

    from conftest import SHARED
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.quant import QuantizedLinear
    from llmctl.cli import app

    base = SHARED / "models" / "stories260K-hf"
    if not base.is_dir():
        pytest.skip("shared models not found")
    import transformers

    wrapped = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    _randomize(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(app, ["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                                      "--out", str(tmp_path / "m8"), "--bits", "8"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "mean KL(base + adapter || re-quantized merged model) =" in out
    kl = float(out.split("merged model) = ")[1].split()[0])
    moved = float(out.split("moves the base by ")[1].split()[0])
    assert 0 <= kl < moved  # 8 bits keeps a visible adapter
    model = load_module(tmp_path / "m8")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
