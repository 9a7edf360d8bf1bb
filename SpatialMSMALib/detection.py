"""Spatial-MSMA detection: heat map, calibrated threshold, labelled components, outputs.

One path for the CLI (``spatial-msma detect``), the Slicer module and the browser viewer:

    prepare (native -> model grid) -> score-norm features -> flow NLL -> smoothing
    -> native grid -> threshold (voxel false-positive rate from healthy calibration)
    -> connected components -> report

``relabel`` recomputes the label volume and components from the native heat map at a new
threshold without touching the networks (what the GUI sliders call).

Coordinates: the heat map and labels are on the native T1 grid (``affine``: voxel index ->
RAS mm); component centroids are RAS mm; volumes are mL.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .inference import (
    Progress,
    coarse_voxel_warnings,
    compute_features,
    contrast_problems,
    detection_levels,
    full_levels,
    full_precision,
    prepare,
    typicality_report,
)
from .io import Volume, check_output_folder, save_volume
from .model import AnomalyModel
from .normative import fused_heat
from .spatial import component_statistics, label_anomalies, scored_region, smooth_in_region


@dataclass
class Component:
    label: int
    volume_ml: float
    centroid_ras_mm: list
    peak_score: float
    mean_score: float
    peak_voxel_fpr: float


@dataclass
class Detection:
    """Everything ``detect`` produces (arrays on the native T1 grid unless stated).

    Attributes:
        heat: ``(I, J, K)`` float32 anomaly score (in ``heat_units``: flow NLL in nats, or
            summed -log10 FPR evidence with the normative contrast map); outside the brain it
            holds ``floor`` (the lowest healthy calibration value), so no threshold flags it.
        brain_mask: ``(I, J, K)`` bool, where the heat map is defined.
        labels: ``(I, J, K)`` int16, components 1..n ordered by peak score.
        affine: ``(4, 4)`` native voxel index -> RAS mm.
        threshold / fpr: the operating point used (voxel false-positive rate on healthy
            validation brains at that threshold).
        components: per-component statistics.
        heat_model / image_model / brain_mask_model: the model-grid heat map (NaN outside
            the brain), scan and mask, for figures.
        typicality: the scan-level MSMA report (dict) or None.
        scan_standardization: for a model with per-scan standardisation, each standardised
            map's statistics on this scan and the applied scale and offset (dict), else None.
        warnings: input-check and registration messages.
        timings: seconds per stage.
    """

    heat: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    threshold: float
    fpr: float
    floor: float
    components: list
    heat_model: np.ndarray
    image_model: np.ndarray
    brain_mask_model: np.ndarray
    typicality: dict | None = None
    scan_standardization: dict | None = None
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    registration_ncc: float = float("nan")
    mapping: object = None  # preprocessing.SpaceMapping (native <-> model grid)
    heat_units: str = "nats"  # AnomalyModel.heat_units of the model that made it

    def report(self, model: AnomalyModel | None = None, inputs: dict | None = None) -> dict:
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        voxel_ml = float(np.prod(spacing)) / 1000
        out = {
            "inputs": {k: str(v) for k, v in (inputs or {}).items() if v},
            "threshold": self.threshold,
            "heat_units": self.heat_units,
            "voxel_false_positive_rate": self.fpr,
            "flagged_volume_ml": float((self.labels > 0).sum() * voxel_ml),
            "n_components": len(self.components),
            "components": [asdict(c) for c in self.components],
            "typicality": self.typicality,
            "scan_standardization": self.scan_standardization,
            "registration_ncc": self.registration_ncc,
            # the quality-gate retry of a scan without a brain mask (None when none ran)
            "registration_retry": registration_retry_record(self.mapping),
            "warnings": self.warnings,
            "timings_s": self.timings,
        }
        if model is not None:
            out["model"] = {"channels": list(model.channel_names),
                            "spacing_mm": model.spacing_mm,
                            "brain_masks": model.brain_masks,
                            "provenance": without_local_folders(model.provenance),
                            "post_processing": {
                                "smoothing_mm": model.calibration.smoothing_mm,
                                "rim_mm": model.calibration.rim_mm,
                                "min_component_ml": model.calibration.min_component_ml,
                                "max_peak_fpr": model.calibration.max_peak_fpr,
                                "grow_rate_factor": model.calibration.grow_rate_factor,
                                # where the reported components' extent ends (with growth)
                                "extent_threshold": model.calibration.labelling_thresholds(
                                    self.threshold)[0]}}
        return out


def resolve_threshold(model: AnomalyModel, fpr: float | None = None,
                      threshold: float | None = None) -> tuple[float, float]:
    """``(threshold, voxel FPR)`` from either a false-positive rate or a raw threshold
    (default: the model's calibrated default rate)."""
    calibration = model.calibration
    if fpr is not None and threshold is not None:
        raise InputError("give either a false-positive rate or a threshold, not both")
    if threshold is not None:
        if not math.isfinite(float(threshold)):
            raise InputError(f"threshold must be a finite number, not {threshold}")
        return float(threshold), float(calibration.fpr_of_score(threshold))
    fpr = calibration.default_fpr if fpr is None else float(fpr)
    try:
        return calibration.threshold_for_fpr(fpr), fpr
    except ValueError as e:
        raise InputError(str(e)) from None


def component_heat_maps(model: AnomalyModel, image: np.ndarray, brain_mask: np.ndarray,
                        local: np.ndarray, device: str | torch.device = "cpu",
                        progress=None, scan_factors: dict | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """The smoothed flow NLL and, for a model with a normative contrast model, its smoothed
    squared distance (else None), each ``(X, Y, Z)`` on the model grid, NaN outside the
    scored region (``brain_mask`` without the calibration's ``rim_mm``). A model with a
    per-scan standardisation (``model.scan_standardization``) returns each map standardised
    (``scan_standardization.ScanStandardization.apply``).

    Args:
        image: ``(C, X, Y, Z)`` model-space scan; brain_mask: ``(X, Y, Z)`` bool;
        local: ``(L, X, Y, Z)`` local score norms of that scan.
        scan_factors: if given, filled with each standardised map's per-scan statistics
            (``{"flow": {"median", "iqr", "scale", "offset"}, ...}``).
    """
    if model.spatial is None or model.calibration is None:
        raise InputError("this model file has no Spatial-MSMA flow (it is an MSMA-only model "
                         "from fit_msma.py); train one with training/train_spatial.py")
    region = scored_region(brain_mask, model.calibration.rim_mm, model.spacing_mm)
    with full_precision():  # no autocast or TF32 in the flow and its global encoder
        raw = model.spatial.heat_map(local, image, region, device=device, progress=progress,
                                     brain_mask=brain_mask)
    sigma_vox = model.calibration.smoothing_mm / model.spacing_mm
    maps = {"flow": smooth_in_region(raw, region, sigma_vox)}
    if model.normative is not None:
        distance = model.normative.squared_distance(image, np.asarray(brain_mask, bool))
        maps["normative"] = smooth_in_region(distance, region, sigma_vox)
    for name, rule in (model.scan_standardization or {}).items():
        if name in maps:
            maps[name], factors = rule.apply(maps[name], region)
            if scan_factors is not None:
                scan_factors[name] = factors
    return maps["flow"], maps.get("normative")


def model_heat_map(model: AnomalyModel, image: np.ndarray, brain_mask: np.ndarray,
                   local: np.ndarray, device: str | torch.device = "cpu",
                   progress=None, scan_factors: dict | None = None) -> np.ndarray:
    """The heat map ``(X, Y, Z)`` on the model grid, NaN outside the scored region: the
    smoothed flow NLL (nats), or for a model with a normative contrast model the fused
    evidence of both maps (``normative.fused_heat``, sum of ``-log10`` healthy voxel FPRs).
    Arguments (``scan_factors`` too) as for :func:`component_heat_maps`."""
    flow_heat, normative_heat = component_heat_maps(model, image, brain_mask, local, device,
                                                    progress, scan_factors)
    if normative_heat is None:
        return flow_heat
    return fused_heat(flow_heat, normative_heat, model.component_calibrations["flow"],
                      model.component_calibrations["normative"])


def components_of(labels: np.ndarray, count: int, heat: np.ndarray, affine: np.ndarray,
                  calibration) -> list[Component]:
    """Volume (mL), centroid (RAS mm), peak / mean score and peak voxel FPR of each label."""
    if count == 0:
        return []
    voxel_ml = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0))) / 1000
    sizes, sums, peaks, centroids = component_statistics(labels, count, heat)
    out = []
    for i in range(count):
        ras = affine[:3, :3] @ centroids[i] + affine[:3, 3]
        out.append(Component(i + 1, round(float(sizes[i] * voxel_ml), 4),
                             [round(float(v), 2) for v in ras], float(peaks[i]),
                             float(sums[i] / sizes[i]), float(calibration.fpr_of_score(peaks[i]))))
    return out


def relabel(detection: Detection, model: AnomalyModel, *, fpr: float | None = None,
            threshold: float | None = None,
            min_component_ml: float | None = None) -> Detection:
    """Labels and components at a new operating point, from the stored native heat map
    (fast: no network runs). Returns an updated copy."""
    threshold, fpr = resolve_threshold(model, fpr, threshold)
    min_ml = model.calibration.min_component_ml if min_component_ml is None else min_component_ml
    spacing = np.linalg.norm(detection.affine[:3, :3], axis=0)
    extent, peak = model.calibration.labelling_thresholds(threshold)
    labels, count = label_anomalies(detection.heat, detection.brain_mask, extent, spacing,
                                    min_ml, peak)
    components = components_of(labels, count, detection.heat, detection.affine,
                               model.calibration)
    from dataclasses import replace

    return replace(detection, labels=labels, threshold=threshold, fpr=fpr,
                   components=components)


def _heat_to_native(heat_model: np.ndarray, mapping, native_brain_mask: np.ndarray,
                    floor: float) -> np.ndarray:
    """Linear resampling of the model-grid heat map onto the native grid, computed only in
    the bounding box of the native brain mask (``floor`` elsewhere): the same values as a
    full-grid resampling inside the brain, at a fraction of the cost on 1 mm scans."""
    from .geometry import Grid, resample

    heat = np.full(native_brain_mask.shape, floor, np.float32)
    if not native_brain_mask.any():
        return heat
    index = np.argwhere(native_brain_mask)
    start, stop = index.min(0), index.max(0) + 1
    box_affine = np.array(mapping.native_grid.affine, float)
    box_affine[:3, 3] = box_affine[:3, :3] @ start + box_affine[:3, 3]
    box = Grid(tuple(int(v) for v in stop - start), box_affine)
    values = resample(heat_model, mapping.model_grid.affine, box,
                      np.linalg.inv(mapping.model_to_native), order=1, fill=floor)
    window = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    heat[window] = np.where(native_brain_mask[window], values, floor)
    return heat


def native_detection(model: AnomalyModel, heat_model: np.ndarray, mapping,
                     native_brain_mask: np.ndarray, *, image_model=None, brain_mask_model=None,
                     fpr: float | None = None, threshold: float | None = None) -> Detection:
    """Map a model-grid heat map to the native grid and label it."""
    floor = float(model.calibration.scores[-1])
    # a deformable model's heat map is in template space: first back onto the affine grid
    affine_heat = mapping.undeform(np.nan_to_num(heat_model, nan=floor), order=1, fill=floor)
    heat = _heat_to_native(affine_heat, mapping,
                           np.asarray(native_brain_mask, bool), floor)
    detection = Detection(heat, np.asarray(native_brain_mask, bool), np.zeros(heat.shape, np.int16),
                          np.asarray(mapping.native_grid.affine, float), 0.0, 0.0, floor, [],
                          heat_model, image_model, brain_mask_model,
                          registration_ncc=float(mapping.registration_ncc), mapping=mapping,
                          heat_units=model.heat_units)
    return relabel(detection, model, fpr=fpr, threshold=threshold)


#: an absolute POSIX path inside a string: its folders, then its last component (group 1)
_LOCAL_PATH = re.compile(r"(?<![\w.])/(?:[^/\s'\"]+/)+([^/\s'\"]+)")


def without_local_folders(value):
    """``value`` (a model's provenance: nested dicts, lists and strings) with every absolute
    path inside a string reduced to its last component, so that a report shows what a model
    was made from (cohort and file names, digests, counts) without the folders of the
    machine it was trained on. ``"T1 '/data/cohort/train_002_t1.nii.gz': refused"`` becomes
    ``"T1 'train_002_t1.nii.gz': refused"``; the model file itself keeps the full record."""
    if isinstance(value, dict):
        return {key: without_local_folders(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_local_folders(item) for item in value]
    if isinstance(value, str):
        return _LOCAL_PATH.sub(r"\1", value)
    return value


#: shown with every detection run without a brain mask (measured in
#: benchmarks/without_mask.py; docs/spatial_msma.md, "Without a brain mask")
NO_BRAIN_MASK_WARNING = (
    "no brain mask was given, so the brain was taken from the template's mask after affine "
    "registration. This model was trained and calibrated on scans with brain masks; "
    "without one, intensities are normalised over a mask that includes some skull and "
    "background, and far more healthy tissue is flagged. Give a brain mask for reliable "
    "results.")


#: shown when a model trained with every brain mask set aside (``brain_masks == "atlas"``)
#: is given one: it is not used, as in training
GIVEN_MASK_SET_ASIDE_WARNING = (
    "this model was trained with the template's brain mask on every scan, so the given "
    "brain mask was not used; the model for scans with a brain mask is the better choice "
    "when you have one.")


def registration_retry_record(mapping) -> dict | None:
    """What the registration retry (``preprocessing.retry_from_scaled_starts``) did to a scan,
    for the report: ``{"first_ncc", "ncc_per_start", "kept", "ncc"}`` (the gate's NCC of
    the first registration, of each scaled start, which result was kept, and the NCC of the
    registration used), or None when no retry ran (a mask was given, or the first
    registration passed the gate). ``mapping``: the scan's ``preprocessing.SpaceMapping``."""
    if mapping is None:
        return None
    for step in mapping.steps:
        if "first_ncc" in step:
            return {"first_ncc": step["first_ncc"], "ncc_per_start": step["ncc_per_start"],
                    "kept": step["kept"], "ncc": float(mapping.registration_ncc)}
    return None


def retried_registration_warning(mapping) -> str | None:
    """The warning for a scan registered without a brain mask whose first registration failed
    the quality gate and was replaced by the retry's (``preprocessing.retry_from_scaled_starts``),
    else None. ``mapping``: the scan's ``preprocessing.SpaceMapping``, with its step records."""
    record = registration_retry_record(mapping)
    if record is None or record["kept"] != "scaled start":
        return None
    return (f"the registration without a brain mask failed the quality gate at first "
            f"(NCC {record['first_ncc']:.2f}) and was redone from smaller starts (NCC "
            f"{record['ncc']:.2f}); check that the brain mask output "
            "outlines the brain, or give a brain mask.")


def detect(
    model: AnomalyModel,
    t1: Volume,
    t2: Volume | None = None,
    brain_mask: Volume | None = None,
    *,
    fpr: float | None = None,
    threshold: float | None = None,
    device: str | torch.device = "cpu",
    names: dict | None = None,
    progress: Progress | None = None,
) -> Detection:
    """The whole detection for one native scan (see the module docstring)."""
    if model.spatial is None or model.calibration is None:
        raise InputError("this model file has no Spatial-MSMA flow (it is an MSMA-only model "
                         "from fit_msma.py); train one with training/train_spatial.py")
    resolve_threshold(model, fpr, threshold)  # fail early on a bad operating point
    timings = {}
    t0 = time.perf_counter()
    scan = prepare(model, t1, t2, brain_mask, names=names, progress=progress)
    timings["preprocess"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    levels = detection_levels(model)  # only what the flow and the typicality model read
    local, whole = compute_features(model, scan, device, progress, levels)
    whole = full_levels(model, levels, whole)
    timings["score_features"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if progress:
        progress("flow likelihood", 0.95)
    scan_factors: dict = {}
    heat_model = model_heat_map(model, scan.image, scan.brain_mask, local, device,
                                scan_factors=scan_factors)
    timings["flow"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    detection = native_detection(model, heat_model, scan.mapping, scan.native_brain_mask,
                                 image_model=scan.image, brain_mask_model=scan.brain_mask,
                                 fpr=fpr, threshold=threshold)
    detection.scan_standardization = scan_factors or None
    problems = contrast_problems(model, scan.image, scan.brain_mask, names)
    if model.typicality is not None:
        report = typicality_report(model, whole, scan.mapping.registration_ncc, problems)
        detection.typicality = report.to_dict()
        detection.warnings = list(report.warnings)
    else:
        detection.warnings = problems
    if brain_mask is None and model.brain_masks == "given":
        detection.warnings.append(NO_BRAIN_MASK_WARNING)
    if brain_mask is not None and model.brain_masks == "atlas":
        detection.warnings.append(GIVEN_MASK_SET_ASIDE_WARNING)
    retried = retried_registration_warning(scan.mapping)
    if retried:
        detection.warnings.append(retried)
    detection.warnings += coarse_voxel_warnings(
        {"t1": t1, "t2": t2 if len(model.channel_names) == 2 else None},
        model.spacing_mm, names)
    timings["post_process"] = round(time.perf_counter() - t0, 2)
    detection.timings = timings
    if progress:
        progress("done", 1.0)
    return detection


# -- outputs -----------------------------------------------------------------------------
OUTPUT_NAMES = {"heat": "heatmap.nii.gz", "labels": "labels.nii.gz",
                "brain_mask": "brainmask.nii.gz", "report": "report.json",
                "figure": "figure.png"}


def check_outputs_free(out_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse early (before any computation) when outputs would be overwritten or the
    folder cannot be made or written (:func:`io.check_output_folder`)."""
    check_output_folder(out_dir)
    existing = [str(Path(out_dir) / n) for n in OUTPUT_NAMES.values()
                if (Path(out_dir) / n).exists()]
    if existing and not overwrite:
        raise InputError(f"outputs already exist ({', '.join(existing)}); pass --overwrite "
                         "to replace them")


def write_outputs(detection: Detection, out_dir: str | Path, model: AnomalyModel,
                  inputs: dict | None = None, overwrite: bool = False,
                  extra_report: dict | None = None) -> dict[str, Path]:
    """Heat map and label volume (NIfTI, native grid), JSON report and PNG figure in
    ``out_dir``; refuses to replace existing outputs unless ``overwrite``."""
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in OUTPUT_NAMES.items()}
    check_outputs_free(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_volume(paths["heat"], detection.heat, detection.affine, overwrite=True)
    save_volume(paths["labels"], detection.labels, detection.affine, overwrite=True)
    save_volume(paths["brain_mask"], detection.brain_mask, detection.affine, overwrite=True)
    report = detection.report(model, inputs)
    report.update(extra_report or {})
    tmp = paths["report"].with_name(".report.json.partial")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(paths["report"])
    save_figure(detection, paths["figure"])
    return paths


def save_figure(detection: Detection, path: str | Path, truth_model: np.ndarray | None = None
                ) -> Path:
    """Three orthogonal model-grid slices through the top component (or the brain centre):
    T1 with the heat map above the threshold in colour and the component outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = detection.image_model[0]
    heat = detection.heat_model
    region = detection.brain_mask_model
    if np.isfinite(heat).any() and (np.nan_to_num(heat, nan=-np.inf) >= detection.threshold).any():
        flagged = np.nan_to_num(heat, nan=-np.inf) >= detection.threshold
        masked = np.where(flagged, np.nan_to_num(heat, nan=-np.inf), -np.inf)
        centre = np.unravel_index(np.argmax(masked), heat.shape)
    else:
        centre = tuple(int(c) for c in np.argwhere(region).mean(0))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    views = [("sagittal", (centre[0], slice(None), slice(None))),
             ("coronal", (slice(None), centre[1], slice(None))),
             ("axial", (slice(None), slice(None), centre[2]))]
    vmax = np.nanpercentile(heat, 99.9) if np.isfinite(heat).any() else 1.0
    vmax = max(float(vmax), detection.threshold + 1e-3)  # strict thresholds can exceed it
    for ax, (name, index) in zip(axes, views, strict=True):
        ax.imshow(image[index].T, cmap="gray", origin="lower")
        h = heat[index].T
        shown = np.where(h >= detection.threshold, h, np.nan)
        ax.imshow(shown, cmap="hot", origin="lower", vmin=detection.threshold, vmax=vmax,
                  alpha=0.8)
        if truth_model is not None:
            ax.contour(truth_model[index].T, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"{name} (model grid)")
        ax.axis("off")
    fig.suptitle(f"Spatial-MSMA: {len(detection.components)} components at voxel FPR "
                 f"{detection.fpr:.2g} (threshold {detection.threshold:.2f} "
                 f"{detection.heat_units})")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name("." + path.name + ".partial.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
