"""Inference speed and memory: llmctl's engine against transformers, mlx-lm and llama.cpp, measured in the same run.

    python bench/decode.py [--rounds 3] [--new-tokens 64] [--engines llmctl-torch-fp32,transformers-fp32,...]
                           [--baseline OTHER_CHECKOUT]

The Llama config of issue #5 (vocab 32000, hidden 768, 12 layers, 12 heads, 4 KV heads, MLP 2048, about 125M
parameters with the untied head), random weights saved as a model folder with the Llama 2 BPE tokenizer from
shared/tokenizers/llama2, and GGUF f32/f16 copies written by `llmctl convert`. Batch 1, 2 threads, greedy.
Quantized engines (issue #6) run every matrix, embeddings and head included, at 4.5 or 8.5 bits per weight on each
side: llmctl's and mlx-lm's on one folder from `llmctl quantize --bits 4|8 --group-size 64 quant.keep= quant.head_bits=4|8` of the
bfloat16 weights (bfloat16 scales and biases), llama.cpp on `llmctl quantize --format gguf --type q4_0|q8_0`.
Each engine runs in a fresh process (its own thread pool and memory), once per round; rounds interleave the engines
and the best of all rounds counts, so a busy machine slows everyone alike. Per engine:
  - decode tokens/s after a 128-token prompt (from the first new token to the last), and its share of the
    memory-bandwidth ceiling: bandwidth measured here / bytes of weights read per token;
  - prompt-processing tokens/s of a 512-token prompt (to the first new token), and its share of the matmul peak
    measured here at that precision (prompt processing is bound by compute, not by memory);
  - resident-memory growth from just before the model is loaded to the end of decoding, against the budget
    weights + key/value cache + 20%.
Also `llmctl chat`'s start-up time to its first prompt for the default model (the latest trained one).
Engines whose package is missing (llama-cpp-python, mlx, mlx-lm) are skipped with a note.
With --baseline, another checkout of llmctl (its extension built, e.g. a `git worktree` of an earlier commit) runs
each chosen llmctl engine in the same rounds, on the same files, as NAME@baseline: before/after ratios of a change.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMCTL_SHARED", ROOT.parent / "shared"))  # shared/ beside the checkout, or $LLMCTL_SHARED
TOKENIZER = SHARED / "tokenizers" / "llama2"
CORPUS = SHARED / "data" / "tinyshakespeare.txt"
CONFIG = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
              intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
THREADS = 2
DECODE_PROMPT, PREFILL_PROMPT = 128, 512
REPEATS = 2  # measurements inside one process; the first also warms up
# name: (runner, backend or GGUF type, precision)
ENGINES = {
    "llmctl-torch-fp32": ("llmctl", "torch", "fp32"),
    "transformers-fp32": ("transformers", "torch", "fp32"),
    "llmctl-torch-bf16": ("llmctl", "torch", "bf16"),
    "transformers-bf16": ("transformers", "torch", "bf16"),
    "llama.cpp-f32": ("llama.cpp", "f32", "fp32"),
    "llama.cpp-f16": ("llama.cpp", "f16", "f16"),
    "llmctl-mlx-fp32": ("llmctl", "mlx", "fp32"),
    "mlx-lm-fp32": ("mlx-lm", "mlx", "fp32"),
    "llmctl-mlx-bf16": ("llmctl", "mlx", "bf16"),
    "mlx-lm-bf16": ("mlx-lm", "mlx", "bf16"),
    # quantized (issue #6): every matrix, embeddings and head included, 4.5 or 8.5 bits per weight on each side
    "llmctl-torch-q4": ("llmctl", "torch", "q4"),
    "llama.cpp-q4_0": ("llama.cpp", "q4_0", "q4"),
    "llmctl-torch-q8": ("llmctl", "torch", "q8"),
    "llama.cpp-q8_0": ("llama.cpp", "q8_0", "q8"),
    "llmctl-mlx-q4": ("llmctl", "mlx", "q4"),
    "mlx-lm-q4": ("mlx-lm", "mlx", "q4"),
    "llmctl-mlx-q8": ("llmctl", "mlx", "q8"),
    "mlx-lm-q8": ("mlx-lm", "mlx", "q8"),
}
# MLX's quantized products on the Linux CPU take minutes for a 512-token prompt: its quantized engines (llmctl's and
# mlx-lm's alike) are timed on decoding only, as issue #6 asks; their prompt column shows 0.
QUANTIZED = {"q4": 4, "q8": 8}  # bits; group size 64 with bfloat16 scales and biases: + 0.5 bit per weight
GROUP = 64
BASELINE = "@baseline"  # suffix of the engines --baseline's checkout runs
NEEDS = {"llama.cpp": "llama_cpp", "mlx-lm": "mlx_lm", "mlx": "mlx"}
PEERS = {  # what each llmctl engine is compared with
    "llmctl-torch-fp32": ("transformers-fp32", "llama.cpp-f32"),
    "llmctl-torch-bf16": ("transformers-bf16", "llama.cpp-f16"),
    "llmctl-mlx-fp32": ("mlx-lm-fp32",),
    "llmctl-mlx-bf16": ("mlx-lm-bf16",),
    "llmctl-torch-q4": ("llama.cpp-q4_0", "mlx-lm-q4"),
    "llmctl-torch-q8": ("llama.cpp-q8_0", "mlx-lm-q8"),
    "llmctl-mlx-q4": ("mlx-lm-q4",),
    "llmctl-mlx-q8": ("mlx-lm-q8",),
}


def rss() -> int:
    """Resident memory of this process now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----- workers: one engine in this (fresh) process -------------------------------------------------------------


def run_llmctl(backend: str, precision: str, folder: Path, prompts: dict, new_tokens: int) -> dict:
    from llmctl.backends import get_backend
    from llmctl.generation import SamplingParams

    runtime = get_backend(backend)  # imports the framework before the first reading
    before = rss()
    model = runtime.load(folder, dtype=None if precision in QUANTIZED else precision)
    decode, prefill = [], []
    for _ in range(REPEATS):
        if not (backend == "mlx" and precision in QUANTIZED):  # see QUANTIZED
            start = time.perf_counter()
            next(model.generate(prompts["prefill"], SamplingParams(max_tokens=1)))
            prefill.append(PREFILL_PROMPT / (time.perf_counter() - start))
        tokens = model.generate(prompts["decode"], SamplingParams(max_tokens=new_tokens + 1))
        next(tokens)
        start = time.perf_counter()
        n = sum(1 for _ in tokens)
        decode.append(n / (time.perf_counter() - start))
    return {"decode": max(decode), "prefill": max(prefill, default=0.0), "growth": rss() - before}


def run_transformers(precision: str, folder: Path, prompts: dict, new_tokens: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(THREADS)

    class Clock(BaseStreamer):
        """Times each batch of ids generate() hands out: the prompt first, then every new token."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    before = rss()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32 if precision == "fp32" else torch.bfloat16).eval()
    args = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    decode, prefill = [], []
    for _ in range(REPEATS):
        clock = Clock()
        start = time.perf_counter()
        model.generate(torch.tensor([prompts["prefill"]]), max_new_tokens=1, streamer=clock, **args)
        prefill.append(PREFILL_PROMPT / (clock.times[1] - start))
        clock = Clock()
        model.generate(torch.tensor([prompts["decode"]]), max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, streamer=clock, **args)
        decode.append((len(clock.times) - 2) / (clock.times[-1] - clock.times[1]))
    return {"decode": max(decode), "prefill": max(prefill), "growth": rss() - before}


def run_mlx_lm(precision: str, folder: Path, prompts: dict, new_tokens: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    before = rss()
    model, tokenizer = load(str(folder))
    if precision == "bf16":
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
    decode, prefill = [], []
    for _ in range(REPEATS):
        if precision not in QUANTIZED:  # see QUANTIZED
            start = time.perf_counter()
            next(iter(stream_generate(model, tokenizer, prompts["prefill"], max_tokens=1)))
            prefill.append(PREFILL_PROMPT / (time.perf_counter() - start))
        times = [time.perf_counter() for _ in stream_generate(model, tokenizer, prompts["decode"], max_tokens=new_tokens + 1)]
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    return {"decode": max(decode), "prefill": max(prefill, default=0.0), "growth": rss() - before}


def run_llama_cpp(gguf: Path, prompts: dict, new_tokens: int) -> dict:
    from llama_cpp import Llama

    before = rss()
    llm = Llama(str(gguf), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=PREFILL_PROMPT,
                n_ubatch=PREFILL_PROMPT, verbose=False)
    decode, prefill = [], []
    for _ in range(REPEATS):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompts["prefill"])  # the logits of the last position, as the others compute
        prefill.append(PREFILL_PROMPT / (time.perf_counter() - start))
        llm.reset()
        times = []
        for _ in llm.generate(prompts["decode"], temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new_tokens + 1:
                break
        decode.append((len(times) - 1) / (times[-1] - times[0]))
    return {"decode": max(decode), "prefill": max(prefill), "growth": rss() - before}


def worker(name: str, work: Path, new_tokens: int) -> dict:
    runner, what, precision = ENGINES[name]
    prompts = json.loads((work / "prompts.json").read_text())
    folder = work / (f"model-{precision}" if precision in QUANTIZED else "model")
    if runner == "llmctl":
        import torch

        torch.set_num_threads(THREADS)
        return run_llmctl(what, precision, folder, prompts, new_tokens)
    if runner == "transformers":
        return run_transformers(precision, folder, prompts, new_tokens)
    if runner == "mlx-lm":
        return run_mlx_lm(precision, folder, prompts, new_tokens)
    return run_llama_cpp(work / f"model-{what}.gguf", prompts, new_tokens)


# ----- the parent: model files, machine limits, rounds, table ---------------------------------------------------


def make_model(work: Path) -> None:
    """Random weights (seed 0) in a model folder with the Llama 2 tokenizer, its GGUF copies, and the prompts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.tokenizer import Tokenizer

    folder = work / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CONFIG)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (TOKENIZER / name).is_file():
            shutil.copy(TOKENIZER / name, folder / name)
    llmctl = [sys.executable, "-m", "llmctl"]
    for kind in ("f32", "f16"):
        _run([*llmctl, "convert", str(folder), "--out", str(work / f"model-{kind}.gguf"), "--type", kind])
    # quantized copies of the bfloat16 weights: bfloat16 scales (and biases), like ggml's float16 block scales
    _run([*llmctl, "convert", str(folder), "--out", str(work / "model-bf16"), "--dtype", "bf16"])
    for name, bits in QUANTIZED.items():
        _run([*llmctl, "quantize", "--model", str(work / "model-bf16"), "--out", str(work / f"model-{name}"), "--bits", str(bits),
              "--group-size", str(GROUP), "quant.keep=", f"quant.head_bits={bits}"])
        _run([*llmctl, "quantize", "--model", str(folder), "--format", "gguf", "--type", f"{name}_0",
              "--out", str(work / f"model-{name}_0.gguf")])
        for extra in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            if (folder / extra).is_file() and not (work / f"model-{name}" / extra).is_file():
                shutil.copy(folder / extra, work / f"model-{name}" / extra)
    text = CORPUS.read_text() if CORPUS.is_file() else " ".join(f"The number {i} follows {i - 1}." for i in range(1, 400))
    ids = Tokenizer.from_dir(folder).encode(text)
    prompts = {"decode": ids[:DECODE_PROMPT], "prefill": ids[:PREFILL_PROMPT]}
    (work / "prompts.json").write_text(json.dumps(prompts))


def _run(cmd: list[str], env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{done.stderr[-3000:]}")
    return done.stdout


def machine_limits() -> dict:
    """Read bandwidth (GB/s, a sum over 1 GB) and matmul peaks (GFLOP/s, fp32 and bf16) with 2 threads."""
    import torch

    torch.set_num_threads(THREADS)

    def best(fn, n: int = 5) -> float:
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    a = torch.ones(256 * 1024 * 1024)  # 1 GiB, far beyond any cache
    limits = {"bandwidth": a.numel() * 4 / best(a.sum) / 1e9}
    del a
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x, w = torch.randn(512, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        limits[key] = 2 * 512 * 2048 * 2048 / best(lambda: x @ w) / 1e9
    limits["f16"] = limits["bf16"]  # llama.cpp's f16 matmul is held to the 16-bit peak torch reaches here
    return limits


def chat_startup(work: Path, tries: int = 3) -> list[float]:
    """Seconds from launching `llmctl chat` (no --model: the latest trained model) to its first prompt, in a terminal."""
    import pty
    import select

    cache = work / "llmctl-cache"  # its own record of the latest model, so the user's is left alone
    cache.mkdir(exist_ok=True)
    (cache / "last_model").write_text(str(work / "model"))
    env = {**os.environ, "LLMCTL_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        pid, fd = pty.fork()
        if pid == 0:
            os.execvpe(sys.executable, [sys.executable, "-m", "llmctl", "chat"], env)
        seen = b""
        while b">>> " not in seen:
            ready, _, _ = select.select([fd], [], [], 120)
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                raise RuntimeError(f"llmctl chat showed no prompt: {seen[-2000:].decode(errors='replace')}")
            seen += chunk
        times.append(time.perf_counter() - start)
        os.write(fd, b"\x04")  # Ctrl-D leaves
        os.waitpid(pid, 0)
        os.close(fd)
    return times


def budget(precision: str, positions: int) -> tuple[int, int]:
    """(bytes of weights read per decoded token, memory budget: all weights + the KV cache + 20%)."""
    from llmctl.spec import ModelSpec

    spec = ModelSpec(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048)
    size = 4 if precision == "fp32" else (QUANTIZED[precision] + 32 / GROUP) / 8 if precision in QUANTIZED else 2
    read = spec.matmul_params() * size + spec.dim * size  # every matrix once, plus one embedding row
    kv = 2 * spec.n_layers * spec.kv_dim * positions * 4  # float32 keys and values (llama.cpp: float16)
    return int(read), int((spec.param_count() * size + kv) * 1.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from: " + ", ".join(ENGINES))
    parser.add_argument("--no-chat", action="store_true", help="skip the `llmctl chat` start-up time")
    parser.add_argument("--baseline", type=Path, help="another llmctl checkout whose llmctl engines run beside these")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.work, opts.new_tokens)))
        return
    if not (TOKENIZER / "tokenizer.json").is_file():
        print(f"skipped: no tokenizer at {TOKENIZER} (the benchmark needs a real BPE tokenizer)")
        return
    engines = []
    for name in opts.engines.split(","):
        runner, what, _ = ENGINES[name]
        missing = [m for m in (NEEDS.get(runner), NEEDS.get(what)) if m and importlib.util.find_spec(m) is None]
        if missing:
            print(f"skipped {name}: {', '.join(missing)} is not installed")
        else:
            engines.append(name)
    if opts.baseline:
        if not (opts.baseline / "bench" / "decode.py").is_file():
            parser.error(f"--baseline {opts.baseline}: not an llmctl checkout (no bench/decode.py in it)")
        engines += [f"{name}{BASELINE}" for name in engines if ENGINES[name][0] == "llmctl"]
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-") as tmp:
        work = Path(tmp)
        make_model(work)
        limits = machine_limits()
        results: dict[str, list[dict]] = {name: [] for name in engines}
        for round_ in range(opts.rounds):
            for name in engines:
                root = opts.baseline.resolve() if name.endswith(BASELINE) else ROOT
                out = _run([sys.executable, str(root / "bench" / "decode.py"), "--worker", name.removesuffix(BASELINE),
                            "--work", str(work), "--new-tokens", str(opts.new_tokens)],
                           env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(THREADS)})
                results[name].append(json.loads(out.strip().splitlines()[-1]))
                r = results[name][-1]
                print(f"round {round_ + 1} {name:20s} decode {r['decode']:7.1f}  prompt {r['prefill']:7.1f} tokens/s", file=sys.stderr, flush=True)
            again = machine_limits()
            limits = {k: max(v, again[k]) for k, v in limits.items()}
        startup = [] if opts.no_chat else chat_startup(work)
    report(engines, results, limits, opts.new_tokens, startup)


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo (Linux) or sysctl (macOS) gives it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown CPU"


def report(engines: list[str], results: dict, limits: dict, new_tokens: int, startup: list[float]) -> None:
    from llmctl import kernels

    isa = os.environ.get("LLMCTL_ISA", "auto")
    print(f"\nCPU: {cpu_name()}; llmctl kernels: {kernels.cpu_isa() if isa == 'auto' else isa} "
          f"(this CPU runs {', '.join(kernels.cpu_isas())}; LLMCTL_ISA={isa}); load average {os.getloadavg()[0]:.1f}")
    print(f"machine: {os.cpu_count()} cores, {THREADS} threads; read bandwidth {limits['bandwidth']:.1f} GB/s; "
          f"matmul peak {limits['fp32']:.0f} GFLOP/s fp32, {limits['bf16']:.0f} GFLOP/s bf16")
    from llmctl.spec import ModelSpec

    spec = ModelSpec(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048)
    flops = spec.flops_per_token(PREFILL_PROMPT)
    best = {name: {k: max(r[k] for r in results[name]) for k in ("decode", "prefill")} for name in engines}
    growth = {name: max(r["growth"] for r in results[name]) for name in engines}
    print(f"{'engine':20s} {'decode tok/s':>12s} {'of BW ceiling':>13s} {'prompt tok/s':>12s} {'of peak':>8s} "
          f"{'mem growth':>10s} {'budget':>8s}")
    for name in engines:
        precision = ENGINES[name.removesuffix(BASELINE)][2]
        read, allowed = budget(precision, PREFILL_PROMPT)
        ceiling = limits["bandwidth"] * 1e9 / read
        print(f"{name:20s} {best[name]['decode']:12.1f} {best[name]['decode'] / ceiling:13.0%} {best[name]['prefill']:12.1f} "
              f"{best[name]['prefill'] * flops / 1e9 / limits.get(precision, limits['fp32']):8.0%} {growth[name] / 2**20:8.0f}MB {allowed / 2**20:6.0f}MB")
    print(f"(decode: {new_tokens} tokens after a {DECODE_PROMPT}-token prompt; prompt: {PREFILL_PROMPT} tokens; best of each "
          f"engine's runs. BW ceiling: bandwidth / bytes of weights read per token; peak: the matmul rate at that precision "
          f"(fp32's for quantized engines, whose prompts may multiply in bf16 or int8); "
          f"budget: weights + KV cache + 20%)")
    peers_of = {**PEERS}
    for name in (n for n in engines if n.endswith(BASELINE)):
        peers_of[name.removesuffix(BASELINE)] = (*peers_of.get(name.removesuffix(BASELINE), ()), name)
    for name, peers in peers_of.items():
        for peer in (p for p in peers if name in engines and p in engines):
            prompt = (f"prompt {best[name]['prefill'] / best[peer]['prefill']:.2f}x, " if best[peer]['prefill'] else "")
            print(f"{name} / {peer}: decode {best[name]['decode'] / best[peer]['decode']:.2f}x, "
                  f"{prompt}memory growth {growth[name] / growth[peer]:.2f}x")
            # each round's ratio (the two ran one after the other there): on a busy machine the spread says how far
            # the best-of ratio can be trusted
            rounds = [f"{a['decode'] / b['decode']:.2f}" + (f"/{a['prefill'] / b['prefill']:.2f}" if b["prefill"] else "")
                      for a, b in zip(results[name], results[peer])]
            print(f"    per round (decode/prompt): {' '.join(rounds)}")
    if startup:
        print(f"llmctl chat start-up to first prompt (default model): best {min(startup):.2f} s, first {startup[0]:.2f} s")


if __name__ == "__main__":
    main()
