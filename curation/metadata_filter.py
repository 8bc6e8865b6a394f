"""Filtering documents by their per-document metadata columns (pyarrow only): the `where` clause of a query.

This is data-level logic, so it lives in curation, the lowest layer: classifier examples (`classify.py`,
`selection:` specs) and mixture selections (`mixtures.selection.Selection`, a `MetadataQuery` with
long-document upsampling) filter with the same semantics. `where` holds one filter per column, all must hold:
    {"language": "en"}                       equality
    {"language": ["fr", "de"]}               membership
    {"language_score": {"min": 0.9}}         inclusive range (`min`, `max` or both)
A document whose value is null matches no filter on that column (a `None` filter matches only nulls).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

GLOB_CHARS = "*?["
RANGE_KEYS = ("min", "max")
_SCALARS = (str, int, float, bool)


class MetadataFilterError(ValueError):
    """A where clause or query that cannot be applied: a malformed filter, an unknown column, a type mismatch."""


def is_pattern(source: str) -> bool:
    """Whether a source name is a glob ("web-*") rather than one name."""
    return any(c in source for c in GLOB_CHARS)


def matching_sources(source: str, names: Iterable[str]) -> list[str]:
    """The names `source` (a name or a glob) picks, sorted."""
    names = sorted(names)
    if is_pattern(source):
        return [n for n in names if fnmatch.fnmatchcase(n, source)]
    return [source] if source in names else []


def check_condition(label: str, column: Any, condition: Any, error: type[Exception] = MetadataFilterError) -> Any:
    """`condition` for one column in canonical form (lists as tuples), or `error` saying what is allowed.
    `label` starts every message (e.g. "selection 'en'")."""
    where = f"{label}: where[{column!r}]"
    if not isinstance(column, str) or not column:
        raise error(f"{label}: where keys are column names (strings), got {column!r}")
    if condition is None or isinstance(condition, _SCALARS):
        if isinstance(condition, float) and condition != condition:
            raise error(f"{where} = NaN matches nothing; give a value, a list or a {{min, max}} range")
        return condition
    if isinstance(condition, list | tuple | set | frozenset):
        values = tuple(sorted(condition, key=repr)) if isinstance(condition, set | frozenset) else tuple(condition)
        if not values or not all(isinstance(v, _SCALARS) for v in values):
            raise error(f"{where} = {condition!r}: a membership filter is a non-empty list of plain values")
        return values
    if isinstance(condition, Mapping):
        unknown = sorted(set(condition) - set(RANGE_KEYS), key=str)
        if unknown or not condition:
            raise error(f"{where} = {dict(condition)!r}: a range has keys `min` and/or `max` (inclusive), "
                        f"not {unknown}")
        for key, bound in condition.items():
            if isinstance(bound, bool) or not isinstance(bound, int | float) or bound != bound:
                raise error(f"{where}.{key} = {bound!r} is not a number")
        if "min" in condition and "max" in condition and condition["min"] > condition["max"]:
            raise error(f"{where}: min {condition['min']} > max {condition['max']} matches nothing")
        return {key: condition[key] for key in RANGE_KEYS if key in condition}
    raise error(f"{where} = {condition!r}: give a value, a list of values or a {{min, max}} range")


def parse_where(label: str, where: Any, error: type[Exception] = MetadataFilterError) -> dict[str, Any]:
    """A where clause in canonical form (every condition checked by `check_condition`)."""
    if not isinstance(where, Mapping):
        raise error(f"{label}: where must be a mapping column -> filter, got {where!r}")
    return {k: check_condition(label, k, v, error) for k, v in where.items()}


def where_to_dict(where: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical where clause as plain JSON values (tuples back to lists)."""
    return {k: list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
            for k, v in where.items()}


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _values_of(condition: Any) -> list[Any]:
    if isinstance(condition, tuple):
        return list(condition)
    if isinstance(condition, Mapping):
        return list(condition.values())
    return [] if condition is None else [condition]


def _fits(value: Any, kind: pa.DataType) -> bool:
    """Whether a filter value compares with a column without a silent cast (1 against "1", "en" against 0)."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return isinstance(value, str)
    if pa.types.is_boolean(kind):
        return isinstance(value, bool)
    if _is_numeric(kind):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True  # other types: left to pyarrow, whose errors are reported below


def where_mask(table: pa.Table, where: Mapping[str, Any], label: str, source: str,
               error: type[Exception] = MetadataFilterError) -> np.ndarray:
    """Which rows of `source`'s per-document `table` pass a canonical where clause (bool array)."""
    keep = np.ones(table.num_rows, dtype=bool)
    for column, condition in where.items():
        if column not in table.column_names:
            raise error(f"{label}: unknown metadata field {column!r} for source {source!r}; "
                        f"the per-document columns are {table.column_names}")
        values = table.column(column)
        wrong = [v for v in _values_of(condition) if not _fits(v, values.type)]
        if wrong or (isinstance(condition, Mapping) and not _is_numeric(values.type)):
            what = "a range" if isinstance(condition, Mapping) and not _is_numeric(values.type) else repr(wrong[0])
            raise error(f"{label}: where[{column!r}] = {condition!r}: {what} cannot be compared with column "
                        f"{column!r} of type {values.type} in source {source!r}; give a value of that type")
        try:
            if condition is None:
                test = pc.is_null(values)
            elif isinstance(condition, tuple):
                value_set = pa.array(condition)
                if _is_numeric(values.type) and pa.types.is_floating(value_set.type):
                    values = pc.cast(values, pa.float64())  # 2.0 in an integer column matches 2
                test = pc.is_in(values, value_set=value_set.cast(values.type))
            elif isinstance(condition, Mapping):  # numeric: pyarrow promotes int against float
                parts = []
                if "min" in condition:
                    parts.append(pc.greater_equal(values, pa.scalar(condition["min"])))
                if "max" in condition:
                    parts.append(pc.less_equal(values, pa.scalar(condition["max"])))
                test = parts[0] if len(parts) == 1 else pc.and_(parts[0], parts[1])
            else:
                test = pc.equal(values, pa.scalar(condition))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise error(f"{label}: where[{column!r}] = {condition!r} does not apply to column {column!r} of type "
                        f"{values.type} in source {source!r} ({err}); give a value of that type") from err
        keep &= pc.fill_null(test, False).to_numpy(zero_copy_only=False).astype(bool)
    return keep


@dataclass(frozen=True)
class MetadataQuery:
    """The documents of `source` (a name, or a glob such as "web-*") whose metadata pass `where`; `name` labels
    it in messages. Subclasses set `error` to raise their own exception type."""

    name: str
    source: str
    where: Mapping[str, Any] = field(default_factory=dict)

    error: ClassVar[type[Exception]] = MetadataFilterError
    kind: ClassVar[str] = "query"  # the word messages call it by

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise self.error(f"a {self.kind} needs a non-empty name (the leaf its weights use), got {self.name!r}")
        if any(c in self.name for c in GLOB_CHARS):
            raise self.error(f"{self.label}: a leaf name cannot contain {GLOB_CHARS!r}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise self.error(f"{self.label}: source must be a source name or pattern, got {self.source!r}")
        object.__setattr__(self, "where", parse_where(self.label, self.where, self.error))

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name!r}"

    @property
    def is_pattern(self) -> bool:
        return is_pattern(self.source)

    def matching_sources(self, names: Iterable[str]) -> list[str]:
        """The source names this query reads, sorted (the order of its documents)."""
        return matching_sources(self.source, names)

    def mask(self, table: pa.Table, source: str) -> np.ndarray:
        """Which rows of `source`'s per-document table pass `where`."""
        return where_mask(table, self.where, self.label, source, self.error)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], ignored: Iterable[str] = ()) -> MetadataQuery:
        """From `{name, source, where}`; keys in `ignored` (e.g. a selection's `long_docs`) are allowed and unused."""
        if not isinstance(data, Mapping):
            raise cls.error(f"a {cls.kind} is a mapping with name, source, where; got {data!r}")
        known = {"name", "source", "where", *ignored}
        if unknown := sorted(set(data) - known, key=str):
            raise cls.error(f"{cls.kind} {data.get('name')!r}: unknown keys {unknown} (known: {sorted(known)})")
        if missing := [k for k in ("name", "source") if k not in data]:
            raise cls.error(f"{cls.kind} {data.get('name')!r}: missing {missing}")
        return cls(name=data["name"], source=data["source"], where=data.get("where") or {})
