// pybind11 module llmctl._C: integer addresses and shapes in, std::invalid_argument -> ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "decode.h"
#include "qmatmul.h"
#include "quant.h"

namespace py = pybind11;

namespace {

template <typename T>
T* address(uintptr_t a) {
  return reinterpret_cast<T*>(a);
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

// (out, in, w, w_dtype, wq, scales, biases, q_dtype, group_size, bits, mode, bias, bias_dtype, tiled): a
// dense matrix when wq is 0, else quantized codes in MLX's layout or (tiled) the tiled one; bias 0 when none.
using MatrixTuple = std::tuple<int64_t, int64_t, uintptr_t, int, uintptr_t, uintptr_t, uintptr_t, int, int, int, int,
                               uintptr_t, int, bool>;

llmctl::Matrix matrix(const MatrixTuple& t) {
  llmctl::Matrix m;
  uintptr_t w, wq, scales, biases, bias;
  std::tie(m.out, m.in, w, m.w_dtype, wq, scales, biases, m.q_dtype, m.group_size, m.bits, m.mode, bias,
           m.bias_dtype, m.tiled) = t;
  m.w = address<const void>(w), m.wq = address<const uint32_t>(wq), m.scales = address<const void>(scales);
  m.biases = address<const void>(biases), m.bias = address<const void>(bias);
  if (m.wq == nullptr && m.w == nullptr) throw std::invalid_argument("a matrix has neither weights nor codes");
  if (m.wq != nullptr) llmctl::check_quant_args(m.q_dtype, m.out, m.in, m.group_size, m.bits);
  if (m.tiled && !(m.wq && llmctl::tiled_supported(m.bits, m.mode, m.out)))
    throw std::invalid_argument("a tiled matrix must hold affine 4-/8-bit codes of a multiple of 16 rows");
  return m;
}

llmctl::Projection projection(const std::vector<MatrixTuple>& ts) {
  llmctl::Projection p;
  for (const auto& t : ts) p.push_back(matrix(t));
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmctl's C++ kernels: group-wise (de)quantization in MLX's layout and quantized matmul.";
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
      [](uintptr_t w, int dtype, int64_t rows, int64_t cols, int group_size, int bits, uintptr_t wq,
         uintptr_t scales, uintptr_t biases, int threads) {
        llmctl::quantize(address<const void>(w), dtype, rows, cols, group_size, bits,
                         address<uint32_t>(wq), address<void>(scales), address<void>(biases),
                         check_threads(threads));
      },
      py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("group_size"),
      py::arg("bits"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("threads") = 0,
      release,
      "Quantize a row-major (rows, cols) matrix at address w into wq (rows, cols*bits/32) uint32\n"
      "and scales, biases (rows, cols/group_size) of the same dtype, exactly as mx.quantize.");

  m.def(
      "dequantize",
      [](uintptr_t wq, uintptr_t scales, uintptr_t biases, int dtype, int64_t rows, int64_t cols,
         int group_size, int bits, uintptr_t out, int out_dtype, int threads) {
        llmctl::dequantize(address<const uint32_t>(wq), address<const void>(scales),
                           address<const void>(biases), dtype, rows, cols, group_size, bits,
                           address<void>(out), out_dtype, check_threads(threads));
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("rows"),
      py::arg("cols"), py::arg("group_size"), py::arg("bits"), py::arg("out"), py::arg("out_dtype"),
      py::arg("threads") = 0, release,
      "Dequantize into out (rows, cols) of out_dtype, exactly as mx.dequantize; dtype is the\n"
      "scales' and biases' dtype code.");

  m.def(
      "pack",
      [](uintptr_t codes, int64_t rows, int64_t cols, int bits, uintptr_t words, int threads) {
        llmctl::pack(address<const uint8_t>(codes), rows, cols, bits, address<uint32_t>(words),
                     check_threads(threads));
      },
      py::arg("codes"), py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("words"),
      py::arg("threads") = 0, release,
      "Pack uint8 codes (rows, cols) into uint32 words (rows, words_per_row(cols, bits)).");

  m.def(
      "unpack",
      [](uintptr_t words, int64_t rows, int64_t cols, int bits, uintptr_t codes, int threads) {
        llmctl::unpack(address<const uint32_t>(words), rows, cols, bits, address<uint8_t>(codes),
                       check_threads(threads));
      },
      py::arg("words"), py::arg("rows"), py::arg("cols"), py::arg("bits"), py::arg("codes"),
      py::arg("threads") = 0, release,
      "Unpack the first cols codes of each row of uint32 words into uint8 codes (rows, cols).");

  m.def(
      "qmatmul",
      [](uintptr_t x, int x_dtype, int64_t batch, int64_t in_features, uintptr_t wq, uintptr_t scales,
         uintptr_t biases, int w_dtype, int64_t out_features, int group_size, int bits, int mode,
         uintptr_t y, int y_dtype, int threads, int isa) {
        llmctl::qmatmul(address<const void>(x), x_dtype, batch, in_features, address<const uint32_t>(wq),
                        address<const void>(scales), address<const void>(biases), w_dtype, out_features,
                        group_size, bits, mode, address<void>(y), y_dtype, check_threads(threads), isa);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("wq"),
      py::arg("scales"), py::arg("biases"), py::arg("w_dtype"), py::arg("out_features"),
      py::arg("group_size"), py::arg("bits"), py::arg("mode"), py::arg("y"), py::arg("y_dtype"),
      py::arg("threads") = 0, py::arg("isa") = 0, release,
      "y (batch, out_features) = x (batch, in_features) @ W^T for W packed as quantize writes it\n"
      "(mode AFFINE) or as quantize_nf4 writes it (mode NF4, biases 0); isa ISA_AUTO picks the best.");

  m.def(
      "quantize_nf4",
      [](uintptr_t w, int dtype, int64_t rows, int64_t cols, int group_size, uintptr_t wq,
         uintptr_t scales, int threads) {
        llmctl::quantize_nf4(address<const void>(w), dtype, rows, cols, group_size, address<uint32_t>(wq),
                             address<void>(scales), check_threads(threads));
      },
      py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("group_size"),
      py::arg("wq"), py::arg("scales"), py::arg("threads") = 0, release,
      "NF4-quantize (rows, cols) at w: 4-bit codes into wq (rows, cols/8) uint32, each block's\n"
      "absmax into scales (rows, cols/group_size) of w's dtype.");

  m.def(
      "dequantize_nf4",
      [](uintptr_t wq, uintptr_t scales, int dtype, int64_t rows, int64_t cols, int group_size,
         uintptr_t out, int out_dtype, int threads) {
        llmctl::dequantize_nf4(address<const uint32_t>(wq), address<const void>(scales), dtype, rows,
                               cols, group_size, address<void>(out), out_dtype, check_threads(threads));
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
        [back](uintptr_t wq, uintptr_t scales, uintptr_t biases, int dtype, int64_t out, int64_t in, int group_size,
               int bits, int threads) {
          (back ? llmctl::from_tiled : llmctl::to_tiled)(address<uint32_t>(wq), address<void>(scales),
                                                         address<void>(biases), dtype, out, in, group_size, bits,
                                                         check_threads(threads));
        },
        py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("out_features"),
        py::arg("in_features"), py::arg("group_size"), py::arg("bits"), py::arg("threads") = 0, release,
        back ? "The tiled layout back to MLX's, in place." : "MLX's layout to the tiled one (see qmatmul.h), in place.");
  }
  m.def(
      "dequantize_tiled",
      [](uintptr_t wq, uintptr_t scales, uintptr_t biases, int dtype, int64_t out, int64_t in, int group_size,
         int bits, int64_t row0, int64_t row1, uintptr_t dst, int dst_dtype, int threads) {
        llmctl::dequantize_tiled(address<const uint32_t>(wq), address<const void>(scales),
                                 address<const void>(biases), dtype, out, in, group_size, bits, row0, row1,
                                 address<void>(dst), dst_dtype, check_threads(threads));
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("out_features"),
      py::arg("in_features"), py::arg("group_size"), py::arg("bits"), py::arg("row0"), py::arg("row1"),
      py::arg("dst"), py::arg("dst_dtype") = 0, py::arg("threads") = 0, release,
      "Rows [row0, row1) of tiled weights (row1 - row0, in_features) at dst, float32 (0) or bfloat16 (2).");
  m.def(
      "qmatmul_tiled",
      [](uintptr_t x, int x_dtype, int64_t batch, int64_t in_features, uintptr_t wq, uintptr_t scales,
         uintptr_t biases, int w_dtype, int64_t out_features, int group_size, int bits, uintptr_t y, int y_dtype,
         int threads, int isa) {
        llmctl::qmatmul_tiled(address<const void>(x), x_dtype, batch, in_features, address<const uint32_t>(wq),
                              address<const void>(scales), address<const void>(biases), w_dtype, out_features,
                              group_size, bits, address<void>(y), y_dtype, check_threads(threads), isa);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("wq"),
      py::arg("scales"), py::arg("biases"), py::arg("w_dtype"), py::arg("out_features"),
      py::arg("group_size"), py::arg("bits"), py::arg("y"), py::arg("y_dtype"), py::arg("threads") = 0,
      py::arg("isa") = 0, release, "qmatmul for weights in the tiled layout (affine 4-/8-bit).");

  m.def(
      "cpu_isa", [] { return std::string(llmctl::isa_name(llmctl::best_isa())); },
      "cpu_isa() -> str: the instruction set qmatmul uses by default here (avx512, avx2, neon, scalar).");

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

  m.def(
      "quantize_cuda",
      [](uintptr_t w, int dtype, int64_t rows, int64_t cols, int group_size, int bits, uintptr_t wq,
         uintptr_t scales, uintptr_t biases, uintptr_t stream) {
#ifdef LLMCTL_CUDA
        llmctl::quantize_cuda(address<const void>(w), dtype, rows, cols, group_size, bits,
                              address<uint32_t>(wq), address<void>(scales), address<void>(biases),
                              address<void>(stream));
#else
        (void)w, (void)dtype, (void)rows, (void)cols, (void)group_size, (void)bits, (void)wq,
            (void)scales, (void)biases, (void)stream;
        no_cuda();
#endif
      },
      py::arg("w"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("group_size"),
      py::arg("bits"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("stream") = 0,
      release,
      "quantize on device addresses, queued on the CUDA stream `stream` (0: the default stream).");

  m.def(
      "dequantize_cuda",
      [](uintptr_t wq, uintptr_t scales, uintptr_t biases, int dtype, int64_t rows, int64_t cols,
         int group_size, int bits, uintptr_t out, int out_dtype, uintptr_t stream) {
#ifdef LLMCTL_CUDA
        llmctl::dequantize_cuda(address<const uint32_t>(wq), address<const void>(scales),
                                address<const void>(biases), dtype, rows, cols, group_size, bits,
                                address<void>(out), out_dtype, address<void>(stream));
#else
        (void)wq, (void)scales, (void)biases, (void)dtype, (void)rows, (void)cols,
            (void)group_size, (void)bits, (void)out, (void)out_dtype, (void)stream;
        no_cuda();
#endif
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("dtype"), py::arg("rows"),
      py::arg("cols"), py::arg("group_size"), py::arg("bits"), py::arg("out"), py::arg("out_dtype"),
      py::arg("stream") = 0, release,
      "dequantize on device addresses, queued on the CUDA stream `stream` (0: the default stream).");

  m.def(
      "qmatmul_cuda",
      [](uintptr_t x, int x_dtype, int64_t batch, int64_t in_features, uintptr_t wq, uintptr_t scales,
         uintptr_t biases, int w_dtype, int64_t out_features, int group_size, int bits, int mode,
         uintptr_t y, int y_dtype, uintptr_t stream) {
#ifdef LLMCTL_CUDA
        llmctl::qmatmul_cuda(address<const void>(x), x_dtype, batch, in_features, address<const uint32_t>(wq),
                             address<const void>(scales), address<const void>(biases), w_dtype,
                             out_features, group_size, bits, mode, address<void>(y), y_dtype,
                             address<void>(stream));
#else
        (void)x, (void)x_dtype, (void)batch, (void)in_features, (void)wq, (void)scales, (void)biases,
            (void)w_dtype, (void)out_features, (void)group_size, (void)bits, (void)mode, (void)y,
            (void)y_dtype, (void)stream;
        no_cuda();
#endif
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("batch"), py::arg("in_features"), py::arg("wq"),
      py::arg("scales"), py::arg("biases"), py::arg("w_dtype"), py::arg("out_features"),
      py::arg("group_size"), py::arg("bits"), py::arg("mode"), py::arg("y"), py::arg("y_dtype"),
      py::arg("stream") = 0, release,
      "qmatmul on device addresses, queued on the CUDA stream `stream` (0: the default stream).");

  py::class_<llmctl::NativeDecoder>(m, "NativeDecoder",
                                    "One decoding step of a Llama-family model (batch 1) in C++; matrices are\n"
                                    "tuples (out, in, w, w_dtype, wq, scales, biases, q_dtype, group_size, bits,\n"
                                    "mode, bias, bias_dtype) of addresses the caller keeps alive.")
      .def(py::init([](int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden,
                       int64_t vocab, int64_t window, float norm_eps, int norm_dtype, const MatrixTuple& embedding,
                       uintptr_t final_norm, const MatrixTuple& head) {
             llmctl::DecoderShape s;
             s.dim = dim, s.n_heads = n_heads, s.n_kv_heads = n_kv_heads, s.head_dim = head_dim, s.hidden = hidden;
             s.vocab = vocab, s.window = window, s.norm_eps = norm_eps, s.norm_dtype = norm_dtype;
             return new llmctl::NativeDecoder(s, matrix(embedding), address<const void>(final_norm), matrix(head));
           }),
           py::arg("dim"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("hidden"),
           py::arg("vocab"), py::arg("window"), py::arg("norm_eps"), py::arg("norm_dtype"), py::arg("embedding"),
           py::arg("final_norm"), py::arg("head"))
      .def(
          "add_layer",
          [](llmctl::NativeDecoder& d, uintptr_t attn_norm, const std::vector<MatrixTuple>& qkv,
             const std::vector<MatrixTuple>& o, uintptr_t mlp_norm, const std::vector<MatrixTuple>& gate_up,
             const std::vector<MatrixTuple>& down) {
            llmctl::DecoderLayer layer;
            layer.attn_norm = address<const void>(attn_norm), layer.mlp_norm = address<const void>(mlp_norm);
            layer.qkv = projection(qkv), layer.o = projection(o);
            layer.gate_up = projection(gate_up), layer.down = projection(down);
            d.add_layer(layer);
          },
          py::arg("attn_norm"), py::arg("qkv"), py::arg("o"), py::arg("mlp_norm"), py::arg("gate_up"), py::arg("down"))
      .def(
          "step",
          [](llmctl::NativeDecoder& d, int64_t token, int64_t pos, const std::vector<uintptr_t>& keys,
             const std::vector<uintptr_t>& values, int64_t capacity, uintptr_t cos, uintptr_t sin, uintptr_t logits,
             int threads) {
            d.step(token, pos, keys, values, capacity, address<const float>(cos), address<const float>(sin),
                   address<float>(logits), check_threads(threads));
          },
          py::arg("token"), py::arg("pos"), py::arg("keys"), py::arg("values"), py::arg("capacity"), py::arg("cos"),
          py::arg("sin"), py::arg("logits"), py::arg("threads") = 0, release,
          "Decode `token` at position `pos`: writes its keys and values into each layer's float32 cache\n"
          "(n_kv_heads, capacity, head_dim) and the float32 logits (vocab) at `logits`.");
}
