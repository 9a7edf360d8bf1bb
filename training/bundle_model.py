"""Install a trained model file as a bundled model and describe it in the registry.

    python training/bundle_model.py --model runs/spatial_msma.pt --file spatial_msma.pt \\
        [--benchmark results/spatial_3d.json] [--cost results/detect_cost.json] [--overwrite]
    python training/bundle_model.py --model runs/refit.pt --file spatial_msma.pt --refresh \\
        [--cost results/detect_cost.json]

Copies the model into ``Resources/Models/`` and writes its entry in
``Resources/Models/registry.json``: file, SHA-256, channels, grid, what the flow models,
training data (from the model's provenance), calibration, measured costs and benchmark
figures when given (``--benchmark``: a ``benchmarks/spatial_3d.py`` result, quoted as a
flat per-split summary), and the intended-use statement.

``--refresh`` replaces a bundled file by a model with the same flow, calibrations and
training (for instance its typicality model refitted by ``fit_msma.py --model``): the
registry entry keeps its benchmark figures, costs (unless ``--cost`` is given) and
training-data description, and gets the new file's checksum, size, typicality description
and package version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from SpatialMSMALib import __version__
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.model import MODEL_DIR, REGISTRY, AnomalyModel

INTENDED_USE = (
    "Research software, NOT for clinical use. Trained only on synthetic variations (random "
    "deformation, affine jitter, bias field, Rician noise, contrast change) of a few public "
    "brain templates (nilearn MNI152 2009a and the anatomies listed in the training data), "
    "with a T2-like channel synthesised from tissue maps. It has never seen a real patient "
    "scan; scores on real scans are not validated."
)


def split_figures(split: dict) -> dict:
    """One split of a ``benchmarks/spatial_3d.py`` result -> the registry's flat figures."""
    s, lesioned = split["summary"], split["summary"]["lesioned"]

    def mean(key):
        return lesioned[key]["mean"]

    out = {
        "n_lesioned": s["n_lesioned"], "n_healthy": s["n_healthy"],
        "pooled_lesion_tpr": lesioned["pooled_tpr"], "pooled_ppv": lesioned["pooled_ppv"],
        "pooled_tpr_lesions_ge_0.5ml": s["pooled_tpr_lesions_ge_0.5ml"],
        "n_lesions_ge_0.5ml": s["n_lesions_ge_0.5ml"],
        "dice_mean": mean("dice"), "dice_sd": lesioned["dice"]["sd"],
        "hd99_mm_mean": mean("hd99"), "hd99_mm_sd": lesioned["hd99"]["sd"],
        "hd99_undefined": lesioned["hd99"]["n_undefined"],
        "hd99_truth_to_pred_mm_mean": mean("hd99_truth_to_pred"),
        "msd_mm_mean": mean("msd"), "msd_truth_to_pred_mm_mean": mean("msd_truth_to_pred"),
        "tpr_per_volume_mean": mean("tpr"), "tpr_per_volume_sd": lesioned["tpr"]["sd"],
        "ppv_per_volume_mean": mean("ppv"), "ppv_per_volume_sd": lesioned["ppv"]["sd"],
        "ppv_undefined": lesioned["ppv"]["n_undefined"],
        "voxel_auroc_mean": mean("auroc"), "voxel_auroc_sd": lesioned["auroc"]["sd"],
        "voxel_auprc_mean": mean("auprc"),
        "healthy": s["healthy"],
        "scan_level": {k: v["auroc"] for k, v in s.get("scan_level", {}).items()},
        "tpr_by_size": lesioned["tpr_by_size"],
        "seconds_per_volume": split["seconds"],
    }
    if split.get("operating_points"):
        out["operating_points"] = split["operating_points"]
    if "n_refused" in s:  # scans registration refused (spatial_3d.py lists them)
        out["n_refused"] = s["n_refused"]
        out["pooled_tpr_lesions_ge_0.5ml_refused_as_missed"] = s[
            "pooled_tpr_lesions_ge_0.5ml_refused_as_missed"]
    return out


def registry_benchmark(result: dict) -> dict:
    """A ``benchmarks/spatial_3d.py`` result -> ``{"threshold", "splits": {name: figures}}``
    (a summary already in that form is returned as it is)."""
    if all("summary" not in split for split in result["splits"].values()):
        return result
    return {"threshold": result["calibration"],
            "splits": {name: split_figures(split) for name, split in result["splits"].items()}}


def repository_path(path: Path) -> str:
    """``path`` relative to the repository root when inside it, else its name."""
    root = Path(__file__).resolve().parents[1]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def flow_inputs(model: AnomalyModel) -> dict:
    """What the bundled flow models per location (the detector, in words and settings)."""
    config = model.spatial.config
    levels = config.level_indices()
    parts = []
    if levels:
        parts.append(f"score norms at {len(levels)} of {len(model.sigmas)} noise levels")
    if config.intensity_features:
        channels = ", ".join(model.channel_names)
        scales = config.intensity_scales_mm
        parts.append(f"the location's own intensities ({channels})" if scales == "0" else
                     f"the intensities ({channels}) at Gaussian scales {scales} mm")
    context = "position in the model grid"
    if config.position_grid_features:
        context += " (sinusoidal + a learned grid)"
    normative = None
    if model.normative is not None:
        c = model.normative.config
        normative = {
            "models": "per template voxel, a Gaussian of healthy blob contrasts (each channel's "
                      "difference of Gaussians)",
            "inner_sigmas_mm": [s * model.spacing_mm for s in c.sigmas_vox],
            "surround_ratio": c.surround_ratio,
            "fusion": "sum of both maps' -log10 healthy voxel false-positive rates"}
        fitted = model.provenance.get("normative_contrast") or {}
        if fitted.get("n_train"):
            cohorts = fitted.get("cohort")
            normative["fitted_on"] = {
                "n_healthy_scans": fitted["n_train"],
                "cohorts": [cohort_name(c) for c in (cohorts if isinstance(cohorts, list)
                                                     else [cohorts])]}
    standardization = None
    if model.scan_standardization:
        standardization = {
            name: {**rule.to_dict(), "what": (
                "each scan's map divided by its median inside the scored region, times the "
                "reference median" if rule.rule == "ratio" else
                "each scan's map mapped to the reference median and IQR")}
            for name, rule in model.scan_standardization.items()}
    out = {"models": " and ".join(parts), "score_levels": levels,
           "intensity_features": config.intensity_features,
           "intensity_scales_mm": config.intensity_scales_mm,
           "context": context + (" + global image features" if config.global_features else ""),
           "normative_contrast": normative, "heat_units": model.heat_units}
    if standardization:  # only models that have one (older entries stay as they were)
        out["scan_standardization"] = standardization
    return out


def cohort_name(path: str) -> str:
    """A cohort's folder name, without the trainer's local folders (a manifest file is named
    by its folder)."""
    path = Path(path)
    return path.parent.name if path.suffix == ".json" else path.name


def public_cohort(cohort: dict | None) -> dict | None:
    """The provenance's cohort without the trainer's local folders (only their names)."""
    if not cohort:
        return cohort
    def name(value):
        return ([cohort_name(v) for v in value] if isinstance(value, list)
                else cohort_name(value))

    return {key: name(value) if key in ("manifest", "data_dir") and value else value
            for key, value in cohort.items()}


def describe_cohort(manifest_path) -> dict:
    """What a training cohort is (anatomies, held-out anatomy, seed, subject variability),
    from its manifest, for the registry."""
    from SpatialMSMALib.cohort import load_manifest

    m = load_manifest(manifest_path)
    variability = m.get("subject_config", {})
    return {
        "anatomies": [a for a in m["anatomies"] if a != m.get("holdout_anatomy")],
        "held_out_anatomy": m.get("holdout_anatomy"),
        "cohort_seed": m.get("seed"),
        "subject_variability": variability,
        "description": (
            "synthetic healthy subjects made by spatial-msma make-benchmark (seed "
            f"{m.get('seed')}, deformation {variability.get('deformation_mm')} mm at "
            f"{variability.get('control_spacing_mm')} mm control spacing); see "
            "training/README.md")}


def typicality_fit(model: AnomalyModel) -> dict | None:
    """What the model's MSMA typicality model was fitted on: the number of healthy scans and
    the version of the score-norm features (``score.features.FEATURE_VERSION``; a model
    fitted on another version's features gives wrong percentiles)."""
    if model.typicality is None:
        return None
    p = model.provenance
    return {"n_healthy_scans": p.get("n_healthy"),
            "cohort": public_cohort(p.get("typicality_cohort") or p.get("cohort")),
            "feature_version": p.get("typicality_feature_version", 1),
            "noise_levels_read": model.typicality.levels or "all"}


def entry_for(model: AnomalyModel, file: Path, benchmark: dict | None,
              cost: dict | None) -> dict:
    p = model.provenance
    entry = {
        "file": file.name,
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        "size_bytes": file.stat().st_size,
        "channels": list(model.channel_names),
        "brain_masks": model.brain_masks,
        "for_scans": ("without a brain mask (trained and calibrated with every scan's mask set "
                      "aside: the template's mask after affine registration)"
                      if model.brain_masks == "atlas" else
                      "with a brain mask (and the fallback without one when no model for "
                      "that is installed)"),
        "grid": {"spacing_mm": model.spacing_mm, "shape": list(model.shape),
                 "space": "MNI152 2009a (RAS), affine registration" + (
                     f" + demons ({model.demons.iterations} iterations, field smoothed by "
                     f"{model.demons.smoothing_vox:g} voxels) to the template T1"
                     if model.demons else ""),
                 "preprocess_version": int(model.preprocess_version)},
        "noise_levels": {"L": len(model.sigmas), "sigma_max": float(model.sigmas[0]),
                         "sigma_min": float(model.sigmas[-1])},
        "flow_inputs": flow_inputs(model),
        "training_data": {
            "cohort": public_cohort(p.get("cohort")), "n_healthy_scans": p.get("n_healthy"),
            "n_flow_train": p.get("n_flow_train"), "n_flow_val": p.get("n_flow_val"),
            "score_training_steps": p.get("score_training_step"),
            "description": "synthetic healthy subjects made by spatial-msma make-benchmark; "
                           "see training/README.md",
        },
        "calibration": {"default_voxel_fpr": model.calibration.default_fpr,
                        "default_threshold": model.calibration.default_threshold,
                        "smoothing_mm": model.calibration.smoothing_mm,
                        "min_component_ml": model.calibration.min_component_ml,
                        "max_peak_fpr": model.calibration.max_peak_fpr,
                        "grow_rate_factor": model.calibration.grow_rate_factor,
                        "extent_threshold": model.calibration.labelling_thresholds(
                            model.calibration.default_threshold)[0],
                        "healthy_scans": model.calibration.n_scans},
        "msma_auxiliary_models": sorted(model.typicality.models) if model.typicality else [],
        "msma_typicality": typicality_fit(model),
        "package_version": __version__,
        "intended_use": INTENDED_USE,
    }
    manifest = (p.get("cohort") or {}).get("manifest")
    manifests = manifest if isinstance(manifest, list) else [manifest] if manifest else []
    if manifests and all(Path(m).exists() for m in manifests):
        described = [describe_cohort(m) for m in manifests]
        if len(described) == 1:
            entry["training_data"].update(described[0])
        else:
            entry["training_data"]["cohorts"] = described
            entry["training_data"]["description"] = " + ".join(
                d["description"] for d in described)
    if cost:
        # a same-run comparison (detect_cost.py --baseline) describes another model too;
        # the registry keeps only this model's figures, and of the code that ran them its
        # commit (not the folder it was imported from on the measuring machine)
        entry["expected_time"] = {k: v for k, v in cost.items()
                                  if k not in ("model", "baseline", "ratio_to_baseline")}
        if isinstance(cost.get("code"), dict):
            entry["expected_time"]["code"] = {"commit": cost["code"].get("commit", "unknown")}
    if benchmark:
        entry["benchmark"] = benchmark
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--file", required=True, help="name under Resources/Models/")
    parser.add_argument("--benchmark", type=Path, help="summary JSON to quote in the registry")
    parser.add_argument("--cost", type=Path, help="measured costs JSON")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--refresh", action="store_true",
                        help="keep the registry entry's figures; implies --overwrite")
    args = parser.parse_args(argv)
    try:
        model = AnomalyModel.load(args.model)
        if model.spatial is None or model.calibration is None:
            raise InputError(f"'{args.model}' has no Spatial-MSMA flow")
        target = MODEL_DIR / args.file
        if target.exists() and not (args.overwrite or args.refresh):
            raise InputError(f"'{target}' exists; pass --overwrite")
        registry = json.loads(REGISTRY.read_text()) if REGISTRY.exists() else {"models": []}
        previous = next((m for m in registry["models"] if m["file"] == target.name), None)
        if args.refresh and (previous is None or not target.exists()):
            raise InputError(f"--refresh: '{target.name}' is not a bundled model yet")
        if args.refresh and previous.get("brain_masks", "given") != model.brain_masks:
            raise InputError(f"--refresh: '{args.model}' is for brain masks "
                             f"'{model.brain_masks}', the bundled '{target.name}' for "
                             f"'{previous.get('brain_masks', 'given')}'")
        if args.refresh and previous["channels"] != list(model.channel_names):
            raise InputError(f"--refresh: '{args.model}' has channels "
                             f"{list(model.channel_names)}, the bundled "
                             f"'{target.name}' {previous['channels']}")
        # every input is read and checked before anything is written
        benchmark = read_benchmark(args.benchmark) if args.benchmark else None
        cost = read_json(args.cost, "measured costs") if args.cost else None
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name("." + target.name + ".partial")
    shutil.copyfile(args.model, tmp)
    tmp.replace(target)
    entry = entry_for(model, target, benchmark, cost)
    if args.refresh:
        fresh = entry
        entry = dict(previous)
        for key in ("sha256", "size_bytes", "msma_auxiliary_models", "msma_typicality",
                    "package_version", "brain_masks", "for_scans") + (
                        ("expected_time",) if cost else ()):
            entry[key] = fresh[key]
    registry["models"] = [m for m in registry["models"] if m["file"] != target.name]
    registry["models"].append(entry)
    registry["models"].sort(key=lambda m: -len(m["channels"]))
    tmp = REGISTRY.with_name(".registry.json.partial")
    tmp.write_text(json.dumps(registry, indent=1) + "\n")
    tmp.replace(REGISTRY)
    print(f"installed {target} ({target.stat().st_size / 1e6:.1f} MB) and updated {REGISTRY}")
    return 0


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; ``InputError`` naming the file otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{what} '{path}': not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} '{path}': expected a JSON object")
    return value


def read_benchmark(path: Path) -> dict:
    """The registry's benchmark figures from a ``benchmarks/spatial_3d.py`` result file."""
    result = read_json(path, "benchmark")
    try:
        benchmark = registry_benchmark(result)
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f"benchmark '{path}': not a benchmarks/spatial_3d.py result "
                         f"(missing {e})") from None
    benchmark["source"] = repository_path(path)
    return benchmark

if __name__ == "__main__":
    sys.exit(main())
