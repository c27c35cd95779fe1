// The small parts of a decode step around the 4-bit products (csrc/decode_math.cpp), for the decode layer
// (csrc/decode_layer.cpp): attention of one new token over the cache, the MLP's silu(gate) * up, and the sums of
// squares of an RMS norm; and the exp and lane sum they use, which the token lens's scores use too
// (csrc/lens_scores.cpp).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <optional>

namespace lora_lens {

// e^x, Cephes' expf: x = n ln2 + r, e^r by its degree-7 polynomial; x is held to [-87, 88], where e^x and 2^n
// stay normal float32 numbers (below, e^x is under the smallest normal; above, over the largest).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts, so r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// The sum of v's 8 lanes.
inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// softmax(q k^T * scaling) v for one query token per row: query [B, H, 1, D] (contiguous), keys and values
// [B, KVH, L, D] with the last axis contiguous (views of the cache's buffers), H a multiple of KVH (grouped-query
// attention: head h reads key/value head h / (H / KVH)). Returns [B, 1, H * D], the layout the output projection
// takes; nullopt where the shapes or types are not these (the caller takes ATen's attention then).
std::optional<at::Tensor> one_token_attention(const at::Tensor& query, const at::Tensor& keys,
                                              const at::Tensor& values, double scaling);

// one_token_attention's heads begin..end (index b * H + h) over plain pointers: query [B, H, D] contiguous, keys
// and values at strides (row, key/value head, position), L positions, D a multiple of 64; out [B, H * D]; scores
// L floats of scratch.
void attend_heads(const float* q, const float* k, int64_t ks0, int64_t ks1, int64_t ks2, const float* v, int64_t vs0,
                  int64_t vs1, int64_t vs2, int64_t H, int64_t KVH, int64_t L, int64_t D, float scaling, int64_t begin,
                  int64_t end, float* scores, float* out);

// silu(gate) * up elementwise, silu(g) = g / (1 + e^-g) as ATen computes it (with csrc/decode_math.cpp's exp).
void silu_product(const float* gate, const float* up, float* out, int64_t count);

// The mean of x^2 over each row's `features` values (contiguous float32 rows), into `means`.
void mean_squares(const float* x, int64_t rows, int64_t features, float* means);

}  // namespace lora_lens
