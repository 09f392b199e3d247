"""Benchmarks into FiftyOne: SPair-71k, PF-Pascal and AP-10K as datasets with their pairs.

:func:`import_benchmark` reads a split with :mod:`fiftyone_sdcorr.core.benchmarks.formats`
and writes one sample per image the split's pairs use:

- ``filepath``; tags: the split and the format; ``category`` (string; AP-10K: the
  species, with ``family`` in ``benchmark_attributes``); ``benchmark_key`` (the image's
  key, e.g. ``"cat/2008_000123"``);
- ``keypoints`` (``fo.Keypoints``, one ``fo.Keypoint`` labelled with the category):
  point ``i`` is keypoint id ``i`` of the category (NaN where not annotated; the
  ``visible`` attribute lists which are), normalised to ``[0, 1]``; PF-Pascal images get
  points only from their ``Annotations/*.mat`` files;
- ``detections`` (``fo.Detections``): the object's box;
- ``benchmark_attributes``: the benchmark's other per-image facts (SPair pose, truncation;
  AP-10K COCO visibility flags, ...);
- ``benchmark_pairs`` on each **target** image: the pairs it is the target of, each a
  dict ``{"pair", "category", "source_id", "source_key", "src_kps", "trg_kps", "kp_ids",
  "threshold", "num_keypoints", "src_size", "trg_size", "extra"}`` with the pair's own
  pixel coordinates (``None`` for a point not annotated): the collection that
  :func:`benchmark_pairs` turns back into the records ``evaluate_pairs`` scores.

Keypoint names become skeleton metadata so flip alignment finds left/right pairs: the
dataset's skeleton for the keypoints field when every image shares one keypoint list
(AP-10K, or a single SPair-71k / PF-Pascal category), and always
``dataset.info["sdcorr_benchmark"]["skeletons"][category]`` (``labels``, ``edges``,
``flip_pairs``); :func:`benchmark_flip_pairs` reads them for ``flip_pairs=``.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import fiftyone as fo

from fiftyone_sdcorr.core.benchmarks.formats import (
    FORMATS,
    ImageRecord,
    PairRecord,
    flip_pairs,
    keypoint_names,
    points_array,
    read_images,
    read_pairs,
    skeleton_edges,
)
from fiftyone_sdcorr.dataset.engine import (
    ParameterError,
    check_bool,
    check_choice,
    check_field_name,
    check_int,
    check_str,
)
from fiftyone_sdcorr.dataset.progress import Progress, ProgressArg

INFO_KEY = "sdcorr_benchmark"


@dataclass(frozen=True)
class BenchmarkImportConfig:
    """``import_benchmark``'s parameters, checked before anything is read or written."""

    format: str
    root: str
    split: str = "test"
    name: Optional[str] = None
    categories: Optional[Tuple[str, ...]] = None
    sample: Optional[int] = None
    seed: int = 0
    keypoints_field: str = "keypoints"
    boxes_field: str = "detections"
    pairs_field: str = "benchmark_pairs"
    overwrite: bool = False
    persistent: bool = False

    def __post_init__(self):
        check_choice("format", self.format, FORMATS)
        check_str("root", self.root)
        if not os.path.isdir(os.path.expanduser(self.root)):
            raise ParameterError(f"parameter 'root': {self.root} is not a folder")
        check_str("split", self.split)
        if self.name is not None:
            check_str("name", self.name)
        if self.categories is not None:
            if isinstance(self.categories, str):
                raise ParameterError(f"parameter 'categories' must be a list of names, got {self.categories!r}")
            object.__setattr__(self, "categories", tuple(check_str("categories", c) for c in self.categories))
        if self.sample is not None:
            check_int("sample", self.sample, lo=1)
        check_int("seed", self.seed)
        names = [check_field_name(p, getattr(self, p)) for p in ("keypoints_field", "boxes_field", "pairs_field")]
        if len(set(names)) != 3:
            raise ParameterError(f"parameters 'keypoints_field', 'boxes_field', 'pairs_field' must differ, got {names}")
        check_bool("overwrite", self.overwrite)
        check_bool("persistent", self.persistent)

    def dataset_name(self) -> str:
        return self.name or f"{self.format}-{self.split}"


# --------------------------------------------------------------------------- public API
def import_benchmark(
    format: str,
    root,
    split: str = "test",
    *,
    name: Optional[str] = None,
    categories: Optional[Sequence[str]] = None,
    sample: Optional[int] = None,
    seed: int = 0,
    keypoints_field: str = "keypoints",
    boxes_field: str = "detections",
    pairs_field: str = "benchmark_pairs",
    overwrite: bool = False,
    persistent: bool = False,
    progress: ProgressArg = True,
) -> fo.Dataset:
    """Imports a benchmark split (module docstring) as a new FiftyOne dataset.

    Args:
        format: ``"spair"``, ``"pfpascal"`` or ``"ap10k"``.
        root: the benchmark's folder (:mod:`fiftyone_sdcorr.core.benchmarks.formats`).
        split: the split whose pairs (and their images) are imported.
        name: the dataset's name (default ``"<format>-<split>"``); an existing dataset of
            that name is replaced only with ``overwrite=True``.
        categories, sample, seed: only these categories / at most ``sample`` pairs per
            category, exactly as ``evaluate-pairs`` selects them.
        keypoints_field, boxes_field, pairs_field: the fields written.
        persistent: keep the dataset after the session ends.
        progress: a FiftyOne progress bar (True / False / None) or ``callback(fraction, label)``.

    Returns:
        the dataset; ``dataset.info["sdcorr_benchmark"]`` records the format, root, split,
        counts and per-category skeletons.
    """
    cfg = BenchmarkImportConfig(format, os.fspath(root), split, name, categories, sample, seed,
                                keypoints_field, boxes_field, pairs_field, overwrite, persistent)
    pairs = read_pairs(cfg.format, cfg.root, cfg.split, categories=cfg.categories, sample=cfg.sample, seed=cfg.seed)
    if not pairs:
        raise ParameterError(f"no {cfg.format} pairs for split {cfg.split!r} under {cfg.root}")
    images = read_images(cfg.format, cfg.root, pairs)
    dataset = _new_dataset(cfg)
    bar = Progress(progress, len(images) + len(pairs), "importing")
    try:
        ids = _add_images(dataset, images, cfg, bar)
        _add_pairs(dataset, pairs, ids, cfg, bar)
        _describe(dataset, cfg, images, pairs)
        _take_name(dataset, cfg)
    except BaseException:
        dataset.delete()
        raise
    finally:
        bar.close()
    return dataset


def benchmark_pairs(samples, pairs_field: Optional[str] = None) -> List[PairRecord]:
    """The pairs stored by :func:`import_benchmark` whose target is in ``samples``, as
    records for :func:`fiftyone_sdcorr.pair_eval.evaluate_pairs` (``records=``), with the
    samples' file paths; sorted by category and identifier."""
    root = samples._root_dataset
    info = (root.info or {}).get(INFO_KEY) or {}
    field = pairs_field or info.get("pairs_field") or "benchmark_pairs"
    if not root.has_sample_field(field):
        raise ParameterError(f"parameter 'pairs_field': {root.name!r} has no field {field!r} "
                             "(import the benchmark with import_benchmark first)")
    ids, paths, lists = samples.values("id"), samples.values("filepath"), samples.values(field)
    path_of = dict(zip(root.values("id"), root.values("filepath")))
    out = []
    for sid, trg, items in zip(ids, paths, lists):
        for d in items or []:
            out.append(_record_of(d, path_of.get(d["source_id"], ""), trg, sid))
    return sorted(out, key=lambda r: (r.category, r.pair))


def benchmark_flip_pairs(dataset, category: str) -> List[Tuple[int, int]]:
    """The left/right keypoint-id pairs of ``category`` recorded at import (for
    ``propagate_keypoints(..., flip=True, flip_pairs=...)`` on a view of one category)."""
    sk = (((dataset.info or {}).get(INFO_KEY) or {}).get("skeletons") or {}).get(category)
    if sk is None:
        raise ParameterError(f"parameter 'category': no skeleton recorded for {category!r}")
    return [tuple(p) for p in sk["flip_pairs"]]


# --------------------------------------------------------------------------- steps
def _new_dataset(cfg: BenchmarkImportConfig) -> fo.Dataset:
    """The import goes into a new, non-persistent dataset of a temporary name; only when
    it is complete does it replace an existing dataset (:func:`_take_name`), so a failed
    import (a bad file, a full disk, Ctrl-C) leaves the old one as it was."""
    name = cfg.dataset_name()
    if fo.dataset_exists(name) and not cfg.overwrite:
        raise ParameterError(f"parameter 'name': dataset {name!r} exists; choose another name or pass "
                             "overwrite=True")
    return fo.Dataset(f"{name}.importing-{uuid.uuid4().hex[:12]}")


def _take_name(dataset: fo.Dataset, cfg: BenchmarkImportConfig) -> None:
    name = cfg.dataset_name()
    if fo.dataset_exists(name):
        if not cfg.overwrite:  # created by someone else meanwhile
            raise ParameterError(f"parameter 'name': dataset {name!r} exists; choose another name or pass "
                                 "overwrite=True")
        fo.delete_dataset(name)
    dataset.name = name
    dataset.persistent = cfg.persistent


def _add_images(dataset, images: List[ImageRecord], cfg: BenchmarkImportConfig, bar: Progress) -> Dict[str, str]:
    """One sample per image; returns ``{image key: sample id}``."""
    samples = []
    for img in images:
        s = fo.Sample(filepath=os.path.abspath(img.path), tags=[cfg.split, cfg.format], category=img.category,
                      benchmark_key=img.key, benchmark_attributes=_jsonable(img.extra))
        kp = _keypoints(img, cfg.format)
        if kp is not None:
            s[cfg.keypoints_field] = kp
        if img.bbox is not None:
            s[cfg.boxes_field] = _detections(img)
        samples.append(s)
    ids = dataset.add_samples(samples, progress=False)
    bar.update(len(images))
    return {img.key: sid for img, sid in zip(images, ids)}


def _keypoints(img: ImageRecord, fmt: str) -> Optional[fo.Keypoints]:
    if not len(img.points):
        return None
    pts = img.points / np.array([img.width, img.height], dtype=np.float64)
    visible = np.isfinite(pts).all(axis=1)
    points = [[float(x), float(y)] if v else [float("nan"), float("nan")] for (x, y), v in zip(pts, visible)]
    attrs = {"visible": [2 if v else 0 for v in visible]}  # COCO's: 2 visible, 0 not labelled
    if "coco_visibility" in img.extra:
        attrs["coco_visibility"] = list(img.extra["coco_visibility"])
    return fo.Keypoints(keypoints=[fo.Keypoint(label=img.category, points=points, **attrs)])


def _detections(img: ImageRecord) -> fo.Detections:
    x1, y1, x2, y2 = img.bbox
    w, h = float(img.width), float(img.height)
    box = [x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h]
    return fo.Detections(detections=[fo.Detection(label=img.category, bounding_box=box)])


def _add_pairs(dataset, pairs: List[PairRecord], ids: Dict[str, str], cfg: BenchmarkImportConfig,
               bar: Progress) -> None:
    """Each pair as a dict in ``pairs_field`` of its target sample."""
    by_target: Dict[str, list] = {}
    for p in pairs:
        d = p.to_dict()
        entry = {k: d[k] for k in ("pair", "category", "src_kps", "trg_kps", "kp_ids", "threshold",
                                   "num_keypoints", "src_size", "trg_size", "extra")}
        entry.update(source_id=ids[p.src_key], source_key=p.src_key)
        by_target.setdefault(ids[p.trg_key], []).append(_jsonable(entry))
    dataset.add_sample_field(cfg.pairs_field, fo.ListField, subfield=fo.DictField)
    dataset.set_values(cfg.pairs_field, {sid: by_target.get(sid, []) for sid in ids.values()}, key_field="id")
    bar.update(len(pairs))


def _describe(dataset, cfg: BenchmarkImportConfig, images: List[ImageRecord], pairs: List[PairRecord]) -> None:
    """Skeletons (per category in ``info``; on the keypoints field when shared) and the
    import's facts in ``dataset.info``."""
    sizes: Dict[str, int] = {}
    for img in images:
        sizes[img.category] = max(sizes.get(img.category, 0), len(img.points))
    for p in pairs:
        sizes[p.category] = max(sizes.get(p.category, 0), p.num_keypoints)
    skeletons = {c: {"labels": keypoint_names(cfg.format, c, n), "edges": [list(e) for e in skeleton_edges(cfg.format)],
                     "flip_pairs": [list(fp) for fp in flip_pairs(cfg.format, c)]} for c, n in sorted(sizes.items())}
    shared = {tuple(s["labels"]) for c, s in skeletons.items() if c in {i.category for i in images}}
    if len(shared) == 1:
        edges = [list(e) for e in skeleton_edges(cfg.format)]
        dataset.skeletons = {cfg.keypoints_field: fo.KeypointSkeleton(labels=list(next(iter(shared))), edges=edges)}
    dataset.info[INFO_KEY] = {
        "format": cfg.format, "root": os.path.abspath(os.path.expanduser(cfg.root)), "split": cfg.split,
        "categories": sorted({p.category for p in pairs}), "sample": cfg.sample, "seed": cfg.seed,
        "images": len(images), "pairs": len(pairs), "keypoints_field": cfg.keypoints_field,
        "boxes_field": cfg.boxes_field, "pairs_field": cfg.pairs_field, "skeletons": skeletons,
        "warnings": [w for p in pairs for w in (p.extra or {}).get("warnings", [])],
    }
    dataset.save()


def _record_of(d: dict, src: str, trg: str, target_id: str) -> PairRecord:
    extra = dict(d.get("extra") or {})
    extra["target_id"] = target_id
    return PairRecord(pair=d["pair"], category=d["category"], src=src, trg=trg,
                      src_size=tuple(d["src_size"]), trg_size=tuple(d["trg_size"]),
                      src_kps=points_array(d["src_kps"]), trg_kps=points_array(d["trg_kps"]),
                      kp_ids=tuple(int(i) for i in d["kp_ids"]), threshold=float(d["threshold"]),
                      num_keypoints=int(d["num_keypoints"]), src_key=d.get("source_key", ""),
                      trg_key="", extra=extra)


def _jsonable(v):
    """Numbers, strings, lists and dicts only; NaN / inf -> None (BSON and JSON alike)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


# --------------------------------------------------------------------------- command line
def main_import(args) -> int:
    """``python -m fiftyone_sdcorr import-benchmark``: 0 on success; expected failures
    raise (the command line prints them as one line on stderr and exits 2)."""
    ds = import_benchmark(args.format, args.root, args.split, name=args.name, categories=args.categories,
                          sample=args.sample, seed=args.seed, overwrite=args.overwrite,
                          persistent=not args.temporary, progress=not args.no_progress)
    info = ds.info[INFO_KEY]
    print(f"dataset {ds.name!r}: {info['images']} images, {info['pairs']} pairs in "
          f"{len(info['categories'])} categories ({info['format']} {info['split']})")
    for w in info.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    return 0


__all__ = ["import_benchmark", "benchmark_pairs", "benchmark_flip_pairs", "BenchmarkImportConfig", "main_import",
           "INFO_KEY"]
