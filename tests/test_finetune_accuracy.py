"""On the built-in tasks (llmctl.data.tasks: sums, sorting digits, reversing and counting letters, capitals), LoRA on a
small pretrained model raises held-out exact match well above where it starts, on both backends, and QLoRA on a
4-bit base gets within 5 points of LoRA.

The model is stories260K (shared/models/stories260K-hf, Karpathy's 260K-parameter TinyStories Llama): it has never
seen these tasks nor a chat template, and its tokenizer lacks ChatML's tokens, which finetune-lora adds (their
embedding rows train with the adapters). `llmctl finetune-lora` with no --data trains on the generated tasks and
checks greedy answers to 50 held-out questions before and after (metrics.jsonl). Measured with the settings below
(AMD EPYC, AVX2): torch LoRA 0% -> 14%, MLX LoRA 0% -> 16%, torch QLoRA 4-bit 0% -> 16%.
The bar is 10% (5 of 50), a margin of two answers for other CPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED, needs_shared

BASE = SHARED / "models" / "stories260K-hf"
SETTINGS = ["--rank", "16", "--alpha", "32", "--steps", "120", "data.seq_len=128", "data.batch_size=8", "optim.lr=5e-3",
            "train.dtype=fp32", "train.eval_every=1000", "train.save_every=1000"]
MIN_AFTER = 0.10
RUNS: dict[tuple[str, str], dict] = {}
FOLDERS: dict[tuple[str, str], Path] = {}  # each run's folder (test_grpo starts from the fine-tuned torch model)


def _exact_match(tmp_path_factory, backend: str, quantize: str = "") -> dict:
    """exact_match_before / exact_match_after of one run (each configuration runs once per session)."""
    key = (backend, quantize)
    if key not in RUNS:
        from typer.testing import CliRunner

        from llmctl.cli import app

        out = tmp_path_factory.mktemp(f"tasks-{backend}{quantize}")
        extra = ["--quantize-base", quantize] if quantize else []
        result = CliRunner().invoke(app, ["finetune-lora", "--model", str(BASE), "--out", str(out / "run"), "--backend",
                                          backend, *extra, *SETTINGS])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        RUNS[key] = next(r for r in records if "exact_match_after" in r)
        FOLDERS[key] = out / "run"
    return RUNS[key]


def finetuned_run(tmp_path_factory, backend: str = "torch") -> Path:
    """The run folder of the LoRA fine-tune above (run once per session, whichever test asks first)."""
    _exact_match(tmp_path_factory, backend)
    return FOLDERS[(backend, "")]


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_lora_raises_held_out_exact_match_on_the_builtin_tasks(tmp_path_factory, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    got = _exact_match(tmp_path_factory, backend)
    assert got["exact_match_before"] == 0.0  # no answer right before: the model never saw the tasks or ChatML
    assert got["exact_match_after"] >= MIN_AFTER, got


@needs_shared
@pytest.mark.slow
def test_qlora_4bit_is_within_5_points_of_lora(tmp_path_factory):
    lora = _exact_match(tmp_path_factory, "torch")
    qlora = _exact_match(tmp_path_factory, "torch", "4")
    assert qlora["exact_match_after"] >= MIN_AFTER, qlora
    assert qlora["exact_match_after"] >= lora["exact_match_after"] - 0.05, (qlora, lora)
