"""Names of objects (detections) a user can tell apart in the App: the label, where the
box sits on the picture and its size in pixels, e.g. ``"cat (top-left, 120×80 px)"``;
two objects that would still read the same get ``#1``, ``#2`` (detection order).

Used by the match panel's Object and Reference object dropdowns, the figure's titles and
the operators' object choices.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from fiftyone_sdcorr.dataset.pck import image_size_of

_COLUMNS = ("left", "center", "right")
_ROWS = ("top", "middle", "bottom")


def position_word(box: Sequence[float]) -> str:
    """Where a normalised ``[x, y, w, h]`` box's centre sits: ``top-left`` ...
    ``bottom-right``, ``center`` for the middle third both ways."""
    cx, cy = box[0] + box[2] / 2.0, box[1] + box[3] / 2.0
    col = _COLUMNS[min(2, max(0, int(cx * 3)))]
    row = _ROWS[min(2, max(0, int(cy * 3)))]
    if row == "middle":
        return col
    return row if col == "center" else f"{row}-{col}"


def object_name(label: Optional[str], box: Optional[Sequence[float]],
                image_size: Optional[Tuple[int, int]] = None) -> str:
    """``"<label> (<position>, <w>×<h> px)"``; without the image size the box's share of
    the picture (``"40%×25%"``); without a box the label alone."""
    base = label or "object"
    if not box:
        return base
    if image_size:
        w, h = image_size
        size = f"{round(box[2] * w)}×{round(box[3] * h)} px"
    else:
        size = f"{round(box[2] * 100)}%×{round(box[3] * 100)}%"
    return f"{base} ({position_word(box)}, {size})"


def image_size(filepath: Optional[str], metadata=None) -> Optional[Tuple[int, int]]:
    """The image's ``(width, height)``, or None when it cannot be read."""
    try:
        return tuple(image_size_of(filepath, metadata)) if filepath else None
    except Exception:  # noqa: BLE001 -- a name without pixels is still a name
        return None


def object_names(objects: Sequence[Tuple[Optional[str], Optional[Sequence[float]]]],
                 image_size: Optional[Tuple[int, int]] = None) -> List[str]:
    """The names of one picture's objects (``[(label, box)]``, in detection order), made
    unique with ``#k`` where two would read the same."""
    names = [object_name(label, box, image_size) for label, box in objects]
    out = []
    for name in names:
        same = [i for i, n in enumerate(names) if n == name]
        out.append(name if len(same) == 1 else f"{name} #{len([n for n in out if n.startswith(name)]) + 1}")
    return out


__all__ = ["position_word", "object_name", "object_names", "image_size"]
