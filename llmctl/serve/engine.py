"""The serving engine: one thread decodes every active request together (continuous batching).

Requests wait in a bounded queue; at each step the engine picks one token for every active request from its own
logits and sampling state and sends the text on, admits waiting ones up to `max_batch` (their prompts prefilled
together in groups, each into its own KV cache, each group's first tokens sent as soon as it is done), drops
requests that ended or whose client left, and runs one batched forward for the rest. Framework-free:
the backend's BatchDecoder (`model.batch_decoder()`) does the model work; sampling here is numpy on its logits.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmctl.generation import PREFILL_BATCH, PromptCache, SamplingParams, TextStream, prefill_groups

log = logging.getLogger("llmctl.serve")

PREFIX_CACHES = 4  # prompt caches kept for prefix reuse (a shared system prompt)


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


def softmax_log(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: set[int] | None) -> int:
    """The next id from float32 logits (V,): greedy, or temperature then top-k, top-p and min-p, as `generate` does."""
    if seen:
        idx = np.fromiter(seen, dtype=np.int64)
        picked = logits[idx]
        logits = logits.copy()
        logits[idx] = np.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    if params.top_p < 1.0:
        order = np.argsort(-scaled)
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        drop = np.cumsum(probs) - probs >= params.top_p
        scaled[order[drop]] = -np.inf
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs < params.min_p * probs.max(), 0.0, probs)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


@dataclass(eq=False)
class Request:
    """One completion asked of the engine; `emit(event)` is called from the engine thread.

    Events: ("text", piece, token_info | None) for each token (token_info with `logprobs`: (id, logprob,
    [(id, logprob), ...])), then ("done", finish_reason) or ("error", message). `cancel()` frees the slot at the
    next step.
    """

    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None]
    tokenizer: Any
    logprobs: int | None = None  # None: off; k: the k most likely alternatives with each token
    cancelled: bool = False
    # filled in by the engine
    completion_tokens: int = 0
    reused_tokens: int = 0
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: Request
    slot: Any
    logits: np.ndarray
    budget: int
    stream: TextStream
    rng: np.random.Generator
    seen: set[int] | None
    last: int = -1


class Metrics:
    """Counters for /metrics (Prometheus text format); updated by the engine thread, read by the server."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = collections.Counter()   # finish reason -> count
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.step_rows = 0
        self.max_batch_seen = 0
        self.batch_hist = collections.Counter()  # rows per step -> steps
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.rejected = 0
        self.running = 0
        self.waiting = 0

    def render(self, model_name: str) -> str:
        with self.lock:
            label = f'model_name="{model_name}"'
            lines = [
                "# HELP llmctl_requests_total Requests finished, by finish reason.",
                "# TYPE llmctl_requests_total counter",
                *(f'llmctl_requests_total{{{label},finish_reason="{k}"}} {v}' for k, v in sorted(self.requests.items())),
                "# HELP llmctl_requests_rejected_total Requests refused because the queue was full.",
                "# TYPE llmctl_requests_rejected_total counter",
                f"llmctl_requests_rejected_total{{{label}}} {self.rejected}",
                "# TYPE llmctl_prompt_tokens_total counter",
                f"llmctl_prompt_tokens_total{{{label}}} {self.prompt_tokens}",
                "# TYPE llmctl_prompt_tokens_reused_total counter",
                f"llmctl_prompt_tokens_reused_total{{{label}}} {self.reused_tokens}",
                "# TYPE llmctl_generation_tokens_total counter",
                f"llmctl_generation_tokens_total{{{label}}} {self.generation_tokens}",
                "# HELP llmctl_decode_steps_total Batched decode steps run.",
                "# TYPE llmctl_decode_steps_total counter",
                f"llmctl_decode_steps_total{{{label}}} {self.steps}",
                "# HELP llmctl_decode_step_rows_total Requests decoded, summed over steps (divide by steps: mean batch).",
                "# TYPE llmctl_decode_step_rows_total counter",
                f"llmctl_decode_step_rows_total{{{label}}} {self.step_rows}",
                "# HELP llmctl_batch_size_max Most requests decoded in one step.",
                "# TYPE llmctl_batch_size_max gauge",
                f"llmctl_batch_size_max{{{label}}} {self.max_batch_seen}",
                "# TYPE llmctl_time_to_first_token_seconds summary",
                f"llmctl_time_to_first_token_seconds_sum{{{label}}} {self.ttft_sum:.6f}",
                f"llmctl_time_to_first_token_seconds_count{{{label}}} {self.ttft_count}",
                "# TYPE llmctl_requests_running gauge",
                f"llmctl_requests_running{{{label}}} {self.running}",
                "# TYPE llmctl_requests_waiting gauge",
                f"llmctl_requests_waiting{{{label}}} {self.waiting}",
            ]
        return "\n".join(lines) + "\n"


class Engine:
    """Continuous batching over a backend model: `submit` from any thread, decoding on the engine's own thread."""

    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 64, per_row: bool | None = None) -> None:
        self.model, self.spec = model, model.spec
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = model.batch_decoder(per_row)
        self.prefill_tokens = PREFILL_BATCH  # padded prompt tokens per prefill forward (prefill_groups)
        self.metrics = Metrics()
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.prefixes: collections.deque[PromptCache] = collections.deque(maxlen=PREFIX_CACHES)
        self.thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)
        self.thread.start()

    def submit(self, *requests: Request) -> None:
        """Queue the requests (the choices of one API call), all or none."""
        with self.cond:
            if len(self.waiting) + len(requests) > self.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFull
            self.waiting.extend(requests)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # --- the engine thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Row] = []
        while True:
            with self.cond:
                while not self.waiting and not active and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    for row in active:
                        self._finish(row.request, "interrupted")
                    while self.waiting:
                        self._finish(self.waiting.popleft(), "interrupted")
                    return
                admitted = []
                while self.waiting and len(active) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
                with self.metrics.lock:
                    self.metrics.waiting = len(self.waiting)
            # the running streams' tokens first, then each group of newcomers' first tokens right after its prefill:
            # none waits for prompts that are not its own
            active = [row for row in active if self._next_token(row)]
            admitted = [request for request in admitted if not self._cancelled(request)]
            fresh: list[PromptCache] = []  # this round's prompts, for the later groups that share their prefixes
            for group in prefill_groups([r.prompt for r in admitted], list(self.prefixes), self.prefill_tokens):
                for row in self._admit([admitted[i] for i in group], [*self.prefixes, *fresh]):
                    fresh.append(row.slot.cache)
                    if self._next_token(row):
                        active.append(row)
            with self.metrics.lock:
                self.metrics.running = len(active)
            if not active:
                self.decoder.release()
                continue
            try:
                logits = self.decoder.step([row.slot for row in active], [row.last for row in active])
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.exception("decode step failed")
                for row in active:
                    self._fail(row.request, f"decoding failed: {e}")
                self.decoder.release()
                active = []
                continue
            with self.metrics.lock:
                self.metrics.steps += 1
                self.metrics.step_rows += len(active)
                self.metrics.batch_hist[len(active)] += 1
                self.metrics.max_batch_seen = max(self.metrics.max_batch_seen, len(active))
            for row, row_logits in zip(active, logits):
                row.logits = row_logits

    def _cancelled(self, request: Request) -> bool:
        if request.cancelled:
            self._finish(request, "cancelled")
        return request.cancelled

    def _admit(self, requests: list[Request], reuse: list[PromptCache]) -> list[_Row]:
        """Rows for `requests`, their prompts prefilled together (reusing what `reuse` holds of them)."""
        try:
            filled = self.decoder.prefill([request.prompt for request in requests], reuse)
        except Exception as e:
            if len(requests) > 1:  # one at a time: only the request at fault fails
                return [row for request in requests for row in self._admit([request], reuse)]
            log.exception("prefill failed")
            self._fail(requests[0], f"prompt processing failed: {e}")
            return []
        rows = []
        for request, (slot, logits, reused) in zip(requests, filled):
            self.prefixes.append(slot.cache)
            request.reused_tokens = reused
            params = request.params
            seen = set(request.prompt) if params.repetition_penalty != 1.0 else None
            budget = min(params.max_tokens, self.spec.max_seq_len - len(request.prompt))
            stream = TextStream(request.tokenizer, params.stop)
            rows.append(_Row(request, slot, logits, budget, stream, np.random.default_rng(params.seed), seen))
        return rows

    def _next_token(self, row: _Row) -> bool:
        """Pick and send row's next token; False when the request has ended."""
        request, params = row.request, row.request.params
        if request.cancelled:
            self._finish(request, "cancelled")
            return False
        token = choose(row.logits, params, row.rng, row.seen)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.completion_tokens += 1
        if token in params.stop_ids:
            self._finish(request, "stop", row.stream.flush())
            return False
        info = None
        if request.logprobs is not None:
            lp = softmax_log(row.logits.astype(np.float64))
            top = np.argsort(-lp)[: request.logprobs] if request.logprobs else []
            info = (token, float(lp[token]), [(int(t), float(lp[t])) for t in top])
        piece = row.stream.feed(token)
        if piece or info is not None:
            request.emit(("text", piece, info))
        if row.stream.stopped:
            self._finish(request, "stop")
            return False
        if request.completion_tokens >= row.budget:
            self._finish(request, "length", row.stream.flush())
            return False
        if row.seen is not None:
            row.seen.add(token)
        row.last = token
        return True

    def _finish(self, request: Request, reason: str, tail: str = "") -> None:
        if tail:
            request.emit(("text", tail, None))
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        with self.metrics.lock:
            self.metrics.requests[reason] += 1
            self.metrics.prompt_tokens += len(request.prompt)
            self.metrics.reused_tokens += request.reused_tokens
            self.metrics.generation_tokens += request.completion_tokens
            if request.first_token_at is not None:
                self.metrics.ttft_sum += request.first_token_at - request.created
                self.metrics.ttft_count += 1
        ttft = (request.first_token_at - request.created) if request.first_token_at else 0.0
        decode = request.finished_at - request.first_token_at if request.first_token_at else 0.0
        rate = (request.completion_tokens - 1) / decode if request.completion_tokens > 1 and decode > 0 else 0.0
        log.info("%s %s: %d tokens in (%d from cache), %d out, first token %.0f ms, %.1f tokens/s",
                 request.id, reason, len(request.prompt), request.reused_tokens, request.completion_tokens, ttft * 1e3, rate)
        request.emit(("done", reason))

    def _fail(self, request: Request, message: str) -> None:
        request.finish_reason = "error"
        with self.metrics.lock:
            self.metrics.requests["error"] += 1
        log.info("%s error: %s", request.id, message)
        request.emit(("error", message))


_ids = itertools.count(1)


def request_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):04d}"
