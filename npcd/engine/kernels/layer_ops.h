// The kernels one decoder layer calls, for layers.cpp's loop over the layers. Each is defined (and bound to
// Python) in its own file; these are the same functions, declared here so another file can call them.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace npcd {

// blockq.cpp: x [M, K] fp32 times weights `pack` returned (words, sums, scales dw, minimums mw).
torch::Tensor block_linear(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& wsum,
                           const torch::Tensor& dw, const torch::Tensor& mw, int64_t N, bool q4);
// lora.cpp: out += each row's adapter delta.
void lora_add(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A, const std::vector<torch::Tensor>& Bs,
              const torch::Tensor& slots, const torch::Tensor& A_scale, const std::vector<torch::Tensor>& B_scales);
// decode.cpp: the glue between the projections.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor add_rms_norm(torch::Tensor& x, const torch::Tensor& r, const torch::Tensor& w, double eps);
torch::Tensor silu_mul(const torch::Tensor& gu);
torch::Tensor attention(const torch::Tensor& qkv, const torch::Tensor& slots, const torch::Tensor& pos,
                        const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                        torch::Tensor& v_cache, int64_t nh, int64_t nkv, double scale);

}  // namespace npcd
