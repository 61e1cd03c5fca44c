/* llmc CPU kernels: fp8 e4m3 values (weights, inputs and KV caches), as torch.float8_e4m3fn holds them. */
#ifndef LLMC_FP8_H
#define LLMC_FP8_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* fp8 e4m3 (no infinities; 0x7f and 0xff are NaN, never written) <-> float */
static inline float e4m3_to_float(uint8_t b) {
    uint32_t e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 0) v = (float)m * 0x1p-9f;
    else {
        uint32_t u = (e + 120) << 23 | m << 20;
        memcpy(&v, &u, 4);
    }
    return b & 0x80 ? -v : v;
}

/* f (within +-448) to the nearest e4m3, ties to even */
static inline uint8_t float_to_e4m3(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint8_t sign = (u >> 24) & 0x80;
    float a = fabsf(f);
    if (a < 0x1p-6f) return sign | (uint8_t)nearbyintf(a * 512.0f);    /* subnormals; 8 is the least normal */
    uint32_t ua = u & 0x7fffffff;
    ua += 0x7ffff + ((ua >> 20) & 1);
    return sign | (uint8_t)((((ua >> 23) - 120) << 3) | ((ua >> 20) & 7));
}

/* x through fp8 at a static scale: the nearest e4m3 of x / scale (saturating at +-448), times scale */
static inline float fake_quant_e4m3(float x, float scale) {
    float v = x / scale;
    return e4m3_to_float(float_to_e4m3(v > 448.0f ? 448.0f : v < -448.0f ? -448.0f : v)) * scale;
}
#endif
