"""bf16 mixed precision against fp32: the same run's loss curve in both, on the throughput benchmark's model.

    python bench/train_curve.py [--steps 300] [--every 25]

Trains the Llama config of bench/train_throughput.py (vocab 8192, hidden 384, 6 layers, sequence 256, micro-batch 8)
on ../shared/data/tinyshakespeare.txt with the same seed and data order, once with train.dtype=fp32 and once with
train.dtype=bf16, through `llmctl train`; prints the mean training loss of each window of steps in both, their
difference, and both validation losses. "Within noise": the window means differ by less than the steps' own spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = ["model.dim=384", "model.n_layers=6", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_dim=1024",
         "model.tie_embeddings=false", "model.vocab_size=8192", "data.vocab_size=8192", "data.seq_len=256", "data.batch_size=8"]


def run(dtype: str, steps: int, work: Path) -> list[dict]:
    out = work / dtype
    cmd = [sys.executable, "-m", "llmctl", "train", *MODEL, f"data.train={SHARED / 'data' / 'tinyshakespeare.txt'}",
           f"train.steps={steps}", f"train.dtype={dtype}", f"train.eval_every={steps}", "train.save_every=0",
           "optim.lr=1e-3", "--backend", "torch", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = {dtype: run(dtype, opts.steps, Path(tmp)) for dtype in ("fp32", "bf16")}
    print(f"{'steps':>9s} {'fp32':>7s} {'bf16':>7s} {'diff':>7s} {'spread':>7s}")
    worst = 0.0
    for start in range(0, opts.steps, opts.every):
        window = {d: [r["loss"] for r in c[start : start + opts.every]] for d, c in curves.items()}
        a, b = statistics.mean(window["fp32"]), statistics.mean(window["bf16"])
        spread = statistics.stdev(window["fp32"]) if len(window["fp32"]) > 1 else 0.0
        worst = max(worst, abs(a - b) / spread if spread else 0.0)
        print(f"{start + 1:4d}-{start + opts.every:<4d} {a:7.3f} {b:7.3f} {b - a:+7.3f} {spread:7.3f}")
    step_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(curves["fp32"], curves["bf16"]))
    print(f"largest difference of one step's loss: {step_diff:.4f}")
    val = {d: next(r["val_loss"] for r in reversed(c) if "val_loss" in r) for d, c in curves.items()}
    rate = {d: statistics.median(r["tok_s"] for r in c[2:]) for d, c in curves.items()}
    print(f"validation loss: fp32 {val['fp32']:.4f}, bf16 {val['bf16']:.4f} ({val['bf16'] - val['fp32']:+.4f}); "
          f"largest window difference {worst:.2f} x the window's spread; tokens/s fp32 {rate['fp32']:.0f}, bf16 {rate['bf16']:.0f}")


if __name__ == "__main__":
    main()
