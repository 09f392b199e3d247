"""``python -m fiftyone_sdcorr demo``: the whole product on photos that ship with scikit-image.

Builds a FiftyOne dataset from ``skimage.data.chelsea()`` (a cat) and transformed copies
of it (crop, scale, mirror) whose ground-truth keypoints follow from the transforms, plus
two unrelated photos; annotates the reference in code; computes fused features;
propagates; evaluates PCK; launches the App.

Real models by default (downloaded when online); ``--tiny`` uses tiny random checkpoints
for an offline pipeline check whose numbers are meaningless.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from PIL import Image

#: Hand-annotated keypoints of skimage.data.chelsea() (451 x 300), in pixels.
#: Left/right are the cat's own (its right eye is on the image's left).
CHELSEA_KEYPOINTS = {
    "right_eye": (172.0, 115.0),
    "left_eye": (318.0, 137.0),
    "forehead": (245.0, 45.0),
    "nose": (262.0, 240.0),
    "mouth": (256.0, 272.0),
}
LABELS = list(CHELSEA_KEYPOINTS)
EDGES = [[0, 2], [1, 2], [0, 3], [1, 3], [3, 4]]
MIRROR = {"right_eye": "left_eye", "left_eye": "right_eye"}


def _targets(img: Image.Image):
    """(name, image, function pixel->pixel or None, mirrored) for each transformed copy."""
    W, H = img.size
    out = []
    out.append(("crop", img.crop((60, 20, 420, 300)), lambda x, y: (x - 60, y - 20), False))
    out.append(("half_size", img.resize((W // 2, H // 2), Image.Resampling.LANCZOS),
                lambda x, y: (x * (W // 2) / W, y * (H // 2) / H), False))
    c = img.crop((100, 0, 451, 300))
    out.append(("crop_upscaled", c.resize((c.width * 3 // 2, c.height * 3 // 2), Image.Resampling.LANCZOS),
                lambda x, y: ((x - 100) * 1.5, y * 1.5), False))
    out.append(("mirrored", img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lambda x, y: (W - x, y), True))
    return out


def build_dataset(name: str, image_dir: str, overwrite: bool = True):
    import fiftyone as fo
    import skimage.data

    if fo.dataset_exists(name):
        if not overwrite:
            return fo.load_dataset(name)
        fo.delete_dataset(name)
    os.makedirs(image_dir, exist_ok=True)
    ref = Image.fromarray(skimage.data.chelsea())
    ds = fo.Dataset(name)
    ds.skeletons = {"keypoints": fo.KeypointSkeleton(labels=LABELS, edges=EDGES)}

    def kps(points, W, H, label="cat"):
        return fo.Keypoints(keypoints=[fo.Keypoint(label=label, points=[[x / W, y / H] for x, y in points])])

    samples = []
    path = os.path.join(image_dir, "chelsea.png")
    ref.save(path)
    s = fo.Sample(filepath=path, tags=["reference"], role="reference")
    s["keypoints"] = kps([CHELSEA_KEYPOINTS[k] for k in LABELS], *ref.size)
    samples.append(s)
    for tname, timg, fn, mirrored in _targets(ref):
        path = os.path.join(image_dir, f"chelsea_{tname}.png")
        timg.save(path)
        # after a mirror the cat's left eye is where the right eye was: swap the names
        src = {MIRROR.get(k, k) if mirrored else k: v for k, v in CHELSEA_KEYPOINTS.items()}
        s = fo.Sample(filepath=path, tags=["target"], role=tname)
        s["ground_truth"] = kps([fn(*src[k]) for k in LABELS], *timg.size)
        samples.append(s)
    for other in ("coffee", "astronaut"):
        path = os.path.join(image_dir, f"{other}.png")
        Image.fromarray(getattr(skimage.data, other)()).save(path)
        samples.append(fo.Sample(filepath=path, tags=["target", "other"], role="other"))
    ds.add_samples(samples)
    ds.compute_metadata()
    return ds


def main(argv=None):
    """Entry point; ``argv`` is a list of strings or an already parsed Namespace (the CLI)."""
    if isinstance(argv, argparse.Namespace):
        return run(argv)
    p = argparse.ArgumentParser(prog="python -m fiftyone_sdcorr demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser):
    from fiftyone_sdcorr.core.features.methods import DEFAULT_METHOD, METHODS

    p.add_argument("--tiny", action="store_true",
                   help="tiny random models (offline pipeline check; numbers are meaningless)")
    p.add_argument("--method", default=None, choices=tuple(METHODS),
                   help="; ".join(f"{k}: {m.summary}" for k, m in METHODS.items()) + f" (default {DEFAULT_METHOD})")
    p.add_argument("--adapter", default=None, help="dino-diy: a DIY-SC adapter .safetensors (default: the shipped "
                   "one; with --tiny a tiny random one)")
    p.add_argument("--sd-model", default=None, help="SD Hub id or directory (default: SD 1.5)")
    p.add_argument("--dino-model", default=None, help="DINOv2 Hub id or directory (default: dinov2-base)")
    p.add_argument("--preset", default=None, help="recipe preset: paper (default on CUDA) or cpu (default on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--dataset", default="sdcorr-demo", help="name of the FiftyOne dataset to (re)create")
    p.add_argument("--workdir", default=None, help="where images and features go (default: a temp dir)")
    p.add_argument("--no-app", action="store_true", help="do not launch the App")


def next_steps(name: str) -> str:
    """What to do with the demo dataset next (printed at the end of the demo)."""
    from fiftyone_sdcorr.plugin.common import BACKGROUND_SETTING, WORKER_COMMAND

    return f"""
The demo dataset is {name!r} (persistent: it stays until the demo runs again).
  open it in the App:   fiftyone app launch {name}
  with background runs: {BACKGROUND_SETTING} fiftyone app launch {name}
                        and a worker in another shell: {WORKER_COMMAND}
  in Python:            ds = fo.load_dataset("{name}")
In the App: open a sample, click "+" above the sample and choose "Match panel" (its
reference field is `keypoints`, predictions `predicted`, ground truth `ground_truth`);
the operators are in the operator browser (backtick key): type "sdcorr" or "keypoints".
"""


def run(args) -> dict:
    import fiftyone as fo
    import torch

    from fiftyone_sdcorr import DEFAULT_DINO_MODEL, DEFAULT_SD_MODEL
    from fiftyone_sdcorr.core.features.methods import DEFAULT_METHOD, METHODS
    from fiftyone_sdcorr.dataset.compute_features import compute_fused_features
    from fiftyone_sdcorr.dataset.evaluate import evaluate_keypoints
    from fiftyone_sdcorr.dataset.propagate import propagate_keypoints

    work = args.workdir or tempfile.mkdtemp(prefix="sdcorr-demo-")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        from fiftyone_sdcorr.core.features.tiny import tiny_models

        print("=" * 72)
        print("TINY RANDOM MODELS: pipeline check; numbers are meaningless")
        print("=" * 72)
        sd_model, dino_model = tiny_models(os.path.join(work, "tiny-models"))
        preset = args.preset or "cpu"
    else:
        sd_model = args.sd_model or DEFAULT_SD_MODEL
        dino_model = args.dino_model or DEFAULT_DINO_MODEL
        preset = args.preset or ("paper" if device.startswith("cuda") else "cpu")
    method, adapter = args.method or DEFAULT_METHOD, args.adapter
    if args.tiny and not METHODS[method].uses_sd and adapter is None:  # an adapter sized to the tiny DINO
        from fiftyone_sdcorr.core.features.tiny import TINY_DINO_WIDTH, save_tiny_adapter

        adapter = save_tiny_adapter(os.path.join(work, "tiny-models", "adapter.safetensors"), dim=TINY_DINO_WIDTH)
    models = dino_model if not METHODS[method].uses_sd else f"{sd_model} + {dino_model}"
    print(f"method {method}: {models}; preset {preset}; device {device}; workdir {work}")

    ds = build_dataset(args.dataset, os.path.join(work, "images"))
    ds.persistent = True  # kept for `fiftyone app launch sdcorr-demo`; rerunning recreates it
    summary = compute_fused_features(ds, features=dict(
        method=method, adapter=adapter, sd_model=sd_model, dino_model=dino_model, preset=preset, device=device,
        store_dir=os.path.join(work, "features")))
    print("features:", {k: v for k, v in summary.items() if k in ("computed", "skipped", "failed")})
    refs = ds.match_tags("reference")
    targets = ds.match_tags("target")
    # no models given: propagation uses the configuration recorded with the stored features
    prop = propagate_keypoints(targets, refs, "keypoints", "predicted", flip=True, device=device)
    for warning in prop["warnings"]:
        print("warning:", warning)
    gt_view = targets.exists("ground_truth")
    results = evaluate_keypoints(gt_view, "predicted", "ground_truth", eval_key="demo_pck")
    print()
    if args.tiny:
        print("(tiny random models: pipeline check; numbers are meaningless)")
    results.print_report()
    print(next_steps(ds.name))
    if not args.no_app:
        session = fo.launch_app(ds)
        session.wait()
    return {"dataset": ds.name, "workdir": work, "results": results}


if __name__ == "__main__":  # pragma: no cover
    main()
