"""Session-wide test environment: an isolated FiftyOne world per test session.

Works both under ``bash scripts/test.sh`` (which prepares the environment and sets
``SDCORR_TEST_ENV=1``) and under a bare ``pytest``. In the bare case this module
creates a temp dir holding a fresh MongoDB data dir and a plugins dir with a symlink
to this repository, and points FiftyOne at them *before* fiftyone is imported, so
tests never touch a user's real database, config or plugins. A ``FIFTYONE_DATABASE_DIR``
already set in the shell is deliberately NOT used by a bare ``pytest`` for that reason.

Nothing model-related lives here (see tests/tiny_models.py).
"""

import atexit
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- env
# This must run before anything imports fiftyone (its config is read at import).
if "fiftyone" in sys.modules and os.environ.get("SDCORR_TEST_ENV") != "1":
    warnings.warn(
        "fiftyone was imported before tests/conftest.py; the isolated test "
        "database may not be used. Run the tests with: bash scripts/test.sh"
    )

_OWNED_TMP = None  # the temp dir this module created (bare pytest only)

if os.environ.get("SDCORR_TEST_ENV") != "1":
    _OWNED_TMP = Path(tempfile.mkdtemp(prefix="sdcorr-pytest."))
    (_OWNED_TMP / "db").mkdir()
    (_OWNED_TMP / "plugins").mkdir()
    os.symlink(REPO_ROOT, _OWNED_TMP / "plugins" / "sdcorr")
    os.environ["SDCORR_TEST_TMP"] = str(_OWNED_TMP)
    os.environ["FIFTYONE_DATABASE_DIR"] = str(_OWNED_TMP / "db")
    os.environ["FIFTYONE_PLUGINS_DIR"] = str(_OWNED_TMP / "plugins")
    # absent files: FiftyOne uses its defaults, not ~/.fiftyone/*.json
    os.environ["FIFTYONE_CONFIG_PATH"] = str(_OWNED_TMP / "fiftyone-config.json")
    os.environ["FIFTYONE_APP_CONFIG_PATH"] = str(
        _OWNED_TMP / "fiftyone-app-config.json"
    )
    os.environ.pop("FIFTYONE_DATABASE_URI", None)
    os.environ.pop("FIFTYONE_DATABASE_NAME", None)

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import fiftyone as fo  # noqa: E402


def _pids_of_this_session(tmp):
    """PIDs (other than ours) whose environment or command line names ``tmp``."""
    needle = str(tmp).encode()
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    if needle in f.read():
                        pids.append(int(entry))
                        break
            except OSError:
                pass
    return pids


def _cleanup_owned_tmp():
    """Bare pytest only: stop this session's mongod and remove its temp dir."""
    if _OWNED_TMP is None or not _OWNED_TMP.exists():
        return
    pids = _pids_of_this_session(_OWNED_TMP)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + 10
    while pids and time.time() < deadline:
        time.sleep(0.2)
        pids = _pids_of_this_session(_OWNED_TMP)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(_OWNED_TMP, ignore_errors=True)


# atexit runs after pytest and FiftyOne are done with the database.
atexit.register(_cleanup_owned_tmp)


# --------------------------------------------------------------------------- hooks
def pytest_report_header(config):
    return [
        f"fiftyone {fo.__version__}: database_dir={fo.config.database_dir} "
        f"plugins_dir={fo.config.plugins_dir}",
    ]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def tmp_dataset():
    """A new, empty, non-persistent dataset with a unique name; deleted afterwards."""
    dataset = fo.Dataset(f"sdcorr-test-{uuid.uuid4().hex[:12]}")
    dataset.persistent = False
    try:
        yield dataset
    finally:
        if not dataset.deleted:
            dataset.delete()


class PhotoPaths(list):
    """A list of image file paths (str) that can also be indexed by photo name.

    ``photo_paths[0]``, ``for p in photo_paths``, ``photo_paths["chelsea"]``,
    ``photo_paths.by_name`` (a dict name -> path) all work.
    """

    def __init__(self, by_name):
        super().__init__(by_name.values())
        self.by_name = dict(by_name)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.by_name[key]
        return super().__getitem__(key)


@pytest.fixture(scope="session")
def photo_paths(tmp_path_factory):
    """Real photos from ``skimage.data`` written as JPEG/PNG files.

    Names (in order): chelsea (jpg, 451x300 cat), coffee (jpg, 600x400),
    astronaut (png, 512x512), rocket (jpg, 640x427), cat (jpg, skimage's other copy
    of chelsea, when present), portrait (jpg, 256x512 crop of astronaut, taller than
    wide) and tiny (png, 24x16 downscale of coffee).
    """
    import skimage.data

    out = tmp_path_factory.mktemp("photos")
    images = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket", "cat"):
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        images[name] = np.ascontiguousarray(loader()[..., :3])
    astronaut = images.get("astronaut", skimage.data.astronaut()[..., :3])
    images["portrait"] = np.ascontiguousarray(astronaut[:, 128:384])  # 512 x 256
    images["tiny"] = np.asarray(
        Image.fromarray(images["coffee"]).resize((24, 16), Image.BILINEAR)
    )

    ext = {"astronaut": "png", "tiny": "png"}
    by_name = {}
    for name, array in images.items():
        path = out / f"{name}.{ext.get(name, 'jpg')}"
        img = Image.fromarray(array.astype(np.uint8), mode="RGB")
        if path.suffix == ".jpg":
            img.save(path, quality=95)
        else:
            img.save(path)
        by_name[name] = str(path)
    return PhotoPaths(by_name)
