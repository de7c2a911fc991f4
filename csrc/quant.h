// Group-wise affine quantization in MLX's layout: plain C++ on raw pointers, shared with the CUDA file.
#pragma once

#include <cstdint>
#include <cstring>

// The scalar math below is compiled for the host and, inside quant_cuda.cu, for the device too,
// so the CPU and CUDA kernels cannot drift apart.
#ifdef __CUDACC__
#define LLMCTL_HD __host__ __device__ __forceinline__
#else
#define LLMCTL_HD inline
#endif

namespace llmctl {

// Element type codes shared with llmctl/kernels.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Layout (identical to mx.quantize(w, group_size, bits), mode "affine"):
//   w       (rows, cols) float32 | float16 | bfloat16, row-major, cols % group_size == 0
//   wq      (rows, cols * bits / 32) uint32: each row's codes as one little-endian bit stream,
//           code j at bits [j * bits, (j + 1) * bits), so 3-, 5- and 6-bit codes straddle words
//   scales  (rows, cols / group_size) in w's dtype
//   biases  (rows, cols / group_size) in w's dtype
//   w ~= scale * code + bias
// Quantize accepts bits in {2, 3, 4, 5, 6, 8} and group_size in {32, 64, 128}, like MLX.
// threads = 0 uses every hardware thread. Bad arguments throw std::invalid_argument.
void quantize(const void* w, int dtype, int64_t rows, int64_t cols, int group_size, int bits,
              uint32_t* wq, void* scales, void* biases, int threads);

// Inverse of quantize, as mx.dequantize computes it: code * scale, rounded to the scales' dtype,
// plus bias, rounded again, then cast to out_dtype.
void dequantize(const uint32_t* wq, const void* scales, const void* biases, int dtype, int64_t rows,
                int64_t cols, int group_size, int bits, void* out, int out_dtype, int threads);

// Plain bit packing of integer codes (any bits in 1..8) into the same bit stream; a row of cols
// codes takes ceil(cols * bits / 32) words, the unused high bits of the last word are zero.
// pack throws std::invalid_argument when a code does not fit in bits.
void pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, uint32_t* words, int threads);
void unpack(const uint32_t* words, int64_t rows, int64_t cols, int bits, uint8_t* codes, int threads);

int64_t words_per_row(int64_t cols, int bits);
bool has_cuda();

#ifdef LLMCTL_CUDA
// Same contracts on device pointers, launched asynchronously on `stream` (a cudaStream_t).
void quantize_cuda(const void* w, int dtype, int64_t rows, int64_t cols, int group_size, int bits,
                   uint32_t* wq, void* scales, void* biases, void* stream);
void dequantize_cuda(const uint32_t* wq, const void* scales, const void* biases, int dtype,
                     int64_t rows, int64_t cols, int group_size, int bits, void* out, int out_dtype,
                     void* stream);
#endif

// Checks shared by the CPU and CUDA entry points.
void check_quant_args(int dtype, int64_t rows, int64_t cols, int group_size, int bits);
// That dtype is a DType code (float32, float16 or bfloat16); `what` names the argument in the message.
void check_dtype(int dtype, const char* what);

LLMCTL_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

LLMCTL_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// IEEE half <-> float (after Maratyszcza's FP16 library, which MLX's CPU float16 also follows).
// Exact in this direction; branch-free so loops over it vectorize.
LLMCTL_HD float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: move the exponent into place, then rescale by 2^-112 to fix its bias.
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: put the mantissa under a magic exponent and subtract the magic's value.
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
  return bits_float(sign | magnitude);
}

// Round to nearest even, done by the float addition itself; overflow gives inf, NaN gives 0x7E00.
LLMCTL_HD uint16_t float_to_half(float f) {
  float base = (bits_float(float_bits(f) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

LLMCTL_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Round to nearest even on the upper 16 bits; NaN stays a quiet NaN (0x7FC0), as in MLX.
LLMCTL_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t(0x7FC0u | ((u >> 16) & 0x8000u));
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

LLMCTL_HD float load_float(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kFloat16 ? half_to_float(h) : bf16_to_float(h);
}

LLMCTL_HD void store_float(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = dtype == kFloat16 ? float_to_half(v) : float_to_bf16(v);
  }
}

// Value of v once stored in dtype (float32 math rounded to the element type).
LLMCTL_HD float round_to(float v, int dtype) {
  if (dtype == kFloat16) return half_to_float(float_to_half(v));
  if (dtype == kBFloat16) return bf16_to_float(float_to_bf16(v));
  return v;
}

// std::rint under the default rounding mode, without a libm call so loops vectorize:
// adding 2^23 leaves no fraction bits; floats at or above 2^23 are integers already.
LLMCTL_HD float round_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  const float a = bits_float(float_bits(x) & 0x7FFFFFFFu);
  if (!(a < 0x1.0p23f)) return x;
  const float r = (a + 0x1.0p23f) - 0x1.0p23f;
  return bits_float(float_bits(r) | (float_bits(x) & 0x80000000u));
#endif
}

// MLX's per-group parameters, in float32 (mlx/backend/cpu/quantized.cpp, `quantize`):
// the step is (max - min) / (2^bits - 1), at least 1e-7; the end of larger magnitude is the
// "edge" and gets an exact code (0 for the min, 2^bits - 1 for the max, the step then being
// negative), with the step nudged so the edge is q0 whole steps from zero.
LLMCTL_HD void affine_params(float w_min, float w_max, float n_bins, float* scale, float* bias) {
  const bool use_min = (w_min < 0 ? -w_min : w_min) > (w_max < 0 ? -w_max : w_max);
  float s = (w_max - w_min) / n_bins;
  s = s < 1e-7f ? 1e-7f : s;
  s = use_min ? s : -s;
  const float edge = use_min ? w_min : w_max;
  const float q0 = round_even(edge / s);
  *scale = s;
  *bias = 0.0f;
  if (q0 != 0.0f) {
    *scale = edge / q0;
    *bias = edge;
  }
}

// Code of one element: round((w - bias) / scale) clamped to [0, n_bins]. Clamping before
// rounding gives MLX's round-then-clamp result since the bounds are integers.
LLMCTL_HD uint32_t affine_code(float w, float scale, float bias, float n_bins) {
  float q = (w - bias) / scale;
  q = q < 0.0f ? 0.0f : q;
  q = q > n_bins ? n_bins : q;
  // q is in [0, 255]: adding 2^23 rounds it to a whole number, ties to even, with no branch.
  return uint32_t(int32_t((q + 0x1.0p23f) - 0x1.0p23f));
}

// One dequantized element as MLX's CPU ops compute it: the product and the sum are separate
// operations in the scales' dtype, each rounded (so never an FMA: built with -ffp-contract=off).
LLMCTL_HD float affine_value(uint32_t code, float scale, float bias, int dtype) {
  const float product = round_to(float(code) * scale, dtype);
  return round_to(product + bias, dtype);
}

// Code j of a row's bit stream.
LLMCTL_HD uint32_t extract_code(const uint32_t* row_words, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t word = bit >> 5;
  const int shift = int(bit & 31);
  uint64_t v = row_words[word] >> shift;
  if (shift + bits > 32) v |= uint64_t(row_words[word + 1]) << (32 - shift);
  return uint32_t(v) & ((1u << bits) - 1u);
}

#ifndef __CUDACC__
// The 32 codes held by BITS words of a stream; unrolled so every shift is a constant.
template <int BITS, typename T>
inline void unpack32(const uint32_t* words, T* codes) {
#pragma GCC unroll 32
  for (int k = 0; k < 32; ++k) codes[k] = T(extract_code(words, k, BITS));
}
#endif

}  // namespace llmctl
