"""Decoding's float matrix-vector products alone: llmctl's few-row kernels against a plain read of the same bytes.

    python bench/fmatvec.py [--threads 1] [--rounds 15] [--dtypes fp32,fp16,bf16]

One "token" is every matrix of bench/decode.py's model once (12 layers of fused qkv 1280 x 768, o 768 x 768, fused
gate/up 4096 x 768, down 768 x 2048, then the untied head 32000 x 768), each with weights of its own: ~100M weights,
beyond any cache, as decoding reads them. Per dtype and round, in turn: `kernels.fmatmul` over the token, torch's
`F.linear` over it (oneDNN for float32; emulated products for 16-bit weights on a CPU without them) and a float32
sum over the same bytes (the memory read rate, the ceiling). Prints medians and the per-round ratios, so a busy
machine slows each side alike; at one thread also CPU time (the thread's own), since a shared core loses whole slices.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import cpu_name  # noqa: E402

SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)] * 12 + [(32000, 768)]  # (out, in), one token
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def timed(fn) -> tuple[float, float]:
    """(wall, thread CPU) seconds of fn()."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    opts = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from llmctl import kernels

    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    isa = kernels.isa_code(None)
    print(f"CPU: {cpu_name()}; llmctl kernels: {kernels.cpu_isa()} (this CPU runs {', '.join(kernels.cpu_isas())}); "
          f"{opts.threads} thread(s); load average {os.getloadavg()[0]:.1f}")
    for name in opts.dtypes.split(","):
        dtype = getattr(torch, DTYPES[name])
        weights = [(torch.randn(out, k) * 0.02).to(dtype) for out, k in SHAPES]
        words = [w.view(torch.float32) for w in weights]  # the same bytes as float32, for the read
        xs = {k: torch.randn(1, k) for k in {k for _, k in SHAPES}}
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        sides = {
            "llmctl": lambda: [kernels.fmatmul(xs[w.shape[1]], w, threads=opts.threads, isa=isa) for w in weights],
            "torch": lambda: [F.linear(xs[w.shape[1]].to(w.dtype), w) for w in weights],
            "read": lambda: [v.sum() for v in words],
        }
        if name != "fp32":  # torch's 16-bit products on CPUs without 16-bit arithmetic: 10x slower, a round takes long
            sides.pop("torch")
        for fn in sides.values():
            fn()  # warm-up: page faults, thread pools
        times: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        for _ in range(opts.rounds):
            for side, fn in sides.items():
                times[side].append(timed(fn))
        print(f"\n{name}: {nbytes / 1e6:.0f} MB of weights per token")
        for side, runs in times.items():
            wall, cpu = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
            line = f"  {side:7s} {1e3 * wall:7.1f} ms/token wall ({nbytes / wall / 1e9:5.2f} GB/s)"
            if opts.threads == 1:
                line += f", {1e3 * cpu:7.1f} ms CPU ({nbytes / cpu / 1e9:5.2f} GB/s)"
            if side != "read":
                ratios = [r[0] / s[0] for s, r in zip(runs, times["read"])]
                line += f"; per round, share of the read rate: median {statistics.median(ratios):.2f} wall"
                if opts.threads == 1:
                    line += f", {statistics.median(r[1] / s[1] for s, r in zip(runs, times['read'])):.2f} CPU"
                line += f" (min {min(ratios):.2f}, max {max(ratios):.2f})"
            print(line)


if __name__ == "__main__":
    main()
