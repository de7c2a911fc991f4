"""Safetensors without a framework: memory-mapped reading, sharded atomic writing, torch and MLX converters."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from llmctl.errors import CheckpointError
from llmctl.io.paths import inside

if TYPE_CHECKING:
    import mlx.core as mx
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers reads shards only with "format" in pt/tf/flax/mlx, so every file we write says "pt"
DEFAULT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})

# safetensors dtype -> numpy dtype that holds its bits (little-endian); numpy has no bfloat16 or float8, so those
# stay raw bits. The order is the safetensors library's dtype enum: it lays tensors out by descending dtype, then
# name, which aligns every tensor to its item size; we do the same, so our files are byte-identical to its files.
_NUMPY: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in [
        ("BOOL", "?"), ("U8", "u1"), ("I8", "i1"), ("F8_E5M2", "u1"), ("F8_E4M3", "u1"), ("F8_E8M0", "u1"),
        ("I16", "<i2"), ("U16", "<u2"), ("F16", "<f2"), ("BF16", "<u2"),
        ("I32", "<i4"), ("U32", "<u4"), ("F32", "<f4"), ("F64", "<f8"), ("I64", "<i8"), ("U64", "<u8"),
    ]
}  # fmt: skip
_RANK = {name: rank for rank, name in enumerate(_NUMPY)}
_BITS_ONLY = ("BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0")  # numpy holds their bits, not their values
_FROM_NUMPY = {dtype: name for name, dtype in _NUMPY.items() if name not in _BITS_ONLY}
_TORCH = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
}  # fmt: skip
_MLX = {
    "BOOL": "bool_", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64",
    "U64": "uint64",
}  # fmt: skip
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_DAMAGED = "Download or write the file again; it may have been cut short by a full disk or an interrupted copy."


@dataclass(frozen=True, eq=False)
class RawTensor:
    """One tensor as safetensors stores it; `data` holds the bits as numpy can (BF16 as uint16, F8 as uint8)."""

    dtype: str  # safetensors name: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    data: np.ndarray  # shape == self.shape, dtype == the numpy dtype for self.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype not in _NUMPY:
            raise ValueError(f"unknown safetensors dtype {self.dtype!r}; known: {', '.join(_NUMPY)}")
        want = _NUMPY[self.dtype]
        if self.data.dtype != want or self.data.shape != self.shape:
            raise ValueError(
                f"{self.dtype} tensor of shape {self.shape} needs a {want} array of that shape, "
                f"got {self.data.dtype} {self.data.shape}"
            )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> RawTensor:
        """Wrap a numpy array of a dtype safetensors names directly (not BF16/F8: use from_torch or from_mlx)."""
        array = np.asarray(array)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if array.dtype not in _FROM_NUMPY:
            raise ValueError(f"numpy dtype {array.dtype} has no safetensors equivalent")
        return cls(_FROM_NUMPY[array.dtype], array.shape, array)


# ---- reading


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of repeated keys; the safetensors library refuses them, and so do we."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_header(path: Path, f: IO[bytes], size: int) -> tuple[dict[str, Any], int]:
    """Parse the JSON header; returns it and the byte offset where the data buffer starts."""
    if size < 8:
        raise CheckpointError(f"{path} is {size} bytes, too short to be a safetensors file.", hint=_DAMAGED)
    (length,) = struct.unpack("<Q", f.read(8))
    if length > _MAX_HEADER or 8 + length > size:
        raise CheckpointError(
            f"{path}: the header claims {length} bytes but the file has {size}; "
            "the file is truncated or is not safetensors.",
            hint=_DAMAGED,
        )
    try:
        header = json.loads(f.read(length), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: the header names tensor {e.args[0]!r} twice.", hint=_DAMAGED) from None
    except ValueError as e:  # bad UTF-8 or bad JSON
        raise CheckpointError(f"{path}: the header is not valid JSON ({e}).", hint=_DAMAGED) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is JSON but not an object.", hint=_DAMAGED)
    metadata = header.get("__metadata__", {})
    if metadata is None:  # mlx's save_safetensors writes `"__metadata__": null` when given none
        metadata = header["__metadata__"] = {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is {type(metadata).__name__}, expected an object.", hint=_DAMAGED)
    return header, 8 + length


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)  # JSON true is not a size


def _check_entry(path: Path, name: str, entry: Any, buffer_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one header entry; returns dtype, shape and the [begin, end) byte range in the data buffer."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where} needs dtype, shape and data_offsets, found {entry!r}.", hint=_DAMAGED)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _NUMPY:
        raise CheckpointError(
            f"{where} has dtype {dtype!r}; llmctl reads {', '.join(_NUMPY)}.",
            hint="Convert the checkpoint to bf16 or fp32 with the tool that wrote it.",
        )
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
        raise CheckpointError(f"{where} has shape {shape!r} and data_offsets {offsets!r}.", hint=_DAMAGED)
    begin, end = offsets
    if not begin <= end <= buffer_size:
        raise CheckpointError(
            f"{where} has data_offsets [{begin}, {end}] outside the {buffer_size}-byte data buffer; "
            "the file is truncated or corrupt.",
            hint=_DAMAGED,
        )
    expected = math.prod(shape) * _NUMPY[dtype].itemsize  # Python ints: a crafted [2**64, 4] cannot wrap around
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: {dtype} {shape} needs {expected} bytes but data_offsets span {end - begin}.", hint=_DAMAGED
        )
    return dtype, tuple(shape), begin, end


def _check_overlaps(path: Path, entries: dict[str, tuple[str, tuple[int, ...], int, int]]) -> None:
    """Two tensors may not share bytes (the safetensors library refuses such files too)."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(
                f"{path}: tensors {first!r} and {second!r} overlap in the data buffer (bytes {begin}..{end}).",
                hint=_DAMAGED,
            )


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e.strerror or e}.") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (reads only the header)."""
    path = Path(path)
    with _open(path) as f:
        header, _ = _read_header(path, f, os.fstat(f.fileno()).st_size)
    return header.get("__metadata__") or {}


def read_safetensors(path: str | Path) -> dict[str, RawTensor]:
    """Every tensor of one file, as zero-copy views of a private memory map, in the file's header order."""
    path = Path(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _read_header(path, f, size)
        # ACCESS_COPY: the arrays are writable (torch.from_numpy wants that) but writes never reach the file,
        # and a later os.replace of the file leaves this mapping on the old contents
        buffer = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
    tensors = {}
    entries = {name: _check_entry(path, name, entry, size - start) for name, entry in header.items() if name != "__metadata__"}
    _check_overlaps(path, entries)
    for name, (dtype, shape, begin, end) in entries.items():
        data = buffer[start + begin : start + end].view(_NUMPY[dtype]).reshape(shape)
        if not data.flags.aligned:  # files from other writers may not align; torch refuses unaligned memory
            data = data.copy()
        tensors[name] = RawTensor(dtype, shape, data)
    return tensors


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid shard index ({e!r}).", hint=_DAMAGED) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names.", hint=_DAMAGED)
    return weight_map


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files that hold a model folder's weights: the index's shards, model.safetensors, or any."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(
            f"Model folder {folder} {what}.", hint="Pass a folder with config.json and *.safetensors, or org/name."
        )
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        for shard in shards:
            inside(folder, shard, index)
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"{index} names the shard {shard}, which is missing from {folder}.",
                    hint="Download the missing shard again, or the whole model.",
                )
        return [folder / shard for shard in shards]
    if (folder / SINGLE_FILE).is_file():
        return [inside(folder, SINGLE_FILE)]
    # temporary files start with "."; an adapter beside a model is not part of its weights
    found = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith((".", "adapter_")))
    if found:
        return [inside(folder, p.name) for p in found]
    pickles = sorted({p.name for pattern in _PICKLES for p in folder.glob(pattern)})
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); llmctl loads safetensors only, "
            "because loading a pickle can run arbitrary code.",
            hint="If you trust its source, convert it once with transformers: "
            "AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(OUT, safe_serialization=True).",
        )
    raise CheckpointError(
        f"{folder} holds no weights: expected {SINGLE_FILE}, shards listed in {INDEX_FILE}, or *.safetensors.",
        hint="Check that the download or the training run finished.",
    )


def load_folder_tensors(folder: str | Path) -> dict[str, RawTensor]:
    """All tensors of a model folder (single file, index and shards, or loose *.safetensors), memory-mapped."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".safetensors":
        return read_safetensors(folder)
    tensors: dict[str, RawTensor] = {}
    origin: dict[str, str] = {}
    for file in weight_files(folder):
        for name, tensor in read_safetensors(file).items():
            if name in origin:
                raise CheckpointError(f"Tensor {name!r} is in both {origin[name]} and {file.name} in {folder}.")
            tensors[name], origin[name] = tensor, file.name
    index = folder / INDEX_FILE
    if index.is_file():
        for name, shard in _read_index(index).items():
            if origin.get(name) != shard:
                raise CheckpointError(
                    f"{index} puts tensor {name!r} in {shard}, but {shard} has no tensor of that name.",
                    hint=_DAMAGED,
                )
    return tensors


def is_finite(raw: RawTensor) -> bool:
    """No NaN or infinity in a float tensor (BF16/F16/F32/F64 read from their bits); other dtypes are finite."""
    if raw.dtype in ("F16", "F32", "F64"):
        return bool(np.isfinite(raw.data).all())
    if raw.dtype == "BF16":
        return not bool(((raw.data & 0x7F80) == 0x7F80).any())  # all exponent bits set: inf or NaN
    return True


# ---- writing


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; folders cannot be opened on Windows, where this is skipped."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _staged(paths: list[Path]) -> Iterator[list[Path]]:
    """Temporary names for `paths`; when the block completes they all replace their targets, else all vanish."""
    from llmctl.io.outputs import temporary_sibling, write_error

    temporaries = [temporary_sibling(path) for path in paths]
    try:
        yield temporaries
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path)
    except BaseException as e:
        for temporary in temporaries:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        error = write_error(e, paths[0]) if isinstance(e, OSError) else None
        if error is not None:
            raise error from e
        raise
    _fsync_folder(paths[0].parent)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Write `path` through a temporary file beside it, renamed over `path` only if the block completes."""
    with _staged([Path(path)]) as (temporary,), open(temporary, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one, never half of it."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text (config.json, index files, recipes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _header(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    """The 8-byte length and padded JSON header, and the order in which the tensors' data follows it."""
    order = sorted(tensors, key=lambda name: (-_RANK[tensors[name].dtype], name))
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors metadata must map str to str, got {dict(metadata)!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        tensor = tensors[name]
        end = offset + tensor.nbytes
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data buffer starts 8-aligned, as the safetensors library pads it
    return struct.pack("<Q", len(text)) + text, order


def _write_data(f: IO[bytes], data: np.ndarray) -> None:
    f.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def _write_file(path: Path, tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None) -> None:
    header, order = _header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name in order:
            _write_data(f, tensors[name].data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file in place


def write_safetensors(
    path: str | Path, tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = DEFAULT_METADATA
) -> None:
    """Write one safetensors file atomically (adapter_model.safetensors, a checkpoint, ...)."""
    with _staged([Path(path)]) as (temporary,):
        _write_file(temporary, tensors, metadata)


def _split(tensors: Mapping[str, RawTensor], max_bytes: int | None) -> list[dict[str, RawTensor]]:
    """Group tensors into shards in their given order, as huggingface_hub does for save_pretrained."""
    if max_bytes is None:
        return [dict(tensors)]
    if max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards: list[dict[str, RawTensor]] = []
    current: dict[str, RawTensor] = {}
    size = 0
    for name, tensor in tensors.items():
        if tensor.nbytes > max_bytes:  # too big for any shard: it gets one of its own
            shards.append({name: tensor})
            continue
        if size + tensor.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def save_tensors(
    folder: str | Path,
    tensors: Mapping[str, RawTensor],
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = DEFAULT_METADATA,
) -> list[Path]:
    """Write model.safetensors, or shards and their index as transformers names them; returns the files written.

    All new weight files are written under temporary names first and renamed into place only when every one is
    complete, so a failed save leaves the previous model whole. Weight files of an earlier save that the new one
    does not use are deleted afterwards.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = _split(tensors, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    written = [folder / name for name in names]
    with _staged(written) as temporaries:
        for temporary, shard in zip(temporaries, shards):
            _write_file(temporary, shard, metadata)
    if n > 1:
        weight_map = {name: path.name for path, shard in zip(written, shards) for name in shard}
        sizes = {"total_parameters": sum(t.data.size for t in tensors.values()),  # as transformers 5 writes it
                 "total_size": sum(t.nbytes for t in tensors.values())}  # fmt: skip
        index = {"metadata": sizes, "weight_map": weight_map}
        atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder / INDEX_FILE)
    # the index goes first: while it exists loaders follow it to the old shards, a consistent old model
    old_shards = sorted(p for p in folder.iterdir() if _SHARD.fullmatch(p.name))
    for path in [folder / INDEX_FILE, *old_shards, folder / SINGLE_FILE]:
        if path not in written:
            path.unlink(missing_ok=True)
    return written


# ---- frameworks (imported only when called, so numpy-only code never loads them)


def to_torch(raw: RawTensor) -> torch.Tensor:
    """A torch tensor sharing memory with `raw.data` (BF16/F8 reinterpreted from their bits)."""
    import torch

    tensor = torch.from_numpy(raw.data)
    target = getattr(torch, _TORCH[raw.dtype])
    return tensor if tensor.dtype == target else tensor.view(target)


def from_torch(tensor: torch.Tensor) -> RawTensor:
    """A RawTensor of a torch tensor, moved to CPU and made contiguous (no copy when it already is both)."""
    import torch

    names = {getattr(torch, t): name for name, t in _TORCH.items() if hasattr(torch, t)}
    if tensor.dtype not in names:
        raise ValueError(f"torch dtype {tensor.dtype} has no safetensors equivalent")
    name = names[tensor.dtype]
    tensor = tensor.detach().cpu().contiguous()
    if name in _BITS_ONLY:  # numpy cannot take these dtypes: hand over their bits
        tensor = tensor.view(torch.int16 if tensor.element_size() == 2 else torch.uint8)
    return RawTensor(name, tuple(tensor.shape), tensor.numpy().view(_NUMPY[name]))


def to_mlx(raw: RawTensor) -> mx.array:
    """An MLX array of `raw` (a copy); MLX has no float8 dtype, so F8 tensors become bfloat16/float16 exactly."""
    import mlx.core as mx

    if raw.dtype == "F8_E4M3":
        return mx.from_fp8(mx.array(raw.data), dtype=mx.bfloat16)
    if raw.dtype == "F8_E5M2":  # e5m2 is the high byte of a float16
        return mx.array((raw.data.astype(np.uint16) << 8).view(np.float16))
    if raw.dtype not in _MLX:
        raise CheckpointError(f"{raw.dtype} tensors have no MLX equivalent.", hint="Use --backend torch.")
    if raw.dtype == "BF16":
        return mx.array(raw.data).view(mx.bfloat16)
    return mx.array(raw.data, dtype=getattr(mx, _MLX[raw.dtype]))  # explicit: mx.array makes float64 float32


def from_mlx(array: mx.array) -> RawTensor:
    """A RawTensor of an MLX array (evaluates it; no copy for a row-contiguous array)."""
    import mlx.core as mx

    names = {getattr(mx, t): name for name, t in _MLX.items()}
    if array.dtype not in names:
        raise ValueError(f"MLX dtype {array.dtype} has no safetensors equivalent")
    name = names[array.dtype]
    if name == "BF16":
        array = array.view(mx.uint16)
    data = np.asarray(array)
    return RawTensor(name, data.shape, data)
