"""Pruning without a framework: N:M patterns, and how many heads, channels or layers a structured ratio removes.

The algorithms live in llmctl.prune.sparse (magnitude, Wanda, SparseGPT) and llmctl.prune.structured (depth, width),
on the torch backend; the checks here run before any weights are read, so bad requests fail at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llmctl.errors import ConfigError, UnsupportedModel
from llmctl.spec import ModelSpec

ALIGN = 32  # a width-pruned MLP keeps a multiple of this many channels when it had one: quantization groups, GGUF blocks


@dataclass(frozen=True)
class Pattern:
    """N zeros in every M consecutive weights along each row's inputs (2:4 and 4:8 are what sparse kernels run)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str) -> Pattern:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(
            f"--pattern {text!r} is not an N:M pattern with 0 < N < M.",
            hint="Write it as N:M, N zeros in every M weights: 2:4 or 4:8.",
        )
    return Pattern(int(match[1]), int(match[2]))


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise ConfigError(
            f"--sparsity {sparsity} is outside (0, 1); it is the share of each layer's weights set to zero.",
            hint="Pass a value such as 0.5 (half of every layer's weights).",
        )


def check_pattern_fits(pattern: Pattern, widths: dict[str, int]) -> None:
    """Every pruned layer's input width (module path -> in_features) splits into groups of M."""
    misfits = {path: width for path, width in widths.items() if width % pattern.m}
    if misfits:
        shown = ", ".join(f"{path} ({width} inputs)" for path, width in sorted(misfits.items())[:3])
        more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
        raise ConfigError(
            f"--pattern {pattern} needs input widths that are multiples of {pattern.m}; {shown}{more} are not.",
            hint="Choose a pattern whose M divides every layer's width (2:4 usually does), or use --sparsity.",
        )


def depth_plan(spec: ModelSpec, ratio: float) -> int:
    """How many whole blocks `ratio` of the blocks removes: at least one, and never all of them."""
    _check_ratio(ratio)
    n = round(ratio * spec.n_layers)
    if n < 1:
        raise ConfigError(
            f"--ratio {ratio} of {spec.n_layers} layers rounds to no layer at all.",
            hint=f"Pass at least {0.5 / spec.n_layers:.3g} to remove one layer.",
        )
    if n >= spec.n_layers:
        raise ConfigError(
            f"--ratio {ratio} would remove all {spec.n_layers} layers of the model.",
            hint=f"Pass at most {(spec.n_layers - 0.5) / spec.n_layers:.3g} to keep at least one layer.",
        )
    return n


@dataclass(frozen=True)
class WidthPlan:
    """What width pruning removes from every block: whole key/value groups (each with its query heads) and MLP channels."""

    kv_groups: int
    channels: int
    removed_share: float  # of the blocks' parameters, as achieved

    def spec(self, spec: ModelSpec) -> ModelSpec:
        """The smaller model; head_dim stays explicit since dim / n_heads no longer gives it."""
        group = spec.n_heads // spec.n_kv_heads
        return spec.with_updates(
            n_heads=spec.n_heads - self.kv_groups * group, n_kv_heads=spec.n_kv_heads - self.kv_groups,
            ffn_dim=spec.ffn_dim - self.channels, head_dim=spec.head_dim,
        )


def block_params(spec: ModelSpec) -> int:
    """Parameters of one block's linear layers and norms."""
    return spec._attn_params() + spec._expert_params() + 2 * spec.dim


def width_plan(spec: ModelSpec, ratio: float) -> WidthPlan:
    """`ratio` of the key/value groups (rounded; each goes with its query heads), then MLP channels, the same number in
    every block, until `ratio` of the blocks' parameters is gone.

    Heads stay where they cannot go: one key/value group (MQA); Qwen2, whose config.json has no head_dim to keep the
    heads' width once their number changes; or no number of groups leaves a head count that divides the width. The
    MLP then takes the whole share.
    """
    _check_ratio(ratio)
    if spec.n_experts:
        raise UnsupportedModel("width pruning of a Mixture-of-Experts model is not supported.",
                               hint="Use --structured depth, or unstructured pruning (--method).")
    group = spec.n_heads // spec.n_kv_heads
    group_params = spec.dim * spec.head_dim * (2 * group + 2) + (spec.head_dim * (group + 2) if spec.attn_bias else 0)
    heads_stay = spec.n_kv_heads == 1 or spec.family == "qwen2"
    kv_groups = 0 if heads_stay else round(ratio * spec.n_kv_heads)
    if not heads_stay and kv_groups == 0:
        raise ConfigError(
            f"--ratio {ratio} is too small to remove a whole key/value group: each of the {spec.n_kv_heads} groups "
            f"(1 key/value head and {group} query heads) is {1 / spec.n_kv_heads:.3g} of the attention.",
            hint=f"Pass --ratio {0.5 / spec.n_kv_heads:.3g} or more; heads go in whole groups.",
        )
    if kv_groups >= spec.n_kv_heads:
        raise ConfigError(f"--ratio {ratio} would remove every attention head.", hint="Pass a smaller --ratio.")
    if kv_groups:
        # transformers' Llama config wants hidden_size divisible by the heads left: the nearest count that allows it
        fits = [k for k in range(1, spec.n_kv_heads) if spec.dim % (spec.n_heads - k * group) == 0]
        kv_groups = min(fits, key=lambda k: (abs(k - kv_groups), k)) if fits else 0
    target = ratio * block_params(spec)
    channels = round((target - kv_groups * group_params) / (3 * spec.dim))
    if channels >= spec.ffn_dim:
        raise ConfigError(f"--ratio {ratio} would remove every MLP channel.", hint="Pass a smaller --ratio.")
    channels = max(channels, 0)
    if spec.ffn_dim % ALIGN == 0 and spec.ffn_dim - channels >= ALIGN:  # keep the MLP quantizable (a tie removes more)
        channels = spec.ffn_dim - ALIGN * math.ceil((spec.ffn_dim - channels) / ALIGN - 0.5)
    removed = kv_groups * group_params + 3 * spec.dim * channels
    return WidthPlan(kv_groups, channels, removed / block_params(spec))


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise ConfigError(f"--ratio {ratio} is outside (0, 1); it is the share of the model's blocks to remove.",
                          hint="Pass a value such as 0.25.")
