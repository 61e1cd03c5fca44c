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
static inline vf vbroadcast(float s) { vf r; for (int i = 0; i < VL; i++) r[i] = s; return r; }

static inline float hsum(vf v) { float s = 0.0f; for (int i = 0; i < VL; i++) s += v[i]; return s; }
static inline vf vzero(void) { vf z; for (int i = 0; i < VL; i++) z[i] = 0.0f; return z; }

#endif
