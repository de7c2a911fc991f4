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
NEG = -1e30      # log 0 where -inf would make 0 * log 0 a NaN (a top-K that covers the vocabulary leaves no rest)


@dataclass
class DeviceBatch:
    """A Batch as MLX arrays; targets without a loss are 0 (any valid id: their weight is 0)."""

    input_ids: mx.array
    targets: mx.array
    loss_mask: mx.array
    segment_ids: mx.array | None
    positions: mx.array | None
    topk_ids: mx.array | None = None        # a teacher's cached top-K (training.batch.TopK), (B, T, K) int32
    topk_logprobs: mx.array | None = None   # (B, T, K)
    topk_rest: mx.array | None = None       # (B, T)
    extras: dict[str, mx.array] = field(default_factory=dict)  # the Batch's per-row extras (reference log-probs, labels)

    @classmethod
    def of(cls, batch: Batch, device: Any = None) -> DeviceBatch:
        def put(a: Any, dtype: mx.Dtype = mx.int32) -> mx.array | None:
            return None if a is None else mx.array(a, dtype=dtype)

        targets = batch.targets.clip(min=0)
        topk = batch.topk
        cached = () if topk is None else (put(topk.ids), put(topk.logprobs, mx.float32), put(topk.rest, mx.float32))
        extras = {k: put(v, mx.float32) for k, v in (batch.extras or {}).items()}
        return cls(put(batch.input_ids), put(targets), put(batch.loss_mask, mx.float32), put(batch.segment_ids),
                   put(batch.positions()), *cached, extras=extras)

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
    jsd: the generalized Jensen-Shannon divergence beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p;
    skew_kl: DistiLLM's skewed KL, KL(q || beta q + (1 - beta) p) (beta is the skew: 0 is forward_kl; it keeps the
    divergence finite and its gradient bounded where the student gives a teacher's token almost no mass).
    """
    if kind == "forward_kl":
        return (mx.exp(logq) * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (mx.exp(logp) * (logp - logq)).sum(-1)
    if kind in ("jsd", "skew_kl"):
        if not 0 <= beta < 1 or (kind == "jsd" and beta == 0):  # m is p or q itself: the divergence is 0
            return mx.zeros(logp.shape[:-1])
        logm = mx.logaddexp(logq + math.log(beta), logp + math.log1p(-beta)) if beta > 0 else logp
        kl_q = (mx.exp(logq) * (logq - logm)).sum(-1)
        return kl_q if kind == "skew_kl" else beta * kl_q + (1 - beta) * (mx.exp(logp) * (logp - logm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected forward_kl, reverse_kl, jsd or skew_kl")


def fold_topk(logp: mx.array, ids: mx.array) -> mx.array:
    """Log-probabilities (n, V) folded onto a teacher's top-K ids (n, K) and one bucket for the rest: (n, K + 1)."""
    rest = mx.logsumexp(mx.put_along_axis(logp, ids, mx.array(NEG, logp.dtype), axis=-1), axis=-1, keepdims=True)
    return mx.concatenate([mx.take_along_axis(logp, ids, axis=-1), rest], axis=-1)


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _distill_chunk(h: mx.array, weight: mx.array, targets: mx.array | None, teacher: tuple[mx.array, ...], kind: str,
                   beta: float, temperature: float) -> mx.array:
    logits = (h @ weight.T).astype(mx.float32)                                  # the trained model, (n, V)
    logp = _log_softmax(logits / temperature)
    if len(teacher) == 2:  # a frozen model's hidden states and head
        h_ref, weight_ref = teacher
        logq = mx.stop_gradient(_log_softmax((h_ref @ weight_ref.T).astype(mx.float32) / temperature))
    else:  # its cached top-K: both distributions are compared on those K tokens and the rest of the vocabulary
        ids, logprobs, rest = (mx.stop_gradient(x) for x in teacher)
        logp, logq = fold_topk(logp, ids), mx.concatenate([logprobs, rest[:, None]], axis=-1)
    d = divergence_from_logprobs(logp, logq, kind, beta)
    if targets is None:
        return mx.stack([d, mx.zeros_like(d)], axis=-1)
    ce = -mx.take_along_axis(_log_softmax(logits), mx.stop_gradient(targets)[:, None], axis=-1)[:, 0]
    return mx.stack([d, ce], axis=-1)                                            # (n, 2)


def token_distill(h: mx.array, weight: mx.array, targets: mx.array | None, teacher: tuple[mx.array, ...],
                  kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                  mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Per-position divergence to a teacher's next-token distribution, both at `temperature`, and cross-entropy of the
    targets (0 without targets), chunked like `token_logprobs`; each (...), 0 where mask is 0.

    h (..., D) and weight belong to the trained model; the teacher is a frozen model's (h_ref (..., D_ref), weight_ref),
    or its cached top-K (ids (..., K), log-probabilities (..., K), log of the rest's mass (...)).
    """
    shape = h.shape[:-1]
    a = h.reshape(-1, h.shape[-1])
    N = a.shape[0]
    t = None if targets is None else targets.reshape(-1)
    if len(teacher) == 2:
        rows, fixed = (mx.stop_gradient(teacher[0].reshape(N, -1)),), (mx.stop_gradient(teacher[1]),)
    else:
        rows, fixed = (teacher[0].reshape(N, -1), teacher[1].reshape(N, -1), teacher[2].reshape(-1)), ()
    n = _rows(weight.shape[0])
    y = mx.zeros((N,), mx.int32) if t is None else t  # mx.checkpoint takes arrays only; unused without targets

    def compute(x: mx.array, w: mx.array, y: mx.array, *teacher: mx.array) -> mx.array:
        return _distill_chunk(x, w, None if t is None else y, teacher, kind, beta, temperature)

    chunk = mx.checkpoint(compute)
    out = mx.concatenate([chunk(a[i : i + n], weight, y[i : i + n], *(r[i : i + n] for r in rows), *fixed)
                          for i in range(0, N, n)]).reshape(*shape, 2)
    if mask is not None:
        out = out * mask[..., None]
    return out[..., 0], out[..., 1]


def token_divergence(h: mx.array, weight: mx.array, h_ref: mx.array, weight_ref: mx.array, kind: str = "forward_kl",
                     beta: float = 0.5, mask: mx.array | None = None, temperature: float = 1.0) -> mx.array:
    """Per-position divergence between two models' next-token distributions on the same positions (`token_distill`)."""
    return token_distill(h, weight, None, (h_ref, weight_ref), kind, beta, temperature, mask)[0]


def teacher_topk(teacher: nn.Module, batch: DeviceBatch, k: int, temperature: float = 1.0) -> tuple[mx.array, mx.array, mx.array]:
    """A frozen model's top-k next tokens at each position at `temperature`: ids (B, T, k), their log-probabilities
    (B, T, k) and the log of the mass left to the rest of the vocabulary (B, T), what `token_distill` takes."""
    h = teacher(batch.input_ids, head=False, **batch.model_inputs())
    a, w = h.reshape(-1, h.shape[-1]), teacher.head_weight()
    n = _rows(w.shape[0])
    parts = []
    for i in range(0, a.shape[0], n):
        logq = _log_softmax((a[i : i + n] @ w.T).astype(mx.float32) / temperature)         # (n, V)
        ids = mx.argpartition(-logq, kth=k - 1, axis=-1)[:, :k]
        rest = mx.logsumexp(mx.put_along_axis(logq, ids, mx.array(NEG, logq.dtype), axis=-1), axis=-1)
        parts.append((ids, mx.take_along_axis(logq, ids, axis=-1), rest))
        mx.eval(parts[-1])
    ids, values, rest = (mx.concatenate(x) for x in zip(*parts))
    B, T = batch.input_ids.shape
    return ids.reshape(B, T, k), values.reshape(B, T, k), rest.reshape(B, T)


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
    """Knowledge distillation: alpha * T^2 * a divergence to a frozen teacher's next-token distribution at temperature
    T + (1 - alpha) * the next-token loss, on the positions of the loss mask (see `token_distill`).

    teacher None: every batch carries the teacher's cached top-K instead. Sums over target tokens like `NextToken`;
    the metrics "kd" and "ce" are the two terms before weighting.
    """

    def __init__(self, teacher: nn.Module | None, kind: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, alpha: float = 1.0) -> None:
        self.teacher, self.kind, self.beta, self.temperature, self.alpha = teacher, kind, beta, temperature, alpha

    def units(self, batch: Batch) -> int:
        return batch.target_count

    def __call__(self, model: nn.Module, batch: DeviceBatch) -> tuple[mx.array, dict[str, mx.array]]:
        h, aux = model(batch.input_ids, head=False, return_aux=True, **batch.model_inputs())
        if self.teacher is None:
            teacher: tuple[mx.array, ...] = (batch.topk_ids, batch.topk_logprobs, batch.topk_rest)
        else:
            h_ref = mx.stop_gradient(self.teacher(batch.input_ids, head=False, **batch.model_inputs()))
            teacher = (h_ref, self.teacher.head_weight())
        d, ce = token_distill(h, unwrap(model).head_weight(), batch.targets, teacher, self.kind, self.beta,
                              self.temperature, batch.loss_mask)
        kd, ce = d.sum(), ce.sum()
        loss = self.alpha * self.temperature**2 * kd + (1 - self.alpha) * ce
        metrics = {"loss": mx.stop_gradient(loss), "kd": mx.stop_gradient(kd), "ce": mx.stop_gradient(ce)}
        if aux is None:
            return loss, metrics
        units = (batch.loss_mask != 0).sum().astype(mx.float32)
        metrics["aux_loss"] = mx.stop_gradient(aux) * units
        return loss + aux * units, metrics


def sequence_logprobs(model: nn.Module, batch: DeviceBatch) -> mx.array:
    """Summed log-probability of the masked targets of each row, (B,): what pair objectives (DPO) compare."""
    h = model(batch.input_ids, head=False, **batch.model_inputs())
    return token_logprobs(h, unwrap(model).head_weight(), batch.targets, batch.loss_mask).sum(-1)
