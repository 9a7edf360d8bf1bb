"""Tables for GNSM: reading CSV / ARFF files and encoding mixed columns.

``TabularEncoder`` learns, from training rows only, which columns are categorical and which
numeric, the categories of each categorical column and the mean / SD of each numeric one, and
turns a table into two arrays the score network consumes:

- ``codes (N, C)`` int64: the slot index of each categorical value;
- ``numeric (N, M)`` float32: standardised numeric values.

Slots of a categorical column: its training categories (sorted), then ``<missing>`` when the
training rows had missing values (a missing value is then an ordinary category), then
``<other>``, which no training row uses. At scoring time a category never seen in training,
or a missing value in a column that had none in training, goes to ``<other>``: the model has
never seen that slot switched on, so such rows score as unusual (documented behaviour, tested).
A missing numeric value is replaced by the training mean (0 after standardisation).

Automatic column types (overridable with ``categorical`` / ``numeric``): object, string,
category and bool columns are categorical, numeric dtypes are numeric. A numpy array is one
type throughout: strings/objects categorical, numbers numeric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

MISSING_SLOT = "<missing>"
OTHER_SLOT = "<other>"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or ARFF file into a DataFrame (ARFF nominal attributes -> categorical
    columns with their declared categories; ``?`` -> missing)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"table '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".arff":
            frame = _read_arff(path)
        elif suffix in (".csv", ".txt", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",",
                                skipinitialspace=True, na_values=["?"])
        else:
            raise InputError(f"table '{path}': unknown format '{suffix}' (use .csv or .arff)")
    except InputError:
        raise
    except Exception as e:  # pandas / scipy parsers raise many types
        raise InputError(f"table '{path}' cannot be read: {str(e).splitlines()[0]}") from e
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"table '{path}' is empty ({frame.shape[0]} rows, "
                         f"{frame.shape[1]} columns)")
    return frame


def _read_arff(path: Path) -> pd.DataFrame:
    from scipy.io import arff

    data, meta = arff.loadarff(str(path))
    columns = {}
    for name in meta.names():
        kind, values = meta[name]
        column = data[name]
        if kind == "nominal":
            text = [v.decode() if isinstance(v, bytes) else str(v) for v in column]
            columns[name] = pd.Categorical(
                [None if t == "?" else t for t in text], categories=list(values)
            )
        else:
            columns[name] = np.asarray(column, dtype=np.float64)
    return pd.DataFrame(columns)


def as_frame(table, what: str = "table") -> pd.DataFrame:
    """DataFrame or 2-D array -> DataFrame (array columns are named "0", "1", ...)."""
    if isinstance(table, pd.DataFrame):
        frame = table
    else:
        array = np.asarray(table)
        if array.ndim != 2:
            raise InputError(f"{what}: expected a 2-D table, got an array of shape {array.shape}")
        frame = pd.DataFrame(array, columns=[str(i) for i in range(array.shape[1])])
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"{what} is empty ({frame.shape[0]} rows, {frame.shape[1]} columns)")
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    if len(set(frame.columns)) != frame.shape[1]:
        raise InputError(f"{what}: column names are not unique")
    return frame


def _is_categorical_dtype(series: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)


def _text(value) -> str:
    """One value as category text: 1, 1.0, "1" and numpy ints all become "1"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _factorize(series: pd.Series) -> tuple[np.ndarray, list[str]]:
    """-> ``codes (N,)`` int64 into the returned distinct texts (-1 = missing), texts."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    texts = [_text(u) for u in uniques]
    # distinct raw values may share a text (1 and "1"): merge them
    merged = {t: i for i, t in reversed(list(enumerate(texts)))}
    remap = np.array([merged[t] for t in texts] + [-1], np.int64)
    return remap[codes], texts


@dataclass
class CategoricalColumn:
    name: str
    slots: list[str]  # training categories, optional <missing>, then <other>

    @property
    def size(self) -> int:
        return len(self.slots)


@dataclass
class NumericColumn:
    name: str
    mean: float
    scale: float


@dataclass
class TabularEncoder:
    """Column layout learned from training rows; see the module docstring."""

    categorical: list[CategoricalColumn] = field(default_factory=list)
    numeric: list[NumericColumn] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # constant columns dropped at fit

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.categorical] + [c.name for c in self.numeric]

    @property
    def slot_counts(self) -> list[int]:
        return [c.size for c in self.categorical]

    @classmethod
    def fit(
        cls,
        table,
        categorical: list | None = None,
        numeric: list | None = None,
        constant_columns: str = "error",
    ) -> TabularEncoder:
        """Learn the layout from training rows.

        Args:
            categorical, numeric: column names (or array indices) forcing a type.
            constant_columns: what to do with a column that has a single value in every
                training row: "error" (default) refuses it; "keep" keeps it (any other value
                at scoring time then goes to its ``<other>`` slot and looks anomalous, which is
                right when the training rows are clean inliers); "drop" drops it, listing it
                in ``dropped``.
        """
        frame = as_frame(table, "training table")
        forced_cat = {str(c) for c in (categorical or [])}
        forced_num = {str(c) for c in (numeric or [])}
        unknown = (forced_cat | forced_num) - set(frame.columns)
        if unknown:
            raise InputError(f"training table has no column(s) {sorted(unknown)}")
        if forced_cat & forced_num:
            raise InputError(f"column(s) {sorted(forced_cat & forced_num)} forced to be both "
                             "categorical and numeric")
        encoder = cls()
        for name in frame.columns:
            series = frame[name]
            if series.isna().all():
                raise InputError(f"training table: column '{name}' has only missing values")
            is_cat = name in forced_cat or (
                name not in forced_num and _is_categorical_dtype(series))
            if not is_cat:
                try:
                    values = pd.to_numeric(series, errors="raise").astype(np.float64)
                except (TypeError, ValueError) as e:
                    raise InputError(
                        f"training table: column '{name}' was declared numeric but holds "
                        f"non-numeric values ({str(e).splitlines()[0]})"
                    ) from e
                distinct = values.dropna().nunique()
                if distinct < 2 and not encoder._keep_constant(name, constant_columns,
                                                               "a single value"):
                    continue
                encoder.numeric.append(
                    NumericColumn(name, float(values.mean()), float(values.std(ddof=0)))
                )
                continue
            codes, texts = _factorize(series)
            categories = sorted(set(texts))
            has_missing = bool((codes < 0).any())
            if len(categories) + int(has_missing) < 2 and not encoder._keep_constant(
                    name, constant_columns, f"a single category ('{categories[0]}')"):
                continue
            slots = categories + ([MISSING_SLOT] if has_missing else []) + [OTHER_SLOT]
            encoder.categorical.append(CategoricalColumn(name, slots))
        if not encoder.columns:
            raise InputError("training table: no informative columns left")
        return encoder

    def _keep_constant(self, name: str, policy: str, what: str) -> bool:
        """Apply the constant-column policy; True if the column is kept."""
        if policy == "keep":
            return True
        if policy == "drop":
            self.dropped.append(name)
            return False
        if policy != "error":
            raise ValueError(f"constant_columns must be 'error', 'keep' or 'drop', got '{policy}'")
        raise InputError(
            f"training table: column '{name}' has {what} in every training row; pass "
            "constant_columns='keep' to flag other values of it at scoring time, or 'drop' "
            "to ignore it (on the command line: --constant-columns keep or drop)"
        )

    def transform(self, table, what: str = "table") -> tuple[np.ndarray, np.ndarray]:
        """-> ``codes (N, C)`` int64 slot indices, ``numeric (N, M)`` float32."""
        frame = as_frame(table, what)
        if not isinstance(table, pd.DataFrame):
            expected = len(self.columns) + len(self.dropped)
            if frame.shape[1] != expected:
                raise InputError(f"{what} has {frame.shape[1]} columns, the model was fitted "
                                 f"on {expected}")
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise InputError(f"{what} lacks column(s) the model was fitted on: {missing}")
        n = len(frame)
        codes = np.empty((n, len(self.categorical)), np.int64)
        for j, column in enumerate(self.categorical):
            value_codes, texts = _factorize(frame[column.name])
            lookup = {s: i for i, s in enumerate(column.slots[:-1]) if s != MISSING_SLOT}
            other = column.size - 1
            missing_slot = (column.slots.index(MISSING_SLOT) if MISSING_SLOT in column.slots
                            else other)
            slot_of = np.array([lookup.get(t, other) for t in texts] + [missing_slot], np.int64)
            codes[:, j] = slot_of[value_codes]
        values = np.empty((n, len(self.numeric)), np.float32)
        for j, column in enumerate(self.numeric):
            try:
                raw = pd.to_numeric(frame[column.name], errors="raise").astype(np.float64)
            except (TypeError, ValueError) as e:
                raise InputError(f"{what}: numeric column '{column.name}' holds non-numeric "
                                 f"values ({str(e).splitlines()[0]})") from e
            z = (raw.to_numpy() - column.mean) / (column.scale if column.scale > 0 else 1.0)
            values[:, j] = np.nan_to_num(z, nan=0.0)
        return codes, values

    def one_hot(self, table) -> np.ndarray:
        """``(N, sum of slots + M)`` one-hot + standardised numeric matrix (for baselines)."""
        codes, values = self.transform(table)
        blocks = [np.eye(c.size, dtype=np.float32)[codes[:, j]]
                  for j, c in enumerate(self.categorical)]
        return np.concatenate(blocks + [values], axis=1)

    def to_state(self) -> dict:
        return {
            "categorical": [{"name": c.name, "slots": c.slots} for c in self.categorical],
            "numeric": [{"name": c.name, "mean": c.mean, "scale": c.scale} for c in self.numeric],
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_state(cls, state: dict) -> TabularEncoder:
        return cls(
            [CategoricalColumn(c["name"], list(c["slots"])) for c in state["categorical"]],
            [NumericColumn(c["name"], c["mean"], c["scale"]) for c in state["numeric"]],
            list(state["dropped"]),
        )
