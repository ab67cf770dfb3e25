"""Ray Data batches <-> the rows flexrun's jobs read and write.

A batch is a dict of columns (numpy arrays, Ray's default) or a pandas DataFrame. Each row is
turned into the dict a JSONL line would be: numpy values become Python ones and missing
values (null, NaN) are dropped, so a column that only some rows set works as a field that only
some lines set. A "json" column holds a whole input line as JSON text instead (the CLI sends
its lines so: any id type, any chat shape)."""
from __future__ import annotations

import json
import math

import numpy as np

JSON_COLUMN = "json"


def native(v):
    """A numpy / pandas value as plain Python (lists, dicts, ints, floats, str); NaN -> None."""
    if isinstance(v, np.ndarray):
        return [native(x) for x in v.tolist()] if v.dtype != object else [native(x) for x in v]
    if isinstance(v, (list, tuple)):
        return [native(x) for x in v]
    if isinstance(v, dict):
        return {k: native(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def columns(batch) -> dict[str, list]:
    """The batch as {column: values}, from a dict of arrays or a DataFrame."""
    if hasattr(batch, "columns") and hasattr(batch, "iloc"):      # pandas
        return {str(c): list(batch[c]) for c in batch.columns}
    return {k: list(v) for k, v in batch.items()}


def batch_rows(batch) -> list[dict]:
    """Each row as a JSONL line's dict; a "json" column's text is parsed and its fields win
    over the other columns'. Rows without an "id" get their position in the batch."""
    cols = columns(batch)
    n = len(next(iter(cols.values()), []))
    rows = []
    for i in range(n):
        row = {k: native(v[i]) for k, v in cols.items()}
        row = {k: v for k, v in row.items() if v is not None}
        text = row.pop(JSON_COLUMN, None)
        if text is not None:
            row.update(json.loads(text))
        row.setdefault("id", i)
        rows.append(row)
    return rows


def with_columns(batch, new: dict[str, list]):
    """The input batch plus `new` columns, in the batch's own format."""
    if hasattr(batch, "columns") and hasattr(batch, "iloc"):
        out = batch.copy()
        for k, v in new.items():
            out[k] = v
        return out
    out = dict(batch)
    for k, v in new.items():
        arr = np.empty(len(v), dtype=object)
        for j, x in enumerate(v):       # (element by element: equal-length lists stay lists)
            arr[j] = x
        out[k] = arr
    return out
