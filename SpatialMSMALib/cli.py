"""The ``spatial-msma`` command line: one entry point, one subcommand per job.

Each subcommand parses arguments, calls one library function and prints its result; errors
meant for users (:class:`InputError`) are printed without a traceback and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError
from .registry import bundled_operating_points


def _add_make_benchmark(sub) -> None:
    p = sub.add_parser("make-benchmark", help="build the reproducible benchmark cohort")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--anatomy-dir",
        type=Path,
        default=None,
        help="folder with extra real anatomies (e.g. ../shared/data/anatomy)",
    )
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-val", type=int, default=10)
    p.add_argument("--n-test-healthy", type=int, default=10)
    p.add_argument("--n-test-lesioned", type=int, default=20)
    p.add_argument("--n-loao-healthy", type=int, default=5)
    p.add_argument("--n-loao-lesioned", type=int, default=10)
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size of the scans (mm)")
    p.add_argument("--deformation-mm", type=float, default=2.5,
                   help="SD of the random deformation's velocity at the control points (mm); "
                        "5 with --control-spacing-mm 20 makes the 2x-deformation training "
                        "cohort of the bundled model")
    p.add_argument("--control-spacing-mm", type=float, default=24.0,
                   help="spacing of the deformation's control points (mm)")
    p.add_argument("--lesion-kind", default="ms", choices=["ms", "hyperintense_t1", "mass"])
    p.add_argument("--max-load-ml", type=float, default=20.0)
    p.add_argument(
        "--contrast-boost",
        type=float,
        default=1.0,
        help="scale lesion contrast (the reference study used 1.5)",
    )
    p.add_argument("--morph-fraction", type=float, default=0.0,
                   help="fraction of the train/val subjects made from their anatomy morphed "
                        "part of the way towards another training anatomy (default 0)")
    p.add_argument("--montage", type=Path, default=None, help="also write a PNG montage here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cohort")
    p.set_defaults(func=_run_make_benchmark)


def _run_make_benchmark(args) -> int:
    from .cohort import CohortSizes, make_benchmark, save_montage
    from .lesions import LesionConfig
    from .synthesis import SubjectConfig

    sizes = CohortSizes(
        args.n_train,
        args.n_val,
        args.n_test_healthy,
        args.n_test_lesioned,
        args.n_loao_healthy,
        args.n_loao_lesioned,
    )
    if min(vars(sizes).values()) < 0:
        raise InputError("subject counts must be >= 0")
    if args.deformation_mm < 0 or args.control_spacing_mm <= 0:
        raise InputError("--deformation-mm must be >= 0 and --control-spacing-mm > 0")
    manifest = make_benchmark(
        args.out,
        anatomy_dir=args.anatomy_dir,
        sizes=sizes,
        seed=args.seed,
        subject_config=SubjectConfig(spacing_mm=args.spacing, deformation_mm=args.deformation_mm,
                                     control_spacing_mm=args.control_spacing_mm),
        lesion_config=LesionConfig(
            kind=args.lesion_kind, max_load_ml=args.max_load_ml, contrast_boost=args.contrast_boost
        ),
        morph_fraction=args.morph_fraction,
        overwrite=args.overwrite,
    )
    stats = json.loads(manifest.read_text())["lesion_statistics"]
    print(f"wrote {manifest}")
    print(json.dumps(stats, indent=1))
    if args.montage:
        print(f"wrote {save_montage(manifest, args.montage)}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score one predicted label volume against the truth")
    p.add_argument("--pred", required=True, type=Path, help="predicted labels (nonzero = lesion)")
    p.add_argument("--truth", required=True, type=Path, help="ground-truth lesion mask")
    p.add_argument("--scores", type=Path, help="raw anomaly heat map (for AUROC/AUPRC)")
    p.add_argument("--brain-mask", type=Path, help="mask for AUROC/AUPRC")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .io import load_volume
    from .metrics import evaluate_case

    truth = load_volume(args.truth, what="truth mask", allow_empty=True)
    pred = load_volume(args.pred, what="prediction", allow_empty=True)
    inputs = {"prediction": pred}
    paths = {"prediction": args.pred, "scores": args.scores, "brain mask": args.brain_mask}
    scores = mask = None
    if args.scores:
        inputs["scores"] = scores_volume = load_volume(args.scores, what="scores", allow_empty=True)
        scores = np.asarray(scores_volume.data, dtype=np.float32)
    if args.brain_mask:
        inputs["brain mask"] = mask_volume = load_volume(args.brain_mask, what="brain mask")
        mask = mask_volume.data > 0
    for name, volume in inputs.items():
        if volume.shape != truth.shape or not np.allclose(volume.affine, truth.affine, atol=1e-3):
            raise InputError(
                f"{name} '{paths[name]}' is not on "
                f"the grid of the truth mask '{args.truth}' (shape {volume.shape} "
                f"vs {truth.shape}); resample it first"
            )
    for name, volume, path in (("truth mask", truth, args.truth),
                               ("prediction", pred, args.pred)):
        data = np.asarray(volume.data)
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise InputError(f"{name} '{path}' holds non-integer values (a heat map or an "
                             "image?); give a label volume (nonzero = lesion); a heat map "
                             "goes to --scores")
    result = evaluate_case(pred.data > 0, truth.data > 0, truth.spacing, scores, mask)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key, value in result.items():
            if isinstance(value, list):
                continue
            print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    return 0


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="bring a T1 (+T2) scan into model space")
    p.add_argument("--t1", required=True, type=Path)
    p.add_argument("--t2", type=Path)
    p.add_argument("--mask", type=Path, help="brain mask (otherwise atlas-based extraction)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--spacing", type=float, default=2.0, help="model grid spacing (mm)")
    p.add_argument("--registration", default="affine", choices=["affine", "rigid", "none"])
    p.add_argument("--no-n4", action="store_true", help="skip N4 bias correction")
    p.add_argument(
        "--brain-extraction",
        default="atlas",
        choices=["atlas", "robex"],
        help="method when no --mask is given (robex needs pip install .[robex])",
    )
    p.add_argument("--demons-iterations", type=int, default=0,
                   help="also register deformably to the template (step 7; 0 = off); the "
                        "displacement fields go to displacement.npz")
    p.add_argument("--demons-smoothing-vox", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_preprocess)


def _run_preprocess(args) -> int:
    from tqdm import tqdm

    from .io import check_output_folder, load_volume, save_volume
    from .preprocessing import DemonsConfig, PreprocessConfig, preprocess_scan
    from .template import DEFAULT_SHAPE, DEFAULT_SPACING_MM

    shape = tuple(int(round(s * DEFAULT_SPACING_MM / args.spacing)) for s in DEFAULT_SHAPE)
    try:
        demons = (DemonsConfig(args.demons_iterations, args.demons_smoothing_vox)
                  if args.demons_iterations else None)
    except ValueError as e:
        raise InputError(f"--demons-iterations / --demons-smoothing-vox: {e}") from None
    config = PreprocessConfig(
        spacing_mm=args.spacing,
        shape=shape,
        n4=not args.no_n4,
        registration=args.registration,
        brain_extraction=args.brain_extraction,
        demons=demons,
    )
    check_output_folder(args.out)
    t1 = load_volume(args.t1, what="T1")
    t2 = load_volume(args.t2, what="T2") if args.t2 else None
    mask = load_volume(args.mask, what="brain mask") if args.mask else None
    outputs = [
        "t1_model.nii.gz",
        "brainmask_model.nii.gz",
        "brainmask_native.nii.gz",
        "mapping.json",
    ] + (["t2_model.nii.gz"] if t2 is not None else []) + (
        ["displacement.npz"] if demons else [])
    existing = [name for name in outputs if (args.out / name).exists()]
    if existing and not args.overwrite:
        raise InputError(f"'{args.out}' already holds {existing}; use --overwrite to replace")
    with tqdm(total=100, desc="preprocess", unit="%") as bar:

        def progress(message: str, fraction: float) -> None:
            bar.set_postfix_str(message)
            bar.update(int(fraction * 100) - bar.n)

        result = preprocess_scan(
            t1,
            t2,
            mask,
            config,
            progress=progress,
            names={"t1": args.t1, "t2": args.t2, "mask": args.mask},
        )
    grid = result.mapping.model_grid
    for index, name in enumerate(["t1_model.nii.gz", "t2_model.nii.gz"][: len(result.image)]):
        save_volume(args.out / name, result.image[index], grid.affine, overwrite=True)
    save_volume(args.out / "brainmask_model.nii.gz", result.brain_mask, grid.affine, overwrite=True)
    save_volume(
        args.out / "brainmask_native.nii.gz", result.native_brain_mask, t1.affine, overwrite=True
    )
    (args.out / "mapping.json").write_text(result.mapping.to_json())
    if result.mapping.deformable:  # SpaceMapping.from_dict(...).with_displacements(np.load)
        np.savez(args.out / "displacement.npz", **result.mapping.displacement_arrays())
    print(f"wrote {args.out} (registration NCC {result.mapping.registration_ncc:.3f})")
    return 0


def _add_typicality(sub) -> None:
    p = sub.add_parser(
        "typicality",
        help="scan-level MSMA: how typical is this scan of the healthy training cohort",
    )
    p.add_argument("scan", type=Path, help="T1-weighted scan (NIfTI or NRRD)")
    p.add_argument("--t2", type=Path, help="T2-weighted scan of the same session")
    p.add_argument("--mask", type=Path, help="brain mask on the T1 grid (default: atlas)")
    p.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    p.add_argument("--aux", default="gmm", choices=["gmm", "knn", "flow"],
                   help="auxiliary model whose percentile gives the verdict")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_typicality)


def _run_typicality(args) -> int:
    import json

    from tqdm import tqdm

    from .inference import assess_typicality, select_device
    from .io import load_volume
    from .model import AnomalyModel

    model = AnomalyModel.load(args.model)
    t1 = load_volume(args.scan, what="T1")
    t2 = load_volume(args.t2, what="T2") if args.t2 else None
    mask = load_volume(args.mask, what="brain mask") if args.mask else None
    with tqdm(total=100, desc="typicality", unit="%", disable=args.json) as bar:

        def progress(message: str, fraction: float) -> None:
            bar.set_postfix_str(message[:40])
            bar.update(max(0, int(fraction * 100) - bar.n))

        report = assess_typicality(
            model, t1, t2, mask, primary=args.aux, device=select_device(args.device),
            names={"t1": args.scan, "t2": args.t2, "mask": args.mask}, progress=progress,
        )
    if args.json:
        print(json.dumps({"scan": str(args.scan), **report.to_dict()}, indent=2))
        return 0
    print(f"{args.scan}: {report.verdict.upper()}")
    for name, entry in report.scores.items():
        mark = "*" if name == report.primary else " "
        print(f" {mark} {name:5s} score {entry['score']:10.3f}   percentile "
              f"{entry['percentile']:5.1f} of {entry['reference_size']} healthy   "
              f"{entry['verdict']}")
    print(f"   registration NCC {report.registration_ncc:.3f}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    return 0

def _progress_bar(desc: str, disable: bool = False):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", disable=disable)

    def progress(message: str, fraction: float) -> None:
        bar.set_postfix_str(message[:40])
        bar.update(max(0, int(fraction * 100) - bar.n))

    return bar, progress


def _add_detect(sub) -> None:
    p = sub.add_parser("detect", help="Spatial-MSMA: anomaly heat map and labels for a scan")
    p.add_argument("--t1", type=Path, help="T1-weighted scan (NIfTI or NRRD)")
    p.add_argument("--t2", type=Path, help="T2-weighted scan of the same session")
    p.add_argument("--mask", type=Path,
                   help="brain mask on the T1 grid (default: the template's, after "
                        "registration; the bundled model is then the one for scans without "
                        "a mask, where one is installed)")
    p.add_argument("--list", type=Path, dest="scan_list",
                   help="CSV with columns id,t1[,t2][,mask] for a cohort run (outputs in "
                        "OUT/<id>/; split across torchrun ranks)")
    p.add_argument("--model", type=Path,
                   help="model file (default: the bundled model for the inputs: T1 + T2 or "
                        "T1, with or without a brain mask)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    operating = p.add_mutually_exclusive_group()
    bundled = bundled_operating_points()
    operating.add_argument("--fpr", type=float,
                           help="voxel false-positive rate on healthy brains (default: the "
                                "model's" + (f"; bundled models: {bundled}" if bundled else "")
                                + ")")
    operating.add_argument("--threshold", type=float,
                           help="raw heat-map threshold, in the model's heat-map units (flow "
                                "NLL nats, or -log10 FPR with the normative contrast map)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=_run_detect)


def _detect_rows(args) -> list[dict]:
    import csv
    import os

    if args.scan_list is None:
        if args.t1 is None:
            raise InputError("give --t1 (and --t2), or --list CSV")
        return [{"id": None, "t1": args.t1, "t2": args.t2, "mask": args.mask}]
    given = [flag for flag, value in (("--t1", args.t1), ("--t2", args.t2),
                                      ("--mask", args.mask)) if value is not None]
    if given:
        raise InputError(f"give the scans either with --list or with {'/'.join(given)}, "
                         "not both")
    if not args.scan_list.exists():
        raise InputError(f"scan list '{args.scan_list}' does not exist")
    with open(args.scan_list, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "t1" not in rows[0] or "id" not in rows[0]:
        raise InputError(f"'{args.scan_list}': needs a header with at least 'id' and 't1'")
    base = args.scan_list.parent
    out, seen = [], {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"'{args.scan_list}' line {line}"
        scan_id = (row.get("id") or "").strip()
        # each id names a folder under --out: a plain name, and each once (a repeated id
        # would overwrite the earlier scan's outputs)
        if not scan_id or scan_id in (".", "..") or Path(scan_id).name != scan_id \
                or "\\" in scan_id:
            raise InputError(f"{where}: id '{scan_id}' must be a plain folder name (no "
                             "slashes, not empty, not '.' or '..')")
        if scan_id in seen:
            raise InputError(f"{where}: id '{scan_id}' repeats line {seen[scan_id]}; each "
                             "scan needs its own id (its outputs go to OUT/<id>/)")
        seen[scan_id] = line
        if not (row.get("t1") or "").strip():
            raise InputError(f"{where}: scan '{scan_id}' has no t1")
        out.append({key: (base / row[key].strip() if (row.get(key) or "").strip() else None)
                    for key in ("t1", "t2", "mask")} | {"id": scan_id})
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return out[rank::world]


def _run_detect(args) -> int:
    from .detection import check_outputs_free, detect, write_outputs
    from .inference import select_device
    from .io import load_volume
    from .model import resolve_model

    rows = _detect_rows(args)
    device = select_device(args.device)
    for row in rows:
        for key in ("t1", "t2", "mask"):
            if row[key] is not None and not Path(row[key]).exists():
                raise InputError(f"{key.upper() if key != 'mask' else 'brain mask'} file "
                                 f"'{row[key]}' does not exist")
        check_outputs_free(args.out / row["id"] if row["id"] else args.out, args.overwrite)
    for row in rows:
        model = resolve_model(args.model, has_t2=row["t2"] is not None, t1_name=row["t1"],
                              has_mask=row["mask"] is not None)
        names = {"t1": row["t1"], "t2": row["t2"], "mask": row["mask"]}
        out_dir = args.out / row["id"] if row["id"] else args.out
        t1 = load_volume(row["t1"], what="T1")
        t2 = load_volume(row["t2"], what="T2") if row["t2"] else None
        mask = load_volume(row["mask"], what="brain mask") if row["mask"] else None
        bar, progress = _progress_bar(f"detect {row['id'] or row['t1'].name}")
        with bar:
            detection = detect(model, t1, t2, mask, fpr=args.fpr, threshold=args.threshold,
                               device=device, names=names, progress=progress)
        paths = write_outputs(detection, out_dir, model, names, overwrite=args.overwrite)
        _print_detection(detection, paths)
    return 0


def _print_detection(detection, paths) -> None:
    typ = detection.typicality
    print(f"{len(detection.components)} components at voxel FPR {detection.fpr:.3g} "
          f"(threshold {detection.threshold:.3f} {detection.heat_units})"
          + (f"; scan-level MSMA: {typ['verdict']}" if typ else ""))
    for c in detection.components[:10]:
        print(f"  #{c.label}: {c.volume_ml:.2f} mL at RAS {c.centroid_ras_mm} mm, peak "
              f"{c.peak_score:.2f} (voxel FPR {c.peak_voxel_fpr:.2g})")
    if len(detection.components) > 10:
        print(f"  ... {len(detection.components) - 10} more in the report")
    for warning in detection.warnings:
        print(f"warning: {warning}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a sample scan with simulated lesions and run "
                                    "detection with the bundled model")
    p.add_argument("--out", type=Path, default=Path("spatial_msma_demo"), help="output folder")
    p.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    p.add_argument("--seed", type=int, default=7, help="seed of the sample subject")
    p.add_argument("--spacing", type=float, default=1.0, help="voxel size of the sample (mm)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo
    from .inference import select_device

    bar, progress = _progress_bar("demo")
    with bar:
        result = run_demo(args.out, model_path=args.model, seed=args.seed, spacing=args.spacing,
                          device=select_device(args.device), overwrite=args.overwrite,
                          progress=progress)
    _print_detection(result["detection"], result["paths"])
    m = result["metrics"]
    print(f"against the {m['n_truth']} simulated lesions ({result['lesion_volume_ml']:.1f} mL): "
          f"lesion TPR {m['tpr']:.2f}, PPV {m['ppv']:.2f}, Dice {m['dice']:.3f}, "
          f"voxel AUROC {m['auroc']:.3f}")
    print(f"inputs and outputs in {args.out}/ (timings: {result['detection'].timings})")
    return 0


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="browser viewer: the Detect-anomalies flow in any browser "
                                    "(trame-slicer; needs the 'viewer' extra)")
    p.add_argument("--t1", type=Path, help="T1 scan to open when the page loads")
    p.add_argument("--t2", type=Path, help="T2 scan to open when the page loads")
    p.add_argument("--mask", type=Path, help="brain mask to open when the page loads")
    p.add_argument("--data-dir", type=Path,
                   help="folder whose scans the page may open (read-only)")
    p.add_argument("--model", type=Path, help="model file (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any "
                        "other address needs --token)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free)")
    p.add_argument("--token", default=os.environ.get("SPATIAL_MSMA_VIEW_TOKEN"),
                   help="access token (>= 16 characters; default: $SPATIAL_MSMA_VIEW_TOKEN); "
                        "open the page as http://HOST:PORT/?secret=TOKEN")
    p.add_argument("--upload-limit-mb", type=float, default=512,
                   help="largest upload accepted, all files of one request together")
    p.add_argument("--work-dir", type=Path,
                   help="folder for uploads, detection runs and exports (default: a new "
                        "temporary folder)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda for detection")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=_run_view)


def _run_view(args) -> int:
    from .viewer.app import serve

    return serve(data_dir=args.data_dir, files={"t1": args.t1, "t2": args.t2, "mask": args.mask},
                 model_path=args.model, host=args.host, port=args.port, token=args.token,
                 device=args.device, work_dir=args.work_dir,
                 upload_limit_mb=args.upload_limit_mb, open_browser=args.open)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spatial-msma", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_benchmark(sub)
    _add_evaluate(sub)
    _add_preprocess(sub)
    _add_typicality(sub)
    _add_detect(sub)
    _add_demo(sub)
    _add_view(sub)
    from .gnsm.cli import add_gnsm

    add_gnsm(sub)
    from .segqc.cli import add_seg_qc

    add_seg_qc(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
