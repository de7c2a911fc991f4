"""GRPO (`llmctl align --method grpo`): its advantages and loss equal hand-written formulas and TRL's GRPOTrainer code
on fixed inputs (gradient included); completions sampled inside training are the tokens `llmctl generate` gives with
the same seed and settings; bad prompts and failing reward functions are clear errors naming the example."""

from __future__ import annotations

import json
import math
import statistics
import sys
import types
from collections import defaultdict

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED, needs_shared
from llmctl.backends.torch.rl import grpo_token_loss
from llmctl.cli import app
from llmctl.rewards import exact, format_reward, group_advantages

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = SHARED / "models" / "stories260K-hf"
REWARDS = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, math.nan, 0.25])  # 3 groups of 4
G = 4


# --- advantages and loss on fixed inputs --------------------------------------------------------------------------


def test_advantages_equal_the_formula_and_trl():
    from trl.trainer.utils import nanstd

    ours, spread = group_advantages(REWARDS, G)
    want = []
    for group in REWARDS.reshape(-1, G):
        kept = [r for r in group if not math.isnan(r)]
        mean, std = statistics.fmean(kept), statistics.stdev(kept)
        want += [0.0 if math.isnan(r) else (r - mean) / (std + 1e-4) for r in group]
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
    assert spread[1] == 0.0 and ours[4:8].tolist() == [0.0] * 4  # a group whose completions all score the same teaches nothing
    # TRL's GRPOTrainer._generate_and_score_completions, scale_rewards="group", one reward function:
    rewards = torch.tensor(REWARDS)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    theirs = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # a ratio off 1: the clip engages
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    advantages = torch.tensor([1.2, -0.7, 0.4, -0.9], dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return logps, old, ref, advantages, mask


def _trl_loss(logps, old, ref, advantages, mask, beta, eps, eps_high):
    """TRL's GRPOTrainer._compute_loss on these tensors (loss_type "dapo", its default), with a stand-in trainer whose
    model returns `logps` as the completion's per-token log-probabilities."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                gather_for_metrics=lambda x: x)
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type="dapo", epsilon_low=eps, epsilon_high=eps_high, use_vllm=False, aux_loss_enabled=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=acc, args=args,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    B, T = logps.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": advantages,
              "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("beta, eps_high", [(0.0, 0.2), (0.04, 0.2), (0.1, 0.28)])
def test_loss_equals_the_formula_and_trl(beta, eps_high):
    logps, old, ref, advantages, mask = _inputs()
    per_token, kl, clipped = grpo_token_loss(logps, old, advantages, ref if beta else None, beta, 0.2, eps_high)
    ours = (per_token * mask).sum() / mask.sum()
    hand, n, clips = 0.0, 0, 0
    for b in range(len(logps)):
        for t in range(logps.shape[1]):
            if mask[b, t]:
                r, A = math.exp(logps[b, t] - old[b, t]), float(advantages[b])
                x = float(ref[b, t] - logps[b, t])
                hand += -min(r * A, min(max(r, 0.8), 1 + eps_high) * A) + (beta * (math.exp(x) - x - 1) if beta else 0.0)
                clips += (r < 0.8 and A < 0) or (r > 1 + eps_high and A > 0)
                n += 1
    assert float(ours) == pytest.approx(hand / n, rel=1e-12)
    assert clips > 0 and float((clipped * mask).sum()) == clips
    theirs, metrics = _trl_loss(logps, old, ref, advantages, mask, beta, 0.2, eps_high)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)
    assert float((clipped * mask).sum() / mask.sum()) == pytest.approx(metrics["clip_ratio/region_mean"][0])
    if beta:
        assert float((kl * mask).sum() / mask.sum()) == pytest.approx(metrics["kl"][0], rel=1e-12)


def test_gradient_equals_trl_on_policy():
    """One update per sample (TRL's num_iterations 1): the ratio is 1 and the gradient that of -A log p + beta KL."""
    logps, _, ref, advantages, mask = _inputs(1)
    ours_in = logps.clone().requires_grad_(True)
    per_token, _, _ = grpo_token_loss(ours_in, ours_in.detach(), advantages, ref, 0.04, 0.2, 0.2)
    ((per_token * mask).sum() / mask.sum()).backward()
    theirs_in = logps.clone().requires_grad_(True)
    _trl_loss(theirs_in, None, ref, advantages, mask, 0.04, 0.2, 0.2)[0].backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-12, atol=1e-12)


def test_builtin_rewards():
    example = {"answer": "42"}
    assert exact("q", " 42 ", example) == 1.0 and exact("q", "41", example) == 0.0
    assert format_reward("q", "41", example) == 1.0 and format_reward("q", "forty", example) == 0.0
    assert format_reward("q", "1 2 3", {"answer": "3 5 7"}) == 1.0 and format_reward("q", "123", {"answer": "3 5 7"}) == 0.0
    assert format_reward("q", "ABC", {"answer": "XYZW"}) == 1.0 and format_reward("q", "abc", {"answer": "XYZW"}) == 0.0


# --- runs ---------------------------------------------------------------------------------------------------------

RECORDER = '''
import json, os

def record(prompt, completion, example):
    with open(os.environ["GRPO_SEEN"], "a") as f:
        f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\\n")
    return float(len(completion) % 3)

def broken(prompt, completion, example):
    if example.get("bad"):
        raise ValueError("cannot score this one")
    return 1.0

def wordy(prompt, completion, example):
    return "many"
'''
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom", "One sunny day"]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "grpo_rewards_t.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRPO_SEEN", str(tmp_path / "seen.jsonl"))
    sys.modules.pop("grpo_rewards_t", None)
    return tmp_path


def _prompt_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _align(tmp_path, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = _prompt_file(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return CliRunner().invoke(app, ["align", "--method", "grpo", "--model", str(BASE), "--prompts", str(prompts),
                                    "--out", str(tmp_path / "run"), "--backend", "torch", "--group-size", "4",
                                    "rl.max_tokens=12", "train.dtype=fp32", *args])


@needs_shared
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sampling_inside_training_equals_llmctl_generate(tmp_path, reward_module, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    held = _prompt_file(tmp_path / "held.jsonl", [{"prompt": "Held out"}])
    result = _align(tmp_path, "--reward-fn", "grpo_rewards_t:record", "--steps", "1", "data.batch_size=8",
                    f"data.val={held}", "rl.temperature=0.9", "rl.top_k=50", "--backend", backend)
    assert result.exit_code == 0, result.output
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    trained = [s for s in seen if s["prompt"] != "Held out"]  # step 1's two prompts x 4 completions
    assert len(trained) == 8
    assert len({s["completion"] for s in trained}) > 4  # sampled, not greedy
    file = _prompt_file(tmp_path / "again.jsonl", [{"prompt": s["prompt"]} for s in trained])
    # step 1 samples with seed rl.step_seed(train.seed 0, step 0) = 0, all 8 rows in one batch
    out = CliRunner().invoke(app, ["generate", "--model", str(BASE), "--prompt-file", str(file), "--batch-size", "8",
                                   "--seed", "0", "--temperature", "0.9", "--top-k", "50", "--top-p", "1",
                                   "--max-tokens", "12", "--backend", backend])
    assert out.exit_code == 0, out.output
    generated = [json.loads(line)["text"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert generated == [s["completion"] for s in trained]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = metrics[0]
    for key in ("loss", "reward", "reward_std", "completion_len", "clip_fraction", "sample_s", "train_s"):
        assert key in step, key
    assert step["reward"] == pytest.approx(np.mean([len(s["completion"]) % 3 for s in trained]))


@needs_shared
def test_resume_is_exact(tmp_path, reward_module):
    """Stopped after step 2 and resumed, a run samples the same completions and ends where an uninterrupted one does."""
    args = ["--reward-fn", "grpo_rewards_t:record", "--steps", "4", "data.batch_size=8", "optim.lr=1e-3",
            "train.save_every=2", "--lora"]
    straight = _align(tmp_path / "a", *args)
    assert straight.exit_code == 0, straight.output
    assert _align(tmp_path / "b", *args, "train.stop_at=2").exit_code == 0
    resumed = _align(tmp_path / "b", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output

    def steps(folder):
        return [{k: r[k] for k in ("step", "loss", "reward", "grad_norm")}
                for r in map(json.loads, (folder / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert steps(tmp_path / "b") == steps(tmp_path / "a")
    assert len(steps(tmp_path / "a")) == 4


@pytest.mark.skipif("mlx" not in __import__("conftest").BACKENDS, reason="MLX is not installed")
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_mlx_loss_equals_torch(beta):
    import mlx.core as mx

    from llmctl.backends.mlx.rl import grpo_token_loss as mlx_loss

    logps, old, ref, advantages, _ = (t.float() for t in _inputs(2))
    theirs = grpo_token_loss(logps, old, advantages, ref if beta else None, beta, 0.2, 0.28)
    ours = mlx_loss(*(mx.array(t.numpy()) for t in (logps, old, advantages)), mx.array(ref.numpy()) if beta else None,
                    beta, 0.2, 0.28)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.array(a), b.numpy(), rtol=1e-5, atol=1e-6)


@needs_shared
def test_a_failing_reward_function_names_the_example(tmp_path, reward_module):
    prompts = _prompt_file(tmp_path / "p.jsonl", [{"prompt": "Once upon a time"}, {"prompt": "The dog", "bad": True},
                                                  {"prompt": "Lily"}])
    args = ["align", "--method", "grpo", "--model", str(BASE), "--prompts", str(prompts), "--backend", "torch",
            "--group-size", "2", "--steps", "2", "data.batch_size=4", "rl.max_tokens=4", "data.val_fraction=0.3"]
    result = CliRunner().invoke(app, [*args, "--reward-fn", "grpo_rewards_t:broken", "--out", str(tmp_path / "a"),
                                      "data.val=" + str(prompts)])
    assert result.exit_code != 0
    assert f"{prompts}:2" in result.output and "cannot score this one" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--reward-fn", "grpo_rewards_t:wordy", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "returned 'many', not a finite number" in result.output, result.output
    result = CliRunner().invoke(app, [*args, "--reward-fn", "grpo_rewards_t:broken", "--on-reward-error", "skip",
                                      "--out", str(tmp_path / "c"), "data.val=" + str(prompts)])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("reward_errors", 0) for m in metrics) > 0


@needs_shared
@pytest.mark.parametrize("records, expected", [
    (['{"prompt": "ok"}', "not json"], "prompts.jsonl:2: not JSON"),
    (['{"prompt": "ok"}', '{"question": "x"}'], 'prompts.jsonl:2: "prompt" is missing'),
    (['{"prompt": "ok", "answer": 3}'], 'prompts.jsonl:1: "answer" must be a string'),
])
def test_bad_prompt_files_name_the_line(tmp_path, records, expected):
    (tmp_path / "prompts.jsonl").write_text("\n".join(records) + "\n")
    result = CliRunner().invoke(app, ["align", "--method", "grpo", "--model", str(BASE), "--prompts",
                                      str(tmp_path / "prompts.jsonl"), "--reward-fn", "exact", "--out", str(tmp_path / "run"),
                                      "--backend", "torch"])
    assert result.exit_code != 0 and expected in result.output, result.output
    assert not (tmp_path / "run").exists()


@needs_shared
@pytest.mark.parametrize("args, expected", [
    ([], "exactly one of --reward-fn"),
    (["--reward-fn", "exact", "--group-size", "3"], "multiple of --group-size 3"),
    (["--reward-fn", "exact", "--group-size", "1"], "rl.group_size=1"),
    (["--reward-fn", "nosuchmodule_x:f"], "cannot import nosuchmodule_x"),
    (["--reward-fn", "exact", "--on-reward-error", "ignore"], "expected stop or skip"),
])
def test_bad_settings_are_refused(tmp_path, args, expected):
    result = CliRunner().invoke(app, ["align", "--method", "grpo", "--model", str(BASE), "--out", str(tmp_path / "run"),
                                      "--backend", "torch", *args])
    assert result.exit_code != 0 and expected in result.output, result.output


# --- learning: held-out exact match rises on a built-in task ------------------------------------------------------


def _count_prompts(tmp_path) -> tuple:
    """The built-in "How many letters are in X?" task: the fine-tune's training questions to train on, and 50 new
    ones (never in the fine-tune's data) held out."""
    from llmctl.data.tasks import task_records

    def records(convs):
        return [{"prompt": c[:1], "answer": c[1]["content"]} for c in convs if c[0]["content"].startswith("How many letters")]

    train, val = task_records(0)
    seen = {c[0]["content"] for c in train + val}
    fresh = [r for r in records(sum(task_records(7), [])) if r["prompt"][0]["content"] not in seen][:50]
    return _prompt_file(tmp_path / "count.jsonl", records(train)), _prompt_file(tmp_path / "count_val.jsonl", fresh)


@needs_shared
@pytest.mark.slow
def test_grpo_raises_held_out_exact_match_above_the_fine_tuned_model(tmp_path_factory):
    """Start: stories260K after test_finetune_accuracy's LoRA fine-tune, merged (it counts letters right about 60% of
    the time and does no other task). GRPO with --reward-fn exact, LoRA, beta 0.04, 40 steps of 2 prompts x 8.
    Measured (AMD EPYC, AVX2): held-out exact match 58% -> 74% (50 new questions), KL to the start at most 0.59."""
    from test_finetune_accuracy import finetuned_run

    run = finetuned_run(tmp_path_factory, "torch")
    work = tmp_path_factory.mktemp("grpo-count")
    merged = CliRunner().invoke(app, ["merge", "--model", str(BASE), "--adapter", str(run), "--out", str(work / "start")])
    assert merged.exit_code == 0, merged.output
    train, val = _count_prompts(work)
    result = CliRunner().invoke(app, [
        "align", "--method", "grpo", "--model", str(work / "start"), "--prompts", str(train), "--reward-fn", "exact",
        "--lora", "--rank", "16", "--alpha", "32", "--beta", "0.04", "--group-size", "8", "--steps", "40",
        "--out", str(work / "grpo"), "--backend", "torch", "data.batch_size=16", "rl.max_tokens=6", "optim.lr=1e-3",
        "optim.warmup_steps=2", "train.dtype=fp32", "train.save_every=0", f"data.val={val}"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (work / "grpo" / "metrics.jsonl").read_text().splitlines()]
    held = records[-1]
    assert held["reward_before"] >= 0.3, held  # the fine-tuned start already counts, sometimes
    assert held["reward_after"] >= held["reward_before"] + 0.08, held  # 4 more right answers of 50, at least
    assert max(r["kl"] for r in records if "kl" in r) < 1.0


# --- PPO --------------------------------------------------------------------------------------------------------


def test_gae_and_whitening_equal_the_formulas():
    from llmctl.rl import gae, whiten

    rewards = np.array([[0.1, -0.2, 1.5, 0.0], [0.0, 0.3, 0.0, 0.0]])
    values = np.array([[0.5, 0.4, 0.9, 0.0], [0.2, -0.1, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 0], [0, 1, 0, 0]], np.float32)  # row 2: a prompt token, then a one-token completion
    advantages, returns = gae(rewards, values, mask, 1.0, 0.95)
    # row 1 by hand, backwards: the value after the last token is 0
    d2 = 1.5 + 0 - 0.9
    d1 = -0.2 + 0.9 - 0.4
    d0 = 0.1 + 0.4 - 0.5
    a2, a1 = d2, d1 + 0.95 * d2
    np.testing.assert_allclose(advantages[0], [d0 + 0.95 * a1, a1, a2, 0.0])
    np.testing.assert_allclose(advantages[1], [0.0, 0.3 + 0.1, 0.0, 0.0])
    np.testing.assert_allclose(returns, (advantages + values) * mask)
    white = whiten(advantages, mask)
    kept = advantages[mask > 0]
    np.testing.assert_allclose(white[mask > 0], (kept - kept.mean()) / math.sqrt(kept.var(ddof=1) + 1e-8))
    assert (white[mask == 0] == 0).all()


def test_ppo_loss_equals_the_formula():
    from llmctl.backends.torch.rl import ppo_token_loss

    logps, old, _, _, _ = _inputs(3)
    g = torch.Generator().manual_seed(4)
    advantages, values, old_values, returns = (torch.randn(logps.shape, generator=g, dtype=torch.float64) for _ in range(4))
    policy, value, clipped = ppo_token_loss(logps, old, advantages, values, old_values, returns, 0.2, 0.2)
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            r, A = math.exp(logps[b, t] - old[b, t]), float(advantages[b, t])
            assert float(policy[b, t]) == pytest.approx(max(-A * r, -A * min(max(r, 0.8), 1.2)), rel=1e-12)
            v, ov, R = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            vc = ov + min(max(v - ov, -0.2), 0.2)
            assert float(value[b, t]) == pytest.approx(0.5 * max((v - R) ** 2, (vc - R) ** 2), rel=1e-12)
            assert bool(clipped[b, t]) == (-A * min(max(r, 0.8), 1.2) > -A * r)
    assert clipped.any() and not clipped.all()


@needs_shared
@pytest.mark.parametrize("args, expected", [
    (["--reward-fn", "exact"], "--method ppo scores with a reward model"),
    (["--reward", "x", "--steps", "6"], "must be multiples of rl.ppo_epochs=4"),
])
def test_bad_ppo_settings_are_refused(tmp_path, args, expected):
    result = CliRunner().invoke(app, ["align", "--method", "ppo", "--model", str(BASE), "--out", str(tmp_path / "run"),
                                      "--backend", "torch", *args])
    assert result.exit_code != 0 and expected in " ".join(result.output.split()), result.output


@needs_shared
@pytest.mark.slow
def test_ppo_raises_a_reward_models_score_on_held_out_prompts(tmp_path):
    """A reward model trained here prefers kind descriptions to unkind ones ("Tell me about the cat." -> "The cat was
    kind." over "... rude."); PPO from stories260K, 40 steps (10 rollouts of 8 prompts, 4 epochs each), full weights.
    Measured (AMD EPYC, AVX2): the mean score of 4 sampled completions of each of 6 held-out prompts (nouns never
    trained on) 0.89 -> 2.74, KL to the start 3.6 nats a completion at the last rollout."""
    from test_align import NOUNS, _style_pairs

    pairs = _style_pairs(tmp_path / "pairs.jsonl", NOUNS)
    rm = CliRunner().invoke(app, ["align", "--method", "reward", "--model", str(BASE), "--data", str(pairs), "--out",
                                  str(tmp_path / "rm"), "--steps", "30", "data.batch_size=8", "optim.lr=2e-3",
                                  "data.seq_len=64", "train.dtype=fp32", "train.eval_every=1000", "--backend", "torch"])
    assert rm.exit_code == 0, rm.output
    prompts = [{"prompt": f"Tell me about the {n}.\n"} for n in NOUNS]
    train, val = _prompt_file(tmp_path / "p.jsonl", prompts[:14]), _prompt_file(tmp_path / "v.jsonl", prompts[14:])
    result = CliRunner().invoke(app, [
        "align", "--method", "ppo", "--model", str(BASE), "--prompts", str(train), "--reward", str(tmp_path / "rm" / "model"),
        "--out", str(tmp_path / "ppo"), "--steps", "40", "--backend", "torch", "data.batch_size=8", "rl.max_tokens=12",
        "optim.lr=1e-4", "optim.warmup_steps=2", "train.dtype=fp32", "train.save_every=0", f"data.val={val}"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    held = records[-1]
    assert held["reward_after"] >= held["reward_before"] + 0.5, held
    for key in ("policy_loss", "value_loss", "clip_fraction", "rollout_kl", "sample_s", "train_s"):
        assert key in records[0], key
