"""llmc bench report: the page and its Markdown twin hold the same tables, the tables hold the files'
numbers, the plots are real PNGs, nothing is loaded from elsewhere, every string from a file is
escaped, bad input is a one-line error, and the output directory is written atomically.

Synthetic results of each kind (`quality_result`, `throughput_result`, `serve_result`) have their
metrics computed from their records as the benches do (llmc.bench.result.sampled); one real
quality result of golden/stories260K keeps them honest."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="pip install 'matplotlib>=3.7' (the report extra) draws the plots")

from llmc.bench import report_plots  # noqa: E402
from llmc.bench.report import MATPLOTLIB, recipe_summary, report  # noqa: E402
from llmc.bench.report_plots import pareto_front  # noqa: E402
from llmc.bench.result import BenchResult, baseline_json, exact, sampled  # noqa: E402
from llmc.errors import ConfigError  # noqa: E402
from llmc.io import OutputError, stamp_json  # noqa: E402
from tests.helpers import GOLDEN, STORIES  # noqa: E402

TEXT = GOLDEN / "tinystories_valid_head.txt"
ENV = {"llmc": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu", "cpu": "Test CPU 9000", "cpu_count": 2,
       "threads": 2, "loadavg_start": [0.1, 0.1, 0.1]}


# ---------------------------------------------------------------------------------------------
# Synthetic results, in the schema, metrics from their records

def recipe(scheme: str, algorithm: str, group: int | None, kv: str | None = None) -> dict:
    weight = {"dtype": "int4" if scheme.startswith("w4") else "int8",
              "granularity": "group" if group else "channel", "group_size": group, "symmetric": True}
    return {"scheme": {"name": scheme, "weight": weight, "activation": None, "skip": ["lm_head.weight"]},
            "algorithm": algorithm, "kv_cache": None if kv is None else {"dtype": kv, "granularity": "token"}}


def model(path: str, rec: dict | None, size: int | None) -> dict:
    m = {"path": path, "sha256": hashlib.sha256(path.encode()).hexdigest(), "sha256_of": "config.json", "recipe": rec}
    return m if size is None else {**m, "bytes_on_disk": size}


def _result(kind, mod, config, metrics, samples) -> dict:
    return stamp_json(BenchResult(kind, mod, dict(ENV), config, metrics, samples, {}).to_json())


def quality_result(path="/models/q4", rec=None, size=350_000, kl=0.1, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    windows = []
    for i in range(8):
        tokens = 127
        ref, k = float(rng.uniform(1.6, 1.8)) * tokens, float(kl * rng.uniform(0.5, 1.5)) * tokens
        windows.append({"id": f"w{i}", "tokens": tokens, "nll": ref + k, "ref_nll": ref, "kl": k,
                        "agree": int(tokens * (1 - min(0.9, 2 * kl)))})
    s = {"windows": windows}
    metrics = {"perplexity": sampled("exp_ratio", "windows", ("nll", "tokens"), s, "ppl", "lower"),
               "kl_divergence": sampled("ratio", "windows", ("kl", "tokens"), s, "nats/token", "lower"),
               "top1_agreement": sampled("ratio", "windows", ("agree", "tokens"), s, "fraction", "higher"),
               "reference_perplexity": sampled("exp_ratio", "windows", ("ref_nll", "tokens"), s, "ppl", None),
               "tokens": exact(sum(w["tokens"] for w in windows), "tokens"),
               "bytes_on_disk": exact(size, "bytes", "lower")}
    config = {"text": "golden/tinystories_valid_head.txt", "seqlen": 128, "max_tokens": 1016,
              "reference": "golden/stories260K", "kl": "exact"}
    return _result("quality", model(path, rec, size), config, metrics, s)


def throughput_result(path="/models/q4", rec=None, size=350_000, speed=4000.0, batches=(1, 2, 4, 8),
                      against=False) -> dict:
    samples, metrics = {}, {}
    for b in batches:
        runs = []
        for j in range(3):
            decode = speed * b ** 0.7 * (1 + 0.01 * j)
            runs.append({"batch": b, "prefill_tok_s": 6 * decode, "decode_tok_s": decode, "e2e_tok_s": 0.9 * decode,
                         "ttft_ms": 1000 * b * 32 / (6 * decode)})
        g = f"batch{b}"
        samples[g] = runs
        for name, unit, d in (("prefill_tok_s", "tok/s", "higher"), ("decode_tok_s", "tok/s", "higher"),
                              ("e2e_tok_s", "tok/s", "higher"), ("ttft_ms", "ms", "lower")):
            metrics[f"{name}@{g}"] = sampled("median", g, name, samples, unit, d)
        if against:
            samples[f"ratio-{g}"] = [{"decode_tok_s_ratio": 1.5 + 0.1 * j} for j in range(3)]
            metrics[f"decode_tok_s_ratio@{g}"] = sampled("median", f"ratio-{g}", "decode_tok_s_ratio", samples, "x",
                                                         "higher")
    config = {"batches": list(batches), "input_len": 32, "output_len": 32, "repeat": 3, "warmup": 1,
              "against": "reference-kernels" if against else None}
    return _result("throughput", model(path, rec, size), config, metrics, samples)


def serve_result(path="/models/q4", rec=None, n=20, seed=0, slo=True) -> dict:
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        if i == n - 1:                                  # one failed request: no latencies
            reqs.append({"index": i, "ok": False, "ttft_ms": None, "tpot_ms": None, "e2e_ms": None, "itl_ms": [],
                         "output_tokens": 0, "error": "timeout"})
            continue
        itl = [float(x) for x in rng.lognormal(0.5, 0.3, size=15)]
        ttft = float(rng.lognormal(2.5, 0.4))
        reqs.append({"index": i, "ok": True, "ttft_ms": ttft, "tpot_ms": sum(itl) / len(itl),
                     "e2e_ms": ttft + sum(itl), "itl_ms": itl, "output_tokens": 16, "error": None})
    s = {"requests": reqs}
    metrics = {f"{k}_{stat}": sampled(stat, "requests", k, s, "ms", "lower")
               for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms") for stat in ("mean", "p50", "p90", "p99")}
    ok = [r for r in reqs if r["ok"]]
    wall = max(r["e2e_ms"] for r in ok) / 1000 * 5
    metrics.update(request_throughput=exact(len(ok) / wall, "req/s", "higher"),
                   output_throughput=exact(16 * len(ok) / wall, "tok/s", "higher"),
                   completed=exact(len(ok), "requests", "higher"), failed=exact(n - len(ok), "requests", "lower"))
    if slo:
        metrics["goodput"] = exact(sum(r["ttft_ms"] <= 20 for r in ok) / wall, "req/s", "higher")
    config = {"num_requests": n, "concurrency": 4, "request_rate": None, "input_len": 32, "output_len": 16,
              "slo": {"ttft_ms": 20.0} if slo else {}}
    return _result("serve", model(path, rec, None), config, metrics, s)


def write(directory: Path, name: str, obj) -> Path:
    p = directory / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def all_kinds(directory: Path, real: dict | None = None) -> list[Path]:
    q4 = recipe("w4a16", "gptq", 32)
    files = [write(directory, "q4.quality.json", quality_result("/models/q4", q4, 350_000, 0.1)),
             write(directory, "w8.quality.json", quality_result("/models/w8", recipe("w8a16", "rtn", None), 520_000,
                                                                  0.005, seed=1)),
             write(directory, "fp.quality.json", quality_result("/models/fp32", None, 1_070_000, 0.0, seed=2)),
             write(directory, "q4.speed.json", throughput_result("/models/q4", q4, 350_000,
                                                                 4000.0, against=True)),
             write(directory, "fp.speed.json", throughput_result("/models/fp32", None, 1_070_000, 3500.0)),
             write(directory, "q4.serve.json", serve_result("/models/q4", q4))]
    if real is not None:
        files.insert(0, write(directory, "real.quality.json", real))
    return files


@pytest.fixture(scope="module")
def real_quality(stories_w4a16) -> dict:
    """A real quality result: golden/stories260K w4a16 RTN g32 against the float checkpoint."""
    from llmc.bench.environment import environment
    from llmc.bench.quality import quality
    r = quality(stories_w4a16, STORIES, TEXT, seqlen=128, max_tokens=2000)
    return json.loads(json.dumps(stamp_json(r.to_result(environment()).to_json())))


# ---------------------------------------------------------------------------------------------
# Reading the output back

class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, the <section> ids and the <img> srcs."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables, self.sections, self.images, self._cell = [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def md_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        if current is None:
            current = []
            tables.append(current)
        current.append([html.unescape(re.sub(r"\\(.)", r"\1", c)) for c in cells])
    return tables


def rows_of(tables, header0: str, column: str):
    """{first cell: row} of the table whose header contains `column`."""
    t = next(t for t in tables if t[0][0] == header0 and column in t[0])
    return t[0], t[1:]


def value(r: dict, name: str):
    return r["metrics"][name]["value"]


def mib_kib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n / 1024:.2f} KiB"


def not_blank_png(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG that decodes and has ink on a white background."""
    import matplotlib.image as mpimg
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rgb = img[..., :3]
    ink = (np.abs(rgb - 1.0).max(axis=-1) > 0.05).mean()
    assert ink > 0.01 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10, "the plot is blank"
    return img.shape[1], img.shape[0]


# ---------------------------------------------------------------------------------------------

def test_report_of_every_kind(tmp_path, real_quality):
    files = all_kinds(tmp_path, real_quality)
    out = tmp_path / "report"
    res = report(files, out, title="stories260K sweep")
    assert res.out_dir == out and res.html == out / "index.html" and res.markdown == out / "report.md"
    assert res.counts == {"quality": 4, "throughput": 2, "serve": 1}
    assert res.plots == ("plot-quality.png", "plot-decode.png", "plot-serve.png")
    page, md = res.html.read_text(), res.markdown.read_text()
    parsed = Tables(page)
    assert parsed.sections == ["models", "quality", "throughput", "serve", "environment"]
    for heading in ("## Models", "## Quality", "## Throughput", "## Serving", "## Environment"):
        assert heading in md
    assert "<title>stories260K sweep</title>" in page and md.startswith("# stories260K sweep\n")
    assert parsed.tables == md_tables(md), "the page and its Markdown twin hold different tables"

    results = [json.loads(f.read_text()) for f in files]
    head, rows = rows_of(parsed.tables, "model", "KL (nats/token)")
    assert len(rows) == 4
    for r, row in zip([r for r in results if r["kind"] == "quality"], rows):
        cell = dict(zip(head, row))
        ppl, ref = value(r, "perplexity"), value(r, "reference_perplexity")
        assert cell["perplexity"] == f"{ppl:.4f}" and cell["reference ppl"] == f"{ref:.4f}"
        assert cell["Δ ppl"] == f"{(ppl / ref - 1) * 100:+.2f}%"
        assert cell["KL (nats/token)"] == f"{value(r, 'kl_divergence'):.5f}"
        assert cell["top-1 agree"] == f"{100 * value(r, 'top1_agreement'):.2f}%"
        assert cell["tokens"] == f"{value(r, 'tokens'):,}"
        assert cell["size on disk"] == mib_kib(r["model"]["bytes_on_disk"])
    real_row = dict(zip(head, rows[0]))
    assert real_row["recipe"] == "w4a16 rtn g32" and real_row["tokens"] == "2,000"

    head, rows = rows_of(parsed.tables, "model", "decode tok/s")
    assert "decode vs against" in head and len(rows) == 8
    for r, chunk in zip([r for r in results if r["kind"] == "throughput"], (rows[:4], rows[4:])):
        for b, row in zip((1, 2, 4, 8), chunk):
            cell = dict(zip(head, row))
            assert cell["batch"] == str(b)
            assert cell["prefill tok/s"] == f"{value(r, f'prefill_tok_s@batch{b}'):,.1f}"
            assert cell["decode tok/s"] == f"{value(r, f'decode_tok_s@batch{b}'):,.1f}"
            assert cell["TTFT ms"] == f"{value(r, f'ttft_ms@batch{b}'):.2f}"
            ratio = r["metrics"].get(f"decode_tok_s_ratio@batch{b}")
            assert cell["decode vs against"] == (f"{ratio['value']:.3f}x" if ratio else "—")

    s = results[-1]
    head, (row,) = rows_of(parsed.tables, "model", "goodput req/s")
    cell = dict(zip(head, row))
    assert cell["completed"] == "19" and cell["failed"] == "1" and cell["requests"] == "20"
    assert cell["goodput req/s"] == f"{value(s, 'goodput'):.2f}"
    assert cell["req/s"] == f"{value(s, 'request_throughput'):.2f}" and cell["SLO"] == "TTFT ≤ 20 ms"
    head, rows = rows_of(parsed.tables, "model", "p99")
    assert [r[1] for r in rows] == ["TTFT", "TPOT", "ITL", "e2e"]
    for row, key in zip(rows, ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")):
        assert row[2:] == [f"{value(s, f'{key}_{p}'):.2f}" for p in ("mean", "p50", "p90", "p99")]

    head, rows = rows_of(parsed.tables, "model", "sha256")
    models = {row[1]: dict(zip(head, row)) for row in rows}
    assert models["/models/q4"]["recipe"] == "w4a16 gptq g32" and models["/models/fp32"]["recipe"] == "float"
    assert models["/models/q4"]["results"] == "quality, throughput, serve"
    assert models["/models/q4"]["sha256"] == hashlib.sha256(b"/models/q4").hexdigest()[:12]
    head, rows = rows_of(parsed.tables, "file", "torch")
    assert [r[0] for r in rows] == [f.name for f in files] and {r[3] for r in rows} >= {"Test CPU 9000"}


def test_plots_are_real_pngs_embedded_in_a_self_contained_page(tmp_path):
    res = report(all_kinds(tmp_path), tmp_path / "report")
    page = res.html.read_text()
    images = Tables(page).images
    assert [i["id"] for i in images] == ["plot-quality", "plot-decode", "plot-serve"]
    for img, name in zip(images, res.plots):
        data = (res.out_dir / name).read_bytes()
        assert img["src"] == "data:image/png;base64," + base64.b64encode(data).decode()
        assert (int(img["width"]), int(img["height"])) == not_blank_png(data)
        assert re.search(rf"!\[[^\]]+\]\({re.escape(name)}\)", res.markdown.read_text())
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert not re.search(r"<link|<script|@import|url\(", page, re.I)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert sorted(p.name for p in res.out_dir.iterdir()) == [".llmc-output.json", "index.html", "plot-decode.png",
                                                             "plot-quality.png", "plot-serve.png", "report.md"]


def test_only_the_sections_there_are_results_for(tmp_path):
    files = [write(tmp_path, "a.json", quality_result("/m/a", recipe("w4a16", "rtn", 64), 300_000, 0.2))]
    res = report(files, tmp_path / "r")
    assert res.counts == {"quality": 1, "throughput": 0, "serve": 0} and res.plots == ("plot-quality.png",)
    assert Tables(res.html.read_text()).sections == ["models", "quality", "environment"]
    files = [write(tmp_path, "s.json", serve_result("/m/s", None, slo=False))]
    res = report(files, tmp_path / "s")
    page = Tables(res.html.read_text())
    assert page.sections == ["models", "serve", "environment"] and res.plots == ("plot-serve.png",)
    head, (row,) = rows_of(page.tables, "model", "goodput req/s")
    assert dict(zip(head, row))["goodput req/s"] == "—" and dict(zip(head, row))["SLO"] == "—"


def test_a_baseline_file_of_several_results(tmp_path):
    f = write(tmp_path, "base.json", baseline_json([quality_result("/m/a"), throughput_result("/m/a")]))
    assert report([f], tmp_path / "r").counts == {"quality": 1, "throughput": 1, "serve": 0}


def test_strings_from_files_are_escaped(tmp_path):
    evil = "/models/<script>alert('x')</script>&$x$_|*"
    files = [write(tmp_path, "q.json", quality_result(evil, recipe("w4a16", "<b>gptq</b>", 32))),
             write(tmp_path, "s.json", serve_result(evil)), write(tmp_path, "t.json", throughput_result(evil))]
    res = report(files, tmp_path / "r", title="<img src=x onerror=alert(1)>")
    page, md = res.html.read_text(), res.markdown.read_text()
    for text in (page, md):
        assert "<script" not in text.lower() and "<b>" not in text and "<img src=x" not in text
        assert "&lt;script&gt;" in text
    head, rows = rows_of(Tables(page).tables, "model", "sha256")
    assert rows[0][1] == evil and rows[0][3] == "w4a16 <b>gptq</b> g32"     # escaped, so shown as written
    assert Tables(page).tables == md_tables(md)
    for name in res.plots:
        not_blank_png((res.out_dir / name).read_bytes())             # `$` is not parsed as mathtext


@pytest.mark.parametrize("content, message", [
    (None, "no such result file"),
    ("{not json", "is not valid JSON"),
    ('{"schema": "something/else"}', "not an llmc bench result of schema llmc.bench.result/1"),
    ('[1, 2]', "not a JSON object"),
    ("BAD_VALUE", "metric 'perplexity' has a value that is not a number"),
    ("BAD_ITL", "request record 0 has a ttft_ms or itl_ms that is not a number"),
])
def test_bad_input_is_a_one_line_error(tmp_path, content, message):
    p = tmp_path / "r.json"
    if content == "BAD_VALUE":
        r = quality_result()
        r["metrics"]["perplexity"]["value"] = "5.3"
        content = json.dumps(r)
    elif content == "BAD_ITL":
        r = serve_result()
        r["samples"]["requests"][0]["itl_ms"] = ["1.0"]
        content = json.dumps(r)
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError) as e:
        report([p], tmp_path / "out")
    assert message in str(e.value) and "\n" not in str(e.value) and str(p) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_no_results_and_duplicates_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no result files given"):
        report([], tmp_path / "out")
    f = write(tmp_path, "a.json", quality_result())
    with pytest.raises(ConfigError, match="given twice"):
        report([f, tmp_path / "." / "a.json"], tmp_path / "out")
    with pytest.raises(OutputError, match="contains the input"):
        report([f], tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_existing_report_is_replaced_only_with_force(tmp_path):
    files = all_kinds(tmp_path)
    out = tmp_path / "report"
    report(files, out, title="first")
    with pytest.raises(OutputError, match="already exists") as e:
        report(files, out, title="second")
    assert "--force" in str(e.value) and "\n" not in str(e.value)
    assert "<title>first</title>" in (out / "index.html").read_text()
    report(files[:1], out, title="second", force=True)
    assert "<title>second</title>" in (out / "index.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == [".llmc-output.json", "index.html", "plot-quality.png", "report.md"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not written by llmc"):
        report(files, mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_failing_plot_leaves_no_half_written_report(tmp_path, monkeypatch):
    files = all_kinds(tmp_path)
    out = tmp_path / "report"

    def boom(*a, **k):
        raise RuntimeError("the plot failed")
    monkeypatch.setattr(report_plots, "serve_latency", boom)
    with pytest.raises(RuntimeError, match="the plot failed"):
        report(files, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)    # no temp dir left
    monkeypatch.undo()
    report(files, out, title="old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(report_plots, "serve_latency", boom)
    with pytest.raises(RuntimeError):
        report(files, out, title="new", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before           # the old report, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f.name for f in files), "report"])


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    f = write(tmp_path, "a.json", quality_result())
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib raises ImportError
    with pytest.raises(ConfigError) as e:
        report([f], tmp_path / "out")
    assert str(e.value) == MATPLOTLIB == "llmc bench report needs matplotlib: pip install 'llmc[report]'"


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 3.0), (2.0, 4.0), (3.0, 3.0), (4.0, 1.0), (5.0, 1.0)]
    assert pareto_front(pts) == [0, 1, 4]                          # (2,4) (3,3) (5,1) are dominated
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]         # equal points dominate neither
    assert pareto_front([]) == []


def test_recipe_summary():
    assert recipe_summary(None) == "float"
    assert recipe_summary(recipe("w4a16", "gptq", 32)) == "w4a16 gptq g32"
    assert recipe_summary(recipe("w8a16", "rtn", None)) == "w8a16 rtn"
    assert recipe_summary(recipe("w4a16", "awq", 128, kv="int8")) == "w4a16 awq g128 kv int8"
