"""One progress helper for the dataset-level functions.

``progress`` is what FiftyOne's own functions take: True / False / None (a FiftyOne
progress bar, shown or not per FiftyOne's config), or a FiftyOne progress callable that
takes ONE argument, the :class:`fiftyone.core.utils.ProgressBar` (such as
``fo.report_progress(fn, n=10)`` or ``fo.report_progress(fn, dt=0.5)``). It may also be
our own callable ``cb(fraction, label)``, which operators turn into ``ctx.set_progress`` /
``set_progress`` messages. The two kinds of callable are told apart by signature: one
that accepts two positional arguments is ours, any other goes to FiftyOne's bar.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Callable, Optional, Union

import fiftyone.core.utils as fou

logger = logging.getLogger(__name__)

ProgressArg = Union[bool, None, Callable[[float, str], Any], Callable[[fou.ProgressBar], Any]]


def takes_fraction_and_label(fn: Callable) -> bool:
    """Whether ``fn`` accepts two positional arguments (our ``cb(fraction, label)``);
    False for FiftyOne's one-argument ``cb(progress_bar)`` callables. A callable whose
    signature cannot be read counts as ours."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(0.0, "")
    except TypeError:
        return False
    return True


def _guarded(fn: Callable) -> Callable:
    """``fn(progress_bar)`` that logs, instead of raising, what ``fn`` raises."""
    def call(pb):
        try:
            fn(pb)
        except Exception:  # a progress hook must never kill the run
            logger.warning("progress callback failed", exc_info=True)

    return call


class Progress:
    """A FiftyOne ``ProgressBar`` or a throttled ``callback(fraction, label)``.

    ``callback(fraction, label)`` gets at most one update per ``min_interval`` seconds
    (delegated runs write each one to the database), always the first and the final 1.0.
    A FiftyOne progress callable (one argument) is handed to
    ``fou.ProgressBar(total=..., progress=callable)``, which calls it with the bar on
    every update (``fo.report_progress`` does its own throttling). A failing callback
    of either kind is logged and never stops the work.
    """

    def __init__(self, progress: ProgressArg, total: int, label: str = "", min_interval: float = 0.5):
        self.total, self.done, self.label = max(int(total), 0), 0, label
        ours = callable(progress) and takes_fraction_and_label(progress)
        self.callback = progress if ours else None
        self.min_interval, self._last = float(min_interval), float("-inf")
        self.bar = None
        if self.callback is None:
            bar_progress = _guarded(progress) if callable(progress) else progress
            self.bar = fou.ProgressBar(total=self.total, progress=bar_progress)
            self.bar.__enter__()
        self._emit(f"{label} 0/{self.total}".strip())

    def _emit(self, label: str) -> None:
        if self.callback is None:
            return
        frac = 1.0 if self.total == 0 else min(1.0, self.done / self.total)
        now = time.monotonic()
        if frac < 1.0 and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            self.callback(frac, label)
        except Exception:  # a progress hook must never kill the run
            logger.warning("progress callback failed", exc_info=True)

    def update(self, n: int = 1, label: Optional[str] = None) -> None:
        self.done += n
        if self.bar is not None and n:
            self.bar.update(n)
        self._emit(label or f"{self.label} {self.done}/{self.total}".strip())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
