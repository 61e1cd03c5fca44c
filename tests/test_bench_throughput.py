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
    assert list(r) == ["producer", "schema", "model", "config", "env", "results", "peak_rss_bytes", "backend"]
    assert r["producer"].startswith("llmc ") and r["schema"] == "llmc.bench.throughput/1"
    assert r["model"]["path"] == str(STORIES) and r["model"]["architecture"] == "llama"
    assert r["model"]["parameters"] == 260_032 and r["model"]["quantization"] is None
    assert {"batches": [1, 2], "input_len": 8, "output_len": 6, "repeat": 2, "warmup": 0, "threads": 1,
            "kernels": None}.items() <= r["config"].items()
    assert {"llmc", "torch", "cpu", "threads", "loadavg_start", "loadavg_end"} <= set(r["env"])
    assert r["backend"]["target"] == "cpu" and r["backend"]["kernels"] == "native"   # the default
    assert r["peak_rss_bytes"] > 1 << 20
    assert [b["batch"] for b in r["results"]] == [1, 2]
    for b in r["results"]:
        assert len(b["samples"]) == 2 and b["runtime"]["max_num_seqs"] == b["batch"]
        assert sum(b["backend"]["ops"]["linear"]["variants"].values()) > 0
        for name, (unit, direction) in METRICS.items():
            assert set(b[name]) == {"median", "min", "max", "unit", "direction"}
            assert (b[name]["unit"], b[name]["direction"]) == (unit, direction)


def test_every_repeat_generates_batch_times_output_len_tokens(run):
    """Counted from the Runner's events: each of the B requests of each repeat got exactly 6 tokens."""
    per_batch = Counter()
    for (batch, _), n in run["emitted"].items():
        assert n == 6
        per_batch[batch] += n
    assert per_batch == {1: 2 * 1 * 6, 2: 2 * 2 * 6}                        # repeat x B x output_len
    for b in run["json"]["results"]:
        assert [s["generated_tokens"] for s in b["samples"]] == [b["batch"] * 6] * 2
        assert all(s["prefill_steps"] == 1 and s["decode_steps"] == 5 for s in b["samples"])


def test_numbers_are_positive_and_recomputable_from_the_samples(run):
    for b in run["json"]["results"]:
        n, samples = b["batch"], b["samples"]
        for s in samples:
            assert min(s["prefill_s"], s["decode_s"], s["total_s"], s["ttft_s"]) > 0
            assert s["prefill_tok_s"] == pytest.approx(n * 8 / s["prefill_s"])
            assert s["decode_tok_s"] == pytest.approx(n * 5 / s["decode_s"])
            assert s["e2e_tok_s"] == pytest.approx(n * 6 / s["total_s"])
            assert s["ttft_ms"] == pytest.approx(s["ttft_s"] * 1e3)
        for name in METRICS:
            values = [s[name] for s in samples]
            m = b[name]
            assert m["min"] > 0 and m["min"] <= m["median"] <= m["max"]
            assert (m["median"], m["min"], m["max"]) == (statistics.median(values), min(values), max(values))


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
    assert r["schema"] == "llmc.bench.throughput/1" and [b["batch"] for b in r["results"]] == [1]


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
    assert [b["batch"] for b in json.loads(ours.read_text())["results"]] == [1]


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
    assert r.results[0].stat("decode_tok_s") is None and r.to_json()["results"][0]["decode_tok_s"] is None
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
        assert b.to_json()["decode_profile_ms"] == prof
    assert main(["bench", "throughput", str(STORIES), "--batch", "1", "--input-len", "8", "--output-len", "4",
                 "--repeat", "1", "--warmup", "0", "--kernels", "native", "--profile"]) in (None, 0)
    out = capsys.readouterr().out
    assert "where a decode" in out and "│ attention " in out and "│ outside " in out
