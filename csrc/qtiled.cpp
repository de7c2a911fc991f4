// The tiled layout of affine 4-/8-bit weights (qmatmul.h) and its products.
//
// In MLX's layout a row's codes are contiguous, so a one-row product (decoding) computes each output as a dot
// product along a row and pays for a horizontal sum, the group scales and a store per row: for the 768-wide rows
// of a ~100M model that bookkeeping costs as much as the multiplications. Here 16 rows are interleaved 4 bytes at
// a time: one 512-bit vector of codes holds 4 (8-bit) or 8 (4-bit) consecutive codes of each of 16 rows, so
// vpdpbusd against x's 4 bytes broadcast to every lane sums 16 rows at once, lane j holding row j's sum. No
// horizontal sum is left, the group's scales and biases are one 16-wide vector each, and a thread reads one
// contiguous stream. x is the same int16 as in qmatmul (error <= 2^-16 of its group's largest |x|), split into a
// high and a low signed byte (xq = 256 * high + low): two vpdpbusd per vector of codes for the two bytes.
// On AVX2 (no VNNI) the same tile is two 256-bit halves of 8 rows; the codes are widened to int16 (unpack against
// zero) and vpmaddwd multiplies them with the int16 x itself, 4 codes broadcast as one 64-bit pattern: the same
// sums (exact in int32), so the same error bound. One vpmaddwd takes 16 products, as two vpmaddubsw on x's two
// bytes would, with no saturation to mind for 8-bit codes (255 * 127 * 2 overflows vpmaddubsw's int16).
// Decoding on AVX2, a thread reads its range of tiles as two far-apart streams (tile_streams_avx2): one sequential
// stream per core leaves this CPU's memory system idle between the prefetchers' requests.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "qmatmul.h"
#include "quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMCTL_TILED_X86 1
#define LLMCTL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define LLMCTL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace llmctl {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// Bytes of one step: 4 codes of each of the tile's 16 rows (8-bit), 8 codes in two nibbles (4-bit).
constexpr int kStepBytes = 64;
// x rows from which AVX2 multiplies 4-bit codes by int8 x (the prompt kernel), and how many it takes a tile pass
constexpr int kPromptRows = 4;

void check_tiled(int dtype, int64_t out, int64_t in, int group_size, int bits) {
  check_quant_args(dtype, out, in, group_size, bits);
  if (group_size == 16) fail("the tiled layout takes groups of 32, 64 or 128, not 16");
  if (!tiled_supported(bits, kModeAffine, out))
    fail("the tiled layout takes affine 4- or 8-bit codes and a multiple of " + std::to_string(kTileRows) +
         " rows, not " + std::to_string(bits) + "-bit codes and " + std::to_string(out) + " rows");
}

// Codes as one byte each, (16, in), from a tile and into one.
void codes_of_tile(const uint8_t* tiled, int64_t in, int bits, uint8_t* codes) {
  const int per_step = bits == 8 ? 4 : 8;
  for (int64_t s = 0; s < in / per_step; ++s) {
    const uint8_t* v = tiled + s * kStepBytes;
    for (int j = 0; j < kTileRows; ++j) {
      uint8_t* c = codes + j * in + s * per_step;
      for (int b = 0; b < 4; ++b) {
        if (bits == 8) {
          c[b] = v[4 * j + b];
        } else {
          c[b] = v[4 * j + b] & 0x0F;
          c[b + 4] = v[4 * j + b] >> 4;
        }
      }
    }
  }
}

void tile_of_codes(const uint8_t* codes, int64_t in, int bits, uint8_t* tiled) {
  const int per_step = bits == 8 ? 4 : 8;
  for (int64_t s = 0; s < in / per_step; ++s) {
    uint8_t* v = tiled + s * kStepBytes;
    for (int j = 0; j < kTileRows; ++j) {
      const uint8_t* c = codes + j * in + s * per_step;
      for (int b = 0; b < 4; ++b) v[4 * j + b] = bits == 8 ? c[b] : uint8_t(c[b] | (c[b + 4] << 4));
    }
  }
}

// One tile's codes, MLX's rows (16 rows of in codes each) -> tiled, or back (`to_rows`); codes: (16, in) scratch.
void tile_codes(uint8_t* rows, uint8_t* tiled, int64_t in, int bits, bool to_rows, uint8_t* codes) {
  const int64_t row_bytes = in * bits / 8;
  if (to_rows) codes_of_tile(tiled, in, bits, codes);
  for (int j = 0; j < kTileRows; ++j) {
    uint8_t* r = rows + j * row_bytes;
    uint8_t* c = codes + j * in;
    if (bits == 8) {
      std::memcpy(to_rows ? r : c, to_rows ? c : r, size_t(in));
    } else if (to_rows) {
      for (int64_t i = 0; i < in / 2; ++i) r[i] = uint8_t(c[2 * i] | (c[2 * i + 1] << 4));
    } else {
      for (int64_t i = 0; i < in / 2; ++i) c[2 * i] = r[i] & 0x0F, c[2 * i + 1] = r[i] >> 4;
    }
  }
  if (!to_rows) tile_of_codes(codes, in, bits, tiled);
}

// (16, groups) values of `size` bytes each -> (groups, 16), or back.
void tile_params(uint8_t* p, int64_t groups, int size, bool to_rows, std::vector<uint8_t>& tmp) {
  if (!p) return;
  tmp.assign(p, p + kTileRows * groups * size);
  for (int j = 0; j < kTileRows; ++j)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t row_major = (j * groups + g) * size, tiled = (g * kTileRows + j) * size;
      std::memcpy(p + (to_rows ? row_major : tiled), tmp.data() + (to_rows ? tiled : row_major), size_t(size));
    }
}

void retile(uint32_t* wq, void* scales, void* biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
            int threads, bool to_rows) {
  check_tiled(dtype, out, in, group_size, bits);
  if (out * in == 0) return;
  if (!wq || !scales || !biases) fail("null pointer");
  const int64_t tiles = out / kTileRows, tile_bytes = kTileRows * in * bits / 8, groups = in / group_size;
  const int size = dtype == kFloat32 ? 4 : 2;
  const int n = detail::threads_for(threads, double(out) * double(in));
  detail::parallel_for(n, n, [&](int t) {
    std::vector<uint8_t> copy(static_cast<size_t>(tile_bytes)), codes(static_cast<size_t>(kTileRows * in)), tmp;
    for (int64_t tile = tiles * t / n; tile < tiles * (t + 1) / n; ++tile) {
      uint8_t* w = reinterpret_cast<uint8_t*>(wq) + tile * tile_bytes;
      std::memcpy(copy.data(), w, size_t(tile_bytes));
      if (to_rows) {
        tile_codes(w, copy.data(), in, bits, true, codes.data());
      } else {
        tile_codes(copy.data(), w, in, bits, false, codes.data());
      }
      const int64_t at = tile * kTileRows * groups * size;
      tile_params(static_cast<uint8_t*>(scales) + at, groups, size, to_rows, tmp);
      tile_params(static_cast<uint8_t*>(biases) + at, groups, size, to_rows, tmp);
    }
  });
}

// x prepared for the kernels: per group its int16 step sx and float32 sum; the int16 values split in bytes.
struct TiledX {
  std::vector<float> xf, sx, xsum;  // (batch, in), (batch, groups), (batch, groups)
  std::vector<int8_t> high, low;    // (batch, in + 64) each: 256 * high + low = x / sx, rounded
  std::vector<int16_t> q;           // (batch, in + 64): x / sx rounded, for the AVX2 kernels
  std::vector<int8_t> b;            // (batch, in + 64): x / sx rounded to int8 (|b| <= 127, sx = largest |x| / 127),
                                    // for the AVX2 prompt kernel of 4-bit codes
};

#ifdef LLMCTL_TILED_X86
// prepare's work for the AVX-512 kernels on float32 x (decoding's), vectorized: it runs on the calling thread
// before every product, while the pool's other threads wait. Returns false (nothing written) for inf or NaN.
LLMCTL_AVX512 bool prepare_avx512(TiledX& p, const float* x, int64_t batch, int64_t in, int group_size) {
  const int64_t groups = in / group_size, stride = in + 64;
  p.sx.resize(size_t(batch * groups));
  p.xsum.resize(size_t(batch * groups));
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < batch; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = x + r * in + g * group_size;
      __m512 sum = _mm512_setzero_ps(), amax = sum;
      for (int i = 0; i < group_size; i += 16) {
        const __m512 a = _mm512_loadu_ps(v + i);
        sum = _mm512_add_ps(sum, a);
        amax = _mm512_max_ps(amax, _mm512_and_ps(a, magnitude));
      }
      const float total = _mm512_reduce_add_ps(sum), largest = _mm512_reduce_max_ps(amax);
      if (!std::isfinite(total) || !std::isfinite(largest)) return false;
      p.xsum[size_t(r * groups + g)] = total;
      p.sx[size_t(r * groups + g)] = largest / detail::kXMax;
    }
  p.high.resize(size_t(batch * stride));
  p.low.resize(size_t(batch * stride));
  const __m512 hi = _mm512_set1_ps(detail::kXMax), lo = _mm512_set1_ps(-detail::kXMax);
  for (int64_t r = 0; r < batch; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float amax = p.sx[size_t(r * groups + g)] * detail::kXMax;
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? detail::kXMax / amax : 0.0f);
      const float* v = x + r * in + g * group_size;
      int8_t* high = p.high.data() + r * stride + g * group_size;
      int8_t* low = p.low.data() + r * stride + g * group_size;
      for (int i = 0; i < group_size; i += 16) {
        // as x_int16, low_byte and high_byte (cvtps rounds to nearest even, the default rounding mode)
        const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(v + i), inv))));
        const __m512i l = _mm512_srai_epi32(_mm512_slli_epi32(q, 24), 24);  // the low byte, signed
        _mm_storeu_si128(reinterpret_cast<__m128i*>(low + i), _mm512_cvtepi32_epi8(l));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(high + i), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(q, l), 8)));
      }
    }
  return true;
}
#endif

#ifdef LLMCTL_TILED_X86
// One group of x: its float32 sum and largest |x|; false where either is inf or NaN.
LLMCTL_AVX2 inline bool group_sum_max_avx2(const float* v, int group_size, float& total, float& largest) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 sum = _mm256_setzero_ps(), amax = sum;
  for (int i = 0; i < group_size; i += 8) {
    const __m256 a = _mm256_loadu_ps(v + i);
    sum = _mm256_add_ps(sum, a);
    amax = _mm256_max_ps(amax, _mm256_and_ps(a, magnitude));
  }
  alignas(32) float s[8], m[8];
  _mm256_store_ps(s, sum);
  _mm256_store_ps(m, amax);
  total = 0.0f, largest = 0.0f;
  for (int j = 0; j < 8; ++j) total += s[j], largest = std::max(largest, m[j]);
  return std::isfinite(total) && std::isfinite(largest);
}

// n bfloat16 values as float32 (their bits shifted)
LLMCTL_AVX2 void widen_bf16_avx2(const uint16_t* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) out[i] = bf16_to_float(x[i]);
}

// prepare's work for the AVX2 kernels on float32 x, rows [r0, r1): per group sx and xsum, then x / sx as int16 (as
// x_int16). False at the first group holding inf or NaN.
LLMCTL_AVX2 bool prepare_rows_avx2(TiledX& p, const float* x, int64_t r0, int64_t r1, int64_t in, int group_size) {
  const int64_t groups = in / group_size, stride = in + 64;
  const __m256 hi = _mm256_set1_ps(detail::kXMax), lo = _mm256_set1_ps(-detail::kXMax);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = x + r * in + g * group_size;
      float total, largest;
      if (!group_sum_max_avx2(v, group_size, total, largest)) return false;
      p.xsum[size_t(r * groups + g)] = total;
      p.sx[size_t(r * groups + g)] = largest / detail::kXMax;
      const __m256 inv = _mm256_set1_ps(largest > 0.0f ? detail::kXMax / largest : 0.0f);
      int16_t* q = p.q.data() + r * stride + g * group_size;
      for (int i = 0; i < group_size; i += 16) {  // cvtps rounds to nearest even (the default rounding mode)
        const __m256i a = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(v + i), inv))));
        const __m256i b = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(v + i + 8), inv))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
      }
    }
  return true;
}

// Rows split over the pool's threads, as prepare_int8_avx2 does (one row, decoding's, stays on the calling thread).
bool prepare_avx2(TiledX& p, const float* x, int64_t batch, int64_t in, int group_size, int threads) {
  const int64_t groups = in / group_size;
  p.sx.resize(size_t(batch * groups));
  p.xsum.resize(size_t(batch * groups));
  p.q.resize(size_t(batch * (in + 64)));
  const int n = int(std::min<int64_t>(batch, detail::threads_for(threads, double(batch) * double(in) * 4.0)));
  if (n <= 1) return prepare_rows_avx2(p, x, 0, batch, in, group_size);
  std::vector<char> finite(size_t(n), 1);
  detail::parallel_for(n, n, [&](int k) {
    finite[size_t(k)] = prepare_rows_avx2(p, x, batch * k / n, batch * (k + 1) / n, in, group_size);
  });
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}
#endif

#ifdef LLMCTL_TILED_X86
// x as int8 for the AVX2 prompt kernel: per group sx = largest |x| / 127, xsum, and x / sx rounded to nearest even
// (|x / sx| <= 127, so the error of each value is at most sx / 2 = largest |x| / 254). Rows are split over the pool's
// threads: a prompt's x (hundreds of rows) costs as much to prepare as a decode step's whole product.
// Rows [r0, r1) of prepare_int8_avx2's work; false at the first group holding inf or NaN.
LLMCTL_AVX2 bool prepare_int8_rows_avx2(TiledX& p, const float* x, int64_t r0, int64_t r1, int64_t in, int group_size) {
  const int64_t groups = in / group_size, stride = in + 64;
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float* v = x + r * in + g * group_size;
      float total, largest;
      if (!group_sum_max_avx2(v, group_size, total, largest)) return false;
      p.sx[size_t(r * groups + g)] = largest / 127.0f;
      const __m256 inv = _mm256_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
      int8_t* q = p.b.data() + r * stride + g * group_size;
      __m256i rounded = _mm256_setzero_si256();  // the sum of the rounded x, in steps
      for (int i = 0; i < group_size; i += 32) {  // cvtps rounds to nearest even; the packs interleave 128-bit lanes
        __m256i c[4];
        for (int j = 0; j < 4; ++j) {
          c[j] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * j), inv))));
          rounded = _mm256_add_epi32(rounded, c[j]);
        }
        const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(w, order));
      }
      // The biases multiply the sum of the same rounded x the codes do, so the product is (scale * code + bias) times
      // the rounded x: its error goes with |w| (the stated bound), where the exact sum would leave it with |scale *
      // code|, several times larger for codes that sit far from zero (4-bit codes 0..15 with a bias near -8 scales).
      alignas(32) int32_t n[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(n), rounded);
      int32_t steps = 0;
      for (int j = 0; j < 8; ++j) steps += n[j];
      p.xsum[size_t(r * groups + g)] = float(steps) * (largest / 127.0f);
    }
  return true;
}

bool prepare_int8_avx2(TiledX& p, const float* x, int64_t batch, int64_t in, int group_size, int threads) {
  const int64_t groups = in / group_size;
  p.sx.resize(size_t(batch * groups));
  p.xsum.resize(size_t(batch * groups));
  p.b.resize(size_t(batch * (in + 64)));
  const int n = int(std::min<int64_t>(batch, detail::threads_for(threads, double(batch) * double(in) * 4.0)));
  std::vector<char> finite(size_t(n), 1);
  detail::parallel_for(n, n, [&](int k) {
    finite[size_t(k)] = prepare_int8_rows_avx2(p, x, batch * k / n, batch * (k + 1) / n, in, group_size);
  });
  return std::all_of(finite.begin(), finite.end(), [](char f) { return f != 0; });
}
#endif

// What the kernels read of x besides its float32 copy: nothing (the portable loop), int16 (AVX2), bytes (AVX-512) or
// int8 (the AVX2 prompt kernel).
enum XForm { kXFloat, kXInt16, kXBytes, kXInt8 };

// Returns false when x holds inf or NaN (then only xf is filled).
bool prepare(TiledX& p, const void* x, int x_dtype, int64_t batch, int64_t in, int group_size, XForm form, int threads) {
  const int64_t groups = in / group_size, stride = in + 64;
  const bool bytes = form == kXBytes;
#ifdef LLMCTL_TILED_X86
  if (form == kXInt8 || form == kXInt16) {  // the AVX2 kernels: 16-bit x widened to float32 first
    const float* xf = static_cast<const float*>(x);
    if (x_dtype != kFloat32) {
      p.xf.resize(size_t(batch * in));
      if (x_dtype == kBFloat16) {
        widen_bf16_avx2(static_cast<const uint16_t*>(x), batch * in, p.xf.data());
      } else {
        for (int64_t i = 0; i < batch * in; ++i) p.xf[size_t(i)] = load_float(x, x_dtype, i);
      }
      xf = p.xf.data();
    }
    if (form == kXInt8 ? prepare_int8_avx2(p, xf, batch, in, group_size, threads)
                       : prepare_avx2(p, xf, batch, in, group_size, threads))
      return true;
    form = kXFloat;  // inf or NaN: the portable loop below carries them
  }
  if (bytes && x_dtype == kFloat32 && prepare_avx512(p, static_cast<const float*>(x), batch, in, group_size)) return true;
#endif
  p.xf.resize(size_t(batch * in));
  for (int64_t i = 0; i < batch * in; ++i) p.xf[size_t(i)] = load_float(x, x_dtype, i);
  p.sx.resize(size_t(batch * groups));
  p.xsum.resize(size_t(batch * groups));
  const bool finite = detail::group_steps(p.xf.data(), batch, in, group_size, p.xsum.data(), p.sx.data(), groups);
  if (!finite || form == kXFloat) return finite;
  p.high.assign(size_t(batch * stride), 0);
  p.low.assign(size_t(batch * stride), 0);
  for (int64_t r = 0; r < batch; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float amax = p.sx[size_t(r * groups + g)] * detail::kXMax;
      const float inv = amax > 0.0f ? detail::kXMax / amax : 0.0f;
      for (int i = 0; i < group_size; ++i) {
        const int32_t q = detail::x_int16(p.xf[size_t(r * in + g * group_size + i)], inv);
        p.low[size_t(r * stride + g * group_size + i)] = detail::low_byte(q);
        p.high[size_t(r * stride + g * group_size + i)] = detail::high_byte(q);
      }
    }
  return true;
}

#ifdef LLMCTL_TILED_X86
// n (a multiple of 16) codes as c * s + b, stored as float32 or (rounded to nearest even) bfloat16
LLMCTL_AVX512 void codes_to_values_avx512(const uint8_t* c, float s, float b, int n, void* out, int out_dtype) {
  const __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(b);
  for (int i = 0; i < n; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i));
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), sv, bv);
    if (out_dtype == kFloat32) {
      _mm512_storeu_ps(static_cast<float*>(out) + i, v);
    } else {  // as float_to_bf16 does for finite values
      const __m512i u = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), _mm512_cvtepi32_epi16(rounded));
    }
  }
}
#endif

#ifdef LLMCTL_TILED_X86
// codes_to_values_avx512 on AVX2
LLMCTL_AVX2 void codes_to_values_avx2(const uint8_t* c, float s, float b, int n, void* out, int out_dtype) {
  const __m256 sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b);
  for (int i = 0; i < n; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i));
    const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), sv, bv);
    if (out_dtype == kFloat32) {
      _mm256_storeu_ps(static_cast<float*>(out) + i, v);
    } else {  // as float_to_bf16 does for finite values
      const __m256i u = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), packed);
    }
  }
}
#endif

// The tile's 16 rows (16, in) of out_dtype (float32 or bfloat16): code * scale + bias in float32, as the kernels
// compute, then rounded to out_dtype. isa: kIsaAvx512 or kIsaAvx2 vectorize it, any other runs a scalar loop.
void dequantize_tile(const uint8_t* w, const void* scales, const void* biases, int dtype, int64_t in, int group_size,
                     int bits, int64_t tile, void* out, int out_dtype, std::vector<uint8_t>& codes, int isa) {
  const int64_t groups = in / group_size, tile_bytes = kTileRows * in * bits / 8;
  codes.resize(size_t(kTileRows * in));
  codes_of_tile(w + tile * tile_bytes, in, bits, codes.data());
  const int size = out_dtype == kFloat32 ? 4 : 2;
  for (int j = 0; j < kTileRows; ++j)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = (tile * groups + g) * kTileRows + j;
      const float s = load_float(scales, dtype, at), b = load_float(biases, dtype, at);
      const uint8_t* c = codes.data() + j * in + g * group_size;
      const int64_t o = j * in + g * group_size;
#ifdef LLMCTL_TILED_X86
      if (isa == kIsaAvx512) {
        codes_to_values_avx512(c, s, b, group_size, static_cast<char*>(out) + o * size, out_dtype);
        continue;
      }
      if (isa == kIsaAvx2) {
        codes_to_values_avx2(c, s, b, group_size, static_cast<char*>(out) + o * size, out_dtype);
        continue;
      }
#else
      (void)isa;
#endif
      for (int i = 0; i < group_size; ++i) store_float(out, out_dtype, o + i, float(c[i]) * s + b);
    }
}

struct TiledJob {
  const uint8_t* w;
  const void *scales, *biases;
  int dtype, group_size, bits, y_dtype;
  int64_t batch, in, out, groups;
  const TiledX* x;
  void* y;
};

void store(const TiledJob& job, int64_t r, int64_t o, const float* v) {
  for (int j = 0; j < kTileRows; ++j) store_float(job.y, job.y_dtype, r * job.out + o + j, v[j]);
}

// Any CPU, and x with inf or NaN: each tile dequantized to float32, then float32 dot products.
void tiles_scalar(const TiledJob& job, int64_t t0, int64_t t1) {
  std::vector<float> wf(size_t(kTileRows * job.in));
  std::vector<uint8_t> codes;
  float acc[kTileRows];
  for (int64_t t = t0; t < t1; ++t) {
    dequantize_tile(job.w, job.scales, job.biases, job.dtype, job.in, job.group_size, job.bits, t, wf.data(), kFloat32,
                    codes, kIsaScalar);
    for (int64_t r = 0; r < job.batch; ++r) {
      const float* x = job.x->xf.data() + r * job.in;
      for (int j = 0; j < kTileRows; ++j) {
        float sum = 0.0f;
        for (int64_t i = 0; i < job.in; ++i) sum += wf[size_t(j * job.in + i)] * x[i];
        acc[j] = sum;
      }
      store(job, r, t * kTileRows, acc);
    }
  }
}

#ifdef LLMCTL_TILED_X86

LLMCTL_AVX512 inline __m512 load_params(const void* p, int dtype, int64_t at) {
  if (dtype == kFloat32) return _mm512_loadu_ps(static_cast<const float*>(p) + at);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + at));
  if (dtype == kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc += codes (16 lanes of 4 unsigned bytes) . x's 4 signed bytes at p, broadcast to every lane by the instruction's
// {1to16} memory operand. Inline assembly: GCC neither folds the broadcast nor keeps acc in place with the
// intrinsic (a broadcast and a register copy per product, half the loop's instructions).
LLMCTL_AVX512 inline void dpbusd_broadcast(__m512i& acc, __m512i codes, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*reinterpret_cast<const int32_t*>(p)));
}

// One tile against one x row: 16 outputs in the lanes of acc, no horizontal sum anywhere.
template <int BITS, int DTYPE>
LLMCTL_AVX512 __m512 tile_avx512(const TiledJob& job, int64_t t, int64_t r) {
  const int G = job.group_size;
  constexpr int kPerStep = BITS == 8 ? 4 : 8;
  const int steps = G / kPerStep;
  const uint8_t* w = job.w + t * (kTileRows * job.in * BITS / 8);
  const int64_t stride = job.in + 64;
  const int8_t* xh = job.x->high.data() + r * stride;
  const int8_t* xl = job.x->low.data() + r * stride;
  const float* sx = job.x->sx.data() + r * job.groups;
  const float* xs = job.x->xsum.data() + r * job.groups;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < job.groups; ++g) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
    const uint8_t* wg = w + g * steps * kStepBytes;
    const int8_t *hg = xh + g * G, *lg = xl + g * G;
    // One sequential stream a thread: no software prefetch (asking 1-4 KB ahead measured 10-30% slower).
    for (int s = 0; s < steps; s += 2) {  // steps is even: G >= 32
      const __m512i a = _mm512_loadu_si512(wg + s * kStepBytes), b = _mm512_loadu_si512(wg + (s + 1) * kStepBytes);
      const int k = s * kPerStep;
      if constexpr (BITS == 4) {
        const __m512i a0 = _mm512_and_si512(a, nibble), a1 = _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble);
        const __m512i b0 = _mm512_and_si512(b, nibble), b1 = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
        dpbusd_broadcast(h0, a0, hg + k);
        dpbusd_broadcast(h1, a1, hg + k + 4);
        dpbusd_broadcast(l0, a0, lg + k);
        dpbusd_broadcast(l1, a1, lg + k + 4);
        dpbusd_broadcast(h0, b0, hg + k + 8);
        dpbusd_broadcast(h1, b1, hg + k + 12);
        dpbusd_broadcast(l0, b0, lg + k + 8);
        dpbusd_broadcast(l1, b1, lg + k + 12);
      } else {
        dpbusd_broadcast(h0, a, hg + k);
        dpbusd_broadcast(l0, a, lg + k);
        dpbusd_broadcast(h1, b, hg + k + 4);
        dpbusd_broadcast(l1, b, lg + k + 4);
      }
    }
    // 256 * high + low per lane: |sum| <= 255 * 127 * 128 * 257 < 2^31 for groups of up to 128 codes
    const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
    const int64_t at = (t * job.groups + g) * kTileRows;
    const __m512 scale = _mm512_mul_ps(load_params(job.scales, DTYPE, at), _mm512_set1_ps(sx[g]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc);
    acc = _mm512_fmadd_ps(load_params(job.biases, DTYPE, at), _mm512_set1_ps(xs[g]), acc);
  }
  return acc;
}

template <int BITS, int DTYPE>
LLMCTL_AVX512 void tiles_avx512(const TiledJob& job, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t r = 0; r < job.batch; ++r) {
      const __m512 acc = tile_avx512<BITS, DTYPE>(job, t, r);
      const int64_t at = r * job.out + t * kTileRows;
      if (job.y_dtype == kFloat32) {
        _mm512_storeu_ps(static_cast<float*>(job.y) + at, acc);
      } else {
        alignas(64) float v[kTileRows];
        _mm512_store_ps(v, acc);
        store(job, r, t * kTileRows, v);
      }
    }
}

template <int BITS>
void tiles_avx512_dtype(const TiledJob& job, int64_t t0, int64_t t1) {
  switch (job.dtype) {
    case kFloat32: tiles_avx512<BITS, kFloat32>(job, t0, t1); break;
    case kFloat16: tiles_avx512<BITS, kFloat16>(job, t0, t1); break;
    default: tiles_avx512<BITS, kBFloat16>(job, t0, t1); break;
  }
}

// ------------------------------------------------------------------------------------------- AVX2

LLMCTL_AVX2 inline __m256 load_params_avx2(const void* p, int dtype, int64_t at) {
  if (dtype == kFloat32) return _mm256_loadu_ps(static_cast<const float*>(p) + at);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + at));
  if (dtype == kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bfloat16: its bits, shifted
}

// One tile against NR x rows from r: rows 0-7 of the tile in the lanes of y[2i], rows 8-15 in y[2i + 1] for x row
// r + i. Each 32-byte half of a step holds 4 codes (8-bit) or 4 code pairs (4-bit nibbles) of 8 rows; unpacking its
// bytes against zero gives per 128-bit lane 2 rows' 4 codes as int16 (low: rows 0, 1 | 4, 5; high: rows 2, 3 | 6, 7),
// and vpmaddwd against the 4 matching x values repeated sums them in pairs; one vphaddd per group puts each row's two
// pairs together, in row order. The unpacked codes serve NR x rows (NR = 2 for several rows: 8 int32 sums and 4
// code vectors fill the 16 registers).
// group_avx2 adds group g of tile t to acc (2 NR vectors, as y below); tile_avx2 runs it over the tile's groups.
template <int BITS, int DTYPE, int NR>
LLMCTL_AVX2 inline __attribute__((always_inline)) void group_avx2(const TiledJob& job, int64_t t, int64_t r, int64_t g,
                                                                  __m256* acc) {
  const int G = job.group_size;
  constexpr int kPerStep = BITS == 8 ? 4 : 8;
  const int steps = G / kPerStep;
  const uint8_t* w = job.w + t * (kTileRows * job.in * BITS / 8);
  const int16_t* xq = job.x->q.data() + r * (job.in + 64);
  const int64_t stride = job.in + 64;
  const __m256i zero = _mm256_setzero_si256(), nibble = _mm256_set1_epi8(0x0F);
  {
    __m256i a_lo[NR], a_hi[NR], b_lo[NR], b_hi[NR];  // rows 0-7 (a), 8-15 (b); unpacked low/high bytes
    for (int i = 0; i < NR; ++i) a_lo[i] = a_hi[i] = b_lo[i] = b_hi[i] = zero;
    const uint8_t* wg = w + g * steps * kStepBytes;
    const int16_t* xg = xq + g * G;
    for (int s = 0; s < steps; ++s) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + s * kStepBytes));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + s * kStepBytes + 32));
      if constexpr (BITS == 8) {
        const __m256i al = _mm256_unpacklo_epi8(a, zero), ah = _mm256_unpackhi_epi8(a, zero);
        const __m256i bl = _mm256_unpacklo_epi8(b, zero), bh = _mm256_unpackhi_epi8(b, zero);
        for (int i = 0; i < NR; ++i) {
          int64_t x4;
          std::memcpy(&x4, xg + i * stride + s * kPerStep, 8);
          const __m256i x0 = _mm256_set1_epi64x(x4);
          a_lo[i] = _mm256_add_epi32(a_lo[i], _mm256_madd_epi16(al, x0));
          a_hi[i] = _mm256_add_epi32(a_hi[i], _mm256_madd_epi16(ah, x0));
          b_lo[i] = _mm256_add_epi32(b_lo[i], _mm256_madd_epi16(bl, x0));
          b_hi[i] = _mm256_add_epi32(b_hi[i], _mm256_madd_epi16(bh, x0));
        }
      } else {
        const __m256i a0 = _mm256_and_si256(a, nibble), a1 = _mm256_and_si256(_mm256_srli_epi16(a, 4), nibble);
        const __m256i b0 = _mm256_and_si256(b, nibble), b1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
        for (int i = 0; i < NR; ++i) {
          int64_t x4;
          std::memcpy(&x4, xg + i * stride + s * kPerStep, 8);
          const __m256i x0 = _mm256_set1_epi64x(x4);
          std::memcpy(&x4, xg + i * stride + s * kPerStep + 4, 8);
          const __m256i x1 = _mm256_set1_epi64x(x4);
          a_lo[i] = _mm256_add_epi32(a_lo[i], _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(a0, zero), x0),
                                                               _mm256_madd_epi16(_mm256_unpacklo_epi8(a1, zero), x1)));
          a_hi[i] = _mm256_add_epi32(a_hi[i], _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpackhi_epi8(a0, zero), x0),
                                                               _mm256_madd_epi16(_mm256_unpackhi_epi8(a1, zero), x1)));
          b_lo[i] = _mm256_add_epi32(b_lo[i], _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(b0, zero), x0),
                                                               _mm256_madd_epi16(_mm256_unpacklo_epi8(b1, zero), x1)));
          b_hi[i] = _mm256_add_epi32(b_hi[i], _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpackhi_epi8(b0, zero), x0),
                                                               _mm256_madd_epi16(_mm256_unpackhi_epi8(b1, zero), x1)));
        }
      }
    }
    // |sum| <= 128 * 255 * 32639 < 2^31 for groups of up to 128 codes
    const int64_t at = (t * job.groups + g) * kTileRows;
    const __m256 s0 = load_params_avx2(job.scales, DTYPE, at), s1 = load_params_avx2(job.scales, DTYPE, at + 8);
    const __m256 c0 = load_params_avx2(job.biases, DTYPE, at), c1 = load_params_avx2(job.biases, DTYPE, at + 8);
    for (int i = 0; i < NR; ++i) {
      const __m256i da = _mm256_hadd_epi32(a_lo[i], a_hi[i]), db = _mm256_hadd_epi32(b_lo[i], b_hi[i]);
      const int64_t rg = (r + i) * job.groups + g;
      const __m256 step = _mm256_set1_ps(job.x->sx[size_t(rg)]), sum = _mm256_set1_ps(job.x->xsum[size_t(rg)]);
      acc[2 * i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(da), _mm256_mul_ps(s0, step), acc[2 * i]);
      acc[2 * i + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(db), _mm256_mul_ps(s1, step), acc[2 * i + 1]);
      acc[2 * i] = _mm256_fmadd_ps(c0, sum, acc[2 * i]);
      acc[2 * i + 1] = _mm256_fmadd_ps(c1, sum, acc[2 * i + 1]);
    }
  }
}

template <int BITS, int DTYPE, int NR>
LLMCTL_AVX2 inline __attribute__((always_inline)) void tile_avx2(const TiledJob& job, int64_t t, int64_t r, __m256* y) {
  for (int i = 0; i < 2 * NR; ++i) y[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < job.groups; ++g) group_avx2<BITS, DTYPE, NR>(job, t, r, g, y);
}

// The prompt kernel of 4-bit codes: one tile against NR x rows of int8 (TiledX::b). The nibbles of each 32-byte half
// of a step go into vpmaddubsw as the unsigned bytes they are (4 codes of 8 rows), against 4 x bytes broadcast: each
// int16 lane sums 2 products (|.| <= 2 * 15 * 127), so the low and high nibbles' sums of 4 steps (32 codes) add up in
// int16 without overflow (<= 8 * 3810 = 30480 < 2^15); one vpmaddwd by ones per 32 codes then gives each row's int32
// sum, in row order. One multiply takes 32 products, twice vpmaddwd's 16: the int8 x this needs is the price.
template <int DTYPE, int NR>
LLMCTL_AVX2 inline __attribute__((always_inline)) void tile_q4_int8_avx2(const TiledJob& job, int64_t t, int64_t r,
                                                                         __m256* y) {
  const int G = job.group_size, steps = G / 8;
  const uint8_t* w = job.w + t * (kTileRows * job.in / 2);
  const int64_t stride = job.in + 64;
  const int8_t* xb = job.x->b.data() + r * stride;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[2 * NR];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t g = 0; g < job.groups; ++g) {
    __m256i d[2 * NR];
    for (auto& v : d) v = _mm256_setzero_si256();
    const uint8_t* wg = w + g * steps * kStepBytes;
    const int8_t* xg = xb + g * G;
    for (int c = 0; c < steps; c += 4) {  // 32 codes a chunk
      __m256i h[2 * NR];
      for (auto& v : h) v = _mm256_setzero_si256();
#pragma GCC unroll 1  // unrolled, GCC computes every product of the 4 steps first and spills them all
      for (int s = c; s < c + 4; ++s) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + s * kStepBytes));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + s * kStepBytes + 32));
        const __m256i a0 = _mm256_and_si256(a, nibble), a1 = _mm256_and_si256(_mm256_srli_epi16(a, 4), nibble);
        const __m256i b0 = _mm256_and_si256(b, nibble), b1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
        for (int i = 0; i < NR; ++i) {
          int32_t x4;
          std::memcpy(&x4, xg + i * stride + s * 8, 4);
          const __m256i x0 = _mm256_set1_epi32(x4);
          std::memcpy(&x4, xg + i * stride + s * 8 + 4, 4);
          const __m256i x1 = _mm256_set1_epi32(x4);
          h[2 * i] = _mm256_add_epi16(h[2 * i], _mm256_add_epi16(_mm256_maddubs_epi16(a0, x0), _mm256_maddubs_epi16(a1, x1)));
          h[2 * i + 1] = _mm256_add_epi16(h[2 * i + 1], _mm256_add_epi16(_mm256_maddubs_epi16(b0, x0), _mm256_maddubs_epi16(b1, x1)));
        }
      }
      for (int i = 0; i < 2 * NR; ++i) d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(h[i], ones));
    }
    const int64_t at = (t * job.groups + g) * kTileRows;
    const __m256 s0 = load_params_avx2(job.scales, DTYPE, at), s1 = load_params_avx2(job.scales, DTYPE, at + 8);
    const __m256 c0 = load_params_avx2(job.biases, DTYPE, at), c1 = load_params_avx2(job.biases, DTYPE, at + 8);
    for (int i = 0; i < NR; ++i) {
      const int64_t rg = (r + i) * job.groups + g;
      const __m256 step = _mm256_set1_ps(job.x->sx[size_t(rg)]), sum = _mm256_set1_ps(job.x->xsum[size_t(rg)]);
      acc[2 * i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[2 * i]), _mm256_mul_ps(s0, step), acc[2 * i]);
      acc[2 * i + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[2 * i + 1]), _mm256_mul_ps(s1, step), acc[2 * i + 1]);
      acc[2 * i] = _mm256_fmadd_ps(c0, sum, acc[2 * i]);
      acc[2 * i + 1] = _mm256_fmadd_ps(c1, sum, acc[2 * i + 1]);
    }
  }
  for (int i = 0; i < 2 * NR; ++i) y[i] = acc[i];
}

// The AVX2 prompt kernel (several x rows, int16 x: the same sums as tile_avx2, so the same error bound). Each x row
// reuses a tile's codes, so they are widened once (widen_tile_avx2) into int16 pairs: per pair of codes p two vectors,
// rows 0-7 then 8-15, row j's codes 2p and 2p + 1 side by side in int32 lane j. vpmaddwd against x's pair (2p, 2p + 1)
// broadcast then leaves row j's sum in lane j: no unpacking, no horizontal add, and two accumulators an x row, so
// kPromptInt16Rows x rows share each load of codes (their int32 sums, the codes and the broadcast fill the 16
// registers). A tile's widened codes (16 * in * 2 bytes: 24 KB for 768 columns) stay in L1 while the rows pass.
constexpr int kPromptInt16Rows = 6;
struct alignas(32) WideCodes {
  int16_t v[16];
};
// Batches from which qmatmul_tiled takes the prompt kernel (below: tile_avx2, which needs no widening)
constexpr int64_t kPromptInt16From = 4;

template <int BITS>
LLMCTL_AVX2 void widen_tile_avx2(const uint8_t* w, int64_t in, int16_t* wide) {
  constexpr int kPerStep = BITS == 8 ? 4 : 8;
  // per 128-bit lane (4 rows of 4 bytes): codes 0, 1 (first) or 2, 3 (second) of each row, zero-extended to int16
  const __m256i first = _mm256_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1,
                                         0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1);
  const __m256i second = _mm256_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1,
                                          2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t s = 0; s < in / kPerStep; ++s) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kStepBytes));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * kStepBytes + 32));
    __m256i* o = reinterpret_cast<__m256i*>(wide + s * kPerStep * kTileRows);
    for (int half = 0; half < kPerStep / 4; ++half) {  // 4-bit: low nibbles hold codes 0-3, high nibbles 4-7
      const __m256i ah = BITS == 8 ? a : _mm256_and_si256(half ? _mm256_srli_epi16(a, 4) : a, nibble);
      const __m256i bh = BITS == 8 ? b : _mm256_and_si256(half ? _mm256_srli_epi16(b, 4) : b, nibble);
      _mm256_store_si256(o + 4 * half, _mm256_shuffle_epi8(ah, first));
      _mm256_store_si256(o + 4 * half + 1, _mm256_shuffle_epi8(bh, first));
      _mm256_store_si256(o + 4 * half + 2, _mm256_shuffle_epi8(ah, second));
      _mm256_store_si256(o + 4 * half + 3, _mm256_shuffle_epi8(bh, second));
    }
  }
}

// NR x rows from r against tile t's widened codes: x row r + i's 16 outputs into y[2i] (rows 0-7), y[2i + 1].
template <int DTYPE, int NR>
LLMCTL_AVX2 inline __attribute__((always_inline)) void tile_prompt_avx2(const TiledJob& job, const int16_t* wide,
                                                                        int64_t t, int64_t r, __m256* y) {
  const int G = job.group_size;
  const int64_t stride = job.in + 64;
  const int16_t* xq = job.x->q.data() + r * stride;
  for (int i = 0; i < 2 * NR; ++i) y[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < job.groups; ++g) {
    __m256i d[2 * NR];
    for (auto& v : d) v = _mm256_setzero_si256();
    const __m256i* wg = reinterpret_cast<const __m256i*>(wide + g * G * kTileRows);
    const int16_t* xg = xq + g * G;
    for (int p = 0; p < G / 2; ++p) {
      const __m256i w0 = _mm256_load_si256(wg + 2 * p), w1 = _mm256_load_si256(wg + 2 * p + 1);
      for (int i = 0; i < NR; ++i) {
        int32_t x2;
        std::memcpy(&x2, xg + i * stride + 2 * p, 4);
        const __m256i xb = _mm256_set1_epi32(x2);
        d[2 * i] = _mm256_add_epi32(d[2 * i], _mm256_madd_epi16(w0, xb));
        d[2 * i + 1] = _mm256_add_epi32(d[2 * i + 1], _mm256_madd_epi16(w1, xb));
      }
    }
    // as tile_avx2: |sum| <= 128 * 255 * 32639 < 2^31, and the same float32 operations in the same order
    const int64_t at = (t * job.groups + g) * kTileRows;
    const __m256 s0 = load_params_avx2(job.scales, DTYPE, at), s1 = load_params_avx2(job.scales, DTYPE, at + 8);
    const __m256 c0 = load_params_avx2(job.biases, DTYPE, at), c1 = load_params_avx2(job.biases, DTYPE, at + 8);
    for (int i = 0; i < NR; ++i) {
      const int64_t rg = (r + i) * job.groups + g;
      const __m256 step = _mm256_set1_ps(job.x->sx[size_t(rg)]), sum = _mm256_set1_ps(job.x->xsum[size_t(rg)]);
      y[2 * i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[2 * i]), _mm256_mul_ps(s0, step), y[2 * i]);
      y[2 * i + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[2 * i + 1]), _mm256_mul_ps(s1, step), y[2 * i + 1]);
      y[2 * i] = _mm256_fmadd_ps(c0, sum, y[2 * i]);
      y[2 * i + 1] = _mm256_fmadd_ps(c1, sum, y[2 * i + 1]);
    }
  }
}

// 8 floats as bfloat16, as float_to_bf16 rounds them (to nearest even; NaN: a quiet NaN of the same sign)
LLMCTL_AVX2 inline __m128i bf16_of_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i h = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i nan = _mm256_or_si256(_mm256_set1_epi32(0x7FC0), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)));
  h = _mm256_blendv_epi8(h, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// y's 16 outputs of x row r from two vectors
LLMCTL_AVX2 inline void store_avx2(const TiledJob& job, int64_t t, int64_t r, const __m256* y) {
  const int64_t at = r * job.out + t * kTileRows;
  if (job.y_dtype == kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(job.y) + at, y[0]);
    _mm256_storeu_ps(static_cast<float*>(job.y) + at + 8, y[1]);
  } else if (job.y_dtype == kBFloat16) {  // a bfloat16 model's prompt: millions of outputs, vectorized
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(job.y) + at), bf16_of_avx2(y[0]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(job.y) + at + 8), bf16_of_avx2(y[1]));
  } else {
    alignas(32) float v[kTileRows];
    _mm256_store_ps(v, y[0]);
    _mm256_store_ps(v + 8, y[1]);
    store(job, r, t * kTileRows, v);
  }
}

// Tiles [t0, t1) against x row r as S streams read side by side (fmatmul's streams_avx2 for codes): per pass, tile t of
// each of S equal parts of the range, a group of each in turn. One sequential stream per core leaves the memory
// system idle between the prefetchers' requests; far-apart streams keep more lines in flight. Each tile sums its
// groups in order as tile_avx2 does, so every output is the same however the tiles were split over threads.
// Two streams: 4-bit codes are twice the work per byte of bfloat16 rows, so fewer streams keep the core fed (AVX2
// EPYC, 1 thread, bench/decode.py's model, CPU time per token, in turn: 2 streams 1.24x one at 4 bits and 1.12x at 8
// bits per round, medians; 4 streams slower than one at 8 bits. A micro-benchmark of 4-bit tiles, group 64, over
// matrices far beyond L3: 2 streams read a 2048 x 768 matrix 1.23-1.24x one stream, 4 streams 1.10-1.19x, a 32000 x
// 768 one 1.17-1.19x and 0.75-0.81x; 8-bit tiles 1.12-1.20x with 2 streams; prefetching 512 bytes ahead: 0.5-0.8x).
constexpr int kDecodeStreams = 2;
template <int BITS, int DTYPE, int S>
LLMCTL_AVX2 void tile_streams_avx2(const TiledJob& job, int64_t t0, int64_t t1, int64_t r) {
  const int64_t part = (t1 - t0) / S;
  for (int64_t t = t0; t < t0 + part; ++t) {
    __m256 acc[S][2];
    for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < job.groups; ++g)
      for (int s = 0; s < S; ++s) group_avx2<BITS, DTYPE, 1>(job, t + s * part, r, g, acc[s]);
    for (int s = 0; s < S; ++s) store_avx2(job, t + s * part, r, acc[s]);
  }
  // the tiles left over as one stream
  if constexpr (S > 1) tile_streams_avx2<BITS, DTYPE, 1>(job, t0 + S * part, t1, r);
}

// Tiles [t0, t1) against every x row: KIND 0 the int16 kernel, x rows two at a time; KIND 1 the int8 prompt kernel
// (4-bit codes), x rows kPromptRows at a time; KIND 2 the int16 prompt kernel, kPromptInt16Rows at a time. x rows in
// blocks of kXBlock, so that a block's x stays in L2 while every tile of the range passes over it (the tiles' codes
// then stream from memory once per block).
constexpr int64_t kXBlock = 128;
template <int BITS, int DTYPE, int KIND>
LLMCTL_AVX2 void tiles_avx2(const TiledJob& job, int64_t t0, int64_t t1) {
  constexpr int NR = KIND == 1 ? kPromptRows : KIND == 2 ? kPromptInt16Rows : 2;
  __m256 y[2 * NR];
  if constexpr (KIND == 0) {
    if (job.batch == 1) return tile_streams_avx2<BITS, DTYPE, kDecodeStreams>(job, t0, t1, 0);
  }
  std::vector<WideCodes> wide(size_t(KIND == 2 ? job.in : 0));  // a tile's widened codes: 16 * in int16
  const int16_t* w16 = wide.data()->v;
  for (int64_t r0 = 0; r0 < job.batch; r0 += kXBlock) {
    const int64_t r1 = std::min(job.batch, r0 + kXBlock);
    for (int64_t t = t0; t < t1; ++t) {
      if constexpr (KIND == 2) widen_tile_avx2<BITS>(job.w + t * (kTileRows * job.in * BITS / 8), job.in,
                                                     wide.data()->v);
      int64_t r = r0;
      for (; r + NR <= r1; r += NR) {
        if constexpr (KIND == 1) {
          tile_q4_int8_avx2<DTYPE, NR>(job, t, r, y);
        } else if constexpr (KIND == 2) {
          tile_prompt_avx2<DTYPE, NR>(job, w16, t, r, y);
        } else {
          tile_avx2<BITS, DTYPE, NR>(job, t, r, y);
        }
        for (int i = 0; i < NR; ++i) store_avx2(job, t, r + i, y + 2 * i);
      }
      if constexpr (KIND == 2) {  // the last 1-5 rows of the block in one pass too
        switch (r1 - r) {
          case 5: tile_prompt_avx2<DTYPE, 5>(job, w16, t, r, y); break;
          case 4: tile_prompt_avx2<DTYPE, 4>(job, w16, t, r, y); break;
          case 3: tile_prompt_avx2<DTYPE, 3>(job, w16, t, r, y); break;
          case 2: tile_prompt_avx2<DTYPE, 2>(job, w16, t, r, y); break;
          case 1: tile_prompt_avx2<DTYPE, 1>(job, w16, t, r, y); break;
          default: break;
        }
        for (int64_t i = 0; r + i < r1; ++i) store_avx2(job, t, r + i, y + 2 * i);
        continue;
      }
      for (; r < r1; ++r) {
        if constexpr (KIND == 1) {
          tile_q4_int8_avx2<DTYPE, 1>(job, t, r, y);
        } else {
          tile_avx2<BITS, DTYPE, 1>(job, t, r, y);
        }
        store_avx2(job, t, r, y);
      }
    }
  }
}

template <int BITS, int KIND>
void tiles_avx2_dtype(const TiledJob& job, int64_t t0, int64_t t1) {
  switch (job.dtype) {
    case kFloat32: tiles_avx2<BITS, kFloat32, KIND>(job, t0, t1); break;
    case kFloat16: tiles_avx2<BITS, kFloat16, KIND>(job, t0, t1); break;
    default: tiles_avx2<BITS, kBFloat16, KIND>(job, t0, t1); break;
  }
}

#endif

}  // namespace

bool tiled_supported(int bits, int mode, int64_t out) {
  return mode == kModeAffine && (bits == 4 || bits == 8) && out % kTileRows == 0;
}

bool tiled_fast() { return best_isa() == kIsaAvx512 || best_isa() == kIsaAvx2; }

void to_tiled(uint32_t* wq, void* scales, void* biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
              int threads) {
  retile(wq, scales, biases, dtype, out, in, group_size, bits, threads, false);
}

void from_tiled(uint32_t* wq, void* scales, void* biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
                int threads) {
  retile(wq, scales, biases, dtype, out, in, group_size, bits, threads, true);
}

void dequantize_tiled(const uint32_t* wq, const void* scales, const void* biases, int dtype, int64_t out, int64_t in,
                      int group_size, int bits, int64_t row0, int64_t row1, void* dst, int dst_dtype, int threads,
                      int isa) {
  check_tiled(dtype, out, in, group_size, bits);
  isa = resolve_isa(isa);
  if (dst_dtype != kFloat32 && dst_dtype != kBFloat16)
    fail("dst dtype code " + std::to_string(dst_dtype) + " is not 0 (float32) or 2 (bfloat16)");
  if (row0 < 0 || row1 > out || row0 > row1 || row0 % kTileRows || row1 % kTileRows)
    fail("rows [" + std::to_string(row0) + ", " + std::to_string(row1) + ") are not whole tiles of " +
         std::to_string(kTileRows) + " within " + std::to_string(out));
  if (row0 == row1 || in == 0) return;
  if (!wq || !scales || !biases || !dst) fail("null pointer");
  const int64_t t0 = row0 / kTileRows, tiles = (row1 - row0) / kTileRows;
  const int n = int(std::min<int64_t>(tiles, detail::threads_for(threads, double(row1 - row0) * double(in))));
  detail::parallel_for(n, n, [&](int k) {
    std::vector<uint8_t> codes;
    for (int64_t t = tiles * k / n; t < tiles * (k + 1) / n; ++t)
      dequantize_tile(reinterpret_cast<const uint8_t*>(wq), scales, biases, dtype, in, group_size, bits, t0 + t,
                      static_cast<char*>(dst) + t * kTileRows * in * (dst_dtype == kFloat32 ? 4 : 2), dst_dtype, codes,
                      isa);
  });
}

void qmatmul_tiled(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq, const void* scales,
                   const void* biases, int w_dtype, int64_t out, int group_size, int bits, void* y, int y_dtype,
                   int threads, int isa, bool x_int8) {
  check_tiled(w_dtype, out, in, group_size, bits);
  check_dtype(x_dtype, "x");
  check_dtype(y_dtype, "y");
  if (batch < 0) fail("batch " + std::to_string(batch) + " is negative");
  if (threads < 0) fail("threads must be >= 0 (0: all hardware threads)");
  isa = resolve_isa(isa);  // AVX-512 and AVX2 have tiled kernels; any other isa runs the portable loop
  if (batch * out == 0) return;
  if (!x || !wq || !scales || !biases || !y) fail("null pointer");
  if (in == 0) {
    for (int64_t i = 0; i < batch * out; ++i) store_float(y, y_dtype, i, 0.0f);
    return;
  }
  static thread_local TiledX prepared;  // reused: decoding makes ~100 calls a token
  // Several rows of x with 4-bit codes on AVX2 (a prompt), where the caller asks: the int8 kernel
  const bool int8 = x_int8 && isa == kIsaAvx2 && bits == 4 && batch >= kPromptRows;
  const XForm form = isa == kIsaAvx512 ? kXBytes : int8 ? kXInt8 : isa == kIsaAvx2 ? kXInt16 : kXFloat;
  const bool finite = prepare(prepared, x, x_dtype, batch, in, group_size, form, threads);
  TiledJob job{reinterpret_cast<const uint8_t*>(wq), scales, biases, w_dtype, group_size, bits, y_dtype,
               batch, in, out, in / group_size, &prepared, y};
  void (*tiles)(const TiledJob&, int64_t, int64_t) = tiles_scalar;
#ifdef LLMCTL_TILED_X86
  if (form == kXBytes && finite) tiles = bits == 4 ? tiles_avx512_dtype<4> : tiles_avx512_dtype<8>;
  if (form == kXInt16 && finite) {
    const bool prompt = batch >= kPromptInt16From;
    tiles = bits == 4 ? (prompt ? tiles_avx2_dtype<4, 2> : tiles_avx2_dtype<4, 0>)
                      : (prompt ? tiles_avx2_dtype<8, 2> : tiles_avx2_dtype<8, 0>);
  }
  if (form == kXInt8 && finite) tiles = tiles_avx2_dtype<4, 1>;
#endif
  const int64_t n_tiles = out / kTileRows;
  const int n = int(std::min<int64_t>(n_tiles, detail::threads_for(threads, double(out) * double(in) * (bits / 8.0 + double(batch)))));
  // One contiguous range of tiles a thread (a thread that has not started yet still leaves its range to the others:
  // tasks are claimed). Four ranges a thread, as qmatmul makes, measured 10-35% slower over calls of 150-600 KB of
  // codes (the 110M model's matrices): every range restarts the streams the prefetchers follow.
  detail::parallel_for(n, n, [&](int k) { tiles(job, n_tiles * k / n, n_tiles * (k + 1) / n); });
}

}  // namespace llmctl
