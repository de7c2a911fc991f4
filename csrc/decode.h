// One decoding step of a Llama-family transformer on the CPU, whole, in C++: batch 1, one token.
//
// Per token a ~100M-parameter model runs ~100 matrix-vector products of a few microseconds to a
// millisecond each, plus norms, RoPE and attention over a few hundred cached positions. From Python
// each of those is an op dispatch (microseconds of overhead apiece) and a thread-pool wake-up; here
// the whole step is one call: products split over the persistent pool, everything else on the
// calling thread, activations in float32, weights read as they are stored (float32, float16,
// bfloat16 or MLX-quantized codes through qmatmul).
#pragma once

#include <cstdint>
#include <vector>

namespace llmctl {

// W (out, in) as a step reads it: a dense row-major matrix of w_dtype, or quantized codes (MLX's layout or tiled) with
// their scales and biases (see qmatmul). bias (out,), when set, is added to the product.
struct Matrix {
  int64_t out = 0, in = 0;
  const void* w = nullptr;
  int w_dtype = 0;
  const uint32_t* wq = nullptr;  // quantized when set
  const void* scales = nullptr;
  const void* biases = nullptr;
  int q_dtype = 0, group_size = 0, bits = 0, mode = 0;
  bool tiled = false;  // codes, scales and biases in qmatmul.h's tiled layout
  const void* bias = nullptr;
  int bias_dtype = 0;
};

// Matrices that read the same x; their outputs side by side.
using Projection = std::vector<Matrix>;

struct DecoderLayer {
  const void* attn_norm = nullptr;
  Projection qkv, o;
  const void* mlp_norm = nullptr;
  Projection gate_up, down;  // gate_up's output: the gate (hidden) then the up projection (hidden)
};

struct DecoderShape {
  int64_t dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, hidden = 0, vocab = 0;
  int64_t window = 0;  // sliding-window attention span; 0: none
  float norm_eps = 1e-5f;
  int norm_dtype = 0;  // of the RMSNorm weights
};

class NativeDecoder {
 public:
  // embedding: (vocab, dim), dense or quantized; head: (vocab, dim), possibly the same tensors.
  NativeDecoder(const DecoderShape& shape, const Matrix& embedding, const void* final_norm, const Matrix& head);
  void add_layer(const DecoderLayer& layer);

  // The token at position pos: keys[l] and values[l] are layer l's float32 cache, (n_kv_heads,
  // capacity, head_dim), holding positions < pos; position pos is written. cos and sin are the RoPE
  // rows of position pos (head_dim float32 each, halves duplicated). logits: vocab float32. isa picks every kernel
  // the step runs (products, attention, activations): kIsaAuto the best this CPU has, else that one (or an error).
  void step(int64_t token, int64_t pos, const std::vector<uintptr_t>& keys, const std::vector<uintptr_t>& values,
            int64_t capacity, const float* cos, const float* sin, float* logits, int threads, int isa = 0);

  int64_t n_layers() const { return int64_t(layers_.size()); }
  const DecoderShape& shape() const { return shape_; }

 private:
  DecoderShape shape_;
  Matrix embedding_, head_;
  const void* final_norm_;
  std::vector<DecoderLayer> layers_;
  std::vector<float> x_, h_, qkv_, attn_, gate_up_, act_, scores_;
  std::vector<uint32_t> embed_row_;  // a tiled embedding's row of codes, gathered
  std::vector<char> embed_params_;   // and its scales, then biases
};

// y (out) = W x (+ bias) for float32 x (in); products of more than ~64 KiB of weights use threads; isa as qmatmul's.
void matvec(const Matrix& m, const float* x, float* y, int threads, int isa);

}  // namespace llmctl
