// The AMX build of the block linear (Sapphire Rapids and later), included by blockq.cpp when the
// extension is compiled with -mamx-tile -mamx-int8 (NPCD_AMX). Same semantics as blockq.cpp's header.
//
// Semantics, per activation row m, output o, block b (k = 32 inputs):
//   dot[m, o, b] = sum_k x_q[m, b, k] * q[o, b, k]      (exact int32; one AMX tile product or 4-8 vpdpbusd)
//   y[m, o]      = sum_b in order: fma(dw[o,b] * dx[m,b], dot, .) then, q4_1, fma(mw[o,b], sx[m,b], .)
//
// Why a layout and a kernel of their own: one tile product multiplies a [16 rows x 64 bytes] int8 tile by a
// [16 x 64] one in ~16 cycles (measured on the 2-core Sapphire Rapids: 1.2 TMAC/s on one core, against
// ~0.1 for the VNNI path's useful work), but it sums over all of its K bytes, and each block of 32 has
// its own scales, so a tile product is taken per block (K = 32) and the scales are applied by AVX-512 on
// the int32 result. That epilogue runs with one lane per *output channel*: weights are stored per strip
// of 16 channels, per block, as the AMX B tile wants them (row r = 4 bytes r of each channel's block,
// `pack_strips`), and the per-block scales as [strip][block][16] vectors. AMX multiplies signed by
// unsigned or signed bytes, so neither side is offset and no per-block weight sums are stored: the bytes
// read per weight are the group build's.
//
// Small M: up to kVnniRows rows are multiplied by AVX-512 VNNI over the same strips (`strip_vnni`), which
// skips the tile's fixed costs; both end every block in `accumulate`, so the result does not depend on
// which kernel ran.
//
// Batch invariance: every (m, o) is the same scalar sequence over its blocks in order, whatever the tile
// row the activation row lands in, whichever kernel and whatever M, so a line's logits are bit-identical
// alone and batched.
//
// Tiles: 0, 1 hold C (int32, rows x 16 channels), 2, 3 A (activations, rows x 32 bytes), 4, 5 B (weights,
// 8 x 64 bytes); even blocks use 0/2/4 and odd blocks 1/3/5, so one block's tile product runs while the
// previous block's epilogue does.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

namespace amx {

constexpr int64_t kStrip = 16;      // output channels per strip: a B tile's columns, a zmm's lanes
constexpr int64_t kTileRows = 16;   // activation rows per tile product
constexpr int kVnniRows = 4;        // at most this many rows take the VNNI kernel instead (bench/kernels.py)

// Linux hands a process the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); without it the first tile instruction faults. Empty when granted.
inline const std::string& refusal() {
  static const std::string why = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0)
      return std::string("the OS refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM): ") +
             std::strerror(errno);
    return std::string();
  }();
  return why;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr TileConfig tile_config(int rows) {
  TileConfig c;
  for (int t = 0; t < 2; ++t) { c.rows[t] = static_cast<uint8_t>(rows); c.colsb[t] = 64; }      // C
  for (int t = 2; t < 4; ++t) { c.rows[t] = static_cast<uint8_t>(rows); c.colsb[t] = kBlock; }  // A
  for (int t = 4; t < 6; ++t) { c.rows[t] = 8; c.colsb[t] = 64; }                               // B
  return c;
}

template <int... R>
constexpr std::array<TileConfig, sizeof...(R)> tile_configs(std::integer_sequence<int, R...>) {
  return {tile_config(R + 1)...};
}

// The configurations for 1..16 rows, in read-only memory. A config built on the stack just before `ldtilecfg`
// can have its stores dropped by the optimizer (reported for llama.cpp's AMX path, whose next tile instruction
// then faults with SIGILL); the kernel is compiled on the user's machine with whatever compiler it has, so it
// does not count on that compiler keeping them.
inline constexpr auto kTileConfigs = tile_configs(std::make_integer_sequence<int, kTileRows>());

// Tile shapes for `rows` (1..16) activation rows per product; tile configuration is per thread.
inline void configure(int rows) { _tile_loadconfig(&kTileConfigs[rows - 1]); }

inline int64_t strips(int64_t N) { return (N + kStrip - 1) / kStrip; }

// Weights [N, K/2 or K] bytes (GGML layout) and scales [N, K/32] -> this build's layout: words
// [strip][block][word][16 channels] int32 (4 words of packed nibbles per q4_1 block, 8 of bytes per q8_0
// block), dw / mw as [strip][block][16]; channels past N are zero. The second tensor (the group build's
// weight sums) is empty.
inline std::vector<torch::Tensor> pack_strips(const torch::Tensor& wq, const torch::Tensor& dw,
                                              const torch::Tensor& mw, int64_t N, int64_t K, bool q4) {
  const int64_t nb = K / kBlock, S = strips(N), wpb = q4 ? 4 : 8;
  const auto f32 = wq.options().dtype(torch::kFloat32);
  auto words = torch::zeros({S * nb * wpb * kStrip}, wq.options().dtype(torch::kInt32));
  auto d = torch::zeros({S * nb * kStrip}, f32);
  auto m = q4 ? torch::zeros({S * nb * kStrip}, f32) : torch::empty({0}, f32);
  const auto* src = static_cast<const int32_t*>(wq.data_ptr());
  const float* dsrc = dw.data_ptr<float>();
  const float* msrc = q4 ? mw.data_ptr<float>() : nullptr;
  int32_t* wdst = words.data_ptr<int32_t>();
  float* ddst = d.data_ptr<float>();
  float* mdst = q4 ? m.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t s = o / kStrip, lane = o % kStrip;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t at = (s * nb + b) * kStrip + lane;
        for (int64_t w = 0; w < wpb; ++w) wdst[((s * nb + b) * wpb + w) * kStrip + lane] = src[(o * nb + b) * wpb + w];
        ddst[at] = dsrc[o * nb + b];
        if (q4) mdst[at] = msrc[o * nb + b];
      }
    }
  });
  return {words, torch::empty({0}, wq.options().dtype(torch::kInt32)), d, m};
}

// One block's int32 dots of ROWS rows (one vector of 16 channels each) into the rows' accumulators; the tile
// and the VNNI kernels both end each block here, so a row's result is the same whichever of them ran it.
template <bool kQ4, int ROWS>
inline void accumulate(__m512* acc, const __m512i* dot, const float* dwp, const float* mwp, const float* dx,
                       const float* sx, int64_t nb, int64_t b) {
  const __m512 dwv = _mm512_load_ps(dwp + b * kStrip);
  for (int i = 0; i < ROWS; ++i) {
    const __m512 scale = _mm512_mul_ps(dwv, _mm512_set1_ps(dx[i * nb + b]));
    acc[i] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot[i]), acc[i]);
    if constexpr (kQ4) acc[i] = _mm512_fmadd_ps(_mm512_load_ps(mwp + b * kStrip), _mm512_set1_ps(sx[i * nb + b]), acc[i]);
  }
}

// One strip of 16 output channels for ROWS activation rows (`x` [ROWS, K] int8, row stride `xstride`) by tile
// products, from the strip's B tiles `bt` ([block][8][64] bytes: q4_1's nibbles unpacked, q8_0's bytes as stored)
// and its scale vectors. q4_1 multiplies signed activations by unsigned nibbles (TDPBSUD), q8_0 signed by signed
// (TDPBSSD): the int32 dot needs no offset correction.
template <bool kQ4, int ROWS>
void strip_tiles(const int8_t* x, int64_t xstride, const float* dx, const float* sx, const uint8_t* bt,
                 const float* dwp, const float* mwp, int64_t nb, float* y, int64_t N, __mmask16 lanes) {
  constexpr int64_t kTileBytes = 8 * 64;
  alignas(64) int32_t c[2][kTileRows * kStrip];  // a padded tile stores all 16 rows; ROWS are read
  __m512 acc[ROWS];
  for (int i = 0; i < ROWS; ++i) acc[i] = _mm512_setzero_ps();
  const auto epilogue = [&](int64_t b, const int32_t* cb) {
    __m512i dot[ROWS];
    for (int i = 0; i < ROWS; ++i) dot[i] = _mm512_load_si512(cb + i * kStrip);
    accumulate<kQ4, ROWS>(acc, dot, dwp, mwp, dx, sx, nb, b);
  };
  // tile numbers are immediates: even blocks in tiles 0/2/4, odd ones in 1/3/5
#define NPCD_TILE_PRODUCT(C, A, B) \
  if constexpr (kQ4) _tile_dpbsud(C, A, B); else _tile_dpbssd(C, A, B)
  _tile_zero(0);
  _tile_loadd(2, x, xstride);
  _tile_loadd(4, bt, 64);
  NPCD_TILE_PRODUCT(0, 2, 4);
  for (int64_t b = 0; b < nb; b += 2) {
    if (b + 1 < nb) {
      _tile_zero(1);
      _tile_loadd(3, x + (b + 1) * kBlock, xstride);
      _tile_loadd(5, bt + (b + 1) * kTileBytes, 64);
      NPCD_TILE_PRODUCT(1, 3, 5);
    }
    _tile_stored(0, c[0], 64);
    if (b + 2 < nb) {
      _tile_zero(0);
      _tile_loadd(2, x + (b + 2) * kBlock, xstride);
      _tile_loadd(4, bt + (b + 2) * kTileBytes, 64);
      NPCD_TILE_PRODUCT(0, 2, 4);
    }
    epilogue(b, c[0]);
    if (b + 1 < nb) {
      _tile_stored(1, c[1], 64);
      epilogue(b + 1, c[1]);
    }
  }
#undef NPCD_TILE_PRODUCT
  for (int i = 0; i < ROWS; ++i) _mm512_mask_storeu_ps(y + i * N, lanes, acc[i]);
}

// The same strip for a few rows with AVX-512 VNNI, straight from the stored words: a tile product's fixed cost
// (configure, store, reload) outweighs its arithmetic at M = 1 (in cache, 3072x576: 168 us by tiles, 55 by
// VNNI), and the VNNI dot is the same exact int32, so the result is too. vpdpbusd takes unsigned by signed
// bytes: q4_1's nibbles are the unsigned side; q8_0's weights give their magnitude (abs(-128) reads as 128
// unsigned), and the activation takes their sign (activations are quantized to -127..127: no overflow).
template <bool kQ4, int ROWS>
void strip_vnni(const int8_t* x, int64_t xstride, const float* dx, const float* sx, const int32_t* sw,
                const float* dwp, const float* mwp, int64_t nb, float* y, int64_t N, __mmask16 lanes) {
  const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  __m512 acc[ROWS];
  for (int i = 0; i < ROWS; ++i) acc[i] = _mm512_setzero_ps();
  const auto xword = [&](int i, int64_t b, int64_t w) {  // 4 activation bytes, broadcast to every channel
    int32_t v;
    std::memcpy(&v, x + i * xstride + b * kBlock + 4 * w, sizeof v);
    return _mm512_set1_epi32(v);
  };
  for (int64_t b = 0; b < nb; ++b) {
    __m512i dot[ROWS];
    for (int i = 0; i < ROWS; ++i) dot[i] = zero;
    if constexpr (kQ4) {
      for (int64_t w = 0; w < 4; ++w) {
        const __m512i v = _mm512_load_si512(sw + (b * 4 + w) * kStrip);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int i = 0; i < ROWS; ++i) {
          dot[i] = _mm512_dpbusd_epi32(dot[i], lo, xword(i, b, w));
          dot[i] = _mm512_dpbusd_epi32(dot[i], hi, xword(i, b, 4 + w));
        }
      }
    } else {
      for (int64_t w = 0; w < 8; ++w) {
        const __m512i v = _mm512_load_si512(sw + (b * 8 + w) * kStrip);
        const __m512i magnitude = _mm512_abs_epi8(v);
        const __mmask64 negative = _mm512_movepi8_mask(v);
        for (int i = 0; i < ROWS; ++i) {
          const __m512i xv = xword(i, b, w);
          dot[i] = _mm512_dpbusd_epi32(dot[i], magnitude, _mm512_mask_sub_epi8(xv, negative, zero, xv));
        }
      }
    }
    accumulate<kQ4, ROWS>(acc, dot, dwp, mwp, dx, sx, nb, b);
  }
  for (int i = 0; i < ROWS; ++i) _mm512_mask_storeu_ps(y + i * N, lanes, acc[i]);
}

template <bool kQ4>
using TileFn = void (*)(const int8_t*, int64_t, const float*, const float*, const uint8_t*, const float*,
                        const float*, int64_t, float*, int64_t, __mmask16);
template <bool kQ4>
using VnniFn = void (*)(const int8_t*, int64_t, const float*, const float*, const int32_t*, const float*,
                        const float*, int64_t, float*, int64_t, __mmask16);

template <bool kQ4, int... R>
constexpr std::array<TileFn<kQ4>, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&strip_tiles<kQ4, R + 1>...};
}
template <bool kQ4, int... R>
constexpr std::array<VnniFn<kQ4>, sizeof...(R)> vnni_table(std::integer_sequence<int, R...>) {
  return {&strip_vnni<kQ4, R + 1>...};
}

// q4_1's packed nibbles of one strip -> its B tiles: rows 0-3 the low nibbles of words 0-3 (elements
// 0..15 of the block), rows 4-7 the high ones (elements 16..31), matching the activations' byte order.
inline void unpack_strip(const int32_t* words, int64_t nb, uint8_t* bt) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t w = 0; w < 4; ++w) {
      const __m512i v = _mm512_load_si512(words + (b * 4 + w) * kStrip);
      _mm512_store_si512(bt + b * 512 + w * 64, _mm512_and_si512(v, low));
      _mm512_store_si512(bt + b * 512 + (4 + w) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
}

// A thread's 64-byte aligned scratch of at least `bytes`, kept between calls.
inline uint8_t* scratch(std::vector<uint8_t>& buffer, size_t bytes) {
  if (buffer.size() < bytes + 64) buffer.resize(bytes + 64);
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
}

// y [M, N] from activations `x` [M, K] (int8, natural order) with their block scales dx and sums sx [M, K/32],
// and weights from `pack_strips`. Rows go 16 at a time through tile products; a last group of at most
// kVnniRows rows (all of them when M is that small) through the VNNI kernel, a larger one through a tile
// zero-padded to 16 rows.
template <bool kQ4>
void linear_strips(const int8_t* x, const float* dx, const float* sx, const int32_t* words, const float* dw,
                   const float* mw, float* y, int64_t M, int64_t N, int64_t K) {
  static constexpr auto tiles = tile_table<kQ4>(std::make_integer_sequence<int, kTileRows>());
  static constexpr auto vnni = vnni_table<kQ4>(std::make_integer_sequence<int, kVnniRows>());
  const int64_t nb = K / kBlock, S = strips(N), wpb = kQ4 ? 4 : 8;
  const int64_t full = M / kTileRows * kTileRows, rest = M - full;
  const bool tile_rest = rest > kVnniRows, uses_tiles = full || tile_rest;
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint8_t> unpacked_buffer, padded_buffer;
    if (uses_tiles) configure(static_cast<int>(full ? kTileRows : rest));
    uint8_t* unpacked = kQ4 && uses_tiles ? scratch(unpacked_buffer, nb * 512) : nullptr;
    const int8_t* rest_rows = x + full * K;
    if (full && tile_rest) {  // the rows past a multiple of 16, copied into a zero-padded 16-row tile
      auto* padded = reinterpret_cast<int8_t*>(scratch(padded_buffer, kTileRows * K));
      std::memcpy(padded, rest_rows, rest * K);
      std::memset(padded + rest * K, 0, (kTileRows - rest) * K);
      rest_rows = padded;
    }
    for (int64_t s = begin; s < end; ++s) {
      const int32_t* sw = words + s * nb * wpb * kStrip;
      const uint8_t* bt = reinterpret_cast<const uint8_t*>(sw);
      if (kQ4 && uses_tiles) {
        unpack_strip(sw, nb, unpacked);
        bt = unpacked;
      }
      const int64_t n0 = s * kStrip;
      const __mmask16 lanes = static_cast<__mmask16>(N - n0 >= kStrip ? 0xFFFF : (1u << (N - n0)) - 1);
      const float* dws = dw + s * nb * kStrip;
      const float* mws = kQ4 ? mw + s * nb * kStrip : nullptr;
      for (int64_t m0 = 0; m0 < full; m0 += kTileRows)
        tiles[kTileRows - 1](x + m0 * K, K, dx + m0 * nb, sx + m0 * nb, bt, dws, mws, nb, y + m0 * N + n0, N, lanes);
      if (tile_rest)
        tiles[rest - 1](rest_rows, K, dx + full * nb, sx + full * nb, bt, dws, mws, nb, y + full * N + n0, N, lanes);
      else if (rest)
        vnni[rest - 1](rest_rows, K, dx + full * nb, sx + full * nb, sw, dws, mws, nb, y + full * N + n0, N, lanes);
    }
    if (uses_tiles) _tile_release();
  });
}

}  // namespace amx
