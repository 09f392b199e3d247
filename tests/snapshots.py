"""A snapshot of a dataset's contents, for "no field that existed was modified" checks."""


def field_snapshot(ds, exclude=()):
    """Every field of every sample (minus ``exclude`` and ``last_modified_at``) and the
    flattened schema of the remaining fields; compare two snapshots with ``==``."""
    docs = {}
    for s in ds.iter_samples():
        d = s.to_dict()
        for k in exclude:
            d.pop(k, None)
        d.pop("last_modified_at", None)
        docs[s.id] = d
    schema = {k: (type(v).__name__, getattr(getattr(v, "document_type", None), "__name__", None))
              for k, v in ds.get_field_schema(flat=True).items()
              if k.split(".")[0] not in exclude and k != "last_modified_at"}
    return docs, schema
