/* llmc fast CPU linear for few rows (decode): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 *
 * x [M, K], w [N, K], y [M, N]: row-major fp32. BLAS libraries are tuned for large M; at decode
 * time M is the batch (1..8) and the matmul is bound by streaming w from memory. Here every weight
 * row is read from memory once per call and reused from L1 for all M input rows, with blocks of
 * NB weight rows x up to 4 input rows accumulated in vector registers. Parallel over weight rows
 * with OpenMP (the process's runtime: torch's libgomp). Reference: kernels/reference/dense.py linear.
 */
#include <stdint.h>

typedef float vf __attribute__((vector_size(64), aligned(4)));   /* 16 floats, unaligned access */
#define VL 16
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

/* ---- weight-only quantized linears: the weight stays packed in memory and is widened one row at
 * a time into a per-thread float buffer, so memory traffic is the packed size.
 * Reference: kernels/reference/dense.py linear over passes/quant/formats.py dequantize. */
#include <stdlib.h>

/* q int8 [N, K], scale [N]: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] */
void llmc_linear_i8(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                    int64_t M, int64_t N, int64_t K, int nthreads)
{
    #pragma omp parallel num_threads(nthreads)
    {
        float *row = malloc(sizeof(float) * (size_t)K);
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const int8_t *qn = q + n * K;
            #pragma omp simd
            for (int64_t k = 0; k < K; k++) row[k] = (float)qn[k];
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = dot(x + m * K, row, K) * scale[n] + (bias ? bias[n] : 0.0f);
        }
        free(row);
    }
}

/* packed uint4 [N, ceil(K/2)] (low nibble first), scale and zero [N, G], groups of gs along K:
 * y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * (u[n, k] - zero[n, g]) */
void llmc_linear_i4g(const float *x, const uint8_t *packed, const float *scale, const uint8_t *zero,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads)
{
    int64_t G = (K + gs - 1) / gs, kb = (K + 1) / 2;
    #pragma omp parallel num_threads(nthreads)
    {
        float *row = malloc(sizeof(float) * (size_t)(K + 1));
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *pn = packed + n * kb;
            #pragma omp simd
            for (int64_t i = 0; i < kb; i++) {
                row[2 * i] = (float)(pn[i] & 15);
                row[2 * i + 1] = (float)(pn[i] >> 4);
            }
            for (int64_t g = 0; g < G; g++) {                  /* (u - z) * s, widened in place */
                int64_t k0 = g * gs, k1 = k0 + gs < K ? k0 + gs : K;
                float z = (float)zero[n * G + g], s = scale[n * G + g];
                #pragma omp simd
                for (int64_t k = k0; k < k1; k++) row[k] = (row[k] - z) * s;
            }
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = dot(x + m * K, row, K) + (bias ? bias[n] : 0.0f);
        }
        free(row);
    }
}
