"""Segmentation and detection metrics (PROTOCOLS.md section 1), all in mm.

Arrays are 3D, indexed ``[i, j, k]``; ``spacing`` is the voxel size in mm along those axes
(anisotropic spacing is honoured). Connected components use 26-connectivity.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Lesion size bins (mm^3) used for TPR by size: [50, 200), [200, 1000), ...
SIZE_BIN_EDGES_MM3 = (0.0, 50.0, 200.0, 1000.0, 5000.0, 15000.0, np.inf)

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary masks; 1.0 when both are empty."""
    p, t = prediction.astype(bool), truth.astype(bool)
    denominator = p.sum() + t.sum()
    if denominator == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denominator)


def voxel_auroc_auprc(
    scores: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
) -> tuple[float, float]:
    """Voxel-level AUROC and AUPRC (average precision) of ``scores`` inside ``mask``.

    Higher score = more anomalous. Returns NaN for both when the masked truth has only one
    class (e.g. a healthy scan).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    m = np.ones(truth.shape, bool) if mask is None else mask.astype(bool)
    y = truth.astype(bool)[m]
    s = np.asarray(scores, dtype=np.float64)[m]
    if y.all() or not y.any():
        return float("nan"), float("nan")
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def detection_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Scan/image-level out-of-distribution metrics, outliers (``labels == 1``) positive and
    higher score = more anomalous: AUROC, AUPRC (average precision) and the false-positive
    rate at 95% true-positive rate (``fpr95``, lower is better)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("detection_metrics needs both inliers and outliers")
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: voxels of ``mask`` with a 6-neighbour outside it."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def directed_surface_distances(
    source: np.ndarray, target: np.ndarray, spacing: np.ndarray
) -> np.ndarray:
    """Distance (mm) from every boundary voxel of ``source`` to the boundary of ``target``.

    Both masks must be non-empty. Returns a 1D array, one value per source boundary voxel.
    """
    source_surface = _surface(source.astype(bool))
    target_surface = _surface(target.astype(bool))
    distance_to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    return distance_to_target[source_surface]


def surface_distances(
    prediction: np.ndarray, truth: np.ndarray, spacing, percentile: float = 99.0
) -> dict[str, float]:
    """HD (at ``percentile``) and mean surface distance, symmetric and truth->prediction.

    Keys: ``hd99`` (max of both directed percentiles), ``hd99_truth_to_pred``, ``msd``
    (mean over the union of both directed distance sets), ``msd_truth_to_pred``.
    All NaN when either mask is empty (the caller counts such cases).
    """
    spacing = np.asarray(spacing, dtype=float)
    p, t = prediction.astype(bool), truth.astype(bool)
    keys = ("hd99", "hd99_truth_to_pred", "msd", "msd_truth_to_pred")
    if not p.any() or not t.any():
        return {k: float("nan") for k in keys}
    pred_to_truth = directed_surface_distances(p, t, spacing)
    truth_to_pred = directed_surface_distances(t, p, spacing)
    return {
        "hd99": float(
            max(np.percentile(pred_to_truth, percentile), np.percentile(truth_to_pred, percentile))
        ),
        "hd99_truth_to_pred": float(np.percentile(truth_to_pred, percentile)),
        "msd": float(np.concatenate([pred_to_truth, truth_to_pred]).mean()),
        "msd_truth_to_pred": float(truth_to_pred.mean()),
    }


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask: (labels, count)."""
    labels, count = ndimage.label(mask.astype(bool), structure=_STRUCTURE_26)
    return labels, int(count)


def component_detection(prediction: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """Component-wise detection (any-overlap rule, 26-connectivity).

    Returns a dict with ``n_truth``, ``n_detected`` (truth components touched by any predicted
    voxel), ``n_pred``, ``n_pred_true`` (predicted components touching a truth voxel), ``tpr``,
    ``ppv`` (NaN when the denominator is 0) and ``truth_sizes_mm3`` / ``truth_detected``
    (per truth component, for TPR by size).
    """
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=float)))
    p, t = prediction.astype(bool), truth.astype(bool)
    truth_labels, n_truth = label_components(t)
    pred_labels, n_pred = label_components(p)
    ids = np.arange(1, n_truth + 1)
    sizes = ndimage.sum_labels(np.ones_like(t, dtype=np.float64), truth_labels, ids) * voxel_mm3
    detected = ndimage.maximum(p, truth_labels, ids) > 0 if n_truth else np.zeros(0, bool)
    pred_ids = np.arange(1, n_pred + 1)
    pred_true = ndimage.maximum(t, pred_labels, pred_ids) > 0 if n_pred else np.zeros(0, bool)
    n_detected = int(np.sum(detected))
    n_pred_true = int(np.sum(pred_true))
    return {
        "n_truth": n_truth,
        "n_detected": n_detected,
        "n_pred": n_pred,
        "n_pred_true": n_pred_true,
        "tpr": n_detected / n_truth if n_truth else float("nan"),
        "ppv": n_pred_true / n_pred if n_pred else float("nan"),
        "truth_sizes_mm3": np.atleast_1d(sizes).astype(float).tolist(),
        "truth_detected": np.atleast_1d(detected).astype(bool).tolist(),
    }


def tpr_by_size(sizes_mm3, detected, edges=SIZE_BIN_EDGES_MM3) -> list[dict]:
    """Detection rate per lesion-size bin; pools any number of lesions (lists of equal length)."""
    sizes = np.asarray(sizes_mm3, dtype=float)
    hits = np.asarray(detected, dtype=bool)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (sizes >= low) & (sizes < high)
        n = int(in_bin.sum())
        rows.append(
            {
                "bin_mm3": [float(low), float(high)],
                "n": n,
                "tpr": float(hits[in_bin].mean()) if n else float("nan"),
            }
        )
    return rows


def false_positive_burden(prediction: np.ndarray, spacing,
                          truth: np.ndarray | None = None) -> dict[str, float]:
    """Flagged volume and false positives of one binary prediction.

    Returns ``flagged_ml`` (all predicted voxels, mL), ``fp_volume_ml`` (predicted voxels
    outside ``truth``, mL) and ``fp_components`` (predicted components, 26-connectivity, that
    touch no truth voxel). Without ``truth`` (a healthy scan) every flagged voxel and
    component is a false positive.
    """
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=float))) / 1000.0
    p = prediction.astype(bool)
    labels, count = label_components(p)
    if truth is None or not truth.any():
        outside, false_components = p, count
    else:
        t = truth.astype(bool)
        outside = p & ~t
        touches = ndimage.maximum(t, labels, np.arange(1, count + 1)) > 0 if count else []
        false_components = int(count - np.sum(touches))
    return {"flagged_ml": float(p.sum() * voxel_ml),
            "fp_volume_ml": float(outside.sum() * voxel_ml),
            "fp_components": false_components}


def evaluate_case(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing,
    scores: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
) -> dict:
    """Every per-case metric of PROTOCOLS.md section 1 for one volume.

    ``prediction`` and ``truth`` are binary masks of the same shape; ``scores`` (optional) is
    the raw anomaly map, evaluated inside ``brain_mask`` (whole volume if not given).
    A truth mask without any voxel marks a healthy scan: false-positive burden is reported.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != truth shape {truth.shape}")
    spacing = np.asarray(spacing, dtype=float)
    result: dict = {"healthy": not truth.any(), "dice": dice(prediction, truth)}
    result.update(surface_distances(prediction, truth, spacing))
    result["empty_prediction"] = not prediction.any()
    result.update(component_detection(prediction, truth, spacing))
    result.update(false_positive_burden(prediction, spacing, truth))
    if scores is not None:
        if scores.shape != truth.shape:
            raise ValueError(f"scores shape {scores.shape} != truth shape {truth.shape}")
        auroc, auprc = voxel_auroc_auprc(scores, truth, brain_mask)
        result.update({"auroc": auroc, "auprc": auprc})
    return result


def evaluate_operating_point(prediction: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """The threshold-dependent metrics of ``evaluate_case`` without the surface distances and
    the score-map ones (cheap: for sweeping operating points): Dice, component detection and
    false-positive burden."""
    result: dict = {"healthy": not truth.any(), "dice": dice(prediction, truth)}
    result.update(component_detection(prediction, truth, spacing))
    result.update(false_positive_burden(prediction, spacing, truth))
    return result


def summarize(cases: list[dict]) -> dict:
    """Mean, SD and count over volumes of each scalar metric, plus pooled component TPR/PPV.

    NaN values (e.g. distances on empty predictions) are excluded from mean/SD and counted in
    ``n_undefined``.
    """
    out: dict = {"n_volumes": len(cases)}
    scalar_keys = [k for k, v in cases[0].items() if isinstance(v, float | int) and k != "healthy"]
    for key in scalar_keys:
        values = np.array([float(c[key]) for c in cases])
        defined = values[np.isfinite(values)]
        out[key] = {
            "mean": float(defined.mean()) if defined.size else float("nan"),
            "sd": float(defined.std(ddof=1)) if defined.size > 1 else float("nan"),
            "n": int(defined.size),
            "n_undefined": int(values.size - defined.size),
        }
    n_truth = sum(c["n_truth"] for c in cases)
    n_pred = sum(c["n_pred"] for c in cases)
    out["pooled_tpr"] = sum(c["n_detected"] for c in cases) / n_truth if n_truth else float("nan")
    out["pooled_ppv"] = sum(c["n_pred_true"] for c in cases) / n_pred if n_pred else float("nan")
    sizes = [s for c in cases for s in c["truth_sizes_mm3"]]
    hits = [h for c in cases for h in c["truth_detected"]]
    out["tpr_by_size"] = tpr_by_size(sizes, hits)
    return out


#: the issue's headline size: lesion TPR is also reported for lesions of at least 0.5 mL
LARGE_LESION_MM3 = 500.0


def split_summary(cases: list[dict]) -> dict:
    """One test split (``evaluate_case`` results, healthy and lesioned scans mixed): counts,
    ``summarize`` of the lesioned scans, pooled TPR for lesions >= 0.5 mL, and the healthy
    scans' false-positive burden (median / mean / max flagged mL, mean false components)."""
    lesioned = [c for c in cases if not c["healthy"]]
    healthy = [c for c in cases if c["healthy"]]
    out = {"n_lesioned": len(lesioned), "n_healthy": len(healthy)}
    if lesioned:
        out["lesioned"] = summarize(lesioned)
        sizes = np.array([s for c in lesioned for s in c["truth_sizes_mm3"]])
        hits = np.array([h for c in lesioned for h in c["truth_detected"]], bool)
        large = sizes >= LARGE_LESION_MM3
        out["pooled_tpr_lesions_ge_0.5ml"] = float(hits[large].mean()) if large.any() else None
        out["n_lesions_ge_0.5ml"] = int(large.sum())
    if healthy:
        fp = np.array([c["fp_volume_ml"] for c in healthy])
        out["healthy"] = {"median_flagged_ml": float(np.median(fp)),
                          "mean_flagged_ml": float(fp.mean()),
                          "max_flagged_ml": float(fp.max()),
                          "mean_false_components": float(np.mean(
                              [c["fp_components"] for c in healthy]))}
    return out
