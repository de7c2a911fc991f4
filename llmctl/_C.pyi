"""Type stub of llmctl._C (csrc/bindings.cpp): buffers are (address, byte count) pairs, each count checked against
what the kernel touches (a ValueError when short); dtype codes are FLOAT32/FLOAT16/BFLOAT16. Call it through
llmctl.kernels, which checks shapes and dtypes first."""

from __future__ import annotations

Buffer = tuple[int, int]  # (address, byte count); (0, 0) for none

FLOAT32: int  # 0
FLOAT16: int  # 1
BFLOAT16: int  # 2
AFFINE: int  # 0: w = scale * code + bias
NF4: int  # 1: w = scale * nf4_levels()[code]
ISA_AUTO: int  # 0
ISA_SCALAR: int  # 1
ISA_AVX2: int  # 2
ISA_AVX512: int  # 3
ISA_NEON: int  # 4

def quantize(
    w: Buffer, dtype: int, rows: int, cols: int, group_size: int, bits: int, wq: Buffer, scales: Buffer,
    biases: Buffer, threads: int = 0,
) -> None:
    """Quantize (rows, cols) w into wq (rows, cols*bits/32) uint32 and scales, biases (rows, cols/group_size)."""

def dequantize(
    wq: Buffer, scales: Buffer, biases: Buffer, dtype: int, rows: int, cols: int, group_size: int, bits: int,
    out: Buffer, out_dtype: int, threads: int = 0,
) -> None:
    """Dequantize into out (rows, cols) of out_dtype; dtype is the scales' and biases' dtype code."""

def pack(codes: Buffer, rows: int, cols: int, bits: int, words: Buffer, threads: int = 0) -> None:
    """Pack uint8 codes (rows, cols) into uint32 words (rows, words_per_row(cols, bits))."""

def unpack(words: Buffer, rows: int, cols: int, bits: int, codes: Buffer, threads: int = 0) -> None:
    """Unpack the first cols codes of each row of uint32 words into uint8 codes (rows, cols)."""

def fmatmul(
    x: Buffer, x_dtype: int, batch: int, in_features: int, w: Buffer, w_dtype: int, out_features: int, bias: Buffer,
    bias_dtype: int, y: Buffer, y_dtype: int, threads: int = 0, isa: int = 0,
) -> None:
    """y (batch, out_features) = x @ W^T (+ bias; (0, 0): none) for dense float W: decoding's few-row products."""

def qmatmul(
    x: Buffer, x_dtype: int, batch: int, in_features: int, wq: Buffer, scales: Buffer, biases: Buffer, w_dtype: int,
    out_features: int, group_size: int, bits: int, mode: int, y: Buffer, y_dtype: int, threads: int = 0,
    isa: int = 0,
) -> None:
    """y (batch, out_features) = x (batch, in_features) @ W^T for W packed by quantize (AFFINE) or quantize_nf4 (NF4,
    biases (0, 0)); isa: an ISA_* code (ISA_AUTO: the best this CPU runs; one it lacks is a ValueError)."""

def quantize_nf4(
    w: Buffer, dtype: int, rows: int, cols: int, group_size: int, wq: Buffer, scales: Buffer, threads: int = 0
) -> None:
    """NF4-quantize (rows, cols) w: 4-bit codes into wq (rows, cols/8), block absmax into scales."""

def dequantize_nf4(
    wq: Buffer, scales: Buffer, dtype: int, rows: int, cols: int, group_size: int, out: Buffer, out_dtype: int,
    threads: int = 0,
) -> None:
    """Inverse of quantize_nf4 into out (rows, cols) of out_dtype."""

def tiled_supported(bits: int, mode: int, out_features: int) -> bool:
    """Whether weights of this format can take the tiled layout (affine 4-/8-bit, rows a multiple of 16)."""

def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX): then bfloat16 products run ~2x float32's."""

def tiled_fast() -> bool:
    """Whether this CPU has the tiled kernels (AVX-512 VNNI or AVX2); elsewhere they run a scalar loop."""

def to_tiled(
    wq: Buffer, scales: Buffer, biases: Buffer, dtype: int, out_features: int, in_features: int, group_size: int,
    bits: int, threads: int = 0,
) -> None:
    """MLX's layout to the tiled one (csrc/qmatmul.h: 16 output rows interleaved 4 bytes at a time), in place."""

def from_tiled(
    wq: Buffer, scales: Buffer, biases: Buffer, dtype: int, out_features: int, in_features: int, group_size: int,
    bits: int, threads: int = 0,
) -> None:
    """The tiled layout back to MLX's, in place."""

def dequantize_tiled(
    wq: Buffer, scales: Buffer, biases: Buffer, dtype: int, out_features: int, in_features: int, group_size: int,
    bits: int, row0: int, row1: int, dst: Buffer, dst_dtype: int = 0, threads: int = 0, isa: int = 0,
) -> None:
    """Rows [row0, row1) (whole tiles of 16) of tiled weights (row1 - row0, in_features) at dst, FLOAT32 or BFLOAT16."""

def qmatmul_tiled(
    x: Buffer, x_dtype: int, batch: int, in_features: int, wq: Buffer, scales: Buffer, biases: Buffer, w_dtype: int,
    out_features: int, group_size: int, bits: int, y: Buffer, y_dtype: int, threads: int = 0, isa: int = 0,
    x_int8: bool = False,
) -> None:
    """qmatmul for weights in the tiled layout (affine 4-/8-bit), with the same int16 x and error bound; x_int8: the
    AVX2 int8 prompt kernel for 4-bit codes (x rounded to int8 per group)."""

def cpu_isa() -> str:
    """The instruction set qmatmul uses by default here: avx512, avx2, neon or scalar."""

def isa_available(isa: int) -> bool:
    """Whether this CPU runs the kernels of an ISA_* code (ISA_AUTO: always)."""

def nf4_levels() -> list[float]:
    """The 16 NF4 levels (bitsandbytes' code book)."""

def words_per_row(cols: int, bits: int) -> int:
    """ceil(cols * bits / 32)."""

def has_cuda() -> bool:
    """True when built with -DLLMCTL_CUDA=ON."""

def quantize_cuda(
    w: Buffer, dtype: int, rows: int, cols: int, group_size: int, bits: int, wq: Buffer, scales: Buffer,
    biases: Buffer, stream: int = 0,
) -> None:
    """quantize on device buffers, queued on a cudaStream_t; RuntimeError when built without CUDA."""

def dequantize_cuda(
    wq: Buffer, scales: Buffer, biases: Buffer, dtype: int, rows: int, cols: int, group_size: int, bits: int,
    out: Buffer, out_dtype: int, stream: int = 0,
) -> None:
    """dequantize on device buffers, queued on a cudaStream_t; RuntimeError when built without CUDA."""

def qmatmul_cuda(
    x: Buffer, x_dtype: int, batch: int, in_features: int, wq: Buffer, scales: Buffer, biases: Buffer, w_dtype: int,
    out_features: int, group_size: int, bits: int, mode: int, y: Buffer, y_dtype: int, stream: int = 0,
) -> None:
    """qmatmul on device buffers, queued on a cudaStream_t; RuntimeError when built without CUDA."""

Matrix = tuple[int, int, Buffer, int, Buffer, Buffer, Buffer, int, int, int, int, Buffer, int, bool]

class NativeDecoder:
    """One decoding step of a Llama-family model (batch 1) in C++. A matrix is a tuple (out, in, w, w_dtype, wq,
    scales, biases, q_dtype, group_size, bits, mode, bias, bias_dtype, tiled) of sizes, codes and buffers the caller
    keeps alive: dense when wq is (0, 0), quantized otherwise (MLX's layout, or the tiled one); bias (0, 0) when
    there is none. Every buffer's byte count is checked against the shape it is given."""

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int, vocab: int, window: int,
        norm_eps: float, norm_dtype: int, embedding: Matrix, final_norm: Buffer, head: Matrix,
    ) -> None: ...
    def add_layer(
        self, attn_norm: Buffer, qkv: list[Matrix], o: list[Matrix], mlp_norm: Buffer, gate_up: list[Matrix],
        down: list[Matrix],
    ) -> None: ...
    def step(
        self, token: int, pos: int, keys: list[Buffer], values: list[Buffer], capacity: int, cos: Buffer, sin: Buffer,
        logits: Buffer, threads: int = 0, isa: int = 0,
    ) -> None:
        """Decode `token` at `pos`: its keys and values into each layer's float32 cache (n_kv_heads, capacity,
        head_dim), the float32 logits (vocab); cos and sin are position pos's RoPE rows; isa reaches every kernel."""
