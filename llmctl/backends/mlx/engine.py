"""The MLX backend's training engine: build or load the model (parts frozen, quantized or not), run micro-steps
(mx.compile'd when asked), step AdamW/Lion, average over mlx.launch processes, save and load checkpoints, export."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from llmctl import ui
from llmctl.backends.mlx.model import DTYPE_NAMES, Transformer
from llmctl.backends.mlx.objectives import DeviceBatch
from llmctl.errors import ConfigError
from llmctl.io.model_folder import write_model
from llmctl.io.safetensors import from_mlx, load_folder_tensors, read_safetensors, to_mlx, write_safetensors
from llmctl.spec import ModelSpec
from llmctl.training.batch import Batch
from llmctl.training.config import LoopConfig, OptimConfig
from llmctl.training.loop import Objective, evaluate_sums


def setup_distributed() -> tuple[int, int, mx.Device]:
    """Rank, world size and device; joins the group when launched by mlx.launch (a group of one otherwise)."""
    group = mx.distributed.init()
    return group.rank(), group.size(), mx.default_device()


def fast_bf16(device: mx.Device) -> bool:
    # Apple silicon (and CUDA) GPUs run bf16 natively; MLX's CPU build emulates it, slower than fp32.
    return device.type == mx.DeviceType.gpu


def autocast_dtype(name: str, device: mx.Device) -> mx.Dtype | None:
    """The parameter dtype for train.dtype (None: plain fp32); the loss is taken in fp32 either way."""
    if name == "fp16":
        raise ConfigError(
            "train.dtype=fp16: the MLX backend trains in fp32 or bf16 (fp16 weights need loss scaling, which it does not do).",
            hint="Use train.dtype=bf16, or train.dtype=auto.",
        )
    if name == "auto":
        return mx.bfloat16 if fast_bf16(device) else None
    return {"fp32": None, "bf16": mx.bfloat16}[name]


def matmul_peak(device: mx.Device, dtype: mx.Dtype) -> float:
    """Measured FLOP/s of a square matmul on this device, the denominator of MFU."""
    n = 1024 if device.type == mx.DeviceType.gpu else 512  # the CPU build takes ~0.3 s per 1024^3 product
    a, b = mx.random.normal((n, n)).astype(dtype), mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_optimizer(model: nn.Module, optim_cfg: Any) -> optim.MultiOptimizer:
    """Weight decay on matrices and embeddings only, never on norms and biases."""
    betas = [optim_cfg.beta1, optim_cfg.beta2]
    if optim_cfg.name.value == "lion":
        make = functools.partial(optim.Lion, learning_rate=optim_cfg.lr, betas=betas)
    else:
        # bias_correction: the same update as torch.optim.AdamW.
        make = functools.partial(optim.AdamW, learning_rate=optim_cfg.lr, betas=betas, eps=optim_cfg.eps, bias_correction=True)
    opt = optim.MultiOptimizer([make(weight_decay=optim_cfg.weight_decay), make(weight_decay=0.0)], [lambda name, p: p.ndim >= 2])
    # The state must exist before mx.compile captures it.
    opt.init(model.trainable_parameters())
    return opt


def _checkpointed(layer: nn.Module) -> None:
    """Make this block recompute its activations in the backward pass instead of storing them."""
    block = type(layer)

    def call(self: nn.Module, x: mx.array, *args: Any) -> Any:
        def inner(params: dict, x: mx.array) -> Any:
            self.update(params)
            return block.__call__(self, x, *args)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    # A subclass per instance: patching Block itself would change every model in the process.
    layer.__class__ = type(f"Checkpointed{block.__name__}", (block,), {"__call__": call})


def load_module(folder_or_name: str | Path, dtype: str | None = "float32") -> Transformer:
    """A model folder as a Transformer, quantized layers kept quantized (see runtime.Runtime.load)."""
    from llmctl.backends.mlx.runtime import Runtime

    return Runtime().load(folder_or_name, dtype).module


class Engine:
    """One model being trained (and any frozen ones beside it) on this process's device."""

    def __init__(self, loop: LoopConfig, optim: OptimConfig, strategy: str = "ddp") -> None:
        self.rank, self.world, self.device = setup_distributed()
        self.loop, self.optim, self.strategy = loop, optim, strategy
        self.amp = autocast_dtype(loop.dtype.value, self.device)  # refuses fp16 before anything is written
        if self.world > 1 and strategy == "fsdp":
            raise ConfigError("--strategy fsdp is torch-only; under mlx.launch every process holds the whole model.", hint="Use --strategy ddp.")
        self.peak_flops = 0.0
        self.grads: dict | None = None
        self._steps: dict[int, Callable] = {}

    def barrier(self, failed: bool = False) -> bool:
        """Wait for every process; True when any of them arrived failing."""
        if self.world == 1:
            return failed
        return mx.distributed.all_sum(mx.array(int(failed))).item() > 0

    def close(self) -> None:
        return None

    def build(self, spec: ModelSpec, init_from: Path | None = None) -> None:
        """A new model of `spec` (seeded), or continued from the float weights of `init_from`; every parameter trains."""
        mx.random.seed(self.loop.seed)
        model = Transformer(spec)
        if init_from is not None:
            from llmctl.io.model_folder import read_model

            folder = read_model(init_from)
            model.load_weights([(k, to_mlx(t).astype(mx.float32)) for k, t in folder.tensors.items()], strict=True)
        else:
            model.init_weights(self.loop.seed)
        if self.amp is not None:
            model.set_dtype(self.amp)
        self._attach(model)

    def load(self, folder: str | Path, trainable: Callable[[str], bool] | None = None,
             prepare: Callable[[Transformer], Any] | None = None) -> None:
        """A model folder (float, affine-quantized or NF4) with the parameters `trainable(name)` picks trained and the
        rest frozen (None: every float parameter); quantized layers stay frozen, and gradients pass through them.
        `prepare(model)` changes the loaded model first (e.g. wraps layers in adapters), seeded like the rest."""
        mx.random.seed(self.loop.seed)
        model = load_module(folder, "float32")
        if prepare is not None:
            prepare(model)
        if trainable is not None:
            chosen = [name for name, _ in tree_flatten(model.trainable_parameters()) if trainable(name)]
            model.freeze()
            for name in chosen:
                path, _, leaf = name.rpartition(".")
                owner = model
                for part in path.split("."):
                    owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
                owner.unfreeze(keys=[leaf], recurse=False)
        model.train()
        self._attach(model)

    def load_frozen(self, folder: str | Path, dtype: str = "float32") -> Transformer:
        """A second model (a reference or a teacher), frozen and in eval mode."""
        model = load_module(folder, dtype)
        model.freeze()
        model.eval()
        return model

    def _attach(self, model: Transformer) -> None:
        mx.eval(model.parameters())
        self.model = self.net = model
        self.spec = model.spec
        self.trainable = {name for name, _ in tree_flatten(model.trainable_parameters())}
        everything = tree_flatten(model.parameters())
        # Checkpoints of a partly frozen model hold only what trains; a fully trained one is a whole model folder.
        self.partial = len(self.trainable) < len(everything) or any(v.dtype == mx.uint32 for _, v in everything)
        if self.loop.grad_checkpointing:
            for layer in model.model.layers:
                _checkpointed(layer)
        self.opt = make_optimizer(model, self.optim)
        self._update = self._update_function()
        self.peak_flops = matmul_peak(self.device, self.amp or mx.float32)

    def set_train(self, on: bool) -> None:
        self.net.train(on)

    def _micro_function(self, objective: Objective) -> Callable:
        model = self.net

        def loss(arrays: dict, scale: mx.array) -> tuple[mx.array, dict]:
            value, metrics = objective(model, DeviceBatch(**arrays))
            return value * scale, metrics

        loss_and_grad = nn.value_and_grad(model, loss)

        def micro(arrays: dict, scale: mx.array) -> tuple[dict, dict]:
            (_, metrics), grads = loss_and_grad(arrays, scale)
            return metrics, grads

        if not self.loop.compile:
            return micro
        # The parameters are implicit inputs and outputs of the compiled graph (value_and_grad swaps the model's
        # parameters for its own while tracing, so it must hand them back).
        # The random state too: dropout draws a new mask at each step.
        return mx.compile(micro, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])

    def _update_function(self) -> Callable:
        model, opt = self.net, self.opt

        def update(grads: dict, max_norm: mx.array) -> mx.array:
            grads, norm = optim.clip_grad_norm(grads, max_norm)
            opt.update(model, grads)
            return norm

        if not self.loop.compile:
            return update
        state = [model.state, opt.state]
        return mx.compile(update, inputs=state, outputs=state)

    def micro_step(self, objective: Objective, batch: Batch, scale: float, last: bool) -> dict[str, Any]:
        step = self._steps.get(id(objective))
        if step is None:
            step = self._steps[id(objective)] = self._micro_function(objective)
        db = DeviceBatch.of(batch)
        arrays = {k: v for k, v in vars(db).items()}
        # mlx.launch averages gradients over processes; the step's loss is their sum over its units.
        metrics, grads = step(arrays, mx.array(scale * self.world, mx.float32))
        self.grads = grads if self.grads is None else tree_map(mx.add, self.grads, grads)
        mx.eval(self.grads, metrics)  # one micro-batch's activations alive at a time
        return metrics

    def all_sum(self, values: dict[str, Any]) -> dict[str, float]:
        flat = mx.array([float(v.item()) if isinstance(v, mx.array) else float(v) for v in values.values()], mx.float32)
        if self.world > 1:
            flat = mx.distributed.all_sum(flat)
        return dict(zip(values, flat.tolist()))

    def optimizer_step(self, lr: float, max_norm: float) -> float:
        self.opt.learning_rate = lr
        grads = nn.utils.average_gradients(self.grads) if self.world > 1 else self.grads
        norm = self._update(grads, max_norm)
        mx.eval(norm, self.net.parameters(), self.opt.state)
        self.grads = None
        return norm.item()

    def zero_grad(self) -> None:
        self.grads = None

    def evaluate(self, objective: Objective, batches: Iterable[Batch]) -> dict[str, float]:
        return evaluate_sums(lambda batch: objective(self.net, DeviceBatch.of(batch))[1], batches, objective.units)

    def _state_dicts(self) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        """Parameters by name, and optimizer state as `<param name>::<key>` (m, v, step), as the torch backend writes it."""
        optim_sd = {}
        for part in self.opt.optimizers:
            for key, value in tree_flatten(part.state):
                name, _, field = key.rpartition(".")
                if name:  # per-parameter state; "step" and "learning_rate" alone are the optimizer's own
                    optim_sd[f"{name}::{field}"] = value
                    optim_sd[f"{name}::step"] = part.state["step"]
        params = dict(tree_flatten(self.net.parameters()))
        if self.partial:
            params = {k: v for k, v in params.items() if k in self.trainable}
        return params, optim_sd

    def snapshot(self) -> Any:
        return self._state_dicts() if ui.is_main_process() else None

    def _write_model(self, folder: Path, params: dict[str, mx.array], name: str) -> None:
        tensors = {k: from_mlx(v) for k, v in params.items()}
        if self.partial:
            folder.mkdir(parents=True, exist_ok=True)
            write_safetensors(folder / name, tensors)
        else:
            write_model(folder, self.spec, tensors, dtype=DTYPE_NAMES[params["model.embed_tokens.weight"].dtype])

    def write_checkpoint(self, folder: Path, snapshot: Any) -> dict[str, Any]:
        params, optim_sd = snapshot
        self._write_model(folder if self.partial else folder / "model", params, "trainable.safetensors")
        write_safetensors(folder / "optimizer.safetensors", {k: from_mlx(v) for k, v in optim_sd.items()})
        # no RNG state (MLX cannot set its key back): only dropout (lora.dropout > 0) draws numbers after initialisation,
        # and its masks after a resume differ from an uninterrupted run's
        return {}

    def load_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        if (folder / "trainable.safetensors").is_file():
            weights = read_safetensors(folder / "trainable.safetensors")
        else:
            weights = load_folder_tensors(folder / "model")
        self.net.load_weights([(k, to_mlx(t)) for k, t in weights.items()], strict=not self.partial)
        saved = read_safetensors(folder / "optimizer.safetensors")

        def restore(key: str, value: mx.array) -> mx.array:
            name, _, field = key.rpartition(".")
            return to_mlx(saved[f"{name}::{field}"]) if name else value

        for part in self.opt.optimizers:
            named = [key.rpartition(".")[0] for key, _ in tree_flatten(part.state) if "." in key]
            if not named:
                continue
            part.state = tree_map_with_path(restore, part.state)
            part.state["step"] = to_mlx(saved[f"{named[0]}::step"])
        self.opt.init(self.net.trainable_parameters())  # marks the restored state as initialised
        mx.eval(self.net.parameters(), self.opt.state)

    def export(self, folder: Path) -> None:
        """The trained model as a model folder (a partly frozen one: its trained tensors only)."""
        if ui.is_main_process():
            self._write_model(folder, self._state_dicts()[0], "trainable.safetensors")
