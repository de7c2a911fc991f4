"""Writing GGUF K-quants (Q4_K, Q5_K, Q6_K) as llama.cpp's reference quantizer makes them, and its K-quant mixes.

The searches are ggml-quants.c's (quantize_row_q4_K_ref / q5_K / q6_K with make_qkx2_quants and make_qx_quants),
run in float32 over every sub-block at once; the mixes are llama-quant.cpp's type choice for Q4_K_M and Q5_K_M.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
# llama.cpp's type for a width that is not a multiple of 256 (llama-quant.cpp's fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
MIXES = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K"}  # a mix by name -> the type of most of its matrices
FILE_TYPES = {"q4_k": 14, "q4_k_m": 15, "q5_k": 16, "q5_k_m": 17, "q6_k": 18}  # llama_ftype: Q4_K_S ... Q6_K


def k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's twelve bytes -> eight 6-bit scales and eight 6-bit mins per super-block (ggml's get_scale_min_k4)."""
    d, m, low = (packed[:, i : i + 4] for i in (0, 4, 8))
    scales = np.concatenate([d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mins = np.concatenate([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _f32(x: float) -> np.float32:
    return np.float32(x)


def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # ggml's nearest_int: to nearest, ties to even


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-blocks x (n, size) -> (scale (n,), the_min (n,) >= 0, codes (n, size)): x ~= scale * code - the_min, codes
    in [0, nmax], the weighted least-squares best of nstep + 1 trial grids (ggml's make_qkx2_quants, squared error)."""
    x, w = x.astype(np.float32), weights.astype(np.float32)
    low, high = np.minimum(x.min(axis=1), 0), x.max(axis=1)
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    span = high - low
    flat = span == 0
    span = np.where(flat, _f32(1), span)
    iscale = _f32(nmax) / span
    scale = _f32(1) / iscale
    codes = np.clip(_rint(iscale[:, None] * (x - low[:, None])), 0, nmax)
    best = (w * (scale[:, None] * codes + low[:, None] - x) ** 2).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (_f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)) / span
        trial = np.clip(_rint(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(np.float32)
        sum_l, sum_l2, sum_xl = (w * trial).sum(axis=1), (w * trial * trial).sum(axis=1), (w * trial * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, _f32(0), this_min)
            error = (w * (this_scale[:, None] * trial + this_min[:, None] - x) ** 2).sum(axis=1)
        better = (det > 0) & (error < best)
        codes = np.where(better[:, None], trial.astype(np.int32), codes)
        best, scale, low = np.where(better, error, best), np.where(better, this_scale, scale), np.where(better, this_min, low)
    return np.where(flat, _f32(0), scale).astype(np.float32), (-low).astype(np.float32), codes


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric sub-blocks x (n, size) -> (scale (n,), codes (n, size) in [0, 2 nmax)): x ~= scale * (code - nmax),
    the best of 19 grids by x^2-weighted least squares (ggml's make_qx_quants, rmse_type 1)."""
    x = x.astype(np.float32)
    first = np.abs(x).argmax(axis=1)
    peak = x[np.arange(len(x)), first]
    zero = np.abs(peak) < 1e-15
    peak = np.where(zero, _f32(1), peak)
    w = x * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
        return levels, (w * x * levels).sum(axis=1), (w * levels * levels).sum(axis=1)

    levels, sum_lx, sum_l2 = trial(_f32(-nmax) / peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, _f32(0)).astype(np.float32)
    best, codes = scale * sum_lx, levels
    for step in (*range(-9, 0), *range(1, 10)):
        levels, sum_lx, sum_l2 = trial(-(_f32(nmax) + _f32(0.1) * _f32(step)) / peak)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sum_lx / sum_l2, scale).astype(np.float32)
        best, codes = np.where(better, scale * sum_lx, best), np.where(better[:, None], levels, codes)
    return np.where(zero, _f32(0), scale), np.where(zero[:, None], 0, codes.astype(np.int32) + nmax)


def _pack_scales_mins(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> Q4_K/Q5_K's twelve bytes (inverse of get_scale_min_k4)."""
    s, m = scales.astype(np.uint8), mins.astype(np.uint8)
    return np.concatenate(
        [s[:, :4] | ((s[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6), (s[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)],
        axis=1,
    )


def _quantize_qk(x: np.ndarray, bits: int) -> np.ndarray:
    """(n, 256) float32 -> Q4_K (bits 4) or Q5_K (bits 5) super-blocks (n, 144 | 176) uint8."""

    n = len(x)
    nmax = (1 << bits) - 1
    sub = x.reshape(n * 8, 32)
    weights = np.sqrt((sub * sub).sum(axis=1) / _f32(32))[:, None] + np.abs(sub)
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    scales, mins, codes = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = np.maximum(scales.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _f32(63) / max_scale, _f32(0))
        inv_min = np.where(max_min > 0, _f32(63) / max_min, _f32(0))
    packed = _pack_scales_mins(
        np.minimum(63, _rint(inv_scale[:, None] * scales)), np.minimum(63, _rint(inv_min[:, None] * mins))
    )
    d, dmin = _fp16(max_scale / _f32(63)), _fp16(max_min / _f32(63))
    sc, m = k_scales_mins(packed)
    step = d.astype(np.float32)[:, None] * sc  # (n, 8): each sub-block's scale as stored
    offset = dmin.astype(np.float32)[:, None] * m
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_rint((x.reshape(n, 8, 32) + offset[..., None]) / step[..., None]), 0, nmax)
    codes = np.where(step[..., None] != 0, again, codes.reshape(n, 8, 32)).astype(np.uint8)
    low = (codes & 0x0F).reshape(n, 4, 2, 32)
    parts = [d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed]
    if bits == 5:  # fifth bits: qh's bit j for values [32 j, 32 j + 32)
        high = (codes >> 4).astype(np.uint8)  # (n, 8, 32)
        parts.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8))
    parts.append((low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128))
    return np.concatenate(parts, axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> Q6_K super-blocks (n, 210) uint8."""
    n = len(x)
    scales, codes = make_qx_quants(x.reshape(n * 16, 16), 32)
    scales, codes = scales.reshape(n, 16), codes.reshape(n, 16, 16)
    first = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), first]
    zero = np.abs(max_scale) < 1e-15
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, _f32(0), _f32(-128) / np.where(zero, _f32(1), max_scale))
        d = _fp16(np.where(zero, _f32(0), _f32(1) / iscale))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_rint(x.reshape(n, 16, 16) / step[..., None]), -32, 31) + 32
    codes = np.where(step[..., None] != 0, again, codes).astype(np.uint8).reshape(n, 2, 4, 32)
    ql = np.concatenate([(codes[:, :, 0] & 0x0F) | ((codes[:, :, 2] & 0x0F) << 4),
                         (codes[:, :, 1] & 0x0F) | ((codes[:, :, 3] & 0x0F) << 4)], axis=2)  # fmt: skip
    qh = sum(((codes[:, :, i] >> 4) << (2 * i)).astype(np.uint8) for i in range(4))
    blocks = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)
    blocks[zero] = 0
    return blocks


def quantize_k(values: np.ndarray, qtype: str) -> np.ndarray:
    """A float matrix (rows, cols), cols a multiple of 256 -> its ggml blocks (rows, bytes) of Q4_K, Q5_K or Q6_K."""
    rows, cols = values.shape
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK_K)
    blocks = _quantize_q6_k(x) if qtype == "Q6_K" else _quantize_qk(x, 4 if qtype == "Q4_K" else 5)
    return blocks.reshape(rows, -1)


def _more_bits(layer: int, layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers and every third in between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(target: str, name: str, cols: int, layers: int, tied: bool) -> str:
    """The ggml type llama.cpp's quantizer gives GGUF tensor `name` (a matrix `cols` wide) for `target` (q4_k, q5_k,
    q6_k one type; q4_k_m, q5_k_m the mixes: output head Q6_K, attn_v and ffn_down Q6_K in the layers use_more_bits
    picks), with its fallback where cols is not a multiple of 256."""
    qtype = MIXES.get(target, target.upper())
    if target in MIXES:
        match = name.split(".")
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            qtype = "Q6_K"
        elif len(match) > 2 and match[2] in ("attn_v", "ffn_down") and _more_bits(int(match[1]), layers):
            qtype = "Q6_K"
    return FALLBACK[qtype] if cols % QK_K else qtype
