"""Token generation on the torch backend: chunked prefill, then one token at a time through the KV cache."""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmctl.backends.torch.model import (
    KVCache, Transformer, _joint, attention_mask, dense_linear, fuse, make_cache, padded_mask,
)
from llmctl.backends.torch.quant import _DTYPE_CODES, QuantizedEmbedding, QuantizedLinear
from llmctl import kernels
from llmctl.errors import LlmctlError
from llmctl.generation import PREFILL_CHUNK, PromptCache, SamplingParams


SMALL_MODEL = 8_000_000  # matmul parameters below which decoding runs on one thread


@contextmanager
def _threads_for(model: Transformer) -> Iterator[None]:
    """One thread for small models (per token their math takes microseconds, less than waking other threads costs);
    the count torch had is restored afterwards, whatever DecodeThreads chose on the way."""
    threads = torch.get_num_threads()
    if model.spec.matmul_params() < SMALL_MODEL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DecodeThreads:
    """How many threads decode the next token: all of torch's or one, whichever is faster at the moment.

    A token is ~100 small parallel products. On an idle machine more threads read the weights faster; on a busy one
    each product waits for its second thread to be scheduled, and one thread alone can be several times faster.
    So each count's time per token is kept as a moving average, now and then `PROBE` tokens run with the count not
    in use, and the faster count on average is used; the longer it stays the same, the rarer the probes.
    Used as `with threads.step(): ...` around each token's forward.
    """

    PROBE = 2                  # tokens run with the other count at each probe
    FIRST, LONGEST = 16, 512   # tokens between probes: after a change, and at most
    WEIGHT = 0.25              # of the newest token in the moving averages

    def __init__(self, threads: int) -> None:
        self.counts = (threads, 1) if threads > 1 else (1,)
        self.best = threads
        self.average = dict.fromkeys(self.counts, 0.0)  # seconds per token; 0: not measured yet
        self.n = 0                 # tokens decoded
        self.probe_at = self.FIRST  # token at which the next probe starts
        self.every = self.FIRST

    @classmethod
    def now(cls) -> DecodeThreads:
        """The one for torch's current thread count, kept across calls so that what it learnt is not lost."""
        threads = torch.get_num_threads()
        if threads not in _decode_threads:
            _decode_threads[threads] = cls(threads)
        return _decode_threads[threads]

    @contextmanager
    def step(self) -> Iterator[None]:
        probing = len(self.counts) > 1 and 0 <= self.n - self.probe_at < self.PROBE
        threads = self.counts[self.best == self.counts[0]] if probing else self.best
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        old = self.average[threads]
        self.average[threads] = seconds if old == 0.0 else (1 - self.WEIGHT) * old + self.WEIGHT * seconds
        self.n += 1
        if probing and self.n - self.probe_at == self.PROBE:
            best = min(self.counts, key=lambda count: self.average[count])
            self.every = min(2 * self.every, self.LONGEST) if best == self.best else self.FIRST
            self.best, self.probe_at = best, self.n + self.every


_decode_threads: dict[int, DecodeThreads] = {}


def _linear(weight: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """x -> x @ weight.T + bias (float32 on the CPU in oneDNN: MKL runs a one-row product on one thread)."""
    return functools.partial(dense_linear, weight=weight, bias=bias)


def _projection(linears: list[nn.Module]) -> Callable[[Tensor], Tensor]:
    """x -> the outputs of `linears` side by side: one matmul for plain Linears, one call each for quantized ones."""
    fused = fuse(linears)
    if fused is not None:
        return _linear(*fused)
    if len(linears) == 1:
        return linears[0]
    return lambda x: torch.cat([linear(x) for linear in linears], -1)


def _mlp(block: nn.Module) -> Callable[[Tensor], Tensor]:
    if not hasattr(block, "mlp"):
        return lambda x: block.block_sparse_moe(x)[0]
    gate_up, down = _projection([block.mlp.gate_proj, block.mlp.up_proj]), _projection([block.mlp.down_proj])

    def swiglu(x: Tensor) -> Tensor:
        gate, up = gate_up(x).chunk(2, -1)
        return down(F.silu(gate) * up)

    return swiglu


def _attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
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


def _native_lib():
    """llmctl.kernels when the C++ extension is built and the decode step is not turned off
    (LLMCTL_NATIVE_DECODE=0); else None. LLMCTL_ISA picks the step's kernels as it does qmatmul's."""
    if os.environ.get("LLMCTL_NATIVE_DECODE", "1") == "0":
        return None
    try:
        from llmctl import _C  # noqa: F401
    except ImportError:
        return None
    return kernels


class NativeStep:
    """One token of batch 1 through the whole model in one C++ call (llmctl._C.NativeDecoder).

    A token of a ~100M-parameter model is ~100 matrix-vector products plus norms, RoPE and attention. As torch ops
    each costs a dispatch and a thread-pool wake-up; in C++ the products split over a persistent pool and the rest
    runs on this thread, with float32 activations and the weights read as stored (float or quantized codes). It
    reads and writes the same float32 KV cache as the torch path, so prefill (compute-bound: torch's matmuls) and
    decoding mix freely. `build` returns None for what it does not cover (MoE, other devices, odd layouts).
    """

    def __init__(self, lib, model: Transformer) -> None:
        spec = model.spec
        self.spec, self.model = spec, model
        self.isa = kernels.isa_code(None)  # $LLMCTL_ISA as it was when the step was built
        inner = model.model
        embed = inner.embed_tokens
        embedding = self._matrix(embed) if isinstance(embed, QuantizedEmbedding) else self._dense(embed.weight, None)
        head = embedding if spec.tie_embeddings else self._projection([model.lm_head])[0]
        self.impl = lib.NativeDecoder(
            spec.dim, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.ffn_dim, spec.vocab_size,
            spec.sliding_window or 0, spec.norm_eps, embedding, self._keep(inner.norm.weight), head,
        )  # fmt: skip
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            self.impl.add_layer(
                self._keep(block.input_layernorm.weight), self._projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                self._projection([attn.o_proj]), self._keep(block.post_attention_layernorm.weight),
                self._projection([mlp.gate_proj, mlp.up_proj]), self._projection([mlp.down_proj]),
            )  # fmt: skip
        self.empty = torch.empty(1, spec.n_kv_heads, 1, spec.head_dim)  # what the cache's storage is made like

    @classmethod
    def build(cls, model: Transformer) -> NativeStep | None:
        lib = _native_lib()
        inner = model.model
        if lib is None or inner.embed_tokens.weight.device.type != "cpu" or not all(hasattr(b, "mlp") for b in inner.layers):
            return None
        try:
            return cls(lib, model)
        except (_Unsupported, kernels.KernelArgumentError):
            return None

    def _keep(self, t: Tensor) -> Tensor:
        """t, if the step can read it: a float tensor, contiguous, on the CPU."""
        if t.dtype not in _DTYPE_CODES or not t.is_contiguous() or t.device.type != "cpu":
            raise _Unsupported
        return t

    def _dense(self, weight: Tensor, bias: Tensor | None) -> kernels.DecodeMatrix:
        return kernels.DecodeMatrix(weight, bias)

    def _quantized(self, layer: QuantizedLinear, weight: Tensor, scales: Tensor, biases: Tensor | None, bias: Tensor | None) -> kernels.DecodeMatrix:
        """Outputs of `layer`'s format (its own tensors, or those of layers fused with it)."""
        return kernels.DecodeMatrix(bias=bias, wq=weight, scales=scales, biases=biases, group_size=layer.group_size,
                                    bits=layer.bits, mode=layer.mode)  # fmt: skip

    def _matrix(self, layer: nn.Module) -> tuple:
        if isinstance(layer, QuantizedLinear):
            layer.tile()
            return self._quantized(layer, layer.weight, layer.scales, layer.biases, layer.bias)
        if type(layer) is not nn.Linear:
            raise _Unsupported
        return self._dense(layer.weight, layer.bias)

    def _projection(self, linears: list[nn.Module]) -> list[tuple]:
        fused = fuse(linears)
        if fused is not None:
            return [self._dense(*fused)]
        if len(linears) > 1 and _fuse_quantized(linears):
            tile = all(linear.can_tile() or linear.tiled for linear in linears)  # each part in place: the joint is too
            for linear in linears:
                linear.tile() if tile else linear.untile()
            joint = (_joint_buffer(linears, name) for name in ("weight", "scales", "biases", "bias"))
            return [self._quantized(linears[0], *joint)]
        return [self._matrix(linear) for linear in linears]

    def __call__(self, token: int, cache: list[KVCache]) -> Tensor:
        """Logits (1, 1, V) float32 of `token` at the cache's next position; the cache grows by one."""
        pos = cache[0].offset
        if not cache[0].has_room(pos + 1):  # layers grow in step: one check for all
            for layer in cache:
                layer.reserve(pos + 1, self.empty)
        cos, sin = self.model.rope.table(pos + 1, self.empty)                 # (N, D) float32
        logits = torch.empty(1, 1, self.spec.vocab_size)
        self.impl.step(
            token, pos, [layer.keys for layer in cache], [layer.values for layer in cache], cos[pos], sin[pos], logits,
            threads=torch.get_num_threads(), isa=self.isa,
        )  # fmt: skip
        for layer in cache:
            layer.offset = pos + 1
        return logits


def _fuse_quantized(linears: list[nn.Module]) -> bool:
    """Whether quantized layers that read the same x can run as one product (same format, all with a bias or none);
    if so their codes, scales, biases and bias become row views of joint tensors (`_joint_buffer` finds them)."""
    if not all(type(linear) is QuantizedLinear for linear in linears):
        return False
    first = linears[0]
    formats = {
        (l.in_features, l.group_size, l.bits, l.mode, l.scales.dtype, l.weight.device, l.biases is None, l.bias is None)
        for l in linears
    }  # fmt: skip
    if len(formats) > 1 or first.weight.device.type != "cpu":
        return False
    for name in ("weight", "scales", "biases", "bias"):
        if getattr(first, name) is not None and _joint_buffer(linears, name) is None:
            parts = [getattr(linear, name).detach() for linear in linears]
            with torch.inference_mode(False), torch.no_grad():  # tensors made under inference_mode could not be trained
                if parts[0].dtype == torch.uint32:  # cat has no uint32 kernel: the same bits as int32
                    joint = torch.cat([p.view(torch.int32) for p in parts]).view(torch.uint32)
                else:
                    joint = torch.cat(parts)
            for linear, view in zip(linears, joint.split([len(p) for p in parts])):
                if name == "bias":
                    linear.bias.data = view
                else:
                    linear._buffers[name] = view
    return True


def _joint_buffer(linears: list[nn.Module], name: str) -> Tensor | None:
    parts = [getattr(linear, name) for linear in linears]
    return None if parts[0] is None else _joint(parts)


class _Unsupported(Exception):
    """A layer NativeStep does not cover: the torch path runs the model."""


class Decoder:
    """The Transformer's forward for inference: fused projections and no module calls, so a token costs its matmuls.

    It computes what `Transformer.forward` does (that one is the reference, and what training runs); the greedy
    parity tests hold the two together. Build it with `decoder_for`, which notices when the weights change.
    """

    def __init__(self, model: Transformer) -> None:
        spec = model.spec
        self.spec, self.model = spec, model
        norm = model.model.norm.weight  # in the activations' dtype, quantized models included
        self.low_precision = norm.dtype in (torch.bfloat16, torch.float16)
        # Attention and its cache in float32 on the CPU: its bf16/fp16 products of a few rows are 3x slower there.
        self.attention_dtype = torch.float32 if norm.device.type == "cpu" else norm.dtype
        self.layers = []
        for block in model.model.layers:
            attn = block.self_attn
            self.layers.append((
                block.input_layernorm.weight, _projection([attn.q_proj, attn.k_proj, attn.v_proj]), _projection([attn.o_proj]),
                block.post_attention_layernorm.weight, _mlp(block),
            ))  # fmt: skip
        self.embed = embed = model.model.embed_tokens
        self.final_norm = model.model.norm.weight
        if not spec.tie_embeddings:
            self.head = _projection([model.lm_head])
        else:  # a quantized embedding runs the tied head through its own kernel
            self.head = embed.as_linear if hasattr(embed, "as_linear") else _linear(embed.weight, None)
        self.cos = self.sin = torch.empty(0)
        # the C++ step for one token of batch 1 on the CPU, where per-op overhead would dominate
        self.native = NativeStep.build(model) if self.attention_dtype == torch.float32 else None
        self.signature = self._signature()

    def _signature(self) -> tuple:
        tensors = tuple((t.data_ptr(), t.dtype) for t in (*self.model.parameters(), *self.model.buffers()))
        return tensors, tuple(m for m in self.model.modules() if getattr(m, "tiled", False))

    def stale(self) -> bool:
        """Whether the model's weights were replaced since (cast, reloaded, quantized, ...)."""
        return self.signature != self._signature()

    def rope(self, offset: int, T: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of positions offset.., (T, 1, D); sin's first half negated, so that rotating half is a roll."""
        if len(self.cos) < offset + T or self.cos.dtype != like.dtype:
            cos, sin = self.model.rope.table(max(offset + T, 2 * len(self.cos)), like)   # (N, D)
            half = sin.shape[-1] // 2
            self.cos, self.sin = cos[:, None], torch.cat([-sin[:, :half], sin[:, half:]], -1)[:, None]
        return self.cos[offset : offset + T], self.sin[offset : offset + T]

    def __call__(self, tokens: Tensor, cache: list[KVCache], key_mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) with `last_only`; `cache` is extended, `key_mask` as in the model."""
        B, T = tokens.shape
        if self.native is not None and B * T == 1 and key_mask is None and cache[0].offset < self.spec.max_seq_len:
            return self.native(int(tokens), cache)
        with self.matmuls(B * T):
            x = self.forward(tokens, cache, key_mask, last_only)
        with self.matmuls(x.shape[0] * x.shape[1]):
            return self.head(F.rms_norm(x, (self.spec.dim,), self.final_norm, self.spec.norm_eps))

    @contextmanager
    def matmuls(self, rows: int) -> Iterator[None]:
        """bf16/fp16 products of one row skip oneDNN: it reorders the weight first (a 49 MB copy for a 32000-word
        head) and is slow on a single row, where torch's own kernel streams the weights several times faster."""
        if rows > 1 or not self.low_precision:
            yield
            return
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = onednn

    def forward(self, tokens: Tensor, cache: list[KVCache], key_mask: Tensor | None, last_only: bool = False) -> Tensor:
        """The last layer's output (B, T, dim), or (B, 1, dim) with `last_only`: then the last layer computes the
        keys and values of every position (the cache needs them) but attention, its output projection and the MLP
        for the last position only, a twelfth less work for a 12-layer model's prompt."""
        spec = self.spec
        B, T = tokens.shape
        H, KV, D = spec.n_heads, spec.n_kv_heads, spec.head_dim
        offset = cache[0].offset
        if key_mask is None:
            mask = attention_mask(T, offset, spec.sliding_window, tokens.device)
        else:
            mask = padded_mask(key_mask, T, offset, spec.sliding_window)
        x = self.embed(tokens)                                                  # (B, T, dim)
        dtype = self.attention_dtype
        cos, sin = self.rope(offset, T, x.to(dtype))
        norm = (spec.dim,)
        last = len(self.layers) - 1
        for i, ((ln1, qkv, o, ln2, mlp), layer_cache) in enumerate(zip(self.layers, cache)):
            y = qkv(F.rms_norm(x, norm, ln1, spec.norm_eps)).view(B, T, H + 2 * KV, D)
            qk = y[:, :, : H + KV].to(dtype)
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)            # RoPE on q and k at once, (B, T, H+KV, D)
            k, v = layer_cache.update(qk[:, :, H:].transpose(1, 2), y[:, :, H + KV :].transpose(1, 2).to(dtype))  # (B, KV, S, D)
            q = qk[:, :, :H].transpose(1, 2)                                   # (B, H, T, D)
            if last_only and i == last and T > 1:                              # the last position only from here on
                q, x, T = q[:, :, -1:], x[:, -1:], 1
                mask = None if mask is None else mask[..., -1:, :]             # None: causal, the last query sees all
            if T == 1:
                y = _attend_one(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            x = x + o(y.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))
            x = x + mlp(F.rms_norm(x, norm, ln2, spec.norm_eps))
        return x


def decoder_for(model: Transformer) -> Decoder:
    """The model's Decoder, built once (kept on the model) and again whenever its weights were replaced."""
    decoder = getattr(model, "_decoder", None)
    if decoder is None or decoder.stale():
        decoder = model._decoder = Decoder(model)
    return decoder


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _release_prompt_memory() -> None:
    """Hand the prompt's freed activations back to the system: glibc keeps them for reuse (tens of MB after a long
    prompt), so they would stay resident for the whole conversation; decoding needs only small ones."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def new_cache(model: Transformer) -> PromptCache:
    return PromptCache(make_cache(model.spec))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from float32 logits (B, V): greedy, or temperature then top-k, top-p and min-p filtering."""
    if params.greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
            return torch.from_numpy(logits.numpy().argmax(-1))  # 3 us against torch's 30-55 for a row of 32000 here
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
        decoder = decoder_for(model)
        start = cache.reuse(prompt)
        for i in range(start, len(prompt), PREFILL_CHUNK):
            chunk = prompt[i : i + PREFILL_CHUNK]
            logits = decoder(torch.tensor([chunk], device=device), cache.layers, last_only=True)[:, -1]   # (1, V)
            cache.tokens.extend(chunk)
        if len(prompt) - start > 1:
            _release_prompt_memory()
        generator = _generator(params, device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, model.spec.vocab_size, dtype=torch.bool, device=device)
            seen[0, prompt] = True
        threads = DecodeThreads.now()
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
            with threads.step():
                logits = decoder(token.view(1, 1), cache.layers)[:, -1]
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
        decoder = decoder_for(model)
        for i in range(0, T, PREFILL_CHUNK):
            logits = decoder(tokens[:, i : i + PREFILL_CHUNK], cache, key_mask=key_mask, last_only=True)[:, -1]  # (B, V)
        _release_prompt_memory()
        generator = _generator(params, device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, model.spec.vocab_size, dtype=torch.bool, device=device)
            rows = torch.arange(B, device=device)[:, None].expand(B, T)
            seen[rows[key_mask[:, :T]], tokens[key_mask[:, :T]]] = True
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * B
        threads = DecodeThreads.now()
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
            with threads.step():
                logits = decoder(token.view(B, 1), cache, key_mask=key_mask)[:, -1]
        return out


def greedy(model: Transformer, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
    return list(generate_step(model, prompt, SamplingParams(max_tokens=max_new_tokens, stop_ids=frozenset(stop_ids))))
