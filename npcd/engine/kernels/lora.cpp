// The mixed-adapter LoRA delta as one segmented CPU kernel (Punica's SGMV idea, fp32 accumulation).
//
// Semantics (one layer, one projection group; R the stack rank, scale folded into B):
//   for every row i with slot a = slots[i] >= 0, for each member m with columns
//   [off_m, off_m + out_m) of the fused output:
//     h[i, c]           = sA[a, c] * sum_k x[i, k] * A[a, k, c]                      c < members * R
//     out[i, off_m + j] += sB_m[a, j] * sum_r h[i, m*R + r] * B_m[a, r, j]
// with sA = sB_m = 1 for fp32 and bf16 stacks, and per-column scales for int8 stacks.
// Shapes: x [n, in], out [n, sum out_m], A [slots, in, members*R], B_m [slots, R, out_m], slots [n];
// int8 stacks also sA [slots, members*R] and sB_m [slots, out_m] (fp32), else sA empty and no sB_m.
//
// Why a kernel: PyTorch on the CPU has no segmented GEMM, so npcd.engine.lora pads
// segments into batched matmuls and gathers rows; those matmuls round differently
// with the batch's shape, and behind int8 activations that flipped 5 of 8 greedy
// lines with adapters between alone and batched. Here every output element is a sum
// in a fixed order (k ascending, then r ascending) whatever the batch holds, rows
// are read where they are (no gather, no padding), and an adapter's A and B are
// streamed once per step for all its rows: rows of one slot are processed together,
// in tiles of kRows sharing each weight load.

#include <torch/extension.h>

#include "layer_ops.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = 2;  // rows of one slot sharing each weight load
// Output columns per task unit. A unit streams its columns of every weight row k: 128 columns are 256
// contiguous bytes of bf16 per row, which the AVX-512 path reads in one pass (2 rows x 8 zmm). Measured on
// the Zen 4 machine, a step's LoRA deltas of 8 rank-64 adapters (all modules): 32 columns per unit (one
// 64-byte line per row, a stride of one row between lines) 3.4 / 21.5 / 29.6 ms at batch 1 / 8 / 32,
// 128 columns in one pass 2.4 / 11.3 / 14.4 ms: the short strided streams left the prefetcher idle.
constexpr int64_t kCols = 128;
// Weight rows a unit prefetches ahead of the one it multiplies: the hardware prefetcher does not follow a
// unit's strided rows far enough. Measured on the Sapphire Rapids machine, a step's deltas of 8 rank-64 bf16
// adapters at batch 8: none 18.2 ms, 4 rows ahead 16.9, 8 15.3, 16 14.3, 32 15.3.
constexpr int64_t kAhead = 16;

// Weights are fp32, bf16 or int8 with a scale per column (each halves the bytes every step streams:
// npcd.engine.quant.lora_dtype says which mode takes which, and why).
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One vector width's operations, so that rows_times_vec is written once for 8 and 16 floats.
#if defined(__AVX2__) && defined(__FMA__)
struct Ymm {
  using V = __m256;
  static constexpr int kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#endif
#if defined(__AVX512F__)
struct Zmm {
  using V = __m512;
  static constexpr int kWidth = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static V load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
// dst[i][c0..c0+kWidth*kV) = scale[c0..) * sum_k src_i[k] * W[k, c0..)  (W row-major, row stride ld),
// for kR rows; scale is nullptr (1) for float weights. `accumulate`: dst += instead of =. Every element is
// an FMA chain over k ascending, then one multiply (an FMA into dst when accumulating), whichever width the
// caller picked, so its value never depends on how the work was cut nor on the vector width.
template <class S, int kR, int kV, typename TW>
inline void rows_times_vec(const float* const* src, const TW* W, int64_t ld, int64_t K, int64_t c0,
                           const float* scale, float* const* dst, bool accumulate) {
  typename S::V acc[kR][kV];
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) acc[i][v] = S::zero();
  for (int64_t k = 0; k < K; ++k) {
    if (k + kAhead < K) {
      const char* ahead = reinterpret_cast<const char*>(W + (k + kAhead) * ld + c0);
      for (size_t line = 0; line < sizeof(TW) * S::kWidth * kV; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    typename S::V wv[kV];
    for (int v = 0; v < kV; ++v) wv[v] = S::load(W + k * ld + c0 + S::kWidth * v);
    for (int i = 0; i < kR; ++i) {
      const typename S::V xk = S::set1(src[i][k]);
      for (int v = 0; v < kV; ++v) acc[i][v] = S::fmadd(xk, wv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) {
      float* d = dst[i] + c0 + S::kWidth * v;
      // Scaled sums are added with an explicit FMA: a separate multiply and add would be fused by the
      // compiler (GCC contracts by default) in some instantiations and not others, and the row's result would
      // then depend on whether it ran in a tile of kRows or alone.
      if (scale) {
        const typename S::V sv = S::load(scale + c0 + S::kWidth * v);
        S::store(d, accumulate ? S::fmadd(acc[i][v], sv, S::load(d)) : S::mul(acc[i][v], sv));
      } else {
        S::store(d, accumulate ? S::add(S::load(d), acc[i][v]) : acc[i][v]);
      }
    }
}
#endif

template <int kR, typename TW>
inline void rows_times(const float* const* src, const TW* W, int64_t ld, int64_t K, int64_t c0, int64_t w,
                       const float* scale, float* const* dst, bool accumulate) {
  int64_t c = c0;
#if defined(__AVX512F__)
  for (; c + 128 <= c0 + w; c += 128) rows_times_vec<Zmm, kR, 8>(src, W, ld, K, c, scale, dst, accumulate);
  for (; c + 64 <= c0 + w; c += 64) rows_times_vec<Zmm, kR, 4>(src, W, ld, K, c, scale, dst, accumulate);
  for (; c + 32 <= c0 + w; c += 32) rows_times_vec<Zmm, kR, 2>(src, W, ld, K, c, scale, dst, accumulate);
  for (; c + 16 <= c0 + w; c += 16) rows_times_vec<Zmm, kR, 1>(src, W, ld, K, c, scale, dst, accumulate);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kR == 1)  // a lone row has the registers for 64 columns (128 contiguous bf16 bytes) per pass
    for (; c + 64 <= c0 + w; c += 64) rows_times_vec<Ymm, kR, 8>(src, W, ld, K, c, scale, dst, accumulate);
  for (; c + 32 <= c0 + w; c += 32) rows_times_vec<Ymm, kR, 4>(src, W, ld, K, c, scale, dst, accumulate);
  for (; c + 8 <= c0 + w; c += 8) rows_times_vec<Ymm, kR, 1>(src, W, ld, K, c, scale, dst, accumulate);
#endif
  for (int i = 0; i < kR; ++i)
    for (int64_t e = c; e < c0 + w; ++e) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s = std::fma(src[i][k], to_float(W[k * ld + e]), s);
      if (scale)
        dst[i][e] = accumulate ? std::fma(s, scale[e], dst[i][e]) : s * scale[e];
      else
        dst[i][e] = accumulate ? dst[i][e] + s : s;
    }
}

// rows_times over a slot's rows, kRows at a time, then one at a time.
template <typename TW>
inline void segment_rows_times(const std::vector<const float*>& src, const TW* W, int64_t ld, int64_t K, int64_t c0,
                               int64_t w, const float* scale, const std::vector<float*>& dst, bool accumulate) {
  size_t i = 0;
  for (; i + kRows <= src.size(); i += kRows) rows_times<kRows>(&src[i], W, ld, K, c0, w, scale, &dst[i], accumulate);
  for (; i < src.size(); ++i) rows_times<1>(&src[i], W, ld, K, c0, w, scale, &dst[i], accumulate);
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// A slot with many rows (a prompt's) on AVX2: its unit's weights are converted to fp32 once per panel of 16
// columns (K x 16 floats, laid out k by k, in L2), and the panel goes through tiles of 6 rows (12 accumulators,
// 2 weight vectors and a broadcast: 15 of the 16 registers). rows_times converts every weight vector again for
// each tile of kRows = 2 rows. Each element is the same FMA chain as there: the same bits. Measured on the
// 2-core Zen 3, 30 layers of one rank-64 adapter's int8 deltas over one slot's rows: 120 rows 69-83 -> 50-54
// ms, 35 rows 19.5-20.3 -> 15.0-16.8, 12 rows 12.0 -> 9.9; 6 to 8 rows were 13-25% slower (the conversion is
// not paid back), and so was a batch of 6 rows per slot over 8 slots.
constexpr size_t kPanelMinRows = 12;
constexpr int kPanelRows = 6;
constexpr int64_t kPanel = 16;

template <int kR>
inline void panel_rows(const float* const* src, const float* panel, int64_t K, const float* scale,
                       float* const* dst, bool accumulate) {
  rows_times_vec<Ymm, kR, kPanel / Ymm::kWidth>(src, panel, kPanel, K, 0, scale, dst, accumulate);
}

template <typename TW>
inline void segment_panels_times(const std::vector<const float*>& src, const TW* W, int64_t ld, int64_t K,
                                 int64_t c0, int64_t w, const float* scale, const std::vector<float*>& dst,
                                 bool accumulate) {
  const int64_t panels = w / kPanel;
  thread_local std::vector<float> converted;  // one panel, K x 16 floats (at most 96 KB): stays in L2
  converted.resize(static_cast<size_t>(K * kPanel));
  const float* panel = converted.data();
  const size_t n = src.size();
  std::vector<float*> out(n);
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t v = 0; v < kPanel; v += Ymm::kWidth)
        Ymm::store(converted.data() + k * kPanel + v, Ymm::load(W + k * ld + c0 + p * kPanel + v));
    const float* sc = scale ? scale + c0 + p * kPanel : nullptr;
    for (size_t i = 0; i < n; ++i) out[i] = dst[i] + c0 + p * kPanel;
    size_t i = 0;
    for (; i + kPanelRows <= n; i += kPanelRows) panel_rows<kPanelRows>(&src[i], panel, K, sc, &out[i], accumulate);
    switch (n - i) {
      case 5: panel_rows<5>(&src[i], panel, K, sc, &out[i], accumulate); break;
      case 4: panel_rows<4>(&src[i], panel, K, sc, &out[i], accumulate); break;
      case 3: panel_rows<3>(&src[i], panel, K, sc, &out[i], accumulate); break;
      case 2: panel_rows<2>(&src[i], panel, K, sc, &out[i], accumulate); break;
      case 1: panel_rows<1>(&src[i], panel, K, sc, &out[i], accumulate); break;
      default: break;
    }
  }
  if (panels * kPanel < w)
    segment_rows_times(src, W, ld, K, c0 + panels * kPanel, w - panels * kPanel, scale, dst, accumulate);
}
#endif

// One unit's columns [c0, c0 + w) for every row of a slot.
template <typename TW>
inline void segment_times(const std::vector<const float*>& src, const TW* W, int64_t ld, int64_t K, int64_t c0,
                          int64_t w, const float* scale, const std::vector<float*>& dst, bool accumulate) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  if (src.size() >= kPanelMinRows) return segment_panels_times(src, W, ld, K, c0, w, scale, dst, accumulate);
#endif
  segment_rows_times(src, W, ld, K, c0, w, scale, dst, accumulate);
}

template <typename TW>
const TW* weights_of(const torch::Tensor& t) {
  return reinterpret_cast<const TW*>(t.data_ptr());
}

// The scale of slot's columns in a [slots, columns] fp32 tensor, or nullptr for float weights (none given).
inline const float* scales_of(const torch::Tensor& scales, int64_t slot) {
  return scales.numel() ? scales.data_ptr<float>() + slot * scales.size(1) : nullptr;
}

template <typename TW>
void lora_add_typed(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A, const std::vector<torch::Tensor>& Bs,
              const torch::Tensor& slots, const torch::Tensor& A_scale, const std::vector<torch::Tensor>& B_scales) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "x must be contiguous fp32 [n, in]");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.scalar_type() == torch::kFloat32 && out.size(0) == x.size(0),
              "out must be fp32 [n, out] with contiguous rows");
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous() && A.size(1) == x.size(1), "A must be contiguous [slots, in, members*R]");
  for (const auto& B : Bs) TORCH_CHECK(B.scalar_type() == A.scalar_type(), "A and every B must share a dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == x.size(0), "slots must be [n] int64");
  const int64_t n = x.size(0), K = x.size(1), C = A.size(2), members = static_cast<int64_t>(Bs.size());
  TORCH_CHECK(members > 0 && C % members == 0, "A's columns must hold members * R");
  const int64_t R = C / members;
  int64_t total_out = 0;
  for (const auto& B : Bs) {
    TORCH_CHECK(B.dim() == 3 && B.is_contiguous() && B.size(0) == A.size(0) && B.size(1) == R,
                "each B must be contiguous [slots, R, out_m]");
    total_out += B.size(2);
  }
  TORCH_CHECK(total_out == out.size(1), "the members' widths must add up to out's columns");
  if constexpr (std::is_same_v<TW, int8_t>) {
    TORCH_CHECK(A_scale.dim() == 2 && A_scale.is_contiguous() && A_scale.scalar_type() == torch::kFloat32 &&
                A_scale.size(0) == A.size(0) && A_scale.size(1) == C, "int8 A needs fp32 scales [slots, members*R]");
    TORCH_CHECK(B_scales.size() == Bs.size(), "int8 Bs need one scale tensor each");
    for (size_t m = 0; m < Bs.size(); ++m)
      TORCH_CHECK(B_scales[m].dim() == 2 && B_scales[m].is_contiguous() && B_scales[m].scalar_type() == torch::kFloat32 &&
                  B_scales[m].size(0) == A.size(0) && B_scales[m].size(1) == Bs[m].size(2),
                  "int8 B needs fp32 scales [slots, out_m]");
  } else {
    TORCH_CHECK(A_scale.numel() == 0 && B_scales.empty(), "scales go with int8 stacks only");
  }

  // rows grouped by slot, in row order within a slot
  const int64_t* sp = slots.data_ptr<int64_t>();
  std::map<int64_t, std::vector<int64_t>> by_slot;
  for (int64_t i = 0; i < n; ++i) {
    if (sp[i] < 0) continue;
    TORCH_CHECK(sp[i] < A.size(0), "slot ", sp[i], " exceeds the stacks' slots");
    by_slot[sp[i]].push_back(i);
  }
  if (by_slot.empty()) return;
  std::vector<std::pair<int64_t, std::vector<int64_t>>> segments(by_slot.begin(), by_slot.end());

  std::vector<float> h(n * C, 0.0f);
  const float* xp = x.data_ptr<float>();
  const TW* ap = weights_of<TW>(A);
  float* op = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);

  // shrink: units (segment, column block of h)
  const int64_t h_blocks = (C + kCols - 1) / kCols;
  at::parallel_for(0, static_cast<int64_t>(segments.size()) * h_blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const auto& [slot, rows] = segments[u / h_blocks];
      const int64_t c0 = (u % h_blocks) * kCols;
      std::vector<const float*> src;
      std::vector<float*> dst;
      for (int64_t r : rows) {
        src.push_back(xp + r * K);
        dst.push_back(h.data() + r * C);
      }
      segment_times(src, ap + slot * K * C, C, K, c0, std::min(kCols, C - c0), scales_of(A_scale, slot), dst, false);
    }
  });

  // expand: units (segment, member, column block of that member's output)
  std::vector<std::tuple<int64_t, int64_t, int64_t>> units;  // segment, member, c0
  std::vector<int64_t> offsets;
  int64_t off = 0;
  for (int64_t m = 0; m < members; ++m) {
    offsets.push_back(off);
    off += Bs[m].size(2);
  }
  for (int64_t s = 0; s < static_cast<int64_t>(segments.size()); ++s)
    for (int64_t m = 0; m < members; ++m)
      for (int64_t c0 = 0; c0 < Bs[m].size(2); c0 += kCols) units.emplace_back(s, m, c0);
  at::parallel_for(0, static_cast<int64_t>(units.size()), 4, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const auto [s, m, c0] = units[u];
      const auto& [slot, rows] = segments[s];
      const int64_t width = Bs[m].size(2);
      std::vector<const float*> src;
      std::vector<float*> dst;
      for (int64_t r : rows) {
        src.push_back(h.data() + r * C + m * R);
        dst.push_back(op + r * ldo + offsets[m]);
      }
      segment_times(src, weights_of<TW>(Bs[m]) + slot * R * width, width, R, c0, std::min(kCols, width - c0),
                    B_scales.empty() ? nullptr : scales_of(B_scales[m], slot), dst, true);
    }
  });
}

void lora_add(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A, const std::vector<torch::Tensor>& Bs,
              const torch::Tensor& slots, const torch::Tensor& A_scale, const std::vector<torch::Tensor>& B_scales) {
  if (A.scalar_type() == torch::kBFloat16)
    lora_add_typed<uint16_t>(x, out, A, Bs, slots, A_scale, B_scales);
  else if (A.scalar_type() == torch::kFloat32)
    lora_add_typed<float>(x, out, A, Bs, slots, A_scale, B_scales);
  else if (A.scalar_type() == torch::kChar)
    lora_add_typed<int8_t>(x, out, A, Bs, slots, A_scale, B_scales);
  else
    TORCH_CHECK(false, "LoRA stacks must be fp32, bf16 or int8, got ", A.scalar_type());
}

}  // namespace

void npcd::lora_add(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A,
                    const std::vector<torch::Tensor>& Bs, const torch::Tensor& slots, const torch::Tensor& A_scale,
                    const std::vector<torch::Tensor>& B_scales) {
  ::lora_add(x, out, A, Bs, slots, A_scale, B_scales);
}

void register_lora(pybind11::module& m) {
  m.def("lora_add", &lora_add, "out += per-row-adapter LoRA delta (segmented, fixed summation order); "
        "A_scale and B_scales: per-column scales of int8 stacks, empty for float ones");
}
