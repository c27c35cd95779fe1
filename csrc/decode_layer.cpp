// A Llama decoder layer's decode step as two calls, around the key/value cache update that stays in Python.
//
// transformers' LlamaDecoderLayer runs about 40 torch operations and 15 module calls per layer from Python; for
// the few rows of a CPU decode step that Python costs about a third of the step (py-spy over the embedded
// default, 1 thread). These functions run the layer from C++: ATen's operations where they cost little, loops of
// csrc/decode_math.cpp for a decode step's attention, norms and silu (the same values up to float32 rounding);
// the 4-bit products (and peft's LoRA updates, one factor per batch row) call csrc/nf4_gemm.cpp directly. utils/decode_layers.py decides when they serve a layer and packs
// the layer's weights into the lists they take. decode_stack runs every layer of a decode step in one call, where it
// can in one parallel region (one_region_stack), and decode_steps several whole steps of a greedy run, from the
// tokens to the next tokens.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/util/ParallelGuard.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "decode_math.h"
#include "nf4_gemm.h"

namespace {

// Per linear layer, in the lists built by utils/decode_layers.py: 10 tensors (packed weight, absmax, code book,
// nested absmax8 / code / offset, bias, stacked lora_A, stacked lora_B transposed, per-row factors, per-row rank spans;
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

// Several linear layers of one input in one parallel region (nf4_linears), named for torch.profiler.
std::vector<at::Tensor> linears_together(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& linears,
                                         at::IntArrayRef shapes, std::initializer_list<int64_t> indices) {
  RECORD_FUNCTION("lora_lens::nf4_linears", std::vector<c10::IValue>());
  return lora_lens::nf4_linears(x, linears, shapes, indices);
}

// LlamaRMSNorm.forward for float32: weight * (x * rsqrt(mean(x^2) + eps)), one loop instead of five ATen
// operations. Each elementwise step is rounded as ATen rounds it (eps added as a float, rsqrt as 1 / sqrt, two
// products); the mean's sum runs in csrc/decode_math.cpp's order, not ATen's.
void rms_norm_rows(const float* xp, int64_t rows, int64_t features, const float* wp, float epsilon, float* variance,
                   float* op) {
  lora_lens::mean_squares(xp, rows, features, variance);
  for (int64_t row = 0; row < rows; ++row) {
    const float scale = 1.0f / std::sqrt(variance[row] + epsilon);
    for (int64_t j = 0; j < features; ++j) op[row * features + j] = wp[j] * (xp[row * features + j] * scale);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t features = x.size(-1);
  if (!(x.is_contiguous() && weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
        weight.numel() == features)) {
    return weight * (x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps));
  }
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<float> variance(x.numel() / features);
  rms_norm_rows(x.data_ptr<float>(), static_cast<int64_t>(variance.size()), features, weight.data_ptr<float>(),
                static_cast<float>(eps), variance.data(), out.data_ptr<float>());
  return out;
}

// apply_rotary_pos_emb for one new token: x * cos + rotate_half(x) * sin, x given as the projection's output
// [batch, 1, heads * D] and returned as [batch, heads, 1, D] (contiguous); each product rounded, then the sum
// (the library is built with -ffp-contract=off), as ATen's three elementwise operations give it. cos and sin are
// [batch or 1, 1, D].
// Rows of `heads` heads of head_dim values each (in: [batch, heads, head_dim] contiguous) into out at
// out[b * batch_stride + h * head_stride + j]; cos and sin [batch, head_dim], or one row for all (per_row false).
void rotate_heads(const float* xp, int64_t batch, int64_t heads, int64_t head_dim, const float* cos, const float* sin,
                  bool per_row, float* out, int64_t batch_stride, int64_t head_stride) {
  const int64_t half = head_dim / 2;
  for (int64_t b = 0; b < batch; ++b) {
    const float* cp = cos + (per_row ? b * head_dim : 0);
    const float* sp = sin + (per_row ? b * head_dim : 0);
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = xp + (b * heads + h) * head_dim;
      float* o = out + b * batch_stride + h * head_stride;
      for (int64_t j = 0; j < head_dim; ++j) {
        const float rotated = j < half ? -in[j + half] : in[j - half];
        const float direct = in[j] * cp[j];
        const float turned = rotated * sp[j];
        o[j] = direct + turned;
      }
    }
  }
}

at::Tensor rotary(const at::Tensor& projected, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  const int64_t batch = projected.size(0), heads = projected.size(-1) / head_dim;
  const auto x = projected.contiguous();
  const auto c = cos.contiguous(), s = sin.contiguous();
  auto out = at::empty({batch, heads, 1, head_dim}, x.options());
  rotate_heads(x.data_ptr<float>(), batch, heads, head_dim, c.data_ptr<float>(), s.data_ptr<float>(), c.size(0) != 1,
               out.data_ptr<float>(), heads * head_dim, head_dim);
  return out;
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
// rotary embedding on q and k (apply_rotary_pos_emb with unsqueeze_dim 1). The layer's q/k/v are linears
// first..first + 2 of the lists.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_inputs(
    const at::Tensor& hidden, const at::Tensor& norm_weight, double eps, const at::Tensor& cos, const at::Tensor& sin,
    int64_t head_dim, const c10::List<std::optional<at::Tensor>>& linears, at::IntArrayRef shapes, int64_t first) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3,
              "decode layer: float32 [batch, tokens, hidden]");
  const auto normed = rms_norm(hidden, norm_weight, eps);
  auto heads = leading_sizes(hidden);
  heads.push_back(-1);
  heads.push_back(head_dim);
  const auto qkv = linears_together(normed, linears, shapes, {first, first + 1, first + 2});
  const bool one_token = hidden.size(1) == 1 && cos.dim() == 3 && cos.size(1) == 1 && cos.size(-1) == head_dim &&
                         (cos.size(0) == 1 || cos.size(0) == hidden.size(0)) && cos.sizes() == sin.sizes() &&
                         cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && head_dim % 2 == 0;
  const auto value = qkv[2].view(heads).transpose(1, 2);
  if (one_token) return {rotary(qkv[0], cos, sin, head_dim), rotary(qkv[1], cos, sin, head_dim), value};
  const auto project = [&](int64_t index) { return qkv[index].view(heads).transpose(1, 2); };
  const auto query = project(0), key = project(1);
  const auto c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  return {query * c + rotate_half(query) * s, key * c + rotate_half(key) * s, value};
}

// silu(gate) * up: csrc/decode_math.cpp's loop for contiguous float32 halves, else ATen's two operations.
at::Tensor silu_product(const at::Tensor& gate, const at::Tensor& up) {
  if (!(gate.is_contiguous() && up.is_contiguous() && gate.scalar_type() == at::kFloat &&
        up.scalar_type() == at::kFloat && gate.sizes() == up.sizes()))
    return at::silu(gate) * up;
  auto out = at::empty_like(gate);
  lora_lens::silu_product(gate.data_ptr<float>(), up.data_ptr<float>(), out.data_ptr<float>(), gate.numel());
  return out;
}

// The attention's output as the output projection takes it ([batch, tokens, heads * head_dim]): for one new token
// csrc/decode_math.cpp's loop; otherwise as transformers' sdpa_attention_forward calls ATen (no mask, not causal).
at::Tensor attention_of(const at::Tensor& hidden, const at::Tensor& query, const at::Tensor& keys,
                        const at::Tensor& values, double scaling, bool enable_gqa) {
  if (hidden.size(1) == 1) {
    if (auto attended = lora_lens::one_token_attention(query, keys, values, scaling)) return *attended;
  }
  auto attention = at::scaled_dot_product_attention(query, keys, values, /*attn_mask=*/std::nullopt,
                                                    /*dropout_p=*/0.0, /*is_causal=*/false, scaling, enable_gqa);
  attention =
      attention.reshape({attention.size(0), -1, query.size(2), values.size(-1)}).transpose(1, 2).contiguous();
  auto flat = leading_sizes(hidden);
  flat.push_back(-1);
  return attention.reshape(flat).contiguous();
}

// The rest of the layer, given the cached keys and values: attention, the output projection and residual, the
// post-attention norm and the MLP down(silu(gate(x)) * up(x)) with its residual. o/gate/up/down are linears
// first..first + 3.
at::Tensor layer_output(const at::Tensor& hidden, const at::Tensor& query, const at::Tensor& keys,
                        const at::Tensor& values, double scaling, bool enable_gqa, const at::Tensor& norm_weight,
                        double eps, const c10::List<std::optional<at::Tensor>>& linears, at::IntArrayRef shapes,
                        int64_t first) {
  const auto attention = attention_of(hidden, query, keys, values, scaling, enable_gqa);
  // the residual sums written into the products' fresh outputs: x + y and y + x are the same bits
  auto after_attention = linear(attention, linears, shapes, first);
  after_attention.add_(hidden);
  const auto normed = rms_norm(after_attention, norm_weight, eps);
  const auto gate_up = linears_together(normed, linears, shapes, {first + 1, first + 2});
  auto mlp = linear(silu_product(gate_up[0], gate_up[1]), linears, shapes, first + 3);
  return mlp.add_(after_attention);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_attention_inputs(
    const at::Tensor& hidden, const at::Tensor& norm_weight, double eps, const at::Tensor& cos, const at::Tensor& sin,
    int64_t head_dim, const c10::List<std::optional<at::Tensor>>& linears, at::IntArrayRef shapes) {
  return attention_inputs(hidden, norm_weight, eps, cos, sin, head_dim, linears, shapes, 0);
}

at::Tensor decode_layer_output(const at::Tensor& hidden, const at::Tensor& query, const at::Tensor& keys,
                               const at::Tensor& values, double scaling, bool enable_gqa,
                               const at::Tensor& norm_weight, double eps,
                               const c10::List<std::optional<at::Tensor>>& linears, at::IntArrayRef shapes) {
  return layer_output(hidden, query, keys, values, scaling, enable_gqa, norm_weight, eps, linears, shapes, 0);
}

// The cached tensor with the new token's appended on the token axis (dim -2), as DynamicLayer.update's torch.cat
// gives it, but written into `buffer`, which has room for later tokens: cat allocates the whole cache afresh
// every step, and on a CPU those growing allocations come back from the system as fresh pages (page faults,
// about 20 us a tensor at 100 tokens). `cached` is either a view of the buffer's first tokens (the last step's
// result) or anything else, which is copied into a new buffer. Returns (the view, the buffer); room_for returns
// the buffer alone, the cached tokens in place and room for one of `token_sizes` after them.
at::Tensor room_for(const at::Tensor& cached, at::IntArrayRef token_sizes, const at::TensorOptions& options,
                    const std::optional<at::Tensor>& buffer) {
  const int64_t length = cached.size(-2);
  const bool in_buffer = buffer.has_value() && buffer->dim() == cached.dim() && buffer->size(-2) > length &&
                         cached.data_ptr() == buffer->data_ptr() && cached.strides() == buffer->strides() &&
                         cached.sizes().slice(0, cached.dim() - 2) == buffer->sizes().slice(0, cached.dim() - 2) &&
                         cached.size(-1) == buffer->size(-1) && buffer->dtype() == options.dtype();
  if (in_buffer) return *buffer;
  auto sizes = token_sizes.vec();
  sizes[sizes.size() - 2] = (length + 1 + 127) / 128 * 128 + 128;  // room for about 128 more tokens
  auto room = at::empty(sizes, options);
  if (length > 0) room.narrow(-2, 0, length).copy_(cached);
  return room;
}

std::pair<at::Tensor, at::Tensor> append_token(const at::Tensor& cached, const at::Tensor& token,
                                               const std::optional<at::Tensor>& buffer) {
  const int64_t length = cached.size(-2);
  const at::Tensor room = room_for(cached, token.sizes(), token.options(), buffer);
  const int64_t d = token.size(-1);
  if (token.dim() == 4 && token.size(2) == 1 && token.stride(3) == 1 && room.is_contiguous() &&
      token.scalar_type() == at::kFloat) {
    // one token's rows straight into place: a copy_ into a narrowed view costs more than its D floats each
    float* dst = room.data_ptr<float>() + length * d;
    const float* src = token.data_ptr<float>();
    for (int64_t b = 0; b < token.size(0); ++b)
      for (int64_t h = 0; h < token.size(1); ++h)
        std::memcpy(dst + b * room.stride(0) + h * room.stride(1), src + b * token.stride(0) + h * token.stride(1),
                    d * sizeof(float));
  } else {
    room.narrow(-2, length, token.size(-2)).copy_(token);
  }
  return {room.narrow(-2, 0, length + token.size(-2)), room};
}

struct OneRegionPlan;  // below: what one_region_stack reads of a plan

// What decode_stack reads of every layer, for one strength plan (utils/runtime/decode_layers.py builds one per
// plan): made once, so a decode step hands C++ one object instead of a few thousand list items to convert.
struct StackPlan : torch::CustomClassHolder {
  std::vector<at::Tensor> norm_weights;
  std::vector<double> eps;
  c10::List<std::optional<at::Tensor>> attention_linears, output_linears;
  std::vector<int64_t> attention_shapes, output_shapes;
  int64_t head_dim;
  double scaling;
  bool enable_gqa;
  // the layers' products checked and viewed for one_region_stack, for `one_region_rows` rows (null: not served)
  std::shared_ptr<const OneRegionPlan> one_region;
  int64_t one_region_rows = -1;

  StackPlan(std::vector<at::Tensor> norm_weights, std::vector<double> eps,
            c10::List<std::optional<at::Tensor>> attention_linears, std::vector<int64_t> attention_shapes,
            c10::List<std::optional<at::Tensor>> output_linears, std::vector<int64_t> output_shapes, int64_t head_dim,
            double scaling, bool enable_gqa)
      : norm_weights(std::move(norm_weights)),
        eps(std::move(eps)),
        attention_linears(std::move(attention_linears)),
        output_linears(std::move(output_linears)),
        attention_shapes(std::move(attention_shapes)),
        output_shapes(std::move(output_shapes)),
        head_dim(head_dim),
        scaling(scaling),
        enable_gqa(enable_gqa) {
    const size_t layers = this->norm_weights.size() / 2;
    TORCH_CHECK(this->eps.size() == 2 * layers && this->attention_linears.size() == 33 * layers &&
                    this->attention_shapes.size() == 9 * layers && this->output_linears.size() == 44 * layers &&
                    this->output_shapes.size() == 12 * layers,
                "decode stack: two norms, three attention inputs and four outputs for every layer");
  }
};

// What thread 0 of one_region_stack spent its time on, while one_region_timing(true) is set (bench/bench_engine.py's
// step profile: torch.profiler sees the region as one call): seconds in the products (A x dots, 4-bit outputs and
// LoRA updates), in attention, in its rows' small steps between them (norms, rotary, the cache's new token,
// residual sums, silu, the activations' permutes), and waiting for the other threads at the barriers; and the
// steps it ran (counted always: tests check the region served them).
enum RegionPart { kProducts, kAttention, kOwnSteps, kWaits, kRegionParts };
std::atomic<bool> region_timing{false};
std::atomic<int64_t> region_steps{0};
double region_seconds[kRegionParts] = {};  // written by thread 0 of one region at a time (the engine's lock)

std::vector<double> one_region_timing(bool on) {
  std::vector<double> out = {static_cast<double>(region_steps.load())};
  for (const double seconds : region_seconds) out.push_back(seconds);
  std::fill(std::begin(region_seconds), std::end(region_seconds), 0.0);
  region_timing = on;
  return out;
}

// What one_region_stack reads of a StackPlan for decode steps of `rows` rows, checked once: each layer's seven
// 4-bit products (q, k, v, o, gate, up, down) viewed with their LoRA layers, and the sizes they share.
struct OneRegionPlan {
  std::vector<lora_lens::StepLinear> linears;  // 7 a layer
  std::vector<at::Tensor> keep;                // what the views point into, where it is not the plan's own tensors
  int64_t hidden = 0, heads = 0, kv_heads = 0, intermediate = 0, most_stacked = 0;
};

std::shared_ptr<const OneRegionPlan> plan_one_region(const StackPlan& plan, int64_t rows) {
  const int64_t layers = static_cast<int64_t>(plan.norm_weights.size()) / 2, D = plan.head_dim;
  // one_token_attention's loops take 64 head dimensions a pass
  if (layers == 0 || D <= 0 || D % 64 != 0 || rows < 1 || rows > lora_lens::kMaxRows) return nullptr;
  auto out = std::make_shared<OneRegionPlan>();
  for (int64_t i = 0; i < layers; ++i) {
    for (int64_t j = 0; j < 7; ++j) {
      auto step = j < 3 ? lora_lens::plan_step_linear(plan.attention_linears, plan.attention_shapes, 3 * i + j, rows,
                                                      out->keep)
                        : lora_lens::plan_step_linear(plan.output_linears, plan.output_shapes, 4 * i + j - 3, rows,
                                                      out->keep);
      if (!step.has_value()) return nullptr;
      out->linears.push_back(std::move(*step));
    }
  }
  const auto& first = out->linears;
  const int64_t hidden = first[0].view.K, q_size = first[0].view.N, kv_size = first[1].view.N,
                inter = first[4].view.N;
  if (q_size % D != 0 || kv_size % D != 0 || kv_size == 0 || (q_size / D) % (kv_size / D) != 0) return nullptr;
  int64_t most_stacked = 0;
  for (int64_t i = 0; i < layers; ++i) {
    const auto* l = &out->linears[7 * i];
    // (K, N) of q, k, v, o, gate, up, down in a Llama layer
    const int64_t shapes[7][2] = {{hidden, q_size}, {hidden, kv_size}, {hidden, kv_size}, {q_size, hidden},
                                  {hidden, inter},  {hidden, inter},   {inter, hidden}};
    int64_t stacked = 0;
    for (int j = 0; j < 7; ++j) {
      if (l[j].view.K != shapes[j][0] || l[j].view.N != shapes[j][1]) return nullptr;
      stacked += l[j].view.stacked;
    }
    most_stacked = std::max(most_stacked, stacked);
    for (const auto& norm : {plan.norm_weights[2 * i], plan.norm_weights[2 * i + 1]})
      if (norm.scalar_type() != at::kFloat || !norm.is_contiguous() || !norm.device().is_cpu() ||
          norm.numel() != hidden)
        return nullptr;
  }
  out->hidden = hidden;
  out->heads = q_size / D;
  out->kv_heads = kv_size / D;
  out->intermediate = inter;
  out->most_stacked = most_stacked;
  return out;
}

using StackResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                               std::vector<at::Tensor>>;

// decode_stack's layers in ONE parallel region, where every layer is served by the 4-bit products and the loops
// above (float32 rows of one new token, no more rows than the products take at once, one_token_attention's
// shapes); nullopt, with nothing done, elsewhere. The per-layer calls start four regions a layer (q/k/v, o, gate/up,
// down, and the attention's) and between them one thread sets each call up (tensors, checks, lists) while the
// others wait: about 5 ms of a 2-row SmolLM2 step on the Xeon with AMX, against 7 ms in the products. Here the
// products are viewed once per plan, the scratch is allocated once a step, and the threads meet at barriers; the
// small steps between products (norms, rotary, the cache's new token, residual sums, silu) split by rows, the A x
// dots, products and attention heads by their entries, outputs and heads. The same loops in the same order on each
// value as the per-layer calls, so the same bits (tests/test_decode_layers.py).
std::optional<StackResult> one_region_stack(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                            StackPlan& plan, const std::vector<at::Tensor>& keys,
                                            const std::vector<at::Tensor>& values,
                                            const c10::List<std::optional<at::Tensor>>& key_buffers,
                                            const c10::List<std::optional<at::Tensor>>& value_buffers) {
  const int64_t layers = static_cast<int64_t>(keys.size()), D = plan.head_dim;
  if (!(hidden.scalar_type() == at::kFloat && hidden.dim() == 3 && hidden.size(1) == 1 && hidden.is_contiguous() &&
        hidden.device().is_cpu() && hidden.size(0) >= 1 && hidden.size(0) <= lora_lens::kMaxRows))
    return std::nullopt;
  const int64_t B = hidden.size(0);
  if (plan.one_region_rows != B) {
    plan.one_region = plan_one_region(plan, B);
    plan.one_region_rows = B;
  }
  if (!plan.one_region) return std::nullopt;
  const OneRegionPlan& rp = *plan.one_region;
  const int64_t hidden_size = rp.hidden, H = rp.heads, KVH = rp.kv_heads, inter = rp.intermediate;
  if (hidden.size(2) != hidden_size || static_cast<int64_t>(rp.linears.size()) != 7 * layers) return std::nullopt;
  const bool rotary_ok = cos.dim() == 3 && cos.size(1) == 1 && cos.size(-1) == D &&
                         (cos.size(0) == 1 || cos.size(0) == B) && cos.sizes() == sin.sizes() &&
                         cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                         sin.is_contiguous();
  if (!rotary_ok) return std::nullopt;
  for (int64_t i = 0; i < layers; ++i) {
    for (const auto* cached : {&keys[i], &values[i]}) {
      if (cached->scalar_type() != at::kFloat || cached->dim() != 4 || cached->size(0) != B ||
          cached->size(1) != KVH || cached->size(3) != D || cached->stride(3) != 1 || !cached->device().is_cpu())
        return std::nullopt;
    }
    if (keys[i].size(2) != values[i].size(2)) return std::nullopt;
  }
  RECORD_FUNCTION("lora_lens::decode_stack_one_region", std::vector<c10::IValue>());
  const std::vector<int64_t> token_sizes = {B, KVH, 1, D};
  std::vector<at::Tensor> key_rooms, value_rooms;
  std::vector<int64_t> lengths;
  for (int64_t i = 0; i < layers; ++i) {
    key_rooms.push_back(room_for(keys[i], token_sizes, hidden.options(), key_buffers.get(i)));
    value_rooms.push_back(room_for(values[i], token_sizes, hidden.options(), value_buffers.get(i)));
    TORCH_CHECK(key_rooms.back().is_contiguous() && value_rooms.back().is_contiguous(),
                "decode stack: the cache's buffers are contiguous");
    lengths.push_back(keys[i].size(2));
  }
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end()) + 1;

  // scratch for the whole step, carved from one allocation
  const int64_t widest = std::max({hidden_size, H * D, inter});
  const int64_t sizes[] = {B * hidden_size, B * widest, B * rp.most_stacked, B * H * D, B * KVH * D, B * KVH * D,
                           B * H * D,       B * H * D,  B * hidden_size,    B * inter, B * inter,   B * inter,
                           B * hidden_size, B};
  int64_t total = 0;
  for (const int64_t n : sizes) total += (n + 15) / 16 * 16;  // each part on its own 64 bytes
  thread_local std::vector<float> scratch;
  scratch.resize(total);
  float* parts[std::size(sizes)];
  for (size_t p = 0, at = 0; p < std::size(sizes); at += (sizes[p] + 15) / 16 * 16, ++p) parts[p] = scratch.data() + at;
  float *normed = parts[0], *permuted = parts[1], *down = parts[2], *q = parts[3], *k = parts[4], *v = parts[5],
        *query = parts[6], *attended = parts[7], *after = parts[8], *gate = parts[9], *up = parts[10],
        *activation = parts[11], *mlp = parts[12], *variance = parts[13];
  auto out = hidden.clone();
  float* h = out.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const bool cos_per_row = cos.size(0) != 1;
  const float scaling = static_cast<float>(plan.scaling);

  const auto body = [&](int64_t tid, int64_t threads) {
    const bool timed = tid == 0 && region_timing.load(std::memory_order_relaxed);
    auto last = std::chrono::steady_clock::now();
    const auto lap = [&](RegionPart part) {  // the time since the last lap, to `part`
      if (!timed) return;
      const auto now = std::chrono::steady_clock::now();
      region_seconds[part] += std::chrono::duration<double>(now - last).count();
      last = now;
    };
    const auto barrier = [&](RegionPart ended) {  // `ended`: what this thread did since the last barrier
      lap(ended);
      if (threads > 1) {
#pragma omp barrier
        lap(kWaits);
      }
    };
    const auto share = [&](int64_t count) {
      const int64_t chunk = (count + threads - 1) / threads;
      return std::make_pair(std::min(count, tid * chunk), std::min(count, (tid + 1) * chunk));
    };
    // run(index, product, lo, hi) over this thread's share of [0, total); `size` gives each product's part
    // of it, the products' parts one after another
    const auto over_share = [&](std::initializer_list<const lora_lens::StepLinear*> products, int64_t total,
                                const auto& size, const auto& run) {
      const auto [begin, end] = share(total);
      int64_t offset = 0, index = 0;
      for (const auto* product : products) {
        const int64_t n = size(*product);
        const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + n);
        if (lo < hi) run(index, *product, lo - offset, hi - offset);
        offset += n;
        ++index;
      }
    };
    // the A x dots of these products (x not permuted), split across the threads; false where there are none
    const auto dots = [&](std::initializer_list<const lora_lens::StepLinear*> products, const float* x,
                          std::initializer_list<float*> downs) {
      const auto size = [](const lora_lens::StepLinear& p) { return static_cast<int64_t>(p.dots.size()); };
      int64_t count = 0;
      for (const auto* product : products) count += size(*product);
      if (count == 0) return false;
      over_share(products, count, size, [&](int64_t index, const lora_lens::StepLinear& p, int64_t lo, int64_t hi) {
        lora_lens::step_dots(p, x, lo, hi, downs.begin()[index]);
      });
      return true;
    };
    // the products' outputs together (x permuted), split across the threads as nf4_linears splits them (chunks
    // claimed in turn, so that a thread slowed by the machine takes fewer, were no faster here)
    const auto outputs = [&](std::initializer_list<const lora_lens::StepLinear*> products, const float* x,
                             std::initializer_list<float*> downs, std::initializer_list<float*> outs) {
      const auto size = [](const lora_lens::StepLinear& p) { return p.view.N; };
      int64_t count = 0;
      for (const auto* product : products) count += size(*product);
      over_share(products, count, size, [&](int64_t index, const lora_lens::StepLinear& p, int64_t lo, int64_t hi) {
        lora_lens::step_outputs(p, x, B, lo, hi, downs.begin()[index], outs.begin()[index]);
      });
    };
    thread_local std::vector<float> scores;
    scores.resize(longest);
    // the steps between the products (norms, rotary, the cache's new token, residual sums, silu) work on each row
    // alone: each thread takes its share of the rows, where thread 0 took them all while the others waited
    const auto [first_row, rows_end] = share(B);
    const int64_t rows = rows_end - first_row;
    for (int64_t i = 0; i < layers; ++i) {
      const lora_lens::StepLinear* l = &rp.linears[7 * i];
      float* downs[7];
      for (int64_t j = 0, at = 0; j < 7; at += B * l[j].view.stacked, ++j) downs[j] = down + at;
      const at::Tensor& key_room = key_rooms[i];
      const at::Tensor& value_room = value_rooms[i];
      float* key_p = key_room.data_ptr<float>();
      float* value_p = value_room.data_ptr<float>();
      const int64_t length = lengths[i];
      if (rows > 0) {
        const int64_t at = first_row * hidden_size;
        rms_norm_rows(h + at, rows, hidden_size, plan.norm_weights[2 * i].data_ptr<float>(),
                      static_cast<float>(plan.eps[2 * i]), variance + first_row, normed + at);
        lora_lens::permute_for_kernel(normed + at, permuted + at, rows, hidden_size);
      }
      barrier(kOwnSteps);
      if (dots({&l[0], &l[1], &l[2]}, normed, {downs[0], downs[1], downs[2]})) barrier(kProducts);
      outputs({&l[0], &l[1], &l[2]}, permuted, {downs[0], downs[1], downs[2]}, {q, k, v});
      barrier(kProducts);
      if (rows > 0) {
        const int64_t rotary_at = cos_per_row ? first_row * D : 0;
        rotate_heads(q + first_row * H * D, rows, H, D, cos_p + rotary_at, sin_p + rotary_at, cos_per_row,
                     query + first_row * H * D, H * D, D);
        rotate_heads(k + first_row * KVH * D, rows, KVH, D, cos_p + rotary_at, sin_p + rotary_at, cos_per_row,
                     key_p + first_row * key_room.stride(0) + length * D, key_room.stride(0), key_room.stride(1));
        for (int64_t b = first_row; b < rows_end; ++b)
          for (int64_t g = 0; g < KVH; ++g)
            std::memcpy(value_p + b * value_room.stride(0) + g * value_room.stride(1) + length * D,
                        v + (b * KVH + g) * D, D * sizeof(float));
      }
      barrier(kOwnSteps);
      {
        const auto [begin, end] = share(B * H);
        if (begin < end)
          lora_lens::attend_heads(query, key_p, key_room.stride(0), key_room.stride(1), key_room.stride(2), value_p,
                                  value_room.stride(0), value_room.stride(1), value_room.stride(2), H, KVH,
                                  length + 1, D, scaling, begin, end, scores.data(), attended);
      }
      barrier(kAttention);
      if (rows > 0)
        lora_lens::permute_for_kernel(attended + first_row * H * D, permuted + first_row * H * D, rows, H * D);
      barrier(kOwnSteps);
      if (dots({&l[3]}, attended, {downs[3]})) barrier(kProducts);
      outputs({&l[3]}, permuted, {downs[3]}, {after});
      barrier(kProducts);
      if (rows > 0) {
        const int64_t at = first_row * hidden_size;
        // the residual sums as the per-layer calls add them into the products' outputs: x + y is y + x
        for (int64_t j = at; j < rows_end * hidden_size; ++j) after[j] = after[j] + h[j];
        rms_norm_rows(after + at, rows, hidden_size, plan.norm_weights[2 * i + 1].data_ptr<float>(),
                      static_cast<float>(plan.eps[2 * i + 1]), variance + first_row, normed + at);
        lora_lens::permute_for_kernel(normed + at, permuted + at, rows, hidden_size);
      }
      barrier(kOwnSteps);
      if (dots({&l[4], &l[5]}, normed, {downs[4], downs[5]})) barrier(kProducts);
      outputs({&l[4], &l[5]}, permuted, {downs[4], downs[5]}, {gate, up});
      barrier(kProducts);
      if (rows > 0) {
        // inter is a multiple of 32 (down_proj's blocks), so each row's share takes the same 8-wide loop as all
        const int64_t at = first_row * inter;
        lora_lens::silu_product(gate + at, up + at, activation + at, rows * inter);
        lora_lens::permute_for_kernel(activation + at, permuted + at, rows, inter);
      }
      barrier(kOwnSteps);
      if (dots({&l[6]}, activation, {downs[6]})) barrier(kProducts);
      outputs({&l[6]}, permuted, {downs[6]}, {mlp});
      barrier(kProducts);
      // this thread's rows only: the next layer's norm reads them on the same thread, before any barrier
      for (int64_t j = first_row * hidden_size; j < rows_end * hidden_size; ++j) h[j] = mlp[j] + after[j];
      lap(kOwnSteps);
    }
  };
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1) {
    at::internal::ThreadIdGuard tid_guard(0);
    c10::ParallelGuard guard(true);
    body(0, 1);
  } else {
#pragma omp parallel
    {
      at::internal::ThreadIdGuard tid_guard(omp_get_thread_num());
      c10::ParallelGuard guard(true);
      body(omp_get_thread_num(), omp_get_num_threads());
    }
  }
  region_steps.fetch_add(1, std::memory_order_relaxed);
  std::vector<at::Tensor> new_keys, new_values;
  for (int64_t i = 0; i < layers; ++i) {
    new_keys.push_back(key_rooms[i].narrow(-2, 0, lengths[i] + 1));
    new_values.push_back(value_rooms[i].narrow(-2, 0, lengths[i] + 1));
  }
  return StackResult{out, new_keys, new_values, key_rooms, value_rooms};
}

// Every decoder layer of a decode step in one call (utils/runtime/decode_layers.py: DecodeStack), each as the two
// calls above with the key/value cache update between them (append_token: the values DynamicLayer.update's
// torch.cat gives): the same operations in the same order as the per-layer calls, so the same bits, without the
// Python a layer otherwise costs. Layer i's norms are norm_weights[2i, 2i + 1] with eps[2i, 2i + 1], its q/k/v linears
// 3i..3i + 2 of attention_linears, its o/gate/up/down 4i..4i + 3 of output_linears. Returns the last layer's
// hidden states, each layer's cached keys and values with the new token's appended, and the buffers that hold
// them.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
decode_stack(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
             const c10::intrusive_ptr<StackPlan>& plan, std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
             c10::List<std::optional<at::Tensor>> key_buffers, c10::List<std::optional<at::Tensor>> value_buffers,
             bool one_region) {
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3, "decode stack: float32 [batch, tokens, hidden]");
  TORCH_CHECK(static_cast<int64_t>(values.size()) == layers && static_cast<int64_t>(plan->norm_weights.size()) == 2 * layers,
              "decode stack: keys and values for every layer of the plan");
  TORCH_CHECK(static_cast<int64_t>(key_buffers.size()) == layers && static_cast<int64_t>(value_buffers.size()) == layers,
              "decode stack: a key and a value buffer (or None) for every layer");
  if (one_region) {
    if (auto served = one_region_stack(hidden, cos, sin, *plan, keys, values, key_buffers, value_buffers))
      return std::move(*served);
  }
  std::vector<at::Tensor> new_keys, new_values, key_rooms, value_rooms;
  new_keys.reserve(layers);
  new_values.reserve(layers);
  at::Tensor h = hidden;
  for (int64_t i = 0; i < layers; ++i) {
    auto [query, key, value] = attention_inputs(h, plan->norm_weights[2 * i], plan->eps[2 * i], cos, sin,
                                                plan->head_dim, plan->attention_linears, plan->attention_shapes, 3 * i);
    auto [keys_now, key_room] = append_token(keys[i], key, key_buffers.get(i));
    auto [values_now, value_room] = append_token(values[i], value, value_buffers.get(i));
    new_keys.push_back(keys_now);
    new_values.push_back(values_now);
    key_rooms.push_back(key_room);
    value_rooms.push_back(value_room);
    h = layer_output(h, query, new_keys.back(), new_values.back(), plan->scaling, plan->enable_gqa,
                     plan->norm_weights[2 * i + 1], plan->eps[2 * i + 1], plan->output_linears, plan->output_shapes,
                     4 * i);
  }
  return {h, new_keys, new_values, key_rooms, value_rooms};
}


// A greedy run's cache between its decode steps (utils/runtime/decode_stack.py: RunSteps), held here: each layer's
// cached keys and values and the buffers with room for later tokens that hold them, as decode_stack takes and
// returns them. The run's DynamicCache gets them once, when its steps through here end (`contents`).
struct StepCache : torch::CustomClassHolder {
  std::vector<at::Tensor> keys, values;
  c10::List<std::optional<at::Tensor>> key_buffers, value_buffers;

  StepCache(std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
            c10::List<std::optional<at::Tensor>> key_buffers, c10::List<std::optional<at::Tensor>> value_buffers)
      : keys(std::move(keys)),
        values(std::move(values)),
        key_buffers(std::move(key_buffers)),
        value_buffers(std::move(value_buffers)) {
    TORCH_CHECK(this->values.size() == this->keys.size() && this->key_buffers.size() == this->keys.size() &&
                    this->value_buffers.size() == this->keys.size(),
                "step cache: keys, values and a buffer (or None) of each for every layer");
  }

  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, c10::List<std::optional<at::Tensor>>,
             c10::List<std::optional<at::Tensor>>>
  contents() const {
    return {keys, values, key_buffers, value_buffers};
  }
};

// The output layer as decode_steps takes it: its exact int8 form and scales, or a float32 weight; and its bias.
struct Head {
  const std::optional<at::Tensor>& q8;
  const std::optional<at::Tensor>& scales;
  const std::optional<at::Tensor>& weight;
  const std::optional<at::Tensor>& bias;
};

// One decode step from the tokens to the logits [rows, 1, vocabulary]: the embedding's rows, decode_stack (the
// cache's keys and values taken from `cache` and put back), the final norm and the output layer, the same
// operations as the decoder's and the output layer's forward for that step. The norm stays ATen's LlamaRMSNorm
// operations (float32: x * rsqrt(mean(x^2) + eps), times the weight), called from here, so its sums are ATen's, as
// in the model's forward; the output layer is the compiled product the head's forward would call (its exact int8
// form, or the float32 weight streamed once).
at::Tensor step_logits(const at::Tensor& tokens, const at::Tensor& embedding, const at::Tensor& cos,
                       const at::Tensor& sin, const c10::intrusive_ptr<StackPlan>& plan, StepCache& cache,
                       bool one_region, const at::Tensor& norm_weight, double norm_eps, const Head& head) {
  const int64_t rows = tokens.size(0), features = embedding.size(1), vocabulary = embedding.size(0);
  // the embedding's rows copied: what nn.Embedding's lookup gives, bit for bit
  auto hidden = at::empty({rows, 1, features}, embedding.options());
  const int64_t* id = tokens.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < vocabulary, "decode step: a token outside the vocabulary");
    std::memcpy(hidden.data_ptr<float>() + r * features, embedding.data_ptr<float>() + id[r] * features,
                features * sizeof(float));
  }
  auto [last, new_keys, new_values, key_rooms, value_rooms] = decode_stack(
      hidden, cos, sin, plan, cache.keys, cache.values, cache.key_buffers, cache.value_buffers, one_region);
  cache.keys = std::move(new_keys);
  cache.values = std::move(new_values);
  for (size_t i = 0; i < key_rooms.size(); ++i) {
    cache.key_buffers.set(i, std::move(key_rooms[i]));
    cache.value_buffers.set(i, std::move(value_rooms[i]));
  }
  const auto normed = norm_weight * (last * at::rsqrt(last.pow(2).mean(-1, /*keepdim=*/true) + norm_eps));
  static const auto q8 = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_lens::q8_rows_gemm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&)>();
  static const auto dense = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("lora_lens::dense_rows_gemm", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&)>();
  return head.q8.has_value() ? q8.call(normed, *head.q8, *head.scales, head.bias)
                             : dense.call(normed, *head.weight, head.bias);
}

// Up to cos.size() steps of a greedy run (utils/runtime/greedy_loop.py through decode_stack.RunSteps) in one call:
// each step's logits from the last step's tokens (step_logits), then its tokens picked as the loop picks them
// (float32 logits; the end-of-sequence ids at -inf where `ignore_eos`; argmax, the first of equal values; `pad_id`
// for a row already finished, which a row is from the step it writes one of `eos_ids`), until every row is
// finished. Between steps nothing returns to Python: the loop, the step's Python and the call's conversions cost a
// 2-row SmolLM2 step 1.3-1.5 ms a token on the Xeon with AMX (beside 10.8 ms in here), much of it Python's code and
// data fetched again from memory after the weights streamed through the caches. `tokens` [rows] are the last
// step's, `unfinished` [rows] (bool) whether each row is still writing. Returns each step's tokens [steps, rows] and,
// where `keep_logits`, its float32 logits [steps, rows, vocabulary] (else an empty tensor); `cache` then holds the
// last step's keys and values.
std::tuple<at::Tensor, at::Tensor> decode_steps(
    const at::Tensor& tokens, const at::Tensor& embedding, const std::vector<at::Tensor>& cos,
    const std::vector<at::Tensor>& sin, const c10::intrusive_ptr<StackPlan>& plan,
    const c10::intrusive_ptr<StepCache>& cache, bool one_region, const at::Tensor& norm_weight, double norm_eps,
    const std::optional<at::Tensor>& head_q8, const std::optional<at::Tensor>& head_scales,
    const std::optional<at::Tensor>& head_weight, const std::optional<at::Tensor>& head_bias,
    const at::Tensor& unfinished, const at::Tensor& eos_ids, bool ignore_eos, int64_t pad_id, bool keep_logits) {
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "decode steps: one int64 token a row");
  TORCH_CHECK(embedding.dim() == 2 && embedding.scalar_type() == at::kFloat && embedding.is_contiguous(),
              "decode steps: a float32 [vocabulary, hidden] embedding");
  TORCH_CHECK(head_q8.has_value() == head_scales.has_value() && head_q8.has_value() != head_weight.has_value(),
              "decode steps: the output layer as int8 and scales, or as a float32 weight");
  TORCH_CHECK(!cos.empty() && cos.size() == sin.size(), "decode steps: a cos and a sin for each step");
  TORCH_CHECK(unfinished.dim() == 1 && unfinished.size(0) == tokens.size(0) && unfinished.scalar_type() == at::kBool,
              "decode steps: whether each row is unfinished");
  TORCH_CHECK(eos_ids.dim() == 1 && eos_ids.scalar_type() == at::kLong, "decode steps: int64 end-of-sequence ids");
  const Head head{head_q8, head_scales, head_weight, head_bias};
  const int64_t rows = tokens.size(0);
  const auto ends = eos_ids.contiguous();
  const int64_t* end_p = ends.data_ptr<int64_t>();
  const auto is_end = [&](int64_t token) { return std::find(end_p, end_p + ends.numel(), token) != end_p + ends.numel(); };
  std::vector<bool> alive(rows);
  for (int64_t r = 0; r < rows; ++r) alive[r] = unfinished[r].item<bool>();
  auto current = tokens.contiguous();  // read only: each step's tokens are a new tensor
  std::vector<at::Tensor> chosen_steps, kept;
  for (size_t s = 0; s < cos.size(); ++s) {
    // the output layer's logits are this step's own tensor, so they are kept without a copy and, where they are
    // not kept, the end ids are filled in place (each copy a pass over rows x vocabulary floats: 0.2 ms of a
    // 2-row step)
    const auto logits = step_logits(current, embedding, cos[s], sin[s], plan, *cache, one_region, norm_weight,
                                    norm_eps, head)
                            .select(1, 0)
                            .to(at::kFloat);
    if (keep_logits) kept.push_back(logits);
    constexpr float kExcluded = -std::numeric_limits<float>::infinity();
    const auto scores = !ignore_eos  ? logits
                        : keep_logits ? logits.index_fill(1, eos_ids, kExcluded)
                                      : logits.index_fill_(1, eos_ids, kExcluded);
    auto chosen = scores.argmax(-1).contiguous();
    int64_t* c = chosen.data_ptr<int64_t>();
    bool any_alive = false;
    for (int64_t r = 0; r < rows; ++r) {
      if (!alive[r]) c[r] = pad_id;
      alive[r] = alive[r] && !is_end(c[r]);
      any_alive = any_alive || alive[r];
    }
    chosen_steps.push_back(chosen);
    current = chosen;
    if (!any_alive) break;
  }
  return {at::stack(chosen_steps), keep_logits ? at::stack(kept) : at::empty({0}, embedding.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_lens, m) {
  m.def(
      "decode_attention_inputs(Tensor hidden, Tensor norm_weight, float eps, Tensor cos, Tensor sin, int head_dim, "
      "Tensor?[] linears, int[] shapes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "decode_layer_output(Tensor hidden, Tensor query, Tensor keys, Tensor values, float scaling, bool enable_gqa, "
      "Tensor norm_weight, float eps, Tensor?[] linears, int[] shapes) -> Tensor");
  m.class_<StackPlan>("StackPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<double>, c10::List<std::optional<at::Tensor>>,
                       std::vector<int64_t>, c10::List<std::optional<at::Tensor>>, std::vector<int64_t>, int64_t,
                       double, bool>());
  m.def("one_token_attention(Tensor query, Tensor keys, Tensor values, float scaling) -> Tensor?");
  m.def("one_region_timing(bool on) -> float[]", one_region_timing);
  m.def(
      "decode_stack(Tensor hidden, Tensor cos, Tensor sin, __torch__.torch.classes.lora_lens.StackPlan plan, "
      "Tensor[] keys, Tensor[] values, Tensor?[] key_buffers, Tensor?[] value_buffers, bool one_region=True) "
      "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])",
      decode_stack);
  m.class_<StepCache>("StepCache")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, c10::List<std::optional<at::Tensor>>,
                       c10::List<std::optional<at::Tensor>>>())
      .def("contents", &StepCache::contents);
  m.def(
      "decode_steps(Tensor tokens, Tensor embedding, Tensor[] cos, Tensor[] sin, "
      "__torch__.torch.classes.lora_lens.StackPlan plan, __torch__.torch.classes.lora_lens.StepCache cache, "
      "bool one_region, Tensor norm_weight, float norm_eps, Tensor? head_q8, Tensor? head_scales, "
      "Tensor? head_weight, Tensor? head_bias, Tensor unfinished, Tensor eos_ids, bool ignore_eos, int pad_id, "
      "bool keep_logits) -> (Tensor, Tensor)",
      decode_steps);
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) {
  m.impl("decode_attention_inputs", decode_attention_inputs);
  m.impl("decode_layer_output", decode_layer_output);
  m.impl("one_token_attention", lora_lens::one_token_attention);
}
