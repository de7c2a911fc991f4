"""Token generation on the MLX backend: chunked prefill, then one token at a time through the KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from llmctl.backends.mlx.model import KVCache, Transformer, attention_mask, fuse, make_cache, padded_mask
from llmctl.backends.mlx.quant import QuantizedLinear
from llmctl.errors import LlmctlError
from llmctl.generation import PREFILL_CHUNK, PromptCache, SamplingParams


def _linear(weight: mx.array, bias: mx.array | None) -> Callable[[mx.array], mx.array]:
    """x -> x @ weight + bias, `weight` being (in, out)."""
    if bias is None:
        return lambda x: x @ weight
    return lambda x: mx.addmm(bias, x, weight)


def _quantized_on_cpu(layer: nn.Module) -> Callable[[mx.array], mx.array]:
    """An affine quantized layer run with float32 scales, biases and x: MLX's CPU quantized_matmul is ~8x slower with
    bfloat16 ones and ~35x with float16 (measured with MLX 0.32 on a 4096 x 768 4-bit matrix: 25 / 104 / 2.9 ms).
    The layer keeps its own tensors (saving writes them unchanged); the float32 copies cost 0.5 bit a weight at
    group size 64. Elsewhere (Metal) or for float32 scales and NF4, the layer itself."""
    if (
        not isinstance(layer, QuantizedLinear) or layer.mode != "affine" or layer.scales.dtype == mx.float32
        or mx.default_device() != mx.cpu
    ):  # fmt: skip
        return layer.as_linear if hasattr(layer, "as_linear") else layer
    weight, group_size, bits = layer.weight, layer.group_size, layer.bits
    scales, biases = layer.scales.astype(mx.float32), layer.biases.astype(mx.float32)
    bias = layer.bias if "bias" in layer else None

    def matmul(x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x.astype(mx.float32), weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return y.astype(x.dtype) if bias is None else (y + bias).astype(x.dtype)

    return matmul


def _projection(linears: list[nn.Module], input_major: bool) -> Callable[[mx.array], mx.array]:
    """x -> the outputs of `linears` side by side: one matmul for plain Linears, one call each for quantized ones."""
    fused = fuse(linears, input_major)
    if fused is not None:
        return _linear(*fused)
    if len(linears) == 1:
        return _quantized_on_cpu(linears[0])
    parts = [_quantized_on_cpu(linear) for linear in linears]
    return lambda x: mx.concatenate([part(x) for part in parts], axis=-1)


def _mlp(block: nn.Module, input_major: bool) -> Callable[[mx.array], mx.array]:
    if "mlp" not in block:
        return lambda x: block.block_sparse_moe(x)[0]
    gate_up = _projection([block.mlp.gate_proj, block.mlp.up_proj], input_major)
    down = _projection([block.mlp.down_proj], input_major)

    def swiglu(x: mx.array) -> mx.array:
        gate, up = mx.split(gate_up(x), 2, axis=-1)
        return down(nn.silu(gate) * up)

    return swiglu


class Decoder:
    """The Transformer's forward for inference: fused projections and no module calls, so a token costs its matmuls.

    It computes what `Transformer.__call__` does (that one is the reference, and what training runs); the greedy
    parity tests hold the two together. Build it with `decoder_for`, which notices when the weights change.
    """

    def __init__(self, model: Transformer) -> None:
        spec = model.spec
        self.spec, self.model = spec, model
        # float32 on the CPU: weights input-major, which MLX's CPU BLAS reads twice as fast
        input_major = model.model.embed_tokens.weight.dtype == mx.float32 and mx.default_device() == mx.cpu
        self.layers = []
        for block in model.model.layers:
            attn = block.self_attn
            self.layers.append((
                block.input_layernorm.weight, _projection([attn.q_proj, attn.k_proj, attn.v_proj], input_major),
                _projection([attn.o_proj], input_major), block.post_attention_layernorm.weight, _mlp(block, input_major),
            ))  # fmt: skip
        self.embed = model.model.embed_tokens
        self.final_norm = model.model.norm.weight
        if not spec.tie_embeddings:
            self.head = _projection([model.lm_head], input_major)
        else:
            self.head = _quantized_on_cpu(self.embed) if isinstance(self.embed, QuantizedLinear) else self.embed.as_linear
        self.params = [v for _, v in tree_flatten(model.parameters())]
        mx.clear_cache()  # the unfused copies just freed

    def stale(self) -> bool:
        """Whether the model's parameters were replaced since (loaded, cast, trained)."""
        now = [v for _, v in tree_flatten(self.model.parameters())]
        return len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params))

    def __call__(self, tokens: mx.array, cache: list[KVCache], key_mask: mx.array | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, T, V), or (B, 1, V) with `last_only`; `cache` is extended, `key_mask` as in the model."""
        spec = self.spec
        B, T = tokens.shape
        H, KV, D = spec.n_heads, spec.n_kv_heads, spec.head_dim
        offset = cache[0].offset
        if key_mask is None:
            mask = attention_mask(T, offset, spec.sliding_window)
        else:
            mask = padded_mask(key_mask, T, offset, spec.sliding_window)
        x = self.embed(tokens)                                                  # (B, T, dim)
        last = len(self.layers) - 1
        for i, ((ln1, qkv, o, ln2, mlp), layer_cache) in enumerate(zip(self.layers, cache)):
            y = qkv(mx.fast.rms_norm(x, ln1, spec.norm_eps)).reshape(B, T, H + 2 * KV, D).transpose(0, 2, 1, 3)  # (B, H+2KV, T, D)
            qk = self.model.rope(y[:, : H + KV], offset)                          # RoPE on q and k at once
            k, v = layer_cache.update(qk[:, H:], y[:, H + KV :])                 # (B, KV, S, D)
            q = qk[:, :H]
            if last_only and i == last and T > 1:
                # The last layer: every position's keys and values went to the cache; attention, its output
                # projection and the MLP only for the last position (a twelfth less work for a 12-layer prompt).
                q, x, T = q[:, :, -1:], x[:, -1:], 1
                mask = None if isinstance(mask, str) or mask is None else mask[..., -1:, :]  # causal: it sees all
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
            x = x + o(y.transpose(0, 2, 1, 3).reshape(B, T, H * D))
            x = x + mlp(mx.fast.rms_norm(x, ln2, spec.norm_eps))
        if last_only:
            x = x[:, -1:]
        return self.head(mx.fast.rms_norm(x, self.final_norm, spec.norm_eps))


def decoder_for(model: Transformer) -> Decoder:
    """The model's Decoder, built once (kept on the model) and again whenever its weights were replaced."""
    decoder = getattr(model, "_decoder", None)
    if decoder is None or decoder.stale():
        decoder = model._decoder = Decoder(model)
    return decoder


def new_cache(model: Transformer) -> PromptCache:
    return PromptCache(make_cache(model.spec))


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


class _Keys:
    """A fresh random key per step from the seed, or MLX's global generator when unseeded."""

    def __init__(self, params: SamplingParams) -> None:
        self.key = mx.random.key(params.seed) if params.seed is not None and not params.greedy else None

    def next(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


def generate_step(model: Transformer, prompt: list[int], params: SamplingParams, cache: PromptCache | None = None) -> Iterator[int]:
    """Yield new ids one by one; a stop id, when sampled, is yielded last. `cache` keeps what it can of an earlier prompt."""
    budget = _budget(model, len(prompt), params)
    cache = cache if cache is not None else new_cache(model)
    decoder = decoder_for(model)
    start = cache.reuse(prompt)
    for i in range(start, len(prompt), PREFILL_CHUNK):
        chunk = prompt[i : i + PREFILL_CHUNK]
        logits = decoder(mx.array([chunk]), cache.layers, last_only=True)[:, -1]   # (1, V)
        if i + PREFILL_CHUNK < len(prompt):
            mx.eval([(c.keys, c.values) for c in cache.layers])  # keep each chunk's graph small
        cache.tokens.extend(chunk)
    keys = _Keys(params)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = mx.zeros((1, model.spec.vocab_size), dtype=mx.bool_)
        seen[0, mx.array(prompt)] = True

    def next_token(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if seen is not None:
            logits = penalize(logits, seen, params.repetition_penalty)
        token = sample(logits, params, keys.next())                         # (1,)
        if seen is not None:
            seen[0, token] = True
        return token

    token = next_token(logits)
    mx.async_eval(token)
    for n in range(budget):
        # Queue the next step before reading this token, so the model computes while Python streams text.
        last = n == budget - 1
        if not last:
            following = next_token(decoder(token[:, None], cache.layers)[:, -1])
            mx.async_eval(following)
        token_id = token.item()
        if not last:
            cache.tokens.append(token_id)
        yield token_id
        if token_id in params.stop_ids or last:
            return
        token = following


def generate_batch(model: Transformer, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """New ids for each prompt, decoded together: rows are left-padded and the padding masked out.

    A row ends at its first stop id (kept at its end) or after `max_tokens`; greedy rows equal one-by-one decoding.
    """
    budget = _budget(model, max(len(p) for p in prompts), params)
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens = mx.array([[0] * (T - len(p)) + p for p in prompts])                          # (B, T)
    key_mask = mx.array([[False] * (T - len(p)) + [True] * (len(p) + budget) for p in prompts])  # (B, T + budget)
    cache = make_cache(model.spec)
    decoder = decoder_for(model)
    for i in range(0, T, PREFILL_CHUNK):
        logits = decoder(tokens[:, i : i + PREFILL_CHUNK], cache, key_mask=key_mask, last_only=True)[:, -1]  # (B, V)
    keys = _Keys(params)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = mx.zeros((B, model.spec.vocab_size), dtype=mx.bool_)
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
        logits = decoder(token[:, None], cache, key_mask=key_mask)[:, -1]
    return out


def greedy(model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
    return list(generate_step(model, prompt, SamplingParams(max_tokens=max_new_tokens, stop_ids=frozenset(stop_ids))))
