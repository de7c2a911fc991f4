"""Preference settings shared by both backends: the methods `llmctl align` trains and their constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmctl.errors import ConfigError

PAIR_METHODS = ("dpo", "ipo", "hinge", "robust", "simpo", "orpo")
METHODS = (*PAIR_METHODS, "kto", "reward", "grpo", "ppo")  # grpo, ppo: online RL (llmctl.rl)
REFERENCE_FREE = ("simpo", "orpo", "reward")  # no reference model: no second copy, nothing to precompute


@dataclass
class PreferenceSettings:
    method: str = "dpo"            # dpo, ipo, hinge, robust, simpo, orpo, kto, reward, grpo or ppo
    beta: float = 0.1              # DPO's beta (IPO's tau; ORPO's lambda, the weight of its odds-ratio term)
    label_smoothing: float = 0.1   # robust: the assumed share of flipped labels
    gamma: float = 0.5             # simpo: the target reward margin
    desirable_weight: float = 1.0  # kto: weight of the desirable examples' losses
    undesirable_weight: float = 1.0

    def problems(self) -> list[str]:
        out = []
        if self.method not in METHODS:
            out.append(f"--method {self.method} (pref.method): expected one of {', '.join(METHODS)}.")
        if not self.beta > 0:
            out.append(f"pref.beta={self.beta}: must be greater than 0.")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"pref.label_smoothing={self.label_smoothing}: must be in [0, 0.5).")
        for name in ("desirable_weight", "undesirable_weight", "gamma"):
            if not getattr(self, name) >= 0:
                out.append(f"pref.{name}={getattr(self, name)}: must be 0 or more.")
        return out


def same_tokenizer(policy: Any, reference: Any, flag: str) -> None:
    """Refuse a reference whose tokenizer differs: its log-probabilities would be of other tokens."""
    a, b = policy.backend.get_vocab(with_added_tokens=True), reference.backend.get_vocab(with_added_tokens=True)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(f"{flag} has a different tokenizer from the policy's ({len(a)} and {len(b)} tokens; "
                          f"e.g. {', '.join(f'{t!r}={i}' for t, i in diff)} is in one only).",
                          hint=f"Pass as {flag.split()[0]} a model with the policy's tokenizer (usually the model the policy started from).")
