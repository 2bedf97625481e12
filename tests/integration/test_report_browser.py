"""The report in a real browser: headless Chromium (Debian's `chromium`) loads the page from disk,
every figure decodes, and the page paints at 1280 px wide.

Needs the `chromium` binary (`apt-get update && apt-get install -y chromium`); where it is missing the
test fails with that instruction, or skips when CAI_SKIP_BROWSER=1. No network is used: the page is
self-contained and the flags turn off Chromium's own background traffic.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from constitutional.run import RunDir
from constitutional.stages import report

WIDTH, HEIGHT = 1280, 4000
FIGURE_BLUE = (0x3B, 0x6E, 0xA5)  # plots.COLORS[0], the first series of every figure


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CAI_SKIP_BROWSER") == "1":
            pytest.skip("chromium is not installed and CAI_SKIP_BROWSER=1")
        pytest.fail("the report's browser test needs Debian's chromium: install it with "
                    "`apt-get update && apt-get install -y chromium`, or set CAI_SKIP_BROWSER=1 to skip this test")
    return exe


def _make_run_dir():
    # The fabricated run directory of the unit tests (tests/ is not a package).
    path = Path(__file__).parents[1] / "unit" / "test_report.py"
    spec = importlib.util.spec_from_file_location("_report_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_run_dir


def _browse(exe: str, page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *mode, page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"chromium exited {res.returncode}: {res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, dict]:
    run = _make_run_dir()(tmp_path_factory.mktemp("run"))
    summary = report.run(report.Config(), RunDir(run))
    return Path(summary["report"]), summary


def test_every_image_loads_in_chromium(chromium, page, tmp_path):
    path, summary = page
    dom = _browse(chromium, path, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-images-ok="yes"' in body.group(0), body.group(0)
    assert f'data-images-loaded="{summary["images"]}"' in body.group(0)
    assert summary["images"] >= 14


def test_screenshot_is_a_painted_page_of_the_expected_size(chromium, page, tmp_path):
    from PIL import Image

    path, _ = page
    shot = tmp_path / "report.png"
    _browse(chromium, path, tmp_path / "profile", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (WIDTH, HEIGHT)
        rgb = im.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot is blank or nearly so"
    counts = {c: n for n, c in colors}
    background = max(counts.values())
    assert background < 0.9 * WIDTH * HEIGHT, "one colour covers more than 90% of the page"
    near_blue = sum(n for c, n in counts.items() if all(abs(a - b) <= 12 for a, b in zip(c, FIGURE_BLUE)))
    assert near_blue > 5000, "no figure was painted (the figures' first colour is missing from the screenshot)"
