"""The match panel in the real FiftyOne App, driven in headless Chromium.

Starts ``python -m fiftyone.server.main`` on a free localhost port against this test
session's database and plugins dir, opens a sample of a small persistent dataset in the
modal, opens the match panel, checks that the figure is drawn (both images, keypoint
lines), clicks a pixel of the current image and checks that the match (and the heat map)
appear where the features say, then saves screenshots to the test's tmp dir (and, with
``SDCORR_UPDATE_SCREENSHOTS=1``, to ``docs/match_panel.png`` for the README).

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and Python ``playwright``; skipped
with the reason when either is missing.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent))
from panel_world import build_panel_dataset  # noqa: E402

from fiftyone_sdcorr.core import visualize as vis  # noqa: E402

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOT = REPO_ROOT / "docs" / "match_panel.png"
UPDATE_DOCS = os.environ.get("SDCORR_UPDATE_SCREENSHOTS") == "1"  # tests write into the repo only when asked
PLOT = "#modal .js-plotly-plot"
CLICK_XY = (0.80, 0.25)  # normalised point of the current image to click (no keypoint there)
CROP = (0.20, 0.05, 1.0, 0.95)  # the current sample is this crop of the reference image


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def playwright_api():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup.sh does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("python playwright is not installed (pip install playwright)")
    return sync_playwright


@pytest.fixture(scope="module")
def app(photo_paths, tmp_path_factory, playwright_api):
    """A persistent dataset and a FiftyOne App server that sees it."""
    tmp = tmp_path_factory.mktemp("browser")
    name = f"sdcorr-browser-{uuid.uuid4().hex[:8]}"
    dataset, ids, describer = build_panel_dataset(
        name, photo_paths, tmp / "world", persistent=True, crop=CROP)
    port = _free_port()
    log = open(tmp / "server.log", "wb")
    env = dict(os.environ)  # same FIFTYONE_DATABASE_DIR / FIFTYONE_PLUGINS_DIR as this test
    proc = subprocess.Popen(
        [sys.executable, "-m", "fiftyone.server.main", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"App server exited: {(tmp / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if time.time() > deadline:
                raise RuntimeError("App server did not answer in 90 s")
            time.sleep(0.5)
    try:
        yield {"url": url, "dataset": dataset, "ids": ids, "describer": describer, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        dataset.delete()


def display_size(filepath):
    from PIL import Image

    from fiftyone_sdcorr.plugin.panels import MAX_SIDE

    with Image.open(filepath) as im:
        return vis.display_size(im.width, im.height, MAX_SIDE)


def _plot_js(body):
    return "(arg) => { const gd = document.querySelector('%s'); %s }" % (PLOT, body)


def _screenshot(page, path):
    """The modal's content down to the bottom of the figure (no empty band below)."""
    box = page.locator("#modal [data-cy=modal-content]").bounding_box()
    bottom = page.evaluate(_plot_js("return gd.getBoundingClientRect().bottom;"))
    height = min(box["height"], max(200, bottom - box["y"] + 16))
    page.screenshot(path=str(path), clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": height})


def _open_modal(page, url):
    """Loads the App on the sample's URL; dismisses the enterprise popover when shown;
    reloads once if the App is still loading after a while."""
    for attempt in range(3):
        page.goto(url, wait_until="load")
        deadline = time.time() + 45
        while time.time() < deadline:
            dismiss = page.get_by_text("Dismiss", exact=True)
            if dismiss.count():
                dismiss.first.dispatch_event("click")
            if page.locator("#modal [data-cy=panel-container]").count() and page.locator("#modal").is_visible():
                return
            time.sleep(0.5)
    raise AssertionError("the sample modal did not open")


def _open_panel(page):
    modal = page.locator("#modal")
    tab = modal.locator("[data-cy^=panel-tab-]", has_text="Match panel")
    if not tab.count():
        modal.locator('[data-cy="new-panel-btn"]').first.click()
        page.get_by_text("Match panel", exact=True).last.click()
    else:
        tab.first.click()
    page.wait_for_function(
        _plot_js("return !!gd && !!gd.data && gd.data.some(t => t.name === 'current|photo');"),
        timeout=60000,
    )


def test_match_panel_in_the_app(app, playwright_api):
    ids, dataset = app["ids"], app["dataset"]
    url = f"{app['url']}/datasets/{dataset.name}?id={ids['target']}"
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _open_modal(page, url)
            # more room for the panel: hide the modal's sidebar
            toggle = page.locator("#modal [data-cy=action-toggle-sidebar]")
            if toggle.count():
                toggle.first.click()
            _open_panel(page)

            # the figure is drawn: both images (data URIs) and a line per keypoint
            names = page.evaluate(_plot_js("return gd.data.map(t => t.name);"))
            assert {"current|photo", "reference|photo"} <= set(names)
            assert sum(n.startswith("line|") for n in names) == 4
            page.wait_for_function(
                _plot_js("return gd.querySelectorAll('.imagelayer image').length >= 2;"), timeout=30000
            )
            hrefs = page.evaluate(_plot_js(
                "return Array.from(gd.querySelectorAll('.imagelayer image')).map(i => i.getAttribute('href') || '');"))
            assert all(h.startswith("data:image/") for h in hrefs)
            assert page.evaluate(_plot_js("return gd.querySelectorAll('.scatterlayer .trace').length;")) >= 6

            # click a pixel of the current image (screen position from plotly's own axes)
            cur = page.evaluate(_plot_js(
                "const t = gd.data.find(t => t.name === 'current|photo');"
                "return [t.x0, t.y0, t.dx, t.dy];"))
            x0, y0, dx, dy = cur
            # the panel shows images downsampled to at most panels.MAX_SIDE pixels
            w, h = display_size(dataset[ids["target"]].filepath)
            px = x0 - dx / 2 + CLICK_XY[0] * w * dx
            py = y0 - dy / 2 + CLICK_XY[1] * h * dy
            sx, sy = page.evaluate(_plot_js(
                "const fl = gd._fullLayout; const r = gd.getBoundingClientRect();"
                "return [r.left + fl.xaxis._offset + fl.xaxis.l2p(arg[0]),"
                "        r.top + fl.yaxis._offset + fl.yaxis.l2p(arg[1])];"), [px, py])
            page.mouse.move(sx - 2, sy - 2)
            page.mouse.move(sx, sy)
            time.sleep(0.3)
            page.mouse.click(sx, sy)
            page.wait_for_function(
                _plot_js("return gd.data.some(t => t.name === 'reference|match');"), timeout=60000
            )
            traces = page.evaluate(_plot_js(
                "return gd.data.filter(t => /\\|(match|click|photo|heatmap)$/.test(t.name))"
                ".map(t => ({name: t.name, x: t.x, y: t.y, x0: t.x0, y0: t.y0, dx: t.dx}));"))
            by_name = {t["name"]: t for t in traces}
            assert "reference|heatmap" in by_name

            # the click landed where we aimed (within a display pixel and a half) ...
            click = by_name["current|click"]
            cx = (click["x"][0] - (x0 - dx / 2)) / (w * dx)
            cy = (click["y"][0] - (y0 - dy / 2)) / (h * dy)
            assert abs(cx - CLICK_XY[0]) <= 1.5 / w and abs(cy - CLICK_XY[1]) <= 1.5 / h
            # ... and the match is the one the features give for that pixel
            describer = app["describer"]
            a = describer.describe_one(dataset[ids["target"]].filepath)
            b = describer.describe_one(dataset[ids["ref"]].filepath)
            expected = vis.match_point(a, b, (cx, cy)).target_xy
            ref = by_name["reference|photo"]
            star = by_name["reference|match"]
            rw, rh = display_size(dataset[ids["ref"]].filepath)
            ex = ref["x0"] - ref["dx"] / 2 + expected[0] * rw * ref["dx"]
            ey = ref["y0"] - ref["dx"] / 2 + expected[1] * rh * ref["dx"]
            assert (star["x"][0], star["y"][0]) == pytest.approx((ex, ey), abs=1e-6)
            # the current image is a crop of the reference: the match is the same place of
            # the cat, within a token and a half
            lb = b.letterbox
            truth = (CROP[0] + cx * (CROP[2] - CROP[0]), CROP[1] + cy * (CROP[3] - CROP[1]))
            err_px = ((expected[0] - truth[0]) * lb.width, (expected[1] - truth[1]) * lb.height)
            token_px = b.stride / lb.scale
            assert (err_px[0] ** 2 + err_px[1] ** 2) ** 0.5 <= 1.5 * token_px

            page.get_by_text("Match", exact=False).first.wait_for(timeout=10000)
            time.sleep(1.0)  # let plotly finish drawing the overlay
            shot = app["tmp"] / "match_panel.png"
            _screenshot(page, shot)
            if UPDATE_DOCS:
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, SCREENSHOT)
            assert shot.stat().st_size > 20000

            # feature views: switch the "View" dropdown to the part clusters
            page.locator("#modal").get_by_text("Photos", exact=True).first.click()
            page.get_by_role("option", name="Part clusters").click()
            page.wait_for_function(
                _plot_js("return gd.data.some(t => t.name === 'current|parts')"
                         " && gd.data.some(t => t.name === 'reference|parts');"), timeout=60000)
            time.sleep(1.0)
            parts = app["tmp"] / "match_panel_parts.png"
            _screenshot(page, parts)
            if UPDATE_DOCS:
                shutil.copy(parts, SCREENSHOT.with_name("match_panel_parts.png"))
            assert not [e for e in errors if "plotly" in e.lower()], errors
        finally:
            browser.close()


def test_match_panel_in_the_light_theme(app, playwright_api):
    """Same panel with the App in its light theme: transparent figure backgrounds, so the
    App's own background shows through, and the figure still draws."""
    ids, dataset = app["ids"], app["dataset"]
    url = f"{app['url']}/datasets/{dataset.name}?id={ids['target']}"
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 900})
            context.add_init_script("localStorage.setItem('mui-mode', 'light');")
            page = context.new_page()
            _open_modal(page, url)
            _open_panel(page)
            bg = page.evaluate(_plot_js(
                "return [getComputedStyle(document.body).backgroundColor,"
                " gd.querySelector('.main-svg .bg') ? gd.querySelector('.main-svg .bg').style.fill : '',"
                " gd._fullLayout.paper_bgcolor, gd._fullLayout.plot_bgcolor];"))
            body, _, paper, plot = bg
            # the App is in light mode (a light body) and the figure adds no background
            rgb = [int(v) for v in body[body.index("(") + 1: body.index(")")].split(",")[:3]]
            assert sum(rgb) / 3 > 200, body
            assert paper == "rgba(0, 0, 0, 0)" and plot == "rgba(0, 0, 0, 0)", (paper, plot)
            _screenshot(page, app["tmp"] / "match_panel_light.png")
        finally:
            browser.close()
