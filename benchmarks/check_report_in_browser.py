"""Open an `llmc bench report` page in headless Chromium and check that it renders: the page loads
from file:// with no request to anything else and no console error, every <img> is a decoded
data: PNG (complete, naturalWidth > 0), and a full-page screenshot is not blank, nor is any plot's
region of it.

    python benchmarks/check_report_in_browser.py REPORT_DIR --screenshot OUT.png

Prints one line per check; exits 0 when all pass, 1 when one fails, 2 when the browser cannot be
driven here. Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver),
selenium and Pillow (matplotlib, which makes the report, brings Pillow):

    apt-get install -y chromium chromium-driver && pip install selenium
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
         "--host-resolver-rules=MAP * ~NOTFOUND")     # nothing resolves: a page that fetches would fail
WIDTH = 1280
MAX_HEIGHT = 16000
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class BrowserCheck:
    page: Path
    checks: tuple[Check, ...]
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


class BrowserUnavailable(RuntimeError):
    """Chromium, chromedriver, selenium or Pillow is missing."""


def unavailable() -> str | None:
    """Why the check cannot run here (with the install command), or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} is not installed: {INSTALL}"
    for module, pkg in (("selenium", "selenium"), ("PIL", "pillow")):
        try:
            __import__(module)
        except ImportError:
            return f"the Python package {pkg} is not installed: {INSTALL}"
    return None


def _driver(profile: str, timeout: float):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(timeout)
    driver.set_script_timeout(timeout)
    return driver


def _inked(img, box: tuple[int, int, int, int] | None = None) -> tuple[float, int]:
    """(fraction of pixels that are not the background, distinct colours) of `img` or a region."""
    import numpy as np

    px = np.asarray((img.crop(box) if box else img).convert("RGB"), dtype=np.int32).reshape(-1, 3)
    if not len(px):
        return 0.0, 0
    ink = (np.abs(px - np.asarray(BACKGROUND)).max(axis=1) > 8).mean()
    return float(ink), len(np.unique((px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]))


IMAGES_JS = """return Array.from(document.images).map(function (img) {
  var r = img.getBoundingClientRect();
  return {id: img.id, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
          data: img.currentSrc.indexOf('data:image/png;base64,') === 0,
          x: r.left + window.scrollX, y: r.top + window.scrollY, cw: r.width, ch: r.height};
});"""
EXTERNAL_JS = """return {
  resources: performance.getEntriesByType('resource').map(function (e) { return e.name; })
             .filter(function (n) { return n.indexOf('data:') !== 0; }),
  links: document.querySelectorAll('link[href], script[src], iframe, object, embed').length,
  sections: Array.from(document.querySelectorAll('section > h2')).map(function (h) { return h.textContent; }),
  state: document.readyState, title: document.title,
  height: Math.ceil(document.documentElement.scrollHeight)};"""


def _checks(driver, page: Path, expected_plots: int, screenshot: Path | None) -> list[Check]:
    from PIL import Image

    driver.get(page.resolve().as_uri())
    info = driver.execute_script(EXTERNAL_JS)
    out = [Check("loaded", info["state"] == "complete" and bool(info["title"]),
                 f"readyState {info['state']}, title {info['title']!r}"),
           Check("sections", bool(info["sections"]), ", ".join(info["sections"]) or "no <section><h2>")]
    out.append(Check("self-contained", not info["resources"] and info["links"] == 0,
                     f"{len(info['resources'])} requests beyond the page ({', '.join(info['resources'][:3])}), "
                     f"{info['links']} link/script/iframe/object elements"))
    images = driver.execute_script(IMAGES_JS)
    bad = [i["id"] or "?" for i in images if not (i["complete"] and i["w"] > 0 and i["data"])]
    out.append(Check("images", not bad and len(images) >= expected_plots,
                     f"{len(images) - len(bad)} of {len(images)} loaded as data: PNGs ({expected_plots} plot files) "
                     + ", ".join(f"{i['id']} {i['w']}x{i['h']}" for i in images) + (f"; broken: {bad}" if bad else "")))
    errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    out.append(Check("console", not errors, f"{len(errors)} errors" + (f": {errors[0]}" if errors else "")))

    height = min(int(info["height"]), MAX_HEIGHT)       # the whole page in one viewport, then one screenshot
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
    png = driver.get_screenshot_as_png()
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(png)
    shot = Image.open(io.BytesIO(png))
    ink, colours = _inked(shot)
    out.append(Check("screenshot", ink > 0.02 and colours > 50,
                     f"{shot.width}x{shot.height}, {100 * ink:.1f}% non-background pixels, {colours} colours"
                     + (f", saved to {screenshot}" if screenshot else "")))
    images = driver.execute_script(IMAGES_JS)              # positions at the final viewport
    for i in images:
        box = (int(i["x"]), int(i["y"]), int(i["x"] + i["cw"]), int(i["y"] + i["ch"]))
        inside = box[2] <= shot.width and box[3] <= shot.height and i["cw"] > 0 and i["ch"] > 0
        ink, colours = _inked(shot, box) if inside else (0.0, 0)
        out.append(Check(f"plot {i['id'] or '?'}", inside and ink > 0.01 and colours > 10,
                         f"region {box} of the screenshot: {100 * ink:.1f}% non-background pixels, {colours} colours"))
    return out


def check_report(report_dir: Path | str, screenshot: Path | str | None = None, timeout: float = 30.0) -> BrowserCheck:
    """Open REPORT_DIR/index.html in headless Chromium and run every check (module docstring).
    Raises BrowserUnavailable when the browser cannot be driven here."""
    why = unavailable()
    if why is not None:
        raise BrowserUnavailable(why)
    page = Path(report_dir) / "index.html"
    if not page.is_file():
        return BrowserCheck(page, (Check("page", False, f"{page} does not exist"),), None)
    expected = len(list(Path(report_dir).glob("plot-*.png")))
    shot = Path(screenshot) if screenshot is not None else None
    profile = tempfile.mkdtemp(prefix="llmc-report-chromium-")
    driver = None
    try:
        driver = _driver(profile, timeout)
        checks = _checks(driver, page, expected, shot)
    except Exception as e:                               # a browser that fails is a failed check, one line
        checks = [Check("browser", False, " ".join(f"{type(e).__name__}: {e}".split())[:400])]
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return BrowserCheck(page, tuple(checks), shot if shot is not None and shot.is_file() else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir", type=Path, help="A directory written by `llmc bench report`.")
    ap.add_argument("--screenshot", type=Path, help="Also save the full-page screenshot here (PNG).")
    ap.add_argument("--timeout", type=float, default=30.0, help="Seconds for the page load and each script.")
    args = ap.parse_args(argv)
    try:
        result = check_report(args.report_dir, args.screenshot, args.timeout)
    except BrowserUnavailable as e:
        print(f"cannot check in a browser: {e}", file=sys.stderr)
        return 2
    print(f"{result.page}:")
    for c in result.checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    print("passed" if result.ok else "FAILED")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
