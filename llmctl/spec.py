"""ModelSpec: the single description of a decoder-only transformer, shared by both backends."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llmctl.errors import SpecError

FAMILIES = ("llama", "mistral", "qwen2", "mixtral")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Stretching of RoPE for long context: `linear` divides positions, `llama3` rescales low frequencies."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES[1:]:
            raise SpecError(f"rope scaling type {self.rope_type!r} is not supported; llmctl knows {', '.join(ROPE_TYPES[1:])}.")
        if self.factor <= 0:
            raise SpecError(f"rope scaling factor must be positive, got {self.factor}.")


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    dim: int                         # width of the residual stream (hidden_size)
    n_layers: int
    n_heads: int
    n_kv_heads: int                  # == n_heads: MHA, 1: MQA, in between: GQA
    ffn_dim: int                     # SwiGLU inner width (per expert for MoE)
    head_dim: int | None = None      # None: dim // n_heads
    norm_eps: float = 1e-5           # RMSNorm epsilon
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048          # max_position_embeddings
    attn_bias: bool = False          # bias on q/k/v projections (Qwen2)
    tie_embeddings: bool = False     # output head shares the embedding matrix
    sliding_window: int | None = None  # attend to at most this many tokens, itself included (Mistral)
    n_experts: int = 0               # 0: dense MLP
    experts_per_token: int = 2       # top-k routing
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss
    family: str = "llama"            # which Hugging Face architecture it is written as
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    init_std: float = 0.02           # normal init of random weights (initializer_range)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # unknown config keys, kept on save

    def __post_init__(self) -> None:
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}; set head_dim")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts < 0 or (self.n_experts and not 0 < self.experts_per_token <= self.n_experts):
            problems.append(f"experts_per_token {self.experts_per_token} must be in 1..n_experts ({self.n_experts})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.family == "mixtral" and not self.n_experts:
            problems.append("family 'mixtral' needs n_experts > 0")
        if self.n_experts and self.family != "mixtral":
            problems.append(f"n_experts={self.n_experts} needs family 'mixtral', got {self.family!r}")
        if problems:
            raise SpecError("Invalid model spec: " + "; ".join(problems) + ".")

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def _attn_params(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.attn_bias else 0
        return self.dim * (self.q_dim + 2 * self.kv_dim) + bias + self.q_dim * self.dim

    def _expert_params(self) -> int:
        return 3 * self.dim * self.ffn_dim

    def param_count(self) -> int:
        """All parameters, embedding and head included (a tied head counted once)."""
        mlp = self._expert_params() * max(1, self.n_experts) + (self.dim * self.n_experts)
        layer = self._attn_params() + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * layer + self.dim + head

    def active_param_count(self) -> int:
        """Parameters used per token: for MoE only `experts_per_token` experts run."""
        if not self.n_experts:
            return self.param_count()
        idle = (self.n_experts - self.experts_per_token) * self._expert_params() * self.n_layers
        return self.param_count() - idle

    def matmul_params(self) -> int:
        """Active parameters that take part in a matmul (the embedding lookup is free, the head is not)."""
        embed_lookup = 0 if self.tie_embeddings else self.vocab_size * self.dim
        norms = (2 * self.n_layers + 1) * self.dim
        return self.active_param_count() - embed_lookup - norms

    def flops_per_token(self, seq_len: int | None = None, training: bool = False) -> int:
        """Forward FLOPs per token (2 per multiply-add), attention over `seq_len`; x3 for training."""
        ctx = seq_len or self.max_seq_len
        if self.sliding_window:
            ctx = min(ctx, self.sliding_window)
        # QK^T and AV each cost 2 * ctx * q_dim per token; a causal mask halves the average context.
        attn = self.n_layers * 2 * 2 * self.q_dim * ctx // 2
        forward = 2 * self.matmul_params() + attn
        return 3 * forward if training else forward

    def weight_bytes(self, bits: float, group_size: int = 64) -> int:
        """Weight memory when matrices are stored at `bits` (16/32: float; else affine with fp16 scale+bias)."""
        n = self.param_count()
        norms = (2 * self.n_layers + 1) * self.dim
        if bits >= 16:
            return int(n * bits / 8)
        per_weight = bits + 32 / group_size  # a float16 scale and bias per group
        return int((n - norms) * per_weight / 8 + norms * 2)

    def chinchilla_tokens(self) -> int:
        """Compute-optimal training tokens: about 20 per parameter (Hoffmann et al., 2022)."""
        return 20 * self.param_count()

    # ----- conversion ----------------------------------------------------------------------------
    def with_updates(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out


def llama3_inv_freq(spec: ModelSpec) -> list[float]:
    """RoPE inverse frequencies per pair of dims, with the spec's scaling applied (framework-free)."""
    half = spec.head_dim // 2
    inv = [1.0 / spec.rope_theta ** (2 * i / spec.head_dim) for i in range(half)]
    s = spec.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return [f / s.factor for f in inv]
    # Llama 3: wavelengths longer than old_ctx/low_freq_factor are slowed by `factor`, shorter than
    # old_ctx/high_freq_factor kept, and the band between interpolated smoothly.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
