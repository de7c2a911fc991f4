"""`llmctl align` end to end on a small real model (stories260K): DPO starts at log 2 and raises the implicit-reward
accuracy on held-out pairs, LoRA alignment resumes exactly, a reward model loads in transformers with the same scores
and ranks the built-in pairs well above chance, and bad input is named."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conftest import BACKENDS, SHARED, needs_shared

BASE = SHARED / "models" / "stories260K-hf"
GOOD = ["kind", "happy", "gentle", "brave", "friendly", "calm"]
BAD = ["rude", "angry", "mean", "cruel", "nasty", "grumpy"]
NOUNS = ["cat", "dog", "bird", "girl", "boy", "frog", "fish", "bear", "king", "tree", "duck", "sun", "moon", "ship",
         "cow", "fox", "owl", "pig", "hen", "bee"]


def _style_pairs(path, nouns, seed=0):
    """Pairs that prefer a kind description to an unkind one, about each noun (held-out nouns test generalization)."""
    import random

    r = random.Random(seed)
    rows = [{"prompt": f"Tell me about the {n}.\n", "chosen": f"The {n} was {r.choice(GOOD)}.",
             "rejected": f"The {n} was {r.choice(BAD)}."} for n in nouns for _ in range(2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _align(out, *args):
    from typer.testing import CliRunner

    from llmctl.cli import app

    base = ["align", "--model", str(BASE), "--out", str(out), "--backend", "torch", "train.dtype=fp32",
            "data.seq_len=64", "train.log_every=1000"]
    return CliRunner().invoke(app, [*base, *args])


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@needs_shared
def test_dpo_starts_at_log2_and_raises_held_out_implicit_reward_accuracy(tmp_path):
    train = _style_pairs(tmp_path / "train.jsonl", NOUNS[:14])
    val = _style_pairs(tmp_path / "val.jsonl", NOUNS[14:], seed=1)
    result = _align(tmp_path / "run", "--data", str(train), "--val", str(val), "--steps", "12", "data.batch_size=4",
                    "optim.lr=3e-3", "optim.warmup_steps=2", "train.eval_every=1000")
    assert result.exit_code == 0, result.output
    records = _metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # the reference is the policy at step one
    final = records[-1]
    assert final["accuracy_before"] == 0.5  # every held-out pair ties before training
    assert final["accuracy_after"] >= 0.9, final
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # eval --pairs agrees: the aligned policy's implicit reward against its base ranks the held-out pairs.
    from typer.testing import CliRunner

    from llmctl.cli import app

    out = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "run" / "model"), "--pairs", str(val), "--base",
                                   str(BASE), "--json", "--seq-len", "64"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["accuracy"] == pytest.approx(final["accuracy_after"])


@needs_shared
@pytest.mark.skipif("mlx" not in BACKENDS, reason="MLX is not installed")
def test_mlx_dpo_starts_at_log2_and_raises_held_out_implicit_reward_accuracy(tmp_path):
    train = _style_pairs(tmp_path / "train.jsonl", NOUNS[:14])
    val = _style_pairs(tmp_path / "val.jsonl", NOUNS[14:], seed=1)
    result = _align(tmp_path / "run", "--data", str(train), "--val", str(val), "--steps", "12", "data.batch_size=4",
                    "optim.lr=3e-3", "optim.warmup_steps=2", "train.eval_every=1000", "--backend", "mlx")
    assert result.exit_code == 0, result.output
    records = _metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert records[-1]["accuracy_before"] == 0.5 and records[-1]["accuracy_after"] >= 0.9, records[-1]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@needs_shared
def test_lora_dpo_uses_the_base_as_reference_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    data = _style_pairs(tmp_path / "train.jsonl", NOUNS[:8])
    args = ["--data", str(data), "--lora", "--rank", "4", "--steps", "4", "data.batch_size=2", "optim.lr=1e-2"]
    full = _align(tmp_path / "full", *args)
    assert full.exit_code == 0, full.output
    assert _metrics(tmp_path / "full")[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    half = _align(tmp_path / "half", *args, "train.stop_at=2")
    assert half.exit_code == 0, half.output
    resumed = _align(tmp_path / "half", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "half" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@needs_shared
def test_precomputed_reference_gives_the_same_run(tmp_path):
    data = _style_pairs(tmp_path / "train.jsonl", NOUNS[:8])
    args = ["--data", str(data), "--method", "ipo", "--steps", "3", "data.batch_size=4", "optim.lr=1e-3"]
    live = _align(tmp_path / "live", *args)
    cached = _align(tmp_path / "cached", *args, "--precompute-ref")
    assert live.exit_code == 0 and cached.exit_code == 0, live.output + cached.output
    assert (tmp_path / "cached" / "reference_logps.npz").is_file()
    live_losses = [r["loss"] for r in _metrics(tmp_path / "live") if "loss" in r]
    assert len(live_losses) == 3
    assert live_losses == pytest.approx([r["loss"] for r in _metrics(tmp_path / "cached") if "loss" in r], rel=1e-5)


@needs_shared
def test_kto_on_unpaired_examples_with_lora(tmp_path):
    import random

    r = random.Random(0)
    data = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"Tell me about the {n}.\n", "completion": f"The {n} was {r.choice(GOOD if good else BAD)}.",
             "label": good} for n in NOUNS[:10] for good in (True, False)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = _align(tmp_path / "run", "--method", "kto", "--data", str(data), "--lora", "--steps", "6",
                    "data.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=1")
    assert result.exit_code == 0, result.output
    records = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) with the reference equal to the policy
    assert all(r["kl"] >= 0 for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@needs_shared
def test_reward_model_loads_in_transformers_with_the_same_scores(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmctl.backends.torch.align import load_reward_model, per_example
    from llmctl.backends.torch.preference import reward_scores
    from llmctl.data.preferences import Counts, PreferenceEncoder, Rows, encode_files
    from llmctl.io.model_folder import load_tokenizer

    data = _style_pairs(tmp_path / "train.jsonl", NOUNS[:8])
    result = _align(tmp_path / "rm", "--method", "reward", "--data", str(data), "--steps", "3", "data.batch_size=4",
                    "optim.lr=1e-3")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "rm" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert hf.config.pad_token_id == config["pad_token_id"] is not None
    model, head, pad = load_reward_model(folder)
    examples = encode_files([data], PreferenceEncoder(load_tokenizer(folder), 64), Counts())
    ours = per_example(lambda b: reward_scores(model, head, b), Rows("reward", pad, 64), examples)
    with torch.no_grad():
        theirs = [[hf(torch.tensor([r.tokens])).logits[0, 0].item() for r in (ex.chosen, ex.rejected)] for ex in examples]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-5)
    # A padded batch scores the same: transformers takes the last token that is not padding, as llmctl does.
    rows = [ex.chosen.tokens for ex in examples[:3]]
    width = max(map(len, rows))
    padded = torch.tensor([t + [pad] * (width - len(t)) for t in rows])
    with torch.no_grad():
        batched = hf(padded).logits[:, 0]
    torch.testing.assert_close(batched, torch.tensor(ours[:3, 0]), rtol=1e-4, atol=1e-5)


@needs_shared
@pytest.mark.slow
def test_reward_model_ranks_builtin_pairs_well_above_chance(tmp_path):
    result = _align(tmp_path / "rm", "--method", "reward", "--steps", "40", "data.batch_size=16", "optim.lr=2e-3",
                    "train.eval_every=1000", "data.seq_len=96")
    assert result.exit_code == 0, result.output
    final = _metrics(tmp_path / "rm")[-1]
    assert final["accuracy_after"] >= 0.75, final  # 59% before and 88% after on this machine (seq 64)


@needs_shared
def test_identical_pairs_are_counted_and_skipped(tmp_path):
    data = tmp_path / "p.jsonl"
    rows = [{"prompt": "Hi.", "chosen": "Hello.", "rejected": "Hello."}] * 3
    rows += [{"prompt": [{"role": "user", "content": f"Say {w}."}], "chosen": w, "rejected": w + "!"} for w in NOUNS[:6]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _align(tmp_path / "run", "--data", str(data), "--steps", "1", "data.batch_size=2")
    assert result.exit_code == 0, result.output
    assert "skipped 3 with identical chosen and rejected" in " ".join(result.output.split())


@needs_shared
@pytest.mark.parametrize("line, message", [
    ({"prompt": "Hi.", "chosen": "Hello."}, r"p\.jsonl:2: missing 'rejected'"),
    ({"prompt": "Hi.", "completion": "Hello."}, r"p\.jsonl:2: missing 'label'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"p\.jsonl:2: \"prompt\" must be a string or a list of messages"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     r"p\.jsonl:2: \"chosen\" must be a string or a list of assistant messages"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, line, message):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Hi.", "chosen": "Hello.", "rejected": "Go."}) + "\n" + json.dumps(line) + "\n")
    result = _align(tmp_path / "run", "--data", str(data), "--steps", "1")
    assert result.exit_code == 1
    assert re.search(message, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@needs_shared
def test_a_reference_with_another_tokenizer_is_refused(tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(BASE, ref)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # Llama 2's 32,000-token tokenizer, not the model's 512
        shutil.copyfile(SHARED / "tokenizers" / "llama2" / name, ref / name)
    data = _style_pairs(tmp_path / "train.jsonl", NOUNS[:4])
    result = _align(tmp_path / "run", "--data", str(data), "--ref", str(ref), "--steps", "1")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert f"--ref {ref} has a different tokenizer from the policy's (512 and 32000 tokens" in text, text
    assert not (tmp_path / "run").exists()


@needs_shared
def test_prompts_are_cut_from_the_left_and_responses_kept_whole():
    from llmctl.data.preferences import Counts, PreferenceEncoder, policy_rows
    from llmctl.io.model_folder import load_tokenizer

    tok = load_tokenizer(BASE)
    counts, encoder = Counts(), PreferenceEncoder(tok, 24)
    long_prompt = "Once upon a time there was a little girl who liked to play in the park with her dog. "
    record = {"prompt": long_prompt, "chosen": " She was happy.", "rejected": " She was sad and very very tired."}
    (ex,) = encoder.encode(record, "x:1", counts)
    assert counts.cut_prompts == 2 and counts.too_long == 0
    for key, r in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        whole = encoder.response(long_prompt, record[key], "x:1", key)
        assert r.response == whole.response and r.response[-1] == tok.eos_id  # the reply and the end of text, whole
        assert tok.decode(r.response[:-1]).strip() == record[key].strip()
        assert len(r.tokens) == 25 and r.prompt == whole.prompt[-len(r.prompt):]  # the prompt's end, to fill 24 + 1
    batch = policy_rows([ex.chosen, ex.rejected], tok.pad_id or 0)
    for b, r in enumerate((ex.chosen, ex.rejected)):  # the mask covers exactly the predictions of response tokens
        picked = batch.targets[b][batch.loss_mask[b] > 0].tolist()
        assert picked == r.response
    too_long = {"prompt": "Hi.", "chosen": " yes" * 40, "rejected": " no"}
    assert encoder.encode(too_long, "x:2", counts) == [] and counts.too_long == 1
