"""Objectives (batch -> loss) and the chunked primitives they are made of: per-token log-probabilities of targets
and divergences between two models' next-token distributions, never making the (tokens x vocabulary) logits whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from llmctl.training.batch import Batch

CHUNK = 1 << 22  # logits per chunk (16 MB in float32)


@dataclass
class DeviceBatch:
    """A Batch as MLX arrays; targets without a loss are 0 (any valid id: their weight is 0)."""

    input_ids: mx.array
    targets: mx.array
    loss_mask: mx.array
    segment_ids: mx.array | None
    positions: mx.array | None
    extras: dict[str, mx.array] = field(default_factory=dict)  # the Batch's per-row extras (reference log-probs, labels)

    @classmethod
    def of(cls, batch: Batch, device: Any = None) -> DeviceBatch:
        def put(a: Any, dtype: mx.Dtype = mx.int32) -> mx.array | None:
            return None if a is None else mx.array(a, dtype=dtype)

        targets = batch.targets.clip(min=0)
        extras = {k: put(v, mx.float32) for k, v in (batch.extras or {}).items()}
        return cls(put(batch.input_ids), put(targets), put(batch.loss_mask, mx.float32), put(batch.segment_ids),
                   put(batch.positions()), extras=extras)

    def model_inputs(self) -> dict[str, Any]:
        return {"segment_ids": self.segment_ids, "positions": self.positions}


def _rows(vocab: int) -> int:
    return max(128, CHUNK // vocab)


@mx.custom_function
def _linear_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array, weights: mx.array) -> tuple[mx.array, ...]:
    """(summed weighted cross-entropy, its gradients wrt h and weight): each chunk's gradient, softmax - one_hot, is
    made while the chunk's logits exist, so backward only scales them."""
    N, V = h.shape[0], weight.shape[0]
    n = _rows(V)
    loss, grad_h, grad_w = mx.zeros((), mx.float32), [], mx.zeros(weight.shape, mx.float32)
    for start in range(0, N, n):
        x, t, w = h[start : start + n], targets[start : start + n], weights[start : start + n, None]
        logits = (x @ weight.T).astype(mx.float32)                                   # (n, V)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, t[:, None], axis=-1)                      # (n, 1)
        loss = loss - (picked * w).sum()
        g = (mx.exp(logp) - (mx.arange(V)[None] == t[:, None])) * w                 # (softmax - one_hot) * weight
        g = g.astype(h.dtype)
        grad_h.append(g @ weight)
        grad_w = grad_w + (g.T @ x).astype(mx.float32)
    return loss, mx.concatenate(grad_h), grad_w.astype(weight.dtype)


@_linear_cross_entropy.vjp
def _linear_cross_entropy_vjp(primals: list, cotangents: list, outputs: list) -> tuple:
    g = cotangents[0]
    h, weight, targets, weights = primals
    return (outputs[1] * g).astype(h.dtype), (outputs[2] * g).astype(weight.dtype), mx.zeros_like(targets), mx.zeros_like(weights)


def linear_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """Summed cross-entropy of the logits h @ weight.T (h (N, D), targets (N,)), each row weighted by `weights` (N,),
    without making the logits whole."""
    return _linear_cross_entropy(h, weight, targets, weights)[0]


def _logprobs_chunk(h: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
    logits = (h @ weight.T).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.take_along_axis(logp, mx.stop_gradient(targets)[:, None], axis=-1)[:, 0]  # ids carry no gradient


def token_logprobs(h: mx.array, weight: mx.array, targets: mx.array, mask: mx.array | None = None) -> mx.array:
    """log p(target) under the logits h @ weight.T, h (..., D), targets (...): same shape as targets, 0 where mask is 0.

    Chunks of rows are recomputed in the backward pass (mx.checkpoint), so no chunk's logits outlive it.
    """
    shape = targets.shape
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    n = _rows(weight.shape[0])
    chunk = mx.checkpoint(_logprobs_chunk)
    out = mx.concatenate([chunk(h2[i : i + n], weight, t2[i : i + n]) for i in range(0, h2.shape[0], n)]).reshape(shape)
    return out if mask is None else out * mask


def divergence_from_logprobs(logp: mx.array, logq: mx.array, kind: str, beta: float = 0.5) -> mx.array:
    """Per-row divergence between the trained model p and the teacher q (log-probabilities, (..., V)).

    forward_kl: KL(q || p) (mean-seeking, the usual distillation loss); reverse_kl: KL(p || q) (mode-seeking);
    jsd: the generalized Jensen-Shannon divergence beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p.
    """
    if kind == "forward_kl":
        return (mx.exp(logq) * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (mx.exp(logp) * (logp - logq)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:  # m is p or q itself: the divergence is 0
            return mx.zeros(logp.shape[:-1])
        logm = mx.logaddexp(logq + math.log(beta), logp + math.log(1 - beta))
        return beta * (mx.exp(logq) * (logq - logm)).sum(-1) + (1 - beta) * (mx.exp(logp) * (logp - logm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected forward_kl, reverse_kl or jsd")


def _divergence_chunk(h: mx.array, weight: mx.array, h_ref: mx.array, weight_ref: mx.array, kind: str, beta: float) -> mx.array:
    logits = (h @ weight.T).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref = mx.stop_gradient((h_ref @ weight_ref.T).astype(mx.float32))
    logq = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    return divergence_from_logprobs(logp, logq, kind, beta)


def token_divergence(h: mx.array, weight: mx.array, h_ref: mx.array, weight_ref: mx.array, kind: str = "forward_kl",
                     beta: float = 0.5, mask: mx.array | None = None) -> mx.array:
    """Per-position divergence between two models' next-token distributions on the same positions, chunked like
    `token_logprobs`: h (..., D) and weight of the trained model, h_ref (..., D_ref) and weight_ref of the frozen one."""
    shape = h.shape[:-1]
    a, b = h.reshape(-1, h.shape[-1]), mx.stop_gradient(h_ref.reshape(-1, h_ref.shape[-1]))
    n = _rows(weight.shape[0])
    wr = mx.stop_gradient(weight_ref)
    chunk = mx.checkpoint(lambda x, w, y, v: _divergence_chunk(x, w, y, v, kind, beta))
    out = mx.concatenate([chunk(a[i : i + n], weight, b[i : i + n], wr) for i in range(0, a.shape[0], n)]).reshape(shape)
    return out if mask is None else out * mask


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer (MLX models are never wrapped; kept to mirror the torch file)."""
    return model


class NextToken:
    """Cross-entropy of each target under the loss mask: pretraining (every position) and masked SFT alike.

    Summed over target tokens (the loop divides by the step's count); a MoE's load-balancing loss is added with
    the weight of this micro-batch's share of the tokens, so the step's total carries it once.
    """

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        h, aux = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
        D = h.shape[-1]
        loss = linear_cross_entropy(h.reshape(-1, D), model.head_weight(), batch.targets.reshape(-1), batch.loss_mask.reshape(-1))
        metrics = {"loss": mx.stop_gradient(loss)}
        if aux is None:
            return loss, metrics
        units = (batch.loss_mask != 0).sum().astype(mx.float32)
        metrics["aux_loss"] = mx.stop_gradient(aux) * units
        return loss + aux * units, metrics


class Distill:
    """A divergence to a frozen teacher's next-token distribution on the same positions (see `token_divergence`)."""

    def __init__(self, teacher: nn.Module, kind: str = "forward_kl", beta: float = 0.5) -> None:
        self.teacher, self.kind, self.beta = teacher, kind, beta

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        h = model(batch.input_ids, head=False, **batch.model_inputs())
        h_ref = mx.stop_gradient(self.teacher(batch.input_ids, head=False, **batch.model_inputs()))
        d = token_divergence(h, unwrap(model).head_weight(), h_ref, self.teacher.head_weight(), self.kind, self.beta,
                             batch.loss_mask)
        loss = d.sum()
        return loss, {"loss": mx.stop_gradient(loss)}


def sequence_logprobs(model: nn.Module, batch: DeviceBatch) -> mx.array:
    """Summed log-probability of the masked targets of each row, (B,): what pair objectives (DPO) compare."""
    h = model(batch.input_ids, head=False, **batch.model_inputs())
    return token_logprobs(h, unwrap(model).head_weight(), batch.targets, batch.loss_mask).sum(-1)
