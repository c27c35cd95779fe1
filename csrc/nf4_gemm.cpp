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
#include <c10/util/ParallelGuard.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include "nf4_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <optional>
#include <type_traits>

namespace {

using lora_lens::kMaxRows;
using lora_lens::ScaleReader;

// Whether the AVX-512 kernels run (set_vector_width): where the CPU has them and torch's own kernels are not
// held to AVX2 (bench/bench_engine.py --as-avx2 stands in for an AVX2-only CPU that way).
bool use_avx512 = false;

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

// 32 weights from their 16 packed bytes as their code-book values (not yet scaled), four 8-float vectors in the
// order kChunkOrder gives (the low nibbles to the low lane, the high ones to the high lane: one shift and one mask).
inline void decode32_codes(const ByteTables& tables, const uint8_t* bytes, __m256 (&weights)[4]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(packed, nibble_shift), low4);
  const __m256i b0 = _mm256_shuffle_epi8(tables.plane[0], idx);
  const __m256i b1 = _mm256_shuffle_epi8(tables.plane[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(tables.plane[2], idx);
  const __m256i b3 = _mm256_shuffle_epi8(tables.plane[3], idx);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  weights[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  weights[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  weights[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  weights[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

// The same 32 weights times the block's scale: code[q] * scale, each rounded once, as bitsandbytes de-quantizes.
inline void decode32(const ByteTables& tables, const uint8_t* bytes, __m256 scale, __m256 (&weights)[4]) {
  decode32_codes(tables, bytes, weights);
  for (auto& w : weights) w = _mm256_mul_ps(w, scale);
}

// The weight each of the 32 decoded floats holds: index position p < 16 is weight 2p + 1, 16 + p is weight 2p.
constexpr int kChunkOrder[32] = {1, 3, 5,  7,  0, 2, 4,  6,  9,  11, 13, 15, 8,  10, 12, 14,
                                 17, 19, 21, 23, 16, 18, 20, 22, 25, 27, 29, 31, 24, 26, 28, 30};

// The AVX-512 kernel's order: the 16 odd positions of each 32, then the 16 even ones (low nibbles first).
constexpr int kWideChunkOrder[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                     0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};

// [M, K] activations (K a multiple of 32) into the decoded weights' order, 32 at a time: kWideChunkOrder for the
// AVX-512 loops, else kChunkOrder, whose every 8 stay within their 8 (one in-register permute each). Vector
// permutes: the scalar copy was a few microseconds a call at 2 rows, serial while the other threads waited.
void permute_activations(const float* a, float* out, int64_t M, int64_t K, bool wide) {
  const int64_t count = M * K;
  if (wide) {
    lora_lens::permute_chunks_avx512(a, out, count, kWideChunkOrder);
    return;
  }
  const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kChunkOrder));
  for (int64_t i = 0; i < count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_permutevar8x32_ps(_mm256_loadu_ps(a + i), order));
}

using lora_lens::with_row_count;

// Each row sums into kAccumulators independent accumulators: with one, every FMA waits for the previous one's result
// (4 cycles) and that chain, not the decoding or the memory, bounds the kernel.
template <int64_t M>
constexpr int kAccumulators = M <= 2 ? 4 : (M <= 4 ? 2 : 1);

// The decode-step kernel's partial sums per scale block: fewer than kAccumulators where the rows' block sums and
// totals would not fit the 16 vector registers beside the decoded weights and the code book's planes.
template <int64_t M>
constexpr int kBlockAccumulators = M == 1 ? 4 : (M == 2 ? 2 : 1);

// Output n of each of the M rows: the row's R accumulators added, summed across lanes, plus the bias.
template <int64_t M, int R>
inline void store_sums(const __m256 (&acc)[M][R], float* out, int64_t N, int64_t n, const float* bias) {
  for (int64_t m = 0; m < M; ++m) {
    __m256 total = acc[m][0];
    for (int r = 1; r < R; ++r) total = _mm256_add_ps(total, acc[m][r]);
    out[m * N + n] = hsum(total) + (bias ? bias[n] : 0.0f);
  }
}

// Each scale block is summed unscaled and multiplied by its scale once, as the AVX-512 loops do
// (csrc/nf4_gemm_avx512.cpp): four fewer multiplies in every 32 weights (about a sixth of the loop's vector
// operations at 2 rows), the weights still code[q] * scale in float32, only the order of the roundings moved.
template <int64_t M>
void rows_kernel(const float* a, int64_t lda, const uint8_t* w, const ScaleReader& scales, const ByteTables& tables,
                   int64_t n_begin, int64_t n_end, int64_t K, int64_t blocksize, float* out, int64_t N,
                   const float* bias) {
  constexpr int R = kBlockAccumulators<M>;
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n_begin; n < n_end; ++n) {
    __m256 acc[M][1];
    for (int64_t m = 0; m < M; ++m) acc[m][0] = _mm256_setzero_ps();
    const uint8_t* row = w + n * K / 2;
    // the block's index counted, not divided out: GCC divided by the run-time blocksize every block
    for (int64_t k0 = 0, block = n * blocks_per_row; k0 < K; k0 += blocksize, ++block) {
      __m256 part[M][R];
      for (int64_t m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) part[m][r] = _mm256_setzero_ps();
      for (int64_t k = k0; k < k0 + blocksize; k += 32) {
        // the rows lie one after another, 16 bytes a step: the line kPrefetchBytes ahead, once a line. Without it
        // the loop waited on memory: 2-row decode steps on the Xeon with AMX held to AVX2 (bench_engine.py
        // --as-avx2), alternating processes, 15.1-16.1 ms against 9.9-10.7 ms with it (1 row: 13.6-13.9 against
        // 7.1-7.4); a standalone copy of this loop over 53 MB, one thread: 5.1 against 13.3 G weights/s.
        if (k % 128 == 0)
          _mm_prefetch(reinterpret_cast<const char*>(row + k / 2) + lora_lens::kPrefetchBytes, _MM_HINT_T0);
        __m256 weights[4];
        decode32_codes(tables, row + k / 2, weights);
        for (int64_t m = 0; m < M; ++m) {
          const float* x = a + m * lda + k;
          for (int v = 0; v < 4; ++v)
            part[m][v % R] = _mm256_fmadd_ps(weights[v], _mm256_loadu_ps(x + 8 * v), part[m][v % R]);
        }
      }
      const __m256 scale = _mm256_set1_ps(scales[block]);
      for (int64_t m = 0; m < M; ++m) {
        __m256 total = part[m][0];
        for (int r = 1; r < R; ++r) total = _mm256_add_ps(total, part[m][r]);
        acc[m][0] = _mm256_fmadd_ps(total, scale, acc[m][0]);
      }
    }
    store_sums<M, 1>(acc, out, N, n, bias);
  }
}

}  // namespace

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

// A tensor's float32 values, contiguous: itself where it already is (no dispatcher call: a decode step sets up a
// few hundred of these, and each call through the dispatcher costs about a microsecond), else a converted copy.
at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.contiguous().to(at::kFloat);
}

// One 4-bit linear layer of a step, checked and ready to run (the tensors it reads are held here): the base
// product into `out`, and where `stacked` > 0 a LoRA update per row (nf4_lora_gemm).
// One entry of a LoRA layer's A x still to compute: the dot of lora_A's row with an activation row, into `to`.
struct DownDot {
  const float* a;
  const float* x;
  float* to;
};

struct Nf4Job {
  at::Tensor weight, outer, q8, code2, lut, bias, out, lora_a, lora_b_t, down, factors, spans;
  std::vector<DownDot> down_dots;  // A x, computed by run_jobs's threads before the updates read it
  const uint8_t* wp = nullptr;
  ScaleReader scales{nullptr, nullptr, nullptr, 0.0f};
  const float* lp = nullptr;
  const float* bp = nullptr;
  float* op = nullptr;
  int64_t N = 0, K = 0, blocksize = 0, stacked = 0, per_batch_row = 1;
  ProductView view() const;
  const float* down_data() const { return stacked > 0 ? down.data_ptr<float>() : nullptr; }
};

Nf4Job make_job(int64_t M, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax, int64_t blocksize,
                const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                const std::optional<at::Tensor>& bias, const at::TensorOptions& options) {
  TORCH_CHECK(K % blocksize == 0 && blocksize % 32 == 0,
              "nf4_gemm: K must be a multiple of the blocksize, and the blocksize of 32");
  Nf4Job job;
  const bool bytes = B.scalar_type() == at::kByte && B.is_contiguous();
  job.weight = bytes ? B : B.view(at::kByte).contiguous();
  TORCH_CHECK(job.weight.numel() * 2 == N * K, "nf4_gemm: B must hold N * K / 2 bytes");
  TORCH_CHECK(N * K / blocksize < (int64_t{1} << 31), "nf4_gemm: at most 2^31 scale blocks in a weight");
  job.outer = as_float(absmax);
  job.scales = ScaleReader{job.outer.data_ptr<float>(), nullptr, nullptr, 0.0f};
  if (absmax_8bit.has_value()) {
    job.q8 = absmax_8bit->is_contiguous() ? *absmax_8bit : absmax_8bit->contiguous();
    TORCH_CHECK(job.q8.scalar_type() == at::kByte, "nf4_gemm: the nested scales are uint8");
    job.code2 = as_float(*absmax_code);
    const auto offset = as_float(*absmax_offset);
    TORCH_CHECK(offset.numel() == 1 && offset.device().is_cpu(), "nf4_gemm: one offset");
    job.scales = ScaleReader{job.outer.data_ptr<float>(), job.q8.data_ptr<uint8_t>(), job.code2.data_ptr<float>(),
                             *offset.data_ptr<float>()};
  }
  job.lut = as_float(code);
  TORCH_CHECK(job.lut.numel() == 16, "nf4_gemm: the code book has 16 entries");
  if (bias.has_value()) job.bias = as_float(*bias);
  job.out = at::empty({M, N}, options);
  job.wp = job.weight.data_ptr<uint8_t>();
  job.lp = job.lut.data_ptr<float>();
  job.bp = job.bias.defined() ? job.bias.data_ptr<float>() : nullptr;
  job.op = job.out.data_ptr<float>();
  job.N = N;
  job.K = K;
  job.blocksize = blocksize;
  return job;
}

// A LoRA layer's update for each row, result + (B (A x)) * factor, with the factor (strength x alpha / r) and
// the adapter set per batch row. The adapters of the layer are stacked, lora_a [R, K] and lora_b_t [R, N], lora_B
// transposed (R the
// sum of their ranks), and a row's span (start, length) picks its adapter's rank block, so rows on different
// adapters share the one read of the 4-bit weights, and each row's update is the same arithmetic as its
// adapter's alone. Rows with factor 0 (the base) get no update. peft computes the same three steps as separate
// torch operations (two small matmuls, a multiply, an add), which in a decode step cost more in dispatch than
// in arithmetic. The multiply and the add stay two roundings, as in peft (the library is built with
// -ffp-contract=off, so they are never fused). A x is listed here and computed by run_jobs's threads, each a share
// of its dots (one thread reading all of lora_A was ~0.4 ms of a 2-row SmolLM2 step while the other waited);
// B's part runs with the base product after them.
void add_lora(Nf4Job& job, const at::Tensor& x, int64_t batch, const at::Tensor& lora_a, const at::Tensor& lora_b_t,
              const at::Tensor& factors, const at::Tensor& spans) {
  const int64_t N = job.N, K = job.K, stacked = lora_a.size(0);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K && lora_a.scalar_type() == at::kFloat,
              "nf4_lora_gemm: lora_a must be float32 [R, K]");
  TORCH_CHECK(lora_b_t.dim() == 2 && lora_b_t.size(0) == stacked && lora_b_t.size(1) == N &&
                  lora_b_t.scalar_type() == at::kFloat,
              "nf4_lora_gemm: lora_b_t must be float32 [R, N] (lora_B transposed)");
  TORCH_CHECK(factors.dim() == 1 && factors.size(0) == batch && factors.scalar_type() == at::kFloat,
              "nf4_lora_gemm: factors must be float32 [batch]");
  TORCH_CHECK(spans.dim() == 2 && spans.size(0) == batch && spans.size(1) == 2 && spans.scalar_type() == at::kLong,
              "nf4_lora_gemm: spans must be int64 [batch, 2]");
  job.spans = spans.is_contiguous() ? spans : spans.contiguous();
  const int64_t* spp = job.spans.data_ptr<int64_t>();
  for (int64_t row = 0; row < batch; ++row)
    TORCH_CHECK(spp[2 * row] >= 0 && spp[2 * row + 1] >= 0 && spp[2 * row] + spp[2 * row + 1] <= stacked,
                "nf4_lora_gemm: a span lies outside the stacked rank");
  const int64_t M = x.size(0);
  job.lora_a = lora_a.is_contiguous() ? lora_a : lora_a.contiguous();
  job.lora_b_t = lora_b_t.is_contiguous() ? lora_b_t : lora_b_t.contiguous();
  job.factors = factors.is_contiguous() ? factors : factors.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* ap = job.lora_a.data_ptr<float>();
  const float* fp = job.factors.data_ptr<float>();
  job.per_batch_row = M / batch;  // tokens per batch row: the factor and span are the batch row's
  job.down = at::empty({M, stacked}, x.options());  // A x: each row projected onto its adapter's r directions
  float* dp = job.down.data_ptr<float>();
  std::fill(dp, dp + M * stacked, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m / job.per_batch_row;
    if (fp[row] == 0.0f) continue;
    for (int64_t j = spp[2 * row]; j < spp[2 * row] + spp[2 * row + 1]; ++j)
      job.down_dots.push_back({ap + j * K, xp + m * K, dp + m * stacked + j});
  }
  job.stacked = stacked;
}

// out[n] + (sum over j of down[j] * b_t[j, n]) * factor for n in begin..end: one row's LoRA update, summed
// over the rank in order with one rounding a step (fused multiply-adds), 8 outputs to a vector and four vectors
// at once; then the factor and the add as two roundings, as peft's multiply and add.
void lora_update(const float* down, const float* b_t, int64_t rank, int64_t N, float factor, int64_t begin,
                 int64_t end, float* out) {
  const __m256 scale = _mm256_set1_ps(factor);
  int64_t n = begin;
  for (; n + 32 <= end; n += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < rank; ++j) {
      const __m256 d = _mm256_set1_ps(down[j]);
      for (int v = 0; v < 4; ++v) acc[v] = _mm256_fmadd_ps(d, _mm256_loadu_ps(b_t + j * N + n + 8 * v), acc[v]);
    }
    for (int v = 0; v < 4; ++v)
      _mm256_storeu_ps(out + n + 8 * v,
                       _mm256_add_ps(_mm256_loadu_ps(out + n + 8 * v), _mm256_mul_ps(acc[v], scale)));
  }
  for (; n + 8 <= end; n += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < rank; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(down[j]), _mm256_loadu_ps(b_t + j * N + n), acc);
    _mm256_storeu_ps(out + n, _mm256_add_ps(_mm256_loadu_ps(out + n), _mm256_mul_ps(acc, scale)));
  }
  for (; n < end; ++n) {
    float acc = 0.0f;
    for (int64_t j = 0; j < rank; ++j) acc = std::fma(down[j], b_t[j * N + n], acc);
    const float update = acc * factor;
    out[n] = out[n] + update;
  }
}

// A job's pointers as the decode-step loops read them: a view, so that a product planned once
// (lora_lens::StepLinear, the fused decode stack) runs the same loops as a job checked and set up every call.
ProductView Nf4Job::view() const {
  ProductView v;
  v.wp = wp;
  v.scales = scales;
  v.lp = lp;
  v.bp = bp;
  v.N = N;
  v.K = K;
  v.blocksize = blocksize;
  v.stacked = stacked;
  v.per_batch_row = per_batch_row;
  if (stacked > 0) {
    v.fp = factors.data_ptr<float>();
    v.spp = spans.data_ptr<int64_t>();
    v.btp = lora_b_t.data_ptr<float>();
  }
  return v;
}

// Each row's LoRA update (add_lora) on outputs begin..end: `down` holds A x [M, stacked], `op` the outputs [M, N].
void add_updates(const ProductView& job, const float* down, float* op, int64_t M, int64_t begin, int64_t end) {
  if (job.stacked == 0) return;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m / job.per_batch_row;
    const float factor = job.fp[row];
    const int64_t start = job.spp[2 * row], rank = job.spp[2 * row + 1];
    if (factor == 0.0f || rank == 0) continue;
    lora_update(down + m * job.stacked + start, job.btp + start * job.N, rank, job.N, factor, begin, end,
                op + m * job.N);
  }
}

// Outputs begin..end of a product for all M rows (pp: the activations permuted for the kernel) into op [M, N], then
// their updates.
void run_range(const ProductView& job, const float* pp, int64_t M, const ByteTables& tables, bool wide,
               int64_t begin, int64_t end, const float* down, float* op) {
  const int64_t N = job.N, K = job.K;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, M - m0);
    if (wide) {
      nf4_rows_avx512(rows, pp + m0 * K, K, job.wp, job.scales, job.lp, begin, end, K, job.blocksize, op + m0 * N,
                      N, job.bp);
      continue;
    }
    with_row_count(rows, [&](auto m) {
      rows_kernel<decltype(m)::value>(pp + m0 * K, K, job.wp, job.scales, tables, begin, end, K, job.blocksize,
                                      op + m0 * N, N, job.bp);
    });
  }
  add_updates(job, down, op, M, begin, end);
}

// BLAS's float product (Fortran interface, 32-bit sizes), as torch's CPU library exports it (MKL's); weak, so the
// library loads where it is absent, and the tiled path is not taken there.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

constexpr int64_t kTiledFrom = 17;  // rows from which a product de-quantizes tiles and multiplies them by BLAS
// Output features a tile at most: as many as fit kTileBytes of floats (64 to 512, a multiple of 16), so that each
// BLAS call is large enough to run near its peak while the tile stays in a core's L2 cache (1 MB on Zen 4;
// 64 outputs a tile, as before, made the prefill 10% slower, and 512 kB no faster: bench/bench_engine.py).
constexpr int64_t kTileBytes = 1 << 20;
inline int64_t tile_outputs(int64_t K) {
  return std::clamp<int64_t>(kTileBytes / (4 * K) / 16 * 16, 64, 512);
}

// Rows n0..n0 + count of a job's weight de-quantized into tile [count, K] (AVX2 loops), in the order rows_kernel
// pairs them with the permuted activations: code[q] * scale in float32, the values bitsandbytes de-quantizes to.
void dequantize_rows(const Nf4Job& job, const ByteTables& tables, int64_t n0, int64_t count, float* tile) {
  const int64_t K = job.K;
  for (int64_t r = 0; r < count; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = job.wp + n * K / 2;
    for (int64_t k0 = 0, block = n * (K / job.blocksize); k0 < K; k0 += job.blocksize, ++block) {
      const __m256 scale = _mm256_set1_ps(job.scales[block]);
      for (int64_t k = k0; k < k0 + job.blocksize; k += 32) {
        __m256 weights[4];
        decode32(tables, row + k / 2, scale, weights);
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(tile + r * K + k + 8 * v, weights[v]);
      }
    }
  }
}

// Outputs n_begin..n_end of a job for M rows (a prefill, a teacher-forced pass), a tile at a time: each tile of
// outputs is de-quantized once into a buffer in cache and multiplied into all rows by BLAS (column-major: the
// tile transposed times the permuted activations, written straight into the outputs' columns), where the stock
// path de-quantizes the whole weight into memory first. Then the bias and each row's LoRA update, as run_range.
void run_tiles(const Nf4Job& job, const float* pp, int64_t M, const ByteTables& tables, bool wide, int64_t n_begin,
               int64_t n_end) {
  const int64_t N = job.N, K = job.K;
  thread_local std::vector<float> tile;
  const int64_t most = tile_outputs(K);
  tile.resize(most * K);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += most) {
    const int64_t count = std::min(most, n_end - n0);
    if (wide) {
      dequantize_rows_avx512(job.wp, job.scales, job.lp, n0, count, K, job.blocksize, tile.data());
    } else {
      dequantize_rows(job, tables, n0, count, tile.data());
    }
    const int m = static_cast<int>(count), n = static_cast<int>(M), k = static_cast<int>(K), ldc = static_cast<int>(N);
    const float one = 1.0f, zero = 0.0f;
    sgemm_("T", "N", &m, &n, &k, &one, tile.data(), &k, pp, &k, &zero, job.op + n0, &ldc);
    if (job.bp != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < count; ++i) job.op[m * N + n0 + i] = job.op[m * N + n0 + i] + job.bp[n0 + i];
    add_updates(job.view(), job.down_data(), job.op, M, n0, n0 + count);
  }
}

// at::parallel_for's region with a first phase: the threads share `dots` (the LoRA layers' A x), wait for one
// another, then split [0, total) as at::parallel_for does with this grain. Serial where at::parallel_for would be.
template <typename Outputs>
void after_dots(const std::vector<DownDot>& dots, int64_t K, int64_t total, int64_t grain, const Outputs& outputs) {
  const auto dot_range = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) *dots[i].to = dot(dots[i].a, dots[i].x, K);
  };
  const int64_t count = static_cast<int64_t>(dots.size());
  if (total <= grain || total <= 1 || at::in_parallel_region() || at::get_num_threads() <= 1) {
    at::internal::ThreadIdGuard tid_guard(0);
    c10::ParallelGuard guard(true);
    dot_range(0, count);
    outputs(0, total);
    return;
  }
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), tid = omp_get_thread_num();
    at::internal::ThreadIdGuard tid_guard(static_cast<int>(tid));
    c10::ParallelGuard guard(true);
    try {
      const int64_t share = (count + threads - 1) / threads;
      dot_range(std::min(count, tid * share), std::min(count, (tid + 1) * share));
    } catch (...) {
      if (!failed.test_and_set()) error = std::current_exception();
    }
#pragma omp barrier
    const int64_t used = std::min(threads, (total + grain - 1) / grain);
    const int64_t chunk = (total + used - 1) / used, begin = tid * chunk;
    if (tid < used && begin < total) {
      try {
        outputs(begin, std::min(total, begin + chunk));
      } catch (...) {
        if (!failed.test_and_set()) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// The jobs' products for the same M rows x [M, K] in one parallel region over all their output features together
// (a layer's q/k/v, or gate and up, are one region instead of three or two: each region costs its threads a
// start and a join), their LoRA layers' A x first.
void run_jobs(const std::vector<Nf4Job>& jobs, const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  int64_t total = 0;
  for (const auto& job : jobs) {
    TORCH_CHECK(job.K == K, "nf4 kernel: the jobs of one region share their input");
    total += job.N;
  }
  const ByteTables tables(jobs.front().lp);
  const bool wide = use_avx512;
  thread_local std::vector<float> permuted;  // the calling thread's, reused: no allocation a call
  permuted.resize(M * K);
  permute_activations(x.data_ptr<float>(), permuted.data(), M, K, wide);
  const float* pp = permuted.data();
  std::vector<DownDot> dots;
  for (const auto& job : jobs) dots.insert(dots.end(), job.down_dots.begin(), job.down_dots.end());
  if (M >= kTiledFrom && sgemm_ != nullptr && M * K < (int64_t{1} << 31) && total < (int64_t{1} << 31)) {
    // split by outputs, not tiles, so the threads get equal shares whatever the tiles' sizes
    after_dots(dots, K, total, 16, [&](int64_t begin, int64_t end) {
      int64_t offset = 0;
      for (const auto& job : jobs) {
        const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + job.N);
        if (lo < hi) run_tiles(job, pp, M, tables, wide, lo - offset, hi - offset);
        offset += job.N;
      }
    });
    return;
  }
  std::vector<ProductView> views;
  for (const auto& job : jobs) views.push_back(job.view());
  after_dots(dots, K, total, 16, [&](int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (size_t i = 0; i < jobs.size(); ++i) {
      const auto& job = jobs[i];
      const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + job.N);
      if (lo < hi) {
        // jobs with another code book than the first (FP4 beside NF4) never share a region: nf4_linears
        run_range(views[i], pp, M, tables, wide, lo - offset, hi - offset, job.down_data(), job.op);
      }
      offset += job.N;
    }
  });
}

// A linear layer of the lists utils/runtime/decode_layers.py builds (11 tensors and 3 ints a layer, at `index`),
// checked and viewed once for decode steps of `rows` rows of one token each (csrc/decode_layer.cpp: the stack in
// one parallel region); the tensors it reads are appended to `keep`. nullopt where make_job or add_lora would
// refuse it (the per-call path then says why).
std::optional<StepLinear> plan_step_linear(const c10::List<std::optional<at::Tensor>>& tensors, at::IntArrayRef ints,
                                           int64_t index, int64_t rows, std::vector<at::Tensor>& keep) {
  if (tensors.size() < static_cast<size_t>((index + 1) * 11) || ints.size() < static_cast<size_t>((index + 1) * 3))
    return std::nullopt;
  const auto t = [&](int64_t j) -> std::optional<at::Tensor> { return tensors.get(index * 11 + j); };
  const int64_t n = ints[index * 3], k = ints[index * 3 + 1], blocksize = ints[index * 3 + 2];
  if (!t(0).has_value() || !t(1).has_value() || !t(2).has_value() || k <= 0 || n <= 0 || blocksize <= 0 ||
      k % blocksize != 0 || blocksize % 32 != 0)
    return std::nullopt;
  StepLinear step;
  try {
    const auto options = at::TensorOptions().dtype(at::kFloat);
    Nf4Job job = make_job(rows, *t(0), n, k, *t(1), blocksize, *t(2), t(3), t(4), t(5), t(6), options);
    if (t(7).has_value()) {
      add_lora(job, at::zeros({rows, k}, options), rows, *t(7), *t(8), *t(9), *t(10));
      // the entries add_lora listed, as (row, rank index): where each writes in A x [rows, stacked]
      const float* down = job.down.data_ptr<float>();
      for (const auto& entry : job.down_dots)
        step.dots.emplace_back((entry.to - down) / job.stacked, (entry.to - down) % job.stacked);
      step.lora_a = job.lora_a.data_ptr<float>();
    }
    step.view = job.view();
    for (const auto& held : {job.weight, job.outer, job.q8, job.code2, job.lut, job.bias, job.lora_a, job.lora_b_t,
                             job.factors, job.spans})
      if (held.defined()) keep.push_back(held);
  } catch (const c10::Error&) {
    return std::nullopt;
  }
  return step;
}

void permute_for_kernel(const float* x, float* out, int64_t M, int64_t K) {
  permute_activations(x, out, M, K, use_avx512);
}

void step_dots(const StepLinear& step, const float* x, int64_t begin, int64_t end, float* down) {
  const int64_t K = step.view.K, stacked = step.view.stacked;
  for (int64_t i = begin; i < end; ++i) {
    const auto [m, j] = step.dots[i];
    down[m * stacked + j] = dot(step.lora_a + j * K, x + m * K, K);
  }
}

void step_outputs(const StepLinear& step, const float* permuted, int64_t M, int64_t begin, int64_t end,
                  const float* down, float* out) {
  const ByteTables tables(step.view.lp);  // read by the AVX2 loops only: a few loads
  run_range(step.view, permuted, M, tables, use_avx512, begin, end, down, out);
}

// [rows, K] contiguous activations: a view of A where it is contiguous (no dispatcher call for a 2-D one).
at::Tensor flat_rows(const at::Tensor& A, int64_t K) {
  if (A.dim() == 2 && A.is_contiguous()) return A;
  return A.is_contiguous() ? A.view({-1, K}) : A.reshape({-1, K}).contiguous();
}

// out [rows, N] viewed as A's leading dimensions with N last.
at::Tensor shaped(const at::Tensor& out, const at::Tensor& A, int64_t N) {
  if (A.dim() == 2) return out;
  auto shape = A.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

at::Tensor nf4_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                    int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                    const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.size(-1) == K, "nf4_gemm: A must be float32 [..., K]");
  const auto a = flat_rows(A, K);
  std::vector<Nf4Job> jobs;
  jobs.push_back(make_job(a.size(0), B, N, K, absmax, blocksize, code, absmax_8bit, absmax_code, absmax_offset, bias,
                          a.options()));
  run_jobs(jobs, a);
  return shaped(jobs.front().out, A, N);
}

// A LoRA layer of a decode step in one call: the 4-bit base product and peft's update per row (add_lora).
at::Tensor nf4_lora_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                         int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                         const std::optional<at::Tensor>& absmax_code,
                         const std::optional<at::Tensor>& absmax_offset, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_a, const at::Tensor& lora_b_t, const at::Tensor& factors,
                         const at::Tensor& spans) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.size(-1) == K, "nf4_gemm: A must be float32 [..., K]");
  const auto a = flat_rows(A, K);
  std::vector<Nf4Job> jobs;
  jobs.push_back(make_job(a.size(0), B, N, K, absmax, blocksize, code, absmax_8bit, absmax_code, absmax_offset, bias,
                          a.options()));
  add_lora(jobs.front(), a, A.dim() > 1 ? A.size(0) : 1, lora_a, lora_b_t, factors, spans);
  run_jobs(jobs, a);
  return shaped(jobs.front().out, A, N);
}

// Several linear layers of one input x [batch, tokens, K] in one region (csrc/decode_layer.cpp): per layer, the
// 11 tensors and 3 ints of the lists utils/runtime/decode_layers.py builds, at `indices`; each result as
// nf4_gemm or nf4_lora_gemm would give it.
std::vector<at::Tensor> nf4_linears(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& tensors,
                                    at::IntArrayRef ints, std::initializer_list<int64_t> indices) {
  const int64_t K = x.size(-1);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "nf4 kernel: float32 activations");
  const auto a = flat_rows(x, K);
  const int64_t batch = x.dim() > 1 ? x.size(0) : 1;
  std::vector<Nf4Job> jobs;
  for (const int64_t index : indices) {
    TORCH_CHECK(tensors.size() >= static_cast<size_t>((index + 1) * 11) && ints.size() >= static_cast<size_t>((index + 1) * 3),
                "decode layer: the linear layers' lists are too short");
    const auto t = [&](int64_t j) -> std::optional<at::Tensor> { return tensors.get(index * 11 + j); };
    const int64_t n = ints[index * 3], k = ints[index * 3 + 1], blocksize = ints[index * 3 + 2];
    TORCH_CHECK(k == K, "nf4 kernel: a linear layer's input size differs from its input's");
    jobs.push_back(make_job(a.size(0), *t(0), n, k, *t(1), blocksize, *t(2), t(3), t(4), t(5), t(6), a.options()));
    if (t(7).has_value()) add_lora(jobs.back(), a, batch, *t(7), *t(8), *t(9), *t(10));
  }
  // a region decodes with the first job's code book: jobs with another one run in regions of their own
  std::vector<at::Tensor> outs;
  bool same_book = true;
  for (const auto& job : jobs) same_book = same_book && std::memcmp(job.lp, jobs.front().lp, 16 * sizeof(float)) == 0;
  if (same_book) {
    run_jobs(jobs, a);
  } else {
    for (const auto& job : jobs) run_jobs({job}, a);
  }
  for (const auto& job : jobs) outs.push_back(shaped(job.out, x, job.N));
  return outs;
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
      // 128 bytes a step: their two lines kPrefetchBytes ahead (as q8_rows_kernel; 2-row products over five
      // 16,384 x 576 weights in turn, 2 threads on the Xeon with AMX: 2.24-2.45 ms against 2.39-3.50 ms)
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + lora_lens::kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + lora_lens::kPrefetchBytes + 64, _MM_HINT_T0);
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
      with_row_count(M, [&](auto m) { dense_rows_kernel<decltype(m)::value>(ap, wp, begin, end, K, op, N, bp); });
      return;
    }
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot(wp + n * K, ap + m * K, K) + (bp ? bp[n] : 0.0f);
  });
  return lora_lens::shaped(out, A, N);
}

// As dense_rows_kernel for a weight held as int8 [N, K] with one float scale per 32 (q8_rows_gemm): each weight
// rebuilt exactly as int8 times scale before the multiply.
template <int64_t M>
void q8_rows_kernel(const float* a, const int8_t* q, const float* scales, int64_t n_begin, int64_t n_end, int64_t K,
                    float* out, int64_t N, const float* bias) {
  constexpr int R = kAccumulators<M>;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = q + n * K;
    __m256 acc[M][R];
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      // the rows lie one after another: the line kPrefetchBytes ahead (as q8_rows_512, csrc/nf4_gemm_avx512.cpp)
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(row + lora_lens::kPrefetchBytes + k), _MM_HINT_T0);
      const __m256 scale = _mm256_set1_ps(scales[(n * K + k) / 32]);
      for (int v = 0; v < 4; ++v) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8 * v));
        const __m256 weights = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale);
        for (int64_t m = 0; m < M; ++m)
          acc[m][v % R] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(a + m * K + k + 8 * v), acc[m][v % R]);
      }
    }
    store_sums<M, R>(acc, out, N, n, bias);
  }
}

// x @ W^T for the few rows of a decode step where W is held exactly as int8 [N, K] times one float scale per 32
// consecutive weights (utils/runtime/cpu_decode.py checks that at load): the output layer of a model whose
// embedding came from a GGUF Q8_0 tensor, read as 1.06 bytes a weight instead of 4, same values.
at::Tensor q8_rows_gemm(const at::Tensor& A, const at::Tensor& Q, const at::Tensor& scales,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && Q.scalar_type() == at::kChar && Q.dim() == 2 &&
                  scales.scalar_type() == at::kFloat,
              "q8_rows_gemm: float32 activations, an int8 [N, K] weight and float32 scales");
  const int64_t N = Q.size(0), K = Q.size(1);
  TORCH_CHECK(K % 32 == 0 && A.size(-1) == K && scales.numel() == N * K / 32,
              "q8_rows_gemm: K a multiple of 32, A [..., K], one scale per 32 weights");
  const auto a = A.reshape({-1, K}).contiguous();
  const auto q = Q.contiguous();
  const auto sc = scales.contiguous();
  const int64_t M = a.size(0);
  TORCH_CHECK(M <= kMaxRows, "q8_rows_gemm: at most 8 rows");
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->contiguous().to(at::kFloat);
  auto out = at::empty({M, N}, a.options());
  const float* ap = a.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* bp = b.has_value() ? b->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    if (use_avx512) {
      lora_lens::q8_rows_avx512(M, ap, qp, sp, begin, end, K, op, N, bp);
      return;
    }
    with_row_count(M, [&](auto m) { q8_rows_kernel<decltype(m)::value>(ap, qp, sp, begin, end, K, op, N, bp); });
  });
  return lora_lens::shaped(out, A, N);
}

// 512 where the AVX-512 kernels are to run, else 256 (AVX2); returns the width now in use.
int64_t set_vector_width(int64_t bits) {
  TORCH_CHECK(bits == 256 || bits == 512, "set_vector_width: 256 or 512");
  use_avx512 = bits == 512;
  return use_avx512 ? 512 : 256;
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
      "Tensor lora_b_t, Tensor factors, Tensor spans) -> Tensor");
  m.def("dense_rows_gemm(Tensor A, Tensor W, Tensor? bias=None) -> Tensor");
  m.def("q8_rows_gemm(Tensor A, Tensor Q, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("set_thread_count(int threads) -> int");
  m.def("set_vector_width(int bits) -> int");
}

TORCH_LIBRARY_IMPL(lora_lens, CPU, m) {
  m.impl("nf4_gemm", lora_lens::nf4_gemm);
  m.impl("nf4_lora_gemm", lora_lens::nf4_lora_gemm);
  m.impl("dense_rows_gemm", dense_rows_gemm);
  m.impl("q8_rows_gemm", q8_rows_gemm);
}

// No tensor arguments, so no dispatch key to choose a backend by: registered for every backend.
TORCH_LIBRARY_IMPL(lora_lens, CompositeExplicitAutograd, m) {
  m.impl("set_thread_count", set_thread_count);
  m.impl("set_vector_width", set_vector_width);
}
