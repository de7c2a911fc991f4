"""GRPO with LoRA on a built-in task: `llmctl align --method grpo --lora --reward-fn format|exact` against TRL's
GRPOTrainer (PEFT LoRA) with the same model, prompts, group size, batch, completion length, sampling and LoRA
settings, each in its own process.

    python bench/grpo.py [--steps 6] [--group 4] [--batch 8] [--max-tokens 16] [--reward-fn format|exact]
                         [--checkpointing off|on]

Model: SmolLM2-135M-Instruct (the test suite's cached Q4_1 GGUF, converted to a float32 folder by `llmctl convert`).
Prompts: llmctl's built-in tasks (chat messages with an "answer"). Reward: the built-in `format` (the reply has the
answer's form: partial credit) or `exact` (the reply is the answer), the same Python function in both. Activation
checkpointing the same on both sides (off by default; TRL 1.16's GRPOConfig turns it on unless told). LoRA r=8,
alpha 16, all linear layers, fp32, beta 0, lr 5e-5, temperature 1.
Reports completions/s (median step after the first), the share of each step spent sampling, the mean training reward
of the first and last steps, llmctl's held-out reward (greedy) before and after, and this CPU.

An earlier version (reward `exact`, TRL with checkpointing on) measured on a shared machine: llmctl 0.39
completions/s against TRL's 0.31 in one run and 0.12 against 0.16 in a busier one, the reward 0 throughout
(SmolLM2-135M-Instruct answers none of the built-in tasks exactly in 8 tokens at temperature 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align import GGUF, ROOT, cpu  # noqa: E402  (bench/align.py: the same model and CPU line)


def prepare(work: Path, n: int) -> tuple[Path, Path]:
    """The float32 model folder and a JSONL of the first `n` built-in task prompts."""
    model = work / "smollm2-fp32"
    if not model.is_dir():
        subprocess.run([sys.executable, "-m", "llmctl", "convert", str(GGUF), "--out", str(model), "--dtype", "fp32"],
                       check=True, capture_output=True)
    from llmctl.rewards import builtin_prompts

    train, _ = builtin_prompts(0)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record, _ in train[:n]))
    return model, data


def run_llmctl(model: Path, data: Path, out: Path, o: argparse.Namespace) -> dict:
    from typer.testing import CliRunner

    from llmctl.cli import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, [
        "align", "--method", "grpo", "--model", str(model), "--prompts", str(data), "--reward-fn", o.reward_fn,
        "--out", str(out), "--force", "--lora", "--rank", "8", "--alpha", "16", "--targets", "all-linear",
        "--group-size", str(o.group), "--steps", str(o.steps), "--backend", "torch", "train.dtype=fp32",
        f"data.batch_size={o.batch}", f"rl.max_tokens={o.max_tokens}", "optim.lr=5e-5", "optim.warmup_steps=1",
        "train.save_every=0", "data.val_fraction=0.2", f"train.grad_checkpointing={str(o.checkpointing == 'on').lower()}"])
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_s" in r]
    median = statistics.median(r["step_s"] for r in steps[1:])
    return {"completions_s": o.batch / median, "sampling_share": sum(r["sample_s"] for r in steps) / sum(r["step_s"] for r in steps),
            "reward_first": steps[0]["reward"], "reward_last": steps[-1]["reward"], "wall_s": time.perf_counter() - start,
            "held_out_before": records[-1]["reward_before"], "held_out_after": records[-1]["reward_after"]}


def run_trl(model: Path, data: Path, out: Path, o: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmctl.rewards import BUILTIN

    torch.manual_seed(0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    times: list[float] = []
    sampling = [0.0]
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t0)

    def builtin_reward(prompts, completions, answer, **kwargs):
        scores = [BUILTIN[o.reward_fn]("", c[0]["content"] if isinstance(c, list) else c, {"answer": a})
                  for c, a in zip(completions, answer)]
        rewards.append(sum(scores) / len(scores))
        return scores

    generate = GRPOTrainer._generate

    def timed(self, prompts):
        t0 = time.perf_counter()
        try:
            return generate(self, prompts)
        finally:
            sampling[0] += time.perf_counter() - t0

    GRPOTrainer._generate = timed
    start = time.perf_counter()
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=o.batch, num_generations=o.group,
                      max_completion_length=o.max_tokens, max_steps=o.steps, learning_rate=5e-5, beta=0.0,
                      temperature=1.0, report_to=[], save_strategy="no", logging_steps=1000, use_cpu=True, bf16=False,
                      lr_scheduler_type="cosine", warmup_steps=1, dataloader_num_workers=0, disable_tqdm=True,
                      gradient_checkpointing=o.checkpointing == "on")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                          reward_funcs=builtin_reward, train_dataset=Dataset.from_list(records),
                          processing_class=AutoTokenizer.from_pretrained(model),
                          peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
                          callbacks=[Clock()])
    trainer.train()
    return {"completions_s": o.batch / statistics.median(times[1:]), "sampling_share": sampling[0] / sum(times),
            "reward_first": rewards[0], "reward_last": rewards[-1], "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--batch", type=int, default=8, help="completions per step")
    parser.add_argument("--max-tokens", type=int, default=16, help="most new tokens per completion")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--reward-fn", choices=["exact", "format"], default="format",
                        help="the built-in reward, the same function in both (format: partial credit SmolLM2 can earn)")
    parser.add_argument("--checkpointing", choices=["on", "off"], default="off",
                        help="activation checkpointing on both sides (TRL 1.16's GRPOConfig turns it on by default)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-grpo")
    parser.add_argument("--worker", choices=["llmctl", "trl"], help=argparse.SUPPRESS)
    o = parser.parse_args()
    o.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(o.work, o.prompts)
    if o.worker:
        run = run_llmctl if o.worker == "llmctl" else run_trl
        print(json.dumps(run(model, data, o.work / f"run-{o.worker}", o)))
        return
    print(f"CPU: {cpu()}; SmolLM2-135M-Instruct fp32, LoRA r=8 alpha 16 all-linear, GRPO group {o.group}, "
          f"{o.batch} completions/step, <= {o.max_tokens} new tokens, temperature 1, {o.steps} steps, "
          f"reward {o.reward_fn}, activation checkpointing {o.checkpointing} on both sides", flush=True)
    results = {}
    for worker in ("llmctl", "trl"):
        done = subprocess.run([sys.executable, __file__, "--worker", worker, "--steps", str(o.steps), "--group",
                               str(o.group), "--batch", str(o.batch), "--max-tokens", str(o.max_tokens), "--prompts",
                               str(o.prompts), "--work", str(o.work), "--reward-fn", o.reward_fn, "--checkpointing",
                               o.checkpointing], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(f"{worker} failed:\n{done.stderr[-3000:]}")
            continue
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[worker]
        print(f"{worker:7s} {r['completions_s']:.2f} completions/s, {r['sampling_share']:.0%} of the time sampling, "
              f"training reward {r['reward_first']:.3f} (first step) -> {r['reward_last']:.3f} (last), wall {r['wall_s']:.0f} s",
              flush=True)
    if "llmctl" in results:
        r = results["llmctl"]
        print(f"llmctl held-out reward ({o.reward_fn}, greedy, built-in tasks): {r['held_out_before']:.0%} -> {r['held_out_after']:.0%}")
    if len(results) == 2:
        print(f"speed ratio llmctl / TRL: {results['llmctl']['completions_s'] / results['trl']['completions_s']:.2f}x")


if __name__ == "__main__":
    main()
