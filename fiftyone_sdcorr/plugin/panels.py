"""The match panel: a sample and an annotated reference side by side, with their keypoint
correspondences, click-to-match, feature views and review actions.

Surfaces: the sample modal (the current sample against a reference) and the grid (two
selected samples). With object features (a ``fo.Detections`` field whose detections carry
``sdcorr_features``) each side is an object's crop: the current sample's object (an
*Object* dropdown, the largest first) against a reference object (ranked by
:mod:`fiftyone_sdcorr.plugin.panel_ranking`, the one its prediction came from first).
Everything is one plotly figure in one coordinate system:

- both images, downsampled to at most :data:`MAX_SIDE` pixels and drawn at a common
  height :data:`PLOT_HEIGHT` (plot units), the current sample on the left;
- lines from each reference keypoint to its predicted (or ground-truth) position in the
  current sample, one colour per keypoint label, opacity by confidence; skeleton edges
  when the dataset has a skeleton; optional error lines predicted -> ground truth;
- click-to-match: a click on either image (plotly reports the pixel ``idx`` [row, col] of
  the image trace) is converted back to exact normalised coordinates, matched into the
  other image with the fused features, and the similarity heat map is laid over the other
  image;
- feature views: the pair's co-fitted PCA colours and a shared k-means part clustering;
- dense views, from the pair's dense match (:func:`~fiftyone_sdcorr.core.matching.dense.dense_match`
  of the reference to the current side at :data:`DENSE_RESOLUTION` cells per side, on the
  stored features of both sides: the whole images', or the object crops' own): *Dense
  correspondence*, the paper's colour map (the reference coloured by position, each pixel
  of the current side by the colour of its match, opacity = confidence), and *Reference
  warped* (the reference photo or crop carried onto the current side; *Photos* shows the
  current photo as it is);
- masks (:mod:`fiftyone_sdcorr.plugin.panel_masks`): the *Reference masks* and *Predicted
  masks* fields drawn over the two sides; without keypoints the panel still opens, the
  reference chosen by similarity among the samples with masks (or every other sample);
- actions: propagate from this reference (prompts ``propagate_keypoints``), accept /
  reject a predicted point or instance (label attribute ``sdcorr_verdict``, per-point list
  ``sdcorr_point_verdicts`` and label tags ``sdcorr:accepted`` / ``sdcorr:rejected``, all
  filterable in the App), compute missing features (prompts ``compute_fused_features``).

Trace names are ``"<side>|<kind>"`` (side ``current``/``reference``; kinds ``photo``,
``pca``, ``parts``, ``dense``, ``warp``, ``heatmap``, ``keypoints``, ``gt``, ``skeleton``,
``click``, ``match``); line traces are ``"line|<label>"`` and ``"error|<label>"``.
"""


from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Optional, Tuple

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.core.pictures import visualize as vis

from fiftyone_sdcorr.dataset.config import MASKS_FIELD
from fiftyone_sdcorr.plugin.field_roles import OUTPUT_FIELD, default_fields, field_roles, free_field_name, keypoint_fields
from fiftyone_sdcorr.plugin.panel_figure import (  # noqa: F401 -- MAX_SIDE etc. are part of the panel's API
    CONTROL_DEFAULTS,
    DENSE_RESOLUTION,
    FIGURE_CSS_HEIGHT,
    MAX_SIDE,
    PLOT_HEIGHT,
    PLUGIN,
    POINT_REVIEW_ATTR,
    REVIEW_ATTR,
    REVIEW_TAGS,
    SHOW_MODES,
    SIDES,
    VERDICT_MARKS,
    VIEW_MODES,
    build_figure,
    figure_options,
    instances_of,
    pair_frames,
    mask_predicted_from,
    placements,
    point_name,
    predicted_from,
    shown_pairs,
)
from fiftyone_sdcorr.plugin.panel_masks import default_mask_fields, mask_fields, masked_samples
from fiftyone_sdcorr.plugin.panel_state import adopt_newest, panel_lock, record
from fiftyone_sdcorr.plugin.panel_ranking import (
    object_features,
    rank_reference_objects,
    rank_references,
    reference_key,
    sample_objects,
)

#: the panel's field selectors: state key -> (label, whether "none" is a choice)
FIELD_SELECTORS = {
    "ref_field": ("Reference keypoints", False),
    "pred_field": ("Predicted", True),
    "gt_field": ("Ground truth", True),
}
#: the mask selectors (shown when the dataset has mask fields): the masks drawn over the
#: reference and over the current side (:mod:`~fiftyone_sdcorr.plugin.panel_masks`)
MASK_SELECTORS = {
    "mask_field": ("Reference masks", True),
    "pred_mask_field": ("Predicted masks", True),
}
NONE = "__none__"  # the "(none)" choice of the predicted / ground-truth selectors
ALL_INSTANCES = "all"
#: the part counts the panel offers (within the feature views' N_PARTS_RANGE)
PART_CHOICES = (2, 3, 4, 5, 6, 8, 10, 12, 16)
#: the execution store (scoped to the dataset) that remembers the panel's choices
STORE_NAME = "sdcorr_match_panel"
STORE_KEY = "choices"
#: how a control sits in the wrapping control bar (the App gives grid items width 100%)
ITEM = {"item": {"sx": {"width": "auto", "flex": "1 1 170px", "minWidth": "150px", "maxWidth": "340px"}}}
SMALL_ITEM = {"item": {"sx": {"width": "auto", "flex": "0 0 auto"}}}


def _dataset_id(dataset) -> Optional[str]:
    return str(dataset._doc.id) if dataset is not None else None


def view_target(ctx) -> str:
    """The narrowest target FiftyOne's own view-target selector offers for this context:
    the selected samples, else the current view; where the current view is the whole
    dataset the selector names it ``DATASET`` (its only choice, so any other value would
    be an invalid choice in the form)."""
    try:
        values = list(types.ViewTargetProperty(ctx).type.values)
    except Exception:  # noqa: BLE001 -- no view in this context
        values = []
    for target in ("SELECTED_SAMPLES", "CURRENT_VIEW"):
        if target in values:
            return target
    if values:
        return values[-1]
    return "SELECTED_SAMPLES" if ctx.selected else "CURRENT_VIEW"


#: an event identical to one handled this many seconds ago is a duplicate
DUPLICATE_WINDOW_S = 5.0
_recent: "OrderedDict[str, float]" = OrderedDict()
_recent_lock = threading.Lock()


def _expire(table: "OrderedDict", now: float) -> None:
    """Drops the entries of ``table`` (oldest first) noted before the window."""
    while table and next(iter(table.values())) < now - DUPLICATE_WINDOW_S:
        table.popitem(last=False)


def _seen_just_now(params: dict) -> bool:
    """Whether an identical control event (same handler, control, value and panel state)
    was handled in the last :data:`DUPLICATE_WINDOW_S` seconds: the App sends each
    dropdown choice twice, with the same state, and identical events have identical
    results. Lifecycle events (no control ``path``: a new sample, a reloaded dataset) are
    never skipped: their result also depends on the database."""
    if not params.get("path"):
        return False
    key = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    now = time.monotonic()
    with _recent_lock:
        _expire(_recent, now)
        if key in _recent:
            return True
        _recent[key] = now
        return False


#: control values this panel set, whose change event the App will send back:
#: ``(panel id, "controls.<name>", value as JSON) -> when set``
_echoes: "OrderedDict[tuple, float]" = OrderedDict()


def _set(ctx, updates: dict) -> None:
    """``ctx.panel.state.set(updates)``, noting each control whose shown value it changes:
    the App answers such a change with that control's change event (an echo, not a
    choice of the user's), which :meth:`MatchPanel.execute` then skips."""
    state, pid, now = ctx.panel.state, ctx.params.get("panel_id"), time.monotonic()
    with _recent_lock:
        for key, value in updates.items():
            # a control filled for the first time (on load) is not sent back
            if key.startswith("controls.") and state.get(key) is not None and state.get(key) != value:
                echo = (pid, key, json.dumps(value, default=str))
                _echoes[echo] = now
                _echoes.move_to_end(echo)
        _expire(_echoes, now)
    state.set(updates)


def _is_echo(params: dict) -> bool:
    """Whether a change event carries a value this panel itself set (see :func:`_set`)."""
    key = (params.get("panel_id"), params.get("path"), json.dumps(params.get("value"), default=str))
    with _recent_lock:
        when = _echoes.pop(key, None)
    return when is not None and when >= time.monotonic() - DUPLICATE_WINDOW_S


def _forget_echoes(params: dict) -> None:
    """Drops the echoes expected from the control a user event changed."""
    pid, path = params.get("panel_id"), params.get("path")
    if path is None:
        return
    with _recent_lock:
        for key in [k for k in _echoes if k[0] == pid and k[1] == path]:
            del _echoes[key]


def _instance_value(value) -> Optional[int]:
    """The instance dropdown's value -> an instance index, None for all."""
    try:
        return None if value in (None, "", ALL_INSTANCES) else int(value)
    except (TypeError, ValueError):
        return None


def _control_value(key: str, value):
    """A display control's value as the figure takes it (blank: the default)."""
    if key in ("error_lines", "heatmap"):
        return bool(value)
    if key == "n_parts":
        try:
            return max(PART_CHOICES[0], min(int(value), PART_CHOICES[-1]))
        except (TypeError, ValueError):
            return CONTROL_DEFAULTS["n_parts"]
    return value or CONTROL_DEFAULTS[key]


class MatchPanel(foo.Panel):
    """Side-by-side correspondences between a sample and an annotated reference."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="match_panel",
            label="Match panel",
            icon="compare_arrows",
            surfaces="grid modal",
            help_markdown=(
                "The current sample (left) and an annotated reference (right). Lines join "
                "corresponding keypoints (opacity = confidence). Pick the fields above the figure: "
                "the references' keypoints, the predictions, the ground truth. Click any pixel to "
                "see its best match and the similarity heat map in the other image; click a "
                "predicted point to select it for review. *View*: the photos, PCA colours, part "
                "clusters, the dense correspondence (the reference coloured by position, the current "
                "sample by the colour of each pixel's match) or the reference warped onto the current sample."
            ),
        )

    # ---- lifecycle ----------------------------------------------------------------
    def on_load(self, ctx):
        self._refresh(ctx, keep_reference=False)

    def on_change_current_sample(self, ctx):
        self._refresh(ctx, keep_reference=False)

    def on_change_selected(self, ctx):
        if ctx.current_sample is None:
            self._refresh(ctx, keep_reference=False)

    def on_change_dataset(self, ctx):
        self._refresh(ctx, keep_reference=False)

    def _pair_ids(self, ctx) -> Tuple[Optional[str], Optional[str]]:
        """``(current, forced_reference)``: the modal's sample, or two selected samples."""
        if ctx.current_sample:
            return ctx.current_sample, None
        selected = list(ctx.selected or [])
        if len(selected) == 2:
            return selected[0], selected[1]
        return None, None

    # ---- remembered choices (per dataset) -----------------------------------------
    def _store(self, ctx):
        try:
            return ctx.store(STORE_NAME) if ctx.dataset is not None else None
        except Exception:  # noqa: BLE001 -- no execution store: choices last as long as the panel
            return None

    def _saved(self, ctx) -> dict:
        store = self._store(ctx)
        try:
            saved = store.get(STORE_KEY) if store is not None else None
        except Exception:  # noqa: BLE001
            saved = None
        return saved if isinstance(saved, dict) else {}

    def _remember(self, ctx, **choices):
        """Saves the user's field choices for this dataset."""
        store = self._store(ctx)
        if store is None:
            return
        saved = {**self._saved(ctx), **choices}
        try:
            store.set(STORE_KEY, saved)
        except Exception:  # noqa: BLE001 -- remembering is a convenience
            pass

    def _fields(self, ctx) -> dict:
        """The fields to show: this panel's choices when they were made on this dataset,
        else the choices remembered for the dataset, else the defaults
        (:func:`default_fields`); a predicted field newer than any seen when the choice
        was made takes over (a fresh propagation shows up)."""
        state, dataset = ctx.panel.state, ctx.dataset
        roles = field_roles(dataset)
        same = state.dataset_id == _dataset_id(dataset)
        saved = self._saved(ctx)
        ours = {k: state.get(k) for k in FIELD_SELECTORS} if same else {}
        defaults = default_fields(dataset, roles)
        fields = {}
        for key, (_, optional) in FIELD_SELECTORS.items():
            valid = roles["keypoints"] + ([None] if optional else [])
            for source in (ours, saved):
                if key in source and source[key] in valid and (source[key] is not None or optional):
                    fields[key] = source[key]
                    break
            else:
                fields[key] = defaults[key]
        known = state.pred_known if same and state.pred_known is not None else saved.get("pred_known")
        new = [f for f in roles["predicted"] if known is not None and f not in known]
        if new:
            fields["pred_field"] = new[-1]
        fields["pred_known"] = roles["predicted"]
        fields["roles"] = roles
        fields.update(self._mask_choices(ctx, same, saved))
        return fields

    def _mask_choices(self, ctx, same: bool, saved: dict) -> dict:
        """The mask fields shown (this panel's choice on this dataset, else the one
        remembered for it, else :func:`default_mask_fields`) and ``mask_fields``, the
        choices."""
        dataset, state = ctx.dataset, ctx.panel.state
        fields = mask_fields(dataset)
        defaults = default_mask_fields(dataset, fields) if fields else {k: None for k in MASK_SELECTORS}
        chosen = set(state.get("mask_chosen") or []) if same else set()
        out = {"mask_fields": fields}
        for key in MASK_SELECTORS:
            sources = ([state.get(key)] if key in chosen else []) + ([saved[key]] if key in saved else [])
            out[key] = next((v for v in sources if v is None or v in fields), defaults[key])
        return out

    def _refresh(self, ctx, keep_reference: bool = True, object_id: Optional[str] = None):
        state = ctx.panel.state
        dataset = ctx.dataset
        current, forced = self._pair_ids(ctx)
        fields = self._fields(ctx) if dataset is not None else {
            "ref_field": None, "pred_field": None, "gt_field": None, "pred_known": [], "roles": {}}
        same = state.dataset_id == _dataset_id(dataset)
        updates = {
            "dataset_id": _dataset_id(dataset),
            "current_id": current,
            **fields,
            "click": None,
            "selected_point": None,
            "message": None,
        }
        for key in (*FIELD_SELECTORS, *MASK_SELECTORS):
            updates[f"controls.{key}"] = fields[key] or NONE
        keep = keep_reference and same and current == state.current_id
        updates.update(self._objects_and_references(ctx, current, forced, fields, keep, object_id))
        if updates["reference_id"] != state.reference_id or not same:
            updates["instance"] = None
            updates["controls.instance"] = ALL_INSTANCES
        for key, default in CONTROL_DEFAULTS.items():
            if state.get(f"controls.{key}") is None:
                updates[f"controls.{key}"] = default
        _set(ctx, updates)

    def _objects_and_references(self, ctx, current, forced, fields: dict, keep: bool, object_id=None) -> dict:
        """The state of the current object and the reference: with object features
        (:func:`object_features`) and reference objects to match, the current sample's
        objects (``object_id``, else the chosen one kept, else the largest) and the
        reference objects ranked for it, the one its prediction came from shown first;
        else whole images and the ranked references. A forced reference (two samples
        selected in the grid) comes first. Without keypoints the references are the samples
        with masks in the reference masks field (else every other sample), by similarity."""
        state, dataset, ref_field = ctx.panel.state, ctx.dataset, fields["ref_field"]
        objects = object_features(dataset) if current else None
        choices = sample_objects(dataset, current, objects) if objects is not None else []
        ids = [o["id"] for o in choices]
        chosen = object_id if object_id in ids else state.object_id if keep and state.object_id in ids else \
            max(choices, key=lambda o: o["area"])["id"] if choices else None
        cands = masked_samples(dataset, fields.get("mask_field"), current) if not ref_field else None
        refs = rank_reference_objects(dataset, current, chosen, ref_field, objects, candidates=cands) if chosen else []
        if forced:
            refs = [r for r in refs if r["id"] == forced] + [r for r in refs if r["id"] != forced]
        if not refs or (forced and refs[0]["id"] != forced):  # nothing to match per object: whole images
            objects, choices, chosen = None, [], None
            refs = rank_references(dataset, current, ref_field, candidates=cands) if current else []
            if forced:
                sample = dataset[forced]
                refs = [{"id": forced, "label": os.path.basename(sample.filepath), "similarity": None,
                         "tagged": None}] + [r for r in refs if r["id"] != forced]
        keys = [reference_key(r) for r in refs]
        key = state.get("controls.reference") if keep else None
        if key not in keys and chosen and not forced:
            key = predicted_from(dataset, current, fields.get("pred_field"), chosen) or \
                mask_predicted_from(dataset, current, fields.get("pred_mask_field"), chosen)
        key = key if key in keys else keys[0] if keys else None
        ref = refs[keys.index(key)] if key is not None else {}
        return {"object_features": objects.to_dict() if objects is not None else None, "objects": choices,
                "object_id": chosen, "controls.object": chosen, "references": refs,
                "reference_id": ref.get("id"), "reference_object": ref.get("object"), "controls.reference": key}

    # ---- events that change nothing ------------------------------------------------
    def execute(self, ctx):
        """FiftyOne's panel event loop, minus the events that would change nothing.

        Measured in Chromium: the App sends each dropdown choice twice and echoes every
        control value this panel sets (choosing a reference field sent 3 events), and
        FiftyOne renders the whole figure (images as data URIs) after every event. Under
        load the redraws queued up (the panel's buttons kept being replaced for 30 s) and
        a late echo could undo a newer choice. Such an event is answered without a render.
        Events sent before the answer to an earlier one came back carry a stale state:
        they are handled on the state the server last answered with
        (:mod:`fiftyone_sdcorr.plugin.panel_state`), so the last choice wins.
        """
        duplicate = _seen_just_now(ctx.params)  # noted first: a repeated echo is a duplicate too
        pid = ctx.params.get("panel_id")
        if pid is None:
            return super().execute(ctx)
        with panel_lock(pid):  # one event of a panel at a time, on the newest state
            adopt_newest(ctx)
            if duplicate or _is_echo(ctx.params) or self._changes_nothing(ctx):
                return None
            _forget_echoes(ctx.params)  # the user took this control over
            result = super().execute(ctx)
            record(ctx)
            return result

    def _changes_nothing(self, ctx) -> bool:
        method = ctx.params.get("__method__") or ""
        if not method.startswith("on_change_"):
            return False
        key, value, state = method[len("on_change_"):], ctx.params.get("value"), ctx.panel.state
        if key in FIELD_SELECTORS or key in MASK_SELECTORS:
            return value not in (None, "") and (None if value == NONE else value) == state.get(key)
        if key == "reference":  # the App shows the choice in controls.reference before it sends it
            shown = state.reference_object or state.reference_id
            return value is not None and value == shown
        if key == "object":
            return value is not None and value == state.object_id
        if key == "instance":
            return _instance_value(value) == state.instance
        if key in CONTROL_DEFAULTS:
            return state.get(f"applied.{key}") is not None and _control_value(key, value) == state.get(f"applied.{key}")
        return False

    # ---- controls -------------------------------------------------------------------
    def on_change_reference(self, ctx):
        value = ctx.params.get("value")
        ref = next((r for r in ctx.panel.state.references or [] if reference_key(r) == value), None)
        if ref is None:
            return
        _set(ctx, {"reference_id": ref["id"], "reference_object": ref.get("object"), "controls.reference": value,
                   "click": None, "selected_point": None, "message": None, "instance": None,
                   "controls.instance": ALL_INSTANCES})

    def on_change_object(self, ctx):
        """Another object of the current sample: the reference objects are ranked for it
        and the most similar one is shown."""
        value = ctx.params.get("value")
        if value in [o["id"] for o in ctx.panel.state.objects or []]:
            self._refresh(ctx, keep_reference=False, object_id=value)

    def _change_field(self, ctx, key):
        value = ctx.params.get("value")
        value = None if value in (None, "", NONE) else value
        state = ctx.panel.state
        masks = key in MASK_SELECTORS
        optional = (MASK_SELECTORS if masks else FIELD_SELECTORS)[key][1]
        valid = mask_fields(ctx.dataset) if masks else keypoint_fields(ctx.dataset)
        if (value is None and not optional) or (value is not None and value not in valid):
            _set(ctx, {f"controls.{key}": state.get(key) or NONE})  # not a field of that kind: keep the choice
            return
        _set(ctx, {key: value, f"controls.{key}": value or NONE, "selected_point": None, "click": None})
        if masks:
            _set(ctx, {"mask_chosen": sorted(set(state.get("mask_chosen") or []) | {key})})
        self._remember(ctx, **{key: value}, pred_known=list(state.pred_known or []))
        if key == "ref_field" or (key == "mask_field" and not state.ref_field):
            self._refresh(ctx, keep_reference=True)

    def on_change_ref_field(self, ctx):
        self._change_field(ctx, "ref_field")

    def on_change_gt_field(self, ctx):
        self._change_field(ctx, "gt_field")

    def on_change_pred_field(self, ctx):
        self._change_field(ctx, "pred_field")

    def on_change_mask_field(self, ctx):
        self._change_field(ctx, "mask_field")

    def on_change_pred_mask_field(self, ctx):
        self._change_field(ctx, "pred_mask_field")

    def on_change_instance(self, ctx):
        instance = _instance_value(ctx.params.get("value"))
        _set(ctx, {"instance": instance,
                             "controls.instance": ALL_INSTANCES if instance is None else str(instance),
                             "selected_point": None})

    def _change_control(self, ctx, key):
        value = _control_value(key, ctx.params.get("value"))
        _set(ctx, {f"controls.{key}": value, f"applied.{key}": value})

    def on_change_view_mode(self, ctx):
        self._change_control(ctx, "view_mode")

    def on_change_show(self, ctx):
        self._change_control(ctx, "show")

    def on_change_error_lines(self, ctx):
        self._change_control(ctx, "error_lines")

    def on_change_heatmap(self, ctx):
        self._change_control(ctx, "heatmap")

    def on_change_n_parts(self, ctx):
        self._change_control(ctx, "n_parts")

    def on_clear(self, ctx):
        ctx.panel.state.set({"click": None, "selected_point": None, "message": None})

    # ---- clicks ---------------------------------------------------------------------
    def on_click_figure(self, ctx):
        """A click on the figure: an image pixel (click-to-match) or a keypoint marker
        (select it for review)."""
        trace = ctx.params.get("trace") or ""
        side, _, kind = trace.partition("|")
        state = ctx.panel.state
        pair = self._pair(ctx)
        if pair is None:
            return
        current, reference = pair
        if kind == "keypoints" and side == "current":
            pid = ctx.params.get("id")
            if pid is not None:
                inst, _, point = str(pid).partition(":")
                state.set({"selected_point": {"instance": int(inst), "point": int(point)}, "message": None})
            return
        if side not in SIDES:
            return
        frames = pair_frames(current, reference, figure_options(state))
        place = placements(frames["current"], frames["reference"])[side]
        idx = ctx.params.get("idx")
        if isinstance(idx, (list, tuple)) and len(idx) == 2:
            row, col = float(idx[0]), float(idx[1])
            x, y = vis.pixel_index_to_normalized(row, col, place.width, place.height)
        elif ctx.params.get("x") is not None and ctx.params.get("y") is not None:
            x = (float(ctx.params["x"]) - place.offset) / place.plot_width
            y = float(ctx.params["y"]) / PLOT_HEIGHT
        else:
            return
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            return
        state.set({"click": {"side": side, "x": x, "y": y}, "message": None})

    # ---- actions --------------------------------------------------------------------
    def propagate_params(self, ctx) -> Optional[dict]:
        """What "Propagate from this reference" pre-fills: the current view (or the
        selected samples) as targets, exactly the reference shown and the reference field
        selected here, a new output field, overwrite off."""
        state = ctx.panel.state
        if not state.reference_id or not state.ref_field or ctx.dataset is None:
            return None
        params = {
            "view_target": view_target(ctx),
            "references": "ids",
            "reference_ids": [state.reference_id],
            "source_field": state.ref_field,
            "output_field": free_field_name(ctx.dataset, OUTPUT_FIELD),
            "overwrite": False,
        }
        objects = state.object_features or {}
        if state.object_id and objects.get("patches_field"):
            params["patches_field"] = objects["patches_field"]
        return params

    def propagate_masks_params(self, ctx) -> Optional[dict]:
        """What "Propagate masks from this reference" pre-fills (no keypoints, a reference
        masks field): as :meth:`propagate_params`, with the reference masks as the source
        and a new masks field."""
        state = ctx.panel.state
        if not state.reference_id or not state.mask_field or ctx.dataset is None:
            return None
        params = {"view_target": view_target(ctx), "references": "ids", "reference_ids": [state.reference_id],
                  "source_field": state.mask_field, "output_field": free_field_name(ctx.dataset, MASKS_FIELD),
                  "overwrite": False}
        patches = (state.object_features or {}).get("patches_field")
        if state.object_id and patches and patches == state.mask_field:
            params["patches_field"] = patches
        return params

    def on_propagate_masks(self, ctx):
        params = self.propagate_masks_params(ctx)
        if params is None:
            ctx.panel.state.set({"message": "No reference with masks to propagate from."})
            return
        ctx.prompt(f"{PLUGIN}/propagate_masks", params=params)

    def on_propagate(self, ctx):
        params = self.propagate_params(ctx)
        if params is None:
            ctx.panel.state.set({"message": "No annotated reference to propagate from."})
            return
        ctx.prompt(f"{PLUGIN}/propagate_keypoints", params=params)

    def on_compute_features(self, ctx):
        ctx.prompt(f"{PLUGIN}/compute_fused_features")

    def on_swap(self, ctx):
        """The "Swap instances" button: prompts ``swap_instances`` with the reference object as the
        source and the current object as the target (new samples, another dataset)."""
        state = ctx.panel.state
        patches = (state.object_features or {}).get("patches_field")
        if not (state.object_id and state.reference_object and patches):
            state.set({"message": "Choose an object and a reference object to swap."})
            return
        ctx.prompt(f"{PLUGIN}/swap_instances", params={"view_target": "DATASET", "patches_field": patches,
                                                       "source_id": state.reference_object,
                                                       "target_id": state.object_id})

    def on_accept_point(self, ctx):
        self._review(ctx, "accepted", point=True)

    def on_reject_point(self, ctx):
        self._review(ctx, "rejected", point=True)

    def on_accept_instance(self, ctx):
        self._review(ctx, "accepted", point=False)

    def on_reject_instance(self, ctx):
        self._review(ctx, "rejected", point=False)

    def _review(self, ctx, verdict: str, point: bool):
        state = ctx.panel.state
        pair = self._pair(ctx)
        if pair is None or not state.pred_field:
            state.set({"message": "Nothing to review: no predicted keypoints field."})
            return
        current, reference = pair
        sel = state.selected_point or {}
        _, shown = shown_pairs(ctx.dataset, current, reference, figure_options(state))
        targets = [(j, pred) for j, _, pred, _ in shown
                   if pred is not None and (not sel or j == int(sel["instance"]))]
        if not targets:
            state.set({"message": "No predicted instance from this reference to review."})
            return
        if point and not sel:
            state.set({"message": "Click a predicted point first."})
            return
        for _, kp in targets:
            if point:
                k = int(sel["point"])
                reviews = list(kp.get_attribute_value(POINT_REVIEW_ATTR, None) or [None] * len(kp.points))
                reviews += [None] * (len(kp.points) - len(reviews))
                reviews[k] = verdict
                kp[POINT_REVIEW_ATTR] = reviews
            else:
                kp[REVIEW_ATTR] = verdict
                tags = [t for t in (kp.tags or []) if t not in REVIEW_TAGS.values()]
                kp.tags = tags + [REVIEW_TAGS[verdict]]
        current.save()
        if point:
            ref_kp = next((r for j, r, _, _ in shown if j == int(sel["instance"])), None)
            what = f"**{point_name(ctx.dataset, state.ref_field or state.gt_field, ref_kp, int(sel['point']))}**"
        else:
            what = f"{len(targets)} instance(s)"
        mark = VERDICT_MARKS[verdict][0] if point else ""
        state.set({"message": f"Marked {what} as **{verdict}** {mark}".rstrip() + "."})
        ctx.ops.reload_samples()

    # ---- data -----------------------------------------------------------------------
    def _pair(self, ctx):
        state = ctx.panel.state
        cid, rid = state.current_id, state.reference_id
        if not cid or not rid or ctx.dataset is None:
            return None
        try:
            return ctx.dataset[cid], ctx.dataset[rid]
        except KeyError:
            return None

    # ---- render ---------------------------------------------------------------------
    def render(self, ctx):
        panel = types.Object()
        state = ctx.panel.state
        layout = types.GridView(orientation="vertical", columns=1, gap=1, padding=1)
        pair = self._pair(ctx)
        if pair is None:
            if not state.current_id:
                panel.md(
                    "Open a sample, or select two samples in the grid, to compare it with an "
                    "annotated reference.",
                    name="hint",
                )
            else:
                self._controls(ctx, panel, None)
                panel.md(self._no_reference_hint(ctx), name="hint")
            return types.Property(panel, view=layout)

        current, reference = pair
        self._controls(ctx, panel, reference)
        try:
            figure = build_figure(ctx.dataset, current, reference, figure_options(state))
        except Exception as e:  # a broken file must not take the panel down
            panel.md(f"Could not draw this pair: `{e}`", name="error")
            return types.Property(panel, view=layout)
        self._actions(ctx, panel, figure)
        status = figure["status"] if not state.message else f"{state.message}  \n{figure['status']}"
        panel.md(status, name="status")
        panel.plot(
            "figure",
            data=figure["data"],
            layout=figure["layout"],
            config={"displaylogo": False, "scrollZoom": True, "displayModeBar": False,
                    "responsive": True},
            on_click=self.on_click_figure,
            height=FIGURE_CSS_HEIGHT,
            width="100%",
        )
        return types.Property(panel, view=layout)

    def _no_reference_hint(self, ctx) -> str:
        state = ctx.panel.state
        if state.ref_field:
            return (f"No annotated reference: no other sample has keypoints in `{state.ref_field}`. "
                    f"Pick another *Reference keypoints* field ({', '.join(keypoint_fields(ctx.dataset))}).")
        return "No reference: this dataset has no other sample to compare this one with."

    def _controls(self, ctx, panel, reference):
        """One bar of controls that wraps in a narrow split: the three field selectors,
        the object and the reference (tagged references first) or its instance, then the
        display options."""
        row = panel.grid("controls", gap=1, align_x="left", align_y="center")
        self._field_selectors(ctx, row)
        if reference is None:
            return
        self._pair_selectors(ctx, row, reference)
        self._display_controls(ctx, row)

    def _field_selectors(self, ctx, row):
        """The keypoints fields' selectors (when the dataset has keypoints), then the mask
        fields' (when it has masks)."""
        state = ctx.panel.state
        roles = state.roles or {}
        fields = roles.get("keypoints") or keypoint_fields(ctx.dataset)
        predicted = roles.get("predicted") or []
        self._mask_selectors(ctx, row)
        for key, (label, optional) in FIELD_SELECTORS.items() if fields else ():
            choices = types.DropdownView(label=label, componentsProps=ITEM)
            values = list(fields)
            if key == "pred_field":  # predictions first, newest first
                values = list(reversed(predicted)) + [f for f in fields if f not in predicted]
            for f in values:
                choices.add_choice(f, label=f + (" (predicted)" if f in predicted and key != "pred_field" else ""))
            if optional:
                choices.add_choice(NONE, label="(none)")
                values.append(NONE)
            if not values:
                continue
            row.enum(key, values, default=state.get(key) or NONE, view=choices,
                     on_change=getattr(self, f"on_change_{key}"))

    def _mask_selectors(self, ctx, row):
        state = ctx.panel.state
        fields = state.mask_fields or []
        for key, (label, _) in MASK_SELECTORS.items() if fields else ():
            choices = types.DropdownView(label=label, componentsProps=ITEM)
            for f in fields:
                choices.add_choice(f, label=f)
            choices.add_choice(NONE, label="(none)")
            row.enum(key, fields + [NONE], default=state.get(key) or NONE, view=choices,
                     on_change=getattr(self, f"on_change_{key}"))

    def _pair_selectors(self, ctx, row, reference):
        """The current object (with object features), the reference (object) and, for
        whole images with several reference instances, the instance."""
        state = ctx.panel.state
        objects = state.objects or []
        if state.object_id and objects:
            obj_choices = types.DropdownView(label="Object", componentsProps=ITEM)
            for o in objects:
                obj_choices.add_choice(o["id"], label=o["label"])
            row.enum("object", [o["id"] for o in objects], default=state.object_id, view=obj_choices,
                     on_change=self.on_change_object)
        refs = state.references or []
        ref_choices = types.DropdownView(label="Reference object" if state.object_id else "Reference",
                                         componentsProps=ITEM)
        for r in refs:
            ref_choices.add_choice(reference_key(r), label=r["label"])
        row.enum("reference", [reference_key(r) for r in refs], default=state.get("controls.reference"),
                 view=ref_choices, on_change=self.on_change_reference)
        instances = instances_of(reference, state.ref_field or state.gt_field)
        if len(instances) > 1 and not state.object_id:
            inst = types.DropdownView(label="Instance", componentsProps=ITEM)
            inst.add_choice(ALL_INSTANCES, label="All instances")
            for j, kp in enumerate(instances):
                inst.add_choice(str(j), label=f"{j}: {kp.label}" if kp.label else str(j))
            current = figure_options(state)["instance"]
            row.enum("instance", [ALL_INSTANCES] + [str(j) for j in range(len(instances))],
                     default=ALL_INSTANCES if current is None else str(current), view=inst,
                     on_change=self.on_change_instance)

    def _display_controls(self, ctx, row):
        opts = figure_options(ctx.panel.state)
        view_choices = types.DropdownView(label="View", componentsProps=ITEM)
        for k, v in VIEW_MODES.items():
            view_choices.add_choice(k, label=v)
        row.enum("view_mode", list(VIEW_MODES), default=opts["view_mode"],
                 view=view_choices, on_change=self.on_change_view_mode)
        keypoints = bool(ctx.panel.state.ref_field)  # without keypoints: no keypoint options
        show_choices = types.DropdownView(label="Keypoints", componentsProps=ITEM)
        for k, v in SHOW_MODES.items():
            show_choices.add_choice(k, label=v)
        if keypoints:
            row.enum("show", list(SHOW_MODES), default=opts["show"],
                     view=show_choices, on_change=self.on_change_show)
        if opts["view_mode"] == "parts":
            parts = types.DropdownView(label="Parts", componentsProps=ITEM)
            for k in PART_CHOICES:
                parts.add_choice(k, label=str(k))
            row.enum("n_parts", list(PART_CHOICES), default=opts["n_parts"],
                     view=parts, on_change=self.on_change_n_parts)
        if keypoints:
            row.bool("error_lines", default=opts["error_lines"], label="Error lines",
                     view=types.SwitchView(componentsProps=SMALL_ITEM), on_change=self.on_change_error_lines)
        row.bool("heatmap", default=opts["heatmap"], label="Heat map",
                 view=types.SwitchView(componentsProps=SMALL_ITEM), on_change=self.on_change_heatmap)

    def _actions(self, ctx, panel, figure):
        state = ctx.panel.state
        row = panel.grid("actions", gap=1, align_x="left", align_y="center")

        def btn(name, label, icon, on_click, variant="outlined"):
            row.btn(name, label=label, icon=icon, variant=variant, on_click=on_click,
                    componentsProps=SMALL_ITEM)

        if figure.get("missing_features"):
            btn("compute_features", "Compute features", "memory", self.on_compute_features, "contained")
        if state.ref_field:
            btn("propagate", "Propagate from this reference", "call_split", self.on_propagate)
        elif state.mask_field:
            btn("propagate_masks", "Propagate masks from this reference", "call_split", self.on_propagate_masks)
        if state.object_id and state.reference_object:
            btn("swap", "Swap instances", "swap_horiz", self.on_swap)
        if state.pred_field:
            if state.selected_point:
                btn("accept_point", "Accept point", "check", self.on_accept_point)
                btn("reject_point", "Reject point", "close", self.on_reject_point)
            btn("accept_instance", "Accept instance", "done_all", self.on_accept_instance)
            btn("reject_instance", "Reject instance", "block", self.on_reject_instance)
        if state.click or state.selected_point:
            btn("clear", "Clear", "clear", self.on_clear, variant=None)


PANELS = [MatchPanel]

__all__ = ["MatchPanel", "PANELS", "MAX_SIDE", "DENSE_RESOLUTION"]

