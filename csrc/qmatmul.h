// Quantized matrix products on MLX's packed layout (affine and NF4): plain C++ on raw pointers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "quant.h"

namespace llmctl {

// Instruction sets of the CPU kernels; kIsaAuto picks the best one this CPU runs.
enum Isa : int { kIsaAuto = 0, kIsaScalar = 1, kIsaAvx2 = 2, kIsaAvx512 = 3, kIsaNeon = 4 };

// How codes map to values: affine w = scale * code + bias (MLX); nf4 w = scale * kNF4[code]
// (QLoRA's NormalFloat-4: scale is the block's absmax, 4-bit codes only, no biases).
enum QuantMode : int { kModeAffine = 0, kModeNF4 = 1 };

// QLoRA's 16 NormalFloat-4 levels (bitsandbytes' NF4 code book), ascending.
extern const float kNF4[16];

// y (batch, out) = x (batch, in) @ W^T, W (out, in) given as wq (out, in * bits / 32) uint32 with
// scales and biases (out, in / group_size) of dtype w_dtype, in quantize's layout. x is float32,
// float16 or bfloat16 (x_dtype) and y is written in y_dtype. biases may be null for kModeNF4.
// The SIMD kernels quantize each group of x to int16 (error <= 2^-16 of the group's largest |x|)
// and use s * sum(x * q) + b * sum(x) per group; the scalar kernel works in float32.
// threads = 0 uses every hardware thread; isa = kIsaAuto picks the widest SIMD this CPU has.
// Bad arguments, or an isa this CPU lacks, throw std::invalid_argument.
void qmatmul(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq,
             const void* scales, const void* biases, int w_dtype, int64_t out, int group_size,
             int bits, int mode, void* y, int y_dtype, int threads, int isa);

// NF4 (de)quantization of a (rows, cols) matrix: codes packed as 4-bit affine codes are, scales
// (rows, cols / group_size) = each block's absmax in w's dtype; code = nearest level to w / absmax.
void quantize_nf4(const void* w, int dtype, int64_t rows, int64_t cols, int group_size, uint32_t* wq,
                  void* scales, int threads);
void dequantize_nf4(const uint32_t* wq, const void* scales, int dtype, int64_t rows, int64_t cols,
                    int group_size, void* out, int out_dtype, int threads);

// The tiled layout (decode-friendly, made in place from MLX's, see qtiled.cpp): affine 4-/8-bit codes of 16
// consecutive output rows interleaved 4 bytes at a time, so one vector of codes serves 16 rows. Tile t holds rows
// 16t .. 16t + 15 in the same bytes as MLX's layout does: steps of 64 bytes, step s of 8-bit codes holding codes
// 4s .. 4s + 3 of each row (row j at bytes 4j .. 4j + 3), of 4-bit codes 8s .. 8s + 7 (byte 4j + b: code 8s + b in
// the low nibble, 8s + 4 + b in the high one). Scales and biases: element (t * groups + g) * 16 + j is row 16t + j's.
constexpr int kTileRows = 16;
bool tiled_supported(int bits, int mode, int64_t out);
bool tiled_fast();  // whether this CPU has the tiled kernels (AVX-512 VNNI or AVX2); elsewhere they run a scalar loop
void to_tiled(uint32_t* wq, void* scales, void* biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
              int threads);
void from_tiled(uint32_t* wq, void* scales, void* biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
                int threads);
// Rows [row0, row1) (whole tiles) into dst (row1 - row0, in) of dst_dtype (float32 or bfloat16): code * scale + bias
// in float32, rounded to dst_dtype; isa picks the kernels (scalar, AVX2 or AVX-512).
void dequantize_tiled(const uint32_t* wq, const void* scales, const void* biases, int dtype, int64_t out, int64_t in,
                      int group_size, int bits, int64_t row0, int64_t row1, void* dst, int dst_dtype, int threads,
                      int isa);
// qmatmul for tiled weights, with the same int16 x and the same error bound (on AVX2, 4+ x rows: the prompt kernel,
// the same sums with each tile's codes widened once for every row). x_int8: on AVX2, 4-bit codes with
// several x rows multiply x rounded to int8 per group instead (twice the products a multiply; x's error 257x int16's:
// on SmolLM2's Q4_1 prompt it moved the logits by ~0.5, as llama.cpp's 8-bit activations do), so callers opt in.
void qmatmul_tiled(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq, const void* scales,
                   const void* biases, int w_dtype, int64_t out, int group_size, int bits, void* y, int y_dtype,
                   int threads, int isa, bool x_int8 = false);

int best_isa();
const char* isa_name(int isa);
// Whether this CPU runs the kernels of `isa` (kIsaAuto: always).
bool cpu_runs(int isa);
// The isa a kernel runs: kIsaAuto gives best_isa(); a code out of range, or an isa this CPU lacks, throws.
int resolve_isa(int isa);

#ifdef LLMCTL_CUDA
// qmatmul on device pointers (float32 accumulation, no int16 step), queued on `stream`.
void qmatmul_cuda(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq,
                  const void* scales, const void* biases, int w_dtype, int64_t out, int group_size,
                  int bits, int mode, void* y, int y_dtype, void* stream);
#endif

namespace detail {

// One call's arguments plus x prepared once for every output row.
struct QJob {
  int64_t batch = 0, in = 0, out = 0, groups = 0;  // groups = in / group_size
  int group_size = 0, bits = 0, mode = 0, w_dtype = 0, y_dtype = 0;
  const uint32_t* wq = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  void* y = nullptr;
  int64_t in_pad = 0;         // row stride of xq: in rounded up to 128
  std::vector<float> xf;      // (batch, in) x as float32
  std::vector<int16_t> xq;    // (batch, in_pad) x / sx per group, laid out as the kernel reads it
  std::vector<int8_t> xb;     // (batch, 2 * in_pad) the same values split in bytes, xq = 256 * high + low (byte kernels;
                              // NEON's dot-product kernel: a row's high bytes, then its low bytes, in x's order)
  std::vector<int32_t> xqsum; // (batch, groups + 1) sum of each group's int16 x (NEON's dot-product kernel)
  std::vector<float> sx;      // (batch, groups + 1) int16 step of each group of x (0 padded)
  std::vector<float> xsum;    // (batch, groups + 1) float32 sum of each group of x
};

// Largest |x / sx|: 127 * 256 + 127, so that each int16 x splits into two signed bytes (xb).
constexpr float kXMax = 32639.0f;

// x * inv (inv = 1 / sx of its group) as the kernels' int16 value, rounded to nearest even
inline int32_t x_int16(float x, float inv) { return int32_t(round_even(std::min(kXMax, std::max(-kXMax, x * inv)))); }
// q = 256 * high_byte(q) + low_byte(q), both signed, for |q| <= kXMax
inline int8_t low_byte(int32_t q) { return int8_t(uint8_t(uint32_t(q) & 0xFFu)); }
inline int8_t high_byte(int32_t q) { return int8_t((q - low_byte(q)) >> 8); }

// Per group of x (rows, in): its float32 sum into xsum and its int16 step (largest |x| / kXMax) into sx, row r's
// at r * stride. Returns false when x holds inf or NaN.
bool group_steps(const float* x, int64_t rows, int64_t in, int group_size, float* xsum, float* sx, int64_t stride);

// Threads for `work` (about bytes to read): one per 64 KiB, at most `threads` (0: every hardware thread), at least 1.
int threads_for(int threads, double work);

inline void store_y(const QJob& job, int64_t r, int64_t o, float v) {
  if (job.y_dtype == kFloat32) {
    static_cast<float*>(job.y)[r * job.out + o] = v;
  } else {
    store_float(job.y, job.y_dtype, r * job.out + o, v);
  }
}
// fn(task) for task in [0, tasks) on the calling thread and up to threads - 1 workers of the
// persistent pool that qmatmul uses; returns when all are done.
void parallel_for(int tasks, int threads, const std::function<void(int)>& fn);
int hardware_threads();

void qmatmul_rows_avx2(const QJob& job, int64_t o0, int64_t o1);
void qmatmul_rows_avx512(const QJob& job, int64_t o0, int64_t o1);
void qmatmul_rows_neon(const QJob& job, int64_t o0, int64_t o1);
// NEON with the dot-product instructions (sdot), affine 4-/8-bit codes: x as xb and xqsum (split_x_bytes).
void qmatmul_rows_neon_dot(const QJob& job, int64_t o0, int64_t o1);
// Whether this CPU has the dot-product instructions (arm64: HWCAP_ASIMDDP; elsewhere false).
bool neon_dotprod();
// job.xq (natural order, rows of in_pad) into job.xb as [high bytes | low bytes] per row, and job.xqsum.
void split_x_bytes(QJob& job);
// AVX2, affine codes of any width in groups of 16 or more, x in natural order (qmatmul_k.cpp)
void qmatmul_rows_k_avx2(const QJob& job, int64_t o0, int64_t o1);

// NF4 levels times 2^13, rounded: what the SIMD kernels multiply int16 x by (8 such products of
// |x| <= 32767 still fit an int32 lane).
constexpr float kNF4Int16Scale = 8192.0f;
extern const int16_t kNF4Int16[16];

}  // namespace detail
}  // namespace llmctl
