"""Files the dataset functions write beside their labels (mask PNGs, heat maps, pictures,
swapped images): where they go, and writes that are verified.

- :func:`beside_store`: the feature store namespace the run's features were read from
  (a stored feature file's grandparent: ``<store root>/<fingerprint>``), else a fallback;
  mask files (``_masks``), feature views (``_views``) and swaps (``_swaps``) all go there,
  so they follow the store in use.
- The folder is checked in the run's checks with
  :func:`fiftyone_sdcorr.core.common.files.check_output_folder` (exists or creatable, a
  folder, writable), before any model loads or field is created.
- :func:`export_label_png`: FiftyOne's own ``export_mask`` / ``export_map`` writes with
  ``cv2.imwrite``, which returns False instead of raising when the write fails (a
  read-only folder, a full disk); here the file is written under a temporary name,
  verified (it exists and decodes) and renamed, else an ``OSError`` is raised and the
  label keeps its array (no ``mask_path`` to a file that was never written).
- :func:`package_files`: the PNG files of labels this package wrote (named
  ``<label id>.png`` in a folder of the package), the ones ``overwrite=True`` removes.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Iterable, List, Optional

from PIL import Image

from fiftyone_sdcorr.core.common.files import TMP_PREFIX


def beside_store(stored_paths: Iterable[Optional[str]], fallback) -> Path:
    """The store namespace of the first stored feature path (``<namespace>/<shard>/<key>``),
    else ``fallback`` (the configured or default store root of the dataset)."""
    first = next((p for p in stored_paths if p), None)
    return Path(first).parent.parent if first else Path(os.path.expanduser(str(fallback)))


def export_label_png(label, attr: str, path: Path) -> None:
    """Writes ``label.<attr>`` (``"mask"`` or ``"map"``) to ``path`` with FiftyOne's export,
    verified, then points the label at it (``mask_path``; ``map_path`` with the heat map's
    ``range`` kept). A failed write raises ``OSError`` and leaves the label as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        if attr == "mask":
            label.export_mask(str(tmp))
        else:
            label.export_map(str(tmp))
        _verify_png(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if attr == "mask":
        label.mask, label.mask_path = None, str(path)
    else:
        rng = list(label.range) if label.range is not None else None
        label.map, label.map_path, label.range = None, str(path), rng


def _verify_png(tmp: Path, path: Path) -> None:
    """``tmp`` exists and decodes as an image (``cv2.imwrite`` may have written nothing,
    or half a file on a full disk)."""
    if not tmp.is_file():
        raise OSError(errno.EIO, "the PNG was not written (a read-only folder or a full disk?)", str(path))
    try:
        with Image.open(tmp) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 -- any decoding error: a broken file
        raise OSError(errno.EIO, f"the PNG written is unreadable ({e})", str(path)) from None


def package_files(labels, folders: Iterable[Path], folder_name: str) -> List[Path]:
    """The files behind ``labels`` (``mask_path`` / ``map_path``) that this package wrote:
    named ``<label id>.png`` and lying in one of ``folders`` or in a folder called
    ``folder_name`` (a user's own mask files are never among them)."""
    folders = {Path(f).absolute() for f in folders}
    out = []
    for label in labels:
        for attr in ("mask_path", "map_path"):
            value = label.get_field(attr) if label.has_field(attr) else None
            if not value:
                continue
            p = Path(value)
            if p.name == f"{label.id}.png" and (p.parent.absolute() in folders or p.parent.name == folder_name):
                out.append(p)
    return out


def remove_files(paths: Iterable[Path]) -> List[str]:
    """Removes ``paths`` (missing ones are fine); the problems, as text."""
    problems = []
    for p in paths:
        try:
            Path(p).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            problems.append(f"{p}: {e.strerror or e}")
    return problems


__all__ = ["beside_store", "export_label_png", "package_files", "remove_files"]
