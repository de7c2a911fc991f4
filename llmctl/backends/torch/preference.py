"""Preference objectives on the torch backend: the DPO family's losses written as TRL defines them, the pair and KTO
objectives that feed them per-sequence log-probabilities, and the Bradley-Terry loss of a reward model.

A pair batch holds the chosen rows, then the rejected rows (one forward of both); a KTO batch holds its examples,
then the mismatched rows (prompt i with completion i + 1) whose log-ratios estimate the batch KL. Log-probabilities
are summed over the response tokens (the loss mask); the methods that want them per token divide by the lengths.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
import torch
import torch.nn.functional as F
from torch import Tensor

from llmctl.backends.torch.objectives import DeviceBatch, sequence_logprobs, unwrap
from llmctl.preference import REFERENCE_FREE, PreferenceSettings
from llmctl.training.batch import Batch


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (as TRL's ORPO computes it)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_loss(s: PreferenceSettings, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
              chosen_len: Tensor, rejected_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected, from summed response log-probabilities (P,)."""
    beta = s.beta
    if s.method in ("simpo", "orpo"):  # no reference: length-averaged log-probabilities
        avg_c, avg_r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        if s.method == "simpo":
            loss = -F.logsigmoid(beta * (avg_c - avg_r - s.gamma / beta))
        else:  # the chosen NLL per token plus lambda times the log-odds-ratio term (TRL's beta is that lambda)
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            loss = -avg_c - beta * F.logsigmoid(log_odds)
        return loss, beta * avg_c.detach(), beta * avg_r.detach()
    ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
    delta = ratio_c - ratio_r
    if s.method == "dpo":
        loss = -F.logsigmoid(beta * delta)
    elif s.method == "ipo":
        loss = (ratio_c / chosen_len.clamp(min=1) - ratio_r / rejected_len.clamp(min=1) - 1 / (2 * beta)) ** 2
    elif s.method == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif s.method == "robust":
        eps = s.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown pair method {s.method!r}")
    return loss, beta * ratio_c.detach(), beta * ratio_r.detach()


def kto_loss(s: PreferenceSettings, logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example KTO losses (desirable and undesirable weighted) and rewards; `kl` is the batch estimate (detached,
    clamped at 0), labels 1 (desirable) or 0."""
    ratio = logps - ref_logps
    good = labels > 0.5
    loss = torch.where(good, s.desirable_weight * (1 - torch.sigmoid(s.beta * (ratio - kl))),
                       s.undesirable_weight * (1 - torch.sigmoid(s.beta * (kl - ratio))))
    return loss, s.beta * ratio.detach()


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The batch KL estimate from the mismatched rows: their mean log-ratio, clamped at zero, no gradient."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The base model's outputs from a model with LoRA adapters (the reference without a second copy)."""
    from llmctl.backends.torch.lora import adapters

    layers = list(adapters(unwrap(model)).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """1 where the chosen reward is higher, 0 where lower, 1/2 for a tie (every pair ties before training)."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def _lengths(batch: DeviceBatch) -> Tensor:
    return batch.loss_mask.sum(-1)


class Preference:
    """The DPO family and KTO on a policy; the reference log-probabilities come from the batch (precomputed), a frozen
    model beside it, or the policy with its adapters switched off (`reference="adapters"`)."""

    def __init__(self, settings: PreferenceSettings, reference: torch.nn.Module | str | None = None) -> None:
        self.settings, self.reference = settings, reference

    def units(self, batch: Batch) -> int:
        if self.settings.method == "kto":
            return int((batch.extras["label"] >= 0).sum())
        return batch.rows // 2

    def reference_logprobs(self, model: torch.nn.Module, batch: DeviceBatch) -> Tensor:
        if "ref_logps" in batch.extras:
            return batch.extras["ref_logps"].float()
        with torch.no_grad():
            if self.reference == "adapters":
                with adapters_off(model):
                    return sequence_logprobs(unwrap(model), batch)
            return sequence_logprobs(self.reference, batch)

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.settings
        logps, lengths = sequence_logprobs(model, batch), _lengths(batch)
        ref = None if s.method in REFERENCE_FREE else self.reference_logprobs(model, batch)
        if s.method == "kto":
            return self._kto(logps, ref, lengths, batch.extras["label"])
        P = len(logps) // 2
        c, r = logps[:P], logps[P:]
        rc, rr = (None, None) if ref is None else (ref[:P], ref[P:])
        loss, reward_c, reward_r = pair_loss(s, c, r, rc, rr, lengths[:P], lengths[P:])
        metrics = {"loss": loss.detach().sum(), "accuracy": accuracy(reward_c, reward_r).sum(),
                   "margin": (reward_c - reward_r).sum(), "reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
                   "len_chosen": lengths[:P].sum(), "len_rejected": lengths[P:].sum()}
        if ref is not None:  # the sequence-level estimate TRL logs as KL: the mean log-ratio of the responses
            metrics["kl"] = ((c - rc) + (r - rr)).detach().sum() / 2
        return loss.sum(), metrics

    def _kto(self, logps: Tensor, ref: Tensor, lengths: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        real = labels >= 0
        kl = kto_kl(logps[~real].detach(), ref[~real])
        loss, reward = kto_loss(self.settings, logps[real], ref[real], labels[real], kl)
        good = labels[real] > 0.5
        n = real.sum()
        metrics = {"loss": loss.detach().sum(), "accuracy": accuracy(torch.where(good, reward, -reward), 0 * reward).sum(),
                   "kl": kl * n, "reward_chosen": (reward * good).sum(),
                   "reward_rejected": (reward * ~good).sum(), "desirable": good.float().sum(),
                   "len": lengths[real].sum()}
        return loss.sum(), metrics


def reward_scores(model: torch.nn.Module, head: Tensor, batch: DeviceBatch) -> Tensor:
    """The scalar score of each row, (B,): the score head on the last position the loss mask marks."""
    h, _ = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
    last = batch.loss_mask.argmax(-1)                                              # (B,)
    picked = h[torch.arange(len(h), device=h.device), last]                        # (B, D)
    return (picked.float() @ head.float().t())[:, 0]


class BradleyTerry:
    """A reward model's loss: -log sigmoid(r_chosen - r_rejected - margin), the margin per pair (0 by default)."""

    def units(self, batch: Batch) -> int:
        return batch.rows // 2

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        scores = reward_scores(model, unwrap(model).score.weight, batch)
        P = len(scores) // 2
        c, r = scores[:P], scores[P:]
        margin = batch.extras.get("margin", torch.zeros_like(scores))[:P]
        loss = -F.logsigmoid(c - r - margin)
        metrics = {"loss": loss.detach().sum(), "accuracy": accuracy(c, r).sum(), "margin": (c - r).detach().sum(),
                   "reward_chosen": c.detach().sum(), "reward_rejected": r.detach().sum()}
        return loss.sum(), metrics


def add_score_head(model: torch.nn.Module) -> None:
    """A reward model's scalar head, `score` (1, dim) as transformers' *ForSequenceClassification names it."""
    model.score = torch.nn.Linear(model.spec.dim, 1, bias=False)
    torch.nn.init.normal_(model.score.weight, std=model.spec.init_std)
