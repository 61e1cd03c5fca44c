"""`llmc gate`: verdicts from bootstrap intervals (by hand on made-up records, and on real quality
results of golden/stories260K), exit codes 0 / 1 / 2, JUnit XML validated against the JUnit schema,
--update-baseline."""
from __future__ import annotations

import json
import math
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from llmc.bench.result import BenchResult, exact, sampled
from llmc.bench.stats import bootstrap_change, compute
from llmc.cli import main
from llmc.errors import ConfigError
from llmc.gate import gate, judge
from llmc.gate_rules import GateConfig, Rule, gate_config
from llmc.io import stamp_json
from llmc.junit import junit_xml
from tests.helpers import GOLDEN, STORIES

TEXT = GOLDEN / "tinystories_valid_head.txt"
JUNIT_XSD = Path(__file__).parent / "junit.xsd"


# ---- made-up results -------------------------------------------------------------------------

def windows(n: int, nll_per_token: float, noise: float = 0.3, seed: int = 0, ids: bool = True) -> list[dict]:
    """n windows of 100 tokens, each with its own difficulty (shared by every model: the same seed)
    plus a model's own level."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        difficulty = random.Random(1000 + i).gauss(0, 0.5)             # the window's, whatever the model
        nll = 100 * (nll_per_token + difficulty + rng.gauss(0, noise * 0.1))
        out.append({**({"id": f"w{i}"} if ids else {}), "tokens": 100, "nll": nll, "ref_nll": nll, "kl": 0.01 * 100,
                    "agree": 80})
    return out


def quality_result(records: list[dict], size: int = 1000, **config) -> dict:
    s = {"windows": records}
    metrics = {"perplexity": sampled("exp_ratio", "windows", ("nll", "tokens"), s, "ppl", "lower"),
               "top1_agreement": sampled("ratio", "windows", ("agree", "tokens"), s, "fraction", "higher"),
               "reference_perplexity": sampled("exp_ratio", "windows", ("ref_nll", "tokens"), s, "ppl", None),
               "bytes_on_disk": exact(size, "bytes", "lower")}
    cfg = {"text_sha256": "t", "seqlen": 128, "max_tokens": None, "reference_sha256": "r", "kl": "exact", **config}
    return stamp_json(BenchResult("quality", {"path": "m"}, {}, cfg, metrics, s).to_json())


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


CFG = GateConfig(rules={"perplexity": Rule(0.02)}, default=None)


def verdict_of(base: list[dict], cur: list[dict], cfg: GateConfig = CFG, **kw):
    r = {v.metric: v for v in gate_verdicts(quality_result(base, **kw), quality_result(cur, **kw), cfg)}
    return r["perplexity"]


def gate_verdicts(b: dict, c: dict, cfg: GateConfig):
    from llmc.gate import compare
    return compare(b, c, cfg, "here")


def test_statistics_recompute_the_value():
    recs = windows(5, 1.5)
    assert compute("exp_ratio", recs, ("nll", "tokens")) == pytest.approx(
        math.exp(sum(r["nll"] for r in recs) / 500))
    assert compute("ratio", recs, ("agree", "tokens")) == 0.8
    assert compute("p50", [{"x": [1, 2]}, {"x": [3]}, {"x": None}], ("x",)) == 2      # lists flattened, None skipped
    assert compute("mean", [{"x": None}], ("x",)) is None


def test_paired_bootstrap_sees_a_small_change_an_unpaired_one_cannot():
    """The windows differ far more among themselves than the two models do: pairing cancels that."""
    base, cur = windows(200, 1.50, seed=1), windows(200, 1.51, seed=2)         # ppl +1%
    paired = bootstrap_change("exp_ratio", ("nll", "tokens"), base, cur, relative=True)
    unpaired = bootstrap_change("exp_ratio", ("nll", "tokens"), windows(200, 1.50, seed=1, ids=False),
                                windows(200, 1.51, seed=2, ids=False), relative=True)
    assert paired.paired and not unpaired.paired
    assert paired.change == pytest.approx(unpaired.change)
    assert 0 < paired.low < paired.change < paired.high                          # the +1% is resolved...
    assert unpaired.low < 0 < unpaired.high                                      # ...and lost without pairing
    assert (paired.high - paired.low) * 5 < unpaired.high - unpaired.low


@pytest.mark.parametrize("level, expected", [
    (1.50, "unchanged"), (1.49, "unchanged"),          # ppl -1%: within the 2% tolerance
    (1.55, "regressed"), (1.44, "improved"),           # +5%, -6%: beyond it over the whole interval
])
def test_verdicts(level, expected):
    v = verdict_of(windows(100, 1.50, seed=1), windows(100, level, seed=2))
    assert v.verdict == expected, v
    assert v.paired and v.samples == 100


def test_an_interval_across_the_tolerance_is_inconclusive_and_says_how_many_samples_would_settle_it():
    base, cur = windows(12, 1.50, seed=1, noise=3), windows(12, 1.50 + math.log(1.025), seed=2, noise=3)
    v = verdict_of(base, cur)
    assert v.low < 0.02 < v.high and v.verdict == "inconclusive"
    assert v.needed > 12 and f"about {v.needed} samples would settle it" in v.reason


def test_too_few_samples_is_inconclusive_not_a_verdict():
    v = verdict_of(windows(4, 1.50, seed=1), windows(4, 2.0, seed=2))           # +65% but 4 windows
    assert v.verdict == "inconclusive" and v.needed == 10 and "4 samples, fewer than the 10" in v.reason


def test_exact_values_and_directions():
    cfg = GateConfig(rules={"bytes_on_disk": Rule(0.05)}, default=None)
    vs = {v.metric: v for v in gate_verdicts(quality_result(windows(20, 1.5), size=1000),
                                             quality_result(windows(20, 1.5), size=1100), cfg)}
    b = vs["bytes_on_disk"]
    assert b.verdict == "regressed" and b.change == pytest.approx(0.1) and b.samples is None   # 10% larger
    assert vs["top1_agreement"].verdict == "not gated" and "reference_perplexity" not in vs    # informational
    worse = dict(windows(20, 1.5)[0])
    assert judge(None, (0.8, 0.7), Rule(0.05, relative=False), "higher", cfg, "quality", "top1", "").verdict == "regressed"
    assert judge(None, (0.8, 0.78), Rule(0.05, relative=False), "higher", cfg, "quality", "top1", "").verdict == "unchanged"
    assert worse


def test_gate_config_from_a_table_and_its_errors():
    cfg = gate_config({"confidence": 0.9, "metrics": {"perplexity": {"tolerance": 0.02, "required": True},
                                                      "decode_tok_s_ratio": {"tolerance": 0.3}}})
    assert cfg.confidence == 0.9 and cfg.rule("perplexity") == Rule(0.02, True, True)
    assert cfg.rule("decode_tok_s_ratio@batch1") == Rule(0.3) and cfg.rule("kl_divergence") == Rule(0.05)
    assert gate_config({"default_tolerance": 0}).rule("anything") is None
    for table, needle in (({"confidnce": 0.9}, "no key 'confidnce'"), ({"confidence": 1.5}, "confidence must be"),
                          ({"metrics": {"ppl": 0.02}}, "metrics.ppl must be a table with a tolerance"),
                          ({"metrics": {"ppl": {"tolerance": 0.1, "relatve": True}}}, "metrics.ppl.relatve"),
                          ({"metrics": {"ppl": {"tolerance": -1}}}, "at least 0")):
        with pytest.raises(ConfigError, match=needle):
            gate_config(table)


def test_bundled_profiles_gate_tables_load():
    from llmc.gate import config_from_profile
    from llmc.profiles import available_profiles, load_profile

    gated = [name for name in available_profiles() if load_profile(name).section("gate")]
    assert {"int4-gptq", "int8"} <= set(gated)
    for name in gated:
        cfg = config_from_profile(name)
        assert cfg.rule("perplexity") is not None and cfg.rule("perplexity").required


# ---- the command line: exit codes, JUnit, --update-baseline ------------------------------------

def run(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["gate", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def validate_junit(path: Path) -> ET.Element:
    xmlschema = pytest.importorskip("xmlschema", reason="pip install xmlschema (the dev extra) validates JUnit XML")
    xmlschema.XMLSchema(str(JUNIT_XSD)).validate(str(path))
    return ET.parse(path).getroot()


def test_regression_exits_1_with_a_failing_junit_case(tmp_path, capsys):
    base = write(tmp_path / "base.json", quality_result(windows(100, 1.50, seed=1)))
    cur = write(tmp_path / "cur.json", quality_result(windows(100, 1.56, seed=2)))
    junit = tmp_path / "gate.xml"
    code, out, err = run(capsys, cur, "--baseline", base, "--junit", junit, "--profile", "int4-gptq")
    assert code == 1 and "regressed" in out and "gate FAILED" in err
    root = validate_junit(junit)
    failures = root.findall("./testsuite/testcase/failure")
    assert root.get("failures") == "1" and len(failures) == 1
    msg = failures[0].get("message")
    assert re.match(r"perplexity regressed: \+[\d.]+% \(CI \+[\d.]+% … \+[\d.]+%\); worse by more than the "
                    r"tolerance of 3.00%", msg), msg                                 # the metric, change, interval
    code, _, _ = run(capsys, base, "--baseline", base, "--junit", junit, "--profile", "int4-gptq")
    assert code == 0 and validate_junit(junit).get("failures") == "0"


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    base = write(tmp_path / "base.json", quality_result(windows(20, 1.5)))
    other = write(tmp_path / "other.json", quality_result(windows(20, 1.5), seqlen=256))
    junk = write(tmp_path / "junk.json", {"hello": 1})
    old = write(tmp_path / "old.json", {"schema": "llmc.bench.throughput/1"})
    no_ppl = quality_result(windows(20, 1.5))
    del no_ppl["metrics"]["perplexity"]
    no_ppl = write(tmp_path / "no-ppl.json", no_ppl)
    for args, needle in (([other], "not measured as the baseline was (seqlen 128 in the baseline, 256 here)"),
                         ([junk], "not an llmc bench result of schema llmc.bench.result/1"),
                         ([old], "rerun the bench with this llmc"),
                         ([no_ppl, "--profile", "int4-gptq"], "the required metric perplexity is missing"),
                         ([tmp_path / "none.json"], "no such result file"),
                         ([base, base], "do not match the baseline")):
        code, _, err = run(capsys, *args, "--baseline", base)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, lines)


def test_update_baseline_writes_atomically_and_refuses_a_foreign_file(tmp_path, capsys):
    a = write(tmp_path / "a.json", quality_result(windows(20, 1.5)))
    b = write(tmp_path / "b.json", quality_result(windows(20, 1.6)))
    baseline = tmp_path / "baselines" / "model.json"
    code, _, err = run(capsys, a, "--baseline", baseline, "--update-baseline")
    assert code == 0 and "wrote the baseline" in err
    assert json.loads(baseline.read_text())["samples"] == json.loads(a.read_text())["samples"]
    code, out, _ = run(capsys, b, "--baseline", baseline, "--update-baseline")       # shows the change, then writes
    assert code == 0 and "regressed" in out
    assert json.loads(baseline.read_text())["samples"] == json.loads(b.read_text())["samples"]
    assert [p.name for p in baseline.parent.iterdir()] == ["model.json"]              # no temp file left
    foreign = write(tmp_path / "mine.json", {"mine": 1})
    code, _, err = run(capsys, a, "--baseline", foreign, "--update-baseline")
    assert code == 2 and "was not written by llmc" in err and json.loads(foreign.read_text()) == {"mine": 1}


def test_several_results_bundle_into_one_baseline(tmp_path, capsys):
    q = write(tmp_path / "q.json", quality_result(windows(20, 1.5)))
    q2 = write(tmp_path / "q2.json", quality_result(windows(20, 1.7)))
    baseline = tmp_path / "both.json"
    assert run(capsys, q, q2, "--baseline", baseline, "--update-baseline")[0] == 0
    assert json.loads(baseline.read_text())["schema"] == "llmc.bench.baseline/1"
    code, out, _ = run(capsys, q, q2, "--baseline", baseline, "--json", "-")
    r = json.loads(out)
    assert code == 0 and r["passed"] and r["counts"]["unchanged"] >= 2
    code, _, _ = run(capsys, q2, q, "--baseline", baseline)                          # matched in order: q2 vs q
    assert code == 1


# ---- real results: golden/stories260K ------------------------------------------------------------

def bench_quality(model, out: Path, *extra) -> Path:
    main(["bench", "quality", str(model), "--reference", str(STORIES), "--text", str(TEXT), "--seqlen", "128",
          "--json", str(out), *extra])
    return out


def test_a_degraded_recipe_is_regressed_and_the_same_model_is_not(stories_w4a16, tmp_path, capsys):
    """RTN w4a16 in groups of 32 is the baseline. The same recipe on the model with one weight
    perturbed by noise (layer 0's down_proj, 0.3 of its standard deviation: +6.7% perplexity) is
    worse: the gate says regressed, exit 1, a failing JUnit case. The baseline model measured
    again: unchanged everywhere."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from llmc.quantizer import quantize_checkpoint
    from tests.conftest import rtn

    noisy = tmp_path / "noisy"
    shutil.copytree(STORIES, noisy)
    weights = load_file(noisy / "model.safetensors")
    w = weights["model.layers.0.mlp.down_proj.weight"]
    weights["model.layers.0.mlp.down_proj.weight"] = w + 0.3 * w.std() * torch.randn(
        w.shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(noisy / "model.safetensors"), metadata={"format": "pt"})
    wrong = tmp_path / "noisy-w4a16"
    quantize_checkpoint(noisy, wrong, rtn("w4a16", group_size=32))
    base = bench_quality(stories_w4a16, tmp_path / "base.json")
    again = bench_quality(stories_w4a16, tmp_path / "again.json")
    bad = bench_quality(wrong, tmp_path / "bad.json")
    capsys.readouterr()
    junit = tmp_path / "junit.xml"
    code, out, err = run(capsys, bad, "--baseline", base, "--profile", "int4-gptq", "--junit", junit)
    assert code == 1, out + err
    failures = {c.get("name"): c.find("failure") for c in validate_junit(junit).iter("testcase")}
    assert failures["perplexity"] is not None and "perplexity regressed" in failures["perplexity"].get("message")
    code, out, err = run(capsys, again, "--baseline", base, "--profile", "int4-gptq", "--json", "-")
    verdicts = {v["metric"]: v["verdict"] for v in json.loads(out)["verdicts"]}
    assert code == 0 and set(verdicts.values()) == {"unchanged"}, verdicts


def test_list_fields_are_resampled_by_record_and_unpaired_runs_compare():
    """Serving latencies: each request's inter-token gaps are a list; a bootstrap draws whole
    requests (their gaps travel together), and runs without window ids are compared unpaired."""
    rng = random.Random(3)

    def requests(n, scale):
        return [{"itl_ms": [scale * rng.uniform(8, 12) for _ in range(rng.randint(3, 9))],
                 "ttft_ms": scale * rng.uniform(40, 60)} for _ in range(n)]

    base, slow = requests(40, 1.0), requests(40, 1.3)
    same = bootstrap_change("p90", ("itl_ms",), base, requests(40, 1.0), relative=True)
    worse = bootstrap_change("p90", ("itl_ms",), base, slow, relative=True)
    assert not same.paired and same.low < 0 < same.high
    assert 0.15 < worse.low < worse.change < worse.high
    flat = sorted(g for r in slow for g in r["itl_ms"])
    assert worse.current == pytest.approx(float(np.percentile(flat, 90)))
    v = judge(worse, None, Rule(0.10), "lower", CFG, "serve", "itl_ms_p90", "ms")
    assert v.verdict == "regressed"
