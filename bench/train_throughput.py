"""Training throughput: llmctl's train loop against a plain `transformers` loop and an `mlx-lm` loop, same run.

    python bench/train_throughput.py [--steps 12] [--rounds 3] [--backends torch,mlx] [--dtypes fp32,bf16]

Llama config of issue #4: vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024, sequence 256,
micro-batch 8, AdamW. llmctl is run through its real `llmctl train` command (metrics.jsonl gives tokens/s);
the peers run the same model shape on random tokens. Reports tokens/s, the ratio, MFU against this
machine's measured matmul peak, and peak resident memory of each run (a separate process each).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=1024, max_position_embeddings=256, tie_word_embeddings=False)
SEQ, BATCH = 256, 8
SHARED = Path(__file__).resolve().parents[2] / "shared"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def transformers_loop(steps: int, dtype: str, compile_: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa")).train()
    if compile_:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    x = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"tok_s": BATCH * SEQ / statistics.median(times[2:]), "peak_rss_mb": _peak_rss_mb()}


def mlx_lm_loop(steps: int, dtype: str) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=CONFIG["hidden_size"], num_hidden_layers=CONFIG["num_hidden_layers"],
                           intermediate_size=CONFIG["intermediate_size"], num_attention_heads=CONFIG["num_attention_heads"],
                           num_key_value_heads=CONFIG["num_key_value_heads"], rms_norm_eps=1e-5, vocab_size=CONFIG["vocab_size"],
                           tie_word_embeddings=False)
    model = llama.Model(args)
    if dtype == "bf16":
        model.set_dtype(mx.bfloat16)
    opt = optim.AdamW(learning_rate=3e-4, weight_decay=0.1)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x).astype(mx.float32), y).mean()

    grad_fn = nn.value_and_grad(model, loss_fn)
    x = mx.random.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, grads = grad_fn(model, x[:, :-1], x[:, 1:])
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        times.append(time.perf_counter() - t0)
    return {"tok_s": BATCH * SEQ / statistics.median(times[1:]), "peak_rss_mb": _peak_rss_mb()}


def llmctl_run(steps: int, dtype: str, backend: str, compile_: bool, corpus: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["model.dim=384", "model.n_layers=6", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_dim=1024",
                "model.tie_embeddings=false", "model.vocab_size=8192", "data.vocab_size=8192", f"data.seq_len={SEQ}", f"data.batch_size={BATCH}",
                f"train.steps={steps}", f"train.dtype={dtype}", "train.eval_every=100000", "train.save_every=0",
                f"train.compile={str(compile_).lower()}", f"data.train={corpus}"]
        cmd = [sys.executable, "-c", "import resource, sys; from llmctl.cli import app\n"
               "try:\n    app()\nexcept SystemExit:\n    pass\n"
               "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)",
               "train", "--backend", backend, "--out", str(out), *args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tok_s"] for r in records[2:]]
        peak = float(done.stderr.rsplit("PEAK", 1)[1].split()[0])
        return {"tok_s": statistics.median(rates), "mfu": statistics.median(r["mfu"] for r in records[2:]), "peak_rss_mb": peak}


def _in_subprocess(fn: str, *args: object) -> dict:
    """Run a peer loop in a fresh process so peak memory and thread pools are its own."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import train_throughput as b; print(json.dumps(b.{fn}(*{args!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile on both sides")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; the best of each is reported")
    opts = parser.parse_args()
    corpus = SHARED / "data" / "tinyshakespeare.txt"
    import torch

    from llmctl.spec import ModelSpec

    spec = ModelSpec(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=SEQ)
    flops = spec.flops_per_token(SEQ, training=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {spec.param_count() / 1e6:.1f}M params, "
          f"{flops / 1e6:.0f} MFLOP/token (training)")
    for backend in opts.backends.split(","):
        for dtype in opts.dtypes.split(","):
            variants = [False, True] if (backend == "torch" and opts.compile) else [False]
            for compile_ in variants:
                name = ("transformers loop" + (" +compile" if compile_ else "")) if backend == "torch" else "mlx-lm loop"
                steps = opts.steps if backend == "torch" else max(4, opts.steps // 3)
                runs = []
                for _ in range(opts.rounds):  # rounds alternate the two, so a noisy stretch of the machine hits both
                    if backend == "torch":
                        peer = _in_subprocess("transformers_loop", steps, dtype, compile_)
                    else:
                        peer = _in_subprocess("mlx_lm_loop", steps, dtype)
                    runs.append((llmctl_run(steps, dtype, backend, compile_, corpus), peer))
                ratios = [o["tok_s"] / p["tok_s"] for o, p in runs]
                ours = max((o for o, _ in runs), key=lambda r: r["tok_s"])
                peer = max((p for _, p in runs), key=lambda r: r["tok_s"])
                print(f"{backend:5s} {dtype:13s} llmctl {ours['tok_s']:8.0f} tok/s (MFU {ours['mfu']:.2f}, peak {ours['peak_rss_mb']:.0f} MB)"
                      f" | {name} {peer['tok_s']:8.0f} tok/s (peak {peer['peak_rss_mb']:.0f} MB)"
                      f" | best/best {ours['tok_s'] / peer['tok_s']:.2f}x, per-round ratios {' '.join(f'{r:.2f}' for r in ratios)}"
                      f" (median {statistics.median(ratios):.2f}x)", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
