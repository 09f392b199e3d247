"""What the propagation and review forms share: where the references come from, and
choices of a dataset's label fields.

References (param ``references``): ``annotated`` (every sample annotated in the source
field), ``tag`` (``reference_tag``), ``selected`` (the App's selection) or ``ids``
(``reference_ids``, from Python). The dataset layer checks what this returns.
"""

from __future__ import annotations

from typing import Callable, Optional

import fiftyone.operators.types as types

from fiftyone_sdcorr.dataset.engine import ParameterError

REFERENCE_MODES = ("annotated", "tag", "selected", "ids")


def label_fields(ctx, doc_types) -> list:
    """The dataset's fields holding any of ``doc_types`` (sorted)."""
    if ctx.dataset is None:
        return []
    return sorted({f for t in doc_types for f in ctx.dataset.get_field_schema(embedded_doc_type=t)})


def choice_input(inputs, name, values, label, description, required=True, default=None, radio=False):
    """A dropdown (or radio group) of ``values``; a text input when there are none."""
    if not values:
        inputs.str(name, required=required, label=label, description=description, default=default)
        return
    view = types.RadioGroup() if radio else types.DropdownView()
    for v in values:
        view.add_choice(v, label=v)
    inputs.enum(name, view.values(), required=required, label=label, description=description, view=view,
                default=default if default in values else (values[0] if required else None))


def reference_inputs(ctx, inputs, annotated: str) -> None:
    """The references' choice (``annotated`` says what an annotated sample holds) and, for
    ``tag``, the tag."""
    choice_input(inputs, "references", REFERENCE_MODES, "References",
                 f"annotated: every sample with {annotated} in the source field; tag: samples with a tag; "
                 "selected: the selected samples; ids: the reference_ids param (from Python)",
                 required=False, default="annotated", radio=True)
    if ctx.params.get("references") == "tag":
        tags = ctx.dataset.distinct("tags") if ctx.dataset is not None else []
        choice_input(inputs, "reference_tag", tags, "Reference tag", "Samples with this tag are references")


def references_from(ctx, source_field, annotated: Optional[Callable] = None):
    """The reference samples the params name; ``annotated``: the samples of
    ``source_field`` that count as annotated (default: those where it exists)."""
    p = ctx.params
    mode = p.get("references") or "annotated"
    if mode not in REFERENCE_MODES:
        raise ParameterError(f"parameter 'references' must be one of {list(REFERENCE_MODES)}, got {mode!r}")
    if mode == "ids":
        ids = p.get("reference_ids")
        return list(ids) if isinstance(ids, (list, tuple)) else ids
    if mode == "tag":
        if not p.get("reference_tag"):
            raise ParameterError("parameter 'reference_tag': references='tag' needs a tag")
        return p.get("reference_tag")
    if mode == "selected":
        if not ctx.selected:
            raise ParameterError("parameter 'references': 'selected', but no sample is selected")
        return list(ctx.selected)
    if not isinstance(source_field, str) or not ctx.dataset.has_sample_field(source_field):
        raise ParameterError(f"parameter 'source_field': field {source_field!r} does not exist on dataset "
                             f"{ctx.dataset.name!r}")
    return annotated(ctx.dataset, source_field) if annotated is not None else ctx.dataset.exists(source_field)


def reference_params(references) -> dict:
    """Python ``references`` (None, a tag, ids, a view) -> operator params."""
    if references is None:
        return {"references": "annotated"}
    if isinstance(references, str):
        return {"references": "tag", "reference_tag": references}
    if hasattr(references, "values"):
        return {"references": "ids", "reference_ids": list(references.values("id"))}
    if not isinstance(references, (list, tuple, set)):
        raise ParameterError("parameter 'references' must be a view, a list of sample ids or a tag, got "
                             f"{type(references).__name__}")
    return {"references": "ids", "reference_ids": [str(i) for i in references]}
