/* llmc CPU kernels: stored values widened to floats, VL at a time (wide_*) or one (one_*), for the
 * linears (gemm.c: weights) and the step (step.c: KV-cache rows). Every conversion is exact. */
#ifndef LLMC_WIDEN_H
#define LLMC_WIDEN_H
#include <stdint.h>
#include <string.h>
#include "fp8.h"
#include "simd.h"

static inline vf wide_f32(const void *p, int64_t k) { return *(const vf *)((const float *)p + k); }
static inline float one_f32(const void *p, int64_t k) { return ((const float *)p)[k]; }

/* the compilers scalarise __builtin_convertvector from bytes, hence intrinsics */
static inline vf wide_i8(const void *p, int64_t k) {
    const int8_t *q = (const int8_t *)p + k;
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = (float)q[i];
    return r;
#endif
}
static inline float one_i8(const void *p, int64_t k) { return (float)((const int8_t *)p)[k]; }

/* bf16 is the high half of an fp32: zero-extend and shift */
static inline vf wide_bf16(const void *p, int64_t k) {
    const uint16_t *q = (const uint16_t *)p + k;
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)q)), 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)q)), 16);
#else
    vf r;
    for (int i = 0; i < VL; i++) { uint32_t u = (uint32_t)q[i] << 16; memcpy(&r[i], &u, 4); }
    return r;
#endif
}
static inline float one_bf16(const void *p, int64_t k) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[k] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline vf wide_f16(const void *p, int64_t k) {
    const _Float16 *q = (const _Float16 *)p + k;
#if defined(__AVX512F__)
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)q));
#elif defined(__F16C__) && defined(__AVX2__)
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q));
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = (float)q[i];
    return r;
#endif
}
static inline float one_f16(const void *p, int64_t k) { return (float)((const _Float16 *)p)[k]; }

/* fp8 e4m3 as fp16 bits (sign, then exponent and mantissa moved up by 7: a value 2^-8 of the e4m3
 * one, subnormals included), converted by the hardware and scaled back by 2^8: exact */
static inline vf wide_f8(const void *p, int64_t k) {
    const uint8_t *q = (const uint8_t *)p + k;
#if (defined(__F16C__) && defined(__AVX2__)) || defined(__AVX512F__)
#if defined(__AVX512F__)
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    return (vf)_mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
#else
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)q));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7),
                             _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    return (vf)_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
#endif
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = e4m3_to_float(q[i]);
    return r;
#endif
}
static inline float one_f8(const void *p, int64_t k) { return e4m3_to_float(((const uint8_t *)p)[k]); }

#endif
