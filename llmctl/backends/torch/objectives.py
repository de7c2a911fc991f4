"""Objectives (batch -> loss) and the chunked primitives they are made of: per-token log-probabilities of targets
and divergences between two models' next-token distributions, never making the (tokens x vocabulary) logits whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from llmctl.training.batch import Batch

CHUNK = 1 << 22  # logits per chunk (16 MB in float32)


@dataclass
class DeviceBatch:
    """A Batch as tensors on the model's device; targets without a loss are 0 (any valid id: their weight is 0)."""

    input_ids: Tensor
    targets: Tensor
    loss_mask: Tensor
    segment_ids: Tensor | None
    positions: Tensor | None
    extras: dict[str, Tensor] = field(default_factory=dict)  # the Batch's per-row extras (reference log-probs, labels)

    @classmethod
    def of(cls, batch: Batch, device: torch.device) -> DeviceBatch:
        def put(a: Any) -> Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device)

        targets = batch.targets.clip(min=0)
        extras = {k: put(v) for k, v in (batch.extras or {}).items()}
        return cls(put(batch.input_ids), put(targets), put(batch.loss_mask), put(batch.segment_ids), put(batch.positions()),
                   extras=extras)

    def model_inputs(self) -> dict[str, Any]:
        return {"segment_ids": self.segment_ids, "positions": self.positions}


def _rows(vocab: int) -> int:
    return max(128, CHUNK // vocab)


def _logprobs_chunk(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = (h @ weight.to(h.dtype).t()).float()                              # (n, V)
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def token_logprobs(h: Tensor, weight: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """log p(target) under the logits h @ weight.T, h (..., D), targets (...): same shape as targets, 0 where mask is 0.

    Chunks of rows are recomputed in the backward pass (activation checkpointing), so no chunk's logits outlive it.
    """
    shape = targets.shape
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    n = _rows(len(weight))
    parts = [checkpoint(_logprobs_chunk, h2[i : i + n], weight, t2[i : i + n], use_reentrant=False) if torch.is_grad_enabled()
             else _logprobs_chunk(h2[i : i + n], weight, t2[i : i + n]) for i in range(0, len(h2), n)]
    out = torch.cat(parts).view(shape)
    return out if mask is None else out * mask


def _divergence_chunk(h: Tensor, weight: Tensor, h_ref: Tensor, weight_ref: Tensor, kind: str, beta: float) -> Tensor:
    logp = (h @ weight.to(h.dtype).t()).float().log_softmax(-1)                # the trained model, (n, V)
    with torch.no_grad():
        logq = (h_ref @ weight_ref.to(h_ref.dtype).t()).float().log_softmax(-1)  # the reference / teacher
    return divergence_from_logprobs(logp, logq, kind, beta)


def divergence_from_logprobs(logp: Tensor, logq: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between the trained model p and the teacher q (log-probabilities, (..., V)).

    forward_kl: KL(q || p) (mean-seeking, the usual distillation loss); reverse_kl: KL(p || q) (mode-seeking);
    jsd: the generalized Jensen-Shannon divergence beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p.
    """
    if kind == "forward_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:  # m is p or q itself: the divergence is 0
            return torch.zeros(logp.shape[:-1], device=logp.device)
        logm = torch.logsumexp(torch.stack([logq + torch.log(torch.tensor(beta)), logp + torch.log(torch.tensor(1 - beta))]), 0)
        return beta * (logq.exp() * (logq - logm)).sum(-1) + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected forward_kl, reverse_kl or jsd")


def token_divergence(h: Tensor, weight: Tensor, h_ref: Tensor, weight_ref: Tensor, kind: str = "forward_kl",
                     beta: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Per-position divergence between two models' next-token distributions on the same positions, chunked like
    `token_logprobs`: h (..., D) and weight of the trained model, h_ref (..., D_ref) and weight_ref of the frozen one."""
    shape = h.shape[:-1]
    a, b = h.reshape(-1, h.shape[-1]), h_ref.reshape(-1, h_ref.shape[-1]).detach()
    n = _rows(len(weight))
    wr = weight_ref.detach()
    parts = [checkpoint(_divergence_chunk, a[i : i + n], weight, b[i : i + n], wr, kind, beta, use_reentrant=False)
             if torch.is_grad_enabled() else _divergence_chunk(a[i : i + n], weight, b[i : i + n], wr, kind, beta)
             for i in range(0, len(a), n)]
    out = torch.cat(parts).view(shape)
    return out if mask is None else out * mask


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place and needs none)."""
    return getattr(model, "module", model)


class NextToken:
    """Cross-entropy of each target under the loss mask: pretraining (every position) and masked SFT alike.

    Summed over target tokens (the loop divides by the step's count); a MoE's load-balancing loss is added with
    the weight of this micro-batch's share of the tokens, so the step's total carries it once.
    """

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        loss, aux = model(batch.input_ids, targets=batch.targets, loss_weights=batch.loss_mask, return_aux=True,
                          **batch.model_inputs())
        metrics = {"loss": loss.detach()}
        if aux is None:
            return loss, metrics
        units = batch.loss_mask.count_nonzero()
        metrics["aux_loss"] = aux.detach() * units
        return loss + aux * units, metrics


class Distill:
    """A divergence to a frozen teacher's next-token distribution on the same positions (see `token_divergence`)."""

    def __init__(self, teacher: torch.nn.Module, kind: str = "forward_kl", beta: float = 0.5) -> None:
        self.teacher, self.kind, self.beta = teacher, kind, beta

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h, _ = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
        with torch.no_grad():
            h_ref, _ = self.teacher(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
        d = token_divergence(h, unwrap(model).head_weight(), h_ref, self.teacher.head_weight(), self.kind, self.beta,
                             batch.loss_mask)
        loss = d.sum()
        return loss, {"loss": loss.detach()}


def sequence_logprobs(model: torch.nn.Module, batch: DeviceBatch) -> Tensor:
    """Summed log-probability of the masked targets of each row, (B,): what pair objectives (DPO) compare."""
    h, _ = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
    return token_logprobs(h, unwrap(model).head_weight(), batch.targets, batch.loss_mask).sum(-1)

