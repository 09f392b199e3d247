"""The environment the rest of the suite stands on: MongoDB via FiftyOne, the
isolated test database, plugin discovery, real photos, and the headless browser."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import fiftyone as fo
import fiftyone.core.odm as foo
import fiftyone.plugins as fop
from fiftyone import ViewField as F

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def test_database_is_the_isolated_test_database():
    tmp = os.environ["SDCORR_TEST_TMP"]
    assert fo.config.database_dir.startswith(tmp)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # conftest started a mongod of our own and pointed FiftyOne at it
    assert fo.config.database_uri == os.environ["FIFTYONE_DATABASE_URI"]
    assert fo.config.database_uri.startswith("mongodb://127.0.0.1:")
    fo.list_datasets()
    opts = foo.get_db_client().admin.command("getCmdLineOpts")
    assert opts["parsed"]["storage"]["dbPath"] == fo.config.database_dir
    assert Path(fo.config.database_dir, "mongod.lock").stat().st_size > 0


def test_dataset_roundtrip_with_keypoints(tmp_dataset, photo_paths):
    paths = list(photo_paths)[:3]
    samples = []
    for i, path in enumerate(paths):
        sample = fo.Sample(filepath=path, index=i)
        if i == 0:
            sample["gt"] = fo.Keypoints(
                keypoints=[
                    fo.Keypoint(
                        label="cat",
                        points=[(0.25, 0.5), (0.75, 0.5), (float("nan"),) * 2],
                        confidence=[0.9, 0.8, 0.1],
                    )
                ]
            )
        samples.append(sample)
    ids = tmp_dataset.add_samples(samples)

    assert len(ids) == 3
    assert len(tmp_dataset) == 3
    assert tmp_dataset.name in fo.list_datasets()

    annotated = tmp_dataset.exists("gt")
    assert len(annotated) == 1
    kp = annotated.first()["gt"].keypoints[0]
    assert kp.label == "cat"
    assert kp.points[0] == [0.25, 0.5]
    assert kp.confidence[:2] == [0.9, 0.8]

    assert tmp_dataset.match(F("index") >= 1).count() == 2
    assert tmp_dataset.count("gt.keypoints") == 1

    tmp_dataset.compute_metadata()
    widths = sorted(tmp_dataset.values("metadata.width"))
    assert widths == sorted(Image.open(p).size[0] for p in paths)

    # fresh handle from the database, not the cached object
    reloaded = fo.load_dataset(tmp_dataset.name)
    assert reloaded.count() == 3
    assert not reloaded.persistent


_SEEN_DATASET = {}


def test_tmp_dataset_fixture_gives_a_fresh_dataset(tmp_dataset):
    assert len(tmp_dataset) == 0
    assert not tmp_dataset.persistent
    assert tmp_dataset.name.startswith("sdcorr-test-")
    _SEEN_DATASET["name"] = tmp_dataset.name


def test_tmp_dataset_fixture_deletes_the_dataset():
    if "name" not in _SEEN_DATASET:
        pytest.skip("runs after test_tmp_dataset_fixture_gives_a_fresh_dataset")
    assert _SEEN_DATASET["name"] not in fo.list_datasets()


def test_photo_paths(photo_paths):
    assert {"chelsea", "coffee", "astronaut", "rocket", "portrait", "tiny"} <= set(
        photo_paths.by_name
    )
    for path in photo_paths:
        with Image.open(path) as img:
            assert img.mode == "RGB"
            assert min(img.size) >= 16
    with Image.open(photo_paths["portrait"]) as img:
        w, h = img.size
        assert h > w
    with Image.open(photo_paths["tiny"]) as img:
        assert max(img.size) <= 32
    assert photo_paths[0] == photo_paths.by_name["chelsea"]


def test_plugin_is_discovered():
    plugins_dir = fo.config.plugins_dir
    assert plugins_dir == os.environ["FIFTYONE_PLUGINS_DIR"]
    found = {p.name: p for p in fop.list_plugins(enabled="all")}
    assert "@sdcorr/sdcorr" in found, sorted(found)
    plugin = found["@sdcorr/sdcorr"]
    # found through the symlink in the plugins dir, which leads to this checkout
    assert Path(plugin.directory).parent == Path(plugins_dir)
    assert Path(plugin.directory).resolve() == REPO_ROOT
    assert not plugin.builtin


def test_plugin_manifest_is_loadable():
    definition = fop.get_plugin("@sdcorr/sdcorr")
    assert definition.name == "@sdcorr/sdcorr"
    assert definition.py_entry == "fiftyone_sdcorr/__init__.py"
    assert Path(definition.py_entry_path).resolve() == (
        REPO_ROOT / "fiftyone_sdcorr" / "__init__.py"
    )
    # every operator / panel must be listed in fiftyone.yml or it is skipped
    assert {"compute_fused_features", "propagate_keypoints"} <= set(definition.operators)


def _browser_expected():
    return os.environ.get("SDCORR_BROWSER", "1") != "0"


@pytest.mark.skipif(not _browser_expected(), reason="SDCORR_BROWSER=0")
def test_chromium_installed():
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0:
            pytest.skip(
                f"{CHROMIUM} missing and setup.sh was not run as root "
                "(apt-get install chromium)"
            )
        pytest.fail(f"{CHROMIUM} missing; bash scripts/setup.sh installs it as root")
    assert os.access(CHROMIUM, os.X_OK)
    assert shutil.which("chromium") is not None
