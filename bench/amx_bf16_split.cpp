// Could AMX's bfloat16 tiles give the prefill and the token lens float32's accuracy faster than AVX-512 FMA does?
// A one-core probe, not part of the app (which computes in float32 on every CPU: README, "Profiles and settings").
//
// Each float32 operand is split into three bfloat16 parts (hi + mid + lo holds its 24 bits), and the product
// sums the part products that matter at float32 precision: 6 of the 9 (hi.hi, hi.mid, mid.hi, hi.lo, lo.hi,
// mid.mid), each a TDPBF16PS (16 x 16 float32 sums of 32 bfloat16 products) on tiles, 2 x 2 output tiles a block.
// Prints: TDPBF16PS's own rate on tiles held in registers, then for a layer's shape (outputs N, inputs K, rows
// M) the largest error against a float64 sum next to a sequential float32 FMA sum's, and the rate in float32
// multiply-adds a second.
//
//   g++ -O3 -march=native -mamx-tile -mamx-bf16 -o /tmp/amx_bf16_split bench/amx_bf16_split.cpp
//   /tmp/amx_bf16_split [N=576] [K=576] [M=128] [products=6]
//
// Linux lends a process the AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it ldtilecfg
// faults. N and M must be multiples of 32, K of 32.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;

bf16 to_bf16(float f) {  // round to nearest, ties to even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<bf16>(u >> 16);
}

float from_bf16(bf16 b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void split3(float f, bf16* parts) {
  parts[0] = to_bf16(f);
  const float rest = f - from_bf16(parts[0]);
  parts[1] = to_bf16(rest);
  parts[2] = to_bf16(rest - from_bf16(parts[1]));
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
} __attribute__((packed));

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) != 0) {
    std::printf("this kernel does not lend the AMX state to the process\n");
    return 1;
  }
  const int N = argc > 1 ? std::atoi(argv[1]) : 576, K = argc > 2 ? std::atoi(argv[2]) : 576;
  const int M = argc > 3 ? std::atoi(argv[3]) : 128, products = argc > 4 ? std::atoi(argv[4]) : 6;
  if (N % 32 || M % 32 || K % 32 || products < 1 || products > 6) {
    std::printf("N, M, K: multiples of 32; products: 1 to 6\n");
    return 1;
  }
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);

  {  // TDPBF16PS on tiles already loaded: 4 independent sums, as the product's 2 x 2 output tiles
    alignas(64) static bf16 ones[16 * 32];
    std::fill(std::begin(ones), std::end(ones), bf16{0x3f80});
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const long n = 1000000;
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < n; ++i) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    const double s = seconds_since(t0);
    std::printf("TDPBF16PS: %.1f ns each, %.0f G bfloat16 multiply-adds a second on one core\n", s / (4.0 * n) * 1e9,
                4.0 * n * 16 * 16 * 32 / s / 1e9);
  }

  std::mt19937 generator(1);
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> W(size_t(N) * K), X(size_t(M) * K);
  for (auto& v : W) v = normal(generator) * 0.05f;  // a 4-bit layer's weights are of this size
  for (auto& v : X) v = normal(generator);
  // W's parts [3][N][K] (tile rows: one output's 32 inputs); X's parts [3][K / 2][M][2] (pairs of inputs
  // interleaved per row, the layout TDPBF16PS takes its second operand in)
  std::vector<bf16> A(3 * size_t(N) * K), B(3 * size_t(K / 2) * M * 2);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      bf16 p[3];
      split3(W[size_t(n) * K + k], p);
      for (int s = 0; s < 3; ++s) A[(size_t(s) * N + n) * K + k] = p[s];
    }
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; ++k) {
      bf16 p[3];
      split3(X[size_t(m) * K + k], p);
      for (int s = 0; s < 3; ++s) B[(size_t(s) * (K / 2) + k / 2) * M * 2 + m * 2 + (k & 1)] = p[s];
    }
  const int pairs[6][2] = {{0, 0}, {0, 1}, {1, 0}, {0, 2}, {2, 0}, {1, 1}};
  std::vector<float> C(size_t(N) * M);
  const auto product = [&]() {
    alignas(64) float block[4][16][16];
    for (int n0 = 0; n0 < N; n0 += 32)
      for (int m0 = 0; m0 < M; m0 += 32) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int k0 = 0; k0 < K; k0 += 32)
          for (int p = 0; p < products; ++p) {
            const bf16* a = &A[(size_t(pairs[p][0]) * N + n0) * K + k0];
            const bf16* b = &B[(size_t(pairs[p][1]) * (K / 2) + k0 / 2) * M * 2 + m0 * 2];
            _tile_loadd(4, a, K * 2);
            _tile_loadd(5, a + 16 * K, K * 2);
            _tile_loadd(6, b, M * 4);
            _tile_loadd(7, b + 32, M * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        _tile_stored(0, block[0], 64);  // the tile's number must be a constant
        _tile_stored(1, block[1], 64);
        _tile_stored(2, block[2], 64);
        _tile_stored(3, block[3], 64);
        for (int t = 0; t < 4; ++t)
          for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c) C[size_t(n0 + 16 * (t / 2) + r) * M + m0 + 16 * (t % 2) + c] = block[t][r][c];
      }
  };
  product();
  double split_error = 0, float32_error = 0, largest = 0;
  for (int n = 0; n < N; ++n)
    for (int m = 0; m < M; ++m) {
      double exact = 0;
      float sequential = 0;
      for (int k = 0; k < K; ++k) {
        exact += double(W[size_t(n) * K + k]) * X[size_t(m) * K + k];
        sequential = std::fma(W[size_t(n) * K + k], X[size_t(m) * K + k], sequential);
      }
      split_error = std::max(split_error, std::fabs(C[size_t(n) * M + m] - exact));
      float32_error = std::max(float32_error, std::fabs(sequential - exact));
      largest = std::max(largest, std::fabs(exact));
    }
  int runs = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (seconds_since(t0) < 1.0) {
    product();
    ++runs;
  }
  const double s = seconds_since(t0) / runs;
  std::printf(
      "N=%d K=%d M=%d, %d part products: largest error %.2g (a sequential float32 sum's: %.2g; largest sum %.2g); "
      "%.3f ms, %.1f G float32 multiply-adds a second on one core\n",
      N, K, M, products, split_error, float32_error, largest, s * 1e3, double(N) * K * M / s / 1e9);
  _tile_release();
  return 0;
}
