"""GPTQ checkpoint layout: export of llmc-quantized checkpoints and loading them back.

The reader in this file (`gptq_dequantize`) is written from the layout description alone, not from
llmc's module: qweight int32 [K/pack, N] with value j of word [i, n] at bits [j*b, (j+1)*b) = u[n, i*pack+j];
qzeros int32 [G, N/pack] packed along N the same way, holding zero - 1 (v1); scales fp16 [G, N];
g_idx int32 [K]; w[n, k] = scales[g_idx[k], n] * (u[n, k] - (qzeros_value[g_idx[k], n] + 1)).

llmc stores float16 scales (format version 2), so the export is exact; a version-1 checkpoint (fp32
scales, `as_format_v1`) takes the export's `round_scales` path, compared against the rounded-scale
dequantization.
"""
from __future__ import annotations

import json
from dataclasses import replace
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmc.cli import main
from llmc.errors import ModelFormatError
from llmc.loader import load_model
from llmc.kernels.reference.dequant import dequantize
from llmc.quantized.formats import QuantizedWeight
from llmc.gptq_format import GptqExportError, export_gptq
from llmc.quantizer import quantize_checkpoint
from llmc.quantized.scheme import QuantRecipe, resolve_scheme
from tests.helpers import STORIES, forward_all, make_checkpoint

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PREFIXES = [f"model.layers.{i}.{s}" for i in range(2) for s in LINEARS]
IDS = [1, 17, 250, 3, 999, 42, 42, 7, 512]


# ------------------------------------------------------------------------------------ independent reader

def tensors_of(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int64 [R * pack, C]: row r*pack + j of the result is field j of row r."""
    pack = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF                    # the unsigned 32-bit word
    out = torch.empty(words.shape[0] * pack, words.shape[1], dtype=torch.int64)
    for j in range(pack):
        out[j::pack] = (w >> (bits * j)) & ((1 << bits) - 1)
    return out


def gptq_dequantize(t: dict[str, torch.Tensor], p: str, bits: int, v1: bool = True) -> torch.Tensor:
    """The [N, K] fp32 weight of layer `p`, from the GPTQ tensors alone."""
    u = unpack_words(t[f"{p}.qweight"], bits)                              # [K, N]
    z = unpack_words(t[f"{p}.qzeros"].T.contiguous(), bits).T              # [G, N]
    if v1:
        z = z + 1
    g = t[f"{p}.g_idx"].long()
    s = t[f"{p}.scales"].float()
    return ((u - z[g]).float() * s[g]).T                                   # [K, N] -> [N, K]


# ---------------------------------------------------------------------------------------- fixtures

def recipe(name, **kw):
    return QuantRecipe(scheme=resolve_scheme(name, **kw))


def as_format_v1(src, dst, scale_factor=1.0):
    """A copy of an llmc checkpoint in format version 1 (fp32 scales, one zero point per byte), every
    scale times `scale_factor` (1 + 2^-13 makes them not float16-exact)."""
    from llmc.quantized.formats import unpack_int4
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        for k in list(t):
            if k.endswith(".scale"):
                t[k] = t[k].float() * scale_factor
                zero = k.removesuffix(".scale") + ".zero"
                if zero in t:
                    t[zero] = unpack_int4(t[zero], t[k].shape[1]).contiguous()
        save_file(t, str(f), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 1
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A random llama (hidden 96, intermediate 200: down_proj has K = 200 = 6 * 32 + 8, a partial last
    group of 8) quantized in several ways. Every 8th input column of the decoder linears is made
    negative so no asymmetric group has a zero point of 0 (which v1 cannot store)."""
    root = tmp_path_factory.mktemp("gptq")
    hf, _ = make_checkpoint(root / "hf", "llama")
    for f in hf.glob("*.safetensors"):
        t = load_file(f)
        for k, v in t.items():
            if k.startswith("model.layers.") and v.dim() == 2:
                v[:, 0::8] = -(v[:, 0::8].abs() + 0.01)
        save_file(t, str(f), metadata={"format": "pt"})
    c = {"hf": hf}
    for name, r in (("sym", recipe("w4a16", group_size=32, symmetric=True)),
                    ("asym", recipe("w4a16", group_size=32, symmetric=False)),
                    ("int8", recipe("w8a16"))):
        quantize_checkpoint(hf, root / name, r)
        c[name] = root / name
        export_gptq(c[name], root / f"{name}-gptq")
        c[f"{name}-gptq"] = root / f"{name}-gptq"
    return c


def llmc_weights(path) -> dict[str, QuantizedWeight]:
    m = load_model(path)
    return {f"{p}.weight": m.weights.get(f"{p}.weight") for p in PREFIXES}


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_independent_unpacker_reproduces_llmc_weights(ckpts, kind):
    """1. Written tensors, read by the unpacker above, equal llmc's dequantized weights bit for bit,
    for K a multiple of the group size (96) and for a partial last group (down_proj, K = 200)."""
    t = tensors_of(ckpts[f"{kind}-gptq"])
    ref = llmc_weights(ckpts[f"{kind}"])
    assert ref["model.layers.0.mlp.down_proj.weight"].scale.shape == (96, 7)          # 6 full groups + 8
    for p in PREFIXES:
        got, want = gptq_dequantize(t, p, 4), dequantize(ref[f"{p}.weight"])
        assert torch.equal(got, want), p
    # one word by hand: u[n=3, k=0..7] of q_proj sits in qweight[0, 3], lowest nibble first
    p = "model.layers.1.self_attn.q_proj"
    from llmc.quantized.formats import unpack_int4
    u = unpack_int4(ref[f"{p}.weight"].data, 96)
    assert int(t[f"{p}.qweight"][0, 3]) & 0xFFFFFFFF == sum(int(u[3, j]) << (4 * j) for j in range(8))


def test_int8_per_channel_maps_exactly(ckpts):
    """bits 8: llmc's int8 q with u = q + 128, zero 128 (stored 127), one group of size K."""
    out = ckpts["int8-gptq"]
    t = tensors_of(out)
    ref = llmc_weights(ckpts["int8"])
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["group_size"], q["sym"]) == (8, -1, True)
    p = "model.layers.0.mlp.down_proj"
    assert t[f"{p}.qweight"].shape == (200 // 4, 96) and t[f"{p}.qzeros"].shape == (1, 96 // 4)
    assert int(t[f"{p}.qzeros"][0, 0]) == 0x7F7F7F7F                          # four (128 - 1) bytes
    assert not t[f"{p}.g_idx"].any()
    back = llmc_weights(out)
    for p in PREFIXES:
        assert torch.equal(gptq_dequantize(t, p, 8), dequantize(ref[f"{p}.weight"])), p
        w = back[f"{p}.weight"]
        assert w.fmt == ref[f"{p}.weight"].fmt and torch.equal(w.data, ref[f"{p}.weight"].data)


@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_reimport_gives_same_weights_and_logits(ckpts, kind):
    """2. load_model(GPTQ dir) gives exactly the llmc checkpoint's weights and logits."""
    a, b = load_model(ckpts[f"{kind}"]), load_model(ckpts[f"{kind}-gptq"])
    for name in a.graph.weight_names():
        wa, wb = a.weights.get(name), b.weights.get(name)
        if isinstance(wa, QuantizedWeight):      # GPTQ's sym means zero 8 everywhere; llmc's symmetric grid
            fmt = replace(wa.fmt, symmetric=False)  # also uses 7, so it is exported, and read back, as asymmetric
            assert isinstance(wb, QuantizedWeight) and wb.fmt == fmt and wb.shape == wa.shape
            assert torch.equal(dequantize(wb), dequantize(wa)), name
        else:
            assert torch.equal(wa, wb), name
    for kernels in ("cpu", "reference"):
        assert torch.equal(forward_all(a, IDS, kernels), forward_all(b, IDS, kernels))
    assert b.quantization["recipe"]["scheme"]["name"] == "w4a16"


def test_round_scales_path(ckpts, tmp_path):
    """2b. A version-1 checkpoint's fp32 scales are not float16-exact: refused by name, unless rounded;
    the rounded export equals llmc's dequantization with rounded scales."""
    v1 = as_format_v1(ckpts["sym"], tmp_path / "v1", scale_factor=1 + 2 ** -13)
    with pytest.raises(GptqExportError, match=r"float16.*model\.layers\.0\.self_attn\.q_proj"):
        export_gptq(v1, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    s = export_gptq(v1, tmp_path / "r", round_scales=True)
    assert s["layers"] == 14 and s["scales_rounded"] == 14 and 0 < s["max_scale_rel_change"] <= 2 ** -11
    src, back = llmc_weights(v1), llmc_weights(tmp_path / "r")
    for name, w in src.items():
        rounded = QuantizedWeight(w.fmt, w.shape, w.data, w.scale.half().float(), w.zero)
        assert torch.equal(dequantize(back[name]), dequantize(rounded)), name
        assert not torch.equal(dequantize(back[name]), dequantize(w))         # the rounding did change it


def test_format_v1_checkpoint_reads_as_written(ckpts, tmp_path):
    """A checkpoint written in format version 1 (fp32 scales, unpacked zero points) loads to the same
    weights as the version-2 one it was made from, and is refused with a clear error when its tensors
    are in the version-2 layout."""
    v1 = as_format_v1(ckpts["asym"], tmp_path / "v1")
    a, b = llmc_weights(ckpts["asym"]), llmc_weights(v1)
    for name in a:
        assert torch.equal(dequantize(a[name]), dequantize(b[name])) and torch.equal(a[name].zero, b[name].zero)
    shutil.copytree(ckpts["asym"], tmp_path / "mixed")
    cfg = json.loads((tmp_path / "mixed" / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 1
    (tmp_path / "mixed" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"scale is F16 .* stores it as F32"):
        load_model(tmp_path / "mixed")


def test_dtypes_shapes_and_config(ckpts):
    """3. Tensor dtypes and shapes, and the quantization_config."""
    out = ckpts["sym-gptq"]
    t = tensors_of(out)
    K = {"self_attn.q_proj": 96, "self_attn.k_proj": 96, "self_attn.v_proj": 96, "self_attn.o_proj": 96,
         "mlp.gate_proj": 96, "mlp.up_proj": 96, "mlp.down_proj": 200}
    N = {"self_attn.q_proj": 96, "self_attn.k_proj": 24, "self_attn.v_proj": 24, "self_attn.o_proj": 96,
         "mlp.gate_proj": 200, "mlp.up_proj": 200, "mlp.down_proj": 96}
    for p in PREFIXES:
        s = p.split(".", 3)[3]
        k, n = K[s], N[s]
        g = -(-k // 32)
        assert (t[f"{p}.qweight"].dtype, tuple(t[f"{p}.qweight"].shape)) == (torch.int32, (k // 8, n))
        assert (t[f"{p}.qzeros"].dtype, tuple(t[f"{p}.qzeros"].shape)) == (torch.int32, (g, n // 8))
        assert (t[f"{p}.scales"].dtype, tuple(t[f"{p}.scales"].shape)) == (torch.float16, (g, n))
        assert (t[f"{p}.g_idx"].dtype, tuple(t[f"{p}.g_idx"].shape)) == (torch.int32, (k,))
        assert t[f"{p}.g_idx"].tolist() == [i // 32 for i in range(k)]
        assert f"{p}.weight" not in t
    assert t["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" in t
    assert "model.norm.weight" in t and not any(k.endswith((".qdata", ".scale", ".zero")) for k in t)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format",
                              "damp_percent", "true_sequential", "static_groups")} == \
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
         "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
    assert q["llmc"]["recipe"]["scheme"]["name"] == "w4a16" and cfg["model_type"] == "llama"
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    asym = json.loads((ckpts["asym-gptq"] / "config.json").read_text())["quantization_config"]
    assert asym["sym"] is False


def test_zero_point_convention(ckpts, tmp_path):
    """4. qzeros hold zero - 1; llmc never makes a zero point 0, and one is refused by name."""
    sym = tensors_of(ckpts["sym-gptq"])                 # llmc's symmetric int4: zero 7 or 8 (Q4_0's grid)
    nibbles = {(int(word) >> (4 * j)) & 0xF for word in sym["model.layers.0.self_attn.q_proj.qzeros"].flatten()
               for j in range(8)}
    assert nibbles == {6, 7}                              # zero - 1
    assert json.loads((ckpts["sym-gptq"] / "config.json").read_text())["quantization_config"]["sym"] is False
    t = tensors_of(ckpts["asym-gptq"])
    w = llmc_weights(ckpts["asym"])["model.layers.0.mlp.up_proj.weight"]
    z = int(w.zero[13, 2])                                # out channel n = 13, group 2
    word = int(t["model.layers.0.mlp.up_proj.qzeros"][2, 13 // 8]) & 0xFFFFFFFF
    assert (word >> (4 * (13 % 8))) & 0xF == z - 1
    assert 1 <= z <= 15

    # layer 1's o_proj non-negative: llmc's asymmetric grid gives such groups zero point 1 (over
    # [-max / 14, max]), never 0, so the layout holds them and they read back as they were
    hf = tmp_path / "hf"
    shutil.copytree(ckpts["hf"], hf)
    o1 = "model.layers.1.self_attn.o_proj.weight"
    for f in hf.glob("*.safetensors"):
        d = load_file(f)
        if o1 in d:
            d[o1] = d[o1].abs()
            save_file(d, str(f), metadata={"format": "pt"})
    quantize_checkpoint(hf, tmp_path / "q", recipe("w4a16", group_size=32, symmetric=False))
    w = llmc_weights(tmp_path / "q")[o1]
    assert bool((w.zero == 1).all())
    export_gptq(tmp_path / "q", tmp_path / "out")
    assert torch.equal(gptq_dequantize(tensors_of(tmp_path / "out"), o1.removesuffix(".weight"), 4), dequantize(w))

    # a zero point 0 (a version-1 checkpoint could hold one) is refused by name
    v1 = as_format_v1(tmp_path / "q", tmp_path / "v1")
    for f in v1.glob("*.safetensors"):
        d = load_file(f)
        if f"{o1}.zero" in d:
            d[f"{o1}.zero"] = torch.zeros_like(d[f"{o1}.zero"])
            save_file(d, str(f), metadata={"format": "pt"})
    with pytest.raises(GptqExportError, match=r"zero point 0.*model\.layers\.1\.self_attn\.o_proj.*symmetric") as e:
        export_gptq(v1, tmp_path / "out2")
    assert "model.layers.0" not in str(e.value)
    assert not (tmp_path / "out2").exists()


def test_golden_model_down_proj_refused(tmp_path):
    """5. stories260K has an MLP 172 wide: not a multiple of 8, refused by name; nothing written."""
    quantize_checkpoint(STORIES, tmp_path / "q", recipe("w4a16", group_size=32))
    with pytest.raises(GptqExportError, match=r"mlp\.down_proj of layers 0-4 \(in features K = 172") as e:
        export_gptq(tmp_path / "q", tmp_path / "gptq", round_scales=True)
    assert "mlp.gate_proj of layers 0-4" in str(e.value) and len(str(e.value)) < 500   # every offender, briefly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_generate_cli_same_tokens(ckpts, capsys):
    """6. `llmc generate <gptq dir> --json` gives the tokens of the llmc checkpoint it came from."""
    def run(path):
        main(["generate", str(path), "--prompt", "w5 w77 w300", "--max-tokens", "12", "--json"])
        return json.loads(capsys.readouterr().out)[0]["token_ids"]
    got = run(ckpts["asym-gptq"])
    assert len(got) == 12 and got == run(ckpts["asym"])


def test_reader_v2_and_refusals(ckpts, tmp_path):
    """gptq_v2 (zeros without the offset) reads the same weights; act-order g_idx is refused."""
    src = ckpts["asym-gptq"]
    ref = llmc_weights(src)
    v2 = tmp_path / "v2"
    shutil.copytree(src, v2)
    for f in v2.glob("*.safetensors"):
        d = load_file(f)
        for k in [k for k in d if k.endswith(".qzeros")]:
            z = unpack_words(d[k].T.contiguous(), 4) + 1                       # [N, G]: v1 -> v2 values
            packed = sum(z[j::8] << (4 * j) for j in range(8))                # [N/8, G]
            d[k] = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32).T.contiguous()
        save_file(d, str(f), metadata={"format": "pt"})
    cfg = json.loads((v2 / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (v2 / "config.json").write_text(json.dumps(cfg))
    got = llmc_weights(v2)
    for name, w in ref.items():
        assert torch.equal(dequantize(got[name]), dequantize(w)), name

    from llmc.errors import UnsupportedModelError
    ao = tmp_path / "actorder"
    shutil.copytree(src, ao)
    for f in ao.glob("*.safetensors"):
        d = load_file(f)
        if "model.layers.0.mlp.down_proj.g_idx" in d:
            d["model.layers.0.mlp.down_proj.g_idx"] = d["model.layers.0.mlp.down_proj.g_idx"].flip(0).contiguous()
            save_file(d, str(f), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp\.down_proj.*act-order"):
        load_model(ao)


@pytest.mark.parametrize("qcfg, needle", [
    ({"quant_method": "gptq", "bits": "4", "group_size": 128}, "bits must be an integer"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 12.5}, "group_size must be an integer"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": "yes"}, "sym must be true or false"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32}, "holds no *.qweight tensors"),
])
def test_gptq_config_on_a_float_checkpoint_is_refused(tmp_path, qcfg, needle):
    """A GPTQ quantization_config with wrong types, or on a checkpoint without GPTQ tensors, is a user
    error; it used to run the float weights and call them w4a16."""
    from llmc.errors import ModelFormatError
    m = tmp_path / "m"
    shutil.copytree(STORIES, m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}))
    with pytest.raises(ModelFormatError, match=re.escape(needle)):
        load_model(m)
