"""The match panel's figure and the data behind it (no panel class here): reference
ranking, keypoint pairing, image placement, plotly traces, feature views.

See :mod:`fiftyone_sdcorr.plugin.panels` for what the panel shows.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import fiftyone as fo
from bson import ObjectId

from fiftyone_sdcorr.core import visualize as vis
from fiftyone_sdcorr.dataset.config import EMBEDDING_FIELD, FEATURES_FIELD, KEYPOINTS_FIELD
from fiftyone_sdcorr.dataset.skeletons import keypoint_skeleton

PLUGIN = "@sdcorr/sdcorr"
REFERENCE_ATTR = "sdcorr_reference_id"
INSTANCE_ATTR = "sdcorr_instance"
REVIEW_ATTR = "sdcorr_verdict"
POINT_REVIEW_ATTR = "sdcorr_point_verdicts"
REVIEW_TAGS = {"accepted": "sdcorr:accepted", "rejected": "sdcorr:rejected"}

MAX_SIDE = 512  # longest side of the images sent to the browser
PLOT_HEIGHT = 400.0  # common height of both images, in plot units
GAP = 24.0  # plot units between the two images
FIGURE_HEIGHT = 420  # pixels
SIDES = ("current", "reference")
VIEW_MODES = {"photos": "Photos", "pca": "PCA of features", "parts": "Part clusters"}
SHOW_MODES = {"predicted": "Predicted", "ground_truth": "Ground truth", "both": "Both"}
CONTROL_DEFAULTS = {"view_mode": "photos", "show": "predicted", "error_lines": True,
                    "heatmap": True, "n_parts": 6}
NEUTRAL = "#9e9e9e"
CLICK_COLOR = "#ffffff"
MATCH_COLOR = "#00e5ff"
ERROR_COLOR = "#e15759"


# --------------------------------------------------------------------------- caches
class _LRU:
    """A small thread-safe LRU cache (the App server is a long-lived process)."""

    def __init__(self, size: int = 48):
        self.size = size
        self._d: "OrderedDict[Any, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value


_CACHE = _LRU()


def _mtime(path: Optional[str]) -> float:
    try:
        return os.path.getmtime(path) if path else 0.0
    except OSError:
        return 0.0


def _display_image(filepath: str):
    """The downsampled RGB image of a file (cached by path and mtime)."""
    from fiftyone_sdcorr.core.images import load_image

    return _CACHE.get(
        ("img", filepath, _mtime(filepath)),
        lambda: vis.downsample(load_image(filepath), MAX_SIDE),
    )


def _photo_uri(filepath: str) -> str:
    return _CACHE.get(
        ("uri", filepath, _mtime(filepath)), lambda: vis.to_data_uri(_display_image(filepath))
    )


def _features(path: Optional[str]):
    """Stored fused features (cached), or None when there are none."""
    if not path or not os.path.isfile(path):
        return None
    from fiftyone_sdcorr.core.store import FeatureStore

    return _CACHE.get(("feat", path, _mtime(path)), lambda: FeatureStore().load(path))


# --------------------------------------------------------------------------- dataset helpers
REFERENCE_TAG = "reference"  # a sample tag containing this word marks a reference
OUTPUT_FIELD = KEYPOINTS_FIELD  # the first name offered for new predictions


def keypoint_fields(dataset) -> List[str]:
    """The ``fo.Keypoints`` fields of ``dataset``, in schema order."""
    if dataset is None:
        return []
    return list(dataset.get_field_schema(embedded_doc_type=fo.Keypoints))


def reference_tags(dataset) -> List[str]:
    """The sample tags that mark references: ``reference`` and any tag containing it
    (``reference_cat``, ``sdcorr:reference``; case-insensitive)."""
    return [t for t in dataset.distinct("tags") if REFERENCE_TAG in str(t).lower()]


def _is_predicted_field(dataset, name: str) -> bool:
    try:
        if dataset.count(f"{name}.keypoints.{REFERENCE_ATTR}") > 0:
            return True
    except Exception:
        pass
    return False


def predicted_fields(dataset, fields: Optional[List[str]] = None) -> List[str]:
    """Keypoints fields written by propagation (their instances carry
    ``sdcorr_reference_id``), oldest first: by the field's ``created_at`` where FiftyOne
    records it, else in schema order (newest last either way)."""
    fields = keypoint_fields(dataset) if fields is None else fields
    pred = [f for f in fields if _is_predicted_field(dataset, f)]

    def created(i_name):
        i, name = i_name
        try:
            at = getattr(dataset.get_field(name), "created_at", None)
        except Exception:
            at = None
        return (at is not None, at.timestamp() if at is not None else 0.0, i)

    return [name for _, name in sorted(enumerate(pred), key=created)]


def field_roles(dataset) -> Dict[str, List[str]]:
    """``{"keypoints": every Keypoints field (schema order), "predicted": the predicted
    ones (oldest first), "annotations": the others}``."""
    fields = keypoint_fields(dataset)
    pred = predicted_fields(dataset, fields) if dataset is not None else []
    return {"keypoints": fields, "predicted": pred, "annotations": [f for f in fields if f not in pred]}


def default_fields(dataset, roles: Optional[Dict[str, List[str]]] = None) -> Dict[str, Optional[str]]:
    """The fields the panel shows by default, ``{"ref_field", "pred_field", "gt_field"}``:

    - reference keypoints: the annotation field holding the most keypoints of tagged
      references (:func:`reference_tags`); without tagged references, the annotation
      field with the most keypoints;
    - predicted: the newest predicted field (:func:`predicted_fields`);
    - ground truth: the annotation field with the most keypoints on samples that are not
      tagged references; else the reference field (one field holds both).
    """
    roles = roles or field_roles(dataset)
    annotations = roles["annotations"]
    out = {"ref_field": None, "pred_field": roles["predicted"][-1] if roles["predicted"] else None,
           "gt_field": None}
    if not annotations:
        return out

    def most(view, fields):
        counts = [(view.count(f"{f}.keypoints"), -i, f) for i, f in enumerate(fields)]
        best = max(counts)
        return best[2] if best[0] > 0 else None

    tags = reference_tags(dataset)
    tagged = dataset.match_tags(tags) if tags else None
    ref = most(tagged, annotations) if tagged is not None else None
    out["ref_field"] = ref or most(dataset, annotations) or annotations[0]
    others = dataset.match_tags(tags, bool=False) if tags else dataset
    out["gt_field"] = most(others, annotations) or out["ref_field"]
    return out


def free_field_name(dataset, base: str = OUTPUT_FIELD) -> str:
    """``base``, ``base_2``, ``base_3``, ...: the first name that is not a field of
    ``dataset`` yet (nor is its ``<name>_error`` companion)."""
    def taken(name):
        return dataset.has_field(name) or dataset.has_field(f"{name}_error")

    name, i = base, 1
    while taken(name):
        i += 1
        name = f"{base}_{i}"
    return name


def skeleton_of(dataset, field: Optional[str], label: Optional[str] = None):
    """The skeleton of ``field`` (:func:`keypoint_skeleton`: the field's, the default,
    or COCO's categories in ``dataset.info``); that of ``label``'s category when there
    is one, else the dataset's only one."""
    sk = keypoint_skeleton(dataset, field, label) if label is not None else None
    return sk if sk is not None else keypoint_skeleton(dataset, field)


def point_labels(dataset, field: Optional[str], n: int, label: Optional[str] = None) -> List[str]:
    sk = skeleton_of(dataset, field, label)
    labels = list(getattr(sk, "labels", None) or [])
    return [labels[i] if i < len(labels) else f"point {i}" for i in range(n)]


def _cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or not a.size:
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def rank_references(dataset, current_id: str, ref_field: Optional[str], limit: int = 200) -> List[dict]:
    """Annotated references (samples with keypoints in ``ref_field``): tagged references
    (:func:`reference_tags`) first, then the others; within each, most similar first by
    the cosine of the global embeddings (``sdcorr_embedding``), without embeddings in
    dataset order. Returns ``[{"id", "label", "similarity", "tagged"}]`` (the current
    sample is left out)."""
    if not ref_field or not dataset.has_sample_field(ref_field):
        return []
    refs = dataset.exists(f"{ref_field}.keypoints").match({"_id": {"$ne": ObjectId(current_id)}})
    ids, paths, tags = refs.values("id"), refs.values("filepath"), refs.values("tags")
    ref_tags = set(reference_tags(dataset))
    tagged = [bool(ref_tags.intersection(t or [])) for t in tags]
    sims = [float("nan")] * len(ids)
    if dataset.has_sample_field(EMBEDDING_FIELD) and ids:
        cur = dataset.select(current_id).values(EMBEDDING_FIELD)
        if cur and cur[0] is not None:
            embs = refs.values(EMBEDDING_FIELD)
            sims = [_cosine(cur[0], e) if e is not None else float("nan") for e in embs]
    order = sorted(range(len(ids)), key=lambda i: (not tagged[i], math.isnan(sims[i]),
                                                   -np.nan_to_num(sims[i], nan=-9)))
    out = []
    for i in order[:limit]:
        label = os.path.basename(paths[i]) + (" · reference" if tagged[i] else "")
        if not math.isnan(sims[i]):
            label += f" · {sims[i]:.2f}"
        out.append({"id": ids[i], "label": label, "similarity": None if math.isnan(sims[i]) else sims[i],
                    "tagged": tagged[i]})
    return out


def instances_of(sample, field: Optional[str]) -> list:
    if not field or not sample.has_field(field):
        return []
    kps = sample[field]
    return list(kps.keypoints) if kps is not None else []


def predicted_for(pred_instances: list, reference_id: str, index: int):
    """The predicted instance that came from instance ``index`` of ``reference_id``
    (attributes ``sdcorr_reference_id`` / ``sdcorr_instance``); else the ``index``-th one
    from that reference; else, when no instance names its reference, the ``index``-th
    predicted instance; else None."""
    def attr(kp, name):
        return kp.get_attribute_value(name, None)

    from_ref = [kp for kp in pred_instances if attr(kp, REFERENCE_ATTR) == reference_id]
    for kp in from_ref:
        inst = attr(kp, INSTANCE_ATTR)
        if inst is not None and int(inst) == index:
            return kp
    if index < len(from_ref):
        return from_ref[index]
    if not any(attr(kp, REFERENCE_ATTR) for kp in pred_instances) and index < len(pred_instances):
        return pred_instances[index]
    return None


def _finite_point(p) -> bool:
    return p is not None and len(p) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)


# --------------------------------------------------------------------------- layout geometry
class Placement:
    """Where one image sits in the figure: display size (data pixels), scale and offset."""

    def __init__(self, width: int, height: int, offset: float):
        self.width, self.height = int(width), int(height)
        self.scale = PLOT_HEIGHT / self.height
        self.offset = float(offset)

    @property
    def plot_width(self) -> float:
        return self.width * self.scale

    def to_plot(self, x: float, y: float) -> Tuple[float, float]:
        """Normalised ``(x, y)`` -> plot coordinates."""
        return self.offset + x * self.plot_width, y * PLOT_HEIGHT

    def image_trace(self, name: str, source: str, opacity: float = 1.0) -> dict:
        return {
            "type": "image",
            "name": name,
            "source": source,
            "x0": self.offset + self.scale / 2.0,
            "y0": self.scale / 2.0,
            "dx": self.scale,
            "dy": self.scale,
            "opacity": opacity,
            "hoverinfo": "none",
        }


def placements(current_path: str, reference_path: str) -> Dict[str, Placement]:
    a = _display_image(current_path)
    b = _display_image(reference_path)
    pa = Placement(a.width, a.height, 0.0)
    pb = Placement(b.width, b.height, pa.plot_width + GAP)
    return {"current": pa, "reference": pb}


# --------------------------------------------------------------------------- the figure

def figure_options(state) -> dict:
    """Panel state -> the flat options :func:`build_figure` takes."""
    opts = {k: state.get(f"controls.{k}") for k in CONTROL_DEFAULTS}
    for k, v in CONTROL_DEFAULTS.items():
        if opts[k] is None:
            opts[k] = v
    opts["error_lines"], opts["heatmap"] = bool(opts["error_lines"]), bool(opts["heatmap"])
    opts["n_parts"] = int(opts["n_parts"])
    for k in ("ref_field", "gt_field", "pred_field", "click", "selected_point"):
        opts[k] = state.get(k)
    opts["ref_field"] = opts["ref_field"] or opts["gt_field"]
    instance = state.get("instance")
    opts["instance"] = int(instance) if isinstance(instance, (int, float)) and instance >= 0 else None
    return opts


def _pair_features(current, reference):
    fa = _features(current[FEATURES_FIELD]) if current.has_field(FEATURES_FIELD) else None
    fb = _features(reference[FEATURES_FIELD]) if reference.has_field(FEATURES_FIELD) else None
    return fa, fb


def _feature_view_uris(mode: str, k: int, fa, fb, places) -> Dict[str, str]:
    """Data URIs of the pair's PCA colours or part clusters over each displayed image."""
    feats = {"current": fa, "reference": fb}
    if mode == "pca":
        grids = dict(zip(SIDES, vis.pca_rgb(fa, fb)))
    else:
        parts = vis.kmeans_parts(fa, fb, k=k, seed=0)
        grids = {"current": parts.labels_a, "reference": parts.labels_b}
    out = {}
    for side in SIDES:
        pl = places[side]
        if mode == "pca":
            img = vis.token_map_to_image(grids[side].astype(np.float32), feats[side], pl.width, pl.height)
            out[side] = vis.to_data_uri(img.round().clip(0, 255).astype(np.uint8))
        else:
            up = vis.token_map_to_image(grids[side].astype(np.float32), feats[side], pl.width, pl.height,
                                        mode="nearest")
            out[side] = vis.to_data_uri(vis.labels_to_rgb(up.round().astype(int)))
    return out


def _scatter(name, xs, ys, color, size=9, symbol="circle", text=None, ids=None, line_color="#ffffff",
             hover=True, opacity=1.0):
    t = {
        "type": "scatter",
        "mode": "markers",
        "name": name,
        "x": xs,
        "y": ys,
        "marker": {"color": color, "size": size, "symbol": symbol, "opacity": opacity,
                   "line": {"color": line_color, "width": 1.5}},
        "showlegend": False,
    }
    if text is not None:
        t["text"] = text
        t["hovertemplate"] = "%{text}<extra></extra>"
    if ids is not None:
        t["ids"] = ids
    if not hover:
        t["hoverinfo"] = "skip"
    return t


def _line(name, p, q, color, width=2.0, dash="solid"):
    return {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": [p[0], q[0]],
        "y": [p[1], q[1]],
        "line": {"color": color, "width": width, "dash": dash},
        "hoverinfo": "skip",
        "showlegend": False,
    }


def build_figure(dataset, current, reference, state: dict) -> dict:
    """The plotly figure of a pair: ``{"data": traces, "layout": layout, "status": md,
    "match": PointMatch or None, "placements": {...}, "missing_features": bool}``."""
    places = placements(current.filepath, reference.filepath)
    samples = {"current": current, "reference": reference}
    gt_field, pred_field = state.get("gt_field"), state.get("pred_field")
    ref_field = state.get("ref_field") or gt_field
    instance = state.get("instance")
    show = state.get("show") or "predicted"
    mode = state.get("view_mode") or "photos"
    data: List[dict] = []
    status: List[str] = []
    fa, fb = _pair_features(current, reference)
    feats = {"current": fa, "reference": fb}
    missing = fa is None or fb is None

    # images (and feature views)
    for side in SIDES:
        data.append(places[side].image_trace(f"{side}|photo", _photo_uri(samples[side].filepath)))
    if mode in ("pca", "parts") and missing:
        status.append("Feature views need stored features (`sdcorr_features`) for both samples.")
    elif mode in ("pca", "parts"):
        k = int(state.get("n_parts") or 6)
        pair_key = (current[FEATURES_FIELD], _mtime(current[FEATURES_FIELD]),
                    reference[FEATURES_FIELD], _mtime(reference[FEATURES_FIELD]))
        uris = _CACHE.get((mode, k if mode == "parts" else None) + pair_key,
                          lambda: _feature_view_uris(mode, k, fa, fb, places))
        for side in SIDES:
            data.append(places[side].image_trace(f"{side}|{mode}", uris[side],
                                                 opacity=0.9 if mode == "pca" else 0.6))

    # keypoints
    ref_insts = instances_of(reference, ref_field)
    shown = [j for j in range(len(ref_insts)) if instance is None or j == instance]
    cur_gt = instances_of(current, gt_field)
    cur_pred = instances_of(current, pred_field) if pred_field else []
    n_points = max([len(ref_insts[j].points) for j in shown] + [0])
    ref_label = next((getattr(ref_insts[j], "label", None) for j in shown), None)
    labels = point_labels(dataset, ref_field, n_points, ref_label)
    colors = [vis.palette_color(i) for i in range(n_points)]
    sk = skeleton_of(dataset, ref_field, ref_label)
    edges = [list(e) for e in (getattr(sk, "edges", None) or [])]
    selected = state.get("selected_point") or {}

    def skeleton_trace(side, points, name):
        xs, ys = [], []
        pl = places[side]
        for edge in edges:
            pts = [points[i] for i in edge if i < len(points) and _finite_point(points[i])]
            if len(pts) < 2:
                continue
            for p in pts:
                x, y = pl.to_plot(*p)
                xs.append(x)
                ys.append(y)
            xs.append(None)
            ys.append(None)
        if not xs:
            return None
        return {"type": "scatter", "mode": "lines", "name": name, "x": xs, "y": ys,
                "line": {"color": "rgba(235,235,235,0.75)", "width": 1.5}, "hoverinfo": "skip",
                "showlegend": False}

    lines, markers, n_lines = [], [], 0
    for j in shown:
        ref_kp = ref_insts[j]
        ref_pts = list(ref_kp.points)
        pred_kp = predicted_for(cur_pred, reference.id, j) if cur_pred else None
        gt_kp = cur_gt[j] if j < len(cur_gt) else None
        tr = skeleton_trace("reference", ref_pts, "reference|skeleton")
        if tr:
            lines.append(tr)
        # reference points (the annotation)
        xs, ys, cs, txt = [], [], [], []
        for i, p in enumerate(ref_pts):
            if _finite_point(p):
                x, y = places["reference"].to_plot(*p)
                xs.append(x), ys.append(y), cs.append(colors[i]), txt.append(f"{labels[i]} (reference)")
        markers.append(_scatter("reference|gt", xs, ys, cs, text=txt))

        targets = []
        if show in ("predicted", "both") and pred_kp is not None:
            targets.append(("predicted", pred_kp))
        if show in ("ground_truth", "both") and gt_kp is not None:
            targets.append(("ground_truth", gt_kp))
        for kind, kp in targets:
            pts = list(kp.points)
            conf = list(kp.confidence or []) if kind == "predicted" else []
            tr = skeleton_trace("current", pts, "current|skeleton")
            if tr:
                lines.append(tr)
            xs, ys, cs, txt, ids, sizes = [], [], [], [], [], []
            for i, p in enumerate(pts[: n_points]):
                if not _finite_point(p):
                    continue
                c = conf[i] if i < len(conf) and conf[i] is not None and math.isfinite(conf[i]) else None
                alpha = 0.9 if c is None else 0.2 + 0.8 * max(0.0, min(1.0, c))
                cx, cy = places["current"].to_plot(*p)
                xs.append(cx), ys.append(cy)
                cs.append(vis.rgba(colors[i], max(alpha, 0.55)))
                ids.append(f"{j}:{i}")
                sel = kind == "predicted" and selected.get("instance") == j and selected.get("point") == i
                sizes.append(15 if sel else 10)
                txt.append(f"{labels[i]} ({'predicted' if kind == 'predicted' else 'ground truth'}"
                           + (f", confidence {c:.2f}" if c is not None else "") + ")")
                if i < len(ref_pts) and _finite_point(ref_pts[i]):
                    rp = places["reference"].to_plot(*ref_pts[i])
                    dash = "solid" if kind == "predicted" else "dot"
                    lines.append(_line(f"line|{labels[i]}", (cx, cy), rp, vis.rgba(colors[i], alpha), 2.0, dash))
                    n_lines += 1
            name = "current|keypoints" if kind == "predicted" else "current|gt"
            t = _scatter(name, xs, ys, cs, size=sizes, text=txt, ids=ids,
                         symbol="circle" if kind == "predicted" else "diamond")
            markers.append(t)
        # error lines: predicted -> ground truth on the current image
        if state.get("error_lines") and pred_kp is not None and gt_kp is not None:
            for i, (p, g) in enumerate(zip(pred_kp.points, gt_kp.points)):
                if i < n_points and _finite_point(p) and _finite_point(g):
                    lines.append(_line(f"error|{labels[i]}", places["current"].to_plot(*p),
                                       places["current"].to_plot(*g), ERROR_COLOR, 1.5, "dash"))

    if not ref_insts:
        status.append(f"The reference has no keypoints in `{ref_field}`.")
    elif not shown:
        status.append(f"The reference has no instance {instance} in `{ref_field}`.")
    elif pred_field and show != "ground_truth" and not any(
        predicted_for(cur_pred, reference.id, j) for j in shown
    ):
        status.append(f"No predictions from this reference in `{pred_field}` yet: use *Propagate*.")

    # click-to-match
    match = None
    click = state.get("click")
    click_traces = []
    if click:
        side = click["side"]
        other = "reference" if side == "current" else "current"
        if missing:
            status.append("Click-to-match needs stored features (`sdcorr_features`) for both samples.")
        else:
            match = vis.match_point(feats[side], feats[other], (click["x"], click["y"]))
            if state.get("heatmap", True):
                pl = places[other]
                heat = vis.heatmap_image(match.heatmap, feats[other], pl.width, pl.height)
                data.append(pl.image_trace(f"{other}|heatmap", vis.to_data_uri(heat, fmt="png")))
            sx, sy = places[side].to_plot(*match.source_xy)
            tx, ty = places[other].to_plot(*match.target_xy)
            click_traces.append(_line("click|line", (sx, sy), (tx, ty), "rgba(255,255,255,0.9)", 2.0, "dash"))
            click_traces.append(_scatter(f"{side}|click", [sx], [sy], CLICK_COLOR, size=13, symbol="circle-open",
                                         line_color=CLICK_COLOR, hover=False))
            click_traces[-1]["marker"]["line"]["width"] = 3
            click_traces.append(_scatter(f"{other}|match", [tx], [ty], MATCH_COLOR, size=16, symbol="star",
                                         line_color="#000000", hover=False,
                                         text=[f"match, cosine {match.similarity:.3f}"]))
            status.append(
                f"**Match**: ({match.source_xy[0]:.3f}, {match.source_xy[1]:.3f}) in the {side} sample → "
                f"({match.target_xy[0]:.3f}, {match.target_xy[1]:.3f}) in the {other}, cosine "
                f"{match.similarity:.3f}."
            )
    if missing:
        status.append("Stored features are missing for this pair: *Compute features* (or run "
                      "`compute_fused_features`) to enable click-to-match and feature views.")
    if selected:
        i = int(selected.get("point", 0))
        status.append(f"Selected: **{labels[i] if i < len(labels) else i}** of instance {selected.get('instance')}.")
    if not status:
        status.append("Click a pixel in either image to see its best match in the other.")

    data += lines + markers + click_traces
    total_w = places["reference"].offset + places["reference"].plot_width
    pad = 6.0
    title_c = os.path.basename(current.filepath)
    title_r = os.path.basename(reference.filepath)
    layout = {
        "height": FIGURE_HEIGHT,
        "margin": {"l": 4, "r": 4, "t": 30, "b": 4, "pad": 0},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "font": {"color": NEUTRAL, "size": 12},
        "showlegend": False,
        "hovermode": "closest",
        "dragmode": "pan",
        "uirevision": f"{current.id}|{reference.id}",
        "xaxis": {"visible": False, "showgrid": False, "zeroline": False,
                  "range": [-pad, total_w + pad], "constrain": "domain"},
        # in a narrow panel the images shrink to its width and sit at the top of the figure
        "yaxis": {"visible": False, "showgrid": False, "zeroline": False,
                  "range": [PLOT_HEIGHT + pad, -pad], "scaleanchor": "x", "scaleratio": 1,
                  "constrain": "domain", "constraintoward": "top"},
        "annotations": [
            {"text": f"current · {title_c}", "x": places["current"].offset + places["current"].plot_width / 2,
             "y": -pad, "xref": "x", "yref": "y", "yanchor": "bottom", "showarrow": False,
             "font": {"color": NEUTRAL, "size": 12}},
            {"text": f"reference · {title_r}", "x": places["reference"].offset + places["reference"].plot_width / 2,
             "y": -pad, "xref": "x", "yref": "y", "yanchor": "bottom", "showarrow": False,
             "font": {"color": NEUTRAL, "size": 12}},
        ],
    }
    return {
        "data": data,
        "layout": layout,
        "status": "  \n".join(status),
        "match": match,
        "placements": places,
        "missing_features": missing,
        "n_lines": n_lines,
    }


