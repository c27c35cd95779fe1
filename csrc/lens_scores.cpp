// Teacher-forced scores straight from a row's logits: each position's log-normalizer, the log-probability of the
// token that follows, the top candidates, and KL between two rows, without the vocabulary-wide log-softmax,
// exp and differences that ATen writes out and reads back for each of them.
//
// The token lens scores 4 rows of 64 positions over a 49,152-token vocabulary (utils/runtime/scoring.py): ATen's
// log_softmax, topk and KL took 52-95 ms of a 0.5-0.7 s lens, these loops 16-20 ms (bench/bench_engine.py:
// lens_scores_ms; Intel Xeon with AMX, 2 cores). Here a position's logits are read twice (the maximum and the
// candidates in one pass, the sum of exponentials in the next) and a KL pair once more, from cache. The results
// differ from ATen's in the last bits only (the sums run in another order, exp is csrc/decode_math.h's
// polynomial); each position is summed by one thread in a fixed order, so they do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "decode_math.h"

namespace {

inline float max8(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The k largest logits of a position, largest first; of equal ones the lower id first (as they are met).
struct Candidates {
  std::vector<float> values;
  std::vector<int64_t> ids;
  explicit Candidates(int64_t k) : values(k, -std::numeric_limits<float>::infinity()), ids(k, -1) {}
  float least() const { return values.back(); }
  void offer(float value, int64_t id) {
    if (!(value > values.back())) return;
    int64_t i = static_cast<int64_t>(values.size()) - 1;
    while (i > 0 && value > values[i - 1]) {
      values[i] = values[i - 1];
      ids[i] = ids[i - 1];
      --i;
    }
    values[i] = value;
    ids[i] = id;
  }
};

// log sum_v e^z[v] of one position, after its maximum `top`: sum e^(z - top) with csrc/decode_math.cpp's exp.
float log_normalizer(const float* z, int64_t V, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t v = 0;
  for (; v + 32 <= V; v += 32)
    for (int j = 0; j < 4; ++j)
      acc[j] = _mm256_add_ps(acc[j], lora_lens::exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v + 8 * j), shift)));
  float sum = lora_lens::sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; v < V; ++v) sum += std::exp(z[v] - top);
  return top + std::log(sum);
}

// Per position: its log-normalizer, the log-probability of targets[t], and the top_k candidates' log-probabilities
// and ids. logits [T, V] float32 with contiguous rows; targets [T] int64 (a negative one gives 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_scores(const at::Tensor& logits,
                                                                     const at::Tensor& targets, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "row_scores: logits must be float32 [positions, vocabulary] with contiguous rows");
  const int64_t T = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && top_k >= 0 && top_k <= V, "row_scores: top_k must be at most the vocabulary's size");
  const auto wanted = targets.to(at::kLong).contiguous();
  TORCH_CHECK(wanted.numel() == T, "row_scores: one target a position");
  auto norms = at::empty({T}, logits.options());
  auto logprobs = at::empty({T}, logits.options());
  auto top_values = at::empty({T, top_k}, logits.options());
  auto top_ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  const float* base = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  const int64_t* target = wanted.data_ptr<int64_t>();
  float *norm_out = norms.data_ptr<float>(), *logprob_out = logprobs.data_ptr<float>();
  float* value_out = top_values.data_ptr<float>();
  int64_t* id_out = top_ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* z = base + t * stride;
      Candidates best(std::max<int64_t>(top_k, 1));
      // the maximum and the candidates in one pass: a block of 8 is looked at one by one only where one of its
      // logits beats the least candidate, which soon is rare
      __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      int64_t v = 0;
      for (; v + 8 <= V; v += 8) {
        const __m256 x = _mm256_loadu_ps(z + v);
        top = _mm256_max_ps(top, x);
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(best.least()), _CMP_GT_OQ));
        while (mask) {
          const int lane = __builtin_ctz(mask);
          best.offer(z[v + lane], v + lane);
          mask &= mask - 1;
        }
      }
      float largest = max8(top);
      for (; v < V; ++v) {
        largest = std::max(largest, z[v]);
        best.offer(z[v], v);
      }
      const float norm = log_normalizer(z, V, largest);
      norm_out[t] = norm;
      logprob_out[t] = target[t] >= 0 && target[t] < V ? z[target[t]] - norm : 0.0f;
      for (int64_t i = 0; i < top_k; ++i) {
        value_out[t * top_k + i] = best.values[i] - norm;
        id_out[t * top_k + i] = best.ids[i];
      }
    }
  });
  return {norms, logprobs, top_values, top_ids};
}

// KL(a || b) per position: sum_v p_a (log p_a - log p_b), log p = z - norm (row_scores's normalizers), in float32
// as ATen's exp(log p_a) * (log p_a - log p_b) summed.
at::Tensor kl_rows(const at::Tensor& a, const at::Tensor& a_norms, const at::Tensor& b, const at::Tensor& b_norms) {
  TORCH_CHECK(a.dim() == 2 && b.sizes() == a.sizes() && a.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat && a.stride(1) == 1 && b.stride(1) == 1,
              "kl_rows: two float32 [positions, vocabulary] rows of logits with contiguous rows");
  const int64_t T = a.size(0), V = a.size(1);
  const auto na = a_norms.to(at::kFloat).contiguous(), nb = b_norms.to(at::kFloat).contiguous();
  TORCH_CHECK(na.numel() == T && nb.numel() == T, "kl_rows: one normalizer a position");
  auto out = at::empty({T}, a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  const float *norm_a = na.data_ptr<float>(), *norm_b = nb.data_ptr<float>();
  float* kl = out.data_ptr<float>();
  const int64_t stride_a = a.stride(0), stride_b = b.stride(0);
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *za = pa + t * stride_a, *zb = pb + t * stride_b;
      const __m256 shift_a = _mm256_set1_ps(norm_a[t]), shift_b = _mm256_set1_ps(norm_b[t]);
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t v = 0;
      for (; v + 16 <= V; v += 16)
        for (int j = 0; j < 2; ++j) {
          const __m256 la = _mm256_sub_ps(_mm256_loadu_ps(za + v + 8 * j), shift_a);
          const __m256 lb = _mm256_sub_ps(_mm256_loadu_ps(zb + v + 8 * j), shift_b);
          acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(lora_lens::exp8(la), _mm256_sub_ps(la, lb)));
        }
      float sum = lora_lens::sum8(_mm256_add_ps(acc[0], acc[1]));
      for (; v < V; ++v) {
        const float la = za[v] - norm_a[t], lb = zb[v] - norm_b[t];
        sum += std::exp(la) * (la - lb);
      }
      kl[t] = sum;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_lens, m) {
  m.def("row_scores(Tensor logits, Tensor targets, int top_k) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kl_rows(Tensor a, Tensor a_norms, Tensor b, Tensor b_norms) -> Tensor");
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) {
  m.impl("row_scores", row_scores);
  m.impl("kl_rows", kl_rows);
}
