// CPU quantize / dequantize / pack / unpack in MLX's affine layout, threaded over groups of rows.
#include "quant.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace llmctl {
namespace {

constexpr int kMaxGroup = 128;
// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 16;

// Runs fn(begin, end) over [0, n) split into contiguous ranges, one per thread; the first
// exception thrown by any range is rethrown here after all threads joined.
void parallel_for(int64_t n, int64_t cost_per_item, int threads,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  static const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());  // glibc reads /sys
  int64_t workers = threads > 0 ? threads : hardware;
  workers = std::min(workers, std::max<int64_t>(1, n * cost_per_item / kMinElementsPerThread));
  workers = std::min(workers, n);
  if (workers == 1) {
    fn(0, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  std::vector<std::thread> pool;
  pool.reserve(workers);
  for (int64_t t = 0; t < workers; ++t) {
    const int64_t begin = n * t / workers, end = n * (t + 1) / workers;
    pool.emplace_back([&, begin, end] {
      try {
        fn(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// 32 codes fill exactly BITS words of the stream; unrolled so every shift is a constant.
template <int BITS>
inline void pack32(const uint32_t* codes, uint32_t* words) {
  uint64_t acc = 0;
  int filled = 0, out = 0;
#pragma GCC unroll 32
  for (int k = 0; k < 32; ++k) {
    acc |= uint64_t(codes[k]) << filled;
    filled += BITS;
    if (filled >= 32) {
      words[out++] = uint32_t(acc);
      acc >>= 32;
      filled -= 32;
    }
  }
}

template <int DT>
inline void load_group(const void* w, int64_t offset, int n, float* out) {
  for (int j = 0; j < n; ++j) out[j] = load_float(w, DT, offset + j);
}

template <int DT, int BITS>
void quantize_groups(const void* w, int group_size, int64_t g0, int64_t g1, uint32_t* wq,
                     void* scales, void* biases, std::atomic<bool>& nonfinite) {
  constexpr float n_bins = float((1 << BITS) - 1);
  const int words_per_group = group_size * BITS / 32;
  alignas(64) float x[kMaxGroup];
  alignas(64) float lo[kMaxGroup / 2];
  alignas(64) float hi[kMaxGroup / 2];
  alignas(64) uint32_t codes[kMaxGroup];
  for (int64_t g = g0; g < g1; ++g) {
    load_group<DT>(w, g * group_size, group_size, x);
    // Min and max by halving (elementwise steps vectorize; a running float reduction would not
    // without -ffast-math). The order does not matter: min and max are exact.
    int half = group_size / 2;
    for (int j = 0; j < half; ++j) {
      lo[j] = std::min(x[j], x[j + half]);
      hi[j] = std::max(x[j], x[j + half]);
    }
    for (half /= 2; half > 0; half /= 2) {
      for (int j = 0; j < half; ++j) {
        lo[j] = std::min(lo[j], lo[j + half]);
        hi[j] = std::max(hi[j], hi[j + half]);
      }
    }
    // inf and NaN have every exponent bit set; they are refused rather than packed as garbage.
    uint32_t nonfinite_here = 0;
    for (int j = 0; j < group_size; ++j)
      nonfinite_here |= uint32_t((float_bits(x[j]) & 0x7F800000u) == 0x7F800000u);
    if (nonfinite_here) nonfinite.store(true, std::memory_order_relaxed);
    const float w_min = lo[0], w_max = hi[0];
    float scale, bias;
    affine_params(w_min, w_max, n_bins, &scale, &bias);
    for (int j = 0; j < group_size; ++j) codes[j] = affine_code(x[j], scale, bias, n_bins);
    uint32_t* out = wq + g * words_per_group;
    for (int c = 0; c < group_size; c += 32) pack32<BITS>(codes + c, out + c / 32 * BITS);
    store_float(scales, DT, g, scale);
    store_float(biases, DT, g, bias);
  }
}

// With fewer levels than group elements (bits <= 6 at group 128, <= 5 at 64) each level's value is
// computed and converted once per group and the elements look it up.
template <int DT, int BITS>
void dequantize_groups(const uint32_t* wq, const void* scales, const void* biases, int group_size,
                       int64_t g0, int64_t g1, void* out, int out_dtype) {
  constexpr int kLevels = 1 << BITS;
  const bool by_level = kLevels < group_size;
  const int n = by_level ? kLevels : group_size;  // values to compute per group
  const int words_per_group = group_size * BITS / 32;
  alignas(64) uint32_t codes[kMaxGroup];
  alignas(64) float y[kMaxGroup];
  alignas(64) uint16_t y16[kMaxGroup];
  for (int64_t g = g0; g < g1; ++g) {
    const uint32_t* in = wq + g * words_per_group;
    for (int c = 0; c < group_size; c += 32) unpack32<BITS>(in + c / 32 * BITS, codes + c);
    const float scale = load_float(scales, DT, g), bias = load_float(biases, DT, g);
    for (int i = 0; i < n; ++i) y[i] = affine_value(by_level ? uint32_t(i) : codes[i], scale, bias, DT);
    const int64_t offset = g * group_size;
    if (out_dtype == kFloat32) {
      float* o = static_cast<float*>(out) + offset;
      for (int j = 0; j < group_size; ++j) o[j] = y[by_level ? codes[j] : j];
      continue;
    }
    if (out_dtype == kFloat16) {
      for (int i = 0; i < n; ++i) y16[i] = float_to_half(y[i]);
    } else {
      for (int i = 0; i < n; ++i) y16[i] = float_to_bf16(y[i]);
    }
    uint16_t* o = static_cast<uint16_t*>(out) + offset;
    for (int j = 0; j < group_size; ++j) o[j] = y16[by_level ? codes[j] : j];
  }
}

// Groups of 16 (GGUF's Q6_K, Q3_K, Q2_K read exactly): 16 codes may end inside a word, so each 32-code run of
// whole words is unpacked at once and its two groups take their own scale and bias. g0, g1 count runs of 32.
template <int DT, int BITS>
void dequantize_pairs(const uint32_t* wq, const void* scales, const void* biases, int64_t g0, int64_t g1, void* out,
                      int out_dtype) {
  alignas(64) uint32_t codes[32];
  for (int64_t g = g0; g < g1; ++g) {
    unpack32<BITS>(wq + g * BITS, codes);
    for (int j = 0; j < 32; ++j) {
      const int64_t group = 2 * g + j / 16;
      const float y = affine_value(codes[j], load_float(scales, DT, group), load_float(biases, DT, group), DT);
      store_float(out, out_dtype, g * 32 + j, y);
    }
  }
}

// Turns runtime (dtype, bits) into template arguments.
template <template <int, int> class Fn, typename... Args>
void dispatch(int dtype, int bits, Args&&... args) {
  auto with_bits = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    switch (bits) {
      case 2: return Fn<DT, 2>::run(args...);
      case 3: return Fn<DT, 3>::run(args...);
      case 4: return Fn<DT, 4>::run(args...);
      case 5: return Fn<DT, 5>::run(args...);
      case 6: return Fn<DT, 6>::run(args...);
      case 8: return Fn<DT, 8>::run(args...);
    }
  };
  if (dtype == kFloat32) with_bits(std::integral_constant<int, kFloat32>{});
  if (dtype == kFloat16) with_bits(std::integral_constant<int, kFloat16>{});
  if (dtype == kBFloat16) with_bits(std::integral_constant<int, kBFloat16>{});
}

template <int DT, int BITS>
struct QuantizeFn {
  template <typename... Args>
  static void run(Args&&... args) { quantize_groups<DT, BITS>(args...); }
};

template <int DT, int BITS>
struct DequantizeFn {
  template <typename... Args>
  static void run(Args&&... args) { dequantize_groups<DT, BITS>(args...); }
};

template <int DT, int BITS>
struct DequantizePairsFn {
  template <typename... Args>
  static void run(Args&&... args) { dequantize_pairs<DT, BITS>(args...); }
};

void check_pointer(const void* p, const char* what) {
  if (p == nullptr) fail(std::string(what) + " is a null pointer");
}

}  // namespace

void check_dtype(int dtype, const char* what) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    fail(std::string(what) + " dtype code " + std::to_string(dtype) +
         " is not 0 (float32), 1 (float16) or 2 (bfloat16)");
}

void check_quant_args(int dtype, int64_t rows, int64_t cols, int group_size, int bits) {
  check_dtype(dtype, "input");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
    fail("bits " + std::to_string(bits) + " is not one of 2, 3, 4, 5, 6, 8");
  if (group_size != 16 && group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size " + std::to_string(group_size) + " is not one of 16, 32, 64, 128");
  if (group_size == 16 && cols % 32 != 0)  // codes are packed 32 to a run of whole words
    fail("group_size 16 needs a last dimension that is a multiple of 32, not " + std::to_string(cols));
  if (rows < 0 || cols < 0)
    fail("shape (" + std::to_string(rows) + ", " + std::to_string(cols) + ") is negative");
  if (cols % group_size != 0)
    fail("last dimension " + std::to_string(cols) + " is not a multiple of group_size " +
         std::to_string(group_size));
}

void quantize(const void* w, int dtype, int64_t rows, int64_t cols, int group_size, int bits,
              uint32_t* wq, void* scales, void* biases, int threads) {
  check_quant_args(dtype, rows, cols, group_size, bits);
  if (group_size == 16) fail("quantize makes groups of 32, 64 or 128; groups of 16 are only read (GGUF K-quants)");
  if (rows * cols == 0) return;
  check_pointer(w, "w");
  check_pointer(wq, "wq");
  check_pointer(scales, "scales");
  check_pointer(biases, "biases");
  // Rows hold whole groups, so the matrix is one run of independent groups.
  std::atomic<bool> nonfinite{false};
  parallel_for(rows * cols / group_size, group_size, threads, [&](int64_t g0, int64_t g1) {
    dispatch<QuantizeFn>(dtype, bits, w, group_size, g0, g1, wq, scales, biases, nonfinite);
  });
  if (nonfinite.load()) fail("w contains inf or NaN; quantize needs finite weights");
}

void dequantize(const uint32_t* wq, const void* scales, const void* biases, int dtype, int64_t rows,
                int64_t cols, int group_size, int bits, void* out, int out_dtype, int threads) {
  check_quant_args(dtype, rows, cols, group_size, bits);
  check_dtype(out_dtype, "output");
  if (rows * cols == 0) return;
  check_pointer(wq, "wq");
  check_pointer(scales, "scales");
  check_pointer(biases, "biases");
  check_pointer(out, "out");
  if (group_size == 16) {
    parallel_for(rows * cols / 32, 32, threads, [&](int64_t g0, int64_t g1) {
      dispatch<DequantizePairsFn>(dtype, bits, wq, scales, biases, g0, g1, out, out_dtype);
    });
    return;
  }
  parallel_for(rows * cols / group_size, group_size, threads, [&](int64_t g0, int64_t g1) {
    dispatch<DequantizeFn>(dtype, bits, wq, scales, biases, group_size, g0, g1, out, out_dtype);
  });
}

int64_t words_per_row(int64_t cols, int bits) { return (cols * bits + 31) / 32; }

void pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, uint32_t* words, int threads) {
  if (bits < 1 || bits > 8) fail("bits " + std::to_string(bits) + " is not in 1..8");
  if (rows < 0 || cols < 0) fail("negative shape");
  if (rows * cols == 0) return;
  check_pointer(codes, "codes");
  check_pointer(words, "words");
  const int64_t stride = words_per_row(cols, bits);
  parallel_for(rows, cols, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* in = codes + r * cols;
      uint32_t* out = words + r * stride;
      uint64_t acc = 0;
      int filled = 0;
      uint32_t seen = 0;
      for (int64_t j = 0; j < cols; ++j) {
        seen |= in[j];
        acc |= uint64_t(in[j]) << filled;
        filled += bits;
        if (filled >= 32) {
          *out++ = uint32_t(acc);
          acc >>= 32;
          filled -= 32;
        }
      }
      if (filled > 0) *out = uint32_t(acc);
      if (seen >> bits) {
        const int64_t j = std::find_if(in, in + cols, [&](uint8_t c) { return c >> bits; }) - in;
        fail("code " + std::to_string(in[j]) + " at row " + std::to_string(r) + ", column " +
             std::to_string(j) + " does not fit in " + std::to_string(bits) + " bits (0.." +
             std::to_string((1 << bits) - 1) + ")");
      }
    }
  });
}

void unpack(const uint32_t* words, int64_t rows, int64_t cols, int bits, uint8_t* codes,
            int threads) {
  if (bits < 1 || bits > 8) fail("bits " + std::to_string(bits) + " is not in 1..8");
  if (rows < 0 || cols < 0) fail("negative shape");
  if (rows * cols == 0) return;
  check_pointer(words, "words");
  check_pointer(codes, "codes");
  const int64_t stride = words_per_row(cols, bits);
  parallel_for(rows, cols, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* in = words + r * stride;
      uint8_t* out = codes + r * cols;
      for (int64_t j = 0; j < cols; ++j) out[j] = uint8_t(extract_code(in, j, bits));
    }
  });
}

bool has_cuda() {
#ifdef LLMCTL_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace llmctl
