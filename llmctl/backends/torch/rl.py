"""Online RL on the torch backend: the GRPO loss as TRL's GRPOTrainer computes it, the objective that feeds it
per-token log-probabilities of sampled completions, and the engine that samples them with llmctl's generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmctl.backends.torch.align import AlignEngine
from llmctl.backends.torch.generate import Generator
from llmctl.backends.torch.objectives import DeviceBatch, token_logprobs, unwrap
from llmctl.backends.torch.preference import adapters_off, reward_scores
from llmctl.training.batch import Batch

SCORE_BATCH = 16  # rows a reward model scores per forward


def grpo_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, ref_logps: Tensor | None, beta: float,
                    epsilon: float, epsilon_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token GRPO loss, k3 KL to the reference and clipped flags, each (B, T), from per-token log-probabilities
    (B, T) of the policy, of the policy that sampled (old) and of the reference, and advantages (B,):
    -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1), r = exp(logp - old)."""
    A = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * A, clipped_ratio * A)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
    return loss, kl, clipped


def token_logps(model: torch.nn.Module, batch: DeviceBatch) -> Tensor:
    """log p(target) at each position under the loss mask (B, T), 0 elsewhere."""
    h, _ = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
    return token_logprobs(h, unwrap(model).head_weight(), batch.targets, batch.loss_mask)


class GRPO:
    """TRL's GRPO loss ("dapo": summed over the completion tokens of the step, the loop divides by their count).

    One optimizer step per sampled batch (TRL's num_iterations 1): the sampling policy is the policy itself, so the
    ratio is 1 in value and carries the gradient of A * log p; the reference is a frozen model, the policy with its
    adapters off (`"adapters"`), or None (beta 0: no KL term, as TRL skips it).
    """

    def __init__(self, settings: Any, reference: torch.nn.Module | str | None = None) -> None:
        self.settings, self.reference = settings, reference

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def reference_logps(self, model: torch.nn.Module, batch: DeviceBatch) -> Tensor | None:
        if self.reference is None:
            return None
        with torch.no_grad():
            if self.reference == "adapters":
                with adapters_off(model):
                    return token_logps(unwrap(model), batch)
            return token_logps(self.reference, batch)

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        s, mask = self.settings, batch.loss_mask
        logps = token_logps(model, batch)
        ref = self.reference_logps(model, batch)
        loss, kl, clipped = grpo_token_loss(logps, logps.detach(), batch.extras["advantage"].float(), ref, s.beta,
                                            s.epsilon, s.epsilon_high or s.epsilon)
        metrics = {"loss": (loss * mask).sum().detach(), "clip_fraction": (clipped * mask).sum().float()}
        if ref is not None:
            metrics["kl"] = (kl * mask).sum().detach()
        return (loss * mask).sum(), metrics


class RLEngine(AlignEngine):
    """The policy being trained, sampled between steps by the same Generator `llmctl generate` runs."""

    _generator: Generator | None = None

    def objective(self, settings: Any, reference: Any) -> GRPO:
        return GRPO(settings, reference)

    def sample(self, prompts: list[list[int]], params: Any) -> list[list[int]]:
        """New ids for each prompt from the policy as it is now (`Generator.generate_batch`, seeded by params.seed)."""
        model = unwrap(self.net)
        if self._generator is None or self._generator.stale():
            self._generator = Generator(model)
        was = model.training
        model.eval()
        try:
            return self._generator.generate_batch(prompts, params)
        finally:
            model.train(was)

    def reward_model(self, folder: Path) -> Any:
        """rows of ids -> a reward model's score of each (its head on the last token), as `llmctl eval` scores pairs."""
        from llmctl.backends.torch.align import load_reward_model

        module, head, _ = load_reward_model(folder)
        module, head = module.to(self.device), head.to(self.device)

        @torch.no_grad()
        def scores(rows: list[list[int]]) -> np.ndarray:
            out = []
            for start in range(0, len(rows), SCORE_BATCH):
                chunk = rows[start : start + SCORE_BATCH]
                T = max(len(r) for r in chunk)
                ids = torch.zeros(len(chunk), T, dtype=torch.long)
                mask = torch.zeros(len(chunk), T)
                for b, r in enumerate(chunk):
                    ids[b, : len(r)] = torch.tensor(r)
                    mask[b, len(r) - 1] = 1.0  # the score is read at the last token
                batch = DeviceBatch(ids.to(self.device), ids.to(self.device), mask.to(self.device), None, None)
                out.append(reward_scores(module, head, batch).float().cpu().numpy())
            return np.concatenate(out).astype(np.float64)

        return scores
