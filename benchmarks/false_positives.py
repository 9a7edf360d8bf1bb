"""Where does a detector flag healthy scans? Every component of every healthy scan, described.

    python benchmarks/false_positives.py --manifest benchmark/manifest.json --cache CACHE \\
        [--model MODEL] [--splits test loao] [--out results/false_positives.json]

Runs the model's detection (the path of ``benchmarks/spatial_3d.py``, default operating point)
on the healthy scans of each split, where every labelled component is a false positive, and
describes each one:

* ``volume_ml`` and ``peak`` (fused evidence, ``-log10`` healthy voxel FPR);
* ``flow_share``: the flow's part of the fused evidence summed over the component (the rest
  is the normative contrast map's); 1 for a flow-only model;
* ``tissue``: the fractions of its voxels that the simulator's tissue map calls CSF, grey
  matter and white matter (1, 2, 3; 0 is outside the head);
* ``depth_mm``: the median distance of its voxels from the outside of the brain mask.

The summary per split gives the flagged volume by driver (flow or normative map, by
``flow_share`` above or below 0.5), by majority tissue and by depth (``SHALLOW_MM``), so the
source of the leave-one-anatomy-out split's excess of false positives can be read off. Only
healthy scans and the simulator's tissue labels are read; no threshold is set.
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

from SpatialMSMALib.cohort import load_manifest  # noqa: E402
from SpatialMSMALib.dataset import manifest_scans  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import load_volume, write_text_atomically  # noqa: E402

HEALTHY_SPLITS = {"test": "test_healthy", "loao": "loao_healthy"}
#: tissue labels of the simulator's tissue map
TISSUES = {1: "csf", 2: "gm", 3: "wm"}
#: a component is "shallow" when its median depth below the brain's surface is under this
SHALLOW_MM = 8.0


def describe_components(labels: np.ndarray, count: int, fused: np.ndarray,
                        flow_part: np.ndarray, tissue: np.ndarray, brain_mask: np.ndarray,
                        spacing_mm) -> list[dict]:
    """One record per label ``1..count`` of ``labels``.

    Args:
        labels: ``(I, J, K)`` int component labels on the native grid.
        fused: ``(I, J, K)`` the heat map (fused evidence, ``-log10`` FPR); flow_part: the
            flow's part of it, or None for a flow-only model (its share is then 1).
        tissue: ``(I, J, K)`` int simulator labels (0 outside the head, 1 CSF, 2 GM, 3 WM).
        brain_mask: ``(I, J, K)`` bool; spacing_mm: voxel size (mm) per axis.
    Returns:
        dicts with ``volume_ml``, ``peak``, ``flow_share``, ``tissue`` (fractions per name)
        and ``depth_mm`` (median distance of the voxels from outside the brain mask).
    """
    spacing = np.asarray(spacing_mm, float)
    depth = ndimage.distance_transform_edt(brain_mask, sampling=spacing)
    voxel_ml = float(np.prod(spacing)) / 1000
    out = []
    for k in range(1, count + 1):
        member = labels == k
        n = int(member.sum())
        if n == 0:
            continue
        if flow_part is None:
            share = 1.0
        else:
            total = float(np.nansum(fused[member]))
            share = float(np.nansum(flow_part[member]) / total) if total > 0 else float("nan")
        out.append({
            "volume_ml": round(n * voxel_ml, 4),
            "peak": float(np.nanmax(fused[member])),
            "flow_share": share,
            "tissue": {name: float((tissue[member] == value).mean())
                       for value, name in TISSUES.items()},
            "depth_mm": float(np.median(depth[member])),
        })
    return out


def summarise(components: list[dict], n_scans: int) -> dict:
    """Flagged volume (mL, total over the scans and per scan) by driver, tissue and depth."""
    def total(selected):
        return round(float(sum(c["volume_ml"] for c in selected)), 3)

    by_driver = {
        "flow": total(c for c in components if c["flow_share"] >= 0.5),
        "normative": total(c for c in components if c["flow_share"] < 0.5),
    }
    by_tissue = {name: total(c for c in components
                             if max(c["tissue"], key=c["tissue"].get) == name)
                 for name in TISSUES.values()}
    by_depth = {f"shallow (< {SHALLOW_MM:g} mm)": total(
                    c for c in components if c["depth_mm"] < SHALLOW_MM),
                "deep": total(c for c in components if c["depth_mm"] >= SHALLOW_MM)}
    return {"n_scans": n_scans, "n_components": len(components),
            "components_per_scan": len(components) / max(n_scans, 1),
            "flagged_ml": total(components),
            "flagged_ml_per_scan": total(components) / max(n_scans, 1),
            "by_driver_ml": by_driver, "by_majority_tissue_ml": by_tissue,
            "by_depth_ml": by_depth}


def scan_components(model, row, tissue_path, scan, local, device="cpu") -> list[dict]:
    """The detection of one model-space healthy scan at the model's default operating point,
    its components described (:func:`describe_components`) with the tissue map at
    ``tissue_path``."""
    detection, flow_native, brain = native_evidence_maps(model, row, scan, local, device)
    tissue = load_volume(tissue_path, what="tissue map")
    spacing = np.linalg.norm(detection.affine[:3, :3], axis=0)
    return describe_components(detection.labels, len(detection.components), detection.heat,
                               flow_native, np.asarray(tissue.data).astype(int), brain,
                               spacing)


def main() -> None:
    args = split_parser(__doc__.splitlines()[0], HEALTHY_SPLITS).parse_args()
    try:
        refuse_existing_output(args)
        model = load_spatial_model(args.model)
        names = [HEALTHY_SPLITS[s] for s in args.splits]
        rows = manifest_scans(args.manifest, names)
        manifest = load_manifest(args.manifest)
        tissue_paths = {s["id"]: Path(manifest["root"]) / s["tissue"]
                        for s in manifest["subjects"] if s.get("tissue")}
        missing = [r.id for name in names for r in rows[name] if r.id not in tissue_paths]
        if missing:
            raise InputError(f"{args.manifest}: no tissue map for {', '.join(missing[:3])}")
    except InputError as e:
        exit_with(e)
    result = {"command": " ".join(sys.argv), "model": str(args.model),
              "provenance_sha256": model.provenance.get("score_checkpoint_sha256"),
              "shallow_mm": SHALLOW_MM, "splits": {}}
    for split, name in zip(args.splits, names, strict=True):
        per_scan = records_per_scan(
            model, rows[name], args.cache, args.device,
            lambda row, scan, local: scan_components(model, row, tissue_paths[row.id], scan,
                                                     local, args.device),
            lambda found: (f"{len(found)} components, "
                           f"{sum(c['volume_ml'] for c in found):.2f} mL"))
        summary = summarise([c for found in per_scan.values() for c in found],
                            len(rows[name]))
        result["splits"][split] = {"summary": summary, "scans": per_scan}
        print(f"{split}: {json.dumps(summary)}", flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
