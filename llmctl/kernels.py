"""Python face of llmctl._C: MLX-layout affine (de)quantization and bit packing for torch, numpy and MLX arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmctl.errors import BackendUnavailable, LlmctlError

GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4, 5, 6, 8)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # kFloat32.. in csrc/quant.h
_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


class KernelArgumentError(LlmctlError, ValueError):
    """An array handed to llmctl.kernels with the wrong shape, dtype, device or parameters."""


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
    numpy_dtype: Any = None  # numpy input's dtype (keeps ml_dtypes' bfloat16 for outputs)

    @property
    def on_cuda(self) -> bool:
        return self.framework == "torch" and self.device.type == "cuda"


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
        return _Array("torch", x, x.data_ptr(), tuple(x.shape), dtype, x.device)
    if module == "mlx":
        import mlx.core as mx

        # numpy has no bfloat16: read its bits as uint16. np.asarray evaluates and shares memory.
        view = np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
        view = view if view.flags.c_contiguous else np.ascontiguousarray(view)
        dtype = str(x.dtype).rsplit(".", 1)[-1]
        return _Array("mlx", view, view.ctypes.data, tuple(x.shape), dtype, "cpu")
    if isinstance(x, (np.ndarray, np.generic)):
        x = np.asarray(x) if x.flags.c_contiguous else np.ascontiguousarray(x)
        return _Array("numpy", x, x.ctypes.data, x.shape, x.dtype.name, "cpu", x.dtype)
    raise KernelArgumentError(
        f"{name} is a {type(x).__module__}.{type(x).__name__}; "
        "llmctl kernels take a torch tensor, a numpy array or an MLX array."
    )


def _empty(like: _Array, shape: tuple[int, ...], dtype: str) -> _Array:
    """An uninitialized output in the framework (and torch device) of `like`."""
    if like.framework == "torch":
        import torch

        out = torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
        return _Array("torch", out, out.data_ptr(), shape, dtype, like.device)
    if dtype == "bfloat16":
        np_dtype = like.numpy_dtype if like.dtype == "bfloat16" and like.numpy_dtype is not None else _numpy_bfloat16()
    else:
        np_dtype = np.dtype(dtype)
    out = np.empty(shape, np_dtype)
    return _Array(like.framework, out, out.ctypes.data, shape, dtype, "cpu", np_dtype)


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


def _check_params(group_size: int, bits: int, threads: int) -> None:
    _check_threads(threads)
    if bits not in BITS:
        raise KernelArgumentError(f"bits={bits} is not supported; choose one of {', '.join(map(str, BITS))}.")
    if group_size not in GROUP_SIZES:
        raise KernelArgumentError(
            f"group_size={group_size} is not supported; choose one of {', '.join(map(str, GROUP_SIZES))}."
        )


def _check_same_place(arrays: dict[str, _Array]) -> None:
    (first_name, first), *rest = arrays.items()
    for name, array in rest:
        if array.framework != first.framework or str(array.device) != str(first.device):
            raise KernelArgumentError(
                f"{name} is a {array.framework} array on {array.device} but {first_name} is a "
                f"{first.framework} array on {first.device}; pass all of them from one framework and device."
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
    args = (x.address, _DTYPE_CODES[x.dtype], rows, cols, group_size, bits, wq.address, scales.address, biases.address)
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
    _check_params(group_size, bits, threads)
    q, s, b = _wrap(wq, "wq"), _wrap(scales, "scales"), _wrap(biases, "biases")
    _check_same_place({"wq": q, "scales": s, "biases": b})
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
    args = (q.address, s.address, b.address, _DTYPE_CODES[s.dtype], rows, cols, group_size, bits, out.address)
    if q.on_cuda:
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
        lib.pack(c.address, math.prod(c.shape[:-1]), cols, bits, words.address, threads)
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
    lib.unpack(x.address, math.prod(x.shape[:-1]), n, bits, codes.address, threads)
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
    _check_params(group_size, bits, threads)
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
    args = (a.address, _DTYPE_CODES[a.dtype], batch, k, q.address, s.address, b.address if b is not None else 0,
            _DTYPE_CODES[s.dtype], n, group_size, bits, MODES.index(mode), y.address, _DTYPE_CODES[a.dtype])
    if a.on_cuda:
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
        _lib().quantize_nf4(x.address, _DTYPE_CODES[x.dtype], math.prod(x.shape[:-1]), cols, group_size,
                            wq.address, scales.address, threads)
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
    _lib().dequantize_nf4(q.address, s.address, _DTYPE_CODES[s.dtype], math.prod(s.shape[:-1]), cols, group_size,
                          out.address, _DTYPE_CODES[out_dtype], threads)
    return _result(out)
