"""`llmctl align --backend mlx` beyond full-weight pairs: LoRA DPO with the adapters switched off as the reference
(held-out implicit-reward accuracy rises, the adapter gives PEFT and llmctl's torch backend the logits it gives on
MLX), --precompute-ref (the same losses as a live reference), KTO (its loss equals torch's, which equals TRL's) and
GRPO --lora (only adapters train, the reference costs no copy, resume is exact)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, needs_shared
from test_align import BAD, GOOD, NOUNS, _style_pairs

mx = pytest.importorskip("mlx.core")
pytestmark = pytest.mark.usefixtures("one_thread")
BASE = SHARED / "models" / "stories260K-hf"
LOG2 = 0.6931471805599453


def _align(out, *args):
    from typer.testing import CliRunner

    from llmctl.cli import app

    base = ["align", "--model", str(BASE), "--out", str(out), "--backend", "mlx", "train.dtype=fp32", "data.seq_len=64",
            "train.log_every=1000", "train.eval_every=1000"]
    return CliRunner().invoke(app, [*base, *args])


def _losses(folder):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- KTO's loss on fixed log-probabilities -----------------------------------------------------------------------


LOGPS = [-5.0, -8.0, -3.0, -11.0]
REF = [-6.0, -7.0, -3.5, -10.0]
KL_LOGPS = [-9.0, -10.0, -12.0, -7.0]
REF_KL = [-9.5, -10.2, -11.9, -7.6]
LABELS = [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("shift", [0.0, -2.0], ids=["kl", "kl-clamped"])
def test_mlx_kto_loss_equals_torch(shift):
    """The KTO objective on a batch of examples then their mismatched rows: loss and metrics as torch's objective
    (whose kto_loss tests/test_align_losses.py holds to TRL's KTOTrainer); shift -2 makes the batch KL negative,
    clamped at 0."""
    from llmctl.backends.mlx.preference import Preference as MlxPreference
    from llmctl.backends.mlx.preference import kto_kl as mlx_kto_kl
    from llmctl.backends.torch.preference import Preference, kto_kl
    from llmctl.preference import PreferenceSettings

    s = PreferenceSettings(method="kto", beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    logps = LOGPS + [v + shift for v in KL_LOGPS]
    ref, labels, lengths = REF + REF_KL, LABELS + [-1.0] * 4, [3.0, 5.0, 2.0, 7.0] * 2
    kl = float(kto_kl(torch.tensor(logps[4:]), torch.tensor(ref[4:])))
    assert (kl > 0) == (shift == 0)
    assert float(mlx_kto_kl(mx.array(logps[4:]), mx.array(ref[4:]))) == pytest.approx(kl, abs=1e-6)
    theirs_loss, theirs = Preference(s)._kto(*(torch.tensor(v) for v in (logps, ref, lengths, labels)))
    ours_loss, ours = MlxPreference(s)._kto(*(mx.array(v) for v in (logps, ref, lengths, labels)))
    assert float(ours_loss) == pytest.approx(float(theirs_loss), rel=1e-6)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert float(ours[key]) == pytest.approx(float(theirs[key]), rel=1e-6, abs=1e-6), key


# --- LoRA DPO, the precomputed reference, KTO runs -------------------------------------------------------------------


@needs_shared
@pytest.mark.slow
def test_mlx_lora_dpo_raises_held_out_accuracy_and_its_adapter_loads_in_peft_and_torch(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from llmctl.backends.mlx.engine import load_module
    from llmctl.backends.mlx.lora import load_adapter
    from llmctl.backends.torch.lora import apply_adapter
    from llmctl.backends.torch.runtime import Runtime

    train = _style_pairs(tmp_path / "train.jsonl", NOUNS[:14])
    val = _style_pairs(tmp_path / "val.jsonl", NOUNS[14:], seed=1)
    result = _align(tmp_path / "run", "--data", str(train), "--val", str(val), "--lora", "--rank", "4", "--steps", "6",
                    "data.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=1")
    assert result.exit_code == 0, result.output
    assert "reference: the base (adapters off)" in result.output
    records = _losses(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # the adapters start at zero: policy == reference
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["accuracy_before"] == 0.5 and final["accuracy_after"] >= 0.9, final  # 0.5 -> 1.0 when written

    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and len(config["target_modules"]) == 7
    tokens = [[1, 5, 9, 33, 100, 7, 250, 3, 64, 12]]
    hf = AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = hf(torch.tensor(tokens)).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(torch.tensor(tokens)).logits.numpy()
    assert np.abs(theirs - base_logits).max() > 1e-2  # the adapter changes the logits
    model = load_module(BASE)
    load_adapter(model, adapter)
    np.testing.assert_allclose(np.array(model(mx.array(tokens))), theirs, atol=1e-4, rtol=1e-4)
    policy = Runtime().load(BASE).module
    apply_adapter(policy, adapter)
    with torch.no_grad():
        np.testing.assert_allclose(policy(torch.tensor(tokens)).numpy(), theirs, atol=1e-4, rtol=1e-4)


@needs_shared
def test_mlx_lora_dpo_resumes_exactly(tmp_path):
    from safetensors.numpy import load_file

    data = _style_pairs(tmp_path / "train.jsonl", NOUNS[:8])
    args = ["--data", str(data), "--lora", "--rank", "4", "--targets", "q_proj,v_proj", "--steps", "4",
            "data.batch_size=2", "optim.lr=1e-2", "train.save_every=2"]
    full = _align(tmp_path / "full", *args)
    assert full.exit_code == 0, full.output
    assert _align(tmp_path / "half", *args, "train.stop_at=2").exit_code == 0
    assert not (tmp_path / "half" / "adapter").exists()
    resumed = _align(tmp_path / "half", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "half" / "adapter" / "adapter_model.safetensors")
    assert len(a) == 2 * 2 * 5 and any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_shared
@pytest.mark.parametrize("method, lora", [("dpo", False), ("ipo", True), ("kto", True)])
def test_mlx_precomputed_reference_gives_the_same_losses(tmp_path, method, lora):
    """The reference log-probabilities computed once (from the starting model, or the adapters switched off; KTO's
    mismatched rows too) and carried by the batches give the losses a live reference gives."""
    data = _style_pairs(tmp_path / "train.jsonl", NOUNS[:6])  # KTO: each pair as a desirable and an undesirable example
    args = ["--data", str(data), "--method", method, "--steps", "2", "data.batch_size=4", "optim.lr=1e-3",
            *(["--lora", "--rank", "4"] if lora else [])]
    live = _align(tmp_path / "live", *args)
    cached = _align(tmp_path / "cached", *args, "--precompute-ref")
    assert live.exit_code == 0 and cached.exit_code == 0, live.output + cached.output
    assert "reference: precomputed" in cached.output
    saved = np.load(tmp_path / "cached" / "reference_logps.npz")
    # 12 pairs, 1 held out: each pair's chosen and rejected, or each KTO example and its mismatched row
    assert saved["train"].shape == (22 if method == "kto" else 11, 2) and np.all(saved["train"] < 0)
    want, got = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert len(want) == 2
    assert got[0]["loss"] == pytest.approx({"dpo": LOG2, "kto": 0.5}.get(method, got[0]["loss"]), abs=1e-6)
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-4), (a, b)


@needs_shared
def test_mlx_kto_on_unpaired_examples_with_lora(tmp_path):
    import random

    r = random.Random(0)
    data = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"Tell me about the {n}.\n", "completion": f"The {n} was {r.choice(GOOD if good else BAD)}.",
             "label": good} for n in NOUNS[:10] for good in (True, False)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = _align(tmp_path / "run", "--method", "kto", "--data", str(data), "--lora", "--steps", "5",
                    "data.batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=1")
    assert result.exit_code == 0, result.output
    records = _losses(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) with the reference equal to the policy
    assert all(r["kl"] >= 0 for r in records) and records[-1]["loss"] < records[0]["loss"], records
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# --- GRPO with LoRA ---------------------------------------------------------------------------------------------------


REWARDS = """
def length(prompt, completion, example):
    return float(len(completion) % 3)
"""


@needs_shared
def test_mlx_grpo_lora_trains_only_the_adapters_against_the_base():
    """One GRPO step with the adapters switched off as the reference: gradients reach the adapters only, the KL to the
    reference is 0 before the step (the adapters start at zero) and above 0 after it, and the base is untouched."""
    from mlx.utils import tree_flatten

    from llmctl.adapters import LoraSettings
    from llmctl.backends.mlx.lora import is_adapter_param
    from llmctl.backends.mlx.rl import RLEngine
    from llmctl.commands.options import DType
    from llmctl.rewards import Prompt
    from llmctl.rl import RLSettings, completion_rows
    from llmctl.training.config import LoopConfig, OptimConfig

    engine = RLEngine(LoopConfig(dtype=DType.fp32), OptimConfig(lr=1e-2))
    engine.setup_policy(BASE, LoraSettings(rank=4), False)
    objective = engine.objective(RLSettings(beta=0.1), "adapters")
    rng = np.random.default_rng(0)
    prompts = [Prompt(rng.integers(3, 512, 6).tolist(), "", {}, "") for _ in range(4)]
    batch = completion_rows(prompts, [rng.integers(3, 512, 5).tolist() for _ in prompts],
                            np.array([1.0, -1.0, 0.5, -0.5]), 0)
    before = dict(tree_flatten(engine.model.parameters()))
    first = engine.micro_step(objective, batch, 1.0 / batch.target_count, True)
    assert float(first["kl"]) == pytest.approx(0.0, abs=1e-6)
    grads = dict(tree_flatten(engine.grads))
    assert grads and all(is_adapter_param(n) for n in grads)
    engine.optimizer_step(1e-2, 1.0)
    second = engine.micro_step(objective, batch, 1.0 / batch.target_count, True)
    assert float(second["kl"]) > 1e-6
    after = dict(tree_flatten(engine.model.parameters()))
    changed = {n for n, v in before.items() if not np.array_equal(np.array(after[n]), np.array(v))}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed), changed
    assert engine.trained_parameters() == sum(v.size for n, v in after.items() if is_adapter_param(n))


@needs_shared
@pytest.mark.slow
def test_mlx_grpo_lora_writes_the_adapter_and_resumes_exactly(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from llmctl.cli import app

    (tmp_path / "mlxa_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mlxa_rewards", None)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Once upon a time", "The little dog",
                                                                          "Lily and Tom", "One sunny day"]))

    def grpo(out, *extra):
        return CliRunner().invoke(app, ["align", "--method", "grpo", "--model", str(BASE), "--prompts", str(prompts),
                                        "--out", str(out), "--backend", "mlx", "--group-size", "4", "--lora", "--rank",
                                        "4", "--beta", "0.1", "--reward-fn", "mlxa_rewards:length", "--steps", "4",
                                        "data.batch_size=8", "optim.lr=1e-2", "rl.max_tokens=8", "train.save_every=2",
                                        "train.dtype=fp32", *extra])

    straight = grpo(tmp_path / "a")
    assert straight.exit_code == 0, straight.output
    assert "reference: the base (adapters off)" in straight.output
    assert grpo(tmp_path / "b", "train.stop_at=2").exit_code == 0
    resumed = grpo(tmp_path / "b", "--resume")
    assert resumed.exit_code == 0, resumed.output

    def steps(folder):
        return [{k: r[k] for k in ("step", "loss", "reward", "grad_norm", "kl")} for r in _losses(folder)]

    want = steps(tmp_path / "a")
    assert len(want) == 4 and want[0]["kl"] == pytest.approx(0.0, abs=1e-6) and want[-1]["kl"] > 0
    assert steps(tmp_path / "b") == want
    from safetensors.numpy import load_file

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)
    config = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


@needs_shared
def test_mlx_ppo_lora_trains_the_adapters_and_the_value_head():
    """PPO with --lora on MLX: the rollout's reference is the policy with its adapters off (equal to the policy before
    the first step: the adapters start at zero), and one step moves only the adapters and the value head."""
    from mlx.utils import tree_flatten

    from llmctl.adapters import LoraSettings
    from llmctl.backends.mlx.lora import is_adapter_param
    from llmctl.backends.mlx.rl import RLEngine
    from llmctl.commands.options import DType
    from llmctl.rewards import Prompt
    from llmctl.rl import RLSettings, completion_rows
    from llmctl.training.config import LoopConfig, OptimConfig

    engine = RLEngine(LoopConfig(dtype=DType.fp32), OptimConfig(lr=1e-2))
    engine.setup_policy(BASE, LoraSettings(rank=4), True)
    rng = np.random.default_rng(0)
    prompts = [Prompt(rng.integers(3, 512, 6).tolist(), "", {}, "") for _ in range(4)]
    batch = completion_rows(prompts, [rng.integers(3, 512, 5).tolist() for _ in prompts], np.zeros(4), 0)
    logps, ref, values = engine.rollout(batch, "adapters")
    assert np.abs(logps).max() > 0.1
    np.testing.assert_array_equal(logps, ref)
    mask = batch.loss_mask > 0
    batch.extras = {"old_logps": logps.astype(np.float32), "old_values": values.astype(np.float32),
                    "advantages": (rng.normal(size=logps.shape) * mask).astype(np.float32),
                    "returns": (rng.normal(size=logps.shape) * mask).astype(np.float32)}
    objective = engine.objective(RLSettings(), "ppo")
    before = dict(tree_flatten(engine.model.parameters()))
    engine.micro_step(objective, batch, 1.0 / batch.target_count, True)
    grads = dict(tree_flatten(engine.grads))
    assert grads and all(is_adapter_param(n) or n.startswith("v_head.") for n in grads)
    engine.optimizer_step(1e-2, 1.0)
    after = dict(tree_flatten(engine.model.parameters()))
    changed = {n for n, v in before.items() if not np.array_equal(np.array(after[n]), np.array(v))}
    assert "v_head.weight" in changed and any(".lora_" in n for n in changed), changed
    assert all(".lora_" in n or n.startswith("v_head.") for n in changed), changed
    logps, ref, _ = engine.rollout(batch, "adapters")
    assert np.abs(logps - ref).max() > 1e-6  # the adapters moved the policy away from its base
