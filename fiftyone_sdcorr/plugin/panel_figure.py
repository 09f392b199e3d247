"""The match panel's figure and the data behind it (no panel class here): what each side
shows (a whole image or an object's crop), keypoint pairing, image placement, plotly
traces, feature views. Reference ranking: :mod:`fiftyone_sdcorr.plugin.panel_ranking`.

See :mod:`fiftyone_sdcorr.plugin.panels` for what the panel shows.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


from fiftyone_sdcorr.core.pictures import visualize as vis
from fiftyone_sdcorr.core.matching.dense import dense_match, position_colors, warp_image
from fiftyone_sdcorr.core.common.geometry import DEFAULT_CONTEXT_MARGIN, Crop
from fiftyone_sdcorr.dataset import label_attrs
from fiftyone_sdcorr.dataset.config import FEATURES_FIELD, N_PARTS
from fiftyone_sdcorr.dataset.skeletons import keypoint_skeleton
from fiftyone_sdcorr.plugin.field_roles import REFERENCE_ATTR
from fiftyone_sdcorr.plugin.object_names import image_size, object_names
from fiftyone_sdcorr.plugin.panel_masks import overlay_uri
from fiftyone_sdcorr.plugin.panel_ranking import ObjectFeatures, linked_instances

PLUGIN = "@sdcorr/sdcorr"
INSTANCE_ATTR = label_attrs.INSTANCE
DETECTION_ATTR = label_attrs.DETECTION_ID  # the target object of a keypoint predicted per object
REVIEW_ATTR = label_attrs.VERDICT
POINT_REVIEW_ATTR = label_attrs.POINT_VERDICTS
REVIEW_TAGS = {"accepted": "sdcorr:accepted", "rejected": "sdcorr:rejected"}

MAX_SIDE = 512  # longest side of the images sent to the browser
MIN_CROP_SIDE = 256  # an object's crop smaller than this is enlarged for display
PLOT_HEIGHT = 400.0  # common height of both images, in plot units
GAP = 24.0  # plot units between the two images
FIGURE_HEIGHT = 420  # pixels: the least height of the figure
#: the figure's height in the panel: what the panel leaves below its controls (the
#: viewport less about 320 px of App header, tabs, controls and status), never under
#: FIGURE_HEIGHT; plotly fills it (no fixed layout height)
FIGURE_CSS_HEIGHT = f"max({FIGURE_HEIGHT}px, calc(100vh - 320px))"
SIDES = ("current", "reference")
VIEW_MODES = {"photos": "Photos", "pca": "PCA of features", "parts": "Part clusters",
              "dense": "Dense correspondence", "warp": "Reference warped"}
DENSE_VIEWS = ("dense", "warp")  # the view modes drawn from the pair's dense match
#: cells per side of the dense grid the panel matches on (over each side's letterbox
#: frame, :func:`~fiftyone_sdcorr.core.matching.dense.dense_match`): finer than the token grid
#: (60 x 60 with the paper's recipe), about 2 s for 1536-channel features on two CPU
#: cores; computed once per pair and cached
DENSE_RESOLUTION = 96
DENSE_CHUNK = 1024  # target cells per matching step (memory: chunk x source cells)
SHOW_MODES = {"predicted": "Predicted", "ground_truth": "Ground truth", "both": "Both"}
CONTROL_DEFAULTS = {"view_mode": "photos", "show": "predicted", "error_lines": True,
                    "heatmap": True, "n_parts": N_PARTS}
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
    from fiftyone_sdcorr.core.common.images import load_image

    return _CACHE.get(
        ("img", filepath, _mtime(filepath)),
        lambda: vis.downsample(load_image(filepath), MAX_SIDE),
    )


def _load_display_crop(filepath: str, box, margin: float):
    from PIL import Image

    from fiftyone_sdcorr.core.common.images import load_crop

    img, crop = load_crop(filepath, box, margin)
    img = vis.downsample(img, MAX_SIDE)
    if max(img.size) < MIN_CROP_SIDE:
        f = MIN_CROP_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.LANCZOS)
    return img, crop


def _display_crop(filepath: str, box, margin: float):
    """``(display image, Crop)`` of an object: its box grown by ``margin``, the pixels its
    features describe (cached by path, mtime, box and margin)."""
    box = tuple(float(v) for v in box)
    return _CACHE.get(("crop", filepath, _mtime(filepath), box, float(margin)),
                      lambda: _load_display_crop(filepath, box, margin))


def _photo_uri(filepath: str, box=None, margin: float = DEFAULT_CONTEXT_MARGIN) -> str:
    if box is None:
        return _CACHE.get(
            ("uri", filepath, _mtime(filepath)), lambda: vis.to_data_uri(_display_image(filepath))
        )
    return _CACHE.get(("crop-uri", filepath, _mtime(filepath), tuple(box), float(margin)),
                      lambda: vis.to_data_uri(_display_crop(filepath, box, margin)[0]))


def _features(path: Optional[str]):
    """Stored fused features (cached), or None when there are none."""
    if not path or not os.path.isfile(path):
        return None
    from fiftyone_sdcorr.core.features.store import FeatureStore

    return _CACHE.get(("feat", path, _mtime(path)), lambda: FeatureStore().load(path))


# --------------------------------------------------------------------------- dataset helpers


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


def predicted_for_object(pred_instances: list, detection_id: str, reference_object_id: Optional[str]):
    """The keypoint predicted for the object ``detection_id`` (attribute
    ``sdcorr_detection_id``) from the reference object ``reference_object_id``
    (``sdcorr_reference_id``); when none of that object's predictions names a reference,
    its first one; else None."""
    def attr(kp, name):
        return kp.get_attribute_value(name, None)

    mine = [kp for kp in pred_instances if attr(kp, DETECTION_ATTR) == detection_id]
    for kp in mine:
        if attr(kp, REFERENCE_ATTR) == reference_object_id:
            return kp
    if mine and not any(attr(kp, REFERENCE_ATTR) for kp in mine):
        return mine[0]
    return None


def predicted_from(dataset, sample_id: str, pred_field: Optional[str], detection_id: str) -> Optional[str]:
    """The reference object the prediction of the object ``detection_id`` in
    ``pred_field`` came from (its ``sdcorr_reference_id``), or None."""
    if not pred_field or not dataset.has_sample_field(pred_field):
        return None
    kps = dataset.select(sample_id).values(f"{pred_field}.keypoints", unwind=True)
    for kp in kps:
        if kp is not None and kp.get_attribute_value(DETECTION_ATTR, None) == detection_id:
            return kp.get_attribute_value(REFERENCE_ATTR, None)
    return None


def mask_predicted_from(dataset, sample_id: str, field: Optional[str], detection_id: str) -> Optional[str]:
    """The reference object the predicted mask of the object ``detection_id`` in the
    ``fo.Detections`` field ``field`` came from (its ``sdcorr_reference_id``), or None."""
    if not field or not dataset.has_sample_field(f"{field}.detections"):
        return None
    for det in dataset.select(sample_id).values(f"{field}.detections", unwind=True):
        if det is not None and det.get_attribute_value(DETECTION_ATTR, None) == detection_id:
            return det.get_attribute_value(REFERENCE_ATTR, None)
    return None


def _finite_point(p) -> bool:
    return p is not None and len(p) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)


# --------------------------------------------------------------------------- what each side shows
@dataclass
class Frame:
    """One side of the figure: a sample's whole image, or one of its objects' crop (the
    box grown by the features' context margin: exactly the pixels the object's features
    describe). Points in a frame are normalised to it (to the crop for an object);
    keypoints are stored in image coordinates and converted with
    :class:`~fiftyone_sdcorr.core.common.geometry.Crop`."""

    sample: Any
    features_path: Optional[str] = None
    box: Optional[Tuple[float, float, float, float]] = None  # an object's normalised [x, y, w, h]
    margin: float = DEFAULT_CONTEXT_MARGIN
    object_id: Optional[str] = None
    object_label: Optional[str] = None  # its name (plugin.object_names): "cat (top-left, 120×80 px)"
    features_name: str = FEATURES_FIELD  # where the features live, for messages

    @property
    def filepath(self) -> str:
        return self.sample.filepath

    @property
    def is_object(self) -> bool:
        return self.box is not None

    def display(self):
        return _display_image(self.filepath) if self.box is None else \
            _display_crop(self.filepath, self.box, self.margin)[0]

    @property
    def crop(self) -> Optional[Crop]:
        return None if self.box is None else _display_crop(self.filepath, self.box, self.margin)[1]

    def uri(self) -> str:
        return _photo_uri(self.filepath, self.box, self.margin)

    def features(self):
        return _features(self.features_path)

    def local(self, p):
        """An image-normalised point -> this frame's (as is for a whole image); None for a
        point that is not finite or lies outside the crop."""
        if self.box is None:
            return p
        if not _finite_point(p):
            return None
        x, y = (float(v) for v in self.crop.to_crop(np.asarray(p, dtype=np.float64)))
        return (x, y) if 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0 else None

    def local_points(self, points) -> list:
        return [self.local(p) for p in (points or [])]

    def to_image(self, xy) -> Tuple[float, float]:
        """A point of this frame -> image-normalised."""
        if self.box is None:
            return float(xy[0]), float(xy[1])
        x, y = self.crop.to_image(np.asarray(xy, dtype=np.float64))
        return float(x), float(y)


def image_frame(sample) -> Frame:
    return Frame(sample, sample[FEATURES_FIELD] if sample.has_field(FEATURES_FIELD) else None)


def object_frame(sample, objects: ObjectFeatures, detection_id: str) -> Optional[Frame]:
    """The frame of one detection of ``sample`` (None when it has no such detection)."""
    dets = sample[objects.patches_field] if sample.has_field(objects.patches_field) else None
    dets = list(getattr(dets, "detections", None) or [])
    for i, det in enumerate(dets):
        if det.id == detection_id and det.bounding_box is not None:
            label = object_names([(d.label, d.bounding_box) for d in dets],
                                 image_size(sample.filepath, sample.metadata))[i]
            return Frame(sample, det.get_attribute_value(objects.features, None), tuple(det.bounding_box),
                         objects.margin, det.id, label, f"{objects.patches_field}.detections.{objects.features}")
    return None


def pair_frames(current, reference, state: dict) -> Dict[str, Frame]:
    """What each side shows: the chosen objects' crops when the state names a current
    object and a reference object of the object features (``object_features``,
    ``object_id``, ``reference_object``), else both whole images."""
    objects = ObjectFeatures.from_dict(state.get("object_features"))
    if objects is not None and state.get("object_id") and state.get("reference_object"):
        cur = object_frame(current, objects, state["object_id"])
        ref = object_frame(reference, objects, state["reference_object"])
        if cur is not None and ref is not None:
            return {"current": cur, "reference": ref}
    return {"current": image_frame(current), "reference": image_frame(reference)}


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


def placements(current: Frame, reference: Frame) -> Dict[str, Placement]:
    """Where each side sits in the figure."""
    a, b = current.display(), reference.display()
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
    for k in ("ref_field", "gt_field", "pred_field", "click", "selected_point", "object_features", "object_id",
              "reference_object", "mask_field", "pred_mask_field"):
        opts[k] = state.get(k)
    opts["ref_field"] = opts["ref_field"] or opts["gt_field"]
    instance = state.get("instance")
    opts["instance"] = int(instance) if isinstance(instance, (int, float)) and instance >= 0 else None
    return opts


def _linked_index(dataset, sample, field: Optional[str], objects: ObjectFeatures, detection_id: str):
    """The index of the keypoint instance of ``sample[field]`` linked to the detection."""
    if not field or not sample.has_field(field) or sample[field] is None:
        return None
    units = objects.units(dataset.select(sample.id)).units()
    return linked_instances(units, sample[field]).get(detection_id)


def shown_pairs(dataset, current, reference, state: dict, frames: Optional[Dict[str, Frame]] = None):
    """``(reference instances, [(j, reference instance, predicted, ground truth)])``: the
    reference instances shown with the current sample's instances paired with them. Whole
    images: every instance (or the chosen ``instance``), the prediction from this
    reference (:func:`predicted_for`), the ground truth of the same index. Objects: the
    instance linked to the reference object, the prediction of the current object from
    it (:func:`predicted_for_object`), the ground truth linked to the current object."""
    frames = frames or pair_frames(current, reference, state)
    ref_field, gt_field, pred_field = state.get("ref_field") or state.get("gt_field"), state.get("gt_field"), \
        state.get("pred_field")
    ref_insts = instances_of(reference, ref_field)
    cur_gt = instances_of(current, gt_field)
    cur_pred = instances_of(current, pred_field) if pred_field else []
    cur, ref = frames["current"], frames["reference"]
    if cur.is_object:
        objects = ObjectFeatures.from_dict(state.get("object_features"))
        j = _linked_index(dataset, reference, ref_field, objects, ref.object_id)
        g = _linked_index(dataset, current, gt_field, objects, cur.object_id)
        pred = predicted_for_object(cur_pred, cur.object_id, ref.object_id)
        gt = cur_gt[g] if g is not None and g < len(cur_gt) else None
        return ref_insts, [] if j is None or j >= len(ref_insts) else [(j, ref_insts[j], pred, gt)]
    instance = state.get("instance")
    shown = [j for j in range(len(ref_insts)) if instance is None or j == instance]
    return ref_insts, [(j, ref_insts[j], predicted_for(cur_pred, reference.id, j) if cur_pred else None,
                        cur_gt[j] if j < len(cur_gt) else None) for j in shown]


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


def _mask_traces(frames, places, state: dict, status: List[str]) -> List[dict]:
    """The mask overlays (:mod:`~fiftyone_sdcorr.plugin.panel_masks`): the reference's
    masks of ``mask_field`` and the current side's of ``pred_mask_field``."""
    out, shown = [], []
    for side, key in (("reference", "mask_field"), ("current", "pred_mask_field")):
        field = state.get(key)
        if not field:
            continue
        uri = overlay_uri(frames[side], field, places[side].width, places[side].height)
        if uri is not None:
            out.append(places[side].image_trace(f"{side}|mask", uri))
        shown.append(f"{side} `{field}`" + ("" if uri is not None else " (none here)"))
    if shown:
        status.append("**Masks**: " + ", ".join(shown) + ".")
    return out


def _pair_key(frames) -> tuple:
    """The stored features of both sides and their mtimes: what a feature view depends on."""
    return tuple(v for side in SIDES for v in (frames[side].features_path, _mtime(frames[side].features_path)))


def _image_traces(frames, places, feats, state: dict, status: List[str]) -> List[dict]:
    """The photos (or crops) and, in a feature view, the pair's PCA colours, parts or
    dense correspondence (:func:`_dense_traces`)."""
    mode = state.get("view_mode") or "photos"
    data = [places[side].image_trace(f"{side}|photo", frames[side].uri()) for side in SIDES]
    if mode not in ("pca", "parts") + DENSE_VIEWS:
        return data
    fa, fb = feats["current"], feats["reference"]
    if fa is None or fb is None:
        what = "objects" if frames["current"].is_object else "samples"
        status.append(f"Feature views need stored features (`{frames['current'].features_name}`) for both {what}.")
        return data
    if mode in DENSE_VIEWS:
        return data + _dense_traces(mode, frames, places, feats, status)
    k = int(state.get("n_parts") or N_PARTS)
    uris = _CACHE.get((mode, k if mode == "parts" else None) + _pair_key(frames),
                      lambda: _feature_view_uris(mode, k, fa, fb, places))
    for side in SIDES:
        data.append(places[side].image_trace(f"{side}|{mode}", uris[side], opacity=0.9 if mode == "pca" else 0.6))
    return data


def _dense_match(frames, feats):
    """The reference's (source) dense match to the current side (target) at
    :data:`DENSE_RESOLUTION` (cached per pair of stored features)."""
    return _CACHE.get(("dense-match", DENSE_RESOLUTION) + _pair_key(frames),
                      lambda: dense_match(feats["reference"], feats["current"], resolution=DENSE_RESOLUTION,
                                          chunk=DENSE_CHUNK))


def _rgba_uri(rgb: np.ndarray, alpha: np.ndarray) -> str:
    a = np.clip(np.nan_to_num(alpha, nan=0.0), 0, 255).round().astype(np.uint8)
    return vis.to_data_uri(np.dstack([rgb.astype(np.uint8), a]), fmt="png")


def _dense_uris(mode: str, frames, places, feats) -> Dict[str, str]:
    """PNG data URIs at each side's display size: ``"dense"``: the reference's position
    colours and, on the current side, the colour of each pixel's match (alpha =
    confidence, transparent where there is none); ``"warp"``: the reference (photo or
    crop) carried onto the current side (transparent where there is no match)."""
    cur, ref = places["current"], places["reference"]
    field = _dense_match(frames, feats).sample(cur.width, cur.height)
    if mode == "dense":
        colors = position_colors(ref.width, ref.height)
        alpha = np.where(field.valid, np.clip(field.confidence, 0.0, 1.0) * 255.0, 0.0)
        return {"reference": vis.to_data_uri(colors, fmt="png"),
                "current": _rgba_uri(warp_image(field, colors), alpha)}
    source = np.asarray(frames["reference"].display().convert("RGB"))
    return {"current": _rgba_uri(warp_image(field, source), field.valid * 255.0)}


def _dense_traces(mode: str, frames, places, feats, status: List[str]) -> List[dict]:
    """The dense views' image traces (``<side>|dense``, ``current|warp``) and their line
    of status."""
    key = (mode,) + _pair_key(frames) + tuple(
        (f.filepath, _mtime(f.filepath), f.box, places[s].width, places[s].height) for s, f in frames.items())
    uris = _CACHE.get(key, lambda: _dense_uris(mode, frames, places, feats))
    what = "object" if frames["current"].is_object else "sample"
    grid = f"{DENSE_RESOLUTION} × {DENSE_RESOLUTION}"
    if mode == "dense":
        status.append(f"**Dense correspondence** ({grid} cells): the reference coloured by position; each pixel "
                      f"of the current {what} takes the colour of its match (opacity = confidence).")
    else:
        status.append(f"**Reference warped** onto the current {what} through the dense match ({grid} cells); "
                      "*Photos* shows the current photo as it is.")
    return [places[side].image_trace(f"{side}|{mode}", uris[side], opacity=0.9 if mode == "dense" else 1.0)
            for side in SIDES if side in uris]


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


@dataclass
class _Style:
    """How the keypoints shown are drawn: names, colours and skeleton edges per point."""

    n_points: int
    labels: List[str]
    colors: List[str]
    edges: List[list]


def _keypoint_style(dataset, ref_field: Optional[str], pairs) -> _Style:
    n_points = max([len(r.points) for _, r, _, _ in pairs] + [0])
    ref_label = next((getattr(r, "label", None) for _, r, _, _ in pairs), None)
    sk = skeleton_of(dataset, ref_field, ref_label)
    return _Style(n_points, point_labels(dataset, ref_field, n_points, ref_label),
                  [vis.palette_color(i) for i in range(n_points)],
                  [list(e) for e in (getattr(sk, "edges", None) or [])])


def _skeleton_trace(place: Placement, points, edges, name):
    """The skeleton's edges between the (frame) points that are drawn, or None."""
    xs, ys = [], []
    for edge in edges:
        pts = [points[i] for i in edge if i < len(points) and _finite_point(points[i])]
        if len(pts) < 2:
            continue
        for p in pts:
            x, y = place.to_plot(*p)
            xs.append(x)
            ys.append(y)
        xs.append(None)
        ys.append(None)
    if not xs:
        return None
    return {"type": "scatter", "mode": "lines", "name": name, "x": xs, "y": ys,
            "line": {"color": "rgba(235,235,235,0.75)", "width": 1.5}, "hoverinfo": "skip",
            "showlegend": False}


def _reference_markers(place: Placement, ref_pts, style: _Style) -> dict:
    xs, ys, cs, txt = [], [], [], []
    for i, p in enumerate(ref_pts):
        if _finite_point(p):
            x, y = place.to_plot(*p)
            xs.append(x), ys.append(y), cs.append(style.colors[i]), txt.append(f"{style.labels[i]} (reference)")
    return _scatter("reference|gt", xs, ys, cs, text=txt)


def _target_traces(j: int, kind: str, kp, frame: Frame, places, ref_pts, style: _Style, selected: dict):
    """``(lines, markers, number of match lines)`` of one predicted or ground-truth instance
    of the current sample: its markers and a line from each point to its reference point."""
    pts = frame.local_points(kp.points)
    conf = list(kp.confidence or []) if kind == "predicted" else []
    lines = [t for t in [_skeleton_trace(places["current"], pts, style.edges, "current|skeleton")] if t]
    xs, ys, cs, txt, ids, sizes, n = [], [], [], [], [], [], 0
    for i, p in enumerate(pts[: style.n_points]):
        if not _finite_point(p):
            continue
        c = conf[i] if i < len(conf) and conf[i] is not None and math.isfinite(conf[i]) else None
        alpha = 0.9 if c is None else 0.2 + 0.8 * max(0.0, min(1.0, c))
        cx, cy = places["current"].to_plot(*p)
        xs.append(cx), ys.append(cy)
        cs.append(vis.rgba(style.colors[i], max(alpha, 0.55)))
        ids.append(f"{j}:{i}")
        sel = kind == "predicted" and selected.get("instance") == j and selected.get("point") == i
        sizes.append(15 if sel else 10)
        txt.append(f"{style.labels[i]} ({'predicted' if kind == 'predicted' else 'ground truth'}"
                   + (f", confidence {c:.2f}" if c is not None else "") + ")")
        if i < len(ref_pts) and _finite_point(ref_pts[i]):
            rp = places["reference"].to_plot(*ref_pts[i])
            dash = "solid" if kind == "predicted" else "dot"
            lines.append(_line(f"line|{style.labels[i]}", (cx, cy), rp, vis.rgba(style.colors[i], alpha), 2.0, dash))
            n += 1
    name = "current|keypoints" if kind == "predicted" else "current|gt"
    marker = _scatter(name, xs, ys, cs, size=sizes, text=txt, ids=ids,
                      symbol="circle" if kind == "predicted" else "diamond")
    return lines, [marker], n


VERDICT_MARKS = {"accepted": ("✓", "#59a14f"), "rejected": ("✗", "#e15759")}


def point_verdicts(kp) -> list:
    """The per-point review of a predicted instance (``sdcorr_point_verdicts``)."""
    return list(kp.get_attribute_value(POINT_REVIEW_ATTR, None) or []) if kp is not None else []


def _verdict_trace(kp, frame: Frame, place: Placement, style: _Style) -> Optional[dict]:
    """A ✓ (accepted) or ✗ (rejected) beside each reviewed point of a predicted instance
    (trace ``current|verdicts``), or None when none is reviewed."""
    xs, ys, txt, colors = [], [], [], []
    pts = frame.local_points(kp.points)
    for i, verdict in enumerate(point_verdicts(kp)[: style.n_points]):
        if verdict in VERDICT_MARKS and i < len(pts) and _finite_point(pts[i]):
            x, y = place.to_plot(*pts[i])
            mark, color = VERDICT_MARKS[verdict]
            xs.append(x), ys.append(y), txt.append(mark), colors.append(color)
    if not xs:
        return None
    return {"type": "scatter", "mode": "text", "name": "current|verdicts", "x": xs, "y": ys, "text": txt,
            "textposition": "top right", "textfont": {"color": colors, "size": 18}, "hoverinfo": "skip",
            "showlegend": False}


def point_name(dataset, field: Optional[str], ref_kp, index: int) -> str:
    """The name of point ``index`` (the skeleton's or the categories' label, e.g.
    ``right_eye``; ``point <i>`` without one)."""
    n = max(len(getattr(ref_kp, "points", None) or []), index + 1)
    return point_labels(dataset, field, n, getattr(ref_kp, "label", None))[index]


def _error_lines(pred_kp, gt_kp, frame: Frame, place: Placement, style: _Style) -> List[dict]:
    """Predicted -> ground truth on the current image."""
    out = []
    for i, (p, g) in enumerate(zip(frame.local_points(pred_kp.points), frame.local_points(gt_kp.points))):
        if i < style.n_points and _finite_point(p) and _finite_point(g):
            out.append(_line(f"error|{style.labels[i]}", place.to_plot(*p), place.to_plot(*g), ERROR_COLOR, 1.5,
                             "dash"))
    return out


def _keypoint_traces(pairs, frames, places, style: _Style, state: dict):
    """``(lines, markers, number of match lines)`` of the instances shown."""
    show = state.get("show") or "predicted"
    selected = state.get("selected_point") or {}
    lines, markers, n_lines = [], [], 0
    for j, ref_kp, pred_kp, gt_kp in pairs:
        ref_pts = frames["reference"].local_points(ref_kp.points)
        tr = _skeleton_trace(places["reference"], ref_pts, style.edges, "reference|skeleton")
        if tr:
            lines.append(tr)
        markers.append(_reference_markers(places["reference"], ref_pts, style))
        targets = []
        if show in ("predicted", "both") and pred_kp is not None:
            targets.append(("predicted", pred_kp))
        if show in ("ground_truth", "both") and gt_kp is not None:
            targets.append(("ground_truth", gt_kp))
        for kind, kp in targets:
            ls, ms, n = _target_traces(j, kind, kp, frames["current"], places, ref_pts, style, selected)
            lines += ls
            markers += ms
            n_lines += n
            marks = _verdict_trace(kp, frames["current"], places["current"], style) if kind == "predicted" else None
            markers += [marks] if marks else []
        if state.get("error_lines") and pred_kp is not None and gt_kp is not None:
            lines += _error_lines(pred_kp, gt_kp, frames["current"], places["current"], style)
    return lines, markers, n_lines


def _keypoint_status(ref_insts, pairs, frames, current, state: dict) -> List[str]:
    ref_field = state.get("ref_field") or state.get("gt_field")
    pred_field, show = state.get("pred_field"), state.get("show") or "predicted"
    objects = frames["current"].is_object
    if not ref_field:
        return []
    if not ref_insts:
        return [f"The reference has no keypoints in `{ref_field}`."]
    if not pairs and objects:
        return [f"No keypoints of `{ref_field}` lie on this reference object."]
    if not pairs:
        return [f"The reference has no instance {state.get('instance')} in `{ref_field}`."]
    if not pred_field or show == "ground_truth" or any(pred is not None for _, _, pred, _ in pairs):
        return []
    if not objects:
        return [f"No predictions from this reference in `{pred_field}` yet: use *Propagate*."]
    others = [kp for kp in instances_of(current, pred_field)
              if kp.get_attribute_value(DETECTION_ATTR, None) == frames["current"].object_id]
    if others:
        return [f"This object's prediction in `{pred_field}` came from another reference object: choose it "
                "in *Reference*, or use *Propagate*."]
    return [f"No prediction for this object in `{pred_field}` yet: use *Propagate*."]


def _click_traces(frames, places, feats, state: dict, status: List[str]):
    """``(heat map traces, click traces, PointMatch or None)`` of the clicked point."""
    click = state.get("click")
    if not click:
        return [], [], None
    side = click["side"]
    other = "reference" if side == "current" else "current"
    if feats["current"] is None or feats["reference"] is None:
        what = "objects" if frames["current"].is_object else "samples"
        status.append(f"Click-to-match needs stored features (`{frames['current'].features_name}`) for both {what}.")
        return [], [], None
    match = vis.match_point(feats[side], feats[other], (click["x"], click["y"]))
    heat = []
    if state.get("heatmap", True):
        pl = places[other]
        img = vis.heatmap_image(match.heatmap, feats[other], pl.width, pl.height)
        heat.append(pl.image_trace(f"{other}|heatmap", vis.to_data_uri(img, fmt="png")))
    sx, sy = places[side].to_plot(*match.source_xy)
    tx, ty = places[other].to_plot(*match.target_xy)
    traces = [_line("click|line", (sx, sy), (tx, ty), "rgba(255,255,255,0.9)", 2.0, "dash"),
              _scatter(f"{side}|click", [sx], [sy], CLICK_COLOR, size=13, symbol="circle-open",
                       line_color=CLICK_COLOR, hover=False)]
    traces[-1]["marker"]["line"]["width"] = 3
    traces.append(_scatter(f"{other}|match", [tx], [ty], MATCH_COLOR, size=16, symbol="star", line_color="#000000",
                           hover=False, text=[f"match, cosine {match.similarity:.3f}"]))
    status.append(_match_status(match, frames, side, other))
    return heat, traces, match


def _match_status(match, frames, side: str, other: str) -> str:
    if not frames["current"].is_object:
        return (f"**Match**: ({match.source_xy[0]:.3f}, {match.source_xy[1]:.3f}) in the {side} sample → "
                f"({match.target_xy[0]:.3f}, {match.target_xy[1]:.3f}) in the {other}, cosine "
                f"{match.similarity:.3f}.")
    s, t = frames[side].to_image(match.source_xy), frames[other].to_image(match.target_xy)
    return (f"**Match**: ({s[0]:.3f}, {s[1]:.3f}) in the {side} object → ({t[0]:.3f}, {t[1]:.3f}) in the {other} "
            f"object (image coordinates), cosine {match.similarity:.3f}.")


def _layout(frames, places) -> dict:
    total_w = places["reference"].offset + places["reference"].plot_width
    pad = 6.0
    cur, ref = frames["current"], frames["reference"]
    revision = f"{cur.sample.id}|{ref.sample.id}" + (f"|{cur.object_id}|{ref.object_id}" if cur.is_object else "")

    def title(side):
        f = frames[side]
        text = f"{side} · {os.path.basename(f.filepath)}" + (f" · {f.object_label}" if f.is_object else "")
        return {"text": text, "x": places[side].offset + places[side].plot_width / 2, "y": -pad, "xref": "x",
                "yref": "y", "yanchor": "bottom", "showarrow": False, "font": {"color": NEUTRAL, "size": 12}}

    return {
        "autosize": True,
        "margin": {"l": 4, "r": 4, "t": 30, "b": 4, "pad": 0},
        "paper_bgcolor": "rgba(0,0,0,0)",
        "plot_bgcolor": "rgba(0,0,0,0)",
        "font": {"color": NEUTRAL, "size": 12},
        "showlegend": False,
        "hovermode": "closest",
        "dragmode": "pan",
        "uirevision": revision,
        "xaxis": {"visible": False, "showgrid": False, "zeroline": False,
                  "range": [-pad, total_w + pad], "constrain": "domain"},
        # in a narrow panel the images shrink to its width and sit at the top of the figure
        "yaxis": {"visible": False, "showgrid": False, "zeroline": False,
                  "range": [PLOT_HEIGHT + pad, -pad], "scaleanchor": "x", "scaleratio": 1,
                  "constrain": "domain", "constraintoward": "top"},
        "annotations": [title("current"), title("reference")],
    }


def build_figure(dataset, current, reference, state: dict) -> dict:
    """The plotly figure of a pair: ``{"data": traces, "layout": layout, "status": md,
    "match": PointMatch or None, "placements": {...}, "frames": {...},
    "missing_features": bool, "n_lines": int}``. Each side is a whole image, or with
    objects chosen (:func:`pair_frames`) the object's crop."""
    frames = pair_frames(current, reference, state)
    places = placements(frames["current"], frames["reference"])
    feats = {side: frames[side].features() for side in SIDES}
    missing = feats["current"] is None or feats["reference"] is None
    status: List[str] = []
    data = _image_traces(frames, places, feats, state, status)
    data += _mask_traces(frames, places, state, status)
    ref_insts, pairs = shown_pairs(dataset, current, reference, state, frames)
    style = _keypoint_style(dataset, state.get("ref_field") or state.get("gt_field"), pairs)
    lines, markers, n_lines = _keypoint_traces(pairs, frames, places, style, state)
    status += _keypoint_status(ref_insts, pairs, frames, current, state)
    heat, click_traces, match = _click_traces(frames, places, feats, state, status)
    if missing:
        status.append("Stored features are missing for this pair: *Compute features* (or run "
                      "`compute_fused_features`) to enable click-to-match and feature views.")
    selected = state.get("selected_point") or {}
    if selected:
        i = int(selected.get("point", 0))
        status.append(f"Selected: **{style.labels[i] if i < len(style.labels) else i}** of instance "
                      f"{selected.get('instance')}.")
    if not status:
        status.append("Click a pixel in either image to see its best match in the other.")
    return {
        "data": data + heat + lines + markers + click_traces,
        "layout": _layout(frames, places),
        "status": "  \n".join(status),
        "match": match,
        "placements": places,
        "frames": frames,
        "missing_features": missing,
        "n_lines": n_lines,
    }
