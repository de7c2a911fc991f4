"""Token generation on the MLX backend: prefill, then one token at a time through the KV cache."""

from __future__ import annotations

import mlx.core as mx

from llmctl.backends.mlx.model import Transformer, make_cache


def greedy(model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
    cache = make_cache(model.spec)
    logits = model(mx.array([prompt]), cache)                        # prefill: (1, T, V)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(mx.argmax(logits[0, -1]).item())
        out.append(nxt)
        if nxt in stop_ids:
            break
        logits = model(mx.array([[nxt]]), cache)                      # (1, 1, V)
    return out
