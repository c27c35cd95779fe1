// A Llama decoder layer's decode step as two calls, around the key/value cache update that stays in Python.
//
// transformers' LlamaDecoderLayer runs about 40 torch operations and 15 module calls per layer from Python; for
// the few rows of a CPU decode step that Python costs about a third of the step (py-spy over the embedded
// default, 1 thread). These functions run the same ATen operations in the same order with the same arguments,
// from C++, so their results are the same bits; the 4-bit products (and peft's LoRA updates, one factor per
// batch row) call csrc/nf4_gemm.cpp directly. utils/decode_layers.py decides when they serve a layer and packs
// the layer's weights into the lists they take.

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "nf4_gemm.h"

namespace {

// Per linear layer, in the lists built by utils/decode_layers.py: 10 tensors (packed weight, absmax, code book,
// nested absmax8 / code / offset, bias, stacked lora_A, stacked lora_B, per-row factors, per-row rank spans;
// absent ones None) and 3 ints (N, K, blocksize).
constexpr int64_t kTensorsPerLinear = 11;
constexpr int64_t kIntsPerLinear = 3;

at::Tensor linear(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& tensors, at::IntArrayRef ints,
                  int64_t index) {
  TORCH_CHECK(tensors.size() >= static_cast<size_t>((index + 1) * kTensorsPerLinear) &&
                  ints.size() >= static_cast<size_t>((index + 1) * kIntsPerLinear),
              "decode layer: the linear layers' lists are too short");
  const auto t = [&](int64_t j) -> std::optional<at::Tensor> { return tensors.get(index * kTensorsPerLinear + j); };
  const int64_t n = ints[index * kIntsPerLinear], k = ints[index * kIntsPerLinear + 1],
                blocksize = ints[index * kIntsPerLinear + 2];
  const auto lora_a = t(7);
  // named as the dispatcher would name these calls, so torch.profiler (bench/bench_engine.py) counts them alike
  if (lora_a.has_value()) {
    RECORD_FUNCTION("lora_lens::nf4_lora_gemm", std::vector<c10::IValue>());
    return lora_lens::nf4_lora_gemm(x, *t(0), n, k, *t(1), blocksize, *t(2), t(3), t(4), t(5), t(6), *lora_a,
                                    *t(8), *t(9), *t(10));
  }
  RECORD_FUNCTION("lora_lens::nf4_gemm", std::vector<c10::IValue>());
  return lora_lens::nf4_gemm(x, *t(0), n, k, *t(1), blocksize, *t(2), t(3), t(4), t(5), t(6));
}

// LlamaRMSNorm.forward for float32: x * rsqrt(mean(x^2) + eps), times the weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto variance = x.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x * at::rsqrt(variance + eps));
}

// transformers' rotate_half: (x1, x2) -> (-x2, x1) over the last dimension's two halves.
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

std::vector<int64_t> leading_sizes(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

// The layer up to the cache: input norm, q/k/v projections split into heads ([batch, heads, tokens, head_dim]),
// rotary embedding on q and k (apply_rotary_pos_emb with unsqueeze_dim 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attention_inputs(
    const at::Tensor& hidden, const at::Tensor& norm_weight, double eps, const at::Tensor& cos, const at::Tensor& sin,
    int64_t head_dim, const c10::List<std::optional<at::Tensor>>& linears, at::IntArrayRef shapes) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3,
              "decode layer: float32 [batch, tokens, hidden]");
  const auto normed = rms_norm(hidden, norm_weight, eps);
  auto heads = leading_sizes(hidden);
  heads.push_back(-1);
  heads.push_back(head_dim);
  const auto project = [&](int64_t index) {
    return linear(normed, linears, shapes, index).view(heads).transpose(1, 2);
  };
  const auto query = project(0), key = project(1), value = project(2);
  const auto c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  return {query * c + rotate_half(query) * s, key * c + rotate_half(key) * s, value};
}

// The rest of the layer, given the cached keys and values: attention as transformers' sdpa_attention_forward
// calls it (no mask, not causal for one new token), the output projection and residual, the post-attention norm
// and the MLP down(silu(gate(x)) * up(x)) with its residual.
at::Tensor decode_layer_output(const at::Tensor& hidden, const at::Tensor& query, const at::Tensor& keys,
                               const at::Tensor& values, double scaling, bool enable_gqa,
                               const at::Tensor& norm_weight, double eps,
                               const c10::List<std::optional<at::Tensor>>& linears, at::IntArrayRef shapes) {
  auto attention = at::scaled_dot_product_attention(query, keys, values, /*attn_mask=*/std::nullopt,
                                                    /*dropout_p=*/0.0, /*is_causal=*/false, scaling, enable_gqa);
  attention =
      attention.reshape({attention.size(0), -1, query.size(2), values.size(-1)}).transpose(1, 2).contiguous();
  auto flat = leading_sizes(hidden);
  flat.push_back(-1);
  attention = attention.reshape(flat).contiguous();
  const auto after_attention = hidden + linear(attention, linears, shapes, 0);
  const auto normed = rms_norm(after_attention, norm_weight, eps);
  const auto gate = linear(normed, linears, shapes, 1);
  const auto up = linear(normed, linears, shapes, 2);
  return after_attention + linear(at::silu(gate) * up, linears, shapes, 3);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_lens, m) {
  m.def(
      "decode_attention_inputs(Tensor hidden, Tensor norm_weight, float eps, Tensor cos, Tensor sin, int head_dim, "
      "Tensor?[] linears, int[] shapes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "decode_layer_output(Tensor hidden, Tensor query, Tensor keys, Tensor values, float scaling, bool enable_gqa, "
      "Tensor norm_weight, float eps, Tensor?[] linears, int[] shapes) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) {
  m.impl("decode_attention_inputs", decode_attention_inputs);
  m.impl("decode_layer_output", decode_layer_output);
}
