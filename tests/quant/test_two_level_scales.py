"""Two-level int4 scales (`TensorQuant.scale_bits=8`): group scales stored as 8-bit codes under a
float16 super scale per 8 groups. Exact against hand-computed values, stored and read back bit for
bit, the bytes the layout promises, the error against float16 scales, GPTQ with them, and the
refusals (a GPTQ export, a scheme without int4 weights, a manifest that cannot hold them)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from llmc.checkpoint import WeightStore
from llmc.errors import ConfigError, ModelFormatError, OptionError
from llmc.gptq_format import GptqExportError, check_exportable
from llmc.kernels.reference.dequant import dequantize
from llmc.passes.quant.gptq import gptq
from llmc.passes.quant.observers import Observer
from llmc.quantized.formats import (SUPER_GROUPS, TensorQuant, decode_scales, quantize, scale_codes, unpack_int4)
from llmc.quantized.scheme import QuantRecipe, recipe_from_options
from llmc.quantized.store import QuantizedEntry, QuantizedStore, entries_from_manifest, manifest_section


def fmt(group_size: int, symmetric: bool = True, scale_bits: int | None = 8) -> TensorQuant:
    return TensorQuant(dtype="int4", granularity="group", group_size=group_size, symmetric=symmetric,
                       scale_bits=scale_bits)


def test_codes_and_super_scale_by_hand():
    """One row, groups of 2, 10 groups: super-blocks of 8 and 2 groups. Symmetric scales are absmax / 8:
    0.25 * (1..8) in the first super-block (d = 2.0), 4.0 and 0 (an all-zero group) in the second (d = 4.0).
    Codes round(s / (d / 255)): 0.25 -> 31.875 -> 32, ..., 2.0 -> 255 (1.0 -> 127.5 exactly, but d / 255
    in fp32 is a little above 2/255: 127); the zero group takes code 1."""
    amax = [2.0 * i for i in range(1, 9)] + [32.0, 0.0]
    w = torch.tensor([[v for a in amax for v in (a, -a / 2)]])                # [1, 20]
    q = quantize(w, fmt(2))
    d = q.super_scale
    assert d.tolist() == [[2.0, 4.0]]
    assert scale_codes(q.scale, d).tolist() == [[32, 64, 96, 127, 159, 191, 223, 255, 255, 1]]
    step = torch.tensor(2.0) / 255                                             # fp32, as every reader computes it
    assert q.scale[0, 4].item() == (159 * step).item() and q.scale[0, 7].item() == (255 * step).item()
    assert torch.equal(q.scale, decode_scales(scale_codes(q.scale, d), d))
    codes = unpack_int4(q.data, 20)
    # the largest value of each group lands on its 8th step
    assert codes[0, 0].item() == 15 and codes[0, 6].item() == 15 and codes[0, 14].item() == 15
    assert codes[0, 18:].tolist() == [8, 8] and dequantize(q)[0, 18:].tolist() == [0.0, 0.0]


def test_a_zero_group_plays_no_part_in_the_super_scale():
    w = torch.randn(4, 8 * 16, generator=torch.Generator().manual_seed(1)) * 0.01
    w[:, :16] = 0                                                             # group 0 of every row
    q = quantize(w, fmt(16, symmetric=False))
    assert torch.equal(q.super_scale[:, 0], q.scale[:, 1:].amax(dim=1))        # the live groups' largest
    assert (scale_codes(q.scale, q.super_scale)[:, 0] == 1).all()
    assert (dequantize(q)[:, :16] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("observer", [None, "mse"])
def test_error_is_that_of_float16_scales_for_fewer_bytes(symmetric, observer):
    """On Gaussian weights the relative weight MSE of two-level scales is within 1% of float16 scales',
    for 4.4375 instead of 4.625 bits per weight (groups of 32), 4.875 instead of 5.25 (groups of 16)."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    obs = None if observer is None else Observer(observer)
    for gs, bpw in ((32, (4.625, 4.4375)), (16, (5.25, 4.875))):
        errs = []
        for f in (fmt(gs, symmetric, None), fmt(gs, symmetric)):
            q = quantize(w, f, observer=obs)
            errs.append(float(((dequantize(q) - w) ** 2).mean() / (w ** 2).mean()))
        assert errs[1] == pytest.approx(errs[0], rel=0.01), (gs, errs)
        got = tuple(QuantizedEntry(f, (256, 512)).nbytes() * 8 / w.numel() for f in (fmt(gs, symmetric, None),
                                                                                      fmt(gs, symmetric)))
        assert got == bpw


def test_stored_and_read_back_bit_for_bit(tmp_path):
    """Codes, U8 scale codes, F16 super scales and packed zero points: as the layout says, and read
    back through a checkpoint's manifest to the same weight (a partial last super-block: 11 groups)."""
    w = torch.randn(24, 11 * 16 + 5, generator=torch.Generator().manual_seed(2))
    q = quantize(w, fmt(16, symmetric=False), "m.weight")
    t = q.tensors("m.weight")
    entry = QuantizedEntry.of(q)
    dtypes = {"U8": torch.uint8, "F16": torch.float16}
    assert {k.removeprefix("m.weight."): (v.dtype, tuple(v.shape)) for k, v in t.items()} == \
        {k: (dtypes[dt], shape) for k, (dt, shape) in entry.layout().items()}
    assert t["m.weight.super_scale"].shape == (24, -(-12 // SUPER_GROUPS))
    assert entry.nbytes() == sum(v.numel() * v.element_size() for v in t.values())
    save_file(t, str(tmp_path / "model.safetensors"))
    section = json.loads(json.dumps(manifest_section({"m.weight": entry})))
    store = QuantizedStore(WeightStore.open(tmp_path), entries_from_manifest(section, "config.json"))
    back = store.get("m.weight")
    for a, b in ((back.data, q.data), (back.scale, q.scale), (back.zero, q.zero), (back.super_scale, q.super_scale)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.fmt == q.fmt and torch.equal(dequantize(back), dequantize(q))
    assert section["weights"]["m.weight"]["format"]["scale_bits"] == 8


def test_a_manifest_that_cannot_hold_them_is_refused(tmp_path):
    q = quantize(torch.randn(8, 64), fmt(16))
    entry = QuantizedEntry.of(q)
    section = manifest_section({"m.weight": entry})
    with pytest.raises(ModelFormatError, match=r"two-level scales are stored from format version 2 on, not in "
                                                r"version 1"):
        entries_from_manifest({**section, "format_version": 1}, "config.json")
    section["weights"]["m.weight"]["format"]["scale_bits"] = 6
    with pytest.raises(ModelFormatError, match=r"two-level scales are 8-bit codes of int4 groups"):
        entries_from_manifest(section, "config.json")
    # float16 scales where the format says two-level: the layout check names the tensor
    t = q.tensors("m.weight")
    t["m.weight.scale"] = q.scale.half()
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"m\.weight\.scale is F16 \[8, 4\]; .* stores it as U8 \[8, 4\]"):
        QuantizedStore(WeightStore.open(tmp_path), {"m.weight": entry})


def test_gptq_rounds_each_group_scale_to_the_super_scales():
    """GPTQ finds each group's scale as the walk reaches it and rounds it to the super scales fixed from
    the unquantized weight: every scale a code times its super scale, and the output error on the
    calibration inputs within 2% of GPTQ's with float16 scales."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)
    w = torch.randn(64, 128, generator=g) * 0.05
    h = x.T @ x
    errs = {}
    for bits in (None, 8):
        q = gptq(w, h, fmt(16, symmetric=False, scale_bits=bits), observer=Observer("mse"))
        errs[bits] = float(((x @ (dequantize(q) - w).T) ** 2).mean())
        if bits:
            assert torch.equal(decode_scales(scale_codes(q.scale, q.super_scale), q.super_scale), q.scale)
    assert errs[8] == pytest.approx(errs[None], rel=0.02), errs


def test_gptq_export_refuses_them_by_name():
    with pytest.raises(GptqExportError, match=r"int4-g32-asym-s8 have two-level scales .* GPTQ layout cannot "
                                              r"hold") as e:
        check_exportable(fmt(32, symmetric=False), {})
    assert "--float16-scales" in e.value.hint


def test_the_option_and_the_stored_recipe():
    r = recipe_from_options("w4a16", two_level_scales=True, group_size=16)
    assert r.scheme.weight == fmt(16, symmetric=False)
    d = r.to_dict()
    assert d["scheme"]["weight"]["scale_bits"] == 8 and QuantRecipe.from_dict(d) == r
    # without them the stored form is the one older readers know: no scale_bits key at all
    assert "scale_bits" not in recipe_from_options("w4a16").to_dict()["scheme"]["weight"]
    assert recipe_from_options("w4a8", two_level_scales=True).scheme.weight.two_level
    with pytest.raises(OptionError, match=r"applies to int4 weights \(w4a16, w4a8\), not w8a16"):
        recipe_from_options("w8a16", two_level_scales=True)
    with pytest.raises(ConfigError, match="two-level scales are 8-bit codes of int4 groups"):
        TensorQuant(dtype="int8", granularity="channel", scale_bits=8)
    assert dataclasses.replace(fmt(32), scale_bits=None).to_dict() == {
        "dtype": "int4", "granularity": "group", "group_size": 32, "symmetric": True}
