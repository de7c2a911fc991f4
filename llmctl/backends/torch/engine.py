"""The torch backend's training engine: build or load the model (parts frozen, quantized or not), wrap it for
DDP/FSDP2, run micro-steps under autocast, step AdamW/Lion, all-reduce, save and load checkpoints, export."""

from __future__ import annotations

import base64
import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from llmctl import ui
from llmctl.backends.torch.model import Transformer
from llmctl.backends.torch.objectives import DeviceBatch
from llmctl.io.model_folder import write_model
from llmctl.io.safetensors import from_torch, load_folder_tensors, read_safetensors, to_torch, write_safetensors
from llmctl.spec import ModelSpec
from llmctl.training.batch import Batch
from llmctl.training.config import LoopConfig, OptimConfig
from llmctl.training.loop import Objective, evaluate_sums


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m.mul(beta1).add(p.grad, alpha=1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def setup_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.dtype (None: plain fp32)."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a square matmul on this device, the denominator of MFU."""
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(4):
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_optimizer(params: list[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices and embeddings only, never on norms and biases."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    betas = (optim.beta1, optim.beta2)
    if optim.name.value == "lion":
        return Lion(groups, lr=optim.lr, betas=betas)
    # The fused kernel (one pass over each tensor for the whole update) where it exists; sharded DTensors take foreach.
    sharded = any(type(p) is not torch.Tensor and type(p) is not torch.nn.Parameter for p in decay + rest)
    fused = not sharded and all(p.device.type in ("cpu", "cuda") for p in decay + rest)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, foreach=not fused, fused=fused or None)


def load_module(folder_or_name: str | Path, dtype: str | None = "float32") -> Transformer:
    """A model folder as a Transformer on the CPU, quantized layers kept quantized (see runtime.Runtime.load)."""
    from llmctl.backends.torch.runtime import Runtime

    return Runtime().load(folder_or_name, dtype).module


class Engine:
    """One model being trained (and any frozen ones beside it) on this process's device."""

    def __init__(self, loop: LoopConfig, optim: OptimConfig, strategy: str = "ddp") -> None:
        self.rank, self.world, self.device = setup_distributed()
        self.loop, self.optim, self.strategy = loop, optim, strategy
        self.amp = autocast_dtype(loop.dtype.value, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.peak_flops = 0.0

    def barrier(self, failed: bool = False) -> bool:
        """Wait for every process; True when any of them arrived failing."""
        if self.world == 1:
            return failed
        flag = torch.tensor([int(failed)], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def build(self, spec: ModelSpec, init_from: Path | None = None) -> None:
        """A new model of `spec` (seeded), or continued from the float weights of `init_from`; every parameter trains."""
        torch.manual_seed(self.loop.seed)
        model = Transformer(spec)
        if init_from is not None:
            from llmctl.io.model_folder import read_model

            folder = read_model(init_from)
            model.load_state_dict({k: to_torch(t).float() for k, t in folder.tensors.items()}, strict=True)
        else:
            model.init_weights(self.loop.seed)
        self._attach(model)

    def load(self, folder: str | Path, trainable: Callable[[str], bool] | None = None,
             prepare: Callable[[Transformer], Any] | None = None) -> None:
        """A model folder (float, affine-quantized or NF4) with the parameters `trainable(name)` picks trained and the
        rest frozen (None: every float parameter); quantized layers stay frozen, and gradients pass through them.
        `prepare(model)` changes the loaded model first (e.g. wraps layers in adapters), seeded like the rest."""
        torch.manual_seed(self.loop.seed)
        model = load_module(folder, "float32")
        if prepare is not None:
            prepare(model)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable is None or trainable(name))
        self._attach(model.train())

    def load_frozen(self, folder: str | Path, dtype: str = "float32") -> Transformer:
        """A second model (a reference or a teacher) on this device, frozen and in eval mode."""
        model = load_module(folder, dtype).to(self.device).eval()
        model.requires_grad_(False)
        return model

    def _attach(self, model: Transformer) -> None:
        self.model, self.spec = model.to(self.device), model.spec
        names = [n for n, _ in model.named_parameters()]
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        # Checkpoints of a partly frozen model hold only what trains; a fully trained one is a whole model folder.
        self.partial = len(self.trainable) < len(names) or any(b.dtype == torch.uint32 for b in model.buffers())
        if self.loop.grad_checkpointing:
            for layer in model.model.layers:
                # Recompute each block's activations in the backward pass instead of storing them.
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        self.net = wrap(model, self.strategy, self.world, self.device)
        if self.loop.compile:
            self.net.compile()
        self.opt = make_optimizer([p for p in self.net.parameters() if p.requires_grad], self.optim)
        self.peak_flops = matmul_peak(self.device, self.amp or torch.float32)

    def set_train(self, on: bool) -> None:
        self.net.train(on)

    def micro_step(self, objective: Objective, batch: Batch, scale: float, last: bool) -> dict[str, Any]:
        sync = last or self.world == 1 or self.strategy != "ddp"
        context = self.net.no_sync() if not sync else contextlib.nullcontext()
        with context, torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss, metrics = objective(self.net, DeviceBatch.of(batch, self.device))
            # DDP and FSDP average gradients over processes; the step's loss is their sum over its units.
            total = loss * (scale * self.world)
            (self.scaler.scale(total) if self.scaler else total).backward()
        return metrics

    def all_sum(self, values: dict[str, Any]) -> dict[str, float]:
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values.values()])
        if self.world > 1:
            dist.all_reduce(flat)
        return dict(zip(values, flat.tolist()))

    def optimizer_step(self, lr: float, max_norm: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.net.parameters() if p.requires_grad], max_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, objective: Objective, batches: Iterable[Batch]) -> dict[str, float]:
        def step(batch: Batch) -> dict[str, Any]:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                return objective(self.net, DeviceBatch.of(batch, self.device))[1]

        return evaluate_sums(step, batches, objective.units)

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Full (unsharded) state on the CPU, keyed by parameter names, whatever the strategy.
        return get_state_dict(self.net, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _model_tensors(self, model_sd: dict) -> dict:
        if self.partial:
            return {k: from_torch(v) for k, v in model_sd.items() if k in self.trainable}
        return {k: from_torch(v) for k, v in model_sd.items() if not (self.spec.tie_embeddings and k == "lm_head.weight")}

    def snapshot(self) -> Any:
        model_sd, optim_sd = self._state_dicts()  # collective under FSDP: every rank takes part
        return (model_sd, optim_sd) if ui.is_main_process() else None

    def write_checkpoint(self, folder: Path, snapshot: Any) -> dict[str, Any]:
        model_sd, optim_sd = snapshot
        tensors = self._model_tensors(model_sd)
        if self.partial:
            write_safetensors(folder / "trainable.safetensors", tensors)
        else:
            write_model(folder / "model", self.spec, tensors)
        optim_tensors = {f"{name}::{key}": from_torch(torch.as_tensor(v)) for name, s in optim_sd["state"].items() for key, v in s.items()}
        if optim_tensors:
            write_safetensors(folder / "optimizer.safetensors", optim_tensors)
        groups = [dict(g) for g in optim_sd["param_groups"]]
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        return {"param_groups": groups, "torch_rng": rng}

    def load_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if (folder / "trainable.safetensors").is_file():
            weights = {k: to_torch(t) for k, t in read_safetensors(folder / "trainable.safetensors").items()}
        else:
            weights = {k: to_torch(t) for k, t in load_folder_tensors(folder / "model").items()}
        optim_state: dict[str, dict[str, torch.Tensor]] = {}
        if (folder / "optimizer.safetensors").is_file():
            for key, raw in read_safetensors(folder / "optimizer.safetensors").items():
                name, field = key.split("::")
                optim_state.setdefault(name, {})[field] = to_torch(raw).clone()
        set_state_dict(
            self.net, self.opt,
            model_state_dict=weights,
            optim_state_dict={"state": optim_state, "param_groups": state["param_groups"]},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)

    def export(self, folder: Path) -> None:
        """The trained model as a model folder (a partly frozen one: its trained tensors only)."""
        model_sd, _ = self._state_dicts()
        if not ui.is_main_process():
            return
        tensors = self._model_tensors(model_sd)
        if self.partial:
            folder.mkdir(parents=True, exist_ok=True)
            write_safetensors(folder / "trainable.safetensors", tensors)
        else:
            write_model(folder, self.spec, tensors)


def wrap(model: Transformer, strategy: str, world: int, device: torch.device) -> torch.nn.Module:
    if world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
