"""The plugin's operators in the real FiftyOne App, driven through its UI as a new user would.

On the README demo's dataset (``python -m fiftyone_sdcorr demo --tiny --no-app``) and an
App server started against this test session's database (tests/app_server.py):

- the operator browser finds "Evaluate keypoints (PCK)"; its form is filled (predictions,
  ground truth, an evaluation key) and executed: the user sees the notification with the
  counts and the summary output with the PCK table;
- ``compute_fused_features`` on the current view (a saved view of 2 samples): its form
  starts from the demo's recorded run (tiny model directories, preset), says how to
  enable background runs, offers only immediate execution on an App started without
  ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS`` (as do all our run forms), and running it
  shows the counts and writes the features;
- background runs: on a second App server started with
  ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true`` the form's execution menu offers
  "Schedule"; scheduling queues a delegated operation, ``fiftyone delegated launch``
  runs it and the fields are written;
- refusals and failures: a rerun into an existing output field is refused in the form
  (the run's own message under the input, "Execute" disabled); a run that fails after
  its checks says why (notification and output view) and writes nothing;
- feature pictures: ``write_feature_pca`` through its form, then the new field is
  chosen as the App's media field (display options) and the grid shows colour pictures;
- masks (on a small textured dataset with stored features of the deterministic describer,
  no model): ``propagate_masks`` through its form gives the targets the known masks
  (IoU), ``evaluate_masks`` through its form records the evaluation run;
  ``write_dense_views`` through its form writes a PNG per sample into a new media field.

Screenshots go to each test's tmp dir. Needs Debian's ``chromium`` and Python
``playwright``; skipped with the reason when either is missing.
"""

import colorsys
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_server import (  # noqa: E402
    CHROMIUM, CHROMIUM_ARGS, app_server, dismiss_popover, require_playwright, stop_process)
from panel_world import clone_demo  # noqa: E402

pytestmark = pytest.mark.browser

PREFIX = "@sdcorr/sdcorr/"
DIALOG = "[data-cy=operators-prompt-modal]"  # an operator's form
OUTPUT = "[data-cy=operators-prompt-view-modal]"  # an operator's output (show_output)
LEGACY = {"FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS": "true"}
#: our run operators, by the label the operator browser lists
RUN_OPERATORS = {
    "compute_fused_features": "Compute fused SD + DINOv2 features",
    "propagate_keypoints": "Propagate keypoints (SD + DINOv2 correspondence)",
    "evaluate_keypoints": "Evaluate keypoints (PCK)",
    "flag_keypoint_annotations": "Flag suspicious keypoint annotations",
    "write_feature_pca": "Write feature pictures (PCA colours or part clusters)",
    "write_similarity_heatmap": "Write similarity heat maps",
}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def playwright_api():
    return require_playwright()


@pytest.fixture(scope="module")
def demo(demo_build, playwright_api):
    """A copy of the README demo's dataset (tiny models; the command runs once per session)
    plus a saved view ``two`` of 2 samples."""
    dataset = clone_demo(demo_build, f"sdcorr-ops-{uuid.uuid4().hex[:8]}")
    dataset.save_view("two", dataset.match_tags("target").limit(2))
    try:
        yield {"dataset": dataset, "work": demo_build.workdir, "two": dataset.load_saved_view("two").values("id")}
    finally:
        dataset.delete()


@pytest.fixture(scope="module")
def server(app_url, demo):
    """The session's App server, started as users start it, without background runs."""
    return app_url


@pytest.fixture(scope="module")
def browser(playwright_api):
    with playwright_api() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30000)
    errors = []
    failed = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
    page.errors, page.failed_requests = errors, failed
    try:
        yield page
    finally:
        context.close()


# --------------------------------------------------------------------------- helpers
def open_grid(page, url, dataset, view=None):
    """Loads the dataset's grid (optionally a saved view), as a user opening the App."""
    target = f"{url}/datasets/{dataset.name}" + (f"?view={view}" if view else "")
    for _ in range(3):
        page.goto(target, wait_until="load")
        deadline = time.time() + 45
        while time.time() < deadline:
            dismiss_popover(page)
            if page.locator("[data-cy=looker]").count() and page.locator("[data-cy=action-browse-operations]").count():
                time.sleep(1.0)
                dismiss_popover(page)
                return
            time.sleep(0.5)
    raise AssertionError(f"the App did not show the grid of {target}")


def open_operator(page, label, search, via_button=True):
    """Opens the operator browser (its button or the backtick key), searches, clicks the
    operator's entry; returns the form's dialog."""
    if via_button:
        page.locator("[data-cy=action-browse-operations]").click()
    else:
        page.locator("body").press("`")
    box = page.get_by_placeholder("Search operations by name...")
    box.wait_for()
    box.fill(search)
    page.get_by_text(label, exact=True).first.click()
    dialog = page.locator(DIALOG)
    dialog.wait_for()
    # the form is resolved on the server: wait for its notice (the last input)
    dialog.get_by_text(re.compile(r"background runs|Scheduled runs start")).first.wait_for(timeout=60000)
    return dialog


def field(dialog, label):
    """The form row labelled ``label`` (its <p> label and its input / combobox)."""
    return dialog.locator(
        f"xpath=.//p[normalize-space()=\"{label}\"]/ancestor::div[.//*[@role='combobox'] or .//input][1]").first


def input_value(dialog, label):
    return field(dialog, label).locator("input").first.input_value()


def choose(page, dialog, label, option):
    field(dialog, label).get_by_role("combobox").click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_function("([el, want]) => el.innerText.trim() === want",
                           arg=[field(dialog, label).get_by_role("combobox").element_handle(), option])


def fill(dialog, label, value):
    box = field(dialog, label).locator("input").first
    box.fill(value)
    box.press("Tab")


def wait_execute(page, enabled=True, timeout=30000):
    """Waits until the form's "Execute" button is enabled (a form ready to run: no
    "Required property" either) or disabled. Both are looked up afresh on every poll:
    the App replaces the form's elements each time it resolves the form again."""
    page.wait_for_function(
        "([sel, enabled]) => { const d = document.querySelector(sel); if (!d) return false;"
        " const b = Array.from(d.querySelectorAll('button')).find(x => x.innerText.trim() === 'Execute');"
        " if (!b) return false;"
        " return enabled ? !b.disabled && !d.innerText.includes('Required property') : b.disabled; }",
        arg=[DIALOG, enabled], timeout=timeout)


def footer_buttons(dialog):
    """The texts of the form's buttons (our forms have no buttons among their inputs):
    ``["Cancel", "Execute"]``, plus an unlabelled arrow when FiftyOne offers an execution
    menu (Execute / Schedule)."""
    return [t.strip() for t in dialog.get_by_role("button").all_inner_texts()]


def wait_notification(page, pattern, timeout=180000):
    """The text of the App's notification (a toast, ``role=alert``, shown for a few
    seconds) that matches the regular expression ``pattern``, once it shows."""
    handle = page.wait_for_function(
        "(pat) => { const re = new RegExp(pat);"
        " for (const el of document.querySelectorAll('[role=alert]'))"
        "   if (re.test(el.innerText)) return el.innerText;"
        " return null; }", arg=pattern, timeout=timeout, polling=100)
    return handle.json_value()


def sent_summary(response):
    """The summary text our operator sent the App with ``show_output`` (from the streamed
    response of ``/operators/execute/...``)."""
    for line in response.text().splitlines():
        if not line.strip():
            continue
        body = json.loads(line).get("body") or {}
        if isinstance(body, dict) and body.get("operator_uri") == "show_output":
            text = body["params"]["results"]["summary"]  # a Markdown code block: the lines inside it
            return "\n".join(line for line in text.splitlines() if not line.startswith("`" * 3))
    raise AssertionError(f"no show_output in the response: {response.text()[-3000:]}")


def _squeeze(text):
    return " ".join(text.split())


def assert_summary_visible(page, expected, shot, timeout=20000):
    """The operator's output (FiftyOne's ``show_output`` dialog) shows each of the
    ``expected`` texts (whitespace runs compared as one space)."""
    out = page.locator(OUTPUT)
    out.wait_for(timeout=timeout)
    expected = [_squeeze(e) for e in expected if e.strip()]
    deadline = time.time() + timeout / 1000
    text = ""
    while time.time() < deadline:
        text = out.inner_text()
        if all(e in _squeeze(text) for e in expected):
            break
        time.sleep(1.0)
    page.screenshot(path=str(shot))
    missing = [e for e in expected if e not in _squeeze(text)]
    assert not missing, (f"the run's summary is not visible in the App's output dialog: {missing} missing; "
                         f"the dialog shows {text!r} (screenshot {shot}); requests that failed: "
                         f"{page.failed_requests}")


def field_values(dataset, ids, fields):
    """``{field: [value of each sample of ids]}``, read afresh from the database."""
    dataset.reload()
    return {f: [dataset[i][f] for i in ids] for f in fields}


# --------------------------------------------------------------------------- 1. immediate runs
def test_evaluate_keypoints_from_the_operator_browser(demo, server, page, tmp_path):
    dataset = demo["dataset"]
    open_grid(page, server, dataset)
    dialog = open_operator(page, "Evaluate keypoints (PCK)", "PCK", via_button=False)
    choose(page, dialog, "Predicted keypoints", "predicted")
    choose(page, dialog, "Ground-truth keypoints", "ground_truth")
    fill(dialog, "Evaluation key", "ui_pck")
    page.screenshot(path=str(tmp_path / "evaluate_form.png"))
    with page.expect_response(lambda r: "/operators/execute" in r.url and r.request.post_data
                              and "evaluate_keypoints" in r.request.post_data, timeout=180000) as response:
        dialog.get_by_role("button", name="Execute", exact=True).click()
    # what the server sent the App: the summary with the PCK table
    summary = sent_summary(response.value)
    assert "pt@0.1" in summary and "img@0.1" in summary and "(mean)" in summary, summary

    # the notification: the counts of the run (the 4 copies have ground truth)
    text = wait_notification(page, r"evaluate_keypoints: ")
    assert "evaluated 4" in text and "failed 0" in text, text
    page.screenshot(path=str(tmp_path / "evaluate_notification.png"))
    dataset.reload()
    assert "ui_pck" in dataset.list_evaluations()

    # the whole summary with the PCK table, as the user sees it: every line of it
    assert_summary_visible(page, summary.splitlines(), tmp_path / "evaluate_summary.png")
    assert not page.errors, page.errors


def test_compute_features_form_starts_from_the_demo_run(demo, server, page, tmp_path):
    dataset, work, two = demo["dataset"], demo["work"], demo["two"]
    open_grid(page, server, dataset, view="two")
    dialog = open_operator(page, RUN_OPERATORS["compute_fused_features"], "Compute fused")
    page.screenshot(path=str(tmp_path / "compute_form.png"))

    # the defaults are the demo's recorded run: its tiny models and its preset
    assert input_value(dialog, "Stable Diffusion model") == str(work / "tiny-models" / "sd")
    assert input_value(dialog, "DINOv2 model") == str(work / "tiny-models" / "dino")
    assert field(dialog, "Recipe preset").get_by_role("combobox").inner_text().strip() == "cpu"
    assert input_value(dialog, "Feature store directory") == str(work / "features")
    assert dialog.get_by_text("2 samples targeted").count() == 1
    # the current view is the target
    assert dialog.locator("input[type=radio][value=CURRENT_VIEW]").is_checked()

    # this App was started without the setting: the notice says how to get background runs
    # and only immediate execution is offered
    notice = dialog.get_by_text(re.compile("For background runs")).first.inner_text()
    assert "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true" in notice, notice
    assert "fiftyone delegated launch" in notice, notice
    assert footer_buttons(dialog) == ["Cancel", "Execute"]
    assert page.get_by_text("Schedule", exact=True).count() == 0

    # run it (recompute the 2 samples)
    before = field_values(dataset, two, ["sdcorr_features"])
    dialog.get_by_role("checkbox", name="Overwrite").check()
    with page.expect_response(lambda r: "/operators/execute" in r.url and r.request.post_data
                              and "compute_fused_features" in r.request.post_data, timeout=300000) as response:
        dialog.get_by_role("button", name="Execute", exact=True).click()
        text = wait_notification(page, r"compute_fused_features: ")
    page.screenshot(path=str(tmp_path / "compute_notification.png"))
    assert "computed 2" in text and "failed 0" in text, text
    after = field_values(dataset, two, ["sdcorr_features", "sdcorr_features_error"])
    assert all(p and os.path.exists(p) for p in after["sdcorr_features"]), after
    assert after["sdcorr_features_error"] == [None, None]
    assert before["sdcorr_features"] == after["sdcorr_features"]  # same configuration, same store files
    summary = sent_summary(response.value)
    assert "computed 2" in summary, summary
    assert_summary_visible(page, summary.splitlines(), tmp_path / "compute_summary.png")


def test_without_the_setting_only_immediate_runs_are_offered(demo, server, page, tmp_path):
    """Every run form of ours on an App started without the setting: only "Execute", and
    the notice says how to enable background runs."""
    open_grid(page, server, demo["dataset"])
    for name, label in RUN_OPERATORS.items():
        dialog = open_operator(page, label, label.split(" (")[0])
        if name == "write_similarity_heatmap":
            # from the grid no sample is open: the form says it needs a reference sample
            # (under its input, in the run's own words) until one is given
            dialog.get_by_text(re.compile("no reference sample")).first.wait_for(timeout=30000)
            wait_execute(page, enabled=False)
            fill(dialog, "Reference sample id", demo["dataset"].first().id)
            dialog.get_by_text(re.compile("no point given")).first.wait_for(timeout=30000)
            fill(dialog, "x (normalised)", "0.5")
            fill(dialog, "y (normalised)", "0.5")
        # the form as it opens is ready to run (its defaults are valid)
        try:
            wait_execute(page)
        except Exception as e:
            page.screenshot(path=str(tmp_path / f"form_{name}_not_ready.png"))
            raise AssertionError(f"the {name} form is not ready to run: {dialog.inner_text()[-1500:]!r}") from e
        page.screenshot(path=str(tmp_path / f"form_{name}.png"))
        notice = dialog.get_by_text(re.compile("For background runs")).first.inner_text()
        assert "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true" in notice and "fiftyone delegated launch" in notice, \
            (name, notice)
        assert footer_buttons(dialog) == ["Cancel", "Execute"], name
        dialog.get_by_role("button", name="Cancel", exact=True).click()
        dialog.wait_for(state="detached")


def test_a_rerun_into_an_existing_field_is_refused_in_the_form_and_a_failed_run_says_why(
        demo, server, page, tmp_path):
    """A user reruns propagation: the form offers a free output name; typing the demo's
    ``predicted`` shows the run's own refusal under "Output field" and "Execute" is
    disabled until "Overwrite" is ticked or the name changes. A run that fails after its
    checks (a model that cannot load) says why in a notification and the output view,
    instead of the silence FiftyOne's streamed runs end in, and writes nothing."""
    dataset = demo["dataset"]
    open_grid(page, server, dataset)
    dialog = open_operator(page, RUN_OPERATORS["propagate_keypoints"], "Propagate")
    offered = input_value(dialog, "Output field")
    assert offered.startswith("sdcorr_keypoints") and not dataset.has_field(offered), offered
    execute = dialog.get_by_role("button", name="Execute", exact=True)

    fill(dialog, "Output field", "predicted")
    row = field(dialog, "Output field")
    row.get_by_text(re.compile("field 'predicted' already exists")).wait_for(timeout=30000)
    wait_execute(page, enabled=False)
    page.screenshot(path=str(tmp_path / "refused_in_form.png"))
    overwrite = dialog.get_by_role("checkbox", name="Overwrite an existing output field")
    overwrite.check()
    wait_execute(page)
    assert row.get_by_text(re.compile("already exists")).count() == 0
    overwrite.uncheck()

    # values the checks accept, but the run cannot load its model
    fill(dialog, "Output field", "ui_unwritten")
    fill(dialog, "Stored features field", "ui_missing_features")
    fill(dialog, "Stable Diffusion model", str(tmp_path / "no_such_model"))
    wait_execute(page)
    def predicted():  # as JSON (unannotated points are NaN, which never equals itself)
        return json.dumps([kp.to_json() if kp else None
                           for kp in field_values(dataset, dataset.values("id"), ["predicted"])["predicted"]])

    before = predicted()
    execute.click()
    text = wait_notification(page, r"propagate_keypoints failed: ", timeout=120000)
    assert "no_such_model" in text and "no usable reference" in text, text
    assert_summary_visible(page, ["propagate_keypoints failed:", "no_such_model"], tmp_path / "failed_run.png")
    dataset.reload()
    assert not dataset.has_field("ui_unwritten") and not dataset.has_field("ui_missing_features")
    assert predicted() == before
    assert not page.errors, page.errors


# --------------------------------------------------------------------------- 2. background runs
def test_schedule_compute_features_and_run_a_worker(demo, page, tmp_path):
    from fiftyone.operators.delegated import DelegatedOperationService

    dataset, two = demo["dataset"], demo["two"]
    service = DelegatedOperationService()
    store = tmp_path / "bg_store"
    with app_server(tmp_path / "server", LEGACY) as url:
        open_grid(page, url, dataset, view="two")
        dialog = open_operator(page, RUN_OPERATORS["compute_fused_features"], "Compute fused")
        notice = dialog.get_by_text(re.compile("Scheduled runs start")).first.inner_text()
        assert "fiftyone delegated launch" in notice, notice
        fill(dialog, "Feature store directory", str(store))
        fill(dialog, "Embedding field", "bg_embedding")
        fill(dialog, "Features field", "bg_features")
        # 2 samples: immediate by default, "Schedule" offered in the execution menu
        buttons = footer_buttons(dialog)
        assert buttons[:2] == ["Cancel", "Execute"] and len(buttons) == 3, buttons
        dialog.get_by_role("button").last.click()
        menu_item = page.get_by_text("Schedule", exact=True)
        menu_item.wait_for()
        page.get_by_text("Run this operation in the background").wait_for()
        time.sleep(0.5)  # the menu fades in
        page.screenshot(path=str(tmp_path / "schedule_menu.png"))
        menu_item.click()
        go = dialog.get_by_role("button", name="Schedule", exact=True)
        go.wait_for()
        page.screenshot(path=str(tmp_path / "schedule_form.png"))
        go.click()
        dialog.wait_for(state="detached", timeout=60000)
        # the App confirms
        wait_notification(page, r"successfully scheduled", timeout=30000)
        page.screenshot(path=str(tmp_path / "scheduled.png"))

    # queued, not run: nothing written yet
    deadline = time.time() + 30
    while True:
        ops = service.list_operations(dataset_name=dataset.name, operator=PREFIX + "compute_fused_features")
        if ops or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(ops) == 1, ops
    op = ops[0]
    assert op.run_state in ("queued", "scheduled"), op.run_state
    assert op.context.params.get("features_field") == "bg_features", op.context.params
    dataset.reload()
    assert not dataset.has_field("bg_features")

    # a worker, as the notice says
    log = open(tmp_path / "worker.log", "wb")
    cli = Path(sys.executable).with_name("fiftyone")
    command = [str(cli)] if cli.exists() else [sys.executable, "-c", "from fiftyone.core.cli import main; main()"]
    worker = subprocess.Popen(command + ["delegated", "launch"], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ), start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            op = service.get(op.id)
            if op.run_state in ("completed", "failed") or time.time() > deadline or worker.poll() is not None:
                break
            time.sleep(1.0)
    finally:
        stop_process(worker)
        log.close()
    wlog = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
    assert op.run_state == "completed", (op.run_state, op.result.error if op.result else None, wlog)
    result = op.result.result if op.result else None
    assert result and result.get("computed") == 2 and result.get("failed") == 0, result

    # the fields were written on the view's 2 samples, in the chosen store, and nowhere else
    values = field_values(dataset, two, ["bg_features", "bg_embedding"])
    assert all(p and p.startswith(str(store)) and os.path.exists(p) for p in values["bg_features"]), values
    assert all(v is not None and len(v) > 0 for v in values["bg_embedding"])
    assert dataset.count("bg_features") == 2


# --------------------------------------------------------------------------- 3. feature pictures
def _colourfulness(path, box=None):
    """Hue spread of an image region: (number of 30-degree hue bins holding >= 3% of its
    saturated pixels, fraction of saturated pixels, per-channel std)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").crop(box) if box else im.convert("RGB"), dtype=np.float64) / 255.0
    flat = rgb.reshape(-1, 3)
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in flat[:: max(1, len(flat) // 20000)]])
    sat = hsv[(hsv[:, 1] > 0.25) & (hsv[:, 2] > 0.15)]
    if not len(sat):
        return 0, 0.0, float(flat.std(axis=0).mean() * 255)
    hist = np.bincount((sat[:, 0] * 12).astype(int) % 12, minlength=12) / len(sat)
    return int((hist >= 0.03).sum()), len(sat) / len(hsv), float(flat.std(axis=0).mean() * 255)


def test_feature_pictures_as_the_media_field(demo, server, page, tmp_path):
    dataset = demo["dataset"]
    open_grid(page, server, dataset, view="two")
    tile = page.locator("[data-cy=looker]").first
    time.sleep(2.0)  # the first tile's image
    tile.screenshot(path=str(tmp_path / "tile_photo.png"))

    dialog = open_operator(page, RUN_OPERATORS["write_feature_pca"], "feature pictures")
    dialog.get_by_role("radio", name="PCA colours").check()
    fill(dialog, "Output field", "ui_pca")
    page.screenshot(path=str(tmp_path / "pca_form.png"))
    dialog.get_by_role("button", name="Execute", exact=True).click()
    text = wait_notification(page, r"write_feature_pca: ")
    assert "failed 0" in text, text
    dataset.reload()
    assert "ui_pca" in dataset.app_config.media_fields, dataset.app_config.media_fields
    assert all(p and os.path.exists(p) for p in dataset.load_saved_view("two").values("ui_pca"))
    # close the summary
    page.locator(OUTPUT).get_by_role("button", name="Done").click()
    page.locator(OUTPUT).wait_for(state="detached")

    # choose the new field as the media field (display options) and look at the grid
    page.locator("[data-cy=action-display-options]").click()
    page.get_by_text("Media field", exact=True).wait_for()
    page.screenshot(path=str(tmp_path / "display_options.png"))
    page.locator("[data-cy=popout] [data-cy=radio-button-ui_pca]").click()
    page.wait_for_function("() => document.querySelector('[data-cy=popout] [data-cy=radio-button-ui_pca] input').checked")
    page.keyboard.press("Escape")
    page.mouse.click(1500, 900)
    time.sleep(3.0)  # the tiles load their new images
    page.screenshot(path=str(tmp_path / "grid_pca.png"))
    tile = page.locator("[data-cy=looker]").first
    tile.screenshot(path=str(tmp_path / "tile_pca.png"))

    from PIL import Image

    with Image.open(tmp_path / "tile_photo.png") as a, Image.open(tmp_path / "tile_pca.png") as b:
        photo = np.asarray(a.convert("RGB"), dtype=np.float64)
        pca = np.asarray(b.convert("RGB").resize(a.size), dtype=np.float64)
    assert np.abs(photo - pca).mean() > 15, "the grid tile did not change after choosing the media field"
    bins, saturated, std = _colourfulness(tmp_path / "tile_pca.png")
    assert saturated > 0.3 and bins >= 3 and std > 25, (bins, saturated, std)


# --------------------------------------------------------------------------- objects (issue 15)
def test_objects_of_a_patches_view_through_the_forms(server, page, tmp_path):
    """A COCO keypoints file imported with FiftyOne's importer, several objects per image; a
    saved patches view; compute and propagate through their forms, as a user would: the
    forms preselect the view's patches field, and every object gets its features and its
    own predicted keypoints."""
    from fiftyone_sdcorr.core.features.tiny import tiny_models
    from test_objects import write_coco

    import fiftyone as fo

    write_coco(tmp_path)
    dataset = fo.Dataset.from_dir(data_path=str(tmp_path / "data"), labels_path=str(tmp_path / "labels.json"),
                                  dataset_type=fo.types.COCODetectionDataset,
                                  label_types=["detections", "keypoints"], name=f"sdcorr-ui-coco-{uuid.uuid4().hex[:8]}")
    try:
        dataset.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("ref")
        dataset.save_view("people", dataset.to_patches("detections"))
        sd, dino = tiny_models(tmp_path / "tiny")
        open_grid(page, server, dataset, view="people")

        dialog = open_operator(page, RUN_OPERATORS["compute_fused_features"], "Compute fused")
        assert field(dialog, "Objects (patches field)").get_by_role("combobox").inner_text().strip() == "detections"
        assert dialog.get_by_text("9 samples targeted").count() == 1  # the 9 patches
        fill(dialog, "Stable Diffusion model", str(sd))
        fill(dialog, "DINOv2 model", str(dino))
        fill(dialog, "Feature store directory", str(tmp_path / "store"))
        wait_execute(page)
        dialog.get_by_role("button", name="Execute", exact=True).click()
        text = wait_notification(page, r"compute_fused_features: ")
        page.screenshot(path=str(tmp_path / "objects_compute.png"))
        assert "computed 9" in text and "failed 0" in text, text
        dataset.reload()
        paths = dataset.values("detections.detections.sdcorr_features", unwind=True)
        assert len(paths) == 9 and all(p and os.path.exists(p) for p in paths)
        page.locator(OUTPUT).wait_for()  # the run's summary: closed as a user closes it
        page.keyboard.press("Escape")
        page.locator(OUTPUT).wait_for(state="hidden")

        dialog = open_operator(page, RUN_OPERATORS["propagate_keypoints"], "Propagate")
        choose(page, dialog, "Source keypoints field", "keypoints")
        dialog.locator("input[type=radio][value=tag]").check()
        choose(page, dialog, "Reference tag", "ref")
        assert field(dialog, "Objects (patches field)").get_by_role("combobox").inner_text().strip() == "detections"
        wait_execute(page)
        dialog.get_by_role("button", name="Execute", exact=True).click()
        text = wait_notification(page, r"propagate_keypoints: ")
        page.screenshot(path=str(tmp_path / "objects_propagate.png"))
        # the reference canvas's 2 objects are the references: skipped and counted, not targets
        assert "targets 7" in text and "predicted 7" in text and "references_skipped 2" in text, text
        assert "failed 0" in text, text
        dataset.reload()
        targets = [s for s in dataset.iter_samples() if "ref" not in s.tags]
        out = [s.detections.detections for s in targets]
        kps = [s.sdcorr_keypoints for s in targets]
        assert [len(k.keypoints) for k in kps] == [len(d) for d in out] and sum(map(len, out)) == 7
        assert all({k.sdcorr_detection_id for k in kp.keypoints} == {d.id for d in dets}
                   for kp, dets in zip(kps, out))
        assert not page.errors, page.errors
    finally:
        dataset.delete()


# --------------------------------------------------------------------------- masks and dense pictures (issue 17)
MASK_SIZE, MASK_SHIFT = 200, 28


def _known_mask(size=MASK_SIZE):
    lab = np.zeros((size, size), np.uint8)
    lab[50:150, 60:140] = 1
    lab[80:120, 90:110] = 2
    return lab


def _mask_iou(a, b, c):
    return ((a == c) & (b == c)).sum() / ((a == c) | (b == c)).sum()


@pytest.fixture(scope="module")
def masks_world(tmp_path_factory, app_url):
    """A textured reference (tests/local_descriptor.textured_noise, tag ``ref``) with a known
    class mask in ``gt``; targets ``same`` (a copy) and ``shift`` (shifted right by
    ``MASK_SHIFT`` pixels, grey strip on the left); every sample's known mask in ``truth``;
    a saved view ``targets`` of the two targets. Features are stored beforehand with the
    deterministic describer, so the operators read them and load no model."""
    import fiftyone as fo
    from PIL import Image

    import fiftyone_sdcorr as sdc
    from local_descriptor import LocalDescriptor, textured_noise

    folder = tmp_path_factory.mktemp("masks")
    image, lab = textured_noise(MASK_SIZE, MASK_SIZE, seed=1), _known_mask()
    shifted, moved = np.full_like(image, 128), np.zeros_like(lab)
    shifted[:, MASK_SHIFT:], moved[:, MASK_SHIFT:] = image[:, :-MASK_SHIFT], lab[:, :-MASK_SHIFT]
    truth = {"ref": lab, "same": lab, "shift": moved}
    ds = fo.Dataset(f"sdcorr-ui-masks-{uuid.uuid4().hex[:8]}")
    ds.persistent = True
    samples = []
    for name, img in (("ref", image), ("same", image), ("shift", shifted)):
        path = str(folder / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(img)).save(path)
        s = fo.Sample(filepath=path, name=name, truth=fo.Segmentation(mask=np.ascontiguousarray(truth[name])))
        if name == "ref":
            s.tags.append("ref")
            s["gt"] = fo.Segmentation(mask=np.ascontiguousarray(lab))
        samples.append(s)
    ds.add_samples(samples)
    classes = {0: "background", 1: "body", 2: "head"}
    ds.mask_targets = {"gt": classes, "truth": classes}
    ds.save()
    ds.save_view("targets", ds.match_tags("ref", bool=False))
    try:
        sdc.compute_fused_features(ds, extractor=LocalDescriptor(size=224, stride=14), store_dir=str(folder / "store"),
                                   progress=False)
        ids = dict(zip(ds.values("name"), ds.values("id")))
        yield {"dataset": ds, "ids": ids, "truth": truth, "folder": folder}
    finally:
        ds.delete()


def _run_form(page, dialog, operator, pattern, timeout=120000):
    """Clicks "Execute" once the form is ready; the notification's text and the summary the
    server sent (``show_output``)."""
    wait_execute(page)
    with page.expect_response(lambda r: "/operators/execute" in r.url and r.request.post_data
                              and operator in r.request.post_data, timeout=timeout) as response:
        dialog.get_by_role("button", name="Execute", exact=True).click()
        text = wait_notification(page, pattern, timeout=timeout)
    return text, sent_summary(response.value)


def _close_output(page):
    out = page.locator(OUTPUT)
    out.wait_for()
    out.get_by_role("button", name="Done").click()
    out.wait_for(state="detached")


def test_propagate_and_evaluate_masks_through_their_forms(masks_world, app_url, page, tmp_path):
    """A user propagates a reference's segmentation to the saved view's two targets (a copy
    and a shifted copy) through the form, with stored features (no model), then measures
    the result with ``evaluate_masks``'s form: the new fo.Segmentation fields hold the known
    masks and the evaluation run is recorded."""
    import fiftyone as fo

    ds, ids, truth = masks_world["dataset"], masks_world["ids"], masks_world["truth"]
    open_grid(page, app_url, ds, view="targets")
    dialog = open_operator(page, "Propagate masks (SD + DINOv2 dense correspondence)", "Propagate masks")
    assert dialog.locator("input[type=radio][value=CURRENT_VIEW]").is_checked()
    assert dialog.get_by_text("2 target samples").count() == 1
    choose(page, dialog, "Source masks field", "gt")
    fill(dialog, "Output field", "ui_masks")
    fill(dialog, "Resolution", "64")  # the dense grid: small images, a quick run
    page.screenshot(path=str(tmp_path / "masks_form.png"))
    text, summary = _run_form(page, dialog, "propagate_masks", r"propagate_masks")
    page.screenshot(path=str(tmp_path / "masks_notification.png"))
    assert "targets 2" in text and "propagated 2" in text and "failed 0" in text, text
    assert "propagated 2" in summary, summary
    _close_output(page)

    ds.reload()
    assert ds.get_field("ui_masks").document_type is fo.Segmentation
    assert ds.count("ui_masks") == 2 and ds.count("ui_masks_error") == 0
    assert ds[ids["ref"]]["ui_masks"] is None  # the reference is not in the view: untouched
    same, shift = ds[ids["same"]]["ui_masks"], ds[ids["shift"]]["ui_masks"]
    assert same.sdcorr_reference_id == ids["ref"] and same.mask.shape == (MASK_SIZE, MASK_SIZE)
    for c in (1, 2):
        assert _mask_iou(same.mask, truth["same"], c) >= 0.9, (c, _mask_iou(same.mask, truth["same"], c))
    assert _mask_iou(shift.mask, truth["shift"], 1) >= 0.9, _mask_iou(shift.mask, truth["shift"], 1)
    assert ds.mask_targets["ui_masks"] == ds.mask_targets["gt"]

    dialog = open_operator(page, "Evaluate masks (IoU)", "Evaluate masks")
    choose(page, dialog, "Predicted masks", "ui_masks")
    choose(page, dialog, "Ground-truth masks", "truth")
    fill(dialog, "Evaluation key", "ui_miou")
    text, summary = _run_form(page, dialog, "evaluate_masks", r"evaluate_masks")
    page.screenshot(path=str(tmp_path / "evaluate_masks.png"))
    assert "failed 0" in text, text
    assert "mean IoU" in summary, summary
    ds.reload()
    assert "ui_miou" in ds.list_evaluations()
    results = ds.load_evaluation_results("ui_miou")
    assert results.pixel_confusion_matrix.sum() == 2 * MASK_SIZE * MASK_SIZE  # the view's 2 samples
    assert not page.errors, page.errors


def test_dense_pictures_through_the_form(masks_world, app_url, page, tmp_path):
    """``write_dense_views`` from the grid: the reference's id given in the form; the new
    field is a media field and holds a PNG per sample."""
    from PIL import Image

    ds, ids = masks_world["dataset"], masks_world["ids"]
    out_dir = tmp_path / "dense"
    open_grid(page, app_url, ds, view="targets")
    dialog = open_operator(page, "Write dense correspondence pictures", "dense correspondence")
    fill(dialog, "Reference sample id", ids["ref"])
    fill(dialog, "Output field", "ui_dense")
    fill(dialog, "Output directory", str(out_dir))
    fill(dialog, "Dense grid (cells per side)", "64")  # small images: a quick run
    page.screenshot(path=str(tmp_path / "dense_form.png"))
    text, summary = _run_form(page, dialog, "write_dense_views", r"write_dense_views")
    page.screenshot(path=str(tmp_path / "dense_notification.png"))
    assert "failed 0" in text, text
    ds.reload()
    assert "ui_dense" in ds.app_config.media_fields, ds.app_config.media_fields
    view = ds.load_saved_view("targets")
    paths = view.values("ui_dense")
    assert len(paths) == 2 and all(p and p.endswith(".png") and p.startswith(str(out_dir)) for p in paths), paths
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 0
    assert ds[ids["ref"]]["ui_dense"] is None
    assert not page.errors, page.errors
