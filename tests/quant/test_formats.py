"""Quantize / dequantize primitives: exact against hand-computed references and edge cases."""
from __future__ import annotations

import pytest
import torch

from llmc.errors import ConfigError
from llmc.kernels.reference.dequant import dequantize
from llmc.quantized.formats import QuantizationError, QuantizedWeight, TensorQuant, pack_int4, quantize, unpack_int4
from llmc.quantized.scheme import resolve_scheme

INT8 = TensorQuant(dtype="int8", granularity="channel")
INT4 = TensorQuant(dtype="int4", granularity="group", group_size=4)
INT4A = TensorQuant(dtype="int4", granularity="group", group_size=4, symmetric=False)
FP8 = TensorQuant(dtype="fp8_e4m3", granularity="channel")


def test_int8_channel_exact():
    """Scales are powers of two here, so exact in float16 (as they are stored)."""
    w = torch.tensor([[1.984375, -0.9921875, 0.0], [0.0, 0.0, 0.0], [-3.96875, 1.5625, 0.03125]])
    q = quantize(w, INT8)
    assert q.data.dtype == torch.int8 and q.scale.shape == (3, 1)
    assert q.data.tolist() == [[127, -64, 0], [0, 0, 0], [-127, 50, 1]]      # -63.5 rounds to even: -64
    assert q.scale.flatten().tolist() == [2 ** -6, 1.0, 2 ** -5]            # all-zero row: scale 1
    assert torch.equal(dequantize(q)[1], torch.zeros(3))


def test_scales_are_float16_values():
    """Every scale is rounded to float16 where it is made: 0.01 is not a float16 value, so a row of
    absmax 1.27 gets the nearest one, and its codes are found against that scale."""
    q = quantize(torch.tensor([[1.27, -0.635, 0.0]]), INT8)
    s = q.scale.item()
    assert s == torch.tensor(0.01).half().item() and s != pytest.approx(0.01, rel=1e-6)
    assert q.data.tolist() == [[round(1.27 / s), round(-0.635 / s), 0]]
    with pytest.raises(QuantizationError, match="w: its values are too large for float16 scales"):
        quantize(torch.tensor([[1e9, 1.0]]), INT4, "w")


def test_int4_sym_group_with_partial_last_group():
    """All 16 levels, as Q4_0: scale absmax / 8; zero 7 when the largest magnitude is positive (it
    takes code 15), 8 when negative (code 0)."""
    w = torch.tensor([[1.0, -0.75, 0.125, 0.0, -2.0, 0.5]])                 # K=6, groups [4, 2]
    q = quantize(w, INT4)
    assert q.scale.shape == (1, 2) and q.zero.tolist() == [[7, 8]]
    assert q.scale.tolist()[0] == [0.125, 0.25]
    u = unpack_int4(q.data, 6)
    assert u.tolist() == [[15, 1, 8, 7, 0, 10]]                            # round(w/s) + zero
    assert dequantize(q).tolist()[0] == [1.0, -0.75, 0.125, 0.0, -2.0, 0.5]
    tie = quantize(torch.tensor([[1.0, -1.0]]), INT4)                       # equal sides: zero 8, +1.0 clamps
    assert tie.zero.tolist() == [[8]] and dequantize(tie).tolist()[0] == [0.875, -1.0]


def test_int4_asym_exact():
    w = torch.tensor([[0.0, 1.875, 3.5, 0.375]])      # min 0 would be zero 0: zero 1, scale max / 14
    q = quantize(w, INT4A)
    assert q.zero.tolist() == [[1]] and q.scale.item() == 0.25
    assert unpack_int4(q.data, 4).tolist() == [[1, 9, 15, 3]]               # 7.5 -> 8 (even), 1.5 -> 2; + 1
    assert dequantize(q).tolist()[0] == [0.0, 2.0, 3.5, 0.5]
    w2 = torch.tensor([[-1.875, 0.0, 1.875, 0.625]])
    q2 = quantize(w2, INT4A)
    assert q2.zero.item() == 8 and q2.scale.item() == 0.25                  # round(7.5) = 8
    assert dequantize(q2).tolist()[0] == [-2.0, 0.0, 1.75, 0.5]


def test_pack_roundtrip_odd_width():
    u = torch.randint(0, 16, (5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = pack_int4(u)
    assert p.shape == (5, 4) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p, 7), u)
    assert (p[0, 0] & 0x0F) == u[0, 0] and (p[0, 0] >> 4) == u[0, 1]     # low nibble first


def test_fp8_saturates_and_scales():
    w = torch.tensor([[448.0, -896.0, 1.0], [0.0, 0.0, 0.0]])
    q = quantize(w, FP8)
    assert q.data.dtype == torch.float8_e4m3fn
    assert q.scale.flatten().tolist() == [2.0, 1.0]
    assert dequantize(q)[0].tolist() == [448.0, -896.0, 1.0]
    assert torch.equal(dequantize(q)[1], torch.zeros(3))


@pytest.mark.parametrize("fmt", [INT8, INT4, INT4A, FP8,
                                 TensorQuant(dtype="int8", granularity="tensor"),
                                 TensorQuant(dtype="int4", granularity="channel", symmetric=False)])
def test_error_bounded_by_half_a_step(fmt):
    w = torch.randn(16, 37, generator=torch.Generator().manual_seed(1)) * 3
    w[2] *= 100                                                             # extreme row
    q = quantize(w, fmt)
    err = (dequantize(q) - w).abs()
    if fmt.dtype == "fp8_e4m3":
        assert (err <= w.abs() * 2 ** -4 + 1e-6).all()                       # 3 mantissa bits: half-ulp 2^-4
    else:
        step = q.scale.repeat_interleave(fmt.group_size or 10**9, dim=1)[:, :37] if fmt.granularity == "group" \
            else q.scale
        if fmt.dtype == "int4" and fmt.symmetric:      # the smaller side stops at 7 steps of the 8: a step there
            assert (err <= step + 1e-6).all() and (err <= step / 2 + 1e-6).float().mean() > 0.95
        else:
            assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_rejected(bad):
    w = torch.ones(2, 8)
    w[1, 3] = bad
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        quantize(w, INT8, name="layers.0.q_proj.weight")


def test_cat_rows_matches_separate():
    a, b = torch.randn(3, 10), torch.randn(5, 10)
    qa, qb = quantize(a, INT4), quantize(b, INT4)
    both = QuantizedWeight.cat_rows([qa, qb])
    assert torch.equal(dequantize(both), torch.cat([dequantize(qa), dequantize(qb)]))


def test_scheme_validation():
    with pytest.raises(ConfigError, match="group_size"):
        TensorQuant(dtype="int4", granularity="group")
    with pytest.raises(ConfigError, match="symmetric-only"):
        TensorQuant(dtype="fp8_e4m3", symmetric=False)
    assert resolve_scheme("w4a16", group_size=64).weight.group_size == 64
    with pytest.raises(ConfigError, match="group-wise"):
        resolve_scheme("w8a16", group_size=64)
    with pytest.raises(ConfigError, match="unknown scheme"):
        resolve_scheme("w3a16")


def test_stored_tensors_f16_scales_and_packed_zero_points():
    """What a weight is stored as (format version 2): F16 scales; int4 zero points two per byte along
    the groups, low nibble first. w4 in groups of 32 then costs 4.625 bits per weight."""
    from llmc.quantized.store import QuantizedEntry
    w = torch.randn(6, 160, generator=torch.Generator().manual_seed(0))        # 5 groups of 32
    q = quantize(w, TensorQuant(dtype="int4", granularity="group", group_size=32, symmetric=False))
    t = q.tensors("w")
    assert t["w.scale"].dtype == torch.float16 and torch.equal(t["w.scale"].float(), q.scale)
    assert t["w.zero"].shape == (6, 3) and torch.equal(unpack_int4(t["w.zero"], 5), q.zero)
    assert (t["w.zero"][0, 0] & 0x0F) == q.zero[0, 0] and (t["w.zero"][0, 0] >> 4) == q.zero[0, 1]
    entry = QuantizedEntry.of(q)
    assert {k.removeprefix("w."): (v.shape, str(v.dtype)) for k, v in t.items()} == \
        {k: (torch.Size(shape), {"U8": "torch.uint8", "F16": "torch.float16"}[dt]) for k, (dt, shape) in entry.layout().items()}
    assert entry.nbytes() == sum(v.numel() * v.element_size() for v in t.values())
    w32 = quantize(torch.randn(64, 256), TensorQuant(dtype="int4", granularity="group", group_size=32))
    assert QuantizedEntry.of(w32).nbytes() * 8 / (64 * 256) == 4.625
