"""Input helpers shared by the plugin's operators (thin glue, no computation).

- :func:`target_view_input` / :func:`get_target_view`: which samples to process (whole
  dataset, current view, selected samples), using FiftyOne's own view-target selector.
- :func:`model_inputs`: model ids or local directories, device, dtype, batch size, and
  the feature recipe (preset + a few overrides); defaults come from the config classes
  of :mod:`fiftyone_sdcorr.dataset.config` (written once there).
- :func:`bounds`: a form input's min / max, from the config's ``RANGES``.
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
``fraction`` in ``[0, 1]`` and a short text label (what the operators pass). FiftyOne's
one-argument progress callables (``fo.report_progress(fn, n=...)``) are accepted too:
:mod:`fiftyone_sdcorr.dataset.progress` tells the two apart by signature.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import re
import threading
from typing import Any, Callable, Dict, Optional, Sequence

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_sdcorr.core.features.extractor import PRESETS
from fiftyone_sdcorr.core.features.methods import METHODS
from fiftyone_sdcorr.dataset.config import DTYPES, FEATURE_PARAMS, RANGES, FeatureConfig
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
logger = logging.getLogger(__name__)


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


def patches_input(ctx, inputs, target) -> Optional[str]:
    """The optional ``patches_field`` choice: whole images (blank), or the objects of a
    ``fo.Detections`` field; preselected: a patches view's own field, else the objects
    field of the dataset's object features when it has no whole-image features
    (:func:`default_patches_field`). Returns the value the form holds."""
    fields = sorted(ctx.dataset.get_field_schema(embedded_doc_type=fo.Detections)) if ctx.dataset is not None else []
    default = target.patches_field if target is not None and getattr(target, "_is_patches", False) else \
        default_patches_field(ctx.dataset)
    label, desc = "Objects (patches field)", "Blank: whole images. A fo.Detections field: one unit per object (its box)"
    if fields:
        choices = types.DropdownView()
        for f in fields:
            choices.add_choice(f, label=f)
        inputs.enum("patches_field", choices.values(), required=False, default=default, label=label,
                    description=desc, view=choices)
    else:
        inputs.str("patches_field", required=False, default=default, label=label, description=desc)
    return ctx.params["patches_field"] if "patches_field" in ctx.params else default


def default_patches_field(dataset) -> Optional[str]:
    """The objects field of the dataset's object features (a ``compute_fused_features``
    record for it, or ``<field>.detections.sdcorr_features``) when the dataset has no
    whole-image features; else None (whole images)."""
    from fiftyone_sdcorr.dataset.config import FEATURES_FIELD
    from fiftyone_sdcorr.dataset.engine import recorded_fields
    from fiftyone_sdcorr.plugin.panel_ranking import object_features

    objects = object_features(dataset) if dataset is not None else None
    if objects is None:
        return None
    images = [f for f in recorded_fields(dataset, "compute_fused_features") if "__" not in f]
    if images or (dataset.has_sample_field(FEATURES_FIELD) and dataset.count(FEATURES_FIELD) > 0):
        return None
    return objects.patches_field


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
def last_features(dataset) -> Dict[str, Any]:
    """How features were last computed on ``dataset`` (its newest ``compute_fused_features``
    record): models, recipe fields, preset, device, dtype, batch size, store, fields."""
    from fiftyone_sdcorr.dataset.engine import latest_record

    rec = latest_record(dataset, "compute_fused_features") if dataset is not None else None
    if not rec:
        return {}
    out = {k: v for k, v in (rec.get("settings") or {}).items() if v is not None}
    out.update({k: v for k, v in (rec.get("run") or {}).items() if v is not None})
    return out


def bounds(name: str) -> Dict[str, Any]:
    """A form input's ``min`` / ``max``: the allowed range of setting ``name``, written once
    in :data:`fiftyone_sdcorr.dataset.config.RANGES`."""
    lo, hi = RANGES[name]
    return {"min": lo, "max": hi}


def default_preset() -> str:
    """The form's preset where nothing was computed yet: the paper's on a GPU, ``cpu`` without."""
    import torch

    return FeatureConfig.preset if torch.cuda.is_available() else "cpu"


def model_inputs(ctx, inputs, follow: bool = True, advanced: bool = True) -> None:
    """Model ids / directories, device, dtype, batch size, preset and recipe overrides.

    ``follow``: defaults follow the dataset's last ``compute_fused_features`` (its models,
    device and recipe), else the config's (preset ``cpu`` without a GPU). Otherwise all
    blank: the functions then use the configuration recorded with the stored features.
    """
    last = last_features(ctx.dataset) if follow else {}
    blank = "" if follow else " (blank: the models and recipe that computed the stored features)"
    d = (lambda key, default: last.get(key, default)) if follow else (lambda key, default: None)  # noqa: E731
    method_input(inputs, d("method", FeatureConfig.method), blank)
    inputs.str("sd_model", default=d("sd_model", FeatureConfig.sd_model), required=False,
               label="Stable Diffusion model",
               description="Hugging Face Hub id or local directory (diffusers layout)" + blank)
    inputs.str("dino_model", default=d("dino_model", FeatureConfig.dino_model), required=False,
               label="DINOv2 model", description="Hugging Face Hub id or local directory (transformers layout)" + blank)
    inputs.str("device", default=last.get("device") or "auto", required=False, label="Device",
               description="'auto' (CUDA when available), 'cuda', 'cuda:1', 'cpu', ...")
    _enum(inputs, "dtype", _DTYPES, last.get("dtype") or "auto", "Precision", "'auto': bf16/fp16 on CUDA, fp32 on CPU")
    inputs.int("batch_size", label="Batch size", required=False, default=last.get("batch_size"),
               description="Images per forward pass (empty: chosen from free GPU memory; "
               "halved automatically on CUDA out-of-memory)")
    _enum(inputs, "preset", tuple(PRESETS), d("preset", default_preset()), "Recipe preset",
          "'paper': the paper's recipe; 'whole': one SD pass; 'cpu': small inputs, for machines without a GPU"
          + blank)
    if not advanced:
        return
    preset = PRESETS.get(last.get("preset") or "", None)
    for key, (typ, label, desc) in RECIPE_PARAMS.items():
        # a recorded value that differs from its preset's is an override worth showing
        value = last.get(key) if follow and preset is not None and last.get(key) != getattr(preset, key) else None
        if key == "sd_mode":
            _enum(inputs, key, ("tiled", "whole"), value, label, desc, required=False)
        elif typ is int:
            inputs.int(key, label=label, description=desc, required=False, default=value)
        elif typ is float:
            inputs.float(key, label=label, description=desc, required=False, min=0.0, max=1.0, default=value)
        else:
            inputs.str(key, label=label, description=desc, required=False, default=value)


def method_input(inputs, default: Optional[str], blank: str = "") -> None:
    """The Method choice, one line on each (:data:`~fiftyone_sdcorr.core.features.methods.METHODS`),
    and the adapter file of the methods that have one."""
    choices = types.DropdownView()
    for name, m in METHODS.items():
        choices.add_choice(name, label=name, description=m.summary)
    inputs.enum("method", choices.values(), default=default, required=False, label="Method", view=choices,
                description="; ".join(f"{k}: {m.summary}" for k, m in METHODS.items()) + blank)
    inputs.str("adapter", required=False, label="Adapter file (dino-diy)",
               description="A DIY-SC adapter as .safetensors (blank: the one shipped with the plugin)")


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
                      "reference_ids", "x", "y", "background_runs", "check",
                      "panel_id", "panel_state"))  # the App adds these to operators a panel starts


def function_kwargs(params: Dict[str, Any], fn: Callable[..., Any], positional: Sequence[str] = ()) -> Dict[str, Any]:
    """Operator params -> keyword arguments of ``fn`` (a dataset function), by name.

    Blank values (``None``, ``""``, ``"auto"`` for device / dtype) are left out, so the
    function's own default applies; the recipe overrides of the form (``sd_size``, ...)
    join a ``recipe`` dict param unless ``fn`` has a parameter of that name; ``positional``
    names are taken by the caller. A param
    that is neither ``fn``'s nor plumbing is refused (a typo must not be ignored).
    """
    names = set(inspect.signature(fn).parameters) - {"progress"}
    recipe = dict(params.get("recipe") or {})
    out: Dict[str, Any] = {}
    # settings the function takes only inside a group (features=, match=, refine=):
    # flat name -> group (config.flat_keywords)
    routes = getattr(fn, "flat_keywords", {k: "features" for k in FEATURE_PARAMS})
    groups: Dict[str, Dict[str, Any]] = {}
    for key, value in params.items():
        if key in PLUMBING or key in positional or key == "recipe" or _blank(value):
            continue
        if key in names:  # the function's own parameter first (review's alpha is not the recipe's)
            out[key] = value
        elif key in routes and routes[key] in names:
            groups.setdefault(routes[key], {})[key] = value
        elif key in RECIPE_PARAMS:
            recipe[key] = value
        else:
            raise ParameterError(f"unknown parameter {key!r} for {fn.__name__}")
    if recipe:
        (out if "recipe" in names else groups.setdefault("features", {}))["recipe"] = recipe
    if groups:
        from fiftyone_sdcorr.dataset.config import flat_keywords

        # the flat keywords merged into their groups as the Python call does (one shim)
        merged = flat_keywords(tuple(k for k, g in routes.items() if g == "features"),
                               match="match" in groups, refine="refine" in groups)(lambda **kw: kw)
        out.update(merged(**{k: out.get(k) for k in groups if k in out},
                          **{k: v for g in groups.values() for k, v in g.items()}))
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
    """``OperatorConfig`` keyword arguments: delegation allowed, immediate allowed
    (:func:`execution_options` decides per request what the App offers)."""
    return dict(
        allow_delegated_execution=True,
        allow_immediate_execution=True,
        default_choice_to_delegated=True,
    )


def resolve_delegation(ctx) -> Optional[bool]:
    """An explicit ``delegate`` param forces the mode; otherwise ``None`` (the user's or
    caller's choice)."""
    d = ctx.params.get("delegate", None)
    return None if d is None else bool(d)


#: views up to this size run immediately by default, even where background runs exist
SMALL_VIEW = 50
BACKGROUND_SETTING = "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true"
WORKER_COMMAND = "fiftyone delegated launch"


def delegation_available() -> bool:
    """Whether this App can schedule background (delegated) runs: open-source FiftyOne
    schedules them only with ``allow_legacy_orchestrators`` (the setting
    :data:`BACKGROUND_SETTING`); otherwise the App shows "Schedule NOT AVAILABLE"."""
    return bool(getattr(fo.config, "allow_legacy_orchestrators", False))


def execution_options(ctx, delegate_large: bool):
    """What the App offers: immediate always; background only where it can be scheduled,
    and the default for views larger than :data:`SMALL_VIEW` when ``delegate_large``."""
    from fiftyone.operators.executor import ExecutionOptions

    forced = resolve_delegation(ctx)
    if forced is not None:
        return ExecutionOptions(allow_immediate_execution=not forced, allow_delegated_execution=forced)
    available = delegation_available()
    try:
        n = len(get_target_view(ctx))
    except Exception:  # noqa: BLE001 -- no dataset yet
        n = 0
    # a programmatic request (``op(..., delegate=True)``) queues for `fiftyone delegated launch`
    # whatever the App can schedule
    requested = bool(getattr(ctx, "requesting_delegated_execution", False))
    return ExecutionOptions(allow_immediate_execution=True, allow_delegated_execution=available or requested,
                            default_choice_to_delegated=available and delegate_large and n > SMALL_VIEW)


def background_notice(inputs) -> None:
    """Says how background runs work here (added at the end of every run form)."""
    if delegation_available():
        text = (f"Scheduled runs start when a worker runs: `{WORKER_COMMAND}` in a shell that uses "
                "the same FiftyOne database (several workers, on any machines, share the queue).")
    else:
        text = (f"This runs in the App now. For background runs, start the App with {BACKGROUND_SETTING} "
                f"and a worker with `{WORKER_COMMAND}`.")
    inputs.view("background_runs", types.Notice(label=text))


class RunOperator(foo.Operator):
    """Base of the operators that run a dataset function.

    A subclass builds its form in ``resolve_input`` and ends it with :meth:`finish_form`;
    :meth:`run_call` maps the params to ``(function, args, kwargs)``, used both to run
    (:meth:`execute`) and to check the form (:func:`check_form`). Execution options per
    request (:func:`execution_options`); ``delegate_large``: large views default to
    background.
    """

    delegate_large = True

    def run_call(self, ctx):
        """``(dataset function, positional args, keyword args)`` for the params of ``ctx``."""
        raise NotImplementedError

    def execute(self, ctx):
        fn, args, kwargs = self.run_call(ctx)
        return execute(ctx, fn, *args, **kwargs)

    def finish_form(self, ctx, inputs) -> None:
        """The end of every run form: the run's own checks on the values the form will
        send (:func:`check_form`; the App resolves a form it opens before it fills in the
        defaults), then the notice about background runs."""
        defaults = {k: p.default for k, p in inputs.properties.items()
                    if p.default is not None and ctx.params.get(k) is None}
        values = _FormValues(ctx, {**ctx.params, **defaults}) if defaults else ctx
        check_form(ctx, inputs, lambda: self.run_call(values))
        background_notice(inputs)

    def resolve_delegation(self, ctx):
        return resolve_delegation(ctx)

    def resolve_execution_options(self, ctx):
        return execution_options(ctx, self.delegate_large)


class _FormValues:
    """``ctx`` with other params (what :meth:`RunOperator.run_call` reads)."""

    def __init__(self, ctx, params):
        self._ctx, self.params = ctx, params

    def __getattr__(self, name):
        return getattr(self._ctx, name)


#: the form row that shows a refusal no input of the form names
CHECK_PARAM = "check"
_PARAM_RE = re.compile(r"^parameters? '(\w+)")


def check_form(ctx, inputs, call: Callable[[], tuple]) -> Optional[str]:
    """Runs the dataset function's own checks on the form's current values
    (:func:`~fiftyone_sdcorr.dataset.engine.preflight`: no model loads, nothing is written)
    and, when it would refuse them, marks the input its message names as invalid with that
    message (else adds an error row): the App shows it under the input and FiftyOne's
    validation refuses to run the form as it is. Returns the message, if any."""
    from fiftyone_sdcorr.dataset.engine import preflight

    if ctx.dataset is None:
        return None
    try:
        fn, args, kwargs = call()
        error = preflight(fn, *args, progress=False, **kwargs)
    except ParameterError as e:
        error = e
    except Exception as e:  # noqa: BLE001 -- anything else is the run's to report, with context
        logger.debug("form check of %s skipped: %s", ctx.operator_uri, e)
        return None
    if error is None:
        return None
    message = str(error)
    m = _PARAM_RE.match(message)
    prop = inputs.properties.get(m.group(1)) if m else None
    message = in_form_words(message, form_labels(inputs))
    if prop is None:
        prop = inputs.str(CHECK_PARAM, required=False, label="Cannot run with these values",
                          view=types.Error(label="Cannot run with these values", description=message))
    prop.invalid, prop.error_message = True, message
    return message


def form_labels(inputs) -> Dict[str, str]:
    """``{param: the label its input shows}`` of a form's inputs."""
    out = {}
    for name, prop in inputs.properties.items():
        label = getattr(getattr(prop, "view", None), "label", None) or getattr(prop, "label", None)
        if label:
            out[name] = label
    return out


def in_form_words(message: str, labels: Dict[str, str]) -> str:
    """A refusal as the form says it: each ``parameter 'x'`` it names becomes the label
    of that input (*Source masks field*, not ``source_field``)."""
    return _PARAM_ANY_RE.sub(lambda m: f"*{labels[m.group(1)]}*" if m.group(1) in labels else m.group(0), message)


_PARAM_ANY_RE = re.compile(r"parameters? '(\w+)'")


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
    return its compact summary (the delegated service stores it: ``fiftyone delegated
    output``); immediate, a generator that streams progress to the App, reloads the
    dataset (with ``reload``) and shows the run's summary."""
    if ctx.delegated:
        return compact(fn(*args, progress=progress_callback(ctx), **kwargs))
    return _execute_immediate(ctx, fn, args, kwargs, reload)


def _execute_immediate(ctx, fn, args, kwargs, reload):
    try:
        result = yield from run_with_progress(ctx, fn, *args, **kwargs)
    except Exception as e:
        # FiftyOne ends a generator's stream without a word when it raises: the App would
        # stay silent, so the failure is said first (then raised, for the caller and logs)
        yield from show_failure(ctx, e)
        raise
    if reload:
        yield reload_dataset(ctx)
    yield from show_summary(ctx, result)
    return compact(result)


def compact(result):
    return result.compact() if hasattr(result, "compact") else result


def summary_text(result) -> str:
    """The run's summary as text: counts, warnings, failures (and a report, if any)."""
    if hasattr(result, "text"):
        return result.text()
    if isinstance(result, dict):
        parts = [str(result["summary"])] if result.get("summary") else []
        if result.get("report"):
            parts.append(str(result["report"]))
        return "\n\n".join(parts)
    return str(result)


def show_summary(ctx, result):
    """A notification with the headline (a warning when something failed or changed the
    result) and the whole summary in the operator's output view."""
    warn = isinstance(result, dict) and bool(result.get("failed") or result.get("warnings"))
    headline = result.headline() if hasattr(result, "headline") else summary_text(result).split("\n")[0]
    yield ctx.ops.notify(headline + (" (see the warnings)" if warn else ""), variant="warning" if warn else "success")
    # Markdown, not a CodeView: the App loads its code editor from a CDN, so offline it
    # would stay on "Loading..."
    outputs = types.Object()
    outputs.str("summary", label="Summary", view=types.MarkdownView())
    yield ctx.ops.show_output(types.Property(outputs).to_json(), {"summary": as_markdown_text(summary_text(result))})


def show_failure(ctx, error: BaseException):
    """An error notification and the operator's output view with the reason a run
    stopped (an immediate run; the same text FiftyOne records for the operation)."""
    name = (getattr(ctx, "operator_uri", None) or "").rsplit("/", 1)[-1] or "the run"
    text = f"{name} failed: {error}"
    yield ctx.ops.notify(text, variant="error")
    outputs = types.Object()
    outputs.str("summary", label="Failed", view=types.MarkdownView())
    yield ctx.ops.show_output(types.Property(outputs).to_json(), {"summary": as_markdown_text(text)})


def as_markdown_text(text: str) -> str:
    """Plain text (tables aligned with spaces) as a Markdown code block."""
    fence = "`" * 3
    return f"{fence}\n" + text.replace(fence, "'''") + f"\n{fence}"


def shard_views(sample_collection, shards) -> list:
    """The collection split into ``shards`` views of consecutive samples (by id)."""
    from fiftyone_sdcorr.dataset.engine import check_int

    n = check_int("shards", shards, lo=1, hi=10_000)
    ids = sample_collection.values("id")
    size = -(-len(ids) // n) if ids else 1
    return [sample_collection.select(ids[i:i + size], ordered=True) for i in range(0, len(ids), size)]


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
