"""Type stub of llmctl._C (csrc/bindings.cpp): addresses are integers, dtype codes are FLOAT32/FLOAT16/BFLOAT16."""

from __future__ import annotations

FLOAT32: int  # 0
FLOAT16: int  # 1
BFLOAT16: int  # 2

def quantize(
    w: int,
    dtype: int,
    rows: int,
    cols: int,
    group_size: int,
    bits: int,
    wq: int,
    scales: int,
    biases: int,
    threads: int = 0,
) -> None:
    """Quantize (rows, cols) at w into wq (rows, cols*bits/32) uint32 and scales, biases (rows, cols/group_size)."""

def dequantize(
    wq: int,
    scales: int,
    biases: int,
    dtype: int,
    rows: int,
    cols: int,
    group_size: int,
    bits: int,
    out: int,
    out_dtype: int,
    threads: int = 0,
) -> None:
    """Dequantize into out (rows, cols) of out_dtype; dtype is the scales' and biases' dtype code."""

def pack(codes: int, rows: int, cols: int, bits: int, words: int, threads: int = 0) -> None:
    """Pack uint8 codes (rows, cols) into uint32 words (rows, words_per_row(cols, bits))."""

def unpack(words: int, rows: int, cols: int, bits: int, codes: int, threads: int = 0) -> None:
    """Unpack the first cols codes of each row of uint32 words into uint8 codes (rows, cols)."""

def words_per_row(cols: int, bits: int) -> int:
    """ceil(cols * bits / 32)."""

def has_cuda() -> bool:
    """True when built with -DLLMCTL_CUDA=ON."""

def quantize_cuda(
    w: int,
    dtype: int,
    rows: int,
    cols: int,
    group_size: int,
    bits: int,
    wq: int,
    scales: int,
    biases: int,
    stream: int = 0,
) -> None:
    """quantize on device addresses, queued on a cudaStream_t; RuntimeError when built without CUDA."""

def dequantize_cuda(
    wq: int,
    scales: int,
    biases: int,
    dtype: int,
    rows: int,
    cols: int,
    group_size: int,
    bits: int,
    out: int,
    out_dtype: int,
    stream: int = 0,
) -> None:
    """dequantize on device addresses, queued on a cudaStream_t; RuntimeError when built without CUDA."""
