"""Preference settings shared by both backends: the methods `llmctl align` trains and their constants."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


# --- reward model folders (both backends) ------------------------------------------------------------------------

SCORE = "score.weight"  # the scalar head, (1, dim), as transformers' *ForSequenceClassification names it


def write_reward_folder(folder: Path, spec: Any, tensors: dict[str, Any], base: Path, pad_id: int) -> None:
    """The backbone and `score.weight` (RawTensors, no language-model head), with the config transformers'
    *ForSequenceClassification reads: one label, and the padding id (it scores the last token that is not padding)."""
    from llmctl.io.hf import ARCHITECTURES
    from llmctl.io.model_folder import write_model

    arch = ARCHITECTURES[spec.family].replace("ForCausalLM", "ForSequenceClassification")
    extra = {"architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
             "pad_token_id": pad_id, "problem_type": "regression"}
    write_model(folder, spec, {k: v for k, v in tensors.items() if k != "lm_head.weight"}, source=base, extra_config=extra)


def read_reward_folder(folder: str | Path) -> tuple[Any, dict[str, Any], Any, int]:
    """A reward model folder: its spec, backbone tensors (checked against the spec; no language-model head), score
    head (1, dim) and the padding id it scores by."""
    from llmctl.errors import CheckpointError
    from llmctl.io.hf import check_tensors, read_config, spec_from_config
    from llmctl.io.safetensors import load_folder_tensors

    folder = Path(folder)
    config = read_config(folder)
    tensors = load_folder_tensors(folder)
    if SCORE not in tensors:
        raise CheckpointError(f"{folder} holds no {SCORE}: it is not a reward model.",
                              hint="Pass a folder written by `llmctl align --method reward` (OUT/model).")
    score = tensors.pop(SCORE)
    spec = spec_from_config({k: v for k, v in config.items() if k not in ("num_labels", "id2label", "label2id")},
                            folder / "config.json")
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if not spec.tie_embeddings:  # a sequence classifier has no language-model head
        shapes["lm_head.weight"] = (spec.vocab_size, spec.dim)
    check_tensors(spec, shapes, folder, {})
    pad = config.get("pad_token_id")
    return spec, tensors, score, int(pad if pad is not None else 0)


def is_reward_model(config: dict[str, Any]) -> bool:
    return str((config.get("architectures") or [""])[0]).endswith("ForSequenceClassification")
