"""`bench throughput`: the result file's schema, tokens counted independently of llmc's own count,
statistics recomputed from the raw samples, --threads applied, the table, --json, option errors.
No timing assertions: only that the numbers are consistent."""
from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
import torch

from llmc.bench.throughput import throughput
from llmc.cli import main
from llmc.errors import OptionError
from llmc.runtime.runner import Runner
from tests.helpers import STORIES

ARGS = ["--batch", "1,2", "--input-len", "8", "--output-len", "6", "--repeat", "2", "--warmup", "0"]
METRICS = {"prefill_tok_s": ("tok/s", "higher"), "decode_tok_s": ("tok/s", "higher"),
           "e2e_tok_s": ("tok/s", "higher"), "ttft_ms": ("ms", "lower")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `--threads 1 --json FILE` run, with every token the Runners emit counted per (batch size,
    request) and torch's thread count seen at every step."""
    emitted, threads, before = Counter(), set(), torch.get_num_threads()
    step = Runner.step

    def counting_step(self):
        events = step(self)
        threads.add(torch.get_num_threads())
        emitted.update((self.cfg.max_num_seqs, e.request_id) for e in events)
        return events

    path = tmp_path_factory.mktemp("throughput") / "t.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Runner, "step", counting_step)
        main(["bench", "throughput", str(STORIES), *ARGS, "--threads", "1", "--json", str(path)])
    return {"json": json.loads(path.read_text()), "path": path, "emitted": emitted, "threads": threads,
            "restored": torch.get_num_threads() == before}


def test_result_schema(run):
    r = run["json"]
    assert list(r) == ["producer", "schema", "kind", "model", "env", "config", "metrics", "samples", "details"]
    assert r["producer"].startswith("llmc ") and r["schema"] == "llmc.bench.result/1" and r["kind"] == "throughput"
    assert r["model"]["path"] == str(STORIES) and r["model"]["architecture"] == "llama"
    assert r["model"]["parameters"] == 260_032 and r["model"]["quantization"] is None and r["model"]["recipe"] is None
    assert r["model"]["sha256_of"] == "config.json" and len(r["model"]["sha256"]) == 64
    assert {"batches": [1, 2], "input_len": 8, "output_len": 6, "repeat": 2, "warmup": 0, "threads": 1,
            "kernels": None, "against": None}.items() <= r["config"].items()
    assert {"llmc", "torch", "cpu", "threads", "loadavg_start", "loadavg_end"} <= set(r["env"])
    d = r["details"]
    assert d["backend"]["target"] == "cpu" and d["backend"]["kernels"] == "native"   # the default
    assert d["peak_rss_bytes"] > 1 << 20
    assert [b["batch"] for b in d["batches"]] == [1, 2] and list(r["samples"]) == ["batch1", "batch2"]
    for b in d["batches"]:
        assert len(r["samples"][f"batch{b['batch']}"]) == 2 and b["runtime"]["max_num_seqs"] == b["batch"]
        assert sum(b["backend"]["ops"]["linear"]["variants"].values()) > 0
        for name, (unit, direction) in METRICS.items():
            m = r["metrics"][f"{name}@batch{b['batch']}"]
            assert (m["unit"], m["direction"], m["statistic"], m["samples"], m["of"]) == \
                (unit, direction, "median", f"batch{b['batch']}", [name])


def test_every_repeat_generates_batch_times_output_len_tokens(run):
    """Counted from the Runner's events: each of the B requests of each repeat got exactly 6 tokens."""
    per_batch = Counter()
    for (batch, _), n in run["emitted"].items():
        assert n == 6
        per_batch[batch] += n
    assert per_batch == {1: 2 * 1 * 6, 2: 2 * 2 * 6}                        # repeat x B x output_len
    for n in (1, 2):
        samples = run["json"]["samples"][f"batch{n}"]
        assert [s["generated_tokens"] for s in samples] == [n * 6] * 2
        assert all(s["prefill_steps"] == 1 and s["decode_steps"] == 5 for s in samples)


def test_numbers_are_positive_and_recomputable_from_the_samples(run):
    for n in (1, 2):
        samples = run["json"]["samples"][f"batch{n}"]
        for s in samples:
            assert min(s["prefill_s"], s["decode_s"], s["total_s"], s["ttft_s"]) > 0
            assert s["prefill_tok_s"] == pytest.approx(n * 8 / s["prefill_s"])
            assert s["decode_tok_s"] == pytest.approx(n * 5 / s["decode_s"])
            assert s["e2e_tok_s"] == pytest.approx(n * 6 / s["total_s"])
            assert s["ttft_ms"] == pytest.approx(s["ttft_s"] * 1e3)
        for name in METRICS:
            values = [s[name] for s in samples]
            assert min(values) > 0
            assert run["json"]["metrics"][f"{name}@batch{n}"]["value"] == statistics.median(values)


def test_threads_are_applied_recorded_and_restored(run):
    assert run["threads"] == {1}
    assert run["json"]["config"]["threads"] == run["json"]["env"]["threads"] == 1
    assert run["restored"]


def test_table(capsys):
    main(["bench", "throughput", str(STORIES), *ARGS])
    out = capsys.readouterr()
    assert "llmc bench throughput" in out.out and "decode tok/s median [min–max]" in out.out
    assert "TTFT ms" in out.out and "batch 2 run 2/2" in out.err
    rows = [line.split("│")[1].strip() for line in out.out.splitlines() if line.startswith("│")]
    assert rows == ["1", "2"]


def test_json_to_stdout_instead_of_the_table(capsys):
    main(["bench", "throughput", str(STORIES), *ARGS, "--batch", "1", "--json", "-"])
    r = json.loads(capsys.readouterr().out)
    assert r["schema"] == "llmc.bench.result/1" and list(r["samples"]) == ["batch1"]


def test_json_file_is_replaced_only_if_llmc_wrote_it(run, tmp_path, capsys, monkeypatch):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", str(STORIES), *ARGS, "--json", str(foreign)])
    assert e.value.code == 2 and "was not written by llmc" in capsys.readouterr().err
    assert foreign.read_text() == '{"mine": 1}\n'
    ours = tmp_path / "ours.json"
    ours.write_text(run["path"].read_text())
    main(["bench", "throughput", str(STORIES), *ARGS, "--batch", "1", "--json", str(ours)])
    assert json.loads(ours.read_text())["config"]["batches"] == [1]


@pytest.mark.parametrize("args, needle", [
    (["--batch", "1,x"], "--batch: expected comma-separated batch sizes"),
    (["--batch", "0,2"], "--batch: batch sizes must be integers of at least 1, got 0"),
    (["--input-len", "0"], "--input-len: must be at least 1, got 0"),
    (["--output-len", "0"], "--output-len: must be at least 1, got 0"),
    (["--repeat", "0"], "--repeat: must be at least 1, got 0"),
    (["--threads", "0"], "--threads: must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
    (["--input-len", "500", "--output-len", "13"], "--output-len: a prompt of 500 tokens and 13 generated make 513, "
                                                   "more than the model's context (512)"),
])
def test_bad_options_are_one_line_naming_the_flag_before_any_work(args, needle, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("a Runner was built")
    monkeypatch.setattr(Runner, "__init__", no_work)
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", str(STORIES), *ARGS, *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_library_options_and_a_single_output_token():
    with pytest.raises(OptionError) as e:
        throughput(STORIES, batches=[])
    assert e.value.option == "batch"
    r = throughput(STORIES, batches=(1,), input_len=4, output_len=1, repeat=1, warmup=0)
    assert r.results[0].stat("decode_tok_s") is None and "decode_tok_s@batch1" not in r.to_json()["metrics"]
    assert r.results[0].samples[0].generated_tokens == 1


def test_native_decode_profile_accounts_for_the_step(capsys):
    """--kernels native times every op of the native step: the decode profile has the graph's op
    kinds and `outside`, and adds up to the measured decode step."""
    r = throughput(STORIES, (1, 3), input_len=8, output_len=6, repeat=1, warmup=0, kernels="native")
    for b in r.results:
        prof, s = b.decode_profile(), b.samples[0]
        assert {"linear", "attention", "logits", "outside"} <= set(prof) and all(v >= 0 for k, v in prof.items()
                                                                            if k != "outside")
        assert sum(prof.values()) == pytest.approx(1e3 * s.decode_s / s.decode_steps, rel=1e-9)
        assert r.to_json()["details"]["batches"][r.results.index(b)]["decode_profile_ms"] == prof
    assert main(["bench", "throughput", str(STORIES), "--batch", "1", "--input-len", "8", "--output-len", "4",
                 "--repeat", "1", "--warmup", "0", "--kernels", "native", "--profile"]) in (None, 0)
    out = capsys.readouterr().out
    assert "where a decode" in out and "│ attention " in out and "│ outside " in out


def test_against_reference_kernels_interleaves_and_reports_ratios(capsys):
    """--against: both Runners run every timed repeat, alternating which goes first, and the ratio
    metrics are the medians of the per-run ratios."""
    labels = []
    r = throughput(STORIES, (1,), input_len=8, output_len=6, repeat=3, warmup=1, against="reference-kernels",
                   on_run=lambda b, label, s: labels.append(label))
    assert labels == ["warm-up 1/1", "warm-up 1/1 (against)", "run 1/3", "run 1/3 (against)",
                      "run 2/3 (against)", "run 2/3", "run 3/3", "run 3/3 (against)"]
    j = r.to_json()
    assert j["config"]["against"] == "reference-kernels" and j["config"]["against_kind"] == "reference-kernels"
    ours, theirs, ratios = (j["samples"][g] for g in ("batch1", "against-batch1", "ratio-batch1"))
    assert len(ours) == len(theirs) == len(ratios) == 3
    for a, b, q in zip(ours, theirs, ratios):
        assert q["decode_tok_s_ratio"] == pytest.approx(a["decode_tok_s"] / b["decode_tok_s"])
    m = j["metrics"]["decode_tok_s_ratio@batch1"]
    assert m["value"] == statistics.median(q["decode_tok_s_ratio"] for q in ratios)
    assert (m["unit"], m["direction"]) == ("x", "higher")
    assert r.results[0].against[0].generated_tokens == 6
    main(["bench", "throughput", str(STORIES), "--batch", "1", "--input-len", "8", "--output-len", "4",
          "--repeat", "1", "--warmup", "0", "--against", str(STORIES)])
    assert "decode ×" in capsys.readouterr().out


def test_against_errors(capsys):
    with pytest.raises(OptionError, match="already runs the reference kernels"):
        throughput(STORIES, (1,), input_len=4, output_len=2, repeat=1, warmup=0, kernels="reference",
                   against="reference-kernels")
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", str(STORIES), *ARGS, "--against", "/nonexistent/model"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "/nonexistent/model" in lines[0]


def test_batch_summaries_of_a_result_file(run):
    """What the benchmark scripts tabulate: per batch size, median / min / max of each rate."""
    from llmc.bench.throughput import batch_summaries

    rows = batch_summaries(run["json"])
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        values = [s["decode_tok_s"] for s in run["json"]["samples"][f"batch{r['batch']}"]]
        assert r["decode_tok_s"]["median"] == run["json"]["metrics"][f"decode_tok_s@batch{r['batch']}"]["value"]
        assert (r["decode_tok_s"]["min"], r["decode_tok_s"]["max"]) == (min(values), max(values))
