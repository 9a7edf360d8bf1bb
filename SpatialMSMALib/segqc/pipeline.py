"""Segmentation QC of a native-space label map: one path shared by the CLI and the GUIs.

The image the segmentation was made from (a T1) is preprocessed into model space with the
foundation pipeline (N4, registration to the MNI template, normalisation); the label map is
carried to the model grid with the same transform (nearest neighbour, from its own grid, which
may differ from the image's), scored by :class:`~SpatialMSMALib.segqc.model.SegQCModel`, and
the per-voxel map is carried back to the label map's grid (linear interpolation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..geometry import Grid, resample
from ..io import Volume
from ..model import MODEL_DIR, REGISTRY
from .model import MODEL_KIND, QCResult, SegQCModel

FLAG_Z = 3.0  # flag a map whose score is 3 sd above the good validation maps' mean


@dataclass
class NativeQC:
    result: QCResult
    voxel_map_native: np.ndarray  # (I, J, K) float32 on the label map's grid
    labels_affine: np.ndarray
    z_score: float
    flagged: bool
    registration_ncc: float

    def report(self) -> dict:
        return self.result.summary() | {
            "z_among_good": self.z_score, "flagged": self.flagged,
            "flag_rule": f"score more than {FLAG_Z:g} sd above the good validation maps' mean",
            "registration_ncc": self.registration_ncc}


def bundled_seg_qc_model() -> SegQCModel:
    """The QC model listed under ``seg_qc`` in ``Resources/Models/registry.json``."""
    entry = json.loads(REGISTRY.read_text()).get("seg_qc") if REGISTRY.exists() else None
    if not entry:
        raise InputError("no bundled segmentation-QC model is installed; pass --model "
                         "(train one with training/train_seg_qc.py)")
    path = MODEL_DIR / entry["file"]
    if not path.exists():
        raise InputError(f"bundled QC model '{path}' listed in {REGISTRY.name} is missing; "
                         "reinstall the package")
    return SegQCModel.load(path)


def check_label_values(labels: Volume, classes: int, name: str) -> np.ndarray:
    """The label array as int64; refuses non-integer or out-of-range values."""
    data = np.asarray(labels.data)
    if data.size == 0:
        raise InputError(f"label map '{name}' is empty")
    if not np.all(np.isfinite(data)) or not np.all(np.mod(data, 1) == 0):
        raise InputError(f"label map '{name}' has non-integer values; expected labels "
                         f"0..{classes - 1} (0 background, 1 CSF, 2 GM, 3 WM)")
    data = data.astype(np.int64)
    if data.min() < 0 or data.max() >= classes:
        raise InputError(f"label map '{name}' has labels {int(data.min())}..{int(data.max())}; "
                         f"this model knows 0..{classes - 1} (0 background, 1 CSF, 2 GM, 3 WM)")
    if not (data > 0).any():
        raise InputError(f"label map '{name}' has no foreground (all background)")
    return data


def z_among_good(model: SegQCModel, score: float) -> float:
    good = model.good_scores
    if len(good) < 2:
        return float("nan")
    return float((score - good.mean()) / (good.std(ddof=1) + 1e-12))


def qc_image(model: SegQCModel, image: Volume, brain_mask: Volume | None = None, *,
             names: dict | None = None):
    """The image a segmentation was made from, preprocessed into the QC model's space (T1
    only); ``brain_mask`` (on the image grid) helps registration, else the atlas mask is
    used. Returns a :class:`~SpatialMSMALib.preprocessing.PreprocessedScan` that
    :func:`qc_labels` scores any number of label maps of this image against."""
    from ..preprocessing import PreprocessConfig, preprocess_scan

    names = names or {}
    config = PreprocessConfig(spacing_mm=model.config.spacing_mm, shape=model.config.shape)
    return preprocess_scan(image, None, brain_mask, config,
                           names={"t1": names.get("image"), "mask": names.get("mask")})


def qc_labels(model: SegQCModel, labels: Volume, prepared, *, names: dict | None = None,
              device: str = "cpu") -> NativeQC:
    """QC of a native label map ``labels`` (RAS affine, any grid) of the image ``prepared``
    by :func:`qc_image`: carried to the model grid (nearest neighbour), scored, and the
    per-voxel map carried back to the label map's grid (linear)."""
    names = names or {}
    label_name = names.get("labels", "labels")
    data = check_label_values(labels, model.config.classes, label_name)
    mapping = prepared.mapping
    labels_model = resample(data, labels.affine, mapping.model_grid, mapping.model_to_native,
                            order=0)
    if not (labels_model > 0).any():
        raise InputError(f"label map '{label_name}' does not overlap the image "
                         f"'{names.get('image', 'image')}' after registration; are they from "
                         "the same scan?")
    result = model.score_map(labels_model, prepared.image[: model.config.image_channels],
                             prepared.brain_mask, device=device)
    native_grid = Grid(tuple(data.shape), np.asarray(labels.affine, float))
    voxel_map = resample(result.voxel_map, mapping.model_grid.affine, native_grid,
                         np.linalg.inv(mapping.model_to_native), order=1)
    z = z_among_good(model, result.score)
    return NativeQC(result, voxel_map.astype(np.float32), np.asarray(labels.affine, float), z,
                    bool(np.isfinite(z) and z > FLAG_Z), float(mapping.registration_ncc))


def qc_native(model: SegQCModel, labels: Volume, image: Volume, brain_mask: Volume | None = None,
              *, names: dict | None = None, device: str = "cpu", progress=None) -> NativeQC:
    """QC of a native label map ``labels`` made from ``image`` (both with RAS affines):
    :func:`qc_image`, then :func:`qc_labels`."""
    names = names or {}
    # refuse a bad label map before the preprocessing's minutes of work
    check_label_values(labels, model.config.classes, names.get("labels", "labels"))
    if progress:
        progress("preprocess image", 0.0)
    prepared = qc_image(model, image, brain_mask, names=names)
    if progress:
        progress("score label map", 0.5)
    qc = qc_labels(model, labels, prepared, names=names, device=device)
    if progress:
        progress("done", 1.0)
    return qc


def calibrate_native(model: SegQCModel, pairs: list[tuple], progress: bool = True) -> np.ndarray:
    """Store in ``model`` the QC scores of good native maps ``[(labels_path, t1_path,
    mask_path or None)]`` run through exactly the path ``spatial-msma seg-qc`` takes
    (T1-only preprocessing), so percentiles and the flag rule compare like with like."""
    from tqdm import tqdm

    from ..io import load_volume

    scores = []
    for labels_path, t1_path, mask_path in tqdm(pairs, desc="calibrate (native path)",
                                                disable=not progress):
        mask = load_volume(mask_path, what="brain mask") if mask_path else None
        qc = qc_native(model, load_volume(labels_path, what="label map"),
                       load_volume(t1_path, what="T1"), mask,
                       names={"labels": str(labels_path), "image": str(t1_path),
                              "mask": str(mask_path) if mask_path else None})
        scores.append(qc.result.score)
    model.good_scores = np.sort(np.asarray(scores, float))
    model.info["calibration"] = {"path": "native (seg-qc)", "n": len(scores)}
    return model.good_scores


__all__ = ["MODEL_KIND", "NativeQC", "bundled_seg_qc_model", "calibrate_native", "qc_image",
           "qc_labels", "qc_native"]
