"""Which lesions does a detector miss? Detection by lesion contrast and by what surrounds it.

    python benchmarks/missed_lesions.py --result results/spatial_3d.json \\
        --manifest benchmark/manifest.json --out results/missed_lesions.json

Reads a ``benchmarks/spatial_3d.py`` result (its per-case ``truth_detected`` flags, at the
model's default operating point) and the benchmark manifest, and describes every simulated
lesion of at least 0.5 mL of the lesioned scans:

* ``faint``: its simulated contrast is within about one SD of no change on both channels
  (``flow_inputs.is_faint``: T1 factor above 0.85 and T2 factor below 1.3);
* ``shell_non_wm``: the fraction of a 2-voxel shell around it (4 mm on the 2 mm benchmark
  grid) that is grey matter or CSF in the simulator's tissue map: near 0 for a lesion deep in
  white matter, about 0.5 and above for one against the cortex or a ventricle.

A T1 darkening with a T2 brightening turns white matter towards grey matter on both channels;
next to the cortex such a lesion looks like a fold of grey matter, which healthy anatomy (and
its residual misregistration) also produces. The table shows how much of what is missed is
that, and how much is faintness. Only the simulator's labels are read; no threshold is set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow_inputs import is_faint  # noqa: E402

from SpatialMSMALib.cohort import load_manifest  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import load_volume  # noqa: E402
from SpatialMSMALib.metrics import label_components  # noqa: E402

#: lesions counted (the issue's size limit), mm^3
MIN_LESION_MM3 = 500.0
#: shell width around a lesion, voxels
SHELL_VOXELS = 2
#: tissue labels of the simulator's tissue map that are not white matter
NON_WM_LABELS = (1, 2)  # CSF, grey matter
#: a lesion "touches" grey matter or CSF when at least this fraction of its shell is either
TOUCHING_NON_WM = 0.4


def lesion_context(lesion_mask: np.ndarray, tissue: np.ndarray, manifest_lesions: list,
                   spacing) -> list[dict]:
    """One record per 26-connected truth component (``metrics.label_components`` order):
    volume (mm^3), the fraction of its shell that is not white matter, and the simulated
    T1 / T2 factors of the manifest lesion whose centroid voxel lies in it (None if none does:
    touching lesions share a component and keep the first).

    Args:
        lesion_mask: ``(I, J, K)`` bool truth; tissue: ``(I, J, K)`` int labels (0 background,
            1 CSF, 2 grey matter, 3 white matter); spacing: voxel size (mm).
    """
    labels, count = label_components(lesion_mask)
    voxel_mm3 = float(np.prod(spacing))
    owner = {}
    for entry in manifest_lesions:
        index = tuple(int(round(v)) for v in entry["centroid_voxel"])
        if all(0 <= i < n for i, n in zip(index, labels.shape, strict=True)):
            owner.setdefault(int(labels[index]), entry)
    out = []
    structure = ndimage.generate_binary_structure(3, 1)
    for k in range(1, count + 1):
        member = labels == k
        grown = ndimage.binary_dilation(member, structure, iterations=SHELL_VOXELS)
        shell = grown & ~member & (tissue > 0) & ~lesion_mask
        entry = owner.get(k)
        out.append({
            "volume_mm3": float(member.sum() * voxel_mm3),
            "shell_non_wm": (float(np.isin(tissue[shell], NON_WM_LABELS).mean())
                             if shell.any() else float("nan")),
            "t1_factor": None if entry is None else float(entry["t1_factor"]),
            "t2_factor": None if entry is None else float(entry["t2_factor"]),
            "faint": None if entry is None else bool(is_faint(entry)),
        })
    return out


def rate(rows: list[dict]) -> dict:
    hits = sum(r["detected"] for r in rows)
    return {"n": len(rows), "detected": hits,
            "tpr": hits / len(rows) if rows else float("nan")}


def summarise(rows: list[dict]) -> dict:
    """Detection rates of lesions >= 0.5 mL by faintness and by touching non-WM tissue."""
    known = [r for r in rows if r["faint"] is not None]
    groups = {}
    for faint in (False, True):
        for touching in (False, True):
            name = (f"{'faint' if faint else 'clear'}, "
                    f"{'next to GM/CSF' if touching else 'inside WM'}")
            groups[name] = rate([r for r in known if r["faint"] == faint
                                 and (r["shell_non_wm"] >= TOUCHING_NON_WM) == touching])
    missed = [r for r in rows if not r["detected"]]
    return {"all": rate(rows), "groups": groups,
            "missed": {"n": len(missed),
                       "faint": sum(bool(r["faint"]) for r in missed),
                       "next_to_gm_csf": sum(r["shell_non_wm"] >= TOUCHING_NON_WM
                                             for r in missed),
                       "either": sum(bool(r["faint"]) or r["shell_non_wm"] >= TOUCHING_NON_WM
                                     for r in missed),
                       "unmatched": sum(r["faint"] is None for r in missed)}}


def analyse_split(cases: list[dict], subjects: dict, root: Path) -> list[dict]:
    rows = []
    for case in cases:
        if case.get("healthy"):
            continue
        subject = subjects.get(case["id"])
        if subject is None:
            raise InputError(f"case '{case['id']}' of the result is not in the manifest")
        truth = load_volume(root / subject["lesion_mask"], allow_empty=True)
        tissue = load_volume(root / subject["tissue"]).data.astype(int)
        records = lesion_context(truth.data > 0, tissue, subject.get("lesions", []),
                                 truth.spacing)
        sizes = [r["volume_mm3"] for r in records]
        expected = case["truth_sizes_mm3"]
        if len(sizes) != len(expected) or not np.allclose(sizes, expected):
            raise InputError(f"case '{case['id']}': the truth components differ from the "
                             "result's (another manifest?)")
        for record, detected in zip(records, case["truth_detected"], strict=True):
            if record["volume_mm3"] >= MIN_LESION_MM3:
                rows.append({"id": case["id"], "detected": bool(detected), **record})
    return rows


def print_table(split: str, summary: dict) -> None:
    total = summary["all"]
    print(f"{split}: {total['detected']} of {total['n']} lesions >= 0.5 mL detected")
    for name, group in summary["groups"].items():
        print(f"  {name:28s} {group['detected']:3d} / {group['n']:3d}"
              f"  TPR {group['tpr']:.3f}")
    m = summary["missed"]
    print(f"  missed {m['n']}: faint {m['faint']}, next to GM/CSF {m['next_to_gm_csf']}, "
          f"either {m['either']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", type=Path, required=True,
                        help="benchmarks/spatial_3d.py output JSON")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.out and args.out.exists() and not args.overwrite:
            raise InputError(f"'{args.out}' exists; pass --overwrite to replace it")
        if not args.result.is_file():
            raise InputError(f"'{args.result}' does not exist")
        try:
            splits = json.loads(args.result.read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"'{args.result}' / '{args.manifest}': not a spatial_3d.py result "
                             f"and a benchmark manifest ({e})") from None
        manifest = load_manifest(args.manifest)  # the file or its folder, checked
        subjects = {s["id"]: s for s in manifest["subjects"]}
        out = {"result": str(args.result), "manifest": str(args.manifest),
               "shell_voxels": SHELL_VOXELS, "touching_non_wm": TOUCHING_NON_WM, "splits": {}}
        for split, entry in splits.items():
            rows = analyse_split(entry["cases"], subjects, Path(manifest["root"]))
            out["splits"][split] = {"summary": summarise(rows), "lesions": rows}
            print_table(split, out["splits"][split]["summary"])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".partial")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
