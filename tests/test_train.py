"""`llmctl train` on both backends: learning, exact resume, the written model, clear errors for bad input."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import BACKENDS
from llmctl.cli import app

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "data.seq_len=64", "data.batch_size=16",
        "data.vocab_size=512", "train.dtype=fp32", "optim.lr=3e-3", "optim.warmup_steps=5"]


def run_train(*args: str, backend: str = "torch") -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", "--backend", backend, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_falls_below_unigram_entropy(backend, small_corpus, tmp_path):
    out = tmp_path / "run"
    steps = 200
    code, text = run_train(*TINY, f"data.train={small_corpus}", f"train.steps={steps}", "train.eval_every=100", "optim.lr=1e-2",
                           "train.save_every=0", "--out", str(out), backend=backend)
    assert code == 0, text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(records) == steps and len(val) == 2
    # The unigram entropy of the held-out tokens is what a model that ignores context can reach.
    from llmctl.data.text import expand_sources, split, tokenize_files
    from llmctl.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(out / "model")
    held_out = split(tokenize_files(expand_sources([str(small_corpus)]), tokenizer), 0.05, 64).val
    counts = np.array(list(Counter(held_out.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    assert val[-1] < entropy - 0.4, f"validation loss {val[-1]:.3f} vs unigram entropy {entropy:.3f}"
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    for key in ("lr", "grad_norm", "tok_s", "mfu"):
        assert key in records[-1]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "config.yaml").read_text().count("seq_len: 64") == 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_mixed_precision_follows_fp32(backend, small_corpus, tmp_path):
    """The same run in bf16 mixed precision (torch: autocast, with the eager attention and the concatenated
    projections of the reduced-precision path) learns as fp32 does: the mean loss of its last 20 steps is within
    0.1 nats of fp32's, and both fell by more than 1 nat."""
    curves = {}
    for dtype in ("fp32", "bf16"):
        args = [*TINY, f"train.dtype={dtype}", f"data.train={small_corpus}", "train.steps=80", "train.eval_every=1000",
                "train.save_every=0", "--out", str(tmp_path / dtype)]
        code, text = run_train(*args, backend=backend)
        assert code == 0, text
        curves[dtype] = losses(tmp_path / dtype)
    tail = {d: float(np.mean(c[-20:])) for d, c in curves.items()}
    assert abs(tail["bf16"] - tail["fp32"]) < 0.1, tail
    assert all(c[0] - tail[d] > 1.0 for d, c in curves.items()), tail


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_exact(backend, small_corpus, tmp_path):
    common = [*TINY, f"data.train={small_corpus}", "train.steps=8", "train.save_every=4", "train.eval_every=4"]
    code, text = run_train(*common, "--out", str(tmp_path / "straight"), backend=backend)
    assert code == 0, text
    code, text = run_train(*common, "train.stop_at=4", "--out", str(tmp_path / "split"), backend=backend)
    assert code == 0, text
    assert len(losses(tmp_path / "split")) == 4 and not (tmp_path / "split" / "model").exists()
    code, text = run_train(*common, "--out", str(tmp_path / "split"), "--resume", backend=backend)
    assert code == 0, text
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_with_incompatible_recipe_is_refused(backend, small_corpus, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"data.train={small_corpus}", "train.steps=4", "train.stop_at=2", "train.save_every=2"]
    assert run_train(*common, "--out", str(out), backend=backend)[0] == 0
    code, text = run_train(*common, "model.n_layers=3", "--out", str(out), "--resume", backend=backend)
    assert code == 1
    assert "cannot resume" in text and "model.n_layers: 2 -> 3" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_model_matches_transformers(backend, small_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from llmctl.backends import get_backend

    out = tmp_path / "run"
    code, text = run_train(*TINY, f"data.train={small_corpus}", "train.steps=3", "--out", str(out), backend=backend)
    assert code == 0, text
    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tokens = [[0, 17, 42, 7, 3, 99, 200]]
    with torch.no_grad():
        want = ref(torch.tensor(tokens)).logits.numpy()
    got = get_backend(backend).load(out / "model").logits(tokens)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert tok("def f(x):\n    return x")["input_ids"][1:] == _ours(out / "model", "def f(x):\n    return x")


def _ours(folder: Path, text: str) -> list[int]:
    from llmctl.tokenizer import Tokenizer

    return Tokenizer.from_dir(folder).encode(text, add_special_tokens=False)


def test_existing_run_folder_is_refused(small_corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = run_train(*TINY, f"data.train={small_corpus}", "train.steps=2", "--out", str(out))
    assert code == 1 and "already exists" in text and "--force" in text
    assert (out / "keep.txt").read_text() == "precious"


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"data.train={small_corpus}", "train.steps=12", "train.save_every=2", "train.max_bad_steps=3",
              "optim.grad_clip=0", "optim.warmup_steps=0"]
    # An absurd learning rate blows the weights up after the first steps.
    code, text = run_train(*common, "optim.lr=1e30", "--out", str(out))
    assert code == 1 and "non-finite loss" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r.get("skipped")) == 3
    # The last checkpoint written before the failure is complete and loads; no half-written folder is left.
    saved = sorted((out / "checkpoints").iterdir())
    assert saved and all(p.name.startswith("step-") for p in saved)
    state = json.loads((saved[-1] / "state.json").read_text())
    assert state["step"] == int(saved[-1].name.split("-")[1])
    from llmctl.backends import get_backend

    assert get_backend("torch").load(saved[-1] / "model").spec.dim == 64


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("empty", [], "holds no text"),
        ("missing", [], "no such file or folder"),
        ("jsonl", [], 'bad.jsonl:2: "text" is missing'),
        ("ok", ["optim.lrr=1e-3"], "did you mean optim.lr"),
        ("ok", ["data.seq_len=100000"], "holds too few tokens|fewer than one sequence|too few"),
        ("ok", ["data.batch_size=15", "train.grad_accum=2"], "does not split"),
        ("ok", ["train.dtype=fp64"], "expected one of auto, fp32, bf16, fp16"),
    ],
)
def test_bad_input_gets_a_clear_error(setup, args, message, small_corpus, tmp_path):
    import re

    data = {"ok": small_corpus, "missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "jsonl": tmp_path / "bad.jsonl"}[setup]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    code, text = run_train(*TINY, f"data.train={data}", "train.steps=2", *args, "--out", str(tmp_path / "run"))
    assert code == 1, text
    assert re.search(message, text), text
    if setup == "jsonl":
        assert f"{tmp_path / 'bad.jsonl'}:2" in text


def test_sequence_longer_than_model_context_is_refused(small_corpus, tmp_path):
    from conftest import make_hf_model

    make_hf_model("llama", tmp_path / "base", max_position_embeddings=32, vocab_size=300)
    from llmctl.tokenizer import Tokenizer

    Tokenizer.train_bpe([p for p in small_corpus.iterdir()], 256 + 5 + 20).save(tmp_path / "base")
    code, text = run_train(*TINY, f"data.train={small_corpus}", f"model.from={tmp_path / 'base'}", "--out", str(tmp_path / "run"))
    assert code == 1 and "does not fit the model's context of 32 tokens" in text, text


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_of_experts_trains_and_loads_in_transformers(backend, small_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    code, text = run_train(*TINY, "model.n_experts=4", "model.experts_per_token=2", f"data.train={small_corpus}",
                           "train.steps=6", "--out", str(out), backend=backend)
    assert code == 0, text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["aux_loss"] < 1 for r in records)  # coefficient 0.01 x a loss near 1 when balanced
    assert records[-1]["loss"] < records[0]["loss"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(model).__name__ == "MixtralForCausalLM"
