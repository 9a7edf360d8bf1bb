"""What detection does with a FLAIR given as the T2: demo-like subjects with a T2 and with a
FLAIR-like second channel.

    python benchmarks/flair_as_t2.py [--model MODEL] [--lesioned-seeds 7] [--healthy-seeds 8] \\
        [--out results/flair_as_t2.json] [--overwrite] [--device cpu]

MS protocols centre on FLAIR, so a user may well load one into the T2 slot. Each 1 mm subject
(MNI 2009a, ``synthesis.synthesize_subject``; seed 7 is the demo subject) is made twice with
the same random draws: once with the synthetic T2 (tissue levels CSF 1.0, GM 0.55, WM 0.35 of
the T2 scale) and once FLAIR-like, CSF dark (0.15, 0.55, 0.35; lesions stay bright). Both go
through the product's ``detection.detect`` with the brain mask at the model's default
operating point, and are scored against the simulated lesions (``metrics.evaluate_case``).
Each records the warnings and the scan-level verdict. No threshold is set from the truth.
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

#: second-channel tissue levels (CSF, GM, WM) of ``SubjectConfig.t2_tissue_levels``
CONTRASTS = {"T2": (1.0, 0.55, 0.35), "FLAIR-like": (0.15, 0.55, 0.35)}


def main(argv: list[str] | None = None) -> None:
    parser = demo_subjects_parser(__doc__.splitlines()[0], healthy_seeds=[8])
    args = parser.parse_args(argv)
    try:
        from SpatialMSMALib.anatomy import load_mni152_2009a
        from SpatialMSMALib.detection import detect
        from SpatialMSMALib.inference import select_device
        from SpatialMSMALib.metrics import evaluate_case
        from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject

        refuse_existing_output(args)
        device = select_device(args.device)
        model = t1_t2_model(args.model)
        anatomy = load_mni152_2009a()
        result = {"model": str(args.model or "bundled default"), "contrasts": CONTRASTS,
                  "subjects": {}}
        for key, seed, lesions in demo_subject_jobs(args):
            result["subjects"][key] = {}
            for contrast, levels in CONTRASTS.items():
                start = time.perf_counter()
                subject = synthesize_subject(
                    anatomy, seed, SubjectConfig(spacing_mm=1.0, t2_tissue_levels=levels),
                    lesions)
                detection = detect(model, *subject_volumes(subject), device=device)
                record = evaluate_case(detection.labels > 0, subject.lesion_mask > 0,
                                       subject.grid.spacing, detection.heat,
                                       subject.brain_mask > 0)
                record.update(warnings=list(detection.warnings),
                              verdict=(detection.typicality or {}).get("verdict"),
                              seconds=round(time.perf_counter() - start, 1))
                result["subjects"][key][contrast] = record
                print(f"{key} {contrast:10s} flagged {record['flagged_ml']:8.2f} mL, verdict "
                      f"{record['verdict']}, warnings: {record['warnings']}", flush=True)
                save_result(args, result)
        save_result(args, result, final=True)
    except InputError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
