"""The decoder-only transformer of a ModelSpec in PyTorch, with Hugging Face parameter names."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmctl.spec import ModelSpec, llama3_inv_freq

CACHE_CHUNK = 256  # the key/value cache grows by this many positions at a time


class KVCache:
    """Keys and values of past tokens for one layer, grown in chunks: (B, KV, S, D).

    `dtype` is what they are stored and attended in (None: the activations'); generation on the CPU keeps float32,
    which the C++ decode step reads and writes, and where products of a few bfloat16 rows would be 3x slower.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.offset = 0  # positions already stored
        self.dtype = dtype

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.dtype is not None:
            k, v = k.to(self.dtype), v.to(self.dtype)
        B, KV, T, D = k.shape
        end = self.offset + T
        self.reserve(end, k)
        self.keys[:, :, self.offset : end] = k
        self.values[:, :, self.offset : end] = v
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reserve(self, end: int, like: Tensor) -> None:
        """Room for positions up to `end` (a multiple of CACHE_CHUNK), keeping what is stored; `like` (B, KV, T, D)
        gives the batch, heads, head size, dtype and device."""
        if self.has_room(end):
            return
        B, KV, _, D = like.shape
        size = -(-end // CACHE_CHUNK) * CACHE_CHUNK
        keys, values = like.new_zeros(B, KV, size, D), like.new_zeros(B, KV, size, D)
        if self.keys is not None:
            keys[:, :, : self.offset] = self.keys[:, :, : self.offset]
            values[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = keys, values

    def has_room(self, end: int) -> bool:
        """Whether positions up to `end` fit without growing."""
        return self.keys is not None and end <= self.keys.shape[2]

    def trim(self, n: int) -> None:
        """Forget all but the first `n` positions (a shared prefix kept across chat turns)."""
        self.offset = min(self.offset, n)


def make_cache(spec: ModelSpec, dtype: torch.dtype | None = None) -> list[KVCache]:
    return [KVCache(dtype) for _ in range(spec.n_layers)]


def fuse(linears: list[nn.Module]) -> tuple[Tensor, Tensor | None] | None:
    """One weight (and bias) for Linears that read the same input; their own parameters become row views of it.

    Inference then runs one matmul where there were several, at no extra memory, while saving, loading and
    training still see each Linear's tensors under its Hugging Face name. Fusing again gives back the same tensors.
    None when they cannot share a tensor: quantized layers (`QuantizedLinear.fuse`), mixed dtypes or biases.
    """
    if not all(type(linear) is nn.Linear for linear in linears):
        return None
    if len({(linear.weight.dtype, linear.weight.device, linear.bias is None) for linear in linears}) > 1:
        return None
    out = []
    for name in ("weight", "bias"):
        parts = [getattr(linear, name) for linear in linears]
        if parts[0] is None:
            out.append(None)
            continue
        joint = _joint(parts)
        if joint is None:
            # not under inference_mode: parameters made there could not be trained afterwards
            with torch.inference_mode(False), torch.no_grad():
                joint = torch.cat([p.detach() for p in parts])
                for p, view in zip(parts, joint.split([len(p) for p in parts])):
                    p.data = view
        out.append(joint)
    return out[0], out[1]


class Fused:
    """Layers that read the same x run as one product `layer` over joint tensors whose row blocks are their own.

    Made at load (`prepare_inference`); saving, loading and training still see each layer's tensors under its Hugging
    Face name. `valid` notices when a part was replaced or re-laid since (cast, moved, reloaded, untiled): the
    module then calls its layers one by one again.
    """

    def __init__(self, linears: list[nn.Module], layer: nn.Module | tuple[Tensor, Tensor | None]) -> None:
        self.linears, self.layer = linears, layer
        self.sizes = [linear.out_features for linear in linears]
        self.signature = self._signature()

    def _signature(self) -> tuple:
        return tuple((p.data_ptr(), p.dtype, getattr(linear, "tiled", False))
                     for linear in self.linears for p in (linear.weight, getattr(linear, "scales", None)) if p is not None)

    def valid(self, linears: list[nn.Module]) -> bool:
        """Whether it still computes `linears` (the module's layers now: an adapter may have replaced one)."""
        return all(a is b for a, b in zip(linears, self.linears, strict=True)) and self._signature() == self.signature

    def __call__(self, x: Tensor) -> list[Tensor]:
        if isinstance(self.layer, tuple):
            y = dense_linear(x, *self.layer)
        else:
            y = self.layer(x)
        return list(y.split(self.sizes, -1))


def fuse_layers(linears: list[nn.Module]) -> Fused | None:
    """`linears` as one product (plain Linears: `fuse`; quantized ones: their class's `fuse`), or None."""
    kind = type(linears[0])
    if any(type(linear) is not kind for linear in linears):
        return None
    if kind is nn.Linear:
        joint = fuse(linears)
        return None if joint is None else Fused(linears, joint)
    joint = kind.fuse(linears) if hasattr(kind, "fuse") else None
    return None if joint is None else Fused(linears, joint)


def prepare_inference(model: Transformer) -> None:
    """Lay the model out for fast inference, in place and once, at load: each layer's q/k/v and gate/up projections
    fused into one product where they can be, quantized layers in the kernels' fastest layout (`tile`). The state
    dict keeps the Hugging Face / MLX layout; training after this sees the same parameters."""
    for module in model.modules():
        if hasattr(module, "tile"):
            module.tile()
    if model.spec.tie_embeddings and hasattr(model.model.embed_tokens, "tile_tied"):
        model.model.embed_tokens.tile_tied()
    for block in model.model.layers:
        attn = block.self_attn
        attn.fused_qkv = fuse_layers([attn.q_proj, attn.k_proj, attn.v_proj])
        if hasattr(block, "mlp"):
            block.mlp.fused_gate_up = fuse_layers([block.mlp.gate_proj, block.mlp.up_proj])


@functools.cache
def onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def half_products() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX), so oneDNN's 16-bit products are fast."""
    from llmctl import kernels

    return kernels.cpu_has_bf16()


WIDENED_ROWS = 16  # 16-bit products with at least this many rows of x run in float32 on CPUs without bfloat16 arithmetic
FEW_FLOAT32_ROWS = (2, 8)  # float32 products of this many rows of x (a server's batched decoding) in llmctl's kernels


@functools.cache
def native_products() -> bool:
    """Whether llmctl._C is built: its float kernels (csrc/fmatmul.h) then multiply decoding's few rows of x."""
    try:
        from llmctl import _C  # noqa: F401
    except ImportError:
        return False
    return True


def _one_float32_row() -> bool:
    """Whether one float32 row of x goes to llmctl's kernels too: where they run AVX2 (four far-apart streams of weight
    rows per thread), measured 1.5x oneDNN's one-row product on an AVX2 EPYC (bench/fmatvec.py); elsewhere oneDNN."""
    from llmctl import kernels

    name = kernels.ISAS[kernels.isa_code(None)]
    return (kernels.cpu_isa() if name == "auto" else name) == "avx2"


def _few_rows_for_kernels(x: Tensor, weight: Tensor) -> bool:
    """Whether dense_linear's product goes to llmctl's few-row kernels (see there): under WIDENED_ROWS rows of 16-bit
    weights on a CPU without bfloat16 arithmetic, or FEW_FLOAT32_ROWS rows of float32 outside autograd (one row too
    where `_one_float32_row`)."""
    k = weight.shape[-1]
    if weight.dtype in (torch.bfloat16, torch.float16):
        return x.numel() < WIDENED_ROWS * k and not half_products()
    if weight.dtype != torch.float32 or x.dtype != torch.float32 or x.numel() > FEW_FLOAT32_ROWS[1] * k:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return x.numel() >= FEW_FLOAT32_ROWS[0] * k or (x.numel() == k and _one_float32_row())


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias, no autograd. Fewer than WIDENED_ROWS rows of x (decoding) of bfloat16/float16 weights on
    a CPU without bfloat16 arithmetic run in llmctl's float kernels (`kernels.fmatmul`: weights read once as stored,
    float32 sums; LLMCTL_ISA picks them): a bfloat16 row in torch measured up to 10x slower on an AVX2 EPYC, its
    products emulated. Float32 products of 2-8 rows (a server's batched decoding step) run there too: oneDNN's take 2-4x
    the time of one row on an AVX2 EPYC (rows 2 and 4 of a 768 x 2304 product, one thread: 2.8 and 5.0 ms against
    0.7), llmctl's read the weights once for all rows (1.0 and 3.3 ms); one row goes there too where the kernels run
    AVX2 (`_one_float32_row`). Other float32 products on the CPU run
    in oneDNN (inductor's linear op): torch's default (MKL) measured here 10-35% slower on training's products.
    bfloat16/float16 products of many rows (prompts) on a CPU without bfloat16 arithmetic (AVX2, most ARM) are
    widened to float32 (exactly) and multiplied there, then rounded back: the 16-bit products are emulated there,
    about 5x slower than float32's (the bfloat16 prompt measured 0.16x llama.cpp's on an AVX2 EPYC)."""
    if weight.device.type == "cpu" and weight.is_contiguous() and native_products() and _few_rows_for_kernels(x, weight):
        from llmctl import kernels

        return kernels.fmatmul(x, weight, bias, threads=torch.get_num_threads(), isa=kernels.isa_code(None))
    if (weight.dtype in (torch.bfloat16, torch.float16) and weight.device.type == "cpu"
            and x.numel() >= WIDENED_ROWS * weight.shape[-1] and not half_products()):  # fmt: skip
        return dense_linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def project(linears: list[nn.Module], x: Tensor, fused: Fused | None = None) -> list[Tensor]:
    """The outputs of Linears that read the same `x`.

    In inference, their `fused` product where one was made at load (`prepare_inference`), and plain Linears through
    `dense_linear`. In training, plain Linears of one dtype run as one matmul over their concatenated weights (`_ConcatLinear`):
    forward and backward then make one larger product each, on a CPU 5-10% faster per step than three small ones
    (and float32 products run in oneDNN, `dense_linear`).
    Elsewhere (inference, where concatenating would copy the weights on every call, or LoRA/quantized layers)
    each Linear is called on its own.
    """
    plain = all(type(linear) is nn.Linear for linear in linears)
    # A layer with hooks (calibration reading its inputs) must run itself: no fused or direct product stands in.
    hooked = any(linear._forward_hooks or linear._forward_pre_hooks for linear in linears)
    if not torch.is_grad_enabled() and not hooked:
        if fused is not None and fused.valid(linears):
            return fused(x)
        if plain:
            return [dense_linear(x, linear.weight, linear.bias) for linear in linears]
    if not (plain and torch.is_grad_enabled() and len({(l.weight.dtype, l.bias is None) for l in linears}) == 1):
        return [linear(x) for linear in linears]
    if len(linears) == 1 and not (x.device.type == "cpu" and linears[0].weight.dtype == torch.float32):
        return [linears[0](x)]  # nothing to concatenate, and no faster kernel to call
    biases = [] if linears[0].bias is None else [linear.bias for linear in linears]
    out = _ConcatLinear.apply(x, len(linears), *(linear.weight for linear in linears), *biases)
    return list(out.split([linear.out_features for linear in linears], -1))


class _ConcatLinear(torch.autograd.Function):
    """x @ cat(weights).T + cat(biases), saving only x and the weights themselves: the concatenation is a
    temporary in forward and again in backward, so training holds no second copy of the weights. Under autocast
    the products run in its dtype and each gradient comes back in its tensor's own dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int, *params: Tensor) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else params[0].dtype
        weights, biases = params[:n], params[n:]
        with torch.autocast(device, enabled=False):
            xc = x.to(dtype)
            bias = _cat(biases).to(dtype) if biases else None
            out = dense_linear(xc, _cat(weights).to(dtype), bias)
        ctx.save_for_backward(xc, *weights)
        ctx.meta = n, biases[0].dtype if biases else None, x.dtype, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xc, *weights = ctx.saved_tensors
        n, bias_dtype, x_dtype, dtype = ctx.meta
        g = grad.to(dtype)
        sizes = [len(w) for w in weights]
        grad_x = dense_linear(g, _cat(weights).to(dtype).t()).to(x_dtype) if ctx.needs_input_grad[0] else None
        g2, x2 = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
        grad_w = [None] * n
        if any(ctx.needs_input_grad[2 : 2 + n]):  # frozen weights (a teacher, a reference model) need none
            grad_w = [part.to(w.dtype) for part, w in zip((g2.t() @ x2).split(sizes), weights)]  # MKL is faster here
        grad_b = [part.to(bias_dtype) for part in g2.sum(0).split(sizes)] if bias_dtype is not None else []
        return (grad_x, None, *grad_w, *grad_b)


def _cat(parts: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _joint(parts: list[Tensor]) -> Tensor | None:
    """The tensor whose consecutive row blocks `parts` are, or None when they are not laid out so."""
    first = parts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in parts:
        if p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset or p.dtype != first.dtype or not p.is_contiguous():
            return None
        offset += p.numel()
    rows = sum(len(p) for p in parts)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


CE_CHUNK = 1 << 22  # logits per chunk of the fused cross-entropy (16 MB in float32)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` against `targets` (each row weighted by `weights`), a chunk of rows at a time.

    The (N, V) logits, their log-softmax and their gradient never exist whole (three float32 tensors of 64 MB at a
    vocabulary of 8192 and 2048 tokens): each chunk's gradient, softmax - one_hot, is made in the forward pass while
    the chunk is still in cache, and turned into the gradients of `h` and `weight` there; backward only scales them.
    Under autocast the products run in its dtype, the softmax in float32, as `logits.float()` then cross_entropy does.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            x, w = h.to(dtype), weight.to(dtype)
            N, V = len(x), len(w)
            chunk = max(128, CE_CHUNK // V)
            loss = torch.zeros((), device=h.device, dtype=torch.float32)
            # a frozen head (LoRA, a tied embedding that does not train) needs no (V, D) gradient: a third of the
            # head's work saved
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(x) if need_h else None
            grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_w else None
            for start in range(0, N, chunk):
                xc, tc = x[start : start + chunk], targets[start : start + chunk, None]
                logits = dense_linear(xc, w)                                  # (n, V)
                logp = torch.log_softmax(logits, -1, dtype=torch.float32)
                del logits
                picked = logp.gather(1, tc)                                   # (n, 1)
                g = logp.exp_().scatter_add_(1, tc, torch.full_like(picked, -1.0))  # softmax - one_hot
                if weights is not None:
                    wc = weights[start : start + chunk, None].float()
                    picked, g = picked * wc, g * wc
                loss -= picked.sum()
                g = g.to(dtype)
                if need_h:
                    grad_h[start : start + chunk] = dense_linear(g, w.t())
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(g.t(), xc)
                elif need_w:
                    grad_w += g.t() @ xc
        ctx.save_for_backward(grad_h, grad_w)  # None where not needed
        ctx.dtypes = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else (grad_h * grad).to(ctx.dtypes[0]),
                None if grad_w is None else (grad_w * grad).to(ctx.dtypes[1]), None, None)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Summed cross-entropy of the logits `h @ weight.T` (h (N, D), targets (N,)), each row weighted by `weights`
    (N,) when given, without making the logits whole. Rows of weight 0 (prompts, padding) get no logits at all."""
    if weights is not None:
        keep = weights.nonzero().squeeze(1)
        if len(keep) < len(weights):
            h, targets, weights = h.index_select(0, keep), targets[keep], weights[keep]
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, weights)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    chunk = max(128, CE_CHUNK // len(weight))
    total = torch.zeros((), device=h.device)
    with torch.autocast(device, enabled=False):
        x, w = h.to(dtype), weight.to(dtype)
        for i in range(0, len(x), chunk):
            ce = F.cross_entropy((x[i : i + chunk] @ w.t()).float(), targets[i : i + chunk], reduction="none")
            total += (ce if weights is None else ce * weights[i : i + chunk]).sum()
    return total


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the activation dtype, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rope(nn.Module):
    """Rotary position embedding in the half-split layout (first half of each head pairs with the second)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(llama3_inv_freq(spec), dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor, offset: int, positions: Tensor | None = None) -> Tensor:
        T = x.shape[2]
        if positions is None:
            cos, sin = self.table(offset + T, x)
            cos, sin = cos[offset : offset + T], sin[offset : offset + T]  # (T, D)
        else:  # each token's own position (packed examples restart at 0), (B, T)
            cos, sin = self.table(int(positions.max()) + 1, x)
            cos, sin = cos[positions][:, None], sin[positions][:, None]    # (B, 1, T, D)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def table(self, n: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of positions 0..>=n, (N, D) in x's dtype; kept between calls so decoding computes none per token."""
        if torch.compiler.is_compiling():
            return self._compute(n, x)
        cached = getattr(self, "_table", None)
        # a table made under inference_mode cannot be saved for backward: training after generation rebuilds it
        stale = cached is None or cached[0].is_inference() and not torch.is_inference_mode_enabled()
        if stale or cached[0].shape[0] < n or cached[0].dtype != x.dtype or cached[0].device != x.device:
            cached = self._table = self._compute(max(n, 2 * cached[0].shape[0] if cached is not None else 256), x)
        return cached

    def _compute(self, n: int, x: Tensor) -> tuple[Tensor, Tensor]:
        pos = torch.arange(n, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(x.device))              # (N, D/2)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)      # (N, D)


def attention_mask(T: int, offset: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean (T, S) mask, True where query t may attend key s; None when no mask or a plain causal one will do."""
    if T == 1 and (window is None or offset < window):
        return None
    if offset == 0 and window is None:
        return None
    q = torch.arange(offset, offset + T, device=device)[:, None]
    k = torch.arange(offset + T, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def segment_mask(segment_ids: Tensor, window: int | None) -> Tensor:
    """(B, 1, T, T) mask of packed rows: causal, and only within a token's own segment (example)."""
    T = segment_ids.shape[1]
    q = torch.arange(T, device=segment_ids.device)[:, None]
    k = torch.arange(T, device=segment_ids.device)[None, :]
    mask = (k <= q) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if window is not None:
        mask &= k > q - window
    return mask[:, None]


def padded_mask(key_mask: Tensor, T: int, offset: int, window: int | None) -> Tensor:
    """(B, 1, T, S) mask for left-padded rows: `key_mask` (B, S) is False at padding, which no real token sees.

    Padding attends to itself, so its rows stay finite (an all-masked row would be NaN and leak through the values).
    """
    mask = attention_mask(T, offset, window, key_mask.device)
    q = torch.arange(offset, offset + T, device=key_mask.device)[:, None]
    k = torch.arange(offset + T, device=key_mask.device)[None, :]
    if mask is None:
        mask = k <= q
    return mask & (key_mask[:, None, None, : offset + T] | (k == q))


EAGER_ATTENTION_MAX = 1 << 25  # score elements (B * H * T * T) up to which eager attention is used in training


def eager_attention_pays(q: Tensor, k: Tensor) -> bool:
    """Whether causal self-attention should run as explicit matmuls rather than SDPA's fused kernel.

    On the CPU, SDPA's flash kernel in bfloat16/float16 takes 1.5-1.7x the time of two batched matmuls and a
    softmax for training-sized blocks (backward included; float32 is the other way round). Only when gradients
    are wanted (inference keeps the kernel that never stores the scores) and the scores stay small.
    """
    B, H, T, _ = q.shape
    low = q.dtype in (torch.bfloat16, torch.float16)
    return (q.device.type == "cpu" and low and torch.is_grad_enabled() and q.requires_grad and T == k.shape[2]
            and B * H * T * T <= EAGER_ATTENTION_MAX)


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of one query per row, (B, H, 1, D) over keys (B, KV, S, D), as two small batched products.

    SDPA's kernel spreads these few microseconds of work over all threads; on a busy machine waiting for the
    other thread to be scheduled costs milliseconds, a batched product stays on one.
    """
    B, H, _, D = q.shape
    KV = k.shape[1]
    scores = (q * D**-0.5).view(B, KV, H // KV, D) @ k.transpose(2, 3)   # (B, KV, G, S): query heads grouped by KV head
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                   # mask: (1, S) or (B, 1, 1, S)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).view(B, H, 1, D)


def grouped_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D) + causal) v with q (B, H, T, D), k/v (B, KV, T, D): each key/value head serves its
    H / KV query heads as one batched matmul (keys and values are never repeated); softmax in float32 internally."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    qg = (q * D**-0.5).reshape(B, KV, H // KV * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(B, KV, H // KV, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.matmul(probs.view(B, KV, H // KV * T, T), v).view(B, H, T, D)


class Attention(nn.Module):
    fused_qkv: Fused | None = None  # q/k/v as one product, made at load (`prepare_inference`)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.dim, spec.q_dim, bias=spec.attn_bias)
        self.k_proj = nn.Linear(spec.dim, spec.kv_dim, bias=spec.attn_bias)
        self.v_proj = nn.Linear(spec.dim, spec.kv_dim, bias=spec.attn_bias)
        self.o_proj = nn.Linear(spec.q_dim, spec.dim, bias=False)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache: KVCache | None, last_only: bool = False,
                positions: Tensor | None = None) -> Tensor:
        """(B, T, dim), or (B, 1, dim) for the last position only with `last_only` (the cache still gets every
        position's keys and values): a prompt's last layer then attends for one query, not T. `positions` (B, T):
        each token's own position (packed examples), else offset, offset + 1, ..."""
        B, T, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = project([self.q_proj, self.k_proj, self.v_proj], x, self.fused_qkv)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None and cache.dtype is not None:  # attention in the cache's dtype, RoPE included
            q, k = q.to(cache.dtype), k.to(cache.dtype)
        q, k = rope(q, offset, positions), rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update(k, v)    # keys/values of all previous tokens, (B, KV, S, D)
        if last_only and T > 1:
            q, T = q[:, :, -1:], 1
            mask = None if mask is None else mask[..., -1:, :]    # None: causal, and the last query sees every key
        causal = mask is None and T > 1
        if T == 1:
            y = attend_one(q, k, v, mask)
        elif causal and eager_attention_pays(q, k):
            y = grouped_causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return project([self.o_proj], y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))[0]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fused_gate_up: Fused | None = None  # gate/up as one product, made at load (`prepare_inference`)

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project([self.gate_proj, self.up_proj], x, self.fused_gate_up)
        return project([self.down_proj], F.silu(gate) * up)[0]


class Expert(nn.Module):
    """A SwiGLU expert under Mixtral's names: w1 gate, w3 up, w2 down."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed experts; the router's softmax is taken over all experts, then renormalised over the k."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.k = spec.experts_per_token
        self.gate = nn.Linear(spec.dim, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(spec.dim, spec.ffn_dim) for _ in range(spec.n_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = x.shape
        x = x.reshape(-1, D)                                          # (N, D)
        router_logits = self.gate(x)                                  # (N, E)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.k, dim=-1)                  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out.view(B, T, D), router_logits


def load_balancing_loss(router_logits: list[Tensor], n_experts: int, k: int) -> Tensor:
    """Switch-Transformer auxiliary loss over all layers' tokens: E * sum_e(fraction routed_e * mean prob_e)."""
    logits = torch.cat(router_logits, dim=0)                          # (L*N, E)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    chosen = probs.topk(k, dim=-1).indices
    routed = F.one_hot(chosen, n_experts).float().mean(0)            # (k, E): share of tokens per slot
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

    def forward(
        self, x: Tensor, rope: Rope, mask: Tensor | None, cache: KVCache | None, last_only: bool = False,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, T, dim) and the router's logits (MoE) or None; (B, 1, dim) with `last_only` (see Attention)."""
        h = (x[:, -1:] if last_only else x) + self.self_attn(self.input_layernorm(x), rope, mask, cache, last_only, positions)
        if hasattr(self, "mlp"):
            return h + self.mlp(self.post_attention_layernorm(h)), None
        out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(h))
        return h + out, router_logits


class Body(nn.Module):
    """`model.*` in Hugging Face names: embedding, blocks, final norm."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.dim)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        self.rope = Rope(spec)
        if not spec.tie_embeddings:
            self.lm_head = nn.Linear(spec.dim, spec.vocab_size, bias=False)

    def forward(
        self, tokens: Tensor, cache: list[KVCache] | None = None, return_aux: bool = False,
        key_mask: Tensor | None = None, last_only: bool = False, targets: Tensor | None = None,
        loss_weights: Tensor | None = None, segment_ids: Tensor | None = None, positions: Tensor | None = None,
        head: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits (B, T, V); with `return_aux`, also the MoE load-balancing loss (weighted by its coefficient).

        Training: with `targets` (B, T), the mean cross-entropy of the logits against them instead of the logits,
        computed a chunk of rows at a time (`linear_cross_entropy`) where the head is a plain weight; with
        `loss_weights` (B, T), the weighted sum instead. `segment_ids`/`positions`: packed examples (see `hidden`).
        `head=False`: the hidden states (B, T, D) instead of logits (objectives that apply the head in chunks).
        Generation: `key_mask` (B, >=S) is False at left padding of batched prompts; `last_only` gives (B, 1, V).
        """
        h, aux = self.hidden(tokens, cache, key_mask, last_only, segment_ids, positions)
        if not head:
            out = h
        elif targets is None:
            out = self.logits(h)
        else:
            out = self.loss(h, targets, loss_weights)
        return (out, aux) if return_aux else out

    def hidden(
        self, tokens: Tensor, cache: list[KVCache] | None = None, key_mask: Tensor | None = None, last_only: bool = False,
        segment_ids: Tensor | None = None, positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The final norm's output (B, T, D) and the MoE load-balancing loss (weighted by its coefficient; None: dense).

        `segment_ids` (B, T) packs several examples in a row: attention stays inside each, and `positions` (B, T)
        restart at each example's first token.
        """
        B, T = tokens.shape
        offset = cache[0].offset if cache else 0
        if segment_ids is not None:
            mask = segment_mask(segment_ids, self.spec.sliding_window)
        elif key_mask is None:
            mask = attention_mask(T, offset, self.spec.sliding_window, tokens.device)
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

    def logits(self, h: Tensor) -> Tensor:
        """(B, T, V) from the final norm's output."""
        if self.spec.tie_embeddings:  # a quantized embedding runs the tied head through its own kernel
            embed = self.model.embed_tokens
            if hasattr(embed, "as_linear"):
                return embed.as_linear(h)
            return dense_linear(h, embed.weight) if not torch.is_grad_enabled() else F.linear(h, embed.weight)
        if type(self.lm_head) is nn.Linear and not torch.is_grad_enabled():
            return dense_linear(h, self.lm_head.weight)
        return self.lm_head(h)

    def loss(self, h: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
        """Cross-entropy of the logits of `h` (B, T, D) against `targets` (B, T): the mean, or the sum weighted by
        `weights` (B, T) when given; a plain head never makes the logits whole."""
        head = self.model.embed_tokens if self.spec.tie_embeddings else self.lm_head
        w = None if weights is None else weights.flatten()
        if type(head) in (nn.Embedding, nn.Linear):
            total = linear_cross_entropy(h.flatten(0, 1), head.weight, targets.flatten(), w)
        else:
            ce = F.cross_entropy(self.logits(h).float().flatten(0, 1), targets.flatten(), reduction="none")
            total = (ce if w is None else ce * w).sum()
        return total / targets.numel() if weights is None else total

    def head_weight(self) -> Tensor:
        """The output head as a float (V, D) matrix (a quantized head dequantized: it is frozen)."""
        head = self.model.embed_tokens if self.spec.tie_embeddings else self.lm_head
        return head.dequantized(torch.float32) if hasattr(head, "dequantized") else head.weight

    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) matrices, ones for norms, zeros for biases, from a fixed seed."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * self.spec.init_std)
