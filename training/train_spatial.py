"""Train Spatial-MSMA end to end and write the model file that `spatial-msma detect` loads.

    python training/train_spatial.py --manifest benchmark --score-checkpoint runs/score/best.pt \\
        --out runs/spatial_msma.pt [--work runs/spatial] [--steps 3000 ...]
    python training/train_spatial.py --data-dir healthy_scans/ --score-steps 2500 --out model.pt
    torchrun --nproc_per_node=N training/train_spatial.py ...

Healthy scans only: the ``train`` / ``val`` splits of a benchmark manifest, or a folder of
``*_t1/_t2/_brainmask`` NIfTI files (10% -> validation). Steps:

1. score model: ``--score-checkpoint`` (a score checkpoint, or a model file such as the
   bundled one, whose score network is reused), or trained first with training/train_score.py
   (``--score-steps``) into ``WORK/score``;
2. score-norm features of every scan, cached under ``WORK/cache/features_<digest>/`` (the
   local maps as float16; a rerun reuses them; under torchrun each rank computes a share);
3. MSMA typicality model on the whole-brain norms (train + val, cross-fitted references);
4. the conditional flow on random brain locations of the training scans, validated by the
   NLL of the validation scans; checkpoints ``WORK/flow/{last,best}.pt``, ``--resume``
   continues a killed run;
5. with ``--normative-contrast true``: the normative blob-contrast model
   (``SpatialMSMALib/normative.py``) on the training scans, and each map's own calibration on
   the validation scans; the heat map is then the fused evidence of both maps;
6. calibration on the validation scans: healthy heat-map quantiles (voxel false-positive
   rates), default 1% rate, smoothing and minimum component size;
7. one model file (atomic, safe to load, config + version + checksum inside).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from SpatialMSMALib.dataset import (  # noqa: E402
    check_refused,
    healthy_ids_digest,
    model_space,
    refusable_fraction,
)
from SpatialMSMALib.detection import component_heat_maps  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.inference import cached_features  # noqa: E402
from SpatialMSMALib.io import check_output_file  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402
from SpatialMSMALib.normative import (  # noqa: E402
    NormativeContrast,
    NormativeContrastConfig,
    fused_heat,
)
from SpatialMSMALib.preprocessing import BRAIN_MASK_SOURCES, DemonsConfig  # noqa: E402
from SpatialMSMALib.scan_standardization import ScanStandardization, parse_rules  # noqa: E402
from SpatialMSMALib.score.features import FEATURE_VERSION  # noqa: E402
from SpatialMSMALib.spatial import (  # noqa: E402
    Calibration,
    FlowEnsemble,
    SpatialFlowConfig,
    intensity_reference_mask,
    parse_levels,
)
from SpatialMSMALib.spatial_training import (  # noqa: E402
    LocationSet,
    SpatialTrainConfig,
    SpatialTrainer,
    load_best_flow,
)
from SpatialMSMALib.training_utils import parse_boolean, training_device  # noqa: E402
from SpatialMSMALib.typicality import MODEL_NAMES, TypicalityModel  # noqa: E402

TRAIN_FIELDS = [f for f in dataclasses.fields(SpatialTrainConfig) if f.name != "flow"]
FLOW_FIELDS = [f for f in dataclasses.fields(SpatialFlowConfig)
               if f.name not in ("num_features", "in_channels", "grid_spacing_mm")]


def _add_fields(parser, fields, prefix: str = "") -> None:
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = parse_boolean if isinstance(default, bool) else type(default)
        parser.add_argument("--" + prefix + f.name.replace("_", "-"), type=kind,
                            default=default, dest=prefix.replace("-", "_") + f.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, nargs="+",
                        help="benchmark manifest(s) (file or folder); several are pooled")
    source.add_argument("--data-dir", type=Path, help="folder of healthy *_t1/_t2 NIfTI")
    parser.add_argument("--out", type=Path, required=True, help="model file to write")
    parser.add_argument("--work", type=Path, help="caches and checkpoints (default OUT.work/)")
    parser.add_argument("--score-checkpoint", type=Path,
                        help="train_score.py checkpoint, or a model file whose score network "
                             "is reused (e.g. Resources/Models/spatial_msma.pt: a new flow "
                             "on your healthy scans); default: train one first")
    parser.add_argument("--score-steps", type=int, default=2500,
                        help="steps when the score model is trained first")
    parser.add_argument("--t1-only", action="store_true",
                        help="when training the score model first: T1 channel only")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--flow-members", type=int, default=1,
                        help="train this many flows (seeds SEED, SEED+1, ...; WORK/flow, "
                             "WORK/flow_1, ...); the heat map is their mean NLL")
    parser.add_argument("--resume", action="store_true",
                        help="continue WORK/flow/last.pt (and each member's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--aux-models", nargs="+", default=list(MODEL_NAMES),
                        choices=MODEL_NAMES, help="MSMA auxiliary models")
    parser.add_argument("--fpr", type=float, default=0.01, help="default voxel FPR")
    parser.add_argument("--smoothing-mm", type=float, default=2.0)
    parser.add_argument("--rim-mm", type=float, default=4.0,
                        help="outer brain rim left unscored (mm)")
    parser.add_argument("--min-component-ml", default="auto",
                        help="minimum component size (mL), or 'auto' (from healthy "
                             "validation scans, see --healthy-budget-ml)")
    parser.add_argument("--max-peak-fpr", type=peak_rate, default=DEFAULT_MAX_PEAK_FPR,
                        help="report a component only if its peak reaches the threshold of "
                             "this stricter voxel FPR, e.g. 0.001 (hysteresis; default and "
                             "'none': off)")
    add_standardization_option(parser)
    parser.add_argument("--grow-rate-factor", type=grow_factor, default=DEFAULT_GROW_RATE_FACTOR,
                        help="grow each reported component into the voxels above the "
                             "threshold of this multiple of the operating rate (hysteresis; "
                             "'none': off)")
    parser.add_argument("--healthy-budget-ml", type=float, default=1.0,
                        help="'auto' picks the smallest minimum size whose median flagged "
                             "volume on the healthy validation scans is within this")
    parser.add_argument("--max-train-scans", type=int, help="use only the first N train scans")
    parser.add_argument("--max-val-scans", type=int, help="use only the first N val scans")
    parser.add_argument("--demons-iterations", type=int, default=0,
                        help="deformable registration of every scan to the template before "
                             "features and flow (preprocessing step 7; the model file records "
                             "it, and detection repeats it): demons iterations, 0 = affine "
                             "only. The bundled T1 + T2 model uses 50")
    parser.add_argument("--max-refused-fraction", type=refusable_fraction, default=0.1,
                        help="stop when more than this fraction of the cohort's scans is refused "
                             "by registration quality (default 0.1); the ones left out are "
                             "listed and recorded in the model file either way")
    parser.add_argument("--brain-masks", choices=BRAIN_MASK_SOURCES, default="given",
                        help="given: preprocess each scan with its brain mask (a scan without "
                             "one takes the atlas mask); atlas: set every mask aside, so the "
                             "model sees scans as detect sees them without a mask (the "
                             "bundled model for scans without a mask)")
    parser.add_argument("--demons-smoothing-vox", type=float, default=2.0,
                        help="SD (model-grid voxels) of the demons field smoothing")
    parser.add_argument("--normative-contrast", type=parse_boolean, default=False,
                        metavar="true|false",
                        help="also fit the normative blob-contrast model on the training "
                             "scans and fuse its evidence with the flow's (the bundled T1 + T2 "
                             "model's choice; see docs/spatial_msma.md)")
    add_normative_options(parser)
    parser.add_argument("--recalibrate", action="store_true",
                        help="skip flow training: recalibrate WORK/flow/best.pt with new "
                             "post-processing settings")
    _add_fields(parser, TRAIN_FIELDS)
    _add_fields(parser, FLOW_FIELDS, prefix="flow-")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    work = args.work or args.out.with_name(args.out.name + ".work")
    try:
        device = training_device(args.device)
        if args.flow_members < 1:
            raise InputError(f"--flow-members {args.flow_members}: needs at least one flow")
        if not (args.flow_score_features or args.flow_intensity_features):
            raise InputError("--flow-score-features false needs --flow-intensity-features "
                             "true: the flow must model something")
        try:  # the syntax now; the range once the score model's L is known
            parse_levels(args.flow_score_levels, 10**6)
        except ValueError as e:
            raise InputError(f"--flow-score-levels: {e}") from None
        check_output_file(args.out, "--out")
        if args.out.exists() and not args.overwrite:
            raise InputError(f"'{args.out}' exists; pass --overwrite to replace it")
        demons_config(args)  # a bad setting fails before any work
        normative_config(args)
        scan_standardization_rules(args.scan_standardization,
                                   getattr(args, "normative_contrast", False))
        score_checkpoint = args.score_checkpoint
        if score_checkpoint is None:
            score_checkpoint = train_score_first(args, work / "score")
        if not Path(score_checkpoint).exists():
            raise InputError(f"score checkpoint '{score_checkpoint}' does not exist")
        return run(args, Path(score_checkpoint), work, device, rank, world_size)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


#: ``--normative-blob-mm`` default: the normative contrast model's blob sizes (inner Gaussian
#: SDs, mm), ``NormativeContrastConfig.sigmas_vox`` at the 2 mm model grid
DEFAULT_NORMATIVE_BLOB_MM = "2,4"


def add_normative_options(parser) -> None:
    """The normative contrast model's options (train_spatial.py and add_normative.py)."""
    parser.add_argument("--normative-blob-mm", default=DEFAULT_NORMATIVE_BLOB_MM,
                        help="blob sizes of the normative contrast model: inner Gaussian SDs "
                             "in mm, comma-separated (default %(default)s)")


def normative_config(args, spacing_mm: float | None = None) -> NormativeContrastConfig:
    """``NormativeContrastConfig`` of ``--normative-blob-mm`` on a ``spacing_mm`` model grid
    (None: only check the option); InputError naming the option when it is invalid."""
    try:
        sizes_mm = [float(part) for part in str(args.normative_blob_mm).split(",")]
        if not all(np.isfinite(sizes_mm)) or min(sizes_mm) <= 0:
            raise ValueError("sizes must be positive")
        return NormativeContrastConfig(
            sigmas_vox=tuple(mm / (spacing_mm or 1.0) for mm in sizes_mm))
    except ValueError as e:
        raise InputError(f"--normative-blob-mm '{args.normative_blob_mm}': expected "
                         f"positive sizes in mm such as 2,4 ({e})") from None


def flow_dir(work: Path, member: int) -> Path:
    """Checkpoint folder of flow ``member`` (0: ``WORK/flow``, as for a single flow)."""
    return work / ("flow" if member == 0 else f"flow_{member}")


def demons_config(args) -> DemonsConfig | None:
    """The deformable preprocessing step asked for (None: affine only); InputError naming
    the options when the setting is invalid."""
    if args.demons_iterations == 0:
        return None
    try:
        return DemonsConfig(args.demons_iterations, args.demons_smoothing_vox)
    except ValueError as e:
        raise InputError(f"--demons-iterations / --demons-smoothing-vox: {e}") from None


def train_score_first(args, out: Path) -> Path:
    import train_score

    source = (["--manifest", *map(str, args.manifest)] if args.manifest
              else ["--data-dir", str(args.data_dir)])
    code = train_score.main(source + ["--out", str(out), "--steps", str(args.score_steps),
                                      "--device", args.device, "--resume"]
                            + (["--t1-only"] if args.t1_only else []))
    if code != 0:
        raise InputError("score-model training failed")
    return out / "best.pt"


#: ``--max-peak-fpr`` default: off. On the development cohort (benchmark manifest ``dev``, never
#: the test or leave-one-anatomy-out scans) 0.001 raised the bundled T1 + T2 model's PPV at 1%
#: from 0.914 to 1.000 but lost 4 of 40 lesions >= 0.5 mL (TPR 0.700 -> 0.600), and
#: sensitivity is the figure short of its target (see docs/spatial_msma.md)
DEFAULT_MAX_PEAK_FPR = None


def optional_number(text: str, valid, requirement: str) -> float | None:
    """An option's number, or None for 'none'; ``argparse.ArgumentTypeError`` saying
    ``requirement`` when ``valid(value)`` is false (NaN never is)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or 'none'") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{value} {requirement}")
    return value


def peak_rate(text: str) -> float | None:
    """``--max-peak-fpr`` value: a rate in (0, 1), or 'none'."""
    return optional_number(text, lambda v: 0 < v < 1, "is not a rate in (0, 1)")


#: ``--grow-rate-factor`` default
DEFAULT_GROW_RATE_FACTOR = None


def grow_factor(text: str) -> float | None:
    """``--grow-rate-factor`` value: a multiple > 1 of the operating rate, or 'none'."""
    return optional_number(text, lambda v: v > 1, "must exceed 1")


#: minimum component sizes tried by ``--min-component-ml auto`` (mL)
AUTO_MIN_COMPONENT_ML = (0.05, 0.1, 0.15, 0.2, 0.3)  # below the 0.5 mL lesions of interest


def add_standardization_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scan-standardization", default="none",
        help="per-scan standardisation of each component map before calibration: 'none', "
             "FLOW_RULE or FLOW_RULE,NORMATIVE_RULE with rules robust (median/IQR), ratio "
             "(to the median) or none (SpatialMSMALib/scan_standardization.py)")


def scan_standardization_rules(text: str, has_normative: bool) -> dict:
    """``--scan-standardization`` as ``{map name: rule}``; a bad value raises InputError."""
    try:
        return parse_rules(text, has_normative)
    except ValueError as e:
        raise InputError(f"--scan-standardization: {e}") from None


def calibrate(model, val_scans, local_of, device, args) -> Calibration:
    """Healthy heat-map quantiles of the validation scans (inside the scored region), and
    the post-processing settings; with ``--min-component-ml auto`` the smallest size of
    ``AUTO_MIN_COMPONENT_ML`` whose median flagged volume on these healthy scans is within
    ``--healthy-budget-ml`` at the default rate, with the ``--max-peak-fpr`` rule applied
    (healthy data only, no lesion labels). ``local_of(i)`` gives the local score norms
    ``(L, X, Y, Z)`` of ``val_scans[i]``. A model with a normative contrast model first gets
    each map's own calibration (``component_calibrations``), then that of the fused map."""
    from SpatialMSMALib.spatial import label_anomalies, scored_region

    settings = {"smoothing_mm": args.smoothing_mm, "rim_mm": args.rim_mm}
    model.calibration = Calibration([1e-6, 1.0], [1.0, 0.0], **settings)  # for the maps only
    if args.max_peak_fpr is not None and args.max_peak_fpr > args.fpr:
        raise SystemExit(f"error: --max-peak-fpr {args.max_peak_fpr} must not exceed --fpr "
                         f"{args.fpr} (it is the stricter rate)")
    settings["max_peak_fpr"] = args.max_peak_fpr
    settings["grow_rate_factor"] = args.grow_rate_factor
    regions = [scored_region(scan.brain_mask, args.rim_mm, model.spacing_mm)
               for scan in val_scans]
    notes = {"calibration_scans": [s.id for s in val_scans],
             "grid": "model grid, smoothed heat map, brain voxels inside the scored region"}
    rules = scan_standardization_rules(getattr(args, "scan_standardization", "none"),
                                       model.normative is not None)
    model.scan_standardization = None  # the references come from these scans' raw maps
    maps = [list(component_heat_maps(model, scan.image, scan.brain_mask, local_of(i), device))
            for i, scan in enumerate(val_scans)]
    if rules:
        model.scan_standardization = {}
        for k, name in enumerate(("flow", "normative")):
            if name not in rules:
                continue
            rule = ScanStandardization.fit(rules[name], [m[k] for m in maps], regions)
            model.scan_standardization[name] = rule
            for m, r in zip(maps, regions, strict=True):
                m[k] = rule.apply(m[k], r)[0]
        notes["scan_standardization"] = {k: v.to_dict() for k, v in
                                         model.scan_standardization.items()}
    if model.normative is None:  # the heat map is the flow's (model_heat_map)
        heats = [m[0] for m in maps]
    else:  # each map's own calibration, then the fused maps (model_heat_map's sum)
        model.component_calibrations = {
            name: Calibration.from_healthy([m[k][r] for m, r in zip(maps, regions, strict=True)],
                                           notes=notes, **settings)
            for k, name in enumerate(("flow", "normative"))}
        heats = [fused_heat(flow, normative, model.component_calibrations["flow"],
                            model.component_calibrations["normative"])
                 for flow, normative in maps]
    del maps
    calibration = Calibration.from_healthy(
        [h[r] for h, r in zip(heats, regions, strict=True)], default_fpr=args.fpr,
        notes=notes, **settings)
    spacing = (model.spacing_mm,) * 3
    threshold = calibration.default_threshold
    extent, min_peak = calibration.labelling_thresholds(threshold)
    flagged = {}
    for size in AUTO_MIN_COMPONENT_ML:
        volumes = [float((label_anomalies(h, r, extent, spacing, size, min_peak)[0] > 0).sum())
                   * model.spacing_mm**3 / 1000 for h, r in zip(heats, regions, strict=True)]
        flagged[size] = float(np.median(volumes))
    calibration.notes["healthy_median_flagged_ml_by_min_component_ml"] = flagged
    if args.min_component_ml == "auto":
        within = [size for size, ml in flagged.items() if ml <= args.healthy_budget_ml]
        calibration.min_component_ml = within[0] if within else AUTO_MIN_COMPONENT_ML[-1]
        calibration.notes["min_component_rule"] = (
            f"smallest size with healthy validation median flagged volume <= "
            f"{args.healthy_budget_ml} mL (else the largest tried)")
    else:
        calibration.min_component_ml = float(args.min_component_ml)
    print(f"calibration: threshold {threshold:.3f} at voxel FPR {args.fpr:g}; healthy "
          f"validation median flagged mL by minimum component size {flagged}; using "
          f"{calibration.min_component_ml} mL")
    return calibration


def run(args, score_checkpoint: Path, work: Path, device: str, rank: int,
        world_size: int) -> int:
    import torch.distributed as dist
    from train_score import cohort_record, scan_lists

    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        splits = scan_lists(args)
        splits["train"] = splits["train"][: args.max_train_scans]
        splits["val"] = splits["val"][: args.max_val_scans]
        rows = splits["train"] + splits["val"]
        model = AnomalyModel.from_score_source(score_checkpoint)
        model.demons = demons_config(args)
        model.brain_masks = args.brain_masks
        n_channels = len(model.channel_names)
        flow_config = {f.name: getattr(args, "flow_" + f.name) for f in FLOW_FIELDS}
        flow_config.update(num_features=len(model.sigmas), in_channels=len(model.channel_names),
                           grid_spacing_mm=float(model.spacing_mm))
        try:
            flow_config = SpatialFlowConfig(**flow_config)
        except ValueError as e:
            raise InputError(f"flow options (--flow-score-levels, --flow-intensity-scales-mm, "
                             f"...) with the {len(model.sigmas)}-level score model "
                             f"'{score_checkpoint}': {e}") from None
        cache = work / "cache"
        feature_dir = cache / model.feature_cache_name()
        start = time.perf_counter()
        # every rank computes a share of the features, then all read the full cache
        share = rows[rank::world_size]
        scans = model_space(share, cache, model.spacing_mm, demons=model.demons,
                            brain_masks=model.brain_masks, progress=rank == 0,
                            channels=n_channels, refused=[])
        # the local maps (41 MB per scan) are kept only for a flow that reads them; the
        # whole-brain vectors (the typicality model's) are always needed
        keep_local = flow_config.score_features
        cached_features(model, scans, feature_dir, device, save_local=keep_local,
                        progress_bar=rank == 0)
        if distributed:
            dist.barrier()
        refused: list = []  # read back from the cache's refusal notes, the same on every rank
        train_scans = model_space(splits["train"], cache, model.spacing_mm, demons=model.demons,
                                  brain_masks=model.brain_masks,
                                  progress=False, channels=n_channels, refused=refused)
        val_scans = model_space(splits["val"], cache, model.spacing_mm, demons=model.demons,
                                brain_masks=model.brain_masks,
                                progress=False, channels=n_channels, refused=refused)
        check_refused(refused, len(rows), max_fraction=args.max_refused_fraction,
                      report=rank == 0)
        if not train_scans or not val_scans:
            raise InputError("no training or no validation scan left after registration")
        train_whole, train_paths = cached_features(model, train_scans, feature_dir, device,
                                                   save_local=keep_local, progress_bar=False)
        val_whole, val_paths = cached_features(model, val_scans, feature_dir, device,
                                               save_local=keep_local, progress_bar=False)
        feature_seconds = time.perf_counter() - start
        if rank == 0:
            print(f"score-norm features of {len(rows)} scans ready in {feature_seconds:.0f} s")

        config = SpatialTrainConfig(
            flow=dataclasses.asdict(flow_config),
            **{f.name: getattr(args, f.name) for f in TRAIN_FIELDS})
        downsample = config.flow["encoder_downsample"]
        levels = flow_config.level_indices()

        def local_norms(path: Path) -> np.ndarray:
            """``(L, X, Y, Z)`` float32 local score norms of a cached scan; ``(0, X, Y, Z)``
            for a flow that reads intensities only (nothing is read)."""
            if not keep_local:
                return np.zeros((0, *model.shape), np.float32)
            with np.load(path) as cached:
                return cached["local"].astype(np.float32)

        def locations(scans, paths):
            out = []
            for scan, path in zip(scans, paths, strict=True):
                out.append(LocationSet.from_arrays(
                    local_norms(path), scan.image, scan.brain_mask, downsample,
                    intensity_features=config.flow["intensity_features"],
                    score_features=config.flow["score_features"], score_levels=levels,
                    intensity_sigmas_vox=flow_config.intensity_sigmas_vox(),
                    intensity_reference_mask=intensity_reference_mask(
                        flow_config, scan.brain_mask.shape)))
            return out

        train_sets = locations(train_scans, train_paths)
        val_sets = locations(val_scans, val_paths)
        best_vals, t0 = [], time.perf_counter()
        for member in range(args.flow_members):  # member k: seed + k, its own folder
            member_dir = flow_dir(work, member)
            member_config = dataclasses.replace(config, seed=config.seed + member)
            trainer = SpatialTrainer(member_config, train_sets, val_sets, member_dir,
                                     device=device, rank=rank, distributed=distributed)
            if args.resume and (member_dir / "last.pt").exists():
                trainer.resume(member_dir / "last.pt")
            if not args.recalibrate:
                if rank == 0 and args.flow_members > 1:
                    print(f"flow {member + 1} of {args.flow_members} (seed "
                          f"{member_config.seed})")
                trainer.run(progress=rank == 0)
            elif not (member_dir / "best.pt").exists():
                raise InputError(f"--recalibrate needs a trained flow in '{member_dir}'")
            else:
                trainer.resume(member_dir / "last.pt")  # for its best validation NLL
            best_vals.append(trainer.best_val)
        flow_seconds = time.perf_counter() - t0
        if rank != 0:
            return 0

        flows = [load_best_flow(flow_dir(work, k) / "best.pt")
                 for k in range(args.flow_members)]
        model.spatial = flows[0] if len(flows) == 1 else FlowEnsemble(flows)
        t0 = time.perf_counter()
        if args.normative_contrast:
            model.normative = NormativeContrast.fit(
                ((scan.image, scan.brain_mask) for scan in train_scans),
                normative_config(args, model.spacing_mm))

        model.calibration = calibrate(model, val_scans, lambda i: local_norms(val_paths[i]),
                                      device, args)
        calibration_seconds = time.perf_counter() - t0

        whole = np.concatenate([train_whole, val_whole])
        model.typicality = TypicalityModel.fit(whole, models=tuple(args.aux_models))
        ids = [s.id for s in train_scans + val_scans]
        model.provenance.update({
            "cohort": ({"manifest": cohort_record(args.manifest), "splits": ["train", "val"]}
                       if args.manifest else {"data_dir": str(args.data_dir)}),
            "n_healthy": len(ids), "n_flow_train": len(train_scans),
            # the typicality model's whole-brain norms come from this version's feature cache
            "typicality_feature_version": FEATURE_VERSION,
            "refused_scans": [{"id": i, "reason": r} for i, r in refused],
            "n_flow_val": len(val_scans),
            "healthy_ids_sha256": healthy_ids_digest(ids),
            "flow_train_config": dataclasses.asdict(config),
            "flow_best_val_nll": float(np.mean(best_vals)),
            "flow_members": args.flow_members,
            "flow_members_best_val_nll": best_vals,
            "seconds": {"features": round(feature_seconds, 1), "flow": round(flow_seconds, 1),
                        "calibration": round(calibration_seconds, 1)},
        })
        model.save(args.out, overwrite=args.overwrite)
        print(f"flow: best validation NLL {np.mean(best_vals):.3f} nats"
              + (f" (mean of {len(best_vals)} flows)" if len(best_vals) > 1 else "")
              + "; default threshold "
              f"{model.calibration.default_threshold:.3f} (voxel FPR {args.fpr:g}); "
              f"wrote {args.out}")
        return 0
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
