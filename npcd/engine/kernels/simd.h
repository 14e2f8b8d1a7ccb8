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
#endif
