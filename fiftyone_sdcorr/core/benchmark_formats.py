"""Readers of the semantic-correspondence benchmarks' own files: SPair-71k, PF-Pascal, AP-10K.

Each reader turns a benchmark's files into :class:`PairRecord` objects (one per test pair:
the two images, the keypoints in pixels, which are visible, the PCK threshold size ``T``)
and, for the importers, :class:`ImageRecord` objects (one per image). Nothing here scores
anything (:mod:`fiftyone_sdcorr.core.pck_protocol`) or speaks FiftyOne
(:mod:`fiftyone_sdcorr.dataset.benchmarks`). Pure Python + numpy + Pillow (scipy only for
PF-Pascal's optional ``.mat`` files).

Layouts read
------------
**SPair-71k** (``SPair-71k.tar.gz`` as published; ``root`` is the ``SPair-71k`` folder)::

    PairAnnotation/{trn,val,test}/{id}-{src}-{trg}:{category}.json
    ImageAnnotation/{category}/{image}.json
    JPEGImages/{category}/{image}.jpg

A pair file has ``src_imname``, ``trg_imname``, ``category``, ``src_kps`` / ``trg_kps``
(``K x [x, y]`` pixels, the keypoints annotated in *both* images), ``kps_ids`` (their ids
in the category's keypoint list), ``src_bndbox`` / ``trg_bndbox`` (``[x1, y1, x2, y2]``),
``src_imsize`` / ``trg_imsize`` (``[W, H, 3]``) and ``mirror``. An image file has
``image_width``, ``image_height``, ``bndbox`` and ``kps`` (``{"id": [x, y] or null}``).
``T = max(x2 - x1, y2 - y1)`` of the target box. Pair identifier: the pair file's name
without ``.json`` (``"000012-2008_001546-2011_001918:aeroplane"``).

**PF-Pascal** (``PF-dataset-PASCAL.zip`` plus the pair lists of Rocco et al.,
``test_pairs_pf_pascal.csv`` / ``val_pairs_pf_pascal.csv``, placed inside the
``PF-dataset-PASCAL`` folder, which is ``root``; the layout that sd-dino's and
GeoAware-SC's ``prepare_pfpascal.sh`` build; NCNet's ``image_pairs/{split}_pairs.csv`` is
read too)::

    {split}_pairs_pf_pascal.csv
    JPEGImages/{image}.jpg
    Annotations/{category}/{image}.mat      (optional: per-image keypoints for the importer)

CSV columns, by position after a header row: ``source_image``, ``target_image``,
``class`` (1-based index into the 20 PASCAL VOC classes in alphabetical order:
aeroplane ... tvmonitor), ``XA``, ``YA``, ``XB``, ``YB`` (``;``-separated pixel
coordinates of the source and target keypoints, index-aligned; every listed point is
visible in both images). Image paths (``PF-dataset-PASCAL/JPEGImages/x.jpg``) are relative
to the folder that holds ``PF-dataset-PASCAL``. ``T = max(W, H)`` of the target image.
Pair identifier: ``"{row:04d}-{source stem}-{target stem}:{category}"`` where ``row`` is
the 0-based data row of the CSV (header not counted), e.g.
``"0000-2011_001407-2010_004184:aeroplane"``. The training list carries no coordinates
(``source_image, target_image, class, flip``) and is refused.

**AP-10K** as GeoAware-SC prepares it (``prepare_ap10k.ipynb``: the COCO-style
``ap10k-*-split1.json`` files merged, one annotation per image, each written as its own
JSON; per species the last 30 usable images are the test set; test pairs are the image
pairs of a species with at least 3 keypoints visible in both; ``root`` is the ``ap-10k``
folder)::

    ImageAnnotation/{family}/{species}/{image id:012d}.json
    JPEGImages/{family}/{species}/{image id:012d}.jpg
    PairAnnotation/{split}/{src}-{trg}:{category}.json     split: test, val, trn,
        test_cross_species (category = family), test_cross_family (category = "all")

A pair file is ``{"src_json_path": ..., "trg_json_path": ...}``; the paths were written
relative to GeoAware-SC's working directory (``data/ap-10k/ImageAnnotation/...``) and are
resolved here from their ``ImageAnnotation/`` part under ``root``. An image file is a COCO
annotation merged with its image entry: ``keypoints`` (17 x ``[x, y, v]``, flat; visible
when ``v > 0``), ``bbox`` (``[left, top, w, h]``), ``width``, ``height``, ``name``
(species), ``supercategory`` (family). ``T = max(w, h)`` of the target box. Pair
identifier: the pair file's name without ``.json``. The 17 keypoints keep their COCO order
(:data:`AP10K_KEYPOINTS`) in both images, visible or not.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fiftyone_sdcorr.core.geometry import points_array
from fiftyone_sdcorr.core.images import image_size

FORMATS = ("spair", "pfpascal", "ap10k")

#: PCK alphas each benchmark reports (two-decimal keys in the results)
ALPHAS = {
    "spair": (0.01, 0.05, 0.10),
    "ap10k": (0.01, 0.05, 0.10),
    "pfpascal": (0.01, 0.05, 0.10, 0.15),
}
#: what ``T`` is: the target object's box ("bbox") or the target image ("image")
THRESHOLDS = {"spair": "bbox", "ap10k": "bbox", "pfpascal": "image"}

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: test pairs per category in the paper's code (``pck_spair_pascal.py``), sorted category order
PAPER_TEST_PAIRS = {
    "spair": dict(zip(
        ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
         "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor"),
        (690, 650, 702, 702, 870, 644, 564, 600, 646, 640, 600, 600, 702, 650, 862, 664, 756, 692))),
    "pfpascal": dict(zip(PASCAL_CLASSES, (15, 30, 10, 6, 8, 32, 19, 27, 13, 3, 8, 24, 9, 27, 12, 7, 1, 13, 20, 15))),
}

AP10K_KEYPOINTS = (
    "left_eye", "right_eye", "nose", "neck", "root_of_tail",
    "left_shoulder", "left_elbow", "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw",
    "left_hip", "left_knee", "left_back_paw", "right_hip", "right_knee", "right_back_paw",
)
AP10K_EDGES = (
    (0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (3, 5), (5, 6), (6, 7), (3, 8), (8, 9), (9, 10),
    (4, 11), (11, 12), (12, 13), (4, 14), (14, 15), (15, 16),
)

#: SPair-71k keypoint ids that swap under a horizontal mirror, as (left, right), per
#: category (the left/right tables of GeoAware-SC, "Telling Left from Right", by keypoint
#: id); every other id keeps its meaning when mirrored.
SPAIR_LEFT_RIGHT = {
    "aeroplane": ((5, 4), (7, 6), (9, 8), (11, 10), (13, 12), (15, 14), (17, 16), (19, 18), (21, 20)),
    "bicycle": ((3, 2), (7, 6), (10, 9)),
    "bird": ((2, 1), (5, 4), (8, 7), (11, 10), (13, 12), (15, 14)),
    "boat": ((2, 1), (4, 3), (6, 5), (8, 7), (10, 9), (12, 11)),
    "bottle": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
    "bus": ((1, 0), (3, 2), (6, 5), (20, 10), (23, 13), (21, 11), (24, 14), (22, 12), (25, 15), (17, 16),
            (27, 26), (19, 18), (29, 28)),
    "car": ((1, 0), (3, 2), (7, 6), (20, 10), (23, 13), (21, 11), (24, 14), (22, 12), (25, 15), (17, 16),
            (27, 26), (19, 18), (29, 28)),
    "cat": ((1, 0), (3, 2), (5, 4), (7, 6), (10, 9), (12, 11)),
    "chair": ((1, 0), (3, 2), (5, 4), (7, 6), (9, 8), (11, 10), (13, 12)),
    "cow": ((1, 0), (3, 2), (5, 4), (7, 6), (10, 9), (12, 11), (16, 15), (18, 17), (20, 19)),
    "dog": ((1, 0), (3, 2), (5, 4), (10, 9), (12, 11)),
    "horse": ((1, 0), (3, 2), (5, 4), (7, 6), (11, 10), (13, 12), (17, 16), (19, 18)),
    "motorbike": ((1, 0), (3, 2)),
    "person": ((1, 0), (3, 2), (9, 8), (11, 10), (13, 12), (15, 14), (17, 16), (19, 18)),
    "pottedplant": ((2, 0), (5, 4), (8, 6)),
    "sheep": ((1, 0), (3, 2), (5, 4), (7, 6), (10, 9), (12, 11), (16, 15), (18, 17), (20, 19)),
    "train": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)),
    "tvmonitor": ((2, 0), (6, 4), (7, 3), (10, 8), (14, 12), (15, 11)),
}
#: keypoints per SPair-71k category (ids 0 .. n-1)
SPAIR_NUM_KEYPOINTS = {
    "aeroplane": 25, "bicycle": 14, "bird": 17, "boat": 14, "bottle": 10, "bus": 30, "car": 30, "cat": 15,
    "chair": 14, "cow": 21, "dog": 16, "horse": 20, "motorbike": 13, "person": 20, "pottedplant": 9,
    "sheep": 21, "train": 18, "tvmonitor": 16,
}


class BenchmarkFormatError(ValueError):
    """A benchmark file is missing or not in the expected format; the message names it."""


# --------------------------------------------------------------------------- records
@dataclass
class PairRecord:
    """One evaluation pair.

    Attributes:
        pair: the pair's identifier (see the module docstring, per format).
        category: the category PCK is grouped by.
        src, trg: image file paths.
        src_size, trg_size: ``(W, H)`` of the images the keypoints refer to.
        src_kps, trg_kps: ``(K, 2)`` float64 pixel coordinates, NaN where not annotated.
        kp_ids: ``K`` ids of the points in the category's keypoint list.
        threshold: ``T`` in target pixels (``alpha * T`` is the PCK radius).
        num_keypoints: size of the category's keypoint list (ids ``0 .. n-1``).
        src_key, trg_key: the images' keys (``ImageRecord.key``).
        extra: format-specific facts (``mirror``, boxes, ...).
    """

    pair: str
    category: str
    src: str
    trg: str
    src_size: Tuple[int, int]
    trg_size: Tuple[int, int]
    src_kps: np.ndarray
    trg_kps: np.ndarray
    kp_ids: Tuple[int, ...]
    threshold: float
    num_keypoints: int
    src_key: str = ""
    trg_key: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def visible(self) -> np.ndarray:
        """``(K,)`` bool: annotated in both images (the points PCK counts)."""
        return np.isfinite(self.src_kps).all(axis=1) & np.isfinite(self.trg_kps).all(axis=1)

    def to_dict(self) -> dict:
        """JSON-able (NaN written as ``None``); :meth:`from_dict` reads it back."""
        def pts(a):
            return [[float(x), float(y)] if math.isfinite(x) and math.isfinite(y) else None for x, y in a]

        return {"pair": self.pair, "category": self.category, "src": self.src, "trg": self.trg,
                "src_size": list(self.src_size), "trg_size": list(self.trg_size),
                "src_kps": pts(self.src_kps), "trg_kps": pts(self.trg_kps), "kp_ids": list(self.kp_ids),
                "threshold": float(self.threshold), "num_keypoints": int(self.num_keypoints),
                "src_key": self.src_key, "trg_key": self.trg_key, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: dict) -> "PairRecord":
        return cls(pair=d["pair"], category=d["category"], src=d["src"], trg=d["trg"],
                   src_size=tuple(d["src_size"]), trg_size=tuple(d["trg_size"]),
                   src_kps=points_array(d["src_kps"]), trg_kps=points_array(d["trg_kps"]),
                   kp_ids=tuple(int(i) for i in d["kp_ids"]), threshold=float(d["threshold"]),
                   num_keypoints=int(d["num_keypoints"]), src_key=d.get("src_key", ""),
                   trg_key=d.get("trg_key", ""), extra=dict(d.get("extra") or {}))


@dataclass
class ImageRecord:
    """One benchmark image for the importers.

    ``points`` is ``(N, 2)`` pixels indexed by keypoint id (NaN: not annotated);
    ``bbox`` is ``(x1, y1, x2, y2)`` pixels or None; ``extra`` holds format facts
    (SPair pose / truncation, AP-10K family and COCO visibility flags, ...).
    """

    key: str
    path: str
    category: str
    width: int
    height: int
    points: np.ndarray
    bbox: Optional[Tuple[float, float, float, float]] = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- skeletons
def keypoint_names(fmt: str, category: str, num_keypoints: int) -> List[str]:
    """Names of a category's keypoints, by id, such that left/right partners read
    ``left_<x>`` / ``right_<x>`` (what flip alignment looks for in a skeleton).

    AP-10K: its 17 names. SPair-71k publishes ids only: a point that swaps under a mirror
    is ``left_kpLL-RR`` / ``right_kpLL-RR`` (``LL``: the left id, ``RR``: the right id),
    any other ``kpNN``. PF-Pascal's pair lists carry no ids: ``kpNN`` by position.
    """
    if fmt == "ap10k":
        return list(AP10K_KEYPOINTS)
    names = [f"kp{i:02d}" for i in range(num_keypoints)]
    if fmt == "spair":
        for left, right in SPAIR_LEFT_RIGHT.get(category, ()):
            stem = f"kp{left:02d}-{right:02d}"
            if left < num_keypoints:
                names[left] = f"left_{stem}"
            if right < num_keypoints:
                names[right] = f"right_{stem}"
    return names


def flip_pairs(fmt: str, category: str) -> List[Tuple[int, int]]:
    """Keypoint-id pairs that swap under a horizontal mirror (``(low, high)``, sorted)."""
    if fmt == "ap10k":
        idx = {n: i for i, n in enumerate(AP10K_KEYPOINTS)}
        pairs = [(idx[n], idx["right_" + n[5:]]) for n in AP10K_KEYPOINTS if n.startswith("left_")]
    elif fmt == "spair":
        pairs = list(SPAIR_LEFT_RIGHT.get(category, ()))
    else:
        pairs = []
    return sorted((min(a, b), max(a, b)) for a, b in pairs)


def skeleton_edges(fmt: str) -> List[Tuple[int, int]]:
    return list(AP10K_EDGES) if fmt == "ap10k" else []


# --------------------------------------------------------------------------- helpers
def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise BenchmarkFormatError(f"missing file {path}") from None
    except (OSError, ValueError) as e:
        raise BenchmarkFormatError(f"{path}: not readable JSON ({e})") from None


def _require(d: dict, keys: Iterable[str], path) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise BenchmarkFormatError(f"{path}: missing field(s) {missing}")


def _check_root(fmt: str, root) -> Path:
    if fmt not in FORMATS:
        raise BenchmarkFormatError(f"unknown benchmark format {fmt!r}; formats: {list(FORMATS)}")
    root = Path(os.path.expanduser(os.fspath(root))).resolve()
    if not root.is_dir():
        raise BenchmarkFormatError(f"benchmark root {root} is not a folder")
    return root


def _sample_per_category(names_by_cat: Dict[str, List], sample: Optional[int], seed: int) -> Dict[str, List]:
    """``sample`` items per category, drawn without replacement with ``random.Random(seed)``
    from the sorted list (all when fewer), kept in sorted order."""
    if not sample:
        return names_by_cat
    out = {}
    for cat in sorted(names_by_cat):
        items = sorted(names_by_cat[cat])
        if len(items) > sample:
            rng = random.Random(f"{seed}:{cat}")
            items = sorted(rng.sample(items, sample))
        out[cat] = items
    return out


def _pair_category(name: str) -> str:
    return name.rsplit(":", 1)[1] if ":" in name else ""


def _pair_files(root: Path, split: str, categories, sample, seed) -> List[Path]:
    folder = root / "PairAnnotation" / split
    if not folder.is_dir():
        have = sorted(p.name for p in (root / "PairAnnotation").glob("*")) if (root / "PairAnnotation").is_dir() else []
        raise BenchmarkFormatError(f"no pair annotations for split {split!r}: {folder} is not a folder"
                                   + (f" (splits here: {have})" if have else ""))
    by_cat: Dict[str, List[Path]] = {}
    for p in folder.glob("*.json"):
        cat = _pair_category(p.stem)
        if categories is None or cat in categories:
            by_cat.setdefault(cat, []).append(p)
    by_cat = _sample_per_category(by_cat, sample, seed)
    return [p for cat in sorted(by_cat) for p in by_cat[cat]]


def _box_size(box) -> float:
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, y2 - y1)


# --------------------------------------------------------------------------- SPair-71k
def _spair_pair(path: Path, root: Path) -> PairRecord:
    d = _load_json(path)
    _require(d, ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "kps_ids", "src_bndbox",
                 "trg_bndbox", "src_imsize", "trg_imsize"), path)
    cat = d["category"]
    src_kps, trg_kps = points_array(d["src_kps"]), points_array(d["trg_kps"])
    ids = tuple(int(i) for i in d["kps_ids"])
    if not (len(src_kps) == len(trg_kps) == len(ids)):
        raise BenchmarkFormatError(f"{path}: src_kps ({len(src_kps)}), trg_kps ({len(trg_kps)}) and "
                                   f"kps_ids ({len(ids)}) differ in length")
    n = max(SPAIR_NUM_KEYPOINTS.get(cat, 0), max(ids, default=-1) + 1)
    return PairRecord(
        pair=path.stem, category=cat,
        src=str(root / "JPEGImages" / cat / d["src_imname"]), trg=str(root / "JPEGImages" / cat / d["trg_imname"]),
        src_size=(int(d["src_imsize"][0]), int(d["src_imsize"][1])),
        trg_size=(int(d["trg_imsize"][0]), int(d["trg_imsize"][1])),
        src_kps=src_kps, trg_kps=trg_kps, kp_ids=ids, threshold=_box_size(d["trg_bndbox"]), num_keypoints=n,
        src_key=f"{cat}/{Path(d['src_imname']).stem}", trg_key=f"{cat}/{Path(d['trg_imname']).stem}",
        extra={"mirror": int(d.get("mirror", 0) or 0), "src_bndbox": [float(v) for v in d["src_bndbox"]],
               "trg_bndbox": [float(v) for v in d["trg_bndbox"]],
               **{k: d[k] for k in ("viewpoint_variation", "scale_variation", "truncation", "occlusion") if k in d}},
    )


def _spair_image(root: Path, key: str, pairs: List[PairRecord]) -> ImageRecord:
    """From ``ImageAnnotation/{category}/{stem}.json`` when present, else from the pairs."""
    cat, stem = key.split("/", 1)
    path = pairs[0].src if pairs[0].src_key == key else pairs[0].trg
    ann = root / "ImageAnnotation" / cat / f"{stem}.json"
    if ann.is_file():
        d = _load_json(ann)
        _require(d, ("image_width", "image_height", "kps"), ann)
        kps = {int(k): xy for k, xy in (d["kps"] or {}).items()}
        # the category's ids (files may list more, null, ids: SPair pads every list to 30)
        n = max([SPAIR_NUM_KEYPOINTS.get(cat) or len(kps)] + [k + 1 for k, xy in kps.items() if xy is not None])
        pts = np.full((n, 2), np.nan)
        for k, xy in kps.items():
            if k < n:
                pts[k] = points_array([xy])[0]
        extra = {k: d[k] for k in ("pose", "truncated", "occluded", "difficult", "azimuth_id") if k in d}
        box = d.get("bndbox")
        return ImageRecord(key, str(path), cat, int(d["image_width"]), int(d["image_height"]), pts,
                           tuple(float(v) for v in box) if box else None, extra)
    return _image_from_pairs(key, str(path), cat, pairs)


def _image_from_pairs(key: str, path: str, category: str, pairs: List[PairRecord]) -> ImageRecord:
    """An image's keypoints and box gathered from the pairs it is in (by keypoint id)."""
    n = max(p.num_keypoints for p in pairs)
    pts, size, box = np.full((n, 2), np.nan), None, None
    for p in pairs:
        side = "src" if p.src_key == key else "trg"
        for i, xy in zip(p.kp_ids, getattr(p, f"{side}_kps")):
            if np.isfinite(xy).all():
                pts[i] = xy
        size = getattr(p, f"{side}_size")
        box = p.extra.get(f"{side}_bndbox", box)
    return ImageRecord(key, path, category, int(size[0]), int(size[1]), pts,
                       tuple(box) if box else None, {})


def read_spair(root, split: str = "test", categories=None, sample=None, seed: int = 0) -> List[PairRecord]:
    root = _check_root("spair", root)
    return [_spair_pair(p, root) for p in _pair_files(root, split, categories, sample, seed)]


# --------------------------------------------------------------------------- PF-Pascal
def pfpascal_csv(root: Path, split: str) -> Path:
    for p in (root / f"{split}_pairs_pf_pascal.csv", root / "image_pairs" / f"{split}_pairs.csv",
              root / f"{split}_pairs.csv"):
        if p.is_file():
            return p
    raise BenchmarkFormatError(f"no PF-Pascal pair list for split {split!r} in {root} "
                               f"(looked for {split}_pairs_pf_pascal.csv, image_pairs/{split}_pairs.csv)")


def _pfpascal_image(root: Path, name: str, csv_path: Path) -> Path:
    name = name.strip().replace("\\", "/")
    for p in (root.parent / name, root / name, root / "JPEGImages" / Path(name).name):
        if p.is_file():
            return p
    raise BenchmarkFormatError(f"{csv_path}: image {name!r} not found (looked under {root.parent} and "
                               f"{root / 'JPEGImages'})")


def _coords(text: str, where: str) -> np.ndarray:
    try:
        vals = [float(v) for v in str(text).replace(",", ";").split(";") if v.strip()]
    except ValueError:
        raise BenchmarkFormatError(f"{where}: coordinates must be ';'-separated numbers, got {text!r}") from None
    return np.asarray(vals, dtype=np.float64)


def _pfpascal_row(row: List[str], i: int, root: Path, csv_path: Path) -> PairRecord:
    where = f"{csv_path}, data row {i}"
    if len(row) < 7:
        raise BenchmarkFormatError(f"{where}: expected 7 columns (source_image, target_image, class, XA, YA, XB, "
                                   f"YB), got {len(row)}; PF-Pascal's training list has no keypoints")
    try:
        cat = PASCAL_CLASSES[int(float(row[2])) - 1]
    except (ValueError, IndexError):
        raise BenchmarkFormatError(f"{where}: class must be 1..20, got {row[2]!r}") from None
    xa, ya, xb, yb = (_coords(v, where) for v in row[3:7])
    if not (len(xa) == len(ya) == len(xb) == len(yb)):
        raise BenchmarkFormatError(f"{where}: XA, YA, XB, YB hold {len(xa)}, {len(ya)}, {len(xb)}, {len(yb)} values")
    src, trg = _pfpascal_image(root, row[0], csv_path), _pfpascal_image(root, row[1], csv_path)
    src_size, trg_size = image_size(str(src)), image_size(str(trg))
    return PairRecord(
        pair=f"{i:04d}-{src.stem}-{trg.stem}:{cat}", category=cat, src=str(src), trg=str(trg),
        src_size=src_size, trg_size=trg_size, src_kps=np.stack([xa, ya], 1).reshape(-1, 2),
        trg_kps=np.stack([xb, yb], 1).reshape(-1, 2), kp_ids=tuple(range(len(xa))),
        threshold=float(max(trg_size)), num_keypoints=len(xa),
        src_key=f"{cat}/{src.stem}", trg_key=f"{cat}/{trg.stem}", extra={"row": i},
    )


def read_pfpascal(root, split: str = "test", categories=None, sample=None, seed: int = 0) -> List[PairRecord]:
    root = _check_root("pfpascal", root)
    csv_path = pfpascal_csv(root, split)
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise BenchmarkFormatError(f"{csv_path} is empty")
    body = rows[1:] if not _is_number(rows[0][2] if len(rows[0]) > 2 else "") else rows
    by_cat: Dict[str, List[int]] = {}
    for i, row in enumerate(body):
        try:
            cat = PASCAL_CLASSES[int(float(row[2])) - 1]
        except (ValueError, IndexError):
            cat = "?"
        if categories is None or cat in categories:
            by_cat.setdefault(cat, []).append(i)
    by_cat = _sample_per_category(by_cat, sample, seed)
    return [_pfpascal_row(body[i], i, root, csv_path) for cat in sorted(by_cat) for i in by_cat[cat]]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _pfpascal_image_record(root: Path, key: str, pairs: List[PairRecord]) -> ImageRecord:
    """Keypoints from ``Annotations/{category}/{stem}.mat`` (``kps``: N x 2, NaN = absent;
    ``bbox``: x1 y1 x2 y2) when present; else none (the pairs keep their own points)."""
    cat, stem = key.split("/", 1)
    p0 = pairs[0]
    path = p0.src if p0.src_key == key else p0.trg
    size = p0.src_size if p0.src_key == key else p0.trg_size
    mat = root / "Annotations" / cat / f"{stem}.mat"
    pts, box = np.zeros((0, 2)), None
    if mat.is_file():
        from scipy.io import loadmat  # scipy comes with scikit-image

        try:
            m = loadmat(str(mat))
        except Exception as e:  # noqa: BLE001 -- any unreadable .mat is a format error
            raise BenchmarkFormatError(f"{mat}: not a readable .mat file ({e})") from None
        if "kps" in m:
            pts = np.asarray(m["kps"], dtype=np.float64).reshape(-1, 2)
        if "bbox" in m:
            box = tuple(float(v) for v in np.asarray(m["bbox"], dtype=np.float64).reshape(-1)[:4])
    return ImageRecord(key, path, cat, int(size[0]), int(size[1]), pts, box, {})


# --------------------------------------------------------------------------- AP-10K
def _ap10k_path(root: Path, written: str, pair_file: Path) -> Path:
    """A path as GeoAware-SC wrote it (``data/ap-10k/ImageAnnotation/...``) -> under ``root``."""
    text = str(written).replace("\\", "/")
    p = Path(text)
    if p.is_absolute() and p.is_file():
        return p
    idx = text.find("ImageAnnotation/")
    if idx < 0:
        raise BenchmarkFormatError(f"{pair_file}: {written!r} is not a path into ImageAnnotation/")
    return root / text[idx:]


def _ap10k_image(path: Path) -> Tuple[dict, np.ndarray, np.ndarray]:
    d = _load_json(path)
    _require(d, ("keypoints", "bbox", "width", "height"), path)
    kv = np.asarray(d["keypoints"], dtype=np.float64).reshape(-1, 3)
    pts = np.where((kv[:, 2] > 0)[:, None], kv[:, :2], np.nan)
    return d, pts, kv[:, 2]


def _ap10k_jpeg(json_path: Path, d: dict) -> Path:
    rel = str(json_path).replace("ImageAnnotation", "JPEGImages")
    jpg = Path(rel).with_suffix(".jpg")
    if not jpg.is_file() and d.get("file_name"):
        alt = jpg.parent / d["file_name"]
        return alt if alt.is_file() else jpg
    return jpg


def _ap10k_key(json_path: Path) -> str:
    return f"{json_path.parent.name}/{json_path.stem}"


def _ap10k_pair(path: Path, root: Path) -> PairRecord:
    d = _load_json(path)
    _require(d, ("src_json_path", "trg_json_path"), path)
    sj, tj = _ap10k_path(root, d["src_json_path"], path), _ap10k_path(root, d["trg_json_path"], path)
    (sd, sp, _), (td, tp, _) = _ap10k_image(sj), _ap10k_image(tj)
    if len(sp) != len(tp):
        raise BenchmarkFormatError(f"{path}: source has {len(sp)} keypoints, target {len(tp)}")
    return PairRecord(
        pair=path.stem, category=_pair_category(path.stem), src=str(_ap10k_jpeg(sj, sd)),
        trg=str(_ap10k_jpeg(tj, td)), src_size=(int(sd["width"]), int(sd["height"])),
        trg_size=(int(td["width"]), int(td["height"])), src_kps=sp, trg_kps=tp,
        kp_ids=tuple(range(len(sp))), threshold=float(max(td["bbox"][2], td["bbox"][3])),
        num_keypoints=len(sp), src_key=_ap10k_key(sj), trg_key=_ap10k_key(tj),
        extra={"src_json": str(sj), "trg_json": str(tj)},
    )


def read_ap10k(root, split: str = "test", categories=None, sample=None, seed: int = 0) -> List[PairRecord]:
    root = _check_root("ap10k", root)
    return [_ap10k_pair(p, root) for p in _pair_files(root, split, categories, sample, seed)]


def _ap10k_image_record(key: str, pairs: List[PairRecord]) -> ImageRecord:
    p0 = pairs[0]
    jp = Path(p0.extra["src_json"] if p0.src_key == key else p0.extra["trg_json"])
    d, pts, vis = _ap10k_image(jp)
    l, t, w, h = (float(v) for v in d["bbox"])
    extra = {"family": d.get("supercategory"), "species": d.get("name"), "coco_visibility": [int(v) for v in vis],
             "image_id": d.get("image_id", d.get("id"))}
    return ImageRecord(key, str(_ap10k_jpeg(jp, d)), str(d.get("name") or jp.parent.name), int(d["width"]),
                       int(d["height"]), pts, (l, t, l + w, t + h), extra)


# --------------------------------------------------------------------------- public API
_READERS = {"spair": read_spair, "pfpascal": read_pfpascal, "ap10k": read_ap10k}


def read_pairs(fmt: str, root, split: str = "test", *, categories: Optional[Sequence[str]] = None,
               sample: Optional[int] = None, seed: int = 0) -> List[PairRecord]:
    """The evaluation pairs of a benchmark split, sorted by category then identifier.

    Args:
        fmt: ``"spair"``, ``"pfpascal"`` or ``"ap10k"``.
        root: the benchmark's folder (module docstring).
        split: ``"test"`` (the paper's), ``"val"``, ... as the benchmark names them.
        categories: only these categories (default: all).
        sample: at most this many pairs per category, drawn without replacement with a
            seeded ``random.Random`` (sd-dino's ``--SAMPLE`` draws with replacement).
        seed: the sampling seed.
    """
    _check_root(fmt, root)
    cats = None if categories is None else set(categories)
    records = _READERS[fmt](root, split, cats, sample, seed)
    return sorted(records, key=lambda r: (r.category, r.pair))


def read_images(fmt: str, root, pairs: Sequence[PairRecord]) -> List[ImageRecord]:
    """One :class:`ImageRecord` per image the ``pairs`` use (by key), sorted by key."""
    root = _check_root(fmt, root)
    by_key: Dict[str, List[PairRecord]] = {}
    for p in pairs:
        by_key.setdefault(p.src_key, []).append(p)
        by_key.setdefault(p.trg_key, []).append(p)
    out = []
    for key in sorted(by_key):
        if fmt == "spair":
            out.append(_spair_image(root, key, by_key[key]))
        elif fmt == "ap10k":
            out.append(_ap10k_image_record(key, by_key[key]))
        else:
            out.append(_pfpascal_image_record(root, key, by_key[key]))
    return out


__all__ = [
    "FORMATS", "ALPHAS", "THRESHOLDS", "PASCAL_CLASSES", "PAPER_TEST_PAIRS", "AP10K_KEYPOINTS",
    "SPAIR_LEFT_RIGHT", "SPAIR_NUM_KEYPOINTS", "BenchmarkFormatError", "PairRecord", "ImageRecord",
    "keypoint_names", "flip_pairs", "skeleton_edges", "read_pairs", "read_images",
    "read_spair", "read_pfpascal", "read_ap10k", "pfpascal_csv",
]
