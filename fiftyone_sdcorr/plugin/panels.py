"""The match panel: a sample and an annotated reference side by side, with their keypoint
correspondences, click-to-match, feature views and review actions.

Surfaces: the sample modal (the current sample against a reference) and the grid (two
selected samples). Everything is one plotly figure in one coordinate system:

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
- actions: propagate from this reference (prompts ``propagate_keypoints``), accept /
  reject a predicted point or instance (label attribute ``sdcorr_verdict``, per-point list
  ``sdcorr_point_verdicts`` and label tags ``sdcorr:accepted`` / ``sdcorr:rejected``, all
  filterable in the App), compute missing features (prompts ``compute_fused_features``).

Trace names are ``"<side>|<kind>"`` (side ``current``/``reference``; kinds ``photo``,
``pca``, ``parts``, ``heatmap``, ``keypoints``, ``gt``, ``skeleton``, ``click``,
``match``); line traces are ``"line|<label>"`` and ``"error|<label>"``.
"""


from __future__ import annotations

import os
from typing import Optional, Tuple

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.core import visualize as vis

from fiftyone_sdcorr.plugin.panel_figure import (  # noqa: F401 -- MAX_SIDE etc. are part of the panel's API
    CONTROL_DEFAULTS,
    FIGURE_HEIGHT,
    MAX_SIDE,
    PLOT_HEIGHT,
    PLUGIN,
    POINT_REVIEW_ATTR,
    REVIEW_ATTR,
    REVIEW_TAGS,
    SHOW_MODES,
    SIDES,
    VIEW_MODES,
    build_figure,
    default_fields,
    figure_options,
    instances_of,
    keypoint_fields,
    placements,
    predicted_for,
    rank_references,
)


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
                "corresponding keypoints (opacity = confidence). Click any pixel to see its "
                "best match and the similarity heat map in the other image; click a "
                "predicted point to select it for review."
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

    def _refresh(self, ctx, keep_reference: bool = True):
        state = ctx.panel.state
        dataset = ctx.dataset
        current, forced = self._pair_ids(ctx)
        gt_field, pred_field = state.gt_field, state.pred_field
        fields = keypoint_fields(dataset) if dataset is not None else []
        if gt_field not in fields or pred_field not in fields + [None]:
            gt_field, pred_field = default_fields(dataset) if dataset is not None else (None, None)
        updates = {
            "current_id": current,
            "gt_field": gt_field,
            "pred_field": pred_field,
            "click": None,
            "selected_point": None,
            "message": None,
        }
        refs = rank_references(dataset, current, gt_field) if current else []
        if forced:
            sample = dataset[forced]
            refs = [{"id": forced, "label": os.path.basename(sample.filepath), "similarity": None}] + [
                r for r in refs if r["id"] != forced
            ]
        reference = state.reference_id if keep_reference else None
        ids = [r["id"] for r in refs]
        if forced:
            reference = forced
        elif reference not in ids:
            reference = ids[0] if ids else None
        updates["references"] = refs
        updates["reference_id"] = reference
        updates["controls.reference"] = reference
        for key, default in CONTROL_DEFAULTS.items():
            if state.get(f"controls.{key}") is None:
                updates[f"controls.{key}"] = default
        state.set(updates)

    # ---- controls -------------------------------------------------------------------
    def on_change_reference(self, ctx):
        value = ctx.params.get("value")
        ctx.panel.state.set({"reference_id": value, "controls.reference": value, "click": None,
                             "selected_point": None, "message": None})

    def on_change_gt_field(self, ctx):
        ctx.panel.state.set({"gt_field": ctx.params.get("value")})
        self._refresh(ctx, keep_reference=True)

    def on_change_pred_field(self, ctx):
        ctx.panel.state.set({"pred_field": ctx.params.get("value"), "selected_point": None})

    def on_change_view_mode(self, ctx):
        ctx.panel.state.set({"controls.view_mode": ctx.params.get("value") or "photos"})

    def on_change_show(self, ctx):
        ctx.panel.state.set({"controls.show": ctx.params.get("value") or "predicted"})

    def on_change_error_lines(self, ctx):
        ctx.panel.state.set({"controls.error_lines": bool(ctx.params.get("value"))})

    def on_change_heatmap(self, ctx):
        ctx.panel.state.set({"controls.heatmap": bool(ctx.params.get("value"))})

    def on_change_n_parts(self, ctx):
        try:
            k = int(ctx.params.get("value"))
        except (TypeError, ValueError):
            k = CONTROL_DEFAULTS["n_parts"]
        ctx.panel.state.set({"controls.n_parts": max(2, min(k, 20))})

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
        place = placements(current.filepath, reference.filepath)[side]
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
    def on_propagate(self, ctx):
        state = ctx.panel.state
        if not state.reference_id or not state.gt_field:
            state.set({"message": "No annotated reference to propagate from."})
            return
        params = {
            "references": "ids",
            "reference_ids": [state.reference_id],
            "source_field": state.gt_field,
        }
        if state.pred_field:
            params["output_field"] = state.pred_field
            params["overwrite"] = True
        ctx.prompt(f"{PLUGIN}/propagate_keypoints", params=params)

    def on_compute_features(self, ctx):
        ctx.prompt(f"{PLUGIN}/compute_fused_features")

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
        gt_insts = instances_of(reference, state.gt_field)
        pred_insts = instances_of(current, state.pred_field)
        if sel:
            indices = [int(sel["instance"])]
        else:
            indices = list(range(len(gt_insts)))
        targets = [(i, predicted_for(pred_insts, reference.id, i)) for i in indices]
        targets = [(i, kp) for i, kp in targets if kp is not None]
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
        what = f"point {sel['point']}" if point else f"{len(targets)} instance(s)"
        state.set({"message": f"Marked {what} as **{verdict}**."})
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
        pair = self._pair(ctx)
        if pair is None:
            if not state.current_id:
                panel.md(
                    "Open a sample, or select two samples in the grid, to compare it with an "
                    "annotated reference.",
                    name="hint",
                )
            else:
                panel.md(
                    "No annotated reference: this dataset has no sample with keypoints in a "
                    f"ground-truth field ({', '.join(keypoint_fields(ctx.dataset)) or 'none'}).",
                    name="hint",
                )
            return types.Property(panel, view=types.GridView(orientation="vertical", padding=1))

        current, reference = pair
        self._controls(ctx, panel)
        try:
            figure = build_figure(ctx.dataset, current, reference, figure_options(state))
        except Exception as e:  # a broken file must not take the panel down
            panel.md(f"Could not draw this pair: `{e}`", name="error")
            return types.Property(panel, view=types.GridView(orientation="vertical", padding=1))
        self._actions(ctx, panel, figure)
        panel.md(figure["status"], name="status")
        panel.plot(
            "figure",
            data=figure["data"],
            layout=figure["layout"],
            config={"displaylogo": False, "scrollZoom": True, "displayModeBar": False,
                    "responsive": True},
            on_click=self.on_click_figure,
            height=f"{FIGURE_HEIGHT}px",
            width="100%",
        )
        return types.Property(panel, view=types.GridView(orientation="vertical", columns=1, gap=1, padding=1))

    def _controls(self, ctx, panel):
        state = ctx.panel.state
        row = panel.h_stack("controls", align_x="left", align_y="center", gap=2)
        refs = state.references or []
        ref_choices = types.DropdownView(label="Reference", space=4)
        for r in refs:
            ref_choices.add_choice(r["id"], label=r["label"])
        row.enum("reference", [r["id"] for r in refs], default=state.reference_id,
                 view=ref_choices, on_change=self.on_change_reference)
        view_choices = types.DropdownView(label="View", space=2)
        for k, v in VIEW_MODES.items():
            view_choices.add_choice(k, label=v)
        opts = figure_options(state)
        row.enum("view_mode", list(VIEW_MODES), default=opts["view_mode"],
                 view=view_choices, on_change=self.on_change_view_mode)
        show_choices = types.DropdownView(label="Keypoints", space=2)
        for k, v in SHOW_MODES.items():
            show_choices.add_choice(k, label=v)
        row.enum("show", list(SHOW_MODES), default=opts["show"],
                 view=show_choices, on_change=self.on_change_show)
        parts = types.DropdownView(label="Parts", space=1)
        for k in (2, 3, 4, 5, 6, 8, 10, 12, 16):
            parts.add_choice(k, label=str(k))
        if opts["view_mode"] == "parts":
            row.enum("n_parts", [2, 3, 4, 5, 6, 8, 10, 12, 16], default=opts["n_parts"],
                     view=parts, on_change=self.on_change_n_parts)
        row.bool("error_lines", default=opts["error_lines"], label="Error lines",
                 view=types.SwitchView(space=1), on_change=self.on_change_error_lines)
        row.bool("heatmap", default=opts["heatmap"], label="Heat map",
                 view=types.SwitchView(space=1), on_change=self.on_change_heatmap)

    def _actions(self, ctx, panel, figure):
        state = ctx.panel.state
        row = panel.h_stack("actions", align_x="left", align_y="center", gap=1)
        if figure.get("missing_features"):
            row.btn("compute_features", label="Compute features", icon="memory",
                    variant="contained", on_click=self.on_compute_features)
        row.btn("propagate", label="Propagate from this reference", icon="call_split",
                variant="outlined", on_click=self.on_propagate)
        if state.pred_field:
            if state.selected_point:
                row.btn("accept_point", label="Accept point", icon="check",
                        variant="outlined", on_click=self.on_accept_point)
                row.btn("reject_point", label="Reject point", icon="close",
                        variant="outlined", on_click=self.on_reject_point)
            row.btn("accept_instance", label="Accept instance", icon="done_all",
                    variant="outlined", on_click=self.on_accept_instance)
            row.btn("reject_instance", label="Reject instance", icon="block",
                    variant="outlined", on_click=self.on_reject_instance)
        if state.click or state.selected_point:
            row.btn("clear", label="Clear", icon="clear", on_click=self.on_clear)


PANELS = [MatchPanel]

__all__ = ["MatchPanel", "PANELS", "MAX_SIDE"]

