// The small parts of a decode step around the 4-bit products (csrc/decode_math.cpp), for the decode layer
// (csrc/decode_layer.cpp): attention of one new token over the cache, the MLP's silu(gate) * up, and the sums of
// squares of an RMS norm.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace lora_lens {

// softmax(q k^T * scaling) v for one query token per row: query [B, H, 1, D] (contiguous), keys and values
// [B, KVH, L, D] with the last axis contiguous (views of the cache's buffers), H a multiple of KVH (grouped-query
// attention: head h reads key/value head h / (H / KVH)). Returns [B, 1, H * D], the layout the output projection
// takes; nullopt where the shapes or types are not these (the caller takes ATen's attention then).
std::optional<at::Tensor> one_token_attention(const at::Tensor& query, const at::Tensor& keys,
                                              const at::Tensor& values, double scaling);

// silu(gate) * up elementwise, silu(g) = g / (1 + e^-g) as ATen computes it (with csrc/decode_math.cpp's exp).
void silu_product(const float* gate, const float* up, float* out, int64_t count);

// The mean of x^2 over each row's `features` values (contiguous float32 rows), into `means`.
void mean_squares(const float* x, int64_t rows, int64_t features, float* means);

}  // namespace lora_lens
