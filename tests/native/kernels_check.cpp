// The CPU kernels against dequantize-then-matmul in double, on every ISA this CPU runs: a plain program, so that it
// also runs for another architecture under user-mode emulation (tests/native/cross_check.sh: aarch64's NEON).
// Exit status 0 when every product is within the kernels' bound, 1 otherwise (each failure printed).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/qmatmul.h"
#include "../../csrc/quant.h"

using namespace llmctl;

namespace {

int failures = 0;

// max |got - want| <= tol * max |want|
void check(const std::vector<float>& got, const std::vector<double>& want, double tol, const char* what, int isa,
           int bits, int group, int dtype, int64_t batch) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(double(got[i]) - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  if (!(err <= tol * scale)) {
    std::printf("FAIL %s isa=%s bits=%d group=%d dtype=%d batch=%lld: error %.3g > %.3g * %.3g\n", what, isa_name(isa),
                bits, group, dtype, (long long)batch, err, tol, scale);
    ++failures;
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int checked = 0;
  for (int dtype : {kFloat32, kFloat16, kBFloat16}) {
    for (int bits : {2, 3, 4, 5, 6, 8}) {
      for (int group : {32, 64, 128}) {
        const int64_t rows = 32, cols = 4 * group, groups = cols / group;
        std::vector<float> wf(size_t(rows * cols));
        for (auto& v : wf) v = 0.05f * normal(rng);
        const int size = dtype == kFloat32 ? 4 : 2;
        std::vector<uint8_t> w(size_t(rows * cols) * size), scales(size_t(rows * groups) * size),
            biases(size_t(rows * groups) * size);
        for (int64_t i = 0; i < rows * cols; ++i) store_float(w.data(), dtype, i, wf[size_t(i)]);
        std::vector<uint32_t> wq(size_t(rows * words_per_row(cols, bits)));
        quantize(w.data(), dtype, rows, cols, group, bits, wq.data(), scales.data(), biases.data(), 1);
        std::vector<float> deq(size_t(rows * cols));
        // code * scale + bias in float32, as the kernels compute (dequantize rounds to the scales' dtype)
        std::vector<uint8_t> codes(size_t(rows * cols));
        unpack(wq.data(), rows, cols, bits, codes.data(), 1);
        for (int64_t o = 0; o < rows; ++o)
          for (int64_t i = 0; i < cols; ++i) {
            const int64_t g = o * groups + i / group;
            deq[size_t(o * cols + i)] = float(codes[size_t(o * cols + i)]) * load_float(scales.data(), dtype, g) +
                                        load_float(biases.data(), dtype, g);
          }
        std::vector<uint32_t> tq = wq;
        std::vector<uint8_t> ts = scales, tb = biases;
        const bool tiled = tiled_supported(bits, kModeAffine, rows);
        if (tiled) to_tiled(tq.data(), ts.data(), tb.data(), dtype, rows, cols, group, bits, 1);
        for (int64_t batch : {1, 3}) {
          std::vector<float> x(size_t(batch * cols));
          for (auto& v : x) v = normal(rng);
          x[0] = 30.0f;  // an outlier in one group of x
          std::vector<double> want(size_t(batch * rows));
          for (int64_t r = 0; r < batch; ++r)
            for (int64_t o = 0; o < rows; ++o) {
              double sum = 0.0;
              for (int64_t i = 0; i < cols; ++i) sum += double(x[size_t(r * cols + i)]) * deq[size_t(o * cols + i)];
              want[size_t(r * rows + o)] = sum;
            }
          for (int isa : {kIsaScalar, kIsaAvx2, kIsaAvx512, kIsaNeon}) {
            if (!cpu_runs(isa)) continue;
            std::vector<float> y(size_t(batch * rows));
            qmatmul(x.data(), kFloat32, batch, cols, wq.data(), scales.data(), biases.data(), dtype, rows, group, bits,
                    kModeAffine, y.data(), kFloat32, 2, isa);
            check(y, want, 1e-3, "qmatmul", isa, bits, group, dtype, batch);
            ++checked;
            if (tiled) {
              qmatmul_tiled(x.data(), kFloat32, batch, cols, tq.data(), ts.data(), tb.data(), dtype, rows, group, bits,
                            y.data(), kFloat32, 2, isa);
              check(y, want, 1e-3, "qmatmul_tiled", isa, bits, group, dtype, batch);
              ++checked;
            }
          }
        }
      }
    }
  }
  std::printf("%s: %d products checked on", failures ? "FAILED" : "ok", checked);
  for (int isa : {kIsaScalar, kIsaAvx2, kIsaAvx512, kIsaNeon})
    if (cpu_runs(isa)) std::printf(" %s", isa_name(isa));
  std::printf(" (best: %s; NEON dot product: %s), %d failures\n", isa_name(best_isa()),
              detail::neon_dotprod() ? "yes" : "no", failures);
  return failures ? 1 : 0;
}
