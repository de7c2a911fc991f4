"""PPO (`llmctl align --method ppo`) resumes exactly: stopped after a rollout's epochs and resumed, a run samples the
same rollouts and ends with the weights an uninterrupted one ends with, on each backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import BACKENDS, SHARED, needs_shared
from llmctl.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = SHARED / "models" / "stories260K-hf"
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom", "One sunny day", "The big tree", "A small bird"]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """A reward model folder (stories260K with a random score head), as `align --method reward` writes it."""
    from llmctl.backends.torch.align import write_reward_model
    from llmctl.backends.torch.preference import add_score_head
    from llmctl.backends.torch.runtime import Runtime

    folder = tmp_path_factory.mktemp("rm") / "model"
    torch.manual_seed(0)
    model = Runtime().load(BASE).module
    add_score_head(model)
    write_reward_model(folder, model, BASE, 0)
    return folder


@needs_shared
@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_resume_is_exact(tmp_path, reward_folder, backend):
    from safetensors.numpy import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def run(out, *extra):
        result = CliRunner().invoke(app, [
            "align", "--method", "ppo", "--model", str(BASE), "--prompts", str(prompts), "--reward", str(reward_folder),
            "--out", str(tmp_path / out), "--backend", backend, "--steps", "8", "data.batch_size=2", "rl.max_tokens=6",
            "rl.ppo_epochs=4", "optim.lr=1e-3", "train.save_every=4", "train.dtype=fp32", "data.val_fraction=0.2", *extra])
        assert result.exit_code == 0, result.output
        return [{k: r[k] for k in ("step", "loss", "reward", "value_loss", "grad_norm")}
                for r in map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    straight = run("a")
    assert len(straight) == 8 and straight[0]["reward"] != straight[4]["reward"]  # two rollouts
    run("b", "train.stop_at=4")
    assert run("b", "--resume") == straight
    a, b = load_file(tmp_path / "a" / "model" / "model.safetensors"), load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and not [k for k in a if k.startswith("v_head")]
    assert all(np.array_equal(a[k], b[k]) for k in a)
