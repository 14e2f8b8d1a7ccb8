// The mixed-adapter LoRA delta as one segmented CPU kernel (Punica's SGMV idea, fp32 accumulation).
//
// Semantics (one layer, one projection group; R the stack rank, scale folded into B):
//   for every row i with slot a = slots[i] >= 0, for each member m with columns
//   [off_m, off_m + out_m) of the fused output:
//     h[i, c]           = sum_k x[i, k] * A[a, k, c]                                  c < members * R
//     out[i, off_m + j] += sum_r h[i, m*R + r] * B_m[a, r, j]
// over fp32 or bf16 stacks. Shapes: x [n, in], out [n, sum out_m], A [slots, in, members*R],
// B_m [slots, R, out_m], slots [n].
//
// int8 stacks (the block modes'; npcd.engine.lora.quad_offsets lays them out) hold bytes q + 128 with a scale
// per column, sA [slots, members*R] and sB_m [slots, out_m]. Each weight matrix W [K, C] of a slot is stored
// flat, in blocks of 128 columns (the last one narrower), each block's bytes contiguous: the quads of 4
// consecutive k of one column in adjacent bytes, quad by quad: byte (k % 4) of column c of quad k / 4 at
// block(c) base + ((k / 4) * block width + c % 128) * 4. A is [slots, ceil(in/4) * members*R * 4], B_m
// [slots, ceil(R/4) * out_m * 4]. Their inputs are quantized too, per row and block of 32 (quantize_row:
// s_b = max |v| / 127, qv = round(v * 127 / max |v|)), so that each block's sum is one integer dot product
// (vpdpbusd, or maddubs + madd on AVX2) instead of a conversion and an FMA per weight:
//     h[i, c]           = sA[a, c] * sum_b s_b(x_i) * (qx_i . qA[a, :, c])_b                      b ascending
//     out[i, off_m + j] += sB_m[a, j] * sum_b s_b(h_i,m) * (qh_i,m . qB_m[a, :, j])_b
// with h_i,m member m's R columns of h_i, quantized in blocks from its first column.
//
// Why a kernel: PyTorch on the CPU has no segmented GEMM, so npcd.engine.lora pads
// segments into batched matmuls and gathers rows; those matmuls round differently
// with the batch's shape, and behind int8 activations that flipped 5 of 8 greedy
// lines with adapters between alone and batched. Here every output element is a sum
// in a fixed order (k ascending, then r ascending; for int8 stacks blocks ascending, each block exact)
// whatever the batch holds, rows are read where they are (no gather, no padding), and an adapter's A and B
// are streamed once per step for all its rows: rows of one slot are processed together, in tiles sharing
// each weight load.

#include <torch/extension.h>

#include "layer_ops.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
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

// Float weights are fp32 or bf16 (npcd.engine.quant.lora_dtype says which mode takes which, and why).
inline float to_float(float v) { return v; }
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
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
// dst[i][c0..c0+kWidth*kV) = sum_k src_i[k] * W[k, c0..)  (W row-major, row stride ld),
// for kR rows. `accumulate`: dst += instead of =. Every element is an FMA chain over k ascending, whichever
// width the caller picked, so its value never depends on how the work was cut nor on the vector width.
template <class S, int kR, int kV, typename TW>
inline void rows_times_vec(const float* const* src, const TW* W, int64_t ld, int64_t K, int64_t c0,
                           float* const* dst, bool accumulate) {
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
      S::store(d, accumulate ? S::add(S::load(d), acc[i][v]) : acc[i][v]);
    }
}
#endif

template <int kR, typename TW>
inline void rows_times(const float* const* src, const TW* W, int64_t ld, int64_t K, int64_t c0, int64_t w,
                       float* const* dst, bool accumulate) {
  int64_t c = c0;
#if defined(__AVX512F__)
  for (; c + 128 <= c0 + w; c += 128) rows_times_vec<Zmm, kR, 8>(src, W, ld, K, c, dst, accumulate);
  for (; c + 64 <= c0 + w; c += 64) rows_times_vec<Zmm, kR, 4>(src, W, ld, K, c, dst, accumulate);
  for (; c + 32 <= c0 + w; c += 32) rows_times_vec<Zmm, kR, 2>(src, W, ld, K, c, dst, accumulate);
  for (; c + 16 <= c0 + w; c += 16) rows_times_vec<Zmm, kR, 1>(src, W, ld, K, c, dst, accumulate);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kR == 1)  // a lone row has the registers for 64 columns (128 contiguous bf16 bytes) per pass
    for (; c + 64 <= c0 + w; c += 64) rows_times_vec<Ymm, kR, 8>(src, W, ld, K, c, dst, accumulate);
  for (; c + 32 <= c0 + w; c += 32) rows_times_vec<Ymm, kR, 4>(src, W, ld, K, c, dst, accumulate);
  for (; c + 8 <= c0 + w; c += 8) rows_times_vec<Ymm, kR, 1>(src, W, ld, K, c, dst, accumulate);
#endif
  for (int i = 0; i < kR; ++i)
    for (int64_t e = c; e < c0 + w; ++e) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s = std::fma(src[i][k], to_float(W[k * ld + e]), s);
      dst[i][e] = accumulate ? dst[i][e] + s : s;
    }
}

// rows_times over a slot's rows, kRows at a time, then one at a time.
template <typename TW>
inline void segment_rows_times(const std::vector<const float*>& src, const TW* W, int64_t ld, int64_t K, int64_t c0,
                               int64_t w, const std::vector<float*>& dst, bool accumulate) {
  size_t i = 0;
  for (; i + kRows <= src.size(); i += kRows) rows_times<kRows>(&src[i], W, ld, K, c0, w, &dst[i], accumulate);
  for (; i < src.size(); ++i) rows_times<1>(&src[i], W, ld, K, c0, w, &dst[i], accumulate);
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
inline void panel_rows(const float* const* src, const float* panel, int64_t K, float* const* dst,
                       bool accumulate) {
  rows_times_vec<Ymm, kR, kPanel / Ymm::kWidth>(src, panel, kPanel, K, 0, dst, accumulate);
}

template <typename TW>
inline void segment_panels_times(const std::vector<const float*>& src, const TW* W, int64_t ld, int64_t K,
                                 int64_t c0, int64_t w, const std::vector<float*>& dst, bool accumulate) {
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
    for (size_t i = 0; i < n; ++i) out[i] = dst[i] + c0 + p * kPanel;
    size_t i = 0;
    for (; i + kPanelRows <= n; i += kPanelRows) panel_rows<kPanelRows>(&src[i], panel, K, &out[i], accumulate);
    switch (n - i) {
      case 5: panel_rows<5>(&src[i], panel, K, &out[i], accumulate); break;
      case 4: panel_rows<4>(&src[i], panel, K, &out[i], accumulate); break;
      case 3: panel_rows<3>(&src[i], panel, K, &out[i], accumulate); break;
      case 2: panel_rows<2>(&src[i], panel, K, &out[i], accumulate); break;
      case 1: panel_rows<1>(&src[i], panel, K, &out[i], accumulate); break;
      default: break;
    }
  }
  if (panels * kPanel < w)
    segment_rows_times(src, W, ld, K, c0 + panels * kPanel, w - panels * kPanel, dst, accumulate);
}
#endif

// One unit's columns [c0, c0 + w) for every row of a slot.
template <typename TW>
inline void segment_times(const std::vector<const float*>& src, const TW* W, int64_t ld, int64_t K, int64_t c0,
                          int64_t w, const std::vector<float*>& dst, bool accumulate) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  if (src.size() >= kPanelMinRows) return segment_panels_times(src, W, ld, K, c0, w, dst, accumulate);
#endif
  segment_rows_times(src, W, ld, K, c0, w, dst, accumulate);
}

template <typename TW>
const TW* weights_of(const torch::Tensor& t) {
  return reinterpret_cast<const TW*>(t.data_ptr());
}

// Rows grouped by slot, in row order within a slot; rows without an adapter (slot < 0) are left out.
std::vector<std::pair<int64_t, std::vector<int64_t>>> segments_of(const torch::Tensor& slots, int64_t stack_slots) {
  const int64_t* sp = slots.data_ptr<int64_t>();
  std::map<int64_t, std::vector<int64_t>> by_slot;
  for (int64_t i = 0; i < slots.numel(); ++i) {
    if (sp[i] < 0) continue;
    TORCH_CHECK(sp[i] < stack_slots, "slot ", sp[i], " exceeds the stacks' slots");
    by_slot[sp[i]].push_back(i);
  }
  return {by_slot.begin(), by_slot.end()};
}

// The expand's task units, (segment, member, first column) for each kCols-wide block of each member's output,
// and each member's first column in the fused output.
struct ExpandPlan {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> units;
  std::vector<int64_t> offsets;
};

ExpandPlan expand_plan(int64_t segments, const std::vector<int64_t>& widths) {
  ExpandPlan plan;
  int64_t off = 0;
  for (int64_t width : widths) {
    plan.offsets.push_back(off);
    off += width;
  }
  for (int64_t s = 0; s < segments; ++s)
    for (size_t m = 0; m < widths.size(); ++m)
      for (int64_t c0 = 0; c0 < widths[m]; c0 += kCols) plan.units.emplace_back(s, static_cast<int64_t>(m), c0);
  return plan;
}

template <typename TW>
void lora_add_typed(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A,
                    const std::vector<torch::Tensor>& Bs, const torch::Tensor& slots) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "x must be contiguous fp32 [n, in]");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.scalar_type() == torch::kFloat32 && out.size(0) == x.size(0),
              "out must be fp32 [n, out] with contiguous rows");
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous() && A.size(1) == x.size(1),
              "A must be contiguous [slots, in, members*R]");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == x.size(0), "slots must be [n] int64");
  const int64_t n = x.size(0), K = x.size(1), C = A.size(2), members = static_cast<int64_t>(Bs.size());
  TORCH_CHECK(members > 0 && C % members == 0, "A's columns must hold members * R");
  const int64_t R = C / members;
  int64_t total_out = 0;
  for (const auto& B : Bs) {
    TORCH_CHECK(B.scalar_type() == A.scalar_type(), "A and every B must share a dtype");
    TORCH_CHECK(B.dim() == 3 && B.is_contiguous() && B.size(0) == A.size(0) && B.size(1) == R,
                "each B must be contiguous [slots, R, out_m]");
    total_out += B.size(2);
  }
  TORCH_CHECK(total_out == out.size(1), "the members' widths must add up to out's columns");
  const auto segments = segments_of(slots, A.size(0));
  if (segments.empty()) return;

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
      segment_times(src, ap + slot * K * C, C, K, c0, std::min(kCols, C - c0), dst, false);
    }
  });

  std::vector<int64_t> widths;
  for (const auto& B : Bs) widths.push_back(B.size(2));
  // named references, not a structured binding: a C++17 lambda cannot capture one
  const ExpandPlan plan = expand_plan(static_cast<int64_t>(segments.size()), widths);
  const auto& units = plan.units;
  const auto& offsets = plan.offsets;
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
      segment_times(src, weights_of<TW>(Bs[m]) + slot * R * width, width, R, c0, std::min(kCols, width - c0), dst,
                    true);
    }
  });
}

// ---- int8 stacks: int8 inputs, integer dot products per block of 32 ----
//
// Why: with the weights converted to fp32 in registers, every row paid two conversions and an FMA per 16
// weights; one vpdpbusd sums 64 products of bytes as they are laid out, and the float work (convert, scale,
// FMA) is paid once per block of 32 inputs. Measured on the Zen 4 machine, a step's 120 calls over 8 rank-64
// adapters from memory, 2 threads: 128 prompt rows (16 per slot) 40.5 -> 24.5 ms, batch 32 14.1 -> 12.0 ms;
// batch 1 and 8 unchanged (1.6 and 8.8 ms: they wait on memory). Column blocks: a task unit reads one block,
// contiguous, which its prefetches (kAheadQuads) run through into the next.

constexpr int64_t kBlock = 32;                  // inputs quantized per block of 32 (8 quads of 4)
constexpr int64_t kQuadsPerBlock = kBlock / 4;
// How far ahead of its quad a tile prefetches, into L2: past its own block into the next ones (a slot's blocks
// are contiguous), never past the slot's matrix. Measured on the Zen 4 machine, gate/up deltas of 256 slots
// read from memory, 2 threads, one row per slot / 8 rows of 8 slots: 4 quads into L1, stopping at the block's
// end 9.5 / 15.7 GB/s; into L2 16 quads 13.6 / 18.9, 32 quads 13.2 / 21.4, 64 quads 15.1 / 23.1, 128 quads
// 11.6 / 18.1 (runs moved by ~20%).
constexpr int64_t kAheadQuads = 64;

inline int64_t quads_of(int64_t k) { return (k + 3) / 4; }
inline int64_t blocks_of(int64_t k) { return (k + kBlock - 1) / kBlock; }

// One row's inputs quantized per block: q [quads * 4] (zero padded), and per block its scale and the sum of its
// q (the VNNI path's correction for the weights' +128 offset).
struct QuantRow {
  const int8_t* q;
  const float* scale;
  const int32_t* sum;
};

// One column block of a slot's weight matrix: its quads [quads, width, 4] at `bytes`, and the end of the slot's
// matrix, which bounds the prefetches.
struct QuadBlock {
  const uint8_t* bytes;
  int64_t quads, width;
  const uint8_t* end;

  const uint8_t* at(int64_t t, int64_t c) const { return bytes + (t * width + c) * 4; }
};

// v[0, K) -> q, scale, sum as QuantRow holds them: per block, s = max |v| / 127 and q = round(v * (127 / max |v|))
// to nearest even (0 for an all-zero block). Whole blocks take 8-lane vectors, a short last block the scalar
// loop: the same operations on the same values, so every build gives every row the same bytes.
void quantize_row(const float* v, int64_t K, int8_t* q, float* scale, int32_t* sum) {
  for (int64_t b = 0; b < blocks_of(K); ++b) {
    const int64_t k0 = b * kBlock, len = std::min(kBlock, K - k0);
    float amax = 0.0f;
    for (int64_t k = k0; k < k0 + len; ++k) amax = std::max(amax, std::fabs(v[k]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    scale[b] = amax / 127.0f;
    int32_t total = 0;
#if defined(__AVX2__)
    if (len == kBlock) {
      const __m256 iv = _mm256_set1_ps(inv);
      __m256i qi[4];
      for (int j = 0; j < 4; ++j) qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k0 + 8 * j), iv));
      const __m256i lanes = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
      alignas(32) int32_t part[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(part), lanes);
      for (int32_t p : part) total += p;
      // packs work within 128-bit halves: the permute puts the 32 bytes back in k order
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k0),
                          _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    } else
#endif
    {
      for (int64_t k = k0; k < k0 + len; ++k) {
        const int32_t qk = static_cast<int32_t>(std::nearbyint(v[k] * inv));
        q[k] = static_cast<int8_t>(qk);
        total += qk;
      }
    }
    sum[b] = total;
  }
  for (int64_t k = K; k < quads_of(K) * 4; ++k) q[k] = 0;
}

// dst[i][c0 .. c0 + width*kV) (=, or += when accumulating) colscale * sum_b s_b * (q_i . W[:, c])_b for kR rows
// over one column block of bytes q + 128. Each element: an exact int32 dot per block, then
// f = fma(s_b, float(dot), f) for b ascending, then f * colscale (fma(f, colscale, dst) when accumulating), as
// in quad_scalar: the same bits in every tile shape and build.
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr int kQuadRowsMax = 4;
template <int kR, int kV>
inline void quad_tile(const QuantRow* rows, const QuadBlock& W, int64_t c0, const float* colscale,
                      float* const* dst, bool accumulate) {
  const int64_t quads = W.quads;
  __m512 f[kR][kV];
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) f[i][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b * kQuadsPerBlock < quads; ++b) {
    __m512i d[kR][kV];
    for (int i = 0; i < kR; ++i)
      for (int v = 0; v < kV; ++v) d[i][v] = _mm512_setzero_si512();
    const int64_t t1 = std::min(quads, (b + 1) * kQuadsPerBlock);
    for (int64_t t = b * kQuadsPerBlock; t < t1; ++t) {
      if (const uint8_t* ahead = W.at(t + kAheadQuads, c0); ahead < W.end)
        for (int v = 0; v < kV; ++v) _mm_prefetch(reinterpret_cast<const char*>(ahead) + 64 * v, _MM_HINT_T1);
      __m512i w[kV];
      for (int v = 0; v < kV; ++v) w[v] = _mm512_loadu_si512(W.at(t, c0 + 16 * v));
      for (int i = 0; i < kR; ++i) {
        int32_t x4;
        std::memcpy(&x4, rows[i].q + 4 * t, sizeof x4);
        const __m512i xb = _mm512_set1_epi32(x4);
        for (int v = 0; v < kV; ++v) d[i][v] = _mm512_dpbusd_epi32(d[i][v], w[v], xb);
      }
    }
    for (int i = 0; i < kR; ++i) {
      const __m512i offset = _mm512_set1_epi32(128 * rows[i].sum[b]);  // sum (q_w + 128) q_x - 128 sum q_x
      const __m512 s = _mm512_set1_ps(rows[i].scale[b]);
      for (int v = 0; v < kV; ++v)
        f[i][v] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(d[i][v], offset)), f[i][v]);
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) {
      float* out = dst[i] + c0 + 16 * v;
      const __m512 cs = _mm512_loadu_ps(colscale + c0 + 16 * v);
      _mm512_storeu_ps(out, accumulate ? _mm512_fmadd_ps(f[i][v], cs, _mm512_loadu_ps(out))
                                       : _mm512_mul_ps(f[i][v], cs));
    }
}
constexpr int64_t kQuadLanes = 16;
#elif defined(__AVX2__)
constexpr int kQuadRowsMax = 2;
template <int kR, int kV>
inline void quad_tile(const QuantRow* rows, const QuadBlock& W, int64_t c0, const float* colscale,
                      float* const* dst, bool accumulate) {
  const int64_t quads = W.quads;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 f[kR][kV];
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) f[i][v] = _mm256_setzero_ps();
  for (int64_t b = 0; b * kQuadsPerBlock < quads; ++b) {
    __m256i d[kR][kV];
    for (int i = 0; i < kR; ++i)
      for (int v = 0; v < kV; ++v) d[i][v] = _mm256_setzero_si256();
    const int64_t t1 = std::min(quads, (b + 1) * kQuadsPerBlock);
    for (int64_t t = b * kQuadsPerBlock; t < t1; ++t) {
      if (const uint8_t* ahead = W.at(t + kAheadQuads, c0); ahead < W.end)
        for (int v = 0; v < kV; v += 2) _mm_prefetch(reinterpret_cast<const char*>(ahead) + 32 * v, _MM_HINT_T1);
      for (int v = 0; v < kV; ++v) {
        // signed weights, and maddubs' unsigned operand as |w| with w's sign moved onto the inputs: each pair
        // of products is at most 2 * 127 * 127, so the 16-bit sums never saturate
        const __m256i w =
            _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W.at(t, c0 + 8 * v))), flip);
        const __m256i magnitude = _mm256_abs_epi8(w);
        for (int i = 0; i < kR; ++i) {
          int32_t x4;
          std::memcpy(&x4, rows[i].q + 4 * t, sizeof x4);
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(_mm256_set1_epi32(x4), w));
          d[i][v] = _mm256_add_epi32(d[i][v], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int i = 0; i < kR; ++i) {
      const __m256 s = _mm256_set1_ps(rows[i].scale[b]);
      for (int v = 0; v < kV; ++v) f[i][v] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d[i][v]), f[i][v]);
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int v = 0; v < kV; ++v) {
      float* out = dst[i] + c0 + 8 * v;
      const __m256 cs = _mm256_loadu_ps(colscale + c0 + 8 * v);
      _mm256_storeu_ps(out, accumulate ? _mm256_fmadd_ps(f[i][v], cs, _mm256_loadu_ps(out))
                                       : _mm256_mul_ps(f[i][v], cs));
    }
}
constexpr int64_t kQuadLanes = 8;
#else
constexpr int kQuadRowsMax = 1;
#endif

// quad_tile's sums one element at a time: columns past the last whole vector, and builds without AVX2.
// Not auto-vectorized: GCC 12.2 at -O3 with -mavx512vnni turned the (byte - 128) * q sums into vpdpbusd and
// dropped the - 128 (the tail columns of a 2-row tile came out as sum byte * q; tests/engine/test_lora.py
// caught it), and the tail is a few columns per block.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
inline void quad_scalar(const QuantRow& row, const QuadBlock& W, int64_t c, const float* colscale, float* dst,
                        bool accumulate) {
  float f = 0.0f;
  for (int64_t b = 0; b * kQuadsPerBlock < W.quads; ++b) {
    int32_t d = 0;
    for (int64_t t = b * kQuadsPerBlock; t < std::min(W.quads, (b + 1) * kQuadsPerBlock); ++t)
      for (int64_t j = 0; j < 4; ++j) d += (static_cast<int32_t>(W.at(t, c)[j]) - 128) * row.q[4 * t + j];
    f = std::fma(row.scale[b], static_cast<float>(d), f);
  }
  dst[c] = accumulate ? std::fma(f, colscale[c], dst[c]) : f * colscale[c];
}

// One column block for kR rows: the widest vector tile that fits the registers (AVX-512: 8, 4 or 2 vectors of
// 16 columns for 1, 2 or 4 rows), then single vectors, then single columns. dst[i] and colscale point at the
// block's first column.
template <int kR>
inline void quad_rows(const QuantRow* rows, const QuadBlock& W, const float* colscale, float* const* dst,
                      bool accumulate) {
  int64_t c = 0;
#if defined(__AVX2__)
  constexpr int kV = (kQuadLanes == 16 ? 8 : 4) / kR;
  for (; c + kQuadLanes * kV <= W.width; c += kQuadLanes * kV) quad_tile<kR, kV>(rows, W, c, colscale, dst, accumulate);
  for (; c + kQuadLanes <= W.width; c += kQuadLanes) quad_tile<kR, 1>(rows, W, c, colscale, dst, accumulate);
#endif
  for (int i = 0; i < kR; ++i)
    for (int64_t e = c; e < W.width; ++e) quad_scalar(rows[i], W, e, colscale, dst[i], accumulate);
}

// quad_rows over a slot's rows: tiles of kQuadRowsMax, then smaller ones.
inline void quad_segment(const std::vector<QuantRow>& rows, const QuadBlock& W, const float* colscale,
                         const std::vector<float*>& dst, bool accumulate) {
  size_t i = 0;
  if constexpr (kQuadRowsMax >= 4)
    for (; i + 4 <= rows.size(); i += 4) quad_rows<4>(&rows[i], W, colscale, &dst[i], accumulate);
  if constexpr (kQuadRowsMax >= 2)
    for (; i + 2 <= rows.size(); i += 2) quad_rows<2>(&rows[i], W, colscale, &dst[i], accumulate);
  for (; i < rows.size(); ++i) quad_rows<1>(&rows[i], W, colscale, &dst[i], accumulate);
}

// Block c0 / kCols of the slot's [quads * 4, C] matrix in flat bytes: the blocks before it are all kCols wide.
inline QuadBlock block_of(const torch::Tensor& flat, int64_t slot, int64_t quads, int64_t C, int64_t c0) {
  const uint8_t* matrix = weights_of<uint8_t>(flat) + slot * quads * C * 4;
  return {matrix + c0 * quads * 4, quads, std::min(kCols, C - c0), matrix + quads * C * 4};
}

void lora_add_quads(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A,
                    const std::vector<torch::Tensor>& Bs, const torch::Tensor& slots, const torch::Tensor& A_scale,
                    const std::vector<torch::Tensor>& B_scales) {
  TORCH_CHECK(A_scale.dim() == 2 && A_scale.is_contiguous() && A_scale.scalar_type() == torch::kFloat32,
              "int8 A needs fp32 scales [slots, members*R]");
  const int64_t n = x.size(0), K = x.size(1), C = A_scale.size(1), members = static_cast<int64_t>(Bs.size());
  TORCH_CHECK(B_scales.size() == Bs.size(), "int8 Bs need one scale tensor each");
  for (const auto& s : B_scales)
    TORCH_CHECK(s.dim() == 2 && s.is_contiguous() && s.scalar_type() == torch::kFloat32 && s.size(0) == A.size(0),
                "int8 B needs fp32 scales [slots, out_m]");
  TORCH_CHECK(!Bs.empty() && C % members == 0, "A's columns must hold members * R");
  const int64_t R = C / members, kq = quads_of(K), rq = quads_of(R);
  TORCH_CHECK(A.dim() == 2 && A.is_contiguous() && A.size(0) == A_scale.size(0) && A.size(1) == kq * C * 4,
              "int8 A must be contiguous [slots, ceil(in/4) * members*R * 4] (npcd.engine.lora.quad_offsets)");
  int64_t total_out = 0;
  for (size_t m = 0; m < Bs.size(); ++m) {
    const auto& B = Bs[m];
    TORCH_CHECK(B.scalar_type() == torch::kByte && B.dim() == 2 && B.is_contiguous() && B.size(0) == A.size(0) &&
                B.size(1) == rq * B_scales[m].size(1) * 4,
                "each int8 B must be contiguous [slots, ceil(R/4) * out_m * 4]");
    total_out += B_scales[m].size(1);
  }
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "x must be contiguous fp32 [n, in]");
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1 && out.scalar_type() == torch::kFloat32 && out.size(0) == n &&
              out.size(1) == total_out, "out must be fp32 [n, sum out_m] with contiguous rows");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.numel() == n, "slots must be [n] int64");
  const auto segments = segments_of(slots, A.size(0));
  if (segments.empty()) return;
  std::vector<int64_t> active;  // the rows with an adapter
  for (const auto& [slot, rows] : segments) active.insert(active.end(), rows.begin(), rows.end());

  const int64_t kb = blocks_of(K), rb = blocks_of(R);
  std::vector<int8_t> xq(n * kq * 4), hq(n * members * rq * 4);
  std::vector<float> xs(n * kb), hs(n * members * rb), h(n * C);
  std::vector<int32_t> xsum(n * kb), hsum(n * members * rb);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const auto x_row = [&](int64_t r) { return QuantRow{&xq[r * kq * 4], &xs[r * kb], &xsum[r * kb]}; };
  const auto h_row = [&](int64_t r, int64_t m) {  // member m's columns of h's row r
    const int64_t at = r * members + m;
    return QuantRow{&hq[at * rq * 4], &hs[at * rb], &hsum[at * rb]};
  };

  const int64_t h_blocks = (C + kCols - 1) / kCols;
  const int64_t shrink_units = static_cast<int64_t>(segments.size()) * h_blocks;
  std::vector<int64_t> widths;
  for (const auto& scale : B_scales) widths.push_back(scale.size(1));
  const ExpandPlan plan = expand_plan(static_cast<int64_t>(segments.size()), widths);
  const auto& expand_units = plan.units;
  const auto& offsets = plan.offsets;
  const int64_t n_active = static_cast<int64_t>(active.size()), n_expand = static_cast<int64_t>(expand_units.size());

  // One parallel region for the four phases (each `omp for` ends on a barrier): at batch 1 a step makes 120
  // of these calls, and a region of its own per phase was one more fork and join each.
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n_active; ++j) {
      const int64_t r = active[j];
      quantize_row(xp + r * K, K, &xq[r * kq * 4], &xs[r * kb], &xsum[r * kb]);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < shrink_units; ++u) {
      const auto& [slot, rows] = segments[u / h_blocks];
      const int64_t c0 = (u % h_blocks) * kCols;
      std::vector<QuantRow> src;
      std::vector<float*> dst;
      for (int64_t r : rows) {
        src.push_back(x_row(r));
        dst.push_back(&h[r * C + c0]);
      }
      quad_segment(src, block_of(A, slot, kq, C, c0), A_scale.data_ptr<float>() + slot * C + c0, dst, false);
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n_active * members; ++j) {
      const int64_t r = active[j / members], m = j % members, at = r * members + m;
      quantize_row(&h[r * C + m * R], R, &hq[at * rq * 4], &hs[at * rb], &hsum[at * rb]);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_expand; ++u) {
      const auto [s, m, c0] = expand_units[u];
      const auto& [slot, rows] = segments[s];
      const int64_t width = B_scales[m].size(1);
      std::vector<QuantRow> src;
      std::vector<float*> dst;
      for (int64_t r : rows) {
        src.push_back(h_row(r, m));
        dst.push_back(op + r * ldo + offsets[m] + c0);
      }
      quad_segment(src, block_of(Bs[m], slot, rq, width, c0), B_scales[m].data_ptr<float>() + slot * width + c0, dst,
                   true);
    }
  }
}

void lora_add(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& A, const std::vector<torch::Tensor>& Bs,
              const torch::Tensor& slots, const torch::Tensor& A_scale, const std::vector<torch::Tensor>& B_scales) {
  if (A.scalar_type() == torch::kByte) return lora_add_quads(x, out, A, Bs, slots, A_scale, B_scales);
  TORCH_CHECK(A_scale.numel() == 0 && B_scales.empty(), "scales go with int8 stacks only");
  if (A.scalar_type() == torch::kBFloat16)
    lora_add_typed<uint16_t>(x, out, A, Bs, slots);
  else if (A.scalar_type() == torch::kFloat32)
    lora_add_typed<float>(x, out, A, Bs, slots);
  else
    TORCH_CHECK(false, "LoRA stacks must be fp32, bf16 or int8 quads (uint8), got ", A.scalar_type());
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
