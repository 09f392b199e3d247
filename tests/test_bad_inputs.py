"""Bad and unusual inputs, table-driven, across every dataset function and its operator.

Each case calls one public dataset function (or runs its operator headlessly with
``fiftyone.operators.execute_operator``) with ONE bad input on an otherwise valid call,
and checks that

(a) it fails with a ``ValueError`` (``ParameterError``) whose message names the problem
    (the parameter or field, matched with a regex);
(b) every field that existed before is unchanged (:func:`snapshots.field_snapshot` of the
    dataset, and of a second dataset used as "another dataset"), no field appeared, and
    no evaluation / run / brain run was left behind;
(c) no file or folder was created or modified anywhere under the test's folder (which
    holds the configured feature store, the default store root and the working
    directory), so that a field name such as ``"../x"`` can never lead outside the
    configured folder.

One module-scoped dataset serves every case: real photos (skimage), ``gt`` and ``pred``
``fo.Keypoints`` (5 points) on three samples, a user string ``note``, a user float
``score``, a ``box`` ``fo.Detections``, and stored features computed once with the
deterministic ``LocalDescriptor``. The tiny real models are used only where a function
would otherwise compute features (``compute_fused_features``), so a bad input that slips
through would visibly run and write.
"""

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.executor import ExecutionError

from fiftyone_sdcorr.dataset.compute_features import compute_fused_features
from fiftyone_sdcorr.dataset.evaluate import evaluate_keypoints
from fiftyone_sdcorr.dataset.feature_views import write_feature_pca, write_similarity_heatmaps
from fiftyone_sdcorr.dataset.propagate import propagate_keypoints
from fiftyone_sdcorr.dataset.review import flag_keypoint_annotations
from local_descriptor import LocalDescriptor
from snapshots import field_snapshot

NAN = float("nan")
RECIPE = dict(sd_size=128, sd_mode="whole", dino_size=56)
POINTS = [[0.52, 0.55], [0.42, 0.40], [0.62, 0.40], [0.30, 0.20], [0.53, 0.75]]
PRED = [[0.50, 0.56], [0.43, 0.41], [0.60, 0.42], [0.31, 0.22], [0.55, 0.70]]
OP = "@sdcorr/sdcorr/"


def desc():
    return LocalDescriptor(size=112, stride=14)


def _kps(pts, label="cat"):
    return fo.Keypoints(keypoints=[fo.Keypoint(label=label, points=[list(p) for p in pts])])


# --------------------------------------------------------------------------- the world
@dataclass
class World:
    ds: fo.Dataset
    other: fo.Dataset
    root: Path  # everything the module may write lives under it
    store: Path  # the configured feature store (store_dir)
    models: tuple
    ref_id: str  # an annotated sample with stored features
    other_id: str  # a sample of the other dataset


@pytest.fixture(scope="module")
def world(photo_paths, tmp_path_factory):
    from fiftyone_sdcorr.core.features.tiny import tiny_models

    models = tiny_models(tmp_path_factory.mktemp("tiny-models"))
    root = tmp_path_factory.mktemp("bad-inputs")
    store = root / "store"
    (root / "cwd").mkdir()
    (root / "a-file.txt").write_text("not a folder")
    mp = pytest.MonkeyPatch()
    # a write to the default store root or to a relative path lands under root too
    mp.setenv("SDCORR_STORE_DIR", str(root / "default-store"))
    mp.chdir(root / "cwd")
    ds = fo.Dataset(f"sdcorr-bad-{uuid.uuid4().hex[:10]}")
    other = fo.Dataset(f"sdcorr-bad-other-{uuid.uuid4().hex[:10]}")
    try:
        names = ["chelsea", "coffee", "astronaut", "rocket"]
        samples = []
        for i, n in enumerate(names):
            s = fo.Sample(filepath=photo_paths[n], note=f"note {i}", score=0.25 * i,
                          box=fo.Detections(detections=[fo.Detection(label="cat",
                                                                     bounding_box=[0.2, 0.1, 0.6, 0.7])]))
            if i < 3:
                s["gt"] = _kps(POINTS)
                s["pred"] = _kps(PRED)
            samples.append(s)
        ds.add_samples(samples)
        summary = compute_fused_features(ds, extractor=desc(), store_dir=str(store), progress=False)
        assert summary["computed"] == 4 and summary["failed"] == 0, summary
        other.add_sample(fo.Sample(filepath=photo_paths["chelsea"], gt=_kps(POINTS)))
        yield World(ds, other, root, store, models, ds.first().id, other.first().id)
    finally:
        for d in (ds, other):
            if not d.deleted:
                d.delete()
        mp.undo()


# --------------------------------------------------------------------------- the calls
def cf(w: World, target=None, **kw):
    """compute_fused_features with tiny real models and fresh output fields."""
    sd, dino = w.models
    args = dict(recipe=dict(RECIPE), pca_dim=8, device="cpu", batch_size=1, projection_samples=1,
                store_dir=str(w.store), features_field="cf_feats", embedding_field="cf_emb", progress=False)
    args.update(kw)
    return compute_fused_features(w.ds if target is None else target, sd, dino, **args)


def prop(w: World, target=None, **kw):
    """propagate_keypoints from the first annotated sample, on the stored features."""
    args = dict(references=[w.ref_id], source_field="gt", output_field="prop_out", progress=False)
    args.update(kw)
    return propagate_keypoints(w.ds if target is None else target, args.pop("references"),
                               args.pop("source_field"), args.pop("output_field"), **args)


def ev(w: World, target=None, **kw):
    args = dict(pred_field="pred", gt_field="gt", eval_key="ev_out", progress=False)
    args.update(kw)
    return evaluate_keypoints(w.ds if target is None else target, args.pop("pred_field"), args.pop("gt_field"),
                              **args)


def flag(w: World, target=None, **kw):
    args = dict(gt_field="gt", review_field="rv_out", tag="bad-inputs-flag", progress=False)
    args.update(kw)
    return flag_keypoint_annotations(w.ds if target is None else target, args.pop("gt_field"), **args)


def pca(w: World, target=None, **kw):
    args = dict(output_field="pca_out", progress=False)
    args.update(kw)
    return write_feature_pca(w.ds if target is None else target, args.pop("output_field"), **args)


def heat(w: World, target=None, **kw):
    args = dict(reference_id=w.ref_id, point=(0.5, 0.5), output_field="heat_out", progress=False)
    args.update(kw)
    return write_similarity_heatmaps(w.ds if target is None else target, args.pop("reference_id"),
                                     args.pop("point"), **args)


FUNCTIONS = dict(cf=cf, prop=prop, ev=ev, flag=flag, pca=pca, heat=heat)

# a valid set of operator params per operator (a case updates them)
OP_PARAMS = {
    "compute_fused_features": lambda w: dict(
        sd_model=w.models[0], dino_model=w.models[1], device="cpu", recipe=dict(RECIPE), pca_dim=8,
        batch_size=1, projection_samples=1, store_dir=str(w.store), features_field="op_feats",
        embedding_field="op_emb"),
    "propagate_keypoints": lambda w: dict(source_field="gt", output_field="op_prop", references="ids",
                                          reference_ids=[w.ref_id]),
    "evaluate_keypoints": lambda w: dict(pred_field="pred", gt_field="gt", eval_key="op_ev"),
    "flag_keypoint_annotations": lambda w: dict(gt_field="gt", review_field="op_rv", tag="op-flag"),
    "write_feature_pca": lambda w: dict(output_field="op_pca"),
    "write_similarity_heatmap": lambda w: dict(reference_id=w.ref_id, x=0.5, y=0.5, output_field="op_heat"),
}


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    fn: str  # a key of FUNCTIONS, or "op:<operator name>"
    kw: Callable[[World], dict]  # the bad input(s), on top of the valid call
    match: str  # regex the error message must match (names the problem)
    path: bool = False  # a field name that could lead to a path
    target: Optional[Callable[[World], object]] = None  # default: the whole dataset
    skip: Optional[str] = None


def K(**kw):
    return lambda w: dict(kw)


#: an empty target collection must be called empty (not, say, "run compute_fused_features first")
EMPTY = r"empty|no sample of the collection|no sample to"
BAD_NAMES = [("dotdot", "../x"), ("slash", "a/b"), ("dot", "a.b"), ("private", "_x"), ("dollar", "$x"),
             ("empty", ""), ("id", "id"), ("filepath", "filepath"), ("long200", "x" * 200)]

CASES = [
    # ---- objects: patches_field must name a fo.Detections field of the dataset (every function)
    *[Case(f"{fn}-patches_field-{why}", fn, K(patches_field=value), r"'patches_field'.*" + re.escape(repr(value)))
      for fn in ("cf", "prop", "ev", "flag", "pca", "heat")
      for why, value in (("missing", "nope"), ("keypoints", "gt"), ("dotdot", "../x"))],
    Case("cf-brain_key-dotdot", "cf", K(brain_key="../x"), r"'brain_key'", path=True),
    # ---- an existing user field named as an output (no overwrite): refused, naming it
    Case("cf-features_field-existing", "cf", K(features_field="note"), r"'features_field'.*'note'"),
    Case("cf-embedding_field-existing", "cf", K(embedding_field="score"), r"'embedding_field'.*'score'"),
    Case("prop-output_field-existing", "prop", K(output_field="note"), r"'output_field'.*'note'"),
    Case("prop-output_field-existing-detections", "prop", K(output_field="box"), r"'output_field'.*'box'"),
    Case("flag-review_field-existing", "flag", K(review_field="note"), r"'review_field'.*'note'"),
    Case("ev-eval_key-existing", "ev", K(eval_key="score"), r"'eval_key'.*'score'"),
    Case("pca-output_field-existing", "pca", K(output_field="note"), r"'output_field'.*'note'"),
    Case("heat-output_field-existing", "heat", K(output_field="box"), r"'output_field'.*'box'"),
]
# ---- field names that are not plain top-level names: refused, nothing written anywhere
for _id, _name in BAD_NAMES:
    CASES.append(Case(f"cf-features_field-{_id}", "cf", K(features_field=_name), r"'features_field'", path=True))
    CASES.append(Case(f"pca-output_field-{_id}", "pca", K(output_field=_name), r"'output_field'", path=True))
CASES += [
    Case("cf-embedding_field-id", "cf", K(embedding_field="id"), r"'embedding_field'", path=True),
    Case("cf-embedding_field-dotdot", "cf", K(embedding_field="../x"), r"'embedding_field'", path=True),
    Case("prop-output_field-dotdot", "prop", K(output_field="../x"), r"'output_field'", path=True),
    Case("prop-output_field-slash", "prop", K(output_field="a/b"), r"'output_field'", path=True),
    Case("flag-review_field-dot", "flag", K(review_field="a.b"), r"'review_field'", path=True),
    Case("flag-review_field-dollar", "flag", K(review_field="$x"), r"'review_field'", path=True),
    Case("ev-eval_key-dotdot", "ev", K(eval_key="../x"), r"'eval_key'", path=True),
    Case("ev-eval_key-dot", "ev", K(eval_key="a.b"), r"'eval_key'", path=True),
    Case("heat-output_field-slash", "heat", K(output_field="a/b"), r"'output_field'", path=True),
    Case("heat-output_field-filepath", "heat", K(output_field="filepath"), r"'output_field'", path=True),
    # ---- feature parameters
    Case("cf-pca_dim-0", "cf", K(pca_dim=0), r"'pca_dim'"),
    Case("cf-pca_dim-neg", "cf", K(pca_dim=-1), r"'pca_dim'"),
    Case("cf-pca_dim-str", "cf", K(pca_dim="8"), r"'pca_dim'"),
    Case("cf-pca_dim-float", "cf", K(pca_dim=2.5), r"'pca_dim'"),
    Case("cf-batch_size-str", "cf", K(batch_size="4"), r"'batch_size'"),
    Case("cf-batch_size-0", "cf", K(batch_size=0), r"'batch_size'"),
    Case("cf-batch_size-neg", "cf", K(batch_size=-2), r"'batch_size'"),
    Case("cf-batch_size-bool", "cf", K(batch_size=True), r"'batch_size'"),
    Case("cf-projection_samples-0", "cf", K(projection_samples=0), r"'projection_samples'"),
    Case("cf-store_dtype-int4", "cf", K(store_dtype="int4"), r"'store_dtype'"),
    Case("cf-preset-fast", "cf", K(preset="fast"), r"'preset'"),
    Case("cf-recipe-sd_size-100", "cf", K(recipe=dict(RECIPE, sd_size=100)), r"'sd_size'"),
    Case("cf-recipe-alpha-2", "cf", K(recipe=dict(RECIPE, alpha=2)), r"'alpha'"),
    Case("cf-recipe-timestep-5000", "cf", K(recipe=dict(RECIPE, timestep=5000)), r"'timestep'"),
    Case("cf-recipe-taps-str", "cf", K(recipe=dict(RECIPE, taps="s5")), r"'taps'"),
    Case("cf-recipe-unknown", "cf", K(recipe=dict(RECIPE, bogus=1)), r"bogus"),
    Case("cf-recipe-not-a-dict", "cf", K(recipe="whole"), r"'recipe'"),
    Case("cf-device-gpu", "cf", K(device="gpu"), r"'device'"),
    Case("cf-device-cuda7", "cf", K(device="cuda:7"), r"'device'",
         skip="8 CUDA devices here" if torch.cuda.device_count() > 7 else None),
    Case("cf-dtype-float64", "cf", K(dtype="float64"), r"'dtype'"),
    Case("cf-store_dir-empty", "cf", K(store_dir="  "), r"'store_dir'"),
    Case("cf-overwrite-str", "cf", K(overwrite="yes"), r"'overwrite'"),
    Case("cf-prompt_field-no-label-template", "cf", K(prompt_field="note"), r"'prompt_field'.*\{label\}"),
    Case("cf-prompt_field-missing", "cf", K(prompt_field="nope", recipe=dict(RECIPE, prompt="a photo of a {label}")),
         r"'prompt_field'.*'nope'"),
    Case("cf-extractor-not-a-describer", "cf", K(extractor=42), r"'extractor'"),
    Case("prop-pca_dim-0", "prop", K(pca_dim=0), r"'pca_dim'"),
    Case("prop-device-gpu", "prop", K(device="gpu"), r"'device'"),
    Case("prop-batch_size-0", "prop", K(batch_size=0), r"'batch_size'"),
    Case("prop-batch_size-str", "prop", K(batch_size="4"), r"'batch_size'"),
    Case("flag-batch_size-neg", "flag", K(batch_size=-2), r"'batch_size'"),
    # ---- evaluation parameters
    Case("ev-alphas-str", "ev", K(alphas="0.1"), r"'alphas'"),
    Case("ev-alphas-empty", "ev", K(alphas=[]), r"'alphas'"),
    Case("ev-alphas-zero", "ev", K(alphas=[0]), r"'alphas\[0\]'"),
    Case("ev-alphas-neg", "ev", K(alphas=[-0.1]), r"'alphas\[0\]'"),
    Case("ev-alphas-gt1", "ev", K(alphas=[1.5]), r"'alphas\[0\]'"),
    Case("ev-alphas-nan", "ev", K(alphas=[NAN]), r"'alphas\[0\]'"),
    Case("ev-alphas-letter", "ev", K(alphas=["a"]), r"'alphas\[0\]'"),
    Case("ev-threshold-box", "ev", K(threshold="box"), r"'threshold'"),
    Case("ev-overwrite-str", "ev", K(overwrite="yes"), r"'overwrite'"),
    # ---- matching parameters
    Case("prop-visibility_threshold-5", "prop", K(visibility_threshold=5), r"'visibility_threshold'"),
    Case("prop-visibility_threshold-neg", "prop", K(visibility_threshold=-0.1), r"'visibility_threshold'"),
    Case("prop-visibility_threshold-nan", "prop", K(visibility_threshold=NAN), r"'visibility_threshold'"),
    Case("prop-top_k-0", "prop", K(top_k=0), r"'top_k'"),
    Case("prop-combine-mean", "prop", K(combine="mean"), r"'combine'"),
    Case("prop-soft_window-4", "prop", K(soft_window=4), r"'soft_window'"),
    Case("prop-temperature-0", "prop", K(temperature=0), r"'temperature'"),
    Case("prop-flip_pairs-bad", "prop", K(flip=True, flip_pairs=[(0, -1)]), r"'flip_pairs'"),
    Case("flag-min_confidence-2", "flag", K(min_confidence=2), r"'min_confidence'"),
    Case("flag-alpha-0", "flag", K(alpha=0), r"'alpha'"),
    Case("flag-threshold-box", "flag", K(threshold="box"), r"'threshold'"),
    Case("flag-top_k-0", "flag", K(top_k=0), r"'top_k'"),
    Case("flag-combine-mean", "flag", K(combine="mean"), r"'combine'"),
    Case("flag-tag-empty", "flag", K(tag=""), r"'tag'"),
    # ---- input fields: missing, wrong kind, the same as another
    Case("prop-source_field-missing", "prop", K(source_field="nope"), r"'source_field'.*'nope'"),
    Case("prop-source_field-string", "prop", K(source_field="note"), r"'source_field'.*'note'"),
    Case("prop-embedding_field-string", "prop", K(embedding_field="note"), r"'embedding_field'.*'note'"),
    Case("prop-output_field-is-source_field", "prop", K(output_field="gt"), r"'output_field'.*'gt'"),
    Case("prop-output_field-is-features_field", "prop", K(output_field="sdcorr_features"),
         r"'output_field'.*'sdcorr_features'"),
    Case("flag-gt_field-missing", "flag", K(gt_field="nope"), r"'gt_field'.*'nope'"),
    Case("flag-gt_field-string", "flag", K(gt_field="note"), r"'gt_field'.*'note'"),
    Case("flag-bbox_field-keypoints", "flag", K(bbox_field="pred"), r"'bbox_field'.*'pred'"),
    Case("flag-review_field-is-gt_field", "flag", K(review_field="gt"), r"'review_field'.*'gt'"),
    Case("ev-pred_field-string", "ev", K(pred_field="note"), r"'pred_field'.*'note'"),
    Case("ev-pred_field-missing", "ev", K(pred_field="nope"), r"'pred_field'.*'nope'"),
    Case("ev-gt_field-detections", "ev", K(gt_field="box"), r"'gt_field'.*'box'"),
    Case("ev-bbox_field-string", "ev", K(bbox_field="note"), r"'bbox_field'.*'note'"),
    Case("ev-bbox_field-missing", "ev", K(bbox_field="nope"), r"'bbox_field'.*'nope'"),
    Case("ev-gt_field-is-pred_field", "ev", K(gt_field="pred"), r"'pred_field'.*'gt_field'"),
    Case("pca-features_field-missing", "pca", K(features_field="nope"), r"'features_field'.*'nope'"),
    Case("pca-features_field-vector", "pca", K(features_field="sdcorr_embedding"),
         r"'features_field'.*'sdcorr_embedding'"),
    Case("pca-output_field-is-features_field", "pca", K(output_field="sdcorr_features"),
         r"'output_field'.*'sdcorr_features'"),
    Case("pca-features_field-not-paths", "pca", K(features_field="note"), r"'features_field'.*'note'"),
    Case("heat-features_field-not-paths", "heat", K(features_field="note"), r"'features_field'.*'note'"),
    # ---- references
    Case("prop-references-empty-list", "prop", K(references=[]), r"'references'"),
    Case("prop-references-bad-id", "prop", K(references=["nonexistent-id"]), r"'references'.*nonexistent-id"),
    Case("prop-references-unknown-id", "prop", K(references=["0123456789abcdef01234567"]),
         r"'references'.*0123456789abcdef01234567"),
    Case("prop-references-unused-tag", "prop", K(references="no-sample-has-this-tag"),
         r"'references'.*no-sample-has-this-tag"),
    Case("prop-references-other-dataset", "prop", lambda w: dict(references=w.other.view()), r"'references'"),
    Case("prop-references-int", "prop", K(references=42), r"'references'"),
    Case("prop-references-unannotated", "prop", lambda w: dict(references=[w.ds.last().id]),
         r"no usable reference"),
    Case("flag-references-empty-list", "flag", K(references=[]), r"'references'"),
    Case("flag-references-int", "flag", K(references=42), r"'references'"),
    Case("flag-references-other-dataset", "flag", lambda w: dict(references=w.other.view()), r"'references'"),
    # ---- empty targets
    Case("prop-empty-targets", "prop", K(), EMPTY, target=lambda w: w.ds.limit(0)),
    Case("flag-empty-targets", "flag", K(), EMPTY, target=lambda w: w.ds.limit(0)),
    Case("pca-empty-targets", "pca", K(), EMPTY, target=lambda w: w.ds.limit(0)),
    Case("heat-empty-targets", "heat", K(), EMPTY, target=lambda w: w.ds.limit(0)),
    Case("ev-empty-targets", "ev", K(), EMPTY, target=lambda w: w.ds.limit(0)),
    Case("cf-empty-targets", "cf", K(), EMPTY, target=lambda w: w.ds.limit(0)),
    Case("cf-not-a-collection", "cf", K(), r"dataset or view", target=lambda w: [w.ref_id]),
    Case("cf-store_dir-is-a-file", "cf", lambda w: dict(store_dir=str(w.root / "a-file.txt")), r"'store_dir'",
         path=True),
    Case("prop-dtype-float64", "prop", K(dtype="float64"), r"'dtype'"),
    Case("prop-store_dir-blank", "prop", K(store_dir="  "), r"'store_dir'"),
    Case("flag-device-gpu", "flag", K(device="gpu"), r"'device'"),
    Case("pca-fit_samples-0", "pca", K(fit_samples=0), r"'fit_samples'"),
    Case("heat-max_side-8", "heat", K(max_side=8), r"'max_side'"),
    Case("pca-output_dir-is-a-file", "pca", lambda w: dict(output_dir=str(w.root / "a-file.txt")), r"'output_dir'",
         path=True),
    Case("heat-output_dir-blank", "heat", K(output_dir=""), r"'output_dir'"),
    Case("ev-eval_key-is-a-run-key", "ev", K(eval_key="sdcorr_compute_fused_features_sdcorr_features"),
         r"'eval_key'.*another run"),
    Case("ev-alphas-bool", "ev", K(alphas=[True]), r"'alphas\[0\]'"),
    Case("flag-tag-number", "flag", K(tag=5), r"'tag'"),
    Case("prop-flip_pairs-labels-no-skeleton", "prop", K(flip=True, flip_pairs=[("left_eye", "right_eye")]),
         r"'flip_pairs'"),
    Case("prop-not-a-collection", "prop", K(), r"dataset or view", target=lambda w: [w.ref_id]),
    Case("ev-not-a-collection", "ev", K(), r"dataset or view", target=lambda w: [w.ref_id]),
    Case("pca-not-a-collection", "pca", K(), r"dataset or view", target=lambda w: [w.ref_id]),
    # ---- similarity heat maps: the reference point
    Case("heat-reference_id-nope", "heat", K(reference_id="nope"), r"'reference_id'.*'nope'"),
    Case("heat-reference_id-other-dataset", "heat", lambda w: dict(reference_id=w.other_id), r"'reference_id'"),
    Case("heat-point-x-2", "heat", K(point=(2, 0.5)), r"point x"),
    Case("heat-point-one-number", "heat", K(point=(0.5,)), r"'point'"),
    Case("heat-keypoint-99", "heat", K(point=None, keypoints_field="gt", keypoint=99), r"'keypoint'.*99"),
    Case("heat-keypoint-unknown-label", "heat", K(point=None, keypoints_field="gt", keypoint="tail"),
         r"'keypoint'.*'tail'"),
    Case("heat-keypoints_field-string", "heat", K(point=None, keypoints_field="note", keypoint=0),
         r"'keypoints_field'.*'note'"),
    Case("heat-no-point", "heat", K(point=None), r"point"),
    # ---- the operators (execute_operator): the message reaches the result
    Case("op-cf-pca_dim-0", "op:compute_fused_features", K(pca_dim=0), r"pca_dim"),
    Case("op-cf-features_field-dotdot", "op:compute_fused_features", K(features_field="../x"), r"'features_field'",
         path=True),
    Case("op-cf-features_field-existing", "op:compute_fused_features", K(features_field="note"),
         r"'features_field'.*'note'"),
    Case("op-cf-store_dtype-float64", "op:compute_fused_features", K(store_dtype="float64"), r"store_dtype"),
    Case("op-cf-recipe-sd_size-100", "op:compute_fused_features", K(sd_size=100), r"'sd_size'"),
    Case("op-cf-unknown-param", "op:compute_fused_features", K(bogus_param=1), r"bogus_param"),
    Case("op-prop-output_field-existing", "op:propagate_keypoints", K(output_field="note"),
         r"'output_field'.*'note'"),
    Case("op-prop-visibility_threshold-5", "op:propagate_keypoints", K(visibility_threshold=5),
         r"visibility_threshold"),
    Case("op-prop-reference_ids-bad", "op:propagate_keypoints", K(reference_ids=["nonexistent-id"]),
         r"'references'.*nonexistent-id"),
    Case("op-prop-references-mode", "op:propagate_keypoints", K(references="everything"), r"references"),
    Case("op-prop-source_field-missing", "op:propagate_keypoints", K(source_field="nope", references="annotated"),
         r"source_field"),
    Case("op-ev-pred_field-string", "op:evaluate_keypoints", K(pred_field="note"), r"pred_field"),
    Case("op-ev-alphas-text", "op:evaluate_keypoints", K(alphas="0.1, abc"), r"'alphas'"),
    Case("op-ev-alphas-out-of-range", "op:evaluate_keypoints", K(alphas="0.1, 1.5"), r"'alphas\[1\]'"),
    Case("op-ev-eval_key-slash", "op:evaluate_keypoints", K(eval_key="a/b"), r"'eval_key'", path=True),
    Case("op-flag-review_field-existing", "op:flag_keypoint_annotations", K(review_field="note"),
         r"'review_field'.*'note'"),
    Case("op-flag-min_confidence-2", "op:flag_keypoint_annotations", K(min_confidence=2), r"min_confidence"),
    Case("op-pca-output_field-slash", "op:write_feature_pca", K(output_field="a/b"), r"'output_field'", path=True),
    Case("op-pca-features_field-missing", "op:write_feature_pca", K(features_field="nope"),
         r"'features_field'.*'nope'"),
    Case("op-cf-batch_size-neg", "op:compute_fused_features", K(batch_size=-2), r"'batch_size'"),
    Case("op-cf-device-gpu", "op:compute_fused_features", K(device="gpu"), r"'device'"),
    Case("op-prop-soft_window-4", "op:propagate_keypoints", K(soft_window=4), r"'soft_window'"),
    Case("op-flag-alpha-0", "op:flag_keypoint_annotations", K(alpha=0.0), r"'alpha'"),
    Case("op-ev-gt_field-is-pred_field", "op:evaluate_keypoints", K(gt_field="pred"), r"'pred_field'.*'gt_field'"),
    Case("op-heat-reference_id-nope", "op:write_similarity_heatmap", K(reference_id="nope"), r"'reference_id'"),
    Case("op-heat-x-2", "op:write_similarity_heatmap", K(x=2.0), r"point x|Path: x\b"),
    Case("op-heat-keypoint-99", "op:write_similarity_heatmap", K(x=None, y=None, keypoints_field="gt",
                                                                 keypoint="99"), r"'keypoint'.*99"),
    Case("op-heat-output_field-dotdot", "op:write_similarity_heatmap", K(output_field="../x"), r"'output_field'",
         path=True),
]


# --------------------------------------------------------------------------- state
def _files(root: Path) -> dict:
    """Every file and folder under ``root``: path -> (size, mtime) (folders: None)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
            except OSError:
                out[p] = "unreadable"
    return out


def _state(w: World) -> dict:
    w.ds.reload()
    w.other.reload()
    return {
        "ds": field_snapshot(w.ds),
        "other": field_snapshot(w.other),
        "fields": sorted(w.ds.get_field_schema(flat=True)),
        "evaluations": w.ds.list_evaluations(),
        "runs": w.ds.list_runs(),
        "brain_runs": w.ds.list_brain_runs(),
        "skeletons": (dict(w.ds.skeletons), w.ds.default_skeleton),
        "tags": w.ds.count_sample_tags(),
        "files": _files(w.root),
    }


def _changes(before: dict, after: dict) -> dict:
    """What differs between two states (for failure messages)."""
    out = {}
    for key in ("fields", "evaluations", "runs", "brain_runs"):
        added = sorted(set(after[key]) - set(before[key]))
        if added:
            out[f"new {key}"] = added
    files = sorted(p for p in after["files"] if before["files"].get(p, "new") != after["files"][p])
    if files:
        out["files"] = files[:10]
    if after["tags"] != before["tags"]:
        out["tags"] = after["tags"]
    if after["ds"] != before["ds"]:
        b, a = before["ds"][0], after["ds"][0]
        out["changed sample fields"] = sorted({k for sid in b for k in set(b[sid]) | set(a.get(sid, {}))
                                               if b[sid].get(k) != a.get(sid, {}).get(k)})
    return out


def _restore(w: World, before: dict) -> None:
    """Undoes what a case that wrongly went through added, so later cases start clean."""
    w.ds.reload()
    for key in set(w.ds.list_evaluations()) - set(before["evaluations"]):
        w.ds.delete_evaluation(key)
    for key in set(w.ds.list_runs()) - set(before["runs"]):
        w.ds.delete_run(key)
    old = {f.split(".")[0] for f in before["fields"]}
    for name in set(w.ds.get_field_schema()) - old:
        w.ds.delete_sample_field(name)
    for tag in set(w.ds.count_sample_tags()) - set(before["tags"]):
        w.ds.untag_samples(tag)
    for p in sorted(set(_files(w.root)) - set(before["files"]), key=len, reverse=True):
        if os.path.isdir(p) and not os.path.islink(p):
            try:
                os.rmdir(p)
            except OSError:
                pass
        else:
            os.remove(p)


def _run_operator(w: World, name: str, params: dict, target) -> str:
    """Runs the operator immediately; returns the message line of its error.

    ``execute_operator`` raises an ``ExecutionError`` whose text is the traceback of the
    failure (``ExecutionResult.error``); its last line is ``<exception type>: <message>``
    (``ExecutionResult.error_message`` is the message alone)."""
    ctx = {"dataset": w.ds, "params": params}
    if target is not None:
        ctx["view"] = target
    with pytest.raises(ExecutionError) as info:
        foo.execute_operator(OP + name, ctx=ctx)
    lines = [ln for ln in str(info.value).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- the test
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip
                                               else []) for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world, case):
    w = world
    before = _state(w)
    target = case.target(w) if case.target is not None else None
    try:
        if case.fn.startswith("op:"):
            name = case.fn[3:]
            params = OP_PARAMS[name](w)
            params.update(case.kw(w))
            params = {k: v for k, v in params.items() if v is not None}
            last = _run_operator(w, name, params, target)
            print(f"{case.id}: {last}")  # shown with -s
            # (a) the operator failed with a ParameterError / ValueError naming the problem
            # (the form's own validation, "Validation error. Path: <param>. Reason: ...", refuses
            # values outside a form field's min / max / choices before execute() runs)
            assert re.match(r"^([\w.]*(ParameterError|ValueError): |Validation error\. Path: )", last), (
                f"not a parameter error: {last!r}")
            # the form names the input by its label (*Features field*) and the path by its name
            named = re.sub(r"\*[^*]+\*", lambda _: f"'{path.group(1)}'", last) \
                if (path := re.match(r"Validation error\. Path: ([\w.]+)\.", last)) else last
            assert re.search(case.match, named), f"error message {last!r} does not match {case.match!r}"
        else:
            # (a) a ValueError (ParameterError) whose message names the problem
            outcome = {}
            try:
                with pytest.raises(ValueError, match=case.match) as info:
                    outcome["returned"] = FUNCTIONS[case.fn](w, target, **case.kw(w))
                print(f"{case.id}: {type(info.value).__name__}: {info.value}")  # shown with -s
            except pytest.fail.Exception:
                if "returned" not in outcome:
                    raise
                pytest.fail(f"DID NOT RAISE: returned {str(outcome['returned'])[:400]!r}; "
                            f"changes: {_changes(before, _state(w))}")
        after = _state(w)
        # (c) no file or folder written: outside the configured store first (paths), then inside it
        new = sorted(set(after["files"]) - set(before["files"]))
        changed = sorted(p for p in set(after["files"]) & set(before["files"])
                         if after["files"][p] != before["files"][p])
        store = str(w.store) + os.sep
        outside = [p for p in new + changed if not p.startswith(store)]
        assert outside == [], f"written outside the configured folder {w.store}: {outside}"
        assert new + changed == [], f"written in the configured store: {new + changed}"
        # (b) no field changed, none appeared, no run left behind
        assert after["fields"] == before["fields"], (
            f"fields appeared: {sorted(set(after['fields']) - set(before['fields']))}, "
            f"vanished: {sorted(set(before['fields']) - set(after['fields']))}")
        assert after["evaluations"] == before["evaluations"], after["evaluations"]
        assert after["runs"] == before["runs"], after["runs"]
        assert after["brain_runs"] == before["brain_runs"], after["brain_runs"]
        assert after["tags"] == before["tags"], after["tags"]
        assert after["skeletons"] == before["skeletons"]
        assert after["other"] == before["other"], "the other dataset changed"
        assert after["ds"] == before["ds"], "a field of the dataset changed"
    finally:
        _restore(w, before)


def test_the_table_is_broad():
    """At least 45 cases, every function and every operator covered."""
    assert len(CASES) >= 45
    assert {c.fn for c in CASES} >= set(FUNCTIONS) | {f"op:{n}" for n in OP_PARAMS}
    assert len([c for c in CASES if c.fn.startswith("op:")]) >= 8
    assert len({c.id for c in CASES}) == len(CASES)
