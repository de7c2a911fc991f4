"""The MLX side of `llmctl align`: the policy loaded for preference training (full weights, the pair methods), a
frozen reference beside it, and the aligned model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx.utils import tree_flatten

from llmctl import ui
from llmctl.backends.mlx.engine import Engine
from llmctl.backends.mlx.preference import Preference
from llmctl.preference import PreferenceSettings


class AlignEngine(Engine):
    def setup(self, base: Path, lora: Any | None, reward: bool) -> None:
        """The policy, every weight trained (align refuses --lora and --method reward on MLX before this)."""
        self.load(base)

    def trained_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def objective(self, settings: PreferenceSettings, reference: Any) -> Any:
        return Preference(settings, reference)

    def write_output(self, folder: Path, base: Path, tokenizer: Any, lora: Any | None, name: str, pad_id: int) -> None:
        """The aligned model folder, with the tokenizer; it becomes the default model of generate and chat."""
        self.export(folder)
        if ui.is_main_process():
            from llmctl.run import remember_model

            tokenizer.save(folder)
            remember_model(folder)
