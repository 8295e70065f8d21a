"""The HTML report in a real browser: the demo's report (a small ResNet-18 through the demo's
steps) opens in headless Chromium with no console error, its banner and charts are drawn with a
size, on a desktop window and on a phone's, and screenshots are kept for people to look at.

Skipped, with the reason, when no Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from onnx_squeeze import model_io, zoo
from onnx_squeeze.cli import DEMO_FLAGS, run
from tests import devtools

BROWSER = devtools.find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason=f"no Chromium found on PATH (tried {', '.join(devtools.BROWSERS)}); "
    "install Debian's 'chromium' package to run the browser test",
)

# Where a person (or the lead's closing note) finds the last screenshots.
KEPT = {False: Path("/tmp/report_screenshot.png"), True: Path("/tmp/report_screenshot_phone.png")}

MEASURE = """JSON.stringify((() => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {top: r.top + scrollY, width: r.width, height: r.height}; };
  return {
    banner: box(document.getElementById('verdict')),
    bannerClass: document.getElementById('verdict').className,
    firstHeading: box(document.querySelector('h2')),
    charts: [...document.querySelectorAll('svg.chart')].map(e =>
      ({label: e.getAttribute('aria-label'), ...box(e), bars: e.querySelectorAll('rect').length})),
    pageWidth: document.documentElement.scrollWidth,
    windowWidth: innerWidth,
    labelPx: Math.min(...[...document.querySelectorAll('svg.chart .label')].map(
      e => e.getBoundingClientRect().height)),
  };
})())"""


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> Path:
    """The demo's steps (prune 30 % + recovery + INT8 + compare) on the small ResNet-18."""
    folder = tmp_path_factory.mktemp("demo")
    model_io.save(zoo.small("resnet18"), folder / "resnet18.onnx")
    page = folder / "report.html"
    argv = ["compress", str(folder / "resnet18.onnx"), "-o", str(folder / "out.onnx")]
    # untimed INT8: it runs the small ResNet-18 slower than float here, and the page's INT8
    # charts are under test
    flags = [*DEMO_FLAGS, "--int8-no-speed-check", "--runs", "5", "--report", str(page)]
    code = run([*argv, *flags])
    assert code == 0 and page.is_file()
    return page


@pytest.mark.parametrize("phone", [False, True], ids=["desktop", "phone"])
def test_the_demo_report_renders_in_chromium(demo_report, phone, tmp_path):
    width, height = (390, 844) if phone else (1280, 900)
    with devtools.Browser(BROWSER, tmp_path / "profile") as browser:
        devtools.load(browser, demo_report.as_uri(), width, height, mobile=phone)
        found = json.loads(browser.evaluate(MEASURE))
        shot = tmp_path / "report.png"
        devtools.screenshot(browser, shot)
        errors = browser.errors()
    shutil.copyfile(shot, KEPT[phone])

    assert errors == []
    banner = found["banner"]
    # The demo runs on random data: its banner warns (or fails), above everything else.
    assert banner["height"] > 20 and banner["width"] > 0.8 * width - 40
    assert banner["top"] < found["firstHeading"]["top"]
    assert found["bannerClass"].split()[-1] in ("warn", "fail")
    labels = [chart["label"] for chart in found["charts"]]
    for wanted in ("size and speed ratios", "latency cpu/t1", "output SQNR per channel"):
        assert wanted in labels
    assert any("Parameters per layer" in label for label in labels)
    assert any("weight SQNR per layer" in label for label in labels)
    for chart in found["charts"]:
        # one or two columns: never squeezed below a phone's width, never wider than the window
        assert chart["width"] >= min(380, width - 80) and chart["height"] > 30, chart
        assert chart["width"] <= width, chart
    assert sum(chart["bars"] for chart in found["charts"]) > 20
    # Wide tables scroll inside their own box: the page itself never scrolls sideways.
    assert found["pageWidth"] <= found["windowWidth"]
    assert found["labelPx"] >= (8 if phone else 10)  # chart text stays legible
    assert shot.stat().st_size > 10_000
