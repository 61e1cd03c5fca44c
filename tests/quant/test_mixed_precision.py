"""Sensitivity (llmc.passes.quant.sensitivity) and mixed precision under a budget
(llmc.passes.quant.allocation, `llmc quantize --target-bpw/--target-size`), on the golden model."""
from __future__ import annotations

import itertools
import math
import json
import re

import pytest
import torch

from llmc.arch import parse_arch
from llmc.calibration import load_calibration
from llmc.checkpoint import ITEMSIZE, WeightStore, read_json
from llmc.cli import main
from llmc.decoder import build_decoder_graph
from llmc.errors import OptionError
from llmc.gptq_format import GptqExportError, export_gptq
from llmc.kernels.reference.dequant import dequantize
from llmc.loader import load_model
from llmc.passes.quant.allocation import allocate
from llmc.mixed_precision import measure, probe_kl
from llmc.passes.quant.sensitivity import Choice, Sensitivity, Unit, format_label
from llmc.quantized.formats import QuantizedWeight, TensorQuant, quantize as quantize_weight
from llmc.quantized.scheme import recipe_from_options
from llmc.quantizer import quantize
from llmc.tokenizer import Tokenizer
from tests.helpers import GOLDEN, STORIES

TEXT = GOLDEN / "tinystories_valid_head.txt"
G32 = TensorQuant(dtype="int4", granularity="group", group_size=32)


# ------------------------------------------------------------------------------------ allocation

def table(rows: dict[str, list[tuple[int, float]]]) -> Sensitivity:
    units = tuple(Unit(n, "linear", (n,), ((1, 8),)) for n in rows)
    return Sensitivity(units, {n: tuple(Choice(None, b, kl, True) for b, kl in sorted(r)) for n, r in rows.items()},
                       tokens=1)


def brute_force(s: Sensitivity, budget: int) -> float:
    best = float("inf")
    for pick in itertools.product(*(s.choices[u.name] for u in s.units)):
        if sum(c.nbytes for c in pick) <= budget:
            best = min(best, sum(c.kl for c in pick))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_within_budget_and_near_the_optimum(seed):
    """On random tables (4 units, 4 choices each), against every combination: within the budget, and
    the least KL there (budgets under RESOLUTION bytes are solved exactly)."""
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for u in range(4):
        sizes = sorted(torch.randint(10, 60, (4,), generator=g).tolist())
        kls = sorted((torch.rand(4, generator=g) * 0.1).tolist(), reverse=True)
        rows[f"u{u}"] = list(zip(sizes, kls))
    s = table(rows)
    lo, hi = sum(min(b for b, _ in r) for r in rows.values()), sum(max(b for b, _ in r) for r in rows.values())
    for budget in range(lo, hi + 1, max(1, (hi - lo) // 7)):
        plan = allocate(s, budget)
        assert plan.nbytes <= budget and plan.nbytes == sum(c.nbytes for c in plan.chosen.values())
        assert plan.predicted_kl == pytest.approx(brute_force(s, budget), abs=1e-12)
    assert allocate(s, hi).predicted_kl == pytest.approx(sum(min(k for _, k in r) for r in rows.values()))


def test_allocation_below_the_smallest_is_refused_with_both_numbers():
    s = table({"a": [(10, 1.0), (20, 0.0)], "b": [(10, 1.0)]})
    with pytest.raises(OptionError, match=r"target_size: 19 bytes \(9\.500 bits per weight\) is less than the "
                                          r"smallest these weights can be stored in: 20 bytes"):
        allocate(s, 19, "target_size")


# ------------------------------------------------------------------------------------ sensitivity

@pytest.fixture(scope="module")
def golden():
    cfg = read_json(STORIES / "config.json", "config.json")
    arch = parse_arch(cfg)
    graph = build_decoder_graph(arch)
    store = WeightStore.open(STORIES)
    linears = {n.inputs[1] for n in graph.nodes if n.op == "linear"}
    tok = Tokenizer(STORIES)
    calib = load_calibration(tok, None, 6, 128, vocab_size=arch.vocab_size).samples
    held_out = load_calibration(tok, TEXT, 8, 128, vocab_size=arch.vocab_size).samples   # another text
    sens = measure(arch, graph, store.get, lambda n: ITEMSIZE[store.dtype(n)], calib, linears)
    return arch, graph, store, sens, held_out


def measured_kl(golden, fmts: dict[str, TensorQuant]) -> float:
    arch, graph, store, _, held_out = golden
    replaced = {n: dequantize(quantize_weight(store.get(n).float(), f, n)) for n, f in fmts.items()}
    return probe_kl(arch, graph, store.get, held_out, replaced)


def test_sensitivity_table_covers_every_unit_and_format(golden):
    _, _, _, sens, _ = golden
    kinds = [u.kind for u in sens.units]
    assert kinds.count("linear") == 20 and kinds[-1] == "embeddings+head"        # tied: one unit
    assert sens.units[0].name == "model.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert sens.units[0].weights == tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")
    down = next(u for u in sens.units if u.name == "model.layers.0.mlp.down_proj")
    labels = {c.label for c in sens.choices[down.name]}
    # K = 172: groups of 32, 64 and 128 differ; for K = 64 the groups of 64 and 128 are both a row, and
    # two-level scales need two groups in a row at least
    two_level = {f"int4-g{g}{a}-s8" for g in (16, 32, 64) for a in ("", "-asym")}
    assert labels == {"int4-g128", "int4-g128-asym", "int4-g64", "int4-g64-asym", "int4-g32", "int4-g32-asym",
                      "int8", *two_level}
    assert {c.label for c in sens.choices[sens.units[0].name]} == {
        "int4-g128", "int4-g128-asym", "int4-g32", "int4-g32-asym", "int8", *(two_level - {"int4-g64-s8",
                                                                                          "int4-g64-asym-s8"})}
    for u in sens.units:
        cs = sens.choices[u.name]
        assert sum(c.measured for c in cs) == (1 if u.kind == "linear" else len(cs))
        assert all(c.kl >= 0 for c in cs) and [c.nbytes for c in cs] == sorted(c.nbytes for c in cs)
        if u.kind == "linear":                   # int8 costs far less KL than any int4
            assert max(c.kl for c in cs if c.label == "int8") < 0.05 * min(c.kl for c in cs if c.label != "int8")
    d = sens.to_dict()
    assert d["tokens"] == 6 * 128 and d["units"][0]["candidates"][0].keys() == {"format", "bytes", "kl", "measured"}


def test_most_sensitive_layers_cost_more_kl_than_least_sensitive(golden):
    """The ranking predicts reality: int4 (g32) on the 4 units ranked most sensitive costs more KL,
    measured on text the ranking never saw, than on the 4 ranked least sensitive (of 20)."""
    _, _, _, sens, _ = golden
    ranking = sens.ranking("int4-g32")
    units = {u.name: u for u in sens.units}

    def kl_of(names):
        return measured_kl(golden, {w: G32 for n in names for w in units[n].weights})
    top, bottom = kl_of([n for n, _ in ranking[:4]]), kl_of([n for n, _ in ranking[-4:]])
    print(f"most sensitive 4: KL {top:.5f}, least sensitive 4: {bottom:.5f}")
    assert top > 3 * bottom, (top, bottom)


def test_scaled_kl_agrees_with_measured_kl(golden):
    """The KL of the formats that were not probed, scaled by the Hessian-weighted output error, agrees
    with the KL measured with that format (on other text): rank correlation over the 20 linear units
    above 0.8, and the totals within 35%."""
    _, _, _, sens, _ = golden
    predicted, measured = [], []
    for u in sens.units:
        if u.kind != "linear":
            continue
        c = next(c for c in sens.choices[u.name] if c.label == "int4-g32-asym")
        assert not c.measured
        predicted.append(c.kl)
        fmt = TensorQuant(dtype="int4", granularity="group", group_size=32, symmetric=False)
        measured.append(measured_kl(golden, {w: fmt for w in u.weights}))

    def ranks(xs):
        order = sorted(range(len(xs)), key=xs.__getitem__)
        r = [0] * len(xs)
        for i, j in enumerate(order):
            r[j] = i
        return torch.tensor(r, dtype=torch.float64)
    rp, rm = ranks(predicted), ranks(measured)
    spearman = float(torch.corrcoef(torch.stack([rp, rm]))[0, 1])
    print(f"rank correlation {spearman:.3f}; totals predicted {sum(predicted):.5f}, measured {sum(measured):.5f}")
    assert spearman > 0.8, (spearman, predicted, measured)
    assert sum(predicted) == pytest.approx(sum(measured), rel=0.35)


# ------------------------------------------------------------------------------------ quantize

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "q"
    recipe = recipe_from_options("w4a16", algo="rtn", target_size=220_000, calib_samples=6, calib_seqlen=128)
    r, _ = quantize(STORIES, out, recipe)
    return out, r


def test_target_size_plan_is_carried_out(mixed):
    out, r = mixed
    plan = r.mixed_precision
    st = WeightStore.open(out)
    tensors = sum(math.prod(st.shape(n)) * ITEMSIZE[st.dtype(n)] for n in st.names())
    assert tensors <= 220_000 and plan["bytes"] <= plan["budget_bytes"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["mixed_precision"] == plan and cfg["sensitivity"] == r.sensitivity
    assert cfg["recipe"]["target_size"] == 220_000 and cfg["recipe"]["head"] is None      # the recipe as given
    m = load_model(out)
    chosen = {u["unit"]: u["format"] for u in plan["units"]}
    assert len(set(chosen.values())) > 1                                     # really mixed
    for unit, label in chosen.items():
        if unit.startswith("model.layers."):
            prefix, parts = unit.rsplit(".", 1)
            for p in parts.split("+"):
                w = m.weights.get(f"{prefix}.{p}.weight")
                assert isinstance(w, QuantizedWeight) and format_label(w.fmt) == label, unit
    emb = m.weights.get("model.embed_tokens.weight")
    assert format_label(emb.fmt if isinstance(emb, QuantizedWeight) else None) == chosen["model.embed_tokens+lm_head"]


def test_gptq_export_of_a_mixed_checkpoint_names_the_layers_per_format(mixed, tmp_path):
    out, r = mixed
    with pytest.raises(GptqExportError, match=r"several formats") as e:
        export_gptq(out, tmp_path / "g")
    msg = str(e.value)
    for label in {u["format"] for u in r.mixed_precision["units"] if u["unit"].startswith("model.layers.")}:
        assert f"{label}: " in msg                   # every format, with the weights in it
    assert "self_attn.q_proj of layers" in msg and "mlp.down_proj of layers" in msg
    assert not (tmp_path / "g").exists()


def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        rc = main(args) or 0
    except SystemExit as e:
        rc = e.code
    got = capsys.readouterr()
    return rc, got.out, got.err


@pytest.mark.parametrize("args, message", [
    (["--scheme", "w8a8", "--target-bpw", "6"], "--target-bpw: chooses among weight-only formats"),
    (["--scheme", "w4a16", "--target-bpw", "6", "--target-size", "300000"], "--target-size: give --target-bpw or"),
    (["--scheme", "w4a16", "--target-bpw", "6", "--head", "int8"], "--head: is chosen by --target-bpw"),
    (["--scheme", "w4a16", "--target-bpw", "6", "--group-size", "32"], "--group-size: has no effect"),
    (["--scheme", "w4a16", "--target-bpw", "6", "--format", "gptq"], "--format: a mixed-precision target"),
    (["--scheme", "w4a16", "--target-bpw", "4.5", "--calib-samples", "2", "--calib-seqlen", "64"],
     "--target-bpw: .* is less than the smallest these weights can be stored in"),
])
def test_cli_refuses_bad_targets_in_one_line(tmp_path, capsys, args, message):
    rc, out, err = run_cli(["quantize", str(STORIES), "-o", str(tmp_path / "q"), *args], capsys)
    assert rc == 2 and len(err.strip().splitlines()) <= 2, err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "q").exists()


def test_cli_target_bpw_says_what_it_chose(tmp_path, capsys):
    rc, out, err = run_cli(["quantize", str(STORIES), "-o", str(tmp_path / "q"), "--scheme", "w4a16",
                            "--target-bpw", "6", "--calib-samples", "4", "--calib-seqlen", "64"], capsys)
    assert rc == 0, err
    assert "mixed precision: " in out and "model.layers.4.mlp.down_proj" in out and "bits per weight" in out
    rc, out, err = run_cli(["quantize", str(STORIES), "-o", str(tmp_path / "j"), "--scheme", "w4a16",
                            "--target-bpw", "6", "--calib-samples", "4", "--calib-seqlen", "64", "--json"], capsys)
    d = json.loads(out)
    assert 5.9 < d["mixed_precision"]["bits_per_weight"] <= 6.0 and len(d["sensitivity"]["units"]) == 21


def test_cli_sensitivity_alone_writes_the_table(tmp_path, capsys):
    rc, out, err = run_cli(["quantize", str(STORIES), "-o", str(tmp_path / "q"), "--scheme", "w4a16", "--sensitivity",
                            "--calib-samples", "4", "--calib-seqlen", "64", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["mixed_precision"] is None and len(d["sensitivity"]["units"]) == 21
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["sensitivity"] == d["sensitivity"] and "mixed_precision" not in cfg
    assert {e["format"]["group_size"] for e in cfg["weights"].values()} == {128}         # the scheme, unchanged



def test_a_mixed_checkpoint_inspects_compiles_and_runs_on_every_kernel_set(mixed, tmp_path):
    """inspect names the formats; the native executor (one format per fused unit) matches the
    reference kernels on the mixed model, checkpoint and engine alike."""
    from llmc.compiler import compile
    from llmc.inspection import inspect
    from tests.helpers import forward_all
    out, r = mixed
    q = inspect(out).quantization
    assert q.startswith("w4a16 rtn, mixed precision at ") and "int8 x" in q and "int4-" in q, q
    engine = tmp_path / "mixed.engine"
    compile(out, engine)
    assert inspect(engine).quantization == q
    ids = [1, 403, 261, 266, 299, 269, 265, 262, 433]
    for path in (out, engine):
        m = load_model(path)
        a, b = forward_all(m, ids, "native"), forward_all(m, ids, "reference")
        assert float((a - b).abs().max()) < 1e-3
