"""Preference objectives on the MLX backend: the DPO family's and KTO's losses written as TRL defines them (the twin
of backends/torch/preference.py), the pair and KTO objectives that feed them per-sequence log-probabilities, and the
Bradley-Terry loss of a reward model.

A pair batch holds the chosen rows, then the rejected rows (one forward of both); a KTO batch holds its examples,
then the mismatched rows (prompt i with completion i + 1) whose log-ratios estimate the batch KL. Log-probabilities
are summed over the response tokens (the loss mask); the methods that want them per token divide by the lengths.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from llmctl.backends.mlx.objectives import DeviceBatch, sequence_logprobs, unwrap
from llmctl.preference import REFERENCE_FREE, PreferenceSettings
from llmctl.training.batch import Batch


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (as TRL's ORPO computes it)."""
    return mx.where(x > -math.log(2), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def pair_loss(s: PreferenceSettings, chosen: mx.array, rejected: mx.array, ref_chosen: mx.array | None,
              ref_rejected: mx.array | None, chosen_len: mx.array, rejected_len: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Per-pair losses and the implicit rewards of chosen and rejected, from summed response log-probabilities (P,)."""
    beta = s.beta
    if s.method in ("simpo", "orpo"):  # no reference: length-averaged log-probabilities
        avg_c, avg_r = chosen / mx.maximum(chosen_len, 1), rejected / mx.maximum(rejected_len, 1)
        if s.method == "simpo":
            loss = -nn.log_sigmoid(beta * (avg_c - avg_r - s.gamma / beta))
        else:  # the chosen NLL per token plus lambda times the log-odds-ratio term (TRL's beta is that lambda)
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            loss = -avg_c - beta * nn.log_sigmoid(log_odds)
        return loss, mx.stop_gradient(beta * avg_c), mx.stop_gradient(beta * avg_r)
    ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
    delta = ratio_c - ratio_r
    if s.method == "dpo":
        loss = -nn.log_sigmoid(beta * delta)
    elif s.method == "ipo":
        loss = (ratio_c / mx.maximum(chosen_len, 1) - ratio_r / mx.maximum(rejected_len, 1) - 1 / (2 * beta)) ** 2
    elif s.method == "hinge":
        loss = mx.maximum(1 - beta * delta, 0)
    elif s.method == "robust":
        eps = s.label_smoothing
        loss = (-(1 - eps) * nn.log_sigmoid(beta * delta) + eps * nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown pair method {s.method!r}")
    return loss, mx.stop_gradient(beta * ratio_c), mx.stop_gradient(beta * ratio_r)


def kto_loss(s: PreferenceSettings, logps: mx.array, ref_logps: mx.array, labels: mx.array, kl: mx.array) -> tuple[mx.array, mx.array]:
    """Per-example KTO losses (desirable and undesirable weighted) and rewards; `kl` is the batch estimate (no
    gradient, clamped at 0), labels 1 (desirable) or 0."""
    ratio = logps - ref_logps
    loss = mx.where(labels > 0.5, s.desirable_weight * (1 - mx.sigmoid(s.beta * (ratio - kl))),
                    s.undesirable_weight * (1 - mx.sigmoid(s.beta * (kl - ratio))))
    return loss, mx.stop_gradient(s.beta * ratio)


def kto_kl(kl_logps: mx.array, ref_kl_logps: mx.array) -> mx.array:
    """The batch KL estimate from the mismatched rows: their mean log-ratio, clamped at zero, no gradient."""
    return mx.maximum(mx.stop_gradient(kl_logps - ref_kl_logps).mean(), 0)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model's outputs from a model with LoRA adapters (the reference without a second copy)."""
    from llmctl.backends.mlx.lora import adapters

    layers = list(adapters(unwrap(model)).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def accuracy(chosen: mx.array, rejected: mx.array) -> mx.array:
    """1 where the chosen reward is higher, 0 where lower, 1/2 for a tie (every pair ties before training)."""
    return (chosen > rejected).astype(mx.float32) + 0.5 * (chosen == rejected).astype(mx.float32)


def _lengths(batch: DeviceBatch) -> mx.array:
    return batch.loss_mask.sum(-1)


class Preference:
    """The DPO family and KTO on a policy; the reference log-probabilities come from the batch (precomputed), a frozen
    model beside it, or the policy with its adapters switched off (`reference="adapters"`)."""

    def __init__(self, settings: PreferenceSettings, reference: nn.Module | str | None = None) -> None:
        self.settings, self.reference = settings, reference

    def units(self, batch: Batch) -> int:
        if self.settings.method == "kto":
            return int((batch.extras["label"] >= 0).sum())
        return batch.rows // 2

    def reference_logprobs(self, model: nn.Module, batch: DeviceBatch) -> mx.array:
        if "ref_logps" in batch.extras:
            return batch.extras["ref_logps"]
        if self.reference == "adapters":
            with adapters_off(model):
                return mx.stop_gradient(sequence_logprobs(model, batch))
        return mx.stop_gradient(sequence_logprobs(self.reference, batch))

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        s = self.settings
        logps, lengths = sequence_logprobs(model, batch), _lengths(batch)
        ref = None if s.method in REFERENCE_FREE else self.reference_logprobs(model, batch)
        if s.method == "kto":
            return self._kto(logps, ref, lengths, batch.extras["label"])
        P = logps.shape[0] // 2
        c, r = logps[:P], logps[P:]
        rc, rr = (None, None) if ref is None else (ref[:P], ref[P:])
        loss, reward_c, reward_r = pair_loss(s, c, r, rc, rr, lengths[:P], lengths[P:])
        metrics = {"loss": mx.stop_gradient(loss.sum()), "accuracy": accuracy(reward_c, reward_r).sum(),
                   "margin": (reward_c - reward_r).sum(), "reward_chosen": reward_c.sum(), "reward_rejected": reward_r.sum(),
                   "len_chosen": lengths[:P].sum(), "len_rejected": lengths[P:].sum()}
        if ref is not None:  # the sequence-level estimate TRL logs as KL: the mean log-ratio of the responses
            metrics["kl"] = mx.stop_gradient((c - rc) + (r - rr)).sum() / 2
        return loss.sum(), metrics

    def _kto(self, logps: mx.array, ref: mx.array, lengths: mx.array, labels: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
        # a KTO batch holds n examples, then their n mismatched rows (labels -1): a static split, so mx.compile traces it
        n = labels.shape[0] // 2
        kl = kto_kl(logps[n:], ref[n:])
        labels = labels[:n]
        loss, reward = kto_loss(self.settings, logps[:n], ref[:n], labels, kl)
        good = (labels > 0.5).astype(mx.float32)
        signed = mx.where(good > 0, reward, -reward)  # a desirable example's reward should be above 0, the others' below
        metrics = {"loss": mx.stop_gradient(loss.sum()), "accuracy": accuracy(signed, 0 * reward).sum(), "kl": kl * n,
                   "reward_chosen": (reward * good).sum(), "reward_rejected": (reward * (1 - good)).sum(),
                   "desirable": good.sum(), "len": lengths[:n].sum()}
        return loss.sum(), metrics


def reward_scores(model: nn.Module, head: mx.array, batch: DeviceBatch) -> mx.array:
    """The scalar score of each row, (B,): the score head on the last position the loss mask marks."""
    h = model(batch.input_ids, head=False, **batch.model_inputs())
    last = mx.argmax(batch.loss_mask, axis=-1)                                      # (B,)
    picked = mx.take_along_axis(h, last[:, None, None], axis=1)[:, 0]              # (B, D)
    return (picked.astype(mx.float32) @ head.astype(mx.float32).T)[:, 0]


class BradleyTerry:
    """A reward model's loss: -log sigmoid(r_chosen - r_rejected - margin), the margin per pair (0 by default)."""

    def units(self, batch: Batch) -> int:
        return batch.rows // 2

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        scores = reward_scores(model, model.score.weight, batch)
        P = scores.shape[0] // 2
        c, r = scores[:P], scores[P:]
        margin = batch.extras["margin"][:P] if "margin" in batch.extras else mx.zeros_like(c)
        loss = -nn.log_sigmoid(c - r - margin)
        gap = mx.stop_gradient(c - r)
        metrics = {"loss": mx.stop_gradient(loss.sum()), "accuracy": accuracy(c, r).sum(), "margin": gap.sum(),
                   "reward_chosen": mx.stop_gradient(c).sum(), "reward_rejected": mx.stop_gradient(r).sum()}
        return loss.sum(), metrics


def add_score_head(model: nn.Module) -> None:
    """A reward model's scalar head, `score` (1, dim) as transformers' *ForSequenceClassification names it (drawn
    from the random state the engine seeded)."""
    model.score = nn.Linear(model.spec.dim, 1, bias=False)
    model.score.weight = mx.random.normal(model.score.weight.shape) * model.spec.init_std
