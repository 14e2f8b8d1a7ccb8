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
// Scales dw, mw are fp32 [N, K/32]. K must be a multiple of 32. `pack` turns them into
// the layout this build's kernel reads, once, at load.
//
// Three builds, picked by the ISA flags the extension is compiled with (blockq_amx.h holds the AMX one):
//  * AVX2 (+FMA): rows are stored in groups of 8 blocks with 4-byte words transposed (word w of block l
//    at [w][l]), so one maddubs multiplies 4 bytes of 8 *different* blocks and each lane ends a group
//    holding one block's dot product; the widening, conversion and scaling are then once per 8 blocks
//    (q4_1's partial sums stay 16-bit through a group: they cannot overflow). Per 32 weights and
//    activation row that is ~2.5 vector operations for q4_1 (maddubs and a 16-bit add per 16 weights,
//    the nibble unpacking shared by 2 rows) and ~4 for q8_0; the GGML layout's one block per vector
//    needed ~5 plus two scalar ones (measured on the AVX2 EPYC: docs/performance.md).
//  * AVX-512 VNNI (Zen 4, Sapphire Rapids): the same transposition over groups of 16 blocks, so one
//    vpdpbusd adds 4 bytes of 16 blocks: ~0.8 vector operations per 32 weights and row. q8_0 weights
//    are signed, so the activations are stored offset by 128 as unsigned bytes and 128 * sum(w) per
//    block (from `pack`) is subtracted.
//  * AMX (Sapphire Rapids): tile products over strips of 16 output channels.
// All are batch-invariant: a row's result is computed from that row alone in one
// fixed order, whatever M is. They round differently from each other (the order of
// the float sums differs), which is why the build is fixed per machine.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

#include "layer_ops.h"
#include "simd.h"

#if !defined(__AVX2__) || !defined(__FMA__)
#error "npcd's block kernel needs AVX2 and FMA: every build passes -mavx2 -mfma"
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define NPCD_VNNI 1
#endif
#if defined(NPCD_VNNI) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define NPCD_AMX 1          // blockq_amx.h: AMX tile products over 16-channel strips
#else
#define NPCD_GROUPS 1       // the group layout: 16-block groups (VNNI kernel) or 8-block groups (AVX2 kernel)
#endif
#if defined(NPCD_GROUPS) && defined(NPCD_VNNI)
#define NPCD_VNNI_GROUPS 1
#endif

constexpr int64_t kBlock = 32;  // inputs per scale, in every build

#ifdef NPCD_AMX
#include "blockq_amx.h"
#endif

namespace {

// The group layout's blocks per group, one int32 lane each: a 512-bit vector's 16 lanes (VNNI), a 256-bit
// vector's 8 (AVX2).
#ifdef NPCD_VNNI_GROUPS
constexpr int64_t kGroup = 16;
#else
constexpr int64_t kGroup = 8;
#endif
// Output rows per tile: their weight vectors are loaded once per activation row block.
constexpr int64_t kTile = 4;

// The group layout: the position, in 4-byte words from the row's start, of word w of block b in a
// row of nb blocks of wpb words each (8 for int8 bytes, 4 for q4_1's packed nibbles). A row's
// last group may hold fewer than kGroup blocks; it is stored compact ([w][l] with n < kGroup lanes).
inline int64_t group_word(int64_t b, int64_t w, int64_t nb, int64_t wpb) {
  const int64_t g0 = b - b % kGroup, n = std::min(kGroup, nb - g0);
  return g0 * wpb + w * n + b % kGroup;
}

// Per-row, per-block int8 quantization of the activations, plus each block's sum, offset by 128
// (unsigned bytes) when `offset`. The group builds store the bytes in their group layout.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx, bool offset) {
  const int64_t nb = K / kBlock;
  at::parallel_for(0, M * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + i * kBlock;  // rows are contiguous, so block i of the flat [M*nb] grid
#ifdef NPCD_GROUPS
      alignas(32) int8_t staged[kBlock];
      int8_t* dst = staged;
#else
      int8_t* dst = xq + i * kBlock;
#endif
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
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                          offset ? _mm256_xor_si256(p, _mm256_set1_epi8(static_cast<char>(0x80))) : p);
      dx[i] = d;
      sx[i] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
#ifdef NPCD_GROUPS
      int32_t* row = reinterpret_cast<int32_t*>(xq + (i / nb) * K);
      const int32_t* words = reinterpret_cast<const int32_t*>(staged);
      for (int64_t w = 0; w < kBlock / 4; ++w) row[group_word(i % nb, w, nb, kBlock / 4)] = words[w];
#endif
    }
  });
}

#if defined(NPCD_GROUPS) && !defined(NPCD_VNNI_GROUPS)
// AVX2 group kernel. A group is 8 blocks, one per int32 lane; word c of each of them (4 bytes) lies in
// one vector, so a maddubs over it leaves block l's two partial sums in 16-bit lanes 2l and 2l+1.
// q4_1: the nibbles are unsigned (0..15) and the activations signed (|x| <= 127), so each 16-bit lane
// of one maddubs holds at most 2 * 15 * 127 = 3,810 and the 8 of a group (4 packed words, low and high
// nibbles) sum to at most 30,480 < 2^15: they are added as 16-bit lanes and widened once per group.
// q8_0: both sides are signed, so the weights' signs move onto the activations (|w| * sign(x, w), at
// most 2 * 127 * 127 per 16-bit lane) and each maddubs is widened at once.
// The float work (widen, convert, scale, minimum term) is then once per 8 blocks instead of once per
// block, and the nibbles of a weight vector are unpacked once for MR activation rows.

// x and the words of one packed q4_1 vector (low nibbles: activation word c, high: word c + 4).
inline __m256i q4_dot16(__m256i v, __m256i xl, __m256i xh, __m256i dot) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi16(dot, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
}

inline __m256i q8_dot32(__m256i w, __m256i x, __m256i dot) {
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(dot, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

// The mask of a vector's first n int32 lanes.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The last group of a row when it holds n < 8 blocks (K = 576: 2), stored compact: its words are read
// as contiguous vectors, lane k of vector z holding word (8 z + k) / n of block (8 z + k) mod n, and each
// lane is scaled by its own block's dw * dx (a permuted load): the same sum, in n blocks' worth of work.
template <bool kQ4, int R, int MR>
inline void tail_avx2(const uint8_t* w, int64_t wstride, const float* dw, const float* mw, const uint8_t* xq,
                      const float* dx, const float* sx, int64_t K, int64_t g0, const int32_t* tail_blocks,
                      __m256 (&acc)[MR][R]) {
  const int64_t nb = K / kBlock, n = nb - g0;
  const __m256i nmask = first_lanes(n);
  const int64_t words = n * (kQ4 ? 4 : 8);  // weight words in the tail (q4_1: packed)
  const uint8_t* xg = xq + g0 * kBlock;
  const uint8_t* wg = w + g0 * (kQ4 ? kBlock / 2 : kBlock);
  for (int64_t z = 0; z * 8 < words; ++z) {
    // a whole vector of words is read with plain loads (K = 576's 2-block q4_1 tail is exactly one), the
    // activations once per row rather than once per (row, output)
    const bool whole = words - z * 8 >= 8;
    const __m256i mz = first_lanes(std::min<int64_t>(8, words - z * 8));
    auto load = [&](const void* p) {
      return whole ? _mm256_loadu_si256(static_cast<const __m256i*>(p))
                   : _mm256_maskload_epi32(static_cast<const int*>(p), mz);
    };
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail_blocks + 8 * z));  // (8 z + k) mod n
    __m256 dxp[MR];
    __m256i xl[MR], xh[MR];
    for (int i = 0; i < MR; ++i) {
      dxp[i] = _mm256_permutevar8x32_ps(_mm256_maskload_ps(dx + i * nb + g0, nmask), idx);
      xl[i] = load(xg + i * K + z * 32);
      if constexpr (kQ4) xh[i] = load(xg + i * K + words * 4 + z * 32);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 dwp = _mm256_permutevar8x32_ps(_mm256_maskload_ps(dw + r * nb + g0, nmask), idx);
      const __m256i v = load(wg + r * wstride + z * 32);
      for (int i = 0; i < MR; ++i) {
        __m256i dot;
        if constexpr (kQ4)
          dot = _mm256_madd_epi16(q4_dot16(v, xl[i], xh[i], _mm256_setzero_si256()), _mm256_set1_epi16(1));
        else
          dot = q8_dot32(v, xl[i], _mm256_setzero_si256());
        acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(dwp, dxp[i]), _mm256_cvtepi32_ps(dot), acc[i][r]);
      }
    }
  }
  if constexpr (kQ4)  // the minimum term, once per block (n lanes)
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < R; ++r)
        acc[i][r] = _mm256_fmadd_ps(_mm256_maskload_ps(mw + r * nb + g0, nmask),
                                    _mm256_maskload_ps(sx + i * nb + g0, nmask), acc[i][r]);
}

// y[m .. m+MR, o0 .. o0+R) from R packed weight rows (stride `wstride` bytes) in the 8-block group layout.
template <bool kQ4, int R, int MR>
inline void tile_avx2(const uint8_t* w, int64_t wstride, const float* dw, const float* mw, const uint8_t* xq,
                      const float* dx, const float* sx, float* y, int64_t K, int64_t N, const int32_t* tail_blocks) {
  const int64_t nb = K / kBlock, full = nb - nb % kGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  // The empty asm after each update of a 16-bit sum pins the order of the adds. Integer adds reassociate, and
  // GCC 12 used that to compute all of a group's maddubs first and add them up afterwards, spilling every
  // product to the stack and reading it back. With the pins, the 210 projections of one step on the Zen 3
  // EPYC (2 threads, best of 12 interleaved runs, bench/projections.py's shapes): M=8 15.2 -> 12.8 ms, M=32
  // 41.8 -> 34.3 ms, M=128 197 -> 137 ms; the results are the same bits (integer sums are exact).
  for (int64_t g0 = 0; g0 < full; g0 += kGroup) {
    __m256i dot[MR][R];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < R; ++r) dot[i][r] = _mm256_setzero_si256();
    const uint8_t* xg = xq + g0 * kBlock;
    if constexpr (kQ4) {
      const uint8_t* wg = w + g0 * (kBlock / 2);
      for (int64_t c = 0; c < 4; ++c) {
        __m256i xl[MR], xh[MR];
        for (int i = 0; i < MR; ++i) {
          xl[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + i * K + c * 32));
          xh[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + i * K + (c + 4) * 32));
        }
        for (int r = 0; r < R; ++r) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + r * wstride + c * 32));
          for (int i = 0; i < MR; ++i) {
            dot[i][r] = q4_dot16(v, xl[i], xh[i], dot[i][r]);
            asm("" : "+x"(dot[i][r]));
          }
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int r = 0; r < R; ++r) dot[i][r] = _mm256_madd_epi16(dot[i][r], ones);
    } else {
      const uint8_t* wg = w + g0 * kBlock;
      for (int64_t c = 0; c < 8; ++c) {
        __m256i xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + i * K + c * 32));
        for (int r = 0; r < R; ++r) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + r * wstride + c * 32));
          for (int i = 0; i < MR; ++i) {
            dot[i][r] = q8_dot32(v, xv[i], dot[i][r]);
            asm("" : "+x"(dot[i][r]));
          }
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 dxv = _mm256_loadu_ps(dx + i * nb + g0);
      for (int r = 0; r < R; ++r) {
        const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(dw + r * nb + g0), dxv);
        acc[i][r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dot[i][r]), acc[i][r]);
        if constexpr (kQ4)
          acc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(mw + r * nb + g0), _mm256_loadu_ps(sx + i * nb + g0), acc[i][r]);
      }
    }
  }
  if (full < nb) tail_avx2<kQ4, R, MR>(w, wstride, dw, mw, xq, dx, sx, K, full, tail_blocks, acc);
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) y[i * N + r] = hsum8(acc[i][r]);
}

constexpr int64_t kAheadTiles = 2;

template <bool kQ4>
void gemm_rows_avx2(const uint8_t* wq, const float* dw, const float* mw, const uint8_t* xq, const float* dx,
                    const float* sx, float* y, int64_t M, int64_t N, int64_t K, int64_t o_begin, int64_t o_end) {
  const int64_t nb = K / kBlock, wstride = kQ4 ? K / 2 : K;
  constexpr int kRows = 2;  // activation rows per tile: 8 accumulators, 8 dot registers, 4 activation vectors
  // the last short group's lane -> block table ([vector z][lane k] = (8 z + k) mod n): at most 7 blocks of
  // 8 words, 7 vectors
  const int64_t tail = nb % kGroup;
  alignas(32) int32_t tail_blocks[8 * 8];
  for (int64_t k = 0; tail && k < 8 * 8; ++k) tail_blocks[k] = static_cast<int32_t>(k % tail);
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kTile) {
    const int64_t rows = std::min(kTile, o_end - o0);
    const uint8_t* w = wq + o0 * wstride;
    const float* dwo = dw + o0 * nb;
    const float* mwo = kQ4 ? mw + o0 * nb : nullptr;
    // A tile reads its kTile rows interleaved, 32 bytes of each in turn, which the hardware prefetcher does
    // not follow as one stream: fetch the tile kAheadTiles on, whose rows are contiguous, while this one runs.
    if (o0 + (kAheadTiles + 1) * kTile <= o_end) {
      const char* ahead = reinterpret_cast<const char*>(wq + (o0 + kAheadTiles * kTile) * wstride);
      for (int64_t line = 0; line < kTile * wstride; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    }
    if (rows == kTile) {
      int64_t m = 0;
      for (; m + kRows <= M; m += kRows)
        tile_avx2<kQ4, kTile, kRows>(w, wstride, dwo, mwo, xq + m * K, dx + m * nb, sx + m * nb, y + m * N + o0, K, N,
                                     tail_blocks);
      for (; m < M; ++m)
        tile_avx2<kQ4, kTile, 1>(w, wstride, dwo, mwo, xq + m * K, dx + m * nb, sx + m * nb, y + m * N + o0, K, N,
                                 tail_blocks);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < M; ++m)
          tile_avx2<kQ4, 1, 1>(w + r * wstride, wstride, dwo + r * nb, kQ4 ? mwo + r * nb : nullptr, xq + m * K,
                               dx + m * nb, sx + m * nb, y + m * N + o0 + r, K, N, tail_blocks);
    }
  }
}
#endif

#ifdef NPCD_VNNI_GROUPS
// The last group of a row when it holds n < 16 blocks (K = 576: 2 blocks). Its words are read as
// contiguous vectors instead of one column per vector, so the 2 blocks cost 2 vpdpbusd, not 16:
// lane k of vector z holds word (column c, block l) with c * n + l = 16 z + k, the lanes are not
// summed per block first, and each lane is scaled by its own block's dw * dx (a permuted load),
// which is the same sum: sum_b s_b * sum_c dot(c, b) = sum_lanes s_(lane's block) * dot(lane).
template <bool kQ4, int R, int MR>
__attribute__((always_inline)) inline void tail_vnni(const uint8_t* w, int64_t wstride, const float* dw, const float* mw, const int32_t* wsum,
                      const uint8_t* xq, const float* dx, const float* sx, int64_t K, int64_t g0,
                      const int32_t* tail_blocks,
                      __m512 (&acc)[MR][R]) {
  const int64_t nb = K / kBlock, n = nb - g0;
  const __mmask16 nmask = static_cast<__mmask16>((1u << n) - 1);
  const int64_t words = n * (kQ4 ? 4 : 8);  // weight words in the tail (q4_1: packed; both halves of x per word)
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* xg = xq + g0 * kBlock;
  const uint8_t* wg = w + g0 * (kQ4 ? kBlock / 2 : kBlock);
  for (int64_t z = 0; z * 16 < words; ++z) {
    const int64_t left = std::min<int64_t>(16, words - z * 16);
    const __mmask16 mz = static_cast<__mmask16>((1u << left) - 1);
    const __m512i idx = _mm512_loadu_si512(tail_blocks + 16 * z);  // lane k's block: (16 z + k) mod n
    __m512 dxp[MR];
    for (int i = 0; i < MR; ++i) dxp[i] = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(nmask, dx + i * nb + g0));
    for (int r = 0; r < R; ++r) {
      const __m512 dwp = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(nmask, dw + r * nb + g0));
      const __m512i v = _mm512_maskz_loadu_epi32(mz, wg + r * wstride + z * 64);
      for (int i = 0; i < MR; ++i) {
        __m512i dot;
        if constexpr (kQ4) {
          const __m512i xl = _mm512_maskz_loadu_epi32(mz, xg + i * K + z * 64);
          const __m512i xh = _mm512_maskz_loadu_epi32(mz, xg + i * K + words * 4 + z * 64);
          dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low), xl);
          dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xh);
        } else {
          dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_loadu_epi32(mz, xg + i * K + z * 64), v);
        }
        acc[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(dwp, dxp[i]), _mm512_cvtepi32_ps(dot), acc[i][r]);
      }
    }
  }
  // per block, once: q4_1's minimum term, q8_0's offset correction (n lanes)
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < R; ++r) {
      if constexpr (kQ4) {
        acc[i][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(nmask, mw + r * nb + g0),
                                    _mm512_maskz_loadu_ps(nmask, sx + i * nb + g0), acc[i][r]);
      } else {
        const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(nmask, dw + r * nb + g0),
                                       _mm512_maskz_loadu_ps(nmask, dx + i * nb + g0));
        acc[i][r] = _mm512_fnmadd_ps(s, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(nmask, wsum + r * nb + g0)),
                                     acc[i][r]);
      }
    }
  }
}

// y[m .. m+MR, o0 .. o0+R) from R packed weight rows (stride `wstride` bytes) in the group layout.
// Per group: the int32 dot of each (row, output, block) is complete in its lane after the
// group's 8 words, then converted and scaled once: acc += dw*dx * dot (+ mw * sx for q4_1).
template <bool kQ4, int R, int MR>
__attribute__((always_inline)) inline void tile_vnni(const uint8_t* w, int64_t wstride, const float* dw, const float* mw, const int32_t* wsum,
                      const uint8_t* xq, const float* dx, const float* sx, float* y, int64_t K, int64_t N,
                      const int32_t* tail_blocks) {
  const int64_t nb = K / kBlock;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const int64_t full = nb - nb % kGroup;
  for (int64_t g0 = 0; g0 < full; g0 += kGroup) {
    constexpr int64_t n = kGroup;
    constexpr __mmask16 mask = 0xFFFF;
    __m512i dot[MR][R];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < R; ++r) dot[i][r] = _mm512_setzero_si512();
    const uint8_t* xg = xq + g0 * kBlock;
    if constexpr (kQ4) {
      const uint8_t* wg = w + g0 * (kBlock / 2);
      for (int64_t c = 0; c < 4; ++c) {  // packed word c: elements of word c (low nibbles) and c + 4 (high)
        __m512i lo[R], hi[R];
        for (int r = 0; r < R; ++r) {
          const __m512i v = _mm512_maskz_loadu_epi32(mask, wg + r * wstride + c * n * 4);
          lo[r] = _mm512_and_si512(v, low);
          hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int i = 0; i < MR; ++i) {
          const __m512i xl = _mm512_maskz_loadu_epi32(mask, xg + i * K + c * n * 4);
          const __m512i xh = _mm512_maskz_loadu_epi32(mask, xg + i * K + (c + 4) * n * 4);
          for (int r = 0; r < R; ++r)
            dot[i][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[i][r], lo[r], xl), hi[r], xh);
        }
      }
    } else {
      const uint8_t* wg = w + g0 * kBlock;
      for (int64_t c = 0; c < 8; ++c) {
        __m512i wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi32(mask, wg + r * wstride + c * n * 4);
        for (int i = 0; i < MR; ++i) {
          const __m512i xu = _mm512_maskz_loadu_epi32(mask, xg + i * K + c * n * 4);
          for (int r = 0; r < R; ++r) dot[i][r] = _mm512_dpbusd_epi32(dot[i][r], xu, wv[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i offset = _mm512_maskz_loadu_epi32(mask, wsum + r * nb + g0);
        for (int i = 0; i < MR; ++i) dot[i][r] = _mm512_sub_epi32(dot[i][r], offset);
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 dxv = _mm512_maskz_loadu_ps(mask, dx + i * nb + g0);
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, dw + r * nb + g0), dxv);
        acc[i][r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot[i][r]), acc[i][r]);
        if constexpr (kQ4)
          acc[i][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, mw + r * nb + g0),
                                      _mm512_maskz_loadu_ps(mask, sx + i * nb + g0), acc[i][r]);
      }
    }
  }
  if (full < nb) tail_vnni<kQ4, R, MR>(w, wstride, dw, mw, wsum, xq, dx, sx, K, full, tail_blocks, acc);
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < R; ++r) y[i * N + r] = _mm512_reduce_add_ps(acc[i][r]);
}

template <bool kQ4>
void gemm_rows_vnni(const uint8_t* wq, const float* dw, const float* mw, const int32_t* wsum, const uint8_t* xq,
                    const float* dx, const float* sx, float* y, int64_t M, int64_t N, int64_t K, int64_t o_begin,
                    int64_t o_end) {
  const int64_t nb = K / kBlock, wstride = kQ4 ? K / 2 : K;
  constexpr int kRows = 4;  // activation rows per tile: 16 int32 accumulators, 8 unpacked weight vectors
  // the last short group's lane -> block table ([vector z][lane k] = (16 z + k) mod n), once per call:
  // at most 15 blocks of 8 words, 8 vectors
  const int64_t tail = nb % kGroup;
  alignas(64) int32_t tail_blocks[8 * 16];
  for (int64_t k = 0; tail && k < 8 * 16; ++k) tail_blocks[k] = static_cast<int32_t>(k % tail);
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kTile) {
    const int64_t rows = std::min(kTile, o_end - o0);
    const uint8_t* w = wq + o0 * wstride;
    const float* dwo = dw + o0 * nb;
    const float* mwo = kQ4 ? mw + o0 * nb : nullptr;
    const int32_t* wso = kQ4 ? nullptr : wsum + o0 * nb;
    if (rows == kTile) {
      int64_t m = 0;
      for (; m + kRows <= M; m += kRows)
        tile_vnni<kQ4, kTile, kRows>(w, wstride, dwo, mwo, wso, xq + m * K, dx + m * nb, sx + m * nb,
                                     y + m * N + o0, K, N, tail_blocks);
      for (; m + 2 <= M; m += 2)
        tile_vnni<kQ4, kTile, 2>(w, wstride, dwo, mwo, wso, xq + m * K, dx + m * nb, sx + m * nb, y + m * N + o0,
                                 K, N, tail_blocks);
      for (; m < M; ++m)
        tile_vnni<kQ4, kTile, 1>(w, wstride, dwo, mwo, wso, xq + m * K, dx + m * nb, sx + m * nb, y + m * N + o0,
                                 K, N, tail_blocks);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < M; ++m)
          tile_vnni<kQ4, 1, 1>(w + r * wstride, wstride, dwo + r * nb, kQ4 ? mwo + r * nb : nullptr,
                               kQ4 ? nullptr : wso + r * nb, xq + m * K, dx + m * nb, sx + m * nb,
                               y + m * N + o0 + r, K, N, tail_blocks);
    }
  }
}
#endif

// The weights in the layout this build's `linear` reads: [words, sums, dw, mw]. The group builds reorder
// the words (8-block groups on AVX2, 16 on VNNI) and keep the scales as they are; the VNNI build adds
// 128 * sum(q) per block for q8_0; the AMX build stores strips of 16 channels with their scales
// (blockq_amx.h).
std::vector<torch::Tensor> pack(const torch::Tensor& wq, const torch::Tensor& dw, const torch::Tensor& mw, int64_t N,
                                int64_t K, bool q4) {
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(wq.is_contiguous() && wq.numel() == (q4 ? N * K / 2 : N * K), "wq has the wrong size for N=", N,
              ", K=", K);
  TORCH_CHECK(dw.is_contiguous() && dw.scalar_type() == torch::kFloat32 && dw.numel() == N * (K / kBlock),
              "dw must be N*K/32 contiguous fp32 scales");
  TORCH_CHECK(!q4 || (mw.is_contiguous() && mw.scalar_type() == torch::kFloat32 && mw.numel() == N * (K / kBlock)),
              "mw must be N*K/32 contiguous fp32 minimums for q4_1");
#if defined(NPCD_AMX)
  return amx::pack_strips(wq, dw, mw, N, K, q4);
#elif defined(NPCD_GROUPS)
  auto sums = torch::empty({0}, wq.options().dtype(torch::kInt32));
  const int64_t nb = K / kBlock, wpb = q4 ? 4 : 8, row_words = nb * wpb;
  auto packed = torch::empty_like(wq);
  const auto* src = static_cast<const int32_t*>(wq.data_ptr());
  auto* dst = static_cast<int32_t*>(packed.data_ptr());
#ifdef NPCD_VNNI_GROUPS
  const bool offset = !q4;  // the VNNI build's q8_0 activations are offset by 128: subtract 128 * sum(q)
#else
  const bool offset = false;
#endif
  if (offset) sums = torch::empty({N, nb}, wq.options().dtype(torch::kInt32));
  const auto* bytes = static_cast<const int8_t*>(wq.data_ptr());
  int32_t* sp = offset ? sums.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t w = 0; w < wpb; ++w) dst[o * row_words + group_word(b, w, nb, wpb)] = src[o * row_words + b * wpb + w];
        if (offset) {
          int32_t total = 0;
          for (int64_t j = 0; j < kBlock; ++j) total += bytes[o * K + b * kBlock + j];
          sp[o * nb + b] = 128 * total;
        }
      }
    }
  });
  return {packed, sums, dw, mw};
#endif
}

// x [M, K] fp32 times the weights `pack` returned: words, sums, scales dw and (q4_1) minimums mw.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& wsum,
                     const torch::Tensor& dw, const torch::Tensor& mw, int64_t N, bool q4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock;
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
#ifdef NPCD_AMX
  const int64_t padded = amx::strips(N) * amx::kStrip * nb;  // scale vectors per strip and block
  TORCH_CHECK(wq.nbytes() == padded * (q4 ? 16 : 32), "wq is not this build's packed layout for N=", N, ", K=", K,
              " (pack it with pack())");
  TORCH_CHECK(dw.numel() == padded && (!q4 || mw.numel() == padded),
              "dw and mw must be the scales pack() returned for N=", N, ", K=", K);
  TORCH_CHECK(amx::refusal().empty(), amx::refusal());
  const bool offset = false;  // the tile and VNNI products take the activations signed
#else
  TORCH_CHECK(dw.numel() == N * nb, "dw must hold N*K/32 scales");
  TORCH_CHECK(wq.numel() == (q4 ? N * K / 2 : N * K), "wq has the wrong size for N=", N, ", K=", K);
#ifdef NPCD_VNNI_GROUPS
  TORCH_CHECK(q4 || wsum.numel() == N * nb, "wsum must hold N*K/32 block sums (from pack)");
  const bool offset = !q4;
#else
  const bool offset = false;
#endif
#endif
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto dx = torch::empty({M, nb}, x.options());
  auto sx = torch::empty({M, nb}, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), offset);
  const float* mptr = q4 ? mw.data_ptr<float>() : nullptr;
#ifdef NPCD_AMX
  const auto* words = static_cast<const int32_t*>(wq.data_ptr());
  if (q4)
    amx::linear_strips<true>(xq.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), words,
                             dw.data_ptr<float>(), mptr, y.data_ptr<float>(), M, N, K);
  else
    amx::linear_strips<false>(xq.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(), words,
                              dw.data_ptr<float>(), mptr, y.data_ptr<float>(), M, N, K);
#else
  const auto* w = static_cast<const uint8_t*>(wq.data_ptr());
  // Grain: enough output rows per task that a thread streams a long run of weights.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const auto* xu = reinterpret_cast<const uint8_t*>(xq.data_ptr<int8_t>());
#ifdef NPCD_VNNI_GROUPS
    const int32_t* sums = q4 ? nullptr : wsum.data_ptr<int32_t>();
    if (q4)
      gemm_rows_vnni<true>(w, dw.data_ptr<float>(), mptr, sums, xu, dx.data_ptr<float>(), sx.data_ptr<float>(),
                           y.data_ptr<float>(), M, N, K, begin, end);
    else
      gemm_rows_vnni<false>(w, dw.data_ptr<float>(), mptr, sums, xu, dx.data_ptr<float>(), sx.data_ptr<float>(),
                            y.data_ptr<float>(), M, N, K, begin, end);
#else
    (void)wsum;
    if (q4)
      gemm_rows_avx2<true>(w, dw.data_ptr<float>(), mptr, xu, dx.data_ptr<float>(), sx.data_ptr<float>(),
                           y.data_ptr<float>(), M, N, K, begin, end);
    else
      gemm_rows_avx2<false>(w, dw.data_ptr<float>(), mptr, xu, dx.data_ptr<float>(), sx.data_ptr<float>(),
                            y.data_ptr<float>(), M, N, K, begin, end);
#endif
  });
#endif
  return y;
}

// Why this build cannot run here ("" when it can): the AMX build needs the OS to grant the tile state.
std::string refusal() {
#ifdef NPCD_AMX
  return amx::refusal();
#else
  return "";
#endif
}

// Which arithmetic this build runs, for the startup log.
std::string path() {
#if defined(NPCD_AMX)
  return "amx-int8 tiles, 16-channel strips";
#elif defined(NPCD_VNNI)
  return "avx512-vnni, 16-block groups";
#else
  return "avx2 maddubs, 8-block groups";
#endif
}

}  // namespace

torch::Tensor npcd::block_linear(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& wsum,
                                 const torch::Tensor& dw, const torch::Tensor& mw, int64_t N, bool q4) {
  return linear(x, wq, wsum, dw, mw, N, q4);
}

void register_decode(pybind11::module& m);  // decode.cpp
void register_lora(pybind11::module& m);    // lora.cpp
void register_layers(pybind11::module& m);  // layers.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode(m);
  register_lora(m);
  register_layers(m);
  m.def("linear", &linear, "block-quantized weight x per-block int8 activation linear");
  m.def("pack", &pack, "the block weights in the layout this build's linear reads");
  m.def("path", &path, "which arithmetic this build runs");
  m.def("refusal", &refusal, "why this build cannot run on this machine; empty when it can");
}
