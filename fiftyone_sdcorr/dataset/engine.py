"""The run engine under every dataset function.

What every run needs, written once:

- **parameter checks** (:func:`check_int`, :func:`check_float`, ...): used by the config
  objects (:mod:`fiftyone_sdcorr.dataset.config`) when they are built, i.e. before any
  model loads or anything is written. Messages name the parameter and the value.
- **fields**: :func:`check_field_name` (FiftyOne's rules; a field name is never a path),
  :func:`require_field` (an input field exists and holds the right type),
  :func:`guard_outputs` (an existing field is written only with ``overwrite=True``, or
  when this same function wrote it with the same settings, i.e. a resume; never an input
  field; never a built-in field), :func:`declare_outputs`.
- **records**: each function records what it wrote (settings, fingerprint, fields) as a
  FiftyOne custom run (``dataset.list_runs()``), so a rerun can tell a resume from a
  clash and later functions can find the settings that produced a field.
- **the run** (:class:`Run`): iterates ids in batches with progress (a FiftyOne progress
  bar or a ``callback(fraction, label)``), collects per-sample errors for the
  ``<field>_error`` field, writes values in bulk, and fills a :class:`RunSummary`.
- **checks only** (:func:`preflight`): runs a dataset function up to the end of its
  checks (its :func:`checks_done` call) and returns the :class:`ParameterError` it would
  raise, without loading a model or writing anything. The operators' forms use it, so a
  form refuses exactly what the run would refuse, with the same message.
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import fiftyone as fo
import fiftyone.core.media as fom

from fiftyone_sdcorr.core.features.methods import method_of
from fiftyone_sdcorr.core.common.params import (  # noqa: F401 -- the engine's parameter checks
    ParameterError,
    check_bool,
    check_choice,
    check_float,
    check_floats,
    check_int,
    check_str,
)
from fiftyone_sdcorr.dataset.progress import Progress, ProgressArg

logger = logging.getLogger(__name__)

#: at most this many reasons in a summary (every reason is in the error field)
MAX_SUMMARY_ERRORS = 100
#: FiftyOne's built-in sample fields: never an output
BUILTIN_FIELDS = frozenset(
    ("id", "_id", "filepath", "tags", "metadata", "media_type", "created_at", "last_modified_at",
     "frames", "groups", "_dataset_id", "_media_type", "_rand")
)
#: the summary entries that name what a run wrote, and how its headline names them
WRITTEN = (("output_dataset", "dataset"), ("output_slice", "slice"), ("output_field", "field"),
           ("review_field", "field"), ("confidence_field", "field"), ("eval_key", "evaluation"),
           ("output_dir", "folder"), ("mask_dir", "mask files in"), ("store_dir", "store"))
_FIELD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,99}$")


# --------------------------------------------------------------------------- fields
def check_field_name(param: str, name: Any) -> str:
    """A top-level FiftyOne field name: a letter, then letters, digits or ``_`` (so it is
    never a path, never private, never nested), and not a built-in field."""
    if not isinstance(name, str) or not _FIELD_RE.match(name):
        raise ParameterError(
            f"parameter {param!r}: {name!r} is not a valid field name (a letter, then up to 99 "
            "letters, digits or '_'; no '.', '/', '$' or leading '_')"
        )
    if name in BUILTIN_FIELDS:
        raise ParameterError(f"parameter {param!r}: {name!r} is a built-in FiftyOne field")
    return name


#: field kinds: name -> (test on a FiftyOne field, description)
_KINDS: Dict[str, Callable[[Any], bool]] = {
    "keypoints": lambda f: getattr(f, "document_type", None) is fo.Keypoints,
    "detections": lambda f: getattr(f, "document_type", None) in (fo.Detections, fo.Detection),
    "segmentation": lambda f: getattr(f, "document_type", None) is fo.Segmentation,
    "heatmap": lambda f: getattr(f, "document_type", None) is fo.Heatmap,
    "vector": lambda f: isinstance(f, (fo.VectorField, fo.ArrayField)),
    "string": lambda f: isinstance(f, fo.StringField),
    "float": lambda f: isinstance(f, (fo.FloatField, fo.IntField)),
    "label": lambda f: isinstance(f, fo.StringField) or hasattr(getattr(f, "document_type", None), "_LABEL_LIST_FIELD")
    or getattr(f, "document_type", None) is not None and issubclass(f.document_type, fo.Label),
}
_KIND_TEXT = {
    "keypoints": "fo.Keypoints", "detections": "fo.Detections", "segmentation": "fo.Segmentation",
    "heatmap": "fo.Heatmap", "vector": "a vector", "string": "a string", "float": "a number",
    "label": "a string or a label",
}


def field_kind_text(field) -> str:
    doc = getattr(field, "document_type", None)
    return f"{type(field).__name__}({doc.__name__})" if doc is not None else type(field).__name__


def require_field(samples, param: str, name: Any, kind: str) -> str:
    """``name`` is an existing top-level field of ``samples`` holding ``kind``."""
    check_str(param, name)
    root = samples._root_dataset
    if not root.has_sample_field(name):
        raise ParameterError(f"parameter {param!r}: field {name!r} does not exist on dataset {root.name!r}")
    field = root.get_field(name)
    if not _KINDS[kind](field):
        raise ParameterError(
            f"parameter {param!r}: field {name!r} holds {field_kind_text(field)}, not {_KIND_TEXT[kind]}"
        )
    return name


def declare(kind: str, dataset, name: str) -> None:
    """Adds the output field ``name`` of ``kind`` if missing (tolerates a concurrent add)."""
    if dataset.has_sample_field(name):
        return
    doc = {"keypoints": fo.Keypoints, "segmentation": fo.Segmentation, "heatmap": fo.Heatmap}.get(kind)
    ftype = {"vector": fo.VectorField, "string": fo.StringField, "float": fo.FloatField}.get(kind)
    try:
        if doc is not None:
            dataset.add_sample_field(name, fo.EmbeddedDocumentField, embedded_doc_type=doc)
        else:
            dataset.add_sample_field(name, ftype)
    except ValueError:
        dataset.reload()  # another worker added it at the same time
        if not dataset.has_sample_field(name):
            raise


def guard_outputs(samples, outputs: Mapping[str, tuple], inputs: Mapping[str, Optional[str]], overwrite: bool,
                  record: Optional["Record"] = None, units=None) -> None:
    """Checks every output before anything is written.

    ``outputs``: ``{param: (field name, kind)}``. Each name is a valid field name, all are
    distinct and none is an input field (``inputs``: ``{param: field name}``). A field that exists must hold ``kind``, and is
    written only with ``overwrite=True`` or when ``record`` (this function's record of the
    same fields) says it was written with the same settings (a resume). ``units``
    (:class:`~fiftyone_sdcorr.dataset.units.Units` of objects): the outputs are attributes
    of its detections.
    """
    root = samples._root_dataset
    names = {}
    for param, (name, _) in outputs.items():
        check_field_name(param, name)
        if name in names:
            raise ParameterError(f"parameters {names[name]!r} and {param!r} name the same field {name!r}")
        names[name] = param
    for in_param, name in inputs.items():
        if name and name in names:
            raise ParameterError(
                f"parameter {names[name]!r}: {name!r} is the {in_param} of this run (an input, never written); "
                "choose another output field"
            )
    if record is not None:
        record.stored = record.read()  # fresh: a worker that started meanwhile records first
    for param, (name, kind) in outputs.items():
        if units is not None:
            name = units.path(name)
        if not root.has_sample_field(name):
            continue
        field = root.get_field(name)
        if not _KINDS[kind](field):
            raise ParameterError(
                f"parameter {param!r}: field {name!r} already exists and holds {field_kind_text(field)}, "
                f"not {_KIND_TEXT[kind]}; choose another field name"
            )
        if overwrite:
            continue
        if record is not None and record.resumable:
            continue
        why = record.difference if record is not None and record.difference else "already exists"
        raise ParameterError(
            f"parameter {param!r}: field {name!r} {why}; choose a new field name or pass overwrite=True"
        )


def inputs_of(cfg, *params: str) -> Dict[str, Optional[str]]:
    """``{param: field name}`` of a config's input fields, for :func:`guard_outputs`."""
    return {p: getattr(cfg, p) for p in params}


def declare_outputs(samples, outputs: Mapping[str, tuple], units=None) -> None:
    for name, kind in outputs.values():
        if units is not None and units.objects:
            units.declare(kind, name)
        else:
            declare(kind, samples._root_dataset, name)


def image_collection(samples, what: str = "samples") -> None:
    """Refuses what the functions cannot process: not a collection, a grouped one, an
    empty one (``what`` names the argument in the message)."""
    if not hasattr(samples, "_root_dataset"):
        raise ParameterError(f"parameter {what!r}: expected a FiftyOne dataset or view, got {type(samples).__name__}")
    if samples.media_type == fom.GROUP:
        raise ParameterError(f"parameter {what!r}: grouped collections are not supported: select a slice first "
                             "(e.g. samples.select_group_slices('left'))")
    if len(samples) == 0:
        raise ParameterError(f"parameter {what!r}: the view is empty, no sample to process")


# --------------------------------------------------------------------------- records
class Record:
    """What a function wrote into a set of fields (a FiftyOne custom run).

    ``key`` is ``sdcorr_<function>_<first output field>``. ``settings`` are the settings that
    decide the values (e.g. models and recipe); ``fingerprint`` their hash. ``options``
    decide how the values are kept without changing them (e.g. the store dtype): not in
    the fingerprint, but a rerun resumes only when they are the same too (one that asked
    for int8 must not skip every sample stored in float16).
    """

    def __init__(self, samples, function: str, field: str, settings: Optional[dict] = None,
                 fingerprint: Optional[str] = None, options: Optional[dict] = None):
        self.dataset = samples._root_dataset
        self.key = _record_key(function, field)
        self.function, self.settings, self.fingerprint = function, settings or {}, fingerprint
        self.options = options or {}
        self.stored = self.read()

    def read(self) -> Optional[dict]:
        if self.key not in self.dataset.list_runs():
            return None
        cfg = self.dataset.get_run_info(self.key).config
        return {k: getattr(cfg, k, None) for k in ("function", "settings", "options", "fingerprint", "fields", "run")}

    @property
    def resumable(self) -> bool:
        return self.stored is not None and self.fingerprint is not None \
            and self.stored.get("fingerprint") == self.fingerprint \
            and (self.stored.get("options") or {}) == self.options

    @property
    def difference(self) -> str:
        if self.stored is None:
            return ""
        have = {**(self.stored.get("settings") or {}), **(self.stored.get("options") or {})}
        diff = settings_difference(have, {**self.settings, **self.options}, "requested")
        return f"holds values of {self.function} with other settings ({diff})"

    def write(self, fields: Sequence[str], run: Optional[dict] = None) -> None:
        """Records the settings on the fields, and ``run`` (how it ran: device, store, ...;
        what later forms offer as defaults). A no-op when the same record is there, so
        concurrent workers of one configuration do not race on it."""
        want = {"function": self.function, "settings": self.settings, "options": self.options,
                "fingerprint": self.fingerprint, "fields": list(fields), "run": dict(run or {})}
        if self.stored == want:
            return
        cfg = self.dataset.init_run(**want)
        try:
            self.dataset.register_run(self.key, cfg, overwrite=True, cleanup=False)
        except Exception:  # noqa: BLE001 -- a concurrent worker registered it meanwhile
            self.stored = self.read()
            if self.stored != want:
                self.dataset.update_run_config(self.key, cfg)
        self.stored = self.read()


def settings_difference(have: dict, want: dict, wanted: str) -> str:
    """``"key: stored <have> vs <wanted> <want>, ..."`` for each setting that differs
    (``"fingerprint differs"`` when none does). A record without a method (written before
    methods existed) is the paper's."""
    if "method" in have or "method" in want:
        have, want = {"method": method_of(have), **have}, {"method": method_of(want), **want}
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return ", ".join(f"{k}: stored {have.get(k)!r} vs {wanted} {want.get(k)!r}" for k in keys) or "fingerprint differs"


def find_record(samples, function: str, field: str) -> Optional[dict]:
    """The record of ``function`` for ``field``, or None."""
    return Record(samples, function, field).stored


def _record_key(function: str, field: str = "") -> str:
    """The custom run key of ``function``'s record on ``field`` (``""``: the keys' prefix)."""
    return f"sdcorr_{function}_{field}"


def recorded_fields(dataset, function: str) -> List[str]:
    """The fields ``function`` recorded values for on ``dataset`` (sorted)."""
    prefix = _record_key(function)
    return sorted(k[len(prefix):] for k in dataset.list_runs() if k.startswith(prefix))


def latest_record(dataset, function: str) -> Optional[dict]:
    """The newest record of ``function`` on the dataset (any field), or None."""
    fields = recorded_fields(dataset, function)
    if not fields:
        return None
    newest = max(fields, key=lambda f: dataset.get_run_info(_record_key(function, f)).timestamp)
    return Record(dataset, function, newest).stored


# --------------------------------------------------------------------------- summary
class RunSummary(dict):
    """What a run returns: counts, failures (sample id -> reason, the first
    :data:`MAX_SUMMARY_ERRORS`), warnings, and function-specific entries. A dict, so it
    is stored as is by delegated runs; :meth:`text` is the human-readable form."""

    def __init__(self, function: str, counts: Sequence[str], **extra):
        super().__init__(function=function, **{c: 0 for c in counts}, failed=0, errors={}, warnings=[],
                         **extra)
        self._counts = tuple(counts) + ("failed",)

    def add(self, key: str, n: int = 1) -> None:
        self[key] += n

    def fail(self, sid: str, reason: str) -> None:
        self["failed"] += 1
        if len(self["errors"]) < MAX_SUMMARY_ERRORS:
            self["errors"][sid] = reason

    def warn(self, message: str) -> None:
        if message not in self["warnings"]:
            logger.warning("%s: %s", self["function"], message)
            self["warnings"].append(message)

    def wrote(self) -> str:
        """What the run wrote, named (``" -> field 'pred', dataset 'swaps'"``), or ``""``."""
        names = [f"{what} {self[key]!r}" for key, what in WRITTEN if self.get(key)]
        return " -> " + ", ".join(names) if names else ""

    def headline(self) -> str:
        return f"{self['function']}: " + ", ".join(f"{k} {self[k]}" for k in self._counts) + self.wrote()

    def compact(self, max_errors: int = 20) -> dict:
        """A small JSON-able copy (what delegated runs store for ``fiftyone delegated
        output``): counts, warnings, the first ``max_errors`` failures, scalar entries;
        large entries are replaced by their size."""
        out = {}
        for k, v in self.items():
            if k == "errors":
                out[k] = dict(list(v.items())[:max_errors])
            elif isinstance(v, dict) and len(v) > max_errors:
                out[f"{k}_count"] = len(v)
            elif isinstance(v, list) and len(v) > max_errors:
                out[k] = v[:max_errors] + [f"... {len(v) - max_errors} more"]
            else:
                out[k] = v
        return out

    def text(self) -> str:
        lines = [self.headline()]
        lines += [f"warning: {w}" for w in self["warnings"]]
        lines += [f"failed {sid}: {r}" for sid, r in list(self["errors"].items())[:10]]
        if len(self["errors"]) > 10:
            lines.append(f"... {self['failed'] - 10} more failures")
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks only
_CHECKING = contextvars.ContextVar("sdcorr_checking", default=False)


class _ChecksPassed(Exception):
    """Raised by :func:`checks_done` under :func:`preflight` (never seen by callers)."""


def checks_done() -> None:
    """Marks the end of a dataset function's checks (its step 1): nothing has loaded or
    been written yet. Under :func:`preflight` the function stops here."""
    if _CHECKING.get():
        raise _ChecksPassed()


def preflight(fn: Callable[..., Any], *args, **kwargs) -> Optional[ParameterError]:
    """The :class:`ParameterError` that ``fn(*args, **kwargs)`` would raise in its checks,
    or None when they pass; ``fn`` stops at :func:`checks_done`, so no model loads and
    nothing is written. Other exceptions propagate."""
    token = _CHECKING.set(True)
    try:
        fn(*args, **kwargs)
    except _ChecksPassed:
        return None
    except ParameterError as e:
        return e
    finally:
        _CHECKING.reset(token)
    raise RuntimeError(f"{getattr(fn, '__name__', fn)} returned without calling checks_done()")


# --------------------------------------------------------------------------- the run
class Run:
    """One pass of a dataset function over sample ids: progress, errors, bulk writes.

    ``with Run(samples, summary, total, progress, "propagating", error_field) as run:``
    then ``for batch in run.batches(items, size)``, ``run.fail(sid, reason)``,
    ``run.ok(sid)``, ``run.note(sid, message)``, ``run.write(field, {id: value})``. With
    ``units`` of objects, ids are label ids and fields are attributes of the detections. The error
    field gets ``None`` for every sample marked ok and the message of every failure or note.
    """

    def __init__(self, samples, summary: RunSummary, total: int, progress: ProgressArg, label: str,
                 error_field: Optional[str] = None, units=None):
        if _CHECKING.get():  # a function reached its run without declaring its checks done
            raise RuntimeError("a Run started under preflight(): call checks_done() after the checks")
        self.dataset = samples._root_dataset
        self.summary, self.error_field, self.units = summary, error_field, units
        self.bar = Progress(progress, total, label)
        self._errors: Dict[str, Optional[str]] = {}

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.flush_errors()
        finally:
            self.bar.close()

    def batches(self, items: Sequence, size: int) -> Iterator[list]:
        size = max(1, int(size))
        for start in range(0, len(items), size):
            yield list(items[start:start + size])

    def step(self, n: int = 1, label: Optional[str] = None) -> None:
        self.bar.update(n, label)

    def fail(self, sid: str, reason: str) -> None:
        self._errors[sid] = reason
        self.summary.fail(sid, reason)

    def ok(self, sid: str) -> None:
        self._errors.setdefault(sid, None)

    def note(self, sid: str, message: str) -> None:
        """A per-sample problem that is not a failure (the sample still got its result)."""
        self._errors[sid] = message

    def write(self, field: str, values: Mapping[str, Any]) -> None:
        """``{id: value}`` into ``field``: sample ids, or the label ids of ``units``' objects."""
        if self.units is not None:
            self.units.write(field, values)
        elif values:
            self.dataset.set_values(field, dict(values), key_field="id")

    def flush_errors(self) -> None:
        if self.error_field and self._errors:
            self.write(self.error_field, self._errors)
            self._errors = {}


def values_or_none(samples, name: Optional[str], n: int) -> List[Any]:
    """``samples.values(name)``, or ``n`` Nones when the field is absent / unnamed."""
    if name and samples._root_dataset.has_sample_field(name):
        return samples.values(name)
    return [None] * n


def reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


__all__ = [
    "ParameterError", "check_int", "check_float", "check_bool", "check_choice", "check_str",
    "check_floats", "check_field_name", "require_field", "guard_outputs", "declare_outputs",
    "image_collection", "inputs_of", "checks_done", "preflight", "Record", "find_record", "latest_record",
    "recorded_fields", "settings_difference", "RunSummary", "Run", "values_or_none", "reason",
    "MAX_SUMMARY_ERRORS", "BUILTIN_FIELDS", "WRITTEN",
]
