// The glue of an fp32 step, fused: what sits between the projections.
//
// Why: with the block kernel, one batch-1 step's 210 projections take ~9.5 ms on the
// 2-core AVX2 machine, and the ~35 PyTorch operators per layer around them (norms,
// rotary embedding, cache writes, scaled_dot_product_attention with a mask, SiLU,
// residual adds) took another ~13 ms: 5-90 us of dispatch each for a few
// microseconds of arithmetic. Each function here is one call per layer.
//
// Every output row is computed from its own input row in a fixed order (no
// reduction across rows), so these keep a line's result independent of its batch.
//
// Semantics (rows i, hidden H, heads nh, kv heads nkv, head dim hd, half = hd/2):
//   rms_norm:         y[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w
//   add_rms_norm:     x[i] += r[i] (in place); y[i] = rms_norm(x[i])
//   silu_mul:         y[i, c] = silu(gu[i, c]) * gu[i, I + c],  gu = [gate | up]
//   attention:        for token t at position p = pos[t] of cache slot s = slots[t]:
//       rope(v)[c] = v[c] cos[p,c] - v[c+half] sin[p,c] (c < half),  v[c] cos[p,c] + v[c-half] sin[p,c] (c >= half)
//       K[s, g, p] = rope(k_g),  V[s, g, p] = v_g                 (g < nkv; every token's, before any query)
//       out[t, h] = sum_{j<=p} softmax_j(scale * <rope(q_h), K[s, h / (nh/nkv), j]>) V[s, h / (nh/nkv), j]
// Scores are computed 4 keys at a time (independent FMA chains, each key's sum in the
// same order), exponentiated 8 lanes at a time (exp8), and the values summed with the
// accumulators in registers: 34 prompt tokens over 700 cached ones, 30 layers, on the
// 2-core Zen 4: 51 ms before, 33 with the first two, 19 with all three (a blocked variant
// that read each key and value row once per 4 tokens x 3 heads measured no faster).
// A token's attention is the same arithmetic whether it is a decode row, part of a
// prompt, or alone: no padding, no blocking that depends on the batch. PyTorch's
// scaled_dot_product_attention over padded prompt blocks rounded differently with the
// prompts' lengths, and the int8 activations downstream amplified that to logit
// differences of ~0.9 between a prompt prefilled alone and in a batch.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

inline void norm_row(const float* x, const float* w, float* y, int64_t H, double eps) {
  float ss = 0.0f;
  for (int64_t c = 0; c < H; ++c) ss += x[c] * x[c];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
  for (int64_t c = 0; c < H; ++c) y[c] = x[c] * r * w[c];
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              " must be a contiguous fp32 [rows, width] tensor");
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  const int64_t n = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) norm_row(xp + i * H, wp, yp + i * H, H, eps);
  });
  return y;
}

torch::Tensor add_rms_norm(torch::Tensor& x, const torch::Tensor& r, const torch::Tensor& w, double eps) {
  check_rows(x, "x");
  check_rows(r, "residual");
  const int64_t n = x.size(0), H = x.size(1);
  auto y = torch::empty_like(x);
  float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>();
  const float *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      for (int64_t c = 0; c < H; ++c) xp[i * H + c] += rp[i * H + c];
      norm_row(xp + i * H, wp, yp + i * H, H, eps);
    }
  });
  return y;
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
  check_rows(gu, "gate_up");
  const int64_t n = gu.size(0), I = gu.size(1) / 2;
  auto y = torch::empty({n, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* gate = g + i * 2 * I;
      int64_t c = 0;
#ifdef __AVX2__
      // 8 lanes with exp8: a batch-32 step's 30 SiLUs took ~7 ms with std::exp, a tenth of the step
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; c + 8 <= I; c += 8) {
        const __m256 v = _mm256_loadu_ps(gate + c);
        const __m256 sig = _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
        _mm256_storeu_ps(yp + i * I + c, _mm256_mul_ps(sig, _mm256_loadu_ps(gate + I + c)));
      }
#endif
      for (; c < I; ++c) yp[i * I + c] = gate[c] / (1.0f + std::exp(-gate[c])) * gate[I + c];
    }
  });
  return y;
}

inline void rope(const float* v, const float* cs, const float* sn, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t c = 0; c < half; ++c) out[c] = v[c] * cs[c] - v[c + half] * sn[c];
  for (int64_t c = half; c < hd; ++c) out[c] = v[c] * cs[c] + v[c - half] * sn[c];
}

// <a, b> over n floats in a fixed order (8 lanes, then the lanes summed, then the tail).
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t c = 0;
  float total = 0.0f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  for (; c + 8 <= n; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  total = hsum8(acc);
#endif
  for (; c < n; ++c) total += a[c] * b[c];
  return total;
}

#ifdef __AVX2__
// dot(q, keys + j * hd, hd) for 4 consecutive keys, each in dot()'s order (so the same bits): four
// independent FMA chains instead of one, which a single dot leaves waiting on its own latency.
inline void dot4(const float* q, const float* keys, int64_t hd, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t c = 0; c < hd; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + k * hd + c), acc[k]);
  }
  for (int k = 0; k < 4; ++k) out[k] = hsum8(acc[k]);
}

// acc[c] = sum_j w[j] * vals[j * hd + c], hd = 8 * kV: the accumulators stay in registers.
template <int kV>
inline void weighted_sum_vec(const float* w, const float* vals, int64_t count, float* acc) {
  __m256 a[kV];
  for (int v = 0; v < kV; ++v) a[v] = _mm256_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const __m256 s = _mm256_set1_ps(w[j]);
    for (int v = 0; v < kV; ++v) a[v] = _mm256_fmadd_ps(s, _mm256_loadu_ps(vals + j * kV * 8 + 8 * v), a[v]);
  }
  for (int v = 0; v < kV; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
}
#endif

// acc[c] = sum_{j < count} w[j] * vals[j * hd + c], each element an FMA chain over j ascending.
inline void weighted_sum(const float* w, const float* vals, int64_t count, int64_t hd, float* acc) {
#ifdef __AVX2__
  if (hd == 64) return weighted_sum_vec<8>(w, vals, count, acc);
  if (hd == 128) return weighted_sum_vec<16>(w, vals, count, acc);
  if (hd == 32) return weighted_sum_vec<4>(w, vals, count, acc);
#endif
  std::fill(acc, acc + hd, 0.0f);
  for (int64_t j = 0; j < count; ++j)
    for (int64_t c = 0; c < hd; ++c) acc[c] = std::fma(w[j], vals[j * hd + c], acc[c]);
}

// scores[j] = e^(scores[j] - top) for j < count; their sum, in a fixed order (8 lanes, then the tail).
inline float exp_shifted(float* scores, int64_t count, float top) {
  int64_t j = 0;
  float total = 0.0f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  const __m256 t = _mm256_set1_ps(top);
  for (; j + 8 <= count; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), t));
    _mm256_storeu_ps(scores + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum8(acc);
#endif
  for (; j < count; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  return total;
}

torch::Tensor attention(const torch::Tensor& qkv, const torch::Tensor& slots, const torch::Tensor& pos,
                        const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                        torch::Tensor& v_cache, int64_t nh, int64_t nkv, double scale) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == torch::kFloat32 && v_cache.sizes() == k_cache.sizes(),
              "caches must be contiguous fp32 [slots, kv_heads, max_len, head_dim]");
  const int64_t n = qkv.size(0), hd = k_cache.size(3), S = k_cache.size(2), width = qkv.size(1);
  TORCH_CHECK(pos.scalar_type() == torch::kLong && pos.numel() == n && slots.scalar_type() == torch::kLong &&
                  slots.numel() == n,
              "pos and slots must be [tokens] int64");
  TORCH_CHECK(width == (nh + 2 * nkv) * hd, "qkv width must be (heads + 2 kv_heads) * head_dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) >= S && cos.size(1) == hd,
              "cos/sin must be contiguous [>= max_len, head_dim]");
  const int64_t group = nh / nkv;
  auto out = torch::empty({n, nh * hd}, qkv.options());
  const float *q = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t *pp = pos.data_ptr<int64_t>(), *slp = slots.data_ptr<int64_t>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *op = out.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(pp[t] >= 0 && pp[t] < S, "position ", pp[t], " is outside the cache (max_len ", S, ")");
    TORCH_CHECK(slp[t] >= 0 && slp[t] < k_cache.size(0), "slot ", slp[t], " exceeds the cache's slots");
  }
  // every token's key and value first, then attention per (token, head)
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t p = pp[t], slot = slp[t];
      const float* row = q + t * width;
      for (int64_t g = 0; g < nkv; ++g) {
        const int64_t at = ((slot * nkv + g) * S + p) * hd;
        rope(row + (nh + g) * hd, cp + p * hd, sp + p * hd, kc + at, hd);
        std::copy(row + (nh + nkv + g) * hd, row + (nh + nkv + g + 1) * hd, vc + at);
      }
    }
  });
  at::parallel_for(0, n * nh, 2, [&](int64_t b, int64_t e) {
    std::vector<float> qr(hd), scores, acc(hd);
    for (int64_t item = b; item < e; ++item) {
      const int64_t t = item / nh, h = item % nh, p = pp[t], g = h / group, slot = slp[t];
      rope(q + t * width + h * hd, cp + p * hd, sp + p * hd, qr.data(), hd);
      const float* keys = kc + (slot * nkv + g) * S * hd;
      const float* vals = vc + (slot * nkv + g) * S * hd;
      scores.resize(p + 1);
      int64_t j = 0;
#ifdef __AVX2__
      if (hd % 8 == 0)
        for (; j + 4 <= p + 1; j += 4) dot4(qr.data(), keys + j * hd, hd, scores.data() + j);
#endif
      for (; j <= p; ++j) scores[j] = dot(qr.data(), keys + j * hd, hd);
      float top = -INFINITY;
      for (j = 0; j <= p; ++j) {
        scores[j] *= static_cast<float>(scale);
        top = std::max(top, scores[j]);
      }
      const float total = exp_shifted(scores.data(), p + 1, top);
      weighted_sum(scores.data(), vals, p + 1, hd, acc.data());
      float* o = op + t * nh * hd + h * hd;
      for (int64_t c = 0; c < hd; ++c) o[c] = acc[c] / total;
    }
  });
  return out;
}

}  // namespace

void register_decode(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "x += r in place, then RMSNorm of x");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of a fused [gate | up] row");
  m.def("attention", &attention, "rotary embedding, cache write and causal attention of each token over its slot");
}
