"""Change the post-processing settings stored in a model file, without retraining.

    python training/set_post_processing.py --model runs/spatial_msma.pt --out runs/pp.pt \\
        [--max-peak-fpr 0.001 | none] [--min-component-ml 0.3] [--default-fpr 0.01] \\
        [--grow-rate-factor 3 | none] [--overwrite]

Post-processing (PROTOCOLS.md) is part of the method and fixed before testing: the healthy
heat-map quantiles of the calibration are kept as they are; only the label rules change: the
default operating rate, the minimum component size and the hysteresis rules (a component is
reported only if its peak reaches the threshold of ``--max-peak-fpr``; a component grows into
the voxels above the threshold of ``--grow-rate-factor`` times the operating rate). The change is
recorded in the calibration's notes and in the model's provenance, and the new file is
written atomically with its own checksum; the input file is never modified.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from train_spatial import grow_factor, peak_rate  # the same parsing as training

from SpatialMSMALib.errors import InputError
from SpatialMSMALib.model import AnomalyModel


def with_post_processing(model: AnomalyModel, **changes) -> AnomalyModel:
    """A copy of ``model`` whose calibration has ``changes`` (``max_peak_fpr``,
    ``grow_rate_factor``, ``min_component_ml``, ``default_fpr``) applied; the previous
    values are noted. Raises ``InputError`` for a model without a calibration or an invalid
    combination."""
    if model.calibration is None:
        raise InputError("this model file has no Spatial-MSMA calibration to change")
    old = model.calibration
    previous = {k: getattr(old, k) for k in changes}
    notes = dict(old.notes)
    notes.setdefault("post_processing_changes", []).append(
        {"previous": previous, "new": dict(changes),
         "by": "training/set_post_processing.py (no retraining; healthy quantiles unchanged)"})
    try:
        calibration = dataclasses.replace(old, notes=notes, **changes)
    except ValueError as e:
        raise InputError(str(e)) from None
    provenance = dict(model.provenance)
    provenance["post_processing_changed"] = {"previous": previous, "new": dict(changes)}
    return dataclasses.replace(model, calibration=calibration, provenance=provenance)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="model file to read")
    p.add_argument("--out", type=Path, required=True, help="model file to write")
    p.add_argument("--max-peak-fpr", type=peak_rate, default=argparse.SUPPRESS,
                   help="hysteresis rate (e.g. 0.001), or 'none' to turn the rule off")
    p.add_argument("--grow-rate-factor", type=grow_factor, default=argparse.SUPPRESS,
                   help="grow components to this multiple of the operating rate (e.g. 3), "
                        "or 'none'")
    p.add_argument("--min-component-ml", type=float, help="minimum component size (mL)")
    p.add_argument("--default-fpr", type=float, help="default voxel false-positive rate")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    changes = {}
    if hasattr(args, "max_peak_fpr"):  # given, possibly 'none'
        changes["max_peak_fpr"] = args.max_peak_fpr
    if hasattr(args, "grow_rate_factor"):
        changes["grow_rate_factor"] = args.grow_rate_factor
    if args.min_component_ml is not None:
        if not args.min_component_ml >= 0:  # also refuses NaN
            p.error(f"--min-component-ml {args.min_component_ml} must be >= 0")
        changes["min_component_ml"] = args.min_component_ml
    if args.default_fpr is not None:
        changes["default_fpr"] = args.default_fpr
    if not changes:
        p.error("nothing to change: give --max-peak-fpr, --grow-rate-factor, "
                "--min-component-ml or --default-fpr")
    if args.out.resolve() == args.model.resolve():
        p.error("--out must differ from --model (the input file is never modified)")
    try:
        model = with_post_processing(AnomalyModel.load(args.model), **changes)
        model.save(args.out, overwrite=args.overwrite)
    except (InputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {changes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
