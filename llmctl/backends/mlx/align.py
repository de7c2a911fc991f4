"""The MLX side of `llmctl align`: the policy loaded for preference training (full weights, LoRA adapters on a frozen
base, or a reward model's score head), a frozen reference beside it or reference log-probabilities computed once, and
the output folder (adapter, model or reward model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from llmctl import ui
from llmctl.backends.mlx.engine import Engine
from llmctl.backends.mlx.model import Transformer
from llmctl.backends.mlx.objectives import DeviceBatch, sequence_logprobs
from llmctl.backends.mlx.preference import BradleyTerry, Preference, adapters_off, add_score_head, reward_scores
from llmctl.errors import CheckpointError
from llmctl.preference import PreferenceSettings, read_reward_folder, write_reward_folder

BATCH = 8  # examples per forward when computing reference log-probabilities


class AlignEngine(Engine):
    def setup(self, base: Path, lora: Any | None, reward: bool) -> None:
        """The policy: every weight trained, LoRA adapters on a frozen base, or a reward model (a score head)."""
        if lora is not None:
            from llmctl.backends.mlx.lora import add_adapters, is_adapter_param

            self.load(base, trainable=is_adapter_param, prepare=lambda m: add_adapters(m, lora))
        else:
            self.load(base, prepare=add_score_head if reward else None)

    def trained_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def objective(self, settings: PreferenceSettings, reference: Any) -> Any:
        return BradleyTerry() if settings.method == "reward" else Preference(settings, reference)

    def reference_logps(self, reference: Any, rows: Any, examples: Sequence[Any]) -> np.ndarray:
        """(N, 2) summed response log-probabilities of each example's two rows under the reference (a model, or
        "adapters": the policy with its adapters off, which before training is the starting model)."""

        def logps(batch: DeviceBatch) -> mx.array:
            if reference != "adapters":
                return sequence_logprobs(reference, batch)
            with adapters_off(self.model):
                return sequence_logprobs(self.model, batch)

        return per_example(logps, rows, examples)

    def write_output(self, folder: Path, base: Path, tokenizer: Any, lora: Any | None, name: str, pad_id: int) -> None:
        """The adapter (PEFT layout, as finetune-lora writes it), the reward model (transformers'
        *ForSequenceClassification), or the aligned model folder with the tokenizer, which becomes the default model
        of generate and chat."""
        if lora is not None:
            from llmctl.backends.mlx.lora import write_peft
            from llmctl.io.outputs import replacing

            if ui.is_main_process():
                with replacing(folder) as staged:
                    staged.mkdir(parents=True, exist_ok=True)
                    write_peft(staged, self.model, lora, name)
                    tokenizer.save(staged)
            return
        if "score" in self.model:
            if ui.is_main_process():
                write_reward_model(folder, self.model, base, pad_id)
                tokenizer.save(folder)
            return
        self.export(folder)
        if ui.is_main_process():
            from llmctl.run import remember_model

            tokenizer.save(folder)
            remember_model(folder)


def write_reward_model(folder: Path, model: Transformer, base: Path, pad_id: int) -> None:
    """The backbone and its score head as transformers' *ForSequenceClassification folder (one label, float32)."""
    from llmctl.io.safetensors import from_mlx

    tensors = {k: from_mlx(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    write_reward_folder(folder, model.spec, tensors, base, pad_id)


def load_reward_model(folder: str | Path) -> tuple[Transformer, mx.array, int]:
    """A reward model folder (written by either backend): the backbone (float32, eval, frozen), its score head
    (1, dim) and the padding id it scores by."""
    from llmctl.io.safetensors import to_mlx

    spec, tensors, score, pad = read_reward_folder(folder)
    model = Transformer(spec)
    weights = {k: to_mlx(t).astype(mx.float32) for k, t in tensors.items()}
    missing = [k for k, _ in tree_flatten(model.parameters()) if k not in weights and k != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{folder}: tensors missing: {', '.join(missing[:5])}")
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    model.eval()
    mx.eval(model.parameters())
    return model, to_mlx(score).astype(mx.float32), pad


def per_example(values: Callable[[DeviceBatch], mx.array], rows: Any, examples: Sequence[Any]) -> np.ndarray:
    """(N, 2): `values` of each example's two rows (chosen and rejected), a few examples a forward pass."""
    out = []
    for start in range(0, len(examples), BATCH):
        index = list(range(start, min(start + BATCH, len(examples))))
        v = mx.stop_gradient(values(DeviceBatch.of(rows.batch(examples, index)))).astype(mx.float32)
        out.append(np.stack([np.array(v[: len(index)]), np.array(v[len(index):])], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def pair_rewards(model: str, examples: Sequence[Any], seq_len: int, pad_id: int, base: str | None = None,
                 adapter: str | None = None) -> tuple[np.ndarray, str]:
    """(N, 2) rewards of each pair's chosen and rejected, and what they are: a reward model's scores, or a policy's
    implicit rewards against `base` (log-probability ratios, DPO's beta left out: it does not change the order)."""
    from llmctl.backends import attach_adapter
    from llmctl.backends.mlx.runtime import Runtime
    from llmctl.data.preferences import Rows
    from llmctl.errors import ConfigError
    from llmctl.io.hf import read_config
    from llmctl.io.hub import resolve_model
    from llmctl.preference import is_reward_model

    folder = resolve_model(model)
    if is_reward_model(read_config(folder)):
        module, head, pad = load_reward_model(folder)
        return per_example(lambda b: reward_scores(module, head, b), Rows("reward", pad, seq_len), examples), \
            "reward model scores"
    if base is None:
        raise ConfigError(f"--model {model} is a language model, not a reward model: its pairwise accuracy is that of "
                          "its implicit reward, which needs the model it was aligned from.",
                          hint="Pass --base DIR (the model before `llmctl align`).")
    rows = Rows("pairs", pad_id, seq_len)
    policy = Runtime().load(model)
    if adapter is not None:
        policy = attach_adapter(policy, adapter, "mlx")
    reference = Runtime().load(base).module
    if reference.spec.vocab_size != policy.spec.vocab_size:
        raise ConfigError(f"--base {base} has {reference.spec.vocab_size} tokens, --model {model} "
                          f"{policy.spec.vocab_size}; implicit rewards compare models that share a tokenizer.")
    return (per_example(lambda b: sequence_logprobs(policy.module, b), rows, examples)
            - per_example(lambda b: sequence_logprobs(reference, b), rows, examples)), f"implicit rewards against {base}"
