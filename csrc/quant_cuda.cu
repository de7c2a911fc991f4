// CUDA quantize / dequantize and quantized matmul: the same math as the CPU (shared through quant.h), the same layout.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "qmatmul.h"
#include "quant.h"

namespace llmctl {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxGroup = 128;

void check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// One warp per group: lane l reads elements l, l + 32, ... (coalesced), the warp reduces min and
// max with shuffles, every lane derives the same scale and bias, the codes meet in shared memory,
// and lane k assembles word k of the group (a group is at most 128 * 8 / 32 = 32 words).
__global__ void quantize_kernel(const void* w, int dtype, int64_t n_groups, int group_size,
                                int bits, uint32_t* wq, void* scales, void* biases) {
  __shared__ uint8_t codes_smem[kWarpsPerBlock][kMaxGroup];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint8_t* codes = codes_smem[warp];
  const float n_bins = float((1 << bits) - 1);
  const int per_lane = group_size / 32;
  const int words_per_group = group_size * bits / 32;
  const int64_t warps_total = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = int64_t(blockIdx.x) * kWarpsPerBlock + warp; g < n_groups; g += warps_total) {
    float x[kMaxGroup / 32];
    float lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < per_lane; ++i) {
      x[i] = load_float(w, dtype, g * group_size + lane + 32 * i);
      lo = fminf(lo, x[i]);
      hi = fmaxf(hi, x[i]);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xFFFFFFFFu, lo, offset));
      hi = fmaxf(hi, __shfl_xor_sync(0xFFFFFFFFu, hi, offset));
    }
    float scale, bias;
    affine_params(lo, hi, n_bins, &scale, &bias);
    for (int i = 0; i < per_lane; ++i)
      codes[lane + 32 * i] = uint8_t(affine_code(x[i], scale, bias, n_bins));
    __syncwarp();
    if (lane < words_per_group) {
      // Word `lane` holds stream bits [32 * lane, 32 * lane + 32); a code may start before it.
      const int first_bit = 32 * lane;
      uint32_t word = 0;
      for (int j = first_bit / bits; j <= (first_bit + 31) / bits && j < group_size; ++j) {
        const int pos = j * bits - first_bit;
        const uint32_t c = codes[j];
        word |= pos >= 0 ? (c << pos) : (c >> -pos);
      }
      wq[g * words_per_group + lane] = word;
    }
    if (lane == 0) {
      store_float(scales, dtype, g, scale);
      store_float(biases, dtype, g, bias);
    }
    __syncwarp();  // the next group reuses this warp's codes
  }
}

// One thread per output element.
__global__ void dequantize_kernel(const uint32_t* wq, const void* scales, const void* biases,
                                  int dtype, int64_t n, int group_size, int bits, void* out,
                                  int out_dtype) {
  const int words_per_group = group_size * bits / 32;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t g = i / group_size;
    const uint32_t code = extract_code(wq + g * words_per_group, i - g * group_size, bits);
    const float y =
        affine_value(code, load_float(scales, dtype, g), load_float(biases, dtype, g), dtype);
    store_float(out, out_dtype, i, y);
  }
}

__constant__ float kNF4Device[16];

// One warp per (x row, output row): lanes walk the row's codes 32 apart (coalesced words), each
// value w = scale * code + bias (or scale * level) in float32, then a shuffle reduction.
__global__ void qmatmul_kernel(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq,
                               const void* scales, const void* biases, int w_dtype, int64_t out,
                               int group_size, int bits, int mode, void* y, int y_dtype) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warps_total = int64_t(gridDim.x) * kWarpsPerBlock;
  const int64_t groups = in / group_size, row_words = in * bits / 32;
  for (int64_t item = warp; item < batch * out; item += warps_total) {
    const int64_t r = item / out, o = item - r * out;
    const uint32_t* row = wq + o * row_words;
    float acc = 0.0f;
    for (int64_t i = lane; i < in; i += 32) {
      const int64_t g = o * groups + i / group_size;
      const uint32_t code = extract_code(row, i, bits);
      const float s = load_float(scales, w_dtype, g);
      const float w = mode == kModeNF4 ? kNF4Device[code] * s : float(code) * s + load_float(biases, w_dtype, g);
      acc += load_float(x, x_dtype, r * in + i) * w;
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, offset);
    if (lane == 0) store_float(y, y_dtype, r * out + o, acc);
  }
}

int blocks_for(int64_t items, int64_t per_block) {
  return int(std::min<int64_t>((items + per_block - 1) / per_block, 1 << 20));
}

}  // namespace

void quantize_cuda(const void* w, int dtype, int64_t rows, int64_t cols, int group_size, int bits,
                   uint32_t* wq, void* scales, void* biases, void* stream) {
  check_quant_args(dtype, rows, cols, group_size, bits);
  const int64_t n_groups = rows * cols / group_size;
  if (n_groups == 0) return;
  quantize_kernel<<<blocks_for(n_groups, kWarpsPerBlock), 32 * kWarpsPerBlock, 0,
                    static_cast<cudaStream_t>(stream)>>>(w, dtype, n_groups, group_size, bits, wq,
                                                         scales, biases);
  check_launch("quantize_cuda");
}

void dequantize_cuda(const uint32_t* wq, const void* scales, const void* biases, int dtype,
                     int64_t rows, int64_t cols, int group_size, int bits, void* out, int out_dtype,
                     void* stream) {
  check_quant_args(dtype, rows, cols, group_size, bits);
  if (out_dtype != kFloat32 && out_dtype != kFloat16 && out_dtype != kBFloat16)
    throw std::invalid_argument("output dtype code " + std::to_string(out_dtype) +
                                " is not 0 (float32), 1 (float16) or 2 (bfloat16)");
  const int64_t n = rows * cols;
  if (n == 0) return;
  constexpr int threads = 256;
  dequantize_kernel<<<blocks_for(n, threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      wq, scales, biases, dtype, n, group_size, bits, out, out_dtype);
  check_launch("dequantize_cuda");
}

void qmatmul_cuda(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq,
                  const void* scales, const void* biases, int w_dtype, int64_t out, int group_size,
                  int bits, int mode, void* y, int y_dtype, void* stream) {
  check_quant_args(w_dtype, out, in, group_size, bits);
  for (int dtype : {x_dtype, y_dtype})
    if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
      throw std::invalid_argument("x/y dtype code " + std::to_string(dtype) +
                                  " is not 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (mode != kModeAffine && mode != kModeNF4)
    throw std::invalid_argument("mode " + std::to_string(mode) + " is not 0 (affine) or 1 (nf4)");
  if (mode == kModeNF4 && bits != 4) throw std::invalid_argument("nf4 codes are 4 bits");
  if (batch * out == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaMemcpyToSymbolAsync(kNF4Device, kNF4, sizeof(kNF4), 0, cudaMemcpyHostToDevice, s);
  qmatmul_kernel<<<blocks_for(batch * out, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, s>>>(
      x, x_dtype, batch, in, wq, scales, biases, w_dtype, out, group_size, bits, mode, y, y_dtype);
  check_launch("qmatmul_cuda");
}

}  // namespace llmctl
