"""K-quants and the default `quantize --bits`: size, KL and perplexity against llama.cpp's, and the speed of a Q4_K_M file.

    python bench/kquant.py [--tokens 2048] [--new-tokens 64] [--out-dir DIR]

SmolLM2-135M-Instruct (the test suite's cached Q4_1 GGUF made a float32 folder, "full", as bench/quantize_quality.py
does), scored on the same tinyshakespeare slice with the same windows (quantize_quality's helpers):
  - llmctl rows: `llmctl quantize --bits 4` and `--bits 8` (the default: every matrix, the tied embedding/head at
    max(bits, 6), float16 scales) run by `llmctl eval`; llmctl's `--type q4_k_m` GGUF run by llmctl and by llama.cpp.
  - llama.cpp rows: Q4_0, Q8_0 and Q4_K_M made by llama.cpp's own quantizer (llama_model_quantize, from an F32 GGUF
    of the full model), run by llama-cpp-python.
Then decode tokens/s (after a 128-token prompt) and prompt tokens/s (512 tokens) of llama.cpp's Q4_K_M file in llmctl
(torch backend) and in llama.cpp, measured in the same run (bench/decode.py's runners) in alternating rounds (others
load this machine from minute to minute: each round's ratio compares engines measured side by side), with each
round's ratio, the CPU's name and llmctl's kernel ISA. `--speed-only FILE.gguf` measures only that. KL(full || q) is per token, against llmctl's torch full model. The child processes run
this checkout's llmctl (PYTHONPATH), as the speed runs in this process do; $LLMCTL_SHARED names shared/ as the tests'
conftest reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as D  # noqa: E402
import quantize_quality as Q  # noqa: E402


def llama_cpp_quantize(source: Path, out: Path, ftype: str) -> float:
    """llama.cpp's own quantizer; returns seconds."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = Q.THREADS
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")
    return time.perf_counter() - start


def speed_lines(path: Path, text: Path, opts: argparse.Namespace) -> tuple[list[str], list[dict]]:
    """Decode and prompt tokens/s of a GGUF file in llmctl (torch) and llama.cpp, alternating, one ratio per round."""
    import torch

    from llmctl import kernels
    from llmctl.io.gguf import read_tokenizer

    torch.set_num_threads(D.THREADS)
    ids = read_tokenizer(path).encode(text.read_text()[-200_000:], add_special_tokens=False)
    prompts = {"decode": ids[: D.DECODE_PROMPT], "prefill": ids[: D.PREFILL_PROMPT]}
    lines = [f"CPU: {D.cpu_name()}; llmctl kernels: {kernels.cpu_isa()}; {D.THREADS} threads; {path.name}", "",
             f"| round | decode llmctl | decode llama.cpp | ratio | prompt ({D.PREFILL_PROMPT}) llmctl | llama.cpp | ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rounds = []
    for r in range(opts.rounds):
        ours, theirs = D.run_llmctl("torch", "q4", path, prompts, opts.new_tokens), D.run_llama_cpp(path, prompts, opts.new_tokens)
        rounds.append({"llmctl": ours, "llama.cpp": theirs})
        lines.append(f"| {r + 1} | {ours['decode']:.1f} | {theirs['decode']:.1f} | {ours['decode'] / theirs['decode']:.2f} | "
                     f"{ours['prefill']:.1f} | {theirs['prefill']:.1f} | {ours['prefill'] / theirs['prefill']:.2f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of tinyshakespeare scored")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode: new tokens per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="speed: alternating rounds of llmctl and llama.cpp")
    parser.add_argument("--speed-only", type=Path, help="measure only the speed of this GGUF file (no table)")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-kquant")
    opts = parser.parse_args()
    if opts.speed_only:
        print("\n".join(speed_lines(opts.speed_only, Path(os.environ.get("LLMCTL_SHARED", Q.SHARED)) / "data" /
                                     "tinyshakespeare.txt", opts)[0]))
        return
    opts.calib_samples, opts.stories_text = 0, None
    Q.ENV["PYTHONPATH"] = str(Q.ROOT)  # this checkout's llmctl in the child processes, as the speed runs import it
    Q.SHAKESPEARE = Path(os.environ.get("LLMCTL_SHARED", Q.SHARED)) / "data" / "tinyshakespeare.txt"
    work = Path(tempfile.mkdtemp(prefix="llmctl-bench-kquant-"))
    setup = Q.prepare("smollm2", work, opts)
    full, text, tokens = setup["full"], setup["text"], setup["tokens"]
    base = Q.safetensors_entries(full)
    eval_args = ["--data", str(text), "--base", str(full), "--backend", "torch", "--json", "--max-tokens", str(tokens)]
    rows = []

    def row(engine: str, what: str, result: dict, bpw: tuple, seconds: float) -> None:
        rows.append({"engine": engine, "what": what, "bpw_quantized": bpw[0], "bpw_model": bpw[1], "quantize_s": seconds, **result})
        print(f"  {engine:9s} {what:28s} ppl {result['perplexity']:8.4f}  kl {result.get('kl_mean', 0):.5f}  "
              f"bpw {bpw[1]:.3f}", file=sys.stderr, flush=True)

    def llmctl_eval(model: Path) -> dict:
        out, _ = Q.llmctl("eval", "--model", str(model), *eval_args)
        return json.loads(out[out.index("{"):])

    row("llmctl", "full (float32)", llmctl_eval(full), (32.0, 32.0), 0.0)
    for bits in (4, 8):
        model = work / f"q{bits}"
        _, seconds = Q.llmctl("quantize", "--model", str(full), "--out", str(model), "--bits", str(bits), "--backend", "torch")
        row("llmctl", f"--bits {bits} (default)", llmctl_eval(model), Q.folder_bits(model, base), seconds)
    ours = work / "llmctl-q4_k_m.gguf"
    _, seconds = Q.llmctl("quantize", "--model", str(full), "--out", str(ours), "--type", "q4_k_m")
    row("llmctl", "q4_k_m (llmctl's file)", llmctl_eval(ours), Q.gguf_bits(ours)[:2], seconds)
    row("llama.cpp", "q4_k_m (llmctl's file)", Q.llama_cpp_eval(ours, full, text, tokens), Q.gguf_bits(ours)[:2], seconds)
    f32 = work / "full-f32.gguf"
    Q.llmctl("convert", str(full), "--out", str(f32), "--type", "f32")
    for ftype in ("Q4_0", "Q8_0", "Q4_K_M"):
        path = work / f"llama-{ftype}.gguf"
        seconds = llama_cpp_quantize(f32, path, ftype)
        row("llama.cpp", f"{ftype} (llama.cpp's file)", Q.llama_cpp_eval(path, full, text, tokens), Q.gguf_bits(path)[:2], seconds)
    theirs = work / "llama-Q4_K_M.gguf"
    row("llmctl", "Q4_K_M (llama.cpp's file)", llmctl_eval(theirs), Q.gguf_bits(theirs)[:2], 0.0)

    lines = [f"SmolLM2-135M-Instruct, {rows[0]['tokens']:,} tokens of {setup['source']}", "",
             "| engine | file | perplexity | KL(full‖q) mean | bpw (quantized) | bpw (whole model) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['engine']} | {r['what']} | {r['perplexity']:.4f} | {r.get('kl_mean', 0):.5f} | {r['bpw_quantized']:.3f} | "
              f"{r['bpw_model']:.3f} |" for r in rows]
    speed_part, speed = speed_lines(theirs, text, opts)
    lines += ["", *speed_part]
    print("\n".join(lines))
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "kquant.json").write_text(json.dumps({"rows": rows, "speed": speed}, indent=2))
    (opts.out_dir / "kquant.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
