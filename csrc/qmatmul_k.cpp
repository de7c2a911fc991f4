// AVX2 kernels of qmatmul for the codes GGUF's K-quants and their fallbacks read into: groups of 16 (Q6_K, Q3_K,
// Q2_K at 6/3/2 bits, and any width) and 2/3/5/6-bit codes in groups of 32 or more (Q5_0, Q5_K). qmatmul_x86.cpp's
// kernels split 4-/8-bit codes with shifts and unpack other widths one code at a time; here every width unpacks 16
// codes at once: their 2 * bits bytes are broadcast to both halves of a vector, vpshufb puts the two bytes holding
// code j in 16-bit lane j, vpmullw shifts the code to the top of the lane and vpsrlw brings it down. Then
// y += (s * sx) * sum_i xq_i * q_i + b * sum_i x_i per group as in the other SIMD kernels (x as int16 per group,
// natural order), so the error bound is theirs: exact int32 sums of int16 x (error <= 2^-16 of each group's largest
// |x|) times exact codes.
#include "qmatmul.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define LLMCTL_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace llmctl {
namespace detail {
namespace {

constexpr int kRowTile = 16;  // output rows whose codes stay in cache while blocks of x rows pass over them
constexpr int kMaxXRows = 4;  // x rows sharing each vector of unpacked codes

// The constants that unpack 16 codes of BITS bits: a vpshufb pattern (lane j <- bytes j*BITS/8 and the next one,
// the same in both halves of the vector) and the vpmullw factors 2^(16 - shift - BITS).
template <int BITS>
struct Unpack16 {
  alignas(32) int8_t shuffle[32];
  alignas(32) int16_t mul[16];
  Unpack16() {
    for (int j = 0; j < 16; ++j) {
      const int bit = j * BITS, byte = bit / 8, shift = bit % 8;
      shuffle[2 * j] = int8_t(byte);
      shuffle[2 * j + 1] = shift + BITS > 8 ? int8_t(byte + 1) : int8_t(-128);  // -128: a zero byte
      mul[j] = int16_t(1 << (16 - shift - BITS));
    }
    // vpshufb indexes within each 128-bit half: the high half holds codes 8..15 from its copy of the 16 bytes
  }
};

// 16 codes from 2 * BITS bytes at p (16 bytes are read) as int16 lanes, in order.
template <int BITS>
LLMCTL_AVX2 inline __attribute__((always_inline)) __m256i unpack16(const uint8_t* p, __m256i shuffle, __m256i mul) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i pairs = _mm256_shuffle_epi8(bytes, shuffle);
  return _mm256_srli_epi16(_mm256_mullo_epi16(pairs, mul), 16 - BITS);
}

// n (a multiple of 8, or the rest scalar) values of a float32/float16/bfloat16 array from index i, as float32.
LLMCTL_AVX2 void to_float(const void* p, int dtype, int64_t i, int64_t n, float* out) {
  int64_t k = 0;
  if (dtype == kFloat32) {
    std::memcpy(out, static_cast<const float*>(p) + i, size_t(n) * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p) + i;
  for (; k + 8 <= n; k += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + k));
    const __m256 f = dtype == kFloat16 ? _mm256_cvtph_ps(v)
                                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    _mm256_storeu_ps(out + k, f);
  }
  for (; k < n; ++k) out[k] = load_float(p, dtype, i + k);
}

LLMCTL_AVX2 float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Per-thread scratch, reused from call to call: one output row's scales and biases as float32, and scale * sx of
// each x row of a block.
struct Scratch {
  std::vector<float> scales, biases, combined;
  alignas(16) uint8_t tail[32];
};

// Group g of one output row (codes at w) against NR x rows: into[i] += (s * sx_i) * sum(xq_i * q).
template <int BITS, int G, int NR>
LLMCTL_AVX2 inline __attribute__((always_inline)) void group_k(const uint8_t* w, int64_t row_bytes, int64_t safe_chunks,
                                                               int64_t g, const int16_t* const* xq, const float* const* c,
                                                               __m256i shuffle, __m256i mul, uint8_t* tail, __m256* into) {
  constexpr int kChunks = G / 16;  // chunks of 16 codes per group
  __m256i d[NR];
  for (int i = 0; i < NR; ++i) d[i] = _mm256_setzero_si256();
  for (int k = 0; k < kChunks; ++k) {
    const int64_t chunk = g * kChunks + k;
    const uint8_t* p = w + chunk * 2 * BITS;
    if (chunk >= safe_chunks) {  // the last row's last codes: read from a copy, not past the buffer
      std::memcpy(tail, p, size_t(row_bytes - chunk * 2 * BITS));
      p = tail;
    }
    const __m256i q = unpack16<BITS>(p, shuffle, mul);
    for (int i = 0; i < NR; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + chunk * 16));
      d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(q, x));
    }
  }
  for (int i = 0; i < NR; ++i) into[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i]), _mm256_broadcast_ss(c[i] + g), into[i]);
}

// Output row o against x rows r0 .. r0 + NR - 1.
template <int BITS, int G, int NR>
LLMCTL_AVX2 void row_k(const QJob& job, int64_t o, int64_t r0, Scratch& t, __m256i shuffle, __m256i mul) {
  const int64_t K = job.in, ng = job.groups, row_bytes = K * BITS / 8;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(job.wq) + o * row_bytes;
  const int16_t* xq[NR];
  const float* c[NR];
  __m256 acc[NR];
  float bias[NR];
  for (int i = 0; i < NR; ++i) {
    const int64_t r = r0 + i;
    xq[i] = job.xq.data() + r * job.in_pad;
    float* ci = t.combined.data() + i * ng;
    const float* sx = job.sx.data() + r * (ng + 1);
    const float* xs = job.xsum.data() + r * (ng + 1);
    __m256 bsum = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
      _mm256_storeu_ps(ci + g, _mm256_mul_ps(_mm256_loadu_ps(t.scales.data() + g), _mm256_loadu_ps(sx + g)));
      bsum = _mm256_fmadd_ps(_mm256_loadu_ps(t.biases.data() + g), _mm256_loadu_ps(xs + g), bsum);
    }
    bias[i] = sum8(bsum);
    for (; g < ng; ++g) {
      ci[g] = t.scales[size_t(g)] * sx[g];
      bias[i] += t.biases[size_t(g)] * xs[g];
    }
    c[i] = ci;
    acc[i] = _mm256_setzero_ps();
  }
  // The last row's last 16 codes may end less than 16 bytes before the buffer does: they are read from a copy.
  const int64_t safe_chunks = o + 1 < job.out ? K / 16 : row_bytes < 16 ? 0 : (row_bytes - 16) / (2 * BITS) + 1;
  // Even and odd groups add into separate accumulators: two chains of vfmadd instead of one.
  __m256 odd[NR];
  for (int i = 0; i < NR; ++i) odd[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= ng; g += 2) {
    group_k<BITS, G, NR>(w, row_bytes, safe_chunks, g, xq, c, shuffle, mul, t.tail, acc);
    group_k<BITS, G, NR>(w, row_bytes, safe_chunks, g + 1, xq, c, shuffle, mul, t.tail, odd);
  }
  if (g < ng) group_k<BITS, G, NR>(w, row_bytes, safe_chunks, g, xq, c, shuffle, mul, t.tail, acc);
  for (int i = 0; i < NR; ++i) acc[i] = _mm256_add_ps(acc[i], odd[i]);
  for (int i = 0; i < NR; ++i) store_y(job, r0 + i, o, sum8(acc[i]) + bias[i]);
}

// One row after another also for one x row: these kernels unpack codes at ~2 GB/s a core (6-bit codes, groups of 16,
// AVX2 EPYC), far below what one stream reads, and the rows of two far-apart halves of the range in turn (qtiled.cpp's
// streams) measured 0.76-0.96x this order.
template <int BITS, int G>
LLMCTL_AVX2 void rows_k(const QJob& job, int64_t o0, int64_t o1) {
  static const Unpack16<BITS> unpack;
  static thread_local Scratch t;
  const __m256i shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(unpack.shuffle));
  const __m256i mul = _mm256_load_si256(reinterpret_cast<const __m256i*>(unpack.mul));
  const int64_t ng = job.groups;
  t.scales.resize(size_t(ng));
  t.biases.resize(size_t(ng));
  t.combined.resize(size_t(kMaxXRows * ng));
  for (int64_t t0 = o0; t0 < o1; t0 += kRowTile) {
    const int64_t t1 = std::min<int64_t>(o1, t0 + kRowTile);
    for (int64_t r0 = 0; r0 < job.batch; r0 += kMaxXRows) {
      const int64_t nr = std::min<int64_t>(kMaxXRows, job.batch - r0);
      for (int64_t o = t0; o < t1; ++o) {
        to_float(job.scales, job.w_dtype, o * ng, ng, t.scales.data());
        to_float(job.biases, job.w_dtype, o * ng, ng, t.biases.data());
        switch (nr) {
          case 1: row_k<BITS, G, 1>(job, o, r0, t, shuffle, mul); break;
          case 2: row_k<BITS, G, 2>(job, o, r0, t, shuffle, mul); break;
          case 3: row_k<BITS, G, 3>(job, o, r0, t, shuffle, mul); break;
          default: row_k<BITS, G, 4>(job, o, r0, t, shuffle, mul); break;
        }
      }
    }
  }
}

template <int BITS>
void rows_k_bits(const QJob& job, int64_t o0, int64_t o1) {
  switch (job.group_size) {
    case 16: return rows_k<BITS, 16>(job, o0, o1);
    case 32: return rows_k<BITS, 32>(job, o0, o1);
    case 64: return rows_k<BITS, 64>(job, o0, o1);
    default: return rows_k<BITS, 128>(job, o0, o1);
  }
}

}  // namespace

void qmatmul_rows_k_avx2(const QJob& job, int64_t o0, int64_t o1) {
  switch (job.bits) {
    case 2: return rows_k_bits<2>(job, o0, o1);
    case 3: return rows_k_bits<3>(job, o0, o1);
    case 4: return rows_k_bits<4>(job, o0, o1);
    case 5: return rows_k_bits<5>(job, o0, o1);
    case 6: return rows_k_bits<6>(job, o0, o1);
    default: return rows_k_bits<8>(job, o0, o1);
  }
}

}  // namespace detail
}  // namespace llmctl

#else  // not x86-64: qmatmul.cpp never picks these

namespace llmctl {
namespace detail {
void qmatmul_rows_k_avx2(const QJob&, int64_t, int64_t) { throw std::invalid_argument("AVX2 kernels exist only on x86-64"); }
}  // namespace detail
}  // namespace llmctl

#endif
