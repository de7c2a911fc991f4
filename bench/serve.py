"""Serving under load: `llmctl serve` against mlx_lm.server and llama-cpp-python's server, measured in one run.

    python bench/serve.py [--model DIR] [--clients 1,4,16] [--new-tokens 32] [--requests 2] [--engines llmctl-torch,mlx-lm]

Each server runs in its own process on loopback; this process is the load: at each level, N clients each send
`--requests` streamed completions one after another (each its own prompt, greedy, `--new-tokens` tokens, no stop).
Per engine and level: summed output tokens/s (all tokens over the level's wall time) and p50/p99 time to first
token. Default model: the Llama config of bench/decode.py (about 125M parameters, random weights, Llama 2 tokenizer).
Engines whose package is missing (mlx-lm, llama-cpp-python) are skipped with a note. On a shared, busy machine the
figures are indicative: run it twice and compare engines within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, folder: Path, port: int, max_batch: int, work: Path, threads: int) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads
    if engine.startswith("llmctl-"):
        cmd = [sys.executable, "-m", "llmctl", "serve", "--model", str(folder), "--port", str(port), "--model-name", "bench",
               "--backend", engine.removeprefix("llmctl-"), "--max-batch", str(max_batch)]  # fmt: skip
    elif engine == "mlx-lm":
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port), "--log-level", "WARNING"]
    elif engine == "llama-cpp":  # llama-cpp-python's server (pip install "llama-cpp-python[server]") on a GGUF copy
        gguf = folder if folder.suffix == ".gguf" else gguf_copy(folder, work)
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_ctx", "2048"]  # fmt: skip
    else:
        raise SystemExit(f"unknown engine {engine}")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            response = httpx.get(url + "/health", timeout=2)
            health = response.status_code
            if health == 503 and response.json().get("status") == "error":
                raise RuntimeError(f"the model did not load: {response.json().get('error')}")
            if health == 200 or health == 404 and httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


async def one(client, url: str, model: str, prompt: str, new_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"].get("completion_tokens")
            if data.get("choices") and data["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    return first or 0.0, usage or chunks


async def level(url: str, model: str, clients: int, requests: int, new_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(c: int) -> list[tuple[float, int]]:
            return [await one(client, url, model, f"Request {c}-{r}: once upon a time there was a little", new_tokens) for r in range(requests)]

        start = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(worker(c) for c in range(clients))) for x in xs]
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    return {"clients": clients, "tokens_per_s": tokens / wall, "ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_p99_ms": p99 * 1e3,
            "tokens": tokens, "wall_s": wall}  # fmt: skip


def make_model(work: Path) -> Path:
    import decode  # bench/decode.py: the model of issue #5

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**decode.CONFIG)).save_pretrained(folder)
    tokenizer = decode.TOKENIZER
    if not tokenizer.is_dir():  # a worktree beside the checkout: the shared data given as LLMCTL_SHARED
        tokenizer = Path(os.environ.get("LLMCTL_SHARED", "/work/shared")) / "tokenizers" / "llama2"
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tokenizer / name).is_file():
            (folder / name).write_bytes((tokenizer / name).read_bytes())
    return folder


def gguf_copy(folder: Path, work: Path) -> Path:
    """WORK/FOLDER.gguf, written from a model folder by `llmctl convert` once: llama.cpp's server reads only GGUF. A
    quantized folder keeps its blocks exactly (convert refuses what GGUF cannot hold), a float one stays float32."""
    gguf = work / f"{folder.name}.gguf"
    if not gguf.is_file():
        quantized = "quantization" in json.loads((folder / "config.json").read_text())
        subprocess.run([sys.executable, "-m", "llmctl", "convert", str(folder), "--out", str(gguf), *([] if quantized else ["--type", "f32"])],
                       check=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True)  # fmt: skip
    return gguf


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: bench/decode.py's 125M Llama, random)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="compute threads of each server (MLX's CPU build uses one)")
    parser.add_argument("--engines", default="llmctl-torch,mlx-lm,llama-cpp")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmctl-bench-serve-"))
    folder = args.model or make_model(work)
    levels = [int(c) for c in args.clients.split(",")]
    table = {}
    for engine in args.engines.split(","):
        need = {"mlx-lm": "mlx_lm", "llama-cpp": "llama_cpp", "llmctl-mlx": "mlx"}.get(engine)
        if need and importlib.util.find_spec(need) is None:
            print(f"{engine}: skipped ({need} is not installed)", file=sys.stderr)
            continue
        port = free_port()
        proc = start(engine, folder, port, args.max_batch, work, args.threads)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            model = "bench" if engine.startswith("llmctl-") else str(folder if engine != "llama-cpp" or folder.suffix == ".gguf" else gguf_copy(folder, work))
            asyncio.run(level(url, model, 1, 1, 4))  # warm-up
            table[engine] = [asyncio.run(level(url, model, n, args.requests, args.new_tokens)) for n in levels]
        except Exception as e:  # one engine failing does not stop the others
            print(f"{engine}: failed ({e})", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    isa = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2/FMA" if "avx2" in Path("/proc/cpuinfo").read_text() else "?"
    print(f"\n{cpu_name()} ({isa}), {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} allowed), "
          f"{args.threads} thread(s) per server, load average {os.getloadavg()[0]:.1f}; model {folder}; "
          f"{args.new_tokens} new tokens per request, {args.requests} requests per client\n")
    print(f"| engine | clients | output tok/s (summed) | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for engine, rows in table.items():
        for r in rows:
            print(f"| {engine} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    for ours in (e for e in table if e.startswith("llmctl-")):
        for peer in (e for e in table if not e.startswith("llmctl-")):
            ratios = ", ".join(f"{a['clients']} clients {a['tokens_per_s'] / b['tokens_per_s']:.2f}x" for a, b in zip(table[ours], table[peer]))
            print(f"{ours} / {peer} output tok/s: {ratios}")


if __name__ == "__main__":
    main()
