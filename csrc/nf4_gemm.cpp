// Fused 4-bit (NF4 / FP4, bitsandbytes layout) matrix product for CPUs with AVX2 + FMA.
//
// bitsandbytes de-quantizes every 4-bit weight to a float matrix before multiplying on CPUs without
// AVX512-BF16, so a decode step writes and re-reads the whole model in fp32. Here each group of 32 weights is
// decoded in registers (byte shuffles over the 16-entry code book) and multiplied into the few rows of a
// decode step at once: the weights are read once, in 4 bits, per step.
//
// Layout (bitsandbytes): weight [N, K] flattened row-major, two values per byte, the even element in the
// high nibble; one scale per `blocksize` consecutive elements; with nested (double) quantization the scale of
// block b is code2[absmax8[b]] * absmax2[b / 256] + offset. A weight is code[q] * scale, in fp32, exactly as
// bitsandbytes de-quantizes it; only the order of the sums differs from its dense matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include "nf4_gemm.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>

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

// Weights are decoded 32 at a time (K and the blocksize are multiples of 32). The 16 packed bytes are loaded into
// both 128-bit lanes and shifted by 0 bits in the low lane and 4 in the high one, so after masking the low lane
// holds the low nibbles (odd weights 1, 3, .., 31) and the high lane the high nibbles (even weights 0, 2, .., 30):
// 32 indices for one shift and one mask, no byte shuffle (shuffles are what bounds this loop for one row). Four
// byte shuffles then look up the four bytes of each weight's float in the code book at once (as llama.cpp
// applies its 16-entry IQ4_NL book with byte shuffles), and interleaving those bytes yields four 8-float
// vectors holding index positions {0-3,16-19}, {4-7,20-23}, {8-11,24-27}, {12-15,28-31}. The activations are
// permuted once per call into the same order (permute_activations), so the products pair up unchanged.
struct ByteTables {
  __m256i plane[4];  // plane[j]: byte j of each of the 16 code-book floats, in both 128-bit lanes
  explicit ByteTables(const float* code) {
    alignas(16) uint8_t bytes[4][16];
    for (int q = 0; q < 16; ++q) {
      uint32_t bits;
      std::memcpy(&bits, code + q, 4);
      for (int j = 0; j < 4; ++j) bytes[j][q] = static_cast<uint8_t>(bits >> (8 * j));
    }
    for (int j = 0; j < 4; ++j)
      plane[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[j])));
  }
};

// The weight each of the 32 decoded floats holds: index position p < 16 is weight 2p + 1, 16 + p is weight 2p.
constexpr int kChunkOrder[32] = {1, 3, 5,  7,  0, 2, 4,  6,  9,  11, 13, 15, 8,  10, 12, 14,
                                 17, 19, 21, 23, 16, 18, 20, 22, 25, 27, 29, 31, 24, 26, 28, 30};

// [M, K] activations into the decoded weights' order, 32 at a time.
void permute_activations(const float* a, float* out, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += 32)
      for (int i = 0; i < 32; ++i) out[m * K + k0 + i] = a[m * K + k0 + kChunkOrder[i]];
}

// Calls f(std::integral_constant<int64_t, m>) for m rows (1 to kMaxRows): the kernels are compiled for each
// row count, so their per-row accumulators live in registers.
template <typename F>
void with_rows(int64_t m, F&& f) {
  switch (m) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 2: return f(std::integral_constant<int64_t, 2>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 4: return f(std::integral_constant<int64_t, 4>{});
    case 5: return f(std::integral_constant<int64_t, 5>{});
    case 6: return f(std::integral_constant<int64_t, 6>{});
    case 7: return f(std::integral_constant<int64_t, 7>{});
    default: return f(std::integral_constant<int64_t, 8>{});
  }
}

// Each row sums into kAccumulators independent accumulators: with one, every FMA waits for the previous one's result
// (4 cycles) and that chain, not the decoding or the memory, bounds the kernel.
template <int64_t M>
constexpr int kAccumulators = M <= 2 ? 4 : (M <= 4 ? 2 : 1);

// Output n of each of the M rows: the row's R accumulators added, summed across lanes, plus the bias.
template <int64_t M, int R>
inline void store_sums(const __m256 (&acc)[M][R], float* out, int64_t N, int64_t n, const float* bias) {
  for (int64_t m = 0; m < M; ++m) {
    __m256 total = acc[m][0];
    for (int r = 1; r < R; ++r) total = _mm256_add_ps(total, acc[m][r]);
    out[m * N + n] = hsum(total) + (bias ? bias[n] : 0.0f);
  }
}

template <int64_t M>
void rows_kernel(const float* a, int64_t lda, const uint8_t* w, const Scales& scales, const ByteTables& tables,
                   int64_t n_begin, int64_t n_end, int64_t K, int64_t blocksize, float* out, int64_t N,
                   const float* bias) {
  constexpr int R = kAccumulators<M>;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m256 acc[M][R];
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    const uint8_t* row = w + n * K / 2;
    const int64_t first_block = n * K / blocksize;
    for (int64_t k0 = 0; k0 < K; k0 += blocksize) {
      const __m256 scale = _mm256_set1_ps(scales[first_block + k0 / blocksize]);
      for (int64_t k = k0; k < k0 + blocksize; k += 32) {
        const __m256i packed =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(packed, nibble_shift), low4);
        const __m256i b0 = _mm256_shuffle_epi8(tables.plane[0], idx);
        const __m256i b1 = _mm256_shuffle_epi8(tables.plane[1], idx);
        const __m256i b2 = _mm256_shuffle_epi8(tables.plane[2], idx);
        const __m256i b3 = _mm256_shuffle_epi8(tables.plane[3], idx);
        const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
        const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
        const __m256 weights[4] = {
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)), scale),
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)), scale),
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)), scale),
            _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)), scale)};
        for (int64_t m = 0; m < M; ++m) {
          const float* x = a + m * lda + k;
          for (int v = 0; v < 4; ++v)
            acc[m][v % R] = _mm256_fmadd_ps(weights[v], _mm256_loadu_ps(x + 8 * v), acc[m][v % R]);
        }
      }
    }
    store_sums<M, R>(acc, out, N, n, bias);
  }
}

}  // namespace

namespace lora_lens {

at::Tensor nf4_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                    int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                    const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.size(-1) == K, "nf4_gemm: A must be float32 [..., K]");
  TORCH_CHECK(K % blocksize == 0 && blocksize % 32 == 0,
              "nf4_gemm: K must be a multiple of the blocksize, and the blocksize of 32");
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
  const ByteTables tables(lp);
  auto permuted = at::empty({M, K}, a.options());
  permute_activations(ap, permuted.data_ptr<float>(), M, K);
  const float* pp = permuted.data_ptr<float>();
  // Split the output features across threads; each pass reads its weights once for up to kMaxRows rows.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, M - m0);
      with_rows(rows, [&](auto m) {
        rows_kernel<decltype(m)::value>(pp + m0 * K, K, wp, scales, tables, begin, end, K, blocksize,
                                        op + m0 * N, N, bp);
      });
    }
  });
  auto shape = A.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

}  // namespace lora_lens

namespace {

// Dot product of two float vectors of length K (any K), four accumulators as in rows_kernel.
inline float dot(const float* x, const float* y, int64_t K) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
    for (int v = 0; v < 4; ++v)
      acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * v), _mm256_loadu_ps(y + k + 8 * v), acc[v]);
  for (; k + 8 <= K; k += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k), acc[0]);
  float total = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < K; ++k) total += x[k] * y[k];
  return total;
}

}  // namespace

namespace lora_lens {

// A LoRA layer of a decode step in one call: the 4-bit base product, then peft's update for each row,
// result + (B (A x)) * factor, with the factor (strength x alpha / r) and the adapter set per batch row. The
// adapters of the layer are stacked, lora_a [R, K] and lora_b [N, R] (R the sum of their ranks), and a row's
// span (start, length) picks its adapter's rank block, so rows on different adapters share the one read of the
// 4-bit weights, and each row's update is the same arithmetic as its adapter's alone. Rows with factor 0 (the
// base) get no update. peft computes the same three steps as separate torch operations (two small matmuls, a
// multiply, an add), which in a decode step cost more in dispatch than in arithmetic. The multiply and the add
// stay two roundings, as in peft (the library is built with -ffp-contract=off, so they are never fused).
at::Tensor nf4_lora_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                         int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                         const std::optional<at::Tensor>& absmax_code,
                         const std::optional<at::Tensor>& absmax_offset, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& factors,
                         const at::Tensor& spans) {
  const int64_t stacked = lora_a.size(0);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K && lora_a.scalar_type() == at::kFloat,
              "nf4_lora_gemm: lora_a must be float32 [R, K]");
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == N && lora_b.size(1) == stacked &&
                  lora_b.scalar_type() == at::kFloat,
              "nf4_lora_gemm: lora_b must be float32 [N, R]");
  const int64_t batch = A.dim() > 1 ? A.size(0) : 1;
  TORCH_CHECK(factors.dim() == 1 && factors.size(0) == batch && factors.scalar_type() == at::kFloat,
              "nf4_lora_gemm: factors must be float32 [batch]");
  TORCH_CHECK(spans.dim() == 2 && spans.size(0) == batch && spans.size(1) == 2 && spans.scalar_type() == at::kLong,
              "nf4_lora_gemm: spans must be int64 [batch, 2]");
  const auto sp = spans.contiguous();
  const int64_t* spp = sp.data_ptr<int64_t>();
  for (int64_t row = 0; row < batch; ++row)
    TORCH_CHECK(spp[2 * row] >= 0 && spp[2 * row + 1] >= 0 && spp[2 * row] + spp[2 * row + 1] <= stacked,
                "nf4_lora_gemm: a span lies outside the stacked rank");
  at::Tensor out = nf4_gemm(A, B, N, K, absmax, blocksize, code, absmax_8bit, absmax_code, absmax_offset, bias);
  const auto x = A.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const auto la = lora_a.contiguous();
  const auto lb = lora_b.contiguous();
  const auto f = factors.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* ap = la.data_ptr<float>();
  const float* bp = lb.data_ptr<float>();
  const float* fp = f.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t per_batch_row = M / batch;  // tokens per batch row: the factor and span are the batch row's
  auto down = at::zeros({M, stacked}, x.options());  // A x: each row projected onto its adapter's r directions
  float* dp = down.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m / per_batch_row;
    if (fp[row] == 0.0f) continue;
    for (int64_t j = spp[2 * row]; j < spp[2 * row] + spp[2 * row + 1]; ++j) dp[m * stacked + j] = dot(ap + j * K, xp + m * K, K);
  }
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = m / per_batch_row;
      const float factor = fp[row];
      const int64_t start = spp[2 * row], rank = spp[2 * row + 1];
      if (factor == 0.0f || rank == 0) continue;
      for (int64_t n = begin; n < end; ++n) {
        const float update = dot(bp + n * stacked + start, dp + m * stacked + start, rank) * factor;
        op[m * N + n] = op[m * N + n] + update;
      }
    }
  });
  return out;
}

}  // namespace lora_lens

namespace {

// Rows n_begin..n_end of W times all M rows of x, each 8 floats of W loaded once for every row (K a multiple of
// 32), with kAccumulators independent sums per row as in rows_kernel.
template <int64_t M>
void dense_rows_kernel(const float* a, const float* w, int64_t n_begin, int64_t n_end, int64_t K, float* out,
                       int64_t N, const float* bias) {
  constexpr int R = kAccumulators<M>;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* row = w + n * K;
    __m256 acc[M][R];
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      for (int v = 0; v < 4; ++v) {
        const __m256 weights = _mm256_loadu_ps(row + k + 8 * v);
        for (int64_t m = 0; m < M; ++m)
          acc[m][v % R] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(a + m * K + k + 8 * v), acc[m][v % R]);
      }
    }
    store_sums<M, R>(acc, out, N, n, bias);
  }
}

// x @ W^T for the few rows of a decode step, W a dense float32 [N, K] matrix (the output layer): each row
// of W is read once from memory for all rows of x. torch's `linear` repacks the whole of W on every call for
// 2 to 8 rows, and `W @ x^T` reaches about half of one core's read bandwidth (utils/cpu_decode.py).
at::Tensor dense_rows_gemm(const at::Tensor& A, const at::Tensor& W, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && W.scalar_type() == at::kFloat && W.dim() == 2,
              "dense_rows_gemm: float32 inputs and a 2-D weight");
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(A.size(-1) == K, "dense_rows_gemm: A must be [..., K]");
  const auto a = A.reshape({-1, K}).contiguous();
  const auto w = W.contiguous();
  const int64_t M = a.size(0);
  TORCH_CHECK(M <= kMaxRows, "dense_rows_gemm: at most 8 rows");
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous().to(at::kFloat);
  auto out = at::empty({M, N}, a.options());
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    if (K % 32 == 0) {
      with_rows(M, [&](auto m) { dense_rows_kernel<decltype(m)::value>(ap, wp, begin, end, K, op, N, bp); });
      return;
    }
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot(wp + n * K, ap + m * K, K) + (bp ? bp[n] : 0.0f);
  });
  auto shape = A.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// MKL's thread count for the calling thread only (its C entry point: the lower-case name is the Fortran one,
// which takes a pointer); absent (null) where torch is built without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// The calling thread's CPU threads for torch's parallel loops, MKL and this library, without torch's process-
// wide default, which `torch.set_num_threads` also sets and which every thread started later takes: a thread
// of the web server taking 2 would keep a second OpenMP team alive, and two live teams halve decode speed
// (utils/engine.py). Returns the count the thread had.
int64_t set_thread_count(int64_t threads) {
  TORCH_CHECK(threads >= 1, "set_thread_count: at least one thread");
  // torch sets a thread's count up on its first parallel loop, from its process-wide default, and the flag that
  // says it did is an inline function's thread_local: this library has its own copy beside libtorch's. Both
  // are set up here, before the count is changed, or this library's first loop would undo the change.
  at::internal::lazy_init_num_threads();
  const int64_t previous = at::get_num_threads();
  omp_set_num_threads(static_cast<int>(threads));
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(static_cast<int>(threads));
  return previous;
}

}  // namespace

TORCH_LIBRARY(lora_lens, m) {
  m.def(
      "nf4_gemm(Tensor A, Tensor B, int N, int K, Tensor absmax, int blocksize, Tensor code, "
      "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None, Tensor? bias=None) "
      "-> Tensor");
  m.def(
      "nf4_lora_gemm(Tensor A, Tensor B, int N, int K, Tensor absmax, int blocksize, Tensor code, "
      "Tensor? absmax_8bit, Tensor? absmax_code, Tensor? absmax_offset, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, Tensor factors, Tensor spans) -> Tensor");
  m.def("dense_rows_gemm(Tensor A, Tensor W, Tensor? bias=None) -> Tensor");
  m.def("set_thread_count(int threads) -> int");
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) {
  m.impl("nf4_gemm", lora_lens::nf4_gemm);
  m.impl("nf4_lora_gemm", lora_lens::nf4_lora_gemm);
  m.impl("dense_rows_gemm", dense_rows_gemm);
}

// No tensor arguments, so no dispatch key to choose a backend by: registered for every backend.
TORCH_LIBRARY_IMPL(lora_lens, CompositeExplicitAutograd, m) { m.impl("set_thread_count", set_thread_count); }
