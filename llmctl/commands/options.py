"""Choices shared by several commands: one enum each, so that every command lists and spells them alike."""

from __future__ import annotations

import enum


class DType(str, enum.Enum):
    """A float dtype; auto is each command's default (as stored, or what the hardware runs fast)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def full_name(self) -> str | None:
        """float32, bfloat16 or float16 (None for auto): the name config.json and the frameworks use."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(self.value)


class GGUFType(str, enum.Enum):
    """A ggml tensor type llmctl writes (llmctl.io.gguf.WRITE_TYPES)."""

    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"
    q4_1 = "q4_1"
    q5_0 = "q5_0"
    q5_1 = "q5_1"
    q4_k = "q4_k"
    q5_k = "q5_k"
    q6_k = "q6_k"
    q4_k_m = "q4_k_m"  # llama.cpp's mixes: Q4_K/Q5_K, with Q6_K for the head and some attn_v, ffn_down
    q5_k_m = "q5_k_m"


class DistillLoss(str, enum.Enum):
    """The divergence of a student to its teacher (`distill --loss`, and the recovery step of `prune`)."""

    kl = "kl"                  # KL(teacher || student): mean-seeking, the classic distillation loss
    reverse_kl = "reverse-kl"  # KL(student || teacher): mode-seeking (MiniLLM)
    jsd = "jsd"                # generalized Jensen-Shannon with weight `beta` (GKD)
    skew_kl = "skew-kl"        # KL(teacher || skew * teacher + (1 - skew) * student) (DistiLLM)
