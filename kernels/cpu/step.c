/* llmc native executor: one call runs a whole step of the optimised Graph over a ragged batch.
 *
 * Python lowers the Graph once, at load, to a plan (llmc/backends/native.py): an array of ops over
 * values that live in one workspace (a value is `width` floats per row, `ld` apart, at `off`), with
 * the weights laid out for the kernels (fused q/k/v and gate/up matrices concatenated). Each step
 * passes the batch (tokens, positions, KV slots, per sequence its rows, context and block table) and
 * gets the logits of the rows that sample. Every op has a reference twin in kernels/reference/, and
 * tests/kernels/test_native_step.py holds the two to stated tolerances.
 *
 * Batch invariance: every row is computed on its own, in a fixed order that does not depend on the
 * other rows or on where the row lands (the linears accumulate each row the same way whatever the
 * number of rows; attention runs per row, KV head and aligned chunk of keys), so a request's logits
 * are bit-identical whatever else is in the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fp8.h"
#include "linear.h"
#include "simd.h"
#include "widen.h"

enum { OP_EMBED = 1, OP_RMS_NORM, OP_ADD, OP_ADD_RMS_NORM, OP_LINEAR, OP_SILU_MUL, OP_GATE_UP_SILU,
       OP_ROPE, OP_ATTENTION, OP_LOGITS };

typedef struct { int64_t off, ld, width; } llmc_val;

typedef struct {
    int64_t op;
    int64_t in[3], out[2];               /* value ids (-1: none) */
    llmc_weight w;                       /* linears, logits, embed (table: data), norms (data: weight [group]) */
    int64_t i[6];                        /* norm: group | rope: head_dim | attention: layer, heads, kv heads,
                                            head_dim, window (0: none) | gate_up: intermediate size */
    double f[2];                         /* norm: eps | attention: scale */
    const float *cos, *sin;              /* rope: tables [max_positions, head_dim / 2] */
    int64_t kv_kind;                     /* attention: how the cache stores K and V (KV_*) */
    const float *k_scale, *v_scale;      /* attention, KV_I8 / KV_F8: per KV head [kv_heads] */
} llmc_op;

/* KV-cache element formats: fp32, 16-bit floats (as the model computes), or one byte with a static
 * scale per KV head: int8 (round half to even, +-127) or fp8 e4m3 (saturating at +-448), as
 * kernels/reference/kv_quant.py encodes them */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3, KV_F8 = 4 };

typedef struct {
    int64_t nops;
    const llmc_op *ops;
    const llmc_val *vals;
    float *ws;                            /* the workspace every value lives in */
    void *const *k_cache, *const *v_cache;    /* per layer: [num_blocks, block_size, kv_heads, head_dim] */
    int64_t block_size;
    int nthreads;
    double *op_seconds;                   /* [nops]: each op's wall time is added here (NULL: not timed) */
} llmc_plan;

typedef struct {
    int64_t T, S;                         /* rows, sequences */
    const int64_t *tokens, *positions, *slots;           /* [T] */
    const int64_t *q_start, *q_len, *ctx_len;            /* [S] */
    const int64_t *block_tables;                          /* [S, max_blocks] */
    int64_t max_blocks;
    int64_t nlogits;
    const int64_t *logit_rows;                            /* [nlogits] */
    float *logits;                                        /* [nlogits, vocab] */
} llmc_batch;

#define V(p, id) (&(p)->vals[id])
#define ROW(p, id, r) ((p)->ws + V(p, id)->off + (r) * V(p, id)->ld)

/* x / rms(x) * weight over consecutive groups of `group` features; the sum of squares in float, in
 * order (the reference computes it in fp32 too) */
static void rms_norm_row(const float *x, const float *weight, float *y, int64_t width, int64_t group, double eps) {
    for (int64_t g0 = 0; g0 < width; g0 += group) {
        float ss = 0.0f;
        for (int64_t j = 0; j < group; j++) ss += x[g0 + j] * x[g0 + j];
        float r = 1.0f / sqrtf(ss / (float)group + (float)eps);
        for (int64_t j = 0; j < group; j++) y[g0 + j] = weight[j] * (x[g0 + j] * r);
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* y = silu(g) * u over n values; with AVX2 8 at a time: e = exp(-|g|) (never overflows), silu(g) =
 * g / (1 + e) for g >= 0 and g e / (1 + e) below (scalar expf took a fifth of a w4a8 decode's
 * gate_up op) */
static void silu_mul_row(const float *g, const float *u, float *y, int64_t n) {
    int64_t j = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= n; j += 8) {
        __m256 gv = _mm256_loadu_ps(g + j);
        __m256 e = (__m256)vexp((vf)_mm256_or_ps(gv, sign));              /* exp(-|g|) */
        __m256 num = _mm256_blendv_ps(gv, _mm256_mul_ps(gv, e), gv);      /* by g's sign bit */
        _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < n; j++) y[j] = silu(g[j]) * u[j];
}

/* rotate-half rope of `heads` heads of d at one position, from the tables */
static void rope_row(const float *x, float *y, int64_t heads, int64_t d, const float *c, const float *s) {
    int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        const float *xh = x + h * d;
        float *yh = y + h * d;
        for (int64_t j = 0; j < half; j++) {
            float a = xh[j], b = xh[j + half];
            yh[j] = a * c[j] - b * s[j];
            yh[j + half] = b * c[j] + a * s[j];
        }
    }
}

/* q . k over d values: VL lanes in two chains, summed pairwise, then the rest */
static inline float dot_d(const float *q, const float *k, int64_t d) {
    vf a0 = vzero(), a1 = vzero();                       /* two chains: even and odd pieces */
    int64_t e = 0;
    for (; e + 2 * VL <= d; e += 2 * VL) {
        a0 = vfma(*(const vf *)(q + e), *(const vf *)(k + e), a0);
        a1 = vfma(*(const vf *)(q + e + VL), *(const vf *)(k + e + VL), a1);
    }
    for (; e + VL <= d; e += VL) a0 = vfma(*(const vf *)(q + e), *(const vf *)(k + e), a0);
    float s = hsum_pairs(a0 + a1);
    for (; e < d; e++) s = fmaf(q[e], k[e], s);
    return s;
}

/* out += p * v over d values */
static inline void axpy_d(float p, const float *v, float *out, int64_t d) {
    vf pv = vbroadcast(p);
    int64_t e = 0;
    for (; e + VL <= d; e += VL) *(vf *)(out + e) = vfma(pv, *(const vf *)(v + e), *(const vf *)(out + e));
    for (; e < d; e++) out[e] = fmaf(p, v[e], out[e]);
}

/* ---- KV-cache values ---------------------------------------------------------------------------- */
static int64_t kv_bytes(int64_t kind) { return kind == KV_F32 ? 4 : kind <= KV_F16 ? 2 : 1; }

int llmc_e4m3_encode(const float *x, uint8_t *y, int64_t n) {     /* for tests: the encoder as is */
    for (int64_t i = 0; i < n; i++) y[i] = float_to_e4m3(x[i]);
    return 0;
}

static void kv_encode(const float *x, void *dst, int64_t kind, float scale, int64_t d) {
    switch (kind) {
        case KV_F32: memcpy(dst, x, sizeof(float) * (size_t)d); break;
        case KV_BF16:
            for (int64_t e = 0; e < d; e++) {
                uint32_t u;
                memcpy(&u, x + e, 4);
                ((uint16_t *)dst)[e] = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
            }
            break;
        case KV_F16: for (int64_t e = 0; e < d; e++) ((_Float16 *)dst)[e] = (_Float16)x[e]; break;
        case KV_I8:
            for (int64_t e = 0; e < d; e++) {
                float v = nearbyintf(x[e] / scale);
                ((int8_t *)dst)[e] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
            }
            break;
        case KV_F8:
            for (int64_t e = 0; e < d; e++) {
                float v = x[e] / scale;
                ((uint8_t *)dst)[e] = float_to_e4m3(v > 448.0f ? 448.0f : v < -448.0f ? -448.0f : v);
            }
            break;
    }
}

/* d stored values -> floats (exact: the widening is the same as the linears'), VL at a time */
static void kv_decode(const void *src, float *y, int64_t kind, float scale, int64_t d) {
    int64_t e = 0;
    switch (kind) {
        case KV_BF16:
            for (; e + VL <= d; e += VL) *(vf *)(y + e) = wide_bf16(src, e);
            for (; e < d; e++) y[e] = one_bf16(src, e);
            break;
        case KV_F16:
            for (; e + VL <= d; e += VL) *(vf *)(y + e) = wide_f16(src, e);
            for (; e < d; e++) y[e] = one_f16(src, e);
            break;
        case KV_I8:
            for (; e + VL <= d; e += VL) *(vf *)(y + e) = wide_i8(src, e) * scale;
            for (; e < d; e++) y[e] = one_i8(src, e) * scale;
            break;
        case KV_F8:
            for (; e + VL <= d; e += VL) *(vf *)(y + e) = wide_f8(src, e) * scale;
            for (; e < d; e++) y[e] = one_f8(src, e) * scale;
            break;
    }
}

/* the float rows of keys (or values) [a, c] of KV head kv: pointers into an fp32 cache, else each row
 * decoded into buf (d floats a row) */
static void kv_rows(const void *cache, int64_t kind, float scale, const int64_t *table, int64_t a, int64_t c,
                    int64_t bs, int64_t kvh, int64_t kv, int64_t d, float *buf, const float **rows) {
    int64_t eb = kv_bytes(kind);
    for (int64_t j = a; j <= c;) {
        int64_t off = j % bs, n = bs - off < c + 1 - j ? bs - off : c + 1 - j;
        const char *r = (const char *)cache + ((table[j / bs] * bs + off) * kvh + kv) * d * eb;
        for (int64_t i = 0; i < n; i++, j++, r += kvh * d * eb) {
            if (kind == KV_F32) rows[j - a] = (const float *)r;
            else {
                kv_decode(r, buf + (j - a) * d, kind, scale, d);
                rows[j - a] = buf + (j - a) * d;
            }
        }
    }
}

/* ask for rows [a, c] of KV head kv (d values, eb bytes each) to be brought into the caches: a chunk's
 * rows are short runs scattered over the cache, too short for the hardware prefetcher, so without this
 * each row waited for memory in turn */
static void kv_prefetch(const void *cache, int64_t eb, const int64_t *table, int64_t a, int64_t c, int64_t bs,
                        int64_t kvh, int64_t kv, int64_t d) {
    for (int64_t j = a; j <= c; j++) {
        const char *r = (const char *)cache + ((table[j / bs] * bs + j % bs) * kvh + kv) * d * eb;
        for (int64_t o = 0; o < d * eb; o += 64) __builtin_prefetch(r + o, 0, 3);
    }
}

/* Attention of a query row runs in chunks of CHUNK positions (aligned to multiples of CHUNK, so they
 * depend only on the row's own position and window): each chunk of each KV head is a unit whose
 * max, sum and weighted values are kept, and the chunks of a row's heads are merged in order afterwards
 * (flash-decoding's split along the keys). A decode row of 256 positions and 3 KV heads gives 24 units
 * instead of 3, so two threads share it evenly; a prefill's rows share each chunk's decoded keys (the
 * tiles below). Everything a row computes depends only on the row, never on the batch. */
#define CHUNK 32
#define WAVE_FLOATS (1 << 20)       /* scratch of one wave of rows: 4 MiB */

/* o[e] = sum_j p[j] * v[j][e] over n rows, for every e in the order of j: a block of up to 8 vectors
 * of o is held in registers while the rows pass (accumulating in memory, each row's update waited
 * for the previous one's store) */
static void weigh_values(const float *p, const float *const *v, int64_t n, int64_t d, float *o) {
    int64_t e = 0;
    for (; e + 8 * VL <= d; e += 8 * VL) {
        vf acc[8];
        for (int t = 0; t < 8; t++) acc[t] = vzero();
        for (int64_t j = 0; j < n; j++) {
            vf pj = vbroadcast(p[j]);
            for (int t = 0; t < 8; t++) acc[t] = vfma(pj, *(const vf *)(v[j] + e + t * VL), acc[t]);
        }
        for (int t = 0; t < 8; t++) *(vf *)(o + e + t * VL) = acc[t];
    }
    for (; e + VL <= d; e += VL) {
        vf acc = vzero();
        for (int64_t j = 0; j < n; j++) acc = vfma(vbroadcast(p[j]), *(const vf *)(v[j] + e), acc);
        *(vf *)(o + e) = acc;
    }
    for (; e < d; e++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++) acc = fmaf(p[j], v[j][e], acc);
        o[e] = acc;
    }
}

/* sc[j] = (q . k_j) * scale for the n keys: with AVX2, 8 keys at a time, one accumulator a key over
 * d (in the order of e, a lane per residue of e mod 8), the 8 accumulators' lanes summed by one tree of
 * horizontal adds (the same tree for every key); the last n mod 8 keys, and every key elsewhere, by
 * dot_d. Each key's score depends only on its place in the row's own key range, never on the batch or tile. */
static void scores(const float *q, const float *const *k, int64_t n, int64_t d, float scale, float *sc) {
    int64_t j = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
    if (d % 8 == 0)
        for (; j + 8 <= n; j += 8) {
            __m256 acc[8];
            for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t e = 0; e < d; e += 8) {
                __m256 qv = _mm256_loadu_ps(q + e);
                for (int t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[j + t] + e), acc[t]);
            }
            __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
            __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
            __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
            /* lanes 0-3: keys 0-3 (low halves of their sums), 4-7: keys 4-7; add the high halves */
            __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
            _mm256_storeu_ps(sc + j, _mm256_mul_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(scale)));
        }
#endif
    for (; j < n; j++) sc[j] = dot_d(q, k[j], d) * scale;
}

/* one query row's chunk of keys: the G query heads that share a KV head (q G * d apart) against the len
 * keys and values at krows / vrows (decoded rows): per head its max score m, the sum l of
 * exp(score - m) and o = sum exp(score - m) v, in the order of the keys. sc: G * CHUNK floats. */
static void attend_rows(const float *q, int64_t G, const float *const *krows, const float *const *vrows,
                        int64_t len, int64_t d, float scale, float *m, float *l, float *o, float *sc) {
    for (int64_t g = 0; g < G; g++) scores(q + g * d, krows, len, d, scale, sc + g * CHUNK);
    for (int64_t g = 0; g < G; g++) {
        float *sg = sc + g * CHUNK, mx = -INFINITY;
        int64_t j = 0;
        if (len >= VL) {                                  /* the max is exact in any order */
            vf vm = *(vf *)sg;
            for (j = VL; j + VL <= len; j += VL) {
                vf x = *(vf *)(sg + j);
                vm = vmax(x, vm);
            }
            for (int i = 0; i < VL; i++) mx = vm[i] > mx ? vm[i] : mx;
        }
        for (; j < len; j++) mx = sg[j] > mx ? sg[j] : mx;
        vf vsum = vzero(), vmx = vbroadcast(mx);
        j = 0;
        for (; j + VL <= len; j += VL) {
            vf e = vexp(*(vf *)(sg + j) - vmx);
            *(vf *)(sg + j) = e;
            vsum += e;
        }
        float sum = hsum(vsum);
        for (; j < len; j++) sum += (sg[j] = expf(sg[j] - mx));
        m[g] = mx;
        l[g] = sum;
    }
    for (int64_t g = 0; g < G; g++) weigh_values(sc + g * CHUNK, vrows, len, d, o + g * d);
}

/* out = (sum_c o_c e^(m_c - M)) / (sum_c l_c e^(m_c - M)) over a head's n chunks in order, M = max m_c */
static void merge_chunks(const float *m, const float *l, const float *o, int64_t n, int64_t step, int64_t d,
                         float *out) {
    float M = -INFINITY, L = 0.0f;
    for (int64_t c = 0; c < n; c++) M = m[c * step] > M ? m[c * step] : M;
    for (int64_t e = 0; e < d; e++) out[e] = 0.0f;
    for (int64_t c = 0; c < n; c++) {
        float w = expf(m[c * step] - M);
        L += l[c * step] * w;
        axpy_d(w, o + c * step * d, out, d);
    }
    for (int64_t e = 0; e < d; e++) out[e] /= L;
}

/* A wave's work: tiles of up to TILE consecutive rows of one sequence (a prefill's rows; a decode row
 * is a tile of its own), and for each tile every (KV head, chunk) any of its rows reaches: an item.
 * An item decodes the chunk's keys and values once for all of the tile's rows, then runs each row that
 * reaches the chunk exactly as it would run alone (its own key range, the same arithmetic), so a row's
 * result does not depend on its tile. */
#define TILE 16
typedef struct { int64_t r0, r1, c0, nch, item0; } att_tile;   /* rows [r0, r1), chunks c0.., items from item0 */
typedef struct { const att_tile *tile; int64_t kv, c, a, z; } att_item;   /* keys [a, z]: the rows' union */
static att_item item_at(int64_t i, const att_tile *tiles, int64_t ntiles, const int64_t *pos, const int64_t *lo) {
    int64_t t = 0, top = ntiles - 1;                      /* the last tile whose items start at or before i */
    while (t < top) {
        int64_t mid = (t + top + 1) / 2;
        if (tiles[mid].item0 <= i) t = mid; else top = mid - 1;
    }
    const att_tile *tl = tiles + t;
    int64_t rest = i - tl->item0, c = tl->c0 + rest % tl->nch;
    att_item it = {tl, rest / tl->nch, c, c * CHUNK > lo[tl->r0] ? c * CHUNK : lo[tl->r0],
                   (c + 1) * CHUNK - 1 < pos[tl->r1 - 1] ? (c + 1) * CHUNK - 1 : pos[tl->r1 - 1]};
    return it;
}

static void attention(const llmc_plan *p, const llmc_op *o, const llmc_batch *b) {
    int64_t layer = o->i[0], H = o->i[1], KVH = o->i[2], d = o->i[3], window = o->i[4], bs = p->block_size;
    void *kc = p->k_cache[layer], *vc = p->v_cache[layer];
    int64_t kind = o->kv_kind, eb = kv_bytes(kind);
    for (int64_t t = 0; t < b->T; t++)                    /* this step's keys and values into the cache */
        for (int64_t h = 0; h < KVH; h++) {
            int64_t at = (b->slots[t] * KVH + h) * d * eb;
            kv_encode(ROW(p, o->in[1], t) + h * d, (char *)kc + at, kind, o->k_scale ? o->k_scale[h] : 1.0f, d);
            kv_encode(ROW(p, o->in[2], t) + h * d, (char *)vc + at, kind, o->v_scale ? o->v_scale[h] : 1.0f, d);
        }
    int64_t G = H / KVH, T = b->T;
    /* per row: its sequence, position, first key and first chunk; and where its units start */
    int64_t *seq = malloc(sizeof(int64_t) * (size_t)(4 * T + 1)), *pos = seq + T, *lo = pos + T, *first = lo + T;
    for (int64_t s = 0; s < b->S; s++)
        for (int64_t i = 0; i < b->q_len[s]; i++) {
            int64_t t = b->q_start[s] + i;
            seq[t] = s;
            pos[t] = b->ctx_len[s] - b->q_len[s] + i;
            lo[t] = window > 0 && pos[t] - window + 1 > 0 ? pos[t] - window + 1 : 0;
        }
    for (int64_t t0 = 0; t0 < T;) {                       /* waves of rows whose chunks fit the scratch */
        int64_t t1 = t0, units = 0;
        while (t1 < T) {
            int64_t n = KVH * (pos[t1] / CHUNK - lo[t1] / CHUNK + 1);
            if (t1 > t0 && (units + n) * G * (d + 2) > WAVE_FLOATS) break;
            first[t1 - t0] = units;
            units += n;
            t1++;
        }
        float *ml = malloc(sizeof(float) * (size_t)(units * G * (d + 2))), *ll = ml + units * G,
              *ol = ll + units * G;
        att_tile *tiles = malloc(sizeof(att_tile) * (size_t)(t1 - t0));
        int64_t ntiles = 0, items = 0;
        for (int64_t r = t0; r < t1; ntiles++) {
            int64_t r1 = r + 1;
            while (r1 < t1 && r1 - r < TILE && seq[r1] == seq[r] && pos[r1] == pos[r1 - 1] + 1) r1++;
            att_tile tl = {r, r1, lo[r] / CHUNK, pos[r1 - 1] / CHUNK - lo[r] / CHUNK + 1, items};
            tiles[ntiles] = tl;
            items += KVH * tl.nch;
            r = r1;
        }
        #pragma omp parallel num_threads(p->nthreads)
        {
            /* a thread's scratch: the scores of the G heads; the chunk's keys and values decoded */
            float *sc = malloc(sizeof(float) * (size_t)(G * CHUNK));
            float *buf = kind == KV_F32 ? NULL : malloc(sizeof(float) * (size_t)(2 * CHUNK * d));
            const float *krows[CHUNK], *vrows[CHUNK];
            /* contiguous runs of items a thread: a tile's chunks in turn, so its keys are read in order;
             * while one item runs, the next one's keys and values are prefetched */
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < items; i++) {
                att_item it = item_at(i, tiles, ntiles, pos, lo);
                if (i + 1 < items) {
                    att_item nx = item_at(i + 1, tiles, ntiles, pos, lo);
                    const int64_t *tb = b->block_tables + seq[nx.tile->r0] * b->max_blocks;
                    kv_prefetch(kc, eb, tb, nx.a, nx.z, bs, KVH, nx.kv, d);
                    kv_prefetch(vc, eb, tb, nx.a, nx.z, bs, KVH, nx.kv, d);
                }
                const int64_t *tb = b->block_tables + seq[it.tile->r0] * b->max_blocks;
                kv_rows(kc, kind, o->k_scale ? o->k_scale[it.kv] : 1.0f, tb, it.a, it.z, bs, KVH, it.kv, d, buf, krows);
                kv_rows(vc, kind, o->v_scale ? o->v_scale[it.kv] : 1.0f, tb, it.a, it.z, bs, KVH, it.kv, d,
                        buf ? buf + CHUNK * d : NULL, vrows);
                for (int64_t r = it.tile->r0; r < it.tile->r1; r++) {
                    int64_t c0 = lo[r] / CHUNK, nch = pos[r] / CHUNK - c0 + 1;
                    if (it.c < c0 || it.c >= c0 + nch) continue;          /* this row does not reach the chunk */
                    int64_t a = it.c * CHUNK > lo[r] ? it.c * CHUNK : lo[r];
                    int64_t z = (it.c + 1) * CHUNK - 1 < pos[r] ? (it.c + 1) * CHUNK - 1 : pos[r];
                    int64_t u = first[r - t0] + it.kv * nch + (it.c - c0);
                    attend_rows(ROW(p, o->in[0], r) + it.kv * G * d, G, krows + (a - it.a), vrows + (a - it.a),
                                z - a + 1, d, (float)o->f[1], ml + u * G, ll + u * G, ol + u * G * d, sc);
                }
            }
            free(sc);
            free(buf);
            #pragma omp for schedule(static)
            for (int64_t rh = 0; rh < (t1 - t0) * H; rh++) {   /* (row, query head): its chunks merged */
                int64_t r = t0 + rh / H, h = rh % H, kv = h / G, g = h % G;
                int64_t nch = pos[r] / CHUNK - lo[r] / CHUNK + 1, u = first[r - t0] + kv * nch;
                merge_chunks(ml + u * G + g, ll + u * G + g, ol + (u * G + g) * d, nch, G, d,
                             ROW(p, o->out[0], r) + h * d);
            }
        }
        free(ml);
        free(tiles);
        t0 = t1;
    }
    free(seq);
}

/* a dense copy of value `id`'s rows (for a linear whose input is a view of a wider value) */
static const float *dense_rows(const llmc_plan *p, int64_t id, int64_t T, float **scratch) {
    const llmc_val *v = V(p, id);
    if (v->ld == v->width) return p->ws + v->off;
    *scratch = malloc(sizeof(float) * (size_t)(T * v->width));
    for (int64_t t = 0; t < T; t++) memcpy(*scratch + t * v->width, ROW(p, id, t), sizeof(float) * (size_t)v->width);
    return *scratch;
}

static void run_op(const llmc_plan *p, const llmc_op *o, const llmc_batch *b) {
    int64_t T = b->T;
    int nt = p->nthreads;
    switch (o->op) {
    case OP_EMBED: {                                      /* the table's rows, widened to fp32 */
        int64_t width = V(p, o->out[0])->width;
        for (int64_t t = 0; t < T; t++) {
            float *y = ROW(p, o->out[0], t);
            int64_t r = b->tokens[t] * width;
            switch (o->w.kind) {
                case W_BF16:
                    for (int64_t j = 0; j < width; j++) {
                        uint32_t u = (uint32_t)((const uint16_t *)o->w.data)[r + j] << 16;
                        memcpy(y + j, &u, 4);
                    }
                    break;
                case W_F16:
                    for (int64_t j = 0; j < width; j++) y[j] = (float)((const _Float16 *)o->w.data)[r + j];
                    break;
                case W_I8: {                                  /* int8 rows, a scale each (--embeddings int8) */
                    float sc = o->w.scale[b->tokens[t]];
                    for (int64_t j = 0; j < width; j++) y[j] = (float)((const int8_t *)o->w.data)[r + j] * sc;
                    break;
                }
                default:
                    memcpy(y, (const float *)o->w.data + r, sizeof(float) * (size_t)width);
            }
        }
        break;
    }
    case OP_RMS_NORM: {
        int64_t width = V(p, o->out[0])->width;
        #pragma omp parallel for num_threads(nt) schedule(static) if (T > 16)
        for (int64_t t = 0; t < T; t++)
            rms_norm_row(ROW(p, o->in[0], t), (const float *)o->w.data, ROW(p, o->out[0], t), width, o->i[0], o->f[0]);
        break;
    }
    case OP_ADD: case OP_ADD_RMS_NORM: {
        int64_t width = V(p, o->in[0])->width, hid = o->op == OP_ADD ? o->out[0] : o->out[1];
        #pragma omp parallel for num_threads(nt) schedule(static) if (T > 16)
        for (int64_t t = 0; t < T; t++) {
            const float *x = ROW(p, o->in[0], t), *r = ROW(p, o->in[1], t);
            float *h = ROW(p, hid, t);
            for (int64_t j = 0; j < width; j++) h[j] = x[j] + r[j];
            if (o->op == OP_ADD_RMS_NORM)
                rms_norm_row(h, (const float *)o->w.data, ROW(p, o->out[0], t), width, o->i[0], o->f[0]);
        }
        break;
    }
    case OP_LINEAR: {
        float *scratch = NULL;
        llmc_linear_weight(&o->w, dense_rows(p, o->in[0], T, &scratch), ROW(p, o->out[0], 0), T, nt);
        free(scratch);
        break;
    }
    case OP_SILU_MUL: {
        int64_t width = V(p, o->out[0])->width;
        for (int64_t t = 0; t < T; t++) {
            const float *g = ROW(p, o->in[0], t), *u = ROW(p, o->in[1], t);
            float *y = ROW(p, o->out[0], t);
            silu_mul_row(g, u, y, width);
        }
        break;
    }
    case OP_GATE_UP_SILU: {                               /* one matmul into [T, 2I], then silu(g) * u */
        int64_t I = o->i[0];
        float *gu = malloc(sizeof(float) * (size_t)(T * 2 * I)), *scratch = NULL;
        llmc_linear_weight(&o->w, dense_rows(p, o->in[0], T, &scratch), gu, T, nt);
        #pragma omp parallel for num_threads(nt) schedule(static) if (T > 4)
        for (int64_t t = 0; t < T; t++) {
            float *y = ROW(p, o->out[0], t);
            silu_mul_row(gu + t * 2 * I, gu + t * 2 * I + I, y, I);
        }
        free(gu);
        free(scratch);
        break;
    }
    case OP_ROPE: {
        int64_t d = o->i[0], half = d / 2;
        for (int64_t t = 0; t < T; t++) {
            const float *c = o->cos + b->positions[t] * half, *s = o->sin + b->positions[t] * half;
            for (int k = 0; k < 2; k++)
                rope_row(ROW(p, o->in[k], t), ROW(p, o->out[k], t), V(p, o->in[k])->width / d, d, c, s);
        }
        break;
    }
    case OP_ATTENTION:
        attention(p, o, b);
        break;
    case OP_LOGITS: {                                     /* only the rows that sample */
        int64_t width = V(p, o->in[0])->width;
        float *rows = malloc(sizeof(float) * (size_t)(b->nlogits * width));
        for (int64_t r = 0; r < b->nlogits; r++)
            memcpy(rows + r * width, ROW(p, o->in[0], b->logit_rows[r]), sizeof(float) * (size_t)width);
        llmc_linear_weight(&o->w, rows, b->logits, b->nlogits, nt);
        free(rows);
        break;
    }
    }
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void llmc_step(const llmc_plan *p, const llmc_batch *b) {
    for (int64_t i = 0; i < p->nops; i++) {
        double t0 = p->op_seconds ? seconds() : 0.0;
        run_op(p, &p->ops[i], b);
        if (p->op_seconds) p->op_seconds[i] += seconds() - t0;
    }
}
