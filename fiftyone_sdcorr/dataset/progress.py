"""One progress helper for the dataset-level functions.

``progress`` is what FiftyOne's own functions take (True / False / None: a FiftyOne
progress bar, shown or not per FiftyOne's config) or a callable ``cb(fraction, label)``
that operators turn into ``ctx.set_progress`` / ``set_progress`` messages.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import fiftyone.core.utils as fou

logger = logging.getLogger(__name__)

ProgressArg = Union[bool, None, Callable[[float, str], Any]]


class Progress:
    """A FiftyOne ``ProgressBar`` or a throttled ``callback(fraction, label)``.

    Callbacks get at most one update per ``min_interval`` seconds (delegated runs write
    each one to the database), always the first and the final 1.0; a failing callback
    is logged and never stops the work.
    """

    def __init__(self, progress: ProgressArg, total: int, label: str = "", min_interval: float = 0.5):
        self.total, self.done, self.label = max(int(total), 0), 0, label
        self.callback = progress if callable(progress) else None
        self.min_interval, self._last = float(min_interval), float("-inf")
        self.bar = None
        if self.callback is None:
            self.bar = fou.ProgressBar(total=self.total, progress=progress)
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
