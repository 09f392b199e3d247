"""Parameter checks with messages that name the parameter (no FiftyOne import).

Used by :class:`~fiftyone_sdcorr.core.features.extractor.Recipe` and by the config objects of the
dataset layer, so every number is checked where the config is built: before any model
loads or anything is written.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence


class ParameterError(ValueError):
    """A parameter is invalid; raised before anything loads or is written. The message
    names the parameter."""


def _bad(name: str, value: Any, want: str) -> ParameterError:
    return ParameterError(f"parameter {name!r} must be {want}, got {value!r}")


def check_int(name: str, value: Any, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer (a bool or a non-integral float is refused) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise _bad(name, value, _range_text("an integer", lo, hi))
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, value, _range_text("an integer", lo, hi))
    return v


def check_float(name: str, value: Any, *, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False) -> float:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, _range_text("a finite number", lo, hi, lo_open))
    v = float(value)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise _bad(name, value, _range_text("a number", lo, hi, lo_open))
    return v


def _range_text(what: str, lo, hi, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{what} <= {hi}"
    return what


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, value, "True or False")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in tuple(choices):
        raise _bad(name, value, f"one of {list(choices)}")
    return value


def check_str(name: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise _bad(name, value, "a non-empty string" if not empty else "a string")
    return value


def check_floats(name: str, values: Any, *, lo: float, hi: float, lo_open: bool = True) -> tuple:
    """A non-empty list of numbers, each in ``(lo, hi]``; a string is refused."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise _bad(name, values, f"a non-empty list of numbers in {'(' if lo_open else '['}{lo}, {hi}]")
    out = tuple(check_float(f"{name}[{i}]", v, lo=lo, hi=hi, lo_open=lo_open) for i, v in enumerate(values))
    if not out:
        raise _bad(name, values, "a non-empty list of numbers")
    return out


__all__ = ["ParameterError", "check_int", "check_float", "check_bool", "check_choice", "check_str",
           "check_floats"]
