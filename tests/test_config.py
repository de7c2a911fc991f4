"""Recipes and overrides: precedence, typing, aliases, and errors that name the key or line."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.commands.train import DType, TrainConfig
from llmctl.config import find_recipe, load_recipe, recipe_names, to_yaml
from llmctl.errors import ConfigError


def test_precedence_defaults_recipe_flags_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 3e-4\n  beta2: 0.99\ntrain:\n  steps: 50\nout: runs/from-recipe\n")
    cfg = load_recipe(TrainConfig, "train", str(recipe), ["train.steps=7"], {"out": Path("runs/from-flag")})
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML reads 3e-4 as a string
    assert cfg.optim.beta2 == 0.99
    assert cfg.train.steps == 7                      # override beats recipe
    assert cfg.out == Path("runs/from-flag")         # flag beats recipe
    assert cfg.optim.weight_decay == TrainConfig().optim.weight_decay  # untouched default


def test_values_are_coerced_to_field_types():
    cfg = load_recipe(TrainConfig, "train", None, ["train.dtype=bf16", "model.tie_embeddings=false",
                                                    "data.train=a.txt,b/", "model.from=org/name", "train.steps=1e3"])
    assert cfg.train.dtype is DType.bf16
    assert cfg.model.tie_embeddings is False
    assert cfg.data.train == ["a.txt", "b/"]
    assert cfg.model.from_ == "org/name"
    assert cfg.train.steps == 1000


def test_all_problems_reported_at_once_with_suggestions():
    with pytest.raises(ConfigError) as e:
        load_recipe(TrainConfig, "train", None, ["optim.lrr=1", "train.steps=many", "train.dtype=fp64"])
    text = str(e.value)
    assert "did you mean optim.lr" in text
    assert "train.steps='many': expected int" in text
    assert "expected one of auto, fp32, bf16, fp16" in text


def test_bad_override_syntax_and_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(TrainConfig, "train", None, ["optim.lr"])
    with pytest.raises(ConfigError, match="no recipe named 'tinny'.*") as e:
        load_recipe(TrainConfig, "train", "tinny")
    assert "tiny" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_recipe(TrainConfig, "train", str(bad))


def test_named_recipes_resolve_and_resolved_config_round_trips(tmp_path):
    assert "tiny" in recipe_names("train")
    assert find_recipe("train", "tiny").name == "tiny.yaml"
    cfg = load_recipe(TrainConfig, "train", "tiny", ["optim.lr=5e-4", "data.train=x.txt", "model.from=some/model"])
    assert cfg.data.batch_size == 16 and cfg.optim.lr == 5e-4
    # The resolved config written next to a run reproduces it exactly when used as a recipe.
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    assert load_recipe(TrainConfig, "train", str(tmp_path / "resolved.yaml")) == cfg
