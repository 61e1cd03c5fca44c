/* llmc CPU kernels: the float vector both sources compute with, and its few operations. */
#ifndef LLMC_SIMD_H
#define LLMC_SIMD_H
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* one vector register of floats: 16 with AVX-512, else 8 (AVX2: a wider generic vector would be split
 * into halves that the widening has to pass through memory) */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));   /* unaligned access */

/* a * b + c rounded once. The library is built with -ffp-contract=off, so the compiler never fuses a
 * multiply and an add on its own (it did so in some tiles and not in others); every fusion is
 * written here, the same in every tile */
static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
/* s in every lane (a lane loop compiles to a chain of inserts) */
static inline vf vbroadcast(float s) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(s);
#elif defined(__AVX2__)
    return (vf)_mm256_set1_ps(s);
#else
    return s - (vf){0};
#endif
}

/* the lanes' maxima (exact: for finite values the same in any order) */
static inline vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
    return (vf)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX2__)
    return (vf)_mm256_max_ps((__m256)a, (__m256)b);
#else
    for (int i = 0; i < VL; i++) a[i] = b[i] > a[i] ? b[i] : a[i];
    return a;
#endif
}
static inline float hsum(vf v) { float s = 0.0f; for (int i = 0; i < VL; i++) s += v[i]; return s; }
static inline vf vzero(void) { vf z; for (int i = 0; i < VL; i++) z[i] = 0.0f; return z; }

/* the lanes of v summed pairwise (a shorter dependency chain than hsum's running sum) */
static inline float hsum_pairs(vf v) {
    for (int w = VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) v[i] += v[i + w];
    return v[0];
}

/* e^x for x <= 0 (softmax): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
 * (relative error under 2e-7 on that range), times 2^n put into the exponent; below -87 it is 0 */
static inline vf vexp(vf x) {
    vf r, p;
    vf n;
#if defined(__AVX2__) && !defined(__AVX512F__)
    n = (vf)_mm256_round_ps((__m256)(x * 1.44269504f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    for (int i = 0; i < VL; i++) n[i] = __builtin_roundf(x[i] * 1.44269504f);
#endif
    r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    p = vbroadcast(1.0f / 720.0f);
    p = vfma(p, r, vbroadcast(1.0f / 120.0f));
    p = vfma(p, r, vbroadcast(1.0f / 24.0f));
    p = vfma(p, r, vbroadcast(1.0f / 6.0f));
    p = vfma(p, r, vbroadcast(0.5f));
    p = vfma(p, r, vbroadcast(1.0f));
    p = vfma(p, r, vbroadcast(1.0f));
#if defined(__AVX2__) && !defined(__AVX512F__)
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32((__m256)n), 23);
    __m256 v = (__m256)_mm256_add_epi32((__m256i)p, e);
    return (vf)_mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps((__m256)x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
#else
    for (int i = 0; i < VL; i++) {
        int32_t e = (int32_t)n[i];
        if (x[i] < -87.0f) { p[i] = 0.0f; continue; }
        union { float f; int32_t u; } b = {.f = p[i]};
        b.u += e * (1 << 23);
        p[i] = b.f;
    }
    return p;
#endif
}

#endif
