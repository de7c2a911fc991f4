"""The MLX backend's face: load, create and save models, and run them on token lists (numpy out)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from llmctl.backends.mlx.generate import BatchDecoder, Generator
from llmctl.backends.mlx.model import DTYPE_NAMES, Transformer, prepare_inference
from llmctl.backends.mlx.quant import prepare_quantized
from llmctl.generation import PromptCache, SamplingParams
from llmctl.io.model_folder import read_model, write_model
from llmctl.io.safetensors import from_mlx, to_mlx
from llmctl.spec import ModelSpec

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}


class Model:
    """A Transformer in eval mode plus where it came from, and the Generator that runs it (its own, so that models
    side by side share nothing)."""

    def __init__(self, module: Transformer, source: Path | None = None, quantization: dict | None = None) -> None:
        self.module = module
        self.module.eval()
        self.spec = module.spec
        self.source = source
        self.quantization = quantization  # config.json's entry for the quantized layers, None: float
        self.generator = Generator(module)

    def logits(self, tokens: list[list[int]]) -> np.ndarray:
        """Float32 logits (B, T, V) of equal-length token rows."""
        out = self.module(mx.array(tokens, dtype=mx.int32)).astype(mx.float32)
        return np.array(out)

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
        """Batched decoding of a changing set of sequences (see BatchDecoder); one per serving thread. `per_row` is
        the torch backend's choice; MLX always runs one batched forward."""
        return BatchDecoder(self.generator)

    def save(self, out: Path, max_shard_bytes: int | None = None) -> Path:
        params = dict(tree_flatten(self.module.parameters()))
        tensors = {k: from_mlx(v) for k, v in params.items()}
        dtype = DTYPE_NAMES.get(params["model.embed_tokens.weight"].dtype, "float32")
        return write_model(out, self.spec, tensors, self.source, dtype, max_shard_bytes,
                           quantization=self.quantization)


class Runtime:
    name = "mlx"

    def init(self, spec: ModelSpec, seed: int = 0, dtype: str = "float32") -> Model:
        module = Transformer(spec)
        module.init_weights(seed)
        module.set_dtype(DTYPES[dtype])
        prepare_inference(module)
        return Model(module)

    def load(self, name: str | Path, dtype: str | None = "float32") -> Model:
        folder = read_model(name)
        module = Transformer(folder.spec)
        stored = prepare_quantized(module, folder, DTYPES[dtype] if dtype else None)  # quantized layers keep their codes, scales and biases
        weights = [(k, to_mlx(t)) for k, t in folder.tensors.items()]
        if dtype is not None:
            weights = [(k, v if k in stored else v.astype(DTYPES[dtype])) for k, v in weights]
        module.load_weights(weights, strict=True)
        mx.eval(module.parameters())
        prepare_inference(module)
        return Model(module, folder.path, folder.quantization)
