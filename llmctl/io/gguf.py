"""GGUF files of the Llama family <-> llmctl's model representation (Hugging Face names, MLX's affine layout)."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl import ui
from llmctl.errors import CheckpointError, SpecError, UnsupportedModel
from llmctl.io.hf import check_size, check_tensors
from llmctl.io.model import ModelFolder
from llmctl.io.safetensors import RawTensor
from llmctl.quant import AFFINE16, QuantParams, config_entry
from llmctl.spec import ModelSpec, RopeScaling

if TYPE_CHECKING:
    import gguf

    from llmctl.tokenizer import Tokenizer

GROUP_SIZE = 32  # every ggml block type with an exact affine equivalent holds 32 values

# GGUF tensor names <-> Hugging Face module paths (".weight" follows both)
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
_LAYER_BACK = {hf: gg for gg, hf in _LAYER.items()}
_GLOBAL_BACK = {hf: gg for gg, hf in _GLOBAL.items()}


# Block types that map exactly onto (bits, group 32) affine groups: w = scale * code + bias.
# `offset`: symmetric types store code - offset and one scale d (bias = -offset * d); None: they store d and m.
@dataclass(frozen=True)
class BlockType:
    name: str
    bits: int
    offset: int | None
    nbytes: int  # bytes per block of 32 values


BLOCK_TYPES = {
    t.name: t
    for t in (
        BlockType("Q4_0", 4, 8, 18),
        BlockType("Q4_1", 4, None, 20),
        BlockType("Q5_0", 5, 16, 22),
        BlockType("Q5_1", 5, None, 24),
        BlockType("Q8_0", 8, 128, 34),
    )
}
# K-quants: super-blocks of 256 values whose sub-blocks of `group_size` have their own scale (and min), each exactly
# an affine group: Q4_K/Q5_K scale d * sc, bias -dmin * m (groups of 32); Q6_K/Q3_K scale d * sc, bias -offset * scale
# and Q2_K bias -dmin * m (groups of 16, llmctl's own "affine16" mode). Products of a float16 and a 4- to 8-bit
# integer, so float32 scales and biases hold them exactly, and scale * code + bias is ggml's value to the bit.
@dataclass(frozen=True)
class KQuantType:
    name: str
    bits: int
    group_size: int
    nbytes: int  # bytes per super-block of 256 values


QK_K = 256
K_TYPES = {
    t.name: t
    for t in (
        KQuantType("Q2_K", 2, 16, 84),
        KQuantType("Q3_K", 3, 16, 110),
        KQuantType("Q4_K", 4, 32, 144),
        KQuantType("Q5_K", 5, 32, 176),
        KQuantType("Q6_K", 6, 16, 210),
    )
}
# What `--type` may ask for when writing, and the order in which exact types are preferred (smallest first).
WRITE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
_EXACT_PREFERENCE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18,
               "BF16": 32}  # fmt: skip


def is_gguf(path: str | Path) -> bool:
    """A path that names a GGUF file (by its extension; the magic is checked when it is read)."""
    return Path(path).suffix.lower() == ".gguf"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "Reading and writing GGUF needs the `gguf` package (from the ggml project), which is not installed.",
            hint="pip install gguf",
        ) from None
    return gguf


# ---- names and the query/key row order ----------------------------------------------------------------------------


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    module = hf_module(stem)
    return f"{module}.{kind}" if module else None


def hf_module(name: str) -> str | None:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`; None for names llmctl does not know."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def gguf_module(name: str) -> str | None:
    """Inverse of hf_module."""
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_BACK:
        return f"blk.{match.group(1)}.{_LAYER_BACK[match.group(2)]}"
    return None


def rope_row_order(rows: int, n_heads: int, to_gguf: bool) -> np.ndarray:
    """Row indices that reorder q/k projection rows between Hugging Face's and llama.cpp's RoPE layouts.

    llama.cpp's converter (LlamaModel.permute) interleaves each head's two halves, rotating adjacent pairs;
    transformers rotates the first half against the second. `w_gguf = w_hf[rope_row_order(.., True)]` and back.
    Whole rows move, so packed weights, scales and biases permute exactly.
    """
    half = rows // n_heads // 2
    index = np.arange(rows)
    if to_gguf:  # HF row (h, j, i) goes to GGUF row (h, i, j)
        return index.reshape(n_heads, 2, half).swapaxes(1, 2).reshape(rows)
    return index.reshape(n_heads, half, 2).swapaxes(1, 2).reshape(rows)


def _rope_heads(spec: ModelSpec, module: str) -> int | None:
    if module.endswith("self_attn.q_proj"):
        return spec.n_heads
    if module.endswith("self_attn.k_proj"):
        return spec.n_kv_heads
    return None


# ---- ggml blocks <-> affine groups ---------------------------------------------------------------------------------


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16)[:, 0]


def decode_blocks(raw: np.ndarray, block: BlockType) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """ggml blocks (..., n * nbytes) uint8 -> d (n,) float16, m (n,) float16 or None, codes (n, 32) uint8."""
    blocks = raw.reshape(-1, block.nbytes)
    d = _halves(blocks, 0)
    m, pos = (None, 2) if block.offset is not None else (_halves(blocks, 2), 4)
    if block.bits == 8:
        return d, m, (blocks[:, pos:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    high = None
    if block.bits == 5:  # 32 fifth bits in one little-endian uint32, bit j for value j
        high = np.ascontiguousarray(blocks[:, pos : pos + 4]).view("<u4")
        pos += 4
    qs = blocks[:, pos:]  # byte j: value j in the low nibble, value j + 16 in the high one
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    if high is not None:
        codes |= (((high >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
    return d, m, codes


def encode_blocks(d: np.ndarray, m: np.ndarray | None, codes: np.ndarray, block: BlockType) -> np.ndarray:
    """Inverse of decode_blocks: (n,) float16 d (and m), (n, 32) codes -> (n * nbytes,) uint8."""
    n = codes.shape[0]
    parts = [d.astype(np.float16).reshape(n, 1).view(np.uint8)]
    if block.offset is None:
        parts.append(m.astype(np.float16).reshape(n, 1).view(np.uint8))
    if block.bits == 8:
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if block.bits == 5:
            bits = ((codes >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            parts.append(bits.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(n, 1).view(np.uint8))
        low = codes & 0x0F
        parts.append(low[:, :16] | (low[:, 16:] << 4))
    return np.concatenate(parts, axis=1).reshape(-1)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    return _halves(blocks, start).astype(np.float32)[:, None]


def _bit_planes(packed: np.ndarray, shifts: int, width: int, mask: int) -> np.ndarray:
    """Bytes (n, k * width) holding `shifts` fields of 8 / shifts bits -> (n, k * shifts * width): chunk j of `width`
    bytes gives values [j][shift][width], as ggml lays them out."""
    n = packed.shape[0]
    steps = (np.arange(shifts, dtype=np.uint8) * (8 // shifts)).reshape(1, 1, shifts, 1)
    return ((packed.reshape(n, -1, 1, width) >> steps) & mask).reshape(n, -1)


def decode_k_blocks(raw: np.ndarray, kind: KQuantType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K-quant super-blocks (..., n * nbytes) uint8 -> scales, biases (n, 256 / group_size) float32, codes (n, 256)
    uint8, with ggml's value of code c in group g being scales[g] * c + biases[g] (exactly, in float32)."""
    b = raw.reshape(-1, kind.nbytes)
    if kind.name in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of scales and mins, [qh (32)], qs (128)
        from llmctl.io.kquants import k_scales_mins

        sc, m = k_scales_mins(b[:, 4:16])
        scales, biases = _half(b, 0) * sc, -(_half(b, 2) * m)
        codes = _bit_planes(b[:, -128:], 2, 32, 0x0F)
        if kind.name == "Q5_K":
            codes |= _bit_planes(b[:, 16:48], 8, 32, 1) << 4  # fifth bits: qh's bit j for values [32 j, 32 j + 32)
        return scales, biases, codes
    if kind.name == "Q6_K":  # ql (128), qh (64), int8 scales (16), d: value d * sc * (code - 32)
        codes = _bit_planes(b[:, :128], 2, 64, 0x0F) | (_bit_planes(b[:, 128:192], 4, 32, 0x03) << 4)
        scales = _half(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
        return scales, -32 * scales, codes
    if kind.name == "Q3_K":  # hmask (32), qs (64), 12 bytes of 6-bit scales, d: value d * (sc - 32) * (code - 4)
        packed = b[:, 96:108]
        low = _bit_planes(packed[:, :8], 2, 8, 0x0F)
        high = _bit_planes(packed[:, 8:12], 4, 4, 0x03)
        scales = _half(b, 108) * ((low | (high << 4)).astype(np.float32) - 32)
        codes = _bit_planes(b[:, 32:96], 4, 32, 0x03) | (_bit_planes(b[:, :32], 8, 32, 1) << 2)
        return scales, -4 * scales, codes
    # Q2_K: scales and mins (16, 4 bits each), qs (64), d, dmin: value d * sc * code - dmin * m
    packed = b[:, :16]
    scales = _half(b, 80) * (packed & 0x0F).astype(np.float32)
    biases = -(_half(b, 82) * (packed >> 4).astype(np.float32))
    return scales, biases, _bit_planes(b[:, 16:80], 4, 32, 0x03)


def k_blocks_to_affine(raw: np.ndarray, kind: KQuantType, rows: int, cols: int) -> dict[str, np.ndarray]:
    """One K-quant tensor -> weight (rows, cols * bits / 32) uint32, scales and biases (rows, cols / group_size)."""
    from llmctl import kernels

    scales, biases, codes = decode_k_blocks(raw, kind)
    groups = cols // kind.group_size
    return {
        "weight": kernels.pack(codes.reshape(rows, cols), kind.bits),
        "scales": scales.reshape(rows, groups),
        "biases": biases.reshape(rows, groups),
    }


def blocks_to_affine(raw: np.ndarray, block: BlockType, rows: int, cols: int) -> dict[str, np.ndarray]:
    """One GGUF tensor of `block` type -> MLX layout: weight (rows, cols*bits/32) uint32, scales and biases
    (rows, cols/32).

    Exact: scales are d, biases m (or -offset * d), float16 unless -offset * d does not fit float16 exactly.
    """
    from llmctl import kernels

    d, m, codes = decode_blocks(raw, block)
    if m is None:
        bias = -block.offset * d.astype(np.float32)
        m = bias.astype(np.float16)
        if not np.array_equal(m.astype(np.float32), bias):  # beyond float16's range: keep both in float32
            d, m = d.astype(np.float32), bias
    groups = cols // GROUP_SIZE
    return {
        "weight": kernels.pack(codes.reshape(rows, cols), block.bits),
        "scales": d.reshape(rows, groups),
        "biases": m.reshape(rows, groups),
    }


def _exact_float16(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


def exact_block_types(bits: int, group_size: int, scales: np.ndarray, biases: np.ndarray) -> list[str]:
    """ggml types that hold these affine groups exactly (float32 scales/biases in), smallest first.

    An asymmetric type takes d = scale, m = bias when both are float16 values and the codes fit its bits; a
    symmetric one also needs bias == -offset * scale, so that scale * (code - offset) is the same number.
    """
    if group_size != GROUP_SIZE or not _exact_float16(scales):
        return []
    out = []
    for name in _EXACT_PREFERENCE:
        block = BLOCK_TYPES[name]
        if bits > block.bits:
            continue
        if block.offset is None:
            fits = _exact_float16(biases)
        else:
            fits = bits == block.bits and np.array_equal(biases, -block.offset * scales)
        if fits:
            out.append(name)
    return out


def affine_to_blocks(
    weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, block: BlockType
) -> np.ndarray:
    """Affine groups of 32 (float32 scales/biases that `exact_block_types` accepted) -> ggml blocks (rows, bytes)."""
    from llmctl import kernels

    rows, groups = scales.shape
    codes = kernels.unpack(weight, bits, groups * GROUP_SIZE).reshape(rows * groups, GROUP_SIZE)
    # a symmetric type keeps the codes (bias == -offset * scale), an asymmetric one takes m = bias
    m = None if block.offset is not None else biases.reshape(-1)
    return encode_blocks(scales.reshape(-1), m, codes, block).reshape(rows, groups * block.nbytes)


# ---- floats and the affine layout ----------------------------------------------------------------------------------


def float32_of(raw: RawTensor) -> np.ndarray:
    """The values of a float RawTensor (F32, F16, BF16) as float32, exactly."""
    if raw.dtype == "BF16":
        return (raw.data.astype(np.uint32) << 16).view(np.float32)
    if raw.dtype in ("F32", "F16", "F64"):
        return raw.data.astype(np.float32, copy=False)  # float32 stays a view of the (memory-mapped) file
    raise CheckpointError(f"A {raw.dtype} tensor is not a float tensor llmctl can convert.")


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch and MLX do."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def float_tensor(values: np.ndarray, dtype: str) -> RawTensor:
    """float32 values as a RawTensor of `dtype` (float32, float16 or bfloat16)."""
    if dtype == "bfloat16":
        return RawTensor("BF16", values.shape, bfloat16_bits(values))
    return RawTensor.from_numpy(values.astype(np.float32 if dtype == "float32" else np.float16))


def layer_quantization(quantization: dict[str, Any], module: str) -> tuple[int, int]:
    """(group_size, bits) of one quantized module: its own entry in the quantization dict, else the defaults."""
    own = quantization.get(module)
    entry = quantization | own if isinstance(own, dict) else quantization
    if entry.get("mode", "affine") not in ("affine", AFFINE16):
        raise CheckpointError(
            f"{module} is quantized with mode {entry['mode']!r}; llmctl converts only the affine layout here.",
            hint="Dequantize the model with the tool that wrote it, or start from the float model.",
        )
    return int(entry["group_size"]), int(entry["bits"])


def affine_float32(tensors: dict[str, RawTensor], module: str, group_size: int, bits: int) -> np.ndarray:
    """Dequantized weight of one quantized module, computed in float32 (as ggml does): scale * code + bias."""
    from llmctl import kernels

    weight = tensors[f"{module}.weight"].data
    scales = float32_of(tensors[f"{module}.scales"])
    biases = float32_of(tensors[f"{module}.biases"])
    return kernels.dequantize(weight, scales, biases, group_size, bits, dtype="float32")


def _is_quant_part(name: str, tensors: dict[str, RawTensor]) -> bool:
    """Whether `name` is the scales or biases of a quantized module (described by its .weight)."""
    return name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.scales" in tensors


def logical_shapes(tensors: dict[str, RawTensor], quantization: dict[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """The shape each weight has as a float matrix (packed weights unpacked), without scales and biases."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in tensors.items():
        if _is_quant_part(name, tensors):
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{module}.scales" in tensors:
            group_size, _ = layer_quantization(quantization or {}, module)
            scales = tensors[f"{module}.scales"].shape
            shapes[name] = (*scales[:-1], scales[-1] * group_size)
        else:
            shapes[name] = tensor.shape
    return shapes


def dequantize_tensors(
    tensors: dict[str, RawTensor], quantization: dict[str, Any] | None, dtype: str
) -> dict[str, RawTensor]:
    """Every tensor as a float of `dtype`: quantized modules dequantized in float32, then rounded once."""
    out: dict[str, RawTensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if _is_quant_part(name, tensors):
            continue
        if name.endswith(".weight") and f"{module}.scales" in tensors:
            group_size, bits = layer_quantization(quantization or {}, module)
            out[name] = float_tensor(affine_float32(tensors, module, group_size, bits), dtype)
        elif tensor.dtype in ("F32", "F16", "BF16") and FLOAT_DTYPES[dtype] != tensor.dtype:
            out[name] = float_tensor(float32_of(tensor), dtype)
        else:
            out[name] = tensor
    return out


# ---- reading -------------------------------------------------------------------------------------------------------


def _open(path: Path) -> gguf.GGUFReader:
    gguf = _gguf()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist.", hint="Check the path of the .gguf file.")
    try:
        return gguf.GGUFReader(path, "c")  # copy-on-write map: arrays are writable, the file never changes
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({e}).",
            hint="Download it again; llmctl reads GGUF version 2 and 3 files as llama.cpp writes them.",
        ) from None


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    values = {}
    for key, value in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values[key] = value.contents()
    return values


def _rope_scaling(
    meta: dict[str, Any], rope_freqs: np.ndarray | None, theta: float, head_dim: int, path: Path
) -> RopeScaling | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=_float(meta["llama.rope.scaling.factor"]))
    if kind not in ("none", "") and rope_freqs is None:
        raise UnsupportedModel(f"{path} uses rope scaling {kind!r}; llmctl implements linear and llama3.")
    if rope_freqs is None:
        return None
    # Llama 3.x stores its frequency factors as a tensor; find the llama3 parameters that give exactly those factors
    factor = _float(rope_freqs.max())
    context = meta.get("llama.rope.scaling.original_context_length")
    for original in [int(context)] if context else [8192, 4096, 2048, 16384, 32768, 131072]:
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            scaling = RopeScaling("llama3", factor, low, high, original)
            if np.allclose(llama3_rope_factors(scaling, theta, head_dim), rope_freqs, rtol=1e-6, atol=0):
                return scaling
    raise UnsupportedModel(
        f"{path} has rope_freqs factors that match no llama3 rope scaling llmctl knows (max factor {factor:g}).",
        hint="Convert the original Hugging Face model instead, whose config.json states its rope scaling.",
    )


def llama3_rope_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter stores as rope_freqs.weight for llama3 rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * math.pi / freqs
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    middle = 1 / ((1 - smooth) / scaling.factor + smooth)
    out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, scaling.factor, middle))
    return out.astype(np.float32)


def _float(value: Any) -> float:
    """A float32 from the file as the number it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _spec(
    meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], rope_freqs: np.ndarray | None, path: Path
) -> ModelSpec:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModel(
            f"{path} holds a model of architecture {arch!r}; llmctl reads GGUF files of the llama architecture "
            "(Llama, Mistral, SmolLM, TinyLlama, ...).",
            hint="Use a Llama-family GGUF, or convert the original Hugging Face folder of this model.",
        )
    need = ("llama.embedding_length", "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count")
    missing = [key for key in need if key not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks the metadata {', '.join(missing)}.", hint="The file is incomplete.")
    if meta.get("llama.expert_count", 0):
        raise UnsupportedModel(f"{path} is a mixture of experts (llama.expert_count); llmctl reads dense Llama GGUFs.")
    for key in (*need, "llama.attention.head_count_kv", "llama.context_length", "llama.vocab_size"):
        value = meta.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise CheckpointError(
                f"{path}: the metadata {key} is {value!r}; it must be a positive whole number.",
                hint="The file is damaged or was edited; download or convert it again.",
            )
    dim, n_heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", dim // n_heads)))
    theta = _float(meta.get("llama.rope.freq_base", 10_000.0))
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or shapes["token_embd.weight"][0]
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return ModelSpec(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(meta["llama.block_count"]),
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        ffn_dim=int(meta["llama.feed_forward_length"]),
        head_dim=head_dim,
        norm_eps=_float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(meta, rope_freqs, theta, head_dim, path),
        max_seq_len=int(meta.get("llama.context_length", 2048)),
        tie_embeddings="output.weight" not in shapes,
        family="llama",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _read_tensor(t: gguf.ReaderTensor, shape: tuple[int, ...], heads: int | None) -> tuple[dict[str, RawTensor], str]:
    """One GGUF tensor by suffix ("" for a float tensor; weight/scales/biases for exact blocks) and how it was
    read: "float", "affine" or "dequantized". `heads`: reorder q/k rows back (whole rows move, blocks too)."""
    gguf = _gguf()
    qtype = t.tensor_type.name
    data = np.asarray(t.data)
    order = rope_row_order(shape[0], heads, to_gguf=False) if heads else slice(None)
    if qtype in ("F32", "F16", "BF16"):
        values = (data.view(np.uint16) if qtype == "BF16" else data).reshape(shape)  # BF16 stays bits
        return {"": RawTensor(qtype, shape, np.ascontiguousarray(values[order]))}, "float"
    if (qtype in BLOCK_TYPES or qtype in K_TYPES) and len(shape) == 2:
        blocks = data.reshape(shape[0], -1)[order]
        if qtype in K_TYPES:
            arrays = k_blocks_to_affine(blocks, K_TYPES[qtype], *shape)
        else:
            arrays = blocks_to_affine(blocks, BLOCK_TYPES[qtype], *shape)
        return {suffix: RawTensor.from_numpy(array) for suffix, array in arrays.items()}, "affine"
    try:
        values = gguf.quants.dequantize(data, t.tensor_type).reshape(shape).astype(np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"tensor {t.name} has type {qtype}, which the gguf package cannot dequantize.",
            hint="Update the gguf package (pip install -U gguf), or use a file with other types.",
        ) from None
    return {"": RawTensor.from_numpy(np.ascontiguousarray(values[order]))}, "dequantized"


def _float_dtype(tensors: dict[str, RawTensor]) -> str:
    """The matrices' most common float dtype, as config.json names it (float16 when every matrix is quantized)."""
    floats = Counter(t.dtype for t in tensors.values() if t.dtype in ("F32", "F16", "BF16") and len(t.shape) == 2)
    names = {kind: name for name, kind in FLOAT_DTYPES.items()}
    return names[floats.most_common(1)[0][0]] if floats else "float16"


def _quantization(layers: dict[str, QuantParams]) -> dict[str, Any] | None:
    """config.json's quantization entry for the quantized matrices: the most common format, others per layer."""
    if not layers:
        return None
    default = Counter(layers.values()).most_common(1)[0][0]
    return config_entry(default, layers)


def read_gguf(path: str | Path) -> ModelFolder:
    """Read a Llama-family GGUF file: F32/F16/BF16 as they are, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q4_K/Q5_K exactly into
    the affine layout at group size 32, Q6_K/Q3_K/Q2_K exactly at group size 16 (mode affine16), other types (IQ)
    dequantized to float32 (with a notice); q/k rows in transformers' order."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}  # innermost last
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = np.asarray(by_name["rope_freqs.weight"].data, np.float32) if "rope_freqs.weight" in by_name else None
    try:
        spec = _spec(meta, shapes, rope_freqs, path)
    except SpecError as e:
        raise CheckpointError(f"{path}: the metadata describes no valid model: {e.message}") from None
    check_size(spec, {hf: shapes[g] for g in shapes if (hf := _hf_name(g)) is not None}, path)

    tensors: dict[str, RawTensor] = {}
    formats: dict[str, QuantParams] = {}  # quantized module -> its group size and bits
    dequantized: Counter[str] = Counter()  # ggml type -> tensors dequantized
    unknown = []
    for t in reader.tensors:
        stem, _, kind = t.name.rpartition(".")
        module = hf_module(stem)
        if t.name == "rope_freqs.weight":
            continue  # read into the spec's rope scaling
        if module is None or kind not in ("weight", "bias"):
            unknown.append(t.name)
            continue
        heads = _rope_heads(spec, module) if kind == "weight" else None
        try:
            parts, how = _read_tensor(t, shapes[t.name], heads)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e.message}", hint=e.hint) from None
        tensors |= {f"{module}.{suffix or kind}": tensor for suffix, tensor in parts.items()}
        if how == "affine":
            qtype = t.tensor_type.name
            kind = K_TYPES.get(qtype)
            formats[module] = QuantParams(kind.group_size, kind.bits) if kind else QuantParams(GROUP_SIZE, BLOCK_TYPES[qtype].bits)
        elif how == "dequantized":
            dequantized[t.tensor_type.name] += 1
    if unknown:
        more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
        raise UnsupportedModel(
            f"{path} has tensors llmctl does not know for a llama model: {', '.join(unknown[:6])}{more}.",
            hint="This may be a variant of the architecture llmctl does not implement.",
        )
    quantization = _quantization(formats)
    logical = logical_shapes(tensors, quantization)
    try:
        extra = check_tensors(spec, logical, path, {name: "" for name in logical})
    except CheckpointError as e:
        raise CheckpointError(
            e.message.replace("does not match its config.json", "has tensors that disagree with its metadata"),
            hint="The file may be damaged, or be a variant of the llama architecture llmctl does not implement.",
        ) from None
    for name in extra:  # tensors check_tensors lets a checkpoint carry but the model does not use
        for suffix in ("", ".scales", ".biases"):
            tensors.pop(name.removesuffix(".weight") + suffix if suffix else name, None)

    notices = []
    if dequantized:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(dequantized.items()))
        notices.append(
            f"{path.name}: {kinds} tensors have no exact affine equivalent; they were dequantized to float32."
        )
        ui.warn(notices[-1])
    return ModelFolder(path, spec, tensors, quantization, _float_dtype(tensors), notices, meta)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/values of a GGUF file (tokenizer arrays included), without reading tensors."""
    return _metadata(_open(Path(path)))


def read_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer and chat template rebuilt from a GGUF file's metadata."""
    from llmctl.io.gguf_vocab import tokenizer_from_metadata

    path = Path(path)
    return tokenizer_from_metadata(read_gguf_metadata(path), path)


# ---- writing -------------------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What a conversion did to each tensor: kept exactly, or changed, with the error that adds."""

    types: Counter[str] = field(default_factory=Counter)  # ggml type -> tensors written in it
    exact: list[str] = field(default_factory=list)
    lossy: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)  # see error_stats
    notices: list[str] = field(default_factory=list)

    @property
    def is_exact(self) -> bool:
        return not self.lossy

    def max_abs(self) -> float:
        return max((v[0] for v in self.lossy.values()), default=0.0)

    def rms(self) -> float:
        """RMS difference over every changed weight."""
        n = sum(v[3] for v in self.lossy.values())
        return math.sqrt(sum(v[1] ** 2 * v[3] for v in self.lossy.values()) / n) if n else 0.0

    def summary(self) -> str:
        if not self.lossy:
            return f"exact: all {len(self.exact)} tensors keep their values"
        n = sum(v[3] for v in self.lossy.values())
        reference = math.sqrt(sum(v[2] ** 2 * v[3] for v in self.lossy.values()) / n)
        relative = 100 * self.rms() / reference if reference else 0.0
        return (
            f"lossy: {len(self.lossy)} of {len(self.lossy) + len(self.exact)} tensors changed; their values moved by "
            f"at most {self.max_abs():.3g}, RMS {self.rms():.3g} ({relative:.2f}% of their RMS)"
        )


def error_stats(reference: np.ndarray, changed: np.ndarray) -> tuple[float, float, float, int]:
    """(max |difference|, RMS difference, RMS of the reference, count) of two float arrays of one shape."""
    reference = reference.astype(np.float64).reshape(-1)
    diff = changed.astype(np.float64).reshape(-1) - reference
    return (
        float(np.abs(diff).max(initial=0.0)),
        float(np.sqrt(np.mean(diff**2))),
        float(np.sqrt(np.mean(reference**2))),
        diff.size,
    )


def regroup_to_32(
    tensors: dict[str, RawTensor], layers: dict[str, QuantParams], target: str
) -> tuple[str, dict[str, tuple[float, float, float, int]]] | None:
    """Requantize the layers in affine groups of 16 (GGUF's Q6_K, Q3_K, Q2_K) to groups of 32 at the same bits, in
    place (`tensors` and `layers`), for `target` (MLX, an mlx-lm folder), which has no groups of 16. Returns a notice
    giving the error that adds and each weight's error_stats, or None when no layer is in groups of 16."""
    from llmctl import kernels

    moved = [path for path, p in layers.items() if p.group_size == 16]
    if not moved:
        return None
    worst, squares, reference, count = 0.0, 0.0, 0.0, 0
    stats = {}
    for path in moved:
        bits = layers[path].bits
        parts = [tensors[path + suffix] for suffix in (".weight", ".scales", ".biases")]
        values = kernels.dequantize(parts[0].data, float32_of(parts[1]), float32_of(parts[2]), 16, bits, dtype="float32")
        wq, scales, biases = kernels.quantize(values, 32, bits)
        changed = kernels.dequantize(wq, scales, biases, 32, bits, dtype="float32")
        stats[path + ".weight"] = most, rms, norm, n = error_stats(values, changed)
        worst, squares, reference, count = max(worst, most), squares + rms**2 * n, reference + norm**2 * n, count + n
        for suffix, array in zip((".weight", ".scales", ".biases"), (wq, scales, biases)):
            tensors[path + suffix] = RawTensor.from_numpy(array)
        layers[path] = QuantParams(32, bits)
    rms, norm = (squares / count) ** 0.5, (reference / count) ** 0.5
    return (
        f"{len(moved)} layers quantized in groups of 16 (GGUF Q6_K, Q3_K, Q2_K) were regrouped to groups of 32 at the "
        f"same bits for {target}, which has no groups of 16: their weights moved by RMS {rms:.3g} "
        f"({100 * rms / max(norm, 1e-30):.2f}% of their RMS), at most {worst:.3g}."
    ), stats


def _quantize_rows(values: np.ndarray, qtype: str) -> np.ndarray:
    if qtype in K_TYPES:
        from llmctl.io.kquants import quantize_k

        return quantize_k(values, qtype)
    gguf = _gguf()
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType[qtype])


def _dequantize_rows(data: np.ndarray, qtype: str) -> np.ndarray:
    gguf = _gguf()
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


def _plan_tensor(
    name: str,
    tensors: dict[str, RawTensor],
    quantization: dict[str, Any] | None,
    target: str | None,
    report: ConversionReport,
) -> tuple[np.ndarray, str]:
    """One tensor (HF name of its weight) as ggml data and type; records in `report` whether it stayed exact."""
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and f"{module}.scales" in tensors:
        group_size, bits = layer_quantization(quantization or {}, module)
        scales = float32_of(tensors[f"{module}.scales"])
        biases = float32_of(tensors[f"{module}.biases"])
        exact = exact_block_types(bits, group_size, scales, biases)
        wanted = target.upper() if target else None
        if wanted in exact or (wanted is None and exact):
            qtype = wanted or exact[0]
            weight = tensors[f"{module}.weight"].data
            report.exact.append(name)
            return affine_to_blocks(weight, scales, biases, bits, BLOCK_TYPES[qtype]), qtype
        values = affine_float32(tensors, module, group_size, bits)
        if wanted is None:  # no exact type: the nearest that keeps as many bits
            wanted = "Q4_1" if bits <= 4 else "Q5_1" if bits == 5 else "Q8_0"
        if wanted == "F32":  # scale * code + bias in float32 is how llama.cpp computes the value too
            report.exact.append(name)
            return values, "F32"
    else:
        tensor = tensors[name]
        values = float32_of(tensor)
        wanted = target.upper() if target else tensor.dtype
        if values.ndim != 2 or (wanted in BLOCK_TYPES and values.shape[1] % GROUP_SIZE):
            if values.ndim == 2:
                report.notices.append(f"{name}: {values.shape[1]} columns is not a multiple of 32; kept as F32.")
            wanted = "F32"  # llama.cpp keeps norms (1-D) in float32
        if wanted == tensor.dtype or wanted == "F32":
            report.exact.append(name)
            if wanted == "BF16":
                return tensor.data, "BF16"
            return (values if wanted == "F32" else tensor.data), wanted
    if wanted == "F16":
        with np.errstate(over="ignore"):
            data = values.astype(np.float16)
        report.lossy[name] = error_stats(values, data.astype(np.float32))
        return data, "F16"
    data = _quantize_rows(values, wanted)
    report.lossy[name] = error_stats(values, _dequantize_rows(data, wanted).reshape(values.shape))
    return data, wanted


def _hf_weight_names(tensors: dict[str, RawTensor]) -> list[str]:
    """Tensors to write, one per weight (quantized modules by their .weight), embeddings first as llama.cpp orders."""
    names = [n for n in tensors if not _is_quant_part(n, tensors)]

    def key(name: str) -> tuple[int, int, str]:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return (1, int(match.group(1)), name) if match else (0 if "embed" in name else 2, 0, name)

    return sorted(names, key=key)


def write_gguf(
    out: str | Path,
    spec: ModelSpec,
    tensors: dict[str, RawTensor],
    *,
    quantization: dict[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
    target: str | None = None,
    name: str = "",
    general: dict[str, Any] | None = None,
) -> ConversionReport:
    """Write a model as a llama-architecture GGUF file that llama.cpp loads; returns what stayed exact.

    target: None keeps every tensor exact where a ggml type can (floats as they are, 4-/5-/8-bit groups of 32
    with float16 scales as Q4_0/Q4_1/Q5_0/Q5_1/Q8_0); one of WRITE_TYPES converts the matrices to that type, or for
    the K-quants (q4_k, q5_k, q6_k, mixes q4_k_m, q5_k_m) to the types llama.cpp's quantizer gives each tensor.
    general: general.* metadata to carry over (name, license, ... of a GGUF being rewritten).
    The file is written under a temporary name and renamed into place when complete.
    """
    gguf = _gguf()
    if spec.family not in ("llama", "mistral") or spec.attn_bias or spec.n_experts:
        raise UnsupportedModel(
            f"llmctl writes GGUF for dense Llama-architecture models (llama, mistral); this one is {spec.family!r}.",
            hint="Keep it as a model folder.",
        )
    if target is not None and target not in WRITE_TYPES:
        raise CheckpointError(f"GGUF type {target!r} is not supported; choose one of {', '.join(WRITE_TYPES)}.")
    out = Path(out)
    report = ConversionReport()
    if spec.sliding_window:
        report.notices.append(f"llama.cpp ignores the sliding window ({spec.sliding_window}) of this model.")
    from llmctl.io.kquants import FILE_TYPES, tensor_type

    planned: list[tuple[str, np.ndarray, str]] = []
    shapes = logical_shapes(tensors, quantization)
    names = [n for n in _hf_weight_names(tensors) if not (spec.tie_embeddings and n.startswith("lm_head."))]
    with ui.progress(len(names), f"GGUF {target or 'exact'}") as bar:
        for hf in names:
            stem, _, kind = hf.rpartition(".")
            module = gguf_module(stem)
            if module is None:
                raise CheckpointError(f"Tensor {hf} has no GGUF name; llmctl writes the tensors of a Llama model.")
            wanted = target
            if target in FILE_TYPES:  # K-quants: llama.cpp's type for this tensor, with its fallbacks
                wanted = tensor_type(target, f"{module}.{kind}", shapes[hf][-1], spec.n_layers, spec.tie_embeddings).lower()
            data, qtype = _plan_tensor(hf, tensors, quantization, wanted, report)
            heads = _rope_heads(spec, stem)
            if heads and kind == "weight":
                data = data[rope_row_order(data.shape[0], heads, to_gguf=True)]
            report.types[qtype] += 1
            planned.append((f"{module}.{kind}", np.ascontiguousarray(data), qtype))
            bar.update(tensor=hf)
    if spec.rope_scaling is not None and spec.rope_scaling.rope_type == "llama3":
        planned.append(
            ("rope_freqs.weight", llama3_rope_factors(spec.rope_scaling, spec.rope_theta, spec.head_dim), "F32")
        )

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _write_metadata(writer, spec, report, tokenizer, name or out.stem, general or {}, FILE_TYPES.get(target or ""))
        for gname, data, qtype in planned:
            raw = gguf.GGMLQuantizationType[qtype]
            if qtype in ("F32", "F16"):
                writer.add_tensor(gname, data)
            else:  # BF16 bits (uint16) or blocks (uint8): the writer takes the type and the logical shape
                writer.add_tensor(gname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return report


# general.* keys that describe the file itself, not the model: written anew, never carried over
_OWN_GENERAL = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def _write_metadata(
    writer: gguf.GGUFWriter, spec: ModelSpec, report: ConversionReport, tokenizer: Tokenizer | None, name: str,
    general: dict[str, Any], file_type: int | None = None,
) -> None:  # fmt: skip
    matrices = Counter({t: n for t, n in report.types.items() if t != "F32"}) or Counter({"F32": 1})
    file_type = _FILE_TYPES[matrices.most_common(1)[0][0]] if file_type is None else file_type
    writer.add_type("model")
    writer.add_name(str(general.get("general.name", name)))
    for key, value in general.items():  # descriptive text (organization, license, languages, ...)
        if key in (*_OWN_GENERAL, "general.name", "general.type"):
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            writer.add_array(key, value)
    writer.add_file_type(file_type)
    if any(t in BLOCK_TYPES or t in K_TYPES for t in report.types):
        writer.add_quantization_version(2)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.dim // spec.n_heads:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    if spec.rope_scaling is not None and spec.rope_scaling.rope_type == "linear":
        writer.add_string("llama.rope.scaling.type", "linear")
        writer.add_float32("llama.rope.scaling.factor", spec.rope_scaling.factor)
    elif spec.rope_scaling is not None:  # llama3: the factors go in rope_freqs.weight; this lets a reader recover it
        writer.add_uint32(
            "llama.rope.scaling.original_context_length", spec.rope_scaling.original_max_position_embeddings
        )
    if tokenizer is None:
        report.notices.append("The model has no tokenizer; llama.cpp needs one in the file to run it.")
        ids = [("bos_token_id", spec.bos_token_id), ("padding_token_id", spec.pad_token_id)]
        ids += list(zip(("eos_token_id", "eot_token_id"), spec.eos_token_ids))
        for key, token_id in ids:  # kept so that reading the file back gives the same spec
            if token_id is not None:
                writer.add_uint32(f"tokenizer.ggml.{key}", int(token_id))
        return
    from llmctl.io.gguf_vocab import tokenizer_metadata

    for key, (value, kind) in tokenizer_metadata(tokenizer, spec.vocab_size).items():
        if kind == "str":
            writer.add_string(key, value)
        elif kind == "u32":
            writer.add_uint32(key, int(value))
        elif kind == "bool":
            writer.add_bool(key, bool(value))
        elif kind == "float_array":
            writer.add_array(key, [float(v) for v in value])
        elif kind == "int_array":
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, value)
