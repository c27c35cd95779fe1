// Attention of one new token over the cache, and an RMS norm's sums of squares, as plain AVX2 loops.
//
// At a decode step these are tiny (two rows of SmolLM2 attend 18 heads of 64 values over ~100 cached tokens) and
// ATen's general kernels cost more in set-up than in arithmetic: scaled_dot_product_attention took 0.8 ms of a
// 10 ms two-row step over 30 layers, and pow + mean + div for the norms another 0.4 ms (torch.profiler, 2-core
// AMD EPYC Zen 4). The results differ from ATen's in the last bits only: the sums run in another order and exp is
// a polynomial accurate to about 1 float32 ulp (Cephes' expf), which greedy decoding does not see
// (tests/test_decode_layers.py checks the tokens and the logits' distance).

#include "decode_math.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lora_lens {
namespace {

constexpr int64_t kGroup = 64;  // head dimensions handled per pass over the values: 8 accumulators of 8

// q . k for 8 cached positions at once (8 independent sums), returned as one vector of the 8 dot products.
inline __m256 dots8(const float* q, const float* k, int64_t k_stride, int64_t D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) {
    const __m256 qj = _mm256_loadu_ps(q + j);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(k + i * k_stride + j), a[i]);
  }
  // transpose-and-add: lane i of the result is the sum of a[i]'s 8 lanes
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float dot(const float* q, const float* k, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(k + j), a);
  return sum8(a);
}

// One head of one row: scores (L floats of scratch), then out[D] = sum_l softmax(scores)_l v_l.
void attend(const float* q, const float* k, int64_t k_stride, const float* v, int64_t v_stride, int64_t L, int64_t D,
            float scaling, float* scores, float* out) {
  const __m256 scale = _mm256_set1_ps(scaling);
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) _mm256_storeu_ps(scores + l, _mm256_mul_ps(dots8(q, k + l * k_stride, k_stride, D), scale));
  for (; l < L; ++l) scores[l] = dot(q, k + l * k_stride, D) * scaling;
  const float top = *std::max_element(scores, scores + L);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  for (l = 0; l + 8 <= L; l += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + l), shift));
    _mm256_storeu_ps(scores + l, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = sum8(total8);
  for (; l < L; ++l) total += scores[l] = std::exp(scores[l] - top);
  const __m256 inverse = _mm256_set1_ps(1.0f / total);
  for (int64_t g = 0; g < D; g += kGroup) {
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (l = 0; l < L; ++l) {
      const __m256 p = _mm256_set1_ps(scores[l]);
      const float* row = v + l * v_stride + g;
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(row + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + g + 8 * c, _mm256_mul_ps(acc[c], inverse));
  }
}

}  // namespace

void attend_heads(const float* q, const float* k, int64_t ks0, int64_t ks1, int64_t ks2, const float* v, int64_t vs0,
                  int64_t vs1, int64_t vs2, int64_t H, int64_t KVH, int64_t L, int64_t D, float scaling, int64_t begin,
                  int64_t end, float* scores, float* out) {
  const int64_t per_kv = H / KVH;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, h = bh % H, kv = h / per_kv;
    attend(q + bh * D, k + b * ks0 + kv * ks1, ks2, v + b * vs0 + kv * vs1, vs2, L, D, scaling, scores,
           out + b * H * D + h * D);
  }
}

std::optional<at::Tensor> one_token_attention(const at::Tensor& query, const at::Tensor& keys,
                                              const at::Tensor& values, double scaling) {
  if (query.dim() != 4 || keys.dim() != 4 || values.dim() != 4 || query.size(2) != 1 ||
      query.scalar_type() != at::kFloat || keys.scalar_type() != at::kFloat || values.scalar_type() != at::kFloat ||
      !query.is_contiguous() || keys.stride(3) != 1 || values.stride(3) != 1 || keys.sizes() != values.sizes())
    return std::nullopt;
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3), KVH = keys.size(1), L = keys.size(2);
  if (keys.size(0) != B || keys.size(3) != D || D % kGroup != 0 || KVH == 0 || H % KVH != 0 || L == 0)
    return std::nullopt;
  auto out = at::empty({B, 1, H * D}, query.options());
  const float* qp = query.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto run = [&](int64_t begin, int64_t end) {
    std::vector<float> scores(L);
    attend_heads(qp, kp, keys.stride(0), keys.stride(1), keys.stride(2), vp, values.stride(0), values.stride(1),
                 values.stride(2), H, KVH, L, D, static_cast<float>(scaling), begin, end, scores.data(), op);
  };
  // a parallel region (a microsecond or two) costs more than a very short cache's heads take on one thread; from
  // about 30 tokens on, two rows of SmolLM2's 9 heads are worth splitting: the keys and values come from memory
  // (0.5 ms of a 2-row step at 100 tokens on one thread, while the other waited)
  if (B * H < 2 || B * H * L * D < (int64_t{1} << 15)) {
    run(0, B * H);
  } else {
    at::parallel_for(0, B * H, 1, run);
  }
  return out;
}

void silu_product(const float* gate, const float* up, float* out, int64_t count) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  for (; i < count; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void mean_squares(const float* x, int64_t rows, int64_t features, float* means) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* p = x + row * features;
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= features; j += 16) {
      const __m256 u = _mm256_loadu_ps(p + j), w = _mm256_loadu_ps(p + j + 8);
      a = _mm256_fmadd_ps(u, u, a);
      b = _mm256_fmadd_ps(w, w, b);
    }
    float sum = sum8(_mm256_add_ps(a, b));
    for (; j < features; ++j) sum += p[j] * p[j];
    means[row] = sum / static_cast<float>(features);
  }
}

}  // namespace lora_lens
