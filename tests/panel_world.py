"""A small dataset for the match panel tests (tests/test_panel.py, tests/test_browser.py).

Real photos; ``ref`` (chelsea) carries ground-truth keypoints in ``gt`` with a skeleton;
``target`` is a copy of the same image (an identity pair: every match must land where it
started) that also carries ``gt``; ``ref2`` (coffee) is a second reference; ``plain``
(rocket) has nothing. Dense features come from the deterministic local descriptor
(tests/local_descriptor.py), saved in a real :class:`FeatureStore` with their path in
``sdcorr_features`` and the global vector in ``sdcorr_embedding``; predictions in
``pred`` come from the real :func:`propagate_keypoints`.
"""

import shutil
from dataclasses import dataclass
import sys
from pathlib import Path

import fiftyone as fo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_descriptor import LocalDescriptor  # noqa: E402

from fiftyone_sdcorr.core.features.store import FeatureStore  # noqa: E402

GT_POINTS = [(0.30, 0.35), (0.62, 0.33), (0.46, 0.55), (0.47, 0.72), (float("nan"), float("nan"))]
SKELETON_LABELS = ["left eye", "right eye", "nose", "mouth", "left ear"]
SKELETON_EDGES = [[0, 1], [0, 2], [1, 2], [2, 3]]


def crop_points(points, crop):
    """Normalised points of the full image -> the same points in the crop
    ``(left, top, right, bottom)`` (fractions of the full image)."""
    l, t, r, b = crop
    return [((x - l) / (r - l), (y - t) / (b - t)) for x, y in points]


def build_panel_dataset(name, photo_paths, tmp, persistent=False, size=224, crop=None):
    """Returns ``(dataset, ids, describer)`` with ``ids`` keyed ref/target/ref2/plain.

    ``crop=(left, top, right, bottom)`` (fractions): the target is that crop of the
    reference image instead of a copy, with its ground truth moved accordingly.
    """
    from fiftyone_sdcorr.dataset.propagate import propagate_keypoints

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    if crop is None:
        target_path = tmp / "chelsea_copy.jpg"
        shutil.copy(photo_paths["chelsea"], target_path)
    else:
        from PIL import Image

        target_path = tmp / "chelsea_crop.jpg"
        with Image.open(photo_paths["chelsea"]) as im:
            w, h = im.size
            l, t, r, b = crop
            im.crop((round(l * w), round(t * h), round(r * w), round(b * h))).save(target_path, quality=95)
    dataset = fo.Dataset(name)
    dataset.persistent = persistent
    dataset.skeletons = {"gt": fo.KeypointSkeleton(labels=SKELETON_LABELS, edges=SKELETON_EDGES)}

    def gt(points=GT_POINTS):
        return fo.Keypoints(keypoints=[fo.Keypoint(label="cat", points=list(points))])

    ref = fo.Sample(filepath=photo_paths["chelsea"], gt=gt(), tags=["reference"])
    target = fo.Sample(filepath=str(target_path), gt=gt(GT_POINTS if crop is None else crop_points(GT_POINTS, crop)))
    ref2 = fo.Sample(
        filepath=photo_paths["coffee"],
        gt=fo.Keypoints(keypoints=[fo.Keypoint(
            label="cup", points=[(0.5, 0.5), (0.4, 0.6), (0.6, 0.6), (0.5, 0.7), (0.2, 0.2)])]),
    )
    plain = fo.Sample(filepath=photo_paths["rocket"])
    dataset.add_samples([target, ref, ref2, plain])

    describer = LocalDescriptor(size=size)
    store = FeatureStore(tmp / "store", fsync=False)
    for sample in dataset.select([ref.id, target.id, ref2.id]):
        fused = describer.describe_one(sample.filepath)
        sample["sdcorr_features"] = str(store.save(sample.id, fused))
        sample["sdcorr_embedding"] = fused.global_vector().numpy()
        sample.save()

    propagate_keypoints(
        dataset.select([target.id, ref2.id]), [ref.id], "gt", "pred", extractor=describer,
        visibility_threshold=0.0, soft_argmax=False, progress=False,
    )
    ids = {"ref": ref.id, "target": target.id, "ref2": ref2.id, "plain": plain.id}
    return dataset, ids, describer


@dataclass
class DemoBuild:
    """What the demo command did: the dataset it wrote, its workdir, exit code and output."""

    name: str
    workdir: Path
    returncode: int
    output: str


def run_demo(name, workdir, timeout=900) -> DemoBuild:
    """Runs the README's demo command (``python -m fiftyone_sdcorr demo --tiny --no-app``,
    offline) into dataset ``name``: the reference tagged ``reference`` annotated in
    ``keypoints``, transformed copies with ``ground_truth``, two unrelated photos, features
    from tiny random models, predictions in ``predicted``."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fiftyone_sdcorr", "demo", "--tiny", "--no-app", "--dataset", name,
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    return DemoBuild(name, Path(workdir), proc.returncode, proc.stdout + proc.stderr)


def clone_demo(build: DemoBuild, name):
    """A persistent copy of the demo's dataset (samples, runs, evaluations; the feature
    files are shared, read-only) for a module that changes it."""
    if build.returncode != 0:
        raise RuntimeError(f"the demo command failed:\n{build.output[-4000:]}")
    return fo.load_dataset(build.name).clone(name, persistent=True)


def demo_ids(dataset):
    """``{"reference": id, "<role>": id, ...}`` of the demo dataset's samples (roles: crop,
    half_size, crop_upscaled, mirrored; the two unrelated photos are ``other`` and
    ``other2``)."""
    ids = {}
    for sid, role in zip(dataset.values("id"), dataset.values("role")):
        key = role if role not in ids else f"{role}2"
        ids[key] = sid
    return ids


# --------------------------------------------------------------------------- masks and objects, no keypoints
def build_mask_dataset(name, photo_paths, tmp, persistent=False, size=224):
    """A mask-only dataset (no keypoints): ``ref`` (chelsea, tagged ``reference``) with a
    ``fo.Segmentation`` in ``gt_masks`` (class 1 on a box around the cat's face), ``target``
    (a copy of chelsea) and ``other`` (coffee), stored features from the local
    descriptor, and ``pred_masks`` on the target from the real :func:`propagate_masks`.
    Returns ``(dataset, ids, describer)``."""
    import numpy as np

    from fiftyone_sdcorr.dataset.propagate_masks import propagate_masks

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    target_path = tmp / "chelsea_copy.jpg"
    shutil.copy(photo_paths["chelsea"], target_path)
    mask = np.zeros((300, 451), dtype=np.uint8)
    mask[60:220, 120:300] = 1
    dataset = fo.Dataset(name)
    dataset.persistent = persistent
    ref = fo.Sample(filepath=photo_paths["chelsea"], gt_masks=fo.Segmentation(mask=mask), tags=["reference"])
    target = fo.Sample(filepath=str(target_path))
    other = fo.Sample(filepath=photo_paths["coffee"])
    dataset.add_samples([target, ref, other])
    describer = LocalDescriptor(size=size)
    store = FeatureStore(tmp / "store", fsync=False)
    for sample in dataset:
        fused = describer.describe_one(sample.filepath)
        sample["sdcorr_features"] = str(store.save(sample.id, fused))
        sample["sdcorr_embedding"] = fused.global_vector().numpy()
        sample.save()
    propagate_masks(dataset.select(target.id), [ref.id], "gt_masks", "pred_masks", extractor=describer,
                    resolution=32, mask_dir=str(tmp / "masks"), progress=False)  # a coarse grid: fast
    return dataset, {"ref": ref.id, "target": target.id, "other": other.id}, describer


def build_objects_dataset(name, folder, persistent=False):
    """An objects-only dataset (no keypoints): the COCO canvases of tests/test_objects.py
    imported as detections only, each detection with an instance mask (an ellipse in its
    box), features per object (``compute_fused_features(patches_field="detections")``),
    canvas0 tagged ``reference``. Returns the dataset."""
    import numpy as np

    import fiftyone_sdcorr as sc
    from test_objects import desc, write_coco

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_coco(folder)
    ds = fo.Dataset.from_dir(data_path=str(folder / "data"), labels_path=str(folder / "labels.json"),
                             dataset_type=fo.types.COCODetectionDataset, label_types=["detections"],
                             label_field="detections", name=name)
    ds.persistent = persistent
    yy, xx = np.mgrid[0:40, 0:30]
    ellipse = ((yy - 19.5) / 20) ** 2 + ((xx - 14.5) / 15) ** 2 <= 1
    for sample in ds:
        for det in sample.detections.detections:
            det.mask = ellipse.copy()
        sample.save()
    ds.match(fo.ViewField("filepath").ends_with("canvas0.png")).tag_samples("reference")
    sc.compute_fused_features(ds, extractor=desc(), patches_field="detections", store_dir=str(folder / "store"),
                              progress=False)
    return ds
