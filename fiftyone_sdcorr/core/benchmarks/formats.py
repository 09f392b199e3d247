"""Readers of the semantic-correspondence benchmarks' own files: SPair-71k, PF-Pascal, AP-10K.

Each reader turns a benchmark's files into :class:`PairRecord` objects (one per test pair:
the two images, the keypoints in pixels, which are visible, the PCK threshold size ``T``)
and, for the importers, :class:`ImageRecord` objects (one per image). Nothing here scores
anything (:mod:`fiftyone_sdcorr.core.benchmarks.pck`) or speaks FiftyOne
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

from fiftyone_sdcorr.core.common.geometry import points_array
from fiftyone_sdcorr.core.common.images import image_size
from fiftyone_sdcorr.core.benchmarks.errors import BenchmarkFormatError
from fiftyone_sdcorr.core.benchmarks.flow_io import flo_size
from fiftyone_sdcorr.core.common.params import ParameterError, check_int

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


# --------------------------------------------------------------------------- field checks
# One set of checks for every reader (and for predictions files): each returns the
# value in the form the records hold, or raises BenchmarkFormatError naming ``where``
# (the file, and the pair or row), the field (with its index) and the value found.
def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(where: str, field: str, want: str, got) -> BenchmarkFormatError:
    return BenchmarkFormatError(f"{where}: field {field!r} must be {want}, got {_show(got)}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(v, where: str, field: str) -> float:
    if not _is_num(v):
        raise _bad(where, field, "a finite number", v)
    return float(v)


def _dim(v, where: str, field: str) -> int:
    """A positive whole number of pixels."""
    if not _is_num(v) or float(v) != int(v) or v <= 0:
        raise _bad(where, field, "a positive integer (pixels)", v)
    return int(v)


def _text(v, where: str, field: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _bad(where, field, "a non-empty string", v)
    return v


def _size(v, where: str, field: str) -> Tuple[int, int]:
    """``[W, H]`` or ``[W, H, C]``, positive integers."""
    if not isinstance(v, (list, tuple)) or len(v) not in (2, 3):
        raise _bad(where, field, "[width, height] or [width, height, channels]", v)
    return _dim(v[0], where, f"{field}[0]"), _dim(v[1], where, f"{field}[1]")


def _box(v, where: str, field: str, xywh: bool = False) -> Tuple[float, float, float, float]:
    """``[x1, y1, x2, y2]`` (``xywh``: ``[left, top, w, h]``) of positive area -> x1 y1 x2 y2."""
    want = "[left, top, width, height]" if xywh else "[x1, y1, x2, y2]"
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise _bad(where, field, f"4 numbers {want}", v)
    a, b, c, d = (_number(x, where, f"{field}[{i}]") for i, x in enumerate(v))
    x2, y2 = (a + c, b + d) if xywh else (c, d)
    if not (x2 > a and y2 > b):
        raise _bad(where, field, f"a box {want} of positive width and height", v)
    return a, b, x2, y2


def checked_points(v, where: str, field: str) -> np.ndarray:
    """``[[x, y] | null, ...]`` -> ``(K, 2)`` float64 (NaN for null); every entry checked,
    so a bad entry is an error, never a dropped point."""
    if not isinstance(v, (list, tuple)):
        raise _bad(where, field, "a list of [x, y] or null", v)
    out = np.full((len(v), 2), np.nan)
    for i, xy in enumerate(v):
        if xy is None:
            continue
        if not (isinstance(xy, (list, tuple)) and len(xy) == 2 and all(_is_num(c) for c in xy)):
            raise _bad(where, f"{field}[{i}]", "[x, y] (two finite numbers) or null", xy)
        out[i] = (float(xy[0]), float(xy[1]))
    return out


def _keypoint_id(v, where: str, field: str, n: Optional[int]) -> int:
    """A keypoint id (an integer or its decimal string: SPair writes ``"3"``) in ``0 .. n-1``."""
    ok = (isinstance(v, str) and v.strip().isdigit()) or (_is_num(v) and float(v) == int(v) and v >= 0)
    i = int(v) if ok else -1
    if not ok or (n is not None and i >= n):
        raise _bad(where, field, "a keypoint id " + (f"in 0..{n - 1}" if n else ">= 0"), v)
    return i


def _keypoint_ids(v, where: str, field: str, n: Optional[int]) -> Tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise _bad(where, field, "a list of keypoint ids", v)
    ids = tuple(_keypoint_id(x, where, f"{field}[{i}]", n) for i, x in enumerate(v))
    if len(set(ids)) != len(ids):
        raise _bad(where, field, "distinct keypoint ids", v)
    return ids


def _box_warning(where: str, field: str, box, size) -> Optional[str]:
    """Suspicious geometry: a box reaching well outside its image (T, hence PCK, is then
    not what the benchmark means). Tolerance: 2% of the image's longer side, at least 2 px."""
    w, h = size
    tol = max(2.0, 0.02 * max(w, h))
    x1, y1, x2, y2 = box
    if x1 < -tol or y1 < -tol or x2 > w + tol or y2 > h + tol:
        return (f"{where}: field {field!r} {[round(float(c), 2) for c in box]} reaches outside the "
                f"{w} x {h} image; T comes from this box")
    return None


def _load_json(path: Path, kind: str = "an object") -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BenchmarkFormatError(f"missing file {path}") from None
    except OSError as e:
        raise BenchmarkFormatError(f"{path}: not readable ({e.strerror or e})") from None
    if data[:2] == b"\x1f\x8b":
        raise BenchmarkFormatError(f"{path}: gzip-compressed; decompress it first")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BenchmarkFormatError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise BenchmarkFormatError(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


def _require(d: dict, keys: Iterable[str], where) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise BenchmarkFormatError(f"{where}: missing field(s) {missing}")


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
        by_cat.setdefault(_pair_category(p.stem), []).append(p)
    by_cat = _only_categories(by_cat, categories, f"split {split!r} ({folder})")
    by_cat = _sample_per_category(by_cat, sample, seed)
    return [p for cat in sorted(by_cat) for p in by_cat[cat]]


def _only_categories(by_cat: Dict[str, list], categories, where: str) -> Dict[str, list]:
    """The requested categories; a name with no pairs in the split is an error (a typo
    must not silently evaluate nothing, or less than asked)."""
    if categories is None:
        return by_cat
    unknown = sorted(set(categories) - set(by_cat))
    if unknown:
        raise ParameterError(f"parameter 'categories': {unknown} not in {where}; categories there: "
                             f"{sorted(by_cat)}")
    return {c: v for c, v in by_cat.items() if c in categories}


def _box_size(box) -> float:
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, y2 - y1)


# --------------------------------------------------------------------------- SPair-71k
def _spair_pair(path: Path, root: Path) -> PairRecord:
    d = _load_json(path)
    where = f"{path} (pair {path.stem!r})"
    _require(d, ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "kps_ids", "src_bndbox",
                 "trg_bndbox", "src_imsize", "trg_imsize"), where)
    cat = _text(d["category"], where, "category")
    if _pair_category(path.stem) not in ("", cat):
        raise _bad(where, "category", f"the file name's category {_pair_category(path.stem)!r}", cat)
    src_kps = checked_points(d["src_kps"], where, "src_kps")
    trg_kps = checked_points(d["trg_kps"], where, "trg_kps")
    ids = _keypoint_ids(d["kps_ids"], where, "kps_ids", SPAIR_NUM_KEYPOINTS.get(cat))
    if not (len(src_kps) == len(trg_kps) == len(ids)):
        raise BenchmarkFormatError(f"{where}: fields 'src_kps' ({len(src_kps)}), 'trg_kps' ({len(trg_kps)}) and "
                                   f"'kps_ids' ({len(ids)}) differ in length")
    src_size, trg_size = _size(d["src_imsize"], where, "src_imsize"), _size(d["trg_imsize"], where, "trg_imsize")
    src_box, trg_box = _box(d["src_bndbox"], where, "src_bndbox"), _box(d["trg_bndbox"], where, "trg_bndbox")
    src_name, trg_name = _text(d["src_imname"], where, "src_imname"), _text(d["trg_imname"], where, "trg_imname")
    mirror = d.get("mirror", 0) or 0
    if mirror not in (0, 1) or isinstance(mirror, float):
        raise _bad(where, "mirror", "0 or 1", mirror)
    warning = _box_warning(where, "trg_bndbox", trg_box, trg_size)
    return PairRecord(
        pair=path.stem, category=cat,
        src=str(root / "JPEGImages" / cat / src_name), trg=str(root / "JPEGImages" / cat / trg_name),
        src_size=src_size, trg_size=trg_size, src_kps=src_kps, trg_kps=trg_kps, kp_ids=ids,
        threshold=_box_size(trg_box), num_keypoints=SPAIR_NUM_KEYPOINTS.get(cat) or max(ids, default=-1) + 1,
        src_key=f"{cat}/{Path(src_name).stem}", trg_key=f"{cat}/{Path(trg_name).stem}",
        extra={"mirror": int(mirror), "src_bndbox": list(src_box), "trg_bndbox": list(trg_box),
               **({"warnings": [warning]} if warning else {}),
               **{k: d[k] for k in ("viewpoint_variation", "scale_variation", "truncation", "occlusion") if k in d}},
    )


def _spair_image(root: Path, key: str, pairs: List[PairRecord]) -> ImageRecord:
    """From ``ImageAnnotation/{category}/{stem}.json`` when present, else from the pairs."""
    cat, stem = key.split("/", 1)
    path = pairs[0].src if pairs[0].src_key == key else pairs[0].trg
    ann = root / "ImageAnnotation" / cat / f"{stem}.json"
    if not ann.is_file():
        return _image_from_pairs(key, str(path), cat, pairs)
    d = _load_json(ann)
    where = f"{ann} (image {key!r})"
    _require(d, ("image_width", "image_height", "kps"), where)
    w, h = _dim(d["image_width"], where, "image_width"), _dim(d["image_height"], where, "image_height")
    kps = d["kps"] or {}
    if not isinstance(kps, dict):
        raise _bad(where, "kps", '{"<id>": [x, y] or null}', kps)
    # the category's ids (files may list more, null, ids: SPair pads every list to 30)
    ids = {_keypoint_id(k, where, f"kps[{k}]", None): k for k in kps}
    given = {i: checked_points([kps[k]], where, f"kps[{k}]")[0] for i, k in ids.items()}
    n = max([SPAIR_NUM_KEYPOINTS.get(cat) or len(kps)] + [i + 1 for i, xy in given.items() if np.isfinite(xy).all()])
    pts = np.full((n, 2), np.nan)
    for i, xy in given.items():
        if i < n:
            pts[i] = xy
    extra = {k: d[k] for k in ("pose", "truncated", "occluded", "difficult", "azimuth_id") if k in d}
    box = _box(d["bndbox"], where, "bndbox") if d.get("bndbox") is not None else None
    return ImageRecord(key, str(path), cat, w, h, pts, box, extra)


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


def _coords(text: str, where: str, field: str) -> np.ndarray:
    vals = [v.strip() for v in str(text).replace(",", ";").split(";") if v.strip()]
    try:
        out = np.asarray([float(v) for v in vals], dtype=np.float64)
    except ValueError:
        out = None
    if out is None or not np.isfinite(out).all():
        raise _bad(where, field, "';'-separated finite numbers", text)
    return out


def _pf_class(row: List[str], where: str) -> str:
    """The category of a row's 1-based ``class`` (1..20; 0 or 21 never wrap around)."""
    text = row[2].strip() if len(row) > 2 else ""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v == int(v) and 1 <= v <= len(PASCAL_CLASSES)):
        raise _bad(where, "class", f"an integer in 1..{len(PASCAL_CLASSES)} (PASCAL VOC classes)", text)
    return PASCAL_CLASSES[int(v) - 1]


def _pfpascal_row(row: List[str], i: int, root: Path, csv_path: Path) -> PairRecord:
    where = f"{csv_path}, data row {i}"
    if len(row) < 7:
        raise BenchmarkFormatError(f"{where}: expected 7 columns (source_image, target_image, class, XA, YA, XB, "
                                   f"YB), got {len(row)}; PF-Pascal's training list has no keypoints")
    cat = _pf_class(row, where)
    xa, ya, xb, yb = (_coords(v, where, f) for v, f in zip(row[3:7], ("XA", "YA", "XB", "YB")))
    if not (len(xa) == len(ya) == len(xb) == len(yb)):
        raise BenchmarkFormatError(f"{where}: fields 'XA', 'YA', 'XB', 'YB' hold {len(xa)}, {len(ya)}, {len(xb)}, "
                                   f"{len(yb)} values")
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
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise BenchmarkFormatError(f"{csv_path}: not a readable CSV pair list ({e})") from None
    if not rows:
        raise BenchmarkFormatError(f"{csv_path} is empty")
    body = rows[1:] if not _is_number(rows[0][2] if len(rows[0]) > 2 else "") else rows
    by_cat: Dict[str, List[int]] = {}
    for i, row in enumerate(body):
        by_cat.setdefault(_pf_class(row, f"{csv_path}, data row {i}"), []).append(i)
    by_cat = _only_categories(by_cat, categories, f"split {split!r} ({csv_path})")
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
        pts, box = _mat_fields(m, f"{mat} (image {key!r})")
    return ImageRecord(key, path, cat, int(size[0]), int(size[1]), pts, box, {})


def _mat_fields(m: dict, where: str):
    """``kps`` (N x 2, NaN = absent) and ``bbox`` (x1 y1 x2 y2) of a PF-Pascal ``.mat``."""
    pts, box = np.zeros((0, 2)), None
    try:
        if "kps" in m:
            pts = np.asarray(m["kps"], dtype=np.float64)
        if "bbox" in m:
            box = np.asarray(m["bbox"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise BenchmarkFormatError(f"{where}: fields 'kps' and 'bbox' must be numeric arrays") from None
    if "kps" in m and (pts.ndim != 2 or pts.shape[1] != 2 or np.isinf(pts).any()):
        raise _bad(where, "kps", "an N x 2 array of pixel coordinates", f"shape {pts.shape}")
    if box is not None:
        box = _box([float(v) for v in box], where, "bbox")
    return pts, box


# --------------------------------------------------------------------------- AP-10K
def _ap10k_path(root: Path, written, where: str, field: str) -> Path:
    """A path as GeoAware-SC wrote it (``data/ap-10k/ImageAnnotation/...``) -> under ``root``."""
    text = _text(written, where, field).replace("\\", "/")
    p = Path(text)
    if p.is_absolute() and p.is_file():
        return p
    idx = text.find("ImageAnnotation/")
    if idx < 0 or ".." in Path(text[idx:]).parts:
        raise _bad(where, field, "a path into ImageAnnotation/", written)
    return root / text[idx:]


def _ap10k_image(path: Path, pair: str = "") -> Tuple[dict, np.ndarray, np.ndarray]:
    """An image's JSON: ``(dict, (17, 2) points with NaN where v == 0, (17,) v)``; its
    ``keypoints``, ``bbox``, ``width`` and ``height`` checked."""
    d = _load_json(path)
    where = f"{path} (image of pair {pair!r})" if pair else str(path)
    _require(d, ("keypoints", "bbox", "width", "height"), where)
    n = 3 * len(AP10K_KEYPOINTS)
    kv = d["keypoints"]
    if not isinstance(kv, list) or len(kv) != n:
        raise _bad(where, "keypoints", f"{n} numbers ({len(AP10K_KEYPOINTS)} x [x, y, v])",
                   f"{len(kv)} values" if isinstance(kv, list) else kv)
    kv = np.asarray([_number(v, where, f"keypoints[{i}]") for i, v in enumerate(kv)]).reshape(-1, 3)
    if not np.isin(kv[:, 2], (0, 1, 2)).all():
        j = int(np.flatnonzero(~np.isin(kv[:, 2], (0, 1, 2)))[0])
        raise _bad(where, f"keypoints[{3 * j + 2}]", "a visibility flag 0, 1 or 2", kv[j, 2])
    size = (_dim(d["width"], where, "width"), _dim(d["height"], where, "height"))
    d["_box"] = _box(d["bbox"], where, "bbox", xywh=True)
    d["_size"], d["_where"] = size, where
    pts = np.where((kv[:, 2] > 0)[:, None], kv[:, :2], np.nan)
    return d, pts, kv[:, 2]


def _ap10k_jpeg(json_path: Path, d: dict) -> Path:
    rel = str(json_path).replace("ImageAnnotation", "JPEGImages")
    jpg = Path(rel).with_suffix(".jpg")
    if not jpg.is_file() and isinstance(d.get("file_name"), str) and d["file_name"]:
        alt = jpg.parent / d["file_name"]
        return alt if alt.is_file() else jpg
    return jpg


def _ap10k_key(json_path: Path) -> str:
    return f"{json_path.parent.name}/{json_path.stem}"


def _ap10k_pair(path: Path, root: Path) -> PairRecord:
    d = _load_json(path)
    where = f"{path} (pair {path.stem!r})"
    _require(d, ("src_json_path", "trg_json_path"), where)
    sj = _ap10k_path(root, d["src_json_path"], where, "src_json_path")
    tj = _ap10k_path(root, d["trg_json_path"], where, "trg_json_path")
    (sd, sp, _), (td, tp, _) = _ap10k_image(sj, path.stem), _ap10k_image(tj, path.stem)
    l, t, r, b = td["_box"]
    warning = _box_warning(td["_where"], "bbox", td["_box"], td["_size"])
    return PairRecord(
        pair=path.stem, category=_pair_category(path.stem), src=str(_ap10k_jpeg(sj, sd)),
        trg=str(_ap10k_jpeg(tj, td)), src_size=sd["_size"], trg_size=td["_size"], src_kps=sp, trg_kps=tp,
        kp_ids=tuple(range(len(sp))), threshold=float(max(r - l, b - t)),
        num_keypoints=len(sp), src_key=_ap10k_key(sj), trg_key=_ap10k_key(tj),
        extra={"src_json": str(sj), "trg_json": str(tj), **({"warnings": [warning]} if warning else {})},
    )


def read_ap10k(root, split: str = "test", categories=None, sample=None, seed: int = 0) -> List[PairRecord]:
    root = _check_root("ap10k", root)
    return [_ap10k_pair(p, root) for p in _pair_files(root, split, categories, sample, seed)]


def _ap10k_image_record(key: str, pairs: List[PairRecord]) -> ImageRecord:
    p0 = pairs[0]
    jp = Path(p0.extra["src_json"] if p0.src_key == key else p0.extra["trg_json"])
    d, pts, vis = _ap10k_image(jp)
    extra = {"family": d.get("supercategory"), "species": d.get("name"), "coco_visibility": [int(v) for v in vis],
             "image_id": d.get("image_id", d.get("id"))}
    return ImageRecord(key, str(_ap10k_jpeg(jp, d)), str(d.get("name") or jp.parent.name), d["_size"][0],
                       d["_size"][1], pts, d["_box"], extra)


# --------------------------------------------------------------------------- TSS (dense flow)
#: TSS's three subsets, in the order sd-dino's ``pck_tss.py`` evaluates them
TSS_SUBSETS = ("FG3DCar", "JODS", "PASCAL")
#: PCK alphas of TSS (``pck_tss.py`` computes these four; the paper reports 0.05)
TSS_ALPHAS = (0.01, 0.05, 0.10, 0.15)
#: PCK@0.05 (percent) the paper reports for fused SD + DINOv2 on each TSS subset. Not
#: found in the sources this package was written from (sd-dino's README gives no TSS
#: numbers); ``None`` until someone copies them from the paper's table.
TSS_PAPER_PCK = {"FG3DCar": None, "JODS": None, "PASCAL": None}
#: folder-name prefixes renamed to PASCAL VOC classes (as ``make_dataset`` in sd-dino's
#: ``utils/utils_tss.py`` does)
_TSS_CLASS_NAMES = {"busd": "bus", "bike": "bicycle", "plane": "aeroplane", "suv": "car"}
_TSS_FILES = ("image1.png", "image2.png", "flow1.flo", "flow2.flo", "mask1.png", "mask2.png")


@dataclass
class TssPair:
    """One directed TSS pair: the flow on the target image to the source image.

    Attributes:
        pair: ``"{subset}/{folder}/flow{n}"`` (``n``: the target image's number), also the
            relative path (plus ``.flo`` / ``.npy``) of its file in a predictions folder.
        subset, category, folder: where it comes from (``folder``: the pair folder).
        src, trg: the two images; src_size, trg_size: their ``(W, H)``.
        flow, mask: ground-truth ``flow{n}.flo`` and correspondence ``mask{n}.png``, both
            on the target's grid; src_mask: the source's ``mask{m}.png`` (only for
            matching restricted to the objects, never for scoring).
        threshold: ``L = max(H, W)`` of the *source* image (``pckthres`` in sd-dino).
    """

    pair: str
    subset: str
    category: str
    folder: str
    src: str
    trg: str
    src_size: Tuple[int, int]
    trg_size: Tuple[int, int]
    flow: str
    mask: str
    src_mask: str
    threshold: float

    def load_flow(self) -> np.ndarray:
        """The ground-truth flow, ``H x W x 2`` float32 on the target's grid."""
        from fiftyone_sdcorr.core.benchmarks.flow_io import read_flo

        return read_flo(self.flow)

    def load_mask(self) -> np.ndarray:
        """``H x W`` bool: the pixels that count. As sd-dino reads it (grayscale ``/ 255``
        cast to ``uint8``), only pixels of gray value 255 count."""
        return read_tss_mask(self.mask, self.trg_size)


def read_tss_mask(path, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A TSS mask PNG -> ``H x W`` bool (gray == 255), its size checked against ``size``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"))
    except FileNotFoundError:
        raise BenchmarkFormatError(f"missing file {path}") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many kinds for a bad file
        raise BenchmarkFormatError(f"{path}: not a readable mask image ({e})") from None
    if size is not None and (gray.shape[1], gray.shape[0]) != tuple(size):
        raise BenchmarkFormatError(f"{path}: mask is {gray.shape[1]} x {gray.shape[0]}, but its image is "
                                   f"{size[0]} x {size[1]}")
    return gray == 255


def tss_category(subset: str, folder: str) -> str:
    """The PASCAL class of a TSS pair folder (FG3DCar: car; else the folder name's prefix)."""
    if subset == "FG3DCar":
        return "car"
    cat = folder.split("_")[0].lower()
    return _TSS_CLASS_NAMES.get(cat, cat)


def _tss_sizes(folder: Path) -> Dict[int, Tuple[int, int]]:
    """``{n: (W, H)}`` of ``image{n}.png``, with ``flow{n}.flo`` and ``mask{n}.png`` checked
    to be on the same grid (headers only)."""

    missing = [f for f in _TSS_FILES if not (folder / f).is_file()]
    if missing:
        raise BenchmarkFormatError(f"missing file {folder / missing[0]}: TSS pair folder {folder.name} lacks "
                                   f"{missing} (a pair folder holds {list(_TSS_FILES)})")
    sizes = {}
    for n in (1, 2):
        size = image_size(folder / f"image{n}.png")
        flow = flo_size(folder / f"flow{n}.flo")
        if flow != size:
            raise BenchmarkFormatError(f"{folder / f'flow{n}.flo'}: flow is {flow[0]} x {flow[1]}, but "
                                       f"image{n}.png (the grid it lies on) is {size[0]} x {size[1]}")
        mask = image_size(folder / f"mask{n}.png")
        if mask != size:
            raise BenchmarkFormatError(f"{folder / f'mask{n}.png'}: mask is {mask[0]} x {mask[1]}, but "
                                       f"image{n}.png is {size[0]} x {size[1]}")
        sizes[n] = size
    return sizes


def _tss_folder_pairs(subset: str, folder: Path) -> List[TssPair]:
    """The two directed pairs of a folder, in sd-dino's order: image1 -> image2 (the flow
    ``flow2.flo`` on image2), then image2 -> image1 (``flow1.flo`` on image1)."""
    sizes = _tss_sizes(folder)
    cat = tss_category(subset, folder.name)
    out = []
    for s, t in ((1, 2), (2, 1)):
        sw, sh = sizes[s]
        out.append(TssPair(f"{subset}/{folder.name}/flow{t}", subset, cat, str(folder),
                           str(folder / f"image{s}.png"), str(folder / f"image{t}.png"), sizes[s], sizes[t],
                           str(folder / f"flow{t}.flo"), str(folder / f"mask{t}.png"), str(folder / f"mask{s}.png"),
                           float(max(sw, sh))))
    return out


def read_tss(root, subsets: Optional[Sequence[str]] = None, sample: Optional[int] = None) -> List[TssPair]:
    """The TSS pairs as sd-dino's ``utils/utils_tss.py`` prepares them (``TSS_CVPR2016``
    from ``data/prepare_tss.sh``; ``root`` holds the subset folders)::

        {FG3DCar,JODS,PASCAL}/{pair folder}/image1.png image2.png flow1.flo flow2.flo mask1.png mask2.png

    Each pair folder gives two directed pairs (:func:`_tss_folder_pairs`), folders in
    sorted order. ``subsets``: only these (default: all three, each required);
    ``sample``: the first ``sample`` pairs of each subset (sd-dino's ``--SAMPLE`` keeps the
    first ones too). Every file is checked (headers and sizes) before anything is scored.
    """
    root = Path(os.path.expanduser(os.fspath(root))).resolve()
    if not root.is_dir():
        raise BenchmarkFormatError(f"benchmark root {root} is not a folder")
    if isinstance(subsets, str) or (subsets is not None and not all(isinstance(c, str) for c in subsets)):
        raise ParameterError(f"parameter 'categories' must be a list of TSS subsets, got {subsets!r}")
    unknown = sorted(set(subsets or ()) - set(TSS_SUBSETS))
    if unknown:
        raise ParameterError(f"parameter 'categories': unknown TSS subset(s) {unknown}; subsets: {list(TSS_SUBSETS)}")
    if sample is not None:
        check_int("sample", sample, lo=1)
    out: List[TssPair] = []
    for subset in [s for s in TSS_SUBSETS if subsets is None or s in subsets]:
        sub = root / subset
        if not sub.is_dir():
            raise BenchmarkFormatError(f"missing subset folder {sub} (a TSS root, the TSS_CVPR2016 folder, "
                                       f"holds {', '.join(TSS_SUBSETS)})")
        folders = sorted(p for p in sub.iterdir() if p.is_dir())
        if not folders:
            raise BenchmarkFormatError(f"TSS subset folder {sub} holds no pair folders")
        pairs = [p for f in folders for p in _tss_folder_pairs(subset, f)]
        out += pairs[:sample] if sample else pairs
    return out


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
    if isinstance(categories, str) or (categories is not None and not all(isinstance(c, str) for c in categories)):
        raise ParameterError(f"parameter 'categories' must be a list of names, got {categories!r}")
    if sample is not None:
        check_int("sample", sample, lo=1)
    check_int("seed", seed)
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
    "TSS_SUBSETS", "TSS_ALPHAS", "TSS_PAPER_PCK", "TssPair", "read_tss", "read_tss_mask", "tss_category",
]
