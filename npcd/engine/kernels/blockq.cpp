// Block-quantized weight-only linear for x86 CPUs: y[M,N] = x[M,K] . W[N,K]^T.
//
// Semantics (per row m, output o, block b of 32 input columns):
//   x_q[m,b,:] = round(x[m,b,:] / dx[m,b]),  dx[m,b] = max|x[m,b,:]| / 127      (int8, per row and block)
//   q4_1:  W[o,b,j] = dw[o,b] * q[o,b,j] + mw[o,b],  q in 0..15
//          y[m,o] = sum_b dw[o,b]*dx[m,b] * <q[o,b,:], x_q[m,b,:]>  +  mw[o,b] * dx[m,b] * sum_j x_q[m,b,j]
//   q8_0:  W[o,b,j] = dw[o,b] * q[o,b,j],  q in -127..127
//          y[m,o] = sum_b dw[o,b]*dx[m,b] * <q[o,b,:], x_q[m,b,:]>
// This is the arithmetic of GGML's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products, so the
// bundled Q4_1 GGUF's weights are represented exactly, and the activations lose
// what llama.cpp's do.
//
// Why a kernel of our own: on the AVX2 machines, PyTorch 2.13's CPU paths either read
// 4-8x the bytes (fp32 linear: 43 ms for one step's 210 GEMMs at batch 1), need bf16
// activations emulated in software (_weight_int8pack_mm: 16 ms), or quantize the
// activations with one scale per call (fbgemm dynamic int8: 9.5 ms, but outlier
// channels of the down projection move the next-token distribution by ~2.7 nats, and
// a row's result depends on its batch companions). This kernel quantizes each row's
// activations per block of 32, so every output element is computed from its own row
// only, in a fixed order: results are bit-identical whatever else is in the batch.
//
// Layout: q4_1 weights are [N, K/2] bytes, byte j of a block holding element j in its
// low nibble and element j+16 in its high nibble; q8_0 weights are [N, K] int8.
// Scales dw, mw are fp32 [N, K/32]. K must be a multiple of 32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NPCD_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;

// Per-row, per-block int8 quantization of the activations, plus each block's sum.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t nb = K / kBlock;
  at::parallel_for(0, M * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + i * kBlock;  // rows are contiguous, so block i of the flat [M*nb] grid
      int8_t* dst = xq + i * kBlock;
#ifdef NPCD_AVX2
      const __m256 sign = _mm256_set1_ps(-0.0f);
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(src + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float a = _mm_cvtss_f32(m4);
      const float d = a / 127.0f;
      const float id = a > 0.0f ? 127.0f / a : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i q[4];
      for (int k = 0; k < 4; ++k)
        q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // sum of the 32 quantized values
      __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      s4 = _mm_hadd_epi32(s4, s4);
      s4 = _mm_hadd_epi32(s4, s4);
      // int32 -> int8 in element order (packs interleave 128-bit lanes; the permute undoes it)
      __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
      __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
      __m256i p = _mm256_packs_epi16(p01, p23);
      p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p);
      dx[i] = d;
      sx[i] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
#else
      float a = 0.0f;
      for (int j = 0; j < kBlock; ++j) a = std::fmax(a, std::fabs(src[j]));
      const float d = a / 127.0f;
      const float id = a > 0.0f ? 127.0f / a : 0.0f;
      int sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int v = static_cast<int>(std::nearbyint(src[j] * id));
        dst[j] = static_cast<int8_t>(v);
        sum += v;
      }
      dx[i] = d;
      sx[i] = d * static_cast<float>(sum);
#endif
    }
  });
}

#ifdef NPCD_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// <u8[32], s8[32]> as 8 int32 lanes -> float
inline __m256 dot_u8s8(__m256i u, __m256i s) {
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
#endif

// Output rows [o_begin, o_end) for every activation row, in tiles of kTile output rows:
// a tile's weights are unpacked once into `w8` (kTile*K bytes, L1-resident) and reused
// for all M activation rows; each activation block is loaded once per tile, and the
// kTile independent accumulators keep the FMA pipeline full.
constexpr int64_t kTile = 4;

template <bool kQ4>
void unpack_row(const uint8_t* wq, int64_t o, int64_t K, uint8_t* dst) {
  if constexpr (kQ4) {
    const uint8_t* row = wq + o * (K / 2);
    for (int64_t b = 0; b < K / kBlock; ++b) {
#ifdef NPCD_AVX2
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
      const __m128i low = _mm_set1_epi8(0x0F);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + b * kBlock), _mm_and_si128(v, low));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + b * kBlock + 16), _mm_and_si128(_mm_srli_epi16(v, 4), low));
#else
      for (int j = 0; j < 16; ++j) {
        dst[b * kBlock + j] = row[b * 16 + j] & 0x0F;
        dst[b * kBlock + j + 16] = row[b * 16 + j] >> 4;
      }
#endif
    }
  } else {
    std::memcpy(dst, wq + o * K, K);  // q8_0 rows are used as they are (signed bytes)
  }
}

// y[m, o0 .. o0+R) for activation rows m .. m+MR, from R unpacked weight rows `w8` (stride K).
// `scale` holds dw[o0+r, b] * dx[m+i, b] at [(i * R + r) * nb + b], so the inner loop only
// broadcast-loads it (no scalar multiply and shuffle per block).
template <bool kQ4, int R, int MR>
inline void tile(const uint8_t* w8, const float* scale, const float* mw, const int8_t* xq, const float* sx,
                 float* y, int64_t K, int64_t N) {
  const int64_t nb = K / kBlock;
  float total[MR][R];
#ifdef NPCD_AVX2
  __m256 acc[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + b * kBlock));
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w8 + r * K + b * kBlock));
      const __m256i wu = kQ4 ? wv : _mm256_sign_epi8(wv, wv);
      for (int i = 0; i < MR; ++i) {
        const __m256 p = dot_u8s8(wu, kQ4 ? xv[i] : _mm256_sign_epi8(xv[i], wv));
        acc[i][r] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + (i * R + r) * nb + b), p, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) total[i][r] = hsum(acc[i][r]);
#else
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) {
      total[i][r] = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t dot = 0;
        for (int j = 0; j < kBlock; ++j) {
          const uint8_t w = w8[r * K + b * kBlock + j];
          dot += (kQ4 ? static_cast<int32_t>(w) : static_cast<int32_t>(static_cast<int8_t>(w))) *
                 xq[i * K + b * kBlock + j];
        }
        total[i][r] += scale[(i * R + r) * nb + b] * static_cast<float>(dot);
      }
    }
#endif
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) {
      float extra = 0.0f;
      if constexpr (kQ4)
        for (int64_t b = 0; b < nb; ++b) extra += mw[r * nb + b] * sx[i * nb + b];
      y[i * N + r] = total[i][r] + extra;
    }
}

template <bool kQ4, int R, int MR>
inline void run_tile(const uint8_t* w8, const float* dw, const float* mw, const int8_t* xq, const float* dx,
                     const float* sx, float* y, int64_t K, int64_t N, float* scale) {
  const int64_t nb = K / kBlock;
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r)
      for (int64_t b = 0; b < nb; ++b) scale[(i * R + r) * nb + b] = dw[r * nb + b] * dx[i * nb + b];
  tile<kQ4, R, MR>(w8, scale, mw, xq, sx, y, K, N);
}

template <bool kQ4>
void gemm_rows(const uint8_t* wq, const float* dw, const float* mw, const int8_t* xq, const float* dx,
               const float* sx, float* y, int64_t M, int64_t N, int64_t K, int64_t o_begin, int64_t o_end) {
  const int64_t nb = K / kBlock;
  constexpr int kRows = 2;  // activation rows per tile
  std::vector<uint8_t> w8(kTile * K);
  std::vector<float> scale(kTile * kRows * nb);
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kTile) {
    const int64_t rows = std::min(kTile, o_end - o0);
    for (int64_t r = 0; r < rows; ++r) unpack_row<kQ4>(wq, o0 + r, K, w8.data() + r * K);
    const float* mwo = kQ4 ? mw + o0 * nb : nullptr;
    const float* dwo = dw + o0 * nb;
    int64_t m = 0;
    if (rows == kTile) {
      for (; m + kRows <= M; m += kRows)
        run_tile<kQ4, kTile, kRows>(w8.data(), dwo, mwo, xq + m * K, dx + m * nb, sx + m * nb, y + m * N + o0, K, N,
                                    scale.data());
      for (; m < M; ++m)
        run_tile<kQ4, kTile, 1>(w8.data(), dwo, mwo, xq + m * K, dx + m * nb, sx + m * nb, y + m * N + o0, K, N,
                                scale.data());
    } else {
      for (; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r)
          run_tile<kQ4, 1, 1>(w8.data() + r * K, dwo + r * nb, kQ4 ? mwo + r * nb : nullptr, xq + m * K,
                              dx + m * nb, sx + m * nb, y + m * N + o0 + r, K, N, scale.data());
    }
  }
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& dw,
                     const torch::Tensor& mw, int64_t N, bool q4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(dw.numel() == N * (K / kBlock), "dw must hold N*K/32 scales");
  TORCH_CHECK(wq.numel() == (q4 ? N * K / 2 : N * K), "wq has the wrong size for N=", N, ", K=", K);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto dx = torch::empty({M, K / kBlock}, x.options());
  auto sx = torch::empty({M, K / kBlock}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>());
  const auto* w = static_cast<const uint8_t*>(wq.data_ptr());
  const float* mptr = q4 ? mw.data_ptr<float>() : nullptr;
  // Grain: enough output rows per task that a thread streams a long run of weights.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (q4)
      gemm_rows<true>(w, dw.data_ptr<float>(), mptr, xq.data_ptr<int8_t>(), dx.data_ptr<float>(),
                      sx.data_ptr<float>(), y.data_ptr<float>(), M, N, K, begin, end);
    else
      gemm_rows<false>(w, dw.data_ptr<float>(), mptr, xq.data_ptr<int8_t>(), dx.data_ptr<float>(),
                       sx.data_ptr<float>(), y.data_ptr<float>(), M, N, K, begin, end);
  });
  return y;
}

bool has_simd() {
#ifdef NPCD_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace

void register_decode(pybind11::module& m);  // decode.cpp
void register_lora(pybind11::module& m);    // lora.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode(m);
  register_lora(m);
  m.def("linear", &linear, "block-quantized weight x per-block int8 activation linear");
  m.def("has_simd", &has_simd, "whether the AVX2 path was compiled in");
}
