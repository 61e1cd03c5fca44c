"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel `checkpoint_format` "gptq", as read by transformers
and vLLM): `export_gptq` writes an llmc-quantized checkpoint in it, `GptqStore` reads it back.

Per quantized linear with prefix `p` (its weight name without `.weight`), bits b, pack = 32 // b:
- `p.qweight` int32 [K / pack, N]: value j of word [i, n] (bits [j*b, (j+1)*b), lowest first) is
  u[n, i*pack + j], the unsigned quantized weight;
- `p.qzeros`  int32 [G, N / pack]: zero points packed along N the same way, stored as zero - 1 in
  format "gptq" (v1; readers add the 1 back) and as zero in "gptq_v2";
- `p.scales`  float16 [G, N];  `p.g_idx` int32 [K]: the group of input channel k (k // group_size);
- w[n, k] = scales[g_idx[k], n] * (u[n, k] - zero[g_idx[k], n]);  `p.bias` stays as stored.

llmc's int4 group-wise weights map one to one (u, z, scale are the same numbers, transposed and
repacked), the last group may be partial (g_idx expresses it). llmc's int8 per-channel weights map
to bits 8, group_size -1: u = q + 128, zero 128. Exactness needs fp16-representable scales: an
export refuses other scales unless asked to round them. Layers that cannot be expressed (a width
not a multiple of the pack factor, a v1 zero point of 0) make the export fail by name; nothing is
ever skipped silently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from llmc import __version__
from llmc.checkpoint import INDEX_FILE, TOKENIZER_FILES, WeightStore, check_model_files, check_path, read_json
from llmc.errors import ConfigError, LlmcError, ModelFormatError, UnsupportedModelError
from llmc.io import atomic_directory, check_output, write_json_atomic
from llmc.paths import copy_model_file
from llmc.quantized.formats import QuantizedWeight, TensorQuant, pack_int4, unpack_int4


QUANT_METHOD = "gptq"
FORMATS = ("gptq", "gptq_v2")
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
INT8_ZERO = 128


class GptqExportError(LlmcError):
    """An llmc checkpoint (or one of its layers) cannot be written in the GPTQ layout."""


# ---------------------------------------------------------------------------------------- packing

def pack_along_rows(u: Tensor, bits: int) -> Tensor:
    """u [R, C] with values in [0, 2**bits) -> int32 [R / pack, C]: word [i, c] holds u[i*pack + j, c]
    at bits [j*bits, (j+1)*bits)."""
    pack = 32 // bits
    r, c = u.shape
    assert r % pack == 0, (r, pack)
    shifts = (torch.arange(pack, dtype=torch.int64) * bits)[None, :, None]
    words = (u.to(torch.int64).reshape(r // pack, pack, c) << shifts).sum(dim=1)   # < 2**32, exact
    words = torch.where(words >= 2**31, words - 2**32, words)                        # two's complement
    return words.to(torch.int32)


def unpack_along_rows(words: Tensor, bits: int) -> Tensor:
    """The inverse of `pack_along_rows`: int32 [R / pack, C] -> int64 [R, C]."""
    pack = 32 // bits
    shifts = (torch.arange(pack, dtype=torch.int64) * bits)[None, :, None]
    vals = (words.to(torch.int64)[:, None, :] >> shifts) & ((1 << bits) - 1)
    return vals.reshape(-1, words.shape[1])


# ----------------------------------------------------------------------------------------- reading

def _config_format(qcfg: Mapping[str, Any]) -> str:
    return str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()


class GptqStore:
    """Wraps a WeightStore of a GPTQ checkpoint and presents every quantized linear under its logical
    name (`p.weight`) as an llmc QuantizedWeight; every other tensor as stored."""

    def __init__(self, base: WeightStore, qcfg: Mapping[str, Any]) -> None:
        self.base, self.qcfg = base, dict(qcfg)
        if qcfg.get("quant_method") != QUANT_METHOD:
            raise ModelFormatError(f"quantization method {qcfg.get('quant_method')!r} is not GPTQ")
        self.format = _config_format(qcfg)
        if self.format not in FORMATS:
            raise UnsupportedModelError(f"GPTQ checkpoint_format {self.format!r} is not readable by llmc",
                                        hint=f"llmc reads {', '.join(FORMATS)}")
        self.bits, self.group_size = qcfg.get("bits"), qcfg.get("group_size", -1)
        for key, value in (("bits", self.bits), ("group_size", self.group_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ModelFormatError(f"GPTQ quantization_config: {key} must be an integer, got {value!r}")
        self.sym = qcfg.get("sym", True)
        if not isinstance(self.sym, bool):
            raise ModelFormatError(f"GPTQ quantization_config: sym must be true or false, got {self.sym!r}")
        if self.bits not in (4, 8):
            raise UnsupportedModelError(f"GPTQ weights of {self.bits} bits are not supported by llmc (4 or 8)")
        if self.group_size == 0 or self.group_size < -1:
            raise ModelFormatError(f"malformed GPTQ group_size {self.group_size}")
        if self.bits == 8 and self.group_size != -1:
            raise UnsupportedModelError(f"8-bit GPTQ weights with group_size {self.group_size} are not supported",
                                        hint="llmc runs 8-bit weights per channel only (group_size -1)")
        if self.bits == 8 and not self.sym:
            raise UnsupportedModelError("asymmetric 8-bit GPTQ weights are not supported (llmc int8 is symmetric)")
        self.pack = 32 // self.bits
        self.prefixes = {n[: -len(".qweight")]: None for n in base.names() if n.endswith(".qweight")}
        if not self.prefixes:
            raise ModelFormatError("the config says GPTQ (quantization_config) but the checkpoint holds no "
                                   "*.qweight tensors")
        self.shapes: dict[str, tuple[int, int]] = {}
        for p in self.prefixes:
            self.shapes[f"{p}.weight"] = self._check_layer(p)

    def _check_layer(self, p: str) -> tuple[int, int]:
        for s in ("qzeros", "scales"):
            if f"{p}.{s}" not in self.base:
                raise ModelFormatError(f"GPTQ layer {p!r} lacks its tensor {p}.{s}")
        kp, n = self.base.shape(f"{p}.qweight")
        k = kp * self.pack
        g = 1 if self.group_size == -1 else -(-k // self.group_size)
        want = {"qweight": (kp, n), "qzeros": (g, n // self.pack), "scales": (g, n)}
        if f"{p}.g_idx" in self.base:
            want["g_idx"] = (k,)
        for s, shape in want.items():
            got = self.base.shape(f"{p}.{s}")
            if tuple(got) != shape or n % self.pack:
                raise ModelFormatError(f"GPTQ layer {p!r}: {p}.{s} has shape {list(got)}, expected {list(shape)} "
                                       f"({self.bits} bits, group_size {self.group_size}, K={k}, N={n})")
        for s, dt in (("qweight", "I32"), ("qzeros", "I32"), ("g_idx", "I32")):
            if f"{p}.{s}" in self.base and self.base.dtype(f"{p}.{s}") != dt:
                raise ModelFormatError(f"GPTQ layer {p!r}: {p}.{s} is {self.base.dtype(f'{p}.{s}')}, expected int32")
        if f"{p}.g_idx" in self.base:
            g_idx = self.base.get(f"{p}.g_idx").to(torch.int64)
            if not torch.equal(g_idx, self._g_idx(k)):
                raise UnsupportedModelError(
                    f"GPTQ layer {p!r}: its g_idx is not k // group_size (an act-order / desc_act checkpoint)",
                    hint="llmc reads GPTQ checkpoints quantized without act-order (desc_act false) only")
        return n, k

    def _g_idx(self, k: int) -> Tensor:
        return torch.zeros(k, dtype=torch.int64) if self.group_size == -1 else torch.arange(k) // self.group_size

    def __contains__(self, name: str) -> bool:
        return name in self.shapes or (name in self.base and not self._hidden(name))

    def _hidden(self, name: str) -> bool:
        p, _, s = name.rpartition(".")
        return s in SUFFIXES and p in self.prefixes

    def names(self) -> Iterator[str]:
        yield from self.shapes
        yield from (n for n in self.base.names() if not self._hidden(n))

    def fmt(self, k: int) -> TensorQuant:
        if self.bits == 8:
            return TensorQuant(dtype="int8", granularity="channel")
        gs = k if self.group_size == -1 else self.group_size
        return TensorQuant(dtype="int4", granularity="group", group_size=gs, symmetric=self.sym)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name] if name in self.shapes else self.base.shape(name)

    def dtype(self, name: str) -> str:
        return self.fmt(self.shapes[name][1]).key if name in self.shapes else self.base.dtype(name)

    def quantized_format(self, name: str) -> tuple[TensorQuant, None] | None:
        """(weight format, input format) of a quantized linear (GPTQ inputs stay float); None for a
        plain tensor."""
        return (self.fmt(self.shapes[name][1]), None) if name in self.shapes else None

    def get(self, name: str) -> Tensor | QuantizedWeight:
        if name not in self.shapes:
            if self._hidden(name) or name not in self.base:
                raise ModelFormatError(f"weight {name!r} is missing from the checkpoint")
            return self.base.get(name)
        p = name[: -len(".weight")]
        n, k = self.shapes[name]
        u = unpack_along_rows(self.base.get(f"{p}.qweight"), self.bits).T               # [N, K]
        zero = unpack_along_rows(self.base.get(f"{p}.qzeros").T.contiguous(), self.bits)  # [N, G]
        if self.format == "gptq":
            zero = zero + 1
        scale = self.base.get(f"{p}.scales").float().T.contiguous()                       # [N, G]
        fmt = self.fmt(k)
        if self.bits == 8:
            if not bool((zero == INT8_ZERO).all()):
                raise UnsupportedModelError(f"GPTQ layer {p!r}: 8-bit zero points other than {INT8_ZERO} "
                                            "are not supported (llmc int8 is symmetric)")
            return QuantizedWeight(fmt, (n, k), (u - INT8_ZERO).to(torch.int8).contiguous(), scale)
        return QuantizedWeight(fmt, (n, k), pack_int4(u.to(torch.uint8)).contiguous(), scale,
                               zero.to(torch.uint8).contiguous())

    def nbytes(self) -> int:
        return self.base.nbytes()

    def summary(self) -> dict[str, Any]:
        """The model's quantization in llmc's terms (recipe and provenance), for inspect and compile."""
        llmc = self.qcfg.get("llmc") if isinstance(self.qcfg.get("llmc"), dict) else {}
        gptq = {k: self.qcfg[k] for k in ("bits", "group_size", "sym", "desc_act") if k in self.qcfg}
        recipe = llmc.get("recipe")
        if not isinstance(recipe, dict):
            k = next(iter(self.shapes.values()), (0, self.group_size))[1]
            fmt = self.fmt(k)
            recipe = {"scheme": {"name": "w8a16" if self.bits == 8 else "w4a16", "weight": fmt.to_dict(),
                                 "activation": None, "skip": []},
                      "algorithm": "gptq", "kv_cache": None}
        return {"recipe": recipe, "source_format": f"{QUANT_METHOD}/{self.format}", "gptq": gptq,
                **{k: v for k, v in llmc.items() if k != "recipe"}}


# ----------------------------------------------------------------------------------------- writing

def _layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[2] if name.startswith("model.layers.") and len(parts) > 2 else "other"


def _layer_key(layer: str) -> tuple[int, int]:
    return (-1, 0) if layer == "other" else (0, int(layer)) if layer.isdigit() else (1, 0)


def _list(problems: list[str], limit: int = 8) -> str:
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _bits(fmt) -> int | None:
    """The GPTQ bit width of a weight format, or None when the layout cannot hold it (it keeps one
    float16 scale per group: not two-level scales)."""
    if fmt.dtype == "int4" and fmt.granularity == "group" and not fmt.two_level:
        return 4
    if fmt.dtype == "int8" and fmt.granularity == "channel":
        return 8
    return None


def _layers(ids: list[int]) -> str:
    """[0, 1, 2, 4] -> "0-2, 4"."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _grouped(names: list[str]) -> list[str]:
    """Weights by their name in a layer, with the layers that hold them: 'mlp.down_proj of layers 0-4'."""
    found: dict[str, list[int]] = {}
    for name in names:
        parts = name.removesuffix(".weight").split(".")
        layered = parts[:2] == ["model", "layers"] and len(parts) > 3 and parts[2].isdigit()
        found.setdefault(".".join(parts[3:]) if layered else ".".join(parts), []).append(
            int(parts[2]) if layered else -1)
    return [f"{w}{' of layers ' + _layers(ids) if ids[0] >= 0 else ''}" for w, ids in found.items()]


def _by_format(entries) -> str:
    """'int8: self_attn.q_proj of layers 1-3, ...; int4-g32: ...': which weights are in which format."""
    from llmc.passes.quant.sensitivity import format_label
    by: dict[str, list[str]] = {}
    for name, e in entries.items():
        by.setdefault(format_label(e.fmt), []).append(name)
    return "; ".join(f"{label}: {', '.join(_grouped(names))}" for label, names in by.items())


def _layout_problems(shapes: Mapping[str, tuple[int, ...]], bits: int) -> list[str]:
    """Every weight whose widths the layout cannot pack, one entry per (weight of a layer, reason)
    with the layers it holds in: 'mlp.down_proj of layers 0-4 (in features K = 172 ...)'."""
    pack = 32 // bits
    found: dict[tuple[str, str], list[int]] = {}
    for name, (n, k) in shapes.items():
        bad = ", ".join(f"{what} = {v} is not a multiple of {pack}"
                        for what, v in (("in features K", k), ("out features N", n)) if v % pack)
        if bad:
            parts = name.removesuffix(".weight").split(".")
            layered = parts[:2] == ["model", "layers"] and len(parts) > 3 and parts[2].isdigit()
            key = (".".join(parts[3:]) if layered else ".".join(parts), bad)
            found.setdefault(key, []).append(int(parts[2]) if layered else -1)
    return [f"{w}{' of layers ' + _layers(ids) if ids[0] >= 0 else ''} ({why})" for (w, why), ids in found.items()]


def _layout_error(problems: list[str], bits: int) -> GptqExportError:
    pack = 32 // bits
    return GptqExportError(f"cannot express in the GPTQ layout ({bits}-bit values pack {pack} per int32 word, so "
                           f"both widths must be multiples of {pack}): {_list(problems)}",
                           hint="GPTQ cannot hold these layers; keep the llmc checkpoint for this model")


def check_exportable(fmt, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Before quantizing for `--format gptq`: the weight format and the shapes of the linears to
    quantize fit the layout (what only the quantized values can tell is checked at export)."""
    from llmc.passes.quant.sensitivity import format_label
    bits = _bits(fmt)
    if bits is None and fmt.two_level:
        raise GptqExportError(f"weights in format {format_label(fmt)} have two-level scales (8-bit codes under a "
                              "scale per 8 groups), which the GPTQ layout cannot hold: it keeps a float16 scale "
                              "per group", hint="quantize with --float16-scales to export to GPTQ")
    if bits is None:
        raise GptqExportError(f"weights in format {fmt.key} have no GPTQ layout",
                              hint="GPTQ holds int4 group-wise (w4a16) or int8 per-channel (w8a16) weights")
    problems = _layout_problems(shapes, bits)
    if problems:
        raise _layout_error(problems, bits)


def _check_scales(p: str, scale: Tensor) -> tuple[Tensor, float, str | None]:
    """(fp16 scales, largest relative change of rounding them, problem or None)."""
    s16 = scale.to(torch.float16)
    back = s16.float()
    if not torch.isfinite(back).all() or bool(((back == 0) & (scale != 0)).any()):
        return s16, float("inf"), f"{p} (scales outside the float16 range)"
    rel = float(((back - scale).abs() / scale.abs().clamp_min(torch.finfo(torch.float32).tiny)).max())
    return s16, rel, None


def _gptq_tensors(p: str, qw: QuantizedWeight, s16: Tensor) -> dict[str, Tensor]:
    n, k = qw.shape
    if qw.fmt.dtype == "int8":
        bits, u = 8, (qw.data.to(torch.int16) + INT8_ZERO).T                           # [K, N]
        zero = torch.full((1, n), INT8_ZERO, dtype=torch.int64)                        # [G=1, N]
        g_idx = torch.zeros(k, dtype=torch.int32)
    else:
        bits, u = 4, unpack_int4(qw.data, k).T
        zero = qw.zero.to(torch.int64).T                                              # [G, N]
        g_idx = (torch.arange(k) // qw.fmt.group_size).to(torch.int32)
    return {f"{p}.qweight": pack_along_rows(u.contiguous(), bits),
            f"{p}.qzeros": pack_along_rows((zero - 1).T.contiguous(), bits).T.contiguous(),
            f"{p}.scales": s16.T.contiguous(),
            f"{p}.g_idx": g_idx}


def export_gptq(src: Path | str, out: Path | str, round_scales: bool = False, force: bool = False) -> dict:
    """An llmc-quantized checkpoint (int4 group-wise or int8 per-channel) -> a GPTQ-layout checkpoint
    directory (v1 "gptq" format), written atomically. Refuses, naming every offending layer, what
    the layout cannot express; returns a summary (layers, bytes, scale rounding)."""
    from llmc.quantized.store import QuantizedStore, entries_from_manifest

    src, out = check_path(src), Path(out)
    check_model_files(src)
    cfg = read_json(src / "config.json", "config.json")
    qsection = cfg.get("quantization_config")
    if qsection is not None and not isinstance(qsection, dict):
        raise ModelFormatError(f"{src / 'config.json'}: quantization_config must be an object")
    if qsection is None:
        raise ConfigError(f"{src} is not quantized", hint="quantize it first: llmc quantize --scheme w4a16")
    if qsection.get("quant_method") == QUANT_METHOD:
        raise ConfigError(f"{src} is already a GPTQ checkpoint")
    entries = entries_from_manifest(qsection, f"{src / 'config.json'}")
    check_output(out, [src], force=force)
    if not entries:
        raise GptqExportError(f"{src}: has no quantized weights to export")
    fmts = {e.fmt for e in entries.values()}
    if len(fmts) > 1:
        raise GptqExportError(f"{src}: weights in several formats, where a GPTQ checkpoint has one bit width and "
                              f"group size: {_by_format(entries)}",
                              hint="keep the llmc checkpoint for a mixed-precision model, or quantize with one format")
    fmt = next(iter(fmts))
    check_exportable(fmt, {})
    bits = _bits(fmt)
    group_size = fmt.group_size if bits == 4 else -1
    skipped = [n for n in qsection.get("skipped", []) if n.startswith("model.layers.")]
    if skipped:
        raise GptqExportError(f"{src}: linear weights of decoder layers are left unquantized ({_list(skipped)}); "
                              "GPTQ loaders expect every linear of a decoder layer quantized",
                              hint="quantize without skipping decoder linears")
    store = QuantizedStore(WeightStore.open(src), entries)

    # Pass 1 (reads scales and zeros only): everything the layout cannot express, all layers at once.
    layout = _layout_problems({name: e.shape for name, e in entries.items()}, bits)
    if layout:
        raise _layout_error(layout, bits)
    zeros, ranges, scales16, inexact = [], [], {}, []
    worst = (0.0, None)
    zero_8 = True                     # GPTQ's sym means zero point 8 everywhere (readers may not read qzeros)
    for name, e in entries.items():
        p = name.removesuffix(".weight")
        scale, zero = store.scales(name)
        if fmt.dtype == "int4":
            zero_8 = zero_8 and bool((zero == 8).all())
            if bool((zero == 0).any()):
                zeros.append(f"{p} ({int((zero == 0).sum())} of {zero.numel()} groups)")
        s16, rel, problem = _check_scales(p, scale)
        if problem:
            ranges.append(problem)
        scales16[name] = s16
        if rel > 0:
            inexact.append(f"{p} (largest relative change {rel:.3g})")
            if rel > worst[0]:
                worst = (rel, p)
    if zeros:
        raise GptqExportError("zero point 0 cannot be stored in the GPTQ v1 layout (it keeps zero - 1): "
                              f"{_list(zeros)}",
                              hint="quantize with symmetric weights (zero point 8)")
    if ranges:
        raise GptqExportError(f"scales that float16, which GPTQ stores, cannot hold even rounded: {_list(ranges)}")
    if inexact and not round_scales:
        raise GptqExportError(f"scales not exactly representable in float16, which GPTQ stores: {_list(inexact)}",
                              hint="pass round_scales=True to round them (llmc quantize --format gptq always "
                                   "does), changing the weights by the relative amounts shown")

    src_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    provenance = {"recipe": qsection.get("recipe"), "llmc_version": qsection.get("llmc_version"),
                  "source": qsection.get("source"), "exported_from": str(src), "exported_by": f"llmc {__version__}",
                  "scales_rounded": bool(inexact), "max_scale_rel_change": worst[0]}
    qcfg = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size, "desc_act": False,
            "sym": fmt.symmetric and zero_8, "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True,
            "static_groups": False, "llmc": provenance}

    groups: dict[str, list[str]] = {}
    for name in store.names():
        groups.setdefault(_layer_of(name), []).append(name)
    order = sorted(groups, key=_layer_key)
    weight_map: dict[str, str] = {}
    with atomic_directory(out, overwrite=force, inputs=[src]) as tmp:
        for i, layer in enumerate(order):
            tensors: dict[str, Tensor] = {}
            for name in groups[layer]:
                if name in entries:
                    tensors.update(_gptq_tensors(name.removesuffix(".weight"), store.get(name), scales16[name]))
                else:
                    tensors[name] = store.get(name).contiguous()
            shard = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
            save_file(tensors, str(tmp / shard), metadata={"format": "pt", "producer": f"llmc {__version__}"})
            weight_map.update({k: shard for k in tensors})
            del tensors
        write_json_atomic(tmp / INDEX_FILE, {"metadata": {"producer": f"llmc {__version__}"},
                                             "weight_map": weight_map})
        write_json_atomic(tmp / "config.json", {**src_cfg, "quantization_config": qcfg})
        for fname in TOKENIZER_FILES:
            copy_model_file(src, fname, tmp)
    return {"output": str(out), "source": str(src), "layers": len(entries), "bits": bits,
            "group_size": group_size, "sym": qcfg["sym"],
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors"),
            "scales_rounded": len(inexact), "max_scale_rel_change": worst[0], "max_scale_rel_change_layer": worst[1]}
