"""`llmctl train` on the shared training loop keeps the per-step losses of the loop it replaced.

tests/data/train_losses.json holds the losses (and final validation loss) of short float32 runs recorded with the
code before the loop moved to llmctl/training/ (commit f8b123c); each backend must reproduce them within 1e-4.
Re-record only on purpose: LLMCTL_RECORD_LOSSES=1 pytest tests/test_train_regression.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import BACKENDS
from test_train import TINY, run_train

RECORDED = Path(__file__).parent / "data" / "train_losses.json"
CASES = {
    # accumulation over two micro-batches, grouped-query attention, tied head
    "dense": ["model.n_kv_heads=2", "train.grad_accum=2", "train.steps=20"],
    # MoE with its load-balancing loss, an untied head
    "moe": ["model.n_experts=4", "model.tie_embeddings=false", "train.steps=10"],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_match_the_loop_before(backend, case, small_corpus, tmp_path):
    out = tmp_path / "run"
    code, text = run_train(*TINY, *CASES[case], f"data.train={small_corpus}", "train.eval_every=1000",
                           "train.save_every=0", "--out", str(out), backend=backend)
    assert code == 0, text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = {"loss": [r["loss"] for r in records], "val_loss": records[-1]["val_loss"],
           "aux_loss": [r["aux_loss"] for r in records if "aux_loss" in r]}
    key = f"{backend}/{case}"
    if os.environ.get("LLMCTL_RECORD_LOSSES"):
        saved = json.loads(RECORDED.read_text()) if RECORDED.is_file() else {}
        RECORDED.write_text(json.dumps(saved | {key: got}, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(RECORDED.read_text())[key]
    assert len(got["loss"]) == len(want["loss"])
    for name in ("loss", "aux_loss"):
        for step, (a, b) in enumerate(zip(got[name], want[name]), 1):
            assert abs(a - b) < 1e-4, f"{name} at step {step}: {a} vs recorded {b}"
    assert abs(got["val_loss"] - want["val_loss"]) < 1e-4
