"""An `llmc bench report` page in a real browser (headless Chromium, driven by selenium through
benchmarks/check_report_in_browser.py): it renders, every <img> decodes, nothing is fetched, and
the screenshot and each plot's region of it are not blank. The checker must also fail a page with
a broken image and one that refers to the network.

The checker runs as a subprocess in its own session, killed (with its chromedriver and chromium) if
it outlives TIMEOUT, so a wedged browser fails the test instead of hanging it. Skipped where
Chromium, chromedriver or selenium is missing."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="pip install 'matplotlib>=3.7' (the report extra) draws the plots")

from llmc.bench.report import report  # noqa: E402
from tests.test_bench_report import all_kinds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "check_report_in_browser.py"
TIMEOUT = 180


def _checker():
    """benchmarks/check_report_in_browser.py as a module (for `unavailable()`)."""
    name = "check_report_in_browser"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod                 # before it runs: its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def browser():
    why = _checker().unavailable()
    if why is not None:
        pytest.skip(f"no headless browser here: {why}")


def run_checker(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)          # the checker's session: its chromedriver and chromium too
        p.communicate()
        pytest.fail(f"the browser check did not finish in {TIMEOUT} s")
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("browser")
    out = d / "report"
    report(all_kinds(d), out, title="browser check")
    return out


def test_report_renders_in_chromium(browser, page, tmp_path):
    from PIL import Image
    shot = tmp_path / "shot.png"
    r = run_checker(str(page), "--screenshot", str(shot))
    assert r.returncode == 0, r.stdout
    for line in ("ok   loaded: readyState complete, title 'browser check'",
                 "ok   sections: Models, Quality, Throughput, Serving, Environment",
                 "ok   self-contained: 0 requests", "ok   images: 3 of 3 loaded as data: PNGs (3 plot files)",
                 "ok   console: 0 errors", "ok   screenshot:", "ok   plot plot-quality:", "ok   plot plot-decode:",
                 "ok   plot plot-serve:"):
        assert line in r.stdout, r.stdout
    assert r.stdout.rstrip().endswith("passed")
    img = Image.open(shot)
    assert img.width == 1280 and img.height > 1500      # the whole page, not one viewport


def test_the_checker_fails_a_broken_image(browser, page, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(page, broken)
    index = broken / "index.html"
    index.write_text(re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,AAAA",
                            index.read_text(), count=1))
    r = run_checker(str(broken))
    assert r.returncode == 1 and "FAIL images" in r.stdout and "broken: ['plot-quality']" in r.stdout, r.stdout


def test_the_checker_fails_a_page_that_fetches(browser, page, tmp_path):
    import shutil
    leaky = tmp_path / "leaky"
    shutil.copytree(page, leaky)
    index = leaky / "index.html"
    index.write_text(index.read_text().replace("</main>", '<link rel="stylesheet" href="http://example.invalid/x.css">'
                                               "</main>"))
    r = run_checker(str(leaky))
    assert r.returncode == 1 and "FAIL self-contained" in r.stdout, r.stdout


def test_the_checker_says_what_is_missing(tmp_path):
    r = run_checker(str(tmp_path / "nowhere"))
    if _checker().unavailable() is not None:
        assert r.returncode == 2 and "apt-get install -y chromium chromium-driver" in r.stdout
    else:
        assert r.returncode == 1 and "FAIL page" in r.stdout, r.stdout
