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
// that read each key and value row once per 4 tokens x 3 heads measured no faster there).
// The heads of one token that share a kv head (3 of SmolLM2's 9) go through its keys and
// values together, each key and value row read once for all of them (one token's heads have
// the same position, so the same keys), and 4 keys' sums are reduced with shared shuffles
// (hsum8x4); each head's sums keep their order, so the bits are those of a head alone. On
// the 2-core Zen 3 (AVX2, 512 KB L2), where a head alone waited on L2 for the 188 KB of keys
// and values of 735 positions, the 30 layers of 35 prompt tokens over 700 cached ones took
// 39-40 ms head by head and 24 ms by kv head; 32 decode rows at ~600 tokens 33-34 -> 22 ms.
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

#include "layer_ops.h"
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
// R query rows against 4 consecutive keys: out[r][j + k] = dot(q[r], keys + k * hd, hd), each in dot()'s
// order (so the same bits). 4 x R independent FMA chains instead of one, which a single dot leaves waiting
// on its own latency, and each key vector loaded once for the R rows.
template <int R>
inline void dot_rows4(const float* const* q, const float* keys, int64_t hd, float* const* out, int64_t j) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 4; ++k) acc[r][k] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; c += 8) {
    __m256 kv[4];
    for (int k = 0; k < 4; ++k) kv[k] = _mm256_loadu_ps(keys + k * hd + c);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_loadu_ps(q[r] + c);
      for (int k = 0; k < 4; ++k) acc[r][k] = _mm256_fmadd_ps(qv, kv[k], acc[r][k]);
    }
  }
  for (int r = 0; r < R; ++r) hsum8x4(acc[r], out[r] + j);
}

// acc[r][c] = sum_{j < count} w[r][j] * vals[j * hd + c] for R rows, hd a multiple of 32: per block of 32
// columns the accumulators stay in registers and each value row is loaded once for the R rows. Each
// element is an FMA chain over j ascending, whatever R is.
template <int R>
inline void weighted_sum_rows(const float* const* w, const float* vals, int64_t count, int64_t hd,
                              float* const* acc) {
  for (int64_t c0 = 0; c0 < hd; c0 += 32) {
    __m256 a[R][4];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) a[r][v] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
      const float* row = vals + j * hd + c0;
      for (int v = 0; v < 4; ++v) {
        const __m256 x = _mm256_loadu_ps(row + 8 * v);
        for (int r = 0; r < R; ++r) a[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(w[r][j]), x, a[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(acc[r] + c0 + 8 * v, a[r][v]);
  }
}
#endif

// acc[c] = sum_{j < count} w[j] * vals[j * hd + c], each element an FMA chain over j ascending (a head
// width weighted_sum_rows does not take).
inline void weighted_sum(const float* w, const float* vals, int64_t count, int64_t hd, float* acc) {
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

// Heads of one token that go through the keys and values together: 3 x 4 score accumulators plus 4 key
// vectors fill AVX2's 16 registers.
constexpr int64_t kTile = 3;

// Attention of R query rows (roped, q[r * hd ...]) over the same `count` keys and values: the softmax
// weights' sums into total[r], the unnormalised weighted values into acc[r * hd ...]. Each row's arithmetic
// is the one it gets alone (R = 1): the same bits whichever heads share its pass.
template <int R>
void attend_rows(const float* q, const float* keys, const float* vals, int64_t count, int64_t hd, float scale,
                 float* scores, float* acc, float* total) {
  const float* qs[R];
  float* ss[R];
  float* as[R];
  for (int r = 0; r < R; ++r) {
    qs[r] = q + r * hd;
    ss[r] = scores + r * count;
    as[r] = acc + r * hd;
  }
  int64_t j = 0;
#ifdef __AVX2__
  if (hd % 8 == 0)
    for (; j + 4 <= count; j += 4) dot_rows4<R>(qs, keys + j * hd, hd, ss, j);
#endif
  for (; j < count; ++j)
    for (int r = 0; r < R; ++r) ss[r][j] = dot(qs[r], keys + j * hd, hd);
  for (int r = 0; r < R; ++r) {
    float top = -INFINITY;
    for (j = 0; j < count; ++j) {
      ss[r][j] *= scale;
      top = std::max(top, ss[r][j]);
    }
    total[r] = exp_shifted(ss[r], count, top);
  }
#ifdef __AVX2__
  if (hd % 32 == 0) return weighted_sum_rows<R>(ss, vals, count, hd, as);
#endif
  for (int r = 0; r < R; ++r) weighted_sum(ss[r], vals, count, hd, as[r]);
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
  // then attention per (token, kv head): the heads of the token that read that kv head, together
  at::parallel_for(0, n * nkv, 1, [&](int64_t b, int64_t e) {
    std::vector<float> qr(group * hd), acc(group * hd), total(group), scores;
    for (int64_t item = b; item < e; ++item) {
      const int64_t t = item / nkv, g = item % nkv, p = pp[t], slot = slp[t], count = p + 1;
      for (int64_t i = 0; i < group; ++i)
        rope(q + t * width + (g * group + i) * hd, cp + p * hd, sp + p * hd, qr.data() + i * hd, hd);
      const float* keys = kc + (slot * nkv + g) * S * hd;
      const float* vals = vc + (slot * nkv + g) * S * hd;
      scores.resize(group * count);
      for (int64_t h0 = 0; h0 < group; h0 += kTile) {
        const int64_t rows = std::min<int64_t>(kTile, group - h0);
        auto attend = rows == 3 ? attend_rows<3> : rows == 2 ? attend_rows<2> : attend_rows<1>;
        attend(qr.data() + h0 * hd, keys, vals, count, hd, static_cast<float>(scale), scores.data() + h0 * count,
               acc.data() + h0 * hd, total.data() + h0);
      }
      float* o = op + t * nh * hd + g * group * hd;
      for (int64_t i = 0; i < group; ++i)
        for (int64_t c = 0; c < hd; ++c) o[i * hd + c] = acc[i * hd + c] / total[i];
    }
  });
  return out;
}

}  // namespace

torch::Tensor npcd::rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return ::rms_norm(x, w, eps);
}
torch::Tensor npcd::add_rms_norm(torch::Tensor& x, const torch::Tensor& r, const torch::Tensor& w, double eps) {
  return ::add_rms_norm(x, r, w, eps);
}
torch::Tensor npcd::silu_mul(const torch::Tensor& gu) { return ::silu_mul(gu); }
torch::Tensor npcd::attention(const torch::Tensor& qkv, const torch::Tensor& slots, const torch::Tensor& pos,
                              const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                              torch::Tensor& v_cache, int64_t nh, int64_t nkv, double scale) {
  return ::attention(qkv, slots, pos, cos, sin, k_cache, v_cache, nh, nkv, scale);
}

void register_decode(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "row-wise RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "x += r in place, then RMSNorm of x");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of a fused [gate | up] row");
  m.def("attention", &attention, "rotary embedding, cache write and causal attention of each token over its slot");
}
