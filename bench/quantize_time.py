"""Quantization time: `llmctl quantize` against `mlx_lm.convert -q` on the same model, measured in the same run.

    python bench/quantize_time.py [--rounds 2] [--bits 4,8] [--jobs llmctl-torch-rtn,mlx-lm,...] [--calib-samples 128]

The Llama config of issue #5 that bench/decode.py uses (vocab 32000, hidden 768, 12 layers, 12 heads, 4 KV heads,
MLP 2048, untied head, about 125M parameters), random weights (seed 0) saved as float32 with transformers'
`save_pretrained`, with the Llama 2 tokenizer from shared/tokenizers/llama2. Every job is one fresh process, timed
from launch to exit (Python start-up, imports, reading the model, quantizing, writing the output folder), with
`--threads` threads (1 by default: the machine is shared). Rounds interleave the jobs and the best of all rounds
counts, so a busy machine slows everyone alike. Jobs, at each of --bits, group size 64:
  - llmctl-torch-rtn / llmctl-mlx-rtn: `llmctl quantize --method rtn --backend torch|mlx`;
  - mlx-lm: `python -m mlx_lm convert -q --q-bits B --q-group-size 64` (the peer);
  - llmctl-torch-awq / llmctl-torch-gptq: the calibrated methods (torch only; mlx-lm's own AWQ/GPTQ scripts fetch
    their calibration text from the internet, so they have no peer here), on --calib-samples windows of 512 tokens
    of the built-in calibration corpus.
Not the same work: by default llmctl keeps the token embedding and the head in float (`quant.keep`), mlx-lm
quantizes them too; the job llmctl-torch-rtn-all (`--keep none`) quantizes every matrix as mlx-lm does.
Finally the 4-bit llmctl folders are opened with `mlx_lm.load` and run on a short prompt next to mlx-lm's own 4-bit
output (same weights, same rounding): the check that our layout is mlx-lm's (-all should match it exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import CONFIG, TOKENIZER  # noqa: E402  (the same model as the decode benchmark)

GROUP = 64
# name: (command after `python -m`, llmctl backend or None, method); {model}, {out}, {bits} filled in per run
JOBS = {
    "llmctl-torch-rtn": ("llmctl", "torch", "rtn"),
    "llmctl-mlx-rtn": ("llmctl", "mlx", "rtn"),
    "mlx-lm": ("mlx_lm", None, "rtn"),
    "llmctl-torch-rtn-all": ("llmctl", "torch", "rtn-all"),
    "llmctl-torch-awq": ("llmctl", "torch", "awq"),  # slow: --calib-rounds 1 runs it in the first round only
    "llmctl-torch-gptq": ("llmctl", "torch", "gptq"),
}
DEFAULT_JOBS = ["llmctl-torch-rtn", "llmctl-mlx-rtn", "mlx-lm", "llmctl-torch-rtn-all", "llmctl-torch-awq", "llmctl-torch-gptq"]
PEER = "mlx-lm"


def make_model(folder: Path) -> None:
    """bench/decode.py's model: random weights (seed 0), float32, with the Llama 2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (TOKENIZER / name).is_file():
            shutil.copy(TOKENIZER / name, folder / name)


def command(name: str, model: Path, out: Path, bits: int, calib_samples: int) -> list[str]:
    runner, backend, method = JOBS[name]
    if runner == "mlx_lm":
        return [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(model), "--mlx-path", str(out), "-q",
                "--q-bits", str(bits), "--q-group-size", str(GROUP)]
    cmd = [sys.executable, "-m", "llmctl", "quantize", "--model", str(model), "--out", str(out), "--bits", str(bits),
           "--group-size", str(GROUP), "--backend", backend, "--method", method.removesuffix("-all")]
    if method == "rtn-all":
        cmd += ["--keep", "none"]  # a glob that matches no module: every matrix is quantized, as mlx-lm does
    if method in ("awq", "gptq"):
        cmd += [f"calib.samples={calib_samples}"]
    return cmd


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])}... failed:\n{done.stderr[-3000:]}")
    return seconds


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def check_mlx_lm_load(work: Path, folders: dict[str, Path]) -> list[str]:
    """Open each folder with mlx_lm.load, run a 64-token prompt; compare the last logits with mlx-lm's own output."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from llmctl.tokenizer import Tokenizer

    text = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
            "You are all resolved rather to die than to famish?")
    ids = Tokenizer.from_dir(work / "model").encode(text)[:64]
    logits = {}
    for name, folder in folders.items():
        model, _ = load(str(folder))
        out = model(mx.array([ids]))
        mx.eval(out)
        logits[name] = np.array(out[0].astype(mx.float32))
    lines = []
    reference = logits.get(PEER)
    for name, value in logits.items():
        line = f"mlx_lm.load({name}): ok, logits {value.shape}, finite {bool(np.isfinite(value).all())}"
        if reference is not None and name != PEER:
            diff = np.abs(value - reference).max() / np.abs(reference).max()
            agree = (value.argmax(-1) == reference.argmax(-1)).mean()
            line += f"; vs mlx-lm's 4-bit: max |diff| / max |logit| {diff:.2e}, argmax agreement {agree:.1%}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="times each job runs; the best counts (default 2)")
    parser.add_argument("--bits", default="4,8", help="comma-separated bit widths (default 4,8)")
    parser.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma-separated, from: " + ", ".join(JOBS))
    parser.add_argument("--calib-samples", type=int, default=8,
                        help="awq/gptq calibration windows of 512 tokens (default 8; llmctl quantize's own default, "
                        "128, makes awq take over half an hour here)")
    parser.add_argument("--calib-bits", default="4", help="bit widths at which awq/gptq run (default 4)")
    parser.add_argument("--calib-rounds", type=int, default=1, help="rounds in which awq/gptq run (default 1: they are slow)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here (default: quantize_time.json in the "
                        "--out-dir)")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-quantize-time",
                        help="where the tables are written as JSON and Markdown")
    opts = parser.parse_args()
    if not (TOKENIZER / "tokenizer.json").is_file():
        print(f"skipped: no tokenizer at {TOKENIZER}")
        return
    bits = [int(b) for b in opts.bits.split(",")]
    calib_bits = {int(b) for b in opts.calib_bits.split(",")}
    names = opts.jobs.split(",")
    threads = str(opts.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the installed llmctl, as a user runs it
    plan = [(name, b) for b in bits for name in names if JOBS[name][2] not in ("awq", "gptq") or b in calib_bits]
    results: dict[str, list[float]] = {f"{name}@{b}": [] for name, b in plan}
    sizes: dict[str, int] = {}
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-qt-") as tmp:
        work = Path(tmp)
        make_model(work / "model")
        print(f"model: {work / 'model'} ({folder_bytes(work / 'model') / 2**20:.0f} MiB float32)", file=sys.stderr)
        for round_ in range(opts.rounds):
            for name, b in plan:
                if JOBS[name][2] in ("awq", "gptq") and round_ >= opts.calib_rounds:
                    continue
                out = work / f"out-{name}-{b}"
                shutil.rmtree(out, ignore_errors=True)
                seconds = timed(command(name, work / "model", out, b, opts.calib_samples), env)
                results[f"{name}@{b}"].append(seconds)
                sizes[f"{name}@{b}"] = folder_bytes(out)
                print(f"round {round_ + 1} {name:22s} {b}-bit {seconds:7.1f} s", file=sys.stderr, flush=True)
        checks = []
        if 4 in bits:
            folders = {name: work / f"out-{name}-4" for name in names}
            checks = check_mlx_lm_load(work, {n: f for n, f in folders.items() if f.is_dir()})
    report(plan, results, sizes, checks, opts, time.perf_counter() - wall)


def report(plan: list, results: dict, sizes: dict, checks: list[str], opts: argparse.Namespace, wall: float) -> None:
    best = {key: min(times) for key, times in results.items()}
    lines = [f"### Quantization time, ~125M Llama (random weights, fp32 folder), group size {GROUP}, "
             f"{opts.threads} thread(s), best of {opts.rounds} (awq/gptq: {min(opts.calib_rounds, opts.rounds)})", "",
             "| job | bits | seconds (best) | all rounds | output MiB | / mlx-lm |", "| --- | ---: | ---: | --- | ---: | ---: |"]
    rows = []
    for name, b in plan:
        key = f"{name}@{b}"
        peer = best.get(f"{PEER}@{b}")
        ratio = f"{best[key] / peer:.2f}x" if peer and name != PEER else ""
        rounds = ", ".join(f"{t:.1f}" for t in results[key])
        lines.append(f"| {name} | {b} | {best[key]:.1f} | {rounds} | {sizes[key] / 2**20:.1f} | {ratio} |")
        rows.append({"job": name, "bits": b, "seconds": best[key], "rounds": results[key], "output_bytes": sizes[key],
                     "ratio_to_mlx_lm": best[key] / peer if peer and name != PEER else None})
    lines += ["", f"(seconds: one fresh process from launch to exit; awq/gptq calibrate on {opts.calib_samples} x 512 "
              "tokens of llmctl's built-in corpus; llmctl keeps embeddings and head in float except in -all, mlx-lm "
              f"quantizes them; whole benchmark {wall / 60:.1f} min)"]
    lines += [""] + [f"- {c}" for c in checks]
    text = "\n".join(lines)
    print(text)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    path = opts.json or opts.out_dir / "quantize_time.json"
    path.write_text(json.dumps({"rows": rows, "checks": checks, "group_size": GROUP, "threads": opts.threads,
                                "rounds": opts.rounds, "calib_rounds": opts.calib_rounds,
                                "calib_samples": opts.calib_samples, "wall_s": wall}, indent=2))
    (opts.out_dir / "quantize_time.md").write_text(text + "\n")
    print(f"\nwritten: {path}, {opts.out_dir / 'quantize_time.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
