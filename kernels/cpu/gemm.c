/* llmc fast CPU linear for few rows (decode): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 *
 * x [M, K], w [N, K], y [M, N]: row-major fp32. BLAS libraries are tuned for large M; at decode
 * time M is the batch (1..8) and the matmul is bound by streaming w from memory. Here every weight
 * row is read from memory once per call and reused from L1 for all M input rows, with blocks of
 * NB weight rows x up to 4 input rows accumulated in vector registers. Parallel over weight rows
 * with OpenMP (the process's runtime: torch's libgomp). Reference: kernels/reference/dense.py linear.
 */
#include <stdint.h>

/* The interface version llmc checks after loading this library (native.ABI_VERSION): bump both
 * when an exported function is added, removed or changes its signature. */
#define LLMC_ABI_VERSION 2

int llmc_abi_version(void) { return LLMC_ABI_VERSION; }

/* one vector register of floats: 16 with AVX-512, else 8 (AVX2: a wider generic vector would be split
 * into halves that the int8/int4 widening has to pass through memory) */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));   /* unaligned access */
#define NB 4

static inline float hsum(vf v) { float s = 0.0f; for (int i = 0; i < VL; i++) s += v[i]; return s; }

#define DEFINE_BLOCK(MBX)                                                                          \
static void block_##MBX(const float *x, const float *w, float *y, int64_t m0, int64_t n0,          \
                        int64_t N, int64_t K) {                                                    \
    vf acc[MBX][NB] = {{{0}}};                                                                     \
    const float *xr[MBX], *wr[NB];                                                                 \
    for (int i = 0; i < MBX; i++) xr[i] = x + (m0 + i) * K;                                        \
    for (int j = 0; j < NB; j++) wr[j] = w + (n0 + j) * K;                                         \
    int64_t kv = K - K % VL;                                                                       \
    for (int64_t k = 0; k < kv; k += VL) {                                                         \
        vf wv[NB];                                                                                 \
        for (int j = 0; j < NB; j++) wv[j] = *(const vf *)(wr[j] + k);                             \
        for (int i = 0; i < MBX; i++) {                                                            \
            vf xv = *(const vf *)(xr[i] + k);                                                      \
            for (int j = 0; j < NB; j++) acc[i][j] += xv * wv[j];                                  \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < MBX; i++)                                                                  \
        for (int j = 0; j < NB; j++) {                                                             \
            float s = hsum(acc[i][j]);                                                             \
            for (int64_t k = kv; k < K; k++) s += xr[i][k] * wr[j][k];                             \
            y[(m0 + i) * N + n0 + j] = s;                                                          \
        }                                                                                          \
}
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)

/* one dot product; the simd reduction lets the compiler vectorise and reassociate */
static inline float dot(const float *a, const float *b, int64_t K) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t k = 0; k < K; k++) acc += a[k] * b[k];
    return acc;
}

void llmc_linear_f32(const float *x, const float *w, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int nthreads)
{
    if (M == 1) {                       /* a plain streaming dot per weight row is fastest here */
        #pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = 0; n < N; n++) y[n] = dot(x, w + n * K, K) + (bias ? bias[n] : 0.0f);
        return;
    }
    int64_t nfull = N / NB;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nfull; b++) {
        int64_t n0 = b * NB, m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) block_4(x, w, y, m0, n0, N, K);
        switch (M - m0) {
            case 3: block_3(x, w, y, m0, n0, N, K); break;
            case 2: block_2(x, w, y, m0, n0, N, K); break;
            case 1:
                for (int j = 0; j < NB; j++) y[m0 * N + n0 + j] = dot(x + m0 * K, w + (n0 + j) * K, K);
                break;
        }
    }
    for (int64_t m = 0; m < M; m++)                 /* the last N % NB weight rows */
        for (int64_t n = nfull * NB; n < N; n++) y[m * N + n] = dot(x + m * K, w + n * K, K);
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
}

/* The same product with every output a `dot` of its own, so each row's result is bit-identical
 * whatever the other rows are (the native executor's batch invariance); the weight row stays in L1
 * while the rows of x pass over it, so memory traffic is still one read of w. */
void llmc_linear_f32_rows(const float *x, const float *w, const float *bias, float *y,
                          int64_t M, int64_t N, int64_t K, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *wn = w + n * K;
        for (int64_t m = 0; m < M; m++) y[m * N + n] = dot(x + m * K, wn, K) + (bias ? bias[n] : 0.0f);
    }
}

/* ---- weight-only quantized linears: the weight stays packed in memory and each VL-value piece is
 * widened to floats in registers, once for up to 4 input rows, so memory traffic is the packed size
 * and no float copy of a row is written.
 * Reference: kernels/reference/dense.py linear over passes/quant/formats.py dequantize. */
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* VL int8 -> VL floats (the compilers scalarise __builtin_convertvector from bytes, hence intrinsics) */
static inline vf widen_i8(const int8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = (float)p[i];
    return r;
#endif
}

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

/* q int8 [N, K], scale [N]: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] */
#define DEFINE_I8(MB)                                                                              \
static void i8_rows_##MB(const float *x, int64_t K, const int8_t *qn, float *out, int64_t ostride) { \
    vf acc[MB] = {{0}};                                                                            \
    int64_t kv = K - K % VL;                                                                       \
    for (int64_t k = 0; k < kv; k += VL) {                                                         \
        vf w = widen_i8(qn + k);                                                                   \
        for (int i = 0; i < MB; i++) acc[i] += *(const vf *)(x + i * K + k) * w;                   \
    }                                                                                              \
    for (int i = 0; i < MB; i++) {                                                                 \
        float s = hsum(acc[i]);                                                                    \
        for (int64_t k = kv; k < K; k++) s += x[i * K + k] * (float)qn[k];                         \
        out[i * ostride] = s;                                                                      \
    }                                                                                              \
}
DEFINE_I8(1)
DEFINE_I8(2)
DEFINE_I8(3)
DEFINE_I8(4)

void llmc_linear_i8(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                    int64_t M, int64_t N, int64_t K, int nthreads)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float *xm = x + m0 * K;
            float *out = y + m0 * N + n;
            switch (M - m0 < 4 ? M - m0 : 4) {
                case 4: i8_rows_4(xm, K, qn, out, N); break;
                case 3: i8_rows_3(xm, K, qn, out, N); break;
                case 2: i8_rows_2(xm, K, qn, out, N); break;
                default: i8_rows_1(xm, K, qn, out, N); break;
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = y[m * N + n] * scale[n] + (bias ? bias[n] : 0.0f);
    }
}

/* packed uint4 [N, ceil(K/2)] (element 2i in the low nibble of byte i), scale and zero [N, G], groups
 * of gs along K:  y[m, n] = sum_g scale[n, g] * (sum_{k in g} x[m, k] * u[n, k] - zero[n, g] * xs[m, g])
 * with xs[m, g] = sum_{k in g} x[m, k]. Inside each group, pieces of 2 * VL values (VL bytes) give
 * their even values from the low nibbles and their odd values from the high nibbles; the input is
 * de-interleaved to match once per call (xd: per piece, its VL even values then its VL odd ones).
 * The rest of a group (and every value when gs is odd, so pieces would not start on a byte) is
 * taken one value at a time. */
static inline float nibble(const uint8_t *p, int64_t k) { return (float)((p[k >> 1] >> ((k & 1) * 4)) & 15); }

#define PIECE (2 * VL)
static inline int64_t pieces(int64_t len, int64_t gs) { return gs % 2 ? 0 : len / PIECE; }

#define DEFINE_I4(MB)                                                                              \
static void i4_rows_##MB(const float *xd, const float *xs, int64_t K, int64_t G, int64_t gs,       \
                         const uint8_t *pn, const float *sn, const uint8_t *zn, float *out,        \
                         int64_t ostride) {                                                        \
    vf tot[MB] = {{0}};                                                                            \
    float rest[MB] = {0};                                                                          \
    for (int64_t g = 0; g < G; g++) {                                                              \
        int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K, np = pieces(k1 - k0, gs);             \
        vf acc[MB] = {{0}};                                                                        \
        for (int64_t j = 0; j < np; j++) {                                                         \
            int64_t kb = k0 + PIECE * j;                                                           \
            vf lo, hi;                                                                             \
            widen_u4(pn + kb / 2, &lo, &hi);                                                       \
            for (int i = 0; i < MB; i++)                                                           \
                acc[i] += *(const vf *)(xd + i * K + kb) * lo + *(const vf *)(xd + i * K + kb + VL) * hi; \
        }                                                                                          \
        float s = sn[g], z = (float)zn[g];                                                         \
        for (int i = 0; i < MB; i++) {                                                             \
            float t = 0.0f;                                                                        \
            for (int64_t k = k0 + PIECE * np; k < k1; k++) t += xd[i * K + k] * nibble(pn, k);     \
            tot[i] += s * acc[i];                                                                  \
            rest[i] += s * (t - z * xs[i * G + g]);                                                \
        }                                                                                          \
    }                                                                                              \
    for (int i = 0; i < MB; i++) out[i * ostride] = hsum(tot[i]) + rest[i];                        \
}
DEFINE_I4(1)
DEFINE_I4(2)
DEFINE_I4(3)
DEFINE_I4(4)

void llmc_linear_i4g(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads)
{
    int64_t G = (K + gs - 1) / gs, kb = (K + 1) / 2;
    float *xd = malloc(sizeof(float) * (size_t)(M * K)), *xs = malloc(sizeof(float) * (size_t)(M * G));
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
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float *d = xd + m0 * K, *s = xs + m0 * G;
            const uint8_t *pn = packed + n * kb, *zn = zero + n * G;
            const float *sn = scale + n * G;
            float *out = y + m0 * N + n;
            switch (M - m0 < 4 ? M - m0 : 4) {
                case 4: i4_rows_4(d, s, K, G, gs, pn, sn, zn, out, N); break;
                case 3: i4_rows_3(d, s, K, G, gs, pn, sn, zn, out, N); break;
                case 2: i4_rows_2(d, s, K, G, gs, pn, sn, zn, out, N); break;
                default: i4_rows_1(d, s, K, G, gs, pn, sn, zn, out, N); break;
            }
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
    free(xd);
    free(xs);
}

/* packed uint4 [N, ceil(K/2)], scale and zero [N, G] -> w [N, K] fp32: (u - zero) * scale, exactly as
 * passes/quant/formats.py dequantize computes it (prefill: dequantize once, then a GEMM). */
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
