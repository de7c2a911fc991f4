// AVX2/FMA and AVX-512 (BW, VL, DQ, VNNI) kernels of qmatmul. Each function carries its own target
// attribute, so the library builds for baseline x86-64 and qmatmul.cpp picks one at run time.
//
// Per output row and group: y += (s * sx) * sum_i xq_i * q_i + b * sum_i x_i, where xq is x as int16
// per group (step sx) and q the codes as int16: one vpdpwssd (vpmaddwd + vpaddd on AVX2) multiplies
// and pair-sums 32 (16) of them. 4- and 8-bit codes come out of each 16-bit lane of the packed words
// by shifts and masks (prepare_x lays x out to match); other widths are unpacked per group first.
// NF4 turns each 4-bit code into its level times 2^13 (vpermw; pshufb on AVX2). With one x row (decode), affine
// 4-/8-bit codes on AVX-512 take a byte kernel instead: the same int16 x split into two bytes (row_bytes_avx512).
#include "qmatmul.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define LLMCTL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LLMCTL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

namespace llmctl {
namespace detail {
namespace {

constexpr int kRowTile = 16;  // output rows whose weights stay in cache while x blocks pass over them
constexpr int kMaxXRows = 4;  // x rows sharing each vector of codes
constexpr int kPrefetchBytes = 2048;  // how far ahead the one-x-row byte kernel asks for the codes it will read

// Scratch of one thread: a tile's scales and biases as float32, and scale * sx per x row.
struct Scratch {
  std::vector<float> scales, biases, combined;
  int64_t stride = 0;  // groups + 16: vector loads past the last group read zeros
};

template <int BITS, int G>
void unpack_group_i16(const uint32_t* words, int16_t* codes) {
  for (int c = 0; c < G; c += 32) unpack32<BITS>(words + c / 32 * BITS, codes + c);
}

// Converts n scales or biases from index i of p (any float dtype) to float32 times mul.
template <typename Convert>
void load_tile(const QJob& job, int64_t o0, int64_t rows, Scratch& t, Convert convert) {
  const int64_t ng = job.groups;
  t.stride = ng + 16;
  // Sized once and reused; what is read past the groups (combined's last 16 per row) is zeroed where written.
  t.scales.resize(size_t(kRowTile * t.stride));
  t.biases.resize(size_t(kRowTile * t.stride));
  t.combined.resize(size_t(kRowTile * kMaxXRows * t.stride));
  const float extra = job.mode == kModeNF4 ? 1.0f / kNF4Int16Scale : 1.0f;  // undo the levels' 2^13
  for (int64_t i = 0; i < rows; ++i) {
    convert(job.scales, (o0 + i) * ng, ng, t.scales.data() + i * t.stride, extra);
    if (job.biases) convert(job.biases, (o0 + i) * ng, ng, t.biases.data() + i * t.stride, 1.0f);
  }
}

// Which group each int32 lane of a step's sums belongs to, relative to the step's first group:
// lane m sums codes [m * per_lane, (m + 1) * per_lane) of the step.
template <int LANES, int PER_LANE, int G>
struct LaneGroups {
  int idx[LANES];
  constexpr LaneGroups() : idx() {
    for (int m = 0; m < LANES; ++m) idx[m] = m * PER_LANE / G;
  }
};

// ---------------------------------------------------------------------------------------- AVX-512

LLMCTL_AVX512 __m512 load16_avx512(const void* p, int dtype, int64_t i, int n) {
  const __mmask16 m = __mmask16((1u << n) - 1u);
  if (dtype == kFloat32) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  if (dtype == kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

struct ConvertAvx512 {
  int dtype;
  LLMCTL_AVX512 void operator()(const void* p, int64_t i, int64_t n, float* out, float mul) const {
    for (int64_t k = 0; k < n; k += 16) {
      const int m = int(std::min<int64_t>(16, n - k));
      const __m512 v = _mm512_mul_ps(load16_avx512(p, dtype, i + k, m), _mm512_set1_ps(mul));
      _mm512_mask_storeu_ps(out + k, __mmask16((1u << m) - 1u), v);
    }
  }
};

// out[:n] = a * b, then out[n : n + 16] = 0 (vector loads of a row's last groups read there).
LLMCTL_AVX512 void multiply_avx512(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, n - k)) - 1u);
    _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k)));
  }
  _mm512_storeu_ps(out + n, _mm512_setzero_ps());
}

// One output row o against x rows r0 .. r0 + NR. combined: the row's scale * sx per group for each
// x row (stride apart); b: the row's float32 biases.
template <int BITS, int G, bool NF4, int NR>
LLMCTL_AVX512 inline __attribute__((always_inline)) void row_avx512(const QJob& job, int64_t o, int64_t r0,
                                                                    const float* combined, int64_t stride,
                                                                    const float* b) {
  const int64_t ng = job.groups, K = job.in;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(job.wq + o * (K * BITS / 32));
  const int16_t* xq[NR];
  const float* c[NR];
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) {
    xq[i] = job.xq.data() + (r0 + i) * job.in_pad;
    c[i] = combined + i * stride;
    acc[i] = _mm512_setzero_ps();
  }
  if constexpr (BITS == 4 || BITS == 8) {
    constexpr int kCodes = 512 / BITS;    // codes per 64-byte step
    constexpr int kPerLane = kCodes / 16;  // codes per int32 lane of the sums
    constexpr LaneGroups<16, kPerLane, G> lane_groups;
    const __m512i groups_of_lanes = _mm512_loadu_si512(lane_groups.idx);
    const __m512i levels = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kNF4Int16)));
    const __m512i mask = _mm512_set1_epi16(BITS == 4 ? 0x0F : 0xFF);
    const int64_t bytes = K * BITS / 8;
    for (int64_t u = 0; u * 64 < bytes; ++u) {
      const int64_t left = bytes - u * 64;
      const __m512i raw = left >= 64 ? _mm512_loadu_si512(w + u * 64)
                                     : _mm512_maskz_loadu_epi8((~0ull) >> (64 - left), w + u * 64);
      __m512i q[16 / BITS];
      if constexpr (BITS == 4) {
        q[0] = _mm512_and_si512(raw, mask);
        q[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
        q[2] = _mm512_and_si512(_mm512_srli_epi16(raw, 8), mask);
        q[3] = _mm512_srli_epi16(raw, 12);
        if constexpr (NF4)
          for (auto& v : q) v = _mm512_permutexvar_epi16(v, levels);
      } else {
        q[0] = _mm512_and_si512(raw, mask);
        q[1] = _mm512_srli_epi16(raw, 8);
      }
      const int64_t g0 = u * kCodes / G;
      for (int i = 0; i < NR; ++i) {
        const int16_t* xp = xq[i] + u * kCodes;
        __m512i d = _mm512_setzero_si512();
        for (int j = 0; j < 16 / BITS; ++j) d = _mm512_dpwssd_epi32(d, q[j], _mm512_loadu_si512(xp + 32 * j));
        const __m512 scale = kCodes <= G ? _mm512_set1_ps(c[i][g0])
                                         : _mm512_permutexvar_ps(groups_of_lanes, _mm512_loadu_ps(c[i] + g0));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[i]);
      }
    }
  } else {
    alignas(64) int16_t codes[128];
    for (int64_t g = 0; g < ng; ++g) {
      unpack_group_i16<BITS, G>(job.wq + o * (K * BITS / 32) + g * G * BITS / 32, codes);
      __m512i d[NR];
      for (int i = 0; i < NR; ++i) d[i] = _mm512_setzero_si512();
      for (int k = 0; k < G; k += 32) {
        const __m512i v = _mm512_load_si512(codes + k);
        for (int i = 0; i < NR; ++i) d[i] = _mm512_dpwssd_epi32(d[i], v, _mm512_loadu_si512(xq[i] + g * G + k));
      }
      for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i]), _mm512_set1_ps(c[i][g]), acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    if (!NF4) {  // + sum_g b_g * sum(x in g), lane-wise before the one reduction
      const float* xs = job.xsum.data() + (r0 + i) * (ng + 1);
      for (int64_t g = 0; g < ng; g += 16) {
        const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, ng - g)) - 1u);
        acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + g), _mm512_maskz_loadu_ps(m, xs + g), acc[i]);
      }
    }
    store_y(job, r0 + i, o, _mm512_reduce_add_ps(acc[i]));
  }
}

// One x row (decode): two output rows at a time, sharing the x loads and interleaving their chains.
template <int BITS, int G, bool NF4>
LLMCTL_AVX512 inline __attribute__((always_inline)) void two_rows_avx512(const QJob& job, int64_t o, int64_t r,
                                                                         const float* c0, const float* c1,
                                                                         const float* b0, const float* b1) {
  const int64_t ng = job.groups, K = job.in, bytes = K * BITS / 8;
  const uint8_t* w0 = reinterpret_cast<const uint8_t*>(job.wq + o * (K * BITS / 32));
  const uint8_t* w1 = w0 + bytes;
  const int16_t* xq = job.xq.data() + r * job.in_pad;
  constexpr int kCodes = 512 / BITS, kPerLane = kCodes / 16;
  constexpr LaneGroups<16, kPerLane, G> lane_groups;
  const __m512i groups_of_lanes = _mm512_loadu_si512(lane_groups.idx);
  const __m512i levels = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kNF4Int16)));
  const __m512i mask = _mm512_set1_epi16(BITS == 4 ? 0x0F : 0xFF);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  auto split = [&](__m512i raw, __m512i* q) LLMCTL_AVX512 {
    if constexpr (BITS == 4) {
      q[0] = _mm512_and_si512(raw, mask);
      q[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
      q[2] = _mm512_and_si512(_mm512_srli_epi16(raw, 8), mask);
      q[3] = _mm512_srli_epi16(raw, 12);
      if constexpr (NF4)
        for (int j = 0; j < 4; ++j) q[j] = _mm512_permutexvar_epi16(q[j], levels);
    } else {
      q[0] = _mm512_and_si512(raw, mask);
      q[1] = _mm512_srli_epi16(raw, 8);
    }
  };
  for (int64_t u = 0; u * 64 < bytes; ++u) {
    const int64_t left = bytes - u * 64;
    const __mmask64 m = left >= 64 ? ~0ull : (~0ull) >> (64 - left);
    __m512i q0[16 / BITS], q1[16 / BITS];
    split(_mm512_maskz_loadu_epi8(m, w0 + u * 64), q0);
    split(_mm512_maskz_loadu_epi8(m, w1 + u * 64), q1);
    const int16_t* xp = xq + u * kCodes;
    __m512i d0a = _mm512_setzero_si512(), d0b = _mm512_setzero_si512();
    __m512i d1a = _mm512_setzero_si512(), d1b = _mm512_setzero_si512();
    for (int j = 0; j < 16 / BITS; j += 2) {  // two chains per row: shorter dependency paths
      const __m512i xa = _mm512_loadu_si512(xp + 32 * j), xb = _mm512_loadu_si512(xp + 32 * (j + 1));
      d0a = _mm512_dpwssd_epi32(d0a, q0[j], xa);
      d0b = _mm512_dpwssd_epi32(d0b, q0[j + 1], xb);
      d1a = _mm512_dpwssd_epi32(d1a, q1[j], xa);
      d1b = _mm512_dpwssd_epi32(d1b, q1[j + 1], xb);
    }
    const int64_t g0 = u * kCodes / G;
    __m512 s0, s1;
    if constexpr (kCodes <= G) {
      s0 = _mm512_set1_ps(c0[g0]);
      s1 = _mm512_set1_ps(c1[g0]);
    } else {
      s0 = _mm512_permutexvar_ps(groups_of_lanes, _mm512_loadu_ps(c0 + g0));
      s1 = _mm512_permutexvar_ps(groups_of_lanes, _mm512_loadu_ps(c1 + g0));
    }
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0a, d0b)), s0, acc0);
    acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d1a, d1b)), s1, acc1);
  }
  if (!NF4) {
    const float* xs = job.xsum.data() + r * (ng + 1);
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, ng - g)) - 1u);
      const __m512 x = _mm512_maskz_loadu_ps(m, xs + g);
      acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b0 + g), x, acc0);
      acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b1 + g), x, acc1);
    }
  }
  store_y(job, r, o, _mm512_reduce_add_ps(acc0));
  store_y(job, r, o + 1, _mm512_reduce_add_ps(acc1));
}

// One x row against output row o, affine 4- or 8-bit codes, x as two signed bytes per value (job.xb): the codes
// go into vpdpbusd as the unsigned bytes they are stored in (4-bit: low and high nibbles, one mask each) against
// x's high and low bytes, and 256 * high + low gives the same int32 sums as the int16 products in half the
// unpacking. Rows one after another, each read start to end, with a software prefetch kPrefetchBytes ahead: the
// codes then stream as one sequence (rows are only a few cache lines long; several rows in lockstep made as many
// short streams, which measured here 30-40% slower out of memory for 8-bit codes).
template <int BITS, int G>
LLMCTL_AVX512 inline __attribute__((always_inline)) void row_bytes_avx512(const QJob& job, int64_t o, const float* c,
                                                                          const float* b) {
  const int64_t ng = job.groups, bytes = job.in * BITS / 8;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(job.wq) + o * bytes;
  const int8_t* xb = job.xb.data();
  constexpr int kCodes = 512 / BITS, kPerLane = kCodes / 16;
  constexpr LaneGroups<16, kPerLane, G> lane_groups;
  const __m512i groups_of_lanes = _mm512_loadu_si512(lane_groups.idx);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t u = 0; u * 64 < bytes; ++u) {
    const int64_t left = bytes - u * 64;
    const __mmask64 m = left >= 64 ? ~0ull : (~0ull) >> (64 - left);
    _mm_prefetch(reinterpret_cast<const char*>(w + u * 64 + kPrefetchBytes), _MM_HINT_T0);  // never faults
    const __m512i raw = _mm512_maskz_loadu_epi8(m, w + u * 64);
    const int8_t* xp = xb + u * 2 * kCodes;
    __m512i high, low;
    if constexpr (BITS == 4) {
      const __m512i even = _mm512_and_si512(raw, nibble), odd = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
      high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xp)), odd,
                                 _mm512_loadu_si512(xp + 64));
      low = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xp + 128)), odd,
                                _mm512_loadu_si512(xp + 192));
    } else {
      high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), raw, _mm512_loadu_si512(xp));
      low = _mm512_dpbusd_epi32(_mm512_setzero_si512(), raw, _mm512_loadu_si512(xp + 64));
    }
    const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(high, 8), low);
    const int64_t g0 = u * kCodes / G;
    const __m512 scale = kCodes <= G ? _mm512_set1_ps(c[g0]) : _mm512_permutexvar_ps(groups_of_lanes, _mm512_loadu_ps(c + g0));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc);
  }
  const float* xs = job.xsum.data();
  for (int64_t g = 0; g < ng; g += 16) {  // + sum_g b_g * sum(x in g), lane-wise before the one reduction
    const __mmask16 m = __mmask16((1u << std::min<int64_t>(16, ng - g)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + g), _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  store_y(job, 0, o, _mm512_reduce_add_ps(acc));
}

// Output rows in tiles of kRowTile, x rows in blocks of kMaxXRows: a tile's weights stay in cache
// while every block of x passes over them.
template <int BITS, int G, bool NF4>
LLMCTL_AVX512 void rows_avx512(const QJob& job, int64_t o0, int64_t o1) {
  static thread_local Scratch t;  // reused across calls: no allocation once warm
  for (int64_t t0 = o0; t0 < o1; t0 += kRowTile) {
    const int64_t t1 = std::min<int64_t>(o1, t0 + kRowTile);
    load_tile(job, t0, t1 - t0, t, ConvertAvx512{job.w_dtype});
    for (int64_t r0 = 0; r0 < job.batch; r0 += kMaxXRows) {
      const int64_t nr = std::min<int64_t>(kMaxXRows, job.batch - r0);
      // combined[(o - t0) * kMaxXRows + i] = the row's scales * x row r0 + i's steps, per group
      for (int64_t o = t0; o < t1; ++o)
        for (int64_t i = 0; i < nr; ++i)
          multiply_avx512(t.scales.data() + (o - t0) * t.stride, job.sx.data() + (r0 + i) * (job.groups + 1), job.groups,
                          t.combined.data() + ((o - t0) * kMaxXRows + i) * t.stride);
      int64_t o = t0;
      if constexpr ((BITS == 4 || BITS == 8) && !NF4) {
        for (; !job.xb.empty() && o < t1; ++o)  // one x row: the byte kernel
          row_bytes_avx512<BITS, G>(job, o, t.combined.data() + (o - t0) * kMaxXRows * t.stride, t.biases.data() + (o - t0) * t.stride);
      }
      if constexpr (BITS == 4 || BITS == 8) {  // NF4 (or no byte x): two rows sharing the int16 x
        for (; nr == 1 && o + 1 < t1; o += 2) {
          const float* c = t.combined.data() + (o - t0) * kMaxXRows * t.stride;
          const float* b = t.biases.data() + (o - t0) * t.stride;
          two_rows_avx512<BITS, G, NF4>(job, o, r0, c, c + kMaxXRows * t.stride, b, b + t.stride);
        }
      }
      for (; o < t1; ++o) {
        const float* c = t.combined.data() + (o - t0) * kMaxXRows * t.stride;
        const float* b = t.biases.data() + (o - t0) * t.stride;
        switch (nr) {
          case 1: row_avx512<BITS, G, NF4, 1>(job, o, r0, c, t.stride, b); break;
          case 2: row_avx512<BITS, G, NF4, 2>(job, o, r0, c, t.stride, b); break;
          case 3: row_avx512<BITS, G, NF4, 3>(job, o, r0, c, t.stride, b); break;
          default: row_avx512<BITS, G, NF4, 4>(job, o, r0, c, t.stride, b); break;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- AVX2

struct ConvertScalar {
  int dtype;
  void operator()(const void* p, int64_t i, int64_t n, float* out, float mul) const {
    for (int64_t k = 0; k < n; ++k) out[k] = load_float(p, dtype, i + k) * mul;
  }
};

LLMCTL_AVX2 float reduce_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int16 lanes holding NF4 codes 0..15 -> their int16 levels: pshufb looks up the low and the high
// byte of each level (a lane's zero high byte looks up entry 0, masked away).
LLMCTL_AVX2 __m256i nf4_levels_avx2(__m256i codes, __m256i table_lo, __m256i table_hi) {
  const __m256i lo = _mm256_and_si256(_mm256_shuffle_epi8(table_lo, codes), _mm256_set1_epi16(0xFF));
  return _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_shuffle_epi8(table_hi, codes), 8));
}

template <int BITS, int G, bool NF4, int NR>
LLMCTL_AVX2 inline __attribute__((always_inline)) void row_avx2(const QJob& job, int64_t o, int64_t r0,
                                                                const float* s, const float* b, float* combined,
                                                                int64_t stride) {
  const int64_t ng = job.groups, K = job.in;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(job.wq + o * (K * BITS / 32));
  const int16_t* xq[NR];
  const float* c[NR];
  __m256 acc[NR];
  for (int i = 0; i < NR; ++i) {
    xq[i] = job.xq.data() + (r0 + i) * job.in_pad;
    c[i] = combined + i * stride;
    const float* sx = job.sx.data() + (r0 + i) * (ng + 1);
    for (int64_t g = 0; g < ng; ++g) combined[i * stride + g] = s[g] * sx[g];
    std::fill(combined + i * stride + ng, combined + (i + 1) * stride, 0.0f);  // read by the last vector loads
    acc[i] = _mm256_setzero_ps();
  }
  if constexpr (BITS == 4 || BITS == 8) {
    constexpr int kCodes = 256 / BITS;    // codes per 32-byte step
    constexpr int kPerLane = kCodes / 8;   // codes per int32 lane of the sums
    constexpr LaneGroups<8, kPerLane, G> lane_groups;
    const __m256i groups_of_lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane_groups.idx));
    alignas(32) uint8_t level_bytes[2][32];
    for (int k = 0; k < 32; ++k) {
      level_bytes[0][k] = uint8_t(uint16_t(kNF4Int16[k % 16]) & 0xFF);
      level_bytes[1][k] = uint8_t(uint16_t(kNF4Int16[k % 16]) >> 8);
    }
    const __m256i table_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(level_bytes[0]));
    const __m256i table_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(level_bytes[1]));
    const __m256i mask = _mm256_set1_epi16(BITS == 4 ? 0x0F : 0xFF);
    const int64_t bytes = K * BITS / 8;
    alignas(32) uint8_t tail[32];
    for (int64_t u = 0; u * 32 < bytes; ++u) {
      const int64_t left = bytes - u * 32;
      const uint8_t* p = w + u * 32;
      if (left < 32) {  // the row's last 16 bytes (group size 32, an odd number of groups)
        std::fill(tail, tail + 32, uint8_t(0));
        std::copy(p, p + left, tail);
        p = tail;
      }
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      __m256i q[16 / BITS];
      if constexpr (BITS == 4) {
        q[0] = _mm256_and_si256(raw, mask);
        q[1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
        q[2] = _mm256_and_si256(_mm256_srli_epi16(raw, 8), mask);
        q[3] = _mm256_srli_epi16(raw, 12);
        if constexpr (NF4)
          for (auto& v : q) v = nf4_levels_avx2(v, table_lo, table_hi);
      } else {
        q[0] = _mm256_and_si256(raw, mask);
        q[1] = _mm256_srli_epi16(raw, 8);
      }
      const int64_t g0 = u * kCodes / G;
      for (int i = 0; i < NR; ++i) {
        const int16_t* xp = xq[i] + u * kCodes;
        __m256i d = _mm256_setzero_si256();
        for (int j = 0; j < 16 / BITS; ++j)
          d = _mm256_add_epi32(d, _mm256_madd_epi16(q[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 16 * j))));
        const __m256 scale = kCodes <= G ? _mm256_set1_ps(c[i][g0])
                                         : _mm256_permutevar8x32_ps(_mm256_loadu_ps(c[i] + g0), groups_of_lanes);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, acc[i]);
      }
    }
  } else {
    alignas(32) int16_t codes[128];
    for (int64_t g = 0; g < ng; ++g) {
      unpack_group_i16<BITS, G>(job.wq + o * (K * BITS / 32) + g * G * BITS / 32, codes);
      __m256i d[NR];
      for (int i = 0; i < NR; ++i) d[i] = _mm256_setzero_si256();
      for (int k = 0; k < G; k += 16) {
        const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + k));
        for (int i = 0; i < NR; ++i)
          d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + g * G + k))));
      }
      for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i]), _mm256_set1_ps(c[i][g]), acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    float v = reduce_avx2(acc[i]);
    if (!NF4) {
      const float* xs = job.xsum.data() + (r0 + i) * (ng + 1);
      float bias = 0.0f;
      for (int64_t g = 0; g < ng; ++g) bias += b[g] * xs[g];
      v += bias;
    }
    store_y(job, r0 + i, o, v);
  }
}

template <int BITS, int G, bool NF4>
LLMCTL_AVX2 void rows_avx2(const QJob& job, int64_t o0, int64_t o1) {
  static thread_local Scratch t;  // reused across calls: no allocation once warm
  for (int64_t t0 = o0; t0 < o1; t0 += kRowTile) {
    const int64_t t1 = std::min<int64_t>(o1, t0 + kRowTile);
    load_tile(job, t0, t1 - t0, t, ConvertScalar{job.w_dtype});
    for (int64_t r0 = 0; r0 < job.batch; r0 += kMaxXRows) {
      const int64_t nr = std::min<int64_t>(kMaxXRows, job.batch - r0);
      for (int64_t o = t0; o < t1; ++o) {
        const float* s = t.scales.data() + (o - t0) * t.stride;
        const float* b = t.biases.data() + (o - t0) * t.stride;
        float* c = t.combined.data();
        switch (nr) {
          case 1: row_avx2<BITS, G, NF4, 1>(job, o, r0, s, b, c, t.stride); break;
          case 2: row_avx2<BITS, G, NF4, 2>(job, o, r0, s, b, c, t.stride); break;
          case 3: row_avx2<BITS, G, NF4, 3>(job, o, r0, s, b, c, t.stride); break;
          default: row_avx2<BITS, G, NF4, 4>(job, o, r0, s, b, c, t.stride); break;
        }
      }
    }
  }
}

// (bits, group size, mode) at run time -> one instantiation of Rows<BITS, G, NF4>::run.
template <template <int, int, bool> class Rows>
void dispatch_rows(const QJob& job, int64_t o0, int64_t o1) {
  auto with_group = [&](auto bits_c) {
    constexpr int BITS = decltype(bits_c)::value;
    const bool nf4 = job.mode == kModeNF4;  // only ever with 4 bits (checked by qmatmul)
    switch (job.group_size) {
      case 32: return nf4 ? Rows<BITS, 32, BITS == 4>::run(job, o0, o1) : Rows<BITS, 32, false>::run(job, o0, o1);
      case 64: return nf4 ? Rows<BITS, 64, BITS == 4>::run(job, o0, o1) : Rows<BITS, 64, false>::run(job, o0, o1);
      default: return nf4 ? Rows<BITS, 128, BITS == 4>::run(job, o0, o1) : Rows<BITS, 128, false>::run(job, o0, o1);
    }
  };
  switch (job.bits) {
    case 2: return with_group(std::integral_constant<int, 2>{});
    case 3: return with_group(std::integral_constant<int, 3>{});
    case 4: return with_group(std::integral_constant<int, 4>{});
    case 5: return with_group(std::integral_constant<int, 5>{});
    case 6: return with_group(std::integral_constant<int, 6>{});
    default: return with_group(std::integral_constant<int, 8>{});
  }
}

template <int BITS, int G, bool NF4>
struct Avx512Rows {
  static void run(const QJob& job, int64_t o0, int64_t o1) { rows_avx512<BITS, G, NF4>(job, o0, o1); }
};

template <int BITS, int G, bool NF4>
struct Avx2Rows {
  static void run(const QJob& job, int64_t o0, int64_t o1) { rows_avx2<BITS, G, NF4>(job, o0, o1); }
};

}  // namespace

void qmatmul_rows_avx512(const QJob& job, int64_t o0, int64_t o1) { dispatch_rows<Avx512Rows>(job, o0, o1); }
void qmatmul_rows_avx2(const QJob& job, int64_t o0, int64_t o1) { dispatch_rows<Avx2Rows>(job, o0, o1); }

}  // namespace detail
}  // namespace llmctl

#else  // not x86-64: qmatmul.cpp never picks these

namespace llmctl {
namespace detail {
void qmatmul_rows_avx512(const QJob&, int64_t, int64_t) { throw std::invalid_argument("AVX-512 kernels exist only on x86-64"); }
void qmatmul_rows_avx2(const QJob&, int64_t, int64_t) { throw std::invalid_argument("AVX2 kernels exist only on x86-64"); }
}  // namespace detail
}  // namespace llmctl

#endif
