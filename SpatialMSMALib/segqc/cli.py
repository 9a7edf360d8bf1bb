"""``spatial-msma seg-qc``: how likely is a tissue segmentation to be wrong, and where."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError


def add_seg_qc(sub) -> None:
    p = sub.add_parser("seg-qc", help="GNSM quality control of a tissue label map "
                                      "(0 background, 1 CSF, 2 GM, 3 WM)")
    p.add_argument("--labels", type=Path, required=True, help="label map (NIfTI or NRRD)")
    p.add_argument("--image", type=Path, required=True,
                   help="the T1 the segmentation was made from (registration to model space)")
    p.add_argument("--mask", type=Path, help="brain mask on the image grid (helps "
                   "registration; default: the atlas brain mask)")
    p.add_argument("--model", type=Path, help="QC model file (default: the bundled model)")
    p.add_argument("--out", type=Path,
                   help="folder for qc_map.nii.gz (per-voxel map on the label grid) and "
                        "qc_report.json")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_seg_qc)


def run_seg_qc(args: argparse.Namespace) -> int:
    from ..inference import select_device
    from ..io import load_volume, save_volume
    from .model import SegQCModel
    from .pipeline import bundled_seg_qc_model, qc_native

    for path, what in ((args.labels, "label map"), (args.image, "image"),
                       (args.mask, "brain mask")):
        if path is not None and not path.exists():
            raise InputError(f"{what} '{path}' does not exist")
    outputs = {}
    if args.out is not None:
        outputs = {"map": args.out / "qc_map.nii.gz", "report": args.out / "qc_report.json"}
        for path in outputs.values():
            if path.exists() and not args.overwrite:
                raise FileExistsError(f"'{path}' already exists; pass --overwrite to replace it")
    model = SegQCModel.load(args.model) if args.model else bundled_seg_qc_model()
    labels = load_volume(args.labels, what="label map")
    image = load_volume(args.image, what="image")
    mask = load_volume(args.mask, what="brain mask") if args.mask else None
    names = {"labels": str(args.labels), "image": str(args.image),
             "mask": str(args.mask) if args.mask else None}
    qc = qc_native(model, labels, image, mask, names=names, device=select_device(args.device))
    report = {"labels": str(args.labels), "image": str(args.image)} | qc.report()
    if outputs:
        save_volume(outputs["map"], qc.voxel_map_native, qc.labels_affine,
                    overwrite=args.overwrite)
        tmp = outputs["report"].with_name(".qc_report.json.partial")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(outputs["report"])
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    verdict = "CHECK BY HAND" if qc.flagged else "looks like the good segmentations"
    print(f"QC score {qc.result.score:.4f} (higher = worse); percentile among good "
          f"segmentations {qc.result.percentile:.0f}; z {qc.z_score:+.1f}: {verdict}")
    if outputs:
        print("wrote " + ", ".join(str(p) for p in outputs.values()))
    return 0
