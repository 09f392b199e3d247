"""Input helpers shared by the plugin's operators (thin glue, no computation).

- :func:`target_view_input` / :func:`get_target_view`: which samples to process (whole
  dataset, current view, selected samples), using FiftyOne's own view-target selector.
- :func:`model_inputs`: model ids or local directories, device, dtype, batch size, and
  the feature recipe (preset + a few overrides); defaults come from the config classes
  of :mod:`fiftyone_sdcorr.dataset.config` (written once there).
- :func:`function_kwargs`: operator params -> the keyword arguments of a dataset
  function, by name (as ``@voxel51/brain`` does: copy the params, drop the plumbing, pass
  the rest); blank values mean "the function's default"; an unknown param is an error.
- :func:`call_operator`: the programmatic ``__call__``: Python keywords -> params.
- :func:`delegation_config` / :func:`resolve_delegation`: delegated by default,
  immediate allowed; an explicit ``delegate`` param (if a caller passes one) forces it.
- :func:`execute` / :func:`run_with_progress`: runs a dataset-level function and reports its progress to
  the App: ``ctx.set_progress`` when delegated; in immediate mode a generator that yields
  ``set_progress`` messages while the work runs in a worker thread.
- :func:`reload_dataset` / :func:`collection_ctx`: small conveniences.

Progress convention of the dataset-level functions: ``progress`` is ``True`` / ``False``
(a FiftyOne progress bar or none) or a callable ``progress(fraction, label)`` with
``fraction`` in ``[0, 1]`` and a short text label.
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
from typing import Any, Callable, Dict, Optional, Sequence

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.core.extractor import PRESETS
from fiftyone_sdcorr.dataset.config import DTYPES, FeatureConfig
from fiftyone_sdcorr.dataset.engine import ParameterError

#: name of the view-target param (FiftyOne's own convention)
VIEW_TARGET = "view_target"

#: recipe overrides offered in forms: name -> (type, label, description)
RECIPE_PARAMS = {
    "sd_size": (int, "SD input size", "Letterbox square of the SD branch (multiple of 64)"),
    "sd_mode": (str, "SD mode", "'tiled' (overlapping tiles, as the paper) or 'whole' (one pass)"),
    "dino_size": (int, "DINOv2 input size", "Letterbox square of the DINOv2 branch (multiple of 14)"),
    "timestep": (int, "Timestep", "Diffusion timestep of the noised latent"),
    "alpha": (float, "SD weight (alpha)", "SD share of the fused descriptor, in [0, 1]"),
    "prompt": (str, "Prompt", "Text prompt; may contain '{label}'"),
}

_DTYPES = ("auto",) + DTYPES


# --------------------------------------------------------------------------- targets
def target_view_input(ctx, inputs, name: str = VIEW_TARGET, action: str = "Process",
                      allow_selected: bool = True, **kwargs):
    """Adds FiftyOne's view-target selector (dataset / current view / selected samples)
    to ``inputs`` and returns the resolved target collection."""
    inputs.view_target(
        ctx, name=name, action_description=action,
        allow_selected_samples=allow_selected, **kwargs,
    )
    return get_target_view(ctx, name)


def get_target_view(ctx, name: str = VIEW_TARGET):
    """The collection the user targeted; with no choice made (e.g. ``execute_operator``
    with a ``view`` in its context), the context's view, else the whole dataset."""
    return ctx.target_view(param_name=name)


def collection_ctx(sample_collection) -> dict:
    """An ``execute_operator`` context for a dataset or a view (the programmatic
    ``__call__`` of operators)."""
    if isinstance(sample_collection, fo.DatasetView):
        return {"view": sample_collection}
    return {"dataset": sample_collection}


# --------------------------------------------------------------------------- models / recipe
def model_inputs(ctx, inputs, recipe: bool = True, advanced: bool = True) -> None:
    """Model ids / directories, device, dtype, batch size, preset and recipe overrides."""
    inputs.str(
        "sd_model", default=FeatureConfig.sd_model, required=False, label="Stable Diffusion model",
        description="Hugging Face Hub id or local directory (diffusers layout)",
    )
    inputs.str(
        "dino_model", default=FeatureConfig.dino_model, required=False, label="DINOv2 model",
        description="Hugging Face Hub id or local directory (transformers layout)",
    )
    inputs.str("device", default="auto", required=False, label="Device",
               description="'auto' (CUDA when available), 'cuda', 'cuda:1', 'cpu', ...")
    _enum(inputs, "dtype", _DTYPES, "auto", "Precision", "'auto': bf16/fp16 on CUDA, fp32 on CPU")
    inputs.int(
        "batch_size", label="Batch size", required=False,
        description="Images per forward pass (empty: chosen from free GPU memory; "
        "halved automatically on CUDA out-of-memory)",
    )
    if recipe:
        recipe_inputs(ctx, inputs, advanced=advanced)


def recipe_inputs(ctx, inputs, advanced: bool = True) -> None:
    """Preset plus (when ``advanced``) a few recipe overrides, all optional."""
    _enum(inputs, "preset", tuple(PRESETS), FeatureConfig.preset, "Recipe preset",
          "'paper': the paper's recipe; 'whole': one SD pass; 'cpu': small inputs")
    if not advanced:
        return
    for key, (typ, label, desc) in RECIPE_PARAMS.items():
        if key == "sd_mode":
            _enum(inputs, key, ("tiled", "whole"), None, label, desc, required=False)
        elif typ is int:
            inputs.int(key, label=label, description=desc, required=False)
        elif typ is float:
            inputs.float(key, label=label, description=desc, required=False, min=0.0, max=1.0)
        else:
            inputs.str(key, label=label, description=desc, required=False)


def _enum(inputs, name, values, default, label, description, required=False):
    choices = types.DropdownView()
    for v in values:
        choices.add_choice(v, label=v)
    inputs.enum(name, choices.values(), default=default, required=required, label=label,
                description=description, view=choices)


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and (not v.strip() or v == "auto"))


#: params that steer the form or the target, never passed to a dataset function
PLUMBING = frozenset((VIEW_TARGET, "delegate", "delegation_target", "count", "references", "reference_tag",
                      "reference_ids", "x", "y"))


def function_kwargs(params: Dict[str, Any], fn: Callable[..., Any], positional: Sequence[str] = ()) -> Dict[str, Any]:
    """Operator params -> keyword arguments of ``fn`` (a dataset function), by name.

    Blank values (``None``, ``""``, ``"auto"`` for device / dtype) are left out, so the
    function's own default applies; the recipe overrides of the form (``sd_size``, ...)
    join a ``recipe`` dict param; ``positional`` names are taken by the caller. A param
    that is neither ``fn``'s nor plumbing is refused (a typo must not be ignored).
    """
    names = set(inspect.signature(fn).parameters) - {"progress"}
    recipe = dict(params.get("recipe") or {})
    out: Dict[str, Any] = {}
    for key, value in params.items():
        if key in PLUMBING or key in positional or key == "recipe" or _blank(value):
            continue
        if key in RECIPE_PARAMS:
            recipe[key] = value
        elif key in names:
            out[key] = value
        else:
            raise ParameterError(f"unknown parameter {key!r} for {fn.__name__}")
    if recipe:
        out["recipe"] = recipe
    return out


def python_params(**kwargs) -> Dict[str, Any]:
    """Python keywords of a programmatic ``__call__`` -> operator params (JSON-able:
    paths as strings, tuples as lists; ``None`` left out)."""
    out = {}
    for k, v in kwargs.items():
        if v is None:
            continue
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif isinstance(v, tuple):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        out[k] = v
    return out


# --------------------------------------------------------------------------- delegation
def delegation_config() -> Dict[str, bool]:
    """``OperatorConfig`` keyword arguments: delegated by default, immediate allowed."""
    return dict(
        allow_delegated_execution=True,
        allow_immediate_execution=True,
        default_choice_to_delegated=True,
    )


def resolve_delegation(ctx) -> Optional[bool]:
    """An explicit ``delegate`` param forces the mode; otherwise ``None`` (the user's or
    caller's choice, delegated by default)."""
    d = ctx.params.get("delegate", None)
    return None if d is None else bool(d)


# --------------------------------------------------------------------------- progress
def progress_callback(ctx, label_prefix: str = "") -> Callable[[float, str], None]:
    """``progress(fraction, label)`` -> ``ctx.set_progress`` (delegated runs)."""

    def cb(fraction, label=""):
        ctx.set_progress(progress=float(fraction), label=f"{label_prefix}{label}")

    return cb


def run_with_progress(ctx, fn: Callable[..., Any], *args, **kwargs):
    """Generator for immediate runs: runs ``fn(*args, progress=callback, **kwargs)`` in a
    worker thread and yields ``set_progress`` messages for the App while it runs.
    Re-raises ``fn``'s exception. Use as ``result = yield from run_with_progress(ctx, fn,
    ...)``; :func:`execute` picks this or the delegated path.
    """
    q: "queue.Queue" = queue.Queue()
    box: Dict[str, Any] = {}

    def cb(fraction, label=""):
        q.put(("progress", float(fraction), str(label)))

    def work():
        try:
            box["result"] = fn(*args, progress=cb, **kwargs)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = e
        finally:
            q.put(("done", None, None))

    t = threading.Thread(target=work, name="sdcorr-operator", daemon=True)
    t.start()
    last = None
    while True:
        kind, frac, label = q.get()
        if kind == "done":
            break
        # coalesce a burst of updates into the latest one
        while True:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt[0] == "done":
                q.put(nxt)
                break
            kind, frac, label = nxt
        if (frac, label) != last:
            last = (frac, label)
            yield ctx.ops.set_progress(label=label, progress=frac)
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def reload_dataset(ctx):
    """The App message that reloads the dataset (immediate runs only)."""
    return ctx.trigger("reload_dataset")


def execute(ctx, fn: Callable[..., Any], *args, reload: bool = True, **kwargs):
    """An operator's ``execute``: delegated, call ``fn`` with ``ctx.set_progress`` and
    return its summary (the delegated service stores it); immediate, a generator that
    streams progress to the App and then, with ``reload``, reloads the dataset."""
    if ctx.delegated:
        return fn(*args, progress=progress_callback(ctx), **kwargs)
    return _execute_immediate(ctx, fn, args, kwargs, reload)


def _execute_immediate(ctx, fn, args, kwargs, reload):
    result = yield from run_with_progress(ctx, fn, *args, **kwargs)
    if reload:
        yield reload_dataset(ctx)
    return result


def call_operator(op, sample_collection, delegate: bool = False, delegation_target=None, **kwargs):
    """The programmatic ``__call__`` of our operators (as ``@voxel51/brain`` does it):
    run ``op`` on a dataset or view now, or queue it for a delegated worker; ``kwargs``
    are the dataset function's keywords."""
    return foo.execute_operator(
        op.uri,
        collection_ctx(sample_collection),
        params=python_params(**kwargs),
        request_delegation=delegate,
        delegation_target=delegation_target,
    )
