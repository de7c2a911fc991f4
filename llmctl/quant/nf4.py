"""NF4 (QLoRA's 4-bit NormalFloat) without a framework: the code book and double quantization of block scales."""

from __future__ import annotations

import numpy as np

# bitsandbytes' NF4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (Dettmers et al. 2023).
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)  # fmt: skip
DOUBLE_QUANT_BLOCK = 256  # block scales share one float32 absmax per 256, as in QLoRA


def double_quantize(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QLoRA's double quantization of the block scales: subtract their mean, then 8 bits per scale.

    scales: (rows, groups) float. Returns (codes uint8 (rows, groups), absmax float32 (ceil(n / 256),),
    offset float32 (1,)): scale ~= (code - 128) / 127 * absmax[block] + offset, blocks of 256 in row-major order.
    QLoRA stores the codes as 8-bit floats; a symmetric 8-bit integer grid is used here, as accurate for
    these values (all of one sign and close together once the mean is gone).
    """
    flat = np.asarray(scales, np.float32).reshape(-1)
    offset = np.float32(flat.mean()) if flat.size else np.float32(0)
    centered = flat - offset
    n_blocks = -(-flat.size // DOUBLE_QUANT_BLOCK)
    padded = np.zeros(n_blocks * DOUBLE_QUANT_BLOCK, np.float32)
    padded[: flat.size] = centered
    blocks = padded.reshape(n_blocks, DOUBLE_QUANT_BLOCK)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    step = np.where(absmax > 0, absmax, 1).astype(np.float32)[:, None]
    codes = np.clip(np.rint(blocks / step * 127), -127, 127).astype(np.int16) + 128
    return codes.reshape(-1)[: flat.size].astype(np.uint8).reshape(scales.shape), absmax, np.array([offset], np.float32)


def double_dequantize(codes: np.ndarray, absmax: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32 block scales (the shape of `codes`) from double_quantize's three arrays."""
    flat = codes.reshape(-1).astype(np.float32) - 128
    block_absmax = np.repeat(np.asarray(absmax, np.float32), DOUBLE_QUANT_BLOCK)[: flat.size]
    return (flat / np.float32(127) * block_absmax + np.asarray(offset, np.float32)[0]).astype(np.float32).reshape(codes.shape)
