"""Quantized layers for the torch backend (llmctl's C++ kernels), and quantizing a model's tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from llmctl import kernels
from llmctl.backends.torch.model import _joint, dense_linear
from llmctl.io.model import ModelFolder
from llmctl.io.safetensors import RawTensor, from_torch, to_torch
from llmctl.quant import AUX_SUFFIXES, QuantParams, expand_double_quant, quantized_layers


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/quant.h's DType
_MODES = {"affine": 0, "nf4": 1}


@functools.cache
def _bf16_products() -> bool:
    """Whether bfloat16 matrix products run natively here (oneDNN on AVX512_BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and kernels.cpu_has_bf16()


# Products with at least this many rows of x (prompts) dequantize blocks of DEQUANTIZED_BLOCK weights and multiply
# in float32 (or bfloat16, `_dequantized_matmul`): past ~100 rows a float matrix product outruns the one-row quantized
# kernels. 16-bit prompts of tiled layers on AVX2 take the tiled prompt kernel instead (PROMPT_KERNEL_ISAS).
DEQUANTIZED_ROWS = 128
# Where the tiled layout's prompt kernel (csrc/qtiled.cpp: int16 x, each tile's codes widened once for many rows)
# multiplies 16-bit prompts (`_prompt_kernel`) instead of dequantize + float32 products: on AVX2 (EPYC Zen 3, 2
# threads, a loaded machine) one 512-row product with bfloat16 x took 1.8-2.1x less time, and bench/decode.py's
# 512-token bfloat16-scale prompt at 4 bits 1.60x, 1.57x, 0.86x per round (load 11-14). On AVX-512 the one-row VNNI kernel would
# multiply each row again, not measured against oneDNN there: prompts keep the dequantized path.
PROMPT_KERNEL_ISAS = ("avx2",)
TILED_ISAS = ("avx2", "avx512")  # the ISAs with tiled kernels (csrc/qtiled.cpp); others run a portable loop
DEQUANTIZED_BLOCK = 1 << 20  # 4 MB of float32: smaller blocks made the products measurably slower
# The codes a layer's tiles hold, by the layer's bits: the tiled kernels take 4- and 8-bit codes, so 3-bit codes are
# widened to 4 bits and 5-/6-bit ones (GGUF's Q5_0, Q5_K; a 6-bit head) to 8 when tiled: the same values, 1.33-1.6x
# their memory, for a one-row product 1.9x faster than qmatmul_k.cpp's rows of 5-bit codes (24576 x 576, AVX2, one
# thread); narrowed back whenever MLX's layout is asked for (saving, casting, dequantizing).
TILED_BITS = {3: 4, 4: 4, 5: 8, 6: 8, 8: 8}


class _QMatmul(torch.autograd.Function):
    """y = x @ W^T through the kernels; the backward pass (for adapters on top, QLoRA) uses the dequantized W."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantized(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as `weight` (uint32 codes), `scales` and, for affine, `biases`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, params: QuantParams, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype  # of the model's activations; None: the scales' dtype
        dtype = dtype or torch.float32
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.bits, self.mode = params.group_size, params.bits, params.mode
        groups = in_features // params.group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features * params.bits // 32, dtype=torch.uint32))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype))
        if params.mode == "affine":
            self.register_buffer("biases", torch.zeros(out_features, groups, dtype=dtype))
        else:
            self.biases = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.isa = kernels.isa_code(None)  # $LLMCTL_ISA (e.g. scalar) as it was when the model was built

    @property
    def tiled(self) -> bool:
        """Whether codes, scales and biases are in the tiled layout (`tile`), which their 3-D shapes record."""
        return self._buffers["weight"].dim() == 3

    @property
    def codes_bits(self) -> int:
        """Bits per code as the codes are laid out now: the layer's, or its tiles' wider ones (TILED_BITS)."""
        return TILED_BITS[self.bits] if self.tiled else self.bits

    def matmul(self, x: Tensor, threads: int | None = None) -> Tensor:
        """x (..., in) @ W^T with no bias, in x's dtype; threads: the kernels' count (None: torch's)."""
        buffers = self._buffers  # direct: nn.Module.__getattr__ costs a microsecond per buffer
        weight, scales, biases = buffers["weight"], buffers["scales"], buffers.get("biases")
        if (
            x.numel() >= DEQUANTIZED_ROWS * self.in_features and self.mode == "affine" and not x.is_cuda
            and x.shape[-1] == self.in_features and not (weight.dim() == 3 and self._prompt_kernel(x))
        ):  # fmt: skip
            return self._dequantized_matmul(x)
        if weight.dim() == 3 and _DTYPE_CODES.get(x.dtype) is None and x.shape[-1] == self.in_features:
            return self.matmul(x.float(), threads).to(x.dtype)  # the tiled kernels take float activations only
        if weight.is_cuda:
            return kernels.qmatmul(x, weight, scales, biases, self.group_size, self.bits, mode=self.mode)
        # The decode path: a hundred small products per token, so the weights are checked once (kernels.QuantizedWeights,
        # made again when they are replaced) and each call checks x only
        threads = torch.get_num_threads() if threads is None else threads
        checked = self.__dict__.get("_checked")
        if checked is None or checked.wq is not weight or checked.scales is not scales or checked.biases is not biases:
            try:
                checked = self.__dict__["_checked"] = kernels.QuantizedWeights(weight, scales, biases, self.group_size,
                                                                               self.codes_bits, self.mode)  # fmt: skip
            except kernels.KernelArgumentError:  # e.g. non-contiguous views: the general path copies, or says why not
                return kernels.qmatmul(x, weight, scales, biases, self.group_size, self.codes_bits, mode=self.mode,
                                       threads=threads, isa=kernels.ISAS[self.isa])  # fmt: skip
        return checked.matmul(x, threads=threads, isa=self.isa)

    def _prompt_kernel(self, x: Tensor) -> bool:
        """Whether the tiled kernels multiply this prompt (16-bit x on PROMPT_KERNEL_ISAS) rather than dequantized
        float32 products: they round x to int16 per group (2^-16 of its largest |x|, kernels.qmatmul's bound), far
        below the rounding 16-bit x already carries (2^-9 of each value for bfloat16, 2^-12 for float16), while
        float32 x keeps float32 products (within 1e-5 of dequantize-then-matmul, as test_quantize holds them)."""
        return x.dtype in (torch.bfloat16, torch.float16) and (
            kernels.ISAS[self.isa] if self.isa else kernels.cpu_isa()
        ) in PROMPT_KERNEL_ISAS

    @classmethod
    def fuse(cls, linears: list[QuantizedLinear]) -> QuantizedLinear | None:
        """One layer whose codes, scales, biases and bias are joint tensors with `linears`' own as row blocks (theirs
        become views of them, as `model.fuse` does for plain Linears), so layers that read the same x run as one
        product; None when they differ in format, layout or device, or are not on the CPU."""
        first = linears[0]
        formats = {
            (l.in_features, l.group_size, l.bits, l.mode, l.scales.dtype, l.weight.device, l.biases is None, l.bias is None, l.tiled)
            for l in linears
        }  # fmt: skip
        if len(formats) > 1 or first.weight.device.type != "cpu":
            return None
        joint = nn.Module.__new__(cls)
        nn.Module.__init__(joint)
        joint.dtype, joint.isa = first.dtype, first.isa  # tiled or not as its parts: the shapes say
        joint.in_features, joint.out_features = first.in_features, sum(linear.out_features for linear in linears)
        joint.group_size, joint.bits, joint.mode = first.group_size, first.bits, first.mode
        for name in ("weight", "scales", "biases", "bias"):
            parts = [getattr(linear, name) for linear in linears]
            tensor = None if parts[0] is None else _joint(parts)
            if parts[0] is not None and tensor is None:
                parts = [part.detach() for part in parts]
                with torch.inference_mode(False), torch.no_grad():  # tensors made under inference_mode could not be trained
                    if parts[0].dtype == torch.uint32:  # cat has no uint32 kernel: the same bits as int32
                        tensor = torch.cat([part.view(torch.int32) for part in parts]).view(torch.uint32)
                    else:
                        tensor = torch.cat(parts)
                for linear, view in zip(linears, tensor.split([len(part) for part in parts])):
                    if name == "bias":
                        linear.bias.data = view
                    else:
                        linear._buffers[name] = view
            joint.register_buffer(name, tensor)
        return joint

    def can_tile(self) -> bool:
        """Whether `tile` would rearrange this layer: affine 3- to 8-bit codes (TILED_BITS) of a multiple of 16 rows on a CPU that
        has the tiled kernels, with the kernels' choice left to them (LLMCTL_ISA unset) or set to an ISA that has
        tiled kernels (avx2, avx512: so LLMCTL_ISA=avx2 measures the AVX2 decode on an AVX-512 CPU)."""
        weight, scales = self._buffers["weight"], self._buffers["scales"]
        isa_tiles = kernels.tiled_fast() if self.isa == 0 else kernels.ISAS[self.isa] in TILED_ISAS
        return (
            self.mode == "affine" and self.group_size != kernels.READ_GROUP_SIZE and weight.device.type == "cpu"
            and isa_tiles and scales.dtype in _DTYPE_CODES
            and all(t.is_contiguous() for t in (weight, scales, self.biases))
            and self.bits in TILED_BITS and kernels.tiled_supported(TILED_BITS[self.bits], self.mode, self.out_features)
        )  # fmt: skip

    def tile(self) -> bool:
        """Rearrange the codes, scales and biases in place into the tiled layout (csrc/qmatmul.h: 16 output rows
        interleaved, so that one vector of codes serves 16 rows of a one-row product). Decoding runs 1.3-1.4x
        faster there (the 110M model's matrices streamed from memory, 2 threads). Same bytes, viewed in the tiled
        shapes (kernels.to_tiled), so that no kernel reads them as MLX's (3-, 5- and 6-bit codes widened first, into new
        memory: TILED_BITS); the state dict still holds MLX's layout.
        Returns whether the layer is tiled."""
        if not self.tiled and self.can_tile():
            self._retile(back=False)
        return self.tiled

    def untile(self) -> None:
        """Back to MLX's layout, in place."""
        if self.tiled:
            self._retile(back=True)

    def _retile(self, back: bool) -> None:
        buffers = self._buffers
        weight, scales, biases = buffers["weight"], buffers["scales"], buffers["biases"]
        if back:
            weight, scales, biases = kernels.from_tiled(weight, scales, biases, self.group_size, TILED_BITS[self.bits])
            weight = self._recode(weight, TILED_BITS[self.bits], self.bits)
        else:
            weight = self._recode(weight, self.bits, TILED_BITS[self.bits])
            weight, scales, biases = kernels.to_tiled(weight, scales, biases, self.group_size, TILED_BITS[self.bits])
        buffers["weight"], buffers["scales"], buffers["biases"] = weight, scales, biases

    def _recode(self, weight: Tensor, bits: int, to: int) -> Tensor:
        """MLX-layout codes (out, words) of `bits` bits as codes of `to` bits (new memory), or as they are."""
        return weight if bits == to else kernels.pack(kernels.unpack(weight, bits, self.in_features), to)

    def _mlx_layout(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """weight, scales and biases in MLX's layout (copies when the layer is tiled)."""
        weight, scales, biases = self._buffers["weight"], self._buffers["scales"], self._buffers.get("biases")
        if not self.tiled:
            return weight, scales, biases
        weight, scales, biases = kernels.from_tiled(weight.clone(), scales.clone(), biases.clone(), self.group_size,
                                                    self.codes_bits)  # fmt: skip
        return self._recode(weight, self.codes_bits, self.bits), scales, biases

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            for name, t in zip(("weight", "scales", "biases"), self._mlx_layout()):
                destination[prefix + name] = t

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self.untile()  # .to(), .cuda(), .half(), ...: what comes out is in MLX's layout (the decode step tiles again)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if any(prefix + name in state_dict for name in ("weight", "scales", "biases")):
            self.untile()  # what is loaded is in MLX's layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dequantized_matmul(self, x: Tensor) -> Tensor:
        """x @ W^T for many rows (a prompt): W dequantized a block of output rows at a time (the block stays in
        cache, and no whole float copy of W is ever made), then a oneDNN matrix product. Each weight is code * scale
        + bias in float32, as the kernels compute; x is not rounded to int16 as there. The product is in float32,
        or in bfloat16 (float32 sums) for bfloat16 x where the CPU multiplies bfloat16 natively: the weights are
        then rounded to bfloat16 too, as a bfloat16 model's are. With 512 rows of the 110M model a layer took 42 ms
        in float32 against the kernels' 54-58; the bfloat16 products made the whole 512-token prompt ~1.4x faster."""
        buffers = self._buffers
        weight, scales, biases = buffers["weight"], buffers["scales"], buffers["biases"]
        # bfloat16 activations multiply bfloat16 weights (float32 sums) where the CPU has bfloat16 products, twice
        # float32's rate: the model computes in bfloat16 anyway, as its dense layers and MLX's quantized ones do
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and _bf16_products() else torch.float32
        rows = x.reshape(-1, self.in_features).to(dtype)
        y = torch.empty(len(rows), self.out_features, dtype=dtype)
        step = max(16, DEQUANTIZED_BLOCK // self.in_features // 16 * 16)  # whole tiles
        for o in range(0, self.out_features, step):
            if self.tiled:
                span = (o, min(o + step, self.out_features))  # not `rows`: that is x's
                w = kernels.dequantize_tiled(weight, scales, biases, self.group_size, self.codes_bits, span, dtype,
                                             threads=torch.get_num_threads(), isa=kernels.ISAS[self.isa])  # fmt: skip
            else:
                w = kernels.dequantize(weight[o : o + step], scales[o : o + step].float(), biases[o : o + step].float(),
                                       self.group_size, self.bits)  # fmt: skip
            y[:, o : o + step] = dense_linear(rows, w.to(dtype))
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as a float (out, in) matrix."""
        if self.mode == "nf4":
            return kernels.dequantize_nf4(self.weight, self.scales, self.group_size, dtype=dtype)
        weight, scales, biases = self._mlx_layout()
        return kernels.dequantize(weight, scales, biases, self.group_size, self.bits, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _QMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}, mode={self.mode}"


class QuantizedEmbedding(QuantizedLinear):
    """An Embedding stored like QuantizedLinear: rows are gathered, then dequantized; `as_linear` is the tied head.

    Tied to the head, it is tiled where its tiles hold 8-bit codes (`tile_tied`): the head is read whole every token
    (SmolLM2's Q8_0 embedding is a third of its weights), and an 8-bit tile holds each row's words as MLX's layout
    does, 16 words apart, so a lookup gathers them."""

    def __init__(self, num_embeddings: int, dim: int, params: QuantParams, dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, num_embeddings, False, params, dtype)
        self.tied = False  # set by `tile_tied`: whether `tile` may rearrange the table

    def forward(self, tokens: Tensor) -> Tensor:
        flat = tokens.reshape(-1)
        weight, scales, biases = self._buffers["weight"].view(torch.int32), self.scales, self.biases  # index_select has no uint32 kernel
        if self.tiled:
            at = (flat // kernels.TILE_ROWS, slice(None), flat % kernels.TILE_ROWS)
            rows, scales, biases = weight[at].view(torch.uint32), scales[at], biases[at]
        else:
            rows, scales = weight[flat].view(torch.uint32), scales[flat]
            biases = None if biases is None else biases[flat]
        if self.mode == "nf4":
            out = kernels.dequantize_nf4(rows, scales, self.group_size, dtype=self.dtype)
        else:
            out = kernels.dequantize(rows, scales, biases, self.group_size, self.codes_bits, dtype=self.dtype)
        return out.view(*tokens.shape, self.in_features)

    def as_linear(self, x: Tensor) -> Tensor:
        return self.matmul(x)

    def can_tile(self) -> bool:
        """Only the table of a tied head, in 8-bit tiles (those a lookup reads directly)."""
        return self.tied and TILED_BITS.get(self.bits) == 8 and super().can_tile()

    def tile_tied(self) -> bool:
        """Tile the table as the tied head it is (`prepare_inference`); returns whether it is tiled."""
        self.tied = True
        return self.tile()


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), name


def apply_quantized_layers(module: nn.Module, layers: Mapping[str, QuantParams], dtype: torch.dtype | None = None) -> None:
    """Swap the Linear/Embedding at each path for its quantized twin (empty, to be filled by load_state_dict)."""
    for path, params in layers.items():
        parent, name = _parent(module, path)
        old = getattr(parent, name)
        if isinstance(old, nn.Embedding):
            new: nn.Module = QuantizedEmbedding(old.num_embeddings, old.embedding_dim, params, dtype)
        elif isinstance(old, nn.Linear):
            new = QuantizedLinear(old.in_features, old.out_features, old.bias is not None, params, dtype)
        else:
            raise TypeError(f"{path} is a {type(old).__name__}; only Linear and Embedding layers are quantized")
        setattr(parent, name, new)


def quantize_tensors(
    tensors: Mapping[str, RawTensor], layers: Mapping[str, QuantParams], on_layer: Callable[[str], None] | None = None
) -> dict[str, RawTensor]:
    """The folder's tensors with each layer's `.weight` replaced by its quantized form (MLX's layout; NF4 beside it)."""
    from llmctl.quant.nf4 import double_quantize

    out = dict(tensors)
    for path, p in layers.items():
        weight = to_torch(out.pop(path + ".weight"))
        if p.mode == "nf4":
            wq, scales = kernels.quantize_nf4(weight, p.group_size)
            out[path + ".weight"], out[path + ".scales"] = from_torch(wq), from_torch(scales)
            if p.double_quant:
                codes, absmax, offset = double_quantize(scales.float().numpy())
                out[path + ".scales"] = RawTensor.from_numpy(codes)
                out[path + ".scales_absmax"], out[path + ".scales_offset"] = RawTensor.from_numpy(absmax), RawTensor.from_numpy(offset)
        else:
            wq, scales, biases = kernels.quantize(weight, p.group_size, p.bits)
            out[path + ".weight"], out[path + ".scales"], out[path + ".biases"] = map(from_torch, (wq, scales, biases))
        if on_layer is not None:
            on_layer(path)
    return out


def prepare_quantized(module: nn.Module, folder: ModelFolder, dtype: torch.dtype | None = None) -> set[str]:
    """For a quantized folder: swap in quantized layers and expand NF4 double-quantized scales.

    Returns the tensor names to load as stored (codes, scales, biases), not cast to the model's dtype `dtype`
    (None: as stored), which quantized embeddings still produce.
    """
    layers = quantized_layers(folder.quantization, folder.tensors)
    expand_double_quant(folder.tensors, layers)
    apply_quantized_layers(module, layers, dtype)
    return {path + suffix for path in layers for suffix in (".weight", *AUX_SUFFIXES)}
