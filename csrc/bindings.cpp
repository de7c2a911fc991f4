// pybind11 module llmctl._C: buffers come in as (address, byte count) pairs, and each count is checked against the
// bytes the kernel reads or writes before it runs, so a wrong size is a ValueError, never an access out of bounds.
// std::invalid_argument -> ValueError. llmctl/kernels.py is the door in: it checks shapes and dtypes first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "decode.h"
#include "fmatmul.h"
#include "qmatmul.h"
#include "quant.h"

namespace py = pybind11;

namespace {

// A caller's buffer: (address, byte count).
using Buffer = std::pair<uintptr_t, int64_t>;

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// The product of sizes, refused when one is negative or it overflows.
int64_t bytes_of(std::initializer_list<int64_t> factors, const char* what) {
  int64_t n = 1;
  for (int64_t f : factors) {
    if (f < 0) fail(std::string(what) + ": a size is negative");
    if (__builtin_mul_overflow(n, f, &n)) fail(std::string(what) + ": its size overflows 64 bits");
  }
  return n;
}

int64_t dtype_bytes(int dtype, const char* what) {
  llmctl::check_dtype(dtype, what);
  return dtype == llmctl::kFloat32 ? 4 : 2;
}

// The buffer's address once it is known to hold the `needed` bytes the kernel touches.
template <typename T>
T* span(const Buffer& b, int64_t needed, const char* what) {
  if (b.second < 0) fail(std::string(what) + " has a negative byte count");
  if (needed == 0) return reinterpret_cast<T*>(b.first);
  if (b.first == 0) fail(std::string(what) + " is a null pointer");
  if (b.second < needed)
    fail(std::string(what) + " holds " + std::to_string(b.second) + " bytes but the kernel touches " +
         std::to_string(needed));
  return reinterpret_cast<T*>(b.first);
}

int check_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("threads must be >= 0 (0: all hardware threads)");
  return threads;
}

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "llmctl._C was built without CUDA; reinstall with "
      "`pip install . --config-settings=cmake.define.LLMCTL_CUDA=ON`");
}

// The buffers of quantized (rows, cols) weights in MLX's layout (or the tiled one: the same bytes).
struct QuantBuffers {
  const uint32_t* wq;
  const void* scales;
  const void* biases;
};

QuantBuffers quant_buffers(const Buffer& wq, const Buffer& scales, const Buffer& biases, int dtype, int64_t rows,
                           int64_t cols, int group_size, int bits, bool has_biases) {
  llmctl::check_quant_args(dtype, rows, cols, group_size, bits);
  const int64_t side = bytes_of({rows, cols / group_size, dtype_bytes(dtype, "scales")}, "scales");
  return {span<const uint32_t>(wq, bytes_of({rows, cols / 32 * bits, 4}, "wq"), "wq"),
          span<const void>(scales, side, "scales"), span<const void>(biases, has_biases ? side : 0, "biases")};
}

// (out, in, w, w_dtype, wq, scales, biases, q_dtype, group_size, bits, mode, bias, bias_dtype, tiled): a dense
// matrix when wq's address is 0, else quantized codes in MLX's layout or (tiled) the tiled one; bias (0, 0) when none.
using MatrixTuple = std::tuple<int64_t, int64_t, Buffer, int, Buffer, Buffer, Buffer, int, int, int, int, Buffer, int,
                               bool>;

llmctl::Matrix matrix(const MatrixTuple& t) {
  llmctl::Matrix m;
  Buffer w, wq, scales, biases, bias;
  std::tie(m.out, m.in, w, m.w_dtype, wq, scales, biases, m.q_dtype, m.group_size, m.bits, m.mode, bias,
           m.bias_dtype, m.tiled) = t;
  if (wq.first != 0) {
    if (m.mode != llmctl::kModeAffine && m.mode != llmctl::kModeNF4)
      fail("mode " + std::to_string(m.mode) + " is not 0 (affine) or 1 (nf4)");
    if (m.mode == llmctl::kModeNF4 && m.bits != 4) fail("nf4 codes are 4 bits, not " + std::to_string(m.bits));
    auto q = quant_buffers(wq, scales, biases, m.q_dtype, m.out, m.in, m.group_size, m.bits,
                           m.mode == llmctl::kModeAffine);
    m.wq = q.wq, m.scales = q.scales, m.biases = q.biases;
  } else if (w.first != 0) {
    m.w = span<const void>(w, bytes_of({m.out, m.in, dtype_bytes(m.w_dtype, "w")}, "w"), "w");
  } else {
    fail("a matrix has neither weights nor codes");
  }
  if (bias.first != 0) m.bias = span<const void>(bias, bytes_of({m.out, dtype_bytes(m.bias_dtype, "bias")}, "bias"), "bias");
  if (m.tiled && !(m.wq && llmctl::tiled_supported(m.bits, m.mode, m.out)))
    fail("a tiled matrix must hold affine 4-/8-bit codes of a multiple of 16 rows");
  return m;
}

llmctl::Projection projection(const std::vector<MatrixTuple>& ts) {
  llmctl::Projection p;
  for (const auto& t : ts) p.push_back(matrix(t));
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "llmctl's C++ kernels: group-wise (de)quantization in MLX's layout, quantized matmul and the decode step.\n"
      "Buffers are (address, byte count) pairs; a count smaller than what the kernel touches is a ValueError.";
  auto release = py::call_guard<py::gil_scoped_release>();

  m.attr("FLOAT32") = int(llmctl::kFloat32);
  m.attr("FLOAT16") = int(llmctl::kFloat16);
  m.attr("BFLOAT16") = int(llmctl::kBFloat16);
  m.attr("AFFINE") = int(llmctl::kModeAffine);
  m.attr("NF4") = int(llmctl::kModeNF4);
  m.attr("ISA_AUTO") = int(llmctl::kIsaAuto);
  m.attr("ISA_SCALAR") = int(llmctl::kIsaScalar);
  m.attr("ISA_AVX2") = int(llmctl::kIsaAvx2);
  m.attr("ISA_AVX512") = int(llmctl::kIsaAvx512);
  m.attr("ISA_NEON") = int(llmctl::kIsaNeon);

  m.def(
      "quantize",
      [](Buffer w, int dtype, int64_t rows, int64_t cols, int group_size, int bits, Buffer wq, Buffer scales,
         Buffer biases, int threads) {
        auto q = quant_buffers(wq, scales, biases, dtype, rows, cols, group_size, bits, true);
        llmctl::quantize(span<const void>(w, bytes_of({rows, cols, dtype_bytes(dtype, "w")}, "w"), "w"), dtype, rows,
                         cols, group_size, bits, const_cast<uint32_t*>(q.wq), const_cast<void*>(q.scales),
                         const_cast<void*>(q.biases), check_threads(threads));
      },
      py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("group_size"),
      py::arg("bits"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("threads") = 0,
      release,
      "Quantize a row-major (rows, cols) matrix w into wq (rows, cols*bits/32) uint32\n"
      "and scales, biases (rows, cols/group_size) of the same dtype, exactly as mx.quantize.");

  m.def(
      "dequantize",
      [](Buffer wq, Buffer scales, Buffer biases, int dtype, int64_t rows, int64_t cols, int group_size, int bits,
         Buffer out, int out_dtype, int threads) {
        auto q = quant_buffers(wq, scales, biases, dtype, rows, cols, group_size, bits, true);
        void* o = span<void>(out, bytes_of({rows, cols, dtype_bytes(out_dtype, "output")}, "out"), "out");
        llmctl::dequantize(q.wq, q.scales, q.biases, dtype, rows, cols, group_size, bits, o, out_dtype,
                           check_threads(threads));
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("rows"),
      py::arg("cols"), py::arg("group_size"), py::arg("bits"), py::arg("out"), py::arg("out_dtype"),
      py::arg("threads") = 0, release,
      "Dequantize into out (rows, cols) of out_dtype, exactly as mx.dequantize; dtype is the\n"
      "scales' and biases' dtype code.");

  m.def(
      "pack",
      [](Buffer codes, int64_t rows, int64_t cols, int bits, Buffer words, int threads) {
        if (bits < 1 || bits > 8) fail("bits " + std::to_string(bits) + " is not in 1..8");
        const int64_t n_words = bytes_of({rows, llmctl::words_per_row(cols, bits), 4}, "words");
        llmctl::pack(span<const uint8_t>(codes, bytes_of({rows, cols}, "codes"), "codes"), rows, cols, bits,
                     span<uint32_t>(words, n_words, "words"), check_threads(threads));
      },
      py::arg("codes"), py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("words"),
      py::arg("threads") = 0, release,
      "Pack uint8 codes (rows, cols) into uint32 words (rows, words_per_row(cols, bits)).");

  m.def(
      "unpack",
      [](Buffer words, int64_t rows, int64_t cols, int bits, Buffer codes, int threads) {
        if (bits < 1 || bits > 8) fail("bits " + std::to_string(bits) + " is not in 1..8");
        const int64_t n_words = bytes_of({rows, llmctl::words_per_row(cols, bits), 4}, "words");
        llmctl::unpack(span<const uint32_t>(words, n_words, "words"), rows, cols, bits,
                       span<uint8_t>(codes, bytes_of({rows, cols}, "codes"), "codes"), check_threads(threads));
      },
      py::arg("words"), py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("codes"),
      py::arg("threads") = 0, release,
      "Unpack the first cols codes of each row of uint32 words into uint8 codes (rows, cols).");

  m.def(
      "fmatmul",
      [](Buffer x, int x_dtype, int64_t batch, int64_t in_features, Buffer w, int w_dtype, int64_t out_features,
         Buffer bias, int bias_dtype, Buffer y, int y_dtype, int threads, int isa) {
        const void* xp = span<const void>(x, bytes_of({batch, in_features, dtype_bytes(x_dtype, "x")}, "x"), "x");
        const void* wp = span<const void>(w, bytes_of({out_features, in_features, dtype_bytes(w_dtype, "w")}, "w"), "w");
        const void* bp = bias.first == 0 ? nullptr
                                         : span<const void>(bias, bytes_of({out_features, dtype_bytes(bias_dtype, "bias")}, "bias"), "bias");
        void* yp = span<void>(y, bytes_of({batch, out_features, dtype_bytes(y_dtype, "y")}, "y"), "y");
        llmctl::fmatmul(xp, x_dtype, batch, in_features, wp, w_dtype, out_features, bp, bias_dtype, yp, y_dtype,
                        check_threads(threads), isa);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("w"), py::arg("w_dtype"),
      py::arg("out_features"), py::arg("bias"), py::arg("bias_dtype"), py::arg("y"), py::arg("y_dtype"),
      py::arg("threads") = 0, py::arg("isa") = 0, release,
      "y (batch, out_features) = x (batch, in_features) @ W^T (+ bias; (0, 0): none) for dense float W (out_features,\n"
      "in_features): the few-row products of decoding (fmatmul.h); isa ISA_AUTO picks the best.");

  m.def(
      "qmatmul",
      [](Buffer x, int x_dtype, int64_t batch, int64_t in_features, Buffer wq, Buffer scales, Buffer biases,
         int w_dtype, int64_t out_features, int group_size, int bits, int mode, Buffer y, int y_dtype, int threads,
         int isa) {
        auto q = quant_buffers(wq, scales, biases, w_dtype, out_features, in_features, group_size, bits,
                               mode != llmctl::kModeNF4);
        const void* xp = span<const void>(x, bytes_of({batch, in_features, dtype_bytes(x_dtype, "x")}, "x"), "x");
        void* yp = span<void>(y, bytes_of({batch, out_features, dtype_bytes(y_dtype, "y")}, "y"), "y");
        llmctl::qmatmul(xp, x_dtype, batch, in_features, q.wq, q.scales, q.biases, w_dtype, out_features,
                        group_size, bits, mode, yp, y_dtype, check_threads(threads), isa);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("wq"),
      py::arg("scales"), py::arg("biases"), py::arg("w_dtype"), py::arg("out_features"),
      py::arg("group_size"), py::arg("bits"), py::arg("mode"), py::arg("y"), py::arg("y_dtype"),
      py::arg("threads") = 0, py::arg("isa") = 0, release,
      "y (batch, out_features) = x (batch, in_features) @ W^T for W packed as quantize writes it\n"
      "(mode AFFINE) or as quantize_nf4 writes it (mode NF4, biases (0, 0)); isa ISA_AUTO picks the best.");

  m.def(
      "quantize_nf4",
      [](Buffer w, int dtype, int64_t rows, int64_t cols, int group_size, Buffer wq, Buffer scales, int threads) {
        auto q = quant_buffers(wq, scales, Buffer{0, 0}, dtype, rows, cols, group_size, 4, false);
        llmctl::quantize_nf4(span<const void>(w, bytes_of({rows, cols, dtype_bytes(dtype, "w")}, "w"), "w"), dtype,
                             rows, cols, group_size, const_cast<uint32_t*>(q.wq), const_cast<void*>(q.scales),
                             check_threads(threads));
      },
      py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("group_size"),
      py::arg("wq"), py::arg("scales"), py::arg("threads") = 0, release,
      "NF4-quantize (rows, cols) w: 4-bit codes into wq (rows, cols/8) uint32, each block's\n"
      "absmax into scales (rows, cols/group_size) of w's dtype.");

  m.def(
      "dequantize_nf4",
      [](Buffer wq, Buffer scales, int dtype, int64_t rows, int64_t cols, int group_size, Buffer out, int out_dtype,
         int threads) {
        auto q = quant_buffers(wq, scales, Buffer{0, 0}, dtype, rows, cols, group_size, 4, false);
        void* o = span<void>(out, bytes_of({rows, cols, dtype_bytes(out_dtype, "output")}, "out"), "out");
        llmctl::dequantize_nf4(q.wq, q.scales, dtype, rows, cols, group_size, o, out_dtype, check_threads(threads));
      },
      py::arg("wq"), py::arg("scales"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("group_size"), py::arg("out"), py::arg("out_dtype"), py::arg("threads") = 0, release,
      "Inverse of quantize_nf4: level(code) * absmax in float32, stored as out_dtype.");

  m.def("tiled_supported", &llmctl::tiled_supported, py::arg("bits"), py::arg("mode"), py::arg("out_features"),
        "Whether weights of this format can take the tiled layout (affine 4-/8-bit, rows a multiple of 16).");
  m.def(
      "cpu_has_bf16",
      [] {
#if defined(__x86_64__) || defined(_M_X64)
        return bool(__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"));
#else
        return false;
#endif
      },
      "Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX): then bfloat16 products run ~2x float32's.");
  m.def("tiled_fast", &llmctl::tiled_fast, "Whether this CPU has the tiled kernels (elsewhere a scalar loop).");
  for (bool back : {false, true}) {
    m.def(
        back ? "from_tiled" : "to_tiled",
        [back](Buffer wq, Buffer scales, Buffer biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
               int threads) {
          auto q = quant_buffers(wq, scales, biases, dtype, out, in, group_size, bits, true);
          (back ? llmctl::from_tiled : llmctl::to_tiled)(const_cast<uint32_t*>(q.wq), const_cast<void*>(q.scales),
                                                         const_cast<void*>(q.biases), dtype, out, in, group_size, bits,
                                                         check_threads(threads));
        },
        py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("out_features"),
        py::arg("in_features"), py::arg("group_size"), py::arg("bits"), py::arg("threads") = 0, release,
        back ? "The tiled layout back to MLX's, in place." : "MLX's layout to the tiled one (see qmatmul.h), in place.");
  }
  m.def(
      "dequantize_tiled",
      [](Buffer wq, Buffer scales, Buffer biases, int dtype, int64_t out, int64_t in, int group_size, int bits,
         int64_t row0, int64_t row1, Buffer dst, int dst_dtype, int threads, int isa) {
        auto q = quant_buffers(wq, scales, biases, dtype, out, in, group_size, bits, true);
        const int64_t rows = row1 > row0 ? row1 - row0 : 0;
        void* d = span<void>(dst, bytes_of({rows, in, dtype_bytes(dst_dtype, "dst")}, "dst"), "dst");
        llmctl::dequantize_tiled(q.wq, q.scales, q.biases, dtype, out, in, group_size, bits, row0, row1, d, dst_dtype,
                                 check_threads(threads), isa);
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("out_features"),
      py::arg("in_features"), py::arg("group_size"), py::arg("bits"), py::arg("row0"), py::arg("row1"),
      py::arg("dst"), py::arg("dst_dtype") = 0, py::arg("threads") = 0, py::arg("isa") = 0, release,
      "Rows [row0, row1) of tiled weights (row1 - row0, in_features) at dst, float32 (0) or bfloat16 (2).");
  m.def(
      "qmatmul_tiled",
      [](Buffer x, int x_dtype, int64_t batch, int64_t in_features, Buffer wq, Buffer scales, Buffer biases,
         int w_dtype, int64_t out_features, int group_size, int bits, Buffer y, int y_dtype, int threads, int isa,
         bool x_int8) {
        auto q = quant_buffers(wq, scales, biases, w_dtype, out_features, in_features, group_size, bits, true);
        const void* xp = span<const void>(x, bytes_of({batch, in_features, dtype_bytes(x_dtype, "x")}, "x"), "x");
        void* yp = span<void>(y, bytes_of({batch, out_features, dtype_bytes(y_dtype, "y")}, "y"), "y");
        llmctl::qmatmul_tiled(xp, x_dtype, batch, in_features, q.wq, q.scales, q.biases, w_dtype, out_features,
                              group_size, bits, yp, y_dtype, check_threads(threads), isa, x_int8);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("wq"),
      py::arg("scales"), py::arg("biases"), py::arg("w_dtype"), py::arg("out_features"),
      py::arg("group_size"), py::arg("bits"), py::arg("y"), py::arg("y_dtype"), py::arg("threads") = 0,
      py::arg("isa") = 0, py::arg("x_int8") = false, release,
      "qmatmul for weights in the tiled layout (affine 4-/8-bit); x_int8: the AVX2 int8 prompt kernel for 4-bit codes.");

  m.def(
      "cpu_isa", [] { return std::string(llmctl::isa_name(llmctl::best_isa())); },
      "cpu_isa() -> str: the instruction set qmatmul uses by default here (avx512, avx2, neon, scalar).");
  m.def(
      "isa_available", [](int isa) { return llmctl::cpu_runs(isa); }, py::arg("isa"),
      "Whether this CPU runs the kernels of an ISA_* code (ISA_AUTO: always).");

  m.def(
      "nf4_levels",
      [] {
        py::list levels;
        for (int k = 0; k < 16; ++k) levels.append(llmctl::kNF4[k]);
        return levels;
      },
      "nf4_levels() -> list: the 16 NF4 levels (bitsandbytes' code book) the kernels use.");

  m.def("words_per_row", &llmctl::words_per_row, py::arg("cols"), py::arg("bits"),
        "uint32 words that hold cols codes of bits each: ceil(cols * bits / 32).");

  m.def("has_cuda", &llmctl::has_cuda, "True when built with -DLLMCTL_CUDA=ON.");

  // CUDA: the same byte counts are checked (of device buffers); the kernels are queued on `stream`.
  m.def(
      "quantize_cuda",
      [](Buffer w, int dtype, int64_t rows, int64_t cols, int group_size, int bits, Buffer wq, Buffer scales,
         Buffer biases, uintptr_t stream) {
        auto q = quant_buffers(wq, scales, biases, dtype, rows, cols, group_size, bits, true);
        const void* wp = span<const void>(w, bytes_of({rows, cols, dtype_bytes(dtype, "w")}, "w"), "w");
#ifdef LLMCTL_CUDA
        llmctl::quantize_cuda(wp, dtype, rows, cols, group_size, bits, const_cast<uint32_t*>(q.wq),
                              const_cast<void*>(q.scales), const_cast<void*>(q.biases),
                              reinterpret_cast<void*>(stream));
#else
        (void)q, (void)wp, (void)stream;
        no_cuda();
#endif
      },
      py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("group_size"),
      py::arg("bits"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("stream") = 0,
      release,
      "quantize on device buffers, queued on the CUDA stream `stream` (0: the default stream).");

  m.def(
      "dequantize_cuda",
      [](Buffer wq, Buffer scales, Buffer biases, int dtype, int64_t rows, int64_t cols, int group_size, int bits,
         Buffer out, int out_dtype, uintptr_t stream) {
        auto q = quant_buffers(wq, scales, biases, dtype, rows, cols, group_size, bits, true);
        void* o = span<void>(out, bytes_of({rows, cols, dtype_bytes(out_dtype, "output")}, "out"), "out");
#ifdef LLMCTL_CUDA
        llmctl::dequantize_cuda(q.wq, q.scales, q.biases, dtype, rows, cols, group_size, bits, o, out_dtype,
                                reinterpret_cast<void*>(stream));
#else
        (void)q, (void)o, (void)out_dtype, (void)stream;
        no_cuda();
#endif
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("rows"),
      py::arg("cols"), py::arg("group_size"), py::arg("bits"), py::arg("out"), py::arg("out_dtype"),
      py::arg("stream") = 0, release,
      "dequantize on device buffers, queued on the CUDA stream `stream` (0: the default stream).");

  m.def(
      "qmatmul_cuda",
      [](Buffer x, int x_dtype, int64_t batch, int64_t in_features, Buffer wq, Buffer scales, Buffer biases,
         int w_dtype, int64_t out_features, int group_size, int bits, int mode, Buffer y, int y_dtype,
         uintptr_t stream) {
        auto q = quant_buffers(wq, scales, biases, w_dtype, out_features, in_features, group_size, bits,
                               mode != llmctl::kModeNF4);
        const void* xp = span<const void>(x, bytes_of({batch, in_features, dtype_bytes(x_dtype, "x")}, "x"), "x");
        void* yp = span<void>(y, bytes_of({batch, out_features, dtype_bytes(y_dtype, "y")}, "y"), "y");
#ifdef LLMCTL_CUDA
        llmctl::qmatmul_cuda(xp, x_dtype, batch, in_features, q.wq, q.scales, q.biases, w_dtype, out_features,
                             group_size, bits, mode, yp, y_dtype, reinterpret_cast<void*>(stream));
#else
        (void)q, (void)xp, (void)yp, (void)mode, (void)stream;
        no_cuda();
#endif
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("wq"),
      py::arg("scales"), py::arg("biases"), py::arg("w_dtype"), py::arg("out_features"),
      py::arg("group_size"), py::arg("bits"), py::arg("mode"), py::arg("y"), py::arg("y_dtype"),
      py::arg("stream") = 0, release,
      "qmatmul on device buffers, queued on the CUDA stream `stream` (0: the default stream).");

  py::class_<llmctl::NativeDecoder>(m, "NativeDecoder",
                                    "One decoding step of a Llama-family model (batch 1) in C++; matrices are\n"
                                    "tuples (out, in, w, w_dtype, wq, scales, biases, q_dtype, group_size, bits,\n"
                                    "mode, bias, bias_dtype, tiled) whose buffers the caller keeps alive.")
      .def(py::init([](int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden,
                       int64_t vocab, int64_t window, float norm_eps, int norm_dtype, const MatrixTuple& embedding,
                       Buffer final_norm, const MatrixTuple& head) {
             llmctl::DecoderShape s;
             s.dim = dim, s.n_heads = n_heads, s.n_kv_heads = n_kv_heads, s.head_dim = head_dim, s.hidden = hidden;
             s.vocab = vocab, s.window = window, s.norm_eps = norm_eps, s.norm_dtype = norm_dtype;
             const int64_t norm = bytes_of({dim, dtype_bytes(norm_dtype, "norm")}, "final_norm");
             return new llmctl::NativeDecoder(s, matrix(embedding), span<const void>(final_norm, norm, "final_norm"),
                                              matrix(head));
           }),
           py::arg("dim"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("hidden"),
           py::arg("vocab"), py::arg("window"), py::arg("norm_eps"), py::arg("norm_dtype"), py::arg("embedding"),
           py::arg("final_norm"), py::arg("head"))
      .def(
          "add_layer",
          [](llmctl::NativeDecoder& d, Buffer attn_norm, const std::vector<MatrixTuple>& qkv,
             const std::vector<MatrixTuple>& o, Buffer mlp_norm, const std::vector<MatrixTuple>& gate_up,
             const std::vector<MatrixTuple>& down) {
            const llmctl::DecoderShape& s = d.shape();
            const int64_t norm = bytes_of({s.dim, dtype_bytes(s.norm_dtype, "norm")}, "norm");
            llmctl::DecoderLayer layer;
            layer.attn_norm = span<const void>(attn_norm, norm, "attn_norm");
            layer.mlp_norm = span<const void>(mlp_norm, norm, "mlp_norm");
            layer.qkv = projection(qkv), layer.o = projection(o);
            layer.gate_up = projection(gate_up), layer.down = projection(down);
            d.add_layer(layer);
          },
          py::arg("attn_norm"), py::arg("qkv"), py::arg("o"), py::arg("mlp_norm"), py::arg("gate_up"), py::arg("down"))
      .def(
          "step",
          [](llmctl::NativeDecoder& d, int64_t token, int64_t pos, const std::vector<Buffer>& keys,
             const std::vector<Buffer>& values, int64_t capacity, Buffer cos, Buffer sin, Buffer logits, int threads,
             int isa) {
            const llmctl::DecoderShape& s = d.shape();
            const int64_t cache = bytes_of({s.n_kv_heads, capacity, s.head_dim, 4}, "cache");
            std::vector<uintptr_t> k, v;
            for (const Buffer& b : keys) k.push_back(uintptr_t(span<float>(b, cache, "a layer's keys")));
            for (const Buffer& b : values) v.push_back(uintptr_t(span<float>(b, cache, "a layer's values")));
            const int64_t row = bytes_of({s.head_dim, 4}, "rope");
            d.step(token, pos, k, v, capacity, span<const float>(cos, row, "cos"), span<const float>(sin, row, "sin"),
                   span<float>(logits, bytes_of({s.vocab, 4}, "logits"), "logits"), check_threads(threads), isa);
          },
          py::arg("token"), py::arg("pos"), py::arg("keys"), py::arg("values"), py::arg("capacity"), py::arg("cos"),
          py::arg("sin"), py::arg("logits"), py::arg("threads") = 0, py::arg("isa") = 0, release,
          "Decode `token` at position `pos`: writes its keys and values into each layer's float32 cache\n"
          "(n_kv_heads, capacity, head_dim) and the float32 logits (vocab); cos and sin are position pos's\n"
          "RoPE rows (head_dim float32 each); isa picks the kernels (ISA_AUTO: the best this CPU runs).");
}
