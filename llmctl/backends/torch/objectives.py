"""Objectives (batch -> loss) and the chunked primitives they are made of: per-token log-probabilities of targets
and divergences between two models' next-token distributions, never making the (tokens x vocabulary) logits whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from llmctl.training.batch import Batch

CHUNK = 1 << 22  # logits per chunk (16 MB in float32)
NEG = -1e30      # log 0 where -inf would make 0 * log 0 a NaN (a top-K that covers the vocabulary leaves no rest)


@dataclass
class DeviceBatch:
    """A Batch as tensors on the model's device; targets without a loss are 0 (any valid id: their weight is 0)."""

    input_ids: Tensor
    targets: Tensor
    loss_mask: Tensor
    segment_ids: Tensor | None
    positions: Tensor | None
    topk_ids: Tensor | None = None        # a teacher's cached top-K (training.batch.TopK), (B, T, K) int64
    topk_logprobs: Tensor | None = None   # (B, T, K)
    topk_rest: Tensor | None = None       # (B, T)
    extras: dict[str, Tensor] = field(default_factory=dict)  # the Batch's per-row extras (reference log-probs, labels)

    @classmethod
    def of(cls, batch: Batch, device: torch.device) -> DeviceBatch:
        def put(a: Any) -> Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device)

        targets = batch.targets.clip(min=0)
        topk = batch.topk
        cached = () if topk is None else (put(topk.ids).long(), put(topk.logprobs), put(topk.rest))
        extras = {k: put(v) for k, v in (batch.extras or {}).items()}
        return cls(put(batch.input_ids), put(targets), put(batch.loss_mask), put(batch.segment_ids), put(batch.positions()),
                   *cached, extras=extras)

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
    keep = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    if keep is not None and len(keep) < len(t2):  # masked rows (prompts, padding) get no logits at all
        h2, t2 = h2.index_select(0, keep), t2[keep]
    n = _rows(len(weight))
    parts = [checkpoint(_logprobs_chunk, h2[i : i + n], weight, t2[i : i + n], use_reentrant=False) if torch.is_grad_enabled()
             else _logprobs_chunk(h2[i : i + n], weight, t2[i : i + n]) for i in range(0, len(h2), n)]
    out = torch.cat(parts) if parts else h2.new_zeros(0, dtype=torch.float32)
    if len(out) < targets.numel():
        out = out.new_zeros(targets.numel()).index_copy(0, keep, out)
    out = out.view(shape)
    return out if mask is None else out * mask


def divergence_from_logprobs(logp: Tensor, logq: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between the trained model p and the teacher q (log-probabilities, (..., V)).

    forward_kl: KL(q || p) (mean-seeking, the usual distillation loss); reverse_kl: KL(p || q) (mode-seeking);
    jsd: the generalized Jensen-Shannon divergence beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p;
    skew_kl: DistiLLM's skewed KL, KL(q || beta q + (1 - beta) p) (beta is the skew: 0 is forward_kl; it keeps the
    divergence finite and its gradient bounded where the student gives a teacher's token almost no mass).
    """
    if kind == "forward_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind in ("jsd", "skew_kl"):
        if not 0 <= beta < 1 or (kind == "jsd" and beta == 0):  # m is p or q itself: the divergence is 0
            return torch.zeros(logp.shape[:-1], device=logp.device)
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta)) if beta > 0 else logp
        kl_q = (logq.exp() * (logq - logm)).sum(-1)
        return kl_q if kind == "skew_kl" else beta * kl_q + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected forward_kl, reverse_kl, jsd or skew_kl")


def fold_topk(logp: Tensor, ids: Tensor) -> Tensor:
    """Log-probabilities (n, V) folded onto a teacher's top-K ids (n, K) and one bucket for the rest: (n, K + 1)."""
    rest = logp.scatter(1, ids, NEG).logsumexp(-1, keepdim=True)
    return torch.cat([logp.gather(1, ids), rest], -1)


def _distill_chunk(h: Tensor, weight: Tensor, targets: Tensor | None, teacher: tuple[Tensor, ...], kind: str, beta: float,
                   temperature: float) -> Tensor:
    logits = (h @ weight.to(h.dtype).t()).float()                               # the trained model, (n, V)
    logp = (logits / temperature).log_softmax(-1)
    if len(teacher) == 2:  # a frozen model's hidden states and head
        h_ref, weight_ref = teacher
        with torch.no_grad():
            logq = ((h_ref @ weight_ref.to(h_ref.dtype).t()).float() / temperature).log_softmax(-1)
    else:  # its cached top-K: both distributions are compared on those K tokens and the rest of the vocabulary
        ids, logprobs, rest = teacher
        logp, logq = fold_topk(logp, ids), torch.cat([logprobs, rest[:, None]], -1)
    d = divergence_from_logprobs(logp, logq, kind, beta)
    ce = torch.zeros_like(d) if targets is None else -logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return torch.stack([d, ce], -1)                                             # (n, 2)


def token_distill(h: Tensor, weight: Tensor, targets: Tensor | None, teacher: tuple[Tensor, ...], kind: str = "forward_kl",
                  beta: float = 0.5, temperature: float = 1.0, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-position divergence to a teacher's next-token distribution, both at `temperature`, and cross-entropy of the
    targets (0 without targets), chunked like `token_logprobs`; each (...), 0 where mask is 0.

    h (..., D) and weight belong to the trained model; the teacher is a frozen model's (h_ref (..., D_ref), weight_ref),
    or its cached top-K (ids (..., K), log-probabilities (..., K), log of the rest's mass (...)).
    """
    shape = h.shape[:-1]
    a = h.reshape(-1, h.shape[-1])
    t = None if targets is None else targets.reshape(-1)
    if len(teacher) == 2:
        rows, fixed = (teacher[0].detach().reshape(len(a), -1),), (teacher[1].detach(),)
    else:
        rows, fixed = (teacher[0].reshape(len(a), -1), teacher[1].reshape(len(a), -1), teacher[2].reshape(-1)), ()
    n = _rows(len(weight))
    parts = []
    for i in range(0, len(a), n):
        args = (a[i : i + n], weight, None if t is None else t[i : i + n], tuple(r[i : i + n] for r in rows) + fixed,
                kind, beta, temperature)
        parts.append(checkpoint(_distill_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _distill_chunk(*args))
    out = torch.cat(parts).view(*shape, 2)
    if mask is not None:
        out = out * mask[..., None]
    return out[..., 0], out[..., 1]


def token_divergence(h: Tensor, weight: Tensor, h_ref: Tensor, weight_ref: Tensor, kind: str = "forward_kl",
                     beta: float = 0.5, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Per-position divergence between two models' next-token distributions on the same positions (`token_distill`)."""
    return token_distill(h, weight, None, (h_ref, weight_ref), kind, beta, temperature, mask)[0]


@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: DeviceBatch, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """A frozen model's top-k next tokens at each position at `temperature`: ids (B, T, k), their log-probabilities
    (B, T, k) and the log of the mass left to the rest of the vocabulary (B, T), what `token_distill` takes."""
    h, _ = teacher(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
    a, w = h.reshape(-1, h.shape[-1]), teacher.head_weight()
    n = _rows(len(w))
    parts = []
    for i in range(0, len(a), n):
        logq = ((a[i : i + n] @ w.to(a.dtype).t()).float() / temperature).log_softmax(-1)   # (n, V)
        values, ids = logq.topk(k, -1)
        parts.append((ids, values, logq.scatter(1, ids, NEG).logsumexp(-1)))
    ids, values, rest = (torch.cat(x) for x in zip(*parts))
    B, T = batch.input_ids.shape
    return ids.view(B, T, k), values.view(B, T, k), rest.view(B, T)


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
    """Knowledge distillation: alpha * T^2 * a divergence to a frozen teacher's next-token distribution at temperature
    T + (1 - alpha) * the next-token loss, on the positions of the loss mask (see `token_distill`).

    teacher None: every batch carries the teacher's cached top-K instead. Sums over target tokens like `NextToken`;
    the metrics "kd" and "ce" are the two terms before weighting.
    """

    def __init__(self, teacher: torch.nn.Module | None, kind: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, alpha: float = 1.0) -> None:
        self.teacher, self.kind, self.beta, self.temperature, self.alpha = teacher, kind, beta, temperature, alpha

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: torch.nn.Module, batch: DeviceBatch) -> tuple[Tensor, dict[str, Tensor]]:
        h, aux = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
        if self.teacher is None:
            teacher: tuple[Tensor, ...] = (batch.topk_ids, batch.topk_logprobs, batch.topk_rest)
        else:
            with torch.no_grad():
                h_ref, _ = self.teacher(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
            teacher = (h_ref, self.teacher.head_weight())
        d, ce = token_distill(h, unwrap(model).head_weight(), batch.targets, teacher, self.kind, self.beta,
                              self.temperature, batch.loss_mask)
        kd, ce = d.sum(), ce.sum()
        loss = self.alpha * self.temperature**2 * kd + (1 - self.alpha) * ce
        metrics = {"loss": loss.detach(), "kd": kd.detach(), "ce": ce.detach()}
        if aux is None:
            return loss, metrics
        units = batch.loss_mask.count_nonzero()
        metrics["aux_loss"] = aux.detach() * units
        return loss + aux * units, metrics


def sequence_logprobs(model: torch.nn.Module, batch: DeviceBatch) -> Tensor:
    """Summed log-probability of the masked targets of each row, (B,): what pair objectives (DPO) compare."""
    h, _ = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
    return token_logprobs(h, unwrap(model).head_weight(), batch.targets, batch.loss_mask).sum(-1)

