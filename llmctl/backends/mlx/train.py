"""Pretraining on the MLX backend: AdamW/Lion, warmup+cosine, clipping, accumulation, bf16, mx.compile, mlx.launch."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from llmctl import ui
from llmctl.backends.mlx.model import DTYPE_NAMES, Transformer
from llmctl.errors import ConfigError, LlmctlError
from llmctl.io.model_folder import write_model
from llmctl.io.safetensors import atomic_write_text, from_mlx, read_safetensors, to_mlx, write_safetensors
from llmctl.pretrain import Prepared, micro_batch, prepare
from llmctl.run import STATE_FILE, check_resumable, plot_losses, remember_model
from llmctl.schedule import lr_at


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


def _state_dicts(model: nn.Module, opt: optim.MultiOptimizer) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """Parameters by name, and optimizer state as `<param name>::<key>` (m, v, step), as the torch backend writes it."""
    optim_sd = {}
    for part in opt.optimizers:
        for key, value in tree_flatten(part.state):
            name, _, field = key.rpartition(".")
            if name:  # per-parameter state; "step" and "learning_rate" alone are the optimizer's own
                optim_sd[f"{name}::{field}"] = value
                optim_sd[f"{name}::step"] = part.state["step"]
    return dict(tree_flatten(model.parameters())), optim_sd


def save_checkpoint(prep: Prepared, model: nn.Module, opt: optim.MultiOptimizer, step: int, extra: dict, keep_last: int) -> None:
    if not ui.is_main_process():
        return
    model_sd, optim_sd = _state_dicts(model, opt)
    with prep.run.new_checkpoint(step, keep_last) as folder:
        tensors = {k: from_mlx(v) for k, v in model_sd.items()}
        write_model(folder / "model", prep.spec, tensors, dtype=DTYPE_NAMES[model_sd["model.embed_tokens.weight"].dtype])
        prep.tokenizer.save(folder / "model")
        write_safetensors(folder / "optimizer.safetensors", {k: from_mlx(v) for k, v in optim_sd.items()})
        # No RNG state: after initialisation the MLX loop draws no random numbers.
        state = {"step": step} | extra
        atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1))


def load_checkpoint(folder: Path, model: nn.Module, opt: optim.MultiOptimizer) -> dict:
    from llmctl.io.safetensors import load_folder_tensors

    state = json.loads((folder / STATE_FILE).read_text())
    model.load_weights([(k, to_mlx(t)) for k, t in load_folder_tensors(folder / "model").items()], strict=True)
    saved = read_safetensors(folder / "optimizer.safetensors")

    def restore(key: str, value: mx.array) -> mx.array:
        name, _, field = key.rpartition(".")
        return to_mlx(saved[f"{name}::{field}"]) if name else value

    for part in opt.optimizers:
        first = next(key.rpartition(".")[0] for key, _ in tree_flatten(part.state) if "." in key)
        part.state = tree_map_with_path(restore, part.state)
        part.state["step"] = to_mlx(saved[f"{first}::step"])
    opt.init(model.trainable_parameters())  # marks the restored state as initialised
    mx.eval(model.parameters(), opt.state)
    return state


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


def build_model(prep: Prepared, cfg: Any, device: mx.Device) -> Transformer:
    mx.random.seed(cfg.train.seed)
    model = Transformer(prep.spec)
    if prep.init_from is not None:
        from llmctl.io.model_folder import read_model

        folder = read_model(prep.init_from)
        model.load_weights([(k, to_mlx(t).astype(mx.float32)) for k, t in folder.tensors.items()], strict=True)
    else:
        model.init_weights(cfg.train.seed)
    dtype = autocast_dtype(cfg.train.dtype.value, device)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    if cfg.train.grad_checkpointing:
        for layer in model.model.layers:
            _checkpointed(layer)
    return model


def wrap(model: Transformer, strategy: str, world: int, device: mx.Device) -> Transformer:
    """Every process holds the whole model; _train averages the gradients (MLX has no sharded strategy)."""
    if world > 1 and strategy == "fsdp":
        raise ConfigError("--strategy fsdp is torch-only; under mlx.launch every process holds the whole model.", hint="Use --strategy ddp.")
    return model


def _all_mean(value: mx.array, world: int) -> mx.array:
    return mx.distributed.all_sum(value) / world if world > 1 else value


def _barrier(world: int, failed: bool = False) -> bool:
    """Wait for every process; True when any of them arrived failing."""
    if world == 1:
        return failed
    return mx.distributed.all_sum(mx.array(int(failed))).item() > 0


def evaluate(model: nn.Module, prep: Prepared, rows: int, batches: int, device: mx.Device, amp: mx.Dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in prep.data.val_batches(rows, batches):
        x = mx.array(batch, dtype=mx.int32)
        logits = model(x[:, :-1])
        total += nn.losses.cross_entropy(logits.astype(mx.float32), x[:, 1:], reduction="sum").item()
        count += x[:, 1:].size
    model.train()
    return total / count


def _loss(model: nn.Module, batch: mx.array, grad_accum: int) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """(what is differentiated, (cross-entropy, MoE aux loss)); the cross-entropy is taken in float32."""
    logits, aux = model(batch[:, :-1], return_aux=True)
    loss = nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 1:], reduction="mean")
    aux = aux if aux is not None else mx.zeros(())
    return (loss + aux) / grad_accum, (loss, aux)


def step_functions(model: nn.Module, opt: optim.MultiOptimizer, cfg: Any) -> tuple[Callable, Callable]:
    """micro(batch) -> (loss, aux, grads) and update(grads) -> pre-clip norm, compiled when train.compile."""
    loss_and_grad = nn.value_and_grad(model, functools.partial(_loss, model, grad_accum=cfg.train.grad_accum))
    max_norm = cfg.optim.grad_clip or math.inf

    def micro(batch: mx.array) -> tuple[mx.array, mx.array, dict]:
        (_, (loss, aux)), grads = loss_and_grad(batch)
        return loss, aux, grads

    def update(grads: dict) -> mx.array:
        grads, norm = optim.clip_grad_norm(grads, max_norm)
        opt.update(model, grads)
        return norm

    if not cfg.train.compile:
        return micro, update
    # The parameters and optimizer state are implicit inputs and outputs of the compiled graphs (value_and_grad
    # swaps the model's parameters for its own while tracing, so even micro must hand them back).
    state = [model.state, opt.state]
    return mx.compile(micro, inputs=[model.state], outputs=[model.state]), mx.compile(update, inputs=state, outputs=state)


def train(cfg: Any, force: bool = False, resume: bool = False) -> Path | None:
    rank, world, device = setup_distributed()
    return _train(cfg, force, resume, rank, world, device)


def _train(cfg: Any, force: bool, resume: bool, rank: int, world: int, device: mx.Device) -> Path | None:
    amp = autocast_dtype(cfg.train.dtype.value, device)  # refuses fp16 before anything is written
    # Rank 0 creates the run folder, tokenizer and token cache first; the others then find them.
    if rank != 0 and _barrier(world):
        raise LlmctlError("process 0 failed while preparing the run; its own error message says why.")
    try:
        prep = prepare(cfg, force, resume)
    except BaseException:
        if rank == 0:
            _barrier(world, failed=True)
        raise
    if rank == 0:
        _barrier(world)
    mb = micro_batch(cfg, world)
    model = build_model(prep, cfg, device)
    net = wrap(model, cfg.strategy.value, world, device)
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
    micro_step, update = step_functions(net, opt, cfg)

    seq = cfg.data.seq_len
    tokens_per_step = cfg.data.batch_size * seq
    peak = matmul_peak(device, amp or mx.float32)
    flops_per_token = prep.spec.flops_per_token(seq, training=True)
    end = min(cfg.train.steps, cfg.train.stop_at) if cfg.train.stop_at else cfg.train.steps
    extra = lambda step: {"resume_key": key, "bad_steps": bad_steps, "tokens_seen": step * tokens_per_step}  # noqa: E731
    moe = prep.spec.n_experts > 0
    net.train()
    with ui.progress(cfg.train.steps, "train", start=start, log_every=cfg.train.log_every) as bar:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio)
            opt.learning_rate = lr
            loss_sum, aux_sum, grads = mx.zeros(()), mx.zeros(()), None
            for micro in range(cfg.train.grad_accum):
                first = (micro * world + rank) * mb
                batch = mx.array(prep.data.batch(step, cfg.data.batch_size, cfg.train.seed, first, mb), dtype=mx.int32)
                loss, aux, g = micro_step(batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum = loss_sum + loss / cfg.train.grad_accum
                aux_sum = aux_sum + aux / cfg.train.grad_accum
                mx.eval(grads, loss_sum, aux_sum)  # one micro-batch's activations alive at a time
            if world > 1:
                grads = nn.utils.average_gradients(grads)
            loss_value = _all_mean(loss_sum, world).item()
            if not math.isfinite(loss_value):
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
            norm = update(grads)
            mx.eval(norm, net.parameters(), opt.state)
            norm = norm.item()
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt
            record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": norm, "tok_s": round(tok_s, 1),
                      "mfu": round(flops_per_token * tok_s / (peak * world), 4)}
            if moe:
                record["aux_loss"] = _all_mean(aux_sum, world).item()
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


def finish(prep: Prepared, net: nn.Module, opt: optim.MultiOptimizer) -> Path:
    """Write runs/NAME/model/ (weights + tokenizer), the loss plot, and remember the model for chat."""
    if ui.is_main_process():
        model_sd, _ = _state_dicts(net, opt)
        tensors = {k: from_mlx(v) for k, v in model_sd.items()}
        write_model(prep.run.model_dir, prep.spec, tensors, dtype=DTYPE_NAMES[model_sd["model.embed_tokens.weight"].dtype])
        prep.tokenizer.save(prep.run.model_dir)
        plot_losses(prep.run.path)
        remember_model(prep.run.model_dir)
        ui.info(f"model written to {prep.run.model_dir}")
    return prep.run.model_dir
