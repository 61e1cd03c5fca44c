"""In-kernel number formats (@triton.jit helpers shared by the linear and KV-cache kernels).

fp8 e4m3fn is handled as raw bytes (uint8) and decoded / encoded arithmetically: triton's native
float8e4nv conversions need an sm_89+ GPU, so bytes keep the kernels portable to older NVIDIA GPUs
(and make the interpreter's numpy emulation irrelevant). The encodings are exact: round half to even,
like torch's casts; tests compare bytes with an LSB budget of 0.

  e4m3fn byte = s eeee mmm: e > 0 is (1 + m/8) * 2^(e-7), e = 0 is m * 2^-9; 0x7F / 0xFF are NaN;
  no infinities, the largest finite value is 448.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rint(y):
    """Round fp32 values half to even (torch.round), for |y| < 2^22: adding and subtracting 1.5 * 2^23
    leaves no fraction bits, and IEEE addition rounds half to even."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def e4m3_to_float(code):
    """uint8 e4m3fn bytes -> fp32 values."""
    c = code.to(tl.int32)
    sign = (c & 0x80) << 24
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125                                  # m * 2^-9
    sub = tl.where(sign != 0, -sub, sub)
    value = tl.where(e == 0, sub, normal)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def float_to_e4m3(y):
    """fp32 values already clamped to [-448, 448] -> uint8 e4m3fn bytes, rounded half to even (the
    sign of zero kept). With E = max(floor(log2 |y|), -6) the representable neighbours of |y| are
    n * 2^(E-3), n an integer in [0, 16], and the byte is (E + 6) * 8 + n: one formula for the
    subnormals (E = -6, byte n) and the normals, n = 16 carrying into the next exponent."""
    bits = y.to(tl.int32, bitcast=True)
    sign = ((bits >> 31) & 1) << 7
    a = tl.abs(y)
    exponent = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127          # floor(log2 a); -127 for 0
    exponent = tl.maximum(exponent, -6)
    inv_quantum = ((130 - exponent) << 23).to(tl.float32, bitcast=True)      # 2^-(E-3), exact scaling
    n = rint(a * inv_quantum).to(tl.int32)
    return (sign | ((exponent + 6) * 8 + n)).to(tl.uint8)
