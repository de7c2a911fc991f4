"""Quantization-aware training against post-training quantization (rtn, awq, gptq) at 4, 3 and 2 bits.

    python bench/qat.py [--models stories260K,smollm2] [--steps 100] [--calib-samples 8] [--out-dir DIR]

Models, eval texts and calibration texts as bench/quantize_quality.py prepares them (stories260K scored on stories
sampled from itself, SmolLM2-135M-Instruct on the last 100 KB of tinyshakespeare), group size 64, embeddings and head
in float. awq/gptq calibrate on --calib-samples windows of 512 tokens of the calibration text; qat trains on the same
text for --steps steps of 8 x 256 tokens (lr 1e-4, `llmctl quantize --method qat`). Each row: perplexity, mean KL to
the float model (`llmctl eval --base`), and the quantize wall time, 1 thread. A Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_quality  # noqa: E402
from decode import cpu_name  # noqa: E402
from prune import isa  # noqa: E402
from quantize_quality import GROUP, llmctl, prepare  # noqa: E402

quantize_quality.ENV["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's llmctl, as built
METHODS = ("rtn", "awq", "gptq", "qat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories260K,smollm2")
    parser.add_argument("--steps", type=int, default=100, help="qat optimizer steps")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="SmolLM2: eval tokens")
    parser.add_argument("--stories-tokens", type=int, default=16384, help="stories260K: eval tokens")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-qat")
    opts = parser.parse_args()
    opts.stories_text = None
    work = opts.out_dir
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()} ({isa()}); 1 thread", file=sys.stderr, flush=True)
    tables = {}
    for name in opts.models.split(","):
        setup = prepare(name, work, opts)
        full, tokens = setup["full"], setup["tokens"]
        eval_args = ["--data", str(setup["text"]), "--base", str(full), "--backend", "torch", "--json", "--max-tokens", str(tokens)]
        out, _ = llmctl("eval", "--model", str(full), *eval_args)
        rows = [{"method": "float", "bits": 32, "seconds": 0.0, **json.loads(out[out.index("{"):])}]
        for bits in map(int, opts.bits.split(",")):
            for method in METHODS:
                model = work / name / f"{method}-{bits}"
                args = ["quantize", "--model", str(full), "--out", str(model), "--bits", str(bits), "--group-size", str(GROUP),
                        "--method", method, "--force"]
                if method in ("awq", "gptq"):
                    args += ["--calib", str(setup["calib"]), f"calib.samples={opts.calib_samples}"]
                if method == "qat":
                    args += ["--data", str(setup["calib"]), "--steps", str(opts.steps)]
                _, seconds = llmctl(*args)
                out, _ = llmctl("eval", "--model", str(model), *eval_args)
                rows.append({"method": method, "bits": bits, "seconds": seconds, **json.loads(out[out.index("{"):])})
                r = rows[-1]
                print(f"  {name} {method:4s} {bits}-bit  ppl {r['perplexity']:9.3f}  kl {r.get('kl_mean', 0):.4f}  {seconds:.0f}s",
                      file=sys.stderr, flush=True)
        tables[name] = rows
    (work / "qat.json").write_text(json.dumps({"cpu": cpu_name(), "isa": isa(), "steps": opts.steps, "tables": tables}, indent=1))
    for name, rows in tables.items():
        print(f"\n{name}, group size {GROUP}, qat {opts.steps} steps of 8 x 256 tokens; {cpu_name()} ({isa()}), 1 thread\n")
        print("| method | bits | perplexity | KL to float | wall s |\n| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['method']} | {r['bits']} | {r['perplexity']:.3f} | {r.get('kl_mean', 0.0):.4f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
