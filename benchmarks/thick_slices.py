"""What thick slices do to detection: 1 mm subjects against copies with 3 and 5 mm slices.

    python benchmarks/thick_slices.py [--model MODEL] [--lesioned-seeds 7] \\
        [--healthy-seeds 8 9] [--thickness 3 5] [--out results/thick_slices.json] \\
        [--overwrite] [--device cpu]

Clinical T2 (and many T1) scans are 2D acquisitions with slices of 3-5 mm, while every scan
the bundled models were trained and calibrated on has 2 mm voxels or finer. Here 1 mm
subjects made like the demo's (MNI 2009a, ``synthesis.synthesize_subject``; lesioned seed 7
is the demo subject itself, the others healthy) go through the product's
``detection.detect`` as they are and with the T2, the T1 or both made thick: every ``k``
consecutive axial slices (the third voxel axis) averaged into one, an idealised slice
profile, with the voxel -> RAS affine that puts the thick slice at their centre. The brain
mask follows the T1's grid (a thick voxel is inside when half of its slices are). Labels and
heat maps are mapped back onto the 1 mm grid and scored there against the simulated lesions
inside the true brain (``metrics.evaluate_case``), at the model's default operating point.
Each variant records the warnings ``detect`` gave (``inference.coarse_voxel_warnings``). No
threshold is set from the truth.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort_args import (  # noqa: E402
    demo_subject_jobs,
    demo_subjects_parser,
    exit_with,
    refuse_existing_output,
    save_result,
    subject_volumes,
    t1_t2_model,
)

from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import Volume  # noqa: E402
from SpatialMSMALib.metrics import evaluate_case, split_summary  # noqa: E402


def thick_slices(volume: Volume, k: int, *, binary: bool = False) -> Volume:
    """``volume`` with every ``k`` consecutive slices along its third voxel axis averaged
    into one (trailing slices that do not fill a group are dropped). The new affine scales
    that axis by ``k`` and moves the origin to the centre of the first group, so each thick
    voxel sits where its ``k`` thin voxels were. ``binary``: a mask, kept where at least half
    of the group is inside. ``k == 1`` returns the volume unchanged."""
    if k == 1:
        return volume
    data = np.asarray(volume.data, np.float32)
    groups = data.shape[2] // k
    if groups < 1:
        raise InputError(f"cannot make {k}-slice groups of a volume with {data.shape[2]} slices")
    mean = data[:, :, :groups * k].reshape(*data.shape[:2], groups, k).mean(-1)
    affine = np.asarray(volume.affine, float).copy()
    affine[:3, 3] += affine[:3, 2] * (k - 1) / 2
    affine[:3, 2] *= k
    return Volume((mean >= 0.5) if binary else mean, affine)


def onto_grid(array: np.ndarray, affine: np.ndarray, reference: Volume, order: int) -> np.ndarray:
    """``array`` (on ``affine``'s grid) resampled onto ``reference``'s grid (identity in RAS)."""
    from SpatialMSMALib.geometry import Grid, resample

    if array.shape == reference.data.shape and np.allclose(affine, reference.affine):
        return array
    return resample(array, affine, Grid(reference.data.shape, reference.affine), order=order)


def variants(thicknesses) -> dict[str, tuple[int, int]]:
    """Variant name -> (T1 slice factor, T2 slice factor) for 1 mm subjects: as they are,
    then for each thickness the T2, the T1 and both made thick."""
    out = {"1 mm": (1, 1)}
    for k in thicknesses:
        out.update({f"T2 {k} mm": (1, k), f"T1 {k} mm": (k, 1), f"T1 + T2 {k} mm": (k, k)})
    return out


def subject_case(model, subject, plan: dict, device) -> dict:
    """Every variant of one 1 mm subject through ``detect``, scored on the 1 mm grid."""
    from SpatialMSMALib.detection import detect

    t1, t2, mask = subject_volumes(subject)
    truth = subject.lesion_mask > 0
    spacing = np.asarray(subject.grid.spacing, float)
    out = {}
    for name, (k1, k2) in plan.items():
        start = time.perf_counter()
        detection = detect(model, thick_slices(t1, k1), thick_slices(t2, k2),
                           thick_slices(mask, k1, binary=True), device=device)
        labels = onto_grid(detection.labels > 0, detection.affine, t1, order=0)
        heat = onto_grid(detection.heat, detection.affine, t1, order=1)
        record = evaluate_case(labels, truth, spacing, heat, mask.data)
        record.update(warnings=list(detection.warnings),
                      coarse_voxel_warnings=sum("coarser than the model" in w
                                                for w in detection.warnings),
                      verdict=(detection.typicality or {}).get("verdict"),
                      seconds=round(time.perf_counter() - start, 1))
        out[name] = record
        print(f"  {name:16s} flagged {record['flagged_ml']:6.2f} mL, "
              f"false components {record.get('fp_components', 0)}, TPR {record['tpr']:.2f}, "
              f"PPV {record['ppv']:.2f}, warnings {record['coarse_voxel_warnings']}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = demo_subjects_parser(__doc__.splitlines()[0], healthy_seeds=[8, 9])
    parser.add_argument("--thickness", type=int, nargs="+", default=[3, 5],
                        help="slice thicknesses in mm (whole multiples of the 1 mm subjects)")
    args = parser.parse_args(argv)
    try:
        from SpatialMSMALib.anatomy import load_mni152_2009a
        from SpatialMSMALib.inference import select_device
        from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject

        refuse_existing_output(args)
        if any(k < 2 for k in args.thickness):
            raise InputError(f"--thickness must be 2 mm or more, not {args.thickness}")
        device = select_device(args.device)
        model = t1_t2_model(args.model)
        plan = variants(args.thickness)
        anatomy = load_mni152_2009a()
        result = {"model": str(args.model or "bundled default"), "variants": plan,
                  "subjects": {}}
        for key, seed, lesions in demo_subject_jobs(args):
            print(key, flush=True)
            subject = synthesize_subject(anatomy, seed, SubjectConfig(spacing_mm=1.0), lesions)
            result["subjects"][key] = subject_case(model, subject, plan, device)
            save_result(args, result)
        result["summary"] = {
            name: split_summary([case[name] for case in result["subjects"].values()])
            for name in plan}
        save_result(args, result, final=True)
        for name, s in result["summary"].items():
            healthy = s.get("healthy", {}).get("median_flagged_ml")
            lesioned = s.get("lesioned", {})
            print(f"{name:16s} healthy median {healthy} mL; lesioned pooled TPR "
                  f"{lesioned.get('pooled_tpr')} PPV {lesioned.get('pooled_ppv')}")
    except InputError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
