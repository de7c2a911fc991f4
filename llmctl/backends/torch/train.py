"""Pretraining on the torch backend: AdamW/Lion, warmup+cosine, clipping, accumulation, autocast, DDP/FSDP2."""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from llmctl import ui
from llmctl.backends.torch.model import Transformer
from llmctl.errors import LlmctlError
from llmctl.io.model_folder import write_model
from llmctl.io.safetensors import atomic_write_text, from_torch, read_safetensors, to_torch, write_safetensors
from llmctl.pretrain import Prepared, micro_batch, prepare
from llmctl.run import STATE_FILE, check_resumable, plot_losses, remember_model
from llmctl.schedule import lr_at


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


def make_optimizer(model: torch.nn.Module, optim: Any) -> torch.optim.Optimizer:
    """Weight decay on matrices and embeddings only, never on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    betas = (optim.beta1, optim.beta2)
    if optim.name.value == "lion":
        return Lion(groups, lr=optim.lr, betas=betas)
    # The fused kernel (one pass over each tensor for the whole update) where it exists; sharded DTensors take foreach.
    sharded = any(type(p) is not torch.Tensor and type(p) is not torch.nn.Parameter for p in decay + rest)
    fused = not sharded and all(p.device.type in ("cpu", "cuda") for p in decay + rest)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, foreach=not fused, fused=fused or None)


def _state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Full (unsharded) state on the CPU, keyed by parameter names, whatever the strategy.
    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(prep: Prepared, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict, keep_last: int) -> None:
    model_sd, optim_sd = _state_dicts(model, opt)  # collective under FSDP: every rank takes part
    if not ui.is_main_process():
        return
    with prep.run.new_checkpoint(step, keep_last) as folder:
        tensors = {k: from_torch(v) for k, v in model_sd.items() if not (prep.spec.tie_embeddings and k == "lm_head.weight")}
        write_model(folder / "model", prep.spec, tensors)
        prep.tokenizer.save(folder / "model")
        optim_tensors = {f"{name}::{key}": from_torch(torch.as_tensor(v)) for name, s in optim_sd["state"].items() for key, v in s.items()}
        if optim_tensors:
            write_safetensors(folder / "optimizer.safetensors", optim_tensors)
        groups = [{k: v for k, v in g.items()} for g in optim_sd["param_groups"]]
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        state = {"step": step, "param_groups": groups, "torch_rng": rng} | extra
        atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1))


def load_checkpoint(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from llmctl.io.safetensors import load_folder_tensors

    state = json.loads((folder / STATE_FILE).read_text())
    weights = {k: to_torch(t) for k, t in load_folder_tensors(folder / "model").items()}
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    if (folder / "optimizer.safetensors").is_file():
        for key, raw in read_safetensors(folder / "optimizer.safetensors").items():
            name, field = key.split("::")
            optim_state.setdefault(name, {})[field] = to_torch(raw).clone()
    set_state_dict(
        model, opt,
        model_state_dict=weights,
        optim_state_dict={"state": optim_state, "param_groups": state["param_groups"]},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return state


def build_model(prep: Prepared, cfg: Any, device: torch.device) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    model = Transformer(prep.spec)
    if prep.init_from is not None:
        from llmctl.io.model_folder import read_model

        folder = read_model(prep.init_from)
        model.load_state_dict({k: to_torch(t).float() for k, t in folder.tensors.items()}, strict=True)
    else:
        model.init_weights(cfg.train.seed)
    model.to(device)
    if cfg.train.grad_checkpointing:
        for layer in model.model.layers:
            # Recompute each block's activations in the backward pass instead of storing them.
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model


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


def _all_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world
    return value


@torch.no_grad()
def evaluate(model: torch.nn.Module, prep: Prepared, rows: int, batches: int, device: torch.device, amp: torch.dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in prep.data.val_batches(rows, batches):
        x = torch.from_numpy(batch).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(x[:, :-1], targets=x[:, 1:])
        total += loss.item() * x[:, 1:].numel()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def train(cfg: Any, force: bool = False, resume: bool = False) -> Path | None:
    rank, world, device = setup_distributed()
    try:
        return _train(cfg, force, resume, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Any, force: bool, resume: bool, rank: int, world: int, device: torch.device) -> Path | None:
    # Rank 0 creates the run folder, tokenizer and token cache first; the others then find them.
    if rank != 0:
        dist.barrier()
    prep = prepare(cfg, force, resume)
    if rank == 0 and world > 1:
        dist.barrier()
    mb = micro_batch(cfg, world)
    amp = autocast_dtype(cfg.train.dtype.value, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    model = build_model(prep, cfg, device)
    net = wrap(model, cfg.strategy.value, world, device)
    if cfg.train.compile:
        net.compile()
    opt = make_optimizer(net, cfg.optim)
    key = prep.resume_key(cfg, world)
    start, bad_steps = 0, 0
    if resume:
        checkpoint_dir = prep.run.latest_checkpoint()
        saved = json.loads((checkpoint_dir / STATE_FILE).read_text())
        check_resumable(saved["resume_key"], json.loads(json.dumps(key)), checkpoint_dir)
        state = load_checkpoint(checkpoint_dir, net, opt)
        start, bad_steps = state["step"], state.get("bad_steps", 0)
        prep.run.truncate_metrics(start)
        ui.info(f"resumed from {checkpoint_dir} at step {start}")

    seq = cfg.data.seq_len
    tokens_per_step = cfg.data.batch_size * seq
    peak = matmul_peak(device, amp or torch.float32)
    flops_per_token = prep.spec.flops_per_token(seq, training=True)
    end = min(cfg.train.steps, cfg.train.stop_at) if cfg.train.stop_at else cfg.train.steps
    extra = lambda step: {"resume_key": key, "bad_steps": bad_steps, "tokens_seen": step * tokens_per_step}  # noqa: E731
    net.train()
    with ui.progress(cfg.train.steps, "train", start=start, log_every=cfg.train.log_every) as bar:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            for micro in range(cfg.train.grad_accum):
                first = (micro * world + rank) * mb
                batch = torch.from_numpy(prep.data.batch(step, cfg.data.batch_size, cfg.train.seed, first, mb)).to(device)
                sync = micro == cfg.train.grad_accum - 1 or world == 1 or cfg.strategy.value != "ddp"
                context = net.no_sync() if not sync else _null()
                with context, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss, aux = net(batch[:, :-1], targets=batch[:, 1:], return_aux=True)
                    total = (loss + (aux if aux is not None else 0.0)) / cfg.train.grad_accum
                    (scaler.scale(total) if scaler else total).backward()
                loss_sum += loss.detach() / cfg.train.grad_accum
                if aux is not None:
                    aux_sum += aux.detach() / cfg.train.grad_accum
            loss_value = float(_all_mean(loss_sum, world))
            if not math.isfinite(loss_value):
                opt.zero_grad(set_to_none=True)
                bad_steps += 1
                prep.run.log({"step": step + 1, "skipped": True, "loss": None})
                ui.warn(f"step {step + 1}: loss is {loss_value}; step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.train.max_bad_steps:
                    last = prep.run.latest_checkpoint()
                    raise LlmctlError(
                        f"{bad_steps} steps in a row had a non-finite loss; the run stopped at step {step + 1}.",
                        hint=f"The last good checkpoint is {last}. Lower optim.lr or use train.dtype=fp32, then --resume.",
                    )
                bar.update(1)
                continue
            bad_steps = 0
            if scaler:
                scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip or math.inf)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt
            record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": norm, "tok_s": round(tok_s, 1),
                      "mfu": round(flops_per_token * tok_s / (peak * world), 4)}
            if aux is not None:
                record["aux_loss"] = float(_all_mean(aux_sum, world))
            done = step + 1
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                val = evaluate(net, prep, mb, cfg.train.eval_batches, device, amp)
                record |= {"val_loss": val, "val_ppl": math.exp(min(val, 50))}
            prep.run.log(record)
            bar.update(1, loss=loss_value, tok_s=round(tok_s), **({"val": record["val_loss"]} if "val_loss" in record else {}))
            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == end:
                save_checkpoint(prep, net, opt, done, extra(done), cfg.train.keep_last)
    if end < cfg.train.steps:
        ui.info(f"stopped after step {end} (train.stop_at); continue with --resume")
        return None
    return finish(prep, net, opt)


def finish(prep: Prepared, net: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    """Write runs/NAME/model/ (weights + tokenizer), the loss plot, and remember the model for chat."""
    model_sd, _ = _state_dicts(net, opt)
    if ui.is_main_process():
        tensors = {k: from_torch(v) for k, v in model_sd.items() if not (prep.spec.tie_embeddings and k == "lm_head.weight")}
        write_model(prep.run.model_dir, prep.spec, tensors)
        prep.tokenizer.save(prep.run.model_dir)
        plot_losses(prep.run.path)
        remember_model(prep.run.model_dir)
        ui.info(f"model written to {prep.run.model_dir}")
    return prep.run.model_dir


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
