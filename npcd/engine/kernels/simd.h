// Small vector helpers shared by the kernels' translation units.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

// The 8 lanes' sum in one fixed order (high half onto low, then pairs): callers rely on it being the
// same for every row, whatever the batch.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// hsum8 of 4 vectors at once, out[k] = hsum8(a[k]) bit for bit (the same pairs added in the same order,
// 4 reductions sharing their shuffles): [lo + hi], then lanes 0+2 and 1+3, then those two.
inline void hsum8x4(const __m256* a, float* out) {
  const __m256 p01 = _mm256_add_ps(_mm256_permute2f128_ps(a[0], a[1], 0x20), _mm256_permute2f128_ps(a[0], a[1], 0x31));
  const __m256 p23 = _mm256_add_ps(_mm256_permute2f128_ps(a[2], a[3], 0x20), _mm256_permute2f128_ps(a[2], a[3], 0x31));
  // [a0 s0+s2, a0 s1+s3, a2 .., a2 .. | a1 .., a1 .., a3 .., a3 ..]
  const __m256 q = _mm256_add_ps(_mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m128 lo = _mm256_castps256_ps128(q), hi = _mm256_extractf128_ps(q, 1);
  const __m128 sums = _mm_add_ps(_mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));  // [a0 a2 a1 a3]
  _mm_storeu_ps(out, _mm_shuffle_ps(sums, sums, _MM_SHUFFLE(3, 1, 2, 0)));
}

// e^x on 8 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes' coefficients),
// times 2^n from the exponent bits; 0 below -87.3, x clamped to 88 above (e^88 ~ 1.7e38). Within 2 ulp
// of std::exp, and each lane depends on its own input only.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}
#endif
