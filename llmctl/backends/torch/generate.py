"""Token generation on the torch backend: chunked prefill, then one token at a time through the KV cache."""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from llmctl import kernels
from llmctl.backends.torch.model import Fused, KVCache, Transformer, make_cache
from llmctl.backends.torch.quant import _DTYPE_CODES, QuantizedEmbedding, QuantizedLinear
from llmctl.errors import LlmctlError
from llmctl.generation import PREFILL_CHUNK, BatchSlot, PromptCache, SamplingParams, best_prefix


SMALL_MODEL = 8_000_000  # matmul parameters below which decoding runs on one thread


class DecodeThreads:
    """How many threads decode the next token: all of torch's or one, whichever is faster at the moment.

    A token is ~100 small parallel products. On an idle machine more threads read the weights faster; on a busy one
    each product waits for its second thread to be scheduled, and one thread alone can be several times faster.
    So each count's time per token is kept as a moving average, now and then `PROBE` tokens run with the count not
    in use, and the faster count on average is used; the longer it stays the same, the rarer the probes.
    Used as `with threads.step() as n: ...` around each token's forward, which runs on n threads. Each generation
    object has its own: nothing is set process-wide (torch's thread count stays as it is).
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

    @contextmanager
    def step(self) -> Iterator[int]:
        probing = len(self.counts) > 1 and 0 <= self.n - self.probe_at < self.PROBE
        threads = self.counts[self.best == self.counts[0]] if probing else self.best
        start = time.perf_counter()
        yield threads
        seconds = time.perf_counter() - start
        old = self.average[threads]
        self.average[threads] = seconds if old == 0.0 else (1 - self.WEIGHT) * old + self.WEIGHT * seconds
        self.n += 1
        if probing and self.n - self.probe_at == self.PROBE:
            best = min(self.counts, key=lambda count: self.average[count])
            self.every = min(2 * self.every, self.LONGEST) if best == self.best else self.FIRST
            self.best, self.probe_at = best, self.n + self.every


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
    """One token of batch 1 through the whole model in one C++ call (kernels.NativeDecoder, llmctl._C's step).

    A token of a ~100M-parameter model is ~100 matrix-vector products plus norms, RoPE and attention. As torch ops
    each costs a dispatch and a thread-pool wake-up; in C++ the products split over a persistent pool and the rest
    runs on this thread, with float32 activations and the weights read as stored (float or quantized codes). It
    reads and writes the same float32 KV cache as the torch path, so prefill (compute-bound: torch's matmuls) and
    decoding mix freely. `build` returns None for what it does not cover (MoE, other devices, odd layouts).
    LLMCTL_ISA (as it was when the step was built) picks its kernels, as it picks qmatmul's.
    """

    def __init__(self, lib, model: Transformer) -> None:
        spec = model.spec
        self.spec, self.model = spec, model
        self.isa = kernels.isa_code(None)
        inner = model.model
        embed = inner.embed_tokens
        embedding = self._matrix(embed) if isinstance(embed, QuantizedEmbedding) else self._dense(embed.weight, None)
        head = embedding if spec.tie_embeddings else self._matrix(model.lm_head)
        self.impl = lib.NativeDecoder(
            spec.dim, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.ffn_dim, spec.vocab_size,
            spec.sliding_window or 0, spec.norm_eps, embedding, self._keep(inner.norm.weight), head,
        )  # fmt: skip
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            self.impl.add_layer(
                self._keep(block.input_layernorm.weight), self._projection([attn.q_proj, attn.k_proj, attn.v_proj], attn.fused_qkv),
                self._projection([attn.o_proj]), self._keep(block.post_attention_layernorm.weight),
                self._projection([mlp.gate_proj, mlp.up_proj], mlp.fused_gate_up), self._projection([mlp.down_proj]),
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
        """t, if the step can read it: a float tensor, contiguous, on the CPU (kernels.NativeDecoder keeps it alive)."""
        if t.dtype not in _DTYPE_CODES or not t.is_contiguous() or t.device.type != "cpu":
            raise _Unsupported
        return t

    def _dense(self, weight: Tensor, bias: Tensor | None) -> kernels.DecodeMatrix:
        return kernels.DecodeMatrix(weight, bias)

    def _quantized(self, layer: QuantizedLinear) -> kernels.DecodeMatrix:
        """The layer's tensors in the layout they have (tiled or MLX's, as `prepare_inference` left them)."""
        return kernels.DecodeMatrix(bias=layer.bias, wq=layer.weight, scales=layer.scales, biases=layer.biases,
                                    group_size=layer.group_size, bits=layer.codes_bits, mode=layer.mode)  # fmt: skip

    def _matrix(self, layer: nn.Module) -> kernels.DecodeMatrix:
        if isinstance(layer, QuantizedLinear):
            return self._quantized(layer)
        if type(layer) is not nn.Linear:
            raise _Unsupported
        return self._dense(layer.weight, layer.bias)

    def _projection(self, linears: list[nn.Module], fused: Fused | None = None) -> list[kernels.DecodeMatrix]:
        """One matrix for layers fused at load (still laid out so), else one each: the step changes nothing."""
        if fused is not None and fused.valid(linears):
            return [self._dense(*fused.layer) if isinstance(fused.layer, tuple) else self._quantized(fused.layer)]
        return [self._matrix(linear) for linear in linears]

    def __call__(self, token: int, cache: list[KVCache], threads: int) -> Tensor:
        """Logits (1, 1, V) float32 of `token` at the cache's next position, on `threads` threads; the cache grows by one."""
        pos = cache[0].offset
        if not cache[0].has_room(pos + 1):  # layers grow in step: one check for all
            for layer in cache:
                layer.reserve(pos + 1, self.empty)
        cos, sin = self.model.rope.table(pos + 1, self.empty)                 # (N, D) float32
        logits = torch.empty(1, 1, self.spec.vocab_size)
        self.impl.step(
            token, pos, [layer.keys for layer in cache], [layer.values for layer in cache], cos[pos], sin[pos], logits,
            threads=threads, isa=self.isa,
        )  # fmt: skip
        for layer in cache:
            layer.offset = pos + 1
        return logits


class _Unsupported(Exception):
    """A layer NativeStep does not cover: the torch path runs the model."""


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


class Generator:
    """Generation with one model: the model's forward for prompts and batches, its C++ decode step for one token of
    batch 1 on the CPU (with its own scratch buffers), and the thread count each token runs on.

    Nothing is kept on the model and nothing process-wide is changed, so models generate side by side in one process
    (a policy and its reference, a teacher and its student, a server's requests); one Generator serves one
    generation at a time. Built again by `Model` when the model's weights are replaced (`stale`).
    """

    def __init__(self, model: Transformer, threads: int | None = None) -> None:
        self.model, self.spec = model, model.spec
        weight = model.model.norm.weight  # in the activations' dtype, quantized models included
        # Attention and its cache in float32 on the CPU: its bf16/fp16 products of a few rows are 3x slower there.
        self.cache_dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
        self.device = weight.device
        # one thread for small models: per token their math takes microseconds, less than waking other threads costs
        threads = threads or torch.get_num_threads()
        self.threads = DecodeThreads(1 if self.spec.matmul_params() < SMALL_MODEL else threads)
        # the C++ step for one token of batch 1 on the CPU, where per-op overhead would dominate
        self.native = NativeStep.build(model) if self.cache_dtype == torch.float32 else None
        self.signature = self._signature()

    def _signature(self) -> tuple:
        tensors = tuple((t.data_ptr(), t.dtype) for t in (*self.model.parameters(), *self.model.buffers()))
        return tensors, tuple(m for m in self.model.modules() if getattr(m, "tiled", False))

    def stale(self) -> bool:
        """Whether the model's weights were replaced since (cast, reloaded, quantized, ...)."""
        return self.signature != self._signature()

    def new_cache(self) -> PromptCache:
        return PromptCache(make_cache(self.spec, self.cache_dtype))

    def forward(self, tokens: Tensor, cache: list[KVCache], key_mask: Tensor | None = None, last_only: bool = False,
                threads: int | None = None) -> Tensor:  # fmt: skip
        """Logits (B, T, V), or (B, 1, V) with `last_only`; `cache` is extended, `key_mask` as in the model."""
        B, T = tokens.shape
        if self.native is not None and B * T == 1 and key_mask is None and cache[0].offset < self.spec.max_seq_len:
            return self.native(int(tokens), cache, threads or self.threads.best)
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

    def _random(self, params: SamplingParams) -> torch.Generator | None:
        if params.greedy or params.seed is None:
            return None
        return torch.Generator(self.device).manual_seed(params.seed)

    @torch.inference_mode()
    def generate_step(self, prompt: list[int], params: SamplingParams, cache: PromptCache | None = None) -> Iterator[int]:
        """Yield new ids one by one; a stop id, when sampled, is yielded last. `cache` keeps what it can of an earlier prompt."""
        budget = self._budget(len(prompt), params)
        cache = cache if cache is not None else self.new_cache()
        start = cache.reuse(prompt)
        for i in range(start, len(prompt), PREFILL_CHUNK):
            chunk = prompt[i : i + PREFILL_CHUNK]
            logits = self.forward(torch.tensor([chunk], device=self.device), cache.layers, last_only=True)[:, -1]   # (1, V)
            cache.tokens.extend(chunk)
        if len(prompt) - start > 1:
            _release_prompt_memory()
        generator = self._random(params)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.spec.vocab_size, dtype=torch.bool, device=self.device)
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
            with self.threads.step() as threads:
                logits = self.forward(token.view(1, 1), cache.layers, threads=threads)[:, -1]
            cache.tokens.append(token_id)

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """New ids for each prompt, decoded together: rows are left-padded and the padding masked out.

        A row ends at its first stop id (kept at its end) or after `max_tokens`; greedy rows equal one-by-one decoding.
        """
        budget = self._budget(max(len(p) for p in prompts), params)
        device = self.device
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(B, T, dtype=torch.long, device=device)
        key_mask = torch.ones(B, T + budget, dtype=torch.bool, device=device)   # False at padding; new tokens fill the tail
        for row, prompt in enumerate(prompts):
            tokens[row, T - len(prompt) :] = torch.tensor(prompt)
            key_mask[row, : T - len(prompt)] = False
        cache = make_cache(self.spec, self.cache_dtype)
        for i in range(0, T, PREFILL_CHUNK):
            logits = self.forward(tokens[:, i : i + PREFILL_CHUNK], cache, key_mask=key_mask, last_only=True)[:, -1]  # (B, V)
        _release_prompt_memory()
        generator = self._random(params)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.spec.vocab_size, dtype=torch.bool, device=device)
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
            logits = self.forward(token.view(B, 1), cache, key_mask=key_mask)[:, -1]
        return out

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Argmax decoding; returns the new ids (a stop id, when hit, is included and ends the run)."""
        return list(self.generate_step(prompt, SamplingParams(max_tokens=max_new_tokens, stop_ids=frozenset(stop_ids))))


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's thread count `n` for the calling thread while inside (OpenMP's count is per thread), then put back."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BatchDecoder:
    """Decode steps over a changing set of sequences (a server's requests), each with its own KV cache.

    `prefill` runs prompts together, each into a cache of its own, and gives their last logits; `step` runs one
    token of each sequence given, all in one forward. The sequences' keys and values are gathered into one joint
    cache, each row left-padded to the longest (the padding masked out, each token at its own RoPE position), and
    kept there while the set stays the same; when a sequence joins or leaves, the joint cache is rebuilt from what
    it holds and the newcomers' own caches. One sequence alone runs as `generate_step` does (the C++ step where it
    applies).
    Prompt caches handed to `prefill` as `reuse` give their shared prefix (a system prompt) without recomputing it.
    Batched steps run on all of torch's threads or one, whichever is faster at the moment (DecodeThreads): on a
    busy machine a step of small products on two threads waits for the second to be scheduled, up to 40x slower
    here. The count is set for the calling thread only (OpenMP's is per thread) and put back after each step.
    Small models (under SMALL_MODEL matmul parameters) on the CPU step each sequence through the C++ step in its own
    cache instead (`per_row`): their step is all per-op overhead, 2.5 ms a token in C++ against ~35 ms for a torch
    forward of 4 rows on this busy machine, while the weights, a few MB, stay in cache for every row.
    Used from one thread at a time.
    """

    def __init__(self, generator: Generator, per_row: bool | None = None) -> None:
        self.g, self.spec = generator, generator.spec
        self.threads = DecodeThreads(max(generator.threads.counts))
        if per_row is None:
            per_row = generator.native is not None and self.spec.matmul_params() < SMALL_MODEL
        self.per_row = per_row and generator.native is not None
        self.members: tuple[int, ...] = ()
        self.joint: list[KVCache] = []

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], reuse: list[PromptCache] = ()) -> list[tuple[BatchSlot, np.ndarray, int]]:
        """For each prompt: a slot holding it, the float32 logits (V,) of its next token, and the prompt tokens reused.

        The prompts run together (a batch of many rows costs far less per token than one short prompt at a time):
        each row holds what its prompt does not reuse, left-padded to the longest of these (padding masked out, each
        token at its own RoPE position), after the prefix it reuses; then each row's keys and values go to a cache
        of its own. A row reuses a cached prefix up to where the batch's new columns begin, so none runs twice.
        """
        for prompt in prompts:
            self.g._budget(len(prompt), SamplingParams())
        found = [best_prefix(reuse, prompt) for prompt in prompts]
        T = max(len(prompt) - n for prompt, (_, n) in zip(prompts, found))   # new columns, the most any row computes
        keep = [max(0, len(prompt) - T) for prompt in prompts]                # reused tokens (at most what was found)
        B, offset = len(prompts), max(keep)
        joint = self._reused(found, keep, offset)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        key_mask = torch.zeros(B, offset + T, dtype=torch.bool)             # True at each row's own tokens
        for row, (prompt, n) in enumerate(zip(prompts, keep)):
            tokens[row, T - len(prompt) + n :] = torch.tensor(prompt[n:])
            positions[row, T - len(prompt) + n :] = torch.arange(n, len(prompt))
            key_mask[row, offset + T - len(prompt) :] = True
        tokens, positions, key_mask = tokens.to(self.g.device), positions.to(self.g.device), key_mask.to(self.g.device)
        with _threads(1 if self.g.threads.counts == (1,) else None):  # small models: as their decoding, one thread
            for i in range(0, T, PREFILL_CHUNK):
                if B == 1:  # no padding: as generate_step runs a prompt
                    logits = self.g.forward(tokens[:, i : i + PREFILL_CHUNK], joint, last_only=True)[:, -1]
                else:
                    logits = self.g.model(tokens[:, i : i + PREFILL_CHUNK], joint, key_mask=key_mask, last_only=True,
                                          positions=positions[:, i : i + PREFILL_CHUNK])[:, -1]  # fmt: skip
        logits = logits.float().cpu().numpy()                                  # (B, V)
        out = []
        for row, (prompt, n) in enumerate(zip(prompts, keep)):
            cache = PromptCache(joint) if B == 1 else self.g.new_cache()
            if B > 1:
                begin = offset + T - len(prompt)
                for dst, src in zip(cache.layers, joint):
                    dst.update(src.keys[row : row + 1, :, begin : offset + T], src.values[row : row + 1, :, begin : offset + T])
            cache.tokens = list(prompt)
            out.append((BatchSlot(cache, len(prompt)), logits[row], n))
        return out

    def _reused(self, found: list[tuple[PromptCache | None, int]], keep: list[int], offset: int) -> list[KVCache]:
        """A cache of one row per prompt holding the first keep[row] keys and values of found[row]'s cache just
        before column `offset`, zeros (masked out) before them."""
        joint = make_cache(self.spec, self.g.cache_dtype)
        if offset == 0:
            return joint
        zeros = torch.zeros(1, self.spec.n_kv_heads, offset, self.spec.head_dim, dtype=self.g.cache_dtype, device=self.g.device)
        for layer, kv in enumerate(joint):
            keys, values = (
                torch.cat([torch.cat([zeros[:, :, : offset - n], getattr(source.layers[layer], name)[:, :, :n]], 2)
                           if n else zeros for (source, _), n in zip(found, keep)])  # fmt: skip
                for name in ("keys", "values")
            )
            kv.update(keys, values)
        return joint

    def _rebuild(self, slots: list[BatchSlot]) -> None:
        old = {member: row for row, member in enumerate(self.members)}
        S = max(slot.length for slot in slots)
        B = len(slots)
        like = torch.empty(B, self.spec.n_kv_heads, 1, self.spec.head_dim, dtype=self.g.cache_dtype, device=self.g.device)
        joint = []
        for layer in range(self.spec.n_layers):
            kv = KVCache(self.g.cache_dtype)
            kv.reserve(S + 1, like)
            for row, slot in enumerate(slots):
                n = slot.length
                if id(slot) in old:
                    src, at = self.joint[layer], old[id(slot)]
                    end = src.offset
                    keys, values = src.keys[at, :, end - n : end], src.values[at, :, end - n : end]
                else:
                    src = slot.cache.layers[layer]
                    keys, values = src.keys[0, :, :n], src.values[0, :, :n]
                kv.keys[row, :, S - n : S] = keys
                kv.values[row, :, S - n : S] = values
            kv.offset = S
            joint.append(kv)
        self.joint, self.members = joint, tuple(id(slot) for slot in slots)

    @torch.inference_mode()
    def step(self, slots: list[BatchSlot], tokens: list[int]) -> np.ndarray:
        """Float32 logits (B, V) after one more token of each slot (in order); each slot grows by one."""
        if self.per_row:
            rows = []
            for slot, token in zip(slots, tokens):
                with self.g.threads.step() as threads:
                    rows.append(self.g.native(token, slot.cache.layers, threads)[0, -1])
                slot.length += 1
            return torch.stack(rows).numpy()
        if tuple(id(slot) for slot in slots) != self.members:
            self._rebuild(slots)
        B = len(slots)
        if B == 1:  # no padding: the single-sequence path
            with self.g.threads.step() as threads:
                logits = self.g.forward(torch.tensor([tokens], device=self.g.device), self.joint, threads=threads)[:, -1]
        else:
            S = self.joint[0].offset
            lengths = torch.tensor([slot.length for slot in slots], device=self.g.device)
            key_mask = torch.arange(S + 1, device=self.g.device)[None, :] >= (S - lengths)[:, None]   # (B, S + 1)
            with self.threads.step() as threads, _threads(threads):
                logits = self.g.model(torch.tensor(tokens, device=self.g.device).view(B, 1), self.joint, key_mask=key_mask,
                                      positions=lengths[:, None])[:, -1]  # fmt: skip
        for slot in slots:
            slot.length += 1
        return logits.float().cpu().numpy()

    def release(self) -> None:
        """Drop the joint cache (no sequence is decoding)."""
        self.members, self.joint = (), []
