// Dense float products of few x rows (decoding): W (out, in) float32, float16 or bfloat16 as stored, times float32 x.
//
// Decoding reads every weight once per token and multiplies it once: bound by memory, not arithmetic. The AVX2
// kernels read four far-apart streams of weight rows per thread against one x row (one stream alone leaves the memory
// system idle between the prefetchers' requests), blocks of rows against 2-4 x rows (every vector loaded once for the block), float16 widened by F16C, bfloat16 by a 16-bit shift
// (exact: a bfloat16 is the high half of a float32), and multiply in float32 with FMA.
// Error bound (every path, any summation order): |y - W x| <= in * 2^-24 * sum_i |W_i x_i| (float32 rounding of
// in - 1 additions and in products; the weights themselves convert exactly).
#pragma once

#include <cstdint>

namespace llmctl {

// Rows [r0, r1) of y (batch, out) = x (batch, in) @ W^T, x and y float32 and contiguous, on the AVX2/FMA/F16C
// kernels (any CPU that has them, AVX-512 ones included); batch any size (x rows go through in blocks of up to 4).
void fmatmul_rows_avx2(const void* w, int w_dtype, int64_t in, int64_t out, const float* x, int64_t batch, float* y,
                       int64_t r0, int64_t r1);

// y (batch, out) = x (batch, in) @ W^T (+ bias (out,) when not null), x, W, y and bias each float32, float16 or
// bfloat16 (their dtype codes); threads split the output rows (0: every hardware thread; one for small products).
// isa: kIsaAuto, scalar, avx2 or avx512 (AVX-512 CPUs take the AVX-512 decode kernel for one x row, AVX2 for more).
// Bad arguments, or an isa this CPU lacks, throw std::invalid_argument.
void fmatmul(const void* x, int x_dtype, int64_t batch, int64_t in, const void* w, int w_dtype, int64_t out,
             const void* bias, int bias_dtype, void* y, int y_dtype, int threads, int isa);

}  // namespace llmctl
