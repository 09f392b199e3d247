"""The App on datasets without keypoints (issue 24), driven in headless Chromium through the
session's App server:

- a mask-only dataset (``fo.Segmentation``): the match panel opens with the reference's
  and the predicted masks drawn over both sides, the figure fills the panel; several
  dropdowns changed without waiting for the figure (View, Predicted masks, Reference):
  the figure reaches the last choice of each;
- an objects-only dataset (detections with instance masks and object features): the
  panel shows object crops, the Reference object switch draws the other crop, the Swap
  button prompts ``swap_instances`` with the two objects shown; the forms open with
  *Objects* preselected: ``propagate_masks`` runs as it opens, ``write_dense_views``
  offers the open sample's objects by name and writes from the one picked.

With ``SDCORR_UPDATE_SCREENSHOTS=1`` the mask-only panel goes to docs/match_panel_masks.png.
"""

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from panel_world import build_mask_dataset, build_objects_dataset
from app_server import CHROMIUM, CHROMIUM_ARGS, require_playwright
from test_browser import PANEL, _choose, _control, _open_sample_panel, _plot_value, _screenshot, _titles, _wait_plot
from test_browser_operators import DIALOG, choose, field, fill, open_operator, wait_execute, wait_notification

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
MASKS_SCREENSHOT = REPO_ROOT / "docs" / "match_panel_masks.png"
UPDATE_DOCS = os.environ.get("SDCORR_UPDATE_SCREENSHOTS") == "1"


@pytest.fixture(scope="module")
def worlds(photo_paths, tmp_path_factory, app_url):
    tmp = tmp_path_factory.mktemp("browser-masks")
    masks, ids, _ = build_mask_dataset(f"sdcorr-ui-masks-{uuid.uuid4().hex[:8]}", photo_paths, tmp / "masks",
                                       persistent=True)
    objects = build_objects_dataset(f"sdcorr-ui-objects-{uuid.uuid4().hex[:8]}", tmp / "objects", persistent=True)
    try:
        yield {"url": app_url, "masks": masks, "ids": ids, "objects": objects, "tmp": tmp}
    finally:
        masks.delete()
        objects.delete()


@pytest.fixture
def page(worlds):
    with require_playwright()() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            yield page
        finally:
            browser.close()


def test_mask_only_dataset_in_the_panel_and_quick_choices(worlds, page):
    from fiftyone_sdcorr.plugin.panel_ranking import rank_references

    import fiftyone as fo
    import numpy as np

    ds, ids = worlds["masks"], worlds["ids"]
    other = ds[ids["other"]]  # a second reference with masks (references are the masked samples)
    other["gt_masks"] = fo.Segmentation(mask=np.pad(np.ones((200, 300), dtype=np.uint8), 100))
    other.save()
    _open_sample_panel(page, f"{worlds['url']}/datasets/{ds.name}?id={ids['target']}")
    _wait_plot(page, "gd.data.some(t => t.name === 'current|mask') && gd.data.some(t => t.name === 'reference|mask')")
    assert _titles(page)[1] == "reference · chelsea.jpg"
    assert _control(page, "Reference masks").inner_text().strip() == "gt_masks"
    assert _control(page, "Predicted masks").inner_text().strip() == "pred_masks"
    assert "No annotated reference" not in page.locator(PANEL).inner_text()
    # the figure fills the panel's height (not a fixed 420 px)
    height = _plot_value(page, "return gd.getBoundingClientRect().height;")
    assert height >= 0.55 * 1000, height
    time.sleep(0.5)
    shot = worlds["tmp"] / "match_panel_masks.png"
    _screenshot(page, shot)
    if UPDATE_DOCS:
        shutil.copyfile(shot, MASKS_SCREENSHOT)

    # three dropdowns, one after the other, without waiting for the figure: the last wins
    other = next(r["label"] for r in rank_references(ds, ids["target"], None) if r["id"] == ids["other"])
    _choose(page, "View", "Dense correspondence")
    _choose(page, "Predicted masks", "(none)")
    _choose(page, "Reference", other)
    _wait_plot(page, "gd.data.some(t => t.name === 'current|dense') && !gd.data.some(t => t.name === 'current|mask')"
                     " && (gd.layout.annotations || []).some(a => a.text === 'reference · coffee.jpg')", timeout=30000)
    _choose(page, "Reference", next(r["label"] for r in rank_references(ds, ids["target"], None)
                                    if r["id"] == ids["ref"]))
    _choose(page, "View", "Photos")
    _wait_plot(page, "!gd.data.some(t => t.name === 'current|dense') && gd.data.some(t => t.name === 'reference|mask')"
                     " && (gd.layout.annotations || []).some(a => a.text === 'reference · chelsea.jpg')", timeout=30000)
    assert not [e for e in page.errors if "plotly" in e.lower()], page.errors


def test_objects_only_dataset_panel_swap_and_forms(worlds, page):
    import fiftyone as fo

    ds = worlds["objects"]
    sample = ds.match(fo.ViewField("filepath").ends_with("canvas2.png")).first()
    _open_sample_panel(page, f"{worlds['url']}/datasets/{ds.name}?id={sample.id}")
    _wait_plot(page, "gd.data.some(t => t.name === 'reference|mask') && gd.data.some(t => t.name === 'current|mask')")
    titles = _titles(page)
    assert titles[0].startswith("current · canvas2.png · person (")

    # the Reference object switch draws that object's crop
    options = _options(page, "Reference object")
    assert len(options) >= 2
    current = _control(page, "Reference object").inner_text().strip()
    target = next(o for o in options if o != current and "canvas1.png" in o and "40×60" in o)  # its decoy
    photo = _plot_value(page, "return gd.data.find(t => t.name === 'reference|photo').source;")
    _choose(page, "Reference object", target)
    title = json.dumps("reference · canvas1.png · " + target.split(" · ")[1])
    _wait_plot(page, f"(gd.layout.annotations || []).some(a => a.text === {title})")
    assert _plot_value(page, "return gd.data.find(t => t.name === 'reference|photo').source;") != photo

    # Swap: the form pre-filled with the two objects shown
    with page.expect_request(lambda r: "resolve-type" in r.url and "swap_instances" in (r.post_data or "")) as req:
        page.locator(PANEL).get_by_role("button", name="Swap instances").click()
    params = json.loads(req.value.post_data)["params"]
    dets = {d.id: d for s in ds.iter_samples() for d in s.detections.detections}
    assert params["target_id"] in {d.id for d in sample.detections.detections} and params["source_id"] in dets
    page.locator(DIALOG).get_by_role("button", name="Cancel").click()
    page.locator(DIALOG).wait_for(state="detached")

    # propagate_masks: Objects preselected, the source follows, ready to run as it opens
    dialog = open_operator(page, "Propagate masks (SD + DINOv2 dense correspondence)", "Propagate masks",
                           via_button=False)
    assert field(dialog, "Objects (patches field)").get_by_role("combobox").inner_text().strip() == "detections"
    assert field(dialog, "Source masks field").get_by_role("combobox").inner_text().strip() == "detections"
    dialog.locator("input[type=radio][value=tag]").check()  # every sample has masks: the tagged one is the reference
    choose(page, dialog, "Reference tag", "reference")
    fill(dialog, "Resolution", "32")
    wait_execute(page)
    dialog.get_by_role("button", name="Execute", exact=True).click()
    text = wait_notification(page, r"propagate_masks: ", timeout=120000)
    assert "failed 0" in text and "propagated 0" not in text, text
    page.keyboard.press("Escape")

    # write_dense_views: the open sample's objects by name; the one picked is the reference
    _pick_dense_reference(page, ds, sample, worlds["tmp"] / "dense")
    assert not [e for e in page.errors if "plotly" in e.lower()], page.errors


def _options(page, label):
    """The option texts of the panel's dropdown ``label`` (opened and closed again)."""
    _control(page, label).click()
    options = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")
    return [o.strip() for o in options]


def _pick_dense_reference(page, ds, sample, out_dir):
    from fiftyone_sdcorr.plugin.object_names import image_size, object_names

    dets = sample.detections.detections
    names = object_names([(d.label, d.bounding_box) for d in dets], image_size(sample.filepath))
    page.locator(DIALOG).wait_for(state="detached")
    dialog = open_operator(page, "Write dense correspondence pictures", "dense correspondence", via_button=False)
    assert field(dialog, "Objects (patches field)").get_by_role("combobox").inner_text().strip() == "detections"
    box = field(dialog, "Reference object").get_by_role("combobox")
    assert box.inner_text().strip() == names[1]  # the largest object
    box.click()
    assert sorted(o.strip() for o in page.get_by_role("option").all_inner_texts()) == sorted(names)
    page.get_by_role("option", name=names[3], exact=True).click()
    fill(dialog, "Output directory", str(out_dir))
    fill(dialog, "Dense grid (cells per side)", "32")
    wait_execute(page)
    with page.expect_request(lambda r: "/operators/execute" in r.url and "write_dense_views" in (r.post_data or "")) \
            as req:
        dialog.get_by_role("button", name="Execute", exact=True).click()
    assert json.loads(req.value.post_data)["params"]["reference_id"] == dets[3].id
    text = wait_notification(page, r"write_dense_views: ", timeout=120000)
    assert "failed 0" in text, text
