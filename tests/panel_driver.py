"""Plays the App's part for the match panel (no browser): each panel method runs as the
App runs it, ``execute_operator(panel_uri, params={"__method__": ..., "panel_id": ...,
"panel_state": ..., <event params>})``; the App messages of the answer
(``patch_panel_state``, ``show_panel_output``) are applied the way the App applies them."""

import uuid

import pydash

import fiftyone.operators as foo

PANEL_URI = "@sdcorr/sdcorr/match_panel"


class PanelDriver:
    """Plays the App's part: keeps the panel state, calls methods, applies patches."""

    def __init__(self, dataset, current_sample=None, selected=None, view=None):
        self.dataset = dataset
        self.view = view  # the App's current view (None: the whole dataset)
        self.current_sample = current_sample
        self.selected = selected or []
        self.panel_id = f"panel-{uuid.uuid4().hex[:8]}"
        self.state = {}
        self.output = None
        self.requests = []

    def call(self, method, **params):
        return self.send({"__method__": method, "panel_id": self.panel_id, "panel_state": self.state, **params})

    def choose(self, key, value):
        """A user's choice in the dropdown ``key``, as the App sends it: the control shows the
        value in the panel state first, then its change event goes with that state."""
        self.state.setdefault("controls", {})[key] = value
        return self.call(f"on_change_{key}", path=f"controls.{key}", value=value)

    def send(self, params):
        """Sends an event with exactly these params (the App's request); keeps them in
        ``last_params``; ``requests`` are the App messages of the answer."""
        import copy

        self.last_params = copy.deepcopy(params)
        ctx = {
            "dataset": self.dataset,
            **({"view": self.view} if self.view is not None else {}),
            "current_sample": self.current_sample,
            "selected": self.selected,
            "params": params,
        }
        result = foo.execute_operator(PANEL_URI, ctx)
        result.raise_exceptions()
        self.requests = [r.to_json() for r in result.executor._requests]
        for r in self.requests:
            uri, p = r["operator_uri"], r["params"]
            if uri == "patch_panel_state":
                assert p["panel_id"] == self.panel_id
                for k, v in p["state"].items():
                    pydash.set_(self.state, k, v)
            elif uri == "show_panel_output":
                self.output = p["output"]
        return self

    # rendered output ------------------------------------------------------------
    def properties(self, obj=None):
        """Flat dict name -> property JSON of the rendered panel (nested objects too)."""
        obj = obj or self.output
        out = {}
        for name, prop in (obj["type"].get("properties") or {}).items():
            out[name] = prop
            if prop["type"].get("properties"):
                out.update(self.properties(prop))
        return out

    @property
    def figure(self):
        view = self.properties()["figure"]["view"]
        return view

    def traces(self, name=None, prefix=None):
        data = self.figure["data"]
        if name is not None:
            return [t for t in data if t.get("name") == name]
        if prefix is not None:
            return [t for t in data if (t.get("name") or "").startswith(prefix)]
        return data

    def status(self):
        return self.properties()["status"]["default"]


def place_of(trace):
    """(offset, scale, width, height) of an image trace."""
    return trace["x0"] - trace["dx"] / 2.0, trace["dx"]


def to_plot(trace, width, height, xy):
    """Normalised point -> plot coordinates for the image drawn by ``trace``."""
    x0, s = place_of(trace)
    return x0 + xy[0] * width * s, trace["y0"] - s / 2.0 + xy[1] * height * s


def image_size(trace):
    import base64
    import io

    from PIL import Image

    raw = base64.b64decode(trace["source"].split(",", 1)[1])
    with Image.open(io.BytesIO(raw)) as im:
        return im.size


