"""Files the commands write: paths checked before any work starts, writes that are atomic.

- :func:`check_output_file` / :func:`check_output_folder`: where a result, a predictions
  file or a cache will go is checked up front (not a folder / not a file, not under a
  file, writable), so a bad path fails in a second with a message naming the parameter,
  not after the models loaded or the scoring finished. Nothing is created by a check.
- :func:`write_atomic` / :func:`write_text_atomic`: a temporary file in the same folder,
  flushed, then ``os.replace``: a reader (or a rerun after a crash, a full disk, a kill)
  sees the old file or the new one, never half of one.

Pure Python; no FiftyOne import.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from fiftyone_sdcorr.core.common.params import ParameterError

TMP_PREFIX = ".tmp-"


def _path(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ParameterError(f"parameter {name!r} must be a file path, got {value!r}")
    return Path(os.path.expanduser(os.fspath(value)))


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(name: str, path: Path) -> None:
    """The nearest existing folder above ``path`` is a writable folder (not a file)."""
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise ParameterError(f"parameter {name!r}: {path} lies under {anc}, which is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ParameterError(f"parameter {name!r}: cannot write under {anc} (permission denied)")


def _probe(name: str, folder: Path) -> None:
    """Creates and removes a file in an existing ``folder`` (catches read-only mounts)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ParameterError(f"parameter {name!r}: cannot write in {folder} ({e.strerror or e})") from None


def check_output_file(name: str, value) -> Path:
    """``value`` as a path a file can be written to (checked, nothing created)."""
    path = _path(name, value)
    if path.is_dir():
        raise ParameterError(f"parameter {name!r}: {path} is a folder; give a file name")
    _check_parent(name, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ParameterError(f"parameter {name!r}: {path} is not writable")
    if path.parent.is_dir():
        _probe(name, path.parent)
    return path


def check_output_folder(name: str, value) -> Path:
    """``value`` as a folder files can be written in (checked, nothing created)."""
    path = _path(name, value)
    if path.exists() and not path.is_dir():
        raise ParameterError(f"parameter {name!r}: {path} is a file, not a folder")
    _check_parent(name, path)
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ParameterError(f"parameter {name!r}: cannot write in {path} (permission denied)")
        _probe(name, path)
    return path


def write_atomic(path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to a temporary file next to ``path``, then ``os.replace`` it; on any
    failure (a full disk) the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}"
    # os.open with 0o666 honours the umask (mkstemp would force 0o600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise with_filename(e, path)


def with_filename(e: BaseException, path) -> BaseException:
    """An ``OSError`` without a file name (a full disk: ``[Errno 28]``) with ``path`` as
    its file name, so its message says which file; anything else as it is."""
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:
        new = OSError(e.errno, e.strerror or str(e), str(path))
        new.__cause__ = e
        return new
    return e


def write_text_atomic(path, text: str, fsync: bool = True) -> None:
    write_atomic(path, text.encode("utf-8"), fsync)


__all__ = ["check_output_file", "check_output_folder", "write_atomic", "write_text_atomic", "with_filename",
           "TMP_PREFIX"]
