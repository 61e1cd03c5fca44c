/* llmc fast CPU linears: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), x and y fp32 rows.
 *
 * The weight stays as stored (fp32, bf16, fp16, int8 per channel, packed int4 groups) and each piece
 * of VL values is widened to floats in registers, so memory traffic is the stored size and no float
 * copy of the weight is written. A tile is MB input rows x NB weight rows with one vector accumulator
 * per output: the NB*MB independent chains keep the FMA units busy at one row (decode) and reuse
 * each loaded piece MB times at many (prefill). Rows are taken in chunks of MC so that a chunk of x
 * stays in L2 while every weight tile passes over it; threads (OpenMP, the runtime torch has loaded)
 * split the weight rows.
 *
 * Every output is one accumulator over k in steps of VL, then its lanes summed in order, then the
 * tail of k one value at a time, then scale and bias: the same arithmetic whatever the tile, the
 * number of rows or the row's place, so a row's result never depends on the other rows (the native
 * executor's batch invariance). Reference: kernels/reference/dense.py linear over
 * kernels/reference/dequant.py; tests/kernels/ hold them to stated tolerances.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "linear.h"
#include "simd.h"

/* The interface version llmc checks after loading this library (native.ABI_VERSION): bump both
 * when an exported function is added, removed or changes its signature. */
#define LLMC_ABI_VERSION 4

int llmc_abi_version(void) { return LLMC_ABI_VERSION; }

#define MC 48            /* rows of x per chunk: 48 rows of 1536 floats are 288 KiB, inside L2 */

/* ---- widening: VL stored values at element k of a weight row -> VL floats; and one value ---------- */
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

/* ---- float-widenable kinds: MB x NB tiles ---------------------------------------------------------
 * x: MB rows ldx apart; w: NB rows ldw bytes apart; y: MB rows ldy apart, NB outputs each (raw sums:
 * the caller applies scale and bias). */
#define DEFINE_TILE(KIND, MB, NB)                                                                  \
static void tile_##KIND##_##MB##x##NB(const float *x, int64_t ldx,                               \
        const char *w, int64_t ldw, float *y, int64_t ldy, int64_t K) {                            \
    vf acc[MB][NB];                                                                                \
    for (int i = 0; i < MB; i++)                                                                   \
        for (int j = 0; j < NB; j++) acc[i][j] = vzero();                                          \
    int64_t kv = K - K % VL;                                                                       \
    for (int64_t k = 0; k < kv; k += VL) {                                                         \
        vf wv[NB];                                                                                 \
        for (int j = 0; j < NB; j++) wv[j] = wide_##KIND(w + j * ldw, k);                          \
        for (int i = 0; i < MB; i++) {                                                             \
            vf xv = *(const vf *)(x + i * ldx + k);                                                \
            for (int j = 0; j < NB; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);                    \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < MB; i++)                                                                   \
        for (int j = 0; j < NB; j++) {                                                             \
            float s = hsum(acc[i][j]);                                                             \
            for (int64_t k = kv; k < K; k++) s = fmaf(x[i * ldx + k], one_##KIND(w + j * ldw, k), s); \
            y[i * ldy + j] = s;                                                                    \
        }                                                                                          \
}

/* rows [m0, m1) of x against weight rows [n0, n0 + nb) (nb <= 4) */
#define DEFINE_KIND(KIND)                                                                          \
DEFINE_TILE(KIND, 1, 4) DEFINE_TILE(KIND, 2, 4) DEFINE_TILE(KIND, 3, 4)                            \
DEFINE_TILE(KIND, 1, 1) DEFINE_TILE(KIND, 2, 1) DEFINE_TILE(KIND, 3, 1)                            \
static void block_##KIND(const float *x, int64_t m0, int64_t m1, int64_t K, const char *w, int64_t ldw, \
                         int64_t nb, float *y, int64_t N) {                                        \
    for (int64_t m = m0; m < m1;) {                                                                \
        int64_t mb = m1 - m < 3 ? m1 - m : 3;                                                      \
        const float *xm = x + m * K;                                                               \
        float *ym = y + m * N;                                                                     \
        if (nb == 4) {                                                                             \
            if (mb == 3) tile_##KIND##_3x4(xm, K, w, ldw, ym, N, K);                               \
            else if (mb == 2) tile_##KIND##_2x4(xm, K, w, ldw, ym, N, K);                          \
            else tile_##KIND##_1x4(xm, K, w, ldw, ym, N, K);                                       \
        } else                                                                                     \
            for (int64_t j = 0; j < nb; j++) {                                                     \
                if (mb == 3) tile_##KIND##_3x1(xm, K, w + j * ldw, ldw, ym + j, N, K);             \
                else if (mb == 2) tile_##KIND##_2x1(xm, K, w + j * ldw, ldw, ym + j, N, K);        \
                else tile_##KIND##_1x1(xm, K, w + j * ldw, ldw, ym + j, N, K);                     \
            }                                                                                      \
        m += mb;                                                                                   \
    }                                                                                              \
}
/* the same outputs from a tile of LAYOUT_TILES (4 rows, es bytes a value): y[i * ldy + j] for j < 4 */
#define DEFINE_TILED(KIND, MB)                                                                     \
static void tiled_##KIND##_##MB(const float *x, int64_t ldx, const char *t, int64_t es, float *y,  \
                                int64_t ldy, int64_t K) {                                          \
    vf acc[MB][4];                                                                                 \
    for (int i = 0; i < MB; i++)                                                                   \
        for (int j = 0; j < 4; j++) acc[i][j] = vzero();                                           \
    int64_t kv = K - K % VL, step = VL * es;                                                       \
    const char *p = t;                                                                             \
    for (int64_t k = 0; k < kv; k += VL, p += 4 * step) {                                          \
        vf wv[4];                                                                                  \
        for (int j = 0; j < 4; j++) wv[j] = wide_##KIND(p + j * step, 0);                          \
        for (int i = 0; i < MB; i++) {                                                             \
            vf xv = *(const vf *)(x + i * ldx + k);                                                \
            for (int j = 0; j < 4; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);                    \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < MB; i++)                                                                   \
        for (int j = 0; j < 4; j++) {                                                              \
            float s = hsum(acc[i][j]);                                                             \
            for (int64_t k = kv; k < K; k++)                                                       \
                s = fmaf(x[i * ldx + k], one_##KIND(p + j * (K - kv) * es, k - kv), s);            \
            y[i * ldy + j] = s;                                                                    \
        }                                                                                          \
}
/* Many rows (prefill): a tile of 16-bit or int8 weights is widened once into a thread's float buffer in
 * the same layout and the fp32 tiles run over it, instead of every 3 rows widening it again. The
 * widened values are exact, so every output is the same to the bit either way. */
#define WIDEN_ROWS 6
static float *tile_buffer(int64_t floats) {
    static __thread float *buf;
    static __thread int64_t cap;
    if (cap < floats) {
        free(buf);
        buf = malloc(sizeof(float) * (size_t)floats);
        cap = floats;
    }
    return buf;
}

#define DEFINE_TILED_KIND(KIND)                                                                    \
static const float *widen_tile_##KIND(const char *t, int64_t es, int64_t K) {                     \
    float *buf = tile_buffer(4 * K);                                                               \
    int64_t kv = K - K % VL;                                                                       \
    for (int64_t i = 0; i < kv * 4; i += VL) *(vf *)(buf + i) = wide_##KIND(t + i * es, 0);        \
    for (int64_t i = kv * 4; i < K * 4; i++) buf[i] = one_##KIND(t + i * es, 0);                   \
    return buf;                                                                                    \
}                                                                                                  \
DEFINE_TILED(KIND, 1) DEFINE_TILED(KIND, 2) DEFINE_TILED(KIND, 3)                                  \
/* rows [m0, m1) of x against tile t: outputs of its first nb rows only (the others are padding) */ \
static void tblock_##KIND(const float *x, int64_t m0, int64_t m1, int64_t K, const char *t, int64_t es, \
                          int64_t nb, float *y, int64_t N) {                                       \
    if (es != 4 && m1 - m0 >= WIDEN_ROWS) {                                                        \
        tblock_f32(x, m0, m1, K, (const char *)widen_tile_##KIND(t, es, K), 4, nb, y, N);         \
        return;                                                                                    \
    }                                                                                              \
    float out[3 * 4];                                                                              \
    for (int64_t m = m0; m < m1;) {                                                                \
        int64_t mb = m1 - m < 3 ? m1 - m : 3;                                                      \
        const float *xm = x + m * K;                                                               \
        int full = nb == 4;                                                                        \
        float *ym = full ? y + m * N : out;                                                        \
        int64_t ldy = full ? N : 4;                                                                \
        if (mb == 3) tiled_##KIND##_3(xm, K, t, es, ym, ldy, K);                                   \
        else if (mb == 2) tiled_##KIND##_2(xm, K, t, es, ym, ldy, K);                              \
        else tiled_##KIND##_1(xm, K, t, es, ym, ldy, K);                                           \
        if (!full)                                                                                 \
            for (int64_t i = 0; i < mb; i++)                                                       \
                for (int64_t j = 0; j < nb; j++) y[(m + i) * N + j] = out[i * 4 + j];              \
        m += mb;                                                                                   \
    }                                                                                              \
}

DEFINE_KIND(f32) DEFINE_TILED_KIND(f32)
DEFINE_KIND(bf16) DEFINE_TILED_KIND(bf16)
DEFINE_KIND(f16) DEFINE_TILED_KIND(f16)
DEFINE_KIND(i8) DEFINE_TILED_KIND(i8)

/* ---- packed int4 groups ----------------------------------------------------------------------------
 * packed uint4 [N, ceil(K/2)] (element 2i in the low nibble of byte i), scale and zero [N, G], groups
 * of gs along K:  y[m, n] = sum_g scale[n, g] * (sum_{k in g} x[m, k] * u[n, k] - zero[n, g] * xs[m, g])
 * with xs[m, g] = sum_{k in g} x[m, k]. Inside each group, pieces of 2 * VL values (VL bytes) give
 * their even values from the low nibbles and their odd values from the high nibbles; the input is
 * de-interleaved to match once per call (xd: per piece, its VL even values then its VL odd ones).
 * The rest of a group (and every value when gs is odd, so pieces would not start on a byte) is
 * taken one value at a time. */
static inline float nibble(const uint8_t *p, int64_t k) { return (float)((p[k >> 1] >> ((k & 1) * 4)) & 15); }

/* VL bytes of packed uint4 -> their VL low nibbles and VL high nibbles as floats */
static inline void widen_u4(const uint8_t *p, vf *lo, vf *hi) {
#if defined(__AVX512F__)
    __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)));
    *hi = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
#elif defined(__AVX2__)
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15)));
    *hi = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
#else
    for (int i = 0; i < VL; i++) { (*lo)[i] = (float)(p[i] & 15); (*hi)[i] = (float)(p[i] >> 4); }
#endif
}

#define PIECE (2 * VL)
static inline int64_t pieces(int64_t len, int64_t gs) { return gs % 2 ? 0 : len / PIECE; }

/* one row of x (de-interleaved xd, group sums xs) against NB weight rows kb bytes apart */
#define DEFINE_I4(NB)                                                                              \
static void i4_tile_##NB(const float *xd, const float *xs, int64_t K, int64_t G, int64_t gs,       \
                         const uint8_t *pn, int64_t kb, const float *sn, const uint8_t *zn,        \
                         float *out) {                                                             \
    vf tot[NB];                                                                                    \
    float rest[NB];                                                                                \
    for (int j = 0; j < NB; j++) { tot[j] = vzero(); rest[j] = 0.0f; }                             \
    for (int64_t g = 0; g < G; g++) {                                                              \
        int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K, np = pieces(k1 - k0, gs);             \
        vf acc[NB];                                                                                \
        for (int j = 0; j < NB; j++) acc[j] = vzero();                                             \
        for (int64_t p = 0; p < np; p++) {                                                         \
            int64_t b = k0 + PIECE * p;                                                            \
            vf xe = *(const vf *)(xd + b), xo = *(const vf *)(xd + b + VL);                        \
            for (int j = 0; j < NB; j++) {                                                         \
                vf lo, hi;                                                                         \
                widen_u4(pn + j * kb + b / 2, &lo, &hi);                                           \
                acc[j] = vfma(xo, hi, vfma(xe, lo, acc[j]));                                       \
            }                                                                                      \
        }                                                                                          \
        for (int j = 0; j < NB; j++) {                                                             \
            float s = sn[j * G + g], z = (float)zn[j * G + g], t = 0.0f;                           \
            for (int64_t k = k0 + PIECE * np; k < k1; k++) t = fmaf(xd[k], nibble(pn + j * kb, k), t); \
            tot[j] = vfma(vbroadcast(s), acc[j], tot[j]);                                          \
            rest[j] += s * (t - z * xs[g]);                                                        \
        }                                                                                          \
    }                                                                                              \
    for (int j = 0; j < NB; j++) out[j] = hsum(tot[j]) + rest[j];                                  \
}
DEFINE_I4(4)
DEFINE_I4(1)

/* x [M, K] -> xd (each group's pieces de-interleaved) and xs (group sums) */
static void i4_prepare(const float *x, float *xd, float *xs, int64_t M, int64_t K, int64_t gs) {
    int64_t G = (K + gs - 1) / gs;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *dm = xd + m * K;
        for (int64_t g = 0; g < G; g++) {
            int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K, np = pieces(k1 - k0, gs);
            float sum = 0.0f;
            for (int64_t k = k0; k < k1; k++) { sum += xm[k]; dm[k] = xm[k]; }
            for (int64_t j = 0; j < np; j++)
                for (int i = 0; i < VL; i++) {
                    int64_t b = k0 + PIECE * j;
                    dm[b + i] = xm[b + 2 * i];
                    dm[b + VL + i] = xm[b + 2 * i + 1];
                }
            xs[m * G + g] = sum;
        }
    }
}

static void block_i4(const float *xd, const float *xs, int64_t m0, int64_t m1, int64_t K, int64_t gs,
                     const llmc_weight *w, int64_t n0, int64_t nb, float *y, int64_t N) {
    int64_t G = (K + gs - 1) / gs, kb = (K + 1) / 2;
    const uint8_t *pn = (const uint8_t *)w->data + n0 * kb, *zn = w->zero + n0 * G;
    const float *sn = w->scale + n0 * G;
    for (int64_t m = m0; m < m1; m++) {
        const float *d = xd + m * K, *s = xs + m * G;
        if (nb == 4) i4_tile_4(d, s, K, G, gs, pn, kb, sn, zn, y + m * N + n0);
        else
            for (int64_t j = 0; j < nb; j++)
                i4_tile_1(d, s, K, G, gs, pn + j * kb, kb, sn + j * G, zn + j * G, y + m * N + n0 + j);
    }
}

/* ---- integer dot products: int8 inputs, quantized at run time -------------------------------------
 * Each row of x is quantized symmetrically over spans of `span` features (w4a8: the weight's groups;
 * w8a8: the whole row): scale = absmax / 127 (1 for an all-zero span), q = x / scale rounded half to
 * even, exactly as kernels/reference/quant.py does. Products of codes are summed exactly in int32
 * and scaled once per span: sum_g sw * sx * (sum_k q[k] * u[k] - zero * sum_k q[k]). */
static void quant_span(const float *x, int8_t *q, int64_t len, float *scale, int32_t *qsum) {
    float amax = 0.0f;
    for (int64_t k = 0; k < len; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    int32_t sum = 0;
    for (int64_t k = 0; k < len; k++) {
        float v = nearbyintf(x[k] / s);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[k] = (int8_t)v;
        sum += q[k];
    }
    *scale = s;
    *qsum = sum;
}

/* w4a8: x [M, K] -> codes (each group's pieces of 32 de-interleaved as the nibbles are: 16 even
 * values, then 16 odd ones), scales and code sums [M, G] */
#define IPIECE 32
static inline int64_t ipieces(int64_t len, int64_t gs) { return gs % 2 ? 0 : len / IPIECE; }

static void quant_groups(const float *x, int8_t *q, float *scale, int32_t *qsum, int64_t M, int64_t K,
                         int64_t gs) {
    int64_t G = (K + gs - 1) / gs;
    int8_t tmp[IPIECE];
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
            int8_t *qg = q + m * K + k0;
            quant_span(x + m * K + k0, qg, k1 - k0, scale + m * G + g, qsum + m * G + g);
            for (int64_t p = 0; p < ipieces(k1 - k0, gs); p++) {
                int8_t *piece = qg + IPIECE * p;
                for (int i = 0; i < IPIECE / 2; i++) { tmp[i] = piece[2 * i]; tmp[IPIECE / 2 + i] = piece[2 * i + 1]; }
                memcpy(piece, tmp, IPIECE);
            }
        }
}

/* the int32 sum of 32 uint4 codes (16 packed bytes) times 32 de-interleaved int8 codes */
static inline int32_t idot_u4_32(const uint8_t *p, const int8_t *xq) {
#if defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)xq)),
                                  _mm256_set1_epi16(1));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h);
#else
    int32_t s = 0;
    for (int i = 0; i < 16; i++) s += (p[i] & 15) * xq[i] + (p[i] >> 4) * xq[16 + i];
    return s;
#endif
}

/* one row of codes against NB weight rows kb bytes apart: groups summed exactly, scaled in fp32 */
#define DEFINE_I4A8(NB)                                                                            \
static void i4a8_tile_##NB(const int8_t *xq, const float *xsc, const int32_t *xsum, int64_t K,     \
                           int64_t G, int64_t gs, const uint8_t *pn, int64_t kb, const float *sn,  \
                           const uint8_t *zn, float *out) {                                        \
    float tot[NB];                                                                                 \
    for (int j = 0; j < NB; j++) tot[j] = 0.0f;                                                    \
    for (int64_t g = 0; g < G; g++) {                                                              \
        int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K, np = ipieces(k1 - k0, gs);            \
        for (int j = 0; j < NB; j++) {                                                             \
            const uint8_t *pj = pn + j * kb;                                                       \
            int32_t acc = 0;                                                                       \
            for (int64_t p = 0; p < np; p++) acc += idot_u4_32(pj + (k0 + IPIECE * p) / 2, xq + k0 + IPIECE * p); \
            for (int64_t k = k0 + IPIECE * np; k < k1; k++)                                       \
                acc += (int32_t)((pj[k >> 1] >> ((k & 1) * 4)) & 15) * xq[k];                     \
            acc -= (int32_t)zn[j * G + g] * xsum[g];                                               \
            tot[j] += (sn[j * G + g] * xsc[g]) * (float)acc;                                       \
        }                                                                                          \
    }                                                                                              \
    for (int j = 0; j < NB; j++) out[j] = tot[j];                                                  \
}
DEFINE_I4A8(4)
DEFINE_I4A8(1)

/* w8a8: the int32 sum of K int8 weight codes times K int8 input codes */
static inline int32_t idot_i8(const int8_t *w, const int8_t *xq, int64_t K) {
    int64_t k = 0;
    int32_t s = 0;
#if defined(__AVX2__)
    __m256i acc = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
    for (; k + 32 <= K; k += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(w + k)), b = _mm256_loadu_si256((const __m256i *)(xq + k));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(a, a),
                                                                           _mm256_sign_epi8(b, a)), ones));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    s = _mm_cvtsi128_si32(h);
#endif
    for (; k < K; k++) s += (int32_t)w[k] * xq[k];
    return s;
}

static void block_int(const llmc_weight *w, const int8_t *xq, const float *xsc, const int32_t *xsum,
                      int64_t m0, int64_t m1, int64_t n0, int64_t nb, float *y) {
    int64_t N = w->n, K = w->k;
    if (w->kind == W_I8A8) {
        const int8_t *q = (const int8_t *)w->data;
        for (int64_t m = m0; m < m1; m++)
            for (int64_t n = n0; n < n0 + nb; n++)
                y[m * N + n] = (float)idot_i8(q + n * K, xq + m * K, K) * (xsc[m] * w->scale[n]);
        return;
    }
    int64_t gs = w->group, G = (K + gs - 1) / gs, kb = (K + 1) / 2;
    const uint8_t *pn = (const uint8_t *)w->data + n0 * kb, *zn = w->zero + n0 * G;
    const float *sn = w->scale + n0 * G;
    for (int64_t m = m0; m < m1; m++) {
        const int8_t *q = xq + m * K;
        const float *s = xsc + m * G;
        const int32_t *c = xsum + m * G;
        if (nb == 4) i4a8_tile_4(q, s, c, K, G, gs, pn, kb, sn, zn, y + m * N + n0);
        else
            for (int64_t j = 0; j < nb; j++)
                i4a8_tile_1(q, s, c, K, G, gs, pn + j * kb, kb, sn + j * G, zn + j * G, y + m * N + n0 + j);
    }
}

/* ---- int4 in LAYOUT_TILES: pieces of 32 values (16 bytes) ------------------------------------------
 * A tile holds, for every piece of 32 values along k, the 16 bytes of each of its 4 rows in turn
 * (groups are whole pieces: gs and k multiples of 32). The inputs are de-interleaved per piece as
 * the nibbles are: its 16 even values, then its 16 odd ones (floats for w4a16, int8 codes for w4a8). */
#define TPIECE 32
static int int4_tiles(const llmc_weight *w) {
    return (w->kind == W_I4 || w->kind == W_I4A8) && w->group % TPIECE == 0 && w->k % TPIECE == 0;
}

static void deinterleave_f32(const float *x, float *xd, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += TPIECE)
            for (int i = 0; i < TPIECE / 2; i++) {
                xd[m * K + k + i] = x[m * K + k + 2 * i];
                xd[m * K + k + TPIECE / 2 + i] = x[m * K + k + 2 * i + 1];
            }
}

/* w4a16: one row of x (xd de-interleaved, xs its group sums) against a tile of 4 rows */
static void i4t_tile(const float *xd, const float *xs, int64_t K, int64_t G, int64_t gs, const uint8_t *t,
                     const float *sn, const uint8_t *zn, float *out) {
    vf tot[4];
    float rest[4];
    for (int j = 0; j < 4; j++) { tot[j] = vzero(); rest[j] = 0.0f; }
    const uint8_t *b = t;
    for (int64_t g = 0; g < G; g++) {
        int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
        vf acc[4];
        for (int j = 0; j < 4; j++) acc[j] = vzero();
        for (int64_t k = k0; k < k1; k += TPIECE, b += 4 * 16)
            for (int j = 0; j < 4; j++)
                for (int h = 0; h < 16 / VL; h++) {
                    vf lo, hi;
                    widen_u4(b + j * 16 + h * VL, &lo, &hi);
                    acc[j] = vfma(*(const vf *)(xd + k + h * VL), lo, acc[j]);
                    acc[j] = vfma(*(const vf *)(xd + k + 16 + h * VL), hi, acc[j]);
                }
        for (int j = 0; j < 4; j++) {
            float s = sn[j * G + g];
            tot[j] = vfma(vbroadcast(s), acc[j], tot[j]);
            rest[j] -= s * ((float)zn[j * G + g] * xs[g]);
        }
    }
    for (int j = 0; j < 4; j++) out[j] = hsum(tot[j]) + rest[j];
}

/* 8 int32 lanes: lane l sums the products of bytes 4l..4l+3 of 32 uint4 codes u and 32 int8 codes x
 * (what maddubs then madd give; exact) */
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));
typedef float v8f __attribute__((vector_size(32), aligned(4)));
static inline v8i idot_u4_lanes(const uint8_t *p, const int8_t *xq) {
#if defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
    return (v8i)_mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)xq)),
                                  _mm256_set1_epi16(1));
#else
    v8i r;
    for (int l = 0; l < 8; l++) {
        int32_t s = 0;
        for (int i = 4 * l; i < 4 * l + 4; i++) s += (i < 16 ? p[i] & 15 : p[i - 16] >> 4) * xq[i];
        r[l] = s;
    }
    return r;
#endif
}
static inline v8f v8fma(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
static inline v8f v8cvt(v8i a) { return __builtin_convertvector(a, v8f); }

/* w4a8: one row of codes against a tile of 4 rows: each group's products summed exactly in int32
 * lanes, then scaled into float lanes (sw * sx), the zero point's share taken off in a scalar */
static void i4a8t_tile(const int8_t *xq, const float *xsc, const int32_t *xsum, int64_t K, int64_t G, int64_t gs,
                       const uint8_t *t, const float *sn, const uint8_t *zn, float *out) {
    v8f acc[4];
    float rest[4];
    for (int j = 0; j < 4; j++) { acc[j] = (v8f){0}; rest[j] = 0.0f; }
    const uint8_t *b = t;
    for (int64_t g = 0; g < G; g++) {
        int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
        v8i ip[4];
        for (int j = 0; j < 4; j++) ip[j] = (v8i){0};
        for (int64_t k = k0; k < k1; k += TPIECE, b += 4 * 16)
            for (int j = 0; j < 4; j++) ip[j] += idot_u4_lanes(b + j * 16, xq + k);
        for (int j = 0; j < 4; j++) {
            float d = sn[j * G + g] * xsc[g];
            v8f dv = {d, d, d, d, d, d, d, d};
            acc[j] = v8fma(v8cvt(ip[j]), dv, acc[j]);
            rest[j] -= d * (float)((int32_t)zn[j * G + g] * xsum[g]);
        }
    }
    for (int j = 0; j < 4; j++) {
        float s = 0.0f;
        for (int l = 0; l < 8; l++) s += acc[j][l];
        out[j] = s + rest[j];
    }
}

/* w8a8 in LAYOUT_TILES: pieces of 32 int8 values, 32 bytes of each of the tile's 4 rows in turn; the
 * products summed exactly in int32 lanes, so the result is the rows layout's to the bit */
static int int8_tiles(const llmc_weight *w) { return w->kind == W_I8A8 && w->k % TPIECE == 0; }

static inline v8i idot_i8_lanes(const int8_t *w, const int8_t *xq) {
#if defined(__AVX2__)
    __m256i a = _mm256_loadu_si256((const __m256i *)w), b = _mm256_loadu_si256((const __m256i *)xq);
    return (v8i)_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)),
                                  _mm256_set1_epi16(1));
#else
    v8i r;
    for (int l = 0; l < 8; l++) {
        int32_t s = 0;
        for (int i = 4 * l; i < 4 * l + 4; i++) s += (int32_t)w[i] * xq[i];
        r[l] = s;
    }
    return r;
#endif
}

static void i8a8t_block(const llmc_weight *w, const int8_t *xq, const float *xsc, int64_t m0, int64_t m1,
                        int64_t n0, int64_t nb, float *y) {
    int64_t N = w->n, K = w->k;
    const int8_t *tb = (const int8_t *)w->data + n0 * K;
    for (int64_t m = m0; m < m1; m++) {
        const int8_t *x = xq + m * K, *b = tb;
        v8i ip[4] = {{0}};
        for (int64_t k = 0; k < K; k += TPIECE, b += 4 * TPIECE)
            for (int j = 0; j < 4; j++) ip[j] += idot_i8_lanes(b + j * TPIECE, x + k);
        for (int64_t j = 0; j < nb; j++) {
            int32_t sum = 0;
            for (int l = 0; l < 8; l++) sum += ip[j][l];
            y[m * N + n0 + j] = (float)sum * (xsc[m] * w->scale[n0 + j]);
        }
    }
}

/* rows [m0, m1) against the tile of weight rows n0 .. n0 + nb; a last tile's padding rows get scale 0 */
static void i4t_block(const llmc_weight *w, const float *xd, const int8_t *xq, const float *xs,
                      const int32_t *xsum, int64_t m0, int64_t m1, int64_t n0, int64_t nb, float *y) {
    int64_t N = w->n, K = w->k, gs = w->group, G = (K + gs - 1) / gs;
    const uint8_t *tb = (const uint8_t *)w->data + n0 * (K / 2), *zn = w->zero + n0 * G;
    const float *sn = w->scale + n0 * G;
    float out[4], *s4 = NULL;
    uint8_t *z4 = NULL;
    if (nb < 4) {
        s4 = calloc((size_t)(4 * G), sizeof(float));
        z4 = calloc((size_t)(4 * G), 1);
        memcpy(s4, sn, sizeof(float) * (size_t)(nb * G));
        memcpy(z4, zn, (size_t)(nb * G));
    }
    for (int64_t m = m0; m < m1; m++) {
        if (w->kind == W_I4) i4t_tile(xd + m * K, xs + m * G, K, G, gs, tb, s4 ? s4 : sn, z4 ? z4 : zn, out);
        else i4a8t_tile(xq + m * K, xs + m * G, xsum + m * G, K, G, gs, tb, s4 ? s4 : sn, z4 ? z4 : zn, out);
        for (int64_t j = 0; j < nb; j++) y[m * N + n0 + j] = out[j];
    }
    free(s4);
    free(z4);
}

/* ---- LAYOUT_TILES ---------------------------------------------------------------------------------- */
static int64_t elem_bytes(int64_t kind) {
    switch (kind) {
        case W_F32: return 4;
        case W_BF16: case W_F16: return 2;
        case W_I8: return 1;
        default: return 0;                 /* packed int4 and the integer kinds: rows only */
    }
}

int64_t llmc_packed_bytes(const llmc_weight *w) {
    if (int4_tiles(w)) return ((w->n + 3) / 4) * 4 * (w->k / 2);
    if (int8_tiles(w)) return ((w->n + 3) / 4) * 4 * w->k;
    return elem_bytes(w->kind) * ((w->n + 3) / 4) * 4 * w->k;
}

void llmc_pack_weight(const llmc_weight *w, void *dst) {
    int64_t es = elem_bytes(w->kind), K = w->k, kv = K - K % VL, tile = 4 * K * es;
    const char *src = (const char *)w->data;
    memset(dst, 0, (size_t)llmc_packed_bytes(w));
    if (int4_tiles(w)) {                    /* per piece of 32 values, 16 bytes of each row in turn */
        for (int64_t n = 0; n < w->n; n++)
            for (int64_t q = 0; q < K / TPIECE; q++)
                memcpy((char *)dst + (n / 4) * 2 * K + (q * 4 + n % 4) * 16, src + n * (K / 2) + q * 16, 16);
        return;
    }
    if (int8_tiles(w)) {                    /* per piece of 32 values, 32 bytes of each row in turn */
        for (int64_t n = 0; n < w->n; n++)
            for (int64_t q = 0; q < K / TPIECE; q++)
                memcpy((char *)dst + (n / 4) * 4 * K + (q * 4 + n % 4) * TPIECE, src + n * K + q * TPIECE, TPIECE);
        return;
    }
    for (int64_t n = 0; n < w->n; n++) {
        char *t = (char *)dst + (n / 4) * tile;
        int64_t j = n % 4;
        const char *row = src + n * K * es;
        for (int64_t k = 0; k < kv; k += VL)
            memcpy(t + ((k / VL) * 4 + j) * VL * es, row + k * es, (size_t)(VL * es));
        memcpy(t + kv * 4 * es + j * (K - kv) * es, row + kv * es, (size_t)((K - kv) * es));
    }
}

/* ---- the driver ------------------------------------------------------------------------------------ */
static int64_t row_bytes(const llmc_weight *w) {
    switch (w->kind) {
        case W_F32: return 4 * w->k;
        case W_BF16: case W_F16: return 2 * w->k;
        case W_I8: case W_I8A8: return w->k;
        default: return (w->k + 1) / 2;
    }
}

void llmc_linear_weight(const llmc_weight *w, const float *x, float *y, int64_t M, int nthreads) {
    int64_t N = w->n, K = w->k, ldw = row_bytes(w), nblocks = (N + 3) / 4;
    float *xd = NULL, *xs = NULL;
    int8_t *xq = NULL;
    int32_t *xsum = NULL;
    int tiled4 = w->layout == LAYOUT_TILES && (w->kind == W_I4 || w->kind == W_I4A8);
    if (tiled4) {                           /* inputs de-interleaved per piece of 32, group sums */
        int64_t gs = w->group, G = (K + gs - 1) / gs;
        xs = malloc(sizeof(float) * (size_t)(M * G));
        if (w->kind == W_I4) {
            xd = malloc(sizeof(float) * (size_t)(M * K));
            for (int64_t m = 0; m < M; m++)
                for (int64_t g = 0; g < G; g++) {
                    float sum = 0.0f;
                    for (int64_t k = g * gs; k < (g + 1) * gs && k < K; k++) sum += x[m * K + k];
                    xs[m * G + g] = sum;
                }
            deinterleave_f32(x, xd, M, K);
        } else {
            xq = malloc((size_t)(M * K));
            xsum = malloc(sizeof(int32_t) * (size_t)(M * G));
            quant_groups(x, xq, xs, xsum, M, K, gs);
        }
    } else if (w->kind == W_I4) {
        int64_t G = (K + w->group - 1) / w->group;
        xd = malloc(sizeof(float) * (size_t)(M * K));
        xs = malloc(sizeof(float) * (size_t)(M * G));
        i4_prepare(x, xd, xs, M, K, w->group);
    } else if (w->kind == W_I4A8 || w->kind == W_I8A8) {
        int64_t span = w->kind == W_I4A8 ? w->group : K, G = (K + span - 1) / span;
        xq = malloc((size_t)(M * K));
        xs = malloc(sizeof(float) * (size_t)(M * G));
        xsum = malloc(sizeof(int32_t) * (size_t)(M * G));
        if (w->kind == W_I4A8) quant_groups(x, xq, xs, xsum, M, K, span);
        else
            for (int64_t m = 0; m < M; m++) quant_span(x + m * K, xq + m * K, K, xs + m, xsum + m);
    }
    #pragma omp parallel num_threads(nthreads)
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        int64_t m1 = m0 + MC < M ? m0 + MC : M;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t n0 = 4 * b, nb = N - n0 < 4 ? N - n0 : 4;
            const char *wn = (const char *)w->data + n0 * ldw;
            if (tiled4) i4t_block(w, xd, xq, xs, xsum, m0, m1, n0, nb, y);
            else if (w->layout == LAYOUT_TILES && w->kind == W_I8A8) i8a8t_block(w, xq, xs, m0, m1, n0, nb, y);
            else if (w->layout == LAYOUT_TILES) switch (w->kind) {      /* n0 * ldw is where tile b starts */
                case W_F32: tblock_f32(x, m0, m1, K, wn, 4, nb, y + n0, N); break;
                case W_BF16: tblock_bf16(x, m0, m1, K, wn, 2, nb, y + n0, N); break;
                case W_F16: tblock_f16(x, m0, m1, K, wn, 2, nb, y + n0, N); break;
                case W_I8: tblock_i8(x, m0, m1, K, wn, 1, nb, y + n0, N); break;
            } else switch (w->kind) {
                case W_F32: block_f32(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_BF16: block_bf16(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_F16: block_f16(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_I8: block_i8(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_I4: block_i4(xd, xs, m0, m1, K, w->group, w, n0, nb, y, N); break;
                case W_I4A8: case W_I8A8: block_int(w, xq, xs, xsum, m0, m1, n0, nb, y); break;
            }
            if (w->kind == W_I8)
                for (int64_t m = m0; m < m1; m++)
                    for (int64_t n = n0; n < n0 + nb; n++)
                        y[m * N + n] = y[m * N + n] * w->scale[n] + (w->bias ? w->bias[n] : 0.0f);
            else if (w->bias)
                for (int64_t m = m0; m < m1; m++)
                    for (int64_t n = n0; n < n0 + nb; n++) y[m * N + n] += w->bias[n];
        }
    }
    free(xd);
    free(xs);
    free(xq);
    free(xsum);
}

/* ---- the entry points of the cpu kernel set (kernels/cpu/native.py) ------------------------------- */
void llmc_linear_f32(const float *x, const float *w, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int nthreads) {
    llmc_weight lw = {W_F32, N, K, 0, w, NULL, NULL, bias};
    llmc_linear_weight(&lw, x, y, M, nthreads);
}

void llmc_linear_i8(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                    int64_t M, int64_t N, int64_t K, int nthreads) {
    llmc_weight lw = {W_I8, N, K, 0, q, scale, NULL, bias};
    llmc_linear_weight(&lw, x, y, M, nthreads);
}

void llmc_linear_i4g(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    llmc_weight lw = {W_I4, N, K, gs, packed, scale, zero, bias};
    llmc_linear_weight(&lw, x, y, M, nthreads);
}

/* packed uint4 [N, ceil(K/2)], scale and zero [N, G] -> w [N, K] fp32: (u - zero) * scale, exactly as
 * formats.decode computes it (the cpu kernel set's prefill: dequantize once, then a GEMM). */
void llmc_dequant_i4g(const uint8_t *packed, const float *scale, const uint8_t *zero, float *w,
                      int64_t N, int64_t K, int64_t gs, int nthreads)
{
    int64_t G = (K + gs - 1) / gs, kb = (K + 1) / 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *pn = packed + n * kb;
        float *wn = w + n * K;
        for (int64_t g = 0; g < G; g++) {
            int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
            float s = scale[n * G + g], z = (float)zero[n * G + g];
            for (int64_t k = k0; k < k1; k++) wn[k] = (nibble(pn, k) - z) * s;
        }
    }
}
