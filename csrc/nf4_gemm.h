// The 4-bit products of csrc/nf4_gemm.cpp, for the decode layer (csrc/decode_layer.cpp) to call directly, and what
// the AVX2 and AVX-512 kernels (csrc/nf4_gemm_avx512.cpp) share.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora_lens {

at::Tensor nf4_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                    int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                    const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_offset,
                    const std::optional<at::Tensor>& bias);

at::Tensor nf4_lora_gemm(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K, const at::Tensor& absmax,
                         int64_t blocksize, const at::Tensor& code, const std::optional<at::Tensor>& absmax_8bit,
                         const std::optional<at::Tensor>& absmax_code,
                         const std::optional<at::Tensor>& absmax_offset, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& factors,
                         const at::Tensor& spans);

// Several linear layers of one input in one parallel region (csrc/nf4_gemm.cpp: nf4_linears).
std::vector<at::Tensor> nf4_linears(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& tensors,
                                    at::IntArrayRef ints, std::initializer_list<int64_t> indices);

constexpr int64_t kMaxRows = 8;  // rows handled per pass over the weights (a decode step has 1-6)

// How far ahead of the bytes being multiplied the AVX-512 decode-step loops ask for the 4-bit weights they stream:
// a software prefetch of one cache line a step of the inner loop. With the hardware prefetchers alone, the memory
// reads and the arithmetic took turns: on the Intel Xeon with AMX (family 6 model 167), a standalone copy of the
// 2-row loop over a 53 MB weight ran at 3.5 GB/s of weight on one core, against 6.4 GB/s on a weight in cache and
// 8.6 GB/s for a plain read; 4 kB ahead made it 1.3-1.5x faster (1 kB: 1.3x; 8 kB: as 4 kB).
constexpr int64_t kPrefetchBytes = 4096;

// The scale of block b: plain absmax[b], or nested code2[absmax8[b]] * absmax[b / 256] + offset.
struct ScaleReader {
  const float* absmax;
  const uint8_t* absmax8;  // null when not nested
  const float* code2;
  float offset;
  inline float operator[](int64_t b) const {
    return absmax8 ? code2[absmax8[b]] * absmax[b / 256] + offset : absmax[b];
  }
};

// One 4-bit product as the decode-step loops read it (csrc/nf4_gemm.cpp: run_range): the packed weight, its
// scales, code book and bias, and where it has LoRA layers (stacked > 0) their per-row factors and rank spans
// and lora_B transposed [stacked, N]. Pointers only: whoever makes one holds the tensors.
struct ProductView {
  const uint8_t* wp = nullptr;
  ScaleReader scales{nullptr, nullptr, nullptr, 0.0f};
  const float* lp = nullptr;
  const float* bp = nullptr;
  int64_t N = 0, K = 0, blocksize = 0, stacked = 0, per_batch_row = 1;
  const float* fp = nullptr;
  const int64_t* spp = nullptr;
  const float* btp = nullptr;
};

// A 4-bit linear layer of a decode step planned once (csrc/nf4_gemm.cpp: plan_step_linear), for a stack of layers
// run in one parallel region (csrc/decode_layer.cpp): the product's view, lora_A [stacked, K], and the (row, rank
// index) of every entry of A x the rows' updates read (none for rows at factor 0).
struct StepLinear {
  ProductView view;
  const float* lora_a = nullptr;
  std::vector<std::pair<int64_t, int64_t>> dots;
};

std::optional<StepLinear> plan_step_linear(const c10::List<std::optional<at::Tensor>>& tensors, at::IntArrayRef ints,
                                           int64_t index, int64_t rows, std::vector<at::Tensor>& keep);
// [M, K] activations into the order the decode-step loops read them (K a multiple of 32).
void permute_for_kernel(const float* x, float* out, int64_t M, int64_t K);
// Entries begin..end of the layer's dots of A x (x [M, K], not permuted) into down [M, stacked].
void step_dots(const StepLinear& step, const float* x, int64_t begin, int64_t end, float* down);
// Outputs begin..end of the layer for M rows (activations permuted) into out [M, N], with each row's LoRA update
// from down: the same loops, in the same order, as nf4_lora_gemm's.
void step_outputs(const StepLinear& step, const float* permuted, int64_t M, int64_t begin, int64_t end,
                  const float* down, float* out);

// Calls f(std::integral_constant<int64_t, m>) for m rows (1 to kMaxRows): the kernels are compiled for each
// row count, so their per-row accumulators live in registers.
template <typename F>
void with_row_count(int64_t m, F&& f) {
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

// csrc/nf4_gemm_avx512.cpp: outputs n_begin..n_end of M rows (activations permuted per 32 as odd positions,
// then even), and the exact 8-bit output layer.
void nf4_rows_avx512(int64_t M, const float* a, int64_t lda, const uint8_t* w, const ScaleReader& scales,
                     const float* code, int64_t n_begin, int64_t n_end, int64_t K, int64_t blocksize, float* out,
                     int64_t N, const float* bias);
// count floats (a multiple of 32) permuted 32 at a time: out[32c + i] = a[32c + order[i]].
void permute_chunks_avx512(const float* a, float* out, int64_t count, const int (&order)[32]);

void dequantize_rows_avx512(const uint8_t* w, const ScaleReader& scales, const float* code, int64_t n0, int64_t count,
                            int64_t K, int64_t blocksize, float* tile);
void q8_rows_avx512(int64_t M, const float* a, const int8_t* q, const float* scales, int64_t n_begin,
                    int64_t n_end, int64_t K, float* out, int64_t N, const float* bias);

}  // namespace lora_lens
