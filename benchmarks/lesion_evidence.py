"""Why is a lesion missed? The evidence inside every lesion >= 0.5 mL, against the thresholds.

    python benchmarks/lesion_evidence.py --manifest benchmark/manifest.json --cache CACHE \\
        [--model MODEL] [--splits test loao] [--out results/lesion_evidence.json]

Runs the model's detection (the path of ``benchmarks/spatial_3d.py``, default operating point)
on the lesioned scans of each split and reads, for every simulated lesion of at least 0.5 mL
(26-connected components of the truth mask, the benchmark's rule):

* ``peak``: the highest heat-map value inside it (fused evidence, ``-log10`` healthy voxel
  FPR, for a model with a normative contrast map), and ``flow_peak`` / ``normative_peak``:
  the highest value of each map's part;
* ``extent_ml``: the volume of its voxels at or above the extent threshold (the labelling
  threshold; with growth, the grown rate's);
* ``component_ml`` and ``component_peak``: the largest extent component that touches it
  (it may reach outside the lesion) and that component's peak;
* ``reason``, the first labelling rule it fails (``spatial.label_anomalies``):
  ``"detected"``, ``"below the extent threshold"`` (no voxel reaches it),
  ``"peak below the peak threshold"`` (no touching component reaches the peak threshold)
  or ``"component under the minimum size"``.

The summary per split counts the lesions by reason, so how far a missed lesion is from being
found can be read off: a lesion under the minimum size needs a smaller minimum, one whose
peak falls short needs more evidence. Only the simulator's labels are read; no threshold is
set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort_args import (  # noqa: E402
    exit_with,
    load_spatial_model,
    native_evidence_maps,
    records_per_scan,
    refuse_existing_output,
    split_parser,
)

from SpatialMSMALib.dataset import manifest_scans  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import load_volume, write_text_atomically  # noqa: E402
from SpatialMSMALib.metrics import label_components  # noqa: E402

LESIONED_SPLITS = {"test": "test_lesioned", "loao": "loao_lesioned"}
#: lesions counted (the issue's size limit), mm^3
MIN_LESION_MM3 = 500.0
REASONS = ("detected", "below the extent threshold", "peak below the peak threshold",
           "component under the minimum size")


def lesion_records(truth: np.ndarray, heat: np.ndarray, flow_part: np.ndarray | None,
                   brain_mask: np.ndarray, extent: float, peak_threshold: float,
                   min_component_ml: float, spacing_mm,
                   min_lesion_mm3: float = MIN_LESION_MM3) -> list[dict]:
    """One record per truth lesion of at least ``min_lesion_mm3`` (see the module docstring).

    Args:
        truth: ``(I, J, K)`` bool lesion mask on the native grid.
        heat: ``(I, J, K)`` the native heat map; flow_part: the flow's part of it (None for a
            flow-only model: the whole map is the flow's).
        brain_mask: ``(I, J, K)`` bool, where components are labelled.
        extent, peak_threshold: the labelling thresholds (``Calibration.labelling_thresholds``).
        min_component_ml: the minimum component size; spacing_mm: voxel size (mm) per axis.
    Returns:
        dicts with ``volume_ml``, ``peak``, ``flow_peak``, ``normative_peak`` (None for a
        flow-only model), ``extent_ml``, ``component_ml``, ``component_peak`` and ``reason``.
    """
    voxel_ml = float(np.prod(np.asarray(spacing_mm, float))) / 1000
    with np.errstate(invalid="ignore"):
        above = np.asarray(brain_mask, bool) & (heat >= extent)
    components, _ = ndimage.label(above, np.ones((3, 3, 3), bool))
    lesions, count = label_components(truth)
    flow = heat if flow_part is None else flow_part
    out = []
    for k in range(1, count + 1):
        member = lesions == k
        volume_ml = float(member.sum()) * voxel_ml
        if volume_ml * 1000 < min_lesion_mm3:
            continue
        touching = np.unique(components[member & above])
        sizes = [float((components == c).sum()) * voxel_ml for c in touching]
        peaks = [float(np.nanmax(heat[components == c])) for c in touching]
        if not len(touching):
            reason = "below the extent threshold"
        elif max(peaks) < peak_threshold:
            reason = "peak below the peak threshold"
        elif not any(s >= min_component_ml and p >= peak_threshold
                     for s, p in zip(sizes, peaks, strict=True)):
            reason = "component under the minimum size"
        else:
            reason = "detected"
        largest = int(np.argmax(sizes)) if sizes else None
        out.append({
            "volume_ml": round(volume_ml, 4),
            "peak": float(np.nanmax(heat[member])),
            "flow_peak": float(np.nanmax(flow[member])),
            "normative_peak": (None if flow_part is None else
                               float(np.nanmax((heat - flow_part)[member]))),
            "extent_ml": round(float((member & above).sum()) * voxel_ml, 4),
            "component_ml": None if largest is None else round(sizes[largest], 4),
            "component_peak": None if largest is None else peaks[largest],
            "reason": reason,
        })
    return out


def summarise(records: list[dict]) -> dict:
    """Lesion counts by reason, and the peak range of each group."""
    out = {"n": len(records)}
    for reason in REASONS:
        group = [r["peak"] for r in records if r["reason"] == reason]
        out[reason] = {"n": len(group),
                       "peak_range": [min(group), max(group)] if group else None}
    return out


def scan_lesions(model, row, scan, local, device="cpu") -> list[dict]:
    """:func:`lesion_records` of one model-space lesioned scan at the model's default
    operating point."""
    detection, flow_native, brain = native_evidence_maps(model, row, scan, local, device)
    truth = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True)
    extent, peak = model.calibration.labelling_thresholds(detection.threshold)
    spacing = np.linalg.norm(detection.affine[:3, :3], axis=0)
    return lesion_records(np.asarray(truth.data) > 0, detection.heat, flow_native, brain,
                          extent, detection.threshold if peak is None else peak,
                          model.calibration.min_component_ml, spacing)


def main() -> None:
    args = split_parser(__doc__.splitlines()[0], LESIONED_SPLITS).parse_args()
    try:
        refuse_existing_output(args)
        model = load_spatial_model(args.model)
        names = [LESIONED_SPLITS[s] for s in args.splits]
        rows = manifest_scans(args.manifest, names)
    except InputError as e:
        exit_with(e)
    result = {"command": " ".join(sys.argv), "model": str(args.model),
              "min_lesion_mm3": MIN_LESION_MM3, "splits": {}}
    for split, name in zip(args.splits, names, strict=True):
        per_scan = records_per_scan(
            model, rows[name], args.cache, args.device,
            lambda row, scan, local: scan_lesions(model, row, scan, local, args.device),
            lambda found: ", ".join(f"{r['volume_ml']:.2f} mL {r['reason']} "
                                    f"(peak {r['peak']:.2f})" for r in found))
        summary = summarise([r for found in per_scan.values() for r in found])
        result["splits"][split] = {"summary": summary, "scans": per_scan}
        print(f"{split}: {json.dumps(summary)}", flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
