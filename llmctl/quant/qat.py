"""Quantization-aware training: each quantized linear computes with its weights on the affine grid in the forward
pass; straight-through gradients reach the float weights, and each group's scale and bias are learned (LSQ+,
Bhalgat et al. 2020) relative to round-to-nearest's: Adam moves every parameter by about the learning rate per step,
which is a small change of a weight but would be most of a 4-bit step. Runs on the training engine; the result is
written as `llmctl quantize` writes RTN."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmctl import kernels
from llmctl.backends.torch.model import Transformer
from llmctl.quant.layers import Triple

class FakeQuantLinear(nn.Module):
    """A Linear whose weight is rounded to `bits` in groups of `group_size` inputs on every forward pass."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.bits, self.group_size, self.in_features, self.out_features = bits, group_size, linear.in_features, linear.out_features
        _, scales, biases = kernels.quantize(linear.weight.detach().float().contiguous(), group_size, bits)  # RTN's grid
        self.register_buffer("rtn_scales", scales.float(), persistent=False)
        self.register_buffer("rtn_biases", biases.float(), persistent=False)
        self.log_scale = nn.Parameter(torch.zeros_like(self.rtn_scales))  # the scale is rtn_scales * exp(log_scale)
        self.shift = nn.Parameter(torch.zeros_like(self.rtn_biases))  # the bias is rtn_biases + rtn_scales * shift

    def _codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Codes (out, in / g, g) as floats with a straight-through round, and the scales and biases (out, in / g, 1).
        MLX's scales are negative where a group's largest magnitude is its maximum: codes count down from it."""
        s = (self.rtn_scales * self.log_scale.exp())[..., None]
        b = (self.rtn_biases + self.rtn_scales * self.shift)[..., None]
        w = self.weight.view(self.out_features, -1, self.group_size)
        x = ((w - b) / s).clamp(0, 2**self.bits - 1)  # the C++ rounding: clamp, then round half to even
        return x + (x.round() - x).detach(), s, b

    def quantized_weight(self) -> Tensor:
        q, s, b = self._codes()
        return (q * s + b).view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def triple(self) -> Triple:
        """MLX's layout of what the layer computes: packed codes, scales and biases (out, in / g)."""
        q, s, b = self._codes()
        codes = q.round().to(torch.uint8).view(self.out_features, self.in_features)
        return kernels.pack(codes, self.bits), s[..., 0].clone(), b[..., 0].clone()


def wrap_linears(model: Transformer, layers: Mapping[str, Any]) -> None:
    """Replace each Linear named in `layers` (module path -> QuantParams) by its FakeQuantLinear, in place."""
    for path, params in layers.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        module = getattr(parent, name)
        if type(module) is nn.Linear:
            setattr(parent, name, FakeQuantLinear(module, params.bits, params.group_size))


def train_qat(model_path: Path, layers: Mapping[str, Any], cfg: Any, run_path: Path) -> Transformer:
    """Train the model at `model_path` with the Linears of `layers` fake-quantized, on `cfg.data` with `cfg.optim` and
    `cfg.train` (llmctl.training's groups); the trained model. `run_path` becomes a run folder (metrics.jsonl).
    The loss (cfg.quant.qat_loss): kl, the divergence to the float model's own next-token distribution on the text
    (LLM-QAT's self-distillation: the quantized model learns to predict as the float one does, not the text, so a
    small training text is not overfit: on stories260K at 4 bits the next-token loss took perplexity from RTN's 4.71
    to 7.71 on held-out stories, 100 steps over 4.6K tokens); or ce, the next-token loss on the text."""
    from llmctl.backends.torch.engine import Engine
    from llmctl.backends.torch.objectives import Distill, NextToken
    from llmctl.config import to_yaml
    from llmctl.data.text import TokenData, expand_sources, split, tokenize_files
    from llmctl.io.model_folder import load_tokenizer
    from llmctl.pretrain import TextBatches
    from llmctl.run import RunFolder
    from llmctl.training import loop
    from llmctl.training.loop import Job

    tokenizer = load_tokenizer(model_path)
    tokens = tokenize_files(expand_sources(cfg.data.train, "--data"), tokenizer, "--data")
    if cfg.data.val:
        data = TokenData(tokens, tokenize_files(expand_sources(cfg.data.val, "data.val"), tokenizer, "data.val"), cfg.data.seq_len)
    else:
        data = split(tokens, cfg.data.val_fraction, cfg.data.seq_len)
    engine = Engine(cfg.train, cfg.optim)
    engine.load(model_path, prepare=lambda model: wrap_linears(model, layers))
    objective = Distill(engine.load_frozen(model_path)) if cfg.quant.qat_loss == "kl" else NextToken()
    run = RunFolder(run_path, inputs=[model_path, *cfg.data.train, *cfg.data.val])
    job = Job(
        loop=cfg.train, optim=cfg.optim, run=run, source=TextBatches(data, cfg.data.batch_size, cfg.train.seed, cfg.train.eval_batches),
        objective=objective, resume_key={}, config_text=to_yaml(cfg), tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        export=lambda: None,  # the quantized folder is written by `llmctl quantize` from the model itself
    )  # fmt: skip
    try:
        loop.run(engine, job)
    finally:
        engine.close()
    shutil.rmtree(run.checkpoints, ignore_errors=True)  # a QAT run is not resumed: its checkpoints go
    return engine.model.eval()


def export_qat(model: Transformer) -> tuple[dict[str, Triple], dict[str, Tensor]]:
    """The MLX-layout triple of every fake-quantized layer, and every other (float) parameter as trained."""
    triples = {path: m.triple() for path, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    quantized = {f"{path}.{name}" for path in triples for name in ("weight", "log_scale", "shift")}
    floats = {name: t.detach() for name, t in model.state_dict().items() if name not in quantized}
    if model.spec.tie_embeddings:
        floats.pop("lm_head.weight", None)
    return triples, floats
