"""The decoder-only transformer of a ModelSpec in MLX, with Hugging Face parameter names."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from llmctl.spec import ModelSpec, llama3_inv_freq

DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}  # as config.json names them

CACHE_CHUNK = 256  # the key/value cache grows by this many positions at a time


class KVCache:
    """Keys and values of past tokens for one layer, grown in chunks: (B, KV, S, D)."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions already stored

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
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


def make_cache(spec: ModelSpec) -> list[KVCache]:
    return [KVCache() for _ in range(spec.n_layers)]


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

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


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
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.q_proj = nn.Linear(spec.dim, spec.q_dim, bias=spec.attn_bias)
        self.k_proj = nn.Linear(spec.dim, spec.kv_dim, bias=spec.attn_bias)
        self.v_proj = nn.Linear(spec.dim, spec.kv_dim, bias=spec.attn_bias)
        self.o_proj = nn.Linear(spec.q_dim, spec.dim, bias=False)

    def __call__(self, x: mx.array, rope: Rope, mask: mx.array | str | None, cache: KVCache | None) -> mx.array:
        B, T, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)     # (B, H, T, D)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, KV, T, D)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q, k = rope(q, offset), rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)    # keys/values of all previous tokens, (B, KV, S, D)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def __call__(self, x: mx.array, rope: Rope, mask: mx.array | str | None, cache: KVCache | None) -> tuple[mx.array, mx.array | None]:
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
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
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        self.rope = Rope(spec)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)

    def __call__(
        self, tokens: mx.array, cache: list[KVCache] | None = None, return_aux: bool = False,
        key_mask: mx.array | None = None, last_only: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array | None]:
        """Logits (B, T, V); with `return_aux`, also the MoE load-balancing loss (weighted by its coefficient).

        Generation: `key_mask` (B, >=S) is False at left padding of batched prompts; `last_only` gives (B, 1, V).
        """
        B, T = tokens.shape
        offset = cache[0].offset if cache else 0
        if key_mask is None:
            mask = attention_mask(T, offset, self.spec.sliding_window)
        else:
            mask = padded_mask(key_mask, T, offset, self.spec.sliding_window)
        h = self.model.embed_tokens(tokens)                           # (B, T, D)
        router_logits = []
        for i, layer in enumerate(self.model.layers):
            h, r = layer(h, self.rope, mask, cache[i] if cache else None)
            if r is not None:
                router_logits.append(r)
        h = self.model.norm(h[:, -1:] if last_only else h)
        logits = self.model.embed_tokens.as_linear(h) if self.spec.tie_embeddings else self.lm_head(h)
        if not return_aux:
            return logits
        aux = None
        if router_logits:
            aux = self.spec.router_aux_loss_coef * load_balancing_loss(router_logits, self.spec.n_experts, self.spec.experts_per_token)
        return logits, aux

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
