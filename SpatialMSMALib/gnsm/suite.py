"""The categorical anomaly-detection suite of ``shared/data/tabular`` (PROTOCOLS.md sec. 3).

Each dataset: file, label column, the label value(s) that mark anomalies, and for nursery the
rows kept (``final evaluation`` in {not_recom, very_recom}: inliers not_recom, anomalies
very_recom). ``load_dataset`` returns the feature table (label column removed) and ``y``
(1 = anomaly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .table import read_table


@dataclass(frozen=True)
class SuiteDataset:
    name: str
    file: str
    label: str
    anomaly: str
    keep: tuple[str, ...] = ()  # label values kept (empty: all rows)


SUITE = (
    SuiteDataset("bank", "bank-additional-ful-nominal.arff", "y", "yes"),
    SuiteDataset("chess", "chess_krkopt_zerovsall.arff", "class", "1"),
    SuiteDataset("cmc", "cmc-nominal.arff", "class_numberofchildren", "1"),
    SuiteDataset("probe", "kddcup99-corrected-probevsnormal-nominal-cleaned.arff", "class", "1"),
    SuiteDataset("u2r", "kddcup99-corrected-u2rvsnormal-nominal-cleaned.arff", "class", "1"),
    SuiteDataset("solar", "solar-flare_FvsAll-cleaned.arff", "class", "1"),
    SuiteDataset("nursery", "nursery.csv", "final evaluation", "very_recom",
                 keep=("not_recom", "very_recom")),
)
SUITE_BY_NAME = {d.name: d for d in SUITE}


def split_labels(frame: pd.DataFrame, label: str, anomaly: str, source: str = "table"
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """Table with a label column -> (features without it, ``y`` int 0/1 with 1 = anomaly)."""
    if label not in frame.columns:
        raise InputError(f"{source}: no label column '{label}' (columns: {list(frame.columns)})")
    text = frame[label].astype(str).str.strip()
    y = (text == str(anomaly)).to_numpy().astype(int)
    if y.sum() == 0:
        values = sorted(text.unique())[:20]
        raise InputError(f"{source}: no row has {label} = '{anomaly}' (values: {values})")
    return frame.drop(columns=[label]), y


def load_dataset(folder: str | Path, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    """-> features ``(N, D)`` DataFrame and labels ``(N,)`` (1 = anomaly)."""
    if name not in SUITE_BY_NAME:
        raise InputError(f"unknown dataset '{name}' (have: {sorted(SUITE_BY_NAME)})")
    spec = SUITE_BY_NAME[name]
    frame = read_table(Path(folder) / spec.file)
    if spec.keep:
        frame = frame[frame[spec.label].astype(str).isin(spec.keep)].reset_index(drop=True)
    return split_labels(frame, spec.label, spec.anomaly, spec.file)
