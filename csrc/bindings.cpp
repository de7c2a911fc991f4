// pybind11 module llmctl._C: integer addresses and shapes in, std::invalid_argument -> ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmctl's C++ kernels: group-wise affine (de)quantization in MLX's layout.";
  auto release = py::call_guard<py::gil_scoped_release>();

  m.attr("FLOAT32") = int(llmctl::kFloat32);
  m.attr("FLOAT16") = int(llmctl::kFloat16);
  m.attr("BFLOAT16") = int(llmctl::kBFloat16);

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
}
