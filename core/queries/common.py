"""What the console's read models share: DataFrames from query results, UTC timestamps."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from sqlalchemy import Result

MAX_ROWS = 500  # the most any list query returns


def utc(value: Any) -> pd.Timestamp | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    ts = pd.Timestamp(value)
    return ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)


def as_datetime(value: Any) -> datetime:
    ts = utc(value)
    assert ts is not None
    result: datetime = ts.to_pydatetime()
    return result


def same_fields(model: Any, source: Any, **given: Any) -> dict[str, Any]:
    """The fields of dataclass `model`: those in `given`, the rest read from the attribute of
    `source` with the same name (a read model maps its row once, by its own field names)."""
    return {
        f.name: given[f.name] if f.name in given else getattr(source, f.name) for f in fields(model)
    }


def frame(rows: Iterable[Sequence[Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame with stringified UUIDs, so it pickles, caches and renders anywhere."""
    data = [[str(v) if isinstance(v, uuid.UUID) else v for v in row] for row in rows]
    return pd.DataFrame(data, columns=list(columns))


def result_frame(result: Result[Any], *utc_columns: str) -> pd.DataFrame:
    """`frame` of a query's rows, its columns named by the query's labels; `utc_columns` as
    aware UTC timestamps."""
    out = frame(result.all(), list(result.keys()))
    for column in utc_columns:
        out[column] = pd.to_datetime(out[column], utc=True)
    return out


def reindex(data: pd.DataFrame, starts: list[datetime], fill: dict[str, Any]) -> pd.DataFrame:
    """One row per bucket start (UTC), missing buckets filled."""
    index = pd.DatetimeIndex([pd.Timestamp(s) for s in starts], name="bucket")
    if data.empty:
        out = pd.DataFrame(index=index, columns=list(data.columns.drop("bucket")))
    else:
        data = data.assign(bucket=[utc(b) for b in data["bucket"]]).set_index("bucket")
        out = data.reindex(index)
    for column, value in fill.items():
        out[column] = out[column].fillna(value).astype(type(value))
    return out.reset_index()


def json_text(value: Any) -> str:
    if not value:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
