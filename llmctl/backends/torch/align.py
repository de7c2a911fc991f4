"""The torch side of `llmctl align`: the policy loaded for preference training (full weights, LoRA adapters, or a
reward model's score head), reference log-probabilities, and the output folder (adapter, model or reward model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl import ui
from llmctl.backends.torch.engine import Engine
from llmctl.backends.torch.model import Transformer
from llmctl.backends.torch.objectives import DeviceBatch, sequence_logprobs
from llmctl.backends.torch.preference import BradleyTerry, Preference, adapters_off, add_score_head, reward_scores
from llmctl.errors import CheckpointError
from llmctl.preference import PreferenceSettings, is_reward_model, read_reward_folder, write_reward_folder

BATCH = 8  # examples per forward when computing reference log-probabilities


class AlignEngine(Engine):
    def setup(self, base: Path, lora: Any | None, reward: bool) -> None:
        """The policy: every weight trained, or LoRA adapters on a frozen base, or a reward model (a score head)."""
        if lora is not None:
            from llmctl.backends.torch.lora import add_adapters, is_adapter_param

            self.load(base, trainable=is_adapter_param, prepare=lambda m: add_adapters(m, lora))
        else:
            self.load(base, prepare=add_score_head if reward else None)

    def trained_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def objective(self, settings: PreferenceSettings, reference: Any) -> Any:
        return BradleyTerry() if settings.method == "reward" else Preference(settings, reference)

    def reference_logps(self, reference: Any, rows: Any, examples: Sequence[Any]) -> np.ndarray:
        """(N, 2) summed response log-probabilities of each example's two rows under the reference (a model, or
        "adapters": the policy with its adapters off, which before training is the starting model)."""

        def logps(batch: DeviceBatch) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                if reference != "adapters":
                    return sequence_logprobs(reference, batch)
                with adapters_off(self.model):
                    return sequence_logprobs(self.model, batch)

        return per_example(logps, rows, examples, self.device)

    def write_output(self, folder: Path, base: Path, tokenizer: Any, lora: Any | None, name: str, pad_id: int) -> None:
        """The adapter (PEFT layout), the model, or the reward model (transformers' *ForSequenceClassification)."""
        from llmctl.io.outputs import replacing

        if lora is not None:
            from llmctl.backends.torch.lora import write_peft

            if ui.is_main_process():
                with replacing(folder) as staged:
                    staged.mkdir(parents=True, exist_ok=True)
                    write_peft(staged, self.model, lora, name)
                    tokenizer.save(staged)
            return
        if not hasattr(self.model, "score"):
            self.export(folder)
            if ui.is_main_process():
                from llmctl.run import remember_model

                tokenizer.save(folder)
                remember_model(folder)  # the default model of generate and chat
            return
        if ui.is_main_process():
            write_reward_model(folder, self.model, base, pad_id)
            tokenizer.save(folder)


def write_reward_model(folder: Path, model: Transformer, base: Path, pad_id: int) -> None:
    """The backbone and its score head as transformers' *ForSequenceClassification folder (one label)."""
    from llmctl.io.safetensors import from_torch

    tensors = {k: from_torch(v.detach().float().contiguous()) for k, v in model.state_dict().items()}
    write_reward_folder(folder, model.spec, tensors, base, pad_id)


def load_reward_model(folder: str | Path) -> tuple[Transformer, torch.Tensor, int]:
    """A reward model folder: the backbone (float32, eval), its score head (1, dim) and the padding id it scores by."""
    from llmctl.io.safetensors import to_torch

    spec, tensors, score, pad = read_reward_folder(folder)
    model = Transformer(spec)
    missing, _ = model.load_state_dict({k: to_torch(t).float() for k, t in tensors.items()}, strict=False)
    if [m for m in missing if m != "lm_head.weight"]:
        raise CheckpointError(f"{folder}: tensors missing: {', '.join(missing[:5])}")
    return model.eval(), to_torch(score).float(), pad


@torch.no_grad()
def per_example(values: Callable[[DeviceBatch], torch.Tensor], rows: Any, examples: Sequence[Any],
                device: torch.device = torch.device("cpu")) -> np.ndarray:
    """(N, 2): `values` of each example's two rows (chosen and rejected), a few examples a forward pass."""
    out = []
    for start in range(0, len(examples), BATCH):
        index = list(range(start, min(start + BATCH, len(examples))))
        v = values(DeviceBatch.of(rows.batch(examples, index), device))
        out.append(torch.stack([v[: len(index)], v[len(index):]], 1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def pair_rewards(model: str, examples: Sequence[Any], seq_len: int, pad_id: int, base: str | None = None,
                 adapter: str | None = None) -> tuple[np.ndarray, str]:
    """(N, 2) rewards of each pair's chosen and rejected, and what they are: a reward model's scores, or a policy's
    implicit rewards against `base` (log-probability ratios, DPO's beta left out: it does not change the order)."""
    from llmctl.backends.torch.runtime import Runtime
    from llmctl.data.preferences import Rows
    from llmctl.errors import ConfigError
    from llmctl.io.hf import read_config
    from llmctl.io.hub import resolve_model

    folder = resolve_model(model)
    if is_reward_model(read_config(folder)):
        module, head, pad = load_reward_model(folder)
        rows = Rows("reward", pad, seq_len)
        return per_example(lambda b: reward_scores(module, head, b), rows, examples), "reward model scores"
    if base is None:
        raise ConfigError(f"--model {model} is a language model, not a reward model: its pairwise accuracy is that of "
                          "its implicit reward, which needs the model it was aligned from.",
                          hint="Pass --base DIR (the model before `llmctl align`).")
    rows = Rows("pairs", pad_id, seq_len)
    policy = Runtime().load(model).module
    if adapter is not None:
        from llmctl.backends.torch.lora import apply_adapter

        apply_adapter(policy, adapter)
    reference = Runtime().load(base).module
    if reference.spec.vocab_size != policy.spec.vocab_size:
        raise ConfigError(f"--base {base} has {reference.spec.vocab_size} tokens, --model {model} "
                          f"{policy.spec.vocab_size}; implicit rewards compare models that share a tokenizer.")
    return (per_example(lambda b: sequence_logprobs(policy, b), rows, examples)
            - per_example(lambda b: sequence_logprobs(reference, b), rows, examples)), f"implicit rewards against {base}"
