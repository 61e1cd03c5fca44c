/* llmc fast CPU linears: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), x and y fp32 rows.
 *
 * The weight stays as stored (fp32, bf16, fp16, int8 per channel, packed int4 groups) and is widened
 * to floats in registers, so memory traffic is the stored size and no float copy of the weight is
 * written; w8a8 and w4a8 multiply int8 input codes as integers. Two layouts:
 * - LAYOUT_PACKED (the native executor lays every weight out once at load, llmc_pack_weight): float
 *   kinds, fp8, weight-only int8/int4 and w4a8 in k-major panels of 16 rows, run by outer-product
 *   kernels of up to 6 input rows (no horizontal sums; each widened weight vector feeds every row;
 *   w4a8 sums exact int32 products); w8a8 in tiles of 4 rows of 32-value pieces.
 * - LAYOUT_ROWS (the cpu kernel set's entry points, weights as torch holds them): tiles of MB input
 *   rows x NB weight rows, one vector accumulator per output, its lanes summed at the end.
 * Threads (OpenMP, the runtime torch has loaded) split the weight rows; rows of x are taken in chunks
 * that stay in L2 while the weight passes over them.
 *
 * In either layout every output is accumulated in one order that depends only on k (never on the
 * number of rows, the row's place or the kernel that ran it), then scaled and biased, so a row's
 * result never depends on the other rows (the native executor's batch invariance). Reference:
 * kernels/reference/dense.py linear over kernels/reference/dequant.py; tests/kernels/ hold them to
 * stated tolerances.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "fp8.h"
#include "linear.h"
#include "simd.h"
#include "widen.h"

/* The interface version llmc checks after loading this library (native.ABI_VERSION): bump both
 * when an exported function is added, removed or changes its signature. */
#define LLMC_ABI_VERSION 7

int llmc_abi_version(void) { return LLMC_ABI_VERSION; }

#define MC 48            /* rows of x per chunk: 48 rows of 1536 floats are 288 KiB, inside L2 */

/* ---- LAYOUT_ROWS, float-widenable kinds: MB x NB tiles ---------------------------------------------------------
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
DEFINE_KIND(f32)
DEFINE_KIND(bf16)
DEFINE_KIND(f16)
DEFINE_KIND(i8)
DEFINE_KIND(f8)

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
                         int64_t gs, int deinterleave) {
    int64_t G = (K + gs - 1) / gs;
    int8_t tmp[IPIECE];
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
            int8_t *qg = q + m * K + k0;
            quant_span(x + m * K + k0, qg, k1 - k0, scale + m * G + g, qsum + m * G + g);
            for (int64_t p = 0; deinterleave && p < ipieces(k1 - k0, gs); p++) {
                int8_t *piece = qg + IPIECE * p;
                for (int i = 0; i < IPIECE / 2; i++) { tmp[i] = piece[2 * i]; tmp[IPIECE / 2 + i] = piece[2 * i + 1]; }
                memcpy(piece, tmp, IPIECE);
            }
        }
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
/* the int32 sum of 32 uint4 codes (16 packed bytes) times 32 de-interleaved int8 codes */
static inline int32_t idot_u4_32(const uint8_t *p, const int8_t *xq) {
    v8i l = idot_u4_lanes(p, xq);
    return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
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

/* 8 int32 lanes: lane l sums the products of row l's 8 codes in 4 packed bytes (low nibbles: the
 * first quad of k, high nibbles: the second) with the 8 input codes at xq (exact) */
static inline v8i idot_u4_quads(const uint8_t *b, const int8_t *xq) {
#if defined(__AVX2__)
    __m256i w = _mm256_loadu_si256((const __m256i *)b), m4 = _mm256_set1_epi8(15);
    int32_t qa, qb;
    memcpy(&qa, xq, 4);
    memcpy(&qb, xq + 4, 4);
    __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
    __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(qa)),
                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(qb)));
    return (v8i)_mm256_madd_epi16(s, _mm256_set1_epi16(1));
#else
    v8i r;
    for (int l = 0; l < 8; l++) {
        int32_t sum = 0;
        for (int i = 0; i < 4; i++) sum += (b[4 * l + i] & 15) * xq[i] + (b[4 * l + i] >> 4) * xq[4 + i];
        r[l] = sum;
    }
    return r;
#endif
}

/* ---- LAYOUT_PACKED panels: float kinds, fp8, int8 per channel, weight-only int4 and w4a8 ------------
 * A panel is NR consecutive weight rows (the last panel padded with zero rows) stored k-major: for every
 * k, the NR rows' values at k side by side; int4 keeps a byte per row for every pair of k (low nibble
 * k, high nibble k + 1, as the rows layout packs them), then the panels' scales and zero points, NR a
 * group. A kernel of MR input rows x P panels keeps its MR * P * NR outputs in vector accumulators:
 * each k step loads (and widens) the panels' values once and broadcasts one input value a row, so at
 * MR = 6 each widened weight vector feeds 6 FMAs and no horizontal sum is ever needed. Decode (MR = 1)
 * runs P = 3 panels side by side for independent FMA chains (4 needed more than the 16 AVX2 registers).
 *
 * Every output is accumulated in the order k = 0, 1, ..., K - 1 whatever MR and P (int4: each group in
 * that order, then tot = fma(scale, sum - zero * xsum, tot) over the groups in order), so a row's result
 * never depends on the other rows or on which kernel ran it. */
#define NR 16                   /* rows a panel: two AVX2 vectors of outputs, one AVX-512 vector */
#define NV (NR / VL)
#define MR_MAX 6

static int64_t elem_bytes(int64_t kind) {
    switch (kind) {
        case W_F32: return 4;
        case W_BF16: case W_F16: return 2;
        case W_I8: case W_F8: return 1;
        default: return 0;
    }
}
static int float_panels(const llmc_weight *w) { return elem_bytes(w->kind) > 0; }
static int int4_panels(const llmc_weight *w) {
    return (w->kind == W_I4 && w->k % 2 == 0 && w->group % 2 == 0) ||
           (w->kind == W_I4A8 && w->k % 8 == 0 && w->group % 8 == 0);
}

typedef struct {
    const float *x;                     /* MR input rows, ldx apart */
    int64_t ldx;
    const float *xs;                    /* int4: the rows' group sums, G a row */
    const char *w;                      /* the first panel; the next one pstride bytes on */
    int64_t pstride;
    const float *sc;                    /* int4: the first panel's scales, then its zero points: G * NR */
    const uint8_t *zc;                  /* each; the next panel's G * NR on */
    int64_t K, G, gs;
    const uint8_t *cc;                  /* two-level scales (else NULL): the first panel's codes, G * NR, */
    const float *st;                    /* and steps, S * NR (a step per SG groups); the next panel's on */
    int64_t S, SG;
    float *out;                         /* MR rows of P * NR raw sums */
    const int8_t *xq;                   /* w4a8: the rows' int8 codes (K a row), per group their scale */
    const float *xsc;                   /* and code sum (G a row) */
    const int32_t *xsum;
} panel_args;
typedef void (*panel_fn)(const panel_args *);

#define DEFINE_PANEL(KIND, MR, P)                                                                  \
static void panel_##KIND##_##MR##x##P(const panel_args *a) {                                      \
    vf acc[MR][P][NV];                                                                             \
    for (int i = 0; i < MR; i++)                                                                   \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) acc[i][j][v] = vzero();                                   \
    const float *x = a->x;                                                                         \
    for (int64_t k = 0; k < a->K; k++) {                                                           \
        vf wv[P][NV];                                                                              \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) wv[j][v] = wide_##KIND(a->w + j * a->pstride, k * NR + v * VL); \
        for (int i = 0; i < MR; i++) {                                                             \
            vf xv = vbroadcast(x[i * a->ldx + k]);                                                 \
            for (int j = 0; j < P; j++)                                                            \
                for (int v = 0; v < NV; v++) acc[i][j][v] = vfma(xv, wv[j][v], acc[i][j][v]);      \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < MR; i++)                                                                   \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) *(vf *)(a->out + (i * P + j) * NR + v * VL) = acc[i][j][v]; \
}

/* VL bytes -> VL floats (zero points) */
static inline vf wide_u8(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = (float)p[i];
    return r;
#endif
}

/* int4 panels: SUMS(MR, P, a, k0, k1, acc) adds each group's products to acc, per accumulator in the
 * order k0, k0 + 1, ..., k1 - 1: from the packed bytes (a pair of k widened at a time, used at once), or
 * from a panel already widened to floats [K][NR] for many rows (u exact: the same sums to the bit) */
#define I4_BYTES(MR, P, a, k0, k1, acc)                                                            \
    for (int64_t k = k0; k < k1; k += 2)                                                           \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) {                                                         \
                vf lo, hi;                                                                         \
                widen_u4((const uint8_t *)a->w + j * a->pstride + (k >> 1) * NR + v * VL, &lo, &hi); \
                for (int i = 0; i < MR; i++)                                                       \
                    acc[i][j][v] = vfma(vbroadcast(a->x[i * a->ldx + k + 1]), hi,                  \
                                        vfma(vbroadcast(a->x[i * a->ldx + k]), lo, acc[i][j][v])); \
            }
#define I4_FLOATS(MR, P, a, k0, k1, acc)                                                           \
    for (int64_t k = k0; k < k1; k++) {                                                            \
        vf wv[P][NV];                                                                              \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) wv[j][v] = *(const vf *)((const float *)a->w + k * NR + v * VL); \
        for (int i = 0; i < MR; i++) {                                                             \
            vf xv = vbroadcast(a->x[i * a->ldx + k]);                                              \
            for (int j = 0; j < P; j++)                                                            \
                for (int v = 0; v < NV; v++) acc[i][j][v] = vfma(xv, wv[j][v], acc[i][j][v]);      \
        }                                                                                          \
    }
#define DEFINE_PANEL_I4(NAME, SUMS, MR, P)                                                         \
static void NAME##_##MR##x##P(const panel_args *a) {                                              \
    float *tot = a->out;                 /* per group: sum = -zero * xsum + the products, */       \
    for (int i = 0; i < MR * P * NR; i++) tot[i] = 0.0f;     /* tot = fma(scale, sum, tot) */      \
    vf acc[MR][P][NV];                                                                             \
    for (int64_t g = 0; g < a->G; g++) {                                                           \
        int64_t k0 = g * a->gs, k1 = k0 + a->gs < a->K ? k0 + a->gs : a->K;                        \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) {                                                         \
                vf nz = -wide_u8(a->zc + (j * a->G + g) * NR + v * VL);                            \
                for (int i = 0; i < MR; i++) acc[i][j][v] = nz * vbroadcast(a->xs[i * a->G + g]);  \
            }                                                                                      \
        SUMS(MR, P, a, k0, k1, acc)                                                                \
        int64_t q = a->cc ? g / a->SG : 0;  /* two-level: s = code * step, what `scale` holds */     \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NV; v++) {                                                         \
                int64_t at = (j * a->G + g) * NR + v * VL;                                         \
                vf s = a->cc ? wide_u8(a->cc + at) * *(const vf *)(a->st + (j * a->S + q) * NR + v * VL) \
                             : *(const vf *)(a->sc + at);                                          \
                for (int i = 0; i < MR; i++) {                                                     \
                    vf *t = (vf *)(tot + (i * P + j) * NR + v * VL);                               \
                    *t = vfma(s, acc[i][j][v], *t);                                                \
                }                                                                                  \
            }                                                                                      \
    }                                                                                              \
}

/* the kernels of a kind by [MR][P]: P panels at most PANELS[MR] (MR * P * NR accumulators fit the
 * registers: one row runs 3, not 4, whose 8 accumulators and 8 weight vectors spilled); MR >= 4 runs one
 * panel at a time */
static const int PANELS[MR_MAX + 1] = {0, 3, 3, 2, 1, 1, 1};
#define DEFINE_PANELS(KIND, DEF)                                                                   \
DEF(KIND, 1, 1) DEF(KIND, 1, 2) DEF(KIND, 1, 3) DEF(KIND, 2, 1) DEF(KIND, 2, 2)                    \
DEF(KIND, 2, 3) DEF(KIND, 3, 1) DEF(KIND, 3, 2) DEF(KIND, 4, 1) DEF(KIND, 5, 1) DEF(KIND, 6, 1)    \
static const panel_fn PANEL_##KIND[MR_MAX + 1][4] = {                                              \
    {0}, {0, panel_##KIND##_1x1, panel_##KIND##_1x2, panel_##KIND##_1x3},                          \
    {0, panel_##KIND##_2x1, panel_##KIND##_2x2, panel_##KIND##_2x3}, {0, panel_##KIND##_3x1, panel_##KIND##_3x2}, \
    {0, panel_##KIND##_4x1}, {0, panel_##KIND##_5x1}, {0, panel_##KIND##_6x1}};
#define DEF_FLOAT(KIND, MR, P) DEFINE_PANEL(KIND, MR, P)
#define DEF_I4(KIND, MR, P) DEFINE_PANEL_I4(panel_i4, I4_BYTES, MR, P)
DEFINE_PANELS(f32, DEF_FLOAT)
DEFINE_PANELS(bf16, DEF_FLOAT)
DEFINE_PANELS(f16, DEF_FLOAT)
DEFINE_PANELS(i8, DEF_FLOAT)
DEFINE_PANELS(f8, DEF_FLOAT)
DEFINE_PANELS(i4, DEF_I4)
DEFINE_PANEL_I4(panel_i4f, I4_FLOATS, 1, 1) DEFINE_PANEL_I4(panel_i4f, I4_FLOATS, 2, 1)
DEFINE_PANEL_I4(panel_i4f, I4_FLOATS, 3, 1) DEFINE_PANEL_I4(panel_i4f, I4_FLOATS, 4, 1)
DEFINE_PANEL_I4(panel_i4f, I4_FLOATS, 5, 1) DEFINE_PANEL_I4(panel_i4f, I4_FLOATS, 6, 1)
static const panel_fn PANEL_i4f[MR_MAX + 1] = {0, panel_i4f_1x1, panel_i4f_2x1, panel_i4f_3x1, panel_i4f_4x1,
                                               panel_i4f_5x1, panel_i4f_6x1};

/* w4a8 panels: for every 8 values of k (two quads), 32 bytes for each 8 rows of the panel: row l's 4
 * bytes hold its codes at the first quad (low nibbles) and the second (high nibbles). A quad of input
 * codes broadcast to every lane meets each row's 4 codes in one maddubs (pairs, int16: at most
 * 2 * 15 * 127 twice) and one madd (quads, int32), so each lane sums one output's products exactly;
 * per group: (sum - zero * code sum) * (weight scale * input scale) added to the output with one FMA. */
#define DEFINE_PANEL_I4A8(KIND, MR, P)                                                             \
static void panel_i4a8_##MR##x##P(const panel_args *a) {                                          \
    float *tot = a->out;                                                                           \
    for (int i = 0; i < MR * P * NR; i++) tot[i] = 0.0f;                                           \
    for (int64_t g = 0; g < a->G; g++) {                                                           \
        int64_t k0 = g * a->gs, k1 = k0 + a->gs < a->K ? k0 + a->gs : a->K;                        \
        int64_t q = a->cc ? g / a->SG : 0;                                                         \
        v8i acc[MR][P][NR / 8];                                                                    \
        for (int i = 0; i < MR; i++)                                                               \
            for (int j = 0; j < P; j++)                                                            \
                for (int v = 0; v < NR / 8; v++) acc[i][j][v] = (v8i){0};                          \
        for (int64_t k = k0; k < k1; k += 8)                                                       \
            for (int j = 0; j < P; j++)                                                            \
                for (int v = 0; v < NR / 8; v++) {                                                 \
                    const uint8_t *b = (const uint8_t *)a->w + j * a->pstride + (k >> 3) * 4 * NR + v * 32; \
                    for (int i = 0; i < MR; i++)                                                   \
                        acc[i][j][v] += idot_u4_quads(b, a->xq + i * a->ldx + k);                  \
                }                                                                                  \
        for (int j = 0; j < P; j++)                                                                \
            for (int v = 0; v < NR / 8; v++) {                                                     \
                int64_t at = (j * a->G + g) * NR + v * 8;                                          \
                v8f sw;                                                                            \
                if (a->cc == NULL) sw = *(const v8f *)(a->sc + at);                                \
                else                                                                               \
                    for (int l = 0; l < 8; l++)                                                    \
                        sw[l] = (float)a->cc[at + l] * a->st[(j * a->S + q) * NR + v * 8 + l];     \
                v8i z;                                                                             \
                for (int l = 0; l < 8; l++) z[l] = a->zc[at + l];                                  \
                for (int i = 0; i < MR; i++) {                                                     \
                    v8f *t = (v8f *)(tot + (i * P + j) * NR + v * 8);                              \
                    v8i c = acc[i][j][v] - z * a->xsum[i * a->G + g];                              \
                    *t = v8fma(v8cvt(c), sw * a->xsc[i * a->G + g], *t);                          \
                }                                                                                  \
            }                                                                                      \
    }                                                                                              \
}
DEFINE_PANELS(i4a8, DEFINE_PANEL_I4A8)

/* an int4 panel's codes as floats, [K][NR] (k even) */
static void widen_i4_panel(const uint8_t *b, int64_t K, float *f) {
    for (int64_t k = 0; k < K; k += 2)
        for (int v = 0; v < NV; v++) {
            vf lo, hi;
            widen_u4(b + (k >> 1) * NR + v * VL, &lo, &hi);
            *(vf *)(f + k * NR + v * VL) = lo;
            *(vf *)(f + (k + 1) * NR + v * VL) = hi;
        }
}
#define WIDEN_ROWS (2 * MR_MAX)   /* rows from which a chunk widens each int4 panel once for all of them */

static const panel_fn (*panel_table(int64_t kind))[4] {
    switch (kind) {
        case W_F32: return PANEL_f32;
        case W_BF16: return PANEL_bf16;
        case W_F16: return PANEL_f16;
        case W_I8: return PANEL_i8;
        case W_F8: return PANEL_f8;
        case W_I4A8: return PANEL_i4a8;
        default: return PANEL_i4;
    }
}

static int is_int4(const llmc_weight *w) { return w->kind == W_I4 || w->kind == W_I4A8; }

static int64_t panel_stride(const llmc_weight *w) {
    return is_int4(w) ? (w->k / 2) * NR : w->k * NR * elem_bytes(w->kind);
}

/* two-level scales: steps a panel (a step per super_groups groups) */
static int64_t panel_steps(const llmc_weight *w, int64_t G) {
    return w->super_groups > 0 ? (G + w->super_groups - 1) / w->super_groups : 0;
}

/* after the codes: per panel G * NR fp32 scales, then G * NR zero points; with two-level scales G * NR
 * scale codes, G * NR zero points, then S * NR fp32 steps (2.5 bytes a group and row in groups of 8,
 * not 5) */
static void panels_bytes(const llmc_weight *w, int64_t *data, int64_t *total) {
    int64_t np = (w->n + NR - 1) / NR, G = is_int4(w) ? (w->k + w->group - 1) / w->group : 0;
    *data = np * panel_stride(w);
    if (w->super_groups > 0)
        *total = *data + np * NR * (2 * G + panel_steps(w, G) * (int64_t)sizeof(float));
    else
        *total = *data + np * G * NR * (int64_t)(sizeof(float) + 1);
}

static void pack_panels(const llmc_weight *w, char *dst) {
    int64_t N = w->n, K = w->k, ps = panel_stride(w), data, total;
    panels_bytes(w, &data, &total);
    if (is_int4(w)) {
        int64_t kb = K / 2, G = (K + w->group - 1) / w->group, np = (N + NR - 1) / NR, S = panel_steps(w, G);
        const uint8_t *src = (const uint8_t *)w->data;
        int two = w->super_groups > 0;
        float *sc = two ? NULL : (float *)(dst + data);
        uint8_t *cc = two ? (uint8_t *)(dst + data) : NULL;
        uint8_t *zc = two ? cc + np * G * NR : (uint8_t *)(sc + np * G * NR);
        float *st = two ? (float *)(zc + np * G * NR) : NULL;
        for (int64_t n = 0; n < N; n++) {
            int64_t p = n / NR, j = n % NR;
            if (w->kind == W_I4)           /* the rows layout's bytes, a pair of k at a time, NR rows side by side */
                for (int64_t b = 0; b < kb; b++) dst[p * ps + b * NR + j] = (char)src[n * kb + b];
            else                           /* per 8 values of k and 8 rows: 4 bytes a row, quads in the nibbles */
                for (int64_t k = 0; k < K; k += 8)
                    for (int i = 0; i < 4; i++) {
                        uint8_t lo = (src[n * kb + (k + i) / 2] >> (((k + i) & 1) * 4)) & 15;
                        uint8_t hi = (src[n * kb + (k + 4 + i) / 2] >> (((k + 4 + i) & 1) * 4)) & 15;
                        dst[p * ps + (k / 8) * 4 * NR + (j / 8) * 32 + (j % 8) * 4 + i] = (char)(lo | hi << 4);
                    }
            for (int64_t g = 0; g < G; g++) {
                if (two) cc[(p * G + g) * NR + j] = w->scale_code[n * G + g];
                else sc[(p * G + g) * NR + j] = w->scale[n * G + g];
                zc[(p * G + g) * NR + j] = w->zero[n * G + g];
            }
            for (int64_t q = 0; q < S; q++) st[(p * S + q) * NR + j] = w->scale_step[n * S + q];
        }
        return;
    }
    int64_t es = elem_bytes(w->kind);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++)
            memcpy(dst + (n / NR) * ps + (k * NR + n % NR) * es, (const char *)w->data + (n * K + k) * es, (size_t)es);
}

/* y [M, N] from panels: threads take contiguous ranges of panels; few rows (M < MR_MAX) run as one
 * block across up to PANELS[M] panels at a time, many rows panel by panel in chunks of rows that stay
 * in L2 while the panel is reused from L1 by every block of MR_MAX rows */
static void run_panels(const llmc_weight *w, const float *x, const float *xs, const int8_t *xq, const float *xsc,
                       const int32_t *xsum, int64_t M, float *y, int nthreads) {
    int64_t N = w->n, K = w->k, np = (N + NR - 1) / NR, ps = panel_stride(w), data, total;
    int64_t G = is_int4(w) ? (K + w->group - 1) / w->group : 0;
    panels_bytes(w, &data, &total);
    int64_t S = is_int4(w) ? panel_steps(w, G) : 0;
    int two = is_int4(w) && w->super_groups > 0;
    const char *tail = (const char *)w->data + data;
    const float *sc = is_int4(w) && !two ? (const float *)tail : NULL;
    const uint8_t *cc = two ? (const uint8_t *)tail : NULL;
    const uint8_t *zc = !is_int4(w) ? NULL : two ? cc + np * G * NR : (const uint8_t *)(sc + np * G * NR);
    const float *st = two ? (const float *)(zc + np * G * NR) : NULL;
    const panel_fn (*table)[4] = panel_table(w->kind);
    int64_t mc = (65536 / (K > 0 ? K : 1)) / MR_MAX * MR_MAX;        /* 256 KiB of inputs a chunk */
    mc = mc < MR_MAX ? MR_MAX : mc;
    #pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int64_t t = 0, T = 1;
#endif
        int64_t p0 = np * t / T, p1 = np * (t + 1) / T;
        float out[MR_MAX * 4 * NR], *wide = NULL;
        panel_args a = {x, K, xs, NULL, ps, NULL, NULL, K, G, w->group, NULL, NULL, S,
                        w->super_groups > 0 ? w->super_groups : 1, out, xq, xsc, xsum};
        for (int64_t m0 = 0; m0 < M; m0 += mc) {
            int64_t m1 = m0 + mc < M ? m0 + mc : M;
            int64_t step = m1 - m0 < MR_MAX ? PANELS[m1 - m0] : 1;
            for (int64_t p = p0; p < p1; p += step) {
                int64_t P = p1 - p < step ? p1 - p : step;
                a.w = (const char *)w->data + p * ps;
                a.sc = sc ? sc + p * G * NR : NULL;
                a.zc = zc ? zc + p * G * NR : NULL;
                a.cc = cc ? cc + p * G * NR : NULL;
                a.st = st ? st + p * S * NR : NULL;
                int widened = w->kind == W_I4 && m1 - m0 >= WIDEN_ROWS;
                if (widened) {
                    if (wide == NULL) wide = malloc(sizeof(float) * (size_t)(K * NR));
                    widen_i4_panel((const uint8_t *)a.w, K, wide);
                    a.w = (const char *)wide;
                }
                /* the chunk's rows in nb blocks as even as possible (8 rows: 4 + 4, not 6 + 2, whose
                 * 2-row block had too few accumulators to hide the FMA latency); weight-only int4 in
                 * blocks of MR_MAX (its 4- and 5-row kernels measured slower than a short last block) */
                int64_t rows = m1 - m0, nb = (rows + MR_MAX - 1) / MR_MAX, even = w->kind != W_I4;
                for (int64_t bi = 0; bi < nb; bi++) {
                    int64_t m = even ? m0 + rows * bi / nb : m0 + bi * MR_MAX;
                    int64_t mr = even ? m0 + rows * (bi + 1) / nb - m : (m1 - m < MR_MAX ? m1 - m : MR_MAX);
                    a.x = x + m * K;
                    a.xs = xs ? xs + m * G : NULL;
                    if (xq) a.xq = xq + m * K, a.xsc = xsc + m * G, a.xsum = xsum + m * G;
                    if (widened) PANEL_i4f[mr](&a);
                    else table[mr][P](&a);
                    for (int64_t i = 0; i < mr; i++)
                        for (int64_t c = 0; c < P * NR && p * NR + c < N; c++) {
                            int64_t n = p * NR + c;
                            float v = out[i * P * NR + c];
                            if (w->kind == W_I8 || w->kind == W_F8) v *= w->scale[n];
                            y[(m + i) * N + n] = w->bias ? v + w->bias[n] : v;
                        }
                }
            }
        }
        free(wide);
    }
}

/* w8a8 in LAYOUT_PACKED tiles: pieces of 32 int8 values, 32 bytes of each of the tile's 4 rows in turn; the
 * products summed exactly in int32 lanes, so the result is the rows layout's to the bit */
static int int8_tiles(const llmc_weight *w) { return w->kind == W_I8A8 && w->k % IPIECE == 0; }

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
        for (int64_t k = 0; k < K; k += IPIECE, b += 4 * IPIECE)
            for (int j = 0; j < 4; j++) ip[j] += idot_i8_lanes(b + j * IPIECE, x + k);
        for (int64_t j = 0; j < nb; j++) {
            int32_t sum = 0;
            for (int l = 0; l < 8; l++) sum += ip[j][l];
            y[m * N + n0 + j] = (float)sum * (xsc[m] * w->scale[n0 + j]);
        }
    }
}

/* ---- LAYOUT_PACKED ---------------------------------------------------------------------------------- */
int64_t llmc_packed_bytes(const llmc_weight *w) {
    if (int8_tiles(w)) return ((w->n + 3) / 4) * 4 * w->k;
    if (float_panels(w) || int4_panels(w)) {
        int64_t data, total;
        panels_bytes(w, &data, &total);
        return total;
    }
    return 0;
}

void llmc_pack_weight(const llmc_weight *w, void *dst) {
    int64_t K = w->k;
    const char *src = (const char *)w->data;
    memset(dst, 0, (size_t)llmc_packed_bytes(w));
    if (int8_tiles(w)) {             /* per piece of 32 values, 32 bytes of each row in turn */
        for (int64_t n = 0; n < w->n; n++)
            for (int64_t q = 0; q < K / IPIECE; q++)
                memcpy((char *)dst + (n / 4) * 4 * K + (q * 4 + n % 4) * IPIECE, src + n * K + q * IPIECE, IPIECE);
    } else if (float_panels(w) || int4_panels(w))
        pack_panels(w, (char *)dst);
}

/* ---- the driver ------------------------------------------------------------------------------------ */
static int64_t row_bytes(const llmc_weight *w) {
    switch (w->kind) {
        case W_F32: return 4 * w->k;
        case W_BF16: case W_F16: return 2 * w->k;
        case W_I8: case W_I8A8: case W_F8: return w->k;
        default: return (w->k + 1) / 2;
    }
}

void llmc_linear_weight(const llmc_weight *w, const float *x, float *y, int64_t M, int nthreads) {
    if (w->kind == W_F8 && w->act_scale) {  /* the inputs through fp8 first, as the reference does */
        float *xf = malloc(sizeof(float) * (size_t)(M * w->k)), s = *w->act_scale;
        for (int64_t i = 0; i < M * w->k; i++) xf[i] = fake_quant_e4m3(x[i], s);
        llmc_weight plain = *w;
        plain.act_scale = NULL;
        llmc_linear_weight(&plain, xf, y, M, nthreads);
        free(xf);
        return;
    }
    int64_t N = w->n, K = w->k, ldw = row_bytes(w), nblocks = (N + 3) / 4;
    int packed = w->layout == LAYOUT_PACKED;
    if (packed && (float_panels(w) || is_int4(w))) {
        float *xs = NULL, *xsc = NULL;
        int8_t *xq = NULL;
        int32_t *xsum = NULL;
        int64_t gs = w->group, G = is_int4(w) ? (K + gs - 1) / gs : 0;
        if (w->kind == W_I4) {              /* the rows' group sums, each in the order of k */
            xs = malloc(sizeof(float) * (size_t)(M * G));
            for (int64_t m = 0; m < M; m++)
                for (int64_t g = 0; g < G; g++) {
                    float sum = 0.0f;
                    for (int64_t k = g * gs; k < (g + 1) * gs && k < K; k++) sum += x[m * K + k];
                    xs[m * G + g] = sum;
                }
        } else if (w->kind == W_I4A8) {     /* the rows' codes, per group their scale and sum */
            xq = malloc((size_t)(M * K));
            xsc = malloc(sizeof(float) * (size_t)(M * G));
            xsum = malloc(sizeof(int32_t) * (size_t)(M * G));
            quant_groups(x, xq, xsc, xsum, M, K, gs, 0);
        }
        run_panels(w, x, xs, xq, xsc, xsum, M, y, nthreads);
        free(xs);
        free(xq);
        free(xsc);
        free(xsum);
        return;
    }
    float *xd = NULL, *xs = NULL;
    int8_t *xq = NULL;
    int32_t *xsum = NULL;
    if (w->kind == W_I4) {
        int64_t G = (K + w->group - 1) / w->group;
        xd = malloc(sizeof(float) * (size_t)(M * K));
        xs = malloc(sizeof(float) * (size_t)(M * G));
        i4_prepare(x, xd, xs, M, K, w->group);
    } else if (w->kind == W_I4A8 || w->kind == W_I8A8) {
        int64_t span = w->kind == W_I4A8 ? w->group : K, G = (K + span - 1) / span;
        xq = malloc((size_t)(M * K));
        xs = malloc(sizeof(float) * (size_t)(M * G));
        xsum = malloc(sizeof(int32_t) * (size_t)(M * G));
        if (w->kind == W_I4A8) quant_groups(x, xq, xs, xsum, M, K, span, 1);
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
            if (packed && w->kind == W_I8A8) i8a8t_block(w, xq, xs, m0, m1, n0, nb, y);
            else switch (w->kind) {
                case W_F32: block_f32(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_BF16: block_bf16(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_F16: block_f16(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_I8: block_i8(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_F8: block_f8(x, m0, m1, K, wn, ldw, nb, y + n0, N); break;
                case W_I4: block_i4(xd, xs, m0, m1, K, w->group, w, n0, nb, y, N); break;
                case W_I4A8: case W_I8A8: block_int(w, xq, xs, xsum, m0, m1, n0, nb, y); break;
            }
            if (w->kind == W_I8 || w->kind == W_F8)
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
    llmc_weight lw = {W_F32, N, K, 0, w, NULL, NULL, bias, LAYOUT_ROWS, NULL};
    llmc_linear_weight(&lw, x, y, M, nthreads);
}

void llmc_linear_i8(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                    int64_t M, int64_t N, int64_t K, int nthreads) {
    llmc_weight lw = {W_I8, N, K, 0, q, scale, NULL, bias, LAYOUT_ROWS, NULL};
    llmc_linear_weight(&lw, x, y, M, nthreads);
}

void llmc_linear_i4g(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    llmc_weight lw = {W_I4, N, K, gs, packed, scale, zero, bias, LAYOUT_ROWS, NULL};
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