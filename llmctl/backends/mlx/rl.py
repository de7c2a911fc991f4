"""Online RL on the MLX backend: the GRPO loss as TRL's GRPOTrainer computes it, the objective that feeds it
per-token log-probabilities of sampled completions, and the engine that samples them with llmctl's generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from llmctl.backends.mlx.align import AlignEngine
from llmctl.backends.mlx.generate import Generator
from llmctl.backends.mlx.objectives import DeviceBatch, token_logprobs, unwrap
from llmctl.backends.mlx.preference import adapters_off
from llmctl.errors import LlmctlError
from llmctl.training.batch import Batch


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


class RLEngine(AlignEngine):
    """The policy being trained (every weight, or LoRA adapters on a frozen base), sampled between steps by the same
    Generator `llmctl generate` runs."""

    _generator: Generator | None = None

    def setup_policy(self, base: Path, lora: Any | None, value_head: bool) -> None:
        """The policy, every weight trained or LoRA adapters (align refuses ppo on MLX before this)."""
        self.setup(base, lora, False)

    def objective(self, settings: Any, reference: Any) -> GRPO:
        return GRPO(settings, reference)

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
        raise LlmctlError("--reward (a reward model) runs on the torch backend so far.",
                          hint="Pass --backend torch, or score with --reward-fn.")
