"""The match panel in the real FiftyOne App, driven in headless Chromium.

Starts ``python -m fiftyone.server.main`` on a free localhost port against this test
session's database and plugins dir and drives the App through its UI:

- a small persistent dataset (tests/panel_world.py): the figure is drawn (both images,
  keypoint lines), a click on a pixel shows the match (and the heat map) where the features
  say; the light theme;
- the README demo's dataset (built by ``python -m fiftyone_sdcorr demo --tiny``): the panel
  picks the demo's own fields (reference keypoints ``keypoints``, predictions ``predicted``,
  ground truth ``ground_truth``) and draws the reference's match lines; its field selectors
  change the figure; "Propagate from this reference" opens the operator's form pre-filled
  with the reference shown, a new output field and overwrite off, and running it changes
  no existing field; in a narrow window the controls wrap and the figure fits;
- a COCO file with several objects per image, imported with FiftyOne's importer: the
  panel shows object crops and its Object dropdown switches objects; its "Swap instances"
  button opens ``swap_instances``'s form pre-filled with the two objects shown, and running
  it makes a new dataset with the swapped sample (the source media unchanged).

Screenshots go to the test's tmp dir; with ``SDCORR_UPDATE_SCREENSHOTS=1`` the demo's
pictures also go to ``docs/match_panel.png`` and ``docs/match_panel_parts.png`` (README).

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and Python ``playwright``; skipped
with the reason when either is missing.
"""

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import CHROMIUM, CHROMIUM_ARGS, app_server, require_playwright  # noqa: E402
from panel_world import build_panel_dataset, clone_demo, demo_ids  # noqa: E402
from snapshots import field_snapshot  # noqa: E402

from fiftyone_sdcorr.core.pictures import visualize as vis  # noqa: E402

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO_ROOT / "docs" / "match_panel.png"
UPDATE_DOCS = os.environ.get("SDCORR_UPDATE_SCREENSHOTS") == "1"  # tests write into the repo only when asked
PLOT = "#modal .js-plotly-plot"
CLICK_XY = (0.80, 0.25)  # normalised point of the current image to click (no keypoint there)
CROP = (0.20, 0.05, 1.0, 0.95)  # the current sample is this crop of the reference image


@pytest.fixture(scope="module")
def playwright_api():
    return require_playwright()


@pytest.fixture(scope="module")
def server(app_url, playwright_api):
    """The session's FiftyOne App server (tests/conftest.py: one per test session)."""
    return app_url


@pytest.fixture(scope="module")
def app(photo_paths, tmp_path_factory, server):
    """A persistent dataset the App server sees."""
    tmp = tmp_path_factory.mktemp("browser")
    name = f"sdcorr-browser-{uuid.uuid4().hex[:8]}"
    dataset, ids, describer = build_panel_dataset(
        name, photo_paths, tmp / "world", persistent=True, crop=CROP)
    try:
        yield {"url": server, "dataset": dataset, "ids": ids, "describer": describer, "tmp": tmp}
    finally:
        dataset.delete()


@pytest.fixture(scope="module")
def demo(demo_build, server, tmp_path_factory):
    """A copy of the README demo's dataset (the demo command, tiny models, run once per
    session), seen by the App server."""
    dataset = clone_demo(demo_build, f"sdcorr-browser-demo-{uuid.uuid4().hex[:8]}")
    try:
        yield {"url": server, "dataset": dataset, "ids": demo_ids(dataset),
               "tmp": tmp_path_factory.mktemp("demo")}
    finally:
        dataset.delete()


def display_size(filepath):
    from PIL import Image

    from fiftyone_sdcorr.plugin.panels import MAX_SIDE

    with Image.open(filepath) as im:
        return vis.display_size(im.width, im.height, MAX_SIDE)


def _plot_js(body):
    return "(arg) => { const gd = document.querySelector('%s'); %s }" % (PLOT, body)


def _plot_value(page, body, arg=None, timeout=30000):
    """What ``body`` returns about the panel's figure ``gd``, read once the figure is drawn:
    while the App re-mounts the panel (a split, a re-render under load) there is briefly no
    figure, or one without data, and a plain evaluate would read null; this polls until
    ``body`` runs on a drawn figure."""
    js = ("(arg) => { const gd = document.querySelector('%s');"
          " if (!gd || !gd.data || !gd._fullLayout) return null;"
          " try { return {v: (() => { %s })()}; } catch (e) { return null; } }" % (PLOT, body))
    return page.wait_for_function(js, arg=arg, timeout=timeout).json_value()["v"]


def _screenshot(page, path):
    """The modal's content down to the bottom of the figure (no empty band below)."""
    box = page.locator("#modal [data-cy=modal-content]").bounding_box()
    bottom = _plot_value(page, "return gd.getBoundingClientRect().bottom;")
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


def _open_sample_panel(page, url, hide_sidebar=True, tries=3):
    """Opens the sample's modal (``url``) and the match panel in it, and checks that the
    modal stays open: the App has been seen to close it on its own right after it opened
    (back to the grid, no request of ours in between); a user opens it again, so does this."""
    for attempt in range(tries):
        _open_modal(page, url)
        toggle = page.locator("#modal [data-cy=action-toggle-sidebar]")
        if hide_sidebar and toggle.count():
            toggle.first.click()
        _open_panel(page)
        time.sleep(1.0)
        if page.locator("#modal [data-cy=modal-content]").count():
            return
        print(f"the App closed the sample modal (attempt {attempt + 1}); opening it again")
    raise AssertionError(f"the sample modal of {url} kept closing")


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
            _open_sample_panel(page, url)  # with the modal's sidebar hidden: more room for the panel

            # the figure is drawn: both images (data URIs) and a line per keypoint
            names = _plot_value(page, "return gd.data.map(t => t.name);")
            assert {"current|photo", "reference|photo"} <= set(names)
            assert sum(n.startswith("line|") for n in names) == 4
            page.wait_for_function(
                _plot_js("return gd.querySelectorAll('.imagelayer image').length >= 2;"), timeout=30000
            )
            hrefs = _plot_value(page, (
                "return Array.from(gd.querySelectorAll('.imagelayer image')).map(i => i.getAttribute('href') || '');"))
            assert all(h.startswith("data:image/") for h in hrefs)
            assert _plot_value(page, "return gd.querySelectorAll('.scatterlayer .trace').length;") >= 6

            # click a pixel of the current image (screen position from plotly's own axes; the
            # panel shows images downsampled to at most panels.MAX_SIDE pixels)
            x0, y0, dx, dy, w, h = _click_current(page, dataset[ids["target"]].filepath, CLICK_XY)
            page.wait_for_function(
                _plot_js("return gd.data.some(t => t.name === 'reference|match');"), timeout=60000
            )
            traces = _plot_value(page, (
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

            # the dense view: offered by the View dropdown, drawn as an image over each side
            _choose_until(page, "View", "Dense correspondence", "Photos",
                          "gd.data.some(t => t.name === 'current|dense' && t.type === 'image')"
                          " && gd.data.some(t => t.name === 'reference|dense')")
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
            _open_sample_panel(page, url, hide_sidebar=False)
            bg = _plot_value(page, (
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


# --------------------------------------------------------------------------- the demo dataset
PANEL = "#modal [data-cy=panel-content-match_panel]"
DEMO_FIELDS = {"Reference keypoints": "keypoints", "Predicted": "predicted", "Ground truth": "ground_truth"}


def _control(page, label):
    """The combobox of the panel's dropdown labelled ``label``."""
    return page.locator(PANEL).locator(
        f"xpath=.//p[normalize-space()='{label}']/ancestor::div[.//div[@role='combobox']][1]"
        "//div[@role='combobox']").first


def _choose(page, label, option, tries=6):
    """Picks ``option`` in the panel's dropdown ``label``, as a user does (again when the
    panel re-rendered under the open menu), until the dropdown shows it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(tries):
        if page.get_by_role("listbox").count():
            page.keyboard.press("Escape")
            time.sleep(0.3)
        try:
            _control(page, label).click(timeout=10000)
            page.get_by_role("option", name=option, exact=True).click(timeout=5000)
            page.wait_for_function(
                "([el, want]) => el && el.innerText.trim() === want",
                arg=[_control(page, label).element_handle(timeout=5000), option], timeout=10000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"could not choose {option!r} in {label!r}")


def _names(page):
    return _plot_value(page, "return gd.data.map(t => t.name);")


def _wait_plot(page, condition, timeout=60000):
    page.wait_for_function(_plot_js(f"return !!gd && !!gd.data && ({condition});"), timeout=timeout)


def _choose_until(page, label, option, other, condition, tries=3, timeout=30000, reopen=None):
    """Picks ``option`` in the dropdown ``label`` until the figure meets ``condition``; when
    it does not in ``timeout`` ms (a change event lost while the panel re-rendered under
    load), picks ``other`` and ``option`` again; before the last try ``reopen()`` (when
    given) reloads the App as a user would (the panel keeps its remembered choices). The
    condition itself is not relaxed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        try:
            _choose(page, label, option)
            _wait_plot(page, condition, timeout=timeout)
            return
        except (PlaywrightTimeout, AssertionError) as e:
            if attempt == tries - 1:
                raise AssertionError(f"{label} -> {option}: the figure never met {condition!r}; "
                                     f"{_diagnose(page)}") from e
            if reopen is not None and attempt == tries - 2:
                reopen()
                continue
            try:
                _choose(page, label, other)
            except AssertionError:  # the panel did not answer: the next try reopens it
                pass


def _diagnose(page) -> str:
    """What the page showed when a wait failed: a screenshot path, the panel's text, the
    figure's trace names and the dropdowns' values (for the next reader of a flaky run)."""
    shot = Path(tempfile.gettempdir()) / f"sdcorr-browser-failure-{int(time.time())}.png"
    info = {"screenshot": str(shot)}
    for key, fn in (("screenshot_error", lambda: page.screenshot(path=str(shot))),
                    ("panel_text", lambda: page.locator(PANEL).inner_text(timeout=5000)[:800]),
                    ("traces", lambda: _names(page)),
                    ("dropdowns", lambda: {k: _control(page, k).inner_text(timeout=2000) for k in DEMO_FIELDS})):
        try:
            got = fn()
            if key != "screenshot_error":
                info[key] = got
        except Exception as err:  # noqa: BLE001 -- diagnostics must not hide the failure
            info[key if key != "screenshot_error" else key] = f"{type(err).__name__}: {err}"[:200]
    return json.dumps(info, default=str)


def _settles(page, timeout=60000) -> bool:
    """Waits until the match panel's content is mounted with its figure and 5 match lines;
    on a timeout, fails with what the page shows (panels, figures, lines, text)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "(sel) => { const panel = document.querySelector(sel);"
            " const gd = panel && panel.querySelector('.js-plotly-plot');"
            " return !!gd && !!gd.data && gd.data.filter(t => t.name.startsWith('line|')).length === 5"
            "   && panel.querySelectorAll('[role=combobox]').length > 0; }", arg=PANEL, timeout=timeout)
        return True
    except PlaywrightTimeout as e:
        seen = page.evaluate(
            "(sel) => ({panels: document.querySelectorAll(sel).length,"
            " containers: document.querySelectorAll('#modal [data-cy=panel-container]').length,"
            " contents: Array.from(document.querySelectorAll('#modal [data-cy^=panel-content]')).map(e => e.dataset.cy),"
            " plots: Array.from(document.querySelectorAll('#modal .js-plotly-plot')).map(g =>"
            "   (g.data || []).filter(t => t.name.startsWith('line|')).length),"
            " text: (document.querySelector(sel) || {innerText: ''}).innerText.slice(0, 600)})", PANEL)
        raise AssertionError(f"the panel did not settle with its figure: {seen}; {_diagnose(page)}") from e


def _reference_title(page):
    return _plot_value(page, (
        "return (gd.layout.annotations || []).map(a => a.text).find(t => t.startsWith('reference')) || '';"))


def _click_current(page, filepath, xy):
    """Clicks the normalised point ``xy`` of the current image (screen position from
    plotly's own axes); returns the image trace's ``x0, y0, dx, dy`` and the displayed
    ``w, h``."""
    x0, y0, dx, dy = _plot_value(page, (
        "const t = gd.data.find(t => t.name === 'current|photo'); return [t.x0, t.y0, t.dx, t.dy];"))
    w, h = display_size(filepath)
    px, py = x0 - dx / 2 + xy[0] * w * dx, y0 - dy / 2 + xy[1] * h * dy
    sx, sy = _plot_value(page, (
        "const fl = gd._fullLayout; const r = gd.getBoundingClientRect();"
        "return [r.left + fl.xaxis._offset + fl.xaxis.l2p(arg[0]),"
        "        r.top + fl.yaxis._offset + fl.yaxis.l2p(arg[1])];"), [px, py])
    page.mouse.move(sx - 2, sy - 2)
    page.mouse.move(sx, sy)
    time.sleep(0.3)
    page.mouse.click(sx, sy)
    return x0, y0, dx, dy, w, h


def _forget_panel_choices(dataset):
    """Clears the field choices the panel remembers for ``dataset`` (tests start from the
    defaults, whatever an earlier test chose)."""
    from fiftyone.operators.store import ExecutionStore

    from fiftyone_sdcorr.plugin.panels import STORE_NAME

    ExecutionStore.create(STORE_NAME, dataset._doc.id).clear()


def _open_demo(page, demo, sample="crop", forget=True, lines=True):
    """Opens the demo sample's modal and the panel (from the default fields unless
    ``forget`` is False); ``lines``: wait for match lines too (not every choice of fields
    has them)."""
    if forget:
        _forget_panel_choices(demo["dataset"])
    _open_sample_panel(page, f"{demo['url']}/datasets/{demo['dataset'].name}?id={demo['ids'][sample]}")
    if lines:
        _wait_plot(page, "gd.data.filter(t => t.name.startsWith('line|')).length > 0")


def test_demo_dataset_defaults_selectors_and_safe_propagation(demo, playwright_api):
    dataset, ids = demo["dataset"], demo["ids"]
    crop = dataset[ids["crop"]]
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _open_demo(page, demo)

            # 1. the demo's own fields are picked, and its reference with its match lines
            for label, field in DEMO_FIELDS.items():
                assert _control(page, label).inner_text().strip() == field, label
            names = _names(page)
            assert sum(n.startswith("line|") for n in names) == 5
            assert sum(n.startswith("error|") for n in names) == 5
            assert _reference_title(page) == "reference · chelsea.png"
            status = page.locator(PANEL).inner_text()
            assert "No predictions" not in status and "has no keypoints" not in status

            # click-to-match between the copy's eyes (away from the keypoint markers, which a
            # click would select for review): match star and heat map over the reference
            eyes = crop["ground_truth"].keypoints[0].points[:2]
            _click_current(page, crop.filepath, ((eyes[0][0] + eyes[1][0]) / 2, (eyes[0][1] + eyes[1][1]) / 2))
            _wait_plot(page, "gd.data.some(t => t.name === 'reference|match')"
                             " && gd.data.some(t => t.name === 'reference|heatmap')")
            time.sleep(1.0)  # let plotly finish drawing the overlay
            shot = demo["tmp"] / "match_panel.png"
            _screenshot(page, shot)
            assert shot.stat().st_size > 20000
            if UPDATE_DOCS:
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, SCREENSHOT)
            _choose(page, "View", "Part clusters")
            _wait_plot(page, "gd.data.some(t => t.name === 'current|parts')"
                             " && gd.data.some(t => t.name === 'reference|parts')")
            time.sleep(1.0)
            parts = demo["tmp"] / "match_panel_parts.png"
            _screenshot(page, parts)
            if UPDATE_DOCS:
                shutil.copy(parts, SCREENSHOT.with_name("match_panel_parts.png"))
            _choose(page, "View", "Photos")
            _wait_plot(page, "!gd.data.some(t => t.name === 'current|parts')")

            # 2. the field selectors change the figure
            _choose(page, "Ground truth", "(none)")
            _wait_plot(page, "!gd.data.some(t => t.name.startsWith('error|'))")
            assert sum(n.startswith("line|") for n in _names(page)) == 5
            _choose_until(page, "Reference keypoints", "ground_truth", "keypoints",  # the copies' annotations
                          "(gd.layout.annotations || []).some(a => a.text.startsWith('reference')"
                          " && a.text !== 'reference · chelsea.png')",
                          reopen=lambda: _open_demo(page, demo, forget=False, lines=False))
            copies = {os.path.basename(dataset[ids[r]].filepath) for r in ("half_size", "crop_upscaled", "mirrored")}
            assert _reference_title(page).split(" · ", 1)[1] in copies
            _choose(page, "Reference keypoints", "keypoints")
            _choose(page, "Ground truth", "ground_truth")
            _wait_plot(page, "(gd.layout.annotations || []).some(a => a.text === 'reference · chelsea.png')"
                             " && gd.data.filter(t => t.name.startsWith('error|')).length === 5")

            # 3. "Propagate from this reference": the form is pre-filled safely
            with page.expect_request(lambda r: "resolve-type" in r.url
                                     and "propagate_keypoints" in (r.post_data or "")) as request:
                page.get_by_role("button", name="Propagate from this reference").click()
            params = json.loads(request.value.post_data)["params"]
            assert params["references"] == "ids"
            assert params["reference_ids"] == [ids["reference"]]
            assert params["source_field"] == "keypoints"
            assert params["output_field"] == "sdcorr_keypoints" and not dataset.has_field("sdcorr_keypoints")
            assert params["overwrite"] is False
            assert params["view_target"] == "DATASET"  # the App shows the whole dataset: FiftyOne's only choice
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("Output field", exact=True).wait_for(timeout=30000)
            values = dialog.locator("input").evaluate_all("els => els.map(e => e.value)")
            assert "sdcorr_keypoints" in values
            overwrite = dialog.get_by_role("checkbox", name="Overwrite an existing output field")
            assert overwrite.count() == 1 and not overwrite.is_checked()
            form = demo["tmp"] / "propagate_form.png"
            page.screenshot(path=str(form))

            # ... and running it writes the new field and changes nothing else
            before = field_snapshot(dataset)
            execute = dialog.get_by_role("button", name="Execute", exact=True)
            page.wait_for_function("(b) => !b.disabled", arg=execute.element_handle(), timeout=30000)
            with page.expect_response(lambda r: "/operators/execute" in r.url and r.request.post_data
                                      and "propagate_keypoints" in r.request.post_data,
                                      timeout=300000) as response:
                execute.click()
            body = response.value.text()
            assert "Traceback" not in body, body[-3000:]
            deadline = time.time() + 300
            while True:
                dataset.reload()
                if dataset.has_field("sdcorr_keypoints") and dataset.count("sdcorr_keypoints"):
                    break
                assert time.time() < deadline, f"no predictions written; server said: {body[-3000:]}"
                time.sleep(1.0)
            time.sleep(2.0)  # the run writes its record after the values
            dataset.reload()
            assert field_snapshot(dataset, exclude=("sdcorr_keypoints", "sdcorr_keypoints_error")) == before
            targets = dataset.match_tags("target")
            assert targets.count("sdcorr_keypoints") == len(targets)
            kp = dataset[ids["crop"]]["sdcorr_keypoints"].keypoints[0]
            assert kp["sdcorr_reference_id"] == ids["reference"]
            assert not [e for e in errors if "plotly" in e.lower()], errors
        finally:
            browser.close()


def test_demo_panel_in_a_narrow_split(demo, playwright_api):
    """The panel beside the sample in a split of a small window: the controls wrap onto
    several rows and stay legible, the figure fits the panel's width (no horizontal
    scrolling) and still draws the match lines."""
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for attempt in range(3):
                # Seen twice in ~10 runs (CI and here): the App closed the sample modal on
                # its own, right after it opened or after the split, back to the grid (no
                # request of ours in between). A user opens the sample again; so does this.
                _open_demo(page, demo, forget=attempt == 0)
                containers = page.locator("#modal [data-cy=panel-container]")
                if containers.count() < 2:  # the panel is a tab beside the sample: split them
                    split = page.locator('#modal button[title="Split horizontally"]')
                    if split.count():
                        split.first.click()
                        page.wait_for_function(
                            "() => document.querySelectorAll('#modal [data-cy=panel-container]').length >= 2"
                            " || !document.querySelector('#modal [data-cy=modal-content]')", timeout=30000)
                time.sleep(1.0)
                if page.locator("#modal [data-cy=modal-content]").count() and containers.count() >= 2:
                    break
                print(f"the App closed the sample modal (attempt {attempt + 1}); opening it again")
            # Measured once the split has settled: the panel (re-mounted by the split) holds
            # its controls and a figure with the 5 match lines; until then the wait polls.
            geometry = page.wait_for_function(
                "(sel) => { const panel = document.querySelector(sel);"
                " const gd = panel && panel.querySelector('.js-plotly-plot');"
                " if (!gd || !gd.data || gd.data.filter(t => t.name.startsWith('line|')).length !== 5) return null;"
                " const boxes = Array.from(panel.querySelectorAll('[role=combobox]'))"
                "   .map(c => c.getBoundingClientRect());"
                " if (!boxes.length) return null;"
                " const plot = gd.getBoundingClientRect();"
                " const modal = document.querySelector('#modal [data-cy=modal-content]').getBoundingClientRect();"
                " const p = panel.getBoundingClientRect();"
                " return {rows: new Set(boxes.map(b => Math.round(b.top))).size,"
                "   minWidth: Math.min(...boxes.map(b => b.width)),"
                "   right: Math.max(...boxes.map(b => b.right)), plotLeft: plot.left, plotRight: plot.right,"
                "   panelLeft: p.left, panelRight: p.right, panelWidth: p.width, modalWidth: modal.width,"
                "   scroll: panel.scrollWidth - panel.clientWidth}; }",
                arg=PANEL, timeout=60000).json_value() if _settles(page) else None
            assert geometry["panelWidth"] < 0.7 * geometry["modalWidth"], geometry  # a split
            assert geometry["rows"] >= 2, geometry  # the controls wrapped
            assert geometry["minWidth"] >= 120, geometry  # each control stays legible
            assert geometry["right"] <= geometry["panelRight"] + 1, geometry
            assert geometry["panelLeft"] - 1 <= geometry["plotLeft"], geometry
            assert geometry["plotRight"] <= geometry["panelRight"] + 1, geometry
            assert geometry["scroll"] <= 1, geometry
            _screenshot(page, demo["tmp"] / "match_panel_split.png")
        finally:
            browser.close()


# --------------------------------------------------------------------------- several objects per image
OBJECTS_SCREENSHOT = REPO_ROOT / "docs" / "match_panel_objects.png"


@pytest.fixture(scope="module")
def coco_objects(tmp_path_factory, server):
    """The COCO canvases of tests/test_objects.py imported with FiftyOne's importer,
    features and predictions per object, seen by the App server."""
    import fiftyone as fo

    import fiftyone_sdcorr as sc
    from test_objects import desc, write_coco

    folder = tmp_path_factory.mktemp("coco-objects")
    write_coco(folder)
    ds = fo.Dataset.from_dir(data_path=str(folder / "data"), labels_path=str(folder / "labels.json"),
                             dataset_type=fo.types.COCODetectionDataset, label_types=["detections", "keypoints"],
                             name=f"sdcorr-browser-objects-{uuid.uuid4().hex[:8]}")
    ds.persistent = True
    ds.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("reference")
    sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=str(folder / "store"),
                              progress=False)
    sc.propagate_keypoints(ds, "reference", "keypoints", "pred", patches_field="detections", extractor=desc(),
                           progress=False)
    try:
        yield {"url": server, "dataset": ds, "tmp": folder}
    finally:
        ds.delete()


def _coco_sample(ds, name):
    import fiftyone as fo

    return ds.match(fo.ViewField("filepath").ends_with(name)).first()


def _object_names(sample, field="detections"):
    """How the panel names the sample's objects (label, position, size in pixels)."""
    from fiftyone_sdcorr.plugin.object_names import image_size, object_names

    dets = sample[field].detections
    return object_names([(d.label, d.bounding_box) for d in dets], image_size(sample.filepath))


def _titles(page):
    return _plot_value(page, "return (gd.layout.annotations || []).map(a => a.text);")


def test_panel_on_a_sample_with_several_objects(coco_objects, playwright_api):
    """A COCO image with a decoy and three copies: the panel shows the largest object and
    the reference object its prediction came from, crops side by side with one line per
    keypoint; the Object dropdown switches to another object."""
    import fiftyone as fo

    ds = coco_objects["dataset"]
    sample = ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first()
    url = f"{coco_objects['url']}/datasets/{ds.name}?id={sample.id}"
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            _open_sample_panel(page, url)
            _wait_plot(page, "gd.data.filter(t => t.name.startsWith('line|')).length === 5")
            cur, ref = _object_names(sample), _object_names(_coco_sample(ds, "canvas0.png"))
            assert _titles(page) == [f"current · canvas2.png · {cur[1]}", f"reference · canvas0.png · {ref[1]}"]
            assert _control(page, "Object").inner_text().strip() == cur[1]
            shot = coco_objects["tmp"] / "objects.png"
            _screenshot(page, shot)
            if UPDATE_DOCS:
                shutil.copyfile(shot, OBJECTS_SCREENSHOT)
            _choose_until(page, "Object", cur[3], cur[2],
                          f"(gd.layout.annotations || []).some(a => a.text === 'current · canvas2.png · {cur[3]}')"
                          " && gd.data.filter(t => t.name.startsWith('line|')).length === 5")
            # the decoy: matched with the reference's decoy
            _choose_until(page, "Object", cur[0], cur[2],
                          f"(gd.layout.annotations || []).some(a => a.text === 'reference · canvas0.png · {ref[0]}')"
                          " && gd.data.filter(t => t.name.startsWith('line|')).length === 5")
        finally:
            browser.close()


def _media_hashes(dataset):
    import hashlib

    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in dataset.values("filepath")}


def _click_until_prompted(page, button, operator, tries=3):
    """Clicks the panel's ``button`` until the App resolves ``operator``'s form; the params
    the panel pre-filled it with."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from test_browser_operators import DIALOG

    for attempt in range(tries):
        try:
            with page.expect_request(lambda r: "resolve-type" in r.url and operator in (r.post_data or ""),
                                     timeout=15000) as request:
                page.locator(PANEL).get_by_role("button", name=button).click()
            return json.loads(request.value.post_data)["params"]
        except PlaywrightTimeout:
            if attempt == tries - 1 or page.locator(DIALOG).count():
                raise
    raise AssertionError("unreachable")


def test_swap_instances_from_the_match_panel(coco_objects, playwright_api):
    """The panel shows an object of canvas2 and the reference object it was matched with; its
    "Swap instances" button opens the operator's form pre-filled with the two objects (the
    reference object as the source); executing it makes a new dataset with one swapped
    sample whose provenance names both objects, and no media file of this dataset changes."""
    import fiftyone as fo

    from test_browser_operators import DIALOG, wait_execute, wait_notification

    ds = coco_objects["dataset"]
    ds.reload()
    by_name = {os.path.basename(s.filepath): s for s in ds.iter_samples()}
    current, reference = by_name["canvas2.png"], by_name["canvas0.png"]
    target_det, source_det = current.detections.detections[1], reference.detections.detections[1]
    out_name = f"{ds.name}-swaps"
    hashes = _media_hashes(ds)
    _forget_panel_choices(ds)
    url = f"{coco_objects['url']}/datasets/{ds.name}?id={current.id}"
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _open_sample_panel(page, url)
            _wait_plot(page, "gd.data.filter(t => t.name.startsWith('line|')).length === 5")
            assert _titles(page) == [f"current · canvas2.png · {_object_names(current)[1]}",
                                     f"reference · canvas0.png · {_object_names(reference)[1]}"]

            # the button: the form opens, pre-filled with the two objects shown (clicked again
            # when the panel re-rendered under the first click and the App opened nothing)
            params = _click_until_prompted(page, "Swap instances", "swap_instances")
            assert params["source_id"] == source_det.id and params["target_id"] == target_det.id, params
            assert params["patches_field"] == "detections", params
            dialog = page.locator(DIALOG)
            dialog.get_by_text("Output dataset", exact=True).wait_for(timeout=30000)
            values = dialog.locator("input").evaluate_all("els => els.map(e => e.value)")
            assert source_det.id in values and target_det.id in values and out_name in values, values
            wait_execute(page)
            page.screenshot(path=str(coco_objects["tmp"] / "swap_form.png"))

            # execute: the run's notification, then the new dataset
            dialog.get_by_role("button", name="Execute", exact=True).click()
            text = wait_notification(page, r"swap_instances", timeout=120000)
            page.screenshot(path=str(coco_objects["tmp"] / "swap_done.png"))
            assert "swapped 1" in text and "failed 0" in text, text
            assert fo.dataset_exists(out_name)
            out = fo.load_dataset(out_name)
            assert len(out) == 1
            s = out.first()
            assert s.sdcorr_swap_source_sample_id == reference.id and s.sdcorr_swap_source_label_id == source_det.id
            assert s.sdcorr_swap_target_sample_id == current.id and s.sdcorr_swap_target_label_id == target_det.id
            assert os.path.exists(s.filepath) and s.filepath not in hashes
            assert _media_hashes(ds) == hashes  # the source dataset's media: unchanged
            assert not [e for e in errors if "plotly" in e.lower()], errors
        finally:
            browser.close()
            if fo.dataset_exists(out_name):
                fo.delete_dataset(out_name)
