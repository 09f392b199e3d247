"""The match panel's state as this server last left it: the last choice wins.

Every panel event carries the panel state as the App held it when the event was sent.
Two choices made in quick succession (a field, then another one) are two events in
flight: the second one was sent before the answer to the first one came back, so its
state lacks what the first one changed (the reference, the fields). Handled as sent, the
second answer drew the figure from that stale state and, arriving last, stayed on screen
(measured in Chromium: the figure never reached the last choice).

So the server keeps, per panel, the state it last answered with and a revision number
(state key ``rev``, sent back with every answer). Events of one panel are handled one at
a time (:func:`panel_lock`); an event whose state carries an older revision than the
server's is handled on the server's state (:func:`adopt_newest`), and its answer (patches
and figure) starts from every earlier choice. The event itself (the control and value it
names) is applied on top: the last one wins.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import OrderedDict

REVISION_KEY = "rev"
MAX_PANELS = 64  # panels remembered (least recently used dropped first)

_lock = threading.Lock()
_shadows: "OrderedDict[str, tuple]" = OrderedDict()  # panel id -> (revision, state)
_locks: "OrderedDict[str, threading.Lock]" = OrderedDict()
_revisions = itertools.count(1)


def panel_lock(panel_id) -> threading.Lock:
    """The lock that serialises the events of one panel."""
    with _lock:
        lock = _locks.setdefault(str(panel_id), threading.Lock())
        _locks.move_to_end(str(panel_id))
        while len(_locks) > MAX_PANELS:
            _locks.popitem(last=False)
        return lock


def adopt_newest(ctx) -> bool:
    """Replaces the event's panel state by the server's when the event's state is older
    (its revision is lower than the last one answered); True when it did. A state without
    a revision is a fresh panel (the App reloaded): it is kept."""
    pid = ctx.params.get("panel_id")
    with _lock:
        shadow = _shadows.get(str(pid))
    rev = ctx.panel.state.get(REVISION_KEY)
    if shadow is None or not isinstance(rev, int) or rev >= shadow[0]:
        return False
    data = ctx.panel_state
    data.clear()
    data.update(copy.deepcopy(shadow[1]))
    return True


def record(ctx) -> int:
    """Notes the panel's state after an answer under a new revision, sent with it."""
    rev = next(_revisions)
    ctx.panel.state.set(REVISION_KEY, rev)
    pid = str(ctx.params.get("panel_id"))
    with _lock:
        _shadows[pid] = (rev, copy.deepcopy(ctx.panel_state))
        _shadows.move_to_end(pid)
        while len(_shadows) > MAX_PANELS:
            _shadows.popitem(last=False)
    return rev


__all__ = ["REVISION_KEY", "panel_lock", "adopt_newest", "record"]
