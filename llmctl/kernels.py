"""Python face of llmctl._C: MLX-layout affine (de)quantization and bit packing for torch, numpy and MLX arrays."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmctl.errors import BackendUnavailable, LlmctlError

GROUP_SIZES = (32, 64, 128)
READ_GROUP_SIZE = 16  # groups of 16 (GGUF's Q6_K, Q3_K, Q2_K read exactly) are dequantized and multiplied, not made
BITS = (2, 3, 4, 5, 6, 8)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TILE_ROWS = 16  # output rows a tile of the tiled layout interleaves (csrc/qmatmul.h)
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # kFloat32.. in csrc/quant.h
_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


class KernelArgumentError(LlmctlError, ValueError):
    """An array handed to llmctl.kernels with the wrong shape, dtype, device or parameters."""


@functools.cache
def _lib() -> Any:
    try:
        from llmctl import _C
    except ImportError as error:
        raise BackendUnavailable(
            f"llmctl's C++ extension llmctl._C is not built ({error}).",
            hint="Reinstall llmctl with `pip install .` so the extension is compiled.",
        ) from error
    return _C


@dataclass
class _Array:
    """A C-contiguous buffer behind a torch tensor, numpy array or MLX array."""

    framework: str  # "torch" | "numpy" | "mlx"
    data: Any  # object that owns the memory for the duration of the call
    address: int
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", "uint32", ...
    device: Any  # torch.device for torch, "cpu" otherwise
    nbytes: int  # bytes from address on that belong to this array
    numpy_dtype: Any = None  # numpy input's dtype (keeps ml_dtypes' bfloat16 for outputs)

    @property
    def on_cuda(self) -> bool:
        return self.framework == "torch" and self.device.type == "cuda"

    @property
    def buffer(self) -> tuple[int, int]:
        """(address, byte count): what the C++ side checks against the bytes its kernel touches."""
        return self.address, self.nbytes


def _wrap(x: Any, name: str) -> _Array:
    """Reads address, shape and dtype; non-contiguous inputs are copied, as mx.quantize does."""
    module = type(x).__module__.split(".")[0]  # "torch" for torch.nn.Parameter too
    if module == "torch":
        if not x.is_contiguous():
            x = x.contiguous()
        if x.device.type not in ("cpu", "cuda"):
            raise KernelArgumentError(
                f"{name} is a torch tensor on {x.device}; llmctl kernels run on cpu and cuda.",
                hint=f"Move it first: {name}.to('cpu').",
            )
        dtype = str(x.dtype).removeprefix("torch.")
        return _Array("torch", x, x.data_ptr(), tuple(x.shape), dtype, x.device, x.numel() * x.element_size())
    if module == "mlx":
        import mlx.core as mx

        # numpy has no bfloat16: read its bits as uint16. np.asarray evaluates and shares memory.
        view = np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
        view = view if view.flags.c_contiguous else np.ascontiguousarray(view)
        dtype = str(x.dtype).rsplit(".", 1)[-1]
        return _Array("mlx", view, view.ctypes.data, tuple(x.shape), dtype, "cpu", view.nbytes)
    if isinstance(x, (np.ndarray, np.generic)):
        x = np.asarray(x) if x.flags.c_contiguous else np.ascontiguousarray(x)
        return _Array("numpy", x, x.ctypes.data, x.shape, x.dtype.name, "cpu", x.nbytes, x.dtype)
    raise KernelArgumentError(
        f"{name} is a {type(x).__module__}.{type(x).__name__}; "
        "llmctl kernels take a torch tensor, a numpy array or an MLX array."
    )


def _empty(like: _Array, shape: tuple[int, ...], dtype: str) -> _Array:
    """An uninitialized output in the framework (and torch device) of `like`."""
    if like.framework == "torch":
        import torch

        out = torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
        return _Array("torch", out, out.data_ptr(), shape, dtype, like.device, out.numel() * out.element_size())
    if dtype == "bfloat16":
        np_dtype = like.numpy_dtype if like.dtype == "bfloat16" and like.numpy_dtype is not None else _numpy_bfloat16()
    else:
        np_dtype = np.dtype(dtype)
    out = np.empty(shape, np_dtype)
    return _Array(like.framework, out, out.ctypes.data, shape, dtype, "cpu", out.nbytes, np_dtype)


def _numpy_bfloat16() -> Any:
    """ml_dtypes' bfloat16 when installed; else uint16, holding the bfloat16 bits (numpy has no bfloat16)."""
    try:
        import ml_dtypes
    except ImportError:
        return np.dtype(np.uint16)
    return np.dtype(ml_dtypes.bfloat16)


def _result(out: _Array) -> Any:
    if out.framework != "mlx":
        return out.data
    import mlx.core as mx

    array = mx.array(out.data)
    return array.view(mx.bfloat16) if out.dtype == "bfloat16" else array


def _dtype_name(dtype: Any) -> str:
    """'float16', torch.float16, mx.float16, np.float16 and np.dtype('float16') all give 'float16'."""
    if isinstance(dtype, type):
        dtype = np.dtype(dtype)
    name = str(dtype).rsplit(".", 1)[-1]
    name = _ALIASES.get(name, name)
    if name not in FLOAT_DTYPES:
        raise KernelArgumentError(f"dtype {dtype} is not one of {', '.join(FLOAT_DTYPES)}.")
    return name


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise KernelArgumentError(f"threads={threads}; pass a positive count, or 0 for every core.")


def _check_params(group_size: int, bits: int, threads: int, read: bool = False) -> None:
    """read: the kernel reads existing codes (dequantize, qmatmul), so groups of 16 are accepted too."""
    _check_threads(threads)
    if bits not in BITS:
        raise KernelArgumentError(f"bits={bits} is not supported; choose one of {', '.join(map(str, BITS))}.")
    if group_size not in GROUP_SIZES and not (read and group_size == READ_GROUP_SIZE):
        raise KernelArgumentError(
            f"group_size={group_size} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}."
        )


def _refuse_groups_of_16_on_cuda(group_size: int) -> None:
    if group_size == READ_GROUP_SIZE:
        raise KernelArgumentError(
            "groups of 16 (GGUF Q6_K, Q3_K, Q2_K) run on the CPU kernels only.",
            hint="Run the model on the CPU, or convert it to an mlx-lm folder (groups of 32) first.",
        )


def _check_same_place(arrays: dict[str, _Array]) -> None:
    (first_name, first), *rest = arrays.items()
    for name, array in rest:
        if array.framework != first.framework or str(array.device) != str(first.device):
            raise KernelArgumentError(
                f"{name} is a {array.framework} array on {array.device} but {first_name} is a "
                f"{first.framework} array on {first.device}; pass all of them from one framework and device."
            )


def _refuse_tiled(q: _Array, s: _Array, kernel: str, instead: str) -> None:
    """Weights in the tiled layout (3-D, `to_tiled`) hold the same bytes as MLX's in another order: refused here."""
    if len(q.shape) == 3 and q.shape[-1] == TILE_ROWS and len(s.shape) == 3 and s.shape[-1] == TILE_ROWS:
        raise KernelArgumentError(
            f"wq {q.shape} and scales {s.shape} are in the tiled layout (tiles, words, {TILE_ROWS}); {kernel} reads "
            "MLX's (out_features, words).",
            hint=f"Use kernels.{instead}, or kernels.from_tiled to lay them out as MLX does.",
        )


def _cuda_call(tensor: _Array) -> tuple[Any, int]:
    """The C++ module and the current torch CUDA stream for a CUDA tensor, or a clear error."""
    lib = _lib()
    if not lib.has_cuda():
        raise BackendUnavailable(
            "The tensors are on CUDA but llmctl._C was built without CUDA kernels.",
            hint="Reinstall with `pip install . --config-settings=cmake.define.LLMCTL_CUDA=ON`, "
            "or move the tensors to the CPU.",
        )
    import torch

    return lib, torch.cuda.current_stream(tensor.device).cuda_stream


def quantize(w: Any, group_size: int = 64, bits: int = 4, *, threads: int = 0) -> tuple[Any, Any, Any]:
    """Group-wise affine quantization, bit-exact with `mx.quantize(w, group_size, bits, stream=mx.cpu)`.

    (MLX's Metal kernel writes the same layout but rounds ties away from zero, so its codes can differ.)

    w: (..., K) float32/float16/bfloat16, K a multiple of group_size. Returns (wq, scales, biases):
    wq (..., K * bits / 32) uint32 and scales, biases (..., K / group_size) in w's dtype, in w's
    framework (torch on w's device, numpy, or MLX); w ~= scales * code + biases per group.
    threads: CPU threads, 0 for all.
    """
    _check_params(group_size, bits, threads)
    x = _wrap(w, "w")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelArgumentError(f"w has dtype {x.dtype}; quantize takes {', '.join(FLOAT_DTYPES)}.")
    if len(x.shape) == 0:
        raise KernelArgumentError("w is a scalar; quantize takes an array whose last dimension holds the groups.")
    cols = x.shape[-1]
    if cols % group_size != 0:
        fits = [str(g) for g in GROUP_SIZES if cols % g == 0]
        raise KernelArgumentError(
            f"w has shape {x.shape}: last dimension {cols} is not a multiple of group_size {group_size}.",
            hint=f"Use group_size {' or '.join(fits)}." if fits else "Pad the last dimension to a multiple of 32.",
        )
    rows = math.prod(x.shape[:-1])
    wq = _empty(x, (*x.shape[:-1], cols * bits // 32), "uint32")
    scales = _empty(x, (*x.shape[:-1], cols // group_size), x.dtype)
    biases = _empty(x, scales.shape, x.dtype)
    args = (x.buffer, _DTYPE_CODES[x.dtype], rows, cols, group_size, bits, wq.buffer, scales.buffer, biases.buffer)
    if x.on_cuda:
        import torch

        if not bool(torch.isfinite(x.data).all()):
            raise KernelArgumentError("w contains inf or NaN; quantize needs finite weights.")
        lib, stream = _cuda_call(x)
        with torch.cuda.device(x.device):
            lib.quantize_cuda(*args, stream)
    else:
        try:
            _lib().quantize(*args, threads)
        except ValueError as error:
            raise KernelArgumentError(f"{error}.") from None
    return _result(wq), _result(scales), _result(biases)


def dequantize(
    wq: Any,
    scales: Any,
    biases: Any,
    group_size: int = 64,
    bits: int = 4,
    dtype: Any = None,
    *,
    threads: int = 0,
) -> Any:
    """Inverse of quantize, bit-exact with `mx.dequantize(wq, scales, biases, group_size, bits, dtype=dtype)` on CPU.

    Values are computed in the scales' dtype (code * scale, rounded, + bias, rounded) and then cast
    to dtype (default: the scales' dtype). Returns (..., K) in the inputs' framework.
    """
    _check_params(group_size, bits, threads, read=True)
    q, s, b = _wrap(wq, "wq"), _wrap(scales, "scales"), _wrap(biases, "biases")
    _check_same_place({"wq": q, "scales": s, "biases": b})
    _refuse_tiled(q, s, "dequantize", "dequantize_tiled")
    if q.dtype != "uint32":
        raise KernelArgumentError(f"wq has dtype {q.dtype}; packed weights are uint32.")
    if s.dtype not in FLOAT_DTYPES or b.dtype != s.dtype:
        raise KernelArgumentError(
            f"scales have dtype {s.dtype} and biases {b.dtype}; they must share one of {', '.join(FLOAT_DTYPES)}."
        )
    if len(q.shape) == 0 or len(s.shape) == 0 or s.shape != b.shape or q.shape[:-1] != s.shape[:-1]:
        raise KernelArgumentError(
            f"wq {q.shape}, scales {s.shape} and biases {b.shape} do not fit together: scales and biases "
            "must have one shape, and all three the same leading dimensions."
        )
    cols = s.shape[-1] * group_size
    if q.shape[-1] * 32 != cols * bits:
        raise KernelArgumentError(
            f"scales have {s.shape[-1]} groups per row, so with group_size {group_size} and {bits} bits wq "
            f"needs {cols * bits // 32} words per row ({cols} values), but it has {q.shape[-1]}.",
            hint="Check that group_size and bits are the ones the weights were quantized with.",
        )
    out_dtype = s.dtype if dtype is None else _dtype_name(dtype)
    out = _empty(s, (*s.shape[:-1], cols), out_dtype)
    rows = math.prod(s.shape[:-1])
    args = (q.buffer, s.buffer, b.buffer, _DTYPE_CODES[s.dtype], rows, cols, group_size, bits, out.buffer)
    if q.on_cuda:
        _refuse_groups_of_16_on_cuda(group_size)
        import torch

        lib, stream = _cuda_call(q)
        with torch.cuda.device(q.device):
            lib.dequantize_cuda(*args, _DTYPE_CODES[out_dtype], stream)
    else:
        _lib().dequantize(*args, _DTYPE_CODES[out_dtype], threads)
    return _result(out)


def _check_pack_bits(bits: int, threads: int) -> None:
    _check_threads(threads)
    if not 1 <= bits <= 8:
        raise KernelArgumentError(f"bits={bits} is not supported; pack and unpack take 1 to 8 bits.")


def _require_cpu(array: _Array, name: str) -> None:
    if array.on_cuda:
        raise KernelArgumentError(
            f"{name} is on {array.device}; pack and unpack run on the CPU.", hint=f"Pass {name}.cpu()."
        )


def pack(codes: Any, bits: int, *, threads: int = 0) -> Any:
    """Pack uint8 codes (..., N), each < 2**bits, into uint32 words (..., ceil(N * bits / 32)).

    Each row becomes one little-endian bit stream (code j at bit j * bits), MLX's layout.
    """
    _check_pack_bits(bits, threads)
    c = _wrap(codes, "codes")
    _require_cpu(c, "codes")
    if c.dtype != "uint8":
        raise KernelArgumentError(
            f"codes have dtype {c.dtype}; pack takes uint8 codes.", hint="Convert them first to uint8."
        )
    if len(c.shape) == 0:
        raise KernelArgumentError("codes is a scalar; pack takes an array of rows of codes.")
    lib = _lib()
    cols = c.shape[-1]
    words = _empty(c, (*c.shape[:-1], lib.words_per_row(cols, bits)), "uint32")
    try:
        lib.pack(c.buffer, math.prod(c.shape[:-1]), cols, bits, words.buffer, threads)
    except ValueError as error:
        raise KernelArgumentError(f"{error}.") from None
    return _result(words)


def unpack(words: Any, bits: int, n: int, *, threads: int = 0) -> Any:
    """Inverse of pack: the first n codes of each row of uint32 words (..., ceil(n * bits / 32)), as uint8 (..., n)."""
    _check_pack_bits(bits, threads)
    x = _wrap(words, "words")
    _require_cpu(x, "words")
    if x.dtype != "uint32":
        raise KernelArgumentError(f"words have dtype {x.dtype}; unpack takes uint32 words.")
    if len(x.shape) == 0:
        raise KernelArgumentError("words is a scalar; unpack takes an array of rows of words.")
    lib = _lib()
    if n < 0 or lib.words_per_row(n, bits) != x.shape[-1]:
        raise KernelArgumentError(
            f"words has {x.shape[-1]} words per row, but n={n} codes of {bits} bits take "
            f"{lib.words_per_row(max(n, 0), bits)}."
        )
    codes = _empty(x, (*x.shape[:-1], n), "uint8")
    lib.unpack(x.buffer, math.prod(x.shape[:-1]), n, bits, codes.buffer, threads)
    return _result(codes)


ISAS = ("auto", "scalar", "avx2", "avx512", "neon")
MODES = ("affine", "nf4")


def isa_code(isa: str | None) -> int:
    """The C++ isa code of a name; None reads LLMCTL_ISA (default auto), e.g. LLMCTL_ISA=scalar for a reference run."""
    import os

    name = (isa if isa is not None else os.environ.get("LLMCTL_ISA", "auto")).lower()
    if name not in ISAS:
        raise KernelArgumentError(f"isa={name!r} is not one of {', '.join(ISAS)}.")
    return ISAS.index(name)


def cpu_isa() -> str:
    """The instruction set qmatmul uses here by default: avx512, avx2, neon or scalar."""
    return _lib().cpu_isa()


def cpu_isas() -> list[str]:
    """Every instruction set whose kernels this CPU runs (scalar first), each one `isa=` or LLMCTL_ISA can pick."""
    lib = _lib()
    return [name for code, name in enumerate(ISAS) if code and lib.isa_available(code)]


def qmatmul(
    x: Any,
    wq: Any,
    scales: Any,
    biases: Any,
    group_size: int = 64,
    bits: int = 4,
    *,
    mode: str = "affine",
    threads: int = 0,
    isa: str | None = None,
) -> Any:
    """y = x @ dequantize(wq, scales, biases).T without materializing the weights.

    x: (..., K) float32/float16/bfloat16; wq: (N, K * bits / 32) uint32; scales, biases: (N, K / group_size)
    in one float dtype, as `quantize` (mode "affine") or `quantize_nf4` (mode "nf4", biases None) write them.
    Returns (..., N) in x's dtype and framework (torch CPU or CUDA, numpy, MLX). On the CPU, isa picks the
    kernel (auto, scalar, avx2, avx512, neon; default: $LLMCTL_ISA or auto); threads: 0 for all cores.
    """
    _check_params(group_size, bits, threads, read=True)
    if mode not in MODES:
        raise KernelArgumentError(f"mode={mode!r} is not one of {', '.join(MODES)}.")
    if mode == "nf4" and bits != 4:
        raise KernelArgumentError(f"mode='nf4' stores 4-bit codes; got bits={bits}.")
    a, q, s = _wrap(x, "x"), _wrap(wq, "wq"), _wrap(scales, "scales")
    arrays = {"x": a, "wq": q, "scales": s}
    if mode == "affine":
        if biases is None:
            raise KernelArgumentError("biases is None; affine weights need their biases (only mode='nf4' has none).")
        arrays["biases"] = _wrap(biases, "biases")
    elif biases is not None:
        raise KernelArgumentError("mode='nf4' has no biases; pass biases=None.")
    _check_same_place(arrays)
    _refuse_tiled(q, s, "qmatmul", "qmatmul_tiled")
    b = arrays.get("biases")
    if a.dtype not in FLOAT_DTYPES:
        raise KernelArgumentError(f"x has dtype {a.dtype}; qmatmul takes {', '.join(FLOAT_DTYPES)} activations.")
    if q.dtype != "uint32":
        raise KernelArgumentError(f"wq has dtype {q.dtype}; packed weights are uint32.")
    if s.dtype not in FLOAT_DTYPES or (b is not None and b.dtype != s.dtype):
        found = f"scales have dtype {s.dtype}" + (f" and biases {b.dtype}" if b is not None else "")
        raise KernelArgumentError(f"{found}; they must share one of {', '.join(FLOAT_DTYPES)}.")
    if len(a.shape) == 0:
        raise KernelArgumentError("x is a scalar; qmatmul takes (..., in_features) activations.")
    if len(q.shape) != 2 or len(s.shape) != 2 or (b is not None and b.shape != s.shape):
        raise KernelArgumentError(
            f"wq {q.shape}, scales {s.shape}" + (f" and biases {b.shape}" if b is not None else "")
            + " must be 2-D: (out_features, words) and (out_features, groups), scales and biases alike."
        )
    k, n = a.shape[-1], q.shape[0]
    hint = "Check that group_size and bits are the ones the weights were quantized with."
    if s.shape[0] != n or s.shape[1] * group_size != k:
        raise KernelArgumentError(
            f"x has {k} features but wq {q.shape} and scales {s.shape} hold {s.shape[1] * group_size} features "
            f"per row at group_size {group_size}.",
            hint=hint,
        )
    if q.shape[1] * 32 != k * bits:
        raise KernelArgumentError(
            f"wq {q.shape} has {q.shape[1]} words per row, but {k} features of {bits} bits take {k * bits / 32:g}.",
            hint=hint,
        )
    batch = math.prod(a.shape[:-1])
    y = _empty(a, (*a.shape[:-1], n), a.dtype)
    args = (a.buffer, _DTYPE_CODES[a.dtype], batch, k, q.buffer, s.buffer, b.buffer if b is not None else (0, 0),
            _DTYPE_CODES[s.dtype], n, group_size, bits, MODES.index(mode), y.buffer, _DTYPE_CODES[a.dtype])
    if a.on_cuda:
        _refuse_groups_of_16_on_cuda(group_size)
        import torch

        lib, stream = _cuda_call(a)
        with torch.cuda.device(a.device):
            lib.qmatmul_cuda(*args, stream)
    else:
        try:
            _lib().qmatmul(*args, threads, isa_code(isa))
        except ValueError as error:
            raise KernelArgumentError(f"{error}.") from None
    return _result(y)


def nf4_levels() -> list[float]:
    """QLoRA's 16 NormalFloat-4 levels as the C++ kernels hold them."""
    return list(_lib().nf4_levels())


def quantize_nf4(w: Any, group_size: int = 64, *, threads: int = 0) -> tuple[Any, Any]:
    """NF4 quantization (QLoRA): per block of group_size values, scale = absmax, code = nearest NF4 level of w / absmax.

    w: (..., K) float, K a multiple of group_size. Returns (wq, scales): wq (..., K / 8) uint32 (4-bit codes
    packed as `quantize` packs them), scales (..., K / group_size) in w's dtype, in w's framework (CPU).
    """
    _check_params(group_size, 4, threads)
    x = _wrap(w, "w")
    _require_cpu(x, "w")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelArgumentError(f"w has dtype {x.dtype}; quantize_nf4 takes {', '.join(FLOAT_DTYPES)}.")
    if len(x.shape) == 0 or x.shape[-1] % group_size:
        raise KernelArgumentError(f"w has shape {x.shape}: its last dimension must be a multiple of group_size {group_size}.")
    cols = x.shape[-1]
    wq = _empty(x, (*x.shape[:-1], cols // 8), "uint32")
    scales = _empty(x, (*x.shape[:-1], cols // group_size), x.dtype)
    try:
        _lib().quantize_nf4(x.buffer, _DTYPE_CODES[x.dtype], math.prod(x.shape[:-1]), cols, group_size,
                            wq.buffer, scales.buffer, threads)
    except ValueError as error:
        raise KernelArgumentError(f"{error}.") from None
    return _result(wq), _result(scales)


def dequantize_nf4(wq: Any, scales: Any, group_size: int = 64, dtype: Any = None, *, threads: int = 0) -> Any:
    """Inverse of quantize_nf4: level(code) * absmax, computed in float32 and cast to dtype (default: the scales')."""
    _check_params(group_size, 4, threads)
    q, s = _wrap(wq, "wq"), _wrap(scales, "scales")
    _check_same_place({"wq": q, "scales": s})
    _require_cpu(q, "wq")
    if q.dtype != "uint32" or s.dtype not in FLOAT_DTYPES:
        raise KernelArgumentError(f"wq has dtype {q.dtype} and scales {s.dtype}; expected uint32 and a float dtype.")
    cols = s.shape[-1] * group_size if s.shape else 0
    if len(q.shape) == 0 or q.shape[:-1] != s.shape[:-1] or q.shape[-1] * 8 != cols:
        raise KernelArgumentError(f"wq {q.shape} and scales {s.shape} do not fit together at group_size {group_size}.")
    out_dtype = s.dtype if dtype is None else _dtype_name(dtype)
    out = _empty(s, (*s.shape[:-1], cols), out_dtype)
    _lib().dequantize_nf4(q.buffer, s.buffer, _DTYPE_CODES[s.dtype], math.prod(s.shape[:-1]), cols, group_size,
                          out.buffer, _DTYPE_CODES[out_dtype], threads)
    return _result(out)


# ---- the tiled layout (csrc/qmatmul.h): affine 4-/8-bit codes of 16 output rows interleaved, made in place from
# MLX's. Its arrays say so by their shape: wq (out/16, words, 16), scales and biases (out/16, groups, 16), so that
# qmatmul and dequantize, which read MLX's (out, words), refuse them instead of computing garbage.


def tiled_supported(bits: int, mode: str, out_features: int) -> bool:
    """Whether weights of this format can take the tiled layout (affine 4-/8-bit, rows a multiple of 16)."""
    return bool(_lib().tiled_supported(bits, MODES.index(mode), out_features))


def tiled_fast() -> bool:
    """Whether this CPU has the tiled kernels (AVX-512 VNNI or AVX2); elsewhere they run a portable loop."""
    return bool(_lib().tiled_fast())


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX)."""
    return bool(_lib().cpu_has_bf16())


def _tiled_arrays(wq: Any, scales: Any, biases: Any, group_size: int, bits: int, tiled: bool) -> tuple[_Array, ...]:
    """wq, scales and biases (torch CPU, contiguous, not copied: they are re-laid in place) checked for to/from_tiled
    and qmatmul_tiled; `tiled`: whether they must have the tiled shapes or MLX's."""
    import torch

    _check_params(group_size, bits, 0)
    names = ("wq", "scales", "biases")
    for name, t in zip(names, (wq, scales, biases)):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise KernelArgumentError(f"{name} must be a contiguous torch tensor on the CPU (re-laid in place).")
    q, s, b = (_wrap(t, name) for name, t in zip(names, (wq, scales, biases)))
    if q.dtype != "uint32" or s.dtype not in FLOAT_DTYPES or b.dtype != s.dtype:
        raise KernelArgumentError(f"wq, scales and biases have dtypes {q.dtype}, {s.dtype}, {b.dtype}; "
                                  f"expected uint32 and one of {', '.join(FLOAT_DTYPES)} twice.")
    dims = 3 if tiled else 2
    if len(q.shape) != dims or len(s.shape) != dims or s.shape != b.shape:
        layout = f"the tiled layout (tiles, words, {TILE_ROWS})" if tiled else "MLX's layout (out_features, words)"
        raise KernelArgumentError(f"wq {q.shape}, scales {s.shape} and biases {b.shape} are not in {layout}.")
    if tiled and (q.shape[-1] != TILE_ROWS or s.shape[-1] != TILE_ROWS or q.shape[0] != s.shape[0]):
        raise KernelArgumentError(f"wq {q.shape} and scales {s.shape} are not (tiles, words, {TILE_ROWS}) and "
                                  f"(tiles, groups, {TILE_ROWS}) of one tile count.")
    words = q.shape[1]
    if s.shape[0] * (TILE_ROWS if tiled else 1) == 0 or words * 32 != s.shape[1] * group_size * bits or (
        not tiled and q.shape[0] != s.shape[0]
    ):
        raise KernelArgumentError(f"wq {q.shape} and scales {s.shape} do not fit together at group_size {group_size}, "
                                  f"{bits} bits.")
    out = s.shape[0] * (TILE_ROWS if tiled else 1)
    if not _lib().tiled_supported(bits, 0, out):
        raise KernelArgumentError(f"the tiled layout takes affine 4- or 8-bit codes of a multiple of {TILE_ROWS} rows, "
                                  f"not {bits}-bit codes of {out} rows.")
    return q, s, b


def _retile(wq: Any, scales: Any, biases: Any, group_size: int, bits: int, threads: int, back: bool) -> tuple[Any, Any, Any]:
    _check_threads(threads)
    q, s, b = _tiled_arrays(wq, scales, biases, group_size, bits, tiled=back)
    out = s.shape[0] * (TILE_ROWS if back else 1)
    cols = s.shape[1] * group_size
    fn = _lib().from_tiled if back else _lib().to_tiled
    fn(q.buffer, s.buffer, b.buffer, _DTYPE_CODES[s.dtype], out, cols, group_size, bits, threads)
    if back:
        return wq.view(out, -1), scales.view(out, -1), biases.view(out, -1)
    tiles = out // TILE_ROWS
    return wq.view(tiles, -1, TILE_ROWS), scales.view(tiles, -1, TILE_ROWS), biases.view(tiles, -1, TILE_ROWS)


def to_tiled(wq: Any, scales: Any, biases: Any, group_size: int, bits: int, *, threads: int = 0) -> tuple[Any, Any, Any]:
    """Re-lay affine 4-/8-bit weights from MLX's layout into the tiled one, in place (torch CPU tensors).

    Returns views of the same memory whose shapes record the layout: wq (out/16, words, 16) and scales, biases
    (out/16, groups, 16). The arguments' own shapes still say MLX's: use only what this returns."""
    return _retile(wq, scales, biases, group_size, bits, threads, back=False)


def from_tiled(wq: Any, scales: Any, biases: Any, group_size: int, bits: int, *, threads: int = 0) -> tuple[Any, Any, Any]:
    """Inverse of to_tiled, in place: returns 2-D views (out_features, words) and (out_features, groups)."""
    return _retile(wq, scales, biases, group_size, bits, threads, back=True)


def is_tiled(wq: Any) -> bool:
    """Whether packed codes are in the tiled layout (their shape (tiles, words, 16), as to_tiled returns them)."""
    return len(wq.shape) == 3 and wq.shape[-1] == TILE_ROWS


def qmatmul_tiled(
    x: Any, wq: Any, scales: Any, biases: Any, group_size: int, bits: int, *, threads: int = 0, isa: str | None = None,
    x_int8: bool = False,
) -> Any:
    """qmatmul for weights in the tiled layout (to_tiled's views): y (..., out) in x's dtype, torch CPU tensors.
    On AVX2, 4 or more x rows take the prompt kernel: the same int16 x and sums as one row, bit for bit. x_int8: on AVX2, 4-bit codes against 4 or more x rows multiply x rounded to int8 per group (faster, x_rounding_bound
    with 127 levels instead of int16's 32639; off by default: it moves a model's logits as 8-bit activations do)."""
    _check_threads(threads)
    q, s, b = _tiled_arrays(wq, scales, biases, group_size, bits, tiled=True)
    a = _wrap(x, "x")
    if a.framework != "torch" or a.on_cuda or a.dtype not in FLOAT_DTYPES or not a.shape:
        raise KernelArgumentError(f"x must be a torch CPU tensor (..., in_features) of {', '.join(FLOAT_DTYPES)}.")
    out, k = s.shape[0] * TILE_ROWS, s.shape[1] * group_size
    if a.shape[-1] != k:
        raise KernelArgumentError(f"x has {a.shape[-1]} features but the tiled weights hold {k} per row.")
    y = _empty(a, (*a.shape[:-1], out), a.dtype)
    code = _DTYPE_CODES[a.dtype]
    _lib().qmatmul_tiled(a.buffer, code, math.prod(a.shape[:-1]), k, q.buffer, s.buffer, b.buffer,
                         _DTYPE_CODES[s.dtype], out, group_size, bits, y.buffer, code, threads, isa_code(isa), x_int8)
    return y.data


def dequantize_tiled(
    wq: Any, scales: Any, biases: Any, group_size: int, bits: int, rows: tuple[int, int] | None = None,
    dtype: Any = "float32", *, threads: int = 0, isa: str | None = None,
) -> Any:
    """Rows [row0, row1) (whole tiles; None: all) of tiled weights as a float32 or bfloat16 (row1 - row0, in) tensor."""
    import torch

    _check_threads(threads)
    q, s, b = _tiled_arrays(wq, scales, biases, group_size, bits, tiled=True)
    out, k = s.shape[0] * TILE_ROWS, s.shape[1] * group_size
    row0, row1 = rows if rows is not None else (0, out)
    if not (0 <= row0 <= row1 <= out) or row0 % TILE_ROWS or row1 % TILE_ROWS:
        raise KernelArgumentError(f"rows [{row0}, {row1}) are not whole tiles of {TILE_ROWS} within {out}.")
    name = _dtype_name(dtype)
    if name not in ("float32", "bfloat16"):
        raise KernelArgumentError(f"dequantize_tiled writes float32 or bfloat16, not {name}.")
    dst = torch.empty(row1 - row0, k, dtype=getattr(torch, name))
    _lib().dequantize_tiled(q.buffer, s.buffer, b.buffer, _DTYPE_CODES[s.dtype], out, k, group_size, bits, row0, row1,
                            (dst.data_ptr(), dst.numel() * dst.element_size()), _DTYPE_CODES[name], threads,
                            isa_code(isa))
    return dst


# ---- the hot paths of the torch backend: O(1) checks per call (dtypes, shapes, contiguity here; every buffer's byte
# count again in C++), no wrapping of arrays. Decoding makes ~100 of these calls a token.

_TORCH_CODES: dict[Any, int] = {}  # torch dtype -> code of csrc/quant.h's DType, filled on first use


def _torch_code(dtype: Any) -> int | None:
    if not _TORCH_CODES:
        import torch

        _TORCH_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
    return _TORCH_CODES.get(dtype)


def _nbytes(t: Any) -> tuple[int, int]:
    return t.data_ptr(), t.nbytes


def fmatmul(x: Any, weight: Any, bias: Any = None, *, threads: int = 0, isa: int = 0) -> Any:
    """x (..., in_features) @ weight.T (+ bias) for torch CPU tensors of float32/float16/bfloat16, in x's dtype, on the
    decode kernels (csrc/fmatmul.h): the weights read once per call as stored, a block of rows per pass, float32
    sums (error <= in_features * 2^-24 * sum |w x|). Made for few rows of x (decoding); isa: an ISA code
    (`isa_code`). O(1) checks here, every byte count again in C++."""
    x_code, w_code = _torch_code(x.dtype), _torch_code(weight.dtype)
    b_code = 0 if bias is None else _torch_code(bias.dtype)
    k = weight.shape[-1] if weight.ndim == 2 else -1
    if (x_code is None or w_code is None or b_code is None or x.is_cuda or weight.is_cuda or not x.ndim
            or x.shape[-1] != k or not weight.is_contiguous() or (bias is not None and (bias.is_cuda or bias.shape != weight.shape[:1]))):  # fmt: skip
        raise KernelArgumentError(f"fmatmul takes float CPU tensors x (..., {k}), a contiguous 2-D weight and a bias of "
                                  f"its rows; got x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} "
                                  f"{tuple(weight.shape)}{'' if bias is None else f', bias {bias.dtype} {tuple(bias.shape)}'}.")
    x, bias = x.contiguous(), None if bias is None else bias.contiguous()
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    try:
        _lib().fmatmul(_nbytes(x), x_code, x.numel() // k if k else 0, k, _nbytes(weight), w_code, weight.shape[0],
                       (0, 0) if bias is None else _nbytes(bias), b_code, _nbytes(y), x_code, threads, isa)  # fmt: skip
    except ValueError as error:
        raise KernelArgumentError(f"{error}.") from None
    return y


class QuantizedWeights:
    """Quantized weights of one layer (torch CPU tensors, MLX's layout or the tiled one), checked once for the many
    small products of decoding (~100 a token): `matmul` then checks only x, in O(1), and the C++ side every byte
    count again. Holds the tensors; build a new one when they are replaced."""

    def __init__(self, wq: Any, scales: Any, biases: Any, group_size: int, bits: int, mode: str = "affine") -> None:
        if mode not in MODES or (mode == "nf4") != (biases is None):
            raise KernelArgumentError(f"mode={mode!r} with biases {'None' if biases is None else 'given'}: affine "
                                      "weights have biases, nf4 ones none.")
        self.tiled = is_tiled(wq)
        if self.tiled:
            _tiled_arrays(wq, scales, biases, group_size, bits, tiled=True)
        else:
            _check_params(group_size, bits, 0, read=True)
            arrays = {"wq": _wrap(wq, "wq"), "scales": _wrap(scales, "scales")}
            if biases is not None:
                arrays["biases"] = _wrap(biases, "biases")
            q, s, b = arrays["wq"], arrays["scales"], arrays.get("biases")
            if any(a.framework != "torch" or a.on_cuda or a.data is not t for a, t in zip(arrays.values(), (wq, scales, biases))):
                raise KernelArgumentError("QuantizedWeights holds contiguous torch CPU tensors.")
            if (q.dtype != "uint32" or s.dtype not in FLOAT_DTYPES or (b is not None and (b.dtype, b.shape) != (s.dtype, s.shape))
                    or len(q.shape) != 2 or len(s.shape) != 2 or q.shape[0] != s.shape[0]
                    or q.shape[1] * 32 != s.shape[1] * group_size * bits):  # fmt: skip
                raise KernelArgumentError(f"wq {q.dtype} {q.shape}, scales {s.dtype} {s.shape} are not {bits}-bit codes "
                                          f"and their scales at group_size {group_size}.")
        self.wq, self.scales, self.biases = wq, scales, biases
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.out_features = scales.shape[0] * (TILE_ROWS if self.tiled else 1)
        self.in_features = scales.shape[-2 if self.tiled else 1] * group_size
        # the call's arguments after x's (buffer, dtype, batch, in_features), up to y's buffer; then after it
        self._weights = (_nbytes(wq), _nbytes(scales), (0, 0) if biases is None else _nbytes(biases),
                         _torch_code(scales.dtype), self.out_features, group_size, bits)  # fmt: skip
        if not self.tiled:
            self._weights += (MODES.index(mode),)
        self._kernel = _lib().qmatmul_tiled if self.tiled else _lib().qmatmul

    def matmul(self, x: Any, *, threads: int = 0, isa: int = 0) -> Any:
        """x (..., in_features) float32/float16/bfloat16 @ W^T, in x's dtype; isa: an ISA code (`isa_code`)."""
        code = _TORCH_CODES.get(x.dtype)
        k = self.in_features
        if code is None or x.is_cuda or not x.ndim or x.shape[-1] != k:
            if self.tiled:
                return qmatmul_tiled(x, self.wq, self.scales, self.biases, self.group_size, self.bits, threads=threads,
                                     isa=ISAS[isa])  # fmt: skip
            return qmatmul(x, self.wq, self.scales, self.biases, self.group_size, self.bits, mode=self.mode,
                           threads=threads, isa=ISAS[isa])  # its error, in the user's words
        x = x.contiguous()
        y = x.new_empty((*x.shape[:-1], self.out_features))
        try:
            self._kernel((x.data_ptr(), x.nbytes), code, x.numel() // k if k else 0, k, *self._weights,
                         (y.data_ptr(), y.nbytes), code, threads, isa)  # fmt: skip
        except ValueError as error:
            raise KernelArgumentError(f"{error}.") from None
        return y


class DecodeMatrix:
    """W (out, in) as the C++ decode step reads it: a dense float matrix, or quantized codes with their scales and
    biases (MLX's layout, or the tiled one), plus an optional bias (out,). Holds the tensors it points at."""

    def __init__(
        self, weight: Any = None, bias: Any = None, *, wq: Any = None, scales: Any = None, biases: Any = None,
        group_size: int = 0, bits: int = 0, mode: str = "affine",
    ) -> None:
        import torch

        def check(t: Any, name: str, codes: bool = False) -> tuple[int, int]:
            ok = t.dtype == torch.uint32 if codes else _torch_code(t.dtype) is not None
            if not ok or not t.is_contiguous() or t.device.type != "cpu":
                raise KernelArgumentError(f"{name} ({t.dtype}, {t.device}) is not a contiguous CPU tensor the decode "
                                          "step reads.")
            self.tensors.append(t)
            return _nbytes(t)

        self.tensors: list[Any] = []
        bias_buffer, bias_code = ((0, 0), 0) if bias is None else (check(bias, "bias"), _torch_code(bias.dtype))
        if wq is None:
            if weight is None or weight.dim() != 2:
                raise KernelArgumentError("a decode matrix needs a 2-D weight or quantized codes.")
            self.out, self.inputs = weight.shape
            self.tuple = (self.out, self.inputs, check(weight, "weight"), _torch_code(weight.dtype), (0, 0), (0, 0),
                          (0, 0), 0, 0, 0, 0, bias_buffer, bias_code, False)  # fmt: skip
            return
        _check_params(group_size, bits, 0, read=True)  # groups of 16 (GGUF K-quants) too
        tiled = is_tiled(wq)
        if scales.dim() != wq.dim() or (biases is None) != (mode == "nf4"):
            raise KernelArgumentError(f"wq {tuple(wq.shape)} and scales {tuple(scales.shape)} do not fit together.")
        self.out = scales.shape[0] * (TILE_ROWS if tiled else 1)
        self.inputs = scales.shape[-2 if tiled else 1] * group_size
        if wq.numel() * 32 != self.out * self.inputs * bits:
            raise KernelArgumentError(f"wq {tuple(wq.shape)} does not hold {self.out} rows of {self.inputs} {bits}-bit codes.")
        self.tuple = (
            self.out, self.inputs, (0, 0), 0, check(wq, "wq", codes=True), check(scales, "scales"),
            (0, 0) if biases is None else check(biases, "biases"), _torch_code(scales.dtype), group_size, bits,
            MODES.index(mode), bias_buffer, bias_code, tiled,
        )  # fmt: skip


class NativeDecoder:
    """The C++ decode step (llmctl._C.NativeDecoder) for torch CPU tensors: one token of batch 1 through a Llama-family
    model. Matrices are DecodeMatrix objects; norms are (dim,) float tensors of one dtype; all are kept alive."""

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int, vocab: int, window: int,
        norm_eps: float, embedding: DecodeMatrix, final_norm: Any, head: DecodeMatrix,
    ) -> None:
        self.keep: list[Any] = [embedding, head]
        self.vocab, self.norm_dtype = vocab, final_norm.dtype
        code = _torch_code(final_norm.dtype)
        if code is None:
            raise KernelArgumentError(f"the final norm has dtype {final_norm.dtype}; norms are float tensors.")
        try:
            self.impl = _lib().NativeDecoder(
                dim, n_heads, n_kv_heads, head_dim, hidden, vocab, window, norm_eps, code, embedding.tuple,
                self._norm(final_norm), head.tuple,
            )  # fmt: skip
        except ValueError as error:
            raise KernelArgumentError(f"{error}.") from None

    def _norm(self, t: Any) -> tuple[int, int]:
        if t.dtype != self.norm_dtype or not t.is_contiguous() or t.device.type != "cpu":
            raise KernelArgumentError(f"a norm ({t.dtype}, {t.device}) is not a contiguous CPU tensor of {self.norm_dtype}.")
        self.keep.append(t)
        return _nbytes(t)

    def add_layer(
        self, attn_norm: Any, qkv: list[DecodeMatrix], o: list[DecodeMatrix], mlp_norm: Any,
        gate_up: list[DecodeMatrix], down: list[DecodeMatrix],
    ) -> None:
        """One layer: q, k, v projections side by side in qkv, gate then up in gate_up."""
        self.keep += [*qkv, *o, *gate_up, *down]
        try:
            self.impl.add_layer(self._norm(attn_norm), [m.tuple for m in qkv], [m.tuple for m in o],
                                self._norm(mlp_norm), [m.tuple for m in gate_up], [m.tuple for m in down])  # fmt: skip
        except ValueError as error:
            raise KernelArgumentError(f"{error}.") from None

    def step(
        self, token: int, pos: int, keys: list[Any], values: list[Any], cos: Any, sin: Any, logits: Any, *,
        threads: int = 0, isa: int = 0,
    ) -> None:
        """Decode `token` at `pos`: its keys and values into each layer's float32 cache (.., n_kv_heads, capacity,
        head_dim), the float32 logits (vocab) into `logits`; cos and sin are position pos's RoPE rows (head_dim
        float32). isa: an ISA code (`isa_code`), reaching every kernel of the step."""
        import torch

        for t in (*keys, *values, cos, sin, logits):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise KernelArgumentError("the decode step's caches, RoPE rows and logits are contiguous float32 tensors.")
        try:
            self.impl.step(token, pos, [_nbytes(k) for k in keys], [_nbytes(v) for v in values], keys[0].shape[-2],
                           _nbytes(cos), _nbytes(sin), _nbytes(logits), threads, isa)  # fmt: skip
        except ValueError as error:
            raise KernelArgumentError(f"{error}.") from None
