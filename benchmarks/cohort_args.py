"""Command-line pieces shared by the benchmark scripts that read a benchmark cohort through
the model-space cache (``false_positives.py``, ``feature_precision.py``,
``groupnorm_precision.py``; ``typicality_levels.py``, ``typicality_reg_covar.py`` and
``msma_3d.py`` use the output refusal and error exit, ``detect_cost.py`` and
``cli_start_cost.py`` the output refusal)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from SpatialMSMALib.errors import InputError

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "spatial_msma.pt"


def cohort_parser(description: str) -> argparse.ArgumentParser:
    """A parser with ``--model`` (default: the bundled model), ``--manifest``, ``--cache``,
    ``--out`` and ``--overwrite``; a script adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="model-space cache folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def refuse_existing_output(args: argparse.Namespace) -> None:
    """Raise InputError when ``--out`` exists and ``--overwrite`` was not given."""
    if args.out and args.out.exists() and not args.overwrite:
        raise InputError(f"'{args.out}' exists; pass --overwrite to replace it")


def exit_with(error: InputError) -> None:
    """Print ``error: ...`` on stderr and exit with status 2 (no traceback)."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
