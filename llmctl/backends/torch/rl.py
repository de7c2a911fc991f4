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


def ppo_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor,
                   returns: Tensor, epsilon: float, cliprange_value: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped policy loss, clipped value loss and clipped flags, each (B, T), as TRL's PPO computes them:
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) and 1/2 max((v - R)^2, (old_v + clip(v - old_v, +-c) - R)^2)."""
    ratio = torch.exp(logps - old_logps)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - epsilon, 1 + epsilon))
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return policy, value, (-advantages * ratio.clamp(1 - epsilon, 1 + epsilon) > -advantages * ratio)


def add_value_head(model: torch.nn.Module) -> None:
    """PPO's value head, `v_head` (1, dim): a scalar value of each position's hidden state."""
    model.v_head = torch.nn.Linear(model.spec.dim, 1, bias=False)
    torch.nn.init.zeros_(model.v_head.weight)


def logps_and_values(model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the targets and the value head's values, each (B, T), 0 off the loss mask."""
    h, _ = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
    inner = unwrap(model)
    logps = token_logprobs(h, inner.head_weight(), batch.targets, batch.loss_mask)
    return logps, inner.v_head(h.float())[..., 0] * batch.loss_mask


class PPO:
    """TRL's PPO objective on a rollout: the clipped policy loss plus vf_coef times the clipped value loss, averaged
    over the rollout's completion tokens (the KL penalty is in the rollout's rewards, not here)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        s, mask, x = self.settings, batch.loss_mask, batch.extras
        logps, values = logps_and_values(model, batch)
        policy, value, clipped = ppo_token_loss(logps, x["old_logps"], x["advantages"], values, x["old_values"],
                                                x["returns"], s.epsilon, s.cliprange_value)
        loss = ((policy + s.vf_coef * value) * mask).sum()
        metrics = {"loss": loss.detach(), "policy_loss": (policy * mask).sum().detach(),
                   "value_loss": (value * mask).sum().detach(), "clip_fraction": (clipped * mask).sum().float()}
        return loss, metrics


class RLEngine(AlignEngine):
    """The policy being trained, sampled between steps by the same Generator `llmctl generate` runs."""

    _generator: Generator | None = None
    _exporting = False

    def setup_policy(self, base: Path, lora: Any | None, value_head: bool) -> None:
        """The policy (every weight, or LoRA adapters on a frozen base), with PPO's value head trained beside it."""
        from llmctl.backends.torch.lora import add_adapters, is_adapter_param

        def prepare(model: torch.nn.Module) -> None:
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
        model = unwrap(self.net)
        db = DeviceBatch.of(batch, self.device)
        with torch.no_grad():
            logps, values = logps_and_values(model, db)
            if reference == "adapters":
                with adapters_off(model):
                    ref = token_logps(model, db)
            else:
                ref = token_logps(reference, db)
        return tuple(t.double().cpu().numpy() for t in (logps, ref, values))

    def _model_tensors(self, model_sd: dict) -> dict:
        tensors = super()._model_tensors(model_sd)
        return {k: v for k, v in tensors.items() if not k.startswith("v_head.")} if self._exporting else tensors

    def export(self, folder: Path) -> None:
        """The policy's model folder, without PPO's value head."""
        self._exporting = True
        try:
            super().export(folder)
        finally:
            self._exporting = False

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
