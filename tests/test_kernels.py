"""llmctl.kernels: bit-exact parity with mx.quantize / mx.dequantize, bit packing, argument errors, CUDA."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmctl import kernels
from llmctl.errors import LlmctlError
from llmctl.kernels import KernelArgumentError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float32", "float16", "bfloat16")
SHAPES = ((8, 256), (7, 384))
# The reference is MLX's CPU backend: MLX's Metal kernel rounds half away from zero and starts its max at 0,
# so on Apple silicon mx.quantize on the GPU differs from its own CPU result in ties and all-negative groups.


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """float32 weights with the cases that matter: outliers, constant rows (max == min), zeros, tiny values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w[0, rng.integers(0, cols, 4)] = [3.0, -5.0, 8.0, -0.7]  # outliers of both signs
    w[1] = 0.5  # constant: q0 = 0.5 / 1e-7 stays under 2^23
    w[2] = 0.0
    w[3] = -3.0  # constant: |edge / scale| = 3e7 is past 2^23, an integer already
    w[4] = np.abs(w[4]) + 1.0  # all positive: the max is the edge
    w[5] *= 1e-5  # range under 1e-7 * n_bins: scale clamps to eps, float16 scales go subnormal
    w[6] = -np.abs(w[6]) - 1.0  # all negative: the min is the edge
    return w


def mlx_array(w: np.ndarray, dtype: str):
    mx = pytest.importorskip("mlx.core")
    return mx.array(w).astype(getattr(mx, dtype))


def raw(x) -> np.ndarray:
    """The bits of any torch / numpy / MLX array as an unsigned integer numpy array."""
    module = type(x).__module__
    if module.startswith("mlx"):
        import mlx.core as mx

        x = np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
    elif module.startswith("torch"):
        import torch

        x = x.detach().cpu()
        x = (x.view(torch.uint16) if x.dtype == torch.bfloat16 else x).numpy()
    return x.view(f"u{x.dtype.itemsize}")


def assert_same_bits(got, want, what: str) -> None:
    got, want = raw(got), raw(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    mismatched = np.flatnonzero(got != want)
    assert mismatched.size == 0, f"{what}: {mismatched.size} elements differ, first at flat index {mismatched[:5]}"


def numpy_codes(w: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """MLX's codes computed independently in numpy (float32 throughout), for checking pack / unpack."""
    x = w.astype(np.float32).reshape(w.shape[0], -1, group_size)
    n_bins = np.float32(2**bits - 1)
    w_max, w_min = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    use_min = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(use_min, scale, -scale)
    edge = np.where(use_min, w_min, w_max)
    q0 = np.rint(edge / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(q0 != 0, edge / q0, scale).astype(np.float32)
    bias = np.where(q0 != 0, edge, np.float32(0)).astype(np.float32)
    return np.clip(np.rint((x - bias) / scale), 0, n_bins).astype(np.uint8).reshape(w.shape)


def numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each row as one little-endian bit stream, padded with zero bits to whole uint32 words."""
    rows, n = codes.shape
    stream = ((codes[:, :, None].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)) & 1).reshape(rows, -1)
    padded = np.zeros((rows, -(-n * bits // 32) * 32), np.uint64)
    padded[:, : n * bits] = stream
    return (padded.reshape(rows, -1, 32) << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_and_dequantize_match_mlx_bit_for_bit(bits, group_size, dtype, shape):
    mx = pytest.importorskip("mlx.core")
    w = mlx_array(weights(*shape, seed=bits * group_size), dtype)
    want_q, want_s, want_b = mx.quantize(w, group_size=group_size, bits=bits, stream=mx.cpu)
    wq, scales, biases = kernels.quantize(w, group_size=group_size, bits=bits)
    assert isinstance(wq, mx.array) and wq.dtype == mx.uint32 and scales.dtype == w.dtype == biases.dtype
    assert_same_bits(wq, want_q, "wq")
    assert_same_bits(scales, want_s, "scales")
    assert_same_bits(biases, want_b, "biases")
    got = kernels.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    want = mx.dequantize(want_q, want_s, want_b, group_size=group_size, bits=bits, stream=mx.cpu)
    assert got.dtype == w.dtype
    assert_same_bits(got, want, "dequantized")


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_to_another_dtype_matches_mlx(dtype, out_dtype):
    mx = pytest.importorskip("mlx.core")
    w = mlx_array(weights(7, 384, seed=1), dtype)
    wq, scales, biases = mx.quantize(w, group_size=32, bits=5, stream=mx.cpu)
    want = mx.dequantize(wq, scales, biases, group_size=32, bits=5, dtype=getattr(mx, out_dtype), stream=mx.cpu)
    got = kernels.dequantize(wq, scales, biases, group_size=32, bits=5, dtype=getattr(mx, out_dtype))
    assert got.dtype == want.dtype
    assert_same_bits(got, want, f"{dtype} -> {out_dtype}")
    assert_same_bits(kernels.dequantize(wq, scales, biases, 32, 5, dtype=out_dtype), want, "dtype given as a name")


@pytest.mark.parametrize("bits", (3, 4, 6, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_tensors_match_mlx(dtype, bits):
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    w32 = weights(7, 384, seed=2)
    w = torch.from_numpy(w32).to(getattr(torch, dtype))
    wq, scales, biases = kernels.quantize(w, group_size=64, bits=bits)
    assert wq.dtype == torch.uint32 and wq.shape == (7, 384 * bits // 32)
    assert scales.dtype == biases.dtype == w.dtype and scales.shape == (7, 6)
    want = mx.quantize(mlx_array(w32, dtype), group_size=64, bits=bits, stream=mx.cpu)
    for got_part, want_part, what in zip((wq, scales, biases), want, ("wq", "scales", "biases")):
        assert_same_bits(got_part, want_part, what)
    out = kernels.dequantize(wq, scales, biases, group_size=64, bits=bits)
    assert isinstance(out, torch.Tensor) and out.dtype == w.dtype
    assert_same_bits(out, mx.dequantize(*want, group_size=64, bits=bits, stream=mx.cpu), "dequantized")


@pytest.mark.parametrize("dtype", ("float32", "float16"))
def test_numpy_arrays_match_mlx(dtype):
    mx = pytest.importorskip("mlx.core")
    w = weights(8, 256, seed=3).astype(dtype)
    wq, scales, biases = kernels.quantize(w, group_size=128, bits=3)
    assert isinstance(wq, np.ndarray) and wq.dtype == np.uint32 and scales.dtype == w.dtype
    want = mx.quantize(mx.array(w), group_size=128, bits=3, stream=mx.cpu)
    for got_part, want_part, what in zip((wq, scales, biases), want, ("wq", "scales", "biases")):
        assert_same_bits(got_part, want_part, what)
    out = kernels.dequantize(wq, scales, biases, group_size=128, bits=3, dtype=np.float32)
    assert out.dtype == np.float32
    assert_same_bits(out, mx.dequantize(*want, group_size=128, bits=3, dtype=mx.float32, stream=mx.cpu), "dequantized")


def test_batched_and_non_contiguous_inputs_give_the_same_result():
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(weights(8, 256, seed=4))
    flat = kernels.quantize(w, group_size=64, bits=4)
    batched = kernels.quantize(w.reshape(2, 4, 256), group_size=64, bits=4)
    assert batched[0].shape == (2, 4, 32) and batched[1].shape == (2, 4, 4)
    for a, b in zip(flat, batched):
        assert torch.equal(a.reshape(b.shape), b)
    transposed = kernels.quantize(w.T.contiguous().T, group_size=64, bits=4)  # strides (1, 8)
    for a, b in zip(flat, transposed):
        assert torch.equal(a, b)


def test_unpacked_mlx_codes_rebuild_mx_dequantize():
    mx = pytest.importorskip("mlx.core")
    w = weights(7, 384, seed=5)
    for bits in BITS:
        wq, scales, biases = mx.quantize(mx.array(w), group_size=32, bits=bits, stream=mx.cpu)
        codes = kernels.unpack(np.asarray(wq), bits, 384)
        np.testing.assert_array_equal(codes, numpy_codes(w, 32, bits), err_msg=f"bits={bits}")
        step = np.repeat(np.asarray(scales), 32, axis=1)
        offset = np.repeat(np.asarray(biases), 32, axis=1)
        rebuilt = (codes * step).astype(np.float32) + offset  # float32: product rounded, then sum
        want = np.asarray(mx.dequantize(wq, scales, biases, group_size=32, bits=bits, stream=mx.cpu))
        np.testing.assert_array_equal(rebuilt.view(np.uint32), want.view(np.uint32), err_msg=f"bits={bits}")


@pytest.mark.parametrize("n", (32, 100, 384, 1))
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 2**bits, (5, n), dtype=np.uint8)
    words = kernels.pack(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (5, -(-n * bits // 32))
    np.testing.assert_array_equal(words, numpy_pack(codes, bits))
    np.testing.assert_array_equal(kernels.unpack(words, bits, n), codes)


def test_pack_keeps_the_framework():
    torch = pytest.importorskip("torch")
    mx = pytest.importorskip("mlx.core")
    codes = np.arange(64, dtype=np.uint8).reshape(2, 32) % 8
    want = numpy_pack(codes, 3)
    words = kernels.pack(torch.from_numpy(codes), 3)
    assert words.dtype == torch.uint32
    np.testing.assert_array_equal(words.numpy(), want)
    assert torch.equal(kernels.unpack(words, 3, 32), torch.from_numpy(codes))
    words = kernels.pack(mx.array(codes), 3)
    assert words.dtype == mx.uint32
    np.testing.assert_array_equal(np.asarray(words), want)
    np.testing.assert_array_equal(np.asarray(kernels.unpack(words, 3, 32)), codes)


def test_threads_do_not_change_the_result():
    w = weights(64, 4096, seed=6)  # 256k values: enough for the C++ side to use several threads
    one = kernels.quantize(w, group_size=64, bits=5, threads=1)
    many = kernels.quantize(w, group_size=64, bits=5, threads=3)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)
    serial, parallel = kernels.dequantize(*one, 64, 5, threads=1), kernels.dequantize(*one, 64, 5, threads=4)
    np.testing.assert_array_equal(serial, parallel)


def test_empty_rows_are_fine():
    wq, scales, biases = kernels.quantize(np.zeros((0, 128), np.float32), group_size=64, bits=4)
    assert wq.shape == (0, 16) and scales.shape == biases.shape == (0, 2)
    assert kernels.dequantize(wq, scales, biases, 64, 4).shape == (0, 128)


def _bad_calls():
    w = weights(8, 256)
    wq, scales, biases = kernels.quantize(w, group_size=64, bits=4)
    inf = w.copy()
    inf[3, 7] = np.inf
    nan = w.copy()
    nan[0, 0] = np.nan
    return [
        ("not a multiple", lambda: kernels.quantize(np.zeros((4, 100), np.float32), 64, 4),
         "last dimension 100 is not a multiple of group_size 64"),
        ("group size", lambda: kernels.quantize(w, group_size=16, bits=4), "group_size=16 is not supported"),
        ("bits 7", lambda: kernels.quantize(w, group_size=64, bits=7), "bits=7 is not supported"),
        ("int weights", lambda: kernels.quantize(w.astype(np.int32), 64, 4), "w has dtype int32"),
        ("scalar", lambda: kernels.quantize(np.float32(1.0), 64, 4), "w is a scalar"),
        ("list", lambda: kernels.quantize([[1.0] * 64], 64, 4), "llmctl kernels take a torch tensor"),
        ("inf", lambda: kernels.quantize(inf, 64, 4), "w contains inf or NaN"),
        ("nan", lambda: kernels.quantize(nan, 64, 4), "w contains inf or NaN"),
        ("wrong bits for wq", lambda: kernels.dequantize(wq, scales, biases, 64, 3),
         "wq needs 24 words per row (256 values), but it has 32"),
        ("wq dtype", lambda: kernels.dequantize(wq.astype(np.int64), scales, biases, 64, 4), "wq has dtype int64"),
        ("mixed dtypes", lambda: kernels.dequantize(wq, scales, biases.astype(np.float16), 64, 4),
         "scales have dtype float32 and biases float16"),
        ("shapes", lambda: kernels.dequantize(wq, scales[:4], biases[:4], 64, 4), "do not fit together"),
        ("out dtype", lambda: kernels.dequantize(wq, scales, biases, 64, 4, dtype="int8"), "dtype int8 is not one of"),
        ("code too big", lambda: kernels.pack(np.array([[1, 2, 17, 3]], np.uint8), 4),
         "code 17 at row 0, column 2 does not fit in 4 bits (0..15)"),
        ("pack dtype", lambda: kernels.pack(np.zeros((2, 8), np.int64), 4), "codes have dtype int64"),
        ("pack bits", lambda: kernels.pack(np.zeros((2, 8), np.uint8), 9), "bits=9 is not supported"),
        ("threads", lambda: kernels.dequantize(wq, scales, biases, 64, 4, threads=-1), "threads=-1"),
        ("scalar scales", lambda: kernels.dequantize(wq[0, 0], scales[0, 0], biases[0, 0], 64, 4),
         "do not fit together"),
        ("unpack n", lambda: kernels.unpack(np.zeros((2, 10), np.uint32), 4, 300),
         "words has 10 words per row, but n=300 codes of 4 bits take 38"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_say_what_is_wrong(case):
    name, call, message = _bad_calls()[case]
    with pytest.raises(KernelArgumentError) as info:
        call()
    assert message in str(info.value), name
    assert isinstance(info.value, ValueError) and isinstance(info.value, LlmctlError)


def test_mixed_frameworks_are_refused():
    torch = pytest.importorskip("torch")
    wq, scales, biases = kernels.quantize(weights(8, 256), 64, 4)
    with pytest.raises(KernelArgumentError, match="scales is a torch array on cpu but wq is a numpy array"):
        kernels.dequantize(wq, torch.from_numpy(scales), biases, 64, 4)


def test_tensors_off_cpu_and_cuda_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(KernelArgumentError, match="w is a torch tensor on meta; llmctl kernels run on cpu and cuda"):
        kernels.quantize(torch.empty(4, 64, device="meta"), 64, 4)


def _buffer(a: np.ndarray) -> tuple[int, int]:
    return a.ctypes.data, a.nbytes


def test_extension_checks_its_own_arguments():
    from llmctl import _C

    w, wq, s = np.zeros((1, 64), np.float32), np.zeros((1, 8), np.uint32), np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="bits 7 is not one of 2, 3, 4, 5, 6, 8"):
        _C.quantize(_buffer(w), 0, 1, 64, 64, 7, _buffer(wq), _buffer(s), _buffer(s))
    with pytest.raises(ValueError, match="last dimension 100 is not a multiple of group_size 64"):
        _C.dequantize(_buffer(wq), _buffer(s), _buffer(s), 0, 1, 100, 64, 4, _buffer(w), 0)
    with pytest.raises(ValueError, match="w is a null pointer"):
        _C.quantize((0, 256), 0, 1, 64, 64, 4, _buffer(wq), _buffer(s), _buffer(s))
    with pytest.raises(ValueError, match="dtype code 5"):
        _C.quantize(_buffer(w), 5, 1, 64, 64, 4, _buffer(wq), _buffer(s), _buffer(s))
    with pytest.raises(ValueError, match="threads must be >= 0"):
        _C.pack(_buffer(np.zeros(8, np.uint8)), 1, 8, 4, _buffer(np.zeros(1, np.uint32)), -1)
    with pytest.raises(ValueError, match="size overflows 64 bits"):
        _C.quantize(_buffer(w), 0, 1 << 40, 1 << 30, 64, 4, _buffer(wq), _buffer(s), _buffer(s))


def _valid_calls() -> dict:
    """Each entry point of llmctl._C with buffers of exactly the bytes its kernel touches: (function, arguments)."""
    from llmctl import _C

    rows, cols, gs, bits, batch = 32, 128, 64, 4, 2
    w, out = np.zeros((rows, cols), np.float32), np.zeros((rows, cols), np.float32)
    wq, nf4 = np.zeros((rows, cols * bits // 32), np.uint32), np.zeros((rows, cols // 8), np.uint32)
    scales, biases = np.ones((rows, cols // gs), np.float32), np.zeros((rows, cols // gs), np.float32)
    codes, words = np.zeros((rows, cols), np.uint8), np.zeros((rows, cols * 3 // 32), np.uint32)
    x, y, tile_rows = np.ones((batch, cols), np.float16), np.zeros((batch, rows), np.float16), np.zeros((16, cols), np.float32)
    B = _buffer
    quant = [B(wq), B(scales), B(biases), 0, rows, cols, gs, bits]
    calls = {
        "quantize": (_C.quantize, [B(w), 0, rows, cols, gs, bits, B(wq), B(scales), B(biases)]),
        "dequantize": (_C.dequantize, [B(wq), B(scales), B(biases), 0, rows, cols, gs, bits, B(out), 0]),
        "pack": (_C.pack, [B(codes), rows, cols, 3, B(words)]),
        "unpack": (_C.unpack, [B(words), rows, cols, 3, B(codes)]),
        "qmatmul": (_C.qmatmul, [B(x), 1, batch, cols, B(wq), B(scales), B(biases), 0, rows, gs, bits, 0, B(y), 1]),
        "quantize_nf4": (_C.quantize_nf4, [B(w), 0, rows, cols, gs, B(nf4), B(scales)]),
        "dequantize_nf4": (_C.dequantize_nf4, [B(nf4), B(scales), 0, rows, cols, gs, B(out), 0]),
        "to_tiled": (_C.to_tiled, quant),
        "from_tiled": (_C.from_tiled, quant),
        "dequantize_tiled": (_C.dequantize_tiled, [*quant, 16, 32, B(tile_rows), 0]),
        "qmatmul_tiled": (_C.qmatmul_tiled, [B(x), 1, batch, cols, B(wq), B(scales), B(biases), 0, rows, gs, bits, B(y), 1]),
        # the CUDA ones check the same counts before anything runs (or, built without CUDA, before they refuse)
        "quantize_cuda": (_C.quantize_cuda, [B(w), 0, rows, cols, gs, bits, B(wq), B(scales), B(biases)]),
        "dequantize_cuda": (_C.dequantize_cuda, [B(wq), B(scales), B(biases), 0, rows, cols, gs, bits, B(out), 0]),
        "qmatmul_cuda": (_C.qmatmul_cuda, [B(x), 1, batch, cols, B(wq), B(scales), B(biases), 0, rows, gs, bits, 0, B(y), 1]),
    }
    # the decode step of a 1-layer model: dim 64, 2 query heads and 1 KV head of 32, hidden 64, vocab 32
    dim, vocab, hidden, D, capacity = 64, 32, 64, 32, 4

    def dense(o: int, i: int) -> tuple:
        m = np.full((o, i), 0.01, np.float32)
        keep.append(m)
        return (o, i, B(m), 0, (0, 0), (0, 0), (0, 0), 0, 0, 0, 0, (0, 0), 0, False)

    keep: list = [w, wq, scales, biases]
    norm = np.ones(dim, np.float32)
    qwq, qs, qb = np.zeros((vocab, dim // 8), np.uint32), np.ones((vocab, 1), np.float32), np.zeros((vocab, 1), np.float32)
    embedding = (vocab, dim, (0, 0), 0, B(qwq), B(qs), B(qb), 0, 64, 4, 0, (0, 0), 0, False)
    head = (vocab, dim, B(np.zeros((vocab, dim), np.float32)), 0, (0, 0), (0, 0), (0, 0), 0, 0, 0, 0, B(np.zeros(vocab, np.float32)), 0, False)
    shape = [dim, 2, 1, D, hidden, vocab, 0, 1e-5, 0]
    calls["NativeDecoder"] = (_C.NativeDecoder, [*shape, embedding, B(norm), head])
    decoder = _C.NativeDecoder(*shape, embedding, B(norm), head)
    layer = [B(norm), [dense(4 * D, dim)], [dense(dim, 2 * D)], B(norm), [dense(2 * hidden, dim)], [dense(dim, hidden)]]
    calls["NativeDecoder.add_layer"] = (decoder.add_layer, layer)
    stepping = _C.NativeDecoder(*shape, embedding, B(norm), head)
    stepping.add_layer(*layer)
    cache = [np.zeros((1, capacity, D), np.float32) for _ in range(2)]
    rope = [np.ones(D, np.float32), np.zeros(D, np.float32)]
    logits = np.zeros(vocab, np.float32)
    calls["NativeDecoder.step"] = (stepping.step, [3, 1, [B(cache[0])], [B(cache[1])], capacity, B(rope[0]), B(rope[1]), B(logits)])
    calls["_keep"] = (None, [keep, head, embedding, cache, rope, logits, qwq, qs, qb, x, y, codes, words, nf4, out, tile_rows])
    return calls


def _buffers(args: list) -> list[tuple[str, list]]:
    """(where, path) of every (address, byte count) pair in args, in tuples (matrices) and lists (projections, caches)."""
    found = []

    def walk(value, path):
        if isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value) and value[1] > 0:
            found.append(path)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, [*path, i])

    for i, a in enumerate(args):
        walk(a, [i])
    return found


def _with_count(args: list, path: list, change: int) -> list:
    def rebuild(value, rest):
        if not rest:
            return (value[0], value[1] + change)
        items = list(value)
        items[rest[0]] = rebuild(items[rest[0]], rest[1:])
        return type(value)(items)

    return rebuild(args, path)


CALLS = [name for name in _valid_calls() if name != "_keep"]


@pytest.mark.parametrize("name", CALLS)
def test_each_buffer_one_byte_short_is_refused(name):
    """Every buffer of every entry point, one byte smaller than what its kernel touches: a ValueError naming it (and
    no read or write out of bounds); with the exact counts the call runs (the CUDA ones then say they are not built)."""
    from llmctl import _C

    calls = _valid_calls()
    fn, args = calls[name]
    paths = _buffers(args)
    assert paths, name
    for path in paths:
        short = _with_count(args, path, -1)
        with pytest.raises(ValueError, match="holds \\d+ bytes but the kernel touches \\d+"):
            fn(*short)
    if name.endswith("_cuda"):
        if not _C.has_cuda():
            with pytest.raises(RuntimeError, match="built without CUDA"):
                fn(*args)
    else:
        fn(*args)  # the exact counts pass


def test_decode_step_refuses_an_isa_this_cpu_lacks_and_runs_every_one_it_has():
    from llmctl import _C

    calls = _valid_calls()
    fn, args = calls["NativeDecoder.step"]
    results = []
    for code, isa in enumerate(kernels.ISAS):
        if isa != "auto" and isa not in kernels.cpu_isas():
            with pytest.raises(ValueError, match=f"this CPU cannot run the {isa} kernels"):
                fn(*args, 0, code)
        else:
            fn(*args, 0, code)
            results.append(np.array(calls["_keep"][1][5]))
    assert len(results) == len(kernels.cpu_isas()) + 1
    with pytest.raises(ValueError, match="isa code 9 is not 0..4"):
        fn(*args, 0, 9)
    assert _C.isa_available(0) and _C.isa_available(1)


def test_stub_lists_what_the_extension_defines():
    from llmctl import _C

    stub = ast.parse((Path(kernels.__file__).parent / "_C.pyi").read_text())
    for node in stub.body:
        if isinstance(node, ast.FunctionDef):
            signature = getattr(_C, node.name).__doc__.splitlines()[0]
            params, depth, parts = signature.split("(", 1)[1].rsplit(") ->", 1)[0], 0, [""]
            for char in params:  # split at the commas outside brackets (a buffer is tuple[int, int])
                depth += {"[": 1, "]": -1}.get(char, 0)
                parts[-1:] = [parts[-1], ""] if char == "," and depth == 0 else [parts[-1] + char]
            names = [part.split(":")[0].strip() for part in parts if part.strip()]
            assert names == [a.arg for a in node.args.args], node.name
        if isinstance(node, ast.ClassDef):  # its methods, by name
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
            assert methods == {m for m in dir(getattr(_C, node.name)) if not m.startswith("_")}, node.name
    defined = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {name for name in dir(_C) if callable(getattr(_C, name)) and not name.startswith("_")}


def test_importing_kernels_loads_no_framework():
    code = "import sys, llmctl.kernels; assert not {'torch', 'mlx', 'mlx.core'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    torch = pytest.importorskip("torch")
    from llmctl import _C

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    if not _C.has_cuda():
        pytest.skip("llmctl._C built without CUDA (pip install . --config-settings=cmake.define.LLMCTL_CUDA=ON)")
    w = torch.from_numpy(weights(7, 384, seed=7)).to(getattr(torch, dtype))
    for bits in BITS:
        for group_size in GROUP_SIZES:
            cpu = kernels.quantize(w, group_size=group_size, bits=bits)
            gpu = kernels.quantize(w.cuda(), group_size=group_size, bits=bits)
            assert gpu[0].device.type == "cuda"
            for a, b, what in zip(cpu, gpu, ("wq", "scales", "biases")):
                assert_same_bits(b, a, f"{what} bits={bits} group_size={group_size}")
            for out_dtype in DTYPES:
                want = kernels.dequantize(*cpu, group_size, bits, dtype=out_dtype)
                got = kernels.dequantize(*gpu, group_size, bits, dtype=out_dtype)
                assert_same_bits(got, want, f"dequantize bits={bits} group_size={group_size} to {out_dtype}")
