"""GNSM: Gumbel Noise Score Matching for categorical and mixed tabular data."""

from .detector import GNSM
from .table import TabularEncoder, read_table

__all__ = ["GNSM", "TabularEncoder", "read_table"]
