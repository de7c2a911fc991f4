"""`llmctl info MODEL`: what a model is, how big, how costly to run and to train."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.spec import ModelSpec


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.3g} {suffix}"
        n /= 1024
    return f"{n:.3g} PiB"


def spec_rows(spec: ModelSpec) -> list[tuple[str, str]]:
    """The spec and what follows from it, as (label, value) rows."""
    rope = f"theta {spec.rope_theta:g}"
    if spec.rope_scaling:
        rope += f", {spec.rope_scaling.rope_type} x{spec.rope_scaling.factor:g}"
    rows = [
        ("family", spec.family),
        ("vocabulary", str(spec.vocab_size)),
        ("width / layers", f"{spec.dim} / {spec.n_layers}"),
        ("heads (q / kv), head dim", f"{spec.n_heads} / {spec.n_kv_heads}, {spec.head_dim}"),
        ("MLP", f"SwiGLU {spec.ffn_dim}" + (f" x {spec.n_experts} experts, top-{spec.experts_per_token}" if spec.n_experts else "")),
        ("norm", f"RMSNorm eps {spec.norm_eps:g}"),
        ("RoPE", rope),
        ("context", str(spec.max_seq_len) + (f", sliding window {spec.sliding_window}" if spec.sliding_window else "")),
        ("q/k/v bias, tied embeddings", f"{spec.attn_bias}, {spec.tie_embeddings}"),
        ("parameters", f"{_human(spec.param_count())} ({spec.param_count():,})"),
    ]
    if spec.n_experts:
        rows.append(("active per token", f"{_human(spec.active_param_count())} ({spec.active_param_count():,})"))
    mem = ", ".join(f"{name} {_bytes(spec.weight_bytes(bits))}" for name, bits in (("fp32", 32), ("bf16", 16), ("8-bit", 8), ("4-bit", 4)))
    seq = min(spec.max_seq_len, 2048)
    rows += [
        ("weights in memory", mem),
        (f"FLOPs / token (ctx {seq})", f"inference {_human(spec.flops_per_token(seq))}, training {_human(spec.flops_per_token(seq, training=True))}"),
        ("compute-optimal tokens", f"{_human(spec.chinchilla_tokens())} (20 per parameter)"),
    ]
    return rows


def info(
    model: Annotated[str, typer.Argument(help="A model folder, a .gguf file, or a Hugging Face id in the local cache.")],
) -> None:
    """Show a model's spec, size, memory per dtype, FLOPs per token and compute-optimal training tokens."""
    from rich.console import Console
    from rich.table import Table

    from llmctl.io.model_folder import read_model

    read = read_model(model)  # the spec checked against the weights, as every command reads it
    spec, folder = read.spec, read.path
    table = Table(title=str(folder), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in spec_rows(spec):
        table.add_row(label, value)
    Console().print(table)  # the report is the command's output: stdout
