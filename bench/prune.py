"""Pruning quality and speed on SmolLM2-135M-Instruct: perplexity, KL to the original, wall time, size and tokens/s.

    python bench/prune.py [--tokens 4096] [--calib-samples 16] [--rows all|NAME,...] [--out-dir DIR]

The model is SmolLM2-135M-Instruct's Q4_1 GGUF (the test suite's cached copy) made a float32 folder by
`llmctl convert --dtype fp32` (bench/quantize_quality.py's `prepare`): that dequantized model is "full". Calibration
and evaluation text are disjoint parts of shared/data/tinyshakespeare.txt: the eval text is its last 100 KB (the
first --tokens tokens of it scored by `llmctl eval --json --base FULL`), calibration windows of 512 tokens come from
before it. Rows: each of magnitude, wanda and sparsegpt at 25%, 50%, 70% and 2:4; depth and width at 25%
(`llmctl prune`, timed in a fresh process); sparsegpt-2:4, depth and width again as NAME+recover, pruned with
`--recover --recover-steps` (steps of 8 calibration rows of 512 tokens: the recovery budget in tokens is printed). For each result: perplexity, mean KL to full and top-1 agreement, prune
wall time, file size, and decode (64 new tokens after a short prompt) and prompt tokens/s from `llmctl generate
--json` (best of 2), beside the original's in the same run. Unstructured zeros are stored dense, so only depth and
width change size and speed (the other rows repeat the original's). 1 thread everywhere (a busy machine slows every row alike). Markdown tables are printed
and the raw numbers written as JSON to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_quality  # noqa: E402
from decode import cpu_name  # noqa: E402
from quantize_quality import SHAKESPEARE, llmctl, prepare  # noqa: E402

quantize_quality.ENV["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this checkout's llmctl, as built

ROWS = {f"{method}-{target}": ["--method", method, *(["--pattern", target] if ":" in target else ["--sparsity", target])]
        for method in ("magnitude", "wanda", "sparsegpt") for target in ("0.25", "0.5", "0.7", "2:4")}
ROWS |= {"depth-0.25": ["--structured", "depth", "--ratio", "0.25"], "width-0.25": ["--structured", "width", "--ratio", "0.25"]}
RECOVERED = ("sparsegpt-2:4", "depth-0.25", "width-0.25")  # each also as NAME+recover: pruned, then `--recover STEPS`
STRUCTURED = ("depth-0.25", "width-0.25")
SPEED = ("decode_tokens_per_s", "prompt_tokens_per_s")
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"


def isa() -> str:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    found = [name for name in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma") if f" {name}" in flags]
    return ", ".join(found) or platform.machine()


def speed(model: Path) -> dict:
    """Best decode and prompt tokens/s of two `llmctl generate --json` runs, greedy."""
    best = dict.fromkeys(SPEED, 0.0)
    for _ in range(2):
        out, _ = llmctl("generate", "--model", str(model), "--prompt", PROMPT, "--max-tokens", "64", "--temperature", "0",
                        "--backend", "torch", "--json")
        stats = json.loads(out[out.index("{"):])
        for key in best:
            best[key] = max(best[key], float(stats[key]))
    return best


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="eval tokens scored")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--rows", default="all", help="comma-separated row names (e.g. wanda-0.5,depth-0.25)")
    parser.add_argument("--recover-steps", type=int, default=8, help="distillation steps of the +recover rows")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-prune")
    opts = parser.parse_args()
    every = [*ROWS, *(f"{name}+recover" for name in RECOVERED)]
    rows = every if opts.rows == "all" else opts.rows.split(",")
    if unknown := [r for r in rows if r not in every]:
        parser.error(f"--rows: unknown row(s) {', '.join(unknown)}; rows: {', '.join(every)}")
    work = opts.out_dir
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()} ({isa()}); 1 thread; eval: last 100 KB of {SHAKESPEARE.name}, {opts.tokens} tokens",
          file=sys.stderr, flush=True)
    setup = prepare("smollm2", work, argparse.Namespace(tokens=opts.tokens))
    full = setup["full"]
    eval_args = ["--data", str(setup["text"]), "--base", str(full), "--backend", "torch", "--json", "--max-tokens", str(opts.tokens)]
    results = []
    for name in ["full", *rows]:
        model, seconds = full, 0.0
        if name != "full":
            model = work / "smollm2" / name
            pruned, _, recover = name.partition("+")
            extra = ["--recover", str(opts.recover_steps)] if recover else []
            _, seconds = llmctl("prune", "--model", str(full), "--out", str(model), "--force", "--calib", str(setup["calib"]),
                                f"calib.samples={opts.calib_samples}", *ROWS[pruned], *extra)
        out, _ = llmctl("eval", "--model", str(model), *eval_args)
        scores = json.loads(out[out.index("{"):])
        # unstructured zeros are stored (and multiplied) dense: their speed is the original's, measured once
        dense = name != "full" and name.partition("+")[0] not in STRUCTURED
        row = {"name": name, "prune_s": seconds, **scores, "file_bytes": size(model)}  # eval's "bytes" is the text's
        row |= {k: results[0][k] for k in SPEED} if dense else speed(model)
        results.append(row)
        print(f"  {name:16s} ppl {row['perplexity']:9.3f}  kl {row.get('kl_mean', 0.0):.4f}  prune {seconds:6.1f}s  "
              f"decode {row['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    (work / "prune.json").write_text(json.dumps({"cpu": cpu_name(), "isa": isa(), "tokens": opts.tokens,
                                                 "recover_steps": opts.recover_steps,
                                                 "calib_samples": opts.calib_samples, "rows": results}, indent=1))
    base = results[0]
    print(f"\nSmolLM2-135M-Instruct (fp32), {opts.tokens} eval tokens, calibration {opts.calib_samples} x 512 tokens, "
          f"+recover: {opts.recover_steps} steps x 8 x 512 = {opts.recover_steps * 8 * 512} distillation tokens; "
          f"{cpu_name()} ({isa()}), 1 thread\n")
    print("| result | perplexity | KL to full | top-1 agree | prune s | size MB | decode tok/s (x full) | prompt tok/s (x full) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['name']} | {r['perplexity']:.3f} | {r.get('kl_mean', 0.0):.4f} | {r.get('top1_agreement', 1.0):.3f} | "
              f"{r['prune_s']:.1f} | {r['file_bytes'] / 1e6:.1f} | {r['decode_tokens_per_s']:.1f} "
              f"({r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}) | {r['prompt_tokens_per_s']:.1f} "
              f"({r['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}) |")


if __name__ == "__main__":
    main()
