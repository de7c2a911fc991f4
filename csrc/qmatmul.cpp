// Quantized matmul on the CPU: argument checks, x preparation, a persistent thread pool, the scalar
// and NEON kernels, NF4 (de)quantization; the x86 SIMD kernels live in qmatmul_x86.cpp.
#include "qmatmul.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#define LLMCTL_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "quant.h"

namespace llmctl {

const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

namespace detail {
const int16_t kNF4Int16[16] = {-8192, -5703, -4301, -3235, -2330, -1514, -746, 0,
                               652,   1318,  2016,  2768,  3610,  4609,  5922, 8192};
}  // namespace detail

namespace {

using detail::QJob;

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// ---- a persistent pool: decode runs ~100 small products per token, too many to start threads for.
// Tasks are claimed from a shared counter, so the caller never waits for a worker that has not woken
// up yet (on a busy machine it may not run for milliseconds): it simply takes the tasks itself.

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may still wait at exit
    return *pool;
  }

  // fn(task) for task in [0, tasks), on the calling thread and up to threads - 1 workers; returns when
  // all are done and rethrows the first exception. A second caller while a run is in flight runs
  // everything itself.
  void run(int tasks, int threads, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (tasks <= 1 || threads <= 1 || !busy.owns_lock()) {
      for (int i = 0; i < tasks; ++i) fn(i);
      return;
    }
    while (int(workers_.size()) < threads - 1) {
      const int index = int(workers_.size()) + 1;
      const uint64_t seen = generation_.load();  // a new worker must not miss the run below
      workers_.emplace_back([this, index, seen] { work(index, seen); });
      workers_.back().detach();
    }
    error_ = nullptr;
    fn_ = &fn;
    total_ = tasks;
    participants_ = threads;
    done_.store(0, std::memory_order_relaxed);
    const uint32_t run_id = uint32_t(generation_.load() + 1);
    claim_.store(uint64_t(run_id) << 32, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work_on(run_id);
    while (done_.load(std::memory_order_acquire) != tasks) relax();
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // A forked child has none of the parent's workers: forget them (they are not ours to join).
  void forget_workers() {
    for (auto& t : workers_) t = std::thread();
    workers_.clear();
    new (&run_mutex_) std::mutex();
    new (&mutex_) std::mutex();
  }

 private:
  Pool() {
    const char* spin = std::getenv("LLMCTL_SPIN_US");
    spin_us_ = spin ? std::atoi(spin) : 200;
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, [] { Pool::get().forget_workers(); });
#endif
  }

  static void relax() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  // Claims and runs tasks of run `run_id` until none is left; a late worker finds the counter of a
  // later run (another id) and claims nothing, so it never runs a finished run's function.
  void work_on(uint32_t run_id) {
    uint64_t current = claim_.load(std::memory_order_acquire);
    while (uint32_t(current >> 32) == run_id && int(current & 0xFFFFFFFFu) < total_) {
      if (!claim_.compare_exchange_weak(current, current + 1, std::memory_order_acq_rel)) continue;
      const int task = int(current & 0xFFFFFFFFu);
      try {
        (*fn_)(task);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
      current = claim_.load(std::memory_order_acquire);
    }
  }

  // Spin for spin_us_ after each run (the next product usually follows within microseconds), then
  // sleep until the next one.
  void work(int index, uint64_t seen) {
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int k = 0; generation_.load(std::memory_order_acquire) == seen; ++k) {
        relax();
        if ((k & 255) == 255 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < participants_) work_on(uint32_t(seen));
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> claim_{0};  // (run id << 32) | next task
  std::atomic<int> done_{0};
  const std::function<void(int)>* fn_ = nullptr;
  int total_ = 0, participants_ = 0;
  int spin_us_ = 200;
  std::exception_ptr error_;
};

// Asked once: glibc reads /sys for it, which costs more than a small product.
int hardware_threads() {
  static const int n = int(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

bool isa_available(int isa) {
  switch (isa) {
    case kIsaScalar:
      return true;
#if defined(__x86_64__) || defined(_M_X64)
    case kIsaAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case kIsaAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c");
#endif
#if defined(__aarch64__)
    case kIsaNeon:
      return true;
#endif
    default:
      return false;
  }
}

void unpack_group(const uint32_t* words, int n, int bits, uint8_t* codes) {
  for (int c = 0; c < n; c += 32, words += bits) {
    switch (bits) {
      case 2: unpack32<2>(words, codes + c); break;
      case 3: unpack32<3>(words, codes + c); break;
      case 4: unpack32<4>(words, codes + c); break;
      case 5: unpack32<5>(words, codes + c); break;
      case 6: unpack32<6>(words, codes + c); break;
      default: unpack32<8>(words, codes + c); break;
    }
  }
}

// x as float32; for the x86 kernels also as int16 per group, each group scaled by its largest |x|.
// For 4- and 8-bit codes the kernels split each 16-bit lane of packed codes into its 16 / bits codes
// with shifts and masks: lane k of phase j holds code phases * k + j, so x is laid out in chunks of
// phases * lanes values, phase by phase. Returns false when x holds inf or NaN (no int16 for those).
// With `bytes` (the AVX-512 kernels of one x row and affine 4-/8-bit codes), also xb: the same int16 values as
// two signed bytes each, laid out for vpdpbusd against the packed codes as they are stored.
bool prepare_x(QJob& job, const void* x, int x_dtype, bool want_int16, int phases, int lanes, bool bytes) {
  const int64_t B = job.batch, K = job.in, ng = job.groups, G = job.group_size;
  job.xb.clear();  // the job is reused across calls: an empty xb tells the kernels to take the int16 path
  job.xf.resize(size_t(B * K));
  if (x_dtype == kFloat32) {
    std::memcpy(job.xf.data(), x, size_t(B * K) * sizeof(float));
  } else {
    for (int64_t i = 0; i < B * K; ++i) job.xf[size_t(i)] = load_float(x, x_dtype, i);
  }
  job.xsum.assign(size_t(B * (ng + 1)), 0.0f);
  job.sx.assign(size_t(B * (ng + 1)), 0.0f);
  const bool finite = detail::group_steps(job.xf.data(), B, K, int(G), job.xsum.data(), job.sx.data(), ng + 1);
  if (!want_int16 || !finite) return finite;
  job.in_pad = (K + 127) / 128 * 128;
  if (bytes) {
    job.xb.assign(size_t(B * 2 * job.in_pad), 0);
  } else {
    job.xq.assign(size_t(B * job.in_pad), 0);
  }
  static thread_local std::vector<int16_t> natural;
  natural.resize(size_t(K));
  const int phase_shift = phases == 4 ? 2 : phases == 2 ? 1 : 0, lane_shift = lanes == 32 ? 5 : 4;
  const int64_t chunk = int64_t(phases) * lanes;
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const float amax = job.sx[size_t(r * (ng + 1) + g)] * detail::kXMax;
      const float inv = amax > 0.0f ? detail::kXMax / amax : 0.0f;
      const float* v = job.xf.data() + r * K + g * G;
      for (int64_t i = 0; i < G; ++i) natural[size_t(g * G + i)] = int16_t(detail::x_int16(v[i], inv));
    }
    if (bytes) {  // steps of 512 / bits codes: [high even | high odd | low even | low odd] (4-bit) or [high | low]
      const int64_t step = 512 / job.bits, half = job.bits == 4 ? step / 2 : step;
      int8_t* out = job.xb.data() + r * 2 * job.in_pad;
      for (int64_t base = 0; base < K; base += step) {
        int8_t* o = out + base * 2;
        const int16_t* v = natural.data() + base;
        const int64_t n = std::min<int64_t>(step, K - base);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t slot = job.bits == 4 ? (i & 1) * half + (i >> 1) : i;
          o[slot] = detail::high_byte(v[i]);
          o[step + slot] = detail::low_byte(v[i]);
        }
      }
      continue;  // the byte kernel reads xb only
    }
    int16_t* q = job.xq.data() + r * job.in_pad;
    if (phases == 1) {
      std::copy(natural.begin(), natural.end(), q);
      continue;
    }
    for (int64_t base = 0; base < K; base += chunk) {  // x[base + k] goes to lane k / phases of phase k % phases
      const int64_t n = std::min<int64_t>(chunk, K - base);
      for (int64_t k = 0; k < n; ++k)
        q[base + ((k & (phases - 1)) << lane_shift) + (k >> phase_shift)] = natural[size_t(base + k)];
    }
  }
  return true;
}

// y = x @ W^T in float32, one group at a time: sum_i x_i * value(code_i) * s + b * sum_i x_i. Codes are unpacked in
// runs of whole words (a group, or two groups of 16).
void qmatmul_rows_scalar(const QJob& job, int64_t o0, int64_t o1) {
  const int G = job.group_size, bits = job.bits, run = std::max(G, 32);
  const int64_t K = job.in, ng = job.groups, row_words = K * bits / 32;
  std::vector<float> acc(size_t(job.batch));
  uint8_t codes[128];
  float values[128];
  for (int64_t o = o0; o < o1; ++o) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t c = 0; c < K / run; ++c) {
      unpack_group(job.wq + o * row_words + c * run * bits / 32, run, bits, codes);
      for (int i = 0; i < run; ++i) values[i] = job.mode == kModeNF4 ? kNF4[codes[i]] : float(codes[i]);
      for (int64_t g = c * run / G; g < (c + 1) * run / G; ++g) {
        const float* v = values + (g * G - c * run);
        const float s = load_float(job.scales, job.w_dtype, o * ng + g);
        const float b = job.biases ? load_float(job.biases, job.w_dtype, o * ng + g) : 0.0f;
        for (int64_t r = 0; r < job.batch; ++r) {
          const float* xr = job.xf.data() + r * K + g * G;
          float dot = 0.0f;
          for (int i = 0; i < G; ++i) dot += xr[i] * v[i];
          acc[size_t(r)] += s * dot + b * job.xsum[size_t(r * (ng + 1) + g)];
        }
      }
    }
    for (int64_t r = 0; r < job.batch; ++r) detail::store_y(job, r, o, acc[size_t(r)]);
  }
}

void check_nf4_args(int dtype, int64_t rows, int64_t cols, int group_size) {
  check_quant_args(dtype, rows, cols, group_size, 4);
  if (group_size == 16) fail("nf4 takes groups of 32, 64 or 128, not 16");
}

}  // namespace

namespace detail {

void parallel_for(int tasks, int threads, const std::function<void(int)>& fn) { Pool::get().run(tasks, threads, fn); }
int hardware_threads() { return llmctl::hardware_threads(); }

int threads_for(int threads, double work) {
  const int max_threads = threads > 0 ? threads : llmctl::hardware_threads();
  return int(std::max<int64_t>(1, std::min<int64_t>(max_threads, int64_t(work / 65536.0))));
}

bool group_steps(const float* x, int64_t rows, int64_t in, int group_size, float* xsum, float* sx, int64_t stride) {
  bool finite = true;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < in / group_size; ++g) {
      const float* v = x + r * in + g * group_size;
      float sum[8] = {}, amax[8] = {};  // eight independent lanes, so the loop vectorizes
      for (int i = 0; i < group_size; i += 8) {
        for (int j = 0; j < 8; ++j) {
          sum[j] += v[i + j];
          amax[j] = std::max(amax[j], std::fabs(v[i + j]));
        }
      }
      for (int j = 1; j < 8; ++j) {
        sum[0] += sum[j];
        amax[0] = std::max(amax[0], amax[j]);
      }
      finite = finite && std::isfinite(sum[0]) && std::isfinite(amax[0]);
      xsum[r * stride + g] = sum[0];
      sx[r * stride + g] = amax[0] / kXMax;
    }
  }
  return finite;
}

#if defined(__aarch64__)
// NEON: each group's values unpacked to float, then a 4-lane float32 dot product with x.
void qmatmul_rows_neon(const QJob& job, int64_t o0, int64_t o1) {
  const int G = job.group_size, bits = job.bits;
  const int64_t K = job.in, ng = job.groups, row_words = K * bits / 32;
  std::vector<float> acc(size_t(job.batch));
  uint8_t codes[128];
  float values[128];
  for (int64_t o = o0; o < o1; ++o) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t g = 0; g < ng; ++g) {
      unpack_group(job.wq + o * row_words + g * G * bits / 32, G, bits, codes);
      for (int i = 0; i < G; ++i) values[i] = job.mode == kModeNF4 ? kNF4[codes[i]] : float(codes[i]);
      const float s = load_float(job.scales, job.w_dtype, o * ng + g);
      const float b = job.biases ? load_float(job.biases, job.w_dtype, o * ng + g) : 0.0f;
      for (int64_t r = 0; r < job.batch; ++r) {
        const float* xr = job.xf.data() + r * K + g * G;
        float32x4_t d0 = vdupq_n_f32(0.0f), d1 = vdupq_n_f32(0.0f);
        for (int i = 0; i < G; i += 8) {
          d0 = vfmaq_f32(d0, vld1q_f32(xr + i), vld1q_f32(values + i));
          d1 = vfmaq_f32(d1, vld1q_f32(xr + i + 4), vld1q_f32(values + i + 4));
        }
        acc[size_t(r)] += s * vaddvq_f32(vaddq_f32(d0, d1)) + b * job.xsum[size_t(r * (ng + 1) + g)];
      }
    }
    for (int64_t r = 0; r < job.batch; ++r) store_y(job, r, o, acc[size_t(r)]);
  }
}

// NEON's dot-product kernel, affine 4-/8-bit codes in MLX's layout: the codes of a group, offset to signed bytes
// (c - 8 or c - 128), go into sdot against x's high and low bytes (xq = 256 * high + low, the same int16 x as the x86
// kernels), and sum(c * xq) = 256 * sum(c' * high) + sum(c' * low) + offset * sum(xq): exact in int32 (|.| <= 128 *
// 128 * 32639 * 257 / 256 < 2^31 for groups of up to 128), so the same error bound as the other int16 kernels. The
// 4-bit codes are zipped from their nibbles into x's order; a group's codes serve every row of x.
template <int BITS>
LLMCTL_DOTPROD void rows_neon_dot(const QJob& job, int64_t o0, int64_t o1) {
  const int G = job.group_size;
  const int64_t K = job.in, ng = job.groups, row_bytes = K * BITS / 8, stride = 2 * job.in_pad;
  constexpr int kOffset = BITS == 8 ? 128 : 8;
  std::vector<float> acc(size_t(job.batch));
  std::vector<float32x4_t> lanes(size_t(job.batch));
  int8x16_t c[8];  // a group's codes, offset
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* w = reinterpret_cast<const uint8_t*>(job.wq) + o * row_bytes;
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(lanes.begin(), lanes.end(), vdupq_n_f32(0.0f));
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* wg = w + g * G * BITS / 8;
      if constexpr (BITS == 8) {
        for (int k = 0; k < G / 16; ++k) c[k] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wg + 16 * k), vdupq_n_u8(0x80)));
      } else {
        for (int k = 0; k < G / 32; ++k) {
          const uint8x16_t b = vld1q_u8(wg + 16 * k), eight = vdupq_n_u8(8);
          const uint8x16_t lo = vandq_u8(b, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(b, 4);
          c[2 * k] = vreinterpretq_s8_u8(vsubq_u8(vzip1q_u8(lo, hi), eight));
          c[2 * k + 1] = vreinterpretq_s8_u8(vsubq_u8(vzip2q_u8(lo, hi), eight));
        }
      }
      const float s = load_float(job.scales, job.w_dtype, o * ng + g), b = load_float(job.biases, job.w_dtype, o * ng + g);
      for (int64_t r = 0; r < job.batch; ++r) {
        const int8_t* xh = job.xb.data() + r * stride + g * G;
        const int8_t* xl = xh + job.in_pad;
        int32x4_t h = vdupq_n_s32(0), l = vdupq_n_s32(0);
        for (int k = 0; k < G / 16; ++k) {
          h = vdotq_s32(h, c[k], vld1q_s8(xh + 16 * k));
          l = vdotq_s32(l, c[k], vld1q_s8(xl + 16 * k));
        }
        const int64_t rg = r * (ng + 1) + g;
        const float step = s * job.sx[size_t(rg)];
        const int32x4_t d = vaddq_s32(vshlq_n_s32(h, 8), l);
        lanes[size_t(r)] = vfmaq_n_f32(lanes[size_t(r)], vcvtq_f32_s32(d), step);
        acc[size_t(r)] += step * float(kOffset * job.xqsum[size_t(rg)]) + b * job.xsum[size_t(rg)];
      }
    }
    for (int64_t r = 0; r < job.batch; ++r) store_y(job, r, o, acc[size_t(r)] + vaddvq_f32(lanes[size_t(r)]));
  }
}

void qmatmul_rows_neon_dot(const QJob& job, int64_t o0, int64_t o1) {
  if (job.bits == 4) {
    rows_neon_dot<4>(job, o0, o1);
  } else {
    rows_neon_dot<8>(job, o0, o1);
  }
}

bool neon_dotprod() {
#if defined(__linux__)
  static const bool has = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
  return has;
#elif defined(__APPLE__)
  return true;  // every Apple silicon core has them
#else
  return false;
#endif
}
#else
void qmatmul_rows_neon(const QJob&, int64_t, int64_t) { fail("NEON kernels exist only on arm64"); }
void qmatmul_rows_neon_dot(const QJob&, int64_t, int64_t) { fail("NEON kernels exist only on arm64"); }
bool neon_dotprod() { return false; }
#endif

void split_x_bytes(QJob& job) {
  const int64_t B = job.batch, ng = job.groups, G = job.group_size, pad = job.in_pad;
  job.xb.assign(size_t(B * 2 * pad), 0);
  job.xqsum.assign(size_t(B * (ng + 1)), 0);
  for (int64_t r = 0; r < B; ++r) {
    const int16_t* q = job.xq.data() + r * pad;
    int8_t* high = job.xb.data() + r * 2 * pad;
    for (int64_t i = 0; i < job.in; ++i) {
      high[i] = high_byte(q[i]);
      high[pad + i] = low_byte(q[i]);
      job.xqsum[size_t(r * (ng + 1) + i / G)] += q[i];
    }
  }
}

}  // namespace detail

bool cpu_runs(int isa) { return isa == kIsaAuto || isa_available(isa); }

int resolve_isa(int isa) {
  if (isa < kIsaAuto || isa > kIsaNeon) fail("isa code " + std::to_string(isa) + " is not 0..4");
  if (isa == kIsaAuto) return best_isa();
  if (!isa_available(isa)) fail(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels");
  return isa;
}

int best_isa() {  // asked once: the decode step and qmatmul ask on every product
  static const int best = [] {
    for (int isa : {kIsaAvx512, kIsaAvx2, kIsaNeon})
      if (isa_available(isa)) return isa;
    return int(kIsaScalar);
  }();
  return best;
}

const char* isa_name(int isa) {
  switch (isa) {
    case kIsaScalar: return "scalar";
    case kIsaAvx2: return "avx2";
    case kIsaAvx512: return "avx512";
    case kIsaNeon: return "neon";
    default: return "auto";
  }
}

void qmatmul(const void* x, int x_dtype, int64_t batch, int64_t in, const uint32_t* wq,
             const void* scales, const void* biases, int w_dtype, int64_t out, int group_size,
             int bits, int mode, void* y, int y_dtype, int threads, int isa) {
  check_quant_args(w_dtype, out, in, group_size, bits);
  check_dtype(x_dtype, "x");
  check_dtype(y_dtype, "y");
  if (mode != kModeAffine && mode != kModeNF4) fail("mode " + std::to_string(mode) + " is not 0 (affine) or 1 (nf4)");
  if (mode == kModeNF4 && bits != 4) fail("nf4 codes are 4 bits, not " + std::to_string(bits));
  if (batch < 0) fail("batch " + std::to_string(batch) + " is negative");
  if (threads < 0) fail("threads must be >= 0 (0: all hardware threads)");
  isa = resolve_isa(isa);
  // Groups of 16 (AVX2 and AVX-512 CPUs) and 2/3/5/6-bit codes (AVX2) take qmatmul_k.cpp's kernels; the other SIMD
  // kernels unpack whole groups of 32 or more, so groups of 16 run the scalar loop on NEON.
  const bool k_kernel = mode == kModeAffine && ((isa == kIsaAvx2 && (bits != 4 && bits != 8)) ||
                                                ((isa == kIsaAvx2 || isa == kIsaAvx512) && group_size == 16));
  if (group_size == 16 && !k_kernel) isa = kIsaScalar;
  if (batch * out == 0) return;
  for (auto [p, what] : {std::pair<const void*, const char*>{x, "x"}, {wq, "wq"}, {scales, "scales"}, {y, "y"}})
    if (p == nullptr) fail(std::string(what) + " is a null pointer");
  if (mode == kModeAffine && biases == nullptr) fail("biases is a null pointer (affine mode needs them)");
  if (in == 0) {
    for (int64_t i = 0; i < batch * out; ++i) store_float(y, y_dtype, i, 0.0f);
    return;
  }

  // One job per calling thread, reused: its buffers keep their capacity from call to call (decode
  // makes ~100 small calls per token, too many for fresh allocations each time).
  static thread_local QJob this_threads_job;
  QJob& job = this_threads_job;  // a reference, so the workers' lambdas below see this thread's job
  job.batch = batch, job.in = in, job.out = out, job.groups = in / group_size;
  job.group_size = group_size, job.bits = bits, job.mode = mode, job.w_dtype = w_dtype, job.y_dtype = y_dtype;
  job.wq = wq, job.scales = scales, job.biases = mode == kModeNF4 ? nullptr : biases, job.y = y;
  const bool simd = isa == kIsaAvx2 || isa == kIsaAvx512;
  const bool dot = isa == kIsaNeon && mode == kModeAffine && (bits == 4 || bits == 8) && detail::neon_dotprod();
  const int phases = simd && (bits == 4 || bits == 8) && !k_kernel ? 16 / bits : 1, lanes = isa == kIsaAvx512 ? 32 : 16;
  const bool bytes = isa == kIsaAvx512 && batch == 1 && mode == kModeAffine && (bits == 4 || bits == 8) && !k_kernel;
  if (!prepare_x(job, x, x_dtype, simd || dot, phases, lanes, bytes)) {
    isa = kIsaScalar;  // inf/NaN: let float32 carry them
  } else if (dot) {
    detail::split_x_bytes(job);
  }
  auto rows = isa == kIsaScalar ? qmatmul_rows_scalar
              : k_kernel        ? detail::qmatmul_rows_k_avx2
              : isa == kIsaAvx512 ? detail::qmatmul_rows_avx512
              : isa == kIsaAvx2 ? detail::qmatmul_rows_avx2
              : isa == kIsaNeon ? (dot ? detail::qmatmul_rows_neon_dot : detail::qmatmul_rows_neon)
                                : qmatmul_rows_scalar;

  // Threads only where each reads at least ~64 KiB of weights or does as much work; four tasks per
  // thread (of whole 16-row tiles), so a thread that starts late is made up for by the others.
  const double work = double(out) * double(in) * (bits / 8.0 + double(batch));
  const int n = int(std::min<int64_t>(out, detail::threads_for(threads, work)));
  const int64_t tiles = (out + 15) / 16;
  const int tasks = int(std::min<int64_t>(tiles, n == 1 ? 1 : 4 * n));
  Pool::get().run(tasks, n, [&](int t) {
    rows(job, std::min(out, tiles * t / tasks * 16), std::min(out, tiles * (t + 1) / tasks * 16));
  });
}

void quantize_nf4(const void* w, int dtype, int64_t rows, int64_t cols, int group_size, uint32_t* wq,
                  void* scales, int threads) {
  check_nf4_args(dtype, rows, cols, group_size);
  if (rows * cols == 0) return;
  if (!w || !wq || !scales) fail("null pointer");
  float mid[15];  // a value goes to the level whose midpoints bracket it
  for (int k = 0; k < 15; ++k) mid[k] = 0.5f * (kNF4[k] + kNF4[k + 1]);
  const int64_t n_groups = rows * cols / group_size;
  std::atomic<bool> nonfinite{false};
  const int n = detail::threads_for(threads, double(rows) * double(cols));
  Pool::get().run(n, n, [&](int t) {
    uint32_t codes[128];
    for (int64_t g = n_groups * t / n; g < n_groups * (t + 1) / n; ++g) {
      float amax = 0.0f;
      for (int i = 0; i < group_size; ++i) amax = std::max(amax, std::fabs(load_float(w, dtype, g * group_size + i)));
      if (!std::isfinite(amax)) nonfinite.store(true);
      // Codes are taken against the absmax as it is stored, so dequantize rebuilds the same values.
      store_float(scales, dtype, g, amax);
      const float stored = load_float(scales, dtype, g);
      const float inv = stored > 0.0f ? 1.0f / stored : 0.0f;
      for (int i = 0; i < group_size; ++i) {
        const float v = load_float(w, dtype, g * group_size + i) * inv;
        uint32_t c = 0;
        while (c < 15 && v > mid[c]) ++c;
        codes[i] = c;
      }
      uint32_t* out = wq + g * group_size / 8;
      for (int i = 0; i < group_size; i += 8) {
        uint32_t word = 0;
        for (int k = 0; k < 8; ++k) word |= codes[i + k] << (4 * k);
        out[i / 8] = word;
      }
    }
  });
  if (nonfinite.load()) fail("w contains inf or NaN; quantize needs finite weights");
}

void dequantize_nf4(const uint32_t* wq, const void* scales, int dtype, int64_t rows, int64_t cols,
                    int group_size, void* out, int out_dtype, int threads) {
  check_nf4_args(dtype, rows, cols, group_size);
  check_dtype(out_dtype, "output");
  if (rows * cols == 0) return;
  if (!wq || !scales || !out) fail("null pointer");
  const int64_t n_groups = rows * cols / group_size;
  const int n = detail::threads_for(threads, double(rows) * double(cols));
  Pool::get().run(n, n, [&](int t) {
    for (int64_t g = n_groups * t / n; g < n_groups * (t + 1) / n; ++g) {
      const float s = load_float(scales, dtype, g);
      for (int i = 0; i < group_size; ++i) {
        const int64_t j = g * group_size + i;
        store_float(out, out_dtype, j, kNF4[(wq[j / 8] >> (4 * (j % 8))) & 15u] * s);
      }
    }
  });
}

}  // namespace llmctl
