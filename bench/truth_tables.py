"""A ground truth's arrays as columnar tables (Hugging Face ``datasets``) and back, bit for bit.

A truth (:class:`bench.groundtruth.base.GroundTruth`, as the cache packs it) becomes a ``DatasetDict``:

- ``columns``: one row per column j of the truth (a removed point, group, subset or (removal, T) pair):
  ``column`` (j), ``effect [Q]`` (``actual[:, j]``, the mean over retraining seeds), ``effect_by_seed [K][Q]``
  (``replicates[:, j]``) where there are seeds, ``train_indices`` (the training points that define the column,
  where the protocol keeps them per column), ``train_index`` (leave-one-out's removed point), and any other
  per-column value or per-seed measurement (``margin_replicates [K][Q]``) under its own name;
- ``queries``: one row per query q: ``query`` (q) and ``test_index`` (its index in the task's test split);
- ``arrays``: every other array whole (``name``, ``dtype``, ``shape``, and its values flattened in
  ``float_values`` or ``int_values``).

The layout (which array went where, with its dtype and shape) is returned beside the tables and kept in the
manifest, so :func:`from_tables` rebuilds the arrays exactly; the caller checks their digest.
Only numpy and ``datasets``: no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PER_SEED = ("replicates", "extra.margin_replicates")
#: arrays with one value per column (by name: a shape alone can match by chance, e.g. mislabel's flipped indices)
PER_COLUMN = ("train_idx", "extra.kinds", "extra.fractions")


def to_tables(arrays: dict[str, np.ndarray], test_index: np.ndarray | None) -> tuple[Any, dict[str, Any]]:
    """``(DatasetDict, layout)``: ``arrays`` as the three tables; ``test_index [Q]`` names the queries (None
    where the truth's rows are not the task's queries, e.g. mislabel's single row)."""
    import datasets

    actual = arrays["actual"]
    n_queries, n_columns = actual.shape
    columns: dict[str, Any] = {"column": np.arange(n_columns, dtype=np.int64), "effect": list(actual.T)}
    layout: dict[str, Any] = {"actual": _entry(actual, "columns", "effect", "query-major")}
    for name, array in arrays.items():
        if name == "actual":
            continue
        field, form = _placement(name, array, n_queries, n_columns, arrays)
        if form is None:
            continue
        layout[name] = _entry(array, "columns", field, form)
        if form == "seed-query-major":
            columns[field] = list(np.transpose(array, (2, 0, 1)))
        elif form == "ragged":
            offsets = arrays["extra.offsets"]
            columns[field] = [array[offsets[j]: offsets[j + 1]] for j in range(n_columns)]
        elif form == "per-column":
            columns[field] = array
    if layout.get("extra.members", {}).get("form") == "ragged":  # the offsets are the lists' lengths
        layout["extra.offsets"] = _entry(arrays["extra.offsets"], "columns", "train_indices", "ragged-offsets")
    rest = {name: array for name, array in arrays.items() if name not in layout}
    features = {"column": datasets.Value("int64")}
    for entry in layout.values():
        depth = {"query-major": 1, "seed-query-major": 2, "ragged": 1, "per-column": 0}.get(entry["form"])
        if depth is not None:
            features[entry["field"]] = _nested(datasets.Value(np.dtype(entry["dtype"]).name), depth)
    tables = {"columns": datasets.Dataset.from_dict(columns, features=datasets.Features(features))}
    if rest:  # datasets cannot read back a table of no rows
        tables["arrays"] = datasets.Dataset.from_dict(_whole(rest), features=_whole_features())
    for name in rest:
        layout[name] = _entry(rest[name], "arrays", name, "whole")
    if test_index is not None and len(test_index) == n_queries:
        tables["queries"] = datasets.Dataset.from_dict({"query": np.arange(n_queries, dtype=np.int64),
                                                        "test_index": np.asarray(test_index, dtype=np.int64)})
    return datasets.DatasetDict(tables), layout


def from_tables(tables: Any, layout: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays :func:`to_tables` was given, from its tables and layout (dtypes and shapes restored). Read
    from the Arrow buffers: ``datasets``' numpy formatting may narrow floats."""
    whole = {row["name"]: row for row in tables["arrays"]} if "arrays" in tables else {}
    arrays = {}
    for name, entry in layout.items():
        dtype, shape, form = np.dtype(entry["dtype"]), tuple(entry["shape"]), entry["form"]
        if form == "whole":
            values = whole[name]["float_values" if dtype.kind == "f" else "int_values"]
            arrays[name] = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else np.int64).astype(dtype).reshape(shape)
            continue
        column = tables["columns"].data.column(entry["field"]).combine_chunks()
        if form == "query-major":
            arrays[name] = _flat(column, 1, dtype).reshape(shape[::-1]).T.copy()
        elif form == "seed-query-major":
            stacked = _flat(column, 2, dtype).reshape(shape[2], shape[0], shape[1])
            arrays[name] = np.ascontiguousarray(np.transpose(stacked, (1, 2, 0)))
        elif form == "ragged":
            arrays[name] = _flat(column, 1, dtype)
        elif form == "ragged-offsets":
            offsets = column.offsets.to_numpy(zero_copy_only=False)
            arrays[name] = (offsets - offsets[0]).astype(dtype)
        else:  # per-column
            arrays[name] = _flat(column, 0, dtype).reshape(shape)
    return arrays


def _flat(column: Any, depth: int, dtype: np.dtype) -> np.ndarray:
    """The values of an Arrow array nested ``depth`` lists deep, flattened, as ``dtype``."""
    for _ in range(depth):
        column = column.flatten()
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)


def _placement(name: str, array: np.ndarray, n_queries: int, n_columns: int,
               arrays: dict[str, np.ndarray]) -> tuple[str, str | None]:
    """Where an array goes in the ``columns`` table (field, form), or ``(name, None)`` for the ``arrays`` table."""
    field = {"replicates": "effect_by_seed", "train_idx": "train_index", "extra.members": "train_indices"}.get(
        name, name.removeprefix("extra."))
    if name in PER_SEED and array.ndim == 3 and array.shape[1:] == (n_queries, n_columns):
        return field, "seed-query-major"
    offsets = arrays.get("extra.offsets")
    if name == "extra.members" and offsets is not None and len(offsets) == n_columns + 1:
        return field, "ragged"
    if name in PER_COLUMN and array.shape == (n_columns,):
        return field, "per-column"
    return name, None


def _nested(value: Any, depth: int) -> Any:
    import datasets

    return value if depth == 0 else datasets.Sequence(_nested(value, depth - 1))


def _entry(array: np.ndarray, table: str, field: str, form: str) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape), "table": table, "field": field, "form": form}


def _whole(rest: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """Each array flattened into ``float_values`` (float dtypes, as float64) or ``int_values`` (the others, as
    int64): both exact for every dtype the cache holds."""
    def flat(array: np.ndarray, kind: type) -> list[Any]:
        return array.reshape(-1).astype(kind).tolist() if (array.dtype.kind == "f") == (kind is np.float64) else []

    return {"name": list(rest), "dtype": [a.dtype.str for a in rest.values()],
            "shape": [list(a.shape) for a in rest.values()],
            "float_values": [flat(a, np.float64) for a in rest.values()],
            "int_values": [flat(a, np.int64) for a in rest.values()]}


def _whole_features() -> Any:
    import datasets

    return datasets.Features({"name": datasets.Value("string"), "dtype": datasets.Value("string"),
                              "shape": datasets.Sequence(datasets.Value("int64")),
                              "float_values": datasets.Sequence(datasets.Value("float64")),
                              "int_values": datasets.Sequence(datasets.Value("int64"))})
