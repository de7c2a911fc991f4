"""Quality per unit of compute: llmctl vs nanoGPT's CPU "baby GPT" on tiny Shakespeare, same wall time.

    python bench/shakespeare_quality.py [--seconds 180] [--nanogpt DIR]

nanoGPT's split is the last 10% of the file for validation; its loss is in nats per character. llmctl
trains a byte-level BPE model on the first 90% for the same wall time and reports validation loss
per token converted to nats per character (tokens / characters of the validation split). With
`--nanogpt DIR` (a copy of karpathy/nanoGPT fetched outside this repository), nanoGPT's own
`train.py` runs in the same session with the settings nanoGPT's README gives for a CPU:
4 layers, 4 heads, width 128, context 64, batch 12, 2000 iterations, no dropout.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
RECIPE = ["model.dim=192", "model.n_layers=4", "model.n_heads=6", "data.vocab_size=1024", "data.seq_len=256",
          "data.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=50", "optim.weight_decay=0.1"]


def run_llmctl(seconds: float, work: Path, train: Path, val: Path) -> dict:
    base = [sys.executable, "-m", "llmctl", "train", *RECIPE, f"data.train={train}", f"data.val={val}"]
    # Calibrate: two short runs give the wall time of a step (logging included) and what the process spends
    # besides steps (start-up, tokenizer, token cache, final evaluation and save); the step count that fills the
    # budget, all of it counted, follows.
    walls = {}
    for probe_steps in (1, 10, 90):  # the first fills the token cache, which the others and the real run then read
        start = time.perf_counter()
        subprocess.run([*base, f"train.steps={probe_steps}", f"train.eval_every={probe_steps}", "train.eval_batches=1000",
                        "train.save_every=0", "--out", str(work / f"probe{probe_steps}")], check=True, capture_output=True)
        walls[probe_steps] = time.perf_counter() - start
    seconds_per_step = (walls[90] - walls[10]) / 80  # 80 steps apart: start-up noise of a second or two matters little
    overhead = walls[10] - 10 * seconds_per_step
    steps = int((seconds - overhead) * 0.88 / seconds_per_step)  # room for the machine slowing down mid-run
    start = time.perf_counter()
    subprocess.run([*base, f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=1000",
                    "train.save_every=0", "--out", str(work / "run")], check=True, capture_output=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    from llmctl.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(work / "run" / "model")
    text = val.read_text()
    tokens_per_char = len(tokenizer.encode(text, add_special_tokens=False)) / len(text)
    val_loss = records[-1]["val_loss"]
    return {"steps": steps, "wall_s": wall, "val_loss_per_token": val_loss, "tokens_per_char": tokens_per_char,
            "val_nats_per_char": val_loss * tokens_per_char, "curve": [(r["step"], r["loss"]) for r in records[:: max(1, steps // 20)]]}


def run_nanogpt(folder: Path, corpus: Path, work: Path) -> dict:
    copy = work / "nanogpt"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".git"))
    data = copy / "data" / "shakespeare_char"
    shutil.copyfile(corpus, data / "input.txt")  # prepare.py downloads only when input.txt is missing
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    args = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=100",
            "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
            "--lr_decay_iters=2000", "--dropout=0.0", "--eval_interval=250", "--always_save_checkpoint=False"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *args], cwd=copy, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", done.stdout)
    return {"wall_s": wall, "val_nats_per_char": float(evals[-1][2]), "evals": evals}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=None, help="llmctl's budget (default: nanoGPT's wall time, else 180)")
    parser.add_argument("--nanogpt", type=Path, default=None, help="a copy of karpathy/nanoGPT outside this repository")
    parser.add_argument("overrides", nargs="*", help="extra llmctl recipe overrides (key=value)")
    opts = parser.parse_args()
    RECIPE.extend(opts.overrides)
    corpus = SHARED / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.txt").write_text(text[:cut])
        (work / "val.txt").write_text(text[cut:])
        peer = run_nanogpt(opts.nanogpt, corpus, work) if opts.nanogpt else None
        budget = opts.seconds or (peer["wall_s"] if peer else 180.0)
        ours = run_llmctl(budget, work, work / "train.txt", work / "val.txt")
    if peer:
        print(f"nanoGPT baby GPT: val {peer['val_nats_per_char']:.3f} nats/char in {peer['wall_s']:.0f} s")
    print(f"llmctl: val {ours['val_nats_per_char']:.3f} nats/char ({ours['val_loss_per_token']:.3f} nats/token, "
          f"{ours['tokens_per_char']:.3f} tokens/char) in {ours['wall_s']:.0f} s, {ours['steps']} steps")
    if peer:
        print(f"ratio (nanoGPT / llmctl loss): {peer['val_nats_per_char'] / ours['val_nats_per_char']:.3f}")
    print("llmctl curve (step, train loss/token):", ours["curve"])


if __name__ == "__main__":
    main()
