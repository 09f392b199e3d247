"""Tiny benchmark folders written in each benchmark's own file format, with answers known
by construction (tests/test_benchmarks.py).

- :func:`write_spair`: ``SPair-71k/{PairAnnotation/test, ImageAnnotation, JPEGImages}``;
- :func:`write_pfpascal`: ``PF-dataset-PASCAL/{test_pairs_pf_pascal.csv, JPEGImages, Annotations}``;
- :func:`write_ap10k`: ``ap-10k/{ImageAnnotation, JPEGImages, PairAnnotation/test}`` as
  GeoAware-SC's preparation leaves it.

Images are small, textured JPEGs (a seeded random pattern, so tiny models get distinct
inputs); mirrored images are written mirrored, pixel for pixel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image


def write_image(path: Path, width: int, height: int, seed: int, mirror_of: Optional[Path] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mirror_of is not None:
        Image.open(mirror_of).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=95)
        return
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    img.save(path, quality=95)


# --------------------------------------------------------------------------- SPair-71k
#: images of the SPair fixture: name -> (category, width, height)
SPAIR_IMAGES = {
    "2008_000001": ("cat", 320, 240),
    "2008_000002": ("cat", 300, 260),
    "2008_000003": ("cat", 320, 240),  # the mirror of 2008_000001
    "2009_000010": ("dog", 320, 240),
    "2009_000011": ("dog", 280, 240),
}

#: source keypoints by image (id -> [x, y]); every pair's source points come from here
SPAIR_POINTS = {
    "2008_000001": {0: [100.0, 60.0], 1: [140.0, 62.0], 8: [120.0, 100.0], 9: [90.0, 200.0], 10: [150.0, 205.0]},
    "2009_000010": {0: [50.0, 40.0], 1: [80.0, 40.0], 9: [60.0, 180.0]},
}


def spair_pairs() -> List[dict]:
    """The test pairs of the SPair fixture, as pair annotation dicts (plus ``"_name"``)."""
    a = SPAIR_POINTS["2008_000001"]
    w = SPAIR_IMAGES["2008_000003"][1]
    swap = {0: 1, 1: 0, 9: 10, 10: 9, 8: 8}  # cat left/right partners (SPair ids)
    pairs = [
        # identity: the image with itself
        _spair_pair(0, "cat", "2008_000001", "2008_000001", [0, 1, 8, 9], a, a, [40, 20, 240, 230]),
        # mirror: the target is the mirrored source; id i sits at the mirror of the source's swap(i)
        _spair_pair(1, "cat", "2008_000001", "2008_000003", [0, 1, 8, 9, 10], a,
                    {i: [w - a[swap[i]][0], a[swap[i]][1]] for i in (0, 1, 8, 9, 10)}, [80, 20, 280, 230]),
        # hand-computed: T = 100 (box 100 x 80)
        _spair_pair(2, "cat", "2008_000001", "2008_000002", [0, 1, 8, 9], a,
                    {0: [110.0, 70.0], 1: [150.0, 72.0], 8: [130.0, 110.0], 9: [100.0, 150.0]}, [60, 50, 160, 130]),
        # hand-computed: T = 200 (box 150 x 200)
        _spair_pair(3, "dog", "2009_000010", "2009_000011", [0, 1], SPAIR_POINTS["2009_000010"],
                    {0: [60.0, 50.0], 1: [90.0, 45.0]}, [20, 20, 170, 220]),
    ]
    return pairs


def _spair_pair(n, cat, src, trg, ids, src_pts, trg_pts, trg_box) -> dict:
    sw, sh = SPAIR_IMAGES[src][1:]
    tw, th = SPAIR_IMAGES[trg][1:]
    return {
        "_name": f"{n:06d}-{src}-{trg}:{cat}", "pair_id": n, "filename": f"{n:06d}-{src}-{trg}:{cat}",
        "src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg", "src_imsize": [sw, sh, 3], "trg_imsize": [tw, th, 3],
        "src_bndbox": [10, 10, sw - 10, sh - 10], "trg_bndbox": list(trg_box), "category": cat,
        "src_pose": "Frontal", "trg_pose": "Frontal", "src_trn": 0, "trg_trn": 0, "src_occ": 0, "trg_occ": 0,
        "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0, "mirror": 0,
        "kps_ids": [str(i) for i in ids],
        "src_kps": [[int(v) if float(v).is_integer() else v for v in src_pts[i]] for i in ids],
        "trg_kps": [[int(v) if float(v).is_integer() else v for v in trg_pts[i]] for i in ids],
    }


#: keypoints per category (ids 0 .. n-1), as SPair-71k's image annotations list them
SPAIR_NUM_KPS = {"cat": 15, "dog": 16}


def write_spair(base: Path, extra_trn: bool = True) -> Path:
    root = Path(base) / "SPair-71k"
    jpeg = root / "JPEGImages"
    for name, (cat, w, h) in SPAIR_IMAGES.items():
        if name != "2008_000003":
            write_image(jpeg / cat / f"{name}.jpg", w, h, seed=int(name.replace("_", "")) % 1000)
    write_image(jpeg / "cat" / "2008_000003.jpg", 320, 240, 0, mirror_of=jpeg / "cat" / "2008_000001.jpg")
    pairs = spair_pairs()
    for split in ("test",) + (("trn",) if extra_trn else ()):
        folder = root / "PairAnnotation" / split
        folder.mkdir(parents=True, exist_ok=True)
        for p in pairs if split == "test" else pairs[:1]:
            body = {k: v for k, v in p.items() if k != "_name"}
            (folder / f"{p['_name']}.json").write_text(json.dumps(body))
    _spair_image_annotations(root, pairs)
    return root


def _spair_image_annotations(root: Path, pairs: List[dict]) -> None:
    kps: Dict[str, Dict[int, list]] = {n: {} for n in SPAIR_IMAGES}
    boxes: Dict[str, list] = {}
    for p in pairs:
        for side in ("src", "trg"):
            name = Path(p[f"{side}_imname"]).stem
            for i, xy in zip(p["kps_ids"], p[f"{side}_kps"]):
                kps[name][int(i)] = xy
            boxes[name] = p[f"{side}_bndbox"]
    for name, (cat, w, h) in SPAIR_IMAGES.items():
        folder = root / "ImageAnnotation" / cat
        folder.mkdir(parents=True, exist_ok=True)
        body = {"filename": f"{name}.jpg", "src_database": "PASCAL VOC 2012", "src_annotation": "fixture",
                "src_image": "fixture", "image_width": w, "image_height": h, "image_depth": 3, "category": cat,
                "pose": "Frontal", "truncated": 0, "occluded": 0, "difficult": 0, "azimuth_id": 3,
                "bndbox": boxes.get(name, [0, 0, w, h]),
                "kps": {str(i): kps[name].get(i) for i in range(SPAIR_NUM_KPS[cat])}}
        (folder / f"{name}.json").write_text(json.dumps(body))


def write_predictions(path: Path, rows: Dict[str, Sequence]) -> Path:
    with open(path, "w") as f:
        for pair, kps in rows.items():
            f.write(json.dumps({"pair": pair, "trg_kps": [None if xy is None else list(xy) for xy in kps]}) + "\n")
    return path


def spair_predictions(kind: str) -> Dict[str, list]:
    """``"gt"``: the ground truth (PCK 100); ``"errors"``: known errors (the hand-computed
    test); ``"unmirrored"``: the source coordinates copied as they are."""
    out = {}
    for p in spair_pairs():
        gt = [list(map(float, xy)) for xy in p["trg_kps"]]
        if kind == "gt":
            out[p["_name"]] = gt
        elif kind == "unmirrored":
            out[p["_name"]] = [list(map(float, xy)) for xy in p["src_kps"]]
        else:
            out[p["_name"]] = [[x + dx, y + dy] for (x, y), (dx, dy) in zip(gt, SPAIR_ERRORS[p["_name"][:6]])]
    return out


#: per pair (by number), the error vector of each predicted point
SPAIR_ERRORS = {
    "000000": [(0, 0), (0, 0), (0, 0), (0, 0)],          # T = 200 (box 200 x 210 -> 210): all correct
    "000001": [(0, 0), (0, 0), (0, 0), (0, 0), (0, 0)],  # all correct
    "000002": [(0, 0), (0, 3), (7, 0), (12, 16)],        # T = 100: errors 0, 3, 7, 20
    "000003": [(6, 8), (0, 1)],                          # T = 200: errors 10 (= 0.05 T exactly), 1
}


# --------------------------------------------------------------------------- PF-Pascal
PF_IMAGES = {"2008_000100": (320, 240), "2009_000200": (200, 300), "2010_000300": (250, 250)}


def pf_rows() -> List[dict]:
    """Rows of the fixture's test CSV: class index (1-based), points."""
    return [
        # aeroplane (class 1): target 200 x 300 -> T = 300
        {"src": "2008_000100", "trg": "2009_000200", "cls": 1,
         "a": [[10.5, 20.25], [100.0, 120.0], [200.0, 50.0]], "b": [[15.0, 25.0], [110.0, 130.0], [150.0, 280.0]]},
        # cat (class 8): target 250 x 250 -> T = 250
        {"src": "2009_000200", "trg": "2010_000300", "cls": 8,
         "a": [[30.0, 40.0], [60.0, 80.0]], "b": [[35.0, 45.0], [65.0, 85.0]]},
    ]


def write_pfpascal(base: Path) -> Path:
    root = Path(base) / "PF-dataset-PASCAL"
    for i, (name, (w, h)) in enumerate(PF_IMAGES.items()):
        write_image(root / "JPEGImages" / f"{name}.jpg", w, h, seed=100 + i)
    lines = ["source_image,target_image,class,XA,YA,XB,YB"]
    for r in pf_rows():
        xa, ya = ";".join(repr(p[0]) for p in r["a"]), ";".join(repr(p[1]) for p in r["a"])
        xb, yb = ";".join(repr(p[0]) for p in r["b"]), ";".join(repr(p[1]) for p in r["b"])
        lines.append(f"PF-dataset-PASCAL/JPEGImages/{r['src']}.jpg,PF-dataset-PASCAL/JPEGImages/{r['trg']}.jpg,"
                     f"{r['cls']},{xa},{ya},{xb},{yb}")
    (root / "test_pairs_pf_pascal.csv").write_text("\n".join(lines) + "\n")
    _pf_annotations(root)
    return root


def _pf_annotations(root: Path) -> None:
    from scipy.io import savemat

    folder = root / "Annotations" / "aeroplane"
    folder.mkdir(parents=True, exist_ok=True)
    kps = np.array([[10.5, 20.25], [100.0, 120.0], [np.nan, np.nan], [200.0, 50.0]])
    savemat(str(folder / "2008_000100.mat"), {"kps": kps, "bbox": np.array([[5, 10, 250, 200]]), "class": "aeroplane"})


# --------------------------------------------------------------------------- AP-10K
AP_IMAGES = {  # id -> (family, species, width, height, bbox l t w h)
    1: ("Bovidae", "antelope", 320, 240, [20, 30, 200, 150]),
    2: ("Bovidae", "antelope", 300, 300, [10, 10, 100, 250]),   # T = 250
    3: ("Felidae", "cat", 256, 192, [0, 0, 120, 160]),          # T = 160
    4: ("Felidae", "cat", 256, 192, [10, 20, 200, 100]),        # T = 200
}


def ap_keypoints(image_id: int) -> List[list]:
    """17 x [x, y, v]; some points not labelled (v = 0) in one image only."""
    rng = np.random.default_rng(image_id)
    pts = [[float(rng.integers(10, 180)), float(rng.integers(10, 180)), 2] for _ in range(17)]
    for i in {1: (), 2: (3, 4), 3: (0,), 4: (5, 6, 7)}[image_id]:
        pts[i] = [0, 0, 0]
    return pts


def write_ap10k(base: Path) -> Path:
    root = Path(base) / "ap-10k"
    for iid, (fam, sp, w, h, box) in AP_IMAGES.items():
        stem = f"{iid:012d}"
        write_image(root / "JPEGImages" / fam / sp / f"{stem}.jpg", w, h, seed=200 + iid)
        kps = ap_keypoints(iid)
        ann = {"id": iid, "image_id": iid, "category_id": 1 if sp == "antelope" else 2, "bbox": box,
               "area": box[2] * box[3],
               "iscrowd": 0, "num_keypoints": sum(1 for k in kps if k[2] > 0),
               "keypoints": [v for k in kps for v in k], "file_name": f"{stem}.jpg", "width": w, "height": h,
               "license": 1, "background": 0, "name": sp, "supercategory": fam}
        folder = root / "ImageAnnotation" / fam / sp
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps(ann, indent=4))
    pairs = root / "PairAnnotation" / "test"
    pairs.mkdir(parents=True, exist_ok=True)
    for s, t in ((1, 2), (3, 4)):
        fs, ss = AP_IMAGES[s][:2]
        ft, st = AP_IMAGES[t][:2]
        body = {"src_json_path": f"data/ap-10k/ImageAnnotation/{fs}/{ss}/{s:012d}.json",
                "trg_json_path": f"data/ap-10k/ImageAnnotation/{ft}/{st}/{t:012d}.json"}
        (pairs / f"{s:012d}-{t:012d}:{ss}.json").write_text(json.dumps(body, indent=4))
    return root
