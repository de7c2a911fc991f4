// The decode step (decode.h) and its dense matrix-vector kernels: float32, float16 and bfloat16
// weights against float32 x, AVX-512 paths here and AVX2/FMA ones in fmatmul.cpp picked at run time, a portable loop
// elsewhere.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fmatmul.h"
#include "qmatmul.h"
#include "quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCTL_X86 1
#define LLMCTL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LLMCTL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace llmctl {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

int64_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// ---- dense rows: y[r] = dot(W[r], x) for r in [r0, r1), one row at a time (four rows interleaved, sharing x
// loads, streamed 35-55% slower here: more streams than the prefetchers follow well). bfloat16 rows are read
// 32 values per 512-bit load: the low half of each 32-bit lane (an even value) shifted up and the high
// half masked are both float32 already, so x comes de-interleaved per 32 (16 even values, then 16 odd ones).

float row_dot_scalar(const void* W, int dtype, int64_t at, int64_t n, const float* x) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += load_float(W, dtype, at + i + j) * x[i + j];
  for (; i < n; ++i) acc[0] += load_float(W, dtype, at + i) * x[i];
  float sum = 0.0f;
  for (float a : acc) sum += a;
  return sum;
}

void rows_scalar(const void* W, int dtype, int64_t in, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) y[r] = row_dot_scalar(W, dtype, r * in, in, x);
}

#ifdef LLMCTL_X86

LLMCTL_AVX512 inline __m512 load16_avx512(const void* W, int dtype, int64_t i) {
  if (dtype == kFloat32) return _mm512_loadu_ps(static_cast<const float*>(W) + i);
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(W) + i)));
}

// acc += W[r, i : i + step] * x[i : i + step], step 32 for bfloat16 (x de-interleaved in xp), else 16
template <int DTYPE>
LLMCTL_AVX512 inline void dot_avx512(const void* W, int64_t at, const float* x, const float* xp, int64_t i, __m512& acc) {
  if constexpr (DTYPE == kBFloat16) {
    const __m512i v = _mm512_loadu_si512(static_cast<const uint16_t*>(W) + at);
    const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xp + i), acc);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), _mm512_loadu_ps(xp + i + 16), acc);
  } else {
    acc = _mm512_fmadd_ps(load16_avx512(W, DTYPE, at), _mm512_loadu_ps(x + i), acc);
  }
}

// dot(W[at : at + n], x) with four accumulators along the row (xp: x de-interleaved, for bfloat16).
template <int DTYPE>
LLMCTL_AVX512 float row_dot_avx512(const void* W, int64_t at, int64_t n, const float* x, const float* xp) {
  constexpr int64_t kStep = DTYPE == kBFloat16 ? 32 : 16;
  const int64_t body = n / kStep * kStep, body4 = n / (4 * kStep) * (4 * kStep);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i < body4; i += 4 * kStep) {
    dot_avx512<DTYPE>(W, at + i, x, xp, i, a0);
    dot_avx512<DTYPE>(W, at + i + kStep, x, xp, i + kStep, a1);
    dot_avx512<DTYPE>(W, at + i + 2 * kStep, x, xp, i + 2 * kStep, a2);
    dot_avx512<DTYPE>(W, at + i + 3 * kStep, x, xp, i + 3 * kStep, a3);
  }
  for (; i < body; i += kStep) dot_avx512<DTYPE>(W, at + i, x, xp, i, a0);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) sum += load_float(W, DTYPE, at + i) * x[i];
  return sum;
}

// One row at a time: each thread reads one sequential stream (the hardware prefetchers' best case); x sits in L1.
template <int DTYPE>
LLMCTL_AVX512 void rows_avx512(const void* W, int64_t in, const float* x, const float* xp, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) y[r] = row_dot_avx512<DTYPE>(W, r * in, in, x, xp);
}

LLMCTL_AVX2 inline float reduce_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LLMCTL_AVX2 inline __m256 load8_avx2(const void* W, int dtype, int64_t i) {
  if (dtype == kFloat32) return _mm256_loadu_ps(static_cast<const float*>(W) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(W) + i));
  if (dtype == kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int DTYPE>
LLMCTL_AVX2 float row_dot_avx2(const void* W, int64_t at, int64_t n, const float* x) {
  const int64_t body = n / 8 * 8, body4 = n / 32 * 32;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i < body4; i += 32) {
    a0 = _mm256_fmadd_ps(load8_avx2(W, DTYPE, at + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8_avx2(W, DTYPE, at + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8_avx2(W, DTYPE, at + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8_avx2(W, DTYPE, at + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i < body; i += 8) a0 = _mm256_fmadd_ps(load8_avx2(W, DTYPE, at + i), _mm256_loadu_ps(x + i), a0);
  float sum = reduce_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) sum += load_float(W, DTYPE, at + i) * x[i];
  return sum;
}

// ---- attention's weighted sums of values (head_dim-long rows; its dot products are row_dot's)

LLMCTL_AVX512 void axpy_avx512(float p, const float* v, float* out, int64_t n) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, n - i)) - 1u);
    _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v + i), _mm512_maskz_loadu_ps(m, out + i)));
  }
}

LLMCTL_AVX2 void axpy_avx2(float p, const float* v, float* out, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < n; ++i) out[i] += p * v[i];
}

// exp(x) to ~1 ulp: 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (in two parts), e^r by its Taylor series to
// r^7 (|r| <= ln 2 / 2: error < 1e-8), 2^n by vscalefps. x is clamped to exp's float range; NaN stays NaN.
LLMCTL_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(88.8f), x));  // NaN: the second operand
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// x * sigmoid(x) * up, 16 at a time (SwiGLU's product); n a multiple of 16
LLMCTL_AVX512 void swiglu_avx512(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i)));
  }
}

// s[j] = exp(s[j] - top) for j < n; returns their sum
LLMCTL_AVX512 float exp_shifted_avx512(float* s, int64_t n, float top) {
  __m512 total = _mm512_setzero_ps();
  const __m512 t = _mm512_set1_ps(top);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, n - j)) - 1u);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), t));
    _mm512_mask_storeu_ps(s + j, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(total);
}

float softmax_weights(float* s, int64_t n, int isa);

// Attention of the G query heads that share one KV head (head_dim 16 * NV) over `span` cached positions: each key and
// value row is read once for all G heads, scores and weighted sums stay in registers (no call per position).
// q: (G, D); k, v: the first position's rows, D floats apart; sc: (G, span) scratch; out: (G, D).
template <int G, int NV>
LLMCTL_AVX512 void attend_group_avx512(const float* q, const float* k, const float* v, int64_t span, float scale,
                                       float* sc, float* out) {
  constexpr int D = 16 * NV;
  __m512 qv[G][NV];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < NV; ++c) qv[h][c] = _mm512_mul_ps(_mm512_loadu_ps(q + h * D + 16 * c), _mm512_set1_ps(scale));
  for (int64_t j = 0; j < span; ++j) {
    __m512 kr[NV];
    for (int c = 0; c < NV; ++c) kr[c] = _mm512_loadu_ps(k + j * D + 16 * c);
    for (int h = 0; h < G; ++h) {
      __m512 a = _mm512_mul_ps(qv[h][0], kr[0]);
      for (int c = 1; c < NV; ++c) a = _mm512_fmadd_ps(qv[h][c], kr[c], a);
      sc[h * span + j] = _mm512_reduce_add_ps(a);
    }
  }
  float inv[G];
  for (int h = 0; h < G; ++h) inv[h] = softmax_weights(sc + h * span, span, kIsaAvx512);
  __m512 acc[G][NV];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < span; ++j) {
    __m512 vr[NV];
    for (int c = 0; c < NV; ++c) vr[c] = _mm512_loadu_ps(v + j * D + 16 * c);
    for (int h = 0; h < G; ++h) {
      const __m512 p = _mm512_set1_ps(sc[h * span + j]);
      for (int c = 0; c < NV; ++c) acc[h][c] = _mm512_fmadd_ps(p, vr[c], acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + h * D + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
}

template <int NV>
void attend_group_avx512_for(int G, const float* q, const float* k, const float* v, int64_t span, float scale,
                             float* sc, float* out) {
  switch (G) {
    case 1: return attend_group_avx512<1, NV>(q, k, v, span, scale, sc, out);
    case 2: return attend_group_avx512<2, NV>(q, k, v, span, scale, sc, out);
    case 3: return attend_group_avx512<3, NV>(q, k, v, span, scale, sc, out);
    default: return attend_group_avx512<4, NV>(q, k, v, span, scale, sc, out);
  }
}

// exp(x) as exp_avx512 computes it, 2^n put into the exponent bits: x clamped to [-87, 88] (normal results only,
// e^88 = 1.7e38 for larger x: sigmoid and softmax weights barely notice);
// NaN stays NaN.
LLMCTL_AVX2 inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));  // NaN: the second operand
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// x * sigmoid(x) * up, 8 at a time; n a multiple of 8
LLMCTL_AVX2 void swiglu_avx2(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
}

// s[j] = exp(s[j] - top) for j < n; returns their sum
LLMCTL_AVX2 float exp_shifted_avx2(float* s, int64_t n, float top) {
  __m256 total = _mm256_setzero_ps();
  const __m256 t = _mm256_set1_ps(top);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = reduce_avx2(total);
  for (; j < n; ++j) sum += s[j] = std::exp(s[j] - top);
  return sum;
}

// attend_group_avx512 on 8-wide vectors (head_dim 8 * NV): each key and value row read once for the G query heads
template <int G, int NV>
LLMCTL_AVX2 void attend_group_avx2(const float* q, const float* k, const float* v, int64_t span, float scale, float* sc,
                                   float* out) {
  constexpr int D = 8 * NV;
  __m256 qv[G][NV];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < NV; ++c) qv[h][c] = _mm256_mul_ps(_mm256_loadu_ps(q + h * D + 8 * c), _mm256_set1_ps(scale));
  for (int64_t j = 0; j < span; ++j) {
    for (int h = 0; h < G; ++h) {
      __m256 a = _mm256_mul_ps(qv[h][0], _mm256_loadu_ps(k + j * D));
      for (int c = 1; c < NV; ++c) a = _mm256_fmadd_ps(qv[h][c], _mm256_loadu_ps(k + j * D + 8 * c), a);
      sc[h * span + j] = reduce_avx2(a);
    }
  }
  float inv[G];
  for (int h = 0; h < G; ++h) inv[h] = softmax_weights(sc + h * span, span, kIsaAvx2);
  __m256 acc[G][NV];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < NV; ++c) acc[h][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < span; ++j) {
    for (int h = 0; h < G; ++h) {
      const __m256 p = _mm256_set1_ps(sc[h * span + j]);
      for (int c = 0; c < NV; ++c) acc[h][c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + j * D + 8 * c), acc[h][c]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(out + h * D + 8 * c, _mm256_mul_ps(acc[h][c], _mm256_set1_ps(inv[h])));
}

template <int NV>
void attend_group_avx2_for(int G, const float* q, const float* k, const float* v, int64_t span, float scale,
                           float* sc, float* out) {
  switch (G) {
    case 1: return attend_group_avx2<1, NV>(q, k, v, span, scale, sc, out);
    case 2: return attend_group_avx2<2, NV>(q, k, v, span, scale, sc, out);
    case 3: return attend_group_avx2<3, NV>(q, k, v, span, scale, sc, out);
    default: return attend_group_avx2<4, NV>(q, k, v, span, scale, sc, out);
  }
}

#endif  // LLMCTL_X86

// s[j] = exp(s[j] - max(s)), the softmax up to its normalisation; returns 1 / sum(s)
float softmax_weights(float* s, int64_t n, int isa) {
  float top = -INFINITY, total = 0.0f;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
#ifdef LLMCTL_X86
  if (isa == kIsaAvx512) return 1.0f / exp_shifted_avx512(s, n, top);
  if (isa == kIsaAvx2) return 1.0f / exp_shifted_avx2(s, n, top);
#endif
  (void)isa;
  for (int64_t j = 0; j < n; ++j) total += s[j] = std::exp(s[j] - top);
  return 1.0f / total;
}

// Whether attend_group is built for these sizes: heads_per_group 1-4, head_dim 64 or 128, AVX-512 or AVX2.
bool has_attend_group(int isa, int G, int64_t D) {
#ifdef LLMCTL_X86
  return (isa == kIsaAvx512 || isa == kIsaAvx2) && (D == 64 || D == 128) && G >= 1 && G <= 4;
#else
  (void)isa, (void)G, (void)D;
  return false;
#endif
}

void attend_group(int isa, int G, int64_t D, const float* q, const float* k, const float* v, int64_t span, float scale,
                  float* sc, float* out) {
#ifdef LLMCTL_X86
  if (isa == kIsaAvx2) {
    if (D == 64) return attend_group_avx2_for<8>(G, q, k, v, span, scale, sc, out);
    return attend_group_avx2_for<16>(G, q, k, v, span, scale, sc, out);
  }
  if (D == 64) return attend_group_avx512_for<4>(G, q, k, v, span, scale, sc, out);
  return attend_group_avx512_for<8>(G, q, k, v, span, scale, sc, out);
#else
  (void)isa, (void)G, (void)D, (void)q, (void)k, (void)v, (void)span, (void)scale, (void)sc, (void)out;
#endif
}

// Attention's q . k: the weight-row dot products on float32 rows.
float dot(const float* a, const float* b, int64_t n, int isa) {
#ifdef LLMCTL_X86
  if (isa == kIsaAvx512) return row_dot_avx512<kFloat32>(a, 0, n, b, nullptr);
  if (isa == kIsaAvx2) return row_dot_avx2<kFloat32>(a, 0, n, b);
#endif
  (void)isa;
  return row_dot_scalar(a, kFloat32, 0, n, b);
}

void axpy(float p, const float* v, float* out, int64_t n, int isa) {
#ifdef LLMCTL_X86
  if (isa == kIsaAvx512) return axpy_avx512(p, v, out, n);
  if (isa == kIsaAvx2) return axpy_avx2(p, v, out, n);
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) out[i] += p * v[i];
}

void dense_matvec(const Matrix& m, const float* x, float* y, int threads, int isa) {
  const int64_t out = m.out, in = m.in;
  // bfloat16 on AVX-512 reads x de-interleaved per 32 values (see above)
  static thread_local std::vector<float> xp;
  if (isa == kIsaAvx512 && m.w_dtype == kBFloat16) {
    xp.resize(size_t(in / 32 * 32));
    for (int64_t c = 0; c + 32 <= in; c += 32)
      for (int j = 0; j < 16; ++j) xp[size_t(c + j)] = x[c + 2 * j], xp[size_t(c + 16 + j)] = x[c + 2 * j + 1];
  }
  const float* x_pairs = xp.data();  // a plain pointer: in a worker's lambda `xp` would be the worker's own
  auto rows = [&](int64_t r0, int64_t r1) {
#ifdef LLMCTL_X86
    if (isa == kIsaAvx512) {
      if (m.w_dtype == kFloat32) return rows_avx512<kFloat32>(m.w, in, x, x_pairs, y, r0, r1);
      if (m.w_dtype == kFloat16) return rows_avx512<kFloat16>(m.w, in, x, x_pairs, y, r0, r1);
      return rows_avx512<kBFloat16>(m.w, in, x, x_pairs, y, r0, r1);
    }
    // fmatmul's kernel: four far-apart streams of rows per thread (see there)
    if (isa == kIsaAvx2) return fmatmul_rows_avx2(m.w, m.w_dtype, in, out, x, 1, y, r0, r1);
#endif
    rows_scalar(m.w, m.w_dtype, in, x, y, r0, r1);
  };
  // Threads only where each reads at least ~64 KiB; four tasks per thread, so a thread that starts late (a
  // busy machine) is made up for by the others.
  const int n = detail::threads_for(threads, double(out * in * dtype_size(m.w_dtype)));
  const int tasks = int(std::min<int64_t>(out, n == 1 ? 1 : 4 * n));
  detail::parallel_for(tasks, n, [&](int t) { rows(out * t / tasks, out * (t + 1) / tasks); });
}

void rms_norm(const float* x, const void* w, int w_dtype, int64_t n, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * load_float(w, w_dtype, i);
}

// x = x * cos + rotate_half(x) * sin for one head: rotate_half(x) = (-x2, x1).
void rope(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

void project(const Projection& p, const float* x, float* y, int threads, int isa) {
  for (const Matrix& m : p) {
    matvec(m, x, y, threads, isa);
    y += m.out;
  }
}

}  // namespace

void matvec(const Matrix& m, const float* x, float* y, int threads, int isa) {
  if (m.tiled) {
    qmatmul_tiled(x, kFloat32, 1, m.in, m.wq, m.scales, m.biases, m.q_dtype, m.out, m.group_size, m.bits, y, kFloat32,
                  threads, isa);
  } else if (m.wq != nullptr) {
    qmatmul(x, kFloat32, 1, m.in, m.wq, m.scales, m.biases, m.q_dtype, m.out, m.group_size, m.bits, m.mode, y,
            kFloat32, threads, isa);
  } else {
    dense_matvec(m, x, y, threads, isa);
  }
  if (m.bias != nullptr)
    for (int64_t i = 0; i < m.out; ++i) y[i] += load_float(m.bias, m.bias_dtype, i);
}

NativeDecoder::NativeDecoder(const DecoderShape& shape, const Matrix& embedding, const void* final_norm,
                             const Matrix& head)
    : shape_(shape), embedding_(embedding), head_(head), final_norm_(final_norm) {
  const DecoderShape& s = shape;
  if (s.dim <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.head_dim <= 0 || s.hidden <= 0 || s.vocab <= 0)
    fail("decoder shape has a non-positive size");
  if (s.n_heads % s.n_kv_heads != 0) fail("n_heads must be a multiple of n_kv_heads");
  if (s.head_dim % 2 != 0) fail("head_dim must be even (RoPE rotates halves)");
  if (embedding.out != s.vocab || embedding.in != s.dim) fail("embedding is not (vocab, dim)");
  if (head.out != s.vocab || head.in != s.dim) fail("head is not (vocab, dim)");
  if (embedding.tiled && (embedding.bits != 8 || embedding.mode != kModeAffine))
    fail("a tiled embedding's rows are looked up from 8-bit tiles only, not " + std::to_string(embedding.bits) + "-bit ones");
  x_.resize(size_t(s.dim));
  h_.resize(size_t(std::max(s.dim, s.hidden)));
  qkv_.resize(size_t((s.n_heads + 2 * s.n_kv_heads) * s.head_dim));
  attn_.resize(size_t(s.n_heads * s.head_dim));
  gate_up_.resize(size_t(2 * s.hidden));
  act_.resize(size_t(s.hidden));
}

void NativeDecoder::add_layer(const DecoderLayer& layer) {
  const DecoderShape& s = shape_;
  auto width = [](const Projection& p, int64_t in, const char* what) {
    int64_t out = 0;
    for (const Matrix& m : p) {
      if (m.in != in) fail(std::string(what) + ": a matrix reads " + std::to_string(m.in) + " values, not " + std::to_string(in));
      out += m.out;
    }
    return out;
  };
  if (width(layer.qkv, s.dim, "qkv") != (s.n_heads + 2 * s.n_kv_heads) * s.head_dim) fail("qkv: wrong output width");
  if (width(layer.o, s.n_heads * s.head_dim, "o") != s.dim) fail("o: wrong output width");
  if (width(layer.gate_up, s.dim, "gate_up") != 2 * s.hidden) fail("gate_up: wrong output width");
  if (width(layer.down, s.hidden, "down") != s.dim) fail("down: wrong output width");
  layers_.push_back(layer);
}

void NativeDecoder::step(int64_t token, int64_t pos, const std::vector<uintptr_t>& keys,
                         const std::vector<uintptr_t>& values, int64_t capacity, const float* cos,
                         const float* sin, float* logits, int threads, int isa) {
  const DecoderShape& s = shape_;
  const int64_t H = s.n_heads, KV = s.n_kv_heads, D = s.head_dim, dim = s.dim;
  if (token < 0 || token >= s.vocab) fail("token id " + std::to_string(token) + " is outside the vocabulary");
  if (pos < 0 || pos >= capacity) fail("position " + std::to_string(pos) + " is outside the cache");
  if (keys.size() != layers_.size() || values.size() != layers_.size()) fail("one key and one value cache per layer");
  isa = resolve_isa(isa);
  float* x = x_.data();
  float* h = h_.data();

  const Matrix& e = embedding_;
  if (e.wq != nullptr && e.tiled) {  // 8-bit tiles (a tied head's): the row's words and parameters, 16 apart
    const int64_t groups = dim / e.group_size, words = dim / 4, tile = token / 16, j = token % 16;
    const int64_t size = dtype_size(e.q_dtype);
    embed_row_.resize(size_t(words));
    embed_params_.resize(size_t(2 * groups * size));
    for (int64_t w = 0; w < words; ++w) embed_row_[size_t(w)] = e.wq[(tile * words + w) * 16 + j];
    const char* scales = static_cast<const char*>(e.scales);
    const char* biases = static_cast<const char*>(e.biases);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = ((tile * groups + g) * 16 + j) * size;
      std::memcpy(embed_params_.data() + g * size, scales + at, size_t(size));
      std::memcpy(embed_params_.data() + (groups + g) * size, biases + at, size_t(size));
    }
    dequantize(embed_row_.data(), embed_params_.data(), embed_params_.data() + groups * size, e.q_dtype, 1, dim,
               e.group_size, 8, x, kFloat32, 1);
  } else if (e.wq != nullptr) {  // one row of codes, dequantized
    const int64_t groups = dim / e.group_size;
    const uint32_t* row = e.wq + token * (dim * e.bits / 32);
    const void* scales = static_cast<const char*>(e.scales) + token * groups * dtype_size(e.q_dtype);
    if (e.mode == kModeNF4) {
      dequantize_nf4(row, scales, e.q_dtype, 1, dim, e.group_size, x, kFloat32, 1);
    } else {
      const void* biases = static_cast<const char*>(e.biases) + token * groups * dtype_size(e.q_dtype);
      dequantize(row, scales, biases, e.q_dtype, 1, dim, e.group_size, e.bits, x, kFloat32, 1);
    }
  } else {
    for (int64_t i = 0; i < dim; ++i) x[i] = load_float(e.w, e.w_dtype, token * dim + i);
  }

  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t first = s.window > 0 ? std::max<int64_t>(0, pos - s.window + 1) : 0;
  const int64_t span = pos + 1 - first;
  if (int64_t(scores_.size()) < H * span) scores_.resize(size_t(H * span));
  for (size_t l = 0; l < layers_.size(); ++l) {
    const DecoderLayer& layer = layers_[l];
    rms_norm(x, layer.attn_norm, s.norm_dtype, dim, s.norm_eps, h);
    project(layer.qkv, h, qkv_.data(), threads, isa);
    float* q = qkv_.data();
    float* k = q + H * D;
    float* v = k + KV * D;
    for (int64_t head = 0; head < H + KV; ++head) rope(q + head * D, cos, sin, D);
    float* kc = reinterpret_cast<float*>(keys[l]);
    float* vc = reinterpret_cast<float*>(values[l]);
    for (int64_t g = 0; g < KV; ++g) {
      std::copy(k + g * D, k + (g + 1) * D, kc + (g * capacity + pos) * D);
      std::copy(v + g * D, v + (g + 1) * D, vc + (g * capacity + pos) * D);
    }
    // attention of each query head over its KV head's positions [first, pos]: a KV head's query heads together
    const int64_t per_group = H / KV;
    auto attend_group_of = [&](int g) {
      const float* kg = kc + (g * capacity + first) * D;
      const float* vg = vc + (g * capacity + first) * D;
      attend_group(isa, int(per_group), D, q + g * per_group * D, kg, vg, span, scale, scores_.data() + g * per_group * span,
                   attn_.data() + g * per_group * D);
    };
    const bool grouped = has_attend_group(isa, int(per_group), D);
    auto attend = [&](int t) {
      const int64_t head = t, g = head / (H / KV);
      const float* qh = q + head * D;
      const float* kg = kc + g * capacity * D;
      const float* vg = vc + g * capacity * D;
      float* sc = scores_.data() + head * span;
      for (int64_t j = 0; j < span; ++j) sc[j] = dot(qh, kg + (first + j) * D, D, isa) * scale;
      const float inv = softmax_weights(sc, span, isa);
      float* out = attn_.data() + head * D;
      std::fill(out, out + D, 0.0f);
      for (int64_t j = 0; j < span; ++j) axpy(sc[j] * inv, vg + (first + j) * D, out, D, isa);
    };
    const int attention_threads = span * H * D >= (1 << 16) ? (threads > 0 ? threads : detail::hardware_threads()) : 1;
    if (grouped) {
      detail::parallel_for(int(KV), attention_threads, attend_group_of);
    } else {
      detail::parallel_for(int(H), attention_threads, attend);
    }
    project(layer.o, attn_.data(), h, threads, isa);
    for (int64_t i = 0; i < dim; ++i) x[i] += h[i];

    rms_norm(x, layer.mlp_norm, s.norm_dtype, dim, s.norm_eps, h);
    project(layer.gate_up, h, gate_up_.data(), threads, isa);
    const float* gate = gate_up_.data();
    const float* up = gate + s.hidden;
    int64_t i = 0;
#ifdef LLMCTL_X86
    if (isa == kIsaAvx512) swiglu_avx512(gate, up, act_.data(), i = s.hidden / 16 * 16);
    if (isa == kIsaAvx2) swiglu_avx2(gate, up, act_.data(), i = s.hidden / 8 * 8);
#endif
    for (; i < s.hidden; ++i) act_[size_t(i)] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    project(layer.down, act_.data(), h, threads, isa);
    for (int64_t i = 0; i < dim; ++i) x[i] += h[i];
  }
  rms_norm(x, final_norm_, s.norm_dtype, dim, s.norm_eps, h);
  matvec(head_, h, logits, threads, isa);
}

}  // namespace llmctl
