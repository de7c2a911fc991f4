"""Template tokens the tokenizer lacks: finetune-lora adds them, trains their embedding rows (and the untied head's)
beside the adapters, and saves them as PEFT's trainable tokens (`trainable_token_indices`), which PEFT (on the base
resized to the new vocabulary) and llmctl load with the same logits; the base's own rows never change."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED, make_hf_model, needs_shared

peft = pytest.importorskip("peft")
STORIES = SHARED / "models" / "stories260K-hf"
IM_START, IM_END = 512, 513  # stories260K's tokenizer has 512 tokens and no chat template: ChatML's two are added


def _finetune(tmp_path, base, backend):
    from typer.testing import CliRunner

    from llmctl.cli import app

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Say {w}.", "completion": f"{w} {w}."} for w in ["cat", "dog", "sun", "moon"] * 4]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / f"run-{backend}"
    result = CliRunner().invoke(app, [
        "finetune-lora", "--model", str(base), "--data", str(data), "--out", str(out), "--backend", backend,
        "--steps", "3", "--rank", "4", "--targets", "q_proj,v_proj", "data.seq_len=64", "data.batch_size=2",
        "train.dtype=fp32", "optim.lr=3e-2", "optim.weight_decay=0.1"])
    assert result.exit_code == 0, result.output
    assert "were missing from the tokenizer: added as ids [512, 513]" in " ".join(result.output.split())
    return out / "adapter"


def _untied_base(tmp_path):
    """A random untied Llama over stories260K's 512-token tokenizer."""
    folder = tmp_path / "untied"
    make_hf_model("llama", folder, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    return folder


@needs_shared
@pytest.mark.parametrize("backend, tied", [("torch", True), ("mlx", False)], ids=["torch-tied", "mlx-untied"])
def test_added_template_tokens_train_and_load_in_peft_with_the_same_logits(tmp_path, backend, tied):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmctl.backends import get_backend
    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import load_adapter
    from llmctl.io.model_folder import load_tokenizer

    base = STORIES if tied else _untied_base(tmp_path)
    adapter = _finetune(tmp_path, base, backend)
    config = json.loads((adapter / "adapter_config.json").read_text())
    leaves = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    assert config["trainable_token_indices"] == {leaf: [IM_START, IM_END] for leaf in leaves}
    tensors = load_file(adapter / "adapter_model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    for leaf in leaves:
        key = f"base_model.model.{'model.' if leaf == 'embed_tokens' else ''}{leaf}.token_adapter.trainable_tokens_delta"
        rows = tensors[key]
        assert rows.shape == (2, 64)
        start = (hf.model.embed_tokens if leaf == "embed_tokens" else hf.lm_head).weight.mean(0)
        assert (rows - start).abs().max() > 1e-3  # the rows trained away from their starting point
    assert load_tokenizer(adapter).token_to_id("<|im_end|>") == IM_END

    tokens = torch.tensor([[1, IM_START, 300, 301, 13, IM_END, 13, IM_START, 400]])
    hf.resize_token_embeddings(514)  # what a PEFT user does with the adapter's tokenizer: len(tokenizer) rows
    theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(tokens).logits.detach()
    assert theirs.shape[-1] == 514
    ours = load_module(base)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs, atol=1e-4, rtol=1e-4)
    # --adapter on the training backend: trained rows merged into a grown vocabulary
    from llmctl.backends import attach_adapter

    loaded = attach_adapter(get_backend(backend).load(base), str(adapter), backend)
    assert loaded.spec.vocab_size == 514
    np.testing.assert_allclose(loaded.logits(tokens.tolist()), theirs.numpy(), atol=1e-4, rtol=1e-4)


def test_tokenizer_with_the_template_tokens_gets_none_added(tmp_path):
    from llmctl.data.chat import add_template_tokens
    from llmctl.tokenizer import Tokenizer

    trained = Tokenizer.train_bpe(iter(["hello world"] * 50), vocab_size=300)
    trained.chat_template = None  # ChatML by default, whose two tokens train_bpe made
    size = trained.vocab_size
    assert add_template_tokens(trained) == [] and trained.vocab_size == size


@needs_shared
def test_merge_folds_the_added_token_rows_and_carries_the_tokenizer(tmp_path):
    from typer.testing import CliRunner

    from llmctl.backends.torch.engine import load_module
    from llmctl.backends.torch.lora import load_adapter
    from llmctl.cli import app
    from llmctl.io.model_folder import load_tokenizer

    adapter = _finetune(tmp_path, STORIES, "torch")
    result = CliRunner().invoke(app, ["merge", "--model", str(STORIES), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    unmerged = load_module(STORIES)
    load_adapter(unmerged, adapter)
    merged = load_module(tmp_path / "merged")
    assert merged.spec.vocab_size == 514
    assert load_tokenizer(tmp_path / "merged").token_to_id("<|im_end|>") == IM_END
    tokens = torch.tensor([[1, IM_START, 300, 301, 13, IM_END, 13, IM_START, 400]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), unmerged(tokens), atol=1e-4, rtol=1e-4)
