"""GNSM: Gumbel Noise Score Matching for categorical and mixed tabular data.

The names below are imported on first use (PEP 562), so that the command line, which
registers the ``gnsm`` sub-commands for every call, does not pay for scikit-learn and pandas
when it runs ``detect`` or ``demo`` (1.7 s of a CLI start on 2 cores;
``benchmarks/cli_start_cost.py``).
"""

from importlib import import_module

_EXPORTS = {"GNSM": ".detector", "TabularEncoder": ".table", "read_table": ".table"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
