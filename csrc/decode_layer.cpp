// A Llama decoder layer's decode step as two calls, around the key/value cache update that stays in Python.
//
// transformers' LlamaDecoderLayer runs about 40 torch operations and 15 module calls per layer from Python; for
// the few rows of a CPU decode step that Python costs about a third of the step (py-spy over the embedded
// default, 1 thread). These functions run the layer from C++: ATen's operations where they cost little, loops of
// csrc/decode_math.cpp for a decode step's attention, norms and silu (the same values up to float32 rounding);
// the 4-bit products (and peft's LoRA updates, one factor per batch row) call csrc/nf4_gemm.cpp directly. utils/decode_layers.py decides when they serve a layer and packs
// the layer's weights into the lists they take.

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
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
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t features = x.size(-1);
  if (!(x.is_contiguous() && weight.is_contiguous() && weight.scalar_type() == at::kFloat &&
        weight.numel() == features)) {
    return weight * (x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps));
  }
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const float* xp = x.data_ptr<float>();
  std::vector<float> variance(x.numel() / features);
  lora_lens::mean_squares(xp, static_cast<int64_t>(variance.size()), features, variance.data());
  const float* vp = variance.data();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  for (int64_t row = 0; row < x.numel() / features; ++row) {
    const float scale = 1.0f / std::sqrt(vp[row] + epsilon);
    for (int64_t j = 0; j < features; ++j) op[row * features + j] = wp[j] * (xp[row * features + j] * scale);
  }
  return out;
}

// apply_rotary_pos_emb for one new token: x * cos + rotate_half(x) * sin, x given as the projection's output
// [batch, 1, heads * D] and returned as [batch, heads, 1, D] (contiguous); each product rounded, then the sum
// (the library is built with -ffp-contract=off), as ATen's three elementwise operations give it. cos and sin are
// [batch or 1, 1, D].
at::Tensor rotary(const at::Tensor& projected, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  const int64_t batch = projected.size(0), heads = projected.size(-1) / head_dim, half = head_dim / 2;
  const auto x = projected.contiguous();
  const auto c = cos.contiguous(), s = sin.contiguous();
  auto out = at::empty({batch, heads, 1, head_dim}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float* cp = c.data_ptr<float>() + (c.size(0) == 1 ? 0 : b * head_dim);
    const float* sp = s.data_ptr<float>() + (s.size(0) == 1 ? 0 : b * head_dim);
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = xp + (b * heads + h) * head_dim;
      float* o = op + (b * heads + h) * head_dim;
      for (int64_t j = 0; j < head_dim; ++j) {
        const float rotated = j < half ? -in[j + half] : in[j - half];
        const float direct = in[j] * cp[j];
        const float turned = rotated * sp[j];
        o[j] = direct + turned;
      }
    }
  }
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
// result) or anything else, which is copied into a new buffer. Returns (the view, the buffer).
std::pair<at::Tensor, at::Tensor> append_token(const at::Tensor& cached, const at::Tensor& token,
                                               const std::optional<at::Tensor>& buffer) {
  const int64_t length = cached.size(-2);
  const bool in_buffer = buffer.has_value() && buffer->dim() == cached.dim() && buffer->size(-2) > length &&
                         cached.data_ptr() == buffer->data_ptr() && cached.strides() == buffer->strides() &&
                         cached.sizes().slice(0, cached.dim() - 2) == buffer->sizes().slice(0, cached.dim() - 2) &&
                         cached.size(-1) == buffer->size(-1) && buffer->scalar_type() == token.scalar_type();
  at::Tensor room = in_buffer ? *buffer : at::Tensor();
  if (!in_buffer) {
    auto sizes = token.sizes().vec();
    sizes[sizes.size() - 2] = (length + 1 + 127) / 128 * 128 + 128;  // room for about 128 more tokens
    room = at::empty(sizes, token.options());
    if (length > 0) room.narrow(-2, 0, length).copy_(cached);
  }
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
             c10::List<std::optional<at::Tensor>> key_buffers, c10::List<std::optional<at::Tensor>> value_buffers) {
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3, "decode stack: float32 [batch, tokens, hidden]");
  TORCH_CHECK(static_cast<int64_t>(values.size()) == layers && static_cast<int64_t>(plan->norm_weights.size()) == 2 * layers,
              "decode stack: keys and values for every layer of the plan");
  TORCH_CHECK(static_cast<int64_t>(key_buffers.size()) == layers && static_cast<int64_t>(value_buffers.size()) == layers,
              "decode stack: a key and a value buffer (or None) for every layer");
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
  m.def(
      "decode_stack(Tensor hidden, Tensor cos, Tensor sin, __torch__.torch.classes.lora_lens.StackPlan plan, "
      "Tensor[] keys, Tensor[] values, Tensor?[] key_buffers, Tensor?[] value_buffers) "
      "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])",
      decode_stack);
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) {
  m.impl("decode_attention_inputs", decode_attention_inputs);
  m.impl("decode_layer_output", decode_layer_output);
  m.impl("one_token_attention", lora_lens::one_token_attention);
}
