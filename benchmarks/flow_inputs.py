"""What the Spatial-MSMA flow should model: an ablation of its inputs and position context.

    python benchmarks/flow_inputs.py --manifest benchmark --cache CACHE \\
        --dev-manifest dev --dev-cache DEV_CACHE --name multiscale --scales-mm 0,4,8 \\
        [--position-frequencies 4] [--grid-features 0] [--steps 3000] --out RESULT.json

One variant per run: a flow over the model-space intensities at the given Gaussian scales
(``SpatialFlowConfig.intensity_scales_mm``; "0" is the bundled model's input, the voxel's own
T1/T2), with the sinusoidal position encoding and optionally a learned position grid
(``--grid-features``), trained on the cohort's ``train`` scans (their scored region: brain
without a 4 mm rim), validated on ``val``. Then, like the detector: NLL heat map smoothed by
2 mm inside the scored region, thresholds from the healthy ``val`` scans at voxel FPRs of
1%, 0.3% and 0.1% (label-free, PROTOCOLS.md), components of at least 0.3 mL. Evaluated on
the model grid (2 mm; truth masks resampled there), so the figures are for comparing
variants, not a replacement for ``spatial_3d.py`` (native grid, the shipped model).

Splits evaluated: ``dev`` (``test_*`` of a second cohort made with another master seed, e.g.
``spatial-msma make-benchmark --seed 1 --n-train 0 --n-val 0 --n-loao-healthy 0
--n-loao-lesioned 0 --n-test-healthy 6 --n-test-lesioned 12``: the split to choose a variant
on), then the benchmark's ``test`` and ``loao`` splits. Per split: mean voxel AUROC of the
lesioned scans, and per rate: TPR for lesions >= 0.5 mL, pooled TPR and PPV, mean Dice and the
median flagged volume of the healthy scans.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from SpatialMSMALib.cohort import load_manifest
from SpatialMSMALib.dataset import manifest_scans, refusal_reason
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.metrics import LARGE_LESION_MM3, evaluate_operating_point
from SpatialMSMALib.preprocessing import SpaceMapping, normalised_template_t1
from SpatialMSMALib.registration import invert_displacement, register_demons, warp
from SpatialMSMALib.spatial import (
    INTENSITY_REFERENCES,
    Calibration,
    SpatialFlowConfig,
    intensity_reference_mask,
    label_anomalies,
    modelled_intensities,
    scored_region,
    smooth_in_region,
)
from SpatialMSMALib.spatial_training import (
    LocationSet,
    SpatialTrainConfig,
    SpatialTrainer,
    load_best_flow,
)
from SpatialMSMALib.template import template_on_grid

SPACING_MM = 2.0
RIM_MM, SMOOTHING_MM, MIN_COMPONENT_ML = 4.0, 2.0, 0.3
RATES = (0.01, 0.003, 0.001)
FAINT_T1_ABOVE, FAINT_T2_BELOW = 0.85, 1.3  # is_faint


def parse_scales(spec: str, option: str) -> list[float]:
    """Comma-separated Gaussian sigmas (mm) -> list, checked like the flow's own
    ``intensity_scales_mm``; a clear error naming ``option`` otherwise."""
    try:
        sigmas = SpatialFlowConfig(intensity_scales_mm=spec,
                                   grid_spacing_mm=SPACING_MM).intensity_sigmas_vox()
    except ValueError as e:
        raise SystemExit(f"error: {option}: {e}") from None
    return [sigma * SPACING_MM for sigma in sigmas]


@dataclass
class Deformable:
    """Demons registration of each cached model-space T1 to the template T1 (both normalised
    alike): the flow then sees every scan in template space, and heat maps are mapped back
    with the inverse field. ``None`` in :func:`load_scan` means the plain affine model space."""

    iterations: int
    smoothing_vox: float
    fields: Path  # cache of the displacement fields, one npz per scan

    @cached_property
    def fixed(self) -> np.ndarray:
        grid = template_on_grid().grid
        return normalised_template_t1(SPACING_MM, tuple(grid.shape))

    def field(self, cache: Path, scan_id: str, t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(forward, inverse) displacement of one scan of ``cache``, ``(3, X, Y, Z)`` voxels,
        cached under the cache's folder name (two cohorts can share scan ids)."""
        tag = f"{self.iterations}it_{self.smoothing_vox:g}sd"
        path = self.fields / cache.resolve().name / f"{scan_id}_{tag}.npz"
        if path.exists():
            with np.load(path) as z:
                return z["forward"].astype(np.float32), z["inverse"].astype(np.float32)
        forward = register_demons(t1, self.fixed, self.iterations, self.smoothing_vox)
        inverse = invert_displacement(forward)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, forward=forward.astype(np.float16), inverse=inverse.astype(np.float16))
        return forward, inverse


def load_scan(cache: Path, scan_id: str, scales_mm: list[float],
              deformable: Deformable | None = None, reference: str = "none"):
    """Cached model-space scan -> (intensities at each scale (C*S, X, Y, Z), brain mask,
    scored region, mapping, inverse displacement or None). With ``deformable`` the image,
    mask and region are in template space (``inverse`` maps them back); ``reference``
    ("template_wm") first subtracts each channel's median in the template's white matter
    (``SpatialFlowConfig.intensity_reference``)."""
    path = cache / f"{scan_id}_{SPACING_MM:g}mm.npz"
    if not path.exists():
        raise SystemExit(f"error: '{path}' is missing: preprocess the cohort into this cache "
                         "first (spatial_3d.py or train_spatial.py write it)")
    with np.load(path) as z:
        brain, image = z["brain_mask"] > 0, z["image"]
        mapping = SpaceMapping.from_dict(json.loads(str(z["mapping"])))
    inverse = None
    if deformable is not None:
        forward, inverse = deformable.field(cache, scan_id, image[0])
        image = warp(image, forward, order=1, fill=-1.0)
        brain = warp(brain.astype(np.float32), forward, order=1) > 0.5
    mask = intensity_reference_mask(
        SpatialFlowConfig(intensity_features=True, intensity_reference=reference,
                          grid_spacing_mm=SPACING_MM), brain.shape)
    image = modelled_intensities(image, brain, [s / SPACING_MM for s in scales_mm], mask)
    return image, brain, scored_region(brain, RIM_MM, SPACING_MM), mapping, inverse


def affine_region(cache: Path, scan_id: str) -> np.ndarray:
    """The scored region of a cached scan on its affinely registered model grid."""
    with np.load(cache / f"{scan_id}_{SPACING_MM:g}mm.npz") as z:
        return scored_region(z["brain_mask"] > 0, RIM_MM, SPACING_MM)


def is_faint(lesion: dict) -> bool:
    """A simulated lesion whose contrast is within about one SD of no change on both channels
    (T1 factor above 0.85 and T2 factor below 1.3; the simulator's means are 0.79 and 1.37)."""
    return lesion["t1_factor"] > FAINT_T1_ABOVE and lesion["t2_factor"] < FAINT_T2_BELOW


def large_lesions_native(subject: dict, native: np.ndarray):
    """``[(lesion, mask (I, J, K) bool)]`` for each of the manifest's lesions of at least
    0.5 mL (``LARGE_LESION_MM3``) of one subject: the manifest entry and the 26-connected
    component of the native truth ``native`` holding its ``centroid_voxel`` (touching lesions
    share it; an irregular lesion whose centroid lies outside it is left out)."""
    from scipy import ndimage

    components, _ = ndimage.label(native, np.ones((3, 3, 3), bool))
    out = []
    for lesion in subject.get("lesions", []):
        if lesion["volume_mm3"] < LARGE_LESION_MM3:
            continue
        index = components[tuple(int(round(v)) for v in lesion["centroid_voxel"])]
        if index:
            out.append((lesion, components == index))
    return out


def large_lesions_on_model_grid(subject: dict, native: np.ndarray, mapping: SpaceMapping):
    """``[(faint, mask (X, Y, Z) bool on the model grid)]`` for each lesion of
    :func:`large_lesions_native`, resampled like the truth."""
    return [(is_faint(lesion), mapping.to_model(mask.astype(np.float32)) > 0.5)
            for lesion, mask in large_lesions_native(subject, native)]


def evaluate_splits(heat_of, calibration: Calibration, args) -> dict:
    """Figures of one heat-map function on the ``dev``, ``test`` and ``loao`` splits.

    ``heat_of(cache, scan_id)`` returns the smoothed model-grid heat map ``(X, Y, Z)`` (NaN
    outside the scored region), the scored region and the scan's ``SpaceMapping``; the truth is
    resampled to the model grid. ``args`` holds ``manifest``, ``cache``, ``dev_manifest`` and
    ``dev_cache``. Per split: mean voxel AUROC of the lesioned scans and, per rate of
    ``RATES`` (thresholds from ``calibration``), TPR for lesions >= 0.5 mL, pooled TPR and
    PPV, mean Dice and the healthy scans' median flagged volume (mL); and the TPR of the
    manifest's lesions >= 0.5 mL split into faint ones (``is_faint``) and the others."""
    out = {}
    for split, manifest, cache, prefix in [("dev", args.dev_manifest, args.dev_cache, "test"),
                                           ("test", args.manifest, args.cache, "test"),
                                           ("loao", args.manifest, args.cache, "loao")]:
        rows = manifest_scans(manifest, (prefix + "_healthy", prefix + "_lesioned"))
        subjects = {s["id"]: s for s in load_manifest(manifest)["subjects"]}
        per_rate, aurocs = {rate: [] for rate in RATES}, []
        by_contrast = {rate: [] for rate in RATES}  # (faint, detected) per lesion >= 0.5 mL
        for row in rows[prefix + "_healthy"] + rows[prefix + "_lesioned"]:
            heat, region, mapping = heat_of(cache, row.id)
            native = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True)
            truth = mapping.to_model(native.data.astype(np.float32)) > 0.5
            if truth.any():
                aurocs.append(roc_auc_score(truth[region], heat[region]))
            lesions = large_lesions_on_model_grid(subjects[row.id], native.data > 0, mapping)
            for rate in RATES:
                labels, _ = label_anomalies(heat, region, calibration.threshold_for_fpr(rate),
                                            (SPACING_MM,) * 3, MIN_COMPONENT_ML)
                per_rate[rate].append(evaluate_operating_point(labels > 0, truth,
                                                               (SPACING_MM,) * 3))
                by_contrast[rate] += [(faint, bool((labels[mask] > 0).any()))
                                      for faint, mask in lesions]
        figures = {"auroc": float(np.mean(aurocs)), "n_lesioned": len(aurocs)}
        for rate, cases in per_rate.items():
            lesioned = [c for c in cases if not c["healthy"]]
            healthy = [c for c in cases if c["healthy"]]
            sizes = np.concatenate([c["truth_sizes_mm3"] for c in lesioned])
            hits = np.concatenate([c["truth_detected"] for c in lesioned]).astype(bool)
            figures[str(rate)] = {
                "tpr_ge_0.5ml": float(hits[sizes >= LARGE_LESION_MM3].mean()),
                "tpr": float(hits.mean()),
                "ppv": sum(c["n_pred_true"] for c in lesioned)
                / max(1, sum(c["n_pred"] for c in lesioned)),
                "dice": float(np.mean([c["dice"] for c in lesioned])),
                "healthy_median_ml": float(np.median([c["flagged_ml"] for c in healthy])),
            }
            pairs = np.array(by_contrast[rate], bool).reshape(-1, 2)
            for name, chosen in (("faint", pairs[:, 0]), ("other", ~pairs[:, 0])):
                figures[str(rate)][f"tpr_ge_0.5ml_{name}"] = (
                    float(pairs[chosen, 1].mean()) if chosen.any() else float("nan"))
                figures[str(rate)][f"n_ge_0.5ml_{name}"] = int(chosen.sum())
        out[split] = figures
    return out


def evaluate_and_write(result: dict, heat_of, calibration: Calibration, args) -> None:
    """``evaluate_splits`` into ``result["splits"]`` (printed per split), then ``result`` as
    JSON to ``args.out``."""
    for split, figures in evaluate_splits(heat_of, calibration, args).items():
        result["splits"][split] = figures
        print(split, json.dumps(figures), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="model-space cache of the cohort")
    p.add_argument("--train-manifest", type=Path, nargs="+",
                   help="cohort(s) whose train / val scans fit and calibrate the flow "
                        "(default --manifest; e.g. one made with stronger deformations; "
                        "several: their train and val splits are pooled)")
    p.add_argument("--train-cache", type=Path, nargs="+",
                   help="their model-space caches, one per --train-manifest (default --cache)")
    p.add_argument("--dev-manifest", type=Path, required=True)
    p.add_argument("--dev-cache", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--scales-mm", default="0", help="Gaussian sigmas (mm), 0 = the voxel")
    p.add_argument("--position-frequencies", type=int, default=4)
    p.add_argument("--grid-features", type=int, default=0)
    p.add_argument("--grid-nodes", type=int, default=24)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="training seed (sampling, initialisation)")
    p.add_argument("--intensity-reference", default="none", choices=INTENSITY_REFERENCES,
                   help="template_wm: each channel minus its median in the template's white "
                        "matter, before the scales (SpatialFlowConfig.intensity_reference)")
    p.add_argument("--work", type=Path, default=Path("runs/flow_inputs"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--deformable", type=Path, metavar="FIELDS_DIR",
                   help="demons-register every scan to the template T1 first (fields cached "
                        "in FIELDS_DIR); heat maps are mapped back before evaluation")
    p.add_argument("--demons-iterations", type=int, default=50)
    p.add_argument("--demons-smoothing-vox", type=float, default=2.0)
    args = p.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: '{args.out}' exists; pass --overwrite to replace it")
    scales = parse_scales(args.scales_mm, "--scales-mm")
    deformable = (Deformable(args.demons_iterations, args.demons_smoothing_vox, args.deformable)
                  if args.deformable else None)

    def location_set(train_cache, scan_id):  # no score norms: a flow of the intensities
        image, _, region, _, _ = load_scan(train_cache, scan_id, scales, deformable,
                                           args.intensity_reference)
        return LocationSet.from_arrays(np.zeros((0, *region.shape), np.float32), image,
                                       region, 4, intensity_features=True,
                                       score_features=False)

    train_manifests = args.train_manifest or [args.manifest]
    train_caches = args.train_cache or [args.cache]
    if len(train_caches) != len(train_manifests):
        raise SystemExit("error: give one --train-cache per --train-manifest")
    if deformable is not None:  # fields are cached under each cache's folder name
        folders: dict[str, set] = {}
        for cache in (args.cache, args.dev_cache, *train_caches):
            folders.setdefault(cache.resolve().name, set()).add(cache.resolve())
        shared = sorted(name for name, paths in folders.items() if len(paths) > 1)
        if shared:
            raise SystemExit(f"error: caches in different folders share the name "
                             f"{', '.join(shared)}: their demons fields would be mixed up "
                             "under --deformable; rename one")
    start = time.perf_counter()
    pooled = {"train": [], "val": []}  # (cache, scan id) of every cohort's train / val scans
    refused = []  # scans the cache records as refused by the registration (dataset.model_space)
    for manifest, cache in zip(train_manifests, train_caches, strict=True):
        cohort = manifest_scans(manifest, ("train", "val"))
        for split in pooled:
            for row in cohort[split]:
                reason = refusal_reason(cache, row.id, SPACING_MM)
                if reason is not None:
                    refused.append({"cache": str(cache), "id": row.id, "reason": reason})
                else:
                    pooled[split].append((cache, row.id))
    for note in refused:
        print(f"warning: {note['id']} of {note['cache']} left out: {note['reason']}")
    train = [location_set(cache, scan_id) for cache, scan_id in pooled["train"]]
    val = [location_set(cache, scan_id) for cache, scan_id in pooled["val"]]
    flow_config = SpatialFlowConfig(
        in_channels=train[0].lowres.shape[0], intensity_features=True, score_features=False,
        position_frequencies=args.position_frequencies, hidden=args.hidden,
        position_grid_features=args.grid_features, position_grid_nodes=args.grid_nodes)
    work = args.work / args.name
    trainer = SpatialTrainer(SpatialTrainConfig(flow=asdict(flow_config), steps=args.steps,
                                                 seed=args.seed),
                             train, val, work)
    trainer.run(progress=True)
    flow = load_best_flow(work / "best.pt")
    train_seconds = time.perf_counter() - start
    print(f"{args.name}: trained in {train_seconds:.0f} s, best val NLL {trainer.best_val:.3f}")

    def heat_of(cache, scan_id):
        image, brain, region, mapping, inverse = load_scan(cache, scan_id, scales, deformable,
                                                          args.intensity_reference)
        raw = flow.heat_map(np.zeros((0, *region.shape), np.float32), image, region)
        if inverse is not None:  # template space -> the scan's affine model space
            raw = warp(np.where(region, raw, np.nanmedian(raw[region])).astype(np.float32),
                       inverse, order=1, fill=float(np.nanmedian(raw[region])))
            region = affine_region(cache, scan_id)
        return smooth_in_region(raw, region, SMOOTHING_MM / SPACING_MM), region, mapping

    calibration = Calibration.from_healthy(
        [h[r] for h, r, _ in (heat_of(cache, scan_id) for cache, scan_id in pooled["val"])])
    result = {"name": args.name, "scales_mm": scales,
              "intensity_reference": args.intensity_reference,
              "deformable": None if deformable is None else {
                  "method": "SimpleITK fast symmetric-forces demons, T1 to the template T1",
                  "iterations": deformable.iterations,
                  "smoothing_vox": deformable.smoothing_vox},
              "train_cohort": [str(m) for m in train_manifests], "refused_scans": refused,
              "flow": asdict(flow_config),
              "steps": args.steps, "seed": args.seed, "best_val_nll": trainer.best_val,
              "train_seconds": train_seconds, "grid": "model grid, 2 mm",
              "rim_mm": RIM_MM, "smoothing_mm": SMOOTHING_MM,
              "min_component_ml": MIN_COMPONENT_ML, "splits": {}}
    evaluate_and_write(result, heat_of, calibration, args)


if __name__ == "__main__":
    main()
