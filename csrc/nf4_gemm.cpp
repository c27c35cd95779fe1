// Fused 4-bit (NF4 / FP4, bitsandbytes layout) matrix product for CPUs with AVX2 + FMA.
//
// bitsandbytes de-quantizes every 4-bit weight to a float matrix before multiplying on CPUs without
// AVX512-BF16, so a decode step writes and re-reads the whole model in fp32. Here each group of 8 weights is
// decoded in registers (two 8-float halves of the 16-entry code book, chosen per lane) and multiplied into
// the few rows of a decode step at once: the weights are read once, in 4 bits, per step.
//
// Layout (bitsandbytes): weight [N, K] flattened row-major, two values per byte, the even element in the
// high nibble; one scale per `blocksize` consecutive elements; with nested (double) quantization the scale of
// block b is code2[absmax8[b]] * absmax2[b / 256] + offset. A weight is code[q] * scale, in fp32, exactly as
// bitsandbytes de-quantizes it; only the order of the sums differs from its dense matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t kMaxRows = 8;  // rows handled per pass over the weights (a decode step has 1-6)

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

// The scale of block b: plain absmax[b], or nested code2[absmax8[b]] * absmax[b / 256] + offset.
struct Scales {
  const float* absmax;
  const uint8_t* absmax8;  // null when not nested
  const float* code2;
  float offset;
  inline float operator[](int64_t b) const {
    return absmax8 ? code2[absmax8[b]] * absmax[b / 256] + offset : absmax[b];
  }
};

template <int64_t M>
void rows_kernel(const float* a, int64_t lda, const uint8_t* w, const Scales& scales, const float* code,
                 int64_t n_begin, int64_t n_end, int64_t K, int64_t blocksize, float* out, int64_t N,
                 const float* bias) {
  const __m256 lut_lo = _mm256_loadu_ps(code);
  const __m256 lut_hi = _mm256_loadu_ps(code + 8);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m256 acc[M];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const uint8_t* row = w + n * K / 2;
    const int64_t first_block = n * K / blocksize;
    for (int64_t k0 = 0; k0 < K; k0 += blocksize) {
      const __m256 scale = _mm256_set1_ps(scales[first_block + k0 / blocksize]);
      for (int64_t k = k0; k < k0 + blocksize; k += 8) {
        uint32_t packed;
        std::memcpy(&packed, row + k / 2, 4);
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)packed), shifts), low4);
        const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx);
        const __m256 hi = _mm256_permutevar8x32_ps(lut_hi, idx);
        const __m256 value = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        const __m256 weight = _mm256_mul_ps(value, scale);
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(a + m * lda + k), acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = hsum(acc[m]) + (bias ? bias[n] : 0.0f);
  }
}

using RowsKernel = void (*)(const float*, int64_t, const uint8_t*, const Scales&, const float*, int64_t, int64_t,
                            int64_t, int64_t, float*, int64_t, const float*);

RowsKernel kernel_for(int64_t m) {
  switch (m) {
    case 1: return rows_kernel<1>;
    case 2: return rows_kernel<2>;
    case 3: return rows_kernel<3>;
    case 4: return rows_kernel<4>;
    case 5: return rows_kernel<5>;
    case 6: return rows_kernel<6>;
    case 7: return rows_kernel<7>;
    default: return rows_kernel<8>;
  }
}

at::Tensor nf4_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                    int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                    const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.size(-1) == K, "nf4_gemm: A must be float32 [..., K]");
  TORCH_CHECK(K % blocksize == 0 && blocksize % 8 == 0, "nf4_gemm: K must be a multiple of the blocksize");
  const auto a = A.reshape({-1, K}).contiguous();
  const auto w = B.view(at::kByte).contiguous();
  TORCH_CHECK(w.numel() * 2 == N * K, "nf4_gemm: B must hold N * K / 2 bytes");
  const int64_t M = a.size(0);
  const auto outer = absmax.contiguous().to(at::kFloat);
  std::optional<at::Tensor> q8, code2;
  Scales scales{outer.data_ptr<float>(), nullptr, nullptr, 0.0f};
  if (absmax_8bit.has_value()) {
    q8 = absmax_8bit->contiguous();
    code2 = absmax_code->contiguous().to(at::kFloat);
    scales = Scales{outer.data_ptr<float>(), q8->data_ptr<uint8_t>(), code2->data_ptr<float>(),
                    absmax_offset->item<float>()};
  }
  const auto lut = code.contiguous().to(at::kFloat);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous().to(at::kFloat);
  auto out = at::empty({M, N}, a.options());
  const float* ap = a.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Split the output features across threads; each pass reads its weights once for up to kMaxRows rows.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, M - m0);
      kernel_for(rows)(ap + m0 * K, K, wp, scales, lp, begin, end, K, blocksize, op + m0 * N, N, bp);
    }
  });
  auto shape = A.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY(lora_lens, m) {
  m.def(
      "nf4_gemm(Tensor A, Tensor B, int N, int K, Tensor absmax, int blocksize, Tensor code, "
      "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None, Tensor? bias=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) { m.impl("nf4_gemm", nf4_gemm); }
