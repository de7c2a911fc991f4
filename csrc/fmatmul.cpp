// Dense float products of few x rows (fmatmul.h): AVX2/FMA/F16C kernels picked at run time, a portable loop elsewhere.
#include "fmatmul.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode.h"
#include "qmatmul.h"
#include "quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCTL_X86 1
#define LLMCTL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace llmctl {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

int64_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// y[b * out + r] = dot(W[r], x[b]) for r in [r0, r1), b < batch: 8 partial sums per row, so the loop vectorizes.
void rows_scalar(const void* w, int dtype, int64_t in, int64_t out, const float* x, int64_t batch, float* y, int64_t r0,
                 int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * in;
      float acc[8] = {};
      int64_t i = 0;
      for (; i + 8 <= in; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += load_float(w, dtype, r * in + i + j) * xb[i + j];
      for (; i < in; ++i) acc[0] += load_float(w, dtype, r * in + i) * xb[i];
      float sum = 0.0f;
      for (float a : acc) sum += a;
      y[b * out + r] = sum;
    }
  }
}

}  // namespace

#ifdef LLMCTL_X86
namespace {

// Bytes ahead of the current position that each weight row asks the cache for: the hardware prefetchers follow a
// few streams per core; a block reads NR streams at once.
constexpr int64_t kPrefetchBytes = 1024;

LLMCTL_AVX2 inline float reduce8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// W[i : i + 8] as float32: float16 by F16C, bfloat16 as the high halves of float32 lanes (exact)
template <int DTYPE>
LLMCTL_AVX2 inline __m256 load8(const void* w, int64_t i) {
  if constexpr (DTYPE == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    if constexpr (DTYPE == kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// NR weight rows from r against NB x rows: every x vector is loaded once for the NR rows, every weight vector once
// for the NB x rows. Each pass reads one 64-byte line of each row and prefetches one further on. One row against one
// x row keeps one accumulator per vector of the line, so the sums are not bound by the FMA's latency.
template <int DTYPE, int NR, int NB>
LLMCTL_AVX2 void block_avx2(const void* w, int64_t in, int64_t out, const float* x, float* y, int64_t r) {
  constexpr int64_t kSize = DTYPE == kFloat32 ? 4 : 2, kLine = 64 / kSize;  // values per line
  constexpr int kChains = NR * NB == 1 ? int(kLine / 8) : 1;
  const char* base = static_cast<const char*>(w);
  __m256 acc[NR][NB][kChains];
  for (int j = 0; j < NR; ++j)
    for (int b = 0; b < NB; ++b)
      for (int c = 0; c < kChains; ++c) acc[j][b][c] = _mm256_setzero_ps();
  const int64_t lines = in / kLine * kLine, body = in / 8 * 8;
  int64_t i = 0;
  for (; i < lines; i += kLine) {
    for (int j = 0; j < NR; ++j) _mm_prefetch(base + ((r + j) * in + i) * kSize + kPrefetchBytes, _MM_HINT_T0);
    for (int64_t v = 0; v < kLine; v += 8) {
      const int c = int(v / 8) % kChains;
      __m256 xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x + b * in + i + v);
      for (int j = 0; j < NR; ++j) {
        const __m256 wv = load8<DTYPE>(w, (r + j) * in + i + v);
        for (int b = 0; b < NB; ++b) acc[j][b][c] = _mm256_fmadd_ps(wv, xv[b], acc[j][b][c]);
      }
    }
  }
  for (; i < body; i += 8) {
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = load8<DTYPE>(w, (r + j) * in + i);
      for (int b = 0; b < NB; ++b) acc[j][b][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * in + i), acc[j][b][0]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    for (int b = 0; b < NB; ++b) {
      for (int c = 1; c < kChains; ++c) acc[j][b][0] = _mm256_add_ps(acc[j][b][0], acc[j][b][c]);
      float sum = reduce8(acc[j][b][0]);
      for (int64_t k = body; k < in; ++k) sum += load_float(w, DTYPE, (r + j) * in + k) * x[b * in + k];
      y[b * out + r + j] = sum;
    }
  }
}

// Rows [r0, r1) against one x row as S streams read side by side: row r of each of S equal parts of the range per
// pass. One sequential stream per core leaves the memory system idle between the prefetchers' requests; S streams far
// apart keep S times the lines in flight (one core on an AVX2 EPYC: 2 streams read 1.4x a plain one-stream sum over
// the same bytes, and 4 streams of bfloat16 rows multiplied 1.55-1.65x one stream; neighbouring rows, one stream to
// the prefetchers, gain nothing). Two accumulators per stream alternate by vector.
template <int DTYPE, int S>
LLMCTL_AVX2 void streams_avx2(const void* w, int64_t in, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int64_t kSize = DTYPE == kFloat32 ? 4 : 2, kLine = 64 / kSize;
  const char* base = static_cast<const char*>(w);
  const int64_t part = (r1 - r0) / S, lines = in / kLine * kLine, body = in / 8 * 8;
  for (int64_t r = r0; r < r0 + part; ++r) {
    __m256 acc[S][2];
    for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i < lines; i += kLine) {
      for (int s = 0; s < S; ++s) {
        const int64_t row = r + s * part;
        // 16-bit rows are twice the work per byte: prefetching keeps their lines coming (float32 ones gain nothing)
        if constexpr (DTYPE != kFloat32) _mm_prefetch(base + (row * in + i) * kSize + kPrefetchBytes, _MM_HINT_T0);
        for (int64_t v = 0; v < kLine; v += 8)
          acc[s][v / 8 % 2] = _mm256_fmadd_ps(load8<DTYPE>(w, row * in + i + v), _mm256_loadu_ps(x + i + v), acc[s][v / 8 % 2]);
      }
    }
    for (; i < body; i += 8)
      for (int s = 0; s < S; ++s)
        acc[s][0] = _mm256_fmadd_ps(load8<DTYPE>(w, (r + s * part) * in + i), _mm256_loadu_ps(x + i), acc[s][0]);
    for (int s = 0; s < S; ++s) {
      const int64_t row = r + s * part;
      float sum = reduce8(_mm256_add_ps(acc[s][0], acc[s][1]));
      for (int64_t k = body; k < in; ++k) sum += load_float(w, DTYPE, row * in + k) * x[k];
      y[row] = sum;
    }
  }
  // the rows left over as one stream: every row sums in the same order, however the range was split
  if constexpr (S > 1) streams_avx2<DTYPE, 1>(w, in, x, y, r0 + S * part, r1);
}

// Rows [r0, r1) against NB x rows: blocks of NR rows, the last few one at a time.
template <int DTYPE, int NR, int NB>
LLMCTL_AVX2 void rows_avx2(const void* w, int64_t in, int64_t out, const float* x, float* y, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + NR <= r1; r += NR) block_avx2<DTYPE, NR, NB>(w, in, out, x, y, r);
  for (; r < r1; ++r) block_avx2<DTYPE, 1, NB>(w, in, out, x, y, r);
}

// Rows [r0, r1) against every x row, up to 4 at a time (NB x rows * NR weight rows accumulators: at most 8 of 16
// registers). One x row (decoding) reads four far-apart streams of rows (streams_avx2; blocks of 2 and 4 neighbouring
// rows measured 20-60% slower than one row at a time on an AVX2 EPYC).
template <int DTYPE>
LLMCTL_AVX2 void rows_for(const void* w, int64_t in, int64_t out, const float* x, int64_t batch, float* y, int64_t r0,
                          int64_t r1) {
  for (int64_t b = 0; b < batch; b += 4) {
    const float* xb = x + b * in;
    float* yb = y + b * out;
    switch (std::min<int64_t>(4, batch - b)) {
      case 1: streams_avx2<DTYPE, 4>(w, in, xb, yb, r0, r1); break;
      case 2: rows_avx2<DTYPE, 4, 2>(w, in, out, xb, yb, r0, r1); break;
      case 3: rows_avx2<DTYPE, 2, 3>(w, in, out, xb, yb, r0, r1); break;
      default: rows_avx2<DTYPE, 2, 4>(w, in, out, xb, yb, r0, r1); break;
    }
  }
}

}  // namespace

void fmatmul_rows_avx2(const void* w, int w_dtype, int64_t in, int64_t out, const float* x, int64_t batch, float* y,
                       int64_t r0, int64_t r1) {
  // spans of ~128 KiB of weights, so that the x blocks after the first read them from L2, not memory
  const int64_t span = batch <= 4 ? r1 - r0 : std::max<int64_t>(4, (int64_t(1) << 17) / (in * dtype_size(w_dtype)) / 4 * 4);
  for (int64_t r = r0; r < r1; r += span) {
    const int64_t end = std::min(r1, r + span);
    if (w_dtype == kFloat32) rows_for<kFloat32>(w, in, out, x, batch, y, r, end);
    else if (w_dtype == kFloat16) rows_for<kFloat16>(w, in, out, x, batch, y, r, end);
    else rows_for<kBFloat16>(w, in, out, x, batch, y, r, end);
  }
}
#else
void fmatmul_rows_avx2(const void*, int, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t) {
  fail("the AVX2 kernels are built only for x86-64");
}
#endif  // LLMCTL_X86

void fmatmul(const void* x, int x_dtype, int64_t batch, int64_t in, const void* w, int w_dtype, int64_t out,
             const void* bias, int bias_dtype, void* y, int y_dtype, int threads, int isa) {
  for (int dtype : {x_dtype, w_dtype, y_dtype}) check_dtype(dtype, "fmatmul");
  if (bias != nullptr) check_dtype(bias_dtype, "bias");
  if (batch < 0 || in < 0 || out < 0) fail("fmatmul: a size is negative");
  isa = resolve_isa(isa);
  if (isa == kIsaNeon) isa = kIsaScalar;  // no NEON float kernels yet: the portable loop
  if (batch == 0 || out == 0) return;
  // x and y as float32 (the kernels' own), converted here when stored otherwise: batch * (in + out) values, small
  static thread_local std::vector<float> xs, ys;
  const float* xf = static_cast<const float*>(x);
  if (x_dtype != kFloat32) {
    xs.resize(size_t(batch * in));
    for (int64_t i = 0; i < batch * in; ++i) xs[size_t(i)] = load_float(x, x_dtype, i);
    xf = xs.data();
  }
  float* yf = static_cast<float*>(y);
  if (y_dtype != kFloat32) {
    ys.resize(size_t(batch * out));
    yf = ys.data();
  }
  if (isa == kIsaAvx512 && batch == 1) {
    Matrix m;
    m.out = out, m.in = in, m.w = w, m.w_dtype = w_dtype;
    matvec(m, xf, yf, threads, isa);
  } else {
    // Threads only where each reads at least ~64 KiB of weights; four tasks of whole 4-row blocks per thread, so a
    // thread that starts late (a busy machine) is made up for by the others.
    const int n = detail::threads_for(threads, double(out * in * dtype_size(w_dtype)));
    const int64_t blocks = (out + 3) / 4;
    const int tasks = int(std::min<int64_t>(blocks, n == 1 ? 1 : 4 * n));
    detail::parallel_for(tasks, n, [&](int t) {
      const int64_t r0 = std::min(out, blocks * t / tasks * 4), r1 = std::min(out, blocks * (t + 1) / tasks * 4);
      if (isa == kIsaScalar) return rows_scalar(w, w_dtype, in, out, xf, batch, yf, r0, r1);
      fmatmul_rows_avx2(w, w_dtype, in, out, xf, batch, yf, r0, r1);
    });
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < out; ++r) {
      float v = yf[b * out + r];
      if (bias != nullptr) v += load_float(bias, bias_dtype, r);
      if (y_dtype == kFloat32) {
        yf[b * out + r] = v;
      } else {
        store_float(y, y_dtype, b * out + r, v);
      }
    }
  }
}

}  // namespace llmctl
