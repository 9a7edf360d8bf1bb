"""``spatial-msma demo``: a sample scan with known lesions, detection, and its metrics.

The sample is a synthetic subject made from the nilearn MNI152 2009a template (the same
generator as the benchmark cohort: deformation, affine jitter, bias field, Rician noise, and
the reference study's white-matter lesion simulator), written to ``OUT/input/``. Detection
runs with the bundled model (or ``model_path``) through the same path as
``spatial-msma detect --mask`` (the subject's brain mask is given, as in training); outputs
go to ``OUT/``; the result is compared with the simulated lesion mask using the benchmark
metrics (PROTOCOLS.md section 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .inference import Progress


def make_sample(out_dir: Path, seed: int = 7, spacing: float = 1.0,
                overwrite: bool = False) -> dict:
    """Write ``t1``, ``t2``, ``brain_mask`` and ``lesion_mask`` NIfTI files of one lesioned
    synthetic subject; returns their paths and the lesion list."""
    from .anatomy import load_mni152_2009a
    from .io import save_volume
    from .lesions import LesionConfig
    from .synthesis import SubjectConfig, synthesize_subject

    subject = synthesize_subject(load_mni152_2009a(), seed, SubjectConfig(spacing_mm=spacing),
                                 LesionConfig())
    paths = {}
    for key, array in (("t1", subject.t1), ("t2", subject.t2),
                       ("brain_mask", subject.brain_mask), ("lesion_mask", subject.lesion_mask)):
        paths[key] = save_volume(out_dir / f"sample_{key}.nii.gz", array, subject.grid.affine,
                                 overwrite=overwrite)
    voxel_ml = float(np.prod(subject.grid.spacing)) / 1000
    return {"paths": paths, "lesions": subject.lesions,
            "lesion_volume_ml": float(subject.lesion_mask.sum() * voxel_ml),
            "lesion_mask": subject.lesion_mask > 0, "spacing": subject.grid.spacing}


def cache_root() -> Path:
    """Where generated sample data is kept between runs: ``$SPATIAL_MSMA_CACHE``, else
    ``$XDG_CACHE_HOME/spatial-msma``, else ``~/.cache/spatial-msma``."""
    import os

    if os.environ.get("SPATIAL_MSMA_CACHE"):
        return Path(os.environ["SPATIAL_MSMA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spatial-msma"


SAMPLE_KEYS = ("t1", "t2", "brain_mask", "lesion_mask")


def cached_sample(seed: int = 7, spacing: float = 1.0, cache_dir: Path | None = None
                  ) -> dict[str, Path]:
    """Paths of the sample subject's files (:func:`make_sample`), generated once into the
    cache (about 20 s at 1 mm on 2 cores) and reused afterwards; the folder appears
    atomically, so an interrupted generation never leaves a partial sample behind."""
    import shutil
    import tempfile

    root = Path(cache_dir) if cache_dir else cache_root()
    folder = root / f"demo_seed{seed}_{spacing:g}mm"
    paths = {key: folder / f"sample_{key}.nii.gz" for key in SAMPLE_KEYS}
    if all(p.exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial_", dir=root))
    try:
        make_sample(staging, seed, spacing, overwrite=True)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            if not all(p.exists() for p in paths.values()):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def run_demo(out_dir: str | Path, *, model_path=None, seed: int = 7, spacing: float = 1.0,
             device="cpu", overwrite: bool = False, progress: Progress | None = None) -> dict:
    from .detection import OUTPUT_NAMES, detect, save_figure, write_outputs
    from .io import check_output_folder, load_volume
    from .metrics import evaluate_case
    from .model import resolve_model

    out_dir = check_output_folder(out_dir)
    existing = [out_dir / n for n in OUTPUT_NAMES.values() if (out_dir / n).exists()]
    if existing and not overwrite:
        raise InputError(f"'{out_dir}' already holds demo outputs; pass --overwrite or "
                         "choose another --out")
    model = resolve_model(model_path, has_t2=True)
    if progress:
        progress("building the sample scan", 0.0)
    sample = make_sample(out_dir / "input", seed, spacing, overwrite=True)
    names = {"t1": sample["paths"]["t1"], "t2": sample["paths"]["t2"],
             "mask": sample["paths"]["brain_mask"]}
    # with the brain mask, as the model was trained (the atlas fallback degrades the result)
    detection = detect(model, load_volume(names["t1"], what="T1"),
                       load_volume(names["t2"], what="T2"),
                       load_volume(names["mask"], what="brain mask"), device=device,
                       names=names, progress=progress)
    metrics = evaluate_case(detection.labels > 0, sample["lesion_mask"], sample["spacing"],
                            detection.heat, detection.brain_mask)
    summary = {key: metrics[key] for key in ("n_truth", "n_detected", "n_pred", "tpr", "ppv",
                                             "dice", "auroc", "auprc", "flagged_ml",
                                             "fp_volume_ml")}
    paths = write_outputs(detection, out_dir, model, names, overwrite=True,
                          extra_report={"demo": {"seed": seed, "spacing_mm": spacing,
                                                 "lesions": sample["lesions"],
                                                 "metrics_vs_simulated_lesions": summary}})
    # figure with the simulated lesions outlined (model grid)
    truth_model = _truth_on_model_grid(model, detection, sample)
    save_figure(detection, paths["figure"], truth_model=truth_model)
    return {"detection": detection, "paths": paths, "metrics": summary,
            "lesion_volume_ml": sample["lesion_volume_ml"]}


def _truth_on_model_grid(model, detection, sample) -> np.ndarray | None:
    """The lesion mask resampled onto the model grid (via the detection's mapping)."""
    mapping = getattr(detection, "mapping", None)
    if mapping is None:
        return None
    return mapping.to_model(sample["lesion_mask"].astype(np.float32), order=1) > 0.5
