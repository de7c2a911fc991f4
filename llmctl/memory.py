"""How much memory a job needs against how much the machine has, checked before anything big is allocated."""

from __future__ import annotations

import os
from pathlib import Path

from llmctl.errors import LlmctlError

GiB = 1024**3


def available_bytes() -> int | None:
    """MemAvailable on Linux (what can be allocated without swapping), else None (the check is skipped)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(needed: int, what: str, hint: str) -> None:
    """Refuse a job whose estimate is above the available memory, with both numbers.

    LLMCTL_MEMORY_CHECK=0 turns the check off (for swap-backed machines, at your own risk).
    """
    if os.environ.get("LLMCTL_MEMORY_CHECK", "1") == "0":
        return
    free = available_bytes()
    if free is not None and needed > free:
        raise LlmctlError(
            f"{what} needs about {needed / GiB:,.1f} GiB of memory; this machine has {free / GiB:,.1f} GiB available.",
            hint=hint + " (LLMCTL_MEMORY_CHECK=0 skips this check.)",
        )


def check_model_job(model: object, what: str, bytes_per_parameter: float) -> None:
    """A job over a whole model read by `read_model` (its tensors only memory-mapped so far): `bytes_per_parameter`
    of working memory for each of the spec's parameters, against the memory available."""
    spec = model.spec  # type: ignore[attr-defined]
    check_fits(int(spec.param_count() * bytes_per_parameter), f"{what} {model.path}",  # type: ignore[attr-defined]
               hint="Use a machine with more memory, or a smaller model.")  # fmt: skip


def training_bytes(param_count: int, batch_tokens: int, dim: int, n_layers: int) -> int:
    """fp32 weights, gradients and two AdamW moments (16 bytes a parameter), and activations kept for backward
    (about 20 values of width `dim` per token and layer, in fp32)."""
    return 16 * param_count + 4 * 20 * batch_tokens * dim * n_layers
