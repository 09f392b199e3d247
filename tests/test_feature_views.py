"""Feature views the App shows: PCA / part-cluster pictures as a media field, heat maps;
through the operators, with features stored by compute_fused_features (a deterministic
local descriptor stands in for SD + DINOv2: no weights here)."""

import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.operators as foo

from fiftyone_sdcorr.core.pictures import visualize as vis
from fiftyone_sdcorr.dataset.compute_features import compute_fused_features
from local_descriptor import LocalDescriptor
from snapshots import field_snapshot

PCA_URI = "@sdcorr/sdcorr/write_feature_pca"


@pytest.fixture(scope="module")
def world(photo_paths, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    ds = fo.Dataset(f"sdcorr-views-{uuid.uuid4().hex[:8]}")
    names = ["chelsea", "coffee", "astronaut"]
    ds.add_samples([fo.Sample(filepath=photo_paths[n], note=n, score=0.5) for n in names])
    ds.add_sample(fo.Sample(filepath=photo_paths["chelsea"], note="same image twice"))
    ds.add_sample(fo.Sample(filepath=photo_paths["rocket"], note="no features"))
    some = ds.select(ds.values("id")[:4])
    summary = compute_fused_features(some, extractor=LocalDescriptor(size=224, stride=14),
                                     store_dir=str(tmp / "store"), progress=False)
    assert summary["computed"] == 4
    yield ds, tmp, summary
    ds.delete()


@pytest.mark.parametrize("mode", ["pca", "parts"])
def test_feature_pictures_are_a_media_field_in_colour(world, mode):
    ds, tmp, summary = world
    field = f"view_{mode}"
    before = field_snapshot(ds)
    res = foo.execute_operator(PCA_URI, {"dataset": ds}, params={"output_field": field, "mode": mode,
                                                                 "n_parts": 5})
    res.raise_exceptions()
    ds.reload()
    # the App can switch its media to the pictures; nothing else changed
    assert field in ds.app_config.media_fields and "filepath" in ds.app_config.media_fields
    assert field_snapshot(ds, (field,)) == before
    paths = ds.values(field)
    assert sum(p is not None for p in paths) == 4  # the sample without features is skipped
    # written beside the feature store in use, named by sample id
    first = Path(paths[0])
    assert first.parent == Path(summary["store_dir"]) / "_views" / field
    pics = [np.asarray(Image.open(p)) for p in paths if p]
    w, h = vis.display_size(*Image.open(ds.first().filepath).size, 512)
    assert pics[0].shape == (h, w, 3)
    # one fit for the whole view: the same image gets the same colours
    assert np.array_equal(pics[0], pics[3])
    assert not np.array_equal(pics[0], pics[1])
    if mode == "pca":
        assert pics[0].std() > 10  # colourful, not flat
    else:  # part clusters: at most n_parts colours (+ black padding)
        colours = {tuple(c) for c in pics[0].reshape(-1, 3)}
        assert 2 <= len(colours - {(0, 0, 0)}) <= 5
    # never overwrites without asking
    with pytest.raises(Exception, match="overwrite"):
        foo.execute_operator(PCA_URI, {"dataset": ds}, params={"output_field": field, "mode": mode})


def test_feature_pictures_refuse_a_field_of_another_type(world):
    ds, _, _ = world
    before = field_snapshot(ds)
    with pytest.raises(Exception, match="score"):  # a number field, even with overwrite
        foo.execute_operator(PCA_URI, {"dataset": ds}, params={"output_field": "score", "overwrite": True})
    with pytest.raises(Exception, match="note.*overwrite"):  # a user's string field, without overwrite
        foo.execute_operator(PCA_URI, {"dataset": ds}, params={"output_field": "note"})
    ds.reload()
    assert field_snapshot(ds) == before
    assert not {"note", "score"} & set(ds.app_config.media_fields or [])


DENSE_URI = "@sdcorr/sdcorr/write_dense_views"


def _form(ds, uri, params):
    """``{input: (default, error message or None)}`` of an operator's form as the App resolves it."""
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    prop = asyncio.run(resolve_type(OperatorRegistry(), uri, {"dataset_name": ds.name, "params": params}))
    return {k: (p.default, p.error_message if p.invalid else None) for k, p in prop.type.properties.items()}


def test_dense_pictures_carry_the_reference_position_colours(world):
    from fiftyone_sdcorr.core.matching.dense import position_colors

    ds, tmp, summary = world
    ids = ds.values("id")
    before = field_snapshot(ds)
    res = foo.execute_operator(DENSE_URI, {"dataset": ds}, params={"reference_id": ids[0]})
    res.raise_exceptions()
    ds.reload()
    # a media field beside the PCA pictures' (named by sample id, beside the store); nothing else changed
    assert "sdcorr_dense" in ds.app_config.media_fields
    assert field_snapshot(ds, ("sdcorr_dense",)) == before
    paths = ds.values("sdcorr_dense")
    assert [p is not None for p in paths] == [True, True, True, True, False]  # no features: skipped
    assert Path(paths[0]) == Path(summary["store_dir"]) / "_views" / "sdcorr_dense" / f"{ids[0]}.png"
    w, h = vis.display_size(*Image.open(ds.first().filepath).size, 512)
    colors = position_colors(w, h)
    ref, same, other = (np.asarray(Image.open(paths[i])) for i in (0, 3, 1))
    # the reference and the same image again: every pixel matches itself, so the picture is
    # the colour map (but for the outer half token, where upsampled cells tie)
    assert same.shape == (h, w, 3) and np.array_equal(ref, same)
    m = int(np.ceil(14 / 224 * max(w, h) / 2))  # half a token, in picture pixels
    assert np.array_equal(same[m:-m, m:-m], colors[m:-m, m:-m])
    # another image: its own arrangement of the reference's colours
    assert not np.array_equal(other[:, :min(w, other.shape[1])], colors[:other.shape[0], :other.shape[1]])
    assert other.std() > 10

    # the reference warped onto each sample, through the operator's Python call
    op = foo.get_operator(DENSE_URI)
    op(ds, ids[0], "dense_warp", mode="warp", resolution=64, output_dir=str(tmp / "warp"))
    warped = np.asarray(Image.open(ds[ids[3]]["dense_warp"])).astype(float)
    photo = np.asarray(vis.downsample(Image.open(ds.first().filepath), 512)).astype(float)
    assert Path(ds[ids[3]]["dense_warp"]).parent == tmp / "warp"
    assert np.median(np.abs(warped - photo)[m:-m, m:-m]) == 0  # identical image: the photo itself
    # the form: ready to run on a free output name; without a reference it says so under the input
    form = _form(ds, DENSE_URI, {"reference_id": ids[0]})
    assert form["output_field"][0] == "sdcorr_dense_2" and not [k for k, v in form.items() if v[1]]
    assert "no reference sample" in _form(ds, DENSE_URI, {})["reference_id"][1]
    # never overwrites without asking
    with pytest.raises(Exception, match="overwrite"):
        foo.execute_operator(DENSE_URI, {"dataset": ds}, params={"reference_id": ids[0]})
    with pytest.raises(Exception, match=r"\*Picture\*"):  # the form's label for mode
        foo.execute_operator(DENSE_URI, {"dataset": ds}, params={"reference_id": ids[0], "mode": "flow",
                                                                 "output_field": "d3"})
