"""Scan-level MSMA typicality of the same subjects made at 2 mm and at 1 mm.

    python benchmarks/typicality_resolution.py [--model MODEL] [--lesioned-seeds 7] \\
        [--healthy-seeds 8 9 10 11] [--spacings 2 1] [--out results/typicality_resolution.json] \\
        [--overwrite] [--device cpu]

The bundled models' typicality references are whole-brain score norms of 2 mm training
scans, while users bring scans of about 1 mm. Each subject (MNI 2009a,
``synthesis.synthesize_subject``; seed 7 is the demo subject) is made at every spacing with
the same random draws and goes, with its brain mask, through the product's typicality path
(``inference.assess_typicality``, as ``spatial-msma typicality``): each auxiliary model's
percentile among the healthy reference scans, and the verdict (primary model GMM; >= 95
borderline, >= 99 atypical). The heat map is not computed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> None:
    parser = demo_subjects_parser(__doc__.splitlines()[0], healthy_seeds=[8, 9, 10, 11])
    parser.add_argument("--spacings", type=float, nargs="+", default=[2.0, 1.0],
                        help="voxel sizes (mm) to make each subject at")
    args = parser.parse_args(argv)
    try:
        from SpatialMSMALib.anatomy import load_mni152_2009a
        from SpatialMSMALib.inference import assess_typicality, select_device
        from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject

        refuse_existing_output(args)
        if any(not 0.5 <= s <= 4 for s in args.spacings):
            raise InputError(f"--spacings must lie in 0.5-4 mm, not {args.spacings}")
        device = select_device(args.device)
        model = t1_t2_model(args.model)
        if model.typicality is None:
            raise InputError("the model file has no typicality model")
        anatomy = load_mni152_2009a()
        result = {"model": str(args.model or "bundled default"), "subjects": {}}
        for key, seed, lesions in demo_subject_jobs(args):
            result["subjects"][key] = {}
            for spacing in args.spacings:
                start = time.perf_counter()
                subject = synthesize_subject(anatomy, seed, SubjectConfig(spacing_mm=spacing),
                                             lesions)
                report = assess_typicality(model, *subject_volumes(subject),
                                           device=device).to_dict()
                record = {"verdict": report["verdict"],
                          "percentiles": {name: score["percentile"]
                                          for name, score in report["scores"].items()},
                          "seconds": round(time.perf_counter() - start, 1)}
                result["subjects"][key][f"{spacing:g} mm"] = record
                print(f"{key} {spacing:g} mm: {record['verdict']}, percentiles "
                      + ", ".join(f"{n} {p:.1f}" for n, p in record["percentiles"].items()),
                      flush=True)
                save_result(args, result)
        save_result(args, result, final=True)
    except InputError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
