"""Distillation with the teacher run at every step against distillation from its cached top-K, same run.

    python bench/distill.py [--teacher DIR] [--data FILE] [--steps 40] [--k 64] [--backend torch]

Both runs are the real `llmctl distill` (same student shape, rows, order and steps); the cached run reads a cache
made beforehand (its one-off build is timed on its own). Reports training tokens/s of each and their ratio, the
held-out next-token loss each student reaches, the cache's size on disk, and the CPU with its instruction set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("LLMCTL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
STUDENT = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 128}}


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    isa = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "NEON" if "asimd" in info else "?"
    return f"{name} ({isa}), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def distill(args: argparse.Namespace, work: Path, name: str, *extra: str) -> tuple[list[dict], float]:
    from llmctl.config import load_recipe
    from llmctl.distill import DistillConfig, run

    flags = {"teacher": args.teacher, "student_recipe": str(work / "student.yaml"), "data.train": [str(work / "train.txt")],
             "data.val": [str(work / "val.txt")], "train.steps": args.steps, "out": work / name}
    settings = ["data.seq_len=128", "data.batch_size=8", "train.dtype=fp32", f"train.eval_every={args.steps}",
                "train.save_every=0", *extra]
    cfg = load_recipe(DistillConfig, "distill", "default", settings, flags)
    start = time.perf_counter()
    run(cfg, args.backend)
    seconds = time.perf_counter() - start
    return [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(SHARED / "models" / "stories260K-hf"))
    parser.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--chars", type=int, default=200_000, help="characters of --data used (the last 10%% held out)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("LLMCTL_CACHE", str(work / "cache"))
        text = Path(args.data).read_text(encoding="utf-8")[: args.chars]
        cut = int(len(text) * 0.9)
        (work / "train.txt").write_text(text[:cut], encoding="utf-8")
        (work / "val.txt").write_text(text[cut:], encoding="utf-8")
        (work / "student.yaml").write_text(json.dumps(STUDENT))
        live, _ = distill(args, work, "live")
        _, build = distill(args, work, "build", f"cache_topk={args.k}", "train.steps=1")
        cached, _ = distill(args, work, "cached", f"cache_topk={args.k}")
        cache = next((work / "teacher-cache").iterdir())
        size = sum(p.stat().st_size for p in cache.iterdir())

    def tok_s(records: list[dict]) -> float:
        return statistics.median(r["tok_s"] for r in records[1:])  # the first step warms up

    print(f"\n{cpu()}; backend {args.backend}; teacher {args.teacher}; student {STUDENT['model']}; "
          f"{args.steps} steps of 8 x 128 tokens")
    print(f"{'run':<28}{'tokens/s':>10}{'val next-token loss':>22}")
    print(f"{'teacher run every step':<28}{tok_s(live):>10.0f}{live[-1]['val_ce']:>22.4f}")
    print(f"{f'cached top-{args.k}':<28}{tok_s(cached):>10.0f}{cached[-1]['val_ce']:>22.4f}")
    print(f"cached / on the fly: {tok_s(cached) / tok_s(live):.2f}x tokens/s; the cache: {size / 1e6:.1f} MB, built in a "
          f"run of {build:.1f} s (one step included)")


if __name__ == "__main__":
    main()
