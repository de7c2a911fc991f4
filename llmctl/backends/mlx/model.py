"""The decoder-only transformer of a ModelSpec in MLX, with Hugging Face parameter names."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from llmctl.spec import ModelSpec, llama3_inv_freq

DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}  # as config.json names them

CACHE_CHUNK = 256  # the key/value cache grows by this many positions at a time


class KVCache:
    """Keys and values of past tokens for one layer, grown in chunks: (B, KV, S, D).

    `dtype` is what they are stored and attended in (None: the activations').
    """

    def __init__(self, dtype: mx.Dtype | None = None) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions already stored
        self.dtype = dtype

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.dtype is not None:
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        B, KV, T, D = k.shape
        end = self.offset + T
        if self.keys is None or end > self.keys.shape[2]:
            size = -(-end // CACHE_CHUNK) * CACHE_CHUNK
            keys, values = mx.zeros((B, KV, size, D), k.dtype), mx.zeros((B, KV, size, D), v.dtype)
            if self.keys is not None:
                keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
                values[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = keys, values
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def trim(self, n: int) -> None:
        """Forget all but the first `n` positions (a shared prefix kept across chat turns)."""
        self.offset = min(self.offset, n)


def make_cache(spec: ModelSpec, dtype: mx.Dtype | None = None) -> list[KVCache]:
    return [KVCache(dtype) for _ in range(spec.n_layers)]


def fuse(linears: list[nn.Module], input_major: bool) -> tuple[mx.array, mx.array | None] | None:
    """One weight (and bias) for Linears that read the same input, shaped as `x @ weight` reads it: (in, out).

    Each Linear's own parameters become views of it, so no memory is added and saving, loading and training still
    see the Hugging Face tensors. `input_major` stores it so (MLX's CPU BLAS reads that twice as fast in float32),
    else it is a transposed view of the (out, in) rows. None when the Linears cannot share a tensor: quantized
    layers (they keep their own kernels), mixed dtypes or biases.
    """
    if not all(type(linear) is nn.Linear for linear in linears):
        return None
    if len({(linear.weight.dtype, "bias" in linear) for linear in linears}) > 1:
        return None
    if input_major:
        joint = mx.contiguous(mx.concatenate([linear.weight.T for linear in linears], axis=1))   # (in, out)
    else:
        joint = (mx.concatenate([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight).T
    bias = None
    if "bias" in linears[0]:
        bias = mx.concatenate([linear.bias for linear in linears]) if len(linears) > 1 else linears[0].bias
    start = 0
    for linear in linears:
        n = linear.weight.shape[0]
        linear.weight = joint[:, start : start + n].T
        if bias is not None:
            linear.bias = bias[start : start + n]
        start += n
    mx.eval(joint, bias, [linear.parameters() for linear in linears])
    return joint, bias


class Fused:
    """Layers that read the same x, run by `fn` (x -> their outputs) in a faster form made at load
    (`prepare_inference`): one product over a joint weight, float32 scales for MLX's CPU kernels. The layers keep their
    own tensors under their Hugging Face names (saving writes them unchanged); `valid` notices when a layer's arrays
    were replaced since (trained, cast, reloaded): the module then calls its layers one by one again."""

    def __init__(self, linears: list[nn.Module], fn: Callable[[mx.array], list[mx.array]],
                 joint: Callable[[mx.array], mx.array] | None = None) -> None:
        self.linears, self.fn = linears, fn
        self.joint = joint  # x -> the outputs side by side, unsplit (one product over a joint weight), or None
        self.arrays = self._arrays()

    def _arrays(self) -> list[mx.array]:
        return [linear[name] for linear in self.linears for name in ("weight", "scales", "biases", "bias") if name in linear]

    def valid(self, linears: list[nn.Module]) -> bool:
        """Whether it still computes `linears` (the module's layers now: an adapter may have replaced one)."""
        if not all(a is b for a, b in zip(linears, self.linears, strict=True)):
            return False
        arrays = self._arrays()
        return len(arrays) == len(self.arrays) and all(a is b for a, b in zip(arrays, self.arrays))

    def __call__(self, x: mx.array) -> list[mx.array]:
        return self.fn(x)


def _quantized_on_cpu(layer: nn.Module) -> Callable[[mx.array], mx.array] | None:
    """An affine quantized layer run with float32 scales, biases and x: MLX's CPU quantized_matmul is ~8x slower with
    bfloat16 ones and ~35x with float16 (measured with MLX 0.32 on a 4096 x 768 4-bit matrix: 25 / 104 / 2.9 ms).
    The float32 copies cost 0.5 bit a weight at group size 64. None elsewhere (Metal), for float32 scales and NF4."""
    if (
        not hasattr(layer, "matmul") or layer.mode != "affine" or layer.scales.dtype == mx.float32
        or mx.default_device() != mx.cpu
    ):  # fmt: skip
        return None
    weight, group_size, bits = layer.weight, layer.group_size, layer.bits
    scales, biases = layer.scales.astype(mx.float32), layer.biases.astype(mx.float32)
    mx.eval(scales, biases)
    bias = layer.bias if "bias" in layer else None

    def matmul(x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x.astype(mx.float32), weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return y.astype(x.dtype) if bias is None else (y + bias).astype(x.dtype)

    return matmul


def fuse_layers(linears: list[nn.Module], input_major: bool) -> Fused | None:
    """`linears` in their fastest form for inference (see Fused), or None when there is none faster than calling them."""
    joint = fuse(linears, input_major)
    if joint is not None:
        weight, bias = joint
        splits = list(itertools.accumulate(linear.weight.shape[0] for linear in linears))[:-1]
        product = (lambda x: x @ weight) if bias is None else (lambda x: mx.addmm(bias, x, weight))
        return Fused(linears, lambda x: mx.split(product(x), splits, axis=-1) if splits else [product(x)], product)
    fast = [_quantized_on_cpu(linear) for linear in linears]
    if any(f is None for f in fast):
        return None
    return Fused(linears, lambda x: [f(x) for f in fast])


def prepare_inference(model: Transformer) -> None:
    """Lay the model out for fast inference, once, at load: each layer's q/k/v and gate/up projections as one product
    where they can be (float32 on the CPU: weights input-major, which MLX's CPU BLAS reads twice as fast), quantized
    layers with float32 scales on the CPU. Saving still writes each layer's own tensors in the Hugging Face layout;
    training (`model.train()`) runs the layers themselves."""
    input_major = model.model.embed_tokens.weight.dtype == mx.float32 and mx.default_device() == mx.cpu
    for block in model.model.layers:
        attn = block.self_attn
        attn.fused_qkv = fuse_layers([attn.q_proj, attn.k_proj, attn.v_proj], input_major)
        attn.fused_o = fuse_layers([attn.o_proj], input_major)
        if "mlp" in block:
            block.mlp.fused_gate_up = fuse_layers([block.mlp.gate_proj, block.mlp.up_proj], input_major)
            block.mlp.fused_down = fuse_layers([block.mlp.down_proj], input_major)
    embed = model.model.embed_tokens
    head = embed if model.spec.tie_embeddings else model.lm_head
    if not model.spec.tie_embeddings or hasattr(embed, "matmul"):  # a plain tied embedding is read as it is
        model.fused_head = fuse_layers([head], input_major)
    # what is still lazy, evaluated now: a thread other than this one has no stream to compute it on
    mx.eval(model.rope._freqs, model.parameters())
    mx.clear_cache()  # the unfused copies just freed


def project(linears: list[nn.Module], x: mx.array, fused: Fused | None, training: bool) -> list[mx.array]:
    """The outputs of layers that read the same `x`: their `fused` form when one was made at load and still holds
    (never in training: gradients go to the layers' own arrays), else each layer called on its own."""
    if fused is not None and not training and fused.valid(linears):
        return fused(x)
    return [linear(x) for linear in linears]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # mx.fast.rms_norm accumulates in float32 whatever the activation dtype.
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Rope(nn.Module):
    """Rotary position embedding in the half-split layout (first half of each head pairs with the second)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.dims = spec.head_dim
        # mx.fast.rope takes wavelengths per pair (1 / inverse frequency).
        self._freqs = 1.0 / mx.array(llama3_inv_freq(spec), dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int, positions: mx.array | None = None) -> mx.array:
        if positions is None:
            return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)
        # each token's own position (packed examples restart at 0), (B, T)
        angles = positions[:, None, :, None].astype(mx.float32) / self._freqs           # (B, 1, T, D/2)
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        x1, x2 = x[..., : self.dims // 2], x[..., self.dims // 2 :]
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(T: int, offset: int, window: int | None) -> mx.array | str | None:
    """Boolean (T, S) mask, True where query t may attend key s; "causal" when plain causal attention will do."""
    if T == 1 and (window is None or offset < window):
        return None
    if offset == 0 and window is None:
        return "causal"
    q = mx.arange(offset, offset + T)[:, None]
    k = mx.arange(offset + T)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def segment_mask(segment_ids: mx.array, window: int | None) -> mx.array:
    """(B, 1, T, T) mask of packed rows: causal, and only within a token's own segment (example)."""
    T = segment_ids.shape[1]
    q = mx.arange(T)[:, None]
    k = mx.arange(T)[None, :]
    mask = (k <= q) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if window is not None:
        mask = mask & (k > q - window)
    return mask[:, None]


def padded_mask(key_mask: mx.array, T: int, offset: int, window: int | None) -> mx.array:
    """(B, 1, T, S) mask for left-padded rows: `key_mask` (B, S) is False at padding, which no real token sees.

    Padding attends to itself, so its rows stay finite (an all-masked row would be NaN and leak through the values).
    """
    mask = attention_mask(T, offset, window)
    q = mx.arange(offset, offset + T)[:, None]
    k = mx.arange(offset + T)[None, :]
    if not isinstance(mask, mx.array):
        mask = k <= q
    return mask & (key_mask[:, None, None, : offset + T] | (k == q))


class Attention(nn.Module):
    fused_qkv: Fused | None = None  # made at load (`prepare_inference`)
    fused_o: Fused | None = None

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.q_proj = nn.Linear(spec.dim, spec.q_dim, bias=spec.attn_bias)
        self.k_proj = nn.Linear(spec.dim, spec.kv_dim, bias=spec.attn_bias)
        self.v_proj = nn.Linear(spec.dim, spec.kv_dim, bias=spec.attn_bias)
        self.o_proj = nn.Linear(spec.q_dim, spec.dim, bias=False)

    def __call__(
        self, x: mx.array, rope: Rope, mask: mx.array | str | None, cache: KVCache | None, last_only: bool = False,
        positions: mx.array | None = None,
    ) -> mx.array:
        """(B, T, dim), or (B, 1, dim) for the last position only with `last_only` (the cache still gets every
        position's keys and values): a prompt's last layer then attends for one query, not T. `positions` (B, T):
        each token's own position (packed examples), else offset, offset + 1, ..."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        offset = cache.offset if cache is not None else 0
        linears, fused = [self.q_proj, self.k_proj, self.v_proj], self.fused_qkv
        if positions is None and not self.training and fused is not None and fused.joint is not None and fused.valid(linears):
            # inference over one joint product: its heads shaped once, one rotation for queries and keys together
            # (on the CPU, MLX's rope runs as a dozen small ops a call)
            y = fused.joint(x).reshape(B, T, H + 2 * KV, self.head_dim).transpose(0, 2, 1, 3)   # (B, H+2KV, T, D)
            qk = rope(y[:, : H + KV], offset)
            q, k, v = qk[:, :H], qk[:, H:], y[:, H + KV :]
        else:
            q, k, v = project(linears, x, fused, self.training)
            q = q.reshape(B, T, H, self.head_dim).transpose(0, 2, 1, 3)      # (B, H, T, D)
            k = k.reshape(B, T, KV, self.head_dim).transpose(0, 2, 1, 3)     # (B, KV, T, D)
            v = v.reshape(B, T, KV, self.head_dim).transpose(0, 2, 1, 3)
            if positions is None and not self.training:
                qk = rope(mx.concatenate([q, k], axis=1), offset)  # one rotation, as above
                q, k = qk[:, :H], qk[:, H:]
            else:
                q, k = rope(q, offset, positions), rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update(k, v)    # keys/values of all previous tokens, (B, KV, S, D)
            if q.dtype != k.dtype:
                q = q.astype(k.dtype)
        if last_only and T > 1:
            q, T = q[:, :, -1:], 1
            mask = None if isinstance(mask, str) or mask is None else mask[..., -1:, :]  # causal: the last query sees all
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return project([self.o_proj], y if y.dtype == x.dtype else y.astype(x.dtype), self.fused_o, self.training)[0]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fused_gate_up: Fused | None = None  # made at load (`prepare_inference`)
    fused_down: Fused | None = None

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = project([self.gate_proj, self.up_proj], x, self.fused_gate_up, self.training)
        return project([self.down_proj], nn.silu(gate) * up, self.fused_down, self.training)[0]


class Expert(nn.Module):
    """A SwiGLU expert under Mixtral's names: w1 gate, w3 up, w2 down."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed experts; the router's softmax is taken over all experts, then renormalised over the k."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.k = spec.experts_per_token
        self.gate = nn.Linear(spec.dim, spec.n_experts, bias=False)
        self.experts = [Expert(spec.dim, spec.ffn_dim) for _ in range(spec.n_experts)]

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        B, T, D = x.shape
        x = x.reshape(-1, D)                                          # (N, D)
        router_logits = self.gate(x)                                  # (N, E)
        probs = mx.softmax(router_logits.astype(mx.float32), axis=-1)
        # Indices carry no gradient; without stop_gradient MLX cannot differentiate take_along_axis.
        chosen = mx.stop_gradient(mx.argpartition(-probs, kth=self.k - 1, axis=-1)[:, : self.k])  # (N, k), unordered
        weights = mx.take_along_axis(probs, chosen, axis=-1)
        weights = (weights / weights.sum(-1, keepdims=True)).astype(x.dtype)
        out = mx.zeros_like(x)
        # Every expert runs on every token and unchosen ones get weight 0: simple, and exact.
        for e, expert in enumerate(self.experts):
            w = (weights * (chosen == e)).sum(-1, keepdims=True)      # (N, 1)
            out = out + expert(x) * w
        return out.reshape(B, T, D), router_logits


def load_balancing_loss(router_logits: list[mx.array], n_experts: int, k: int) -> mx.array:
    """Switch-Transformer auxiliary loss over all layers' tokens: E * sum_e(fraction routed_e * mean prob_e)."""
    logits = mx.concatenate(router_logits, axis=0)                    # (L*N, E)
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    chosen = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k])
    routed = (chosen[..., None] == mx.arange(n_experts)).astype(mx.float32).mean(0)  # (k, E)
    return (routed * probs.mean(0)).sum() * n_experts


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.dim, spec.norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.dim, spec.norm_eps)
        if spec.n_experts:
            self.block_sparse_moe = MoE(spec)
        else:
            self.mlp = MLP(spec.dim, spec.ffn_dim)

    def __call__(
        self, x: mx.array, rope: Rope, mask: mx.array | str | None, cache: KVCache | None, last_only: bool = False,
        positions: mx.array | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """(B, T, dim) and the router's logits (MoE) or None; (B, 1, dim) with `last_only` (see Attention)."""
        h = (x[:, -1:] if last_only else x) + self.self_attn(self.input_layernorm(x), rope, mask, cache, last_only, positions)
        if "mlp" in self:
            return h + self.mlp(self.post_attention_layernorm(h)), None
        out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(h))
        return h + out, router_logits


class Body(nn.Module):
    """`model.*` in Hugging Face names: embedding, blocks, final norm."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = [Block(spec) for _ in range(spec.n_layers)]
        self.norm = RMSNorm(spec.dim, spec.norm_eps)


class Transformer(nn.Module):
    fused_head: Fused | None = None  # made at load (`prepare_inference`)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        self.rope = Rope(spec)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)

    def __call__(
        self, tokens: mx.array, cache: list[KVCache] | None = None, return_aux: bool = False,
        key_mask: mx.array | None = None, last_only: bool = False, segment_ids: mx.array | None = None,
        positions: mx.array | None = None, head: bool = True,
    ) -> mx.array | tuple[mx.array, mx.array | None]:
        """Logits (B, T, V); with `return_aux`, also the MoE load-balancing loss (weighted by its coefficient).

        Generation: `key_mask` (B, >=S) is False at left padding of batched prompts; `last_only` gives (B, 1, V).
        Training: `segment_ids`/`positions` pack examples (see `hidden`); `head=False` gives the hidden states
        (B, T, D) instead of logits (objectives that apply the head in chunks).
        """
        h, aux = self.hidden(tokens, cache, key_mask, last_only, segment_ids, positions)
        out = self.logits(h) if head else h
        return (out, aux) if return_aux else out

    def hidden(
        self, tokens: mx.array, cache: list[KVCache] | None = None, key_mask: mx.array | None = None,
        last_only: bool = False, segment_ids: mx.array | None = None, positions: mx.array | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """The final norm's output (B, T, D) and the MoE load-balancing loss (weighted by its coefficient; None: dense).

        `segment_ids` (B, T) packs several examples in a row: attention stays inside each, and `positions` (B, T)
        restart at each example's first token.
        """
        B, T = tokens.shape
        offset = cache[0].offset if cache else 0
        if segment_ids is not None:
            mask = segment_mask(segment_ids, self.spec.sliding_window)
        elif key_mask is None:
            mask = attention_mask(T, offset, self.spec.sliding_window)
        else:
            mask = padded_mask(key_mask, T, offset, self.spec.sliding_window)
        h = self.model.embed_tokens(tokens)                           # (B, T, D)
        router_logits = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            # with last_only, the last layer computes the keys and values of every position (the cache needs them)
            # but the rest for the last position only: a twelfth less work for a 12-layer model's prompt
            h, r = layer(h, self.rope, mask, cache[i] if cache else None, last_only and i == last, positions)
            if r is not None:
                router_logits.append(r)
        h = self.model.norm(h)
        aux = None
        if router_logits:
            aux = self.spec.router_aux_loss_coef * load_balancing_loss(router_logits, self.spec.n_experts, self.spec.experts_per_token)
        return h, aux

    def logits(self, h: mx.array) -> mx.array:
        """(B, T, V) from the final norm's output."""
        head = self.model.embed_tokens if self.spec.tie_embeddings else self.lm_head
        if self.fused_head is not None and not self.training and self.fused_head.valid([head]):
            return self.fused_head(h)[0]
        return head.as_linear(h) if self.spec.tie_embeddings else head(h)

    def head_weight(self) -> mx.array:
        """The output head as a float (V, D) matrix (a quantized head dequantized: it is frozen)."""
        head = self.model.embed_tokens if self.spec.tie_embeddings else self.lm_head
        return head.dequantized(mx.float32) if hasattr(head, "dequantized") else head.weight

    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) matrices, ones for norms, zeros for biases, from a fixed seed."""
        flat = tree_flatten(self.parameters())
        keys = mx.random.split(mx.random.key(seed), len(flat))
        params = []
        for i, (name, p) in enumerate(flat):
            if name.endswith("norm.weight"):
                params.append((name, mx.ones_like(p)))
            elif name.endswith("bias"):
                params.append((name, mx.zeros_like(p)))
            else:
                params.append((name, mx.random.normal(p.shape, key=keys[i]) * self.spec.init_std))
        self.load_weights(params)
