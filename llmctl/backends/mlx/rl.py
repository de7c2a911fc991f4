"""Online RL on the MLX backend (the twin of backends/torch/rl.py): the GRPO and PPO losses as TRL computes them, the
objectives that feed them per-token log-probabilities (and PPO's values) of sampled completions, and the engine that
samples them with llmctl's generator and scores them with a reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from llmctl import ui
from llmctl.backends.mlx.align import AlignEngine
from llmctl.backends.mlx.generate import Generator
from llmctl.backends.mlx.objectives import DeviceBatch, token_logprobs, unwrap
from llmctl.backends.mlx.preference import adapters_off, reward_scores
from llmctl.training.batch import Batch

SCORE_BATCH = 16  # rows a reward model scores per forward


def grpo_token_loss(logps: mx.array, old_logps: mx.array, advantages: mx.array, ref_logps: mx.array | None, beta: float,
                    epsilon: float, epsilon_high: float) -> tuple[mx.array, mx.array, mx.array]:
    """Per-token GRPO loss, k3 KL to the reference and clipped flags, each (B, T), from per-token log-probabilities
    (B, T) of the policy, of the policy that sampled (old) and of the reference, and advantages (B,):
    -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1), r = exp(logp - old)."""
    A = advantages[:, None]
    ratio = mx.exp(logps - old_logps)
    clipped_ratio = mx.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -mx.minimum(ratio * A, clipped_ratio * A)
    kl = mx.zeros_like(logps)
    if ref_logps is not None:
        kl = mx.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
    return loss, kl, clipped


def token_logps(model: nn.Module, batch: DeviceBatch) -> mx.array:
    """log p(target) at each position under the loss mask (B, T), 0 elsewhere."""
    h = model(batch.input_ids, head=False, **batch.model_inputs())
    return token_logprobs(h, unwrap(model).head_weight(), batch.targets, batch.loss_mask)


class GRPO:
    """TRL's GRPO loss ("dapo": summed over the completion tokens of the step, the loop divides by their count).

    One optimizer step per sampled batch (TRL's num_iterations 1): the ratio is 1 in value and carries the gradient
    of A * log p; the reference is a frozen model, the policy with its adapters off (`"adapters"`), or None (beta 0:
    no KL term, as TRL skips it).
    """

    def __init__(self, settings: Any, reference: nn.Module | str | None = None) -> None:
        self.settings, self.reference = settings, reference

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def reference_logps(self, model: nn.Module, batch: DeviceBatch) -> mx.array | None:
        if self.reference is None:
            return None
        if self.reference == "adapters":
            with adapters_off(model):
                return mx.stop_gradient(token_logps(model, batch))
        return mx.stop_gradient(token_logps(self.reference, batch))

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        s, mask = self.settings, batch.loss_mask
        logps = token_logps(model, batch)
        ref = self.reference_logps(model, batch)
        loss, kl, clipped = grpo_token_loss(logps, mx.stop_gradient(logps), batch.extras["advantage"], ref, s.beta,
                                            s.epsilon, s.epsilon_high or s.epsilon)
        metrics = {"loss": mx.stop_gradient((loss * mask).sum()), "clip_fraction": (clipped * mask).sum()}
        if ref is not None:
            metrics["kl"] = mx.stop_gradient((kl * mask).sum())
        return (loss * mask).sum(), metrics


def ppo_token_loss(logps: mx.array, old_logps: mx.array, advantages: mx.array, values: mx.array, old_values: mx.array,
                   returns: mx.array, epsilon: float, cliprange_value: float) -> tuple[mx.array, mx.array, mx.array]:
    """Per-token clipped policy loss, clipped value loss and clipped flags, each (B, T), as TRL's PPO computes them:
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) and 1/2 max((v - R)^2, (old_v + clip(v - old_v, +-c) - R)^2)."""
    ratio = mx.exp(logps - old_logps)
    clipped_ratio = mx.clip(ratio, 1 - epsilon, 1 + epsilon)
    policy = mx.maximum(-advantages * ratio, -advantages * clipped_ratio)
    clipped_values = old_values + mx.clip(values - old_values, -cliprange_value, cliprange_value)
    value = 0.5 * mx.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return policy, value, -advantages * clipped_ratio > -advantages * ratio


def add_value_head(model: nn.Module) -> None:
    """PPO's value head, `v_head` (1, dim): a scalar value of each position's hidden state."""
    model.v_head = nn.Linear(model.spec.dim, 1, bias=False)
    model.v_head.weight = mx.zeros_like(model.v_head.weight)


def logps_and_values(model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, mx.array]:
    """Per-token log-probabilities of the targets and the value head's values, each (B, T), 0 off the loss mask."""
    h = model(batch.input_ids, head=False, **batch.model_inputs())
    inner = unwrap(model)
    logps = token_logprobs(h, inner.head_weight(), batch.targets, batch.loss_mask)
    return logps, inner.v_head(h.astype(mx.float32))[..., 0] * batch.loss_mask


class PPO:
    """TRL's PPO objective on a rollout: the clipped policy loss plus vf_coef times the clipped value loss, averaged
    over the rollout's completion tokens (the KL penalty is in the rollout's rewards, not here)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        s, mask, x = self.settings, batch.loss_mask, batch.extras
        logps, values = logps_and_values(model, batch)
        policy, value, clipped = ppo_token_loss(logps, x["old_logps"], x["advantages"], values, x["old_values"],
                                                x["returns"], s.epsilon, s.cliprange_value)
        loss = ((policy + s.vf_coef * value) * mask).sum()
        metrics = {"loss": mx.stop_gradient(loss), "policy_loss": mx.stop_gradient((policy * mask).sum()),
                   "value_loss": mx.stop_gradient((value * mask).sum()), "clip_fraction": (clipped * mask).sum()}
        return loss, metrics


class RLEngine(AlignEngine):
    """The policy being trained (every weight, or LoRA adapters on a frozen base), sampled between steps by the same
    Generator `llmctl generate` runs."""

    _generator: Generator | None = None

    def setup_policy(self, base: Path, lora: Any | None, value_head: bool) -> None:
        """The policy (every weight, or LoRA adapters on a frozen base), with PPO's value head trained beside it."""
        from llmctl.backends.mlx.lora import add_adapters, is_adapter_param

        def prepare(model: nn.Module) -> None:
            if lora is not None:
                add_adapters(model, lora)
            if value_head:
                add_value_head(model)

        trainable = None if lora is None else (lambda name: is_adapter_param(name) or name.startswith("v_head."))
        self.load(base, trainable=trainable, prepare=prepare)

    def objective(self, settings: Any, reference: Any) -> GRPO | PPO:
        return PPO(settings) if reference == "ppo" else GRPO(settings, reference)

    def rollout(self, batch: Batch, reference: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The policy's and the reference's per-token log-probabilities and the values of a rollout, (B, T) each."""
        db = DeviceBatch.of(batch)
        logps, values = logps_and_values(self.model, db)
        if reference == "adapters":
            with adapters_off(self.model):
                ref = token_logps(self.model, db)
        else:
            ref = token_logps(reference, db)
        return tuple(np.array(a, np.float64) for a in (logps, ref, values))

    def export(self, folder: Path) -> None:
        """The policy's model folder, without PPO's value head."""
        if ui.is_main_process():
            params = {k: v for k, v in self._state_dicts()[0].items() if not k.startswith("v_head.")}
            self._write_model(folder, params, "trainable.safetensors")

    def sample(self, prompts: list[list[int]], params: Any) -> list[list[int]]:
        """New ids for each prompt from the policy as it is now (`Generator.generate_batch`, seeded by params.seed)."""
        if self._generator is None:
            self._generator = Generator(self.model)
        was = self.model.training
        self.model.eval()
        try:
            return self._generator.generate_batch(prompts, params)
        finally:
            self.model.train(was)

    def reward_model(self, folder: Path) -> Any:
        """rows of ids -> a reward model's score of each (its head on the last token), as `llmctl eval` scores pairs."""
        from llmctl.backends.mlx.align import load_reward_model

        module, head, _ = load_reward_model(folder)

        def scores(rows: list[list[int]]) -> np.ndarray:
            out = []
            for start in range(0, len(rows), SCORE_BATCH):
                chunk = rows[start : start + SCORE_BATCH]
                ids = np.zeros((len(chunk), max(len(r) for r in chunk)), np.int64)
                mask = np.zeros(ids.shape, np.float32)
                for b, r in enumerate(chunk):
                    ids[b, : len(r)] = r
                    mask[b, len(r) - 1] = 1.0  # the score is read at the last token
                out.append(np.array(reward_scores(module, head, DeviceBatch.of(Batch(ids, ids, mask)))))
            return np.concatenate(out).astype(np.float64)

        return scores
