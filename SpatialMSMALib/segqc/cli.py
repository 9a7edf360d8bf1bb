"""``spatial-msma seg-qc``: how likely is a tissue segmentation to be wrong, and where."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError


def add_seg_qc(sub) -> None:
    p = sub.add_parser("seg-qc", help="GNSM quality control of tissue label maps "
                                      "(0 background, 1 CSF, 2 GM, 3 WM)")
    p.add_argument("--labels", type=Path, required=True, nargs="+",
                   help="label map(s) of the image (NIfTI or NRRD); several maps of one scan "
                        "(from different tools, say) share its preprocessing")
    p.add_argument("--image", type=Path, required=True,
                   help="the T1 the segmentation was made from (registration to model space)")
    p.add_argument("--mask", type=Path, help="brain mask on the image grid (helps "
                   "registration; default: the atlas brain mask)")
    p.add_argument("--model", type=Path, help="QC model file (default: the bundled model)")
    p.add_argument("--out", type=Path,
                   help="folder for qc_map.nii.gz (per-voxel map on the label grid) and "
                        "qc_report.json; with several label maps qc_map_1.nii.gz, "
                        "qc_map_2.nii.gz, ... in the order given, and the report a list")
    p.add_argument("--json", action="store_true", help="print the report as JSON (a list "
                   "with several label maps)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=run_seg_qc)


def run_seg_qc(args: argparse.Namespace) -> int:
    from ..inference import select_device
    from ..io import check_output_folder, load_volume, save_volume
    from .model import SegQCModel
    from .pipeline import bundled_seg_qc_model, check_label_values, qc_image, qc_labels

    label_paths = list(args.labels)
    for path, what in ([(p, "label map") for p in label_paths]
                       + [(args.image, "image"), (args.mask, "brain mask")]):
        if path is not None and not path.exists():
            raise InputError(f"{what} '{path}' does not exist")
    several = len(label_paths) > 1
    outputs = {}
    if args.out is not None:
        check_output_folder(args.out)
        outputs = {"report": args.out / "qc_report.json"} | {
            k: args.out / (f"qc_map_{k + 1}.nii.gz" if several else "qc_map.nii.gz")
            for k in range(len(label_paths))}
        for path in outputs.values():
            if path.exists() and not args.overwrite:
                raise FileExistsError(f"'{path}' already exists; pass --overwrite to replace it")
    device = select_device(args.device)
    model = SegQCModel.load(args.model) if args.model else bundled_seg_qc_model()
    # every label map is read and checked before the preprocessing's minutes of work
    label_volumes = [load_volume(p, what="label map") for p in label_paths]
    for path, volume in zip(label_paths, label_volumes, strict=True):
        check_label_values(volume, model.config.classes, str(path))
    image = load_volume(args.image, what="image")
    mask = load_volume(args.mask, what="brain mask") if args.mask else None
    names = {"image": str(args.image), "mask": str(args.mask) if args.mask else None}
    prepared = qc_image(model, image, mask, names=names)
    # every map is scored before anything is written: a map that fails leaves no outputs
    results = [qc_labels(model, volume, prepared, names=names | {"labels": str(path)},
                         device=device)
               for path, volume in zip(label_paths, label_volumes, strict=True)]
    reports = []
    for k, (path, qc) in enumerate(zip(label_paths, results, strict=True)):
        report = {"labels": str(path), "image": str(args.image)} | qc.report()
        if outputs:
            save_volume(outputs[k], qc.voxel_map_native, qc.labels_affine,
                        overwrite=args.overwrite)
            report["qc_map"] = outputs[k].name
        reports.append(report)
    if outputs:
        tmp = outputs["report"].with_name(".qc_report.json.partial")
        tmp.write_text(json.dumps(reports if several else reports[0], indent=1) + "\n")
        tmp.replace(outputs["report"])
    if args.json:
        print(json.dumps(reports if several else reports[0], indent=1))
        return 0
    for path, qc in zip(label_paths, results, strict=True):
        verdict = "CHECK BY HAND" if qc.flagged else "looks like the good segmentations"
        where = f"{path.name}: " if several else ""
        print(f"{where}QC score {qc.result.score:.4f} (higher = worse); percentile among good "
              f"segmentations {qc.result.percentile:.0f}; z {qc.z_score:+.1f}: {verdict}")
    if outputs:
        print("wrote " + ", ".join(str(p) for p in outputs.values()))
    return 0
