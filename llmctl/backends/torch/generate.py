"""Token generation on the torch backend: chunked prefill, then one token at a time through the KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llmctl.backends.torch.model import Transformer, make_cache
from llmctl.errors import LlmctlError
from llmctl.generation import PREFILL_CHUNK, PromptCache, SamplingParams


SMALL_MODEL = 8_000_000  # matmul parameters below which decoding runs on one thread


@contextmanager
def _threads_for(model: Transformer) -> Iterator[None]:
    """One thread for small models: per token their math takes microseconds, less than waking other threads costs."""
    threads = torch.get_num_threads()
    if model.spec.matmul_params() >= SMALL_MODEL or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def new_cache(model: Transformer) -> PromptCache:
    return PromptCache(make_cache(model.spec))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from float32 logits (B, V): greedy, or temperature then top-k, top-p and min-p filtering."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]              # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the tokens more likely than it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on float32 logits (B, V) where `seen` (B, V) is True: divide if > 0, else multiply."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def _budget(model: Transformer, longest_prompt: int, params: SamplingParams) -> int:
    if longest_prompt == 0:
        raise LlmctlError("The prompt is empty and the tokenizer adds no BOS token: there is nothing to continue.", hint="Give some text.")
    room = model.spec.max_seq_len - longest_prompt
    if room <= 0:
        raise LlmctlError(
            f"The prompt has {longest_prompt} tokens; the model's context holds {model.spec.max_seq_len}.",
            hint="Shorten the prompt.",
        )
    return min(params.max_tokens, room)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device).manual_seed(params.seed)


@torch.inference_mode()
def generate_step(model: Transformer, prompt: list[int], params: SamplingParams, cache: PromptCache | None = None) -> Iterator[int]:
    """Yield new ids one by one; a stop id, when sampled, is yielded last. `cache` keeps what it can of an earlier prompt."""
    with _threads_for(model):
        budget = _budget(model, len(prompt), params)
        cache = cache if cache is not None else new_cache(model)
        device = model.model.embed_tokens.weight.device
        start = cache.reuse(prompt)
        for i in range(start, len(prompt), PREFILL_CHUNK):
            chunk = prompt[i : i + PREFILL_CHUNK]
            logits = model(torch.tensor([chunk], device=device), cache.layers, last_only=True)[:, -1]   # (1, V)
            cache.tokens.extend(chunk)
        generator = _generator(params, device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, model.spec.vocab_size, dtype=torch.bool, device=device)
            seen[0, prompt] = True
        for n in range(budget):
            logits = logits.float()
            if seen is not None:
                logits = penalize(logits, seen, params.repetition_penalty)
            token = sample(logits, params, generator)                         # (1,)
            token_id = int(token)
            yield token_id
            if token_id in params.stop_ids or n == budget - 1:
                return
            if seen is not None:
                seen[0, token_id] = True
            logits = model(token.view(1, 1), cache.layers)[:, -1]
            cache.tokens.append(token_id)


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """New ids for each prompt, decoded together: rows are left-padded and the padding masked out.

    A row ends at its first stop id (kept at its end) or after `max_tokens`; greedy rows equal one-by-one decoding.
    """
    with _threads_for(model):
        budget = _budget(model, max(len(p) for p in prompts), params)
        device = model.model.embed_tokens.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(B, T, dtype=torch.long, device=device)
        key_mask = torch.ones(B, T + budget, dtype=torch.bool, device=device)   # False at padding; new tokens fill the tail
        for row, prompt in enumerate(prompts):
            tokens[row, T - len(prompt) :] = torch.tensor(prompt)
            key_mask[row, : T - len(prompt)] = False
        cache = make_cache(model.spec)
        for i in range(0, T, PREFILL_CHUNK):
            logits = model(tokens[:, i : i + PREFILL_CHUNK], cache, key_mask=key_mask, last_only=True)[:, -1]  # (B, V)
        generator = _generator(params, device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, model.spec.vocab_size, dtype=torch.bool, device=device)
            rows = torch.arange(B, device=device)[:, None].expand(B, T)
            seen[rows[key_mask[:, :T]], tokens[key_mask[:, :T]]] = True
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * B
        for n in range(budget):
            logits = logits.float()
            if seen is not None:
                logits = penalize(logits, seen, params.repetition_penalty)
            token = sample(logits, params, generator)                          # (B,)
            for row, token_id in enumerate(token.tolist()):
                if not done[row]:
                    out[row].append(token_id)
                    done[row] = token_id in params.stop_ids
            if all(done) or n == budget - 1:
                break
            if seen is not None:
                seen[torch.arange(B), token] = True
            logits = model(token.view(B, 1), cache, key_mask=key_mask)[:, -1]
        return out


def greedy(model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
    return list(generate_step(model, prompt, SamplingParams(max_tokens=max_new_tokens, stop_ids=frozenset(stop_ids))))
