"""The torch backend's face: load, create and save models, and run them on token lists (numpy out)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from llmctl.backends.torch.generate import BatchDecoder, Generator
from llmctl.backends.torch.model import Rope, Transformer, prepare_inference
from llmctl.backends.torch.quant import prepare_quantized
from llmctl.generation import PromptCache, SamplingParams
from llmctl.io.model_folder import read_model, write_model
from llmctl.io.safetensors import from_torch, to_torch
from llmctl.spec import ModelSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class _SkipInit(TorchFunctionMode):
    """Skips modules' random default init while a skeleton is built on the meta device (every tensor is loaded
    right after): the meta `normal_` of nn.Embedding alone imports torch._dynamo, 1.3 s and 70 MB."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


class Model:
    """A Transformer in eval mode plus where it came from, and the Generator that runs it (its own, so that models
    side by side share nothing)."""

    def __init__(self, module: Transformer, source: Path | None = None, quantization: dict | None = None) -> None:
        self.module = module.eval()
        self.spec = module.spec
        self.source = source
        self.quantization = quantization  # config.json's entry for the quantized layers, None: float
        self._generator: Generator | None = None

    @property
    def generator(self) -> Generator:
        """Built on first use, and again whenever the module's weights were replaced (cast, reloaded, quantized)."""
        if self._generator is None or self._generator.stale():
            self._generator = Generator(self.module)
        return self._generator

    @torch.no_grad()
    def logits(self, tokens: list[list[int]]) -> np.ndarray:
        """Float32 logits (B, T, V) of equal-length token rows."""
        return self.module(torch.tensor(tokens, dtype=torch.long)).float().numpy()

    def greedy(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        return self.generator.greedy(prompt, max_new_tokens, stop_ids)

    def generate(self, prompt: list[int], params: SamplingParams, cache: PromptCache | None = None) -> Iterator[int]:
        """New ids one by one (see Generator.generate_step); `cache` from `new_cache()` reuses a shared prefix."""
        return self.generator.generate_step(prompt, params, cache)

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return self.generator.generate_batch(prompts, params)

    def new_cache(self) -> PromptCache:
        return self.generator.new_cache()

    def batch_decoder(self, per_row: bool | None = None) -> BatchDecoder:
        """Batched decoding of a changing set of sequences (see BatchDecoder); one per serving thread. `per_row`:
        each sequence through the C++ step (None: for small models on the CPU)."""
        return BatchDecoder(self.generator, per_row)

    def save(self, out: Path, max_shard_bytes: int | None = None) -> Path:
        dtype = next(self.module.parameters()).dtype
        tensors = {k: from_torch(v) for k, v in self.module.state_dict().items() if k != "lm_head.weight" or not self.spec.tie_embeddings}
        return write_model(out, self.spec, tensors, self.source, str(dtype).removeprefix("torch."), max_shard_bytes,
                           quantization=self.quantization)


class Runtime:
    name = "torch"

    def init(self, spec: ModelSpec, seed: int = 0, dtype: str = "float32") -> Model:
        module = Transformer(spec)
        module.init_weights(seed)
        module = module.to(DTYPES[dtype])
        prepare_inference(module)
        return Model(module)

    def load(self, name: str | Path, dtype: str | None = "float32") -> Model:
        folder = read_model(name)
        with torch.device("meta"), _SkipInit():
            module = Transformer(folder.spec)
            stored = prepare_quantized(module, folder, DTYPES[dtype] if dtype else None)  # quantized layers keep their codes, scales and biases
        state = {k: to_torch(t) for k, t in folder.tensors.items()}
        if dtype is not None:
            state = {k: v if k in stored else v.to(DTYPES[dtype]) for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.rope = Rope(folder.spec)  # buffers built on the meta device hold no data
        # Tensors still backed by the file's mapping are copied out, so the model is not changed by a later write
        # to the file and the mapping closes: its pages, read once for fused tensors, no longer count as resident.
        mapped = {raw.data.ctypes.data for raw in folder.tensors.values()}
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() in mapped:
                tensor.data = tensor.data.clone()
        prepare_inference(module)  # after the copies: tiling rearranges tensors in place
        return Model(module, folder.path, folder.quantization)
