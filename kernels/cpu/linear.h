/* llmc CPU kernels: the weight of a linear as gemm.c's kernels read it, shared with step.c. */
#ifndef LLMC_LINEAR_H
#define LLMC_LINEAR_H
#include <stdint.h>

/* how a weight's values are stored: float kinds are widened to fp32 in registers; W_I8 is int8 per
 * output channel (scale [n]); W_I4 is packed uint4 in groups along k (scale and zero [n, G]).
 * W_I4A8 and W_I8A8 are the same weights multiplied as integers with int8 inputs quantized at run
 * time: per group of the weight's groups (w4a8) or per row (w8a8). W_F8 is fp8 e4m3 per output channel
 * (scale [n]) whose inputs go through fp8 at the static per-tensor scale act_scale. */
enum { W_F32 = 0, W_I8 = 1, W_I4 = 2, W_BF16 = 3, W_F16 = 4, W_I4A8 = 5, W_I8A8 = 6, W_F8 = 7 };

typedef struct {
    int64_t kind, n, k, group;          /* W_*; logical [n, k]; int4 group size */
    const void *data;                    /* f32 | bf16 | f16 | int8 [n, k] | packed uint4 [n, ceil(k/2)] */
    const float *scale;                  /* int8 [n]; int4 [n, G] */
    const uint8_t *zero;                 /* int4 [n, G] */
    const float *bias;                   /* [n] or NULL */
    int64_t layout;                      /* LAYOUT_ROWS or LAYOUT_PACKED */
    const float *act_scale;              /* W_F8: the inputs' static scale [1] (NULL: inputs as they are) */
    /* int4 with two-level scales (super_groups > 0): scale[n, g] = scale_code[n, g] * scale_step[n, g / super_groups]
     * in fp32, as `scale` holds them decoded; LAYOUT_PACKED panels keep the codes and steps, not `scale` */
    const uint8_t *scale_code;           /* [n, G] */
    const float *scale_step;             /* [n, ceil(G / super_groups)]: the super scales / 255 */
    int64_t super_groups;                /* 0: fp32 scales */
} llmc_weight;

/* LAYOUT_PACKED, as llmc_pack_weight writes it once at load (gemm.c describes each):
 * - float kinds, W_I8, W_F8 and W_I4 (even k and group): panels of 16 rows stored k-major, each panel one
 *   sequential stream; W_I4 panels carry their scales (fp32, or two-level codes and steps) and zero points
 *   after the bytes;
 * - W_I8A8 (k a multiple of 32) and W_I4A8 (k and group multiples of 32): tiles of 4 rows, pieces of
 *   32 values of each row in turn.
 * A linear then reads its weight as one stream instead of many interleaved rows. */
enum { LAYOUT_ROWS = 0, LAYOUT_PACKED = 1 };

/* bytes of w in LAYOUT_PACKED (0: w has no packed layout) */
int64_t llmc_packed_bytes(const llmc_weight *w);

/* w (LAYOUT_ROWS) written to dst in LAYOUT_PACKED */
void llmc_pack_weight(const llmc_weight *w, void *dst);

/* y [M, n] = x [M, k] @ w.T (+ bias), fp32 rows; each output is accumulated in one fixed order that
 * depends only on k (never on M or on where the row is), so every row's result is bit-identical
 * whatever the other rows are */
void llmc_linear_weight(const llmc_weight *w, const float *x, float *y, int64_t M, int nthreads);

#endif
