"""`llmctl train` refuses nonsense settings before it writes anything, and --resume survives damaged run files."""

from __future__ import annotations

import json

import pytest

from conftest import BACKENDS
from test_train import TINY, losses, run_train


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["data.batch_size=0"], "data.batch_size=0"),
        (["optim.lr=-1"], "optim.lr=-1"),
        (["optim.lr=0"], "optim.lr=0"),
        (["train.eval_every=0"], "train.eval_every=0"),
        (["train.grad_accum=0"], "train.grad_accum=0"),
        (["train.steps=-3"], "train.steps=-3"),
        (["data.seq_len=1"], "data.seq_len=1"),
        (["optim.beta2=1.5"], "optim.beta2=1.5"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
        (["train.eval_batches=0"], "train.eval_batches=0"),
    ],
)
def test_nonsense_settings_are_refused_before_anything_is_written(args, key, tmp_path):
    out = tmp_path / "run"
    # the data does not even exist: the recipe is checked first
    code, text = run_train(*TINY, f"data.train={tmp_path / 'absent.txt'}", *args, "--out", str(out))
    assert code == 1, text
    assert key in text and "Traceback" not in text, text
    assert not out.exists()


def test_all_problems_are_reported_at_once(tmp_path):
    code, text = run_train(*TINY, "data.batch_size=0", "optim.lr=-1", "train.grad_accum=0", "--out", str(tmp_path / "run"))
    assert code == 1
    assert all(k in text for k in ("data.batch_size=0", "optim.lr=-1", "train.grad_accum=0")), text


def test_warmup_longer_than_the_run_is_fine(small_corpus, tmp_path):
    code, text = run_train(*TINY, f"data.train={small_corpus}", "train.steps=2", "optim.warmup_steps=50",
                           "--out", str(tmp_path / "run"))
    assert code == 0, text


def test_a_failed_run_leaves_no_folder_that_blocks_the_retry(small_corpus, tmp_path):
    out = tmp_path / "run"
    code, text = run_train(*TINY, f"data.train={tmp_path / 'typo.txt'}", "train.steps=2", "--out", str(out))
    assert code == 1 and "no such file" in text
    assert not out.exists()
    code, text = run_train(*TINY, f"data.train={small_corpus}", "train.steps=2", "--out", str(out))
    assert code == 0, text


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_resume_keeps_the_config(backend, small_corpus, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"data.train={small_corpus}", "train.steps=4", "train.stop_at=2", "train.save_every=2"]
    assert run_train(*common, "--out", str(out), backend=backend)[0] == 0
    before = (out / "config.yaml").read_text()
    code, text = run_train(*common, "data.seq_len=32", "--out", str(out), "--resume", backend=backend)
    assert code == 1 and "data.seq_len: 64 -> 32" in text, text
    assert (out / "config.yaml").read_text() == before


def test_resume_drops_a_torn_metrics_line_and_skips_a_corrupt_checkpoint(small_corpus, tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    common = [*TINY, f"data.train={small_corpus}", "train.steps=6", "train.save_every=2", "train.keep_last=3",
              "train.eval_every=2"]
    assert run_train(*common, "--out", str(straight))[0] == 0
    assert run_train(*common, "train.stop_at=4", "--out", str(out))[0] == 0
    # a kill while writing: half a metrics line, and the newest checkpoint's state.json empty
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')
    (out / "checkpoints" / "step-00000004" / "state.json").write_text("")
    code, text = run_train(*common, "--out", str(out), "--resume")
    assert code == 0, text
    assert "step-00000004/state.json" in text and "step-00000002" in text
    assert losses(out) == losses(straight)  # resumed from step 2: the same run


def test_resume_with_no_readable_checkpoint_says_so(small_corpus, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, f"data.train={small_corpus}", "train.steps=4", "train.save_every=2", "train.stop_at=2"]
    assert run_train(*common, "--out", str(out))[0] == 0
    (out / "checkpoints" / "step-00000002" / "state.json").write_text("{not json")
    code, text = run_train(*common, "--out", str(out), "--resume")
    assert code == 1 and "no complete checkpoint" in text and "Traceback" not in text, text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
