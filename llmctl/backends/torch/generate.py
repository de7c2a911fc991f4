"""Token generation on the torch backend: prefill, then one token at a time through the KV cache."""

from __future__ import annotations

import torch

from llmctl.backends.torch.model import Transformer, make_cache


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
    cache = make_cache(model.spec)
    logits = model(torch.tensor([prompt]), cache)                     # prefill: (1, T, V)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop_ids:
            break
        logits = model(torch.tensor([[nxt]]), cache)                  # (1, 1, V)
    return out
