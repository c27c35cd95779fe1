// The 4-bit products of csrc/nf4_gemm.cpp, for the decode layer (csrc/decode_layer.cpp) to call directly.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

}  // namespace lora_lens
