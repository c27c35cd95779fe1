// AVX-512 versions of the decode-step products in csrc/nf4_gemm.cpp, chosen at run time where the CPU has
// AVX-512 F/BW and torch itself runs AVX-512 kernels (csrc/nf4_gemm.cpp: use_avx512).
//
// 4-bit weights: a 16-entry code book fits one zmm register, and vpermps looks 16 weights up at once from the
// low 4 bits of each 32-bit lane, so 16 packed bytes widened to 16 lanes give the odd weights (low nibbles)
// directly and, shifted right by 4, the even ones: 32 weights for one widening load, one shift and two
// permutes, where the AVX2 kernel spends four byte shuffles and eight unpacks. Each scale block is summed
// unscaled and multiplied by its scale once; the weights are still code[q] * scale in float32, only the order
// of the roundings differs from a de-quantized matmul, as it does in every matmul.
//
// 8-bit output layer: where the float32 output layer holds exactly int8 x per-32 scale values (a GGUF Q8_0
// embedding, checked value by value at load: utils/runtime/cpu_decode.py), it is streamed as those 1.06 bytes
// per weight instead of 4, and each weight is rebuilt exactly (int8 to float, times its scale) before the
// multiply.

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "nf4_gemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")

namespace lora_lens {
namespace {

// 16 bytes of packed weights widened to 16 lanes: each lane's low 4 bits the odd weight, bits 4-7 the even one.
inline __m512i decode_bytes(const uint8_t* bytes) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

// Outputs n..n + R of M rows: each 32 weights of an output decoded once, each 32 activations of a row loaded once
// for the R outputs. Output n's sums are the same operations in the same order whatever R, M or the split across
// threads, so a row's result does not depend on the rows beside it.
// block_scales[i - first_block]: the float32 scale of block i (expand_scales).
template <int64_t M, int R>
inline void nf4_outputs_512(const float* a, int64_t lda, const uint8_t* w, const float* block_scales,
                            int64_t first_block, __m512 table, int64_t n, int64_t K, int64_t blocksize, float* out,
                            int64_t N, const float* bias) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  // the outputs' scales, found once: worked out in the block loop, their index cost a 64-bit division per output
  // and block (the blocksize is not known at compile time; no faster measured without them, the simpler loop)
  const int64_t blocks_per_row = K / blocksize;
  const float* row_scales = block_scales + (n * blocks_per_row - first_block);
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += blocksize, ++b) {
    __m512 part[R][M];
    for (int r = 0; r < R; ++r)
      for (int64_t m = 0; m < M; ++m) part[r][m] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + blocksize; k += 32) {
      // the R rows' bytes lie one after another, R * 16 of them used a step: one line a step, kPrefetchBytes ahead
      _mm_prefetch(reinterpret_cast<const char*>(w + n * K / 2 + kPrefetchBytes + k * R / 2), _MM_HINT_T0);
      if constexpr (M <= 2) {
        // every row's activations loaded once, each output's weights decoded and multiplied into all rows
        __m512 x[M][2];  // permuted: 16 odd-position activations, then 16 even
        for (int64_t m = 0; m < M; ++m) {
          x[m][0] = _mm512_loadu_ps(a + m * lda + k);
          x[m][1] = _mm512_loadu_ps(a + m * lda + k + 16);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i bytes = decode_bytes(w + (n + r) * K / 2 + k / 2);
          const __m512 odd = _mm512_permutexvar_ps(bytes, table);  // vpermps reads the low 4 bits only
          const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
          for (int64_t m = 0; m < M; ++m) {
            part[r][m] = _mm512_fmadd_ps(odd, x[m][0], part[r][m]);
            part[r][m] = _mm512_fmadd_ps(even, x[m][1], part[r][m]);
          }
        }
      } else {
        // From 3 rows: the R outputs' weights decoded first, then each row's activations loaded once and multiplied
        // into all R, so 2 activation registers are live instead of 2 M. With them all live, GCC folded the
        // activations' loads into the multiply-adds, loading each once per output: 5-row decode steps 1.10-1.15x
        // slower (the embedded default on the Xeon with AMX, old and new loops alternated in one process).
        __m512 odd[R], even[R];
        for (int r = 0; r < R; ++r) {
          const __m512i bytes = decode_bytes(w + (n + r) * K / 2 + k / 2);
          odd[r] = _mm512_permutexvar_ps(bytes, table);
          even[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
        }
        for (int64_t m = 0; m < M; ++m) {
          __m512 x_odd = _mm512_loadu_ps(a + m * lda + k), x_even = _mm512_loadu_ps(a + m * lda + k + 16);
          __asm__("" : "+v"(x_odd), "+v"(x_even));  // held in registers: else GCC folds the loads again
          for (int r = 0; r < R; ++r) {
            part[r][m] = _mm512_fmadd_ps(odd[r], x_odd, part[r][m]);
            part[r][m] = _mm512_fmadd_ps(even[r], x_even, part[r][m]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(row_scales[r * blocks_per_row + b]);
      for (int64_t m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(part[r][m], scale, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) out[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n + r] : 0.0f);
}

// The scales of blocks first..first + count as float32, into `to`: nested ones computed 16 at a time, each
// code2[absmax8[b]] * absmax[b / 256] + offset, the same multiply and add (two roundings) as ScaleReader. Worked out
// inside the products' loops, the nested lookups and their scalar arithmetic took a tenth to a quarter of a 2-row
// product's time (a standalone copy of the loop on the Xeon with AMX, 2 rows: 7.7 and 10.5 against 11.0 and 11.4
// G weights/s with the scales ready, two runs); here they are 16 lanes' work for 16 blocks, once a call.
const float* expand_scales(const ScaleReader& scales, int64_t first, int64_t count, std::vector<float>& to) {
  if (scales.absmax8 == nullptr) return scales.absmax + first;
  to.resize(count);
  const __m512 offset = _mm512_set1_ps(scales.offset);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 live = count - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (count - i)) - 1);
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, scales.absmax8 + first + i));
    const __m512 inner = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, codes, scales.code2, 4);
    // absmax[b / 256]: the 16 blocks span at most two of those, so two broadcasts and a blend, not a gather
    // (this function's share of a 2-row decode step's samples, perf record on the Xeon with AMX: 4.7% with the
    // second gather, 3.4% without)
    const int64_t outer_index = (first + i) / 256, next_from = (outer_index + 1) * 256 - (first + i);
    const __mmask16 next = next_from >= 16 ? __mmask16(0) : __mmask16(live & ~((1u << next_from) - 1));
    const __m512 outer = next == 0 ? _mm512_set1_ps(scales.absmax[outer_index])
                                   : _mm512_mask_blend_ps(next, _mm512_set1_ps(scales.absmax[outer_index]),
                                                          _mm512_set1_ps(scales.absmax[outer_index + 1]));
    _mm512_mask_storeu_ps(to.data() + i, live, _mm512_add_ps(_mm512_mul_ps(inner, outer), offset));
  }
  return to.data();
}

template <int64_t M>
void nf4_rows_512(const float* a, int64_t lda, const uint8_t* w, const ScaleReader& scales, const float* code,
                  int64_t n_begin, int64_t n_end, int64_t K, int64_t blocksize, float* out, int64_t N,
                  const float* bias) {
  // outputs at once, all in 32 registers: 2 R x M accumulators (a block's sums, the blocks' sums), the code book
  // and, up to 2 rows, 2 M activations; from 3 rows, 2 R decoded weights and 2 activations (nf4_outputs_512)
  constexpr int R = M <= 2 ? 4 : (M <= 6 ? 2 : 1);
  const __m512 table = _mm512_loadu_ps(code);
  thread_local std::vector<float> expanded;  // each thread's, reused: no allocation a call
  const int64_t first = n_begin * K / blocksize;
  const float* block_scales = expand_scales(scales, first, (n_end - n_begin) * K / blocksize, expanded);
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R)
    nf4_outputs_512<M, R>(a, lda, w, block_scales, first, table, n, K, blocksize, out, N, bias);
  for (; n < n_end; ++n) nf4_outputs_512<M, 1>(a, lda, w, block_scales, first, table, n, K, blocksize, out, N, bias);
}

// Outputs n..n + R of M rows of the 8-bit output layer, each 32 activations of a row loaded once for the R outputs.
// The gain is the prefetch: the head is read from memory every step (the 4-bit layers' 53 MB push it out of the
// cache), and without it one core's loop read it at 6.6 GB/s, against 15-19 GB/s for plain reads on two threads
// (bench/bench_engine.py: read_bandwidth_gbs). 2-row products over the embedded default's 49,152 x 576 head, 5 copies
// in turn so that each comes from memory, 2 threads on the Xeon with AMX: 1.80-1.84 ms with it against 2.70-3.04 ms
// without (17-18 GB/s against 10.5-12). Output n's sums are the same operations in the same order whatever R, M or
// the split across threads, as before.
template <int64_t M, int R>
inline void q8_outputs_512(const float* a, const int8_t* q, const float* scales, int64_t n, int64_t K, float* out,
                           int64_t N, const float* bias) {
  const int64_t blocks = K / 32;
  __m512 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    // the R outputs' bytes lie one after another, R * 32 of them used a block: each line that starts among them,
    // kPrefetchBytes ahead (one output a pass starts a line every other block)
    for (int64_t at = (b * R * 32 + 63) / 64 * 64; at < (b + 1) * R * 32; at += 64)
      _mm_prefetch(reinterpret_cast<const char*>(q + n * K + kPrefetchBytes + at), _MM_HINT_T0);
    __m512 x[M][2];
    for (int64_t m = 0; m < M; ++m) {
      x[m][0] = _mm512_loadu_ps(a + m * K + 32 * b);
      x[m][1] = _mm512_loadu_ps(a + m * K + 32 * b + 16);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(scales[(n + r) * blocks + b]);
      const int8_t* p = q + (n + r) * K + 32 * b;
      // exactly the float32 weight: an int8 times its scale needs at most 8 + 11 significant bits
      const __m512 w0 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))), scale);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))),
          scale);
      for (int64_t m = 0; m < M; ++m) {
        acc[r][m][0] = _mm512_fmadd_ps(w0, x[m][0], acc[r][m][0]);
        acc[r][m][1] = _mm512_fmadd_ps(w1, x[m][1], acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t m = 0; m < M; ++m)
      out[m * N + n + r] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1])) + (bias ? bias[n + r] : 0.0f);
}

template <int64_t M>
void q8_rows_512(const float* a, const int8_t* q, const float* scales, int64_t n_begin, int64_t n_end, int64_t K,
                 float* out, int64_t N, const float* bias) {
  // in 32 registers: 2 R M sums, 2 M activations, an output's two weight vectors and its scale
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) q8_outputs_512<M, R>(a, q, scales, n, K, out, N, bias);
  for (; n < n_end; ++n) q8_outputs_512<M, 1>(a, q, scales, n, K, out, N, bias);
}

}  // namespace

void nf4_rows_avx512(int64_t M, const float* a, int64_t lda, const uint8_t* w, const ScaleReader& scales,
                     const float* code, int64_t n_begin, int64_t n_end, int64_t K, int64_t blocksize, float* out,
                     int64_t N, const float* bias) {
  with_row_count(M, [&](auto m) {
    nf4_rows_512<decltype(m)::value>(a, lda, w, scales, code, n_begin, n_end, K, blocksize, out, N, bias);
  });
}

// Rows n0..n0 + count of the weight de-quantized into tile [count, K], each 32 in the order the activations are
// permuted to (odd positions, then even): code[q] * scale in float32, the values bitsandbytes de-quantizes to.
void dequantize_rows_avx512(const uint8_t* w, const ScaleReader& scales, const float* code, int64_t n0, int64_t count,
                            int64_t K, int64_t blocksize, float* tile) {
  const __m512 table = _mm512_loadu_ps(code);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = w + n * K / 2;
    for (int64_t k0 = 0, b = n * (K / blocksize); k0 < K; k0 += blocksize, ++b) {
      const __m512 scale = _mm512_set1_ps(scales[b]);
      for (int64_t k = k0; k < k0 + blocksize; k += 32) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        _mm512_storeu_ps(tile + r * K + k, _mm512_mul_ps(_mm512_permutexvar_ps(bytes, table), scale));
        _mm512_storeu_ps(tile + r * K + k + 16,
                         _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale));
      }
    }
  }
}

void permute_chunks_avx512(const float* a, float* out, int64_t count, const int (&order)[32]) {
  // vpermt2ps: bit 4 of each index picks the second 16 floats, its low 4 bits the float
  const __m512i first = _mm512_loadu_si512(order), second = _mm512_loadu_si512(order + 16);
  for (int64_t i = 0; i < count; i += 32) {
    const __m512 low = _mm512_loadu_ps(a + i), high = _mm512_loadu_ps(a + i + 16);
    _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(low, first, high));
    _mm512_storeu_ps(out + i + 16, _mm512_permutex2var_ps(low, second, high));
  }
}

void q8_rows_avx512(int64_t M, const float* a, const int8_t* q, const float* scales, int64_t n_begin,
                    int64_t n_end, int64_t K, float* out, int64_t N, const float* bias) {
  with_row_count(M, [&](auto m) { q8_rows_512<decltype(m)::value>(a, q, scales, n_begin, n_end, K, out, N, bias); });
}

}  // namespace lora_lens

#pragma GCC pop_options
