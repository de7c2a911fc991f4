"""Token generation on the MLX backend: chunked prefill, then one token at a time through the KV cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from llmctl.backends.mlx.model import KVCache, Transformer, make_cache
from llmctl.errors import LlmctlError
from llmctl.generation import PREFILL_CHUNK, BatchSlot, PromptCache, SamplingParams, best_prefix


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None) -> mx.array:
    """Next ids (B,) from float32 logits (B, V): greedy, or temperature then top-k, top-p and min-p filtering."""
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = mx.topk(logits, params.top_k, axis=-1).min(axis=-1, keepdims=True)   # (B, 1)
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        ordered = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(ordered, axis=-1)
        # drop a token when the tokens more likely than it already reach top_p (the most likely one always stays)
        drop = mx.cumsum(probs, axis=-1) - probs >= params.top_p
        logits = mx.put_along_axis(logits, order, mx.where(drop, -mx.inf, ordered), axis=-1)
    if params.min_p > 0.0:
        probs = mx.softmax(logits, axis=-1)
        logits = mx.where(probs < params.min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key)


def penalize(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """CTRL's repetition penalty on float32 logits (B, V) where `seen` (B, V) is True: divide if > 0, else multiply."""
    return mx.where(seen, mx.where(logits > 0, logits / penalty, logits * penalty), logits)


class _Keys:
    """A fresh random key per step from the seed, or MLX's global generator when unseeded."""

    def __init__(self, params: SamplingParams) -> None:
        self.key = mx.random.key(params.seed) if params.seed is not None and not params.greedy else None

    def next(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


class Generator:
    """Generation with one model: the model's forward for prompts, batches and tokens, with nothing kept on the model
    and nothing process-wide changed, so models generate side by side in one process; one Generator serves one
    generation at a time. The model runs as laid out at load (`model.prepare_inference`).

    Its work goes to a stream of its own for each thread that generates (MLX's default stream belongs to the thread
    that made it; another thread has none), entered around each piece of work and never held across a `yield`.
    """

    def __init__(self, model: Transformer) -> None:
        self.model, self.spec = model, model.spec
        self._streams = threading.local()

    def stream(self) -> mx.Stream:
        """This generator's stream for the calling thread (made on its first use there)."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = mx.new_stream(mx.default_device())
        return stream

    def new_cache(self) -> PromptCache:
        return PromptCache(make_cache(self.spec))

    def forward(self, tokens: mx.array, cache: list[KVCache], key_mask: mx.array | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, T, V), or (B, 1, V) with `last_only`; `cache` is extended, `key_mask` as in the model."""
        return self.model(tokens, cache, key_mask=key_mask, last_only=last_only)

    def _budget(self, longest_prompt: int, params: SamplingParams) -> int:
        if longest_prompt == 0:
            raise LlmctlError("The prompt is empty and the tokenizer adds no BOS token: there is nothing to continue.", hint="Give some text.")
        room = self.spec.max_seq_len - longest_prompt
        if room <= 0:
            raise LlmctlError(
                f"The prompt has {longest_prompt} tokens; the model's context holds {self.spec.max_seq_len}.",
                hint="Shorten the prompt.",
            )
        return min(params.max_tokens, room)

    def generate_step(self, prompt: list[int], params: SamplingParams, cache: PromptCache | None = None) -> Iterator[int]:
        """Yield new ids one by one; a stop id, when sampled, is yielded last. `cache` keeps what it can of an earlier prompt."""
        budget = self._budget(len(prompt), params)
        cache = cache if cache is not None else self.new_cache()
        stream = self.stream()
        start = cache.reuse(prompt)
        with mx.stream(stream):
            for i in range(start, len(prompt), PREFILL_CHUNK):
                chunk = prompt[i : i + PREFILL_CHUNK]
                logits = self.forward(mx.array([chunk]), cache.layers, last_only=True)[:, -1]   # (1, V)
                if i + PREFILL_CHUNK < len(prompt):
                    mx.eval([(c.keys, c.values) for c in cache.layers])  # keep each chunk's graph small
                cache.tokens.extend(chunk)
            keys = _Keys(params)
            seen = None
            if params.repetition_penalty != 1.0:
                seen = mx.zeros((1, self.spec.vocab_size), dtype=mx.bool_)
                seen[0, mx.array(prompt)] = True

        def next_token(logits: mx.array) -> mx.array:
            logits = logits.astype(mx.float32)
            if seen is not None:
                logits = penalize(logits, seen, params.repetition_penalty)
            token = sample(logits, params, keys.next())                         # (1,)
            if seen is not None:
                seen[0, token] = True
            return token

        with mx.stream(stream):
            token = next_token(logits)
            mx.async_eval(token)
        for n in range(budget):
            # Queue the next step before reading this token, so the model computes while Python streams text.
            last = n == budget - 1
            if not last:
                with mx.stream(stream):
                    following = next_token(self.forward(token[:, None], cache.layers)[:, -1])
                    mx.async_eval(following)
            token_id = token.item()
            if not last:
                cache.tokens.append(token_id)
            yield token_id
            if token_id in params.stop_ids or last:
                return
            token = following

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """New ids for each prompt, decoded together: rows are left-padded and the padding masked out.

        A row ends at its first stop id (kept at its end) or after `max_tokens`; greedy rows equal one-by-one decoding.
        """
        with mx.stream(self.stream()):
            return self._generate_batch(prompts, params)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        budget = self._budget(max(len(p) for p in prompts), params)
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = mx.array([[0] * (T - len(p)) + p for p in prompts])                          # (B, T)
        key_mask = mx.array([[False] * (T - len(p)) + [True] * (len(p) + budget) for p in prompts])  # (B, T + budget)
        cache = make_cache(self.spec)
        for i in range(0, T, PREFILL_CHUNK):
            logits = self.forward(tokens[:, i : i + PREFILL_CHUNK], cache, key_mask=key_mask, last_only=True)[:, -1]  # (B, V)
        keys = _Keys(params)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = mx.zeros((B, self.spec.vocab_size), dtype=mx.bool_)
            seen[mx.array([r for r, p in enumerate(prompts) for _ in p]), mx.array([t for p in prompts for t in p])] = True
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * B
        for n in range(budget):
            logits = logits.astype(mx.float32)
            if seen is not None:
                logits = penalize(logits, seen, params.repetition_penalty)
            token = sample(logits, params, keys.next())                          # (B,)
            for row, token_id in enumerate(token.tolist()):
                if not done[row]:
                    out[row].append(token_id)
                    done[row] = token_id in params.stop_ids
            if all(done) or n == budget - 1:
                break
            if seen is not None:
                seen[mx.arange(B), token] = True
            logits = self.forward(token[:, None], cache, key_mask=key_mask)[:, -1]
        return out

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
        return list(self.generate_step(prompt, SamplingParams(max_tokens=max_new_tokens, stop_ids=frozenset(stop_ids))))


class BatchDecoder:
    """Decode steps over a changing set of sequences (a server's requests), each with its own KV cache.

    As the torch backend's: `prefill` runs one prompt into a cache of its own; `step` runs one token of each
    sequence in one forward over a joint cache, rows left-padded to the longest (padding masked, each token at its
    own RoPE position), rebuilt when a sequence joins or leaves. Used from one thread at a time.
    """

    def __init__(self, generator: Generator) -> None:
        self.g, self.spec = generator, generator.spec
        self.members: tuple[int, ...] = ()
        self.joint: list[KVCache] = []

    def prefill(self, prompts: list[list[int]], reuse: list[PromptCache] = ()) -> list[tuple[BatchSlot, np.ndarray, int]]:
        """For each prompt: a slot holding it, the float32 logits (V,) of its next token, and the prompt tokens reused.

        As the torch backend's: the prompts run together, each row what its prompt does not reuse, left-padded to
        the longest of these, after the prefix it reuses; then each row's keys and values go to a cache of its own.
        """
        for prompt in prompts:
            self.g._budget(len(prompt), SamplingParams())
        found = [best_prefix(reuse, prompt) for prompt in prompts]
        T = max(len(prompt) - n for prompt, (_, n) in zip(prompts, found))   # new columns, the most any row computes
        keep = [max(0, len(prompt) - T) for prompt in prompts]                # reused tokens (at most what was found)
        B, offset = len(prompts), max(keep)
        pad = [T - len(prompt) + n for prompt, n in zip(prompts, keep)]      # padding columns of each row
        tokens = mx.array([[0] * m + prompt[n:] for prompt, n, m in zip(prompts, keep, pad)])           # (B, T)
        positions = mx.array([[0] * m + list(range(n, len(prompt))) for prompt, n, m in zip(prompts, keep, pad)])
        key_mask = mx.array([[False] * (offset - n + m) + [True] * len(prompt) for prompt, n, m in zip(prompts, keep, pad)])
        with mx.stream(self.g.stream()):
            joint = self._reused(found, keep, offset)
            for i in range(0, T, PREFILL_CHUNK):
                if B == 1:  # no padding: as generate_step runs a prompt
                    logits = self.g.forward(tokens[:, i : i + PREFILL_CHUNK], joint, last_only=True)[:, -1]
                else:
                    logits = self.g.model(tokens[:, i : i + PREFILL_CHUNK], joint, key_mask=key_mask, last_only=True,
                                          positions=positions[:, i : i + PREFILL_CHUNK])[:, -1]  # fmt: skip
                mx.eval(logits, [(c.keys, c.values) for c in joint])
            caches = []
            for row, prompt in enumerate(prompts):
                cache = PromptCache(joint) if B == 1 else self.g.new_cache()
                if B > 1:
                    begin = offset + T - len(prompt)
                    for dst, src in zip(cache.layers, joint):
                        dst.update(src.keys[row : row + 1, :, begin : offset + T], src.values[row : row + 1, :, begin : offset + T])
                cache.tokens = list(prompt)
                caches.append(cache)
            mx.eval([(c.keys, c.values) for cache in caches for c in cache.layers])
            logits = np.array(logits.astype(mx.float32))                          # (B, V)
        return [(BatchSlot(cache, len(prompt)), logits[row], n) for row, (cache, prompt, n) in enumerate(zip(caches, prompts, keep))]

    def _reused(self, found: list[tuple[PromptCache | None, int]], keep: list[int], offset: int) -> list[KVCache]:
        """A cache of one row per prompt holding the first keep[row] keys and values of found[row]'s cache just
        before column `offset`, zeros (masked out) before them."""
        joint = make_cache(self.spec)
        if offset == 0:
            return joint
        dtype = next(source for (source, _), n in zip(found, keep) if n).layers[0].keys.dtype  # of a row that reuses
        zeros = mx.zeros((1, self.spec.n_kv_heads, offset, self.spec.head_dim), dtype)
        for layer, kv in enumerate(joint):
            keys, values = (
                mx.concatenate([mx.concatenate([zeros[:, :, : offset - n], getattr(source.layers[layer], name)[:, :, :n]], 2)
                                if n else zeros for (source, _), n in zip(found, keep)])  # fmt: skip
                for name in ("keys", "values")
            )
            kv.update(keys, values)
        return joint

    def _rebuild(self, slots: list[BatchSlot]) -> None:
        old = {member: row for row, member in enumerate(self.members)}
        S = max(slot.length for slot in slots)
        joint = []
        for layer in range(self.spec.n_layers):
            rows_k, rows_v = [], []
            for slot in slots:
                n = slot.length
                if id(slot) in old:
                    src, at = self.joint[layer], old[id(slot)]
                    keys, values = src.keys[at : at + 1, :, src.offset - n : src.offset], src.values[at : at + 1, :, src.offset - n : src.offset]
                else:
                    src = slot.cache.layers[layer]
                    keys, values = src.keys[:, :, :n], src.values[:, :, :n]
                if n < S:
                    pad = mx.zeros((1, keys.shape[1], S - n, keys.shape[3]), keys.dtype)
                    keys, values = mx.concatenate([pad, keys], 2), mx.concatenate([pad, values], 2)
                rows_k.append(keys)
                rows_v.append(values)
            kv = KVCache(slots[0].cache.layers[layer].dtype)
            kv.keys, kv.values, kv.offset = mx.concatenate(rows_k, 0), mx.concatenate(rows_v, 0), S
            joint.append(kv)
        mx.eval([(c.keys, c.values) for c in joint])
        self.joint, self.members = joint, tuple(id(slot) for slot in slots)

    def step(self, slots: list[BatchSlot], tokens: list[int]) -> np.ndarray:
        """Float32 logits (B, V) after one more token of each slot (in order); each slot grows by one."""
        with mx.stream(self.g.stream()):
            if tuple(id(slot) for slot in slots) != self.members:
                self._rebuild(slots)
            B = len(slots)
            if B == 1:
                logits = self.g.forward(mx.array([tokens]), self.joint)[:, -1]
            else:
                S = self.joint[0].offset
                lengths = mx.array([slot.length for slot in slots])
                key_mask = mx.arange(S + 1)[None, :] >= (S - lengths)[:, None]
                logits = self.g.model(mx.array(tokens)[:, None], self.joint, key_mask=key_mask, positions=lengths[:, None])[:, -1]
            out = np.array(logits.astype(mx.float32))
        for slot in slots:
            slot.length += 1
        return out

    def release(self) -> None:
        """Drop the joint cache (no sequence is decoding)."""
        self.members, self.joint = (), []
